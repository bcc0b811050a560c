"""Backend monitoring on the broker side: ``MONITORING_TYPE`` made real.

- :class:`Health`: one server's heartbeat state machine (Up / Suspended / Down), no I/O.
- :func:`validate_report`: an agent's report becomes :class:`~.balancing.Metrics` or is refused
  with a reason (negative, NaN, more memory than the host has...).
- :class:`AgentLink`: the broker's end of an AMP agent channel (handshake, reports, one sample).
- :class:`ActiveMonitor`: ``SMARTCLIENT_ACTIVE`` / ``SMARTCLIENT_SSL_ACTIVE``: a permanent channel
  per server (``ClientService`` with backoff) and one watchdog that counts missed heartbeats.
- :class:`ProbeMonitor`: ``CONNECTION`` / ``SMARTCLIENT`` / ``SMARTCLIENT_SSL``: every
  ``MONITORING_INTERVAL`` seconds connect, check, disconnect.

Verdicts go to the pool (``ServerPool.monitor_verdict``), which logs one event per state change.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.monitoring import commands as cmd
from protheus_broker.balancing.methods import Metrics
from protheus_broker.monitoring.settings import MonitoringConfig, MonitoringType
from protheus_broker.balancing.pool import Backend, ServerPool, ServerState
from protheus_broker.tls.options import client_options

log = Logger()


class _QuietConnect(Factory):
    """Connect-and-hang-up checks, every second: no 'Starting factory' lines in the log."""

    noisy = False
    protocol = Protocol


_QUIET_CONNECT = _QuietConnect()

#: Values no real AppServer reports: anything past these is a bad agent, not a busy server.
MAX_PHYSICAL_MEMORY = 1 << 50  # 1 PiB
MAX_COUNT = 10_000_000  # users, threads
MAX_CPU_COUNT = 65536
MAX_AGE = 3600.0
#: The same channel failure (a wrong secret, on every retry) is logged again at most this often.
REPEAT_LOG_INTERVAL = 60.0
#: Seconds an agent has to finish the handshake (something on its port that accepts and never
#: answers would otherwise hold the channel, and its retries, forever).
HANDSHAKE_TIMEOUT = 10.0


class BadReport(ValueError):
    """A report with malformed or absurd values; the text names the value and why."""


def validate_report(values: dict[str, Any], now: float) -> tuple[Metrics, bool, str]:
    """Check an agent's report; return (metrics on the broker's clock, accepting, problem)."""
    physical = values["physical_memory"]
    cpus = values["cpu_count"]
    if not 0 < physical <= MAX_PHYSICAL_MEMORY:
        raise BadReport(f"physical_memory {physical} is not a host's memory size")
    if not 0 < cpus <= MAX_CPU_COUNT:
        raise BadReport(f"cpu_count {cpus} is out of range (1 to {MAX_CPU_COUNT})")
    memory = values["memory_bytes"]
    if not 0 <= memory <= physical:
        raise BadReport(f"memory_bytes {memory} is negative or above the host's physical memory ({physical})")
    for name in ("users", "threads"):
        if not 0 <= values[name] <= MAX_COUNT:
            raise BadReport(f"{name} {values[name]} is out of range (0 to {MAX_COUNT})")
    cpu = values["cpu_percent"]
    if not (math.isfinite(cpu) and 0.0 <= cpu <= 100.0 * cpus):
        raise BadReport(f"cpu_percent {cpu} is not a number from 0 to {100 * cpus} ({cpus} CPUs)")
    age = values["age"]
    if not (math.isfinite(age) and 0.0 <= age <= MAX_AGE):
        raise BadReport(f"age {age} is not a number of seconds from 0 to {MAX_AGE:g}")
    metrics = Metrics(memory_bytes=memory, users=values["users"], threads=values["threads"],
                      cpu_percent=cpu, taken_at=now - age)
    return metrics, bool(values["accepting"]), str(values.get("problem") or "")


class Health:
    """One server's monitoring state: Up, Suspended (missed heartbeats), Down.

    Active mode: the watchdog calls :meth:`check` (every half interval); a heartbeat is *missed*
    when none arrived within half an interval of its due time, so with a 1 s interval and
    ``suspend_misses = 1`` a dead server is Suspended at most 2 s after its last report.
    Probe modes: each failed probe is one miss (:meth:`failed`).  A good report or probe
    (:meth:`heard`) makes it Up again; a report saying the AppServer does not accept makes it
    Down at once.  *on_change(state, reason)* is called once per change.
    """

    def __init__(self, interval: float, suspend_misses: int, down_misses: int, now: float,
                 on_change: Callable[[ServerState, str], None]) -> None:
        self.interval = interval
        self.suspend_misses = suspend_misses
        self.down_misses = down_misses
        self.on_change = on_change
        self.state = ServerState.UP
        self.last_heard = now  # startup counts as heard: the agent gets its first interval
        self.misses = 0

    def _become(self, state: ServerState, reason: str) -> None:
        if state is not self.state:
            self.state = state
            self.on_change(state, reason)

    def heard(self, now: float, accepting: bool = True, problem: str = "") -> None:
        was = self.state
        self.last_heard = now
        self.misses = 0
        if accepting:
            self._become(ServerState.UP, "reports resumed" if was is not ServerState.UP else "reporting")
        else:
            self._become(ServerState.DOWN, f"agent: AppServer not accepting: {problem or 'no reason given'}")

    def check(self, now: float) -> None:
        """Count missed heartbeats (active mode's watchdog)."""
        missed = math.floor((now - self.last_heard) / self.interval - 0.5)
        if missed <= self.misses:
            return
        self.misses = missed
        self._judge(f"no report for {now - self.last_heard:.1f}s ({missed} missed heartbeat"
                    f"{'s' if missed > 1 else ''})")

    def failed(self, reason: str) -> None:
        """One failed probe (probe modes), or a lost link counted as a miss."""
        self.misses += 1
        self._judge(f"{reason} ({self.misses} failed check{'s' if self.misses > 1 else ''})")

    def _judge(self, reason: str) -> None:
        if self.misses >= self.down_misses:
            self._become(ServerState.DOWN, reason)
        elif self.misses >= self.suspend_misses and self.state is ServerState.UP:
            self._become(ServerState.SUSPENDED, reason)


class _Watched:
    """A monitored server: its health, its link/service, what the monitor last said."""

    def __init__(self, monitor: _MonitorBase, backend: Backend, now: float) -> None:
        self.server_id = backend.server_id
        self.backend = backend
        self.health = Health(monitor.interval, monitor.settings.suspend_misses,
                             monitor.settings.down_misses, now,
                             lambda state, reason: monitor.verdict(self, state, reason))
        self.service: Any = None
        self.link: AgentLink | None = None
        self.last_problem = ""
        self.last_logged_at = 0.0
        self.repeats = 0
        self.failed_handshakes = 0  # in a row: the retry backoff grows with them
        self.reports = 0
        self.bad_reports = 0
        host, port = monitor.settings.agents.get(backend.server_id, (backend.host, 0))
        self.agent_address = (host, port)


class _MonitorBase(MultiService):
    """What both monitors share: the watched servers, verdicts, reports, endpoints."""

    interval: float

    def __init__(self, reactor: Any, pool: ServerPool, monitoring_type: MonitoringType,
                 settings: MonitoringConfig, connect_timeout: float = 5.0) -> None:
        super().__init__()
        self.reactor = reactor
        self.pool = pool
        self.monitoring_type = monitoring_type
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.watched: dict[str, _Watched] = {}

    def verdict(self, watched: _Watched, state: ServerState, reason: str) -> None:
        backend = watched.backend
        backend.monitor_status["state"] = state.value
        self.pool.monitor_verdict(backend.server_id, state, f"{self.monitoring_type.value}: {reason}")

    def report(self, watched: _Watched, values: dict[str, Any], peer: str) -> bool:
        """A report from an authenticated agent; False (logged) if its values are bad."""
        now = self.reactor.seconds()
        try:
            metrics, accepting, problem = validate_report(values, now)
        except BadReport as exc:
            watched.bad_reports += 1
            log.warn("server {server_id}: report from agent {peer} refused: {reason}",
                     server_id=watched.server_id, peer=peer, reason=str(exc))
            return False
        watched.reports += 1
        self.pool.report_metrics(watched.server_id, metrics)
        status = watched.backend.monitor_status
        status.update(last_report_at=now, problem=problem, accepting=accepting)
        watched.health.heard(now, accepting, problem)
        if accepting:  # ends a failed-connect suspicion if observed after it
            self.pool.monitor_verdict(watched.server_id, ServerState.UP,
                                      f"{self.monitoring_type.value}: agent reports it accepting",
                                      observed_at=metrics.taken_at)
        return True

    def link_failed(self, watched: _Watched, why: str) -> None:
        """Log a channel problem: a new reason at once, the same one again (every retry repeats
        it) at most every ``REPEAT_LOG_INTERVAL`` seconds, with how often it failed meanwhile."""
        watched.backend.monitor_status["link"] = f"failed: {why}"
        now = self.reactor.seconds()
        if why == watched.last_problem and now - watched.last_logged_at < REPEAT_LOG_INTERVAL:
            watched.repeats += 1
            return
        again = f" (failed {watched.repeats + 1} times since {now - watched.last_logged_at:.0f}s ago)" \
            if why == watched.last_problem else ""
        watched.last_problem = why
        watched.last_logged_at = now
        watched.repeats = 0
        host, port = watched.agent_address
        log.error("server {server_id}: agent {peer}: {why}{again}", server_id=watched.server_id,
                  peer=f"{host}:{port}", why=why, again=again)

    def tcp_endpoint(self, host: str, port: int) -> Any:
        """Where the monitor connects to (tests replace this with in-memory endpoints)."""
        return HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)

    def agent_endpoint(self, watched: _Watched) -> Any:
        host, port = watched.agent_address
        endpoint = self.tcp_endpoint(host, port)
        if self.monitoring_type.uses_tls:

            assert self.settings.tls is not None
            return wrapClientTLS(client_options(self.settings.tls, host), endpoint)
        return endpoint

    def add(self, backend: Backend) -> _Watched:
        watched = _Watched(self, backend, self.reactor.seconds())
        self.watched[backend.server_id] = watched
        backend.monitor_status.update(type=self.monitoring_type.value, state="up",
                                      agent=f"{watched.agent_address[0]}:{watched.agent_address[1]}")
        return watched

    def remove(self, server_id: str) -> None:
        self.watched.pop(server_id, None)

    def reconfigure(self, settings: MonitoringConfig) -> None:
        """Follow the pool after a reload: watch servers that joined, forget those that left."""
        self.settings = settings
        current = {b.server_id: b for b in self.pool if not b.leaving}
        for server_id in list(self.watched):
            if server_id not in current or current[server_id] is not self.watched[server_id].backend:
                self.remove(server_id)
        for server_id, backend in current.items():
            if server_id not in self.watched:
                self.add(backend)


_FIGURES = cmd.Figures()


def _describe(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, amp.RemoteAmpError):
        return f"refused by the agent: {value.description}"
    if isinstance(value, KeyError):  # an answer without a value it must have
        return f"malformed answer (no {value.args[0]!r})"
    if isinstance(value, (ValueError, TypeError, AttributeError)):  # a value that does not parse
        return f"malformed answer ({type(value).__name__}: {str(value)[:100]})"
    text = str(value).strip().rstrip(".")
    return text or type(value).__name__


class AgentLink(cmd.QuietAMP):
    """The broker's end of one agent channel: authenticate, then take reports (active) or ask
    for one sample and hang up (probe).  Reports before authentication drop the channel."""

    transport: Any
    peer_role = "agent"

    def __init__(self, monitor: _MonitorBase, watched: _Watched, interval: float) -> None:
        super().__init__()
        self.monitor = monitor
        self.watched = watched
        self.interval = interval  # 0: probe (one Sample, no pushed reports)
        self.authenticated = False
        self._outcome: Failure | AgentLink | None = None
        self._waiters: list[defer.Deferred[AgentLink]] = []
        self.peer = "?"
        self._timeout: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self._timeout = self.monitor.reactor.callLater(HANDSHAKE_TIMEOUT, self._too_slow)
        defer.ensureDeferred(self._handshake()).addErrback(self._handshake_failed)

    def _too_slow(self) -> None:
        self._handshake_failed(Failure(cmd.AuthenticationFailed(
            f"no answer within {HANDSHAKE_TIMEOUT:g}s")))
        if self.transport is not None:
            self.transport.abortConnection()

    @property
    def ready(self) -> defer.Deferred[AgentLink]:
        """A new Deferred: fires with this link once authenticated, fails if that fails."""
        if isinstance(self._outcome, Failure):
            return defer.fail(self._outcome)
        if self._outcome is not None:
            return defer.succeed(self._outcome)
        waiter: defer.Deferred[AgentLink] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def _decide(self, outcome: Failure | AgentLink) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    async def _handshake(self) -> None:
        secret = self.monitor.settings.secret
        port = self.watched.backend.port
        broker_nonce = os.urandom(cmd.NONCE_BYTES)
        answer = await self.callRemote(cmd.Hello, version=cmd.PROTOCOL_VERSION,
                                       appserver_port=port, broker_nonce=broker_nonce)
        expected = cmd.proof(secret, b"agent", broker_nonce, answer["agent_nonce"], port)
        if not cmd.proof_matches(expected, answer["agent_proof"]):
            raise cmd.AuthenticationFailed(
                "the agent's proof is wrong (a different AGENT_SECRET, or not our agent)")
        await self.callRemote(
            cmd.Authenticate, interval=self.interval,
            broker_proof=cmd.proof(secret, b"broker", answer["agent_nonce"], broker_nonce, port))
        self.authenticated = True
        self.watched.last_problem = ""
        self.watched.failed_handshakes = 0
        self.watched.backend.monitor_status["link"] = "authenticated"
        self._decide(self)

    def box_refused(self, why: str) -> None:
        """A bad box from the agent's side: one line, through the per-server log limiter (none
        if the handshake has failed already: that was the line)."""
        if not isinstance(self._outcome, Failure):
            self.monitor.link_failed(self.watched, why)

    def _handshake_failed(self, failure: Failure) -> None:
        if self._outcome is not None:
            return
        self.watched.failed_handshakes += 1
        why = self.dropped or f"handshake failed: {_describe(failure)}"
        if not self.dropped:  # (a dropped box was logged already)
            self.monitor.link_failed(self.watched, why)
        self._decide(Failure(cmd.AuthenticationFailed(why)))
        if self.transport is not None:
            self.transport.loseConnection()

    def ampBoxReceived(self, box: Any) -> None:
        """Reports are the hot path (a thousand a second on a big farm): an unanswered ``Report``
        is parsed with its typed argument and handled here, without AMP's responder and
        Deferred machinery; everything else goes the usual way."""
        if box.get(b"_command") == b"Report" and len(box) == 2 and b"figures" in box:
            try:
                figures = _FIGURES.fromString(box[b"figures"])
            except (ValueError, UnicodeDecodeError) as exc:
                log.warn("server {server_id}: malformed report from {peer}: {why}; dropping it",
                         server_id=self.watched.server_id, peer=self.peer, why=str(exc))
                self.transport.loseConnection()
                return
            self.report(figures)
            return
        super().ampBoxReceived(box)

    @cmd.Report.responder
    def report(self, figures: dict[str, Any]) -> dict[str, Any]:
        if not self.authenticated:
            log.warn("server {server_id}: report from unauthenticated peer {peer}; dropping it",
                     server_id=self.watched.server_id, peer=self.peer)
            self.transport.loseConnection()
            return {}
        self.monitor.report(self.watched, figures, self.peer)
        return {}

    def connectionLost(self, reason: Failure = Failure(Exception("connection lost"))) -> None:
        super().connectionLost(reason)
        self._decide(Failure(cmd.AuthenticationFailed(
            f"channel closed before the handshake finished: {_describe(reason)}")))
        if self.monitor.watched.get(self.watched.server_id) is self.watched and self.watched.link is self:
            self.watched.link = None
            if self.authenticated and not self.dropped:
                self.watched.backend.monitor_status["link"] = f"lost: {_describe(reason)}"
                log.warn("server {server_id}: agent channel to {peer} lost: {why}",
                         server_id=self.watched.server_id, peer=self.peer, why=_describe(reason))


class _LinkFactory(Factory):
    noisy = False

    def __init__(self, monitor: ActiveMonitor, watched: _Watched) -> None:
        self.monitor = monitor
        self.watched = watched

    def buildProtocol(self, addr: Any) -> AgentLink:
        link = AgentLink(self.monitor, self.watched, self.monitor.interval)
        link.ready.addCallbacks(self._up, lambda _: None)
        self.watched.link = link
        return link

    def _up(self, link: AgentLink) -> None:
        log.info("server {server_id}: agent channel to {peer} authenticated{tls}",
                 server_id=self.watched.server_id, peer=link.peer,
                 tls=" (mutual TLS)" if self.monitor.monitoring_type.uses_tls else "")


@implementer(IStreamClientEndpoint)
class _AgentEndpoint:
    """Builds the real endpoint at each connect: config files are read then, and tests that never
    start the ClientService never build one."""

    def __init__(self, monitor: _MonitorBase, watched: _Watched) -> None:
        self.monitor = monitor
        self.watched = watched

    def connect(self, factory: IProtocolFactory) -> Any:
        return self.monitor.agent_endpoint(self.watched).connect(factory)

    def __repr__(self) -> str:  # (ClientService's "Scheduling retry N to connect ..." line)
        host, port = self.watched.agent_address
        return f"agent {host}:{port} of server {self.watched.server_id}"


def _handshake_done(link: Any) -> defer.Deferred[None]:
    """``prepareConnection``: wait for the handshake's outcome, and do not fail when it fails.

    A failed preparation makes ``ClientService`` wait to retry while the connection is still
    open; its close then reaches the service's state machine in ``Waiting``, which has no such
    transition (``automat NoTransition ... _clientDisconnected``, an Unhandled Error on every
    retry, Twisted 22.4 to 26 at least).  So a failed handshake counts as a connection that
    ended: the link closes itself, the service retries, and the retry policy backs off with
    the failed handshakes in a row (``_Watched.failed_handshakes``)."""
    ready: defer.Deferred[AgentLink] = link.ready
    return ready.addCallbacks(lambda _: None, lambda _: None)


class ActiveMonitor(_MonitorBase):
    """``SMARTCLIENT_ACTIVE`` / ``SMARTCLIENT_SSL_ACTIVE``: a permanent agent channel per server,
    reconnected with backoff, and one watchdog for all servers every half heartbeat interval."""

    def __init__(self, reactor: Any, pool: ServerPool, monitoring_type: MonitoringType,
                 settings: MonitoringConfig, connect_timeout: float = 5.0) -> None:
        super().__init__(reactor, pool, monitoring_type, settings, connect_timeout)
        self.interval = settings.heartbeat_interval
        self.watchdog = task.LoopingCall(self.check)
        self.watchdog.clock = reactor
        for backend in pool:
            if not backend.leaving:
                self.add(backend)

    def add(self, backend: Backend) -> _Watched:
        watched = super().add(backend)
        backoff = backoffPolicy(initialDelay=0.25, maxDelay=10.0, factor=1.5)
        service = ClientService(
            _AgentEndpoint(self, watched), _LinkFactory(self, watched),
            retryPolicy=lambda attempt: backoff(attempt + watched.failed_handshakes),
            clock=self.reactor,
            prepareConnection=_handshake_done,  # a failed handshake backs off too
        )
        watched.service = service
        service.setServiceParent(self)
        return watched

    def remove(self, server_id: str) -> None:
        watched = self.watched.get(server_id)
        super().remove(server_id)
        if watched is not None and watched.service is not None:
            watched.service.disownServiceParent()

    def check(self) -> None:
        """The watchdog: count missed heartbeats of every server."""
        now = self.reactor.seconds()
        for watched in list(self.watched.values()):
            watched.health.check(now)

    def startService(self) -> None:
        super().startService()
        self.watchdog.start(self.interval / 2, now=False)

    def stopService(self) -> Any:
        if self.watchdog.running:
            self.watchdog.stop()
        return super().stopService()


class ProbeMonitor(_MonitorBase):
    """``CONNECTION``: connect to the AppServer, disconnect.  ``SMARTCLIENT`` (``_SSL``): the
    exploratory login: connect to the agent (over mutual TLS), authenticate, ask for one sample,
    disconnect; the sample says whether the AppServer accepts.  Every ``MONITORING_INTERVAL``."""

    def __init__(self, reactor: Any, pool: ServerPool, monitoring_type: MonitoringType,
                 settings: MonitoringConfig, connect_timeout: float = 5.0) -> None:
        super().__init__(reactor, pool, monitoring_type, settings, connect_timeout)
        self.interval = settings.probe_interval
        self.loop = task.LoopingCall(self.probe_all)
        self.loop.clock = reactor
        for backend in pool:
            if not backend.leaving:
                self.add(backend)

    def probe_all(self) -> defer.Deferred[Any]:
        return defer.DeferredList([self.probe(w) for w in list(self.watched.values())])

    def probe(self, watched: _Watched) -> defer.Deferred[None]:
        """One probe of one server; its result goes to the server's health."""
        if self.monitoring_type is MonitoringType.CONNECTION:
            backend = watched.backend
            endpoint = self.tcp_endpoint(backend.host, backend.port)
            attempt = endpoint.connect(_QUIET_CONNECT)
            attempt.addCallback(lambda proto: proto.transport.loseConnection())
            attempt.addCallbacks(lambda _: watched.health.heard(self.reactor.seconds()),
                                 lambda f: watched.health.failed(f"connect failed: {_describe(f)}"))
            return attempt
        return defer.ensureDeferred(self._exploratory_login(watched))

    async def _exploratory_login(self, watched: _Watched) -> None:
        link = AgentLink(self, watched, 0.0)
        timeout = self.reactor.callLater(max(self.connect_timeout, 1.0) * 2, self._give_up, link)
        try:
            await connectProtocol(self.agent_endpoint(watched), link)
            await link.ready
            answer = await link.callRemote(cmd.Sample)
            values = answer["figures"]
        except Exception as exc:  # every failure is one failed probe, with its reason
            watched.health.failed(_describe(Failure(exc)) if str(exc) else type(exc).__name__)
            return
        finally:
            if timeout.active():
                timeout.cancel()
            if link.transport is not None:
                link.transport.loseConnection()
        if not self.report(watched, values, link.peer):
            watched.health.failed("bad report")

    def _give_up(self, link: AgentLink) -> None:
        if link.transport is not None:
            link.transport.abortConnection()

    def startService(self) -> None:
        super().startService()
        self.loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        if self.loop.running:
            self.loop.stop()
        return super().stopService()


def make_monitor(reactor: Any, pool: ServerPool, monitoring_type: MonitoringType,
                 settings: MonitoringConfig, connect_timeout: float = 5.0) -> Service | None:
    """The monitor for *monitoring_type*, or None for ``DISABLED``."""
    if monitoring_type is MonitoringType.DISABLED:
        return None
    kind = ActiveMonitor if monitoring_type.is_active else ProbeMonitor
    return kind(reactor, pool, monitoring_type, settings, connect_timeout)
