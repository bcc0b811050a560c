"""The AppServer leg of the HTTP proxy: one h11 CLIENT connection per upstream socket, and a
per-server pool of idle keep-alive connections (bounded, with an idle timeout; reuse can be off)."""

from __future__ import annotations

from typing import Any, Callable, Protocol as TypingProtocol

import h11
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.sockets import send_now, tune

log = Logger()

#: h11's limit on a response head from an AppServer (bytes)
MAX_RESPONSE_HEAD = 64 * 1024

#: A read larger than this that starts with a response head is split after the head (see
#: UpstreamProtocol.feed); smaller ones go to h11 whole
HEAD_APART_ABOVE = 16 * 1024

_ContentLengthReader: Any
try:  # h11's reader of a Content-Length body (the same in h11 0.14 and 0.16)
    from h11._readers import ContentLengthReader
    _ContentLengthReader = ContentLengthReader
except ImportError:  # pragma: no cover - an h11 without it: every body byte goes through h11
    _ContentLengthReader = None


def body_left(conn: h11.Connection) -> int:
    """How many bytes of a Content-Length body *conn* still expects from its peer, when it holds
    none of them in its receive buffer; else 0.

    Such bytes may skip h11's receive buffer (which copies each byte in and out again: most of
    the CPU of a large download): :func:`take_body` hands them on as ``h11.Data`` and counts
    them off h11's reader, so h11 still frames the message (its ``EndOfMessage`` comes from
    :meth:`h11.Connection.next_event` once the count is reached, a short body is still an error
    at EOF).  Chunked and close-delimited bodies always go through h11."""
    if conn.their_state is not h11.SEND_BODY or _ContentLengthReader is None:
        return 0
    reader = getattr(conn, "_reader", None)
    if type(reader) is not _ContentLengthReader:
        return 0
    if _buffered(conn):
        return 0
    remaining = getattr(reader, "_remaining", 0)
    return remaining if type(remaining) is int and remaining > 0 else 0


def take_body(conn: h11.Connection, data: bytes, left: int) -> tuple[h11.Data, bytes]:
    """Split *data* (``left`` = :func:`body_left`, > 0) into the body bytes as an ``h11.Data``,
    counted off h11's reader, and what follows them (fed to h11 by the caller)."""
    if len(data) > left:
        body, rest = data[:left], data[left:]
    else:
        body, rest = data, b""
    conn._reader._remaining -= len(body)  # type: ignore[union-attr]
    if conn.their_role is h11.CLIENT:  # what h11 does on a client's Data: it sends, so waits no more
        conn.client_is_waiting_for_100_continue = False
    return h11.Data(data=body), rest


def _buffered(conn: h11.Connection) -> int:
    """Bytes h11 holds unparsed (-1 if this h11 does not say)."""
    buffered = getattr(conn, "_receive_buffer", None)
    return len(buffered) if buffered is not None else -1


class Outbox:
    """Bytes for one transport, gathered while a batch of events is handled and sent in one go:
    at once when the socket takes them (:func:`~protheus_broker.sockets.send_now`), else queued."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.eager = tune(transport)
        self.parts: list[bytes] = []

    def add(self, data: bytes) -> None:
        if data:
            self.parts.append(data)

    def flush(self) -> None:
        if not self.parts:
            return
        data = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.parts.clear()
        self.write(data)

    def write(self, data: bytes) -> None:
        """Send *data* now, after anything gathered."""
        if self.parts:
            self.flush()
        if self.eager:
            send_now(self.transport, data)
        else:
            self.transport.write(data)


@implementer(IPushProducer)
class Valve:
    """Pauses a transport's reading while any reason holds it (dispatch pending, the other leg's
    write buffer full, h11 waiting for the response...): several owners share one transport.
    Registered as the streaming producer of the other leg's transport, its pause/resume are
    that leg's backpressure."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.reasons: set[str] = set()

    def hold(self, reason: str) -> None:
        if not self.reasons and self.transport is not None:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self.reasons:
            return
        self.reasons.discard(reason)
        if not self.reasons and self.transport is not None:
            self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.hold("peer-full")

    def resumeProducing(self) -> None:
        self.release("peer-full")

    def stopProducing(self) -> None:
        """The peer leg is gone: its owner closes this one."""


class UpstreamListener(TypingProtocol):
    """What an upstream connection reports to the client exchange it carries."""

    def upstream_event(self, upstream: "UpstreamProtocol", event: Any) -> None: ...

    def upstream_garbage(self, upstream: "UpstreamProtocol", reason: str) -> None: ...

    def upstream_lost(self, upstream: "UpstreamProtocol", reason: Failure) -> None: ...

    def flush(self) -> None: ...


@implementer(IHalfCloseableProtocol)
class UpstreamProtocol(Protocol):
    """One connection to an AppServer speaking HTTP/1.1 (h11 CLIENT), one exchange at a time;
    after a ``101`` it relays raw bytes to :attr:`relay_to`."""

    transport: Any

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.listener: UpstreamListener | None = None
        self.reused = False  # came from the idle pool
        self.closed = False
        self.relay_to: Any = None  # the client transport once switched (WebSocket)
        self.valve: Valve | None = None
        self.out: Outbox | None = None
        self.on_lost: Callable[["UpstreamProtocol"], None] | None = None  # the pool forgets it
        self.idle_timer: Any = None
        self.idle_until: float | None = None  # idle in the pool until then (UpstreamPool)
        self.write_closed = False

    def connectionMade(self) -> None:
        self.valve = Valve(self.transport)
        self.out = Outbox(self.transport)

    def send(self, event: Any) -> None:
        """Gather *event* for the AppServer (sent at :meth:`flush`)."""
        data = self.conn.send(event)
        if data and not self.closed and self.out is not None:
            self.out.add(data)

    def flush(self) -> None:
        if self.out is not None and not self.closed:
            self.out.flush()

    def dataReceived(self, data: bytes) -> None:
        if self.relay_to is not None:
            self.relay_to.write(data)
            return
        listener = self.listener
        if listener is None:  # idle: an AppServer talking out of turn is not reusable
            self.transport.loseConnection()
            return
        self.feed(data, listener)
        listener.flush()

    def feed(self, data: bytes, listener: UpstreamListener) -> None:
        """Hand *data* to h11 and its events to the listener.  Body bytes of a Content-Length
        response skip h11's receive buffer (:func:`body_left`); for that, a large read that
        starts with a response head gives h11 the head alone first (up to its blank line: h11
        finds the head's end there or before), then the body bytes after it go straight on."""
        conn = self.conn
        while data:
            if self.relay_to is not None:  # switched (101): the rest is the relay's
                self.relay_to.write(data)
                return
            if self.listener is not listener or self.closed:  # the exchange is over: h11 keeps
                conn.receive_data(data)  # what came after it, as it always did
                return
            left = body_left(conn)
            if left:
                event, data = take_body(conn, data, left)
                listener.upstream_event(self, event)
                if len(event.data) == left:
                    self.pump()  # the body is whole: h11's EndOfMessage
                continue
            if len(data) > HEAD_APART_ABOVE and conn.their_state is h11.SEND_RESPONSE and not _buffered(conn):
                end = data.find(b"\r\n\r\n", 0, MAX_RESPONSE_HEAD)
                if end >= 0:
                    conn.receive_data(data[:end + 4])
                    data = data[end + 4:]
                    self.pump()
                    continue
            conn.receive_data(data)
            self.pump()
            return

    def pump(self) -> None:
        """Hand the parsed response events to the listener."""
        while self.listener is not None and self.relay_to is None and not self.closed:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                listener = self.listener
                self.listener = None
                self.transport.abortConnection()
                listener.upstream_garbage(self, str(exc))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            self.listener.upstream_event(self, event)

    def readConnectionLost(self) -> None:
        if self.relay_to is not None:
            if hasattr(self.relay_to, "loseWriteConnection"):
                self.relay_to.loseWriteConnection()
            if self.write_closed:
                self.transport.loseConnection()
            return
        listener = self.listener
        if listener is not None and self.conn.their_state is h11.SEND_BODY:
            self.conn.receive_data(b"")  # a close-delimited body ends here (others: an error)
            self.pump()
            listener.flush()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_closed = True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        if self.on_lost is not None:
            self.on_lost(self)
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.upstream_lost(self, reason)
        elif self.relay_to is not None:
            self.relay_to.loseConnection()

    @property
    def reusable(self) -> bool:
        """Both sides done with a keep-alive exchange."""
        return (not self.closed and self.relay_to is None and self.conn.our_state is h11.DONE
                and self.conn.their_state is h11.DONE)


#: Opens a new connection to a server: (server_id, host, port) -> Deferred[UpstreamProtocol]
Connector = Callable[[str, str, int], "Deferred[UpstreamProtocol]"]


class UpstreamPool:
    """Idle keep-alive connections to each server: at most *max_idle* per server, each closed
    after *idle_timeout* seconds unused; *reuse* False closes every connection after its exchange
    (for AppServers that block on reused connections)."""

    def __init__(self, clock: Any, connector: Connector, max_idle: int = 16,
                 idle_timeout: float = 30.0, reuse: bool = True) -> None:
        self.clock = clock
        self.connector = connector
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.reuse = reuse
        self.idle: dict[str, list[UpstreamProtocol]] = {}

    def get(self, server_id: str, host: str, port: int, fresh: bool = False) -> "Deferred[UpstreamProtocol]":
        """An idle connection to the server (newest first), else a new one (always new if *fresh*)."""
        idle = self.idle.get(server_id, [])
        while idle and not fresh:
            upstream = idle.pop()
            upstream.idle_until = None  # its timer, if any, lapses (or serves its next idle spell)
            if not upstream.closed:
                upstream.reused = True
                upstream.on_lost = None
                return succeed(upstream)
        return self.connector(server_id, host, port)

    def put(self, upstream: UpstreamProtocol) -> None:
        """An exchange ended on *upstream*: keep it for the next request, or close it."""
        upstream.listener = None
        idle = self.idle.setdefault(upstream.server_id, [])
        if not self.reuse or not upstream.reusable or len(idle) >= self.max_idle:
            upstream.transport.loseConnection()
            return
        upstream.conn.start_next_cycle()
        idle.append(upstream)
        upstream.on_lost = self._forget
        if self.idle_timeout > 0:
            # one timer per connection, by deadline: one still due before this one is kept (it
            # re-arms for the rest), so a busy connection makes no timer calls per exchange
            upstream.idle_until = self.clock.seconds() + self.idle_timeout
            timer = upstream.idle_timer
            if timer is None or not timer.active() or timer.getTime() > upstream.idle_until:
                if timer is not None and timer.active():
                    timer.cancel()
                upstream.idle_timer = self.clock.callLater(self.idle_timeout, self._idle_due, upstream)

    def _idle_due(self, upstream: UpstreamProtocol) -> None:
        """*upstream*'s idle timer: closes it if it has been idle IDLE_TIMEOUT, else re-arms."""
        upstream.idle_timer = None
        until = upstream.idle_until
        if until is None:
            return  # in use (taken from the pool since)
        left = until - self.clock.seconds()
        if left > 0:
            upstream.idle_timer = self.clock.callLater(left, self._idle_due, upstream)
            return
        upstream.transport.loseConnection()

    def _forget(self, upstream: UpstreamProtocol) -> None:
        idle = self.idle.get(upstream.server_id, [])
        if upstream in idle:
            idle.remove(upstream)

    def idle_count(self, server_id: str | None = None) -> int:
        if server_id is not None:
            return len(self.idle.get(server_id, []))
        return sum(len(v) for v in self.idle.values())

    def close_all(self) -> None:
        for idle in list(self.idle.values()):
            for upstream in list(idle):
                upstream.transport.loseConnection()
        self.idle.clear()


def tcp_connector(reactor: Any, timeout: float) -> Connector:
    """Connects with a HostnameEndpoint (names and addresses) within *timeout* seconds."""
    def connect(server_id: str, host: str, port: int) -> "Deferred[UpstreamProtocol]":
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        return connectProtocol(endpoint, UpstreamProtocol(server_id))  # type: ignore[no-any-return]
    return connect
