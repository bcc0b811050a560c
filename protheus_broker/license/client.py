"""The broker's license client: one per broker process, over the AMP channel of
:mod:`protheus_broker.license.protocol`.

It connects to ``[LICENSECLIENT] SERVER:PORT`` (``ClientService`` with backoff), proves itself
with the shared secret (and checks the server's proof), adopts the leases the server still holds
for it, and keeps the local :class:`~protheus_broker.license.pool.SeatPool` the HTTP units' gates
take seats from.  ``connected``, ``since``, ``reason`` and :meth:`LicenseClient.subscribe` tell
others (the broker screen, dependency gating) whether the channel is up.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.license import protocol as lp
from protheus_broker.license.pool import ILeaseWire, NotConnected, SeatPool
from protheus_broker.license.client_settings import LicenseClientConfig
from protheus_broker.monitoring.commands import QuietAMP
from protheus_broker.tls.options import client_options

log = Logger()

#: Seconds the license server has to finish the handshake.
HANDSHAKE_TIMEOUT = 10.0
#: The same channel failure is logged again at most this often.
REPEAT_LOG_INTERVAL = 60.0
#: Seconds a stopping broker waits for the license server to confirm the leases it gives back.
RELEASE_WAIT = 2.0
#: Seconds a lease message may go unanswered; then the channel is taken for dead and reopened.
CALL_TIMEOUT = 10.0


def describe(reason: Failure) -> str:
    """One short line for a channel failure."""
    value = reason.value
    if isinstance(value, amp.RemoteAmpError):
        return f"refused by the license server: {value.description}"
    if isinstance(value, (lp.AuthenticationFailed, lp.UnsupportedVersion, lp.NotAuthenticated)):
        return f"refused by the license server: {type(value).__name__}" if not str(value) else str(value)
    if isinstance(value, (KeyError, ValueError, TypeError)):
        return f"malformed answer ({type(value).__name__}: {str(value)[:100]})"
    text = str(value).strip().rstrip(".")
    return text or type(value).__name__


class LicenseChannel(QuietAMP):
    """The broker's end of the license channel: handshake, then leases; ``Revoked`` from the
    server drops a lease.  Bounded boxes before authentication (QuietAMP)."""

    peer_role = "license server"

    def __init__(self, client: "LicenseClient") -> None:
        super().__init__()
        self.client = client
        self.authenticated = False
        self._outcome: Failure | bool | None = None
        self._waiters: list[defer.Deferred[None]] = []
        self._timeout: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self._timeout = self.client.clock.callLater(HANDSHAKE_TIMEOUT, self._too_slow)
        defer.ensureDeferred(self._handshake()).addErrback(self._failed)

    @property
    def ready(self) -> defer.Deferred[None]:
        """Fires once the handshake is over, whatever its outcome (``prepareConnection``: a failed
        handshake counts as a connection that ended, so ClientService retries with backoff)."""
        if self._outcome is not None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def _decide(self, outcome: Failure | bool) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _too_slow(self) -> None:
        self._timeout = None
        self._failed(Failure(lp.AuthenticationFailed(f"no answer to the handshake within {HANDSHAKE_TIMEOUT:g}s")))
        if self.transport is not None:
            self.transport.abortConnection()

    async def _handshake(self) -> None:
        client = self.client
        name = client.config.client_name
        secret = client.config.secret
        nonce = os.urandom(lp.NONCE_BYTES)
        client.trace("-> LicenseHello version={version} client={name}", version=lp.PROTOCOL_VERSION, name=name)
        answer = await self.callRemote(lp.LicenseHello, version=lp.PROTOCOL_VERSION, client=name,
                                       client_nonce=nonce)
        expected = lp.proof(secret, lp.SERVER_ROLE, nonce, answer["server_nonce"], name)
        if not lp.proof_matches(expected, answer["server_proof"]):
            raise lp.AuthenticationFailed("the license server's proof is wrong (a different SECRET, or not "
                                          "our license server)")
        # the server proved itself: its answer (the leases it holds for us, which may be many)
        # gets the authenticated box limits
        self.limits_before = self.limits_after
        client.trace("-> LicenseAuthenticate")
        result = await self.callRemote(
            lp.LicenseAuthenticate,
            client_proof=lp.proof(secret, lp.CLIENT_ROLE, answer["server_nonce"], nonce, name))
        if self._outcome is not None or self.transport is None:
            return  # timed out or lost meanwhile
        self.authenticated = True
        self._decide(True)
        client.trace("<- LicenseAuthenticate leases={leases}",
                     leases=" ".join(f"{x['lease_id']}:{x['license_class']}:{x['seats']}" for x in result["leases"])
                     or "none")
        client.channel_up(self, result["leases"])

    def _failed(self, failure: Failure) -> None:
        if self._outcome is not None:
            return
        why = self.dropped or f"handshake failed: {describe(failure)}"
        self._decide(failure)
        self.client.handshake_failed(why)
        if self.transport is not None:
            self.transport.loseConnection()

    @lp.Revoked.responder
    def revoked(self, lease_id: str, reason: str) -> dict[str, Any]:
        if not self.authenticated:
            self.drop("Revoked before the handshake")
            return {}
        self.client.trace("<- Revoked {lease_id} {reason}", lease_id=lease_id, reason=reason)
        self.client.pool.revoked(lease_id, reason)
        return {}

    def connectionLost(self, reason: Failure = Failure(Exception("connection lost"))) -> None:
        super().connectionLost(reason)
        if self._outcome is None:
            self._failed(reason)
        self.client.channel_lost(self, describe(reason))


class _ChannelFactory(Factory):
    noisy = False

    def __init__(self, client: "LicenseClient") -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> LicenseChannel:
        return LicenseChannel(self.client)


@implementer(IStreamClientEndpoint)
class LicenseEndpoint:
    """``SERVER:PORT``, behind mutual TLS when SSL_* are set; built at each connect, so that a
    certificate file that went bad is one failed attempt with its reason, not a traceback."""

    def __init__(self, client: "LicenseClient") -> None:
        self.client = client

    def connect(self, factory: IProtocolFactory) -> Any:
        config = self.client.config
        endpoint: Any = HostnameEndpoint(self.client.clock, config.server, config.port, timeout=config.connect_timeout)
        if config.tls is not None:
            try:
                endpoint = wrapClientTLS(client_options(config.tls, config.server), endpoint)
            except Exception as exc:
                self.client.handshake_failed(f"cannot use SSL_CERTIFICATE/SSL_KEY/SSL_CA: {exc}")
                return defer.fail(exc)
        return endpoint.connect(factory)

    def __repr__(self) -> str:  # (ClientService's "Scheduling retry N to connect ..." line)
        return f"license server {self.client.address}"


def _handshake_done(channel: Any) -> defer.Deferred[None]:
    ready: defer.Deferred[None] = channel.ready
    return ready


@implementer(ILeaseWire)
class LicenseClient(MultiService):
    """One per broker: the license channel (reconnected with backoff) and the seat pool."""

    def __init__(self, reactor: Any, config: LicenseClientConfig, endpoint: Any = None,
                 retry_policy: Callable[[int], float] | None = None) -> None:
        super().__init__()
        self.clock = reactor
        self.config = config
        self.pool = SeatPool(reactor, self, config.low_watermark, config.high_watermark, config.max_classes,
                             idle_release=config.idle_release)
        self.channel: LicenseChannel | None = None
        self.connected = False
        #: True from start until the first channel is up or CONNECT_TIMEOUT has passed: requests
        #: arriving meanwhile wait for seats instead of getting "unreachable" at once
        self.connecting = False
        self._first_window: Any = None
        self.since = reactor.seconds()
        self.reason = "not connected yet"
        self.address = f"{config.server}:{config.port}"
        self._subscribers: list[Callable[[bool, str], None]] = []
        self.failed_handshakes = 0  # in a row: the retry backoff grows with them
        self._last_problem = ""
        self._last_logged_at = -REPEAT_LOG_INTERVAL
        self._repeats = 0
        if endpoint is None:
            endpoint = LicenseEndpoint(self)
        backoff = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=10.0, factor=1.5)
        self.service = ClientService(endpoint, _ChannelFactory(self),
                                     retryPolicy=lambda attempt: backoff(attempt + self.failed_handshakes),
                                     clock=reactor, prepareConnection=_handshake_done)
        self.service.setServiceParent(self)

    # --- state for others ------------------------------------------------------------------

    def subscribe(self, callback: Callable[[bool, str], None]) -> Callable[[], None]:
        """``callback(connected, reason)`` on every change of :attr:`connected`; returns the
        function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
        return unsubscribe

    def _become(self, connected: bool, reason: str) -> None:
        self.reason = reason
        if connected == self.connected:
            return
        self.connected = connected
        self.since = self.clock.seconds()
        for callback in list(self._subscribers):
            try:
                callback(connected, reason)
            except Exception:
                log.failure("license: a subscriber failed")

    def status(self) -> dict[str, Any]:
        """The broker screen's view of the client."""
        return {"server": self.address, "client_name": self.config.client_name, "connected": self.connected,
                "since": round(self.since, 3), "reason": self.reason,
                "low_watermark": self.config.low_watermark, "high_watermark": self.config.high_watermark,
                "classes": self.pool.stats()}

    # --- the channel's events --------------------------------------------------------------

    def _first_window_over(self) -> None:
        self._first_window = None
        self.connecting = False
        if not self.connected:
            self.pool.link_down()  # waiters of classes with no seat: "unreachable" now

    def _end_first_window(self) -> None:
        self.connecting = False
        if self._first_window is not None and self._first_window.active():
            self._first_window.cancel()
        self._first_window = None

    def channel_up(self, channel: LicenseChannel, leases: list[dict[str, Any]]) -> None:
        self._end_first_window()
        self.channel = channel
        self.failed_handshakes = 0
        self._last_problem = ""
        log.info("license: channel to {address} authenticated as {name}; the server holds {count} "
                 "lease(s) for us", address=self.address, name=self.config.client_name, count=len(leases))
        self._become(True, f"connected to {self.address}")
        self.pool.adopt(leases)

    def channel_lost(self, channel: LicenseChannel, why: str) -> None:
        if channel is not self.channel:
            return
        self.channel = None
        if self.pool.closed:
            log.info("license: channel to {address} closed", address=self.address)
        else:
            log.warn("license: channel to {address} lost: {why}; serving from the leases held",
                     address=self.address, why=why)
        self._become(False, f"channel lost: {why}")
        self.pool.link_down()

    def handshake_failed(self, why: str) -> None:
        self.failed_handshakes += 1
        self.reason = why
        now = self.clock.seconds()
        if why == self._last_problem and now - self._last_logged_at < REPEAT_LOG_INTERVAL:
            self._repeats += 1
            return
        again = f" (failed {self._repeats + 1} times since {now - self._last_logged_at:.0f}s ago)" \
            if why == self._last_problem else ""
        self._last_problem, self._last_logged_at, self._repeats = why, now, 0
        log.error("license: {address}: {why}{again}", address=self.address, why=why, again=again)

    # --- the wire (ILeaseWire) -------------------------------------------------------------

    def trace(self, message: str, **fields: Any) -> None:
        """FWFRAME_TRACELS=1: one line per lease message."""
        if self.config.trace:
            log.info("license trace: " + message, **fields)

    def _call(self, command: type[amp.Command], **arguments: Any) -> defer.Deferred[dict[str, Any]]:
        channel = self.channel
        if channel is None or not self.connected:
            return defer.fail(NotConnected(self.reason))
        name = command.__name__
        if self.config.trace:
            self.trace("-> {command} {arguments}", command=name,
                       arguments=" ".join(f"{k}={v}" for k, v in arguments.items()))
        calling: defer.Deferred[dict[str, Any]] = channel.callRemote(command, **arguments)
        calling.addTimeout(CALL_TIMEOUT, self.clock, onTimeoutCancel=lambda result, timeout: self._unanswered(
            channel, name, result, timeout))
        if self.config.trace:
            def answered(result: Any) -> Any:
                if isinstance(result, Failure):
                    self.trace("<- {command} failed: {why}", command=name, why=describe(result))
                else:
                    self.trace("<- {command} {answer}", command=name,
                               answer=" ".join(f"{k}={v}" for k, v in result.items()))
                return result
            calling.addBoth(answered)
        return calling

    def _unanswered(self, channel: LicenseChannel, name: str, result: Any, timeout: float) -> Any:
        """A lease message unanswered for CALL_TIMEOUT: the channel is dead; drop it (ClientService
        opens a new one and the seats held are adopted again)."""
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            log.warn("license: {address} did not answer {command} within {timeout:g}s; reconnecting",
                     address=self.address, command=name, timeout=timeout)
            if channel.transport is not None:
                channel.transport.abortConnection()
            return Failure(NotConnected(f"{name} unanswered for {timeout:g}s"))
        return result

    def unresponsive(self, why: str) -> None:
        """The pool saw a lease expire unrenewed on a channel that looked up (a black hole: no
        answer, no close): the channel is dead now, not at CALL_TIMEOUT (requests get "license
        server unreachable", not "all licenses in use"); ClientService opens a new one."""
        channel = self.channel
        if channel is None:
            return
        self.channel_lost(channel, f"no answer from the license server ({why})")
        if channel.transport is not None:
            channel.transport.abortConnection()

    def lease(self, license_class: str, seats: int) -> defer.Deferred[dict[str, Any]]:
        return self._call(lp.Lease, license_class=license_class, seats=seats)

    def renew(self, lease_id: str) -> defer.Deferred[dict[str, Any]]:
        return self._call(lp.Renew, lease_id=lease_id)

    def release(self, lease_id: str, seats: int) -> defer.Deferred[dict[str, Any]]:
        return self._call(lp.Release, lease_id=lease_id, seats=seats)

    # --- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        log.info("license: client {name} connecting to {address} ({auth}; seats kept between {low} and "
                 "{high} per class)", name=self.config.client_name, address=self.address,
                 auth=("mutual TLS" + (" + shared secret" if self.config.secret else "")) if self.config.tls
                 else "shared secret",
                 low=self.config.low_watermark, high=self.config.high_watermark)
        self.connecting = True
        self.pool.start()
        self._first_window = self.clock.callLater(self.config.connect_timeout, self._first_window_over)
        super().startService()

    def stopService(self) -> Any:
        """Give the leases back (the server need not wait for their TTL or grace), wait for the
        answers (at most RELEASE_WAIT seconds), then close."""
        self._end_first_window()
        answers = self.pool.release_all()
        if not answers:
            return super().stopService()
        released: defer.Deferred[Any] = defer.DeferredList(answers, consumeErrors=True)
        released.addTimeout(RELEASE_WAIT, self.clock)
        released.addErrback(lambda _: None)
        released.addCallback(lambda _: super(LicenseClient, self).stopService())
        return released
