"""The warm-up forecast (seed 003: Hypnus "warms environments up from usage history").

A seasonal-naive forecast per (weekday, 15-minute slot): a slot of a day is forecast from the same
slot of the same weekday over the last weeks (the *percentile*, p90 by default, of the last
*weeks* observed same weekdays, holidays skipped), plus headroom, in nodes of *sessions_per_node*.
Holidays forecast zero and are not learned from.  :meth:`UsageForecast.floor` is the largest
forecast of the slots that start within the lead time (the measured cold start plus a margin), so
nodes are ready when a slot's logins arrive.  The controller never scales below the floor, nor below
what current load needs (that part is the controller's).

In forecast-only mode the floor is 0 and what it would have been is logged when it changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from typing import Any, Callable, Sequence

from twisted.logger import Logger
from zope.interface import implementer

from protheus_broker.scaling.history import SLOT_SECONDS, SLOTS_PER_DAY, UsageHistory, slot_of
from protheus_broker.scaling.interfaces import IUsageForecast

log = Logger()

#: Cold-start observations kept for the estimate (its p95).
COLD_START_SAMPLES = 20


@dataclass(frozen=True)
class WarmupPolicy:
    """The warm-up keys of a unit (see :mod:`protheus_broker.scaling.warmup_settings`)."""

    sessions_per_node: int = 50
    history_file: str = "/var/lib/protheus-broker/usage-history.json"
    history_weeks: int = 8
    weeks: int = 4  # same weekdays the forecast looks at
    percentile: float = 90.0
    headroom_ratio: float = 0.0  # sessions * (1 + ratio) ... (p90 is headroom enough: bench/sim_warmup.py)
    headroom_nodes: int = 0  # ... or + nodes (used when not 0)
    holidays: frozenset[date] = field(default_factory=frozenset)
    annual_holidays: frozenset[tuple[int, int]] = field(default_factory=frozenset)  # (month, day) every year
    margin: float = 120.0  # seconds started ahead beyond the cold start
    cold_start: float = 60.0  # the cold-start estimate before any node was measured
    forecast_only: bool = False
    max_nodes: int = 1000

    def holiday(self, day: date) -> bool:
        """Whether *day* is in the holiday list (a date, or a month and day every year)."""
        return day in self.holidays or (day.month, day.day) in self.annual_holidays


def percentile(values: Sequence[float], rank: float) -> float:
    """The *rank* percentile (0..100) of *values*, linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * rank / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@implementer(IUsageForecast)
class UsageForecast:
    """Usage history in, warm-up floor out; pure logic (the clock is the *now* passed in)."""

    def __init__(self, policy: WarmupPolicy, history: UsageHistory | None = None,
                 tz: tzinfo | None = None, name: str = "") -> None:
        self.policy = policy
        self.history = history if history is not None else UsageHistory(policy.history_weeks)
        self.tz = tz
        self.name = name
        self.cold_starts: list[float] = []
        self._cache: dict[tuple[date, int], tuple[float, int]] = {}
        self._logged_floor: int | None = None
        #: Nodes running now (the scaler's ready count, set by the unit): recorded with the sessions.
        self.running: Callable[[], int] | None = None

    # -- learning --------------------------------------------------------------------------------

    def record(self, now: float, sessions: int, nodes: int | None = None) -> None:
        """Fold the sessions open at *now* (and the nodes running, if given) into now's slot; a
        holiday is not learned from."""
        day, index = slot_of(now, self.tz)
        if nodes is None and self.running is not None:
            nodes = self.running()
        if not self.policy.holiday(day):
            self.history.record(day, index, max(0, sessions), nodes=None if nodes is None else max(0, nodes))

    def login(self, now: float) -> None:
        """Count one login in now's slot."""
        day, index = slot_of(now, self.tz)
        if not self.policy.holiday(day):
            self.history.record(day, index, 0, logins=1)

    def observe_cold_start(self, seconds: float) -> None:
        """A node went from spawn to ready in *seconds* (the scaler reports it)."""
        if seconds >= 0 and math.isfinite(seconds):
            self.cold_starts.append(seconds)
            del self.cold_starts[:-COLD_START_SAMPLES]

    def cold_start(self) -> float:
        """The cold-start estimate: p95 of the last observations, the policy's default before any."""
        if not self.cold_starts:
            return self.policy.cold_start
        return percentile(self.cold_starts, 95.0)

    def lead(self) -> float:
        """How far ahead nodes start: the cold-start estimate plus the margin."""
        return self.cold_start() + self.policy.margin

    # -- forecasting -----------------------------------------------------------------------------

    def samples(self, day: date, index: int) -> list[int]:
        """Peak sessions of the slot on the last *weeks* observed same weekdays before *day*, holidays skipped."""
        found: list[int] = []
        for back in range(1, self.policy.history_weeks + 1):
            past = day - timedelta(days=7 * back)
            if self.policy.holiday(past):
                continue
            slot = self.history.sample(past, index)
            if slot is not None:
                found.append(slot.sessions)
                if len(found) == self.policy.weeks:
                    break
        return found

    def slot_forecast(self, day: date, index: int) -> tuple[float, int]:
        """(sessions, nodes) forecast for slot *index* of *day*: zero on a holiday or without history."""
        if len(self._cache) > 4 * SLOTS_PER_DAY:
            self._cache.clear()  # past days' forecasts are not asked again
        key = (day, index)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        result = (0.0, 0)
        if not self.policy.holiday(day):
            samples = self.samples(day, index)
            sessions = percentile(samples, self.policy.percentile)
            if sessions > 0:
                spn = self.policy.sessions_per_node
                if self.policy.headroom_nodes:
                    nodes = math.ceil(sessions / spn) + self.policy.headroom_nodes
                else:
                    nodes = math.ceil(sessions * (1.0 + self.policy.headroom_ratio) / spn - 1e-9)
                result = (sessions, min(nodes, self.policy.max_nodes))
        self._cache[key] = result
        return result

    def planned(self, now: float) -> int:
        """The floor the forecast asks for at *now*: the largest node forecast of the slots from
        now's slot to the one that starts within the lead time (forecast-only mode aside)."""
        lead = self.lead()
        start = math.floor(now / SLOT_SECONDS) * SLOT_SECONDS
        best = 0
        moment = start
        while moment <= now + lead:
            day, index = slot_of(moment + 1, self.tz)  # +1: inside the slot even across DST shifts
            best = max(best, self.slot_forecast(day, index)[1])
            moment += SLOT_SECONDS
        return best

    def floor(self, now: float) -> int:
        """AppServers that should already run at *now*; 0 in forecast-only mode, which logs instead."""
        planned = self.planned(now)
        if self.policy.forecast_only:
            if planned != self._logged_floor:
                log.info("warm-up {unit}: forecast-only: would keep {nodes} nodes running "
                         "(lead {lead:.0f} s)", unit=self.name, nodes=planned, lead=self.lead())
                self._logged_floor = planned
            return 0
        return planned

    def chart(self, now: float) -> dict[str, Any]:
        """Today's slots for the screen: forecast nodes and sessions against the recorded ones."""
        today, current = slot_of(now, self.tz)
        slots = []
        for index in range(SLOTS_PER_DAY):
            sessions, nodes = self.slot_forecast(today, index)
            actual = self.history.sample(today, index) if index <= current else None
            slots.append({
                "slot": index,
                "forecast_sessions": round(sessions, 1),
                "forecast_nodes": nodes,
                "sessions": None if actual is None else actual.sessions,
                "nodes": None if actual is None else actual.nodes,
                "logins": None if actual is None else actual.logins,
            })
        return {
            "date": today.isoformat(),
            "weekday": today.strftime("%A"),
            "holiday": self.policy.holiday(today),
            "slot_seconds": SLOT_SECONDS,
            "current_slot": current,
            "floor": self.planned(now),
            "forecast_only": self.policy.forecast_only,
            "cold_start_seconds": round(self.cold_start(), 1),
            "lead_seconds": round(self.lead(), 1),
            "sessions_per_node": self.policy.sessions_per_node,
            "slots": slots,
        }


def slot_start(day: date, index: int, tz: tzinfo | None = None) -> float:
    """Wall-clock time when slot *index* of *day* starts (for tests and the simulation)."""
    midnight = datetime(day.year, day.month, day.day, tzinfo=tz)
    return midnight.timestamp() + index * SLOT_SECONDS
