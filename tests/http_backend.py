"""A tiny h11 AppServer and an h11 test client for the HTTP proxy tests (127.0.0.1 only)."""

from __future__ import annotations

import json
from typing import Any

import h11
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

CHUNK = 64 * 1024


@implementer(IPushProducer)
class Backend(Protocol):
    """Routes: /id, /headers (JSON of what arrived), /echo (the body back), /count (the body's
    length), /big/<n> (n bytes, streamed with backpressure), /trailers, /ws (101 then raw echo),
    /cut (a Content-Length it does not keep, then close), /garbage, /close (Connection: close)."""

    factory: "BackendFactory"
    transport: Any

    def connectionMade(self) -> None:
        self.conn = h11.Connection(h11.SERVER)
        self.factory.connections.append(self)
        self.raw = False
        self.paused = False
        self.left = 0
        self.body = b""
        self.count = 0
        self.request: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.raw:
            self.transport.write(data)
            return
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                self.transport.loseConnection()
                return
            if event in (h11.NEED_DATA, h11.PAUSED):
                return
            if isinstance(event, h11.Request):
                self.request = event
                if self.factory.drop_next:  # a keep-alive connection closed as a request arrives
                    self.factory.drop_next = False
                    self.transport.loseConnection()
                    return
                self.body, self.count = b"", 0
                self.factory.requests.append(event)
                if self.conn.they_are_waiting_for_100_continue:
                    self.send(h11.InformationalResponse(status_code=100, headers=[]))
                if event.target == b"/ws":
                    self.send(h11.InformationalResponse(status_code=101, headers=[
                        (b"upgrade", b"websocket"), (b"connection", b"Upgrade")]))
                    self.raw = True
                    rest = self.conn.trailing_data[0]
                    if rest:
                        self.transport.write(rest)
                    return
            elif isinstance(event, h11.Data):
                self.count += len(event.data)
                if self.request.target == b"/echo":
                    self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.factory.trailers.append(list(event.headers))
                self.respond(self.request)
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                elif self.conn.our_state is h11.MUST_CLOSE:
                    self.transport.loseConnection()
                    return
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.loseConnection()
                return

    def send(self, event: Any) -> None:
        self.transport.write(self.conn.send(event))

    def reply(self, body: bytes, headers: list[tuple[bytes, bytes]] | None = None, status: int = 200) -> None:
        self.send(h11.Response(status_code=status, headers=[(b"content-length", str(len(body)).encode())]
                               + (headers or [])))
        self.send(h11.Data(data=body))
        self.send(h11.EndOfMessage())

    def respond(self, request: h11.Request) -> None:
        target = request.target
        if target == b"/id":
            self.reply(self.factory.name.encode())
        elif target == b"/headers":
            self.reply(json.dumps([[n.decode(), v.decode()] for n, v in request.headers]).encode())
        elif target == b"/echo":
            self.reply(self.body)
        elif target == b"/count":
            self.reply(str(self.count).encode())
        elif target.startswith(b"/big/"):
            self.left = int(target[5:])
            self.send(h11.Response(status_code=200, headers=[(b"content-length", str(self.left).encode())]))
            if request.method == b"HEAD":
                self.left = 0
                self.send(h11.EndOfMessage())
                return
            self.transport.registerProducer(self, True)
            self.produce()
        elif target == b"/trailers":
            self.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
            self.send(h11.Data(data=b"part1-"))
            self.send(h11.Data(data=b"part2"))
            self.send(h11.EndOfMessage(headers=[(b"x-checksum", b"abc")]))
        elif target == b"/cut":
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
            self.transport.loseConnection()
        elif target == b"/garbage":
            self.transport.write(b"SPLAT\x00\x01 nonsense\r\n\r\n")
            self.transport.loseConnection()
        elif target == b"/close":
            self.reply(b"bye", [(b"connection", b"close")])
        else:
            self.reply(b"not found", status=404)

    def produce(self) -> None:
        while self.left and not self.paused:
            n = min(CHUNK, self.left)
            self.left -= n
            self.send(h11.Data(data=b"x" * n))
        if not self.left and not self.paused:
            self.transport.unregisterProducer()
            self.send(h11.EndOfMessage())
            self.conn.start_next_cycle()

    def pauseProducing(self) -> None:
        self.paused = True
        self.factory.pauses += 1

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            reactor.callLater(0, self.produce)  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.left = 0


class BackendFactory(Factory):
    protocol = Backend

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections: list[Backend] = []
        self.requests: list[h11.Request] = []
        self.trailers: list[list[tuple[bytes, bytes]]] = []
        self.drop_next = False
        self.pauses = 0  # times a /big/ download was paused by backpressure


class Client(Protocol):
    """Sends raw bytes, parses the answers with h11; :attr:`done` fires when the connection closes
    or *expect* responses are complete."""

    transport: Any

    def __init__(self, expect: int = 1) -> None:
        self.conn = h11.Connection(h11.CLIENT)
        self.expect = expect
        self.responses: list[dict[str, Any]] = []
        self.informational: list[Any] = []
        self.raw = b""
        self.done: defer.Deferred[Client] = defer.Deferred()
        self.lost = False
        self.gone: defer.Deferred[None] = defer.Deferred()  # fires at connectionLost
        self.complete = 0
        self.queue: list[list[Any]] = []

    def send_request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                     body: bytes | None = None, end: bool = True) -> None:
        headers = [(b"host", b"example")] + (headers or [])
        if body is not None and not any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in headers):
            headers.append((b"content-length", str(len(body)).encode()))
        events: list[Any] = [h11.Request(method=method, target=target, headers=headers)]
        if body:
            events.append(h11.Data(data=body))
        if end:
            events.append(h11.EndOfMessage())
        if self.conn.our_state is h11.IDLE and not self.queue:
            for event in events:
                self.transport.write(self.conn.send(event))
            return
        writer = h11.Connection(h11.CLIENT)  # pipelined: serialised apart, replayed into the parser later
        self.transport.write(b"".join(writer.send(event) or b"" for event in events))
        self.queue.append(events)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self.conn.receive_data(data)
        self.pump()

    def pump(self) -> None:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                return
            if event in (h11.NEED_DATA, h11.PAUSED):
                return
            if isinstance(event, h11.InformationalResponse):
                self.informational.append(event)
            elif isinstance(event, h11.Response):
                self.responses.append({"status": event.status_code, "headers": list(event.headers),
                                       "body": b"", "complete": False, "trailers": []})
            elif isinstance(event, h11.Data):
                self.responses[-1]["body"] += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.responses[-1]["complete"] = True
                self.responses[-1]["trailers"] = list(event.headers)
                self.complete += 1
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                    if self.queue:
                        for queued in self.queue.pop(0):
                            self.conn.send(queued)
                if self.complete >= self.expect and not self.done.called:
                    self.done.callback(self)
            elif isinstance(event, h11.ConnectionClosed):
                return

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:
        self.lost = True
        self.gone.callback(None)
        if not self.done.called:
            self.done.callback(self)


def header(response: dict[str, Any], name: bytes) -> bytes | None:
    for n, v in response["headers"]:
        if n == name:
            return v  # type: ignore[no-any-return]
    return None


def close(client: Client) -> defer.Deferred[None]:
    """Close *client* and wait until it is closed (TLS needs a round trip)."""
    if not client.lost:
        client.transport.loseConnection()
    return client.gone


async def connect(port: int, protocol: Protocol) -> Any:
    return await ClientCreator(reactor, lambda: protocol).connectTCP("127.0.0.1", port)
