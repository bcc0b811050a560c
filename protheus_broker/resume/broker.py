"""Broker side of resumable sessions: connector links on the SmartClient port.

A connector link is told apart from a plain SmartClient by its first bytes (:class:`ResumeRecogniser`
for :class:`~.proxy.FirstBytes`).  Each resumable session is a :class:`BrokerStream`: it is the
*transport* of an ordinary :class:`~.proxy.ClientSide`, so the proxy's ``Session`` chooses and
connects the AppServer, relays, accounts and appears in ``BrokerFactory.sessions`` as any other.
Links come and go under it; while none is attached the session is in standby for ``STANDBY_TIME``
seconds.

Standby is earned: a session is kept in standby only once it is *established*, that is once the
connector has acknowledged AppServer bytes (see :attr:`BrokerStream.established`).  A session whose
link drops before that ends at once, so a client that opens sessions and resets them holds nothing.
At most ``STANDBY_MAX_SESSIONS`` sessions wait in standby; a further drop ends the oldest of them.
In standby the AppServer is not read: the session holds only what the connector had not
acknowledged when the link dropped, and the AppServer's bytes wait in its socket buffers.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.resume import crypto
from protheus_broker.desktop.proxy import BrokerFactory, ClientSide
from protheus_broker.resume.frames import HELLO, PROOF, RESUME, WELCOME, Frame, FrameError, Kind, MagicReader
from protheus_broker.resume.frames import encode, reason_frame, recognise
from protheus_broker.resume.link import FrameLink, StreamEnd
from protheus_broker.resume.replay import ReplayError
from protheus_broker.resume.settings import ResumeConfig
from protheus_broker.stats import ISessionStats, SessionStats

log = Logger()

#: Seconds a new link has to open or resume a session before it is dropped.
HANDSHAKE_TIMEOUT = 10.0


class SessionEnded(ConnectionLost):
    """Why the broker ended a resumable session itself; reads as just that reason (the proxy puts
    it in the session's end line)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "session ended"


class ResumableSessions:
    """The broker's resumable sessions (``BrokerFactory.standby``), with standby accounting."""

    # The counters, read from the recorder (for callers and tests that read them here).
    drops = property(lambda self: self.stats.get("drops"))
    resumes = property(lambda self: self.stats.get("resumes"))
    expiries = property(lambda self: self.stats.get("expiries"))
    resume_failures = property(lambda self: self.stats.get("resume_failures"))
    unestablished = property(lambda self: self.stats.get("unestablished_drops"))
    evictions = property(lambda self: self.stats.get("standby_evictions"))

    def __init__(self, clock: Any, config: ResumeConfig, stats: ISessionStats | None = None) -> None:
        self.clock = clock
        self.config = config
        #: the unit's counters: drops, resumes, expiries, resume_failures, unestablished_drops
        #: (links dropped before their session was established), standby_evictions (ended to
        #: make room for a newer drop at STANDBY_MAX_SESSIONS)
        self.stats: ISessionStats = stats if stats is not None else SessionStats()
        self.streams: dict[bytes, BrokerStream] = {}
        #: in standby (no link attached), oldest drop first (a dict keeps insertion order)
        self.waiting: dict[BrokerStream, None] = {}
        self._evicted_since_log = 0
        self._eviction_logged_at = -1e9
        self.recogniser = ResumeRecogniser(self)

    @property
    def count(self) -> int:
        """Sessions in standby now."""
        return len(self.waiting)

    @property
    def cap(self) -> int:
        """``STANDBY_MAX_SESSIONS``: sessions that may wait in standby at once."""
        return self.config.standby_max_sessions

    def snapshot(self) -> list[dict[str, Any]]:
        """The sessions in standby, oldest drop first, for the status page."""
        return [stream.describe() for stream in self.waiting]

    def make_room(self) -> None:
        """Before one more session goes to standby: end the oldest ones while the cap is reached.

        The oldest is the least likely to come back (most outages are short, and it has spent
        the most of its window); ending it rather than the new drop means a flood of drops cannot
        keep real sessions out of standby for a whole window, only for as long as it keeps
        pushing ``STANDBY_MAX_SESSIONS`` sessions through, and memory stays bounded either way."""
        cap = self.cap
        while len(self.waiting) >= cap:
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]  # (_end forgets it too; this keeps the loop finite regardless)
            self.stats.record("standby_evictions")
            self._evicted_since_log += 1
            now = self.clock.seconds()
            if now - self._eviction_logged_at >= 10:
                log.warn(
                    "{text}", text=f"standby full (STANDBY_MAX_SESSIONS={cap}): ended "
                    f"{self._evicted_since_log} oldest session(s) in standby to take newer drops, "
                    f"latest session {oldest.session_id} from {_address(oldest.peer)}",
                    event="resume.evicted", cap=cap, count=self._evicted_since_log,
                    session_id=oldest.session_id,
                )
                self._eviction_logged_at = now
                self._evicted_since_log = 0
            oldest._end(Failure(SessionEnded(
                f"ended in standby to make room for a newer drop (STANDBY_MAX_SESSIONS={cap})")))

    def open(self, broker: BrokerFactory, link: BrokerLink, secret: bytes, key: bytes) -> BrokerStream:
        stream = BrokerStream(self, broker, key, secret, link.transport.getPeer())
        self.streams[key] = stream
        return stream

    def forget(self, stream: BrokerStream) -> None:
        self.streams.pop(stream.key, None)
        self.waiting.pop(stream, None)


class ResumeRecogniser:
    """Claims connections that open with the resumable link's magic."""

    name = "resumable"
    carries_sessions = True  # its links' sessions count as pending until their AppServer answers

    def __init__(self, sessions: ResumableSessions) -> None:
        self.sessions = sessions

    def recognise(self, prefix: bytes) -> bool | None:
        return recognise(prefix)

    def take_over(self, broker: BrokerFactory, prefix: bytes) -> BrokerLink:
        return BrokerLink(self.sessions, broker)


@implementer(ITransport, IConsumer, IPushProducer)
class BrokerStream(StreamEnd):
    """One resumable session on the broker, and the transport its ClientSide writes to.

    ``established`` turns true once the connector acknowledges AppServer bytes (an ACK or PING
    past position 0).  Only then does a dropped link put the session in standby.  Why this rule:
    an acknowledgement of AppServer data cannot be sent blind (a position beyond what was sent is
    a protocol error that drops the link), so it proves that the peer kept the link open until the
    AppServer answered and read that answer: a session that got as far as a login.  A HELLO
    followed by a reset costs the sender nothing, and must cost the broker nothing either.  (A
    proof of the session's secret would add nothing: whoever sent the HELLO derived that secret.)
    Our connector acknowledges the first AppServer bytes at once, so a real session is
    established one round trip after the AppServer first speaks; a drop before then loses no
    state worth keeping (the SmartClient logs in again, as after a drop before the WELCOME).
    """

    client: ClientSide

    def __init__(self, sessions: ResumableSessions, broker: BrokerFactory, key: bytes, secret: bytes,
                 peer: Any) -> None:
        super().__init__(sessions.config.buffer_size)
        self.sessions = sessions
        self.broker = broker
        self.clock = sessions.clock
        self.key = key
        self.secret = secret
        self.peer = peer
        self.producer: Any = None  # the AppServer's transport, paused while our buffer is full
        self.held: list[bytes] = []  # client bytes that came before the AppServer was linked
        self.held_eof = False
        self.dropped_at: float | None = None
        self.expiry: Any = None
        self.connected = True
        self.disconnecting = False
        self.established = False

    def start(self) -> None:
        """Open the AppServer side through the ordinary proxy session."""
        self.client = ClientSide(self.broker)
        self.client.makeConnection(self)  # type: ignore[arg-type]

    @property
    def session_id(self) -> int | None:
        session = getattr(self.client, "session", None)
        return session.session_id if session is not None else None

    def describe(self) -> dict[str, Any]:
        session = getattr(self.client, "session", None)
        backend = session.backend if session is not None else None
        return {
            "session_id": self.session_id,
            "client": session.client_address if session is not None else _address(self.peer),
            "server_id": backend.server_id if backend is not None else None,
            "since": self.dropped_at,
            "buffered_bytes": self.out.size,
        }

    # --- ITransport for the ClientSide --------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.send_data(data)

    def writeSequence(self, data: Any) -> None:
        self.send_data(b"".join(data))

    def loseWriteConnection(self) -> None:
        self.send_eof()
        self.client.writeConnectionLost()

    def loseConnection(self) -> None:
        """The proxy is done with the client (its AppServer closed, or none answered): end the
        stream, and the session once the connector holds everything."""
        if self.finished or self.closing:
            return
        self.closing = True
        self.disconnecting = True
        self.send_eof()
        self.check_done()

    abortConnection = loseConnection

    def getPeer(self) -> Any:
        return self.peer

    def getHost(self) -> Any:
        link = self.link
        return link.transport.getHost() if link is not None else None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        if self.source_paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def stopProducing(self) -> None:
        self.loseConnection()

    def resumeProducing(self) -> None:
        """The ClientSide (or the AppServer's buffer) can take client bytes again."""
        self.reading_paused = False
        if self.client.peer is not None:
            while self.held and not self.reading_paused:
                self.client.dataReceived(self.held.pop(0))
            if self.held_eof and not self.held:
                self.held_eof = False
                self.client.readConnectionLost()
        if not self.reading_paused and not self.held:
            super().resumeProducing()

    # --- StreamEnd ------------------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        if self.client.peer is None or self.held:
            self.held.append(data)  # bounded by the connector's replay buffer
        else:
            self.client.dataReceived(data)

    def deliver_eof(self) -> None:
        if self.client.peer is None or self.held:
            self.held_eof = True
        else:
            self.client.readConnectionLost()

    def pause_source(self) -> None:
        if self.producer is not None:
            self.producer.pauseProducing()

    def resume_source(self) -> None:
        if self.producer is not None:
            self.producer.resumeProducing()

    def check_done(self) -> None:
        if self.closing and not self.finished and self.out.eof_acknowledged:
            how = self.client.session.how if getattr(self.client, "session", None) else None
            self._end(Failure(ConnectionDone()), close_reason=how or "session over")

    def peer_closed(self, reason: str) -> None:
        self._end(Failure(ConnectionDone()))

    def on_ack(self, position: int) -> None:
        super().on_ack(position)
        if not self.established and (self.out.base > 0 or self.out.eof_acknowledged):
            self.established = True

    def link_lost(self, link: FrameLink, reason: Failure) -> None:
        if self.finished:
            return
        if self.peer_eof and self.out.eof_acknowledged:
            # Both streams were delivered whole: nothing is left to resume.
            self._end(Failure(ConnectionDone()))
            return
        why = _why(reason)
        if not self.established:
            # Nothing earned a place in standby: end now, freeing the slot and the AppServer
            # connection.  The session's end is logged once, by the proxy, with this reason.
            self.sessions.stats.record("unestablished_drops")
            self._end(Failure(SessionEnded(
                f"resumable link dropped ({why}) before the session was established (no AppServer "
                f"bytes acknowledged); not kept in standby")))
            return
        self._standby(why)

    def _standby(self, why: str) -> None:
        """No link carries the session: wait for a resume up to the window, reading nothing
        from the AppServer meanwhile."""
        self.sessions.make_room()
        self.dropped_at = self.clock.seconds()
        self.sessions.waiting[self] = None
        self.sessions.stats.record("drops")
        if not self.source_paused:
            # What the AppServer sends now waits in its socket buffers, not in our memory.
            self.source_paused = True
            self.pause_source()
        window = self.sessions.config.standby_time
        if self.expiry is None:
            self.expiry = self.clock.callLater(window, self.expire)
        client = _address(self.peer)
        log.info(
            "{text}", text=f"resumable session {self.session_id} from {client}: link dropped "
            f"({why}); standby up to {window:g}s, {self.out.size} bytes buffered",
            event="resume.drop", session_id=self.session_id, client=client, why=why,
            window=window, buffered_bytes=self.out.size,
        )

    def resumed(self, link: BrokerLink, position: int) -> None:
        """A link proved the secret: carry on over it from *position*.  :class:`ReplayError` if
        the connector claims a position we cannot serve."""
        old = self.link
        if old is not None:  # the connector saw the drop before we did, or roams
            old.stream = None
            old.drop("replaced by a resumed link")
            self.detach()
            self._replaced()
        assert self.dropped_at is not None
        downtime = self.clock.seconds() - self.dropped_at
        self.out.check(position)  # before anything is sent: it may refuse
        link.send(encode(Kind.RESUMED, PROOF.pack(
            crypto.proof(self.secret, b"broker", self.key, link.connector_nonce, link.broker_nonce,
                         self.received), self.received)))
        replayed = self.attach(link, position)
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.sessions.waiting.pop(self, None)
        self.dropped_at = None
        self.peer = link.peer_address
        link.stream = self
        self.sessions.stats.record("resumes")
        client = _address(link.peer_address)
        log.info(
            "{text}", text=f"resumable session {self.session_id} resumed from {client} after "
            f"{downtime:.3f}s; replayed {replayed} bytes",
            event="resume.resumed", session_id=self.session_id, client=client,
            downtime=downtime, bytes_replayed=replayed,
        )
        self.check_done()

    def _replaced(self) -> None:
        """A proven link takes over from one still attached: a drop, with no standby between."""
        self.dropped_at = self.clock.seconds()
        self.sessions.stats.record("drops")
        client = _address(self.peer)
        log.info(
            "{text}", text=f"resumable session {self.session_id} from {client}: link dropped "
            f"(replaced by a new link); {self.out.size} bytes buffered",
            event="resume.drop", session_id=self.session_id, client=client,
            why="replaced by a new link", window=self.sessions.config.standby_time,
            buffered_bytes=self.out.size,
        )

    def expire(self) -> None:
        self.expiry = None
        if self.finished:
            return
        self.sessions.stats.record("expiries")
        window = self.sessions.config.standby_time
        log.info(
            "{text}", text=f"resumable session {self.session_id}: no resume within {window:g}s; "
            f"closing its AppServer connection ({self.out.size} bytes dropped from the buffer)",
            event="resume.expired", session_id=self.session_id, window=window,
            buffered_bytes=self.out.size,
        )
        self._end(Failure(SessionEnded(f"connector did not resume within {window:g}s")))

    def _end(self, reason: Failure, close_reason: str | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.connected = False
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.sessions.forget(self)
        link = self.link
        self.detach()
        if link is not None:
            if close_reason is not None:
                link.send(reason_frame(Kind.CLOSE, close_reason))
            link.stream = None
            link.close()
        self.out = type(self.out)(0)
        self.held = []
        self.client.connectionLost(reason)


def _address(peer: Any) -> str:
    return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"


def _why(reason: Failure) -> str:
    text = str(reason.value).strip().rstrip(".")
    return text or type(reason.value).__name__


class BrokerLink(FrameLink):
    """A connector's link to the broker: handshake (open or resume), then the stream's frames."""

    stream: BrokerStream | None

    def __init__(self, sessions: ResumableSessions, broker: BrokerFactory) -> None:
        config = sessions.config
        super().__init__(sessions.clock, config.keepalive, config.dead_after,
                         handshake_timeout=max(config.dead_after, HANDSHAKE_TIMEOUT))
        self.sessions = sessions
        self.broker = broker
        self.magic = MagicReader()
        self.state = "hello"
        self.candidate: BrokerStream | None = None
        self.connector_nonce = b""
        self.broker_nonce = b""
        self.peer_address: Any = None

    def connectionMade(self) -> None:
        self.peer_address = self.transport.getPeer()
        super().connectionMade()

    def before_frames(self, data: bytes) -> bytes:
        return self.magic.feed(data)

    def handshake_frame(self, frame: Frame) -> None:
        kind = frame.kind
        if self.state == "hello" and kind is Kind.HELLO:
            self._open(frame.payload)
        elif self.state == "hello" and kind is Kind.RESUME:
            self._challenge(frame.payload)
        elif self.state == "proof" and kind is Kind.PROOF:
            self._check_proof(frame.payload)
        else:
            raise FrameError(f"unexpected {kind.name} frame during the handshake")

    def _open(self, payload: bytes) -> None:
        public, limit = HELLO.unpack(payload)
        if self.broker.full():
            self.broker._refuse(self.transport.getPeer())
            self.refuse(f"the broker is full (MAX_SESSIONS={self.broker.max_sessions})")
            return
        key = crypto.new_session_id()
        pair = crypto.KeyPair()
        try:
            secret = pair.secret(public, key)
        except ValueError:
            self.refuse("HELLO carries an unusable public key")
            return
        stream = self.sessions.open(self.broker, self, secret, key)
        stream.peer_limit(limit)
        config = self.sessions.config
        self.send(encode(Kind.WELCOME, WELCOME.pack(key, pair.public, int(config.standby_time * 1000),
                                                    config.buffer_size)))
        self.state = "open"
        self.stream = stream
        stream.attach(self, 0)
        stream.start()

    def _challenge(self, payload: bytes) -> None:
        key, self.connector_nonce = RESUME.unpack(payload)
        stream = self.sessions.streams.get(key)
        if stream is None or stream.finished:
            self.sessions.stats.record("resume_failures")
            self.refuse("unknown or expired session")
            return
        self.candidate = stream
        self.broker_nonce = crypto.new_nonce()
        self.send(encode(Kind.CHALLENGE, self.broker_nonce))
        self.state = "proof"

    def _check_proof(self, payload: bytes) -> None:
        mac, position = PROOF.unpack(payload)
        stream = self.candidate
        self.candidate = None
        assert stream is not None
        expected = crypto.proof(stream.secret, b"connector", stream.key, self.connector_nonce,
                                self.broker_nonce, position)
        if not crypto.same(mac, expected):
            self.sessions.stats.record("resume_failures")
            self.refuse("resume proof does not match the session's secret")
            return
        if stream.finished:
            self.sessions.stats.record("resume_failures")
            self.refuse("unknown or expired session")
            return
        self.state = "open"
        try:
            stream.resumed(self, position)
        except ReplayError as exc:
            self.sessions.stats.record("resume_failures")
            log.error("resumable session {session_id}: cannot resume: {why}",
                      session_id=stream.session_id, why=str(exc))
            self.refuse(f"cannot resume: {exc}")
            stream._end(Failure(SessionEnded(f"resume impossible: {exc}")))

    def refuse(self, why: str) -> None:
        log.warn("{text}", text=f"resumable link {self.peer_text()}: refused: {why}",
                 event="resume.refused", client=self.peer_text(), why=why)
        self.send(reason_frame(Kind.REFUSE, why))
        self.close()

    def protocol_error(self, why: str) -> None:
        log.warn("{text}", text=f"resumable link {self.peer_text()}: protocol error: {why}",
                 event="resume.protocol_error", client=self.peer_text(), why=why)
        if self.stream is None:  # still in the handshake: say why, then close
            self.send(reason_frame(Kind.REFUSE, f"protocol error: {why}"))
            self.close()
            return
        self.closed = True
        self.transport.abortConnection()

    def lost_unattached(self, reason: Failure) -> None:
        pass
