"""Scale to zero in memory: the controller with task.Clock and a fake scaler, the local scaler over
a real NodeManager with a fake spawner, the desktop gate and the HTTP dispatcher, the keys."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from protheus_broker.balancing.methods import SortMethod, make_balancer
from protheus_broker.balancing.pool import ServerPool, ServerState
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.config import parse_config
from protheus_broker.desktop.lifecycle import GateRefused
from protheus_broker.desktop.unit import DesktopUnit
from protheus_broker.http.proxy import Choice, NoBackend, RequestInfo
from protheus_broker.http.unit import HttpUnit
from protheus_broker.ini import ConfigError
from protheus_broker.nodes.manager import NodeManager, NodePolicy, NodeState
from protheus_broker.scaling.controller import ScaleToZero, ScaleToZeroPolicy, WakeRefused
from protheus_broker.scaling.gates import WakeDispatcher, WakeGate
from protheus_broker.scaling.interfaces import IScaler, IUsageForecast
from protheus_broker.scaling.local import LocalScaler
from tests.helpers import LogCatcher
from tests.test_nodes import FakeSpawner, FixedRandom


@implementer(IScaler)
class FakeScaler:
    """Members become ready when the test says so."""

    name = "fake"

    def __init__(self, ready: int = 0) -> None:
        self._ready = ready
        self._desired = ready
        self.asked: list[tuple[int, str]] = []
        self.callbacks: list[Callable[[], None]] = []

    def desired(self) -> int:
        return self._desired

    def ready(self) -> int:
        return self._ready

    def scale(self, replicas: int, reason: str) -> None:
        self._desired = replicas
        self.asked.append((replicas, reason))

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def set_ready(self, count: int) -> None:
        self._ready = count
        for callback in list(self.callbacks):
            callback()


@implementer(IUsageForecast)
class FakeForecast:
    def __init__(self, floor: int = 0) -> None:
        self.value = floor
        self.records: list[tuple[float, int]] = []

    def record(self, now: float, sessions: int) -> None:
        self.records.append((now, sessions))

    def floor(self, now: float) -> int:
        return self.value


class Rig:
    """A controller, its clock, its fake scaler and a settable session count."""

    def __init__(self, ready: int = 0, forecast: FakeForecast | None = None, **policy: Any) -> None:
        self.clock = Clock()
        self.scaler = FakeScaler(ready)
        self.sessions = 0
        options: dict[str, Any] = {"enabled": True, "idle_time": 60.0, "wake_timeout": 30.0, "max_held": 5}
        options.update(policy)
        self.controller = ScaleToZero(self.clock, self.scaler, ScaleToZeroPolicy(**options),
                                      lambda: self.sessions, forecast=forecast, name="UNIT")
        self.controller.start()

    def advance(self, seconds: float, step: float = 1.0) -> None:
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step

    @property
    def last(self) -> int:
        return self.scaler.asked[-1][0]

    def scale_downs(self) -> list[tuple[int, str]]:
        return [(n, why) for n, why in self.scaler.asked if n == 0]


class ControllerHoldTests(SynchronousTestCase):
    def test_hold_and_release_on_wake(self) -> None:
        """A session to an empty pool is held, a member is asked for, and it goes on once one is ready."""
        rig = Rig()
        held = rig.controller.hold("10.0.0.1:5000")
        self.assertFalse(held.called)
        self.assertEqual(rig.scaler.asked[-1][0], 1)
        self.assertIn("wake: first connection to an empty pool", rig.scaler.asked[-1][1])
        self.assertTrue(rig.controller.waking)
        rig.advance(2.5)
        self.assertFalse(held.called)
        rig.scaler.set_ready(1)
        self.assertIsNone(self.successResultOf(held))
        self.assertEqual((rig.controller.held, rig.controller.waking), ([], False))
        self.assertEqual(rig.controller.wake_latencies, [2.5])

    def test_one_wake_for_many_sessions(self) -> None:
        """Three sessions held together ask for one wake and are all released by one ready member."""
        rig = Rig()
        helds = [rig.controller.hold() for _ in range(3)]
        self.assertEqual([n for n, why in rig.scaler.asked if why.startswith("wake")], [1])
        rig.scaler.set_ready(1)
        self.assertEqual([self.successResultOf(d) for d in helds], [None, None, None])
        self.assertEqual(rig.controller.wakes, 1)

    def test_ready_member_no_hold(self) -> None:
        """With a ready member a session goes on at once and nothing is scaled."""
        rig = Rig(ready=1)
        asked = list(rig.scaler.asked)
        self.assertIsNone(self.successResultOf(rig.controller.hold()))
        self.assertEqual(rig.scaler.asked, asked)

    def test_wake_timeout_with_reason(self) -> None:
        """A session held past WAKE_TIMEOUT is refused with why: the limit and what the scaler has."""
        rig = Rig(wake_timeout=30.0)
        held = rig.controller.hold()
        rig.advance(29.9, step=0.1)
        self.assertFalse(held.called)
        rig.advance(0.2, step=0.1)
        refused = self.failureResultOf(held, WakeRefused).value
        self.assertEqual(refused.what, "no AppServer woke in time")
        self.assertIn("WAKE_TIMEOUT=30s", refused.detail)
        self.assertIn("fake: 1 asked for, 0 ready", refused.detail)
        self.assertEqual((rig.controller.held, rig.controller.refused_timeout), ([], 1))

    def test_held_cap(self) -> None:
        """Beyond MAX_HELD held sessions a new one is refused at once, with the cap in the reason."""
        rig = Rig(max_held=2)
        first, second = rig.controller.hold(), rig.controller.hold()
        refused = self.failureResultOf(rig.controller.hold(), WakeRefused).value
        self.assertIn("MAX_HELD=2", refused.detail)
        self.assertGreaterEqual(refused.retry_after, 1)
        self.assertEqual((len(rig.controller.held), rig.controller.refused_full), (2, 1))
        self.assertFalse(first.called or second.called)

    def test_cancel_gives_up_the_hold(self) -> None:
        """A client that leaves while held holds nothing: its slot is free and its timer gone."""
        rig = Rig(max_held=1)
        held = rig.controller.hold()
        held.cancel()
        self.failureResultOf(held, CancelledError)
        self.assertEqual(rig.controller.held, [])
        timers = [getattr(c, "func", None) for c in rig.clock.getDelayedCalls()]
        self.assertNotIn(rig.controller._timed_out, timers)
        self.assertFalse(rig.controller.hold().called)  # the slot is free again

    def test_stop_refuses_held(self) -> None:
        """Stopping the broker refuses every held session with a reason."""
        rig = Rig()
        held = rig.controller.hold()
        rig.controller.stop()
        self.assertIn("stopping", self.failureResultOf(held, WakeRefused).value.detail)

    def test_member_lost_while_held_wakes_again(self) -> None:
        """A member that was ready and left while sessions wait makes the controller wake again."""
        rig = Rig(ready=1)
        rig.scaler.set_ready(0)
        held = rig.controller.hold()
        self.assertTrue(rig.controller.waking)
        rig.scaler.set_ready(1)
        self.successResultOf(held)


class ControllerIdleTests(SynchronousTestCase):
    def test_countdown_from_last_session_end_not_scale_up(self) -> None:
        """The pool sleeps ZERO_IDLE_TIME after the last session ended, not after the wake (KEDA #881)."""
        rig = Rig(idle_time=60.0)
        held = rig.controller.hold()
        rig.advance(2)
        rig.scaler.set_ready(1)  # woken at t=2
        self.successResultOf(held)
        rig.sessions = 1
        rig.advance(98)  # the session ends at t=100
        rig.sessions = 0
        rig.advance(59)  # t=159: 157 s after the wake, 59 s after the last session
        self.assertEqual(rig.scale_downs(), [])
        self.assertEqual(rig.last, 1)
        rig.advance(2)
        self.assertEqual(rig.last, 0)
        when_idle = rig.controller.idle_since
        assert when_idle is not None
        self.assertTrue(100.0 <= when_idle <= 101.0, when_idle)  # (within one tick)
        self.assertIn("no session for 60s (ZERO_IDLE_TIME=60s)", rig.scale_downs()[0][1])

    def test_two_hour_session_keeps_its_node(self) -> None:
        """A session open for two hours keeps its member all along, however short ZERO_IDLE_TIME (Sablier #576)."""
        rig = Rig(idle_time=60.0)
        held = rig.controller.hold()
        rig.scaler.set_ready(1)
        self.successResultOf(held)
        rig.sessions = 1
        rig.advance(7200, step=5.0)
        self.assertEqual(rig.scale_downs(), [])
        self.assertIsNone(rig.controller.idle_since)
        rig.sessions = 0
        rig.advance(65, step=5.0)
        self.assertEqual(rig.last, 0)

    def test_new_session_restarts_the_countdown(self) -> None:
        """A session during the countdown stops it; the next one starts from that session's end."""
        rig = Rig(ready=1, idle_time=60.0)
        rig.advance(50)
        rig.sessions = 1
        rig.advance(10)
        rig.sessions = 0
        rig.advance(50)
        self.assertEqual(rig.scale_downs(), [])
        rig.advance(11)
        self.assertEqual(len(rig.scale_downs()), 1)

    def test_countdown_at_start(self) -> None:
        """At start with members and no session the countdown runs from the start."""
        rig = Rig(ready=2, idle_time=60.0)
        rig.advance(59)
        self.assertEqual(rig.scale_downs(), [])
        rig.advance(2)
        self.assertEqual(rig.last, 0)

    def test_countdown_ends_on_time(self) -> None:
        """The pool sleeps at the countdown's end to the moment, not at the next periodic check."""
        rig = Rig(ready=1, idle_time=15.0, tick=10.0)
        rig.clock.advance(14.9)
        self.assertEqual(rig.scale_downs(), [])
        rig.clock.advance(0.1)
        self.assertEqual(rig.last, 0)

    def test_held_session_is_activity(self) -> None:
        """A long wake (held sessions, no member yet) never counts as idle."""
        rig = Rig(idle_time=10.0, wake_timeout=300.0)
        rig.controller.hold()
        rig.advance(100)
        self.assertEqual(rig.scale_downs(), [])
        self.assertEqual(rig.last, 1)

    def test_wake_refused_then_sleeps(self) -> None:
        """A wake whose sessions all timed out ends: the pool sleeps ZERO_IDLE_TIME later."""
        rig = Rig(idle_time=10.0, wake_timeout=5.0)
        held = rig.controller.hold()
        rig.advance(6)
        self.failureResultOf(held, WakeRefused)
        self.assertEqual(rig.scale_downs(), [])
        rig.advance(11)
        self.assertEqual(rig.last, 0)
        self.assertFalse(rig.controller.waking)

    def test_load_need(self) -> None:
        """With SESSIONS_PER_MEMBER the target follows the load and never drops while sessions are open."""
        rig = Rig(ready=1, sessions_per_member=10)
        rig.sessions = 25
        rig.advance(1)
        self.assertEqual(rig.last, 3)
        rig.sessions = 1
        rig.advance(30)
        self.assertEqual(rig.last, 3)


class ControllerForecastTests(SynchronousTestCase):
    def test_forecast_floor_respected(self) -> None:
        """Never below the warm-up floor: idle past ZERO_IDLE_TIME the pool keeps floor members, then 0."""
        forecast = FakeForecast(floor=2)
        rig = Rig(forecast=forecast, idle_time=10.0)
        self.assertEqual(rig.last, 2)
        rig.advance(100)
        self.assertEqual(rig.scale_downs(), [])
        self.assertEqual(rig.last, 2)
        forecast.value = 0
        rig.advance(1)
        self.assertEqual(rig.last, 0)

    def test_floor_above_wake(self) -> None:
        """A wake asks for the forecast's floor when it is above one."""
        forecast = FakeForecast(floor=0)
        rig = Rig(forecast=forecast)
        forecast.value = 3
        rig.controller.hold()
        self.assertEqual(rig.scaler.asked[0][0], 3)
        self.assertIn("wake", rig.scaler.asked[0][1])

    def test_records_sessions(self) -> None:
        """Each check records the open and held sessions with the time."""
        forecast = FakeForecast()
        rig = Rig(forecast=forecast)
        rig.sessions = 4
        rig.controller.hold()
        rig.advance(1)
        self.assertEqual(forecast.records[-1], (1.0, 5))

    def test_broken_forecast(self) -> None:
        """A forecast that raises is logged and counts as floor 0; the controller goes on."""
        forecast = FakeForecast()
        forecast.floor = lambda now: 1 // 0  # type: ignore[method-assign]
        logs = LogCatcher(self)
        rig = Rig(forecast=forecast, ready=1, idle_time=5.0)
        rig.advance(6)
        self.assertEqual(rig.last, 0)
        self.flushLoggedErrors(ZeroDivisionError)
        self.assertTrue(any("forecast failed" in text for text in logs.texts()))


def node_rig(policy: NodePolicy | None = None) -> tuple[Clock, ServerPool, FakeSpawner, NodeManager, LocalScaler]:
    clock = Clock()
    pool = ServerPool([], make_balancer(SortMethod.CONNECTION, 3.0), clock=clock)
    spawner = FakeSpawner()
    manager = NodeManager(clock, pool, spawner, policy or NodePolicy(command=("x", "{port}"), min_nodes=0,
                                                                    max_nodes=3, idle_time=60.0),
                          FixedRandom(), "UNIT")
    scaler = LocalScaler(manager)
    manager.start()
    return clock, pool, spawner, manager, scaler


class LocalScalerTests(SynchronousTestCase):
    def test_provides(self) -> None:
        """It is an IScaler."""
        self.assertTrue(verifyObject(IScaler, node_rig()[4]))

    def test_zero_at_start(self) -> None:
        """MIN_NODES=0 with scale to zero starts no node (the headroom node is not kept)."""
        clock, pool, spawner, manager, scaler = node_rig()
        clock.advance(5)
        self.assertEqual((spawner.spawned, scaler.ready(), len(pool)), ([], 0, 0))

    def test_scale_up_ready_and_notified(self) -> None:
        """scale(1) starts a node; it joins the pool and the subscriber hears it."""
        clock, pool, spawner, manager, scaler = node_rig()
        heard: list[int] = []
        scaler.subscribe(lambda: heard.append(scaler.ready()))
        scaler.scale(1, "wake: test")
        self.assertEqual(len(spawner.spawned), 1)
        self.assertEqual((scaler.desired(), scaler.ready(), heard[-1]), (1, 1, 1))
        self.assertEqual([b.server_id for b in pool], ["NODE1"])

    def test_scale_to_zero_stops_idle_node(self) -> None:
        """scale(0) with no session stops the node at once (the controller already waited)."""
        clock, pool, spawner, manager, scaler = node_rig()
        scaler.scale(1, "wake")
        clock.advance(2)
        scaler.scale(0, "idle")
        self.assertEqual((scaler.ready(), len(pool), manager.nodes), (0, 0, {}))
        self.assertEqual(spawner.spawned[0].signals, ["TERM"])

    def test_scale_to_zero_keeps_node_with_session(self) -> None:
        """A node carrying a session is never stopped by scale(0)."""
        clock, pool, spawner, manager, scaler = node_rig()
        scaler.scale(1, "wake")
        backend = pool.get("NODE1")
        pool.session_opening(backend)
        clock.advance(2)
        scaler.scale(0, "idle")
        clock.advance(3600)
        self.assertEqual(manager.nodes[1].state, NodeState.ACTIVE)
        self.assertEqual(spawner.spawned[0].signals, [])
        pool.session_closed(backend)
        for _ in range(62):  # the next tick sees it idle, then the node's own IDLE_TIME
            clock.advance(1)
        self.assertEqual(manager.nodes, {})

    def test_controller_end_to_end_in_memory(self) -> None:
        """Controller + local scaler: a held login wakes a node, the pool sleeps after the idle time."""
        clock, pool, spawner, manager, scaler = node_rig()
        spawner.auto_ready = False
        controller = ScaleToZero(clock, scaler, ScaleToZeroPolicy(enabled=True, idle_time=30.0, wake_timeout=60.0),
                                 lambda: sum(b.active for b in pool))
        controller.start()
        held = controller.hold("client")
        self.assertEqual(len(spawner.spawned), 1)
        clock.advance(0.5)
        self.assertFalse(held.called)
        spawner.listening.add(1)
        clock.advance(0.05)  # the readiness probe
        self.successResultOf(held)
        self.assertEqual(controller.wake_latencies, [0.55])
        clock.advance(29)
        self.assertEqual(scaler.ready(), 1)
        clock.advance(2)
        self.assertEqual((scaler.ready(), manager.nodes), (0, {}))

    def test_manager_without_scale_to_zero_keeps_headroom(self) -> None:
        """Without the local scaler MIN_NODES=0 still keeps the one node of headroom (unchanged)."""
        clock = Clock()
        pool = ServerPool([], make_balancer(SortMethod.CONNECTION, 3.0), clock=clock)
        manager = NodeManager(clock, pool, FakeSpawner(), NodePolicy(command=("x",), min_nodes=0),
                              FixedRandom(), "UNIT")
        manager.start()
        self.assertEqual(len(manager.nodes), 1)


class Session:
    client_address = "10.0.0.9:4000"


class WakeGateTests(SynchronousTestCase):
    def test_refusal_becomes_gate_refused(self) -> None:
        """A wake timeout reaches the session as GateRefused with its reason."""
        rig = Rig(wake_timeout=5.0)
        d = WakeGate(rig.controller).acquire(Session())
        rig.advance(6)
        refused = self.failureResultOf(d, GateRefused).value
        self.assertEqual(refused.what, "no AppServer woke in time")
        self.assertIn("WAKE_TIMEOUT=5s", refused.detail)

    def test_cancel(self) -> None:
        """Cancelling the gate's answer (client left) gives up the hold."""
        rig = Rig()
        d = WakeGate(rig.controller).acquire(Session())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(rig.controller.held, [])

    def test_fixed_server_no_hold(self) -> None:
        """A REMOTE_SERVER that can take the session lets it through without a wake."""
        rig = Rig()
        pool = ServerPool([RemoteServer("A", "127.0.0.1", 1)], make_balancer(SortMethod.CONNECTION, 3.0))
        self.successResultOf(WakeGate(rig.controller, pool).acquire(Session()))
        self.assertEqual(rig.controller.wakes, 0)


class InnerDispatcher:
    strip_request_headers: frozenset[bytes] = frozenset()

    def __init__(self) -> None:
        self.chosen = 0

    def choose(self, request: RequestInfo) -> Deferred[Choice]:
        self.chosen += 1
        return succeed(Choice(["server"], {}))


REQUEST = RequestInfo(b"GET", b"/", [], "10.0.0.9")


class WakeDispatcherTests(SynchronousTestCase):
    def test_passthrough_without_controller(self) -> None:
        """Without a controller the inner dispatcher answers."""
        inner = InnerDispatcher()
        self.assertEqual(self.successResultOf(WakeDispatcher(inner).choose(REQUEST)).candidates, ["server"])

    def test_holds_then_chooses(self) -> None:
        """A request to a sleeping pool waits for the wake, then the inner dispatcher chooses."""
        rig = Rig()
        inner = InnerDispatcher()
        d = WakeDispatcher(inner, rig.controller).choose(REQUEST)
        self.assertFalse(d.called)
        self.assertEqual(inner.chosen, 0)
        rig.scaler.set_ready(1)
        self.assertEqual(self.successResultOf(d).candidates, ["server"])

    def test_timeout_is_503_with_retry_after(self) -> None:
        """Past WAKE_TIMEOUT the request fails with NoBackend (503), Retry-After and the reason."""
        rig = Rig(wake_timeout=20.0)
        d = WakeDispatcher(InnerDispatcher(), rig.controller).choose(REQUEST)
        rig.advance(21)
        error = self.failureResultOf(d, NoBackend).value
        self.assertIn("no AppServer woke in time: none ready within WAKE_TIMEOUT=20s", error.reason)
        self.assertEqual(error.retry_after, 5)

    def test_cap_is_503(self) -> None:
        """Over MAX_HELD a request gets 503 at once."""
        rig = Rig(max_held=1)
        dispatcher = WakeDispatcher(InnerDispatcher(), rig.controller)
        dispatcher.choose(REQUEST)
        self.assertIn("MAX_HELD=1", self.failureResultOf(dispatcher.choose(REQUEST), NoBackend).value.reason)


HEAD = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 7890\nSORT_METHOD = CONNECTION\n"


class ScaleKeysTests(SynchronousTestCase):
    def test_defaults_off(self) -> None:
        """Without SCALE_TO_ZERO nothing changes."""
        config = parse_config(HEAD + "NODE_COMMAND = appsrv --port {port}\n")
        self.assertFalse(config.desktop.scale_to_zero.enabled)

    def test_keys_in_nodes_section(self) -> None:
        """The keys are read in the NODES section; WAKE_TIMEOUT defaults to 2x START_TIMEOUT (>= 60 s)."""
        config = parse_config(HEAD + "NODES = N\n[N]\nNODE_COMMAND = appsrv --port {port}\nMIN_NODES = 0\n"
                              "START_TIMEOUT = 45\nSCALE_TO_ZERO = 1\nZERO_IDLE_TIME = 600\nMAX_HELD = 50\n")
        policy = config.desktop.scale_to_zero
        self.assertEqual((policy.enabled, policy.idle_time, policy.wake_timeout, policy.max_held, policy.min_awake),
                         (True, 600.0, 90.0, 50, 1))
        self.assertEqual(config.warnings, ())

    def test_desktop_unit_wiring(self) -> None:
        """The desktop unit asks the wake gate after its dependencies and before "a server can take it"."""
        config = parse_config(HEAD + "NODE_COMMAND = appsrv --port {port}\nMIN_NODES = 0\nSCALE_TO_ZERO = 1\n")
        unit = DesktopUnit(MemoryReactorClock(), config.desktop)
        self.assertEqual([type(g).__name__ for g in unit.factory.gates],
                         ["DependencyGate", "WakeGate", "ServerAvailable"])
        assert unit.nodes is not None and unit.scale_to_zero is not None
        self.assertTrue(unit.nodes.scale_to_zero)
        self.assertEqual(unit.nodes.desired(), 0)
        plain = DesktopUnit(MemoryReactorClock(), parse_config(HEAD + "NODE_COMMAND = appsrv --port {port}\n").desktop)
        self.assertIsNone(plain.scale_to_zero)
        self.assertEqual(len(plain.factory.gates), 2)

    def test_reload_applies_live(self) -> None:
        """A reload changes ZERO_IDLE_TIME and MAX_HELD live and leaves the controller's MIN_NODES alone."""
        text = HEAD + "NODE_COMMAND = appsrv --port {port}\nMIN_NODES = 0\nSCALE_TO_ZERO = 1\n"
        unit = DesktopUnit(MemoryReactorClock(), parse_config(text).desktop)
        assert unit.nodes is not None and unit.scale_to_zero is not None
        unit.nodes.policy = replace(unit.nodes.policy, min_nodes=1)  # as after a wake
        self.assertTrue(unit.reload(parse_config(text + "ZERO_IDLE_TIME = 30\nMAX_HELD = 9\nMAX_NODES = 6\n").desktop))
        self.assertEqual((unit.scale_to_zero.policy.idle_time, unit.scale_to_zero.policy.max_held), (30.0, 9))
        self.assertEqual((unit.nodes.policy.min_nodes, unit.nodes.policy.max_nodes), (1, 6))

    def test_short_wake_timeout_warns(self) -> None:
        """A WAKE_TIMEOUT not above START_TIMEOUT is one warning naming both."""
        config = parse_config(HEAD + "NODE_COMMAND = appsrv --port {port}\nSCALE_TO_ZERO = 1\nWAKE_TIMEOUT = 20\n")
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("WAKE_TIMEOUT=20 is not longer than START_TIMEOUT=30", config.warnings[0])

    def test_needs_nodes(self) -> None:
        """SCALE_TO_ZERO=1 without managed nodes is a config error."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(HEAD + "REMOTE_SERVER_01 = 127.0.0.1 5000\nSCALE_TO_ZERO = 1\n")
        self.assertIn("needs managed nodes", str(caught.exception))

    def test_not_with_persistent(self) -> None:
        """A persistent node cannot sleep: an error."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(HEAD + "NODE_COMMAND = appsrv --port {port}\nSCALE_TO_ZERO = 1\nPERSISTENT = 1\n")
        self.assertIn("PERSISTENT=1", str(caught.exception))

    def test_bad_value_one_line(self) -> None:
        """A bad ZERO_IDLE_TIME names the key and its range."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(HEAD + "NODE_COMMAND = appsrv --port {port}\nZERO_IDLE_TIME = -1\n")
        self.assertIn("ZERO_IDLE_TIME", str(caught.exception))
        self.assertIn("out of range", str(caught.exception))


class HttpUnitWakeTests(SynchronousTestCase):
    """Through a real HttpUnit and its proxy (StringTransport), the wake dispatcher set as ``unit.wake.controller``."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        config = parse_config(HEAD + "REMOTE_SERVER_01 = 127.0.0.1 5000\n[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 8080\n"
                              "REMOTE_SERVER_A = 127.0.0.1 8081\nMONITORING_TYPE = DISABLED\n")
        self.unit = HttpUnit(self.reactor, config.unit("BALANCE_HTTP"), name="BALANCE_HTTP")
        self.unit.pool.set_state("A", ServerState.DOWN, "asleep")  # no member can take a request
        self.scaler = FakeScaler()
        self.controller = ScaleToZero(self.reactor, self.scaler,
                                      ScaleToZeroPolicy(enabled=True, wake_timeout=12.0, max_held=3),
                                      lambda: sum(b.active for b in self.unit.pool))
        self.unit.wake.controller = self.controller
        self.controller.start()
        self.addCleanup(self.controller.stop)

    def request(self) -> StringTransport:
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 50000))
        protocol: Any = self.unit.factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 50000))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n")
        self.protocol = protocol
        return transport

    def test_wake_timeout_503_retry_after_json(self) -> None:
        """A request held past WAKE_TIMEOUT gets 503, Retry-After and the reason as JSON."""
        transport = self.request()
        self.assertEqual(transport.value(), b"")  # held
        self.assertEqual(len(self.controller.held), 1)
        self.reactor.advance(12.5)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"retry-after: 3", head.lower())
        error = json.loads(body)["error"]
        self.assertIn("no AppServer woke in time: none ready within WAKE_TIMEOUT=12s", error)

    def test_held_then_sent_upstream(self) -> None:
        """A held request goes upstream once a member is ready (no answer of ours)."""
        transport = self.request()
        self.unit.pool.set_state("A", ServerState.UP, "woke")
        self.scaler.set_ready(1)
        self.assertEqual(self.controller.held, [])
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.unit.pool.get("A").active, 1)  # in flight: activity
        self.reactor.advance(20)  # past WAKE_TIMEOUT: its timer is gone, no 503
        self.assertEqual(transport.value(), b"")

    def test_client_gone_releases_hold(self) -> None:
        """A client that leaves while its request is held holds nothing."""
        self.request()
        self.assertEqual(len(self.controller.held), 1)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.controller.held, [])
