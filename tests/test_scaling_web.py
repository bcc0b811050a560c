"""Scale to zero on the broker screen, in the status JSON and /metrics (in memory)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.nodes.manager import NodeManager
from protheus_broker.scaling.controller import ScaleToZero, WakeRefused
from protheus_broker.web.page import PAGE_HTML

from .test_nodes import FakeSpawner, FixedRandom
from .test_web import Harness, ini

POOL = 'pool="BALANCE_SMART_CLIENT_DESKTOP"'


class ScaleToZeroScreenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self, ini("NODE_COMMAND = appsrv --port {port}\nMIN_NODES = 0\nMAX_NODES = 3\n"
                                   "BASE_PORT = 21000\nSCALE_TO_ZERO = 1\nWAKE_TIMEOUT = 60\nMAX_HELD = 7\n"))
        [unit] = [u for u in self.h.service.units if getattr(u, "nodes", None) is not None]
        manager: NodeManager = unit.nodes
        self.spawner = FakeSpawner(auto_ready=False)
        manager.spawner = self.spawner
        manager.random = FixedRandom()
        manager.start()
        self.addCleanup(manager.stop)
        controller: ScaleToZero = unit.scale_to_zero
        controller.start()
        self.addCleanup(controller.stop)
        self.controller = controller

    def hold(self) -> Deferred[None]:
        held = self.controller.hold("10.0.0.1:1")
        self.addCleanup(lambda: held.addErrback(lambda f: f.trap(WakeRefused)))
        return held

    def test_status_shows_waking_and_held(self) -> None:
        """While a node wakes the status JSON says waking, with the held sessions and MAX_HELD."""
        self.hold()
        self.hold()
        [pool] = self.h.request("GET", "/api/v1/status").json()["pools"]
        wake = pool["scale_to_zero"]
        self.assertEqual((wake["waking"], wake["held"], wake["max_held"], wake["target"], wake["ready"]),
                         (True, 2, 7, 1, 0))
        self.assertEqual([n["state"] for n in pool["nodes"]["nodes"]], ["starting"])

    def test_metrics(self) -> None:
        """/metrics has the waking flag, the held sessions and the wakes."""
        self.hold()
        text = self.h.request("GET", "/metrics").body.decode()
        self.assertIn(f"protheus_broker_wake_waking{{{POOL}}} 1.0", text)
        self.assertIn(f"protheus_broker_wake_held_sessions{{{POOL}}} 1.0", text)
        self.assertIn(f"protheus_broker_wakes_total{{{POOL}}} 1.0", text)

    def test_released_when_node_ready(self) -> None:
        """Once the node listens the held session goes on and the screen says awake (not waking)."""
        held = self.hold()
        self.spawner.listening.add(1)
        self.h.reactor.advance(0.05)
        self.assertIsNone(self.successResultOf(held))
        [pool] = self.h.request("GET", "/api/v1/status").json()["pools"]
        self.assertEqual((pool["scale_to_zero"]["waking"], pool["scale_to_zero"]["held"],
                          pool["scale_to_zero"]["ready"]), (False, 0, 1))

    def test_page_renders_wake(self) -> None:
        """The screen has the scale-to-zero line: waking, held, asleep."""
        for needle in (b"renderWake", b"waking", b" held (max ", b"asleep"):
            self.assertIn(needle, PAGE_HTML)
