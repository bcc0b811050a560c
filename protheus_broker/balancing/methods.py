"""The six TOTVS ``SORT_METHOD`` strategies: pure, clock-free ranking of servers.

A balancer ranks the servers that may take a new session, most preferred first.  The broker tries
them in that order, so a refused or timed-out server falls over to the next one.  Nothing here does
I/O or reads a clock: callers pass ``now`` and the servers' current figures.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

from zope.interface import Attribute, Interface, implementer



class SortMethod(enum.Enum):
    """The TOTVS ``SORT_METHOD`` values."""

    CONNECTION = "CONNECTION"
    ROUND_ROBIN = "ROUND_ROBIN"
    SERVER_MEMORY = "SERVER_MEMORY"
    SERVER_USERS = "SERVER_USERS"
    SERVER_THREADS = "SERVER_THREADS"
    SERVER_CPU = "SERVER_CPU"

    @property
    def needs_metrics(self) -> bool:
        """True for the methods that rank servers by what their agent reports."""
        return self.name.startswith("SERVER_")


@dataclass(frozen=True)
class Metrics:
    """What an AppServer's agent last reported, and when (broker clock, seconds)."""

    memory_bytes: int
    users: int
    threads: int
    cpu_percent: float
    taken_at: float


class Rankable(Protocol):
    """What a balancer reads of a server (the pool's ``Backend`` satisfies it)."""

    @property
    def index(self) -> int: ...  # position in the server table (the config's order)

    @property
    def active(self) -> int: ...  # sessions through this broker now, including ones being opened

    @property
    def metrics(self) -> Metrics | None: ...

    @property
    def placed_since_report(self) -> int: ...  # sessions sent to it since its latest report


class IBalancer(Interface):
    """Ranks the available servers for one new session."""

    method = Attribute("The SortMethod this balancer implements.")

    def rank(servers: Sequence[Rankable], now: float) -> list[Rankable]:  # type: ignore[misc]
        """Return *servers* (all available) most preferred first.  May advance internal state
        (round robin), so call it exactly once per new session."""


def _by_connections(servers: Sequence[Rankable]) -> list[Rankable]:
    return sorted(servers, key=lambda s: (s.active, s.index))


@implementer(IBalancer)
class ConnectionBalancer:
    """``CONNECTION``: fewest sessions through the broker; ties go to the earlier table entry."""

    method = SortMethod.CONNECTION

    def rank(self, servers: Sequence[Rankable], now: float) -> list[Rankable]:
        return _by_connections(servers)


@implementer(IBalancer)
class RoundRobinBalancer:
    """``ROUND_ROBIN``: the next server in table order after the last one chosen, whatever the
    counts.  A server that is not available is skipped; the sequence carries on after it."""

    method = SortMethod.ROUND_ROBIN

    def __init__(self) -> None:
        self._last_index = -1

    def rank(self, servers: Sequence[Rankable], now: float) -> list[Rankable]:
        if not servers:
            return []
        ordered = sorted(servers, key=lambda s: s.index)
        after = [s for s in ordered if s.index > self._last_index]
        ranked = after + [s for s in ordered if s.index <= self._last_index]
        self._last_index = ranked[0].index
        return ranked


_METRIC_OF: dict[SortMethod, Callable[[Metrics], float]] = {
    SortMethod.SERVER_MEMORY: lambda m: m.memory_bytes,
    SortMethod.SERVER_USERS: lambda m: m.users,
    SortMethod.SERVER_THREADS: lambda m: m.threads,
    SortMethod.SERVER_CPU: lambda m: m.cpu_percent,
}


#: What one more session is assumed to add to a server's figure until its next report shows the
#: real effect (burst accounting).  A SmartClient connection is one user and one AppServer thread;
#: memory and CPU are configurable (``SESSION_MEMORY_MB``, ``SESSION_CPU_PERCENT``).
DEFAULT_SESSION_COST: dict[SortMethod, float] = {
    SortMethod.SERVER_MEMORY: 20 * 1024 * 1024,
    SortMethod.SERVER_USERS: 1.0,
    SortMethod.SERVER_THREADS: 1.0,
    SortMethod.SERVER_CPU: 2.0,
}


@implementer(IBalancer)
class MetricBalancer:
    """``SERVER_MEMORY/USERS/THREADS/CPU``: lowest estimated figure first.

    The estimate is the latest reported figure plus *session_cost* for each session placed on the
    server since that report, so a burst of logins inside one report interval spreads as the
    metric intends instead of all landing on the server that was lowest at the last report.

    Servers whose last report is older than *max_age* seconds (or that never reported) rank after
    every server with a fresh report, among themselves by connections: with no fresh report at
    all this is exactly ``CONNECTION``.  Ties on the estimate go to fewer connections, then table
    order.
    """

    def __init__(self, method: SortMethod, max_age: float, session_cost: float | None = None) -> None:
        if method not in _METRIC_OF:
            raise ValueError(f"{method} is not a metric method")
        self.method = method
        self.max_age = max_age
        self.session_cost = DEFAULT_SESSION_COST[method] if session_cost is None else session_cost
        self._figure = _METRIC_OF[method]

    def estimate(self, server: Rankable) -> float:
        """The server's figure as it stands now: the report plus sessions placed since."""
        assert server.metrics is not None
        figure = self._figure(server.metrics)
        if not math.isfinite(figure):
            return math.inf
        return figure + server.placed_since_report * self.session_cost

    def is_fresh(self, metrics: Metrics | None, now: float) -> bool:
        return metrics is not None and 0 <= now - metrics.taken_at <= self.max_age

    def rank(self, servers: Sequence[Rankable], now: float) -> list[Rankable]:
        fresh = [s for s in servers if self.is_fresh(s.metrics, now)]
        stale = [s for s in servers if not self.is_fresh(s.metrics, now)]

        def key(server: Rankable) -> tuple[float, int, int]:
            return (self.estimate(server), server.active, server.index)

        return sorted(fresh, key=key) + _by_connections(stale)


def make_balancer(
    method: SortMethod, metrics_max_age: float = 3.0,
    session_costs: Mapping[SortMethod, float] | None = None,
) -> IBalancer:
    """The balancer for *method* (pass the config's ``effective_sort_method``)."""
    if method is SortMethod.CONNECTION:
        return ConnectionBalancer()
    if method is SortMethod.ROUND_ROBIN:
        return RoundRobinBalancer()
    return MetricBalancer(method, metrics_max_age, (session_costs or {}).get(method))
