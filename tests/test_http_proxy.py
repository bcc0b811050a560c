"""The HTTP proxy, its upstream pool, the affinity cookie and the [BALANCE_HTTP] section, in memory."""

from __future__ import annotations

from typing import Any

import h11
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.methods import SortMethod, make_balancer
from protheus_broker.balancing.pool import ServerPool, ServerState
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.config import FUTURE_SECTIONS, UNIT_READERS, parse_config
from protheus_broker.desktop.pending import PendingLimits
from protheus_broker.http.affinity import COOKIE_NAME, AffinityCookies
from protheus_broker.http.proxy import HttpProxy, HttpProxyFactory, ProxySettings, filter_headers
from protheus_broker.http.capacity import RequestSlots
from protheus_broker.http.settings import HTTP_SECTION, WEB_SERVICES_SECTION, HttpBalanceConfig, WebServicesConfig
from protheus_broker.http.unit import HttpUnit, PoolDispatcher, SlotsDispatcher, WebServicesUnit
from protheus_broker.http.upstream import UpstreamPool, UpstreamProtocol
from protheus_broker.ini import ConfigError
from protheus_broker.tap import UNIT_BUILDERS, BrokerService

from .helpers import LogCatcher

DESKTOP = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 4000\nREMOTE_SERVER_01 = 10.0.0.1 5000\n"
HTTP = "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 8080\nREMOTE_SERVER_A = 10.0.0.1 80\nREMOTE_SERVER_B = 10.0.0.2 80\n"
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class FakeUpstreams:
    """A connector handing out upstream connections on StringTransports; ids in *refuse* fail."""

    def __init__(self) -> None:
        self.made: list[UpstreamProtocol] = []
        self.refuse: set[str] = set()
        self.hold = False  # leave the connect pending
        self.waiting: list[Deferred[UpstreamProtocol]] = []

    def __call__(self, server_id: str, host: str, port: int) -> Deferred[UpstreamProtocol]:
        if server_id in self.refuse:
            return fail(ConnectionRefusedError("refused"))
        if self.hold:
            waiting: Deferred[UpstreamProtocol] = Deferred()
            self.waiting.append(waiting)
            return waiting
        upstream = UpstreamProtocol(server_id)
        upstream.makeConnection(StringTransport())
        self.made.append(upstream)
        return succeed(upstream)


class Harness:
    """A proxy factory over servers A and B with fake upstreams and a clock."""

    def __init__(self, settings: ProxySettings | None = None, pending: PendingLimits | None = None,
                 affinity: bool = True, max_idle: int = 16) -> None:
        self.clock = Clock()
        self.pool = ServerPool([RemoteServer("A", "10.0.0.1", 80), RemoteServer("B", "10.0.0.2", 80)],
                               make_balancer(SortMethod.CONNECTION), clock=self.clock)
        self.affinity = AffinityCookies(key=b"k" * 32) if affinity else None
        self.dispatcher = PoolDispatcher(self.clock, self.pool, self.affinity)
        self.upstreams_made = FakeUpstreams()
        self.upstreams = UpstreamPool(self.clock, self.upstreams_made, max_idle=max_idle, idle_timeout=30.0)
        self.factory = HttpProxyFactory(self.clock, self.dispatcher, self.upstreams, settings or ProxySettings(),
                                        pending=pending)

    def connect(self, host: str = "10.1.2.3") -> tuple[HttpProxy, StringTransport]:
        address = IPv4Address("TCP", host, 5555)
        protocol: HttpProxy = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def upstream(self, n: int = -1) -> UpstreamProtocol:
        return self.upstreams_made.made[n]


def sent(upstream: UpstreamProtocol) -> bytes:
    value: bytes = upstream.transport.value()
    return value


class ProxyTests(SynchronousTestCase):
    """One client connection through the proxy, in memory."""

    def test_request_forwarded_and_response_relayed(self) -> None:
        """A GET goes upstream with X-Forwarded-*; the answer comes back; the upstream is pooled."""
        rig = Harness()
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET /x HTTP/1.1\r\nHost: app\r\nConnection: keep-alive\r\n\r\n")
        request = sent(rig.upstream())
        self.assertTrue(request.startswith(b"GET /x HTTP/1.1\r\n"))
        self.assertIn(b"x-forwarded-for: 10.1.2.3\r\n", request)
        self.assertIn(b"forwarded: for=10.1.2.3;proto=http\r\n", request)
        self.assertNotIn(b"connection:", request.lower())
        rig.upstream().dataReceived(OK)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(transport.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(rig.upstreams.idle_count("A") + rig.upstreams.idle_count("B"), 1)
        self.assertEqual(sum(b.active for b in rig.pool), 0)
        self.assertEqual(rig.factory.stats.get("http_in_flight"), 0)
        self.assertEqual(rig.factory.stats.get("http_requests"), 1)

    def test_pipelined_requests_one_at_a_time(self) -> None:
        """Two pipelined requests: the second goes upstream only after the first is answered."""
        rig = Harness(affinity=False)
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(rig.upstreams_made.made), 1)
        self.assertNotIn(b"/2", sent(rig.upstream()))
        self.assertEqual(transport.producerState, "paused")
        rig.upstream().dataReceived(OK)
        self.assertIn(b"GET /2 ", b"".join(sent(u) for u in rig.upstreams_made.made))
        self.assertEqual(transport.producerState, "producing")

    def test_idle_keep_alive_closes_quietly(self) -> None:
        """An idle keep-alive connection closes after KEEPALIVE_TIMEOUT, with no answer."""
        rig = Harness(ProxySettings(keepalive_timeout=5.0, header_timeout=1.0))
        proxy, transport = rig.connect()
        rig.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        rig.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_partial_head_408(self) -> None:
        """A head that has started but not ended within HEADER_TIMEOUT: 408 and close."""
        rig = Harness(ProxySettings(keepalive_timeout=60.0, header_timeout=2.0))
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost")
        rig.clock.advance(2.1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)

    def test_pending_cap_per_address(self) -> None:
        """MAX_PENDING_PER_ADDRESS: a second connection without a request is refused; a request frees it."""
        rig = Harness(pending=PendingLimits(per_address=1, total=10))
        first, _ = rig.connect()
        _, second = rig.connect()
        self.assertTrue(second.disconnecting)
        first.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        _, third = rig.connect()
        self.assertFalse(third.disconnecting)
        self.assertEqual(rig.factory.stats.get("pending_refused"), 1)

    def test_connection_cap(self) -> None:
        """MAX_SESSIONS: one connection more than the cap is refused; a closed one makes room."""
        rig = Harness(ProxySettings(max_connections=2), pending=PendingLimits(0, 0))
        first, _ = rig.connect()
        rig.connect()
        _, third = rig.connect()
        self.assertTrue(third.disconnecting)
        self.assertEqual(rig.factory.stats.get("sessions_refused"), 1)
        first.connectionLost(Failure(ConnectionRefusedError()))
        _, fourth = rig.connect()
        self.assertFalse(fourth.disconnecting)

    def test_connect_refused_goes_to_the_next_server(self) -> None:
        """A refused connect suspends that server and the request goes to the next one."""
        rig = Harness(affinity=False)
        rig.upstreams_made.refuse.add("A")
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(rig.upstream().server_id, "B")
        self.assertIs(rig.pool.get("A").state, ServerState.SUSPENDED)

    def test_all_refused_503(self) -> None:
        """Every server refuses: 503 with Retry-After, counted as 5xx."""
        rig = Harness(affinity=False)
        rig.upstreams_made.refuse.update({"A", "B"})
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"retry-after: 1\r\n", transport.value())
        self.assertEqual(rig.factory.stats.get("http_5xx"), 1)
        self.assertEqual(rig.factory.stats.get("http_in_flight"), 0)

    def test_client_gone_mid_request_frees_the_server(self) -> None:
        """The client leaves while its request is upstream: the in-flight count goes back down."""
        rig = Harness(affinity=False)
        proxy, transport = rig.connect()
        proxy.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345")
        self.assertEqual(sum(b.active for b in rig.pool), 1)
        proxy.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(sum(b.active for b in rig.pool), 0)
        self.assertTrue(rig.upstream().transport.disconnecting)
        self.assertEqual(rig.factory.stats.get("http_in_flight"), 0)

    def test_client_gone_while_connecting_counts_once(self) -> None:
        """The client leaves while the connect is under way, then it fails: the count is released once."""
        rig = Harness(affinity=False)
        rig.upstreams_made.hold = True
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        proxy.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(sum(b.active for b in rig.pool), 0)
        rig.upstreams_made.waiting[0].errback(ConnectionRefusedError("late"))
        self.assertEqual([b.active for b in rig.pool], [0, 0])
        self.assertEqual(rig.factory.stats.get("http_in_flight"), 0)

    def test_server_timeout_504_then_close_mid_body(self) -> None:
        """No byte from the AppServer for SERVER_TIMEOUT: 504; after the head has gone, the client is cut."""
        rig = Harness(ProxySettings(server_timeout=30.0), affinity=False)
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        rig.clock.advance(29.0)
        self.assertEqual(transport.value(), b"")
        rig.clock.advance(1.1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 504 "))
        self.assertEqual(sum(b.active for b in rig.pool), 0)
        proxy2, transport2 = rig.connect()
        proxy2.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        upstream = rig.upstream()
        rig.clock.advance(20.0)
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
        rig.clock.advance(20.0)  # activity pushed the deadline back
        self.assertFalse(transport2.disconnecting)
        rig.clock.advance(10.1)
        self.assertTrue(upstream.transport.disconnecting)
        self.assertEqual(rig.factory.stats.get("http_in_flight"), 0)

    def test_garbage_upstream_502_and_access_log(self) -> None:
        """Garbage from the AppServer: 502; one access-log event names server, status and timing."""
        logs = LogCatcher(self)
        rig = Harness(affinity=False)
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n")
        rig.upstream().dataReceived(b"\x00\x01garbage\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 502 "))
        access = logs.find(access=True)
        self.assertEqual(len(access), 1)
        self.assertEqual((access[0]["method"], access[0]["path"], access[0]["status"]), ("GET", "/p", 502))
        self.assertIn("queue_wait", access[0])
        self.assertIn("duration", access[0])

    def test_upload_backpressure_pauses_the_client(self) -> None:
        """The upstream's write buffer full pauses the client's reading, and resumes it."""
        rig = Harness(affinity=False)
        proxy, transport = rig.connect()
        proxy.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n12345")
        upstream = rig.upstream()
        upstream.transport.producer.pauseProducing()  # what a full TCP buffer does
        self.assertEqual(transport.producerState, "paused")
        upstream.transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_download_backpressure_pauses_the_upstream(self) -> None:
        """The client's write buffer full pauses reading from the AppServer."""
        rig = Harness(affinity=False)
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        upstream = rig.upstream()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n12345")
        transport.producer.pauseProducing()
        self.assertEqual(upstream.transport.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(upstream.transport.producerState, "producing")

    @given(st.binary(max_size=600))
    @settings(max_examples=300, deadline=None)
    def test_fuzzed_request_bytes_never_crash(self, data: bytes) -> None:
        """Any bytes: a status or a close or a wait, never an exception or a logged traceback."""
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        logs = LogCatcher(self)
        rig = Harness(ProxySettings(max_headers=20, max_header_bytes=2048))
        proxy, transport = rig.connect()
        for at in range(0, len(data), 97):
            proxy.dataReceived(data[at:at + 97])
        for upstream in rig.upstreams_made.made:
            upstream.dataReceived(OK)
        out = transport.value()
        self.assertTrue(out == b"" or out.startswith(b"HTTP/1.1 "), out[:40])
        proxy.connectionLost(Failure(ConnectionRefusedError()))
        self.assertFalse([e for e in logs.events if e.get("log_failure") is not None])
        self.assertEqual(sum(b.active for b in rig.pool), 0)
        self.assertGreaterEqual(rig.factory.stats.get("http_in_flight"), 0)
        self.assertLessEqual(rig.factory.stats.get("http_in_flight"), 0)

    @given(st.lists(st.sampled_from([
        b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 204 No\r\n", b"HTTP/1.1 100 Continue\r\n\r\n", b"Content-Length: 3\r\n",
        b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n", b"\r\n", b"abc", b"3\r\nabc\r\n",
        b"0\r\n\r\n", b"HTTP/1.1 101 Switching\r\n", b"\x00\xff", b"Content-Length: -1\r\n"]), max_size=12),
        st.booleans())
    @settings(max_examples=300, deadline=None)
    def test_fuzzed_responses_never_crash(self, parts: list[bytes], cut: bool) -> None:
        """Any AppServer answer, cut or not: the client gets a response, a 502 or a close; no traceback."""
        logs = LogCatcher(self)
        rig = Harness(affinity=False)
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        upstream = rig.upstream()
        for part in parts:
            if upstream.listener is not None or upstream.relay_to is not None:
                upstream.dataReceived(part)
        if cut and not upstream.closed:
            upstream.connectionLost(Failure(ConnectionRefusedError()))
        out = transport.value()
        self.assertTrue(out == b"" or out.startswith(b"HTTP/1.1 "), out[:40])
        proxy.connectionLost(Failure(ConnectionRefusedError()))
        if not upstream.closed:
            upstream.connectionLost(Failure(ConnectionRefusedError()))
        self.assertFalse([e for e in logs.events if e.get("log_failure") is not None])
        self.assertEqual(sum(b.active for b in rig.pool), 0)
        self.assertEqual(rig.factory.stats.get("http_in_flight"), 0)

    @given(st.lists(st.sampled_from([
        b"GET / HTTP/1.1\r\n", b"Host: a\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n",
        b"\r\n", b"abc", b"3\r\nabc\r\n", b"0\r\n\r\n", b"Expect: 100-continue\r\n", b"Upgrade: websocket\r\n",
        b"Connection: close\r\n", b"HEAD / HTTP/1.0\r\n", b"X: \x00\r\n", b" folded\r\n"]), max_size=14))
    @settings(max_examples=300, deadline=None)
    def test_fuzzed_request_shapes_never_crash(self, parts: list[bytes]) -> None:
        """Request-shaped fragments in any order: never an exception or a logged traceback."""
        self._feed(b"".join(parts))


class UpstreamPoolTests(SynchronousTestCase):
    """The idle upstream connections."""

    def _exchange(self, upstream: UpstreamProtocol) -> None:
        upstream.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
        upstream.send(h11.EndOfMessage())
        upstream.listener = _Sink()  # type: ignore[assignment]
        upstream.dataReceived(OK)

    def test_bounded_and_idle_timeout(self) -> None:
        """At most UPSTREAM_MAX_IDLE kept per server; an idle one closes after UPSTREAM_IDLE_TIMEOUT."""
        clock, made = Clock(), FakeUpstreams()
        pool = UpstreamPool(clock, made, max_idle=1, idle_timeout=30.0)
        first = self.successResultOf(pool.get("A", "h", 1))
        second = self.successResultOf(pool.get("A", "h", 1))
        for upstream in (first, second):
            self._exchange(upstream)
            pool.put(upstream)
        self.assertEqual(pool.idle_count("A"), 1)
        self.assertTrue(second.transport.disconnecting)
        self.assertIs(self.successResultOf(pool.get("A", "h", 1)), first)
        self.assertTrue(first.reused)
        pool.put(first)
        clock.advance(30.1)
        self.assertTrue(first.transport.disconnecting)

    def test_reuse_off(self) -> None:
        """UPSTREAM_REUSE=0: a finished connection is closed, never kept."""
        pool = UpstreamPool(Clock(), FakeUpstreams(), reuse=False)
        upstream = self.successResultOf(pool.get("A", "h", 1))
        self._exchange(upstream)
        pool.put(upstream)
        self.assertEqual(pool.idle_count(), 0)
        self.assertTrue(upstream.transport.disconnecting)


class _Sink:
    def upstream_event(self, upstream: Any, event: Any) -> None:
        pass

    def flush(self) -> None:
        pass


class AffinityTests(SynchronousTestCase):
    """The cookie and the dispatcher's use of it."""

    def test_cookie_value_is_opaque_and_checked(self) -> None:
        """The value names the server by an HMAC tag: no id, no address; a forged value names none."""
        cookies = AffinityCookies(key=b"x" * 32)
        name, value = cookies.set_cookie("01")
        self.assertEqual(name, b"set-cookie")
        text = value.decode()
        self.assertTrue(text.startswith(f"{COOKIE_NAME}="))
        tag = text.split(";")[0].split("=", 1)[1]
        self.assertNotIn("01", tag)
        self.assertEqual(cookies.server_of(tag, ["02", "01"]), "01")
        self.assertIsNone(cookies.server_of(tag + "x", ["01"]))
        self.assertIsNone(AffinityCookies(key=b"y" * 32).server_of(tag, ["01"]))
        self.assertIn("HttpOnly", text)
        self.assertIn("SameSite=Lax", text)
        self.assertNotIn("Secure", text)
        secure = AffinityCookies(max_age=600, secure=True).set_cookie("01")[1].decode()
        self.assertIn("; Secure", secure)
        self.assertIn("Max-Age=600", secure)

    def test_strip_keeps_other_cookies(self) -> None:
        """Only the affinity cookie is taken out; an empty Cookie header goes."""
        cookies = AffinityCookies()
        headers = [(b"cookie", f"a=1; {COOKIE_NAME}=zz; b=2".encode()), (b"cookie", f"{COOKIE_NAME}=q".encode())]
        self.assertEqual(cookies.strip(headers), [(b"cookie", b"a=1; b=2")])
        self.assertEqual(cookies.value_in(headers), "zz")

    def test_pinned_and_redispatched(self) -> None:
        """A valid cookie puts its server first (no new cookie); Down, it is re-dispatched with a new one."""
        rig = Harness()
        assert rig.affinity is not None
        value = rig.affinity.tag("B").encode()
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + COOKIE_NAME.encode() + b"=" + value + b"\r\n\r\n")
        self.assertEqual(rig.upstream().server_id, "B")
        self.assertNotIn(COOKIE_NAME.encode(), sent(rig.upstream()))
        rig.upstream().dataReceived(OK)
        self.assertNotIn(b"set-cookie", transport.value())
        rig.pool.set_state("B", ServerState.DOWN, "test")
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + COOKIE_NAME.encode() + b"=" + value + b"\r\n\r\n")
        self.assertEqual(rig.upstream().server_id, "A")
        rig.upstream().dataReceived(OK)
        self.assertIn(b"set-cookie: " + COOKIE_NAME.encode() + b"=" + rig.affinity.tag("A").encode(),
                      transport.value())


class HeaderTests(SynchronousTestCase):
    """Hop-by-hop filtering."""

    def test_hop_by_hop_and_connection_named_removed(self) -> None:
        """Connection, Keep-Alive, Proxy-*, TE, Trailer, Upgrade and headers named in Connection go."""
        headers = [(b"connection", b"close, x-private"), (b"keep-alive", b"1"), (b"proxy-authorization", b"x"),
                   (b"te", b"trailers"), (b"trailer", b"x-sum"), (b"upgrade", b"h2c"), (b"x-private", b"1"),
                   (b"content-length", b"3"), (b"x-app", b"1")]
        self.assertEqual(filter_headers(headers, False), [(b"content-length", b"3"), (b"x-app", b"1")])

    def test_websocket_upgrade_kept(self) -> None:
        """For a WebSocket upgrade, Upgrade stays and Connection says Upgrade."""
        out = filter_headers([(b"connection", b"Upgrade"), (b"upgrade", b"websocket")], True)
        self.assertEqual(out, [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")])


class SettingsTests(SynchronousTestCase):
    """[BALANCE_HTTP] in the config."""

    def test_section_read_with_defaults(self) -> None:
        """[BALANCE_HTTP] is a unit now: its servers, CONNECTION by default, the documented defaults."""
        config = parse_config(DESKTOP + HTTP + "AFFINITY_TIMEOUT = 3600\nUPSTREAM_REUSE = 0\n")
        http: HttpBalanceConfig = config.unit(HTTP_SECTION)
        self.assertEqual(http.local_port, 8080)
        self.assertEqual([s.server_id for s in http.servers], ["A", "B"])
        self.assertEqual(http.effective_sort_method, SortMethod.CONNECTION)
        self.assertEqual((http.header_timeout, http.max_headers, http.affinity_timeout), (10.0, 100, 3600))
        self.assertFalse(http.upstream_reuse)
        self.assertNotIn(HTTP_SECTION, FUTURE_SECTIONS)
        self.assertIn(HTTP_SECTION, UNIT_READERS)
        self.assertFalse([w for w in config.warnings if "BALANCE_HTTP" in w])

    def test_missing_port_and_active_monitoring_refused(self) -> None:
        """No LOCAL_SERVER_PORT, or a SmartClient monitoring type: one clear error."""
        with self.assertRaises(ConfigError) as missing:
            parse_config(DESKTOP + "[BALANCE_HTTP]\nREMOTE_SERVER_A = 10.0.0.1 80\n")
        self.assertIn("LOCAL_SERVER_PORT", str(missing.exception))
        with self.assertRaises(ConfigError) as active:
            parse_config(DESKTOP + HTTP + "MONITORING_TYPE = SMARTCLIENT_ACTIVE\n")
        self.assertIn("CONNECTION", str(active.exception))

    def test_broker_builds_an_http_unit(self) -> None:
        """The broker service builds one HttpUnit for [BALANCE_HTTP], beside the desktop unit."""
        config = parse_config(DESKTOP + HTTP)
        self.assertIs(UNIT_BUILDERS[HTTP_SECTION], HttpUnit)
        broker = BrokerService(MemoryReactorClock(), config)
        unit = broker.unit(HTTP_SECTION)
        self.assertIsInstance(unit, HttpUnit)
        self.assertEqual(len(unit.pool), 2)
        self.assertTrue(unit.reload(parse_config(DESKTOP + HTTP + "REMOTE_SERVER_C = 10.0.0.3 80\n").unit(HTTP_SECTION)))
        self.assertEqual(len(unit.pool), 3)


WEB = ("[BALANCE_WEB_SERVICES]\nLOCAL_SERVER_PORT = 8081\nREMOTE_SERVER_A = 10.0.0.1 80 2\n"
       "REMOTE_SERVER_B = 10.0.0.2 80 1\n")


class WebServicesHarness(Harness):
    """Servers A (cap 2) and B (cap 1) behind the web-services dispatcher."""

    def __init__(self, queue_length: int = 10, queue_timeout: float = 15.0) -> None:
        super().__init__(affinity=False)
        self.slots = RequestSlots(self.clock, queue_length=queue_length, queue_timeout=queue_timeout)
        self.slots.set_cap("A", 2)
        self.slots.set_cap("B", 1)
        self.pool.subscribe(lambda event: self.slots.poke())
        self.dispatcher = SlotsDispatcher(self.clock, self.pool, self.slots)  # type: ignore[assignment]
        self.factory.dispatcher = self.dispatcher

    def busy(self) -> list[str]:
        """The servers of the upstream connections carrying a request now."""
        return sorted(u.server_id for u in self.upstreams_made.made if u.listener is not None)


class WebServicesTests(SynchronousTestCase):
    """[BALANCE_WEB_SERVICES]: per-server caps and the queue."""

    def test_caps_and_queue(self) -> None:
        """N+k requests with caps summing to N: N at the servers, k wait; freed slots serve the queue
        in order; one still waiting at QUEUE_TIMEOUT gets 503 with Retry-After."""
        logs = LogCatcher(self)
        rig = WebServicesHarness()
        clients = [rig.connect() for _ in range(5)]
        for n, (proxy, _) in enumerate(clients):
            proxy.dataReceived(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
        self.assertEqual(rig.busy(), ["A", "A", "B"])
        self.assertEqual(rig.slots.queued(), 2)
        rig.clock.advance(3.0)
        first_a = [u for u in rig.upstreams_made.made if u.server_id == "A"][0]
        first_a.dataReceived(OK)  # one A request done: the head of the queue takes its slot
        self.assertEqual(rig.busy(), ["A", "A", "B"])
        self.assertEqual(rig.slots.queued(), 1)
        self.assertIn(b"GET /3 ", sent(first_a))  # the reused idle connection carries it
        rig.clock.advance(12.1)
        last = clients[4][1].value()
        self.assertTrue(last.startswith(b"HTTP/1.1 503 "), last[:40])
        self.assertIn(b"retry-after: 5", last)
        self.assertIn(b"queue", last)
        self.assertEqual(rig.slots.queued(), 0)
        waited = [e["queue_wait"] for e in logs.find(access=True) if e["path"] == "/3"]
        self.assertEqual(waited, [])  # still in flight: logged when it ends
        for upstream in list(rig.upstreams_made.made):
            if upstream.listener is not None:
                upstream.dataReceived(OK)
        waited = [e["queue_wait"] for e in logs.find(access=True) if e["path"] == "/3"]
        self.assertAlmostEqual(waited[0], 3.0)
        self.assertEqual(rig.slots.in_flight("A") + rig.slots.in_flight("B"), 0)

    def test_queue_full_503_at_once(self) -> None:
        """QUEUE_LENGTH reached: 503 at once."""
        rig = WebServicesHarness(queue_length=0)
        clients = [rig.connect() for _ in range(4)]
        for proxy, _ in clients:
            proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(clients[3][1].value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"retry-after: 1", clients[3][1].value())

    def test_client_gone_while_queued_leaves_the_queue(self) -> None:
        """A queued client that leaves takes no slot and leaves the queue."""
        rig = WebServicesHarness()
        clients = [rig.connect() for _ in range(4)]
        for proxy, _ in clients:
            proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(rig.slots.queued(), 1)
        clients[3][0].connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(rig.slots.queued(), 0)
        for proxy, _ in clients[:3]:
            proxy.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(rig.slots.in_flight("A") + rig.slots.in_flight("B"), 0)
        self.assertEqual(sum(b.active for b in rig.pool), 0)

    def test_connect_failure_takes_a_slot_elsewhere(self) -> None:
        """A server that refuses the connect gives its slot back; the request takes one on the next."""
        rig = WebServicesHarness()
        rig.upstreams_made.refuse.add("A")
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(rig.busy(), ["B"])
        self.assertEqual((rig.slots.in_flight("A"), rig.slots.in_flight("B")), (0, 1))
        rig.upstream().dataReceived(OK)
        self.assertEqual(rig.slots.in_flight("B"), 0)

    def test_section_read(self) -> None:
        """REMOTE_SERVER_xx = host port [max]; QUEUE_TIMEOUT 15 and QUEUE_LENGTH 1000 by default."""
        config = parse_config(DESKTOP + WEB + "REMOTE_SERVER_C = 10.0.0.3 80\n")
        web: WebServicesConfig = config.unit(WEB_SERVICES_SECTION)
        self.assertEqual(dict(web.caps), {"A": 2, "B": 1, "C": 0})
        self.assertEqual((web.queue_timeout, web.queue_length), (15.0, 1000))
        with self.assertRaises(ConfigError):
            parse_config(DESKTOP + WEB + "REMOTE_SERVER_C = 10.0.0.3 80 many\n")
        broker = BrokerService(MemoryReactorClock(), config)
        unit = broker.unit(WEB_SERVICES_SECTION)
        self.assertIsInstance(unit, WebServicesUnit)
        self.assertEqual(unit.slots.cap("A"), 2)
        self.assertTrue(unit.reload(parse_config(DESKTOP + WEB.replace("80 2", "80 5")).unit(WEB_SERVICES_SECTION)))
        self.assertEqual(unit.slots.cap("A"), 5)
        self.assertEqual(unit.slots.cap("C"), 0)


class ScreenTests(SynchronousTestCase):
    def test_http_counters_and_queue_on_the_screen(self) -> None:
        """An HTTP unit's requests, 5xx, in-flight and the web-services queue reach the JSON
        status (per pool), the servers list (cap, in flight) and /metrics, labelled by section."""
        from protheus_broker.web import metrics, model

        config = parse_config(DESKTOP + WEB)
        broker = BrokerService(MemoryReactorClock(), config)
        unit = broker.unit(WEB_SERVICES_SECTION)
        unit.stats.record("http_requests", 7)
        unit.stats.record("http_5xx", 2)
        unit.stats.record("http_in_flight", 3)
        backends = {b.server_id: b for b in unit.pool}
        granted = [unit.slots.acquire(lambda: [backends["A"]]) for _ in range(3)]
        self.assertEqual([d.called for d in granted], [True, True, False])  # A's cap is 2
        totals = {u.name: model.unit_counters(u) for u in model.units_of(broker)}[WEB_SERVICES_SECTION]
        self.assertEqual((totals["http_requests"], totals["http_5xx"], totals["http_in_flight"],
                          totals["queued"]), (7, 2, 3, 1))
        rows = {(s["pool"], s["id"]): s for s in model.servers(broker)}
        self.assertEqual((rows[(WEB_SERVICES_SECTION, "A")]["cap"],
                          rows[(WEB_SERVICES_SECTION, "A")]["in_flight"]), (2, 2))
        self.assertNotIn("cap", rows[("BALANCE_SMART_CLIENT_DESKTOP", "01")])
        text = metrics.render(broker).decode()
        self.assertIn(f'protheus_broker_http_requests_total{{pool="{WEB_SERVICES_SECTION}"}} 7.0', text)
        self.assertIn(f'protheus_broker_queued_requests{{pool="{WEB_SERVICES_SECTION}"}} 1.0', text)
        self.assertIn('protheus_broker_http_5xx_total{pool="BALANCE_SMART_CLIENT_DESKTOP"} 0.0', text)
        granted[2].addErrback(lambda f: f.trap(CancelledError))
        granted[2].cancel()  # the waiter leaves the queue
        self.assertEqual(unit.slots.queued(), 0)
