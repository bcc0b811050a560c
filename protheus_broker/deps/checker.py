"""Checks of the dependency sections: a TCP connect every CHECK_INTERVAL, and one registry per
broker so that two units naming the same section share one check.

A check connects to SERVER:PORT and closes at once; CONNECT_TIMEOUT bounds it (name resolution
included).  At most one check per dependency is in flight: one runs every CHECK_INTERVAL, and one
that outlasts the interval moves the next to the following tick.  The results go to a :class:`~protheus_broker.deps.state.DependencyState`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from protheus_broker.deps.settings import DependencyConfig
from protheus_broker.deps.state import DependencyState, UnitDependency

log = Logger()

#: connect(host, port, timeout) -> a Deferred that fires when a connection was made (and closed).
Connect = Callable[[str, int, float], "Deferred[Any]"]


class _Probe(Protocol):
    """Connected: that is all a check wants to know."""


class _ProbeFactory(Factory):
    noisy = False  # no "Starting factory" line per check
    protocol = _Probe


def tcp_connect(reactor: Any) -> Connect:
    """Connect with the *reactor*, then close at once: IP addresses directly, host names through
    the reactor's resolver (IPv4 and IPv6).  The whole check, resolution included, is bounded by
    *timeout*."""
    def connect(host: str, port: int, timeout: float) -> Deferred[Any]:
        if isIPAddress(host):
            endpoint: Any = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        connecting: Deferred[Any] = endpoint.connect(_ProbeFactory())
        connecting.addTimeout(timeout, reactor)

        def close(protocol: Any) -> None:
            protocol.transport.loseConnection()
        return connecting.addCallback(close)
    return connect


def why(reason: Failure, timeout: float) -> str:
    """A failed check in a few words."""
    if reason.check(error.ConnectionRefusedError):
        return "connection refused"
    if reason.check(error.TimeoutError, DeferredTimeout, error.UserError, error.ConnectingCancelledError):
        return f"no connection in {timeout:g}s"
    if reason.check(error.DNSLookupError):
        return "host name not found"
    if reason.check(error.NoRouteError):
        return "no route to host"
    text = reason.getErrorMessage().strip()
    return text or reason.type.__name__  # type: ignore[union-attr]


class DependencyCheck:
    """One dependency section checked every CHECK_INTERVAL into its :class:`DependencyState`."""

    def __init__(self, clock: Any, config: DependencyConfig, connect: Connect) -> None:
        self.clock = clock
        self.config = config
        self.connect = connect
        self.state = DependencyState(config.name, config.where, clock, down_after=config.down_after,
                                     up_after=config.up_after, retry_after=config.retry_after)
        self.in_flight: Deferred[Any] | None = None
        self.checks = 0  # checks started, for tests and the curious
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        """Check now, then every CHECK_INTERVAL (never two at once)."""
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.config.check_interval, now=True)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        self._abandon()

    def _abandon(self) -> None:
        """Give up the check in flight: its result, whatever it is, counts for nothing."""
        attempt, self.in_flight = self.in_flight, None
        if attempt is not None:
            attempt.cancel()

    @property
    def running(self) -> bool:
        return self._loop is not None

    def reconfigure(self, config: DependencyConfig) -> None:
        """New keys from a reload: a new SERVER or PORT starts over (no verdict until its first
        check, which runs now); the interval and thresholds apply from the next check."""
        old, self.config = self.config, config
        state = self.state
        state.down_after, state.up_after, state.retry_after = config.down_after, config.up_after, config.retry_after
        if self._loop is not None and old.check_interval != config.check_interval:
            if self._loop.running:
                self._loop.stop()  # a check in flight finishes; the new interval counts from now
            self._loop = LoopingCall(self.check)
            self._loop.clock = self.clock
            self._loop.start(config.check_interval, now=False)
        if (old.host, old.port) != (config.host, config.port):
            log.info("dependency {name}: now {where} (was {old})", name=config.name, where=config.where,
                     old=old.where)
            running = self._loop is not None
            self.stop()
            state.reset(config.where)
            if running:
                self.start()

    def check(self) -> Deferred[None] | None:
        """One check, unless one is in flight; the Deferred fires (never fails) when it ends."""
        if self.in_flight is not None:
            return None
        config = self.config
        self.checks += 1
        try:
            attempt = self.connect(config.host, config.port, config.connect_timeout)
        except Exception as exc:  # a connect that raises: still a failed check, never a stopped loop
            self.state.failed(str(exc) or type(exc).__name__)
            return None
        self.in_flight = attempt
        done: Deferred[None] = Deferred()

        def passed(result: object) -> None:
            if self.in_flight is attempt:
                self.in_flight = None
                self.state.passed()
            done.callback(None)

        def failed(reason: Failure) -> None:
            if self.in_flight is attempt:  # else abandoned (stopped or moved): the result is void
                self.in_flight = None
                self.state.failed(why(reason, config.connect_timeout))
            done.callback(None)
        attempt.addCallbacks(passed, failed)
        return done


class DependencyRegistry(Service):
    """The broker's dependency checks, one per section some unit's DEPENDS_ON names; the units
    share them.  :meth:`configure` at start and on each reload adds, changes and removes checks;
    :meth:`provide` puts another dependency (the license client channel) in a section's place."""

    def __init__(self, reactor: Any, connect: Connect | None = None) -> None:
        self.reactor = reactor
        self.connect = connect if connect is not None else tcp_connect(reactor)
        self.checks: dict[str, DependencyCheck] = {}
        self.provided: dict[str, Any] = {}

    def configure(self, dependencies: Mapping[str, DependencyConfig]) -> None:
        for name in list(self.checks):
            if name not in dependencies:
                self.checks.pop(name).stop()
                log.info("dependency {name}: no unit depends on it any more; not checked", name=name)
        for name, config in dependencies.items():
            if config.unit:  # a unit of this broker (UNIT = ...): provided by the broker, no check
                if name in self.checks:
                    self.checks.pop(name).stop()
                continue
            check = self.checks.get(name)
            if check is None:
                check = self.checks[name] = DependencyCheck(self.reactor, config, self.connect)
                if self.running and name not in self.provided:
                    check.start()
            elif check.config != config:
                check.reconfigure(config)

    def provide(self, name: str, dependency: Any) -> None:
        """From now on *dependency* (an IDependency) is section *name*'s state, not a TCP check
        (the broker's license client for LICENSECLIENT)."""
        self.provided[name] = dependency
        check = self.checks.get(name)
        if check is not None:
            check.stop()

    def provide_units(self, dependencies: Mapping[str, DependencyConfig], unit: Callable[[str], Any]) -> None:
        """Each dependency that is a unit of this broker (``UNIT = ...``) as its
        :class:`~.state.UnitDependency`; *unit* gives the broker's unit of a section name."""
        for name, config in dependencies.items():
            if not config.unit:
                continue
            current = self.provided.get(name)
            if isinstance(current, UnitDependency) and current.unit is unit(config.unit):
                continue
            if isinstance(current, UnitDependency):
                current.close()
            self.provide(name, UnitDependency(name, unit(config.unit), self.reactor))

    def get(self, name: str) -> Any:
        """Section *name*'s dependency (IDependency)."""
        if name in self.provided:
            return self.provided[name]
        return self.checks[name].state

    def resolve(self, names: Any) -> list[Any]:
        return [self.get(name) for name in names]

    def startService(self) -> None:
        super().startService()
        for name, check in self.checks.items():
            if name not in self.provided:
                check.start()

    def stopService(self) -> Any:
        for check in self.checks.values():
            check.stop()
        return super().stopService()
