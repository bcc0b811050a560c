"""What both ends of a resumable session share: the stream state and the frame link.

:class:`StreamEnd` is one end's state of a session, whichever link carries it: the replay buffer of
what it sent, the position it has received, acknowledgements, half-close and backpressure.  A
:class:`FrameLink` is one TCP connection carrying frames; a session outlives its links.  The broker
(:mod:`.resume_broker`) and the connector (:mod:`.connector`) subclass both.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from protheus_broker.sockets import tune
from protheus_broker.resume.frames import MAX_PAYLOAD, Frame, FrameError, FrameParser, Kind, count_frame, decode_count
from protheus_broker.resume.frames import encode, header
from protheus_broker.resume.replay import ReplayBuffer, ReplayError

log = Logger()


class StreamEnd:
    """One end of a resumable session's two byte streams.

    Subclasses say where received bytes go (:meth:`deliver`, :meth:`deliver_eof`), how to stop
    and restart their source (:meth:`pause_source`, :meth:`resume_source`) and when the session is
    over (:meth:`check_done`).
    """

    link: FrameLink | None
    #: acknowledge the peer's first stream bytes at once (the connector: its first acknowledgement
    #: of AppServer bytes is what earns the session its standby on the broker)
    ack_first_at_once = False

    def __init__(self, limit: int) -> None:
        self.out = ReplayBuffer(limit)
        self.ack_every = max(1, limit // 4)  # acknowledge after a quarter of the smaller window
        self.received = 0  # stream positions received, the EOF included
        self.peer_eof = False
        self.unacked = 0
        self.link = None
        self.source_paused = False  # our source is paused because the replay buffer is full
        self.reading_paused = False  # our consumer cannot take more: links stop reading
        self.closing = False  # end the session once our EOF is acknowledged
        self.finished = False

    def peer_limit(self, limit: int) -> None:
        """The peer's replay buffer holds *limit* bytes: acknowledge often enough that it never
        stalls waiting for us."""
        self.ack_every = max(1, min(self.out.limit, limit) // 4)

    # --- outgoing -------------------------------------------------------------------------

    def send_data(self, data: bytes) -> None:
        if self.finished or not data:
            return
        self.out.append(data)
        if self.link is not None:
            self.link.send_data(data)
        if self.out.full and not self.source_paused:
            self.source_paused = True
            self.pause_source()

    def send_eof(self) -> None:
        if self.finished or self.out.eof:
            return
        self.out.close()
        if self.link is not None:
            self.link.send(encode(Kind.EOF))

    def on_ack(self, position: int) -> None:
        self.out.ack(position)
        self._maybe_resume_source()
        self.check_done()

    def _maybe_resume_source(self) -> None:
        if self.source_paused and self.out.size <= self.out.limit // 2 and not self.finished:
            self.source_paused = False
            self.resume_source()

    # --- incoming -------------------------------------------------------------------------

    def on_data(self, payload: bytes) -> None:
        if self.peer_eof:
            raise FrameError("DATA after EOF")
        first = self.received == 0 and self.ack_first_at_once
        self.received += len(payload)
        self.unacked += len(payload)
        self.deliver(payload)
        if (self.unacked >= self.ack_every or first) and self.link is not None:
            self.send_ack()

    def on_eof(self) -> None:
        if self.peer_eof:
            raise FrameError("a second EOF")
        self.peer_eof = True
        self.received += 1
        self.send_ack()
        self.deliver_eof()
        self.check_done()

    def send_ack(self) -> None:
        self.unacked = 0
        if self.link is not None:
            self.link.send(count_frame(Kind.ACK, self.received))

    # --- links ----------------------------------------------------------------------------

    def attach(self, link: FrameLink, peer_position: int) -> int:
        """Carry the session over *link*; the peer holds our stream up to *peer_position*:
        resend the rest.  Returns the bytes replayed.  :class:`ReplayError` if we cannot."""
        self.out.ack(peer_position)
        chunks, eof = self.out.since(peer_position)
        self.link = link
        link.handshake_done()
        self.unacked = 0
        replayed = 0
        for chunk in chunks:
            link.send_data(chunk)
            replayed += len(chunk)
        if eof:
            link.send(encode(Kind.EOF))
        if self.reading_paused:
            link.pause_reading()
        self._maybe_resume_source()
        return replayed

    def detach(self) -> None:
        self.link = None

    def frame_received(self, frame: Frame) -> None:
        """A stream frame on the attached link (handshakes are the links' business)."""
        kind = frame.kind
        if kind is Kind.DATA:
            self.on_data(frame.payload)
        elif kind is Kind.ACK or kind is Kind.PING:
            try:
                self.on_ack(decode_count(frame.payload))
            except ReplayError as exc:
                raise FrameError(str(exc)) from None
        elif kind is Kind.EOF:
            self.on_eof()
        elif kind is Kind.CLOSE:
            self.peer_closed(frame.payload.decode("utf-8", errors="replace"))
        else:
            raise FrameError(f"unexpected {kind.name} frame on an established link")

    # --- backpressure from our consumer ---------------------------------------------------

    def pauseProducing(self) -> None:
        self.reading_paused = True
        if self.link is not None:
            self.link.pause_reading()

    def resumeProducing(self) -> None:
        self.reading_paused = False
        if self.link is not None:
            self.link.resume_reading()

    # --- for subclasses ---------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        raise NotImplementedError

    def deliver_eof(self) -> None:
        raise NotImplementedError

    def pause_source(self) -> None:
        raise NotImplementedError

    def resume_source(self) -> None:
        raise NotImplementedError

    def check_done(self) -> None:
        raise NotImplementedError

    def peer_closed(self, reason: str) -> None:
        raise NotImplementedError

    def link_lost(self, link: FrameLink, reason: Failure) -> None:
        raise NotImplementedError


class FrameLink(Protocol):
    """One TCP connection carrying frames, with keepalive: a PING (which also acknowledges)
    every *keepalive* seconds, and a link silent for *dead_after* seconds is aborted."""

    transport: Any
    stream: StreamEnd | None = None

    def __init__(self, clock: Any, keepalive: float, dead_after: float,
                 handshake_timeout: float) -> None:
        self.clock = clock
        self.keepalive = keepalive
        self.dead_after = dead_after
        self.handshake_timeout = handshake_timeout
        self.parser = FrameParser()
        self.last_heard = 0.0
        self.timer: Any = None
        self.handshake_timer: Any = None
        self.closed = False
        self.paused = False

    def connectionMade(self) -> None:
        tune(self.transport)
        self.last_heard = self.clock.seconds()
        self.timer = self.clock.callLater(self.keepalive, self._tick)
        self.handshake_timer = self.clock.callLater(self.handshake_timeout, self._handshake_expired)

    def handshake_done(self) -> None:
        """The link carries a session now: the handshake deadline no longer applies."""
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None

    def _handshake_expired(self) -> None:
        self.handshake_timer = None
        if not self.closed:
            self.drop(f"no handshake within {self.handshake_timeout:g}s")

    def _tick(self) -> None:
        self.timer = None
        if self.closed:
            return
        silent = self.clock.seconds() - self.last_heard
        if silent >= self.dead_after and not self.paused:
            self.drop(f"no frame for {silent:.1f}s")
            return
        stream = self.stream
        if stream is not None and stream.link is self:
            stream.unacked = 0
            self.send(count_frame(Kind.PING, stream.received))
        self.timer = self.clock.callLater(self.keepalive, self._tick)

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_heard = self.clock.seconds()
        try:
            data = self.before_frames(data)
            for frame in self.parser.feed(data) if data else ():
                if self.closed:
                    return
                stream = self.stream
                if stream is not None and stream.link is self:
                    stream.frame_received(frame)
                else:
                    self.handshake_frame(frame)
        except FrameError as exc:
            self.protocol_error(str(exc))

    def before_frames(self, data: bytes) -> bytes:
        """Bytes that precede the frames (the broker reads the magic here)."""
        return data

    def handshake_frame(self, frame: Frame) -> None:
        raise NotImplementedError

    def protocol_error(self, why: str) -> None:
        """The peer broke the protocol: say so in the log and drop the link."""
        self.drop(f"protocol error: {why}")

    def drop(self, why: str) -> None:
        log.info("resumable link {peer}: dropping: {why}", peer=self.peer_text(), why=why)
        self.closed = True
        self.transport.abortConnection()

    def peer_text(self) -> str:
        peer = self.transport.getPeer()
        return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"

    def send(self, frame: bytes) -> None:
        if not self.closed:
            self.transport.write(frame)

    def send_data(self, data: bytes) -> None:
        if self.closed:
            return
        write = self.transport.write
        for start in range(0, len(data), MAX_PAYLOAD):
            chunk = data[start:start + MAX_PAYLOAD] if len(data) > MAX_PAYLOAD else data
            write(header(Kind.DATA, len(chunk)))
            write(chunk)

    def close(self) -> None:
        """Close after what is written is sent."""
        self.closed = True
        self.transport.loseConnection()

    def pause_reading(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.last_heard = self.clock.seconds()
            self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.handshake_done()
        stream = self.stream
        if stream is not None and stream.link is self:
            stream.detach()
            stream.link_lost(self, reason)
        else:
            self.lost_unattached(reason)

    def lost_unattached(self, reason: Failure) -> None:
        """Lost before (or after) carrying a session."""
