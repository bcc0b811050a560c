"""Dependency gating end to end: twistd protheus-broker and a sample AppServer as real
processes, the dependency a port this test opens and closes, DEPENDS_ON switched by SIGHUP."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientCreator, Factory, Protocol

from protheus_broker.demo.children import twistd_argv

from .helpers import ProcessTestCase
from .test_deps_sockets import SmartClient, until


class DependencyProcessTests(ProcessTestCase):
    timeout = 90

    def ini(self, sim_port: int, dep_port: int, depends_on: str) -> str:
        return ("[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
                "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
                f"CONNECT_TIMEOUT = 1\nREMOTE_SERVER_A = 127.0.0.1 {sim_port}\n"
                + (f"DEPENDS_ON = {depends_on}\n" if depends_on else "")
                + f"[LockServer]\nEnable = 0\nServer = 127.0.0.1\nPort = {dep_port}\nMessagelog = 0\n"
                "CHECK_INTERVAL = 0.2\nCONNECT_TIMEOUT = 1\nDOWN_AFTER_FAILURES = 1\nUP_AFTER_SUCCESSES = 1\n")

    async def login(self, port: int, payload: bytes) -> SmartClient:
        client = SmartClient(payload)
        await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        self.addCleanup(lambda: client.transport.loseConnection())
        await until(lambda: client.closed or client.data.endswith(payload), 20)
        return client

    @defer.inlineCallbacks
    def test_reload_gates_logins_on_a_dependency(self) -> Any:
        """SIGHUP adds DEPENDS_ON = LOCKSERVER while its port is closed: new logins are closed with
        the reason logged, the open session carries on; the port reopens: logins pass; SIGHUP
        removes DEPENDS_ON: its check stops and logins pass with the port closed."""
        yield defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        sim = self.start("sim", twistd_argv("protheus-appserver-sim", "--name", "a",
                                            "--port", "tcp:0:interface=127.0.0.1"))
        sim_port = await sim.listening()
        service = Factory.forProtocol(Protocol)
        listening = reactor.listenTCP(0, service, interface="127.0.0.1")  # type: ignore[attr-defined]
        dep_port = listening.getHost().port
        path = self.write_ini(self.ini(sim_port, dep_port, ""))
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        port = await broker.listening()
        first = await self.login(port, b"one")
        self.assertIn(b"PROTHEUS-SIM a", first.data)

        await listening.stopListening()
        with open(path, "w") as handle:
            handle.write(self.ini(sim_port, dep_port, "LOCKSERVER"))
        signalled = time.monotonic()
        broker.signal("HUP")
        await until(lambda: "dependency LOCKSERVER" in broker.text() and "is down" in broker.text(), 20)
        down_after = time.monotonic() - signalled
        refused = await self.login(port, b"two")
        self.assertTrue(refused.closed)
        self.assertNotIn(b"PROTHEUS-SIM", refused.data)
        await until(lambda: f"dependency LOCKSERVER (127.0.0.1:{dep_port}) down, closing the client"
                    in broker.text(), 20)
        first.transport.write(b" more")  # the open session carries on
        await until(lambda: first.data.endswith(b"one more"), 20)

        listening = reactor.listenTCP(dep_port, service, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(lambda: listening.stopListening())
        reopened = time.monotonic()
        await until(lambda: "is up again after" in broker.text(), 20)
        up_after = time.monotonic() - reopened
        third = await self.login(port, b"three")
        self.assertIn(b"PROTHEUS-SIM a", third.data)

        with open(path, "w") as handle:
            handle.write(self.ini(sim_port, dep_port, ""))
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGHUP)  # (TwistdChild.signal sends each signal once)
        await until(lambda: "no unit depends on it any more" in broker.text(), 20)
        await listening.stopListening()
        fourth = await self.login(port, b"four")
        self.assertIn(b"PROTHEUS-SIM a", fourth.data)
        self.assertFalse(fourth.closed)
        self.assertNotIn("Starting factory", broker.text())  # the checks are quiet
        print(f"\n  deps e2e: CHECK_INTERVAL=0.2 DOWN_AFTER_FAILURES=1 UP_AFTER_SUCCESSES=1; down logged "
              f"{down_after * 1000:.0f} ms after SIGHUP, up logged {up_after * 1000:.0f} ms after the port "
              f"reopened; 1 login refused, 3 passed, the open session echoed through")
