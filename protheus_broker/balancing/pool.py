"""The pool of AppServers behind one listener: state, live counts and metrics, no I/O.

Servers join, drain and leave at run time (admin actions, config reload, later managed nodes);
a server that leaves while it still carries sessions stays, draining, until its last session ends.
Each member comes from a *source* (``"config"`` today; node managers and Kubernetes later): a
reload replaces only the config's members.  Observers (:meth:`ServerPool.subscribe`) hear every
join, leave and state change; :meth:`ServerPool.when_available` waits for a server that can take a
session.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from twisted.internet import abstract
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolutionReceiver
from twisted.logger import Logger
from zope.interface import implementer

from protheus_broker.balancing.methods import IBalancer, Metrics
from protheus_broker.balancing.servers import RemoteServer

log = Logger()

#: The source of the members read from the config file.
CONFIG = "config"

#: Seconds a server's resolved addresses are used before they are looked up again (in the
#: background: sessions use the known ones meanwhile).
RESOLVE_EVERY = 30.0

#: A server whose every address failed is looked up again, at most this often.
RESOLVE_AFTER_FAILURE = 2.0


def is_ip_literal(host: str) -> bool:
    """True for an IPv4 or IPv6 address (connected to at once, no name resolution)."""
    return abstract.isIPAddress(host) or abstract.isIPv6Address(host)


class ServerState(enum.Enum):
    """Where a server stands for new sessions."""

    UP = "up"  # takes new sessions
    SUSPENDED = "suspended"  # monitoring missed it or a connect just failed; no new sessions
    DOWN = "down"  # known dead or marked down by an admin; no new sessions
    DRAINING = "draining"  # existing sessions carry on, no new ones (admin drain or leaving)


class Backend:
    """One AppServer as the broker sees it."""

    __slots__ = (
        "server_id", "host", "port", "index", "state", "active", "total", "connect_failures",
        "metrics", "leaving", "reason", "placed_since_report", "suspect_until", "monitor_status",
        "admin_hold", "probation", "probes", "source", "addresses", "resolved_at", "resolving",
        "unix",
    )

    def __init__(self, server: RemoteServer, index: int, source: str = CONFIG) -> None:
        self.source = source  # where the member comes from: "config", later "nodes", ...
        self.server_id = server.server_id
        self.host = server.host
        self.port = server.port
        self.unix = server.unix  # a Unix socket path instead of host and port (managed nodes)
        self.index = index
        self.state = ServerState.UP
        self.active = 0  # sessions through the broker, counted from the moment it is chosen
        self.total = 0  # sessions that reached this server since start
        self.connect_failures = 0
        self.metrics: Metrics | None = None
        self.leaving = False  # removed from the config: goes when its last session ends
        self.reason = "configured"
        self.placed_since_report = 0  # burst accounting for the SERVER_* methods
        self.suspect_until: float | None = None  # suspended by a failed connect, until then
        self.monitor_status: dict[str, object] = {}  # what the monitor says (link, misses, ...)
        self.admin_hold = False  # marked down by an admin: monitoring does not bring it back
        self.probation = False  # back from a broker suspicion: one session at a time until one is answered
        self.probes = 0  # sessions opening on it while on probation
        self.addresses: list[str] = []  # its host name's addresses, resolved by the pool
        self.resolved_at: float | None = None
        self.resolving = False

    @property
    def address(self) -> str:
        return f"unix:{self.unix}" if self.unix else f"{self.host}:{self.port}"

    @property
    def available(self) -> bool:
        return self.state is ServerState.UP

    def snapshot(self, now: float) -> dict[str, object]:
        """A plain dict for logs, status pages and tests."""
        metrics = None
        if self.metrics is not None:
            metrics = {
                "memory_bytes": self.metrics.memory_bytes, "users": self.metrics.users,
                "threads": self.metrics.threads, "cpu_percent": self.metrics.cpu_percent,
                "age_seconds": round(now - self.metrics.taken_at, 3),
            }
        return {
            "id": self.server_id, "address": self.address, "state": self.state.value,
            "reason": self.reason, "connections": self.active, "total": self.total,
            "connect_failures": self.connect_failures, "leaving": self.leaving, "metrics": metrics,
            "placed_since_report": self.placed_since_report,
            "suspect_for": None if self.suspect_until is None else round(max(0.0, self.suspect_until - now), 3),
            "monitor": dict(self.monitor_status), "source": self.source,
        }


@dataclass
class ReconfigureResult:
    """What a config reload changed in the pool."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    draining: list[str] = field(default_factory=list)  # removed but still carrying sessions
    kept: list[str] = field(default_factory=list)
    clashes: list[str] = field(default_factory=list)  # ids another source's member holds


class UnknownServer(KeyError):
    """No server with that id in the pool."""


class NoServerAvailable(Exception):
    """No server could take a session within the time a waiter gave (the text says so)."""


@dataclass(frozen=True)
class PoolEvent:
    """What an observer hears: *kind* is "added", "removed" or "state"."""

    kind: str
    server_id: str
    state: ServerState
    reason: str
    source: str


PoolObserver = Callable[[PoolEvent], None]


@implementer(IResolutionReceiver)
class AddressCollector:
    """Collects the addresses of one host name (``reactor.nameResolver``: a getaddrinfo in a
    thread, IPv4 and IPv6), each once, and hands them to *done* when the lookup completes, unless
    :attr:`stopped` meanwhile."""

    def __init__(self, done: Callable[[list[str]], None]) -> None:
        self.done = done
        self.addresses: list[str] = []
        self.stopped = False

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        host = getattr(address, "host", None)
        if host and host not in self.addresses:
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        if not self.stopped:
            self.done(self.addresses)


class ServerPool:
    """The server table of one listener and the balancer that ranks it.

    A failed connect while opening a session suspends the server at once for *suspect_time*
    seconds (whatever the monitoring), so the next sessions do not try it first; it is tried again
    after that, or sooner when its monitor reports it healthy.  Back from such a suspicion it is
    on probation: one session at a time tries it (others rank it last) until one is answered, so
    a server still hung costs one login a timeout, not every login of the next few seconds.  *clock* (an ``IReactorTime``)
    times that; without one the time of the latest ``candidates(now)`` call is used.
    """

    def __init__(self, servers: Iterable[RemoteServer], balancer: IBalancer,
                 clock: Any = None, suspect_time: float = 10.0) -> None:
        self.balancer = balancer
        self.clock = clock
        self.suspect_time = suspect_time
        self._last_now = 0.0
        self._backends: dict[str, Backend] = {}
        self._observers: list[PoolObserver] = []
        self._waiters: list[Deferred[None]] = []
        self.resolver: Any = None  # an IHostnameResolver once use_resolver is called
        for server in servers:
            self._add(server, CONFIG)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._backends.values())

    def __len__(self) -> int:
        return len(self._backends)

    def get(self, server_id: str) -> Backend:
        try:
            return self._backends[server_id]
        except KeyError:
            raise UnknownServer(server_id) from None

    def _add(self, server: RemoteServer, source: str) -> Backend:
        index = max((b.index for b in self._backends.values()), default=-1) + 1
        backend = Backend(server, index, source)
        self._backends[server.server_id] = backend
        self._changed("added", backend)
        self._resolve(backend)
        return backend

    # --- host names: resolved at load, reload and join, refreshed in the background ----------

    def use_resolver(self, resolver: Any) -> None:
        """Resolve every member's host name with *resolver* (an ``IHostnameResolver``, the
        reactor's ``nameResolver``: IPv4 and IPv6, off the reactor thread) now, and each new
        member's when it joins; IP literals are left alone."""
        self.resolver = resolver
        for backend in list(self._backends.values()):
            self._resolve(backend)

    def _resolve(self, backend: Backend) -> None:
        if self.resolver is None or backend.resolving or backend.unix or is_ip_literal(backend.host):
            return
        backend.resolving = True
        try:
            self.resolver.resolveHostName(
                AddressCollector(lambda addresses: self._resolved(backend, addresses)),
                backend.host, backend.port)
        except Exception as e:
            backend.resolving = False
            log.warn("server {server_id}: cannot look up {host}: {why}", server_id=backend.server_id,
                     host=backend.host, why=e)

    def _resolved(self, backend: Backend, addresses: list[str]) -> None:
        backend.resolving = False
        backend.resolved_at = self._now()
        if not addresses:
            log.warn("server {server_id}: {host} has no address{kept}", server_id=backend.server_id,
                     host=backend.host, kept="; keeping the last known" if backend.addresses else "")
            return
        if addresses != backend.addresses:
            log.info("server {server_id}: {host} is {addresses}", server_id=backend.server_id,
                     host=backend.host, addresses=" ".join(addresses))
            backend.addresses = addresses

    def addresses_for(self, backend: Backend) -> list[str]:
        """The known addresses of *backend*'s host name ([] if none yet: the caller looks it up
        itself); older than :data:`RESOLVE_EVERY`, they are looked up again in the background."""
        if backend.addresses and backend.resolved_at is not None \
                and self._now() - backend.resolved_at >= RESOLVE_EVERY:
            self._resolve(backend)
        return backend.addresses

    # --- observers and waiters --------------------------------------------------------------

    def subscribe(self, observer: PoolObserver) -> Callable[[], None]:
        """Call *observer* with a :class:`PoolEvent` on every join, leave and state change;
        returns the function that unsubscribes it.  An observer that raises is logged, once per
        event, and the others still hear it."""
        self._observers.append(observer)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)
        return unsubscribe

    def _changed(self, kind: str, backend: Backend) -> None:
        if self._observers:
            event = PoolEvent(kind, backend.server_id, backend.state, backend.reason, backend.source)
            for observer in list(self._observers):
                try:
                    observer(event)
                except Exception:
                    log.failure("pool observer {observer!r} failed on {kind} {server_id}",
                                observer=observer, kind=kind, server_id=backend.server_id)
        if self._waiters and self.can_take_session():
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def can_take_session(self) -> bool:
        """True if :meth:`candidates` would offer a server: one is Up, or Suspended (a last
        resort, see :meth:`candidates`)."""
        return any(b.state is ServerState.UP or b.state is ServerState.SUSPENDED
                   for b in self._backends.values())

    def when_available(self, timeout: float) -> Deferred[None]:
        """A Deferred that fires when a server can take a session (at once if one can), or fails
        with :class:`NoServerAvailable` after *timeout* seconds of the pool's clock (no clock:
        no timeout).  Cancelling it stops the wait."""
        if self.can_take_session():
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        timer: Any = None

        def cancel(d: Deferred[None]) -> None:
            self._drop_waiter(d)
            if timer is not None and timer.active():
                timer.cancel()

        waiter: Deferred[None] = Deferred(cancel)
        self._waiters.append(waiter)
        if self.clock is not None and timeout > 0:
            def expire() -> None:
                if self._drop_waiter(waiter):
                    waiter.errback(NoServerAvailable(
                        f"none could take a session within {timeout:g}s: {self._why_none()}"))
            timer = self.clock.callLater(timeout, expire)

            def stop_timer(result: Any) -> Any:
                if timer.active():
                    timer.cancel()
                return result
            waiter.addBoth(stop_timer)
        return waiter

    def _drop_waiter(self, waiter: Deferred[None]) -> bool:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            return True
        return False

    def _why_none(self) -> str:
        if not self._backends:
            return "the pool is empty"
        return "; ".join(f"{b.server_id} {b.state.value}: {b.reason}" for b in self._backends.values())

    # --- choosing -------------------------------------------------------------------------

    def _now(self) -> float:
        return float(self.clock.seconds()) if self.clock is not None else self._last_now

    def candidates(self, now: float) -> list[Backend]:
        """The servers to try for one new session, in order (call once per session).

        First every Up server, best first by the balancer; then, as a last resort, the Suspended
        ones: a Suspended server is unconfirmed, not known dead (a late report, one failed
        connect during a restart), so trying it beats failing a login once every Up server has
        refused.  Down and Draining servers are never chosen.
        """
        self._last_now = now
        available, suspended = [], []
        for backend in self._backends.values():
            if backend.suspect_until is not None and backend.suspect_until <= now:
                self.set_state(backend.server_id, ServerState.UP,
                               f"suspect for {self.suspect_time:g}s after a failed session; trying "
                               f"one session on it")
                backend.probation = True
            if backend.available and not (backend.probation and backend.probes):
                available.append(backend)
            elif backend.state is ServerState.SUSPENDED or backend.available:
                suspended.append(backend)  # suspended, or on probation with a session trying it
        if not available:
            return self.balancer.rank(suspended, now)  # type: ignore[return-value]
        ranked: list[Backend] = self.balancer.rank(available, now)  # type: ignore[assignment]
        return ranked + sorted(suspended, key=lambda b: (b.active, b.index))

    # --- session accounting (only sessions through the broker count) -----------------------

    def session_opening(self, backend: Backend) -> bool:
        """A session was sent to *backend*: count it now, so a burst spreads.  True if it is a
        probe (the server is on probation): the session calls :meth:`probe_ended` when it has
        its answer or leaves the server."""
        backend.active += 1
        backend.placed_since_report += 1
        if backend.probation:
            backend.probes += 1
            return True
        return False

    def probe_ended(self, backend: Backend) -> None:
        """A probe session answered by *backend*, or gone from it."""
        if backend.probes:
            backend.probes -= 1

    def session_connected(self, backend: Backend) -> None:
        backend.total += 1

    def session_closed(self, backend: Backend) -> None:
        """A session on *backend* ended (or its connect attempt failed)."""
        backend.active -= 1
        if backend.leaving and backend.active == 0:
            self._forget(backend)

    def connect_failed(self, backend: Backend, reason: str) -> None:
        """A connect to *backend* failed while opening a session: suspend it at once (and look
        its name up again: the server may have moved)."""
        if backend.resolved_at is not None and self._now() - backend.resolved_at >= RESOLVE_AFTER_FAILURE:
            self._resolve(backend)
        self.session_failed(backend, f"connect failed: {reason}")

    def session_failed(self, backend: Backend, reason: str) -> None:
        """Opening a session on *backend* failed (no connect, no answer in time, closed before
        answering): suspend it at once for *suspect_time* (counted in ``connect_failures``)."""
        backend.connect_failures += 1
        if backend.placed_since_report:
            backend.placed_since_report -= 1  # that session went elsewhere
        if backend.state is ServerState.UP and self.suspect_time > 0:
            self.set_state(backend.server_id, ServerState.SUSPENDED, reason)
            backend.suspect_until = self._now() + self.suspect_time
        else:
            backend.reason = reason

    def session_answered(self, backend: Backend) -> None:
        """*backend* sent a session its first byte: its probation ends, and if the broker itself
        had suspended it (a failed session, not monitoring), it is Up again at once."""
        backend.probation = False
        if backend.state is ServerState.SUSPENDED and backend.suspect_until is not None:
            self.set_state(backend.server_id, ServerState.UP, "answered a session")

    # --- monitoring (fed by monitor.py; tests feed it directly) ------------------------------

    def report_metrics(self, server_id: str, metrics: Metrics) -> None:
        """A fresh report: it already shows the sessions placed before it."""
        backend = self.get(server_id)
        backend.metrics = metrics
        backend.placed_since_report = 0

    def monitor_verdict(self, server_id: str, state: ServerState, reason: str,
                        observed_at: float | None = None) -> None:
        """What monitoring concludes (UP, SUSPENDED or DOWN), from an observation made at
        *observed_at*.  A server that is draining or leaving stays so; a good verdict observed
        after a failed connect ends that suspicion early (an older one does not)."""
        backend = self._backends.get(server_id)
        if backend is None or backend.leaving or backend.state is ServerState.DRAINING or backend.admin_hold:
            return
        if backend.suspect_until is not None:
            if state is ServerState.UP and (
                observed_at is None or observed_at < backend.suspect_until - self.suspect_time
            ):
                return  # the good news predates the failed connect
        elif state is backend.state:
            return
        self.set_state(server_id, state, reason)

    # --- run-time membership ----------------------------------------------------------------

    def set_state(self, server_id: str, state: ServerState, reason: str) -> Backend:
        backend = self.get(server_id)
        if backend.state is not state:
            log.info(
                "server {server_id} ({address}) {old} -> {new}: {reason}",
                server_id=server_id, address=backend.address, old=backend.state.value,
                new=state.value, reason=reason,
            )
        changed = backend.state is not state
        backend.state = state
        backend.reason = reason
        backend.suspect_until = None
        if changed:
            self._changed("state", backend)
        return backend

    def add(self, server: RemoteServer, source: str = CONFIG) -> Backend:
        """A server joins the pool from *source* and takes sessions at once."""
        if server.server_id in self._backends:
            raise ValueError(f"server {server.server_id} is already in the pool")
        backend = self._add(server, source)
        log.info("server {server_id} ({address}) joined the pool from {source}",
                 server_id=server.server_id, address=backend.address, source=source)
        return backend

    def remove(self, server_id: str, source: str | None = None) -> bool:
        """A server leaves: at once if idle, else it drains first.  True if it is gone now.
        With *source*, only a member from that source may be removed (ValueError otherwise)."""
        backend = self.get(server_id)
        if source is not None and backend.source != source:
            raise ValueError(f"server {server_id} comes from {backend.source}, not {source}")
        if backend.active == 0:
            self._forget(backend)
            return True
        backend.leaving = True
        self.set_state(server_id, ServerState.DRAINING, "leaving the pool")
        return False

    def _forget(self, backend: Backend) -> None:
        for key, entry in list(self._backends.items()):
            if entry is not backend:
                continue
            del self._backends[key]
            log.info("server {server_id} ({address}) left the pool", server_id=backend.server_id,
                     address=backend.address)
            self._changed("removed", backend)

    def reconfigure(self, servers: Iterable[RemoteServer], source: str = CONFIG) -> ReconfigureResult:
        """Make *source*'s members match a reloaded server list without dropping any session;
        members from other sources are left alone (an id one of them holds is not added: a
        clash, logged and listed in the result).

        A server whose address changed is a new server under the same id: the old one drains.
        """
        result = ReconfigureResult()
        wanted = {s.server_id: s for s in servers}
        for backend in list(self._backends.values()):
            if backend.source != source:
                continue
            new = wanted.get(backend.server_id)
            if new is not None and (new.host, new.port, new.unix) == (backend.host, backend.port, backend.unix):
                result.kept.append(backend.server_id)
                if backend.leaving:  # back in the config before it finished draining
                    backend.leaving = False
                    self.set_state(backend.server_id, ServerState.UP, "back in the config")
                continue
            del self._backends[backend.server_id]
            if backend.active:
                backend.leaving = True
                backend.state = ServerState.DRAINING
                backend.reason = f"removed from the {source}"
                self._backends[f"{backend.server_id}~{backend.address}"] = backend
                result.draining.append(backend.server_id)
                self._changed("state", backend)
            else:
                result.removed.append(backend.server_id)
                self._changed("removed", backend)
        for server_id, server in wanted.items():
            held = self._backends.get(server_id)
            if held is None:
                self._add(server, source)
                result.added.append(server_id)
            elif held.source != source:
                result.clashes.append(server_id)
                log.warn("{source}: server {server_id} ({address}) not added: that id is a member "
                         "from {other} ({held})", source=source, server_id=server_id,
                         address=server.address, other=held.source, held=held.address)
        return result
