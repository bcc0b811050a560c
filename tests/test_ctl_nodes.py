"""protheus-broker-ctl's nodes, recycle, discard, scale and the status's dependencies and license
client: the tables drawn from the real status JSON (in memory), usage errors, and the requests
ctl sends to a listener on 127.0.0.1 (port 0)."""

from __future__ import annotations

import io
import json
import sys
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from protheus_broker.deps.state import DependencyDown
from protheus_broker.nodes.manager import NodeManager
from protheus_broker.web import ctl, model

from .test_ctl import run_main
from .test_deps import broker, ini as deps_ini
from .test_nodes import FakeSpawner, FixedRandom
from .test_web import Harness, ini

TOKEN = "t0ken-0123456789-abcdef"


class NodesHarness(SynchronousTestCase):
    """A broker screen (memory reactor) whose desktop unit manages two nodes on 127.0.0.1."""

    extra = ""

    def setUp(self) -> None:
        self.h = Harness(self, ini("NODE_COMMAND = appsrv --port {port}\nMIN_NODES = 2\nMAX_NODES = 3\n"
                                   "BASE_PORT = 21000\n" + self.extra))
        [unit] = [u for u in self.h.service.units if getattr(u, "nodes", None) is not None]
        manager: NodeManager = unit.nodes
        self.real_spawner: Any = manager.spawner
        manager.spawner = FakeSpawner()
        manager.random = FixedRandom()
        manager.start()
        self.addCleanup(manager.stop)
        self.manager = manager

    def answer(self, method: str, path: str) -> Any:
        reply = self.h.request(method, path, self.h.auth() if method == "POST" else None)
        self.assertEqual(reply.status, 200, reply.body)
        return reply.json()


class NodesTableTests(NodesHarness):
    def test_nodes_table_per_pool(self) -> None:
        """`nodes` draws the pool's head line and a row per node: id, state, persistent, sessions,
        memory, age, endpoint."""
        self.h.reactor.advance(90)
        lines = ctl.render("nodes", self.answer("GET", "/api/v1/status")).splitlines()
        self.assertEqual(lines[0], "pool protheus-broker [BALANCE_SMART_CLIENT_DESKTOP]: "
                                   "MIN_NODES 2, MAX_NODES 3, TCP, 2 node(s)")
        self.assertEqual(lines[1].split(), ["ID", "STATE", "PERSISTENT", "SESSIONS", "MEMORY", "AGE", "ENDPOINT"])
        self.assertEqual(lines[3].split(), ["1", "active", "no", "0", "10485760", "90s", "127.0.0.1:21001"])
        self.assertEqual(lines[4].split(), ["2", "active", "no", "0", "10485760", "90s", "127.0.0.1:21002"])
        self.assertEqual(len(lines), 5)

    def test_discard_and_recycle_answers(self) -> None:
        """recycle/discard print what became of the node (an idle one is gone at once)."""
        body = self.answer("POST", "/api/v1/nodes/2/discard")
        self.assertEqual(ctl.render("discard", body, "2"),  # (idle: purged, and id 2 names its replacement)
                         "discard: node 2 of BALANCE_SMART_CLIENT_DESKTOP: done; 2 node(s) now: 1 active, 2 active")
        self.assertEqual(self.manager.nodes[2].process.pid, 1002)
        body = self.answer("POST", "/api/v1/nodes/1/recycle")
        self.assertEqual(ctl.render("recycle", body, "1"),  # (idle: replaced by node 3, then purged)
                         "recycle: node 1 of BALANCE_SMART_CLIENT_DESKTOP: done; 2 node(s) now: 2 active, 3 active")

    def test_scale_answer(self) -> None:
        """scale prints the new MIN_NODES and the nodes there are now."""
        body = self.answer("POST", "/api/v1/nodes/scale?min=3")
        self.assertEqual(ctl.render("scale", body, "3"),
                         "scale: MIN_NODES of BALANCE_SMART_CLIENT_DESKTOP is 3 for this run; "
                         "3 node(s) now: 1 active, 2 active, 3 active")

    def test_status_counts_nodes_by_state(self) -> None:
        """status adds a line per pool with managed nodes: counts by state."""
        self.manager.spawner.auto_ready = False  # type: ignore[attr-defined]
        self.answer("POST", "/api/v1/nodes/scale?min=3")
        text = ctl.render("status", self.answer("GET", "/api/v1/status"))
        self.assertIn("\nnodes: 2 active, 1 starting (MIN_NODES 3, MAX_NODES 3; protheus-broker-ctl nodes)", text)

    def test_no_managed_nodes(self) -> None:
        """`nodes` on a broker without managed nodes says so in one line."""
        h = Harness(self, ini())
        self.assertEqual(ctl.render("nodes", h.request("GET", "/api/v1/status").json()),
                         "no managed nodes (no pool has NODE_COMMAND or FARM_HOSTS)")


class FarmLinesTests(NodesHarness):
    extra = "FARM_HOSTS = 127.0.0.2:7077\nFARM_SECRET = 0123456789abcdef\nLOCAL_NODES = 1\n"

    def test_farm_hosts_under_the_nodes(self) -> None:
        """`nodes` and `status` put a line per farm host under the pool: state, since, nodes, last problem."""
        self.manager.spawner = self.real_spawner  # (the farm spawner: its links are what the line shows)
        self.real_spawner.hosts[0].problem("cannot connect: Connection was refused by other side")
        self.h.reactor.advance(30)
        body = self.answer("GET", "/api/v1/status")
        line = ("farm host 127.0.0.2:7077 down since 2023-11-14 22:13:20Z (for 30s), 0 node(s); "
                "last problem: cannot connect: Connection was refused by other side")
        self.assertEqual(ctl.render("nodes", body).splitlines()[-1], line)
        self.assertIn("\n" + line, ctl.render("status", body))


class DependencyAndLicenseTests(SynchronousTestCase):
    def test_status_lists_dependencies_and_the_license_client(self) -> None:
        """status shows each dependency (name, state, since, refusals, pools, reason) and the
        license client (connected or not, seats per class)."""
        secret = self.mktemp()
        with open(secret, "w") as handle:
            handle.write("0123456789abcdef0123\n")
        clock = MemoryReactorClock()
        service, connect = broker(deps_ini(extra=f"[LICENSECLIENT]\nSERVER = 127.0.0.1\nPORT = 5555\n"
                                                 f"SECRET_FILE = {secret}\n"), self, clock)
        service.dependencies.startService()
        self.addCleanup(service.dependencies.stopService)
        clock.advance(12)
        connect.answer(False)
        self.failureResultOf(service.desktop.dependencies.admit(), DependencyDown)
        body = json.loads(json.dumps(model.status(service)))
        text = ctl.render("status", body)
        self.assertIn("\nDEPENDENCY  STATE  SINCE                 FOR  REFUSED  POOLS                         "
                      "REASON\n", text)
        self.assertIn("\nDBACCESS    down   1970-01-01 00:00:12Z  0s   1        BALANCE_SMART_CLIENT_DESKTOP  "
                      "connection refused\n", text)
        self.assertIn("\nlicense client ", text)
        self.assertIn(": not connected to 127.0.0.1:5555 since 1970-01-01 00:00:00Z", text)

    def test_license_classes_table(self) -> None:
        """The license client's seats: a row per class (held, in use, free, waiting, leases)."""
        client = {"server": "127.0.0.1:5555", "client_name": "broker-a", "connected": True, "since": 60.0,
                  "reason": "connected to 127.0.0.1:5555", "low_watermark": 1, "high_watermark": 4,
                  "classes": {"FULL": {"held": 4, "in_use": 3, "free": 1, "waiting": 0, "leases": 4}}}
        self.assertEqual(ctl._license_lines(client), [
            "license client broker-a: connected to 127.0.0.1:5555 since 1970-01-01 00:01:00Z "
            "(connected to 127.0.0.1:5555)",
            "CLASS  HELD  IN USE  FREE  WAITING  LEASES\n-----  ----  ------  ----  -------  ------\n"
            "FULL   4     3       1     0        4"])


class NodeUsageTests(SynchronousTestCase):
    def one_line(self, argv: list[str], status: int, expected: str) -> None:
        code, out, err = run_main(*argv)
        self.assertEqual((code, out, err.count("\n")), (status, "", 1), err)
        self.assertTrue(err.startswith("protheus-broker-ctl: "), err)
        self.assertIn(expected, err)

    def test_node_commands_need_their_argument(self) -> None:
        """recycle/discard/scale without an argument or with one that is not a number: one line, exit 2."""
        self.one_line(["recycle"], 2, "recycle needs a node id")
        self.one_line(["discard", "NODE2"], 2, "discard: node id must be a number, got 'NODE2'")
        self.one_line(["scale"], 2, "scale needs MIN")
        self.one_line(["scale", "-1"], 2, "scale: MIN must be a whole number, got '-1'")
        self.one_line(["scale", "\u00b2"], 2, "scale: MIN must be a whole number")


class _Recorder(Resource):
    """Answers every request with *body* (and *status*), noting method, path and the token."""

    isLeaf = True

    def __init__(self, status: int, body: Any) -> None:
        super().__init__()
        self.status, self.body = status, body
        self.seen: list[tuple[str, str, str]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.method.decode(), request.uri.decode(),
                          (request.getHeader(b"authorization") or b"").decode()))
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.body).encode()


class NodeRequestTests(TestCase):
    """What ctl sends for the node commands, to a listener on 127.0.0.1 (port 0)."""

    timeout = 60

    def serve(self, status: int, body: Any) -> tuple[str, _Recorder]:
        recorder = _Recorder(status, body)
        port: Any = reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}", recorder

    def run_ctl(self, *argv: str) -> defer.Deferred[tuple[int, str]]:
        """ctl.run in a thread (it blocks): 0 and '' or the CtlError's status and message."""
        def call() -> tuple[int, str]:
            try:
                return ctl.run(list(argv)), ""
            except ctl.CtlError as exc:
                return exc.status, str(exc)
        return threads.deferToThread(call)

    @defer.inlineCallbacks
    def test_paths_pool_and_token(self) -> Any:
        """recycle, discard and scale POST the admin API with the bearer token and ?pool=."""
        answer = {"ok": True, "action": "scale", "pool": "BALANCE_HTTP", "min_nodes": 0, "nodes": []}
        url, recorder = self.serve(200, answer)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        for argv in (["recycle", "3"], ["discard", "4", "--pool", "BALANCE_HTTP"],
                     ["--pool", "BALANCE_HTTP", "scale", "0"], ["scale", "2"], ["nodes", "--json"]):
            status, message = yield self.run_ctl("--url", url, "--token", TOKEN, *argv)
            self.assertEqual((status, message), (0, ""))
        self.assertEqual(recorder.seen, [
            ("POST", "/api/v1/nodes/3/recycle", f"Bearer {TOKEN}"),
            ("POST", "/api/v1/nodes/4/discard?pool=BALANCE_HTTP", f"Bearer {TOKEN}"),
            ("POST", "/api/v1/nodes/scale?min=0&pool=BALANCE_HTTP", f"Bearer {TOKEN}"),
            ("POST", "/api/v1/nodes/scale?min=2", f"Bearer {TOKEN}"),
            ("GET", "/api/v1/status", f"Bearer {TOKEN}")])
        self.assertIn("scale: MIN_NODES of BALANCE_HTTP is 0 for this run; 0 node(s) now: none\n", out.getvalue())

    @defer.inlineCallbacks
    def test_refusal_is_one_line(self) -> Any:
        """The broker's refusal (409: several pools have nodes) is one line with its reason, exit 1."""
        url, _ = self.serve(409, {"status": 409, "error": "several pools have managed nodes: name one with "
                                                          "?pool=<section>"})
        status, message = yield self.run_ctl("--url", url, "--token", TOKEN, "recycle", "1")
        self.assertEqual((status, message), (1, "POST /api/v1/nodes/1/recycle: HTTP 409: several pools have "
                                                "managed nodes: name one with ?pool=<section>"))
