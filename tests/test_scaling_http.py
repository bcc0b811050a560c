"""Scale to zero in the HTTP units, in memory: a real HttpUnit / WebServicesUnit built from its
section (managed nodes on a fake spawner, fake upstreams, MemoryReactorClock), its controller from
scaling/wiring.py; the keys of the HTTP sections; the reload."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.config import parse_config
from protheus_broker.http.unit import HttpUnit, WebServicesUnit
from protheus_broker.ini import ConfigError
from protheus_broker.kube.scaler import KubernetesScaler
from protheus_broker.scaling.controller import ScaleToZero, ScaleToZeroPolicy
from protheus_broker.scaling.local import LocalScaler
from protheus_broker.scaling.wiring import build_scale_to_zero
from tests.test_http_proxy import OK, FakeUpstreams
from tests.test_kube_config import TESTENV_KUBECONFIG, unit_ini, write
from tests.test_nodes import FakeSpawner, FixedRandom
from tests.test_scaling import FakeScaler

HEAD = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 7890\nSORT_METHOD = CONNECTION\nREMOTE_SERVER_01 = 127.0.0.1 5000\n"
HTTP = ("[{section}]\nLOCAL_SERVER_PORT = 8080\nNODE_COMMAND = appsrv --http --port {{port}}\nMIN_NODES = 0\n"
        "MAX_NODES = 2\nBASE_PORT = 21000\nSTART_TIMEOUT = 10\nMONITORING_TYPE = DISABLED\nSERVER_TIMEOUT = 0\n"
        "SCALE_TO_ZERO = 1\n")
ZERO = "ZERO_IDLE_TIME = 60\nWAKE_TIMEOUT = 20\nMAX_HELD = 2\n"
CLIENT = IPv4Address("TCP", "10.0.0.9", 50000)


class Rig:
    """An HTTP unit of *section* with scale to zero over managed nodes that listen when told."""

    def __init__(self, case: SynchronousTestCase, section: str = "BALANCE_HTTP", extra: str = "",
                 zero: str = ZERO) -> None:
        self.reactor = MemoryReactorClock()
        self.text = HEAD + HTTP.format(section=section) + extra
        config = parse_config(self.text + zero).unit(section)
        self.upstreams = FakeUpstreams()
        kind = WebServicesUnit if section == "BALANCE_WEB_SERVICES" else HttpUnit
        self.unit = kind(self.reactor, config, name=section, connector=self.upstreams)
        assert self.unit.nodes is not None and self.unit.scale_to_zero is not None
        self.nodes = self.unit.nodes
        self.controller: ScaleToZero = self.unit.scale_to_zero
        self.spawner = FakeSpawner(auto_ready=False)
        self.nodes.spawner = self.spawner
        self.nodes.random = FixedRandom()
        self.nodes.start()
        self.controller.start()
        case.addCleanup(self.nodes.stop)
        case.addCleanup(self.controller.stop)

    def request(self, head: bytes = b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n") -> tuple[Any, StringTransport]:
        transport = StringTransport(peerAddress=CLIENT)
        protocol: Any = self.unit.factory.buildProtocol(CLIENT)
        protocol.makeConnection(transport)
        protocol.dataReceived(head)
        return protocol, transport

    def node_ready(self) -> None:
        """The spawned node listens; the readiness probe sees it."""
        self.spawner.listening.add(1)
        self.reactor.advance(0.05)

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds)):
            self.reactor.advance(1)


def answer(transport: StringTransport) -> tuple[bytes, bytes]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return head, body


class HttpHoldTests(SynchronousTestCase):
    def test_wiring(self) -> None:
        """SCALE_TO_ZERO=1 in [BALANCE_HTTP] gives the unit a controller over its nodes, set on the wake dispatcher."""
        rig = Rig(self)
        self.assertIs(rig.unit.wake.controller, rig.controller)
        self.assertIsInstance(rig.controller.scaler, LocalScaler)
        self.assertEqual((rig.nodes.desired(), rig.spawner.spawned), (0, []))

    def test_request_held_and_answered_after_wake(self) -> None:
        """A request to the empty pool is held, wakes a node and is answered by it."""
        rig = Rig(self)
        _, transport = rig.request()
        self.assertEqual((transport.value(), len(rig.controller.held), len(rig.spawner.spawned)), (b"", 1, 1))
        self.assertTrue(rig.controller.waking)
        rig.reactor.advance(3)
        self.assertEqual(transport.value(), b"")  # still held: the node is not ready
        rig.node_ready()
        self.assertEqual(rig.controller.held, [])
        [upstream] = rig.upstreams.made
        self.assertTrue(upstream.transport.value().startswith(b"GET /api HTTP/1.1\r\n"))
        upstream.dataReceived(OK)
        head, body = answer(transport)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(body, b"ok")
        self.assertEqual(rig.controller.wake_latencies, [3.05])
        self.assertEqual(rig.unit.stats.get("http_in_flight"), 0)

    def test_wake_timeout_503_retry_after_json(self) -> None:
        """Past WAKE_TIMEOUT the held request is answered 503 with Retry-After and the reason in JSON."""
        rig = Rig(self)
        _, transport = rig.request()
        rig.reactor.advance(19.9)
        self.assertEqual(transport.value(), b"")
        rig.reactor.advance(0.2)
        head, body = answer(transport)
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"retry-after: 5\r\n", head.lower() + b"\r\n")
        self.assertIn("none ready within WAKE_TIMEOUT=20s", json.loads(body)["error"])
        self.assertEqual(rig.controller.refused_timeout, 1)

    def test_max_held_503_at_once(self) -> None:
        """With MAX_HELD requests held, one more is answered 503 at once naming MAX_HELD."""
        rig = Rig(self)
        held = [rig.request()[1] for _ in range(2)]
        _, third = rig.request()
        head, body = answer(third)
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"retry-after:", head.lower())
        self.assertIn("MAX_HELD=2", json.loads(body)["error"])
        self.assertEqual([t.value() for t in held], [b"", b""])
        rig.node_ready()
        self.assertEqual(len(rig.upstreams.made), 2)  # both held ones went on

    def test_client_gone_while_held(self) -> None:
        """A client that leaves while held holds nothing and is not counted as a request in flight."""
        rig = Rig(self)
        protocol, _ = rig.request()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((rig.controller.held, rig.unit.stats.get("http_in_flight")), ([], 0))

    def test_web_services_unit(self) -> None:
        """[BALANCE_WEB_SERVICES] holds and wakes the same way (through its slots queue)."""
        rig = Rig(self, "BALANCE_WEB_SERVICES")
        _, transport = rig.request()
        self.assertEqual(len(rig.controller.held), 1)
        rig.node_ready()
        rig.upstreams.made[0].dataReceived(OK)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))


class HttpIdleTests(SynchronousTestCase):
    def test_countdown_from_last_request_end(self) -> None:
        """A slow request keeps the node; ZERO_IDLE_TIME counts from its end, then the pool sleeps."""
        rig = Rig(self)
        _, transport = rig.request()
        rig.node_ready()
        rig.advance(300)  # the request is in flight for 5 minutes: activity
        self.assertEqual((rig.controller.scaler.ready(), rig.controller.target), (1, 1))
        rig.upstreams.made[0].dataReceived(OK)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        rig.advance(58)
        self.assertEqual(rig.controller.scaler.ready(), 1)
        self.assertEqual(len(rig.nodes.nodes), 1)
        rig.advance(3)
        self.assertEqual((rig.controller.target, rig.controller.scaler.ready(), rig.nodes.nodes), (0, 0, {}))
        self.assertEqual(rig.spawner.spawned[0].signals, ["TERM"])

    def test_idle_keepalive_connection_is_not_activity(self) -> None:
        """A keep-alive connection with no request in flight does not keep the node."""
        rig = Rig(self, extra="KEEPALIVE_TIMEOUT = 3600\n")
        _, transport = rig.request()
        rig.node_ready()
        rig.upstreams.made[0].dataReceived(OK)
        self.assertFalse(transport.disconnecting)
        rig.advance(62)
        self.assertFalse(transport.disconnecting)  # the client is still connected...
        self.assertEqual(rig.nodes.nodes, {})  # ...and the node sleeps

    def test_long_websocket_keeps_the_node(self) -> None:
        """An open WebSocket counts as a request in flight for hours; its close starts the countdown."""
        rig = Rig(self)
        protocol, transport = rig.request(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                          b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        rig.node_ready()
        upstream = rig.upstreams.made[0]
        upstream.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        for _ in range(120):  # two hours, a frame now and then
            rig.reactor.advance(60)
            protocol.dataReceived(b"\x81\x80\x00\x00\x00\x00")
        self.assertEqual(rig.unit.stats.get("http_in_flight"), 1)
        self.assertEqual(len(rig.nodes.nodes), 1)
        self.assertEqual(rig.controller.target, 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(rig.unit.stats.get("http_in_flight"), 0)
        rig.advance(58)
        self.assertEqual(len(rig.nodes.nodes), 1)
        rig.advance(3)
        self.assertEqual(rig.nodes.nodes, {})


class HttpKeysTests(SynchronousTestCase):
    def test_defaults_off(self) -> None:
        """Without SCALE_TO_ZERO an HTTP unit with nodes has no controller and passes requests through."""
        text = HEAD + "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 8080\nNODE_COMMAND = appsrv --port {port}\n"
        unit = HttpUnit(MemoryReactorClock(), parse_config(text).unit("BALANCE_HTTP"), name="BALANCE_HTTP")
        self.assertIsNone(unit.scale_to_zero)
        self.assertIsNone(unit.wake.controller)
        assert unit.nodes is not None
        self.assertFalse(unit.nodes.scale_to_zero)

    def test_keys_read_for_both_http_sections(self) -> None:
        """ZERO_IDLE_TIME, WAKE_TIMEOUT, MAX_HELD are read in [BALANCE_HTTP] and [BALANCE_WEB_SERVICES]."""
        for section in ("BALANCE_HTTP", "BALANCE_WEB_SERVICES"):
            config = parse_config(HEAD + HTTP.format(section=section) + ZERO)
            policy = config.unit(section).scale_to_zero
            self.assertEqual((policy.enabled, policy.idle_time, policy.wake_timeout, policy.max_held,
                              policy.min_awake), (True, 60.0, 20.0, 2, 1))
            self.assertEqual(config.warnings, ())

    def test_needs_nodes_or_kubernetes(self) -> None:
        """SCALE_TO_ZERO=1 in an HTTP section with fixed servers only is one config error."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(HEAD + "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 8080\nREMOTE_SERVER_A = 127.0.0.1 81\n"
                         "SCALE_TO_ZERO = 1\n")
        self.assertIn("needs managed nodes", str(caught.exception))
        self.assertIn("SCALE_TO_ZERO", str(caught.exception))

    def test_bad_value_one_line(self) -> None:
        """A bad MAX_HELD in an HTTP section names the key and its range."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(HEAD + HTTP.format(section="BALANCE_HTTP") + "MAX_HELD = 0\n")
        self.assertIn("MAX_HELD", str(caught.exception))
        self.assertIn("out of range", str(caught.exception))

    def test_warmup_without_scale_to_zero_warns(self) -> None:
        """WARMUP=1 in an HTTP section without SCALE_TO_ZERO is one warning, then ignored."""
        config = parse_config(HEAD + "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 8080\nNODE_COMMAND = appsrv --port {port}\n"
                              f"WARMUP = 1\nHISTORY_FILE = {self.mktemp()}\n")
        self.assertIsNone(config.unit("BALANCE_HTTP").warmup)
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("WARMUP=1 needs SCALE_TO_ZERO=1", config.warnings[0])

    def test_warmup_gives_the_controller_its_forecast(self) -> None:
        """WARMUP=1 with SCALE_TO_ZERO=1: the HTTP unit's controller has the usage forecast."""
        path = self.mktemp()
        rig_text = HTTP.format(section="BALANCE_HTTP") + ZERO + f"WARMUP = 1\nHISTORY_FILE = {path}\n"
        unit = HttpUnit(MemoryReactorClock(), parse_config(HEAD + rig_text).unit("BALANCE_HTTP"), name="BALANCE_HTTP")
        assert unit.scale_to_zero is not None
        self.assertIsNotNone(unit.scale_to_zero.forecast)

    def test_kubernetes_scaler_when_no_nodes(self) -> None:
        """The shared wiring takes the unit's Kubernetes scaler when it has no managed nodes; none: no controller."""
        scaler = FakeScaler()
        policy = ScaleToZeroPolicy(enabled=True)
        parent = MultiService()
        built = build_scale_to_zero(Clock(), parent, "BALANCE_HTTP", policy, None, None, scaler, lambda: 0)
        assert built is not None
        self.assertIs(built.scaler, scaler)
        self.assertEqual([type(s).__name__ for s in parent], ["ScaleToZeroService"])
        self.assertIsNone(build_scale_to_zero(Clock(), parent, "U", policy, None, None, None, lambda: 0))
        self.assertIsNone(build_scale_to_zero(Clock(), parent, "U", ScaleToZeroPolicy(), None, None, scaler,
                                              lambda: 0))

    def test_http_unit_with_kubernetes(self) -> None:
        """[BALANCE_HTTP] with KUBERNETES and SCALE_TO_ZERO=1: the controller drives the unit's Kubernetes scaler."""
        for section, kind in (("BALANCE_HTTP", HttpUnit), ("BALANCE_WEB_SERVICES", WebServicesUnit)):
            path = write(self, TESTENV_KUBECONFIG)
            text = unit_ini(f"KUBECONFIG = {path}\nDEPLOYMENT = a\n", unit=section,
                            servers="SCALE_TO_ZERO = 1\nZERO_IDLE_TIME = 120\n")
            config = parse_config(text).unit(section)
            self.assertEqual((config.scale_to_zero.enabled, config.scale_to_zero.wake_timeout), (True, 60.0))
            unit = kind(MemoryReactorClock(), config, name=section)
            self.assertIsInstance(unit.scaler, KubernetesScaler)
            assert unit.scale_to_zero is not None
            self.assertIs(unit.scale_to_zero.scaler, unit.scaler)
            self.assertIs(unit.wake.controller, unit.scale_to_zero)

    def test_reload_applies_live(self) -> None:
        """A reload changes ZERO_IDLE_TIME, WAKE_TIMEOUT and MAX_HELD live and leaves MIN_NODES to the controller."""
        rig = Rig(self, zero="")
        rig.nodes.policy = replace(rig.nodes.policy, min_nodes=1)  # as after a wake
        new = parse_config(rig.text.replace("MAX_NODES = 2\n", "")
                           + "ZERO_IDLE_TIME = 30\nWAKE_TIMEOUT = 40\nMAX_HELD = 9\nMAX_NODES = 3\n")
        self.assertTrue(rig.unit.reload(new.unit("BALANCE_HTTP")))
        policy = rig.controller.policy
        self.assertEqual((policy.idle_time, policy.wake_timeout, policy.max_held), (30.0, 40.0, 9))
        self.assertEqual((rig.nodes.policy.min_nodes, rig.nodes.policy.max_nodes), (1, 3))
