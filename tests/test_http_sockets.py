"""The HTTP proxy over real sockets on 127.0.0.1 (port 0), all in this process, bounded in time."""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Coroutine

import h11
from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientCreator
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from protheus_broker.balancing.methods import SortMethod, make_balancer
from protheus_broker.balancing.pool import ServerPool, ServerState
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.config import parse_config
from protheus_broker.http.affinity import COOKIE_NAME, AffinityCookies
from protheus_broker.http.settings import HTTP_SECTION, WEB_SERVICES_SECTION
from protheus_broker.http.proxy import HttpProxyFactory, ProxySettings
from protheus_broker.http.unit import PoolDispatcher
from protheus_broker.http.upstream import UpstreamPool, tcp_connector
from protheus_broker.tap import UNIT_BUILDERS

from .helpers import LogCatcher
from .tls_fixtures import certs
from .http_backend import BackendFactory, Client, close, connect, header

MB = 1024 * 1024


def as_deferred(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., defer.Deferred[None]]:
    """An async test as a Deferred-returning one (Twisted 22.4's trial does not await coroutines)."""
    @functools.wraps(test)
    def run(self: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(test(self))
    return run


class Rig:
    """Backends A and B, the proxy in front of them."""

    def __init__(self, test: TestCase, names: tuple[str, ...] = ("A", "B"), reuse: bool = True,
                 settings: ProxySettings | None = None, dead: tuple[str, ...] = ()) -> None:
        self.backends = {name: BackendFactory(name) for name in names}
        servers = []
        for name, factory in self.backends.items():
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
            test.addCleanup(port.stopListening)
            number = port.getHost().port
            if name in dead:  # a port nobody listens on
                port.stopListening()
            servers.append(RemoteServer(name, "127.0.0.1", number))
        self.pool = ServerPool(servers, make_balancer(SortMethod.CONNECTION), clock=reactor)
        self.affinity = AffinityCookies()
        self.dispatcher = PoolDispatcher(reactor, self.pool, self.affinity)
        self.upstreams = UpstreamPool(reactor, tcp_connector(reactor, 2.0), reuse=reuse)
        self.factory = HttpProxyFactory(reactor, self.dispatcher, self.upstreams, settings or ProxySettings())
        self.proxies: list[Any] = []
        build = self.factory.buildProtocol

        def built(addr: Any) -> Any:
            protocol = build(addr)
            self.proxies.append(protocol)
            return protocol
        self.factory.buildProtocol = built  # type: ignore[method-assign]
        listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        test.addCleanup(listening.stopListening)
        test.addCleanup(lambda: defer.ensureDeferred(self.closed()))
        test.addCleanup(self.upstreams.close_all)
        self.port = listening.getHost().port

    async def closed(self) -> None:
        """Waits (up to 5 s) until every proxied connection has closed."""
        for _ in range(500):
            if all(p.closed for p in self.proxies):
                return
            await task.deferLater(reactor, 0.01, lambda: None)

    async def client(self, test: TestCase, expect: int = 1) -> Client:
        client = Client(expect)
        await connect(self.port, client)
        test.addCleanup(lambda: client.transport.loseConnection())
        return client

    async def get(self, test: TestCase, target: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                  method: bytes = b"GET", body: bytes | None = None) -> dict[str, Any]:
        client = await self.client(test)
        client.send_request(method, target, headers, body)
        await timeout(client.done)
        self.last_client = client
        return client.responses[0] if client.responses else {"status": None, "lost": client.lost}


def timeout(d: defer.Deferred[Any], seconds: float = 20.0) -> defer.Deferred[Any]:
    return d.addTimeout(seconds, reactor)


def cookie_of(response: dict[str, Any]) -> bytes:
    value = header(response, b"set-cookie")
    assert value is not None
    return value.split(b";")[0]


class KeepAliveTests(TestCase):
    """Keep-alive on both legs."""

    @as_deferred
    async def test_keep_alive_and_pooled_upstream(self) -> None:
        """Three requests on one client connection go out on one upstream connection."""
        rig = Rig(self, names=("A",))
        client = await rig.client(self, expect=3)
        for _ in range(3):
            client.send_request(b"GET", b"/id")
        await timeout(client.done)
        self.assertEqual([r["body"] for r in client.responses], [b"A"] * 3)
        self.assertEqual(len(rig.backends["A"].connections), 1)
        self.assertFalse(client.lost)

    @as_deferred
    async def test_reuse_off_opens_one_connection_per_request(self) -> None:
        """UPSTREAM_REUSE=0: every request gets its own upstream connection."""
        rig = Rig(self, names=("A",), reuse=False)
        client = await rig.client(self, expect=2)
        client.send_request(b"GET", b"/id")
        client.send_request(b"GET", b"/id")
        await timeout(client.done)
        self.assertEqual(len(rig.backends["A"].connections), 2)

    @as_deferred
    async def test_connection_close_from_client(self) -> None:
        """Connection: close from the client: answered, then the connection closes."""
        rig = Rig(self, names=("A",))
        client = await rig.client(self, expect=99)
        client.send_request(b"GET", b"/id", [(b"connection", b"close")])
        await timeout(client.done)
        self.assertEqual(client.responses[0]["body"], b"A")
        self.assertTrue(client.lost)

    @as_deferred
    async def test_connection_close_from_server_keeps_the_client(self) -> None:
        """An AppServer's Connection: close ends its connection, not the client's."""
        rig = Rig(self, names=("A",))
        client = await rig.client(self, expect=2)
        client.send_request(b"GET", b"/close")
        client.send_request(b"GET", b"/id")
        await timeout(client.done)
        self.assertEqual([r["body"] for r in client.responses], [b"bye", b"A"])
        self.assertEqual(len(rig.backends["A"].connections), 2)


class MessageTests(TestCase):
    """Bodies, framing and headers."""

    @as_deferred
    async def test_chunked_request_and_trailers_both_ways(self) -> None:
        """A chunked upload with trailers arrives whole; a chunked response's trailers reach the client."""
        rig = Rig(self, names=("A",))
        client = await rig.client(self, expect=2)
        client.transport.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                               b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n")
        client.conn.send(h11.Request(method=b"POST", target=b"/echo",
                                     headers=[(b"host", b"x"), (b"transfer-encoding", b"chunked")]))
        client.conn.send(h11.EndOfMessage())
        client.send_request(b"GET", b"/trailers")
        await timeout(client.done)
        self.assertEqual(client.responses[0]["body"], b"hello world")
        self.assertIn((b"x-sum", b"42"), rig.backends["A"].trailers[0])
        self.assertEqual(client.responses[1]["body"], b"part1-part2")
        self.assertEqual(client.responses[1]["trailers"], [(b"x-checksum", b"abc")])

    @as_deferred
    async def test_head(self) -> None:
        """HEAD gets the head (Content-Length kept) and no body; the connection goes on."""
        rig = Rig(self, names=("A",))
        client = await rig.client(self, expect=2)
        client.send_request(b"HEAD", b"/big/1000")
        client.send_request(b"GET", b"/id")
        await timeout(client.done)
        self.assertEqual(header(client.responses[0], b"content-length"), b"1000")
        self.assertEqual(client.responses[0]["body"], b"")
        self.assertEqual(client.responses[1]["body"], b"A")

    @as_deferred
    async def test_expect_100_continue(self) -> None:
        """Expect: 100-continue: the AppServer's 100 reaches the client, then the body flows."""
        rig = Rig(self, names=("A",))
        client = await rig.client(self)
        client.send_request(b"POST", b"/echo", [(b"expect", b"100-continue"), (b"content-length", b"4")], end=False)
        for _ in range(100):
            if client.informational:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual([e.status_code for e in client.informational], [100])
        client.transport.write(client.conn.send(h11.Data(data=b"ping")))
        client.transport.write(client.conn.send(h11.EndOfMessage()))
        await timeout(client.done)
        self.assertEqual(client.responses[0]["body"], b"ping")

    @as_deferred
    async def test_forwarded_and_hop_by_hop(self) -> None:
        """X-Forwarded-For/-Proto and Forwarded are added; hop-by-hop headers never go upstream."""
        rig = Rig(self, names=("A",))
        response = await rig.get(self, b"/headers", [
            (b"x-forwarded-for", b"10.0.0.9"), (b"connection", b"keep-alive, x-secret"), (b"x-secret", b"1"),
            (b"keep-alive", b"timeout=5"), (b"proxy-authorization", b"Basic eA=="), (b"te", b"trailers"),
            (b"x-app", b"kept")])
        seen = dict((n.encode(), v.encode()) for n, v in json.loads(response["body"]))
        self.assertEqual(seen[b"x-forwarded-for"], b"10.0.0.9, 127.0.0.1")
        self.assertEqual(seen[b"x-forwarded-proto"], b"http")
        self.assertEqual(seen[b"forwarded"], b"for=127.0.0.1;proto=http")
        self.assertEqual(seen[b"x-app"], b"kept")
        for name in (b"connection", b"x-secret", b"keep-alive", b"proxy-authorization", b"te"):
            self.assertNotIn(name, seen)

    @as_deferred
    async def test_websocket_relay_is_byte_exact(self) -> None:
        """A WebSocket upgrade becomes a raw relay: every byte echoed back as sent."""
        rig = Rig(self, names=("A",))
        client = await rig.client(self)
        client.send_request(b"GET", b"/ws", [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                                              (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==")])
        payload = bytes(range(256)) * 1000
        for _ in range(200):
            if b"\r\n\r\n" in client.raw:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 101 "))
        head_length = client.raw.index(b"\r\n\r\n") + 4
        self.assertIn(b"upgrade: websocket", client.raw[:head_length].lower())
        client.transport.write(payload)
        for _ in range(500):
            if len(client.raw) >= head_length + len(payload):
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(client.raw[head_length:], payload)


class FailureTests(TestCase):
    """Failover, retries and the bad answers."""

    @as_deferred
    async def test_failover_before_request_bytes(self) -> None:
        """A server that refuses the connect: the request goes to the next one."""
        rig = Rig(self, dead=("A",))
        responses = [await rig.get(self, b"/id") for _ in range(3)]
        self.assertEqual([r["body"] for r in responses], [b"B"] * 3)
        self.assertIs(rig.pool.get("A").state, ServerState.SUSPENDED)

    @as_deferred
    async def test_no_server_503_with_reason(self) -> None:
        """Every server down: 503, Retry-After and a JSON body naming why."""
        rig = Rig(self, names=("A",))
        rig.pool.set_state("A", ServerState.DOWN, "maintenance")
        response = await rig.get(self, b"/id")
        self.assertEqual(response["status"], 503)
        self.assertIsNotNone(header(response, b"retry-after"))
        self.assertIn("maintenance", json.loads(response["body"])["error"])

    @as_deferred
    async def test_retry_on_reused_connection_closed_under_us(self) -> None:
        """A GET on a pooled connection the AppServer closed gets one retry on a fresh connection."""
        rig = Rig(self, names=("A",))
        client = await rig.client(self, expect=1)
        client.send_request(b"GET", b"/id")
        await timeout(client.done)
        rig.backends["A"].drop_next = True
        client2 = await rig.client(self)
        client2.send_request(b"GET", b"/id")
        await timeout(client2.done)
        self.assertEqual(len(rig.backends["A"].connections), 2)
        self.assertEqual(rig.upstreams.idle_count("A"), 1)  # the retried exchange ended cleanly: reusable
        self.assertEqual(client2.responses[0]["body"], b"A")

    @as_deferred
    async def test_death_mid_response_closes_the_client(self) -> None:
        """An AppServer that dies mid-body: the client connection is closed, the body incomplete."""
        rig = Rig(self, names=("A",))
        response = await rig.get(self, b"/cut")
        self.assertTrue(rig.last_client.lost)
        self.assertFalse(response.get("complete"))

    @as_deferred
    async def test_garbage_from_server_502(self) -> None:
        """An AppServer answering garbage: 502."""
        rig = Rig(self, names=("A",))
        logs = LogCatcher(self)
        response = await rig.get(self, b"/garbage")
        self.assertEqual(response["status"], 502)
        self.assertFalse([e for e in logs.events if e.get("log_failure")])

    @as_deferred
    async def test_malformed_request_400(self) -> None:
        """A malformed request line: 400 and close."""
        rig = Rig(self, names=("A",))
        client = await rig.client(self)
        client.transport.write(b"GARBAGE\r\n\r\n")
        await timeout(client.done)
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 400 "))

    @as_deferred
    async def test_content_length_and_chunked_conflict_400(self) -> None:
        """Content-Length together with Transfer-Encoding (a smuggling shape): 400."""
        rig = Rig(self, names=("A",))
        client = await rig.client(self)
        client.transport.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
                               b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        await timeout(client.done)
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 400 "))
        self.assertEqual(rig.backends["A"].requests, [])

    @as_deferred
    async def test_header_limits_431(self) -> None:
        """Too many header lines, or a head too large: 431."""
        rig = Rig(self, names=("A",), settings=ProxySettings(max_headers=10, max_header_bytes=4096))
        for head in (b"".join(b"x-%d: 1\r\n" % i for i in range(20)), b"x-big: " + b"a" * 8000 + b"\r\n"):
            client = await rig.client(self)
            client.transport.write(b"GET /id HTTP/1.1\r\nhost: x\r\n" + head + b"\r\n")
            await timeout(client.done)
            self.assertTrue(client.raw.startswith(b"HTTP/1.1 431 "), client.raw[:40])

    @as_deferred
    async def test_slow_head_408(self) -> None:
        """A head that does not arrive within HEADER_TIMEOUT: 408."""
        rig = Rig(self, names=("A",), settings=ProxySettings(header_timeout=0.2))
        client = await rig.client(self)
        client.transport.write(b"GET /id HTTP/1.1\r\nhost: x\r\n")
        await timeout(client.done)
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 408 "))


class AffinityTests(TestCase):
    """The TOTVS_BROKER_SH_001 cookie."""

    @as_deferred
    async def test_cookie_keeps_the_server(self) -> None:
        """A request with the cookie goes to the server that set it, every time."""
        rig = Rig(self)
        first = await rig.get(self, b"/id")
        cookie = cookie_of(first)
        self.assertTrue(cookie.startswith(COOKIE_NAME.encode() + b"="))
        self.assertNotIn(b"127.0.0.1", cookie)
        bodies = [(await rig.get(self, b"/id", [(b"cookie", cookie)]))["body"] for _ in range(6)]
        self.assertEqual(bodies, [first["body"]] * 6)

    @as_deferred
    async def test_redispatch_when_the_server_is_down(self) -> None:
        """Its server down: the request goes elsewhere and the cookie is replaced."""
        rig = Rig(self)
        first = await rig.get(self, b"/id")
        cookie = cookie_of(first)
        rig.pool.set_state(first["body"].decode(), ServerState.DOWN, "test")
        second = await rig.get(self, b"/id", [(b"cookie", cookie)])
        self.assertNotEqual(second["body"], first["body"])
        self.assertNotEqual(cookie_of(second), cookie)

    @as_deferred
    async def test_cookie_stripped_upstream(self) -> None:
        """The affinity cookie never reaches the AppServer; other cookies do."""
        rig = Rig(self)
        first = await rig.get(self, b"/id")
        cookie = cookie_of(first)
        response = await rig.get(self, b"/headers", [(b"cookie", cookie + b"; app=1")])
        seen = [(n, v) for n, v in json.loads(response["body"])]
        self.assertIn(("cookie", "app=1"), seen)
        self.assertNotIn(COOKIE_NAME, response["body"].decode())


@implementer(IPushProducer)
class Uploader:
    """Sends *size* bytes of body as the transport takes them."""

    def __init__(self, client: Client, size: int) -> None:
        self.client = client
        self.left = size
        self.paused = False
        self.pauses = 0
        client.transport.registerProducer(self, True)
        reactor.callLater(0, self.produce)  # type: ignore[attr-defined]

    def produce(self) -> None:
        while self.left and not self.paused:
            n = min(64 * 1024, self.left)
            self.left -= n
            self.client.transport.write(self.client.conn.send(h11.Data(data=b"u" * n)))
        if not self.left:
            self.client.transport.unregisterProducer()
            self.client.transport.write(self.client.conn.send(h11.EndOfMessage()))

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            reactor.callLater(0, self.produce)  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.left = 0


def buffered(transport: Any) -> int:
    """Bytes a TCP transport holds unsent."""
    return len(transport.dataBuffer) + transport._tempDataLen - transport.offset  # type: ignore[no-any-return]


class StreamingTests(TestCase):
    """64 MB each way through the proxy with bounded broker memory."""

    def watch(self, rig: Rig) -> list[int]:
        """Samples the largest unsent buffer of the broker's transports."""
        peak = [0]

        def sample() -> None:
            for protocol in list(rig.upstreams_seen):
                peak[0] = max(peak[0], buffered(protocol.transport))
        loop = task.LoopingCall(sample)
        loop.start(0.005)
        self.addCleanup(loop.stop)
        return peak

    async def _rig(self) -> Rig:
        rig = Rig(self, names=("A",))
        rig.upstreams_seen = []  # type: ignore[attr-defined]
        original = rig.factory.buildProtocol

        def build(addr: Any) -> Any:
            protocol = original(addr)
            rig.upstreams_seen.append(protocol)  # type: ignore[attr-defined]
            return protocol
        rig.factory.buildProtocol = build  # type: ignore[method-assign]
        connector = rig.upstreams.connector

        def connecting(*args: Any) -> Any:
            return connector(*args).addCallback(lambda p: rig.upstreams_seen.append(p) or p)  # type: ignore
        rig.upstreams.connector = connecting
        return rig

    @as_deferred
    async def test_download_64mb_bounded(self) -> None:
        """A 64 MB response streams through; the broker never holds more than a few reads."""
        rig = await self._rig()
        peak = self.watch(rig)
        client = Client()

        def received(data: bytes, c: Client = client) -> None:  # count the body, keep none of it
            c.conn.receive_data(data)
            c.pump()
        client.dataReceived = received  # type: ignore[method-assign]
        await connect(rig.port, client)
        self.addCleanup(lambda: client.transport.loseConnection())
        got = [0]

        def pump(c: Client = client) -> None:
            while True:
                event = c.conn.next_event()
                if event in (h11.NEED_DATA, h11.PAUSED):
                    return
                if isinstance(event, h11.Data):
                    got[0] += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    c.done.callback(c)
                    return
        client.pump = pump  # type: ignore[method-assign]
        # a slow reader: pause the client now and then so backpressure reaches the AppServer
        client.send_request(b"GET", b"/big/%d" % (64 * MB))
        for _ in range(5):
            client.transport.pauseProducing()
            await task.deferLater(reactor, 0.1, lambda: None)
            client.transport.resumeProducing()
            await task.deferLater(reactor, 0.05, lambda: None)
        await timeout(client.done, 60)
        self.assertEqual(got[0], 64 * MB)
        self.assertLess(peak[0], 4 * MB)
        self.assertGreater(rig.backends["A"].pauses, 0)  # the slow reader's backpressure reached the AppServer

    @as_deferred
    async def test_upload_64mb_bounded(self) -> None:
        """A 64 MB upload streams through; the broker never holds more than a few reads."""
        rig = await self._rig()
        peak = self.watch(rig)
        client = await rig.client(self)
        client.send_request(b"POST", b"/count", [(b"content-length", str(64 * MB).encode())], end=False)
        uploader = Uploader(client, 64 * MB)
        backend_conn: list[Any] = []
        for _ in range(100):  # pause the AppServer's reading now and then
            if rig.backends["A"].connections:
                backend_conn = rig.backends["A"].connections
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        for _ in range(5):
            backend_conn[0].transport.pauseProducing()
            await task.deferLater(reactor, 0.1, lambda: None)
            backend_conn[0].transport.resumeProducing()
            await task.deferLater(reactor, 0.05, lambda: None)
        await timeout(client.done, 60)
        self.assertEqual(client.responses[0]["body"], str(64 * MB).encode())
        self.assertLess(peak[0], 4 * MB)
        self.assertGreater(uploader.pauses, 0)  # the stalled AppServer's backpressure reached the client


class UnitTests(TestCase):
    """[BALANCE_HTTP] and [BALANCE_WEB_SERVICES] units built from config text, on real sockets."""

    @as_deferred
    async def test_units_serve_from_their_sections(self) -> None:
        """Both units listen on LOCAL_SERVER_PORT and send requests to their REMOTE_SERVER_xx."""
        backends = []
        for name in ("A", "B"):
            factory = BackendFactory(name)
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
            self.addCleanup(port.stopListening)
            backends.append(port.getHost().port)
        text = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nREMOTE_SERVER_01 = 127.0.0.1 1\n"
                "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
                f"REMOTE_SERVER_A = 127.0.0.1 {backends[0]}\n"
                "[BALANCE_WEB_SERVICES]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
                f"REMOTE_SERVER_B = 127.0.0.1 {backends[1]} 4\n")
        config = parse_config(text)
        for section, expected in ((HTTP_SECTION, b"A"), (WEB_SERVICES_SECTION, b"B")):
            unit = UNIT_BUILDERS[section](reactor, config.unit(section), name=section)
            unit.privilegedStartService()
            unit.startService()
            self.addCleanup(unit.stopService)
            client = Client()
            await connect(unit.port.getHost().port, client)
            self.addCleanup(client.transport.loseConnection)
            client.send_request(b"GET", b"/id")
            await timeout(client.done)
            self.assertEqual(client.responses[0]["body"], expected)
            self.assertEqual(unit.stats.get("http_requests"), 1)
            if section == HTTP_SECTION:
                self.assertIsNotNone(header(client.responses[0], b"set-cookie"))
            else:
                self.assertIsNone(header(client.responses[0], b"set-cookie"))
                self.assertEqual(unit.slots.in_flight("B"), 0)

    @as_deferred
    async def test_tls_terminated(self) -> None:
        """SSL_CERTIFICATE/SSL_KEY: HTTPS to the broker, X-Forwarded-Proto https, a Secure cookie."""
        c = certs()
        factory = BackendFactory("A")
        backend = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(backend.stopListening)
        config = parse_config(
            "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nREMOTE_SERVER_01 = 127.0.0.1 1\n"
            "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
            f"REMOTE_SERVER_A = 127.0.0.1 {backend.getHost().port}\n"
            f"SSL_CERTIFICATE = {c.cert('broker')}\nSSL_KEY = {c.key('broker')}\n")
        unit = UNIT_BUILDERS[HTTP_SECTION](reactor, config.unit(HTTP_SECTION), name=HTTP_SECTION)
        unit.privilegedStartService()
        unit.startService()
        self.addCleanup(unit.stopService)
        client = Client()
        await ClientCreator(reactor, lambda: client).connectSSL(  # type: ignore[arg-type]
            "127.0.0.1", unit.port.getHost().port, c.client_options())
        self.addCleanup(close, client)
        client.send_request(b"GET", b"/headers")
        await timeout(client.done)
        response = client.responses[0]
        seen = dict((n, v) for n, v in json.loads(response["body"]))
        self.assertEqual(seen["x-forwarded-proto"], "https")
        self.assertIn(b"; Secure", header(response, b"set-cookie") or b"")
