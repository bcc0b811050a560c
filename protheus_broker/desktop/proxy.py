"""The SmartClient session proxy: accept, choose an AppServer, connect (failing over), relay.

Data path, per session: ``ClientSide`` (the accepted SmartClient) is paused until a server
connects; then each transport is the streaming producer of the other, so a slow reader pauses the
fast writer and no buffer grows past one read.  Bytes go out at once when nothing is queued
(``send_now``), half-closes are passed on, and a close on one side closes the other after its data
is flushed.  Which server, and what happens when one fails, is ``Session``'s job: every Up server
in the balancer's order, then the Suspended ones as a last resort; a host name is resolved (IPv4
and IPv6, off the reactor thread) and each of its addresses tried in turn.

Until its AppServer's first byte a session keeps a bounded copy of what the client sent, so a
login the AppServer does not answer within ``FIRST_RESPONSE_TIMEOUT`` is replayed on the next
one (see :class:`Session`).  Connections not yet established (undecided first bytes, a
``/status`` query, a session still waiting for its AppServer's first byte) are capped per client
address and in all (:class:`PendingLimits`); established sessions only by ``MAX_SESSIONS``.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol as TypingProtocol, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, DNSLookupError
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.balancing.pool import AddressCollector, Backend, ServerPool, ServerState, is_ip_literal
from protheus_broker.desktop.lifecycle import GateRefused, IGate, Lifecycle, ServerAvailable, SessionState
from protheus_broker.desktop.pending import PendingLimits, PendingToken, RefusalLog
from protheus_broker.desktop.pending import client_host as _host, client_text as _client_text
from protheus_broker.sockets import send_now, tune
from protheus_broker.stats import ISessionStats, SessionStats

log = Logger()

#: What a session keeps of the client's bytes until its AppServer's first byte, to replay them on
#: the next AppServer if that one does not answer.  A client that sends this much before any
#: answer is not logging in: the copy goes and its session is relayed without replay.
KEEP_LIMIT = 64 * 1024

#: Seconds the addresses of an AppServer's host name are reused before it is resolved again
#: (a login storm does not become a storm of lookups).
RESOLVED_FOR = 10.0


@implementer(IHalfCloseableProtocol)
class _Pipe(Protocol):
    """One side of a proxied session: relays what it reads to its peer."""

    transport: Any  # an ITCPTransport (or a TLS one) once connected
    session: Session
    peer: _Pipe | None = None
    received = 0
    eager = False
    _read_closed = False
    _write_closed = False

    def connectionMade(self) -> None:
        self.eager = tune(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        peer = self.peer
        if peer is None:  # TLS: records decrypted after the pause; held for the server
            self.hold(data)
            return
        if peer.eager:
            send_now(peer.transport, data)
        else:
            peer.transport.write(data)

    def hold(self, data: bytes) -> None:
        raise RuntimeError("data before the session was linked")  # only a ClientSide may hold

    def readConnectionLost(self) -> None:
        """The other end sent EOF: pass the half-close on once our data is flushed."""
        self._read_closed = True
        self.session.half_closed(self)
        if self.peer is not None:
            self.peer.transport.loseWriteConnection()
        self._close_if_done()

    def writeConnectionLost(self) -> None:
        self._write_closed = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self._read_closed and self._write_closed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.session.side_lost(self, reason)


class ClientSide(_Pipe):
    """The accepted SmartClient connection.

    *prefix* is what the client sent before it was recognised as a plain SmartClient (see
    :class:`FirstBytes`); it goes to the server first.  *pending* is its count against the
    caps on connections not yet established (the session takes one if none is given).
    """

    def __init__(self, broker: BrokerFactory, prefix: bytes = b"", eof: bool = False,
                 pending: PendingToken | None = None) -> None:
        self.broker = broker
        self.prefix = prefix
        self.eof = eof  # the client half-closed before it was linked to a server
        self.received = len(prefix)
        self.pending = pending

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # nothing is read until a server is connected
        super().connectionMade()
        self.session = Session(self.broker, self)
        self.session.start()

    def hold(self, data: bytes) -> None:
        """Data before the server is linked (a TLS transport decrypts what it read before the
        pause): it goes to the server first, after *prefix*."""
        self.prefix += data

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.peer is not None:
            self.session.client_sent(data)

    def readConnectionLost(self) -> None:
        if self.peer is None:  # between servers: passed on once the next one is linked
            self.eof = True
            return
        self.session.client_eof()
        super().readConnectionLost()


class ServerSide(_Pipe):
    """The connection to the chosen AppServer."""

    abandoned = False  # it failed before answering: the session replays on another server

    def connectionMade(self) -> None:
        super().connectionMade()
        self.session.server_connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.abandoned:
            return
        if not self.session.answered and self.session.server is self:
            self.session.server_answered()
        super().dataReceived(data)

    def readConnectionLost(self) -> None:
        if self.abandoned:
            return
        session = self.session
        if not session.answered and session.server is self:
            if session.replayable():
                session.server_failed(self, "closed the connection before answering", lost=True)
                return
            session.server_answered()  # its EOF is its answer
        super().readConnectionLost()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.abandoned:
            return
        session = self.session
        if not session.answered and session.server is self and session.replayable():
            session.server_failed(self, f"connection lost before answering: {_describe(reason)}",
                                  lost=True)
            return
        super().connectionLost(reason)


class Recogniser(TypingProtocol):
    """Something else that can arrive on the SmartClient port (the status query, the connector's
    resumable protocol), told apart by the first bytes the client sends.

    A recogniser whose connections carry sessions (``carries_sessions = True``, the resumable
    one) is uncounted once it takes a connection over: its sessions count themselves.  Any other
    one's connections (the status query) count as pending until they close.
    """

    #: short name for logs ("http-status", "resumable")
    name: str
    #: True if the connections it takes carry sessions, which count themselves as pending
    carries_sessions: bool

    def recognise(self, prefix: bytes) -> bool | None:
        """True: *prefix* (all bytes so far) is mine; False: it is not; None: I need more bytes."""

    def take_over(self, broker: BrokerFactory, prefix: bytes) -> IProtocol:
        """The protocol that serves this connection from now on; it is connected to the
        transport, then given *prefix*."""


def _carries_sessions(recogniser: Recogniser) -> bool:
    return bool(getattr(recogniser, "carries_sessions", False))


@implementer(IProtocol, IHalfCloseableProtocol)
class CountedProtocol:
    """A recognised connection's protocol, counted as pending until the connection closes (a
    ``/status`` query is no session: held open a byte at a time it must still count)."""

    transport: Any = None

    def __init__(self, wrapped: IProtocol, pending: PendingToken) -> None:
        self.wrapped = wrapped
        self.pending = pending

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.wrapped.makeConnection(transport)

    def connectionMade(self) -> None:
        pass  # the wrapped protocol's runs in makeConnection

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def readConnectionLost(self) -> None:
        half = IHalfCloseableProtocol(self.wrapped, None)
        if half is not None:
            half.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        half = IHalfCloseableProtocol(self.wrapped, None)
        if half is not None:
            half.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.pending.release()
        self.wrapped.connectionLost(reason)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


#: Longest prefix a recogniser may ask for; a client still undecided after it is plain.
MAX_PREFIX = 64


@implementer(IHalfCloseableProtocol)
class FirstBytes(Protocol):
    """Reads a new connection's first bytes and hands it to the protocol they belong to.

    A plain SmartClient (anything no recogniser claims, TLS included) becomes a
    :class:`ClientSide`, so does a client that says nothing for *first_bytes_wait* seconds (it
    waits for the server to speak).  Decided at the first byte that no recogniser can match, so a
    SmartClient pays no wait.  After the hand-over this object is out of the data path: the
    transport calls the new protocol directly.  (With a transport that cannot be re-pointed, as
    some test doubles, it delegates.)  A client that half-closes before the decision is plain; its
    EOF reaches the server after its bytes.  Until decided the connection counts as pending
    (*pending*); the count passes to the session or the recognised protocol.
    """

    transport: Any

    def __init__(self, broker: BrokerFactory, pending: PendingToken | None = None) -> None:
        self.broker = broker
        self.pending = pending
        self.buffer = b""
        self.delegate: IProtocol | None = None
        self.timer: Any = None

    def connectionMade(self) -> None:
        self.timer = self.broker.clock.callLater(self.broker.first_bytes_wait, self._silent)

    def _silent(self) -> None:
        self.timer = None
        self._hand_over(self._plain())

    def _plain(self, eof: bool = False) -> ClientSide:
        pending, self.pending = self.pending, None
        return ClientSide(self.broker, self.buffer, eof=eof, pending=pending)

    def dataReceived(self, data: bytes) -> None:
        if self.delegate is not None:  # only when the transport could not be re-pointed
            self.delegate.dataReceived(data)
            return
        self.buffer += data
        undecided = False
        for recogniser in self.broker.recognisers:
            verdict = recogniser.recognise(self.buffer[:MAX_PREFIX])
            if verdict:
                protocol = recogniser.take_over(self.broker, self.buffer)
                pending, self.pending = self.pending, None
                if pending is not None:
                    if _carries_sessions(recogniser):
                        pending.release()
                    else:
                        protocol = CountedProtocol(protocol, pending)
                self._hand_over(protocol)
                return
            if verdict is None:
                undecided = True
        if not undecided or len(self.buffer) >= MAX_PREFIX:
            self._hand_over(self._plain())

    def _hand_over(self, protocol: IProtocol) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        if isinstance(protocol, ClientSide) and self.broker.full():
            if protocol.pending is not None:
                protocol.pending.release()
            self.broker._refuse(transport.getPeer())
            self.delegate = Protocol()  # nothing more is read into a session
            transport.abortConnection()
            return
        if getattr(transport, "protocol", None) is self:  # TCP (and iosim) transports
            transport.protocol = protocol
        elif getattr(transport, "wrappedProtocol", None) is self:  # TLS termination
            transport.wrappedProtocol = protocol
        else:
            self.delegate = protocol
        self.buffer, prefix = b"", self.buffer
        protocol.makeConnection(transport)
        if prefix and not isinstance(protocol, ClientSide):  # a ClientSide holds it for its server
            protocol.dataReceived(prefix)

    def readConnectionLost(self) -> None:
        if self.delegate is None:
            self._hand_over(self._plain(eof=True))
            return
        half = IHalfCloseableProtocol(self.delegate, None)
        if half is not None:
            half.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        half = IHalfCloseableProtocol(self.delegate, None)
        if half is not None:
            half.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        """Lost before a decision (or, on the fallback path, after it)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pending is not None:
            self.pending.release()
            self.pending = None
        if self.delegate is not None:
            self.delegate.connectionLost(reason)


def _describe(reason: Failure) -> str:
    value = reason.value
    text = str(value).strip().rstrip(".")
    return text or type(value).__name__


class _Resolving(AddressCollector):
    """The lookup of one AppServer's host name for a session, standing for the connector
    meanwhile: a client that leaves stops the attempt (``stopConnecting``)."""

    def __init__(self, session: Session, backend: Backend) -> None:
        super().__init__(lambda addresses: session.resolved(backend, addresses))
        self.session = session

    def stopConnecting(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.session.attempt_failed(Failure(DNSLookupError("stopped")))


class Session(ClientFactory):
    """One SmartClient session: pass its gates, choose servers in the balancer's order until one
    connects, link the two sides, and account for how the session ends.

    Its lifecycle is :class:`~.lifecycle.Lifecycle` (accepted -> choosing -> waiting ->
    connecting -> linked -> closing -> ended); the relay itself never goes through it.  In
    *waiting* the client is paused (what TLS decrypted meanwhile is held within
    :data:`KEEP_LIMIT`'s backpressure) and counted as pending, while each of the broker's gates
    (:class:`~.lifecycle.IGate`) says it may go on or why not.  What steers a session from
    outside (TLS upstream, a resumable link) uses its methods: :meth:`connecting_through`,
    :meth:`attempt_failed`, :meth:`server_connected`, :meth:`unlink_refused`.

    It is also the factory of its server connection (one object less per session).

    *Replay* (when the broker's ``first_response_timeout`` is not 0): until the linked AppServer
    sends its first byte, the session keeps a copy of what it passed on from the client (up to
    :data:`KEEP_LIMIT`: a client that sends more before any answer is not logging in, and its
    session is relayed without replay).  The SmartClient speaks first, so the
    timer starts when the client's first bytes are sent to the server, not at connect: a client
    that says nothing never makes a server look hung (a server that speaks first, like the
    sample AppServer, has answered before any timer starts).  If the AppServer sends nothing
    for ``first_response_timeout`` seconds, or closes or loses the connection before its first
    byte, that connection is aborted and the login is replayed on the next candidate with
    exactly the bytes the client sent, and its EOF if it sent one; the SmartClient never
    notices.  Such a server is suspended only once another AppServer answered the same bytes
    (so a client sending junk or half a message cannot suspend the pool).  The first
    AppServer byte drops the copy: from then on the data path holds nothing extra.

    This fits the SmartClient, whose first message is a small handshake (or a TLS ClientHello)
    that the AppServer answers at once and that is safe to send twice.  A protocol whose first
    request may take longer than the timeout and must not run twice needs
    ``FIRST_RESPONSE_TIMEOUT=0``.
    """

    noisy = False

    def __init__(self, broker: BrokerFactory, client: ClientSide) -> None:
        self.broker = broker
        self.session_id = next(broker.ids)
        self.client = client
        peer = client.transport.getPeer()
        self.client_address = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.server: ServerSide | None = None
        self.backend: Backend | None = None
        self.candidates: list[Backend] = []
        self.addresses: list[str] = []  # further addresses of the backend being tried
        self.address: str | None = None  # the address being tried
        self.failures: list[str] = []
        self.started = broker.clock.seconds()
        self.connector: Any = None
        self.client_lost = False
        self.server_lost = False
        self.how: str | None = None
        self.life = Lifecycle(self.session_id)
        self.waiting: Deferred[None] | None = None  # a gate's answer, while waiting
        self.pending = client.pending or broker.pending.take(_host(peer))
        self.answer_timeout = broker.first_response_timeout  # a reload changes new sessions only
        self.keeping = self.answer_timeout > 0
        self.answered = False  # the linked server sent its first byte (or its EOF)
        self.kept: list[bytes] | None = None  # client bytes sent to the unanswered server
        self.kept_size = 0
        self.kept_eof = False
        self.answer_timer: Any = None
        self.silent: list[tuple[Backend, str]] = []  # servers that failed before answering
        self.probing: Backend | None = None  # a server on probation this session is trying

    # --- choosing and connecting ----------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.life.state is SessionState.ENDED

    @property
    def state(self) -> SessionState:
        return self.life.state

    def start(self) -> None:
        self.broker.session_started(self)
        self.life.move(SessionState.CHOOSING)
        self._pass_gates(0)

    def _pass_gates(self, index: int) -> None:
        """Ask gate *index* (then the next ones) whether the session may go on; connect after
        the last.  A gate that answers at once costs no state change."""
        gates = self.broker.gates
        if index >= len(gates):
            self._choose()
            return
        answer = gates[index].acquire(self)
        if not answer.called:
            if self.life.state is not SessionState.WAITING:
                self.life.move(SessionState.WAITING)
            log.info("session {session_id} from {client}: waiting ({gate})",
                     session_id=self.session_id, client=self.client_address, gate=gates[index])
            self.waiting = answer
        answer.addCallbacks(self._gate_passed, self._gate_refused, callbackArgs=(index + 1,))

    def _gate_passed(self, result: object, index: int) -> None:
        self.waiting = None
        if self.client_lost:  # (the wait was cancelled; a gate that fired anyway changes nothing)
            return
        self._pass_gates(index)

    def _gate_refused(self, reason: Failure) -> None:
        self.waiting = None
        if reason.check(CancelledError) or self.client_lost:
            return  # the client left: side_lost ends the session
        refusal = reason.value
        if isinstance(refusal, GateRefused):
            self._fail(refusal.what, refusal.detail)
        else:  # a gate's own bug: still one line, and the client is not held
            self._fail("a gate failed", _describe(reason))

    def _choose(self) -> None:
        now = self.started
        if self.life.state is SessionState.WAITING:
            self.life.move(SessionState.CHOOSING)
            now = self.broker.clock.seconds()
        self.candidates = self.broker.pool.candidates(now)
        self.life.move(SessionState.CONNECTING)
        self._try_next()

    def _fail(self, what: str, detail: str) -> None:
        """No server for this session (*what*, *detail* say why): close the client, logged and
        counted."""
        self.how = f"{what} ({detail})"
        log.warn("session {session_id} from {client}: {what}, closing the client ({tried})",
                 session_id=self.session_id, client=self.client_address, what=what, tried=detail)
        self.broker.stats.record("sessions_failed")
        self.life.move(SessionState.CLOSING)
        self.client.transport.loseConnection()

    def _try_next(self) -> None:
        if self.client_lost:
            self._end("client left before a server answered")
            return
        if self.life.state is not SessionState.CONNECTING:
            self.life.move(SessionState.CONNECTING)
        if self.addresses and self.backend is not None:  # the same server's next address
            self._connect(self.backend, self.addresses.pop(0))
            return
        if not self.candidates:
            tried = "; ".join(self.failures) if self.failures else "none is up"
            self._fail("no AppServer available", tried)
            return
        backend = self.candidates.pop(0)
        self.backend = backend
        if self.broker.pool.session_opening(backend):
            self.probing = backend
        if backend.state is ServerState.SUSPENDED:
            log.info("session {session_id}: trying suspended AppServer {server_id} ({address}) as a "
                     "last resort ({reason})", session_id=self.session_id,
                     server_id=backend.server_id, address=backend.address, reason=backend.reason)
        resolver = getattr(self.broker.reactor, "nameResolver", None)
        if backend.unix or is_ip_literal(backend.host) or resolver is None:
            self._connect(backend, backend.host)
            return
        known_now = self.broker.pool.addresses_for(backend)  # resolved by the pool at load
        if known_now:
            self.addresses = list(known_now)
            self._try_next()
            return
        known = self.broker.resolved.get(backend.host)
        if known is not None and known[0] > self.broker.clock.seconds():
            self.resolved(backend, known[1])
            return
        receiver = _Resolving(self, backend)
        self.connector = receiver
        self.address = None
        resolver.resolveHostName(receiver, backend.host, backend.port)

    # --- steering from outside (TLS upstream, a resolver): methods, not attributes ------------

    def connecting_through(self, stopper: Any) -> None:
        """The attempt under way is now *stopper*'s (a handshake, a lookup): a client that leaves
        calls its ``stopConnecting``, which must end in :meth:`attempt_failed`."""
        self.connector = stopper

    def attempt_failed(self, reason: Failure) -> None:
        """The attempt under way failed before the server was linked (a refused connect, a
        failed lookup or TLS handshake): try the next address or server."""
        self.connector = None
        self.clientConnectionFailed(None, reason)

    def unlink_refused(self, server: ServerSide, reason: Failure) -> bool:
        """The linked *server* refused the session before the client sent a byte (a TLS alert
        after the handshake): unlink it and fail over like a refused connect (True).  False if
        that is too late (the client spoke, or left): the session goes on ending normally."""
        client = self.client
        if client.received or self.client_lost or self.backend is None or self.server is not server:
            return False
        client.transport.unregisterProducer()  # this side's transport; the next one registers
        client.transport.pauseProducing()
        client.peer = server.peer = None
        self.server = None
        self.attempt_failed(reason)
        return True

    def resolved(self, backend: Backend, addresses: list[str]) -> None:
        """The addresses of *backend*'s name: each is tried in turn before the next server."""
        self.connector = None
        if not addresses:
            self.clientConnectionFailed(None, Failure(DNSLookupError(f"cannot resolve {backend.host}")))
            return
        self.broker.resolved[backend.host] = (self.broker.clock.seconds() + RESOLVED_FOR, addresses)
        self.addresses = list(addresses)
        self._try_next()

    def _connect(self, backend: Backend, address: str) -> None:
        self.address = address
        upstream_tls = self.broker.upstream_tls  # SSL_ENCRYPT_UPSTREAM (session_tls.UpstreamTLS)
        factory = self if upstream_tls is None else upstream_tls.wrap(self, backend)
        if backend.unix:  # a managed node on a Unix socket
            self.connector = self.broker.reactor.connectUNIX(
                backend.unix, factory, timeout=self.broker.connect_timeout)
            return
        self.connector = self.broker.reactor.connectTCP(
            address, backend.port, factory, timeout=self.broker.connect_timeout
        )

    def _where(self, backend: Backend) -> str:
        address = self.address
        if address is None or address == backend.host or backend.unix:
            return backend.address
        return f"{backend.address} ({address})"

    def buildProtocol(self, addr: Any) -> ServerSide:
        server = ServerSide()
        server.session = self
        return server

    def _probe_ended(self) -> None:
        if self.probing is not None:
            self.broker.pool.probe_ended(self.probing)
            self.probing = None

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        backend = self.backend
        assert backend is not None
        self.connector = None
        if self.client_lost:  # we stopped the attempt ourselves: not the server's fault
            self._probe_ended()
            self.backend = None
            self.addresses = []
            self.broker.pool.session_closed(backend)
            self._end("client left before a server answered")
            return
        why = _describe(reason)
        self.failures.append(f"{backend.server_id} {self._where(backend)}: {why}")
        log.warn(
            "session {session_id}: AppServer {server_id} ({address}) failed: {why}; trying the next",
            session_id=self.session_id, server_id=backend.server_id, address=self._where(backend),
            why=why,
        )
        if not self.addresses:  # every address of this server failed
            self._probe_ended()
            self.backend = None
            self.broker.pool.session_closed(backend)
            self.broker.pool.connect_failed(backend, why)
        self._try_next()

    def server_connected(self, server: ServerSide) -> None:
        self.server = server
        self.connector = None
        self.addresses = []
        assert self.backend is not None
        self.broker.pool.session_connected(self.backend)
        if self.client_lost:
            server.transport.loseConnection()
            return
        self.life.move(SessionState.LINKED)
        client = self.client
        client.peer, server.peer = server, client
        client.transport.registerProducer(server.transport, True)
        if self.keeping:  # until the first answer the copy's limit does the backpressure
            self.kept, self.kept_size, self.kept_eof = [], 0, False
        else:
            server.transport.registerProducer(client.transport, True)
        if client.prefix:
            prefix, client.prefix = client.prefix, b""
            server.transport.write(prefix)
            self.client_sent(prefix)
        if client.eof:
            client.readConnectionLost()
        else:
            client.transport.resumeProducing()

    # --- until the first answer: keep, time, replay -----------------------------------------

    def client_sent(self, data: bytes) -> None:
        """*data* from the client went to the unanswered server: keep a copy, start the timer."""
        kept = self.kept
        if kept is None:
            return
        kept.append(data)
        self.kept_size += len(data)
        if self.answer_timer is None:
            self.answer_timer = self.broker.clock.callLater(self.answer_timeout, self._no_answer)
        if self.kept_size >= KEEP_LIMIT:
            self._stop_keeping()

    def _stop_keeping(self) -> None:
        """The client sent :data:`KEEP_LIMIT` bytes before any answer: this is not a login
        handshake, so the copy goes and the session is relayed as any other (without replay),
        rather than stalling the client until the timeout."""
        server, client = self.server, self.client
        assert server is not None
        self._stop_answer_timer()
        log.info("session {session_id}: {size} bytes from the client before the AppServer's first "
                 "byte; relayed without replay", session_id=self.session_id, size=self.kept_size)
        self.kept, self.kept_size, self.kept_eof = None, 0, False
        server.transport.registerProducer(client.transport, True)

    def client_eof(self) -> None:
        if self.kept is not None:
            self.kept_eof = True

    def replayable(self) -> bool:
        """True while a failure of the linked server can be replayed on the next one."""
        return self.kept is not None and bool(self.kept_size) and not self.client_lost

    def _stop_answer_timer(self) -> None:
        if self.answer_timer is not None:
            self.answer_timer.cancel()
            self.answer_timer = None

    def _no_answer(self) -> None:
        self.answer_timer = None
        server = self.server
        if server is not None and self.replayable():
            self.server_failed(server, f"no answer within {self.answer_timeout:g}s")

    def server_failed(self, server: ServerSide, why: str, lost: bool = False) -> None:
        """The linked server failed before its first byte: drop it (abort the connection unless
        it is *lost* already) and replay on the next."""
        backend = self.backend
        assert backend is not None and self.kept is not None
        self._stop_answer_timer()
        self._probe_ended()
        server.abandoned = True
        client = self.client
        client.peer = server.peer = None
        self.server = None
        self.backend = None
        client.transport.unregisterProducer()
        client.transport.pauseProducing()
        if not lost:
            server.transport.abortConnection()
        self.broker.pool.session_closed(backend)
        self.silent.append((backend, why))
        self.failures.append(f"{backend.server_id} {self._where(backend)}: {why}")
        log.warn(
            "session {session_id}: AppServer {server_id} ({address}) {why}; replaying the client's "
            "{size} bytes on the next", session_id=self.session_id, server_id=backend.server_id,
            address=self._where(backend), why=why, size=self.kept_size,
        )
        client.prefix = b"".join(self.kept) + client.prefix
        client.eof = client.eof or self.kept_eof
        self.kept, self.kept_size, self.kept_eof = None, 0, False
        self.addresses = []
        self._try_next()

    def server_answered(self) -> None:
        """The linked server's first byte (or EOF): the copy goes, the session is established."""
        self.answered = True
        self._stop_answer_timer()
        self.pending.release()
        backend, server, client = self.backend, self.server, self.client
        assert backend is not None and server is not None
        self._probe_ended()
        self.broker.pool.session_answered(backend)
        for silent, why in self.silent:  # they failed bytes this server answered
            self.broker.pool.session_failed(silent, why)
        self.silent = []
        if self.kept is not None:
            self.kept, self.kept_size = None, 0
            server.transport.registerProducer(client.transport, True)

    # --- ending ---------------------------------------------------------------------------

    def half_closed(self, side: _Pipe) -> None:
        if self.how is None:
            self.how = "client closed" if side is self.client else "server closed"

    def side_lost(self, side: _Pipe, reason: Failure) -> None:
        clean = reason.check(ConnectionDone) is not None
        who = "client" if side is self.client else "server"
        if self.how is None:
            self.how = f"{who} closed" if clean else f"{who} lost: {_describe(reason)}"
        if self.life.state is not SessionState.CLOSING:
            self.life.move(SessionState.CLOSING)
        if side is self.client:
            self.client_lost = True
            self._stop_answer_timer()
            if self.waiting is not None:  # held by a gate: give up the wait
                waiting, self.waiting = self.waiting, None
                waiting.cancel()
            if self.connector is not None:
                self.connector.stopConnecting()  # -> clientConnectionFailed -> _end
                return
        else:
            self.server_lost = True
        peer = side.peer
        if peer is not None and peer.transport.connected:
            if peer is self.client or self.kept is None:  # an unanswered server has no producer
                peer.transport.unregisterProducer()
            peer.transport.loseConnection()  # after what is queued for it is flushed
        if self.client_lost and (self.server_lost or (self.server is None and self.connector is None)):
            self._end(self.how)

    def close(self, why: str = "closed by admin") -> None:
        """End the session now (admin action): both connections are dropped at once."""
        if self.how is None:
            self.how = why
        for side in (self.client, self.server):
            transport = getattr(side, "transport", None)
            if transport is not None:
                getattr(transport, "abortConnection", transport.loseConnection)()

    def _end(self, how: str) -> None:
        if self.ended:
            return
        if self.life.state is not SessionState.CLOSING:
            self.life.move(SessionState.CLOSING)
        self.life.move(SessionState.ENDED)
        self._stop_answer_timer()
        self._probe_ended()
        self.pending.release()
        self.kept = None
        if self.server is not None and self.backend is not None:
            self.broker.pool.session_closed(self.backend)
        self.broker.session_ended(self, how)


class BrokerFactory(ServerFactory):
    """Accepts SmartClient connections for one pool, up to *max_sessions* at once (0: no cap).

    With *recognisers*, each connection's first bytes decide what it is (:class:`FirstBytes`);
    without, every connection is a SmartClient session from its first byte.  Connections not yet
    established are capped per client address and in all (:class:`PendingLimits`); over a cap
    a connection is closed at once.  *first_response_timeout* (0: off) is the replay rule of
    :class:`Session`.  Each session passes *gates* before it connects: by default one,
    :class:`~.lifecycle.ServerAvailable`, which holds a session up to *wait_for_server* seconds
    (``WAIT_FOR_SERVER``; 0: no wait) while no server can take it; later issues add theirs.
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        pool: ServerPool,
        connect_timeout: float = 5.0,
        max_sessions: int = 0,
        sort_method: str = "",
        recognisers: Sequence[Recogniser] = (),
        first_bytes_wait: float = 0.5,
        first_response_timeout: float = 0.0,
        max_pending_per_address: int = 0,
        max_pending: int = 0,
        stats: ISessionStats | None = None,
        wait_for_server: float = 0.0,
    ) -> None:
        #: the unit's counters (sessions, refusals, bytes of ended sessions, handshakes)
        self.stats: ISessionStats = stats if stats is not None else SessionStats()
        self.reactor = reactor
        self.clock = reactor
        self.pool = pool
        self.connect_timeout = connect_timeout
        self.max_sessions = max_sessions
        self.sort_method = sort_method
        self.recognisers = list(recognisers)
        self.first_bytes_wait = first_bytes_wait
        self.first_response_timeout = first_response_timeout
        self.pending = PendingLimits(max_pending_per_address, max_pending)
        self.server_gate = ServerAvailable(pool, wait_for_server)
        #: what a session must pass before it connects, in order (see lifecycle.IGate)
        self.gates: list[IGate] = [self.server_gate]
        #: AppServer host name -> (valid until, its addresses), see RESOLVED_FOR: for a name
        #: the pool has no addresses of yet (see ServerPool.use_resolver)
        self.resolved: dict[str, tuple[float, list[str]]] = {}
        resolver = getattr(reactor, "nameResolver", None)
        if resolver is not None and pool.resolver is None:
            pool.use_resolver(resolver)  # every host name now, in the background
        self.ids = itertools.count(1)
        self.sessions: dict[int, Session] = {}
        #: resumable sessions (``resume_broker.ResumableSessions``: count, snapshot(), drops,
        #: resumes, expiries, resume_failures); None when the port takes no connector links
        self.standby: Any = None
        self.refusal_logs = {
            "MAX_SESSIONS": RefusalLog(reactor, lambda: f"session cap MAX_SESSIONS={self.max_sessions} reached"),
            "MAX_PENDING": RefusalLog(reactor, lambda: (
                f"MAX_PENDING={self.pending.total} connections not yet established")),
            "MAX_PENDING_PER_ADDRESS": RefusalLog(reactor, lambda: (
                f"MAX_PENDING_PER_ADDRESS={self.pending.per_address} connections not yet "
                f"established from one address")),
        }
        self.upstream_tls: Any = None  # set by session_tls.SessionTLS for SSL_ENCRYPT_UPSTREAM

    # The counters, read from the recorder (for callers and tests that read them here).
    sessions_total = property(lambda self: self.stats.get("sessions_total"))
    sessions_failed = property(lambda self: self.stats.get("sessions_failed"))
    refused_total = property(lambda self: self.stats.get("sessions_refused"))  # MAX_SESSIONS
    refused_pending_total = property(lambda self: self.stats.get("pending_refused"))
    bytes_in_total = property(lambda self: self.stats.get("bytes_in"))  # of ended sessions
    bytes_out_total = property(lambda self: self.stats.get("bytes_out"))
    handshake_failures = property(lambda self: self.stats.get("handshake_failures"))

    @property
    def wait_for_server(self) -> float:
        """``WAIT_FOR_SERVER``: how long a session waits for a server that can take it (a
        reload changes new sessions only)."""
        return self.server_gate.wait

    @wait_for_server.setter
    def wait_for_server(self, seconds: float) -> None:
        self.server_gate.wait = seconds

    def buildProtocol(self, addr: Any) -> Protocol | None:
        pending = self.admit(addr)
        if pending is None:
            return None  # the reactor closes the connection at once
        if self.recognisers:  # the cap applies once the first bytes say it is a new session
            return FirstBytes(self, pending)
        if self.full():
            pending.release()
            self._refuse(addr)
            return None
        return ClientSide(self, pending=pending)

    def admit(self, addr: Any) -> PendingToken | None:
        """Count a new connection from *addr* as pending, or refuse it (None, logged) when a cap
        on connections not yet established is reached."""
        host = _host(addr)
        cap = self.pending.over(host)
        if cap is None:
            return self.pending.take(host)
        self.stats.record("pending_refused")
        self.refusal_logs[cap].refused(_client_text(addr))
        return None

    def full(self) -> bool:
        """True when MAX_SESSIONS sessions are open (a resumed session is not a new one)."""
        return bool(self.max_sessions) and len(self.sessions) >= self.max_sessions

    def _refuse(self, addr: Any) -> None:
        """One connection refused by MAX_SESSIONS: counted, and in one rate-limited log line."""
        self.stats.record("sessions_refused")
        self.refusal_logs["MAX_SESSIONS"].refused(_client_text(addr))

    def stopFactory(self) -> None:
        for refusals in self.refusal_logs.values():
            refusals.flush()

    def session_started(self, session: Session) -> None:
        self.sessions[session.session_id] = session
        self.stats.record("sessions_total")

    def session_ended(self, session: Session, how: str) -> None:
        self.sessions.pop(session.session_id, None)
        connected = session.server is not None and session.backend is not None
        server_id = session.backend.server_id if connected else None  # type: ignore[union-attr]
        duration = self.clock.seconds() - session.started
        bytes_in = session.client.received
        bytes_out = session.server.received if session.server else 0
        self.stats.record("bytes_in", bytes_in)
        self.stats.record("bytes_out", bytes_out)
        # The text is formatted here, once: twisted.logger re-parsing a nine-field format string
        # in every observer was a sixth of the broker's CPU per session.  The fields stay on the
        # event for structured observers.
        log.info(
            "{text}",
            text=f"session {session.session_id} {session.client_address} -> {server_id} ended: "
            f"{how}; {duration:.3f}s, {bytes_in} bytes in, {bytes_out} bytes out ({self.sort_method})",
            session_id=session.session_id,
            client=session.client_address,
            server_id=server_id,
            server_address=session.backend.address if connected else None,  # type: ignore[union-attr]
            sort_method=self.sort_method,
            duration=duration,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            how=how,
        )
