"""HEALTH_PATH in memory: the HTTP units' CONNECTION probe as a GET (task.Clock, StringTransport)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.methods import SortMethod, make_balancer
from protheus_broker.balancing.pool import ServerPool, ServerState
from protheus_broker.config import parse_config
from protheus_broker.http.health import HttpProbeMonitor, make_http_monitor
from protheus_broker.http.settings import HTTP_SECTION, WEB_SERVICES_SECTION
from protheus_broker.http.unit import HttpUnit, WebServicesUnit
from protheus_broker.ini import ConfigError
from protheus_broker.monitoring.settings import MonitoringConfig, MonitoringType

from .helpers import LogCatcher, servers

DESKTOP = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 4000\nREMOTE_SERVER_01 = 10.0.0.1 5000\n"
HTTP = ("[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 0\nREMOTE_SERVER_A = 127.0.0.1 5001\n"
        "MONITORING_INTERVAL = 10\nCONNECT_TIMEOUT = 2\n")


class Endpoints:
    """In-memory connects: each gets a StringTransport; ports in *refused* fail."""

    def __init__(self) -> None:
        self.opened: list[tuple[Protocol, StringTransport]] = []
        self.refused: set[int] = set()

    def __call__(self, host: str, port: int) -> Any:
        endpoints = self

        class Endpoint:
            def connect(self, factory: Factory) -> defer.Deferred[Protocol]:
                if port in endpoints.refused:
                    return defer.fail(ConnectionRefusedError())
                protocol = factory.buildProtocol(None)
                transport = StringTransport()
                protocol.makeConnection(transport)
                endpoints.opened.append((protocol, transport))
                return defer.succeed(protocol)

        return Endpoint()

    def answer(self, raw: bytes) -> None:
        protocol, _ = self.opened[-1]
        protocol.dataReceived(raw)

    @property
    def sent(self) -> bytes:
        return self.opened[-1][1].value()


class Harness:
    def __init__(self, test: SynchronousTestCase, path: str = "/health") -> None:
        self.clock = task.Clock()
        self.pool = ServerPool(servers(5001), make_balancer(SortMethod.CONNECTION), clock=self.clock)
        self.monitor = make_http_monitor(self.clock, self.pool, MonitoringType.CONNECTION,
                                         MonitoringConfig(probe_interval=10.0), connect_timeout=2.0,
                                         health_path=path)
        assert isinstance(self.monitor, HttpProbeMonitor)
        self.endpoints = Endpoints()
        self.monitor.tcp_endpoint = self.endpoints  # type: ignore[method-assign]
        self.logs = LogCatcher(test)
        self.monitor.startService()
        test.addCleanup(self.monitor.stopService)

    @property
    def backend(self) -> Any:
        return self.pool.get("01")

    def changes(self) -> list[str]:
        """The pool's state-change lines for the server."""
        return [formatEvent(e) for e in self.logs.find(server_id="01") if "new" in e and "old" in e]


class HealthProbeTests(SynchronousTestCase):
    """Each probe is GET <path> with Host and Connection: close; 2xx/3xx is up."""

    def test_request_shape_and_200_keeps_up(self) -> None:
        """The probe sends GET /health HTTP/1.1 with Host and Connection: close; a 200 keeps Up."""
        h = Harness(self)
        sent = h.endpoints.sent
        self.assertTrue(sent.startswith(b"GET /health HTTP/1.1\r\n"))
        self.assertIn(b"host: 127.0.0.1:5001\r\n", sent.lower())
        self.assertIn(b"connection: close\r\n", sent.lower())
        h.endpoints.answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        self.assertIs(h.backend.state, ServerState.UP)
        self.assertTrue(h.endpoints.opened[-1][1].disconnecting)
        self.assertFalse(h.clock.getDelayedCalls()[1:])  # only the probe loop: the timeout is gone

    def test_redirect_is_up(self) -> None:
        """A 3xx (a login redirect) counts as up."""
        h = Harness(self)
        h.endpoints.answer(b"HTTP/1.1 302 Found\r\nlocation: /login\r\ncontent-length: 0\r\n\r\n")
        self.assertIs(h.backend.state, ServerState.UP)

    def test_500_suspends_with_the_status_then_down_then_up(self) -> None:
        """A 500 is a failed probe: Suspended naming the status, Down after 3, Up on a 200;
        one log line per change."""
        h = Harness(self)
        h.endpoints.answer(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
        self.assertIs(h.backend.state, ServerState.SUSPENDED)
        self.assertIn("GET /health answered 500", h.backend.reason)
        for _ in range(2):
            h.clock.advance(10)
            h.endpoints.answer(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
        self.assertIs(h.backend.state, ServerState.DOWN)
        self.assertIn("answered 503", h.backend.reason)
        h.clock.advance(10)
        h.endpoints.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertIs(h.backend.state, ServerState.UP)
        changes = h.changes()
        self.assertEqual(len(changes), 3, changes)
        self.assertIn("answered 500", changes[0])

    def test_timeout_suspends(self) -> None:
        """No answer within CONNECT_TIMEOUT: Suspended, the reason says so, the connection is aborted."""
        h = Harness(self)
        transport = h.endpoints.opened[-1][1]
        h.clock.advance(1.9)
        self.assertIs(h.backend.state, ServerState.UP)
        h.clock.advance(0.1)
        self.assertIs(h.backend.state, ServerState.SUSPENDED)
        self.assertIn("GET /health: no answer within 2s", h.backend.reason)
        self.assertTrue(transport.disconnecting)

    def test_closed_before_answering_and_garbage_fail(self) -> None:
        """A close before the status line, or bytes that are not HTTP, are failed probes."""
        h = Harness(self)
        h.endpoints.opened[-1][0].connectionLost(Exception("gone"))  # type: ignore[arg-type]
        self.assertIn("closed before answering", h.backend.reason)
        other = Harness(self)
        other.endpoints.answer(b"\x00\x01 not http at all\r\n\r\n")
        self.assertIs(other.backend.state, ServerState.SUSPENDED)
        self.assertIn("malformed answer", other.backend.reason)
        self.assertTrue(other.endpoints.opened[-1][1].disconnecting)

    def test_refused_connect(self) -> None:
        """A refused connect is a failed probe as with the plain CONNECTION probe."""
        h = Harness(self)
        h.endpoints.refused.add(5001)
        h.endpoints.answer(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        h.clock.advance(10)
        self.assertIs(h.backend.state, ServerState.SUSPENDED)
        self.assertIn("connect failed", h.backend.reason)

    def test_empty_path_is_the_connect_probe(self) -> None:
        """HEALTH_PATH empty: connect and close, nothing sent."""
        h = Harness(self, path="")
        self.assertEqual(h.endpoints.sent, b"")
        self.assertTrue(h.endpoints.opened[-1][1].disconnecting)
        self.assertIs(h.backend.state, ServerState.UP)


class HealthSettingsTests(SynchronousTestCase):
    """HEALTH_PATH in both HTTP sections, and a reload changing it."""

    def test_key_read_in_both_sections(self) -> None:
        """HEALTH_PATH is read in [BALANCE_HTTP] and [BALANCE_WEB_SERVICES]; empty by default."""
        web = "[BALANCE_WEB_SERVICES]\nLOCAL_SERVER_PORT = 8081\nREMOTE_SERVER_A = 10.0.0.1 80 2\n"
        config = parse_config(DESKTOP + HTTP + "HEALTH_PATH = /health\n" + web + "HEALTH_PATH = /rest/ping?x=1\n")
        self.assertEqual(config.unit(HTTP_SECTION).health_path, "/health")
        self.assertEqual(config.unit(WEB_SERVICES_SECTION).health_path, "/rest/ping?x=1")
        self.assertEqual(parse_config(DESKTOP + HTTP).unit(HTTP_SECTION).health_path, "")

    def test_web_services_unit_probes_its_path(self) -> None:
        """[BALANCE_WEB_SERVICES] gets the same probe with its own HEALTH_PATH."""
        web = ("[BALANCE_WEB_SERVICES]\nLOCAL_SERVER_PORT = 0\nREMOTE_SERVER_A = 127.0.0.1 5001 2\n"
               "HEALTH_PATH = /rest/health\n")
        reactor = MemoryReactorClock()
        unit = WebServicesUnit(reactor, parse_config(DESKTOP + web).unit(WEB_SERVICES_SECTION))
        monitor = unit.monitor
        assert isinstance(monitor, HttpProbeMonitor)
        endpoints = Endpoints()
        monitor.tcp_endpoint = endpoints  # type: ignore[method-assign]
        monitor.startService()
        self.addCleanup(monitor.stopService)
        self.assertTrue(endpoints.sent.startswith(b"GET /rest/health HTTP/1.1\r\n"))
        endpoints.answer(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
        self.assertIs(unit.pool.get("A").state, ServerState.SUSPENDED)

    def test_bad_path_refused(self) -> None:
        """A path without the leading / or with a space: one clear error naming the key."""
        for bad in ("health", "/a b"):
            with self.assertRaises(ConfigError) as caught:
                parse_config(DESKTOP + HTTP + f"HEALTH_PATH = {bad}\n")
            self.assertIn("HEALTH_PATH", str(caught.exception))

    def test_ignored_without_connection_monitoring(self) -> None:
        """With MONITORING_TYPE=DISABLED a HEALTH_PATH gets a warning."""
        config = parse_config(DESKTOP + HTTP + "HEALTH_PATH = /health\nMONITORING_TYPE = DISABLED\n")
        self.assertTrue([w for w in config.warnings if "HEALTH_PATH" in w])

    def test_reload_changes_the_path(self) -> None:
        """A reload setting, changing and clearing HEALTH_PATH: the next probe follows it; a
        server added by the reload is probed too."""
        reactor = MemoryReactorClock()
        unit = HttpUnit(reactor, parse_config(DESKTOP + HTTP).unit(HTTP_SECTION))
        monitor = unit.monitor
        assert isinstance(monitor, HttpProbeMonitor)
        endpoints = Endpoints()
        monitor.tcp_endpoint = endpoints  # type: ignore[method-assign]
        monitor.startService()
        self.addCleanup(monitor.stopService)
        self.assertEqual(endpoints.sent, b"")  # connect only
        self.assertTrue(unit.reload(parse_config(DESKTOP + HTTP + "HEALTH_PATH = /health\n").unit(HTTP_SECTION)))
        reactor.advance(10)
        self.assertTrue(endpoints.sent.startswith(b"GET /health "))
        endpoints.answer(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        self.assertIs(unit.pool.get("A").state, ServerState.SUSPENDED)
        self.assertIn("answered 404", unit.pool.get("A").reason)
        self.assertTrue(unit.reload(parse_config(
            DESKTOP + HTTP + "HEALTH_PATH = /ready\nREMOTE_SERVER_B = 127.0.0.1 5002\n").unit(HTTP_SECTION)))
        reactor.advance(10)
        self.assertEqual(len(endpoints.opened), 4)  # A and the new B
        self.assertTrue(all(t.value().startswith(b"GET /ready ") for _, t in endpoints.opened[-2:]))
        for protocol, _ in endpoints.opened[-2:]:
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        self.assertIs(unit.pool.get("A").state, ServerState.UP)
        self.assertTrue(unit.reload(parse_config(DESKTOP + HTTP).unit(HTTP_SECTION)))
        reactor.advance(10)
        self.assertEqual(endpoints.sent, b"")
