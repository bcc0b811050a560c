"""The sample HTTP AppServer (sim/http.py) and its WebSocket (sim/websocket.py), in memory: a real
twisted.web HTTPChannel over a StringTransport, a MemoryReactorClock for ``/slow``."""

from __future__ import annotations

import re
import struct
from typing import Any

import h11
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.sim import http as sim_http
from protheus_broker.sim.http import CHUNK, Sessions, SimHttpSite, pattern
from protheus_broker.sim.tap import Options, makeService
from protheus_broker.sim.websocket import (BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, Frame, FrameParser,
                                           MessageAssembler, WebSocketEcho, WebSocketError, accept_key,
                                           client_frame, close_payload, encode_frame, valid_key)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3


class PausingTransport(StringTransport):
    """Pauses its streaming producer when more than *limit* unread bytes are buffered, as a TCP
    transport does when its send buffer fills."""

    def __init__(self, limit: int = 128 * 1024) -> None:
        super().__init__()
        self.limit = limit
        self.peak = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.peak = max(self.peak, len(self.value()))
        if self.producer is not None and self.streaming and len(self.value()) > self.limit:
            self.producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def drain(self) -> bytes:
        """What the client read; then the transport asks for more."""
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data


def responses(data: bytes) -> list[tuple[h11.Response, bytes]]:
    """Parse *data* as a client would: each response with its (de-chunked) body."""
    client = h11.Connection(h11.CLIENT)
    out: list[tuple[h11.Response, bytes]] = []
    client.receive_data(data)
    while True:
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        response, body = None, b""
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return out
        assert response is not None
        out.append((response, body))
        client.start_next_cycle()


def header(response: h11.Response, name: bytes) -> bytes | None:
    """A response header's value."""
    for key, value in response.headers:
        if key == name:
            return bytes(value)
    return None


class Server:
    """One client connection to a SimHttpSite, in memory."""

    def __init__(self, name: str = "web-01", transport: StringTransport | None = None) -> None:
        self.reactor = MemoryReactorClock()
        self.site = SimHttpSite(name, self.reactor)
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = transport or StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def request(self, method: str, target: str, headers: str = "", body: bytes = b"") -> None:
        length = f"Content-Length: {len(body)}\r\n" if body or method in ("POST", "PUT") else ""
        self.send(f"{method} {target} HTTP/1.1\r\nHost: sim\r\n{length}{headers}\r\n".encode() + body)

    def answers(self) -> list[tuple[h11.Response, bytes]]:
        data = self.transport.value()
        self.transport.clear()
        return responses(data)

    def get(self, target: str, headers: str = "") -> tuple[h11.Response, bytes]:
        self.request("GET", target, headers)
        (answer,) = self.answers()
        return answer


class WebSocketFrameTests(SynchronousTestCase):
    """RFC 6455 framing."""

    def test_accept_key(self) -> None:
        """The accept key of the RFC's example."""
        self.assertEqual(accept_key(KEY), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_valid_key(self) -> None:
        """A key is base64 of 16 bytes."""
        self.assertTrue(valid_key(KEY))
        self.assertFalse(valid_key(b"short"))
        self.assertFalse(valid_key(b"!!!not-base64!!!"))
        self.assertFalse(valid_key(None))

    def test_round_trip_lengths(self) -> None:
        """Masked frames of every length encoding parse back, fed a byte at a time or whole."""
        for length in (0, 1, 125, 126, 65535, 65536, 70000):
            payload = pattern(length, length)
            data = client_frame(BINARY, payload)
            parser = FrameParser()
            frames = [f for i in range(0, len(data), 997) for f in parser.feed(data[i:i + 997])]
            self.assertEqual(frames, [Frame(True, BINARY, payload)], length)
        small = client_frame(TEXT, b"hi")
        parser = FrameParser()
        self.assertEqual([f for b in small for f in parser.feed(bytes([b]))], [Frame(True, TEXT, b"hi")])

    def test_server_frames_unmasked(self) -> None:
        """A server frame has no mask and a client-side parser reads it."""
        data = encode_frame(TEXT, b"hello")
        self.assertEqual(data, b"\x81\x05hello")
        self.assertEqual(FrameParser(expect_masked=False).feed(data), [Frame(True, TEXT, b"hello")])

    def test_unmasked_client_frame(self) -> None:
        """A client frame without a mask is a protocol error (1002)."""
        with self.assertRaises(WebSocketError) as caught:
            FrameParser().feed(encode_frame(TEXT, b"x"))
        self.assertEqual(caught.exception.code, 1002)

    def test_bad_frames(self) -> None:
        """Reserved bits, unknown opcodes, long or fragmented control frames are refused."""
        for data in (b"\xc1\x80abcd", b"\x83\x80abcd", client_frame(PING, b"x" * 126),
                     client_frame(PING, b"x", fin=False)):
            with self.assertRaises(WebSocketError, msg=repr(data[:2])):
                FrameParser().feed(data)

    def test_too_big(self) -> None:
        """A frame over the limit is refused from its header (1009), before its payload arrives."""
        with self.assertRaises(WebSocketError) as caught:
            FrameParser(max_payload=1000).feed(b"\x82\xfe\x10\x00")
        self.assertEqual(caught.exception.code, 1009)

    def test_fragments_joined(self) -> None:
        """A fragmented message comes out whole; a ping between its fragments comes out alone."""
        messages = MessageAssembler()
        self.assertIsNone(messages.add(Frame(False, TEXT, b"hel")))
        self.assertEqual(messages.add(Frame(True, PING, b"p")), (PING, b"p"))
        self.assertIsNone(messages.add(Frame(False, CONTINUATION, b"lo ")))
        self.assertEqual(messages.add(Frame(True, CONTINUATION, b"world")), (TEXT, b"hello world"))

    def test_fragment_errors(self) -> None:
        """A stray continuation, a new message inside a fragmented one and bad UTF-8 are refused."""
        with self.assertRaises(WebSocketError):
            MessageAssembler().add(Frame(True, CONTINUATION, b"x"))
        messages = MessageAssembler()
        messages.add(Frame(False, BINARY, b"x"))
        with self.assertRaises(WebSocketError):
            messages.add(Frame(True, TEXT, b"y"))
        with self.assertRaises(WebSocketError) as caught:
            MessageAssembler().add(Frame(True, TEXT, b"\xff\xfe"))
        self.assertEqual(caught.exception.code, 1007)


class WebSocketEchoTests(SynchronousTestCase):
    """The ``/ws`` protocol after the handshake."""

    def setUp(self) -> None:
        self.transport = StringTransport()
        self.echo = WebSocketEcho("web-01")
        self.echo.makeConnection(self.transport)
        self.parser = FrameParser(expect_masked=False)

    def frames(self) -> list[Frame]:
        data = self.transport.value()
        self.transport.clear()
        return self.parser.feed(data)

    def test_echoes_text_and_binary(self) -> None:
        """Text comes back as text, binary as binary, fragmented as one message."""
        self.echo.dataReceived(client_frame(TEXT, "olá".encode()) + client_frame(BINARY, b"\x00\x01"))
        self.echo.dataReceived(client_frame(BINARY, b"ab", fin=False) + client_frame(CONTINUATION, b"cd"))
        self.assertEqual(self.frames(), [Frame(True, TEXT, "olá".encode()), Frame(True, BINARY, b"\x00\x01"),
                                         Frame(True, BINARY, b"abcd")])

    def test_ping_pong(self) -> None:
        """A ping is answered by a pong with its payload."""
        self.echo.dataReceived(client_frame(PING, b"are you there"))
        self.assertEqual(self.frames(), [Frame(True, PONG, b"are you there")])

    def test_close_returned(self) -> None:
        """The peer's close comes back with its code and the connection closes."""
        self.echo.dataReceived(client_frame(CLOSE, close_payload(1000, "bye")) + client_frame(TEXT, b"late"))
        self.assertEqual(self.frames(), [Frame(True, CLOSE, struct.pack("!H", 1000))])
        self.assertTrue(self.transport.disconnecting)

    def test_protocol_error_closes(self) -> None:
        """An unmasked frame gets close 1002 and the connection closes."""
        self.echo.dataReceived(encode_frame(TEXT, b"x"))
        (frame,) = self.frames()
        self.assertEqual((frame.opcode, frame.payload[:2]), (CLOSE, struct.pack("!H", 1002)))
        self.assertTrue(self.transport.disconnecting)


class SessionPageTests(SynchronousTestCase):
    """``/``: the server's name and a counter bound to the SIMSESSION cookie."""

    def test_counter_grows_within_a_session(self) -> None:
        """The first view sets the cookie with counter 1; with the cookie it grows; keep-alive."""
        server = Server("web-01")
        response, body = server.get("/")
        self.assertEqual(response.status_code, 200)
        cookie = header(response, b"set-cookie")
        assert cookie is not None
        self.assertIn(b"HttpOnly", cookie)
        session = cookie.split(b";")[0].decode()
        self.assertIn(b'<span id="server">web-01</span>', body)
        self.assertIn(b'<span id="counter">1</span>', body)
        self.assertIn(b'new WebSocket(scheme + location.host + "/ws")', body)
        for expected in (2, 3):
            response, body = server.get("/", f"Cookie: other=1; {session}\r\n")
            self.assertIsNone(header(response, b"set-cookie"))
            self.assertIn(f'<span id="counter">{expected}</span>'.encode(), body)
        self.assertFalse(server.transport.disconnecting)

    def test_unknown_session_starts_over(self) -> None:
        """A cookie this server did not issue (another server's) starts a new session."""
        response, body = Server().get("/", "Cookie: SIMSESSION=feedface\r\n")
        self.assertIsNotNone(header(response, b"set-cookie"))
        self.assertIn(b'<span id="counter">1</span>', body)

    def test_name_escaped(self) -> None:
        """The server name is HTML-escaped on the page."""
        _, body = Server("<b>x</b>").get("/")
        self.assertIn(b"&lt;b&gt;x&lt;/b&gt;", body)

    def test_sessions_bounded(self) -> None:
        """Past the limit the oldest session is forgotten."""
        sessions = Sessions(limit=2)
        first, _, _ = sessions.hit(None)
        second, _, _ = sessions.hit(None)
        sessions.hit(first)
        sessions.hit(None)
        self.assertEqual(list(sessions.counts), [first, list(sessions.counts)[1]])
        self.assertNotIn(second, sessions.counts)

    def test_unknown_path(self) -> None:
        """Other paths are 404."""
        self.assertEqual(Server().get("/nothing")[0].status_code, 404)


class RoutesTests(SynchronousTestCase):
    """``/health``, ``/bytes/<n>``, ``/echo``, ``/slow``."""

    def test_health(self) -> None:
        """``/health`` is 200 and names the server."""
        response, body = Server("web-02").get("/health")
        self.assertEqual((response.status_code, body), (200, b"ok web-02\n"))

    def test_bytes_chunked(self) -> None:
        """``/bytes/<n>`` sends exactly n pattern bytes, chunked; the connection stays open."""
        server = Server()
        for n in (0, 10, 200_000):
            response, body = server.get(f"/bytes/{n}")
            self.assertEqual(header(response, b"transfer-encoding"), b"chunked")
            self.assertEqual(body, pattern(0, n))
        self.assertFalse(server.transport.disconnecting)

    def test_bytes_bad_count(self) -> None:
        """A count that is not a number is 400."""
        for target in ("/bytes/x", "/bytes/-1", "/bytes", "/bytes/1/2"):
            self.assertEqual(Server().get(target)[0].status_code, 400, target)

    def test_bytes_backpressure(self) -> None:
        """A client that does not read holds generation: a few chunks buffered, not the body."""
        transport = PausingTransport(limit=128 * 1024)
        server = Server(transport=transport)
        total = 20 * 1024 * 1024
        server.request("GET", f"/bytes/{total}")
        received = transport.drain()
        while not received.endswith(b"\r\n0\r\n\r\n"):
            received += transport.drain()
        self.assertLess(transport.peak, transport.limit + 2 * CHUNK)
        ((response, body),) = responses(received)
        self.assertEqual((len(body), body[-100:]), (total, pattern(total - 100, 100)))

    def test_echo(self) -> None:
        """``/echo`` returns POST and PUT bodies, small and large (spooled to a file), with length."""
        server = Server(transport=PausingTransport())
        for method, body in (("POST", b"hello"), ("PUT", pattern(7, 3 * 1024 * 1024)), ("POST", b"")):
            server.request(method, "/echo", "Content-Type: text/x-test\r\n", body)
            received = b""
            while True:
                chunk = server.transport.drain()  # type: ignore[attr-defined]
                if not chunk:
                    break
                received += chunk
            ((response, echoed),) = responses(received)
            self.assertEqual((response.status_code, header(response, b"content-type")), (200, b"text/x-test"))
            self.assertEqual(echoed, body)

    def test_echo_get_refused(self) -> None:
        """GET on ``/echo`` is 405."""
        self.assertEqual(Server().get("/echo")[0].status_code, 405)

    def test_slow(self) -> None:
        """``/slow?ms=N`` answers only after N ms."""
        server = Server()
        server.request("GET", "/slow?ms=1500")
        server.reactor.advance(1.4)
        self.assertEqual(server.transport.value(), b"")
        server.reactor.advance(0.2)
        ((response, body),) = server.answers()
        self.assertEqual((response.status_code, body), (200, b"slept 1500 ms on web-01\n"))

    def test_slow_client_gone(self) -> None:
        """A client that leaves cancels the pending answer."""
        server = Server()
        server.request("GET", "/slow?ms=5000")
        self.assertEqual(len(server.reactor.getDelayedCalls()), 1)
        server.protocol.connectionLost(Exception("gone"))  # type: ignore[arg-type]
        self.assertEqual([c for c in server.reactor.getDelayedCalls() if c.active()
                          and "answer" in repr(c.func)], [])

    def test_slow_bad_argument(self) -> None:
        """A delay that is not a number, or over a minute, is 400."""
        for target in ("/slow?ms=x", "/slow?ms=60001", "/slow?ms=-5"):
            self.assertEqual(Server().get(target)[0].status_code, 400, target)


class HandshakeTests(SynchronousTestCase):
    """``/ws`` handshake on the HTTP connection, then the echo on the same connection."""

    def upgrade(self, server: Server, extra: str = "", version: str = "13") -> bytes:
        server.request("GET", "/ws", f"Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
                                     f"Sec-WebSocket-Key: {KEY.decode()}\r\n"
                                     f"Sec-WebSocket-Version: {version}\r\n{extra}")
        data = server.transport.value()
        server.transport.clear()
        return data

    def test_upgrade_then_echo(self) -> None:
        """101 with the accept key, then frames on the connection are echoed; close closes it."""
        server = Server()
        answer = self.upgrade(server)
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), answer)
        self.assertIn(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n", answer)
        self.assertTrue(answer.endswith(b"\r\n\r\n"))
        self.assertEqual(server.site.state.websockets, 1)
        server.send(client_frame(TEXT, b"ping me") + client_frame(PING, b"p"))
        parser = FrameParser(expect_masked=False)
        self.assertEqual(parser.feed(server.transport.value()), [Frame(True, TEXT, b"ping me"),
                                                                 Frame(True, PONG, b"p")])
        server.transport.clear()
        server.send(client_frame(CLOSE, close_payload(1001)))
        self.assertEqual(parser.feed(server.transport.value()), [Frame(True, CLOSE, struct.pack("!H", 1001))])
        self.assertTrue(server.transport.disconnecting)
        server.protocol.connectionLost(Exception("closed"))  # type: ignore[arg-type]

    def test_idle_timeout_off(self) -> None:
        """The HTTP idle timeout does not cut an open WebSocket."""
        server = Server()
        self.upgrade(server)
        server.reactor.advance(3600)
        self.assertFalse(server.transport.disconnecting)

    def test_not_a_handshake(self) -> None:
        """A plain GET, or a bad key, is 400; another version is 426 naming 13."""
        self.assertEqual(Server().get("/ws")[0].status_code, 400)
        server = Server()
        server.request("GET", "/ws", "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                     "Sec-WebSocket-Key: nope\r\nSec-WebSocket-Version: 13\r\n")
        self.assertEqual(server.answers()[0][0].status_code, 400)
        server = Server()
        answer = self.upgrade(server, version="8")
        self.assertTrue(re.match(rb"HTTP/1.1 426 ", answer), answer)
        self.assertIn(b"Sec-Websocket-Version: 13", answer.title())


class TapTests(SynchronousTestCase):
    """``--http`` picks the HTTP site."""

    def test_http_option(self) -> None:
        """With --http the service listens with a SimHttpSite carrying the name."""
        options = Options()
        options.parseOptions(["--http", "--name", "web-01", "--port", "tcp:0:interface=127.0.0.1"])
        service: Any = makeService(options)
        self.assertIsInstance(service.factory, sim_http.SimHttpSite)
        self.assertEqual(service.name, "web-01")
