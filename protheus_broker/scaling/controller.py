"""Scale to zero for one balance unit: the logic, no I/O (the clock is passed in).

A :class:`ScaleToZero` drives an :class:`~protheus_broker.scaling.interfaces.IScaler`:

* **Activity** is an open session: a SmartClient session (waiting, connecting, linked, or in
  resume standby), an HTTP request in flight (a WebSocket is one long request), and every
  session held here while a node wakes.  An idle keep-alive connection is not activity.  The
  unit hands the count in as *activity* (a callable); the controller reads it every ``tick``
  seconds (1 s) and whenever a held session comes or goes; each tick it also hands the count
  (open + held) to the forecast's ``record``.
* **No scale-down while any session is open**: the target never drops while activity is above
  zero, however long the session (a 2-hour session keeps its node).
* **The idle countdown** (``ZERO_IDLE_TIME``) starts when the *last* session ends (to within one
  tick), never at a scale-up; at start it starts at once (a broker restart does not stop nodes
  at once whose users come back).  After it the target is the warm-up floor (0 without a
  forecast): the unit sleeps.
* **Wake**: a session that finds no ready member (``scaler.ready() == 0``) is *held*
  (:meth:`hold`) and the scaler asked for a member at once (``scale(>=1, "wake")``); every held
  session is released as soon as one is ready.  At most ``MAX_HELD`` are held (beyond: refused
  with a reason); one held longer than ``WAKE_TIMEOUT`` is refused with its reason.
* **Dependency order** (``DEPENDS_ON``, seed 003: an AppServer started without its DbAccess
  fails): with *dependencies* (the unit's ``deps.state.UnitDependencies``) the controller starts
  no AppServer (asks the scaler for no more than it has) before every dependency is up; a wake
  waits for them (logged once: "waking X: waiting for DBACCESS, LOCKSERVER", then "... up after
  1.2 s; starting 1 node"), its held sessions with it, within ``WAKE_TIMEOUT``; past it they are
  refused naming the dependency that kept them.  A dependency that is itself a unit of this
  broker (one with ``demand``) is asked to stay awake while this unit is awake or waking.
* **Never below** the forecast's ``floor(now)`` (the warm-up), nor below what current load
  needs (``ceil(sessions / SESSIONS_PER_MEMBER)`` when the scaler does not size by load
  itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from protheus_broker.scaling.interfaces import IScaler, IUsageForecast

log = Logger()


@dataclass(frozen=True)
class ScaleToZeroPolicy:
    """What a unit's config says (see scaling/settings.py for the keys)."""

    enabled: bool = False  # SCALE_TO_ZERO
    idle_time: float = 900.0  # ZERO_IDLE_TIME: no session for this long -> scale to the floor (0)
    wake_timeout: float = 60.0  # WAKE_TIMEOUT: a held session waits this long for a ready member
    max_held: int = 200  # MAX_HELD: sessions held at once while waking
    sessions_per_member: int = 0  # load need per member; 0: the scaler sizes by load itself
    min_awake: int = 1  # members while awake (a wake asks for this many): MIN_NODES, at least 1
    tick: float = 1.0  # seconds between activity reads


class WakeRefused(Exception):
    """A session the controller will not hold or could not wake a member for: *what* and
    *detail* go to the session's log line (desktop) or the 503's JSON body (HTTP); *retry_after*
    is the 503's ``Retry-After`` in seconds."""

    def __init__(self, what: str, detail: str, retry_after: int = 5) -> None:
        super().__init__(f"{what} ({detail})")
        self.what = what
        self.detail = detail
        self.retry_after = retry_after


class _Held:
    __slots__ = ("deferred", "timer", "since", "who")

    def __init__(self, deferred: Deferred[None], since: float, who: str) -> None:
        self.deferred = deferred
        self.timer: Any = None
        self.since = since
        self.who = who


class ScaleToZero:
    """Scale to zero and wake on demand for one unit (see the module docstring)."""

    def __init__(self, clock: Any, scaler: IScaler, policy: ScaleToZeroPolicy,
                 activity: Callable[[], int], forecast: IUsageForecast | None = None,
                 name: str = "", dependencies: Any = None) -> None:
        self.clock = clock
        self.scaler = scaler
        self.policy = policy
        self.activity = activity
        self.forecast = forecast
        self.name = name or scaler.name
        self.held: list[_Held] = []
        self.waking_since: float | None = None  # a wake asked for, no member ready yet
        self.idle_since: float | None = None  # when the last session ended (None: a session is open)
        self.target: int | None = None  # what this controller last asked the scaler for
        self._asked = False  # target came from the scaler (desired()), not from asking it
        self.running = False
        self.wakes = 0
        self.wake_latencies: list[float] = []  # seconds from the wake request to a ready member
        self.refused_full = 0  # MAX_HELD reached
        self.refused_timeout = 0  # WAKE_TIMEOUT passed
        self._loop: LoopingCall | None = None
        self._sleep_timer: Any = None  # the countdown's end, to the moment (not the next tick)
        self._unsubscribe: Callable[[], None] | None = None
        #: the unit's dependencies (deps.state.UnitDependencies: ``missing()``, ``watch()``), or None
        self.dependencies: Any = None
        self._unwatch: Callable[[], None] | None = None
        self.deps_waiting_since: float | None = None  # a scale-up held back for dependencies
        self.deps_waits: list[float] = []  # seconds each wait for dependencies took
        #: units of this broker that depend on this one and are awake or waking: keep it awake
        self.demands: set[str] = set()
        self._demanding: set[str] = set()  # the dependencies this controller asked to stay awake
        if dependencies is not None:
            self.use_dependencies(dependencies)

    # --- life ---------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to the scaler, start the countdown and the periodic check."""
        if self.running:
            return
        self.running = True
        self.idle_since = self.clock.seconds()
        if self.target is None:
            self.target = self.scaler.desired()  # what runs now: only a change is asked for
        self._unsubscribe = self.scaler.subscribe(self._scaler_changed)
        if self.dependencies is not None and self._unwatch is None:
            self._unwatch = self.dependencies.watch(self._dependencies_changed)
        log.info("{unit}: scale to zero after {idle:g}s without a session; a login wakes a node "
                 "(WAKE_TIMEOUT={wake:g}s, MAX_HELD={held})", unit=self.name, idle=self.policy.idle_time,
                 wake=self.policy.wake_timeout, held=self.policy.max_held)
        self.evaluate()
        self._demand_dependencies((self.target or 0) > 0)
        loop = LoopingCall(self.tick)
        loop.clock = self.clock
        loop.start(self.policy.tick, now=False)
        self._loop = loop

    def stop(self) -> None:
        """Stop checking; held sessions are refused (the broker is stopping)."""
        self.running = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._cancel_sleep_timer()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        self._demand_dependencies(False)
        for held in list(self.held):
            self._refuse(held, WakeRefused("no AppServer woke", "the broker is stopping"))

    # --- dependencies -------------------------------------------------------------------

    def use_dependencies(self, dependencies: Any) -> None:
        """Wait for *dependencies* (``missing() -> list``, ``watch(callback) -> unwatch``; the
        unit's UnitDependencies) before starting an AppServer."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        self.dependencies = dependencies
        if self.running and dependencies is not None:
            self._unwatch = dependencies.watch(self._dependencies_changed)

    def missing(self) -> list[Any]:
        """The dependencies not up now (none without DEPENDS_ON)."""
        return [] if self.dependencies is None else list(self.dependencies.missing())

    def demand(self, who: str, on: bool) -> None:
        """Unit *who*, which depends on this one, is awake or waking (*on*) or asleep: while any
        is, this unit counts as active (it wakes, and does not sleep)."""
        if on == (who in self.demands):
            return
        if on:
            self.demands.add(who)
            self.idle_since = None
            log.info("{unit}: woken for {who}, which depends on it", unit=self.name, who=who)
        else:
            self.demands.discard(who)
        if self.running:
            self.evaluate()

    def _demand_dependencies(self, on: bool) -> None:
        """Ask the dependencies that are units of this broker to stay awake (or let them go)."""
        for dependency in [] if self.dependencies is None else self.dependencies.dependencies:
            demand = getattr(dependency, "demand", None)
            if demand is None or on == (dependency.name in self._demanding):
                continue
            if on:
                self._demanding.add(dependency.name)
            else:
                self._demanding.discard(dependency.name)
            try:
                demand(self.name, on)
            except Exception:
                log.failure("{unit}: cannot wake {dependency}", unit=self.name, dependency=dependency.name)

    def _dependencies_changed(self) -> None:
        if self.running:
            self.evaluate()
            self._demand_dependencies((self.target or 0) > 0 or self.deps_waiting_since is not None)

    # --- holding --------------------------------------------------------------------------

    @property
    def waking(self) -> bool:
        return self.waking_since is not None

    def must_hold(self) -> bool:
        """True when a new session would find no ready member (it is held by :meth:`hold`)."""
        return self.running and self.scaler.ready() == 0

    def hold(self, who: str = "") -> Deferred[None]:
        """Fires when a member is ready (at once if one is); fails with :class:`WakeRefused` when
        MAX_HELD are held already or after WAKE_TIMEOUT.  Cancelling it (the client left) gives
        up the hold and holds nothing."""
        if not self.must_hold():
            return succeed(None)
        policy = self.policy
        if len(self.held) >= policy.max_held:
            self.refused_full += 1
            return fail(WakeRefused("too many sessions waiting for a node to wake",
                                    f"MAX_HELD={policy.max_held} held already", self._retry_after()))
        now = self.clock.seconds()

        def cancel(d: Deferred[None]) -> None:
            self._drop(held)

        held = _Held(Deferred(cancel), now, who)
        self.held.append(held)
        held.timer = self.clock.callLater(policy.wake_timeout, self._timed_out, held)
        self.idle_since = None  # a held session is activity
        if self.waking_since is None:
            self.wake(f"first connection to an empty pool{f' ({who})' if who else ''}")
        return held.deferred

    def wake(self, why: str) -> None:
        """Ask the scaler for at least one member now."""
        now = self.clock.seconds()
        if self.waking_since is None:
            self.waking_since = now
            self.wakes += 1
        self._ask(max(1, self.policy.min_awake, self._floor(now), self.target or 0), f"wake: {why}")

    def _drop(self, held: _Held) -> None:
        if held in self.held:
            self.held.remove(held)
            if held.timer is not None and held.timer.active():
                held.timer.cancel()
            self._note_activity()

    def _timed_out(self, held: _Held) -> None:
        self.refused_timeout += 1
        waited = self.clock.seconds() - held.since
        scaler = self.scaler
        missing = self.missing() if self.scaler.ready() == 0 else []
        if missing:  # the wake never started: a dependency kept it
            dependency = missing[0]
            self.dependencies.note_refused(dependency)
            state = "down" if dependency.checked else "not checked yet"
            self._refuse(held, WakeRefused(
                f"dependency {dependency.name} ({dependency.where}) {state}: not woken",
                f"{dependency.reason}; waited {waited:.1f}s (WAKE_TIMEOUT={self.policy.wake_timeout:g}s) "
                f"for {', '.join(d.name for d in missing)}", max(1, int(getattr(dependency, "retry_after", 5)))))
            return
        self._refuse(held, WakeRefused(
            "no AppServer woke in time",
            f"none ready within WAKE_TIMEOUT={self.policy.wake_timeout:g}s (waited {waited:.1f}s; "
            f"{scaler.name}: {scaler.desired()} asked for, {scaler.ready()} ready)", self._retry_after()))

    def _refuse(self, held: _Held, why: WakeRefused) -> None:
        if held not in self.held:
            return
        self._drop(held)
        held.deferred.errback(why)

    def _retry_after(self) -> int:
        return max(1, min(60, math.ceil(self.policy.wake_timeout / 4)))

    def _scaler_changed(self) -> None:
        if not self._asked:  # a scaler may learn what runs after start (Kubernetes reads the Deployment)
            self.target = self.scaler.desired()
        if self.scaler.ready() > 0:
            now = self.clock.seconds()
            if self.waking_since is not None:
                took = now - self.waking_since
                self.wake_latencies.append(took)
                del self.wake_latencies[:-100]
                log.info("{unit}: woke in {took:.3f}s; releasing {held} held sessions", unit=self.name,
                         took=took, held=len(self.held), wake_seconds=took)
                self.waking_since = None
            held, self.held = self.held, []
            for h in held:
                if h.timer is not None and h.timer.active():
                    h.timer.cancel()
            for h in held:
                h.deferred.callback(None)
        elif self.waking_since is None and self.held and self.running:  # the member went again
            self.wake("the only ready member left while sessions wait")
        if self.running:
            self.evaluate()

    # --- the periodic check -------------------------------------------------------------

    def _note_activity(self) -> None:
        if self.running:
            self.evaluate()

    def _floor(self, now: float) -> int:
        if self.forecast is None:
            return 0
        try:
            return max(0, int(self.forecast.floor(now)))
        except Exception:
            log.failure("{unit}: the usage forecast failed; no warm-up floor this time", unit=self.name)
            return 0

    def sessions(self) -> int:
        """Open sessions (the unit's activity) and held ones."""
        return max(0, int(self.activity())) + len(self.held)

    def tick(self) -> None:
        """The periodic check: record the sessions for the forecast (once a tick), then evaluate."""
        if self.forecast is not None:
            try:
                self.forecast.record(self.clock.seconds(), self.sessions())
            except Exception:
                log.failure("{unit}: the usage forecast cannot record", unit=self.name)
        self.evaluate()

    def evaluate(self) -> None:
        """Read the activity, run the idle countdown and ask the scaler for the target."""
        now = self.clock.seconds()
        sessions = self.sessions()
        floor = self._floor(now)
        policy = self.policy
        asked = self.target if self.target is not None else self.scaler.desired()
        if sessions or self.demands:
            self.idle_since = None
            self._cancel_sleep_timer()
            need = math.ceil(sessions / policy.sessions_per_member) if policy.sessions_per_member else 1
            # never down while a session is open: it may be on any member
            # (a scaler that does not drain safely, Kubernetes, may stop a pod in use on a scale-down:
            # what was asked stays the minimum; the local node manager never stops a node in use)
            keep = 0 if getattr(self.scaler, "drains_safely", False) else asked
            target = max(floor, need, 1, policy.min_awake, keep)
            why = "sessions open" if sessions else f"{', '.join(sorted(self.demands))} depends on it"
        else:
            if self.idle_since is None:
                self.idle_since = now  # the last session has just ended: the countdown starts
                log.info("{unit}: no session open; scaling to {floor} after {idle:g}s unless one comes",
                         unit=self.name, floor=floor, idle=policy.idle_time)
            idle = now - self.idle_since
            if idle < policy.idle_time:
                target, why = max(floor, asked), "idle countdown"
                if self.running and (self._sleep_timer is None or not self._sleep_timer.active()):
                    self._sleep_timer = self.clock.callLater(policy.idle_time - idle, self.evaluate)
            else:
                target = floor
                self.waking_since = None  # a wake nobody waits for any more ends here
                why = (f"no session for {idle:.0f}s (ZERO_IDLE_TIME={policy.idle_time:g}s)"
                       + (f"; warm-up floor {floor}" if floor else ""))
        if self.waking_since is not None:
            target = max(target, 1)
        self._ask(target, why)

    def _cancel_sleep_timer(self) -> None:
        if self._sleep_timer is not None and self._sleep_timer.active():
            self._sleep_timer.cancel()
        self._sleep_timer = None

    def _ask(self, replicas: int, why: str) -> None:
        now = self.clock.seconds()
        current = self.target if self.target is not None else self.scaler.desired()
        if replicas > current:
            missing = self.missing()
            if missing:  # no AppServer before its DbAccess, LockServer, ...: wait for them
                if self.deps_waiting_since is None:
                    self.deps_waiting_since = now
                    log.info("{what}: waiting for {names}", unit=self.name, what=(
                        f"waking {self.name}" if current == 0 else f"scaling {self.name} up {current} -> {replicas}"),
                        names=", ".join(d.name for d in missing), waiting_for=[d.name for d in missing])
                self._demand_dependencies(True)
                return
            if self.deps_waiting_since is not None:
                took = now - self.deps_waiting_since
                self.deps_waits.append(took)
                del self.deps_waits[:-100]
                started = replicas - current
                log.info("{unit}: {names} up after {took:.1f} s; starting {n} node{s}", unit=self.name,
                         names=", ".join(self.dependencies.names), took=took, n=started,
                         s="" if started == 1 else "s", dependencies_seconds=took)
        self.deps_waiting_since = None  # started, or no longer wanted (the held sessions gave up)
        self._demand_dependencies(replicas > 0)
        if replicas == self.target:
            return
        old, self.target = self.target, replicas
        self._asked = True
        log.info("{unit}: {scaler} scale {old} -> {new}: {why}", unit=self.name, scaler=self.scaler.name,
                 old="?" if old is None else old, new=replicas, why=why)
        self.scaler.scale(replicas, why)

    def snapshot(self) -> dict[str, object]:
        """For the screen, JSON and /metrics."""
        now = self.clock.seconds()
        idle = None if self.idle_since is None else round(now - self.idle_since, 3)
        return {
            "enabled": True, "scaler": self.scaler.name, "waking": self.waking,
            "waking_for": None if self.waking_since is None else round(now - self.waking_since, 3),
            "held": len(self.held), "max_held": self.policy.max_held,
            "target": self.target, "ready": self.scaler.ready(), "idle_seconds": idle,
            "idle_time": self.policy.idle_time, "wake_timeout": self.policy.wake_timeout,
            "sleeps_in": None if idle is None or self.target == 0 else round(max(0.0, self.policy.idle_time - idle), 3),
            "wakes": self.wakes, "refused_full": self.refused_full, "refused_timeout": self.refused_timeout,
            "last_wake_seconds": self.wake_latencies[-1] if self.wake_latencies else None,
            "waiting_for": ([d.name for d in self.missing()] if self.deps_waiting_since is not None else []),
            "waiting_for_seconds": (None if self.deps_waiting_since is None
                                    else round(now - self.deps_waiting_since, 3)),
            "woken_for": sorted(self.demands),
        }
