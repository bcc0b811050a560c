"""Streaming through a real broker process's [BALANCE_HTTP]: 1 GB down and 1 GB up (by default;
``PROTHEUS_STREAM_BYTES`` sets the size) with the broker's memory bounded.

The AppServer is a raw-socket backend in a thread of this process (``/download/<n>``: ``n`` bytes
of a repeated 64 KiB pattern; ``/upload``: reads the body and answers its sha256 and length); the
client is a blocking socket in another thread, hashing as it goes.  Halfway through each transfer
the reading side stops reading for ``STALL`` seconds (the sender keeps pushing: only backpressure
keeps the broker small).  While bytes flow, the broker's RSS is sampled with psutil; its growth
over the idle baseline must stay under ``RSS_BOUND``.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from typing import Any, Callable

import psutil
from twisted.internet import defer, reactor, task, threads

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import ProcessTestCase

MIB = 1024 * 1024
PATTERN = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(64 * 1024))
SIZE = int(os.environ.get("PROTHEUS_STREAM_BYTES", str(1024 * MIB)))
RSS_BOUND = 64 * MIB
#: Halfway through, the reading side stops reading this long: without backpressure the broker
#: would buffer everything the sender pushes meanwhile (hundreds of MB at these rates).
STALL = 1.5
_HTTP_LISTENING = re.compile(r"\[BALANCE_HTTP\] HTTP listening on 127\.0\.0\.1:(\d+)")


def send_pattern(sock: socket.socket, size: int) -> str:
    """Send *size* bytes of the pattern; their sha256."""
    digest = hashlib.sha256()
    view = memoryview(PATTERN)
    left = size
    while left:
        piece = view[:min(left, len(PATTERN))]
        sock.sendall(piece)
        digest.update(piece)
        left -= len(piece)
    return digest.hexdigest()


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The message head up to the blank line, and the bytes read past it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the head ended: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def content_length(head: bytes) -> int:
    match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    assert match is not None, head
    return int(match.group(1))


def read_body(sock: socket.socket, rest: bytes, length: int, stall: float = 0.0) -> tuple[str, int]:
    """Read a *length*-byte body (of which *rest* arrived with the head), pausing *stall* seconds
    halfway: (sha256, bytes read)."""
    digest = hashlib.sha256(rest)
    got = len(rest)
    stall_at = length // 2 if stall else length + 1
    buffer = bytearray(256 * 1024)
    view = memoryview(buffer)
    while got < length:
        n = sock.recv_into(buffer, min(len(buffer), length - got))
        if not n:
            break
        digest.update(view[:n])
        got += n
        if got >= stall_at:
            stall_at = length + 1
            time.sleep(stall)
    return digest.hexdigest(), got


class Backend:
    """The raw-socket AppServer: one thread accepting, one per connection, 127.0.0.1 only."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent: dict[int, str] = {}  # size -> sha256 of what a download sent
        self.running = True
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                head, rest = read_head(conn)
            except (ConnectionError, OSError):
                return
            target = head.split(b" ")[1]
            if target.startswith(b"/download/"):
                size = int(target.rsplit(b"/", 1)[1])
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n" % size)
                self.sent[size] = send_pattern(conn, size)
            elif target == b"/upload":
                digest, got = read_body(conn, rest, content_length(head), STALL)
                body = f"{digest} {got}".encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")

    def close(self) -> None:
        self.running = False
        self.listener.close()


def download(port: int, size: int) -> tuple[str, int, float]:
    """GET /download/<size> through the broker: (sha256, bytes, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /download/%d HTTP/1.1\r\nhost: stream\r\n\r\n" % size)
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200 "), head
        digest, got = read_body(sock, rest, content_length(head), STALL)
    return digest, got, time.monotonic() - started


def upload(port: int, size: int) -> tuple[str, str, float]:
    """POST /upload of *size* bytes through the broker: (sha256 sent, the AppServer's answer, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nhost: stream\r\ncontent-type: application/octet-stream\r\n"
                     b"content-length: %d\r\n\r\n" % size)
        sent = send_pattern(sock, size)
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = content_length(head)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return sent, rest.decode(), time.monotonic() - started


class RssSampler:
    """The broker's RSS every 50 ms while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.samples: list[int] = []
        self.loop = task.LoopingCall(self.sample)
        self.loop.clock = reactor

    def sample(self) -> None:
        try:
            self.samples.append(self.process.memory_info().rss)
        except psutil.Error:
            pass

    def __enter__(self) -> RssSampler:
        self.loop.start(0.05, now=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.stop()
        self.sample()


class StreamTests(ProcessTestCase):
    """1 GB each way through [BALANCE_HTTP] of a real broker, its memory bounded."""

    timeout = 300

    async def broker(self, backend_port: int) -> tuple[TwistdChild, int]:
        ini = ("[GENERAL]\nConsoleLog = 1\n"
               "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
               f"REMOTE_SERVER_01 = 127.0.0.1 {backend_port}\nMONITORING_TYPE = DISABLED\n"
               "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
               f"REMOTE_SERVER_01 = 127.0.0.1 {backend_port}\nMONITORING_TYPE = DISABLED\n")
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", self.write_ini(ini, "broker.ini")))
        await broker.listening()
        for _ in range(300):
            match = _HTTP_LISTENING.search(broker.text())
            if match:
                return broker, int(match.group(1))
            await task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"the broker did not report its [BALANCE_HTTP] port:\n{broker.text()}")

    async def transfer(self, pid: int, work: Callable[[], Any]) -> tuple[Any, int]:
        """Run *work* in a thread while sampling the broker's RSS: (its result, peak RSS)."""
        with RssSampler(pid) as sampler:
            result = await threads.deferToThread(work)
        self.assertGreaterEqual(len(sampler.samples), 2)
        return result, max(sampler.samples)

    @defer.inlineCallbacks
    def test_one_gigabyte_each_way_with_bounded_memory(self) -> Any:
        """A 1 GB download and a 1 GB upload through [BALANCE_HTTP], each with its reader stalled
        halfway: byte-exact (sha256, length), the broker's RSS growth under 64 MiB; MB/s and
        peak RSS printed."""
        yield defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        backend = Backend()
        self.addCleanup(backend.close)
        broker, port = await self.broker(backend.port)
        assert broker.pid is not None
        warm = await threads.deferToThread(download, port, 1 * MIB)  # warm up the code paths
        self.assertEqual(warm[1], MIB)
        process = psutil.Process(broker.pid)
        baseline = process.memory_info().rss
        cpu_before = sum(process.cpu_times()[:2])
        (digest, got, down_s), down_peak = await self.transfer(broker.pid, lambda: download(port, SIZE))
        self.assertEqual(got, SIZE)
        for _ in range(100):  # the backend's thread notes its digest once its last send returned,
            if SIZE in backend.sent:  # which may be after the client has read the last byte
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(digest, backend.sent[SIZE])
        (sent, answer, up_s), up_peak = await self.transfer(broker.pid, lambda: upload(port, SIZE))
        self.assertEqual(answer, f"{sent} {SIZE}")
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        self.assertGreater(cpu, 0.0)  # the bytes did cross the broker
        mb = SIZE / 1e6
        print(f"\n  stream through [BALANCE_HTTP], {SIZE / MIB:.0f} MiB each way: download {mb / down_s:.0f} MB/s "
              f"({down_s:.1f} s), upload {mb / up_s:.0f} MB/s ({up_s:.1f} s), each with a {STALL:g} s reader stall; "
              f"broker RSS baseline "
              f"{baseline / MIB:.1f} MiB, peak {down_peak / MIB:.1f} MiB down / {up_peak / MIB:.1f} MiB up; broker CPU {cpu:.1f} s "
              f"({cpu * 1e6 / (2 * SIZE / MIB):.0f} us per MiB)")
        self.assertLess(down_peak - baseline, RSS_BOUND)
        self.assertLess(up_peak - baseline, RSS_BOUND)
