"""The warm-up: usage history per slot, its file, the forecast and its keys (all in memory or a temp dir)."""

from __future__ import annotations

import json
import os
from datetime import date, timedelta, timezone

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from protheus_broker.ini import ConfigError, Section, read_ini
from protheus_broker.scaling.forecast import UsageForecast, WarmupPolicy, percentile, slot_start
from protheus_broker.scaling.history import HistoryStore, HistoryWriter, Slot, UsageHistory, slot_of
from protheus_broker.scaling.interfaces import IUsageForecast
from protheus_broker.scaling.warmup_settings import read_warmup
from tests.helpers import LogCatcher

UTC = timezone.utc
MONDAY = date(2026, 11, 30)


def at(day: date, hhmm: str, seconds: float = 0.0) -> float:
    """Wall-clock time of *hhmm* on *day* (UTC)."""
    hours, minutes = (int(x) for x in hhmm.split(":"))
    return slot_start(day, 0, UTC) + hours * 3600 + minutes * 60 + seconds


def forecast(**policy: object) -> UsageForecast:
    """A forecast in UTC with 10 sessions per node unless told."""
    settings: dict[str, object] = {"sessions_per_node": 10, "margin": 120.0, "cold_start": 60.0}
    settings.update(policy)
    return UsageForecast(WarmupPolicy(**settings), tz=UTC)  # type: ignore[arg-type]


def learn(target: UsageForecast, weeks_back: list[int], hhmm: str, sessions: list[int]) -> None:
    """Record *sessions* at *hhmm* on the Mondays *weeks_back* weeks before MONDAY."""
    for back, count in zip(weeks_back, sessions):
        target.record(at(MONDAY - timedelta(days=7 * back), hhmm), count)


class HistoryTests(SynchronousTestCase):
    def test_slot_of_quarter_hours(self) -> None:
        """A time falls in its day's 15-minute slot: 08:14:59 is slot 32, 08:15 slot 33."""
        self.assertEqual(slot_of(at(MONDAY, "08:14", 59), UTC), (MONDAY, 32))
        self.assertEqual(slot_of(at(MONDAY, "08:15"), UTC), (MONDAY, 33))
        self.assertEqual(slot_of(at(MONDAY, "23:59", 59), UTC), (MONDAY, 95))

    def test_peak_and_logins_per_slot(self) -> None:
        """A slot keeps the peak of sessions and nodes and the sum of logins; another slot is apart."""
        target = forecast()
        for minute, sessions in (("08:00", 3), ("08:05", 9), ("08:10", 4)):
            target.record(at(MONDAY, minute), sessions, nodes=sessions // 3)
            target.login(at(MONDAY, minute))
        target.record(at(MONDAY, "08:15"), 2)
        self.assertEqual(target.history.sample(MONDAY, 32), Slot(sessions=9, logins=3, nodes=3))
        self.assertEqual(target.history.sample(MONDAY, 33), Slot(sessions=2, logins=0, nodes=0))

    def test_unobserved_day_is_no_sample(self) -> None:
        """A day never recorded gives no sample; a quiet slot of an observed day is a zero."""
        history = UsageHistory()
        history.record(MONDAY, 10, 5)
        self.assertIsNone(history.sample(MONDAY - timedelta(days=7), 10))
        self.assertEqual(history.sample(MONDAY, 50), Slot())

    def test_bounded_to_weeks(self) -> None:
        """Recording day after day keeps only the last N weeks (and the file stays small)."""
        history = UsageHistory(weeks=2)
        for offset in range(60):
            day = MONDAY + timedelta(days=offset)
            for index in range(96):
                history.record(day, index, 100 + index, logins=3, nodes=4)
        self.assertLessEqual(len(history.days), 2 * 7 + 1)
        self.assertEqual(min(history.days), MONDAY + timedelta(days=59 - 14))
        store = HistoryStore(self.mktemp(), weeks=8)
        history8 = UsageHistory(weeks=8)
        for offset in range(8 * 7 + 20):
            for index in range(96):
                history8.record(MONDAY + timedelta(days=offset), index, 1000, logins=1000, nodes=100)
        store.save(history8)
        self.assertLess(os.path.getsize(store.path), 120_000)


class HistoryStoreTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """What is saved loads back equal, and no temp file stays behind."""
        history = UsageHistory()
        history.record(MONDAY, 33, 12, logins=4, nodes=2)
        history.record(MONDAY + timedelta(days=1), 0, 0)
        store = HistoryStore(os.path.join(self.mktemp()))
        self.assertTrue(store.save(history))
        loaded = store.load()
        self.assertEqual(loaded.days, history.days)
        self.assertFalse(os.path.exists(store.path + ".tmp"))

    def test_missing_file_starts_empty(self) -> None:
        """No file yet: an empty history, quietly."""
        catcher = LogCatcher(self)
        self.assertEqual(HistoryStore(self.mktemp()).load().days, {})
        self.assertEqual([e for e in catcher.events if e.get("log_level").name == "error"], [])

    def test_corrupt_file_is_one_line_and_empty(self) -> None:
        """Garbage, truncated JSON, a wrong version or a bad slot: one error line each, empty history,
        the file kept aside as .corrupt."""
        bodies = [b"\x00\xff garbage", b'{"version": 1, "slot_seconds": 900, "days": {"2026-11-30": [[1, 2',
                  json.dumps({"version": 99}).encode(),
                  json.dumps({"version": 1, "slot_seconds": 900, "days": {"2026-11-30": [[96, 1, 1, 1]]}}).encode(),
                  json.dumps({"version": 1, "slot_seconds": 900, "days": {"30/11/2026": []}}).encode()]
        for body in bodies:
            path = self.mktemp()
            with open(path, "wb") as handle:
                handle.write(body)
            catcher = LogCatcher(self)
            self.assertEqual(HistoryStore(path).load().days, {})
            errors = [e for e in catcher.events if e.get("log_level").name == "error"]
            self.assertEqual(len(errors), 1, body)
            self.assertIn("starting with an empty history", catcher.texts()[-1])
            with open(path + ".corrupt", "rb") as kept:
                self.assertEqual(kept.read(), body)  # kept aside, not erased by the next save

    def test_unwritable_folder_is_one_line(self) -> None:
        """A save into a missing folder is one error line and False; nothing raises."""
        catcher = LogCatcher(self)
        store = HistoryStore(os.path.join(self.mktemp(), "no", "such", "usage.json"))
        self.assertFalse(store.save(UsageHistory()))
        self.assertEqual(len([e for e in catcher.events if e.get("log_level").name == "error"]), 1)

    def test_writer_saves_periodically_and_at_stop(self) -> None:
        """The writer saves every interval on its clock and once more when it stops."""
        clock = Clock()
        history = UsageHistory()
        store = HistoryStore(self.mktemp())
        writer = HistoryWriter(store, lambda: history, clock, interval=300)
        writer.startService()
        history.record(MONDAY, 1, 7)
        self.assertFalse(os.path.exists(store.path))
        clock.advance(300)
        self.assertEqual(store.load().sample(MONDAY, 1), Slot(7, 0, 0))
        history.record(MONDAY, 2, 8)
        writer.stopService()
        self.assertEqual(store.load().sample(MONDAY, 2), Slot(8, 0, 0))
        self.assertEqual(clock.getDelayedCalls(), [])


class ForecastTests(SynchronousTestCase):
    def test_provides_the_interface(self) -> None:
        """UsageForecast provides IUsageForecast."""
        self.assertTrue(verifyObject(IUsageForecast, forecast()))

    def test_percentile_like_numpy(self) -> None:
        """p90 of 4 values interpolates between the two largest; empty is 0."""
        self.assertAlmostEqual(percentile([10, 40, 20, 30], 90), 37.0)
        self.assertEqual(percentile([], 90), 0.0)
        self.assertEqual(percentile([5], 90), 5.0)

    def test_p90_of_last_four_same_weekdays(self) -> None:
        """A slot is forecast from the last 4 same weekdays only: the 5th week back is ignored."""
        target = forecast(headroom_ratio=0.0)
        learn(target, [1, 2, 3, 4, 5], "09:00", [10, 40, 20, 30, 1000])
        target.record(at(MONDAY - timedelta(days=1), "09:00"), 500)  # Sunday: another weekday
        sessions, nodes = target.slot_forecast(MONDAY, 36)
        self.assertAlmostEqual(sessions, 37.0)
        self.assertEqual(nodes, 4)

    def test_headroom_percent_and_nodes(self) -> None:
        """+20 % of sessions, or +1 node, on top of the forecast; a zero forecast stays zero."""
        ratio = forecast(headroom_ratio=0.2)
        learn(ratio, [1], "09:00", [40])
        self.assertEqual(ratio.slot_forecast(MONDAY, 36), (40.0, 5))  # 48 sessions: 5 nodes of 10
        extra = forecast(headroom_nodes=1)
        learn(extra, [1], "09:00", [40])
        self.assertEqual(extra.slot_forecast(MONDAY, 36), (40.0, 5))
        learn(extra, [1], "03:00", [0])
        self.assertEqual(extra.slot_forecast(MONDAY, 12), (0.0, 0))

    def test_holidays_forecast_zero_and_are_not_learned(self) -> None:
        """A holiday forecasts zero; a holiday is not recorded, and the same weekday next week
        looks past it to the weeks before."""
        holiday = MONDAY - timedelta(days=7)
        target = forecast(headroom_ratio=0.0, holidays=frozenset({holiday, MONDAY + timedelta(days=7)}))
        learn(target, [2, 3], "09:00", [30, 30])
        target.record(at(holiday, "09:00"), 2)
        self.assertIsNone(target.history.sample(holiday, 36))
        self.assertEqual(target.samples(MONDAY, 36), [30, 30])
        self.assertEqual(target.slot_forecast(MONDAY, 36), (30.0, 3))
        target.record(at(MONDAY, "09:00"), 30)
        self.assertEqual(target.slot_forecast(MONDAY + timedelta(days=7), 36), (0.0, 0))

    def test_annual_holiday(self) -> None:
        """A month-and-day holiday counts every year."""
        policy = WarmupPolicy(annual_holidays=frozenset({(12, 25)}))
        self.assertTrue(policy.holiday(date(2026, 12, 25)))
        self.assertTrue(policy.holiday(date(2031, 12, 25)))
        self.assertFalse(policy.holiday(date(2026, 12, 24)))

    def test_floor_rises_lead_time_before_the_slot(self) -> None:
        """The floor for a 09:00 peak rises at 09:00 minus (cold start + margin), not before."""
        target = forecast(headroom_ratio=0.0, cold_start=60.0, margin=120.0)
        learn(target, [1], "09:00", [30])
        learn(target, [1], "08:45", [0])
        self.assertEqual(target.lead(), 180.0)
        self.assertEqual(target.floor(at(MONDAY, "08:56", 59)), 0)
        self.assertEqual(target.floor(at(MONDAY, "08:57")), 3)
        self.assertEqual(target.floor(at(MONDAY, "09:14")), 3)

    def test_lead_follows_measured_cold_start(self) -> None:
        """Observed cold starts replace the default: the lead is their p95 plus the margin."""
        target = forecast(headroom_ratio=0.0, cold_start=60.0, margin=120.0)
        learn(target, [1], "09:00", [30])
        for seconds in [300.0] * 19 + [310.0]:
            target.observe_cold_start(seconds)
        self.assertAlmostEqual(target.cold_start(), 300.5)
        self.assertEqual(target.floor(at(MONDAY, "08:52")), 0)
        self.assertEqual(target.floor(at(MONDAY, "08:53")), 3)
        for _ in range(30):
            target.observe_cold_start(10.0)
        self.assertEqual(target.cold_start(), 10.0)  # only the last 20 count

    def test_floor_is_max_over_the_lead_window(self) -> None:
        """Inside a busy slot followed by a quiet one, the floor holds the busy slot's nodes until it ends,
        then drops to the quiet slot's."""
        target = forecast(headroom_ratio=0.0)
        learn(target, [1], "09:00", [50])
        learn(target, [1], "09:15", [10])
        self.assertEqual(target.floor(at(MONDAY, "09:14")), 5)
        self.assertEqual(target.floor(at(MONDAY, "09:15")), 1)

    def test_no_history_floor_zero(self) -> None:
        """Without history the floor is 0: the controller scales on demand alone."""
        self.assertEqual(forecast().floor(at(MONDAY, "09:00")), 0)

    def test_forecast_only_logs_and_floors_zero(self) -> None:
        """In forecast-only mode the floor is 0 and what it would be is logged once per change."""
        catcher = LogCatcher(self)
        target = forecast(headroom_ratio=0.0, forecast_only=True)
        learn(target, [1], "09:00", [30])
        self.assertEqual(target.floor(at(MONDAY, "09:00")), 0)
        self.assertEqual(target.floor(at(MONDAY, "09:01")), 0)
        self.assertEqual(target.planned(at(MONDAY, "09:01")), 3)
        lines = [t for t in catcher.texts() if "forecast-only" in t]
        self.assertEqual(len(lines), 1)
        self.assertIn("would keep 3 nodes", lines[0])

    def test_chart_of_today(self) -> None:
        """The chart lists today's 96 slots: forecast nodes everywhere, recorded figures up to now."""
        target = forecast(headroom_ratio=0.0)
        learn(target, [1], "09:00", [30])
        target.record(at(MONDAY, "09:00"), 25, nodes=3)
        chart = target.chart(at(MONDAY, "09:05"))
        self.assertEqual(len(chart["slots"]), 96)
        self.assertEqual(chart["slots"][36], {"slot": 36, "forecast_sessions": 30.0, "forecast_nodes": 3,
                                              "sessions": 25, "nodes": 3, "logins": 0})
        self.assertIsNone(chart["slots"][37]["sessions"])
        self.assertEqual((chart["date"], chart["current_slot"], chart["floor"]), ("2026-11-30", 36, 3))


def section(text: str) -> tuple[Section, dict[str, Section]]:
    raw, where = read_ini(text, "broker.ini")
    sections = {name: Section("broker.ini", name, dict(raw[name]), where) for name in raw.sections}
    return sections["BALANCE_SMART_CLIENT_DESKTOP"], sections


class WarmupKeysTests(SynchronousTestCase):
    def unit(self, body: str) -> tuple[Section, dict[str, Section]]:
        return section("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 7890\n" + body)

    def test_off_by_default(self) -> None:
        """Without WARMUP=1 there is no policy, and the warm-up keys are not reported unknown."""
        unit, sections = self.unit("HOLIDAYS = 12-25\n")
        self.assertIsNone(read_warmup(unit, sections))
        self.assertEqual(unit.unknown_keys(), ["LOCAL_SERVER_PORT"])

    def test_keys_in_the_nodes_section(self) -> None:
        """WARMUP and its keys in the section NODES names, every key parsed."""
        folder = self.mktemp()
        os.makedirs(folder)
        unit, sections = self.unit(
            "NODES = POOL\n[POOL]\nWARMUP = 1\nHISTORY_FILE = " + os.path.join(folder, "u.json") + "\n"
            "HISTORY_WEEKS = 6\nFORECAST_WEEKS = 3\nFORECAST_PERCENTILE = 80\nFORECAST_HEADROOM = 1\n"
            "HOLIDAYS = 2026-12-25, 01-01 2027-02-16\nWARMUP_MARGIN = 30\nFORECAST_ONLY = 1\nSESSIONS_PER_NODE = 20\n"
            "WARMUP_COLD_START = 240\n")
        policy = read_warmup(unit, sections)
        assert policy is not None
        self.assertEqual((policy.history_weeks, policy.weeks, policy.percentile, policy.headroom_nodes,
                          policy.headroom_ratio, policy.margin, policy.forecast_only, policy.sessions_per_node),
                         (6, 3, 80.0, 1, 0.0, 30.0, True, 20))
        self.assertEqual(policy.holidays, frozenset({date(2026, 12, 25), date(2027, 2, 16)}))
        self.assertEqual(policy.annual_holidays, frozenset({(1, 1)}))
        self.assertEqual(policy.cold_start, 240.0)
        self.assertEqual(sections["POOL"].unknown_keys(), [])

    def test_default_history_file_in_state_directory(self) -> None:
        """HISTORY_FILE defaults to usage-<section>.json under systemd's StateDirectory."""
        folder = self.mktemp()
        os.makedirs(folder)
        unit, sections = self.unit("WARMUP = 1\n")
        policy = read_warmup(unit, sections, environ={"STATE_DIRECTORY": folder})
        assert policy is not None
        self.assertEqual(policy.history_file, os.path.join(folder, "usage-balance_smart_client_desktop.json"))
        self.assertEqual((policy.headroom_ratio, policy.headroom_nodes, policy.weeks, policy.percentile),
                         (0.0, 0, 4, 90.0))

    def test_bad_values_one_line_each(self) -> None:
        """Each bad value is one ConfigError naming file, line and key."""
        folder = self.mktemp()
        os.makedirs(folder)
        good = "HISTORY_FILE = " + os.path.join(folder, "u.json") + "\n"
        cases = {
            "HOLIDAYS = 2026-13-01\n": "HOLIDAYS",
            "HOLIDAYS = christmas\n": "HOLIDAYS",
            "FORECAST_HEADROOM = lots\n": "FORECAST_HEADROOM",
            "FORECAST_HEADROOM = 1.5\n": "FORECAST_HEADROOM",
            "FORECAST_PERCENTILE = 101\n": "FORECAST_PERCENTILE",
            "HISTORY_WEEKS = 0\n": "HISTORY_WEEKS",
            "HISTORY_WEEKS = 2\nFORECAST_WEEKS = 4\n": "FORECAST_WEEKS",
            "WARMUP_MARGIN = -1\n": "WARMUP_MARGIN",
            "WARMUP_COLD_START = soon\n": "WARMUP_COLD_START",
            "FORECAST_ONLY = maybe\n": "FORECAST_ONLY",
        }
        for body, key in cases.items():
            unit, sections = self.unit("WARMUP = 1\n" + good + body)
            with self.assertRaises(ConfigError) as caught:
                read_warmup(unit, sections)
            self.assertEqual(caught.exception.key, key, body)
            self.assertIsNotNone(caught.exception.line, body)
            self.assertEqual(len(str(caught.exception).splitlines()), 1)
        unit, sections = self.unit("WARMUP = 1\nHISTORY_FILE = /no/such/folder/u.json\n")
        with self.assertRaises(ConfigError) as caught:
            read_warmup(unit, sections)
        self.assertIn("does not exist", str(caught.exception))
