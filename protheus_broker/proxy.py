"""The SmartClient session proxy: accept, choose an AppServer, connect (failing over), relay.

Data path, per session: ``ClientSide`` (the accepted SmartClient) is paused until a server
connects; then each transport is the streaming producer of the other, so a slow reader pauses the
fast writer and no buffer grows past one read.  Bytes go out at once when nothing is queued
(``send_now``), half-closes are passed on, and a close on one side closes the other after its data
is flushed.  Which server, and what happens when one fails, is ``Session``'s job.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol as TypingProtocol, Sequence

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol, ITransport
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .pool import Backend, ServerPool

log = Logger()

#: Bytes read per socket read: 256 KiB measured best for bulk (../shared/PERF_NOTES.md).  It is
#: also Twisted's write-buffer mark for pausing the producer, so it bounds per-session buffering.
READ_SIZE = 256 * 1024


_EAGER_NEEDS = ("_tempDataLen", "offset", "dataBuffer", "socket", "_writeDisconnecting", "disconnecting")


def tune(transport: ITransport) -> bool:
    """TCP_NODELAY and the larger read size; True if the transport allows eager sends."""
    set_nodelay = getattr(transport, "setTcpNoDelay", None)
    if set_nodelay is not None:
        try:
            set_nodelay(True)
        except OSError:
            pass
    if isinstance(transport, tcp.Connection):
        transport.bufferSize = READ_SIZE
        # send_now reads FileDescriptor internals (the same in Twisted 22.4 and 26); a Twisted
        # without them falls back to plain transport.write.
        return all(hasattr(transport, name) for name in _EAGER_NEEDS)
    return False


def send_now(transport: Any, data: bytes) -> None:
    """Write *data* to a TCP transport, sending at once when nothing is queued.

    ``transport.write`` only queues: bytes leave on the next reactor turn.  Sending straight away
    when the queue is empty keeps order (nothing is ahead of us) and saves that turn, which is most
    of the added latency of a Python proxy.  What the kernel does not take is queued as usual, so
    backpressure is unchanged.
    """
    if (
        not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            transport.write(data)  # the transport meets the same error and reports it
            return
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


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
    :class:`FirstBytes`); it goes to the server first.
    """

    def __init__(self, broker: BrokerFactory, prefix: bytes = b"", eof: bool = False) -> None:
        self.broker = broker
        self.prefix = prefix
        self.eof = eof  # the client half-closed before it was recognised
        self.received = len(prefix)

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # nothing is read until a server is connected
        super().connectionMade()
        self.session = Session(self.broker, self)
        self.session.start()

    def hold(self, data: bytes) -> None:
        """Data before the server is linked (a TLS transport decrypts what it read before the
        pause): it goes to the server first, after *prefix*."""
        self.prefix += data


class ServerSide(_Pipe):
    """The connection to the chosen AppServer."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.session.server_connected(self)


class Recogniser(TypingProtocol):
    """Something else that can arrive on the SmartClient port (the status query, the connector's
    resumable protocol), told apart by the first bytes the client sends."""

    #: short name for logs ("http-status", "resumable")
    name: str

    def recognise(self, prefix: bytes) -> bool | None:
        """True: *prefix* (all bytes so far) is mine; False: it is not; None: I need more bytes."""

    def take_over(self, broker: BrokerFactory, prefix: bytes) -> IProtocol:
        """The protocol that serves this connection from now on; it is connected to the
        transport, then given *prefix*."""


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
    EOF reaches the server after its bytes.
    """

    transport: Any

    def __init__(self, broker: BrokerFactory) -> None:
        self.broker = broker
        self.buffer = b""
        self.delegate: IProtocol | None = None
        self.timer: Any = None

    def connectionMade(self) -> None:
        self.timer = self.broker.clock.callLater(self.broker.first_bytes_wait, self._silent)

    def _silent(self) -> None:
        self.timer = None
        self._hand_over(ClientSide(self.broker, self.buffer))

    def dataReceived(self, data: bytes) -> None:
        if self.delegate is not None:  # only when the transport could not be re-pointed
            self.delegate.dataReceived(data)
            return
        self.buffer += data
        undecided = False
        for recogniser in self.broker.recognisers:
            verdict = recogniser.recognise(self.buffer[:MAX_PREFIX])
            if verdict:
                self._hand_over(recogniser.take_over(self.broker, self.buffer))
                return
            if verdict is None:
                undecided = True
        if not undecided or len(self.buffer) >= MAX_PREFIX:
            self._hand_over(ClientSide(self.broker, self.buffer))

    def _hand_over(self, protocol: IProtocol) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        if isinstance(protocol, ClientSide) and self.broker.full():
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
            self._hand_over(ClientSide(self.broker, self.buffer, eof=True))
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
        if self.delegate is not None:
            self.delegate.connectionLost(reason)


def _describe(reason: Failure) -> str:
    value = reason.value
    text = str(value).strip().rstrip(".")
    return text or type(value).__name__


class Session(ClientFactory):
    """One SmartClient session: choose servers in the balancer's order until one connects, link
    the two sides, and account for how the session ends.

    It is also the factory of its server connection (one object less per session).
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
        self.failures: list[str] = []
        self.started = broker.clock.seconds()
        self.connector: Any = None
        self.client_lost = False
        self.server_lost = False
        self.how: str | None = None
        self.ended = False

    # --- choosing and connecting ----------------------------------------------------------

    def start(self) -> None:
        self.broker.session_started(self)
        self.candidates = self.broker.pool.candidates(self.started)
        self._try_next()

    def _try_next(self) -> None:
        if self.client_lost:
            self._end("client left before a server answered")
            return
        if not self.candidates:
            tried = "; ".join(self.failures) if self.failures else "none is up"
            self.how = f"no AppServer available ({tried})"
            log.warn(
                "session {session_id} from {client}: no AppServer available, closing the client "
                "({tried})", session_id=self.session_id, client=self.client_address, tried=tried,
            )
            self.broker.sessions_failed += 1
            self.client.transport.loseConnection()
            return
        backend = self.candidates.pop(0)
        self.backend = backend
        self.broker.pool.session_opening(backend)
        upstream_tls = self.broker.upstream_tls  # SSL_ENCRYPT_UPSTREAM (session_tls.UpstreamTLS)
        factory = self if upstream_tls is None else upstream_tls.wrap(self, backend)
        self.connector = self.broker.reactor.connectTCP(
            backend.host, backend.port, factory, timeout=self.broker.connect_timeout
        )

    def buildProtocol(self, addr: Any) -> ServerSide:
        server = ServerSide()
        server.session = self
        return server

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        backend = self.backend
        assert backend is not None
        self.backend = None
        self.connector = None
        self.broker.pool.session_closed(backend)
        if self.client_lost:  # we stopped the attempt ourselves: not the server's fault
            self._end("client left before a server answered")
            return
        why = _describe(reason)
        self.failures.append(f"{backend.server_id} {backend.address}: {why}")
        self.broker.pool.connect_failed(backend, why)
        log.warn(
            "session {session_id}: AppServer {server_id} ({address}) failed: {why}; trying the next",
            session_id=self.session_id, server_id=backend.server_id, address=backend.address, why=why,
        )
        self._try_next()

    def server_connected(self, server: ServerSide) -> None:
        self.server = server
        self.connector = None
        assert self.backend is not None
        self.broker.pool.session_connected(self.backend)
        if self.client_lost:
            server.transport.loseConnection()
            return
        client = self.client
        client.peer, server.peer = server, client
        if client.prefix:
            server.transport.write(client.prefix)
            client.prefix = b""
        client.transport.registerProducer(server.transport, True)
        server.transport.registerProducer(client.transport, True)
        if client.eof:
            client.readConnectionLost()
        else:
            client.transport.resumeProducing()

    # --- ending ---------------------------------------------------------------------------

    def half_closed(self, side: _Pipe) -> None:
        if self.how is None:
            self.how = "client closed" if side is self.client else "server closed"

    def side_lost(self, side: _Pipe, reason: Failure) -> None:
        clean = reason.check(ConnectionDone) is not None
        who = "client" if side is self.client else "server"
        if self.how is None:
            self.how = f"{who} closed" if clean else f"{who} lost: {_describe(reason)}"
        if side is self.client:
            self.client_lost = True
            if self.connector is not None:
                self.connector.stopConnecting()  # -> clientConnectionFailed -> _end
                return
        else:
            self.server_lost = True
        peer = side.peer
        if peer is not None and peer.transport.connected:
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
        self.ended = True
        if self.server is not None and self.backend is not None:
            self.broker.pool.session_closed(self.backend)
        self.broker.session_ended(self, how)


class BrokerFactory(ServerFactory):
    """Accepts SmartClient connections for one pool, up to *max_sessions* at once (0: no cap).

    With *recognisers*, each connection's first bytes decide what it is (:class:`FirstBytes`);
    without, every connection is a SmartClient session from its first byte.
    """

    noisy = False
    bytes_in_total = 0  # bytes of ended sessions (the status page adds the live ones)
    bytes_out_total = 0

    def __init__(
        self,
        reactor: Any,
        pool: ServerPool,
        connect_timeout: float = 5.0,
        max_sessions: int = 0,
        sort_method: str = "",
        recognisers: Sequence[Recogniser] = (),
        first_bytes_wait: float = 0.5,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.pool = pool
        self.connect_timeout = connect_timeout
        self.max_sessions = max_sessions
        self.sort_method = sort_method
        self.recognisers = list(recognisers)
        self.first_bytes_wait = first_bytes_wait
        self.ids = itertools.count(1)
        self.sessions: dict[int, Session] = {}
        #: resumable sessions (``resume_broker.ResumableSessions``: count, snapshot(), drops,
        #: resumes, expiries, resume_failures); None when the port takes no connector links
        self.standby: Any = None
        self.sessions_total = 0
        self.sessions_failed = 0
        self.refused_total = 0
        self._refused_since_log = 0
        self._refusal_logged_at = -1e9
        self.handshake_failures = 0  # TLS handshakes that failed or timed out (session_tls)
        self.upstream_tls: Any = None  # set by session_tls.SessionTLS for SSL_ENCRYPT_UPSTREAM

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if self.recognisers:  # the cap applies once the first bytes say it is a new session
            return FirstBytes(self)
        if self.full():
            self._refuse(addr)
            return None  # the reactor closes the connection at once
        return ClientSide(self)

    def full(self) -> bool:
        """True when MAX_SESSIONS sessions are open (a resumed session is not a new one)."""
        return bool(self.max_sessions) and len(self.sessions) >= self.max_sessions

    def _refuse(self, addr: Any) -> None:
        self.refused_total += 1
        self._refused_since_log += 1
        now = self.clock.seconds()
        if now - self._refusal_logged_at >= 10:
            log.warn(
                "session cap MAX_SESSIONS={cap} reached: refused {count} connection(s), latest "
                "from {client}", cap=self.max_sessions, count=self._refused_since_log,
                client=f"{getattr(addr, 'host', addr)}:{getattr(addr, 'port', '')}",
            )
            self._refusal_logged_at = now
            self._refused_since_log = 0

    def session_started(self, session: Session) -> None:
        self.sessions[session.session_id] = session
        self.sessions_total += 1

    def session_ended(self, session: Session, how: str) -> None:
        self.sessions.pop(session.session_id, None)
        connected = session.server is not None and session.backend is not None
        server_id = session.backend.server_id if connected else None  # type: ignore[union-attr]
        duration = self.clock.seconds() - session.started
        bytes_in = session.client.received
        bytes_out = session.server.received if session.server else 0
        self.bytes_in_total += bytes_in
        self.bytes_out_total += bytes_out
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
