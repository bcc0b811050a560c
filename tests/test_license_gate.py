"""The license gate of the HTTP units, in memory: the proxy over fake upstreams, the seats from a
license client connected to a fake license server (AMP over iosim pumps)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.methods import SortMethod, make_balancer
from protheus_broker.balancing.pool import ServerPool
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.config import parse_config
from protheus_broker.http.capacity import RequestSlots
from protheus_broker.http.gate import LicenseGate, request_path, UriTable
from protheus_broker.http.proxy import HttpProxy, HttpProxyFactory, ProxySettings
from protheus_broker.http.settings import LicenseGateConfig, UriRule
from protheus_broker.http.unit import PoolDispatcher, SlotsDispatcher
from protheus_broker.http.upstream import UpstreamPool, UpstreamProtocol
from protheus_broker.ini import ConfigError
from protheus_broker.tap import BrokerService
from protheus_broker.web import metrics, model

from .helpers import LogCatcher
from .license_rig import Rig
from .tls_fixtures import certs

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
REST = UriRule("APP", "/rest", True)
V1 = UriRule("HTTPURI", "/v1/", False)


def gate_config(**changes: Any) -> LicenseGateConfig:
    values: dict[str, Any] = {"uris": (REST, V1), "trusted_api_managers": read_trusted_text("10.0.0.0/8, 127.0.0.1"),
                              "queue_length": 1000, "queue_timeout": 10.0}
    values.update(changes)
    return LicenseGateConfig(**values)


def read_trusted_text(text: str) -> tuple[Any, ...]:
    config = parse_config("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 4000\nREMOTE_SERVER_01 = 10.0.0.1 5000\n"
                          "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 8080\nREMOTE_SERVER_A = 10.0.0.1 80\n"
                          f"TRUSTED_API_MANAGERS = {text}\n")
    trusted: tuple[Any, ...] = config.unit("BALANCE_HTTP").license.trusted_api_managers
    return trusted


class Upstreams:
    """Upstream connections on StringTransports; counts requests in flight at the backends."""

    def __init__(self) -> None:
        self.made: list[UpstreamProtocol] = []
        self.answered: dict[int, int] = {}
        self.most_in_flight = 0

    def __call__(self, server_id: str, host: str, port: int) -> Deferred[UpstreamProtocol]:
        upstream = UpstreamProtocol(server_id)
        upstream.makeConnection(StringTransport())
        self.made.append(upstream)
        self.note()
        return succeed(upstream)

    def heads(self, upstream: UpstreamProtocol) -> int:
        data: bytes = upstream.transport.value()
        return data.count(b" HTTP/1.1\r\n")

    def busy(self) -> list[UpstreamProtocol]:
        return [u for u in self.made if self.heads(u) > self.answered.get(id(u), 0) and not u.closed]

    def in_flight(self) -> int:
        return sum(self.heads(u) - self.answered.get(id(u), 0) for u in self.made if not u.closed)

    def note(self) -> None:
        self.most_in_flight = max(self.most_in_flight, self.in_flight())

    def answer(self, upstream: UpstreamProtocol) -> None:
        self.answered[id(upstream)] = self.answered.get(id(upstream), 0) + 1
        upstream.dataReceived(OK)
        self.note()


class Harness:
    """A proxy with the license gate over servers A and B; seats from a fake license server."""

    def __init__(self, seats: int = 5, config: LicenseGateConfig | None = None, licensed: bool = True,
                 slots: RequestSlots | None = None, apps: dict[str, int] | None = None) -> None:
        self.rig = Rig(seats={"TOTVS_I": seats, **(apps or {"APP7": 2})}, low_watermark=1, high_watermark=8)
        self.clock = self.rig.clock
        self.pool = ServerPool([RemoteServer("A", "10.0.0.1", 80), RemoteServer("B", "10.0.0.2", 80)],
                               make_balancer(SortMethod.CONNECTION), clock=self.clock)
        inner: Any = SlotsDispatcher(self.clock, self.pool, slots) if slots is not None else \
            PoolDispatcher(self.clock, self.pool, None)
        self.seats = self.rig.pool
        self.gate = LicenseGate(self.clock, inner, self.seats if licensed else None, config or gate_config(), "WS")
        self.upstreams = Upstreams()
        self.factory = HttpProxyFactory(self.clock, self.gate, UpstreamPool(self.clock, self.upstreams),
                                        ProxySettings(access_log=False))

    def connect(self, host: str = "192.0.2.1") -> tuple[HttpProxy, StringTransport]:
        address = IPv4Address("TCP", host, 5555)
        protocol: HttpProxy = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def get(self, path: bytes, host: str = "192.0.2.1", headers: bytes = b"") -> tuple[HttpProxy, StringTransport]:
        proxy, transport = self.connect(host)
        proxy.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: app\r\n" + headers + b"\r\n")
        self.upstreams.note()
        self.rig.flush()
        return proxy, transport

    def in_use(self, license_class: str = "TOTVS_I") -> int:
        stats = self.seats.stats().get(license_class)
        return int(stats["in_use"]) if stats else 0


def answer_of(transport: StringTransport) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body) if body.startswith(b"{") else {}


class GateTests(SynchronousTestCase):
    """Seats taken and given back around the request."""

    def test_ungated_path_takes_no_seat(self) -> None:
        """A path under no Stateless=1 URL goes straight to the balancer."""
        rig = Harness()
        rig.get(b"/v1/orders")
        rig.get(b"/static/x")
        self.assertEqual(rig.upstreams.in_flight(), 2)
        self.assertEqual(rig.in_use(), 0)

    def test_gated_request_holds_a_seat_until_answered(self) -> None:
        """A request under /rest takes one seat while it is at the AppServer."""
        rig = Harness()
        _, transport = rig.get(b"/rest/api/v1/clients?x=1")
        self.assertEqual(rig.in_use(), 1)
        rig.upstreams.answer(rig.upstreams.busy()[0])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(rig.in_use(), 0)
        self.assertEqual(rig.gate.seated, 1)

    def test_seat_given_back_when_the_client_leaves(self) -> None:
        """The client goes away mid-request: the seat comes back."""
        rig = Harness()
        proxy, _ = rig.get(b"/rest/x")
        self.assertEqual(rig.in_use(), 1)
        proxy.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(rig.in_use(), 0)

    def test_seat_given_back_when_the_appserver_fails(self) -> None:
        """The AppServer drops the connection: 502, and the seat comes back."""
        rig = Harness()
        _, transport = rig.get(b"/rest/x")
        upstream = rig.upstreams.busy()[0]
        upstream.transport.loseConnection()
        upstream.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(answer_of(transport)[0], 502)
        self.assertEqual(rig.in_use(), 0)

    def test_n_seats_10n_requests_never_more_than_n_at_the_backends(self) -> None:
        """5 seats, 50 concurrent requests: at most 5 at the AppServers at any time, all answered."""
        rig = Harness(seats=5)
        clients = [rig.get(b"/rest/work/%d" % n) for n in range(50)]
        self.assertEqual(rig.upstreams.in_flight(), 5)
        answered = 0
        while rig.upstreams.busy():
            self.assertLessEqual(rig.upstreams.in_flight(), 5)
            rig.upstreams.answer(rig.upstreams.busy()[0])
            answered += 1
            rig.rig.flush()
        self.assertEqual(answered, 50)
        self.assertEqual(rig.upstreams.most_in_flight, 5)
        self.assertEqual([t.value()[:15] for _, t in clients], [b"HTTP/1.1 200 OK"] * 50)
        self.assertEqual(rig.in_use(), 0)
        self.assertEqual(rig.gate.seated_after_wait, 45)
        print(f"\n  gate accounting: 5 seats, 50 requests, most in flight at the backends "
              f"{rig.upstreams.most_in_flight}, {rig.gate.seated_after_wait} waited for a seat")

    def test_seat_given_back_when_the_balancer_refuses(self) -> None:
        """Seat taken, but every AppServer is full and the queue too: 503 and the seat comes back."""
        slots = RequestSlots(None, queue_length=0, queue_timeout=5.0)  # type: ignore[arg-type]
        rig = Harness(slots=slots)
        slots.clock = rig.clock
        slots.set_cap("A", 1)
        slots.set_cap("B", 1)
        rig.get(b"/rest/1")
        rig.get(b"/rest/2")
        _, transport = rig.get(b"/rest/3")
        self.assertEqual(answer_of(transport)[0], 503)
        self.assertEqual(rig.in_use(), 2)


class WaitTests(SynchronousTestCase):
    """No seat free: wait, then 503 with the seed's reasons."""

    def test_wait_then_all_licenses_in_use(self) -> None:
        """One seat, two requests: the second waits LICENSE_QUEUE_TIMEOUT, then 503 all licenses in use."""
        rig = Harness(seats=1, config=gate_config(queue_timeout=3.0))
        rig.get(b"/rest/1")
        _, transport = rig.get(b"/rest/2")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(rig.gate.waiting, 1)
        rig.rig.advance(3.0)
        status, headers, body = answer_of(transport)
        self.assertEqual(status, 503)
        self.assertEqual(headers["retry-after"], "2")
        self.assertTrue(body["error"].startswith("all licenses in use"), body)
        self.assertEqual(rig.gate.refused["all_in_use"], 1)
        self.assertEqual(rig.gate.waiting, 0)

    def test_waiting_request_gets_the_freed_seat(self) -> None:
        """A seat given back goes to the waiting request, which then goes to an AppServer."""
        rig = Harness(seats=1)
        rig.get(b"/rest/1")
        _, transport = rig.get(b"/rest/2")
        rig.clock.advance(0.5)
        rig.upstreams.answer(rig.upstreams.busy()[0])
        self.assertEqual(rig.upstreams.in_flight(), 1)
        rig.upstreams.answer(rig.upstreams.busy()[0])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(rig.gate.wait_seconds, 0.5)

    def test_waiter_gone_takes_no_seat(self) -> None:
        """A waiting client that leaves is out of the queue: the next seat is nobody's."""
        rig = Harness(seats=1)
        rig.get(b"/rest/1")
        proxy, _ = rig.get(b"/rest/2")
        proxy.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(rig.seats.stats()["TOTVS_I"]["waiting"], 0)
        self.assertEqual(rig.gate.waiting, 0)
        rig.upstreams.answer(rig.upstreams.busy()[0])
        self.assertEqual(rig.in_use(), 0)
        self.assertEqual(rig.upstreams.in_flight(), 0)

    def test_queue_full_is_refused_at_once(self) -> None:
        """LICENSE_QUEUE_LENGTH waiters: one more gets 503 at once."""
        rig = Harness(seats=1, config=gate_config(queue_length=1))
        rig.get(b"/rest/1")
        rig.get(b"/rest/2")
        _, transport = rig.get(b"/rest/3")
        status, _, body = answer_of(transport)
        self.assertEqual(status, 503)
        self.assertIn("all licenses in use (1 requests already waiting)", body["error"])

    def test_not_configured(self) -> None:
        """A Stateless URI without [LICENSECLIENT]: 503 license server not configured."""
        rig = Harness(licensed=False)
        _, transport = rig.get(b"/rest/x")
        status, headers, body = answer_of(transport)
        self.assertEqual((status, body["error"], headers["retry-after"]), (503, "license server not configured", "60"))
        _, transport = rig.get(b"/v1/x")
        self.assertEqual(rig.upstreams.in_flight(), 1)  # the rest of the unit serves
        self.assertEqual(rig.gate.refused["not_configured"], 1)

    def test_unreachable(self) -> None:
        """License server cut off and the leases expired: 503 license server unreachable."""
        rig = Harness()
        rig.rig.endpoint.cut()
        rig.get(b"/rest/1")
        self.assertEqual(rig.upstreams.in_flight(), 1)  # served from the lease
        rig.upstreams.answer(rig.upstreams.busy()[0])
        rig.rig.advance(31.0)
        _, transport = rig.get(b"/rest/2")
        status, headers, body = answer_of(transport)
        self.assertEqual((status, body["error"], headers["retry-after"]), (503, "license server unreachable", "10"))

    def test_timels_logs_the_wait(self) -> None:
        """FWFRAME_TIMELS=1: one line per gated request with its wait in ms."""
        catcher = LogCatcher(self)
        rig = Harness(seats=1, config=gate_config(time_log=True))
        rig.get(b"/rest/1")
        rig.get(b"/rest/2")
        rig.clock.advance(0.25)
        rig.upstreams.answer(rig.upstreams.busy()[0])
        lines = [t for t in catcher.texts() if t.startswith("license time:")]
        self.assertEqual(len(lines), 2)
        self.assertIn("waited 0.000 ms", lines[0])
        self.assertIn("waited 250.000 ms", lines[1])
        self.assertEqual(catcher.find(license_wait=0.25)[0]["license_class"], "TOTVS_I")


class AppcodeTests(SynchronousTestCase):
    """x-totvs-appcode: honoured from trusted API managers only."""

    def test_trusted_keeps_the_header_and_uses_the_class(self) -> None:
        """From 10.1.2.3 (in 10.0.0.0/8) the header goes upstream and the request takes an APP7 seat."""
        rig = Harness()
        rig.get(b"/rest/x", host="10.1.2.3", headers=b"x-totvs-appcode: APP7\r\n")
        self.assertIn(b"x-totvs-appcode: APP7\r\n", rig.upstreams.made[0].transport.value())
        self.assertEqual((rig.in_use("APP7"), rig.in_use("TOTVS_I")), (1, 0))

    def test_application_code_is_case_insensitive(self) -> None:
        """app7 is the class APP7 (the license server upper-cases class names)."""
        rig = Harness()
        rig.get(b"/rest/x", host="10.1.2.3", headers=b"x-totvs-appcode: app7\r\n")
        self.assertEqual(rig.in_use("APP7"), 1)

    def test_untrusted_header_stripped_and_totvs_i_used(self) -> None:
        """From anyone else the header is removed and the TOTVS I class is used."""
        rig = Harness()
        rig.get(b"/rest/x", host="192.0.2.9", headers=b"X-Totvs-Appcode: APP7\r\n")
        self.assertNotIn(b"appcode", rig.upstreams.made[0].transport.value().lower())
        self.assertEqual((rig.in_use("APP7"), rig.in_use("TOTVS_I")), (0, 1))
        self.assertEqual(rig.gate.appcode_stripped, 1)

    def test_untrusted_header_stripped_on_ungated_paths_too(self) -> None:
        """The header never reaches an AppServer from an untrusted sender, gated or not."""
        rig = Harness()
        rig.get(b"/v1/x", host="192.0.2.9", headers=b"x-totvs-appcode: APP7\r\n")
        self.assertNotIn(b"appcode", rig.upstreams.made[0].transport.value().lower())

    def test_unknown_application(self) -> None:
        """A trusted sender naming an application without licenses: 503 no license for application X."""
        rig = Harness()
        _, transport = rig.get(b"/rest/x", host="127.0.0.1", headers=b"x-totvs-appcode: NOPE\r\n")
        status, headers, body = answer_of(transport)
        self.assertEqual((status, body["error"], headers["retry-after"]),
                         (503, "no license for application NOPE", "60"))
        self.assertEqual(rig.gate.refused["no_license"], 1)

    def test_malformed_application_code(self) -> None:
        """A code with characters no class has: 503 no license, nothing asked of the server."""
        rig = Harness()
        leases = rig.rig.count("lease")
        _, transport = rig.get(b"/rest/x", host="127.0.0.1", headers=b"x-totvs-appcode: a b/c\r\n")
        status, _, body = answer_of(transport)
        self.assertEqual(status, 503)
        self.assertTrue(body["error"].startswith("no license for application 'A B/C'"))
        self.assertEqual(rig.rig.count("lease"), leases)

    def test_ipv4_mapped_client_is_trusted(self) -> None:
        """::ffff:10.0.0.5 is 10.0.0.5."""
        rig = Harness()
        self.assertTrue(rig.gate.trusted("::ffff:10.0.0.5"))
        self.assertFalse(rig.gate.trusted("::1"))
        self.assertFalse(rig.gate.trusted("not-an-address"))


class PathTests(SynchronousTestCase):
    """Which requests are under a Stateless=1 URL."""

    def test_prefixes(self) -> None:
        """Under /rest means /rest, /rest/..., /rest?...; never /restful."""
        table = UriTable(gate_config())
        for target in (b"/rest", b"/rest/", b"/rest/a/b", b"/rest?x=1", b"/REST/a", b"http://h:80/rest/a"):
            self.assertTrue(table.stateless(target), target)
        for target in (b"/restful", b"/", b"/v1/rest", b"*", b"/v1/%2e%2e/open"):
            self.assertFalse(table.stateless(target), target)

    def test_no_bypass_by_encoding(self) -> None:
        """Dot segments, double slashes, escapes and backslashes resolve before matching."""
        table = UriTable(gate_config())
        for target in (b"/x/../rest/a", b"//rest/a", b"/%72est/a", b"/v1/%2e%2e/rest/a", b"/v1\\..\\rest",
                       b"/rest%2f..%2fopen", b"/rest/../open"):
            self.assertTrue(table.stateless(target), target)
        self.assertEqual(request_path(b"/a/./b//c/../d?q"), "/a/b/d")

    def test_most_specific_url_wins(self) -> None:
        """A Stateless=0 URL inside a Stateless=1 one is not gated, and the other way round."""
        table = UriTable(gate_config(uris=(UriRule("A", "/rest", True), UriRule("B", "/rest/public", False),
                                           UriRule("C", "/app", False), UriRule("D", "/app/paid/", True))))
        self.assertTrue(table.stateless(b"/rest/x"))
        self.assertFalse(table.stateless(b"/rest/public/x"))
        self.assertFalse(table.stateless(b"/app/x"))
        self.assertTrue(table.stateless(b"/app/paid/x"))


DESKTOP = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 4000\nREMOTE_SERVER_01 = 10.0.0.1 5000\nSORT_METHOD = ROUND_ROBIN\n"
WS = "[BALANCE_WEB_SERVICES]\nLOCAL_SERVER_PORT = 8080\nREMOTE_SERVER_A = 10.0.0.1 80\nURIS = HTTPURI, APP\n"
URI_SECTIONS = ("[HTTPURI]\nAllowOrigin=*\nCORSEnable=1\nInstances=1,1,1,1\nPrepareIn=T1\nStateless=0\nURL=/v1/\n"
                "[APP]\nAllowOrigin=*\nCORSEnable=1\nInstances=1,1,1,1\nPrepareIn=T1\nStateless=1\nURL=/app/\n")


class ConfigTests(SynchronousTestCase):
    """The keys as admins paste them from the AppServer's config."""

    def secret_file(self) -> str:
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(b"0123456789abcdef0123\n")
        return path

    def test_seed_example_sections(self) -> None:
        """The seed's [HTTPURI]/[APP] sections read as they are; no unknown-section warnings."""
        config = parse_config(DESKTOP + WS + URI_SECTIONS +
                              f"[LICENSECLIENT]\nSERVER = 127.0.0.1\nPORT = 5555\nSECRET_FILE = {self.secret_file()}\n")
        gate = config.unit("BALANCE_WEB_SERVICES").license
        self.assertEqual(gate.uris, (UriRule("HTTPURI", "/v1/", False), UriRule("APP", "/app/", True)))
        self.assertEqual(config.license_client.server, "127.0.0.1")
        self.assertEqual(config.license_client.port, 5555)
        self.assertEqual(config.license_client.secret, b"0123456789abcdef0123")
        self.assertEqual(config.warnings, ())

    def test_stateless_without_license_client_warns(self) -> None:
        """Stateless=1 but no [LICENSECLIENT]: loads, with one warning naming the 503 it causes."""
        config = parse_config(DESKTOP + WS + URI_SECTIONS)
        self.assertIsNone(config.license_client)
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("license server not configured", config.warnings[0])

    def test_uris_naming_a_missing_section(self) -> None:
        """URIS naming a section the file lacks: one error naming it."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(DESKTOP + WS)
        self.assertIn("names [HTTPURI], which the file does not have", str(caught.exception))

    def test_uri_without_url(self) -> None:
        """A URI section without URL: an error naming the key."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(DESKTOP + WS + "[HTTPURI]\nStateless=1\n[APP]\nURL=/a\n")
        self.assertIn("URL", str(caught.exception))

    def test_bad_trusted_network(self) -> None:
        """TRUSTED_API_MANAGERS with a host name: an error."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(DESKTOP + "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 8080\nREMOTE_SERVER_A = 10.0.0.1 80\n"
                         "TRUSTED_API_MANAGERS = mingle.example.com\n")
        self.assertIn("not an IP address or network", str(caught.exception))

    def test_license_client_needs_a_secret(self) -> None:
        """[LICENSECLIENT] as an AppServer writes it (no SECRET): no license client; Stateless URIs are warned."""
        config = parse_config(DESKTOP + WS + URI_SECTIONS + "[LicenseClient]\nServer = 127.0.0.1\nPort = 5555\n")
        self.assertIsNone(config.license_client)
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("its [LICENSECLIENT] has no SECRET/SECRET_FILE", config.warnings[0])
        self.assertIsNone(BrokerService(MemoryReactorClock(), config).licenses)

    def test_mutual_tls_keys_configure_a_client(self) -> None:
        """SSL_CERTIFICATE/SSL_KEY/SSL_CA and no secret: a client over mutual TLS."""
        fixture = certs()
        config = parse_config(DESKTOP + f"[LICENSECLIENT]\nSERVER = 127.0.0.1\nSSL_CERTIFICATE = {fixture.cert('client')}\n"
                              f"SSL_KEY = {fixture.key('client')}\nSSL_CA = {fixture.ca_path}\n")
        self.assertIsNotNone(config.license_client)
        self.assertIsNone(config.license_client.secret)
        self.assertEqual(config.license_client.tls.ca, fixture.ca_path)

    def test_noconfig_server_means_no_client(self) -> None:
        """SERVER = NOCONFIG (TOTVS: not used), even with a secret: no license client."""
        config = parse_config(DESKTOP + f"[LICENSECLIENT]\nSERVER = NOCONFIG\nSECRET_FILE = {self.secret_file()}\n")
        self.assertIsNone(config.license_client)

    def test_license_client_keys_checked_without_secret(self) -> None:
        """A bad key is an error even when no client is configured."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(DESKTOP + "[LICENSECLIENT]\nSERVER = 127.0.0.1\nLOW_WATERMARK = x\n")
        self.assertIn("LOW_WATERMARK", str(caught.exception))

    def test_watermarks_checked(self) -> None:
        """HIGH_WATERMARK below LOW_WATERMARK: an error."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(DESKTOP + f"[LICENSECLIENT]\nSERVER = 127.0.0.1\nSECRET_FILE = {self.secret_file()}\n"
                         "LOW_WATERMARK = 10\nHIGH_WATERMARK = 4\n")
        self.assertIn("HIGH_WATERMARK", str(caught.exception))


class TapTests(SynchronousTestCase):
    """BrokerService builds one license client and hands it to the HTTP units; the screen shows it."""

    def test_one_client_shared_by_the_http_units_and_shown(self) -> None:
        """Both HTTP units' gates take seats from the broker's one license client; JSON and /metrics show it."""
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(b"0123456789abcdef0123\n")
        config = parse_config(
            DESKTOP + WS + URI_SECTIONS +
            "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 8081\nREMOTE_SERVER_A = 10.0.0.1 80\n"
            f"[LICENSECLIENT]\nSERVER = 127.0.0.1\nSECRET_FILE = {path}\n")
        reactor = MemoryReactorClock()
        broker = BrokerService(reactor, config)
        self.assertIsNotNone(broker.licenses)
        self.assertIs(broker.unit("BALANCE_WEB_SERVICES").gate.seats, broker.licenses.pool)
        self.assertIs(broker.unit("BALANCE_HTTP").gate.seats, broker.licenses.pool)
        children = list(broker)
        self.assertLess(children.index(broker.licenses), min(children.index(unit) for unit in broker.units))
        screen = model.status(broker)
        self.assertEqual(screen["license_client"]["connected"], False)
        self.assertEqual(screen["license_client"]["server"], "127.0.0.1:5555")
        pool = [p for p in screen["pools"] if p["section"] == "BALANCE_WEB_SERVICES"][0]
        self.assertEqual(pool["license"]["uris"][1], {"section": "APP", "url": "/app/", "stateless": True})
        self.assertEqual(pool["totals"]["license_waiting"], 0)
        text = metrics.render(broker).decode()
        self.assertIn("protheus_broker_license_connected 0.0", text)
        self.assertIn('protheus_broker_license_refused_total{pool="BALANCE_WEB_SERVICES",reason="all_in_use"} 0.0',
                      text)

    def test_no_license_client_without_the_section(self) -> None:
        """No [LICENSECLIENT]: no client; the screen says None."""
        broker = BrokerService(MemoryReactorClock(), parse_config(DESKTOP))
        self.assertIsNone(broker.licenses)
        self.assertIsNone(model.status(broker)["license_client"])

    def test_reload_applies_new_uris_and_trust(self) -> None:
        """A reload with other URI sections and trusted networks applies to new requests."""
        reactor = MemoryReactorClock()
        broker = BrokerService(reactor, parse_config(DESKTOP + WS + URI_SECTIONS))
        unit = broker.unit("BALANCE_WEB_SERVICES")
        self.assertTrue(unit.gate.table.stateless(b"/app/x"))
        new = parse_config(DESKTOP + WS.replace("URIS = HTTPURI, APP", "URIS = HTTPURI\nTRUSTED_API_MANAGERS = 10.9.0.0/16")
                           + URI_SECTIONS.replace("Stateless=0", "Stateless=1"))
        self.assertTrue(unit.reload(new.unit("BALANCE_WEB_SERVICES")))
        self.assertFalse(unit.gate.table.stateless(b"/app/x"))
        self.assertTrue(unit.gate.table.stateless(b"/v1/x"))
        self.assertTrue(unit.gate.trusted("10.9.1.1"))


    def test_depends_on_licenseclient_follows_the_license_channel(self) -> None:
        """DEPENDS_ON = LICENSECLIENT with our client: the unit gates on the license channel, not a TCP check."""
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(b"0123456789abcdef0123\n")
        config = parse_config(DESKTOP + WS.replace("URIS = HTTPURI, APP", "URIS = HTTPURI, APP\nDEPENDS_ON = LICENSECLIENT")
                              + URI_SECTIONS + f"[LICENSECLIENT]\nSERVER = 127.0.0.1\nPORT = 5555\nSECRET_FILE = {path}\n")
        broker = BrokerService(MemoryReactorClock(), config)
        dependency = broker.dependencies.get("LICENSECLIENT")
        self.assertIs(dependency.channel, broker.licenses)
        self.assertFalse(dependency.up)
        broker.licenses._become(True, "connected to 127.0.0.1:5555")
        self.assertTrue(dependency.up)


class PathPropertyTests(SynchronousTestCase):
    """request_path on any target."""

    @given(st.binary(max_size=200))
    @settings(max_examples=300, deadline=None)
    def test_normalised_whatever_the_target(self, raw: bytes) -> None:
        """Never raises; the result is an absolute path with no empty, '.' or '..' segments left."""
        path = request_path(b"/" + raw)
        self.assertTrue(path.startswith("/"))
        segments = path.split("/")[1:]
        if path != "/":
            self.assertNotIn("", segments[:-1] if path.endswith("/") else segments)
            self.assertNotIn(".", segments)
            self.assertNotIn("..", segments)

    @given(st.lists(st.sampled_from(["rest", "REST", "a", ".", "..", "", "%2e", "%2E%2e", "x%2fy", "\\",
                                     "%72est", "rest%2f..%2fa"]), max_size=8))
    @settings(max_examples=500, deadline=None)
    def test_gated_as_sent_or_as_resolved(self, parts: list[str]) -> None:
        """A target is gated when it is under /rest as sent, or once its escapes are decoded and its
        segments resolved; otherwise not."""
        target = "/" + "/".join(parts)
        stack: list[str] = []
        for segment in unquote(target).replace("\\", "/").split("/"):
            if segment == "..":
                stack = stack[:-1]
            elif segment not in ("", "."):
                stack.append(segment.lower())
        raw = target.lower()
        plain = not any(mark in target for mark in ("%", "/.", "//", "\\"))
        expected = (bool(stack) and stack[0] == "rest") or raw.startswith("/rest" if not plain else "/rest/") \
            or raw == "/rest"
        self.assertEqual(UriTable(gate_config()).stateless(target.encode()), expected, target)

