"""The warm-up simulation (bench/sim_warmup.py) on a small fixed seed: its figures are computed and,
being a deterministic simulation, meet the design's targets."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

HERE = os.path.dirname(os.path.abspath(__file__))


def load_sim() -> ModuleType:
    """bench/ is not a package: load the script as a module."""
    path = os.path.join(os.path.dirname(HERE), "bench", "sim_warmup.py")
    spec = importlib.util.spec_from_file_location("sim_warmup", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sim_warmup"] = module
    spec.loader.exec_module(module)
    return module


sim = load_sim()


class GeneratorTests(SynchronousTestCase):
    def test_deterministic_office_hours(self) -> None:
        """The same seed gives the same logins; working-day logins peak at 8-9 h and 13-14 h, the
        holiday and the weekend are quiet."""
        params = sim.Params(seed=3, weeks=1, users=200)
        logins = sim.generate(params)
        self.assertEqual(logins, sim.generate(params))
        self.assertNotEqual(logins, sim.generate(sim.Params(seed=4, weeks=1, users=200)))
        per_hour = [0] * 24
        weekend = 0
        for login in logins:
            hour = int((login.at - sim.epoch(params.start)) % sim.DAY // sim.HOUR)
            day = int((login.at - sim.epoch(params.start)) // sim.DAY)
            if day >= 5:
                weekend += 1
            else:
                per_hour[hour] += 1
        self.assertEqual(sorted(range(24), key=lambda h: -per_hour[h])[:2], [8, 13])
        self.assertLess(weekend, per_hour[8] / 5)


class SimulationTests(SynchronousTestCase):
    def test_small_run_meets_targets(self) -> None:
        """A 4-week run through the real controller (120 users, 15 sessions per node): the warm-up beats reactive scaling on
        warm peak logins, reaches >= 90 % of them, and uses <= 1.3x the oracle's node-hours."""
        params = sim.Params(seed=11, users=120, sessions_per_node=15)
        report = sim.simulate(params)
        reactive, warm, oracle = (report.figures[p] for p in ("reactive", "warm-up", "oracle"))
        print("\n" + sim.table(report))
        self.assertGreater(warm.peak_logins, 500)
        self.assertEqual(oracle.warm_share, 1.0)
        self.assertGreater(warm.warm_share, reactive.warm_share)
        self.assertGreaterEqual(warm.warm_share, 0.9)
        self.assertLessEqual(warm.node_hours / report.oracle_hours, 1.3)
        self.assertLess(warm.node_hours, report.always_on_hours)
        self.assertLessEqual(report.ideal_hours, report.oracle_hours)
        self.assertEqual(warm.per_week[1], reactive.per_week[1])  # week 1: nothing learnt yet
