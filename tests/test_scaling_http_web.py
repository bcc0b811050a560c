"""The broker screen for scale to zero in an HTTP unit (waking, held requests) and for the
Kubernetes scaler of a pool (status JSON ``pools[].scaler``, the page's line, /metrics)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.web.page import PAGE_HTML

from .kube_fake import endpoint_slice
from .test_kube import Harness as KubeHarness
from .test_nodes import FakeSpawner, FixedRandom
from .test_web import Harness, ini

HTTP = ("[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 0\nMONITORING_TYPE = DISABLED\nNODE_COMMAND = appsrv --http --port {port}\n"
        "MIN_NODES = 0\nMAX_NODES = 2\nBASE_PORT = 21000\nSCALE_TO_ZERO = 1\nWAKE_TIMEOUT = 60\nMAX_HELD = 7\n")
POOL = 'pool="BALANCE_HTTP"'


class Screen:
    """The admin screen over a broker with a scale-to-zero [BALANCE_HTTP] unit."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.h = Harness(test, ini(HTTP))
        [unit] = [u for u in self.h.service.units if u.name == "BALANCE_HTTP"]
        self.unit: Any = unit
        self.spawner = FakeSpawner(auto_ready=False)
        unit.nodes.spawner = self.spawner
        unit.nodes.random = FixedRandom()
        unit.nodes.start()
        test.addCleanup(unit.nodes.stop)
        unit.scale_to_zero.start()
        test.addCleanup(unit.scale_to_zero.stop)

    def request(self) -> StringTransport:
        client = IPv4Address("TCP", "10.0.0.9", 50000)
        transport = StringTransport(peerAddress=client)
        protocol: Any = self.unit.factory.buildProtocol(client)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n")
        return transport

    def pool(self) -> dict[str, Any]:
        [pool] = [p for p in self.h.request("GET", "/api/v1/status").json()["pools"] if p["section"] == "BALANCE_HTTP"]
        return pool  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return self.h.request("GET", "/metrics").body.decode()  # type: ignore[no-any-return]


class HttpWakeScreenTests(SynchronousTestCase):
    def test_status_shows_waking_and_held_requests(self) -> None:
        """While a node wakes for held HTTP requests the status JSON says waking, with the held count."""
        screen = Screen(self)
        screen.request()
        screen.request()
        wake = screen.pool()["scale_to_zero"]
        self.assertEqual((wake["waking"], wake["held"], wake["max_held"], wake["target"], wake["ready"]),
                         (True, 2, 7, 1, 0))
        self.assertIsNone(screen.pool()["scaler"])  # no KUBERNETES: no scaler line

    def test_metrics_for_the_http_pool(self) -> None:
        """/metrics has the HTTP pool's waking flag and held requests."""
        screen = Screen(self)
        screen.request()
        text = screen.metrics()
        self.assertIn(f"protheus_broker_wake_waking{{{POOL}}} 1.0", text)
        self.assertIn(f"protheus_broker_wake_held_sessions{{{POOL}}} 1.0", text)

    def test_awake_after_the_node_is_ready(self) -> None:
        """Once the node listens the held requests go on: awake, nothing held."""
        screen = Screen(self)
        screen.request()
        screen.spawner.listening.add(1)
        screen.h.reactor.advance(0.05)
        wake = screen.pool()["scale_to_zero"]
        self.assertEqual((wake["waking"], wake["held"], wake["ready"], wake["wakes"]), (False, 0, 1, 1))


class KubeScalerScreenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.screen = Screen(self)
        self.kube = KubeHarness(self)
        self.kube.api.gone_below = 200  # the first watches end in 410 Gone: re-listed
        self.kube.api.slices["erp-a"] = endpoint_slice("erp-a", [("10.0.0.1", True, "erp-1")], "0")
        self.kube.start()
        self.screen.unit.scaler = self.kube.scaler  # the pool's Kubernetes scaler, on a fake API server

    def test_status_json_has_the_scaler(self) -> None:
        """pools[].scaler: the workload, replicas asked for and ready, the watch and its counts."""
        scaler = self.screen.pool()["scaler"]
        self.assertEqual((scaler["scaler"], scaler["workload"], scaler["namespace"], scaler["service"]),
                         ("kubernetes", "deployment/erp", "ns", "erp"))
        self.assertEqual((scaler["ready"], scaler["endpointslices"]), (1, "discovery.k8s.io/v1"))
        self.assertEqual(scaler["counts"]["gone"], 2)
        self.assertEqual(scaler["desired"], self.kube.scaler.desired())

    def test_metrics_gauges(self) -> None:
        """/metrics: desired and ready replicas, watch restarts, 410s and errors per pool."""
        text = self.screen.metrics()
        labels = f'{POOL},workload="deployment/erp"'
        counts = self.kube.scaler.counts
        self.assertIn(f"protheus_broker_kube_ready_replicas{{{labels}}} 1.0", text)
        self.assertIn(f"protheus_broker_kube_desired_replicas{{{labels}}} {float(self.kube.scaler.desired())}", text)
        self.assertIn(f"protheus_broker_kube_watch_gone_total{{{labels}}} 2.0", text)
        self.assertIn(f"protheus_broker_kube_watch_restarts_total{{{labels}}} {float(counts['watches'] - 1)}", text)
        self.assertIn(f"protheus_broker_kube_errors_total{{{labels}}} {float(counts['errors'])}", text)
        self.assertNotIn('protheus_broker_kube_ready_replicas{pool="BALANCE_SMART_CLIENT_DESKTOP"', text)

    def test_page_has_the_scaler_line(self) -> None:
        """The page renders a Kubernetes line per pool: replicas, the watch, restarts, 410s, errors."""
        for needle in (b"renderScaler", b"pool-scaler", b" ready of ", b" watch restarts", b"410", b" errors"):
            self.assertIn(needle, PAGE_HTML)
