"""End to end with real processes on 127.0.0.1: broker + 3 sample AppServers + 3 agents over
mutual TLS (SMARTCLIENT_SSL_ACTIVE), SORT_METHOD=SERVER_MEMORY."""

from __future__ import annotations

import re
import time
from typing import Any

from twisted.internet import defer, reactor, task

from twisted.internet.protocol import ClientCreator

from protheus_broker.tls.certs import make_ca, make_cert, write_pair
from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import ProcessTestCase
from .test_e2e import Client


class MonitoredBrokerTests(ProcessTestCase):
    timeout = 60

    async def login(self, port: int) -> Client:
        """One SmartClient login through the broker; fails the test if no AppServer greets."""
        client = Client()
        await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        timer = reactor.callLater(5, client.greeted.cancel)
        try:
            await client.greeted
        except defer.CancelledError:
            self.fail("a login got no AppServer greeting within 5 s:\n" + self.logs())
        timer.cancel()
        return client

    def logs(self) -> str:
        return "\n".join(f"--- {c.name}\n{c.text()}" for c in self.children)

    def certificates(self) -> str:
        directory = self.mktemp_dir()
        ca = make_ca()
        write_pair(directory, "ca", ca)
        write_pair(directory, "broker", make_cert(ca, "broker", client=True))
        write_pair(directory, "agent", make_cert(ca, "agent", ["127.0.0.1", "localhost"]))
        return directory

    async def wait_for(self, child: TwistdChild, pattern: str, count: int = 1,
                       limit: float = 30.0) -> float:
        """Poll *child*'s output until *pattern* matches *count* times; returns when (monotonic)."""
        deadline = time.monotonic() + limit
        while len(re.findall(pattern, child.text())) < count:
            if time.monotonic() > deadline:
                self.fail(f"{pattern!r} not seen {count}x in {limit}s:\n{self.logs()}")
            await task.deferLater(reactor, 0.02, lambda: None)
        return time.monotonic()

    @defer.inlineCallbacks
    def test_server_memory_over_mutual_tls_with_agents(self) -> Any:
        """New sessions go to the AppServer using least memory; killing it takes it Up -> Down
        (the agent's report; the seconds are printed) with no failed login; sessions then go to
        the next lowest."""
        yield defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        certs = self.certificates()
        ballast = {"a": 240, "b": 0, "c": 120}  # MiB: b uses least memory, then c
        started = {n: self.start(n, twistd_argv("protheus-appserver-sim", "--name", n,
                                                "--port", "tcp:0:interface=127.0.0.1",
                                                "--ballast-mb", str(mib)))
                   for n, mib in ballast.items()}
        ports = {n: await c.listening() for n, c in started.items()}

        agents: dict[str, TwistdChild] = {}
        for name, port in ports.items():
            ini = self.write_ini(
                "[AGENT]\nPORT = 0\nINTERFACE = 127.0.0.1\n"
                f"SSL_CERTIFICATE = {certs}/agent.pem\nSSL_KEY = {certs}/agent.key\n"
                f"SSL_CA = {certs}/ca.pem\n"
                f"[APPSERVER_{name.upper()}]\nPORT = {port}\n")  # found by its listening port
            agents[name] = self.start(f"agent-{name}", twistd_argv("protheus-agent", "--config", ini))
        agent_ports = {n: await c.listening() for n, c in agents.items()}

        servers = "".join(f"REMOTE_SERVER_{n.upper()} = 127.0.0.1 {port}\n"
                          f"AGENT_SERVER_{n.upper()} = 127.0.0.1 {agent_ports[n]}\n"
                          for n, port in ports.items())
        path = self.write_ini(
            "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
            "SORT_METHOD = SERVER_MEMORY\nMONITORING_TYPE = SMARTCLIENT_SSL_ACTIVE\nCONNECT_TIMEOUT = 1\n"
            f"AGENT_SSL_CERTIFICATE = {certs}/broker.pem\nAGENT_SSL_KEY = {certs}/broker.key\n"
            f"AGENT_SSL_CA = {certs}/ca.pem\n" + servers)
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        port = await broker.listening()
        await self.wait_for(broker, r"agent channel to \S+ authenticated \(mutual TLS\)", count=3)
        await task.deferLater(reactor, 1.5, lambda: None)  # first reports in
        self.assertNotIn("-> suspended", broker.text())

        # SERVER_MEMORY: the lightest AppServer takes the new sessions (20 MiB each is far
        # from the 120 MiB gap, so all three go there).
        clients = [await self.login(port) for _ in range(3)]
        self.assertEqual([c.name for c in clients], ["b", "b", "b"])

        # Kill b: the agent sees it stop accepting and the broker takes it Down, while logins
        # carry on without a failure.
        killed_at = time.monotonic()
        started["b"].signal("KILL")
        await started["b"].ended  # (a connect the dying process's backlog took would be lost)
        landed: list[str] = []
        down_at = None
        while down_at is None:  # a login every 50 ms, as users would, each logging out again
            client = await self.login(port)
            landed.append(client.name)
            client.transport.loseConnection()
            await task.deferLater(reactor, 0.05, lambda: None)
            if re.search(r"server B \(\S+\) \w+ -> down: SMARTCLIENT_SSL_ACTIVE: agent: AppServer "
                         r"not accepting[^\n]*\n", broker.text()):  # (the whole line)
                down_at = time.monotonic()
            elif time.monotonic() - killed_at > 15:  # a bound on the wait, not a figure
                self.fail(f"b not down 15 s after the kill:\n{broker.text()}")
        print(f"\nkill -> Down: {down_at - killed_at:.2f} s (a figure; bench/bench_failover_detect.py "
              f"measures it over many runs)")
        # B's states: from Up to Down for the agent's reason, at most by way of Suspended when a
        # login's connect was refused first (the login then went on to another server).
        changes = re.findall(r"server B \(\S+\) (\w+) -> (\w+): (.*)", broker.text())
        self.assertIn([(old, new) for old, new, _ in changes],
                      ([("up", "down")], [("up", "suspended"), ("suspended", "down")]), changes)
        self.assertTrue(changes[-1][2].startswith("SMARTCLIENT_SSL_ACTIVE: agent: AppServer not "
                                                  "accepting: local connect to 127.0.0.1:"), changes)
        if len(changes) == 2:
            self.assertTrue(changes[0][2].startswith("connect failed: Connection was refused"), changes)
        self.assertNotIn("b", landed)
        self.assertNotIn("no AppServer available", broker.text())
        # The next lightest now takes the sessions (once a fresh report has replaced the 20 MiB
        # per session estimated for the logins placed in the loop above).
        await task.deferLater(reactor, 1.2, lambda: None)
        self.assertEqual((await self.login(port)).name, "c")
        for client in clients:
            await client.done  # their AppServer was killed: the broker closed them
