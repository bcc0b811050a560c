"""Node admin actions and node states on the broker screen, JSON and /metrics (in memory)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.nodes.manager import NodeManager
from protheus_broker.web.page import PAGE_HTML

from .test_nodes import FakeSpawner, FixedRandom
from .test_web import Harness, ini


class NodeAdminTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self, ini("NODE_COMMAND = appsrv --port {port}\nMIN_NODES = 2\nMAX_NODES = 3\n"
                                   "BASE_PORT = 21000\n"))
        [unit] = [u for u in self.h.service.units if getattr(u, "nodes", None) is not None]
        self.unit = unit
        manager: NodeManager = unit.nodes
        self.spawner = FakeSpawner()
        manager.spawner = self.spawner
        manager.random = FixedRandom()
        manager.start()
        self.addCleanup(manager.stop)
        self.manager = manager

    def post(self, path: str) -> object:
        return self.h.request("POST", path, self.h.auth())

    def test_status_json_lists_nodes_and_members(self) -> None:
        """The status JSON shows each node's state, pid and endpoint; nodes are pool members beside the config's."""
        status = self.h.request("GET", "/api/v1/status").json()
        [pool] = status["pools"]
        self.assertEqual([(n["id"], n["state"], n["endpoint"]) for n in pool["nodes"]["nodes"]],
                         [(1, "active", "127.0.0.1:21001"), (2, "active", "127.0.0.1:21002")])
        self.assertEqual(sorted((s["id"], s["source"]) for s in pool["servers"]),
                         [("01", "config"), ("02", "config"), ("NODE1", "nodes"), ("NODE2", "nodes")])

    def test_recycle_and_discard_actions(self) -> None:
        """POST .../nodes/<id>/recycle and /discard act on the node; a bad id or state is a clear status."""
        reply = self.post("/api/v1/nodes/2/discard")
        self.assertEqual(reply.status, 200, reply.body)  # type: ignore[attr-defined]
        self.assertEqual(self.spawner.spawned[1].signals, ["TERM"])  # idle: purged at once
        reply = self.post("/api/v1/nodes/1/recycle")
        self.assertEqual(reply.status, 200)  # type: ignore[attr-defined]
        self.assertEqual(self.spawner.spawned[0].signals, ["TERM"])
        self.assertEqual(self.post("/api/v1/nodes/9/recycle").status, 404)  # type: ignore[attr-defined]
        self.assertEqual(self.post("/api/v1/nodes/x/recycle").status, 400)  # type: ignore[attr-defined]
        self.assertEqual(self.post("/api/v1/nodes/1/recycle?pool=NOPE").status, 404)  # type: ignore[attr-defined]

    def test_actions_need_the_token(self) -> None:
        """Node actions without the token are refused (401) and change nothing."""
        reply = self.h.request("POST", "/api/v1/nodes/1/discard")
        self.assertEqual(reply.status, 401)
        self.assertEqual(self.spawner.spawned[0].signals, [])

    def test_scale(self) -> None:
        """POST /api/v1/nodes/scale?min=N sets the minimum; out of range is 400."""
        self.assertEqual(self.post("/api/v1/nodes/scale?min=3").status, 200)  # type: ignore[attr-defined]
        self.assertEqual(len(self.manager.nodes), 3)
        self.assertEqual(self.post("/api/v1/nodes/scale?min=9").status, 400)  # type: ignore[attr-defined]
        self.assertEqual(self.post("/api/v1/nodes/scale").status, 400)  # type: ignore[attr-defined]

    def test_metrics_have_node_states(self) -> None:
        """/metrics has one node_state gauge per node and state, and the crash streak."""
        self.manager.discard(2)
        text = self.h.request("GET", "/metrics").body.decode()
        self.assertIn('protheus_broker_node_state{node="1",persistent="0",pool="BALANCE_SMART_CLIENT_DESKTOP",'
                      'state="active"} 1.0', text)
        self.assertIn('protheus_broker_node_crash_streak{pool="BALANCE_SMART_CLIENT_DESKTOP"} 0.0', text)

    def test_page_has_node_actions(self) -> None:
        """The screen renders nodes with Recycle, Discard and Scale buttons."""
        for needle in (b"renderNodes", b'"/api/v1/nodes/"', b"Recycle", b"Discard", b"Scale"):
            self.assertIn(needle, PAGE_HTML)
