"""Fault injection with real processes on 127.0.0.1: a SmartClient stand-in -> protheus-connect ->
a fault proxy that cuts the link (resets and black holes) and holds it down -> protheus-broker ->
the sample AppServer (echo).  Size and cuts: RESUME_E2E_MB (default 50, each way) and
RESUME_E2E_CUTS (default 200)."""

from __future__ import annotations

import os
import random
import re
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientCreator
from twisted.logger import Logger

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .fault_proxy import FaultProxy
from .helpers import ProcessTestCase
from .test_proxy_sockets import MB, Peer, expected_digest

log = Logger()

SIZE = int(float(os.environ.get("RESUME_E2E_MB", "50")) * MB)
CUTS = int(os.environ.get("RESUME_E2E_CUTS", "200"))
SEED = int(os.environ.get("RESUME_E2E_SEED", "20261123"))


class EstablishedPeer(Peer):
    """A :class:`Peer` that first exchanges one byte with the AppServer (as a SmartClient's login
    does), so that the session is established on the broker before the bulk stream starts; the
    echoed byte is not counted."""

    WARMUP = b"w"

    def __init__(self, reactor: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reactor = reactor
        self.warm = False

    def connectionMade(self) -> None:
        self.transport.write(self.WARMUP)

    def dataReceived(self, data: bytes) -> None:
        if not self.warm:
            assert data[:1] == self.WARMUP
            self.warm, data = True, data[1:]
            # the connector's acknowledgement crosses an idle link meanwhile
            self.reactor.callLater(0.2, super().connectionMade)
        if data:
            super().dataReceived(data)


def count(child: TwistdChild, pattern: str) -> int:
    return len(re.findall(pattern, child.text()))


class FaultInjectionTests(ProcessTestCase):
    timeout = 240

    async def start_chain(self, keepalive: str = "0.1") -> tuple[TwistdChild, TwistdChild, int, int]:
        """Sample AppServer, broker (resumable sessions on), returns (broker, sim, broker port,
        sim port); the connector is started by the test (it needs the proxy's port)."""
        sim = self.start("sim", twistd_argv("protheus-appserver-sim", "--name", "a", "--no-greeting",
                                            "--port", "tcp:0:interface=127.0.0.1"))
        sim_port = await sim.listening()
        ini = self.write_ini(
            "[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
            "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
            f"REMOTE_SERVER_A = 127.0.0.1 {sim_port}\nRESUME_KEEPALIVE = {keepalive}\n")
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", ini))
        return broker, sim, await broker.listening(), sim_port

    async def connector(self, broker_port: int, keepalive: str = "0.1") -> tuple[TwistdChild, int]:
        ini = self.write_ini(f"[drivers]\nactive=TCP\n[TCP]\nserver=127.0.0.1\nport={broker_port}\n"
                             "BrokerProxy=1\n", "smartclient.ini")
        child = self.start("connector", twistd_argv("protheus-connect", "--config", ini,
                                                    "--listen-port", "0", "--keepalive", keepalive))
        return child, await child.listening()

    async def transfer(self, port: int, size: int, seed: int, establish: bool = False) -> Peer:
        peer = (EstablishedPeer(reactor, send_seed=seed, send_size=size) if establish
                else Peer(send_seed=seed, send_size=size))
        await ClientCreator(reactor, lambda: peer).connectTCP("127.0.0.1", port)
        await peer.done
        return peer

    @defer.inlineCallbacks
    def test_cuts_during_bulk_transfer_lose_nothing(self) -> Any:
        """Many cuts (resets and black holes, random outages) while SIZE bytes go each way through
        an established session (a one-byte exchange first, as a login does): the echo's sha256
        is the sent stream's, the AppServer saw one connection that echoed it all, every drop
        was resumed on both sides, nothing expired; a plain SmartClient on the same broker port
        still works."""
        yield defer.ensureDeferred(self._cuts())

    async def _cuts(self) -> None:
        broker, sim, broker_port, _ = await self.start_chain()
        rng = random.Random(SEED)
        total = 2 * SIZE
        cut_at = [int(rng.uniform(0.01, 0.97) * total) for _ in range(CUTS)]
        proxy = FaultProxy(reactor, broker_port, cut_at, rng, silent_ratio=0.05,
                           downtime=lambda r: r.uniform(0.0, 0.05) if r.random() < 0.9
                           else r.uniform(0.2, 0.6))
        listening = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        connector, local_port = await self.connector(listening.getHost().port)

        peer = await self.transfer(local_port, SIZE, SEED, establish=True)

        self.assertEqual(peer.received, SIZE)
        self.assertEqual(peer.digest.hexdigest(), expected_digest(SEED, SIZE))
        self.assertGreaterEqual(proxy.cuts, CUTS)
        # the AppServer saw exactly one connection, and it echoed everything
        await self.wait_for(sim, r"closed after echoing")
        self.assertEqual(re.findall(r"session (\d+) closed after echoing (\d+) bytes", sim.text()),
                         [("1", str(SIZE + len(EstablishedPeer.WARMUP)))])
        # every drop resumed, on both sides; nothing expired or failed
        drops = count(broker, r"link dropped \(")
        resumes = count(broker, r"resumed from 127\.0\.0\.1:\d+ after")
        log.info("fault injection: {cuts} cuts ({silent} black holes), {refused} connections refused "
                 "while down, {drops} drops, {resumes} resumes, {forwarded} bytes through the proxy",
                 cuts=proxy.cuts, silent=proxy.silent_cuts, refused=proxy.refused, drops=drops,
                 resumes=resumes, forwarded=proxy.total)
        self.assertGreater(drops, CUTS // 2)
        self.assertEqual(resumes, drops)
        self.assertEqual(count(connector, r"connector session \w+: link to the broker dropped"),
                         count(connector, r"connector session \w+ resumed after"))
        for child, word in ((broker, "no resume within"), (connector, "no resume within"),
                            (connector, "closing the SmartClient connection"),
                            (broker, "Traceback"), (connector, "Traceback")):
            self.assertNotIn(word, child.text())
        await self.wait_for(broker, r"resumable session 1 .*ended|session 1 127\.0\.0\.1:\d+ -> A ended")

        # the same broker port still serves a plain SmartClient
        plain = await self.transfer(broker_port, MB, 7)
        self.assertEqual(plain.digest.hexdigest(), expected_digest(7, MB))

    async def wait_for(self, child: TwistdChild, pattern: str) -> None:
        """Until *pattern* appears in the child's output (bounded by the test timeout)."""
        from twisted.internet import task

        while not re.search(pattern, child.text()):
            await task.deferLater(reactor, 0.05, lambda: None)


class ConnectorProcessTests(ProcessTestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_bad_smartclient_ini_stops_startup_with_one_line(self) -> Any:
        """A smartclient.ini section without BrokerProxy=1 exits non-zero with one line naming
        the file, line and key."""
        path = self.write_ini("[drivers]\nactive=TCP\n[TCP]\nserver=broker.example\nport=1234\n",
                              "smartclient.ini")
        child = self.start("connector", twistd_argv("protheus-connect", "--config", path))
        code = yield child.ended
        self.assertNotEqual(code, 0)
        lines = [line for line in child.text().splitlines() if line.strip()]
        self.assertEqual(lines, [f"protheus-connect: {path}:3: BrokerProxy: must be 1: this section "
                                 "connects straight to an AppServer, the connector needs a broker"])

    @defer.inlineCallbacks
    def test_broker_down_closes_the_smartclient(self) -> Any:
        """With no broker to open a session on, the SmartClient's connection is closed (as with
        a broker that is down) and the connector keeps serving."""
        from twisted.internet.protocol import Factory

        closed = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        port = closed.getHost().port
        yield closed.stopListening()
        path = self.write_ini(f"[drivers]\nactive=TCP\n[TCP]\nserver=127.0.0.1\nport={port}\n"
                              "BrokerProxy=1\n", "smartclient.ini")
        child = self.start("connector", twistd_argv("protheus-connect", "--config", path,
                                                    "--listen-port", "0"))
        local = yield child.listening()
        for _ in range(2):
            peer = Peer(wait_for_eof=True)
            yield ClientCreator(reactor, lambda: peer).connectTCP("127.0.0.1", local)
            yield peer.done
            self.assertEqual(peer.received, 0)
        self.assertIn("cannot open a session on the broker", child.text())
