"""Dependency gating over real sockets on 127.0.0.1, all in this process, bounded in time: a
desktop unit and a web-services unit DEPENDS_ON a TCP port this test opens and closes."""

from __future__ import annotations

import functools
import json
import time
from typing import Any, Callable, Coroutine

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from protheus_broker.config import parse_config
from protheus_broker.sim.appserver import AppServerSimFactory
from protheus_broker.tap import BrokerService

from .helpers import LogCatcher
from .http_backend import BackendFactory, Client, header


def as_deferred(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., defer.Deferred[None]]:
    """An async test as a Deferred-returning one (Twisted 22.4's trial does not await coroutines)."""
    @functools.wraps(test)
    def run(self: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(test(self))
    return run


async def until(predicate: Callable[[], bool], seconds: float = 10.0) -> float:
    """Wait until *predicate* holds (polling every 10 ms, at most *seconds*); the time it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not true after {seconds}s")
        await task.deferLater(reactor, 0.01, lambda: None)
    return time.monotonic() - start


class SmartClient(Protocol):
    """Sends its payload, collects what comes back, notes when the connection closes."""

    transport: Any

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.data = b""
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:
        self.closed = True


class Rig:
    """A sample AppServer, an HTTP backend, the service the units depend on, and a broker with a
    desktop and a web-services unit that both DEPENDS_ON it."""

    def __init__(self, test: TestCase) -> None:
        self.test = test
        appserver = reactor.listenTCP(0, AppServerSimFactory("S1"), interface="127.0.0.1")  # type: ignore[attr-defined]
        test.addCleanup(appserver.stopListening)
        backend = reactor.listenTCP(0, BackendFactory("B"), interface="127.0.0.1")  # type: ignore[attr-defined]
        test.addCleanup(backend.stopListening)
        self.service_factory = Factory.forProtocol(Protocol)
        self.service_port: Any = None
        self.open_service()
        self.dep_port = self.service_port.getHost().port
        text = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
                f"REMOTE_SERVER_01 = 127.0.0.1 {appserver.getHost().port}\nSORT_METHOD = CONNECTION\n"
                "MONITORING_TYPE = DISABLED\nRESUME_ENABLE = 0\nDEPENDS_ON = DBACCESS\n"
                "[BALANCE_WEB_SERVICES]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
                f"REMOTE_SERVER_B = 127.0.0.1 {backend.getHost().port} 4\nMONITORING_TYPE = DISABLED\n"
                "DEPENDS_ON = DBACCESS\n"
                f"[DBAccess]\nDatabase = POSTGRES\nAlias = P12\nServer = 127.0.0.1\nPort = {self.dep_port}\n"
                "CHECK_INTERVAL = 0.1\nCONNECT_TIMEOUT = 1\nDOWN_AFTER_FAILURES = 1\nUP_AFTER_SUCCESSES = 1\n")
        config = parse_config(text)
        self.broker = BrokerService(reactor, config)
        self.broker.dependencies.startService()
        test.addCleanup(self.broker.dependencies.stopService)
        for unit in self.broker.units:
            unit.privilegedStartService()
            unit.startService()
            test.addCleanup(unit.stopService)
        self.desktop = self.broker.desktop
        self.web = self.broker.unit("BALANCE_WEB_SERVICES")
        self.dbaccess = self.broker.dependencies.get("DBACCESS")

    def open_service(self) -> None:
        port = 0 if self.service_port is None else self.dep_port
        self.service_port = reactor.listenTCP(port, self.service_factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.test.addCleanup(lambda: self.service_port.stopListening())

    async def login(self, payload: bytes = b"hello") -> SmartClient:
        """A SmartClient session; returns when it got the greeting and its echo, or was closed."""
        client = SmartClient(payload)
        await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", self.desktop.port.getHost().port)
        self.test.addCleanup(lambda: client.transport.loseConnection())
        await until(lambda: client.closed or client.data.endswith(payload))
        return client

    async def request(self, target: bytes = b"/id", headers: list[tuple[bytes, bytes]] | None = None) -> Client:
        client = Client()
        await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", self.web.port.getHost().port)
        self.test.addCleanup(lambda: client.transport.loseConnection())
        client.send_request(b"GET", target, headers)
        return client


class DependencyGatingTests(TestCase):
    @as_deferred
    async def test_units_refuse_while_the_dependency_is_closed(self) -> None:
        """Port closed: a new SmartClient is closed with the reason logged, a web-services request
        gets 503 naming DBACCESS; a SmartClient session and a WebSocket opened before carry on;
        port reopened: new sessions and requests pass again."""
        logs = LogCatcher(self)
        rig = Rig(self)
        await until(lambda: rig.dbaccess.checked and rig.dbaccess.up)
        before = await rig.login(b"hello")
        self.assertIn(b"PROTHEUS-SIM S1", before.data)
        ws = await rig.request(b"/ws", [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                                        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==")])
        await until(lambda: b"\r\n\r\n" in ws.raw)
        self.assertTrue(ws.raw.startswith(b"HTTP/1.1 101 "))
        ok = await rig.request()
        await ok.done
        self.assertEqual(ok.responses[0]["body"], b"B")

        closed_at = time.monotonic()
        await rig.service_port.stopListening()
        detected = await until(lambda: not rig.dbaccess.up)
        refused = await rig.login(b"second")
        self.assertTrue(refused.closed)
        self.assertNotIn(b"PROTHEUS-SIM", refused.data)
        reason = f"dependency DBACCESS (127.0.0.1:{rig.dep_port}) down"
        self.assertTrue(any(reason + ", closing the client" in text for text in logs.texts()))
        answer = await rig.request()
        await answer.done
        response = answer.responses[0]
        self.assertEqual((response["status"], header(response, b"retry-after")), (503, b"1"))
        body = json.loads(response["body"])
        self.assertTrue(body["error"].startswith(reason + " since "), body)
        self.assertTrue(body["error"].endswith(": connection refused"), body)
        refusals_done = time.monotonic() - closed_at

        before.transport.write(b" still here")  # the open desktop session carries on
        await until(lambda: before.data.endswith(b"hello still here"))
        ws_head = ws.raw.index(b"\r\n\r\n") + 4
        ws.transport.write(b"ping")  # and so does the open WebSocket
        await until(lambda: ws.raw[ws_head:] == b"ping")

        reopened_at = time.monotonic()
        rig.open_service()
        recovered = await until(lambda: rig.dbaccess.up)
        after = await rig.login(b"third")
        self.assertIn(b"PROTHEUS-SIM S1", after.data)
        self.assertTrue(after.data.endswith(b"third"))
        again = await rig.request()
        await again.done
        self.assertEqual((again.responses[0]["status"], again.responses[0]["body"]), (200, b"B"))
        passes_done = time.monotonic() - reopened_at
        self.assertEqual(rig.desktop.dependencies.refused, {"DBACCESS": 1})
        self.assertEqual(rig.web.dependencies.refused, {"DBACCESS": 1})
        self.assertEqual(len(rig.broker.dependencies.checks), 1)  # one check for both units
        transitions = [e for e in logs.events if "dependency_up" in e]
        self.assertEqual([e["dependency_up"] for e in transitions], [True, False, True])
        print(f"\n  deps sockets: CHECK_INTERVAL=0.1 DOWN_AFTER_FAILURES=1 UP_AFTER_SUCCESSES=1; "
              f"down seen {detected * 1000:.0f} ms after the port closed, both refusals done after "
              f"{refusals_done * 1000:.0f} ms; up seen {recovered * 1000:.0f} ms after it reopened, "
              f"a login and a request passed after {passes_done * 1000:.0f} ms; "
              f"{rig.broker.dependencies.checks['DBACCESS'].checks} checks")
