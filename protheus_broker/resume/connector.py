"""The workstation connector: SmartClient connects here, sessions reach the broker resumably.

Each accepted SmartClient connection is a :class:`ConnectorStream`.  It opens a session on the
broker (X25519 key exchange: both sides derive the resume secret, which never travels), then
relays.  When the link drops it reconnects with a short capped backoff (:func:`backoff_policy`,
as ``ClientService`` retries, with the clock and the jitter's random source passed in), proves the
secret, and both sides replay what the other did not get.  SmartClient bytes not yet acknowledged
stay in a bounded replay buffer (full: the SmartClient is not read).  After the broker's window
it gives up and closes the SmartClient connection.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.resume import crypto
from protheus_broker.sockets import tune
from protheus_broker.resume.frames import HELLO, MAGIC, PROOF, RESUME, WELCOME, Frame, FrameError, Kind, decode_reason
from protheus_broker.resume.frames import encode, reason_frame
from protheus_broker.resume.link import FrameLink, StreamEnd
from protheus_broker.resume.replay import ReplayError
from protheus_broker.resume.settings import ConnectorConfig

log = Logger()

#: Retries after a drop that go at once, before any backoff (a drop is often one reset: the link is
#: back at the first try).
RETRIES_AT_ONCE = 2
#: The first delayed retry, doubling after each failure up to ``ConnectorConfig.max_backoff``.
FIRST_DELAY = 0.08


def backoff_policy(initial_delay: float = FIRST_DELAY, max_delay: float = 0.25, factor: float = 2.0,
                   jitter: Callable[[], float] | None = None,
                   at_once: int = RETRIES_AT_ONCE) -> Callable[[int], float]:
    """Seconds to wait before retry number *attempt* (1 = the first after the drop), the way
    ``twisted.application.internet.backoffPolicy`` gives them to ``ClientService``.

    The first *at_once* retries wait nothing; then *initial_delay*, times *factor* after each
    failure, capped at *max_delay*; each delay is multiplied by ``jitter()`` (default: from 0.5
    to 1.0, drawn from :mod:`random`) so that many sessions dropped together do not retry in step.
    With the defaults: 0, 0, 80 ms, 160 ms, then 250 ms, each with 50-100 % jitter.
    """
    scale = jitter if jitter is not None else half_to_full(random.Random())

    def policy(attempt: int) -> float:
        if attempt <= at_once:
            return 0.0
        try:
            delay = min(initial_delay * factor ** min(attempt - at_once - 1, 100), max_delay)
        except OverflowError:
            delay = max_delay
        return delay * scale()

    return policy


def half_to_full(rng: random.Random) -> Callable[[], float]:
    """A jitter source for :func:`backoff_policy`: factors from 0.5 to 1.0 drawn from *rng*."""
    return lambda: rng.uniform(0.5, 1.0)


class ConnectorFactory(ServerFactory):
    """Accepts SmartClient connections on the workstation and carries each to the broker.

    *clock* (default: the reactor) times keepalives, retries and the window; *rng* (default: a
    new ``random.Random``) draws the retry jitter, so tests pass seeded ones."""

    noisy = False

    def __init__(self, reactor: Any, config: ConnectorConfig, clock: IReactorTime | None = None,
                 rng: random.Random | None = None) -> None:
        self.reactor = reactor
        self.clock: Any = clock if clock is not None else reactor
        self.config = config
        jitter = half_to_full(rng if rng is not None else random.Random())
        #: Seconds before a session's retry number n after a drop (see :func:`backoff_policy`).
        self.retry_delay = backoff_policy(max_delay=config.max_backoff, jitter=jitter)
        self.streams: set[ConnectorStream] = set()
        self.drops = 0
        self.resumes = 0
        self.expiries = 0

    def buildProtocol(self, addr: Any) -> LocalSide:
        return LocalSide(self)


@implementer(IHalfCloseableProtocol)
class LocalSide(Protocol):
    """The SmartClient's connection to the connector."""

    transport: Any

    def __init__(self, factory: ConnectorFactory) -> None:
        self.factory = factory
        self.stream: ConnectorStream | None = None

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # nothing is read until the broker welcomes the session
        tune(self.transport)
        self.stream = ConnectorStream(self.factory, self)
        self.stream.connect()

    def dataReceived(self, data: bytes) -> None:
        assert self.stream is not None
        self.stream.send_data(data)

    def readConnectionLost(self) -> None:
        assert self.stream is not None
        self.stream.send_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.stream is not None:
            self.stream.local_gone()


@implementer(IPushProducer)
class ConnectorStream(StreamEnd):
    """One SmartClient session on the connector side."""

    link: ConnectorLink | None
    ack_first_at_once = True  # the broker keeps the session in standby only once we did

    def __init__(self, factory: ConnectorFactory, local: LocalSide) -> None:
        super().__init__(factory.config.buffer_size)
        self.factory = factory
        self.clock = factory.clock
        self.local = local
        self.key: bytes | None = None  # session id, once welcomed
        self.secret = b""
        self.window = 0.0
        self.dropped_at: float | None = None
        self.failures = 0  # retries since the link was last good (welcomed or resumed)
        self.retry: Any = None
        self.local_closed = False
        self.drop_counted = False  # the current outage was counted (and logged) as a drop
        factory.streams.add(self)

    def connect(self) -> None:
        """One attempt to reach the broker (opening or resuming)."""
        self.retry = None
        if self.finished:
            return
        config = self.factory.config
        self.factory.reactor.connectTCP(config.broker_host, config.broker_port, LinkFactory(self),
                                        timeout=config.connect_timeout)

    def welcomed(self, link: ConnectorLink, key: bytes, secret: bytes, window: float) -> None:
        self.key, self.secret, self.window = key, secret, window
        self.attach(link, 0)
        if not self.local_closed:
            self.local.transport.registerProducer(self, True)
            if not self.source_paused:
                self.local.transport.resumeProducing()
        log.info("{text}", text=f"connector session {key.hex()[:8]} open to "
                 f"{self.factory.config.broker_host}:{self.factory.config.broker_port}; "
                 f"resumable for {window:g}s", event="connector.open", session=key.hex()[:8])
        self.check_done()

    def resumed(self, link: ConnectorLink, position: int) -> None:
        downtime = self.clock.seconds() - self.dropped_at if self.dropped_at is not None else 0.0
        try:
            replayed = self.attach(link, position)
        except ReplayError as exc:
            self.give_up(f"broker cannot continue the stream: {exc}")
            return
        self.dropped_at = None
        self.failures = 0
        assert self.key is not None
        if not self.drop_counted:  # only confirming the end of a finished session
            self.check_done()
            return
        self.drop_counted = False
        self.factory.resumes += 1
        log.info("{text}", text=f"connector session {self.key.hex()[:8]} resumed after {downtime:.3f}s; "
                 f"replayed {replayed} bytes", event="connector.resumed", session=self.key.hex()[:8],
                 downtime=downtime, bytes_replayed=replayed)
        self.check_done()

    def link_lost(self, link: FrameLink | None, reason: Failure) -> None:
        """The link (or an attempt at one) is gone: retry within the window, or give up."""
        if self.finished:
            return
        if self.key is None:
            self.give_up(f"cannot open a session on the broker: {_why(reason)}")
            return
        now = self.clock.seconds()
        if self.dropped_at is None and self.complete:
            # Both streams are delivered; reconnect only so that the broker learns it too (it
            # may already have ended the session: then it refuses, which is the end).
            self.dropped_at = now
            log.info("{text}", text=f"connector session {self.key.hex()[:8]}: link dropped after both "
                     f"streams ended; confirming the end with the broker", event="connector.closing",
                     session=self.key.hex()[:8])
        elif self.dropped_at is None:
            self.dropped_at = now
            self.drop_counted = True
            self.factory.drops += 1
            log.info("{text}", text=f"connector session {self.key.hex()[:8]}: link to the broker "
                     f"dropped ({_why(reason)}); reconnecting for up to {self.window:g}s",
                     event="connector.drop", session=self.key.hex()[:8], window=self.window)
        if now - self.dropped_at >= self.window:
            self.factory.expiries += 1
            log.info("{text}", text=f"connector session {self.key.hex()[:8]}: no resume within "
                     f"{self.window:g}s; closing the SmartClient connection",
                     event="connector.expired", session=self.key.hex()[:8], window=self.window)
            self.give_up(None)
            return
        # Twice at once, then 80, 160 ms ... capped at max_backoff (250 ms: back within a second of
        # the network returning), with jitter so that many sessions do not retry in step.
        self.failures += 1
        self.retry = self.clock.callLater(self.factory.retry_delay(self.failures), self.connect)

    @property
    def complete(self) -> bool:
        """Both streams delivered: the broker's EOF arrived and ours was acknowledged."""
        return self.peer_eof and self.out.eof_acknowledged

    def refused(self, why: str) -> None:
        if self.complete:
            log.info("{text}", text=f"connector session: ended ({why})", event="connector.closed")
            self._end()
            return
        self.give_up(f"the broker refused the session: {why}")

    def give_up(self, why: str | None) -> None:
        if why is not None:
            log.warn("{text}", text=f"connector session: {why}; closing the SmartClient connection",
                     event="connector.failed", why=why)
        self._end()

    def _end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.factory.streams.discard(self)
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        link = self.link
        self.detach()
        if link is not None:
            link.stream = None
            link.close()
        self.out = type(self.out)(0)
        if not self.local_closed:
            self.local.transport.loseConnection()

    def local_gone(self) -> None:
        """The SmartClient closed: deliver the rest of its stream, then close the session."""
        self.local_closed = True
        if self.key is None:  # no session yet: nothing to deliver
            self._end()
            return
        self.closing = True
        self.send_eof()
        self.check_done()

    # --- StreamEnd ----------------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        if not self.local_closed:
            self.local.transport.write(data)

    def deliver_eof(self) -> None:
        if not self.local_closed:
            self.local.transport.loseWriteConnection()

    def pause_source(self) -> None:
        if not self.local_closed:
            self.local.transport.pauseProducing()

    def resume_source(self) -> None:
        if not self.local_closed and self.key is not None:
            self.local.transport.resumeProducing()

    def check_done(self) -> None:
        if self.closing and not self.finished and self.out.eof_acknowledged and self.link is not None:
            self.link.send(reason_frame(Kind.CLOSE, "SmartClient closed"))
            self._end()

    def peer_closed(self, reason: str) -> None:
        self._end()

    def stopProducing(self) -> None:
        pass


def _why(reason: Failure) -> str:
    text = str(reason.value).strip().rstrip(".")
    return text or type(reason.value).__name__


class LinkFactory(ClientFactory):
    """One connection attempt of one session."""

    noisy = False

    def __init__(self, stream: ConnectorStream) -> None:
        self.stream = stream

    def buildProtocol(self, addr: Any) -> ConnectorLink:
        return ConnectorLink(self.stream)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.stream.link_lost(None, reason)


class ConnectorLink(FrameLink):
    """The connector's end of one link: open or resume, then the stream's frames."""

    stream: ConnectorStream | None

    def __init__(self, stream: ConnectorStream) -> None:
        config = stream.factory.config
        super().__init__(stream.clock, config.keepalive, config.dead_after,
                         handshake_timeout=config.handshake_timeout)
        self.owner = stream
        self.pair: crypto.KeyPair | None = None
        self.connector_nonce = b""
        self.broker_nonce = b""
        self.state = ""

    def connectionMade(self) -> None:
        super().connectionMade()
        stream = self.owner
        if stream.finished:
            self.close()
            return
        if stream.key is None:
            self.pair = crypto.KeyPair()
            hello = HELLO.pack(self.pair.public, stream.out.limit)
            self.transport.write(MAGIC + encode(Kind.HELLO, hello))
            self.state = "welcome"
        else:
            self.connector_nonce = crypto.new_nonce()
            self.transport.write(MAGIC + encode(Kind.RESUME, RESUME.pack(stream.key, self.connector_nonce)))
            self.state = "challenge"

    def handshake_frame(self, frame: Frame) -> None:
        kind = frame.kind
        stream = self.owner
        if stream.finished:  # the SmartClient left while we were connecting
            if kind is Kind.WELCOME or kind is Kind.RESUMED:
                self.send(reason_frame(Kind.CLOSE, "SmartClient closed"))
            self.close()
            return
        if kind is Kind.REFUSE:
            self.close()
            stream.refused(decode_reason(frame.payload))
        elif self.state == "welcome" and kind is Kind.WELCOME:
            key, public, window_ms, limit = WELCOME.unpack(frame.payload)
            assert self.pair is not None
            try:
                secret = self.pair.secret(public, key)
            except ValueError:
                raise FrameError("WELCOME carries an unusable public key") from None
            self.state = "open"
            self.stream = stream
            stream.peer_limit(limit)
            stream.welcomed(self, key, secret, window_ms / 1000.0)
        elif self.state == "challenge" and kind is Kind.CHALLENGE:
            assert stream.key is not None
            self.broker_nonce = frame.payload
            mac = crypto.proof(stream.secret, b"connector", stream.key, self.connector_nonce,
                               self.broker_nonce, stream.received)
            self.send(encode(Kind.PROOF, PROOF.pack(mac, stream.received)))
            self.state = "resumed"
        elif self.state == "resumed" and kind is Kind.RESUMED:
            assert stream.key is not None
            mac, position = PROOF.unpack(frame.payload)
            expected = crypto.proof(stream.secret, b"broker", stream.key, self.connector_nonce,
                                    self.broker_nonce, position)
            if not crypto.same(mac, expected):
                raise FrameError("the broker's resume proof does not match: not our broker")
            self.state = "open"
            self.stream = stream
            stream.resumed(self, position)
        else:
            raise FrameError(f"unexpected {kind.name} frame during the handshake")

    def lost_unattached(self, reason: Failure) -> None:
        if self.stream is None and not self.owner.finished and self.owner.link is None:
            self.owner.link_lost(self, reason)
