#!/usr/bin/env python3
"""Warm-up simulation: 4 synthetic weeks of office-hour SmartClient logins replayed on an accelerated
clock (``task.Clock``) through the real warm-up code (``protheus_broker.scaling.forecast``), a model
of the scale-to-zero controller and a fake scaler with a cold start.

Run: ``make sim-warmup`` (or ``python bench/sim_warmup.py --seed 7``).

The generator (seeded ``random.Random``; every figure below is a parameter of :class:`Params`)
----------------------------------------------------------------------------------------------
- Calendar: 4 weeks from Monday 2026-11-09, UTC.  Friday 2026-11-20 (Dia da Consciencia Negra) is
  the holiday: it is traffic like a Saturday and is in the warm-up's HOLIDAYS list.
- Working days (Mon-Fri): a day volume factor ``v ~ N(1, 0.08)`` clipped to 0.7..1.3 and a day shift
  ``d ~ U(-10, +10)`` minutes move the whole day.  Each of ``users`` (400) users
  - logs in in the morning with probability ``0.9 v`` at ``N(08:30 + d, 25 min)`` for
    ``N(3 h 30, 40 min)`` (clipped 10 min..5 h): the 8-9 h peak;
  - logs in after lunch with probability ``0.85 v`` at ``N(13:30 + d, 25 min)`` for
    ``N(4 h, 45 min)`` (clipped 10 min..5 h 30): the 13-14 h peak;
  - plus sporadic logins, a Poisson process of 6 per hour from 07:00 to 19:00, lasting
    ``Exp(mean 20 min)``.
- Saturday and the holiday: Poisson 2 logins per hour 08:00-18:00, ``Exp(mean 40 min)`` each;
  Sunday: 0.5 per hour.

The controller and the scaler
-----------------------------
- A node takes at most ``SESSIONS_PER_NODE`` (50) sessions; a login goes to the ready node with the
  fewest sessions (the broker's SORT_METHOD=CONNECTION; ``--placement pack``: the fullest with room).
  When every ready node is full the login is *held* until a node becomes ready (counted "cold"),
  otherwise it "found a warm node".  Sessions never move between nodes.
- A node's cold start (spawn to ready) is ``U(50, 70)`` s (mean 60 s, ``--cold-start``); each one is
  reported to the forecast (``observe_cold_start``), as the desktop unit does from its node manager.
- ``--controller real`` (the default): the REAL ``protheus_broker.scaling.controller.ScaleToZero``
  (ZERO_IDLE_TIME 900 s, its default; ticking every 15 s instead of 1 s, for speed) drives a fake
  ``IScaler`` that models the local scaler over the node manager: ``scale(n)`` sets MIN_NODES, the
  manager runs ``max(MIN_NODES, ceil((load + 1) / SESSIONS_PER_NODE))`` nodes (none at MIN_NODES=0
  with no session) and lets a node above that go after 60 s without a session (IDLE_TIME's default).
  The controller itself records (open + held) sessions in the forecast every tick.
- ``--controller naive``: a hand-written model instead: target ``max(need, forecast.floor(now))``
  with the same need, a node above the target stopped after 300 s without a session.
- Policies: ``reactive`` (scale to zero, no forecast); ``warm-up`` (the real forecast as the
  controller's floor: p90 of the last 4 same weekdays, no headroom by default, lead = measured cold
  start + 120 s); ``oracle``: knows every arrival: each node is started exactly one cold start
  before the login that needs it (ready at that moment, its cold start paid in node-hours), runs as
  many nodes as the load needs without the spare, and stops a node the moment its last session
  ends; same placement, so no controller of this broker does better.  Two more rows: ``ideal``
  (sessions could move between nodes: ``max over [t, t + cold start] of ceil(sessions / 50)``: no
  broker of sticky TCP sessions reaches it) and ``always on`` (the peak need all week).

Measured on the last week (the first weeks learn): the share of logins in peak hours (08:00-09:00 and
13:00-14:00 of working days) that found a warm node, and node-hours against the oracle and always on.

Honesty: the real controller runs here, but the node manager is a model (no processes, no probes,
no recycling; its tick is the simulation's 15 s), the wake path is simplified (a login that finds no
room is held by the simulation, not by ``ScaleToZero.hold``), and node-hours are sampled every 15 s.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from zope.interface import implementer  # noqa: E402

from protheus_broker.scaling.controller import ScaleToZero, ScaleToZeroPolicy  # noqa: E402
from protheus_broker.scaling.forecast import UsageForecast, WarmupPolicy  # noqa: E402
from protheus_broker.scaling.interfaces import IScaler  # noqa: E402

UTC = timezone.utc
HOUR = 3600.0
DAY = 86400.0
WEEK = 7 * DAY


@dataclass(frozen=True)
class Params:
    """Every knob of the generator and the model (see the module docstring)."""

    seed: int = 7
    start: date = date(2026, 11, 9)  # a Monday
    weeks: int = 4
    measure_weeks: int = 1  # the last weeks measured
    holidays: tuple[date, ...] = (date(2026, 11, 20),)
    users: int = 400
    sessions_per_node: int = 50
    cold_start: tuple[float, float] = (50.0, 70.0)
    controller: str = "real"  # "real": scaling/controller.py's ScaleToZero over a node-manager model; "naive"
    idle_time: float = 300.0  # the naive controller's idle time
    zero_idle_time: float = 900.0  # the real controller's ZERO_IDLE_TIME (its default)
    node_idle_time: float = 60.0  # the node manager's IDLE_TIME (its default)
    tick: float = 15.0
    margin: float = 120.0
    percentile: float = 90.0
    headroom_ratio: float = 0.0
    headroom_nodes: int = 0
    placement: str = "least"  # "least": the ready node with the fewest sessions (SORT_METHOD=CONNECTION); "pack": the fullest with room


@dataclass(frozen=True)
class Login:
    at: float
    duration: float


def _clipped_normal(rng: random.Random, mean: float, sigma: float, low: float, high: float) -> float:
    return min(high, max(low, rng.gauss(mean, sigma)))


def _poisson_times(rng: random.Random, start: float, end: float, per_hour: float) -> list[float]:
    times, moment = [], start
    while per_hour > 0:
        moment += rng.expovariate(per_hour / HOUR)
        if moment >= end:
            break
        times.append(moment)
    return times


def generate(params: Params) -> list[Login]:
    """The logins of ``params.weeks`` weeks, sorted by time (deterministic for a seed)."""
    rng = random.Random(params.seed)
    logins: list[Login] = []
    for offset in range(params.weeks * 7):
        day = params.start + timedelta(days=offset)
        midnight = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        working = day.weekday() < 5 and day not in params.holidays
        if working:
            volume = _clipped_normal(rng, 1.0, 0.08, 0.7, 1.3)
            shift = rng.uniform(-600.0, 600.0)
            for _ in range(params.users):
                if rng.random() < min(1.0, 0.9 * volume):
                    logins.append(Login(midnight + rng.gauss(8.5 * HOUR + shift, 25 * 60),
                                        _clipped_normal(rng, 3.5 * HOUR, 40 * 60, 600, 5 * HOUR)))
                if rng.random() < min(1.0, 0.85 * volume):
                    logins.append(Login(midnight + rng.gauss(13.5 * HOUR + shift, 25 * 60),
                                        _clipped_normal(rng, 4 * HOUR, 45 * 60, 600, 5.5 * HOUR)))
            for moment in _poisson_times(rng, midnight + 7 * HOUR, midnight + 19 * HOUR, 6.0):
                logins.append(Login(moment, rng.expovariate(1 / (20 * 60))))
        else:
            rate = 0.5 if day.weekday() == 6 else 2.0
            for moment in _poisson_times(rng, midnight + 8 * HOUR, midnight + 18 * HOUR, rate):
                logins.append(Login(moment, rng.expovariate(1 / (40 * 60))))
    return sorted(logins, key=lambda login: login.at)


def epoch(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def peak_hour(params: Params, moment: float) -> bool:
    """08:00-09:00 or 13:00-14:00 of a working day."""
    when = datetime.fromtimestamp(moment, UTC)
    if when.weekday() >= 5 or when.date() in params.holidays:
        return False
    return when.hour in (8, 13)


@dataclass
class Node:
    started: float
    ready_at: float
    ready: bool = False
    sessions: int = 0
    idle_since: float | None = None


@dataclass
class Figures:
    """What one policy did in the measured weeks."""

    policy: str
    peak_logins: int = 0
    peak_warm: int = 0
    logins: int = 0
    warm: int = 0
    waits: list[float] = field(default_factory=list)
    node_seconds: float = 0.0
    node_starts: int = 0
    max_nodes: int = 0
    per_week: dict[int, tuple[int, int]] = field(default_factory=dict)  # week -> (peak logins, warm)

    @property
    def warm_share(self) -> float:
        return self.peak_warm / self.peak_logins if self.peak_logins else 1.0

    @property
    def node_hours(self) -> float:
        return self.node_seconds / HOUR


@implementer(IScaler)
class SimScaler:
    """The fake scaler the real controller drives: the local scaler over a node manager, modelled
    (``scale(n)`` sets MIN_NODES; the manager adds nodes by load and lets idle ones go)."""

    name = "sim-nodes"
    drains_safely = True  # the node manager modelled here never stops a node in use

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    def desired(self) -> int:
        return self.sim.min_nodes

    def ready(self) -> int:
        return sum(1 for node in self.sim.nodes if node.ready)

    def scale(self, replicas: int, reason: str) -> None:
        changed = replicas != self.sim.min_nodes
        self.sim.min_nodes = replicas
        self.sim.reconcile()
        if changed:
            self.sim.notify()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self.sim.callbacks.append(callback)
        return lambda: self.sim.callbacks.remove(callback)


class Simulation:
    """One policy replayed on a task.Clock: the generator's logins, the controller model, the fake scaler."""

    def __init__(self, params: Params, logins: list[Login], policy: str) -> None:
        self.params = params
        self.logins = logins
        self.policy = policy
        self.clock = Clock()
        self.clock.rightNow = epoch(params.start)
        self.rng = random.Random(params.seed + 1)
        self.forecast = UsageForecast(WarmupPolicy(
            sessions_per_node=params.sessions_per_node, history_weeks=8, weeks=4, percentile=params.percentile,
            headroom_ratio=params.headroom_ratio, headroom_nodes=params.headroom_nodes,
            holidays=frozenset(params.holidays), margin=params.margin,
            cold_start=sum(params.cold_start) / 2), tz=UTC, name="sim")
        self.nodes: list[Node] = []
        self.held: list[tuple[float, Login]] = []
        self.measure_from = epoch(params.start) + (params.weeks - params.measure_weeks) * WEEK
        self.end = epoch(params.start) + params.weeks * WEEK
        self.figures = Figures(policy)
        self.min_nodes = 0  # what the real controller asked the scaler (the node manager's MIN_NODES)
        self.callbacks: list[Callable[[], None]] = []
        self.controller: ScaleToZero | None = None
        if params.controller == "real" and policy != "oracle":
            self.controller = ScaleToZero(
                self.clock, SimScaler(self),
                ScaleToZeroPolicy(enabled=True, idle_time=params.zero_idle_time, sessions_per_member=0,
                                  min_awake=1, tick=params.tick),
                activity=lambda: self.open_sessions() + len(self.held),
                forecast=self.forecast if policy == "warm-up" else None, name=policy)

    def notify(self) -> None:
        for callback in list(self.callbacks):
            callback()

    # -- the fake scaler ---------------------------------------------------------------------------

    def start_node(self) -> Node:
        now = self.clock.seconds()
        cold_start = self.rng.uniform(*self.params.cold_start)
        if self.policy == "oracle":  # started one cold start ago: ready now, and paid for
            node = Node(started=now - cold_start, ready_at=now, ready=True, idle_since=now)
            if now >= self.measure_from:
                self.figures.node_seconds += cold_start
        else:
            node = Node(started=now, ready_at=now + cold_start)
            self.clock.callLater(cold_start, self.node_ready, node)
        self.nodes.append(node)
        if now >= self.measure_from:
            self.figures.node_starts += 1
        return node

    def node_ready(self, node: Node) -> None:
        if node not in self.nodes:
            return
        node.ready = True
        node.idle_since = self.clock.seconds()
        self.forecast.observe_cold_start(node.ready_at - node.started)
        while self.held and node.sessions < self.params.sessions_per_node:
            since, login = self.held.pop(0)
            self.serve(node, login, warm=False, waited=self.clock.seconds() - since)
        self.notify()

    # -- the controller model --------------------------------------------------------------------

    def open_sessions(self) -> int:
        return sum(n.sessions for n in self.nodes)

    def target(self) -> int:
        load = self.open_sessions() + len(self.held)
        if self.controller is not None:  # the node manager: MIN_NODES from the controller, more by load
            if self.min_nodes == 0 and load == 0:
                return 0
            return max(self.min_nodes, math.ceil((load + 1) / self.params.sessions_per_node))
        if self.policy == "oracle":
            return math.ceil(load / self.params.sessions_per_node)
        need = math.ceil((load + 1) / self.params.sessions_per_node)
        if self.policy == "reactive":
            return need
        return max(need, self.forecast.floor(self.clock.seconds()))

    def reconcile(self) -> None:
        now = self.clock.seconds()
        target = self.target()
        idle_time = 0.0 if self.policy == "oracle" else self.params.idle_time
        if self.controller is not None:
            idle_time = self.params.node_idle_time
        while len(self.nodes) < target:
            self.start_node()
        if len(self.nodes) > target:
            for node in sorted(self.nodes, key=lambda n: n.sessions):
                if len(self.nodes) <= target:
                    break
                if node.ready and node.sessions == 0 and node.idle_since is not None \
                        and now - node.idle_since >= idle_time:
                    self.nodes.remove(node)
                    self.notify()

    def tick(self) -> None:
        now = self.clock.seconds()
        if self.controller is None:  # the real controller records (open + held) once a tick itself
            self.forecast.record(now, self.open_sessions() + len(self.held), nodes=len(self.nodes))
        self.reconcile()
        if self.measure_from <= now < self.end:
            self.figures.node_seconds += len(self.nodes) * self.params.tick
            self.figures.max_nodes = max(self.figures.max_nodes, len(self.nodes))

    # -- sessions -------------------------------------------------------------------------------

    def login(self, login: Login) -> None:
        now = self.clock.seconds()
        self.forecast.login(now)
        room = [n for n in self.nodes if n.ready and n.sessions < self.params.sessions_per_node]
        if not room and self.policy == "oracle":
            room = [self.start_node()]
        if room:
            if self.params.placement == "pack":
                node = max(room, key=lambda n: n.sessions)
            else:
                node = min(room, key=lambda n: n.sessions)
            self.serve(node, login, warm=True, waited=0.0)
        else:
            self.held.append((now, login))
        self.reconcile()
        if self.controller is not None:
            self.controller.evaluate()  # activity changed (the unit's gate does this on a session)

    def serve(self, node: Node, login: Login, warm: bool, waited: float) -> None:
        node.sessions += 1
        node.idle_since = None
        self.clock.callLater(login.duration, self.logout, node)
        figures, week = self.figures, int((login.at - epoch(self.params.start)) // WEEK) + 1
        peak = peak_hour(self.params, login.at)
        if peak:
            total, found = figures.per_week.get(week, (0, 0))
            figures.per_week[week] = (total + 1, found + int(warm))
        if login.at >= self.measure_from:
            figures.logins += 1
            figures.warm += int(warm)
            if not warm:
                figures.waits.append(waited)
            if peak:
                figures.peak_logins += 1
                figures.peak_warm += int(warm)

    def logout(self, node: Node) -> None:
        node.sessions -= 1
        if node.sessions == 0:
            node.idle_since = self.clock.seconds()

    # -- the replay -----------------------------------------------------------------------------

    def run(self) -> Figures:
        """Replay: the next login and the next tick are the only calls pending (task.Clock sorts its
        whole list at each callLater), each run at its own time."""
        clock = self.clock
        pending = iter(self.logins)

        def next_login() -> None:
            login = next(pending, None)
            if login is not None:
                clock.callLater(max(0.0, login.at - clock.seconds()), replay, login)

        def replay(login: Login) -> None:
            self.login(login)
            next_login()

        def tick() -> None:
            self.tick()
            clock.callLater(self.params.tick, tick)

        next_login()
        clock.callLater(0, tick)
        if self.controller is not None:
            self.controller.start()
        while clock.calls and clock.calls[0].getTime() < self.end:
            clock.advance(clock.calls[0].getTime() - clock.seconds())
        if self.controller is not None:
            self.controller.stop()
        for call in clock.getDelayedCalls():
            call.cancel()
        return self.figures


def oracle_node_hours(params: Params, logins: list[Login]) -> tuple[float, int]:
    """Node-hours over the measured weeks if sessions could move between nodes (perfect packing,
    each node started one cold start ahead), and the peak need (for always on)."""
    start = epoch(params.start)
    buckets = int(params.weeks * WEEK // params.tick)
    peak = [0] * buckets  # the most sessions open at once within each tick
    events = sorted([(lg.at, 1) for lg in logins] + [(lg.at + lg.duration, -1) for lg in logins])
    open_now, index = 0, 0
    for bucket in range(buckets):
        until = start + (bucket + 1) * params.tick
        best = open_now
        while index < len(events) and events[index][0] < until:
            open_now += events[index][1]
            best = max(best, open_now)
            index += 1
        peak[bucket] = best
    need = [math.ceil(s / params.sessions_per_node) for s in peak]
    ahead = math.ceil(params.cold_start[1] / params.tick)
    first = int((params.weeks - params.measure_weeks) * WEEK // params.tick)
    seconds = sum(max(need[b:b + ahead + 1]) for b in range(first, buckets)) * params.tick
    return seconds / HOUR, max(need[first:])


@dataclass
class Report:
    params: Params
    figures: dict[str, Figures]
    oracle_hours: float  # the same placement, knowing every arrival (the "oracle" policy)
    ideal_hours: float  # sessions that could move between nodes, perfectly packed
    always_on_hours: float
    peak_need: int
    logins: int


def simulate(params: Params, policies: tuple[str, ...] = ("reactive", "warm-up", "oracle"),
             progress: Callable[[str], None] | None = None) -> Report:
    logins = generate(params)
    figures = {}
    for policy in policies:
        if progress:
            progress(f"replaying {len(logins)} logins, policy {policy} ...")
        figures[policy] = Simulation(params, logins, policy).run()
    ideal, peak_need = oracle_node_hours(params, logins)
    hours = params.measure_weeks * WEEK / HOUR
    oracle = figures["oracle"].node_hours if "oracle" in figures else ideal
    return Report(params, figures, oracle, ideal, peak_need * hours, peak_need, len(logins))


def table(report: Report) -> str:
    p = report.params
    lines = [
        f"warm-up simulation: seed {p.seed}, {p.weeks} weeks from {p.start} ({report.logins} logins, "
        f"{p.users} users), measured on the last {p.measure_weeks} week(s)",
        f"SESSIONS_PER_NODE={p.sessions_per_node}, cold start U({p.cold_start[0]:g},{p.cold_start[1]:g}) s, "
        + (f"controller scaling/controller.py (ZERO_IDLE_TIME={p.zero_idle_time:g} s) over a node-manager model "
           f"(IDLE_TIME={p.node_idle_time:g} s)" if p.controller == "real" else f"naive controller (idle {p.idle_time:g} s)")
        + f", placement {p.placement},\nforecast p{p.percentile:g} of 4 weeks + "
        + (f"{p.headroom_nodes} node(s)" if p.headroom_nodes else f"{p.headroom_ratio:.0%}")
        + f", margin {p.margin:g} s, holidays {', '.join(str(d) for d in p.holidays)}",
        "",
        f"{'policy':<10} {'peak logins':>11} {'warm':>7} {'all warm':>8} {'cold wait mean/max s':>20} "
        f"{'node-h':>8} {'x oracle':>8} {'x always-on':>11} {'starts':>6} {'max nodes':>9}",
    ]
    for name, f in report.figures.items():
        waits = f"{sum(f.waits) / len(f.waits):.0f}/{max(f.waits):.0f}" if f.waits else "-"
        lines.append(
            f"{name:<10} {f.peak_logins:>11} {f.warm_share:>7.1%} {f.warm / max(1, f.logins):>8.1%} {waits:>20} "
            f"{f.node_hours:>8.1f} {f.node_hours / report.oracle_hours:>8.2f} "
            f"{f.node_hours / report.always_on_hours:>11.2f} {f.node_starts:>6} {f.max_nodes:>9}")
    lines.append(f"{'ideal':<10} {'':>11} {'100.0%':>7} {'':>8} {'':>20} {report.ideal_hours:>8.1f} "
                 f"{report.ideal_hours / report.oracle_hours:>8.2f} {report.ideal_hours / report.always_on_hours:>11.2f}"
                 "   (sessions movable, perfectly packed)")
    lines.append(f"{'always on':<10} {'':>11} {'100.0%':>7} {'':>8} {'':>20} {report.always_on_hours:>8.1f} "
                 f"{report.always_on_hours / report.oracle_hours:>8.2f} {1:>11.2f} {'':>6} {report.peak_need:>9}")
    lines.append("")
    lines.append("peak-hour logins that found a warm node, per week (weeks 1.. learn):")
    for name, f in report.figures.items():
        if name == "oracle":
            continue
        cells = "  ".join(f"w{w}: {found / total:.1%} of {total}" for w, (total, found) in sorted(f.per_week.items()))
        lines.append(f"  {name:<10} {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=Params.seed)
    parser.add_argument("--weeks", type=int, default=Params.weeks)
    parser.add_argument("--users", type=int, default=Params.users)
    parser.add_argument("--idle-time", type=float, default=Params.idle_time)
    parser.add_argument("--margin", type=float, default=Params.margin)
    parser.add_argument("--cold-start", type=float, default=60.0, help="mean spawn-to-ready seconds (U(mean-10 s, mean+10 s), at least 1 s)")
    parser.add_argument("--controller", choices=("real", "naive"), default=Params.controller)
    parser.add_argument("--placement", choices=("least", "pack"), default=Params.placement)
    parser.add_argument("--headroom", default="0%", help="20%% (sessions) or 1 (nodes)")
    args = parser.parse_args(argv)
    ratio, nodes = (float(args.headroom[:-1]) / 100, 0) if args.headroom.endswith("%") else (0.0, int(args.headroom))
    params = Params(cold_start=(max(1.0, args.cold_start - 10), args.cold_start + 10), seed=args.seed, weeks=args.weeks, users=args.users, idle_time=args.idle_time,
                    margin=args.margin, placement=args.placement, controller=args.controller, headroom_ratio=ratio, headroom_nodes=nodes)
    report = simulate(params, progress=lambda text: print(text, file=sys.stderr))
    print(table(report))
    warm = report.figures["warm-up"]
    ok = warm.warm_share >= 0.9 and warm.node_hours / report.oracle_hours <= 1.3
    print(f"\ntargets (warm-up): warm share >= 90 %: {warm.warm_share:.1%}; node-hours <= 1.3x oracle: "
          f"{warm.node_hours / report.oracle_hours:.2f}x -> {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
