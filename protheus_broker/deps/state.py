"""The state of the services a balance unit depends on, with no I/O inside.

A dependency (:class:`IDependency`) is up or down since a moment, with a reason.  A
:class:`DependencyState` turns check results into that state with hysteresis (so many failed
checks in a row before down, so many good ones before up) and tells its subscribers of each
change; :class:`ChannelDependency` shows any object with ``connected``/``since``/``reason``/
``subscribe`` (the broker's license client channel) as one.  :class:`UnitDependencies` is what
one unit asks before it takes a new session: :meth:`~UnitDependencies.admit` passes, fails with
:class:`DependencyDown` naming the first dependency that is down, or (before the first verdict
on a dependency) waits for it.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

log = Logger()

#: The section whose state is the broker's license client channel once it is plugged in.
LICENSE_CLIENT = "LICENSECLIENT"


class IDependency(Interface):
    """One service some balance units need: up or down, since when, why."""

    name = Attribute("The section that names it, upper case: DBACCESS, LOCKSERVER, LICENSECLIENT.")
    where = Attribute("What is checked, for messages: '10.0.0.5:7890', 'license channel'.")
    up = Attribute("True while it can serve.")
    checked = Attribute("False until the first verdict (a session then waits for it).")
    since = Attribute("Clock time (seconds) of the last change of `up`, or of the start.")
    reason = Attribute("Why it is down (or the last word on it when up).")
    retry_after = Attribute("Whole seconds a refused client should wait before trying again.")

    def subscribe(callback: Callable[[Any], None]) -> Callable[[], None]:
        """Call *callback(dependency)* on each change of `up` (and on the first verdict);
        returns the function that unsubscribes."""


def format_since(moment: float) -> str:
    """A clock time as UTC text for messages: ``2026-11-30 13:05:12Z``."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(moment))


class _Observers:
    """Callbacks told of each change; one that raises is logged, the others still run."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []

    def add(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        self.callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self.callbacks:
                self.callbacks.remove(callback)
        return unsubscribe

    def tell(self, dependency: Any) -> None:
        for callback in list(self.callbacks):
            try:
                callback(dependency)
            except Exception:
                log.failure("dependency {name}: an observer failed", name=dependency.name)


@implementer(IDependency)
class DependencyState:
    """Up or down from check results, with hysteresis.

    The first verdict counts at once (the broker has no earlier word); after that it takes
    *down_after* failed checks in a row to go down and *up_after* good ones to come back.  Each
    change is logged once and told to the subscribers.  *clock* gives ``seconds()``."""

    def __init__(self, name: str, where: str, clock: Any, down_after: int = 2, up_after: int = 2,
                 retry_after: int = 5) -> None:
        self.name = name
        self.where = where
        self.clock = clock
        self.down_after = down_after
        self.up_after = up_after
        self.retry_after = retry_after
        self.up = False
        self.checked = False
        self.since = clock.seconds()
        self.reason = "not checked yet"
        self.failures = 0  # failed checks in a row
        self.successes = 0  # good checks in a row
        self._observers = _Observers()

    def subscribe(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        return self._observers.add(callback)

    def passed(self, detail: str = "connected") -> bool:
        """A good check; True when it brought the dependency up."""
        self.failures = 0
        self.successes += 1
        if self.checked and self.up:
            self.reason = detail
            return False
        if self.checked and self.successes < self.up_after:
            return False
        self._change(True, detail)
        return True

    def failed(self, reason: str) -> bool:
        """A failed check (*reason*: "connection refused"); True when it took the dependency down."""
        self.successes = 0
        self.failures += 1
        if self.checked and not self.up:
            self.reason = reason  # still down: the latest word, no new log line
            return False
        if self.checked and self.failures < self.down_after:
            log.info("dependency {name} ({where}): check failed ({failures} of {down_after} before "
                     "down): {reason}", name=self.name, where=self.where, failures=self.failures,
                     down_after=self.down_after, reason=reason)
            return False
        self._change(False, reason)
        return True

    def reset(self, where: str) -> None:
        """The service moved (a reload changed SERVER or PORT): no verdict until the next check."""
        self.where = where
        self.checked = False
        self.up = False
        self.failures = self.successes = 0
        self.since = self.clock.seconds()
        self.reason = "not checked yet"
        self._observers.tell(self)

    def _change(self, up: bool, reason: str) -> None:
        was_down = self.checked and not self.up
        downtime = self.clock.seconds() - self.since
        self.up, self.checked, self.reason = up, True, reason
        self.since = self.clock.seconds()
        if up and was_down:
            log.info("dependency {name} ({where}) is up again after {downtime:.1f}s down",
                     name=self.name, where=self.where, downtime=downtime, dependency_up=True)
        elif up:
            log.info("dependency {name} ({where}) is up", name=self.name, where=self.where,
                     dependency_up=True)
        else:
            log.warn("dependency {name} ({where}) is down: {reason}; its units take no new "
                     "sessions", name=self.name, where=self.where, reason=reason, dependency_up=False)
        self._observers.tell(self)


@implementer(IDependency)
class ChannelDependency:
    """A channel with ``connected: bool``, ``since: float``, ``reason: str`` and
    ``subscribe(callback) -> unsubscribe`` (the broker's license client) seen as a dependency:
    up while it is connected.  Its changes are logged here once each."""

    checked = True

    def __init__(self, name: str, channel: Any, where: str = "license channel", retry_after: int = 5) -> None:
        self.name = name
        self.channel = channel
        self.where = where
        self.retry_after = retry_after
        self._observers = _Observers()
        self._was = bool(channel.connected)
        self._unsubscribe = channel.subscribe(self._changed)

    up = property(lambda self: bool(self.channel.connected))
    since = property(lambda self: float(self.channel.since))
    reason = property(lambda self: str(self.channel.reason))

    def subscribe(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        return self._observers.add(callback)

    def close(self) -> None:
        """Stop listening to the channel."""
        self._unsubscribe()

    def _changed(self, *ignored: Any) -> None:
        if self.up == self._was:
            return
        self._was = self.up
        if self.up:
            log.info("dependency {name} ({where}) is up", name=self.name, where=self.where,
                     dependency_up=True)
        else:
            log.warn("dependency {name} ({where}) is down: {reason}; its units take no new "
                     "sessions", name=self.name, where=self.where, reason=self.reason,
                     dependency_up=False)
        self._observers.tell(self)


@implementer(IDependency)
class UnitDependency:
    """A unit of this same broker as a dependency (``UNIT = BALANCE_...`` in the dependency's
    section: a unit balancing LockServer nodes, say): up while its pool can take a session.
    *unit* has ``name``, ``pool`` (``can_take_session()``, ``subscribe(observer)``) and
    ``scale_to_zero`` (its controller, with ``demand(who, on)``, or None: always on).  A unit
    that depends on it calls :meth:`demand` to wake it and keep it awake."""

    checked = True

    def __init__(self, name: str, unit: Any, clock: Any, retry_after: int = 5) -> None:
        self.name = name
        self.unit = unit
        self.clock = clock
        self.where = f"unit {unit.name}"
        self.retry_after = retry_after
        self._observers = _Observers()
        self._was = self.up
        self.since = clock.seconds()
        self._unsubscribe = unit.pool.subscribe(self._changed)

    @property
    def up(self) -> bool:
        return bool(self.unit.pool.can_take_session())

    @property
    def reason(self) -> str:
        return "an AppServer ready" if self.up else "no AppServer ready (asleep or waking)"

    def subscribe(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        return self._observers.add(callback)

    def demand(self, who: str, on: bool) -> None:
        """Unit *who* depends on this one and is awake or waking (*on*): wake it and keep it
        awake (a unit without scale to zero is always on: nothing to do)."""
        controller = getattr(self.unit, "scale_to_zero", None)
        if controller is not None:
            controller.demand(who, on)

    def close(self) -> None:
        """Stop listening to the unit."""
        self._unsubscribe()

    def _changed(self, *ignored: Any) -> None:
        if self.up == self._was:
            return
        self._was = self.up
        self.since = self.clock.seconds()
        if self.up:
            log.info("dependency {name} ({where}) is up", name=self.name, where=self.where, dependency_up=True)
        else:
            log.info("dependency {name} ({where}) is down: {reason}", name=self.name, where=self.where,
                     reason=self.reason, dependency_up=False)
        self._observers.tell(self)


class DependencyDown(Exception):
    """A unit refuses a new session: *dependency* is down."""

    def __init__(self, dependency: Any) -> None:
        self.dependency = dependency
        self.what = f"dependency {dependency.name} ({dependency.where}) down"
        self.detail = f"since {format_since(dependency.since)}: {dependency.reason}"
        self.retry_after = max(1, int(math.ceil(getattr(dependency, "retry_after", 5))))
        super().__init__(f"{self.what} {self.detail}")


def snapshot(dependency: Any, now: float) -> dict[str, Any]:
    """One dependency as the screen shows it."""
    state = "up" if dependency.checked and dependency.up else "down" if dependency.checked else "unchecked"
    return {"name": dependency.name, "where": dependency.where, "state": state,
            "since": round(dependency.since, 3), "for_seconds": round(max(0.0, now - dependency.since), 3),
            "reason": dependency.reason}


class UnitDependencies:
    """The dependencies of one unit (none: every session passes) and what it asks of them.

    The broker hands it its dependencies with :meth:`use` at start and on each reload.  Counts
    the sessions refused, per dependency, for the screen."""

    def __init__(self, unit: str = "") -> None:
        self.unit = unit
        self.dependencies: list[Any] = []
        self.refused: dict[str, int] = {}
        self._waiting: list[Deferred[None]] = []
        self._unsubscribe: list[Callable[[], None]] = []
        self._watchers: list[Callable[[], None]] = []

    def use(self, dependencies: Iterable[Any]) -> None:
        """Depend on *dependencies* (IDependency) from now on; sessions waiting for a first
        verdict are asked again."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self.dependencies = list(dependencies)
        self._unsubscribe = [d.subscribe(self._changed) for d in self.dependencies]
        self._changed(None)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dependencies]

    def missing(self) -> list[Any]:
        """The dependencies not up now (down, or before their first verdict), in DEPENDS_ON order:
        what a unit waking from zero waits for before it starts an AppServer."""
        return [d for d in self.dependencies if not (d.checked and d.up)]

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call *callback()* on each change of any dependency (and on :meth:`use`); returns the
        function that stops it.  (Scale to zero waits for its dependencies this way.)"""
        self._watchers.append(callback)

        def unwatch() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)
        return unwatch

    def note_refused(self, dependency: Any) -> None:
        """A session was refused because of *dependency* elsewhere (a wake that timed out
        waiting for it): counted with the others for the screen."""
        self.refused[dependency.name] = self.refused.get(dependency.name, 0) + 1

    def blocking(self) -> Any:
        """The first dependency that is down (checked), else None."""
        for dependency in self.dependencies:
            if dependency.checked and not dependency.up:
                return dependency
        return None

    def admit(self) -> Deferred[None]:
        """Fires when a new session may go on; fails with :class:`DependencyDown` when one of
        the dependencies is down.  Before the first verdict on one it waits for it (cancel the
        Deferred to give up)."""
        down = self.blocking()
        if down is not None:
            return self._refuse(down)
        if all(d.checked for d in self.dependencies):
            return succeed(None)
        waiting: Deferred[None] = Deferred(self._cancel)
        self._waiting.append(waiting)
        return waiting

    def _refuse(self, dependency: Any) -> Deferred[None]:
        self.refused[dependency.name] = self.refused.get(dependency.name, 0) + 1
        return fail(DependencyDown(dependency))

    def _cancel(self, waiting: Deferred[None]) -> None:
        if waiting in self._waiting:
            self._waiting.remove(waiting)

    def _changed(self, dependency: Any) -> None:
        for watcher in list(self._watchers):
            try:
                watcher()
            except Exception:
                log.failure("{unit}: a dependency watcher failed", unit=self.unit)
        if not self._waiting:
            return
        down = self.blocking()
        if down is None and not all(d.checked for d in self.dependencies):
            return
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            if down is None:
                each.callback(None)
            else:
                self.refused[down.name] = self.refused.get(down.name, 0) + 1
                each.errback(DependencyDown(down))

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """The unit's dependencies as the screen shows them, with the sessions each refused."""
        result = []
        for dependency in self.dependencies:
            entry = snapshot(dependency, now)
            entry["refused"] = self.refused.get(dependency.name, 0)
            result.append(entry)
        return result


__all__ = ["ChannelDependency", "DependencyDown", "DependencyState", "IDependency",
           "LICENSE_CLIENT", "UnitDependencies", "UnitDependency", "format_since", "snapshot"]
