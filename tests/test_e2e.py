"""End to end with real processes on 127.0.0.1: twistd broker plugin + sample AppServers."""

from __future__ import annotations

import hashlib
import random
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientCreator

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import ProcessTestCase
from .test_proxy_sockets import Peer


class Client(Peer):
    """Reads the greeting line, then counts and hashes what is echoed."""

    def __init__(self) -> None:
        super().__init__(wait_for_eof=True)  # sends only what the test writes
        self.buffer = b""
        self.greeted: defer.Deferred[str] = defer.Deferred()
        self.name = ""

    def dataReceived(self, data: bytes) -> None:
        if not self.greeted.called:
            self.buffer += data
            if b"\r\n" in self.buffer:
                line, rest = self.buffer.split(b"\r\n", 1)
                self.name = line.decode().split()[1]
                self.greeted.callback(self.name)
                if rest:
                    super().dataReceived(rest)
            return
        super().dataReceived(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()


class ProcessTests(ProcessTestCase):
    timeout = 90

    async def sims(self, *names: str) -> dict[str, tuple[TwistdChild, int]]:
        started = {n: self.start(n, twistd_argv("protheus-appserver-sim", "--name", n,
                                                "--port", "tcp:0:interface=127.0.0.1"))
                   for n in names}
        return {n: (c, await c.listening()) for n, c in started.items()}

    def ini(self, sims: dict[str, tuple[TwistdChild, int]], extra: str = "") -> str:
        servers = "".join(f"REMOTE_SERVER_{n.upper()} = 127.0.0.1 {port}\n" for n, (_, port) in sims.items())
        return ("[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
                "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\n"
                "MONITORING_TYPE = DISABLED\nCONNECT_TIMEOUT = 1\n" + servers + extra)

    async def login(self, port: int) -> Client:
        client = Client()
        await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        await client.greeted
        return client

    async def echo(self, client: Client, size: int, seed: int) -> None:
        payload = random.Random(seed).randbytes(size)
        start = client.received
        client.transport.write(payload)
        while client.received < start + size:
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(client.received, start + size)

    @defer.inlineCallbacks
    def test_broker_plugin_balances_reloads_and_fails_over(self) -> Any:
        """twistd protheus-broker: CONNECTION order, byte-exact echo, SIGHUP adds a server with
        open sessions kept, a killed AppServer is skipped with no failed login."""
        yield defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        sims = await self.sims("a", "b", "c")
        path = self.write_ini(self.ini(sims))
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        port = await broker.listening()

        clients = [await self.login(port) for _ in range(4)]
        self.assertEqual([c.name for c in clients], ["a", "b", "c", "a"])

        # 5 MB of random bytes through the processes, byte-exact.
        payload = random.Random(5).randbytes(5 * 1024 * 1024)
        clients[0].transport.write(payload)
        while clients[0].received < len(payload):
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(clients[0].digest.hexdigest(), hashlib.sha256(payload).hexdigest())

        # Reload with a fourth server: open sessions carry on, new ones go to it.
        more = await self.sims("d")
        with open(path, "w") as handle:
            handle.write(self.ini({**sims, **more}))
        broker.signal("HUP")
        while "reloaded" not in broker.text():
            await task.deferLater(reactor, 0.05, lambda: None)
        for n, client in enumerate(clients):
            await self.echo(client, 1000, n)
        self.assertEqual((await self.login(port)).name, "d")

        # Kill AppServer b: its session ends, and new logins never fail.
        sims["b"][0].signal("KILL")
        await sims["b"][0].ended
        await clients[1].done
        landed = [(await self.login(port)).name for _ in range(6)]
        self.assertNotIn("b", landed)
        self.assertEqual(sorted(set(landed)), ["a", "c", "d"])
        self.assertIn("Connection was refused", broker.text())
        self.assertIn("ended: server", broker.text())

    @defer.inlineCallbacks
    def test_bad_config_stops_startup_with_one_line(self) -> Any:
        """A bad config exits non-zero with one line naming file, line, key and the problem."""
        path = self.write_ini("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 4000\n"
                              "REMOTE_SERVER_01 = 127.0.0.1\n")
        child = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        code = yield child.ended
        self.assertNotEqual(code, 0)
        lines = [line for line in child.text().splitlines() if line.strip()]
        self.assertEqual(lines, [f"protheus-broker: {path}:3: REMOTE_SERVER_01: missing port: "
                                 "expected 'host port', got '127.0.0.1'"])

    @defer.inlineCallbacks
    def test_bad_reload_keeps_running_config(self) -> Any:
        """A broken config on SIGHUP is refused and logged; the broker keeps serving."""
        sims = yield defer.ensureDeferred(self.sims("a"))
        path = self.write_ini(self.ini(sims))
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        port = yield broker.listening()
        with open(path, "w") as handle:
            handle.write("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = x\n")
        broker.signal("HUP")
        while "reload refused" not in broker.text():
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertIn("LOCAL_SERVER_PORT: port must be a number", broker.text())
        client = yield defer.ensureDeferred(self.login(port))
        self.assertEqual(client.name, "a")
        client.transport.loseConnection()
        yield client.done
