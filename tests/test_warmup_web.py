"""The warm-up wired into a desktop unit with managed nodes: the floor reaches the controller, the
history file is loaded and saved, the screen's JSON and page carry the forecast chart (in memory)."""

from __future__ import annotations

import os
from datetime import timedelta

from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.config import parse_config
from protheus_broker.nodes.manager import NodeManager
from protheus_broker.scaling.controller import ScaleToZero
from protheus_broker.scaling.forecast import UsageForecast
from protheus_broker.scaling.history import HistoryStore, HistoryWriter, UsageHistory, slot_of
from protheus_broker.web.page import PAGE_HTML

from .test_nodes import FakeSpawner, FixedRandom
from .test_web import Harness, ini

NOW = 1_700_000_000.0  # the Harness's clock


class WarmupUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        self.history_file = os.path.join(folder, "usage.json")
        history = UsageHistory()
        day, index = slot_of(NOW)
        history.record(day - timedelta(days=7), index, 120)  # last week, this slot: 120 sessions
        HistoryStore(self.history_file).save(history)
        self.h = Harness(self, ini("NODE_COMMAND = appsrv --port {port}\nMIN_NODES = 0\nMAX_NODES = 5\n"
                                   "BASE_PORT = 21000\nSCALE_TO_ZERO = 1\nWARMUP = 1\n"
                                   f"HISTORY_FILE = {self.history_file}\n"))
        [unit] = [u for u in self.h.service.units if getattr(u, "nodes", None) is not None]
        self.unit = unit
        manager: NodeManager = unit.nodes
        self.spawner = FakeSpawner(auto_ready=False)
        manager.spawner = self.spawner
        manager.random = FixedRandom()
        manager.start()
        self.addCleanup(manager.stop)
        self.controller: ScaleToZero = unit.scale_to_zero
        self.controller.start()
        self.addCleanup(self.controller.stop)

    def test_floor_from_history_reaches_the_scaler(self) -> None:
        """Last week's 120 sessions at this slot (50 per node) make the controller ask for 3 nodes."""
        forecast = self.controller.forecast
        assert isinstance(forecast, UsageForecast)
        self.assertEqual(forecast.floor(self.h.reactor.seconds()), 3)
        self.assertEqual(self.controller.target, 3)
        self.assertEqual(self.controller.scaler.desired(), 3)

    def test_status_json_has_the_chart(self) -> None:
        """pools[].forecast: today's 96 slots, this slot forecast at 3 nodes, the floor and the lead."""
        [pool] = self.h.request("GET", "/api/v1/status").json()["pools"]
        chart = pool["forecast"]
        _, index = slot_of(NOW)
        self.assertEqual(len(chart["slots"]), 96)
        self.assertEqual((chart["current_slot"], chart["slots"][index]["forecast_nodes"], chart["floor"],
                          chart["forecast_only"], chart["sessions_per_node"]), (index, 3, 3, False, 50))

    def test_history_saved_at_stop_with_nodes(self) -> None:
        """The controller's ticks record today's sessions; the writer saves them when the unit stops."""
        [writer] = [s for s in self.unit if isinstance(s, HistoryWriter)]
        self.controller.tick()
        writer.stopService()
        day, index = slot_of(self.h.reactor.seconds())
        saved = HistoryStore(self.history_file).load()
        slot = saved.sample(day, index)
        assert slot is not None
        self.assertEqual((slot.sessions, slot.nodes), (0, 0))
        self.assertIsNotNone(saved.sample(day - timedelta(days=7), index))

    def test_cold_start_observed_from_the_nodes(self) -> None:
        """A node's spawn-to-ready time becomes the forecast's cold-start estimate."""
        forecast = self.controller.forecast
        assert isinstance(forecast, UsageForecast)
        self.h.reactor.advance(2.5)
        for node_id in list(self.unit.nodes.nodes):
            self.spawner.listening.add(node_id)
        self.h.reactor.advance(0.5)
        self.assertTrue(forecast.cold_starts)
        self.assertLessEqual(max(forecast.cold_starts), 3.0)
        self.assertGreater(min(forecast.cold_starts), 2.0)

    def test_page_draws_the_chart(self) -> None:
        """The screen's script draws forecast vs actual when the pool has a forecast."""
        for needle in (b"renderForecast", b"forecast nodes", b"nodes running", b"FORECAST_ONLY"):
            self.assertIn(needle, PAGE_HTML)


class WarmupConfigTests(SynchronousTestCase):
    def test_warmup_needs_scale_to_zero(self) -> None:
        """WARMUP=1 without SCALE_TO_ZERO=1 is one warning line and no warm-up."""
        folder = self.mktemp()
        os.makedirs(folder)
        config = parse_config(
            "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 7890\nNODE_COMMAND = appsrv --port {port}\n"
            f"WARMUP = 1\nHISTORY_FILE = {folder}/u.json\n")
        self.assertIsNone(config.desktop.warmup)
        self.assertEqual([w for w in config.warnings if "WARMUP" in w],
                         [f"<config>:4: [BALANCE_SMART_CLIENT_DESKTOP] WARMUP=1 needs SCALE_TO_ZERO=1 "
                          "(the warm-up is its floor); ignored"])

    def test_keys_in_nodes_section_not_unknown(self) -> None:
        """Warm-up keys in the section NODES names draw no unknown-key warning."""
        folder = self.mktemp()
        os.makedirs(folder)
        config = parse_config(
            "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 7890\nNODES = POOL\n[POOL]\n"
            "NODE_COMMAND = appsrv --port {port}\nSCALE_TO_ZERO = 1\nWARMUP = 1\n"
            f"HISTORY_FILE = {folder}/u.json\nHOLIDAYS = 12-25\nFORECAST_ONLY = 1\n")
        assert config.desktop.warmup is not None
        self.assertTrue(config.desktop.warmup.forecast_only)
        self.assertEqual([w for w in config.warnings if "unknown" in w], [])
