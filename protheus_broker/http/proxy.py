"""The HTTP/1.1 reverse proxy: a raw Twisted ``Protocol`` with h11 on both legs.

The client leg is an ``h11.Connection(SERVER)`` per connection (keep-alive; pipelined requests
wait their turn: reading pauses while one is in flight).  Per request an :class:`IDispatcher`
(the unit's balancing and affinity) names the servers to try; the request goes out on an idle
upstream connection of :class:`~protheus_broker.http.upstream.UpstreamPool` or a new one, and
bodies stream both ways with producer backpressure (each leg's transport is the producer of the
other's).  A ``101`` turns the pair into a raw byte relay (WebSocket).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

import h11
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from protheus_broker.desktop.pending import PendingLimits, PendingToken, client_host
from protheus_broker.http.upstream import Outbox, UpstreamPool, UpstreamProtocol, Valve, body_left, take_body
from protheus_broker.stats import ISessionStats, SessionStats

log = Logger()

Headers = list[tuple[bytes, bytes]]

#: Hop-by-hop headers (RFC 9110 7.6.1) never forwarded; Transfer-Encoding and Content-Length
#: are the message framing, which h11 re-writes on each leg.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                        b"proxy-connection", b"te", b"trailer", b"upgrade"})
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_FRAMING = frozenset({b"content-length", b"transfer-encoding", "content-length", "transfer-encoding"})

_H11Headers: Any
_h11_normalize: Any
try:  # h11's header list and its normalizer (the same in h11 0.14 and 0.16): heads built from
    # already-parsed headers skip the per-header regexes; without them every head is validated
    from h11._headers import Headers as _Headers, normalize_and_validate as _normalize
    _H11Headers, _h11_normalize = _Headers, _normalize
except ImportError:  # pragma: no cover
    _H11Headers = _h11_normalize = None


def pairs_of(headers: Any) -> Headers:
    """``list(headers)`` of an h11 header list: its (lower-case name, value) pairs (read off its
    items at once: the generic sequence iteration costs a call per header)."""
    items = getattr(headers, "_full_items", None)
    if type(items) is list:
        return [(name, value) for _, name, value in items]
    return list(headers)


def _valid_pairs(pairs: Iterable[tuple[bytes, bytes]]) -> bool:
    """h11 would send these header pairs as they are."""
    if _h11_normalize is None:
        return False
    try:
        _h11_normalize(list(pairs))
    except h11.LocalProtocolError:
        return False
    return True


class NoBackend(Exception):
    """No server can take the request: answered 503 with the reason (and Retry-After)."""

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class RequestInfo:
    """What a dispatcher sees of a request."""

    method: bytes
    target: bytes
    headers: Headers
    client: str
    tls: bool = False


@dataclass
class Choice:
    """A dispatcher's answer: the servers to try in order (each has ``server_id``, ``host``,
    ``port``) and whatever the dispatcher keeps for the request."""

    candidates: list[Any]
    state: dict[str, Any] = field(default_factory=dict)


class IDispatcher(Interface):
    """Where the proxy asks which server takes a request and reports what happened."""

    strip_request_headers = Attribute("Header names (lower-case bytes) never sent upstream.")

    def choose(request: RequestInfo) -> "Deferred[Choice]":
        """The servers for *request*, best first; fails with :class:`NoBackend`."""

    def opening(choice: Choice, backend: Any) -> None:
        """The request is about to be sent to *backend* (count it in flight)."""

    def connect_failed(choice: Choice, backend: Any, reason: str) -> None:
        """No connection to *backend* (before any byte of the request): the next one is tried
        (:meth:`released` follows)."""

    def answered(choice: Choice, backend: Any) -> None:
        """*backend* sent the response head."""

    def released(choice: Choice, backend: Any, outcome: str) -> None:
        """The request on *backend* ended (once per :meth:`opening`): "ok", "failed" (502, cut),
        "client-gone", "connect-failed" or "retry"."""

    def again(choice: Choice) -> "Deferred[Choice] | None":
        """More servers once every candidate of *choice* failed to connect, or None (then 503)."""

    def abandoned(choice: Choice) -> None:
        """The request is over (answered, failed or its client gone): give back anything
        :meth:`choose` took for it (a queue slot)."""

    def request_headers(choice: Choice, headers: Headers) -> Headers:
        """The headers to send upstream (e.g. the affinity cookie removed)."""

    def response_headers(choice: Choice, backend: Any) -> Headers:
        """Headers to add to the response (e.g. Set-Cookie)."""


@implementer(IDispatcher)
class DispatcherWrapper:
    """An :class:`IDispatcher` around another (*inner*): every call goes inside unchanged.  The
    unit's gates (dependencies, scale to zero, licenses) subclass it and override what they add
    (usually :meth:`choose`); other attributes (``forward_cookie``, ``slots``, ...) are read from
    the dispatcher inside."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def strip_request_headers(self) -> frozenset[bytes]:
        return self.inner.strip_request_headers  # type: ignore[no-any-return]

    def choose(self, request: RequestInfo) -> "Deferred[Choice]":
        return self.inner.choose(request)  # type: ignore[no-any-return]

    def opening(self, choice: Choice, backend: Any) -> None:
        self.inner.opening(choice, backend)

    def connect_failed(self, choice: Choice, backend: Any, reason: str) -> None:
        self.inner.connect_failed(choice, backend, reason)

    def answered(self, choice: Choice, backend: Any) -> None:
        self.inner.answered(choice, backend)

    def released(self, choice: Choice, backend: Any, outcome: str) -> None:
        self.inner.released(choice, backend, outcome)

    def again(self, choice: Choice) -> "Deferred[Choice] | None":
        return self.inner.again(choice)  # type: ignore[no-any-return]

    def abandoned(self, choice: Choice) -> None:
        self.inner.abandoned(choice)

    def request_headers(self, choice: Choice, headers: Headers) -> Headers:
        return self.inner.request_headers(choice, headers)  # type: ignore[no-any-return]

    def response_headers(self, choice: Choice, backend: Any) -> Headers:
        return self.inner.response_headers(choice, backend)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


@dataclass
class ProxySettings:
    """The proxy's limits and options (from the unit's section)."""

    header_timeout: float = 10.0  # HEADER_TIMEOUT: a request head must arrive within (408)
    keepalive_timeout: float = 60.0  # KEEPALIVE_TIMEOUT: an idle client connection closes after
    max_header_bytes: int = 64 * 1024  # MAX_HEADER_BYTES: a larger head gets 431
    max_headers: int = 100  # MAX_HEADERS: more header lines get 431
    forwarded_headers: bool = True  # FORWARDED_HEADERS: X-Forwarded-For/-Proto and Forwarded
    tls: bool = False  # the client leg is TLS (X-Forwarded-Proto https)
    access_log: bool = True  # ACCESS_LOG: one structured event per request
    server_timeout: float = 300.0  # SERVER_TIMEOUT: no byte either way for this long -> 504 or close
    max_connections: int = 10000  # MAX_SESSIONS: open client connections (0 = no cap)


def filter_headers(headers: Iterable[tuple[bytes, bytes]], keep_upgrade: bool,
                   strip: Iterable[bytes] = ()) -> Headers:
    """*headers* without the hop-by-hop ones (and those named in Connection); with
    *keep_upgrade* the Upgrade header and ``Connection: Upgrade`` stay (WebSocket)."""
    headers = headers if isinstance(headers, list) else list(headers)
    named: frozenset[bytes] | set[bytes] = HOP_BY_HOP
    extra = [value for name, value in headers if name == b"connection"]
    if extra or strip or keep_upgrade:
        named = set(HOP_BY_HOP) | set(strip)
        for value in extra:
            named.update(token.strip().lower() for token in value.split(b",") if token.strip())
        named.discard(b"transfer-encoding")
        named.discard(b"content-length")
        if keep_upgrade:
            named.discard(b"upgrade")
    out = [pair for pair in headers if pair[0] not in named]
    if keep_upgrade:
        out.append((b"connection", b"Upgrade"))
    return out


def h11_headers(pairs: Headers, known: set[tuple[bytes, bytes]] | frozenset[tuple[bytes, bytes]]) -> Any:
    """What ``h11.Request(headers=pairs)`` (or Response) would hold, without validating again
    the pairs in *known*: those h11's parser produced (lower-case names, normalized framing) or
    that were validated before.  Any other pair is validated by h11 as usual (a bad one raises
    ``h11.LocalProtocolError``); a new framing header makes h11 normalize the whole list.  The
    bytes h11 then writes are the same either way (tests/test_http_fastpath.py)."""
    if _H11Headers is None:
        return pairs
    items: list[tuple[bytes, bytes, bytes]] = []
    framing = False
    for pair in pairs:
        name = pair[0]
        if type(pair) is tuple and pair in known:
            if name in _FRAMING:
                if framing:
                    return pairs  # two framing headers: h11 checks them against each other
                framing = True
            items.append((name, name, pair[1]))
            continue
        if isinstance(name, (bytes, str)) and name.lower() in _FRAMING:  # type: ignore[operator]
            return pairs
        items.extend(_h11_normalize([pair])._full_items)
    return _H11Headers(items)


def forwarded_for(client: str) -> str:
    """The Forwarded ``for=`` value (IPv6 quoted in brackets)."""
    return f'"[{client}]"' if ":" in client else client


def is_websocket(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A WebSocket upgrade request (``Upgrade: websocket``)."""
    return any(n == b"upgrade" and b"websocket" in v.lower() for n, v in headers)


def _chunked(conn: h11.Connection) -> bool:
    """True when *conn*'s outgoing body is chunked (only then can trailers go out)."""
    return type(getattr(conn, "_writer", None)).__name__ == "ChunkedWriter"


@implementer(IHalfCloseableProtocol)
class HttpProxy(Protocol):
    """One client connection: requests in turn, each to the server its dispatcher picks."""

    factory: "HttpProxyFactory"
    transport: Any

    def __init__(self) -> None:
        self.conn = h11.Connection(h11.SERVER)
        self.valve: Valve | None = None
        self.out: Outbox | None = None
        self.client = "?"
        self.pending: PendingToken | None = None
        self.timer: Any = None
        self.stall_timer: Any = None  # SERVER_TIMEOUT while a request is at a server
        self.watching = False  # a request is at a server (SERVER_TIMEOUT applies)
        self.deadline: float | None = None  # HEADER_TIMEOUT or KEEPALIVE_TIMEOUT, for self.timer
        self.counted = False  # in factory.connections
        self.closed = False
        self.closing = False  # our close has begun: nothing more is read
        self.relay: Any = None  # the upstream transport once switched (WebSocket)
        self.write_closed = False
        self.forwarded_cache: tuple[tuple[bytes, bytes], ...] | None = None
        self.forwarded_valid = False
        self.pumping = False  # in _pump's loop
        self._reset()

    def _reset(self) -> None:
        self.request: RequestInfo | None = None
        self.choice: Choice | None = None
        self.backend: Any = None
        self.upstream: UpstreamProtocol | None = None
        self.flowing = False  # the request body may go upstream
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.body_sent = False
        self.retried = False
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = 0.0
        self.queue_wait = 0.0
        self.cycle_bytes = 0
        self.websocket = False
        self.dispatching: Deferred[Choice] | None = None
        self.opened: Any = None  # the backend counted by dispatcher.opening, until released
        self.last_activity = 0.0

    # --- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=factory.settings.max_header_bytes)
        self.valve = Valve(self.transport)
        self.out = Outbox(self.transport)
        peer = self.transport.getPeer()
        self.client = str(getattr(peer, "host", "") or "?")
        self.pending_key = client_host(peer)
        cap = factory.settings.max_connections
        if cap and factory.connections >= cap:
            factory.stats.record("sessions_refused")
            log.warn("http: refused {client}: MAX_SESSIONS={cap} connections open", client=self.client,
                     cap=cap, pool=factory.name)
            self.transport.abortConnection()
            return
        over = factory.pending.over(self.pending_key)
        if over is not None:
            factory.stats.record("pending_refused")
            log.warn("http: refused {client}: {why}", client=self.client, why=over, pool=factory.name)
            self.transport.abortConnection()
            return
        self.pending = factory.pending.take(self.pending_key)
        factory.connections += 1
        self.counted = True
        self._arm(factory.settings.keepalive_timeout)

    def _arm(self, seconds: float) -> None:
        """HEADER_TIMEOUT or KEEPALIVE_TIMEOUT from now.  One timer serves both, by deadline: a
        timer due before the new deadline is kept (it re-arms for the rest when it fires), so a
        busy keep-alive connection makes no timer calls per request."""
        if seconds <= 0:
            self.deadline = None
            return
        clock = self.factory.clock
        self.deadline = clock.seconds() + seconds
        timer = self.timer
        if timer is not None and timer.active():
            if timer.getTime() <= self.deadline:
                return
            timer.cancel()
        self.timer = clock.callLater(seconds, self._timed_out)

    def _disarm(self, cancel: bool = False) -> None:
        self.deadline = None
        if cancel and self.timer is not None and self.timer.active():
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.deadline is None:
            return  # disarmed meanwhile
        left = self.deadline - self.factory.clock.seconds()
        if left > 0:  # armed again later meanwhile
            self.timer = self.factory.clock.callLater(left, self._timed_out)
            return
        self.deadline = None
        if self.cycle_bytes:
            self._error(408, "the request head did not arrive in time")
        else:
            self._close()  # an idle keep-alive connection

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.write(data)
            return
        if self.closing:
            return  # answered and closing: the rest is not read
        starting = self.request is None and not self.cycle_bytes  # a request head begins
        self.cycle_bytes += len(data)
        if self.watching:
            self.last_activity = self.factory.clock.seconds()
        if self.flowing and not self.closed and len(data) <= body_left(self.conn):
            # all of it is request body h11 expects (Content-Length): straight on, past h11's
            # receive buffer; once the count is reached h11 says EndOfMessage (see body_left)
            event, _ = take_body(self.conn, data, len(data))
            self._request_body(event.data)
            if not body_left(self.conn):
                self._pump()
        else:
            self.conn.receive_data(data)
            self._pump()
        if starting and self.request is None and self.cycle_bytes and not self.closing and not self.closed:
            self._arm(self.factory.settings.header_timeout)  # begun, not whole: HEADER_TIMEOUT
        if self.upstream is not None:
            self.upstream.flush()

    def readConnectionLost(self) -> None:
        if self.relay is not None:
            if hasattr(self.relay, "loseWriteConnection"):
                self.relay.loseWriteConnection()
            if self.write_closed:
                self._close()
            return
        self.conn.receive_data(b"")
        self._pump()
        if self.upstream is not None:
            self.upstream.flush()

    def writeConnectionLost(self) -> None:
        self.write_closed = True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        if self.counted:
            self.counted = False
            self.factory.connections -= 1
        self._disarm(cancel=True)
        self._unwatch(cancel=True)
        self._release_pending()
        if self.dispatching is not None:
            self.dispatching.cancel()
        if self.relay is not None:
            self.relay.loseConnection()
            self._end("client-gone" if not self.response_done else "ok")
        elif self.request is not None and not self.response_done:
            if self.upstream is not None:
                self.upstream.listener = None
                self.upstream.transport.abortConnection()
            self._end("client-gone")

    def _release_pending(self) -> None:
        if self.pending is not None:
            self.pending.release()
            self.pending = None

    # --- the client's events -----------------------------------------------------------------

    def _pump(self) -> None:
        if self.pumping:
            return  # called back from within the loop below, which goes on
        self.pumping = True
        try:
            self._pump_events()
        finally:
            self.pumping = False

    def _pump_events(self) -> None:
        while not self.closed and not self.closing and self.relay is None:
            if self.request is not None and not self.flowing:
                return  # waiting for a server: h11 keeps the bytes, the transport is paused
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._bad_request(exc)
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                assert self.valve is not None
                self.valve.hold("h11")
                return
            if isinstance(event, h11.Request):
                self._request(event)
            elif isinstance(event, h11.Data):
                self._request_body(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._request_end(event)
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _bad_request(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint if exc.error_status_hint in (400, 413, 414, 431) else 400
        self.factory.stats.record("http_bad_requests")
        log.info("http: bad request from {client}: {status} {why}", client=self.client,
                 status=status, why=str(exc), pool=self.factory.name)
        if self.request is not None:  # a bad body mid-stream
            if self.upstream is not None:
                self._detach(close=True)
            if self.response_started:
                self.transport.abortConnection()
            else:
                self._error(status, f"malformed request: {exc}")
            self._end("failed")
            return
        self._error(status, f"malformed request: {exc}")

    def _request(self, event: h11.Request) -> None:
        factory = self.factory
        self._disarm()
        self._release_pending()
        self.started = factory.clock.seconds()
        headers = pairs_of(event.headers)
        self.request = RequestInfo(event.method, event.target, headers, self.client, factory.settings.tls)
        if len(headers) > factory.settings.max_headers:
            self._refuse(431, f"more than {factory.settings.max_headers} header lines")
            return
        size = len(event.target) + 4 * len(headers)
        framing = 0
        for name, value in headers:
            size += len(name) + len(value)
            if name == b"transfer-encoding" or name == b"content-length":
                framing |= 1 if name == b"content-length" else 2
        if size > factory.settings.max_header_bytes:
            self._refuse(431, f"request head above {factory.settings.max_header_bytes} bytes")
            return
        if framing == 3:
            self._refuse(400, "both Content-Length and Transfer-Encoding")  # a smuggling shape (RFC 9112 6.3)
            return
        self.websocket = is_websocket(headers)
        factory.stats.record("http_requests")
        factory.stats.record("http_in_flight")
        request = self.request
        dispatching = self.dispatching = factory.dispatcher.choose(request)
        self._then(dispatching, self._chosen, self._not_chosen)
        if self.request is request and not self.flowing and not self.closing and not self.closed:
            assert self.valve is not None  # not sent on at once: h11 keeps the bytes, reading pauses
            self.valve.hold("dispatch")

    def _then(self, d: "Deferred[Any]", callback: Any, errback: Any, *errback_args: Any) -> None:
        """``d.addCallbacks(callback, errback)`` then ``addErrback(self._bug)``; a Deferred that
        already has a plain result (``succeed``: a dispatcher's answer, an idle connection) is
        handled at once without the callback chain's cost, with the same outcome."""
        if d.called and not d.paused and not isinstance(d.result, (Failure, Deferred)):
            try:
                callback(d.result)
            except BaseException:
                self._bug(Failure())
            return
        d.addCallbacks(callback, errback, errbackArgs=errback_args)
        d.addErrback(self._bug)

    def _refuse(self, status: int, why: str) -> None:
        """A request refused before it goes anywhere: one log line, the status, close."""
        self.factory.stats.record("http_bad_requests")
        log.info("http: bad request from {client}: {status} {why}", client=self.client, status=status,
                 why=why, pool=self.factory.name)
        self._error(status, why)

    def _bug(self, failure: Failure) -> None:
        log.failure("http: proxy error", failure, pool=self.factory.name)
        if not self.closed:
            self.transport.abortConnection()

    def _not_chosen(self, failure: Failure) -> None:
        self.dispatching = None
        if failure.check(NoBackend):
            error: Any = failure.value
            self._error(503, error.reason, retry_after=error.retry_after)
            self._end(None)
            return None
        if failure.check(Exception) and self.closed:
            return None  # cancelled: the client left
        return failure  # type: ignore[return-value]

    def _chosen(self, choice: Choice) -> None:
        self.dispatching = None
        self.choice = choice
        self.queue_wait = self.factory.clock.seconds() - self.started
        if self.closed or self.started < 0:  # the client left meanwhile
            self.factory.dispatcher.abandoned(choice)
            return
        self._try_next()

    def _try_next(self, fresh: bool = False) -> None:
        assert self.choice is not None
        if not self.choice.candidates:
            more = self.factory.dispatcher.again(self.choice)
            if more is None:
                self._error(503, "no AppServer could be reached", retry_after=1)
                self._end(None)
                return
            self.dispatching = more
            self._then(more, self._more, self._not_chosen)
            return
        backend = self.backend = self.choice.candidates.pop(0)
        self.factory.dispatcher.opening(self.choice, backend)
        self.opened = backend
        d = self.factory.upstreams.get(backend.server_id, backend.host, backend.port, fresh=fresh)
        self._then(d, self._attached, self._connect_failed, backend)

    def _more(self, choice: Choice) -> None:
        self.dispatching = None
        assert self.choice is not None
        self.choice.candidates = list(choice.candidates)
        if self.closed or self.started < 0:  # the client left meanwhile
            self.factory.dispatcher.abandoned(self.choice)
            return
        self._try_next()

    def _connect_failed(self, failure: Failure, backend: Any) -> None:
        assert self.choice is not None
        reason = failure.getErrorMessage()
        log.warn("http: cannot connect to {server} ({address}): {why}", server=backend.server_id,
                 address=f"{backend.host}:{backend.port}", why=reason, pool=self.factory.name)
        self.factory.dispatcher.connect_failed(self.choice, backend, reason)
        self._release("connect-failed")
        if self.closed:
            return
        self._try_next()

    def _attached(self, upstream: UpstreamProtocol) -> None:
        if self.closed:
            self.factory.upstreams.put(upstream) if upstream.reusable else upstream.transport.loseConnection()
            return
        assert self.request is not None and self.choice is not None and self.valve is not None
        self.upstream = upstream
        upstream.listener = self
        upstream.transport.registerProducer(self.valve, True)
        self.transport.registerProducer(upstream.valve, True)
        request = self.request
        known = set(request.headers)
        headers = filter_headers(request.headers, self.websocket, self.factory.dispatcher.strip_request_headers)
        headers = self.factory.dispatcher.request_headers(self.choice, headers)
        if not any(n == b"host" for n, _ in headers):
            headers.append((b"host", f"{self.backend.host}:{self.backend.port}".encode()))
        if self.factory.settings.forwarded_headers:
            proto = b"https" if request.tls else b"http"
            prior = [v for n, v in headers if n == b"x-forwarded-for"]
            headers = [pair for pair in headers if pair[0] != b"x-forwarded-proto" and pair[0] != b"x-forwarded-for"]
            xff = b", ".join(prior + [self.client.encode()]) if prior else self.client.encode()
            forwarded = self._forwarded_pairs(proto)
            headers += [(b"x-forwarded-for", xff), forwarded[0], forwarded[1]]
            if self.forwarded_valid:  # else h11 refuses them as it always did
                known.update(forwarded[:2])
                if not prior:
                    known.add(forwarded[2])
        try:
            upstream.send(h11.Request(method=request.method, target=request.target,
                                      headers=h11_headers(headers, known)))
            if self.request_done:  # a retry: the request (without a body) was read whole already
                upstream.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            self._detach(close=True)
            self._error(400, f"cannot forward the request: {exc}")
            self._end("failed")
            return
        self.flowing = True
        self.valve.release("dispatch")
        self._watch()
        self._pump()
        upstream.flush()

    def _forwarded_pairs(self, proto: bytes) -> tuple[tuple[bytes, bytes], ...]:
        """X-Forwarded-Proto, Forwarded and a lone X-Forwarded-For for this client, made and
        validated once per connection: :func:`h11_headers` takes them as known when valid."""
        cached = self.forwarded_cache
        if cached is None or cached[0][1] != proto:
            client = self.client.encode()
            cached = ((b"x-forwarded-proto", proto),
                      (b"forwarded", f"for={forwarded_for(self.client)};proto={proto.decode()}".encode()),
                      (b"x-forwarded-for", client))
            self.forwarded_cache = cached
            self.forwarded_valid = _valid_pairs(cached)
        return cached

    def _request_body(self, data: bytes) -> None:
        if self.upstream is None or self.response_done:
            return  # the response came early; the rest is read and dropped
        self.bytes_in += len(data)
        self.body_sent = True
        self.upstream.send(h11.Data(data=data))

    def _request_end(self, event: h11.EndOfMessage) -> None:
        self.request_done = True
        if self.upstream is not None and not self.response_done:
            trailers = list(event.headers) if _chunked(self.upstream.conn) else []
            self.upstream.send(h11.EndOfMessage(headers=trailers))
        if self.response_done:
            self._next_cycle()

    # --- the AppServer's events --------------------------------------------------------------

    def _watch(self) -> None:
        """Arm SERVER_TIMEOUT for the request now at a server (bytes either way push it back).
        The timer outlives the request (unwatching only stops the watch): when it fires it
        re-arms from the last activity, so a busy connection makes no timer calls per request."""
        timeout = self.factory.settings.server_timeout
        self.last_activity = self.factory.clock.seconds()
        self.watching = timeout > 0
        if self.watching and self.stall_timer is None:
            self.stall_timer = self.factory.clock.callLater(timeout, self._stalled)

    def _unwatch(self, cancel: bool = False) -> None:
        self.watching = False
        if cancel and self.stall_timer is not None and self.stall_timer.active():
            self.stall_timer.cancel()
            self.stall_timer = None

    def _stalled(self) -> None:
        self.stall_timer = None
        if not self.watching:
            return
        timeout = self.factory.settings.server_timeout
        left = self.last_activity + timeout - self.factory.clock.seconds()
        if left > 0:
            self.stall_timer = self.factory.clock.callLater(left, self._stalled)
            return
        if self.closed or self.relay is not None or self.request is None or self.response_done:
            return
        server = self.backend.server_id if self.backend is not None else "-"
        log.warn("http: no byte to or from {server} for {timeout:g}s (SERVER_TIMEOUT); giving up on "
                 "{client}'s request", server=server, timeout=timeout, client=self.client, pool=self.factory.name)
        self._detach(close=True)
        if self.response_started:
            self.transport.abortConnection()
        else:
            self._error(504, f"AppServer {server} did not answer within {timeout:g}s")
        self._end("failed")

    def upstream_event(self, upstream: UpstreamProtocol, event: Any) -> None:
        """One event of the AppServer's response, relayed to the client."""
        if self.watching:
            self.last_activity = self.factory.clock.seconds()
        try:
            self._relay_event(upstream, event)
        except h11.LocalProtocolError as exc:  # a response h11 will not send on: never half of one
            upstream.listener = None
            upstream.transport.abortConnection()
            self._upstream_failed(f"AppServer {upstream.server_id} sent a response that cannot be "
                                  f"relayed: {exc}")

    def _relay_event(self, upstream: UpstreamProtocol, event: Any) -> None:
        assert self.choice is not None
        dispatcher = self.factory.dispatcher
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101 and self.websocket:
                self._switch(upstream, event)
            elif event.status_code == 100 and self.conn.they_are_waiting_for_100_continue:
                self.conn_send(h11.InformationalResponse(status_code=100, headers=[]))
            return
        if isinstance(event, h11.Response):
            dispatcher.answered(self.choice, self.backend)
            self.status = event.status_code
            parsed = pairs_of(event.headers)
            headers = filter_headers(parsed, False) + dispatcher.response_headers(self.choice, self.backend)
            if any(n == b"transfer-encoding" for n, _ in headers):  # chunked wins; never both downstream
                headers = [(n, v) for n, v in headers if n != b"content-length"]
            self.response_started = True
            self.conn_send(h11.Response(status_code=event.status_code, reason=event.reason,
                                        headers=h11_headers(headers, set(parsed))))
        elif isinstance(event, h11.Data):
            self.bytes_out += len(event.data)
            self.conn_send(h11.Data(data=event.data))
        elif isinstance(event, h11.EndOfMessage):
            trailers = list(event.headers) if _chunked(self.conn) else []
            self.conn_send(h11.EndOfMessage(headers=trailers))
            self.response_done = True
            self._detach(close=not self.request_done)
            self._end("ok")
            if self.request_done:
                self._next_cycle()
            else:  # answered before the whole request body: the connection cannot go on
                self._close()

    def conn_send(self, event: Any) -> None:
        """Gather *event* for the client (sent at :meth:`flush`; nothing once it is gone)."""
        if self.closed:
            return
        data = self.conn.send(event)
        if data and self.out is not None:
            self.out.add(data)

    def flush(self) -> None:
        """Send what was gathered for the client."""
        if self.out is not None and not self.closed:
            self.out.flush()

    def _close(self) -> None:
        """Close the client connection once what was gathered for it is written."""
        self.closing = True
        self.flush()
        self.transport.loseConnection()

    def upstream_garbage(self, upstream: UpstreamProtocol, reason: str) -> None:
        log.warn("http: AppServer {server} sent a malformed response: {why}", server=upstream.server_id,
                 why=reason, pool=self.factory.name)
        self._upstream_failed(f"AppServer {upstream.server_id} sent a malformed response")

    def upstream_lost(self, upstream: UpstreamProtocol, reason: Failure) -> None:
        assert self.request is not None
        if (not self.response_started and upstream.reused and not self.retried and not self.body_sent
                and self.request.method in IDEMPOTENT and not self.closed):
            self.retried = True  # a keep-alive connection the server closed under us: once more, fresh
            self._detach(close=True)
            self.flowing = False
            assert self.valve is not None and self.choice is not None
            self.valve.hold("dispatch")
            self._release("retry")
            self.choice.candidates.insert(0, self.backend)
            self._try_next(fresh=True)
            return
        self._upstream_failed(f"AppServer {upstream.server_id} closed the connection before the "
                              f"response was complete")

    def _upstream_failed(self, reason: str) -> None:
        self._detach(close=True)
        if self.response_started:
            log.warn("http: {why}; closing the client connection", why=reason, pool=self.factory.name)
            self.transport.abortConnection()  # never a cut body passed off as complete
            self._end("failed")
        else:
            self._error(502, reason)
            self._end("failed")

    def _detach(self, close: bool) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return
        upstream.flush()
        upstream.listener = None
        if not upstream.closed:
            upstream.transport.unregisterProducer()
        if not self.closed:
            self.transport.unregisterProducer()
        assert self.valve is not None
        self.valve.release("peer-full")
        if close:
            if not upstream.closed:
                upstream.transport.loseConnection()
        else:
            if upstream.valve is not None:
                upstream.valve.release("peer-full")
            self.factory.upstreams.put(upstream)

    def _switch(self, upstream: UpstreamProtocol, event: h11.InformationalResponse) -> None:
        """``101``: from now on a raw byte relay both ways."""
        self.status = 101
        self._unwatch()  # a WebSocket may rest as long as it likes
        self.response_started = self.response_done = True
        assert self.choice is not None
        headers = filter_headers(event.headers, True) + self.factory.dispatcher.response_headers(
            self.choice, self.backend)
        self.conn_send(h11.InformationalResponse(status_code=101, headers=headers, reason=event.reason))
        self.relay = upstream.transport
        upstream.relay_to = self.transport
        upstream.listener = None
        upstream.flush()
        self.flush()
        leftover = self.conn.trailing_data[0]
        if leftover:
            upstream.transport.write(leftover)
        upstream_leftover = upstream.conn.trailing_data[0]
        if upstream_leftover:
            self.transport.write(upstream_leftover)
        assert self.valve is not None
        self.valve.release("dispatch")
        self.valve.release("h11")
        log.info("http: {client} {path} switched protocols with {server}", client=self.client,
                 path=self.request.target.decode("latin-1") if self.request else "",
                 server=upstream.server_id, pool=self.factory.name)

    def _next_cycle(self) -> None:
        if self.closed:
            return
        if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
            self._close()
            return
        try:
            self.conn.start_next_cycle()
        except h11.LocalProtocolError:
            self._close()
            return
        self._reset()
        assert self.valve is not None
        self.valve.release("h11")
        self.valve.release("dispatch")
        self._arm(self.factory.settings.keepalive_timeout)
        trailing, closed = self.conn.trailing_data
        if trailing:  # a pipelined request is already here
            self.cycle_bytes = len(trailing)
            self._arm(self.factory.settings.header_timeout)
        if trailing or closed:  # else h11 has nothing to say until bytes come
            self._pump()

    # --- answers of our own ------------------------------------------------------------------

    def _error(self, status: int, reason: str, retry_after: int | None = None) -> None:
        """Answer *status* with a JSON body naming *reason*, then close the connection."""
        self.status = status
        if self.closed:
            return
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = json.dumps({"status": status, "error": reason}).encode() + b"\n"
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            if retry_after is not None:
                headers.append((b"retry-after", str(retry_after).encode()))
            try:
                self.conn_send(h11.Response(status_code=status, headers=headers))
                self.conn_send(h11.Data(data=body))
                self.conn_send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                pass
        self.response_done = True
        self._close()

    def _release(self, outcome: str) -> None:
        """Tell the dispatcher the request left its server (once per opening)."""
        backend, self.opened = self.opened, None
        if backend is not None and self.choice is not None:
            self.factory.dispatcher.released(self.choice, backend, outcome)

    def _end(self, outcome: str | None) -> None:
        """One access-log event and the counters for the request; the dispatcher hears it."""
        request = self.request
        if request is None or self.started < 0:
            return
        self._unwatch()
        factory = self.factory
        stats = factory.stats
        self._release(outcome or "failed")
        if self.choice is not None:
            factory.dispatcher.abandoned(self.choice)
        if self.status >= 500:
            stats.record("http_5xx")
        stats.record("http_in_flight", -1)
        stats.record("bytes_in", self.bytes_in)
        stats.record("bytes_out", self.bytes_out)
        if not factory.settings.access_log:
            return
        now = factory.clock.seconds()
        method = request.method.decode("latin-1")
        path = request.target.decode("latin-1")
        server = self.backend.server_id if self.backend is not None else "-"
        status = self.status or "-"
        duration = now - self.started
        # the text is made here, once, and the event carries it as its format's one field: an
        # observer formatting every field of a dozen-field format was the costliest part of a
        # request; the fields are all still in the event for structured observers
        line = (f"http: {self.client} {method} {path} -> {server} {status} in={self.bytes_in} "
                f"out={self.bytes_out} {duration:.3f}s (queued {self.queue_wait:.3f}s)")
        log.info("{access_line}", access_line=line, client=self.client, method=method, path=path,
                 server=server, status=status, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                 duration=duration, queue_wait=self.queue_wait, pool=factory.name, access=True,
                 outcome=outcome or "answered")
        self.started = -1.0  # logged once


class HttpProxyFactory(Factory):
    """The client connections of one HTTP unit."""

    protocol = HttpProxy  # type: ignore[assignment]

    def __init__(self, clock: Any, dispatcher: IDispatcher, upstreams: UpstreamPool,
                 settings: ProxySettings | None = None, stats: ISessionStats | None = None,
                 pending: PendingLimits | None = None, name: str = "BALANCE_HTTP") -> None:
        self.clock = clock
        self.dispatcher = dispatcher
        self.upstreams = upstreams
        self.settings = settings or ProxySettings()
        self.stats: ISessionStats = stats if stats is not None else SessionStats()
        self.pending = pending if pending is not None else PendingLimits(128, 1024)
        self.name = name
        self.connections = 0  # open client connections (MAX_SESSIONS)
        self.sessions: dict[int, Any] = {}  # the screen's session table: HTTP requests are not listed
        self.standby = None
        self.recognisers: list[Any] = []
