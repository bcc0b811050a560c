"""The sample HTTP AppServer over 127.0.0.1: ``twistd protheus-appserver-sim --http`` as a child
process, a WebSocket echo round trip and streaming both ways on a keep-alive connection."""

from __future__ import annotations

import os
import socket
import struct
from http.client import HTTPConnection

from twisted.internet import defer, threads

from protheus_broker.demo.children import twistd_argv
from protheus_broker.sim.http import pattern
from protheus_broker.sim.websocket import (BINARY, CLOSE, PING, PONG, TEXT, Frame, FrameParser, accept_key,
                                           client_frame, close_payload)

from .helpers import ProcessTestCase


def websocket_session(port: int) -> list[Frame]:
    """Handshake, a text and a 200 KB binary echo, a ping, a close (blocking; run in a thread)."""
    key = b"AAECAwQFBgcICQoLDA0ODw=="
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert b"Sec-WebSocket-Accept: " + accept_key(key) in head, head
        big = os.urandom(200_000)
        sock.sendall(client_frame(TEXT, b"hello") + client_frame(BINARY, big) + client_frame(PING, b"p")
                     + client_frame(CLOSE, close_payload(1000)))
        parser = FrameParser(expect_masked=False)
        frames = parser.feed(rest)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return frames + [Frame(True, BINARY, big)]  # the expected binary, for comparison
            frames += parser.feed(chunk)


def streaming(port: int) -> list[tuple[int, int, bool]]:
    """``/bytes`` 8 MB, ``/echo`` 3 MB, ``/health`` on one keep-alive connection (thread)."""
    connection = HTTPConnection("127.0.0.1", port, timeout=20)
    results = []
    connection.request("GET", "/bytes/8000000")
    response = connection.getresponse()
    body = response.read()
    results.append((response.status, len(body), body[-50:] == pattern(8_000_000 - 50, 50)))
    upload = os.urandom(3_000_000)
    connection.request("POST", "/echo", body=upload)
    response = connection.getresponse()
    results.append((response.status, len(upload), response.read() == upload))
    connection.request("GET", "/health")
    response = connection.getresponse()
    results.append((response.status, 0, response.read().startswith(b"ok")))
    connection.close()
    return results


class HttpSimSocketTests(ProcessTestCase):
    timeout = 60

    async def sim(self) -> int:
        child = self.start("web-01", twistd_argv("protheus-appserver-sim", "--http", "--name", "web-01",
                                                 "--port", "tcp:0:interface=127.0.0.1"))
        return await child.listening()

    def test_websocket_echo(self) -> defer.Deferred[None]:
        """Over a real socket the WebSocket echoes text and 200 KB binary, pongs and closes."""
        return defer.ensureDeferred(self._websocket_echo())

    async def _websocket_echo(self) -> None:
        port = await self.sim()
        *frames, expected_big = await threads.deferToThread(websocket_session, port)
        self.assertEqual(frames, [Frame(True, TEXT, b"hello"), expected_big, Frame(True, PONG, b"p"),
                                  Frame(True, CLOSE, struct.pack("!H", 1000))])

    def test_streaming_keep_alive(self) -> defer.Deferred[None]:
        """8 MB down, 3 MB up and back, then a health check, all on one connection."""
        return defer.ensureDeferred(self._streaming_keep_alive())

    async def _streaming_keep_alive(self) -> None:
        port = await self.sim()
        self.assertEqual(await threads.deferToThread(streaming, port),
                         [(200, 8_000_000, True), (200, 3_000_000, True), (200, 0, True)])
