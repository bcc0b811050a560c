"""The HTTP proxy's fast paths, in memory: heads built from h11-parsed headers without h11
validating them again, and Content-Length body bytes past h11's receive buffer.  Each is checked
against the slow path it replaces (the same proxy with the fast path switched off): the same
bytes out, the same state after."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import h11
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.http import proxy as proxy_module
from protheus_broker.http import upstream as upstream_module
from protheus_broker.http.proxy import ProxySettings, filter_headers, h11_headers, pairs_of
from protheus_broker.http.upstream import body_left, take_body

from .helpers import LogCatcher
from .test_http_proxy import Harness


@contextmanager
def slow_path() -> Iterator[None]:
    """The proxy as it was before the fast paths: every head validated by h11, every body byte
    through h11's receive buffer."""
    headers, reader = proxy_module._H11Headers, upstream_module._ContentLengthReader
    proxy_module._H11Headers = None
    upstream_module._ContentLengthReader = None
    try:
        yield
    finally:
        proxy_module._H11Headers, upstream_module._ContentLengthReader = headers, reader


TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)
VALUE = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789 ,;=/\"", max_size=20).map(
    lambda v: v.strip().encode())
HOP = st.sampled_from([b"connection", b"keep-alive", b"proxy-authorization", b"te", b"trailer", b"upgrade",
                       b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"cookie", b"host"])
HEADER = st.tuples(st.one_of(TOKEN, HOP), VALUE)


def head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    """A request head (Host first, Content-Length when there is a body)."""
    lines = [b"%s %s HTTP/1.1" % (method, target), b"Host: app"]
    lines += [b"%s: %s" % (name, value) for name, value in headers if name != b"host"]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def run(request: bytes, response_parts: list[bytes], request_parts: int = 1,
        settings_: ProxySettings | None = None) -> dict[str, Any]:
    """One exchange through a fresh proxy: the bytes each side got and the state after."""
    rig = Harness(settings_)
    proxy, transport = rig.connect()
    step = max(1, -(-len(request) // request_parts))
    for at in range(0, len(request), step):
        proxy.dataReceived(request[at:at + step])
    upstream_bytes = b""
    for part in response_parts:
        if not rig.upstreams_made.made:
            break
        upstream = rig.upstream()
        upstream_bytes = upstream.transport.value()
        upstream.dataReceived(part)
    if rig.upstreams_made.made:
        upstream_bytes = rig.upstream().transport.value()
    return {"client": transport.value(), "upstream": upstream_bytes,
            "idle": rig.upstreams.idle_count(), "in_flight": rig.factory.stats.get("http_in_flight"),
            "disconnecting": transport.disconnecting, "bytes_out": rig.factory.stats.get("bytes_out"),
            "bytes_in": rig.factory.stats.get("bytes_in")}


class HeadTests(SynchronousTestCase):
    """Heads built from already-parsed headers: what h11 would send, without re-validating."""

    def _sent(self, headers: Any) -> bytes | str:
        """The bytes h11 sends for a request with *headers*, or the error it raises."""
        conn = h11.Connection(h11.CLIENT)
        try:
            return conn.send(h11.Request(method=b"GET", target=b"/", headers=headers))
        except h11.LocalProtocolError as exc:
            return str(exc)

    @given(st.lists(HEADER, max_size=12), st.lists(HEADER, max_size=3))
    @settings(max_examples=200, deadline=None)
    def test_known_pairs_give_the_same_bytes(self, parsed_in: list[tuple[bytes, bytes]],
                                             added: list[tuple[bytes, bytes]]) -> None:
        """Parsed pairs, filtered, plus new ones: the fast headers put the same bytes on the wire."""
        server = h11.Connection(h11.SERVER)
        server.receive_data(head(b"GET", b"/", parsed_in))
        event = server.next_event()
        assert isinstance(event, h11.Request)
        parsed = list(event.headers)
        self.assertEqual(pairs_of(event.headers), parsed)
        pairs = filter_headers(parsed, False) + added
        self.assertEqual(self._sent(h11_headers(pairs, set(parsed))), self._sent(pairs))

    def test_unknown_pairs_are_validated(self) -> None:
        """A pair h11 did not parse is validated as before: a bad one raises LocalProtocolError."""
        with self.assertRaises(h11.LocalProtocolError):
            h11_headers([(b"host", b"a"), (b"x-bad", b"line\r\nbreak")], {(b"host", b"a")})
        with self.assertRaises(h11.LocalProtocolError):
            h11_headers([(b"host", b"a"), (b"bad name", b"v")], set())

    def test_raw_case_of_new_pairs_kept(self) -> None:
        """A new pair keeps its name's case on the wire, as h11 would send it."""
        pairs = [(b"host", b"a"), (b"Set-Cookie", b"x=1")]
        self.assertEqual(self._sent(h11_headers(pairs, {(b"host", b"a")})), self._sent(pairs))
        self.assertIn(b"Set-Cookie: x=1\r\n", self._sent(h11_headers(pairs, set())))

    def test_two_framing_headers_go_to_h11(self) -> None:
        """Two Content-Length pairs (one known, one added): h11 normalizes the whole list, as before."""
        known = {(b"host", b"a"), (b"content-length", b"3")}
        pairs = [(b"host", b"a"), (b"content-length", b"3"), (b"content-length", b"3")]
        self.assertIs(h11_headers(pairs, known), pairs)
        self.assertIs(h11_headers([(b"host", b"a"), (b"Content-Length", b"4")], known)[1][0], b"Content-Length")

    def test_proxied_head_drops_hop_by_hop_and_adds_forwarded(self) -> None:
        """Through the fast path: hop-by-hop and Connection-named headers gone, X-Forwarded-* and
        Forwarded added after any earlier X-Forwarded-For, the affinity cookie kept out."""
        request = head(b"GET", b"/p?q=1", [
            (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"1"), (b"Keep-Alive", b"300"),
            (b"Proxy-Authorization", b"Basic x"), (b"TE", b"trailers"), (b"X-Forwarded-For", b"10.9.9.9"),
            (b"X-Forwarded-Proto", b"https"), (b"Accept", b"*/*")])
        sent = run(request, [])["upstream"]
        self.assertEqual(sent, b"GET /p?q=1 HTTP/1.1\r\nhost: app\r\naccept: */*\r\n"
                               b"x-forwarded-for: 10.9.9.9, 10.1.2.3\r\nx-forwarded-proto: http\r\n"
                               b"forwarded: for=10.1.2.3;proto=http\r\n\r\n")
        with slow_path():
            self.assertEqual(run(request, [])["upstream"], sent)

    @given(st.lists(HEADER, max_size=10), st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT"]),
           st.lists(HEADER, max_size=6), st.booleans())
    @settings(max_examples=150, deadline=None)
    def test_fuzzed_heads_equal_the_slow_path(self, request_headers: list[tuple[bytes, bytes]], method: bytes,
                                              response_headers: list[tuple[bytes, bytes]], cookie: bool) -> None:
        """Random request and response heads through the proxy: the same bytes both ways, the same
        state after, as with every head validated by h11."""
        LogCatcher(self)
        if cookie:  # the affinity cookie, from a first exchange (stripped on the way up)
            first = run(head(b"GET", b"/", []), [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"])["client"]
            value = first.split(b"set-cookie: ", 1)[1].split(b";", 1)[0]
            request_headers = request_headers + [(b"cookie", value + b"; other=1")]
        body = b"xyz" if method in (b"POST", b"PUT") else b""
        request = head(method, b"/r", request_headers, body)
        lines = [b"%s: %s" % (name, value) for name, value in response_headers if name != b"host"]
        response = b"\r\n".join([b"HTTP/1.1 200 OK"] + lines + [b"content-length: 5"]) + b"\r\n\r\nhello"
        fast = run(request, [response])
        with slow_path():
            slow = run(request, [response])
        self.assertEqual(fast, slow)


class BodyTests(SynchronousTestCase):
    """Content-Length body bytes past h11's receive buffer: h11 still frames the message."""

    def test_body_left_only_for_content_length_bodies(self) -> None:
        """body_left: the bytes h11 still expects of a Content-Length body; 0 for chunked ones."""
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"a")]))
        conn.send(h11.EndOfMessage())
        self.assertEqual(body_left(conn), 0)
        conn.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
        self.assertIsInstance(conn.next_event(), h11.Response)
        self.assertEqual(body_left(conn), 10)
        event, rest = take_body(conn, b"0123456789EXTRA", 10)
        self.assertEqual((event.data, rest), (b"0123456789", b"EXTRA"))
        self.assertIsInstance(conn.next_event(), h11.EndOfMessage)  # h11 itself ends the message
        chunked = h11.Connection(h11.CLIENT)
        chunked.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"a")]))
        chunked.send(h11.EndOfMessage())
        chunked.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunked.next_event()
        self.assertEqual(body_left(chunked), 0)

    def test_bytes_held_by_h11_go_first(self) -> None:
        """While h11 holds unparsed bytes, nothing skips it (order is kept)."""
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"a")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        conn.next_event()
        self.assertEqual(body_left(conn), 0)
        self.assertEqual(conn.next_event().data, b"abc")  # type: ignore[union-attr]
        self.assertEqual(body_left(conn), 7)

    @given(st.integers(min_value=0, max_value=70000), st.lists(st.integers(min_value=1, max_value=40000),
                                                              min_size=1, max_size=8), st.booleans())
    @settings(max_examples=120, deadline=None)
    def test_fuzzed_response_reads_equal_the_slow_path(self, size: int, cuts: list[int], keep_alive: bool) -> None:
        """A Content-Length response cut into random reads (the head and body in any split, a large
        first read included): the client gets the same bytes, the upstream is pooled the same."""
        body = bytes(i % 251 for i in range(size))
        response = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (
            size, b"" if keep_alive else b"connection: close\r\n", body)
        parts, at = [], 0
        for cut in cuts:
            if at < len(response):
                parts.append(response[at:at + cut])
                at += cut
        if at < len(response):
            parts.append(response[at:])
        fast = run(head(b"GET", b"/big", []), parts)
        with slow_path():
            slow = run(head(b"GET", b"/big", []), parts)
        self.assertEqual(fast, slow)
        self.assertTrue(fast["client"].endswith(b"\r\n\r\n" + body))

    @given(st.integers(min_value=1, max_value=50000), st.integers(min_value=1, max_value=9))
    @settings(max_examples=60, deadline=None)
    def test_fuzzed_uploads_equal_the_slow_path(self, size: int, reads: int) -> None:
        """A Content-Length upload in several reads: the AppServer gets the same bytes either way."""
        body = bytes(i % 253 for i in range(size))
        request = head(b"POST", b"/up", [(b"expect", b"100-continue")], body)
        fast = run(request, [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"], request_parts=reads)
        with slow_path():
            slow = run(request, [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"], request_parts=reads)
        self.assertEqual(fast, slow)
        self.assertTrue(fast["upstream"].endswith(b"\r\n\r\n" + body))

    @given(st.integers(min_value=0, max_value=3000), st.integers(min_value=0, max_value=30000),
           st.lists(st.integers(min_value=1, max_value=20000), min_size=1, max_size=6),
           st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=6))
    @settings(max_examples=100, deadline=None)
    def test_fuzzed_pipelined_exchanges_equal_the_slow_path(self, up: int, down: int, request_cuts: list[int],
                                                            response_cuts: list[int]) -> None:
        """A POST with a body and a pipelined GET, both answered on one upstream connection, every
        stream cut at random points: the same bytes and state as the slow path."""
        requests = head(b"POST", b"/1", [], bytes(i % 7 for i in range(up))) + head(b"GET", b"/2", [])
        if not up:
            requests = head(b"POST", b"/1", [(b"content-length", b"0")]) + head(b"GET", b"/2", [])
        responses = (b"HTTP/1.1 201 Created\r\ncontent-length: %d\r\n\r\n%s" % (down, b"d" * down)
                     + b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

        def exchange() -> tuple[bytes, bytes, int]:
            rig = Harness(affinity=False)
            proxy, transport = rig.connect()
            at = 0
            for cut in request_cuts + [len(requests)]:
                part = requests[at:at + cut]
                at += cut
                if part:
                    proxy.dataReceived(part)
            at = 0
            for cut in response_cuts + [len(responses)]:
                part = responses[at:at + cut]
                at += cut
                if part and rig.upstreams_made.made:
                    rig.upstream().dataReceived(part)
            upstream_bytes = b"".join(u.transport.value() for u in rig.upstreams_made.made)
            return transport.value(), upstream_bytes, rig.upstreams.idle_count()

        fast = exchange()
        with slow_path():
            slow = exchange()
        self.assertEqual(fast, slow)
        self.assertEqual(fast[0].count(b"HTTP/1.1 "), 2)

    def test_upload_body_past_h11_clears_the_100_continue_wait(self) -> None:
        """A client that sends its body without waiting: no 100 Continue relayed afterwards."""
        rig = Harness(affinity=False)
        proxy, transport = rig.connect()
        proxy.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        self.assertTrue(proxy.conn.they_are_waiting_for_100_continue)
        proxy.dataReceived(b"ab")
        self.assertFalse(proxy.conn.they_are_waiting_for_100_continue)
        rig.upstream().dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        proxy.dataReceived(b"cd")
        self.assertTrue(rig.upstream().transport.value().endswith(b"\r\n\r\nabcd"))

    def test_cut_body_still_closes_the_client(self) -> None:
        """An AppServer that closes before its Content-Length is reached (bytes past h11 so far):
        the client connection is aborted, never a short body passed off as complete."""
        logs = LogCatcher(self)
        rig = Harness(affinity=False)
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        upstream = rig.upstream()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        upstream.dataReceived(b"x" * 60)
        self.assertTrue(transport.value().endswith(b"x" * 60))
        upstream.readConnectionLost()
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(transport.disconnected)
        self.assertEqual(rig.factory.stats.get("http_in_flight"), 0)
        self.assertTrue(logs.find(access=True))


class PauseTests(SynchronousTestCase):
    """Reading pauses only while a request really waits."""

    def test_request_sent_at_once_does_not_pause_reading(self) -> None:
        """A request that goes upstream at once leaves the client transport producing throughout."""
        rig = Harness(affinity=False)
        proxy, transport = rig.connect()
        states: list[str] = []
        pause = transport.pauseProducing

        def counted() -> None:
            states.append("paused")
            pause()
        transport.pauseProducing = counted  # type: ignore[method-assign]
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        rig.upstream().dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        self.assertEqual(states, [])
        self.assertEqual(transport.producerState, "producing")

    def test_request_waiting_for_a_connection_pauses_reading(self) -> None:
        """A request whose upstream connection is still being made pauses reading until it is."""
        rig = Harness(affinity=False)
        rig.upstreams_made.hold = True
        proxy, transport = rig.connect()
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(transport.producerState, "paused")
        rig.upstreams_made.hold = False
        upstream = rig.upstreams_made("A", "10.0.0.1", 80).result
        rig.upstreams_made.waiting[0].callback(upstream)
        self.assertEqual(transport.producerState, "producing")
        self.assertTrue(upstream.transport.value().startswith(b"GET / HTTP/1.1\r\n"))



class TimerTests(SynchronousTestCase):
    """One timer per deadline kind, kept across requests: the timeouts still count from the
    right moment."""

    OK0 = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"

    def _exchange(self, rig: Harness, proxy: Any) -> None:
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        proxy.upstream.dataReceived(self.OK0)

    def test_busy_connection_makes_no_timer_calls_per_request(self) -> None:
        """A hundred keep-alive requests on one connection: no new timers after the first."""
        rig = Harness(affinity=False)
        proxy, transport = rig.connect()
        self._exchange(rig, proxy)
        calls: list[float] = []
        call_later = rig.clock.callLater

        def counted(delay: float, *args: Any, **kwargs: Any) -> Any:
            calls.append(delay)
            return call_later(delay, *args, **kwargs)
        rig.clock.callLater = counted  # type: ignore[method-assign]
        for _ in range(100):
            self._exchange(rig, proxy)
        self.assertEqual(calls, [])
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 "), 101)
        self.assertLessEqual(len(rig.clock.getDelayedCalls()), 3)

    def test_keepalive_counts_from_the_last_answer(self) -> None:
        """KEEPALIVE_TIMEOUT 5: answered at 3 s, the connection is open at 7.9 s, closed at 8 s."""
        rig = Harness(ProxySettings(keepalive_timeout=5.0, header_timeout=1.0), affinity=False)
        proxy, transport = rig.connect()
        rig.clock.advance(1.0)
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        rig.clock.advance(2.0)
        proxy.upstream.dataReceived(self.OK0)
        rig.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        rig.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)  # closed quietly

    def test_header_timeout_after_a_keepalive_cycle(self) -> None:
        """A partial head after a finished request: 408 HEADER_TIMEOUT after its first byte."""
        rig = Harness(ProxySettings(keepalive_timeout=60.0, header_timeout=2.0), affinity=False)
        proxy, transport = rig.connect()
        self._exchange(rig, proxy)
        rig.clock.advance(10.0)
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHo")
        rig.clock.advance(1.9)
        self.assertFalse(transport.disconnecting)
        rig.clock.advance(0.1)
        self.assertIn(b"HTTP/1.1 408 ", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_server_timeout_counts_from_the_last_byte(self) -> None:
        """SERVER_TIMEOUT 300: a second request sent at 200 s is not cut at 300 s (the first
        request's timer), but at 500 s with a 504."""
        rig = Harness(ProxySettings(server_timeout=300.0, keepalive_timeout=0), affinity=False)
        LogCatcher(self)
        proxy, transport = rig.connect()
        self._exchange(rig, proxy)
        rig.clock.advance(200.0)
        proxy.dataReceived(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        rig.clock.advance(100.0)
        self.assertNotIn(b"504", transport.value())
        rig.clock.advance(199.0)
        self.assertNotIn(b"504", transport.value())
        rig.clock.advance(1.0)
        self.assertIn(b"HTTP/1.1 504 ", transport.value())

    def test_pooled_connection_idle_counts_from_its_return(self) -> None:
        """UPSTREAM_IDLE_TIMEOUT 30: an upstream connection reused at 20 s and back in the pool
        at 21 s closes at 51 s, not at 30 s."""
        rig = Harness(affinity=False)
        proxy, _ = rig.connect()
        self._exchange(rig, proxy)
        upstream = rig.upstream()
        rig.clock.advance(20.0)
        proxy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIs(proxy.upstream, upstream)
        rig.clock.advance(1.0)
        upstream.dataReceived(self.OK0)
        rig.clock.advance(29.9)
        self.assertFalse(upstream.transport.disconnecting)
        rig.clock.advance(0.1)
        self.assertTrue(upstream.transport.disconnecting)
