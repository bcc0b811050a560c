"""Dependency order when waking (seed 003) in memory: a held session waits for the unit's
dependencies, then the wake; no AppServer is asked for before they are up; the timeout names the
dependency; an awake unit still refuses at once; a dependency that is a unit of this broker is
woken first; and ``drains_safely`` (the scaler decides whether the asked count stays a minimum)."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from protheus_broker.config import parse_config
from protheus_broker.deps.gates import DependencyDispatcher, DependencyGate
from protheus_broker.deps.state import DependencyState, IDependency, UnitDependencies, UnitDependency
from protheus_broker.desktop.lifecycle import GateRefused
from protheus_broker.http.proxy import Choice, NoBackend, RequestInfo
from protheus_broker.ini import ConfigError
from protheus_broker.kube.scaler import KubernetesScaler
from protheus_broker.scaling.controller import ScaleToZero, ScaleToZeroPolicy, WakeRefused
from protheus_broker.scaling.gates import WakeDispatcher, WakeGate
from protheus_broker.scaling.local import LocalScaler
from protheus_broker.web import model
from protheus_broker.web.page import PAGE_HTML
from tests.helpers import LogCatcher
from tests.test_deps import DBACCESS, DESKTOP, WEB, broker
from tests.test_scaling import FakeForecast, FakeScaler


def dependency(clock: Clock, name: str, where: str, up: bool | None) -> DependencyState:
    """A dependency with its first verdict given (None: not checked yet)."""
    state = DependencyState(name, where, clock, down_after=1, up_after=1)
    if up is True:
        state.passed()
    elif up is False:
        state.failed("connection refused")
    return state


class Rig:
    """A controller over a fake scaler with DBACCESS and LOCKSERVER as its unit's dependencies."""

    def __init__(self, ready: int = 0, db: bool | None = False, lock: bool | None = False,
                 scaler: Any = None, forecast: FakeForecast | None = None, name: str = "BALANCE_X",
                 clock: Clock | None = None, **policy: Any) -> None:
        self.clock = clock if clock is not None else Clock()
        self.scaler = scaler if scaler is not None else FakeScaler(ready)
        self.db = dependency(self.clock, "DBACCESS", "10.0.0.5:7890", db)
        self.lock = dependency(self.clock, "LOCKSERVER", "10.0.0.6:5000", lock)
        self.deps = UnitDependencies(name)
        self.deps.use([self.db, self.lock])
        self.sessions = 0
        options: dict[str, Any] = {"enabled": True, "idle_time": 60.0, "wake_timeout": 30.0, "max_held": 5}
        options.update(policy)
        self.controller = ScaleToZero(self.clock, self.scaler, ScaleToZeroPolicy(**options),
                                      lambda: self.sessions, forecast=forecast, name=name,
                                      dependencies=self.deps)
        self.controller.start()

    def advance(self, seconds: float, step: float = 0.1) -> None:
        while seconds > 1e-9:
            self.clock.advance(min(step, seconds))
            seconds -= step


class UnitOf:
    """A unit of the broker as UnitDependency sees it: its name, pool and controller (the
    pool here: can take a session while the fake scaler has a ready member)."""

    def __init__(self, rig: Rig) -> None:
        self.name = rig.controller.name
        self.scale_to_zero = rig.controller
        self.pool = self
        self.scaler = rig.scaler

    def can_take_session(self) -> bool:
        return self.scaler.ready() > 0

    def subscribe(self, observer: Callable[[Any], None]) -> Callable[[], None]:
        return self.scaler.subscribe(lambda: observer(None))


def outcome(d: Deferred[Any]) -> list[Any]:
    result: list[Any] = []
    d.addBoth(result.append)
    return result


class WaitForDependenciesTests(SynchronousTestCase):
    def test_held_session_waits_for_dependencies_then_the_wake(self) -> None:
        """A login to a sleeping unit is held while DBACCESS and LOCKSERVER are down, then the node starts and it goes on."""
        logs = LogCatcher(self)
        rig = Rig()
        held = outcome(rig.controller.hold("10.1.1.1"))
        self.assertEqual((held, rig.scaler.asked), ([], []))
        self.assertTrue(rig.controller.waking)
        self.assertIn("waking BALANCE_X: waiting for DBACCESS, LOCKSERVER", logs.texts())
        self.assertEqual(rig.controller.snapshot()["waiting_for"], ["DBACCESS", "LOCKSERVER"])
        rig.advance(0.6)
        rig.db.passed()
        rig.advance(0.6)
        self.assertEqual(rig.scaler.asked, [])  # LOCKSERVER still down: no node yet
        rig.lock.passed()
        self.assertEqual([n for n, _ in rig.scaler.asked], [1])
        self.assertIn("BALANCE_X: DBACCESS, LOCKSERVER up after 1.2 s; starting 1 node", logs.texts())
        self.assertEqual(len([t for t in logs.texts() if "waiting for DBACCESS" in t]), 1)  # once per wake
        self.assertEqual(held, [])
        rig.scaler.set_ready(1)
        self.assertEqual(held, [None])
        self.assertEqual(rig.controller.snapshot()["waiting_for"], [])

    def test_no_scale_before_every_dependency_is_up(self) -> None:
        """Ticks, a second held session and an unchecked dependency ask the scaler for nothing."""
        rig = Rig(db=None, lock=True)  # DBACCESS: no verdict yet
        rig.controller.hold("a")
        rig.advance(10, step=1.0)
        rig.controller.hold("b")
        rig.advance(10, step=1.0)
        self.assertEqual((rig.scaler.asked, len(rig.controller.held)), ([], 2))
        rig.db.passed()
        self.assertEqual([n for n, _ in rig.scaler.asked], [1])

    def test_timeout_names_the_dependency(self) -> None:
        """Past WAKE_TIMEOUT a held session is refused naming the dependency that kept the wake, and no node was started."""
        rig = Rig(lock=True)
        held = outcome(rig.controller.hold("a"))
        rig.advance(31, step=1.0)
        self.assertEqual(len(held), 1)
        refused = held[0].value
        self.assertIsInstance(refused, WakeRefused)
        self.assertEqual(refused.what, "dependency DBACCESS (10.0.0.5:7890) down: not woken")
        self.assertIn("connection refused; waited 30.0s (WAKE_TIMEOUT=30s) for DBACCESS", refused.detail)
        self.assertEqual((rig.scaler.asked, rig.deps.refused, rig.controller.refused_timeout),
                         ([], {"DBACCESS": 1}, 1))

    def test_dependency_down_while_awake_stops_no_scale_down(self) -> None:
        """With a dependency down an awake unit still goes to sleep after ZERO_IDLE_TIME (only starts wait)."""
        rig = Rig(ready=1, db=True, lock=True)
        rig.db.failed("connection refused")
        rig.advance(61, step=1.0)
        self.assertEqual(rig.scaler.asked[-1][0], 0)

    def test_warmup_floor_waits_for_dependencies(self) -> None:
        """A warm-up floor starts no node while a dependency is down, and does once it is up."""
        logs = LogCatcher(self)
        forecast = FakeForecast(0)
        rig = Rig(ready=1, db=True, lock=True, forecast=forecast)
        rig.scaler._desired = 1
        rig.controller.target = 1
        rig.lock.failed("connection refused")
        forecast.value = 2
        rig.advance(3, step=1.0)
        self.assertEqual(rig.scaler.asked, [])
        self.assertIn("scaling BALANCE_X up 1 -> 2: waiting for LOCKSERVER", logs.texts())
        rig.lock.passed()
        self.assertEqual([n for n, _ in rig.scaler.asked], [2])


class ScreenTests(SynchronousTestCase):
    def test_status_and_page_say_waiting_for_dependencies(self) -> None:
        """The unit's scale-to-zero status lists what a wake waits for; the page shows "waiting for dependencies"."""
        rig = Rig(lock=True)
        rig.controller.hold("a")
        rig.clock.advance(2)

        class Unit:
            scale_to_zero = rig.controller
        status = model.unit_scale_to_zero(Unit())
        assert status is not None
        self.assertEqual((status["waking"], status["waiting_for"], status["waiting_for_seconds"], status["target"]),
                         (True, ["DBACCESS"], 2.0, 0))
        self.assertIn(b'"waiting for dependencies: "+z.waiting_for.join(", ")', PAGE_HTML)


class GateTests(SynchronousTestCase):
    def session(self, rig: Rig) -> Any:
        gate = DependencyGate(rig.deps)
        wake = WakeGate(rig.controller)

        class Broker:
            gates = [gate, wake]

        class Session:
            broker = Broker()
            client_address = "10.1.1.1"
        return gate, wake, Session()

    def test_awake_unit_refuses_at_once(self) -> None:
        """Desktop: with a member ready, a dependency that is down refuses the session at once."""
        rig = Rig(ready=1, db=False, lock=True)
        gate, wake, session = self.session(rig)
        result = outcome(gate.acquire(session))
        self.assertIsInstance(result[0], Failure)
        self.assertIsInstance(result[0].value, GateRefused)
        self.assertEqual(result[0].value.what, "dependency DBACCESS (10.0.0.5:7890) down")
        self.assertEqual(rig.controller.held, [])

    def test_asleep_unit_holds_instead(self) -> None:
        """Desktop: asleep, the dependency gate lets the session through and the wake gate holds it until the node is ready."""
        rig = Rig(ready=0, db=False, lock=True)
        gate, wake, session = self.session(rig)
        self.assertEqual(outcome(gate.acquire(session)), [None])
        held = outcome(wake.acquire(session))
        self.assertEqual((held, len(rig.controller.held), rig.scaler.asked), ([], 1, []))
        rig.db.passed()
        rig.scaler.set_ready(1)
        self.assertEqual(held, [None])

    def test_http_asleep_holds_awake_refuses(self) -> None:
        """HTTP: asleep, a request is held by the wake dispatcher (no 503); awake, the 503 names the dependency."""
        rig = Rig(ready=0, db=False, lock=True)

        class Inner:
            strip_request_headers: frozenset[bytes] = frozenset()
            pool = None

            def choose(self, request: RequestInfo) -> Deferred[Choice]:
                return succeed("chosen")  # type: ignore[arg-type]

        dispatcher = DependencyDispatcher(WakeDispatcher(Inner(), rig.controller), rig.deps)
        request = RequestInfo(method=b"GET", target=b"/", headers=[], client="10.1.1.1")
        held = outcome(dispatcher.choose(request))
        self.assertEqual((held, len(rig.controller.held)), ([], 1))
        rig.db.passed()
        rig.scaler.set_ready(1)
        self.assertEqual(held, ["chosen"])
        rig.db.failed("connection refused")
        refused = outcome(dispatcher.choose(request))
        self.assertIsInstance(refused[0].value, NoBackend)
        self.assertIn("dependency DBACCESS (10.0.0.5:7890) down", str(refused[0].value))


class DependencyUnitTests(SynchronousTestCase):
    def test_dependency_unit_woken_first(self) -> None:
        """A unit depending on another unit of the broker wakes it, waits for it, then wakes; asleep again, it lets it sleep."""
        logs = LogCatcher(self)
        clock = Clock()
        lock_unit = Rig(name="BALANCE_LOCKSERVER", db=True, lock=True, clock=clock)
        lock_unit.deps.use([])
        lockserver = UnitDependency("LOCKSERVER", UnitOf(lock_unit), clock)
        verifyObject(IDependency, lockserver)
        app = Rig(name="BALANCE_X", db=True, lock=True, clock=clock)
        app.deps.use([app.db, lockserver])
        held = outcome(app.controller.hold("a"))
        self.assertEqual(app.scaler.asked, [])
        self.assertEqual([n for n, _ in lock_unit.scaler.asked], [1])  # the LockServer unit first
        self.assertIn("BALANCE_LOCKSERVER: woken for BALANCE_X, which depends on it", logs.texts())
        clock.advance(2)
        lock_unit.scaler.set_ready(1)
        self.assertEqual([n for n, _ in app.scaler.asked], [1])
        self.assertIn("BALANCE_X: DBACCESS, LOCKSERVER up after 2.0 s; starting 1 node", logs.texts())
        app.scaler.set_ready(1)
        self.assertEqual(held, [None])
        for _ in range(200):  # no session on either: BALANCE_X sleeps after 60 s, then BALANCE_LOCKSERVER
            clock.advance(1)
        self.assertEqual((app.scaler.asked[-1][0], lock_unit.scaler.asked[-1][0]), (0, 0))
        self.assertEqual(lock_unit.controller.demands, set())

    def test_dependency_unit_stays_awake_while_dependent_awake(self) -> None:
        """The LockServer unit does not sleep while the unit depending on it has a node."""
        clock = Clock()
        lock_unit = Rig(name="BALANCE_LOCKSERVER", ready=1, clock=clock)
        lock_unit.deps.use([])
        lockserver = UnitDependency("LOCKSERVER", UnitOf(lock_unit), clock)
        app = Rig(name="BALANCE_X", ready=1, db=True, clock=clock)
        app.deps.use([app.db, lockserver])
        app.sessions = 1
        for _ in range(300):
            clock.advance(1)
        self.assertEqual(lock_unit.controller.demands, {"BALANCE_X"})
        self.assertNotIn(0, [n for n, _ in lock_unit.scaler.asked])


    def test_given_up_wake_lets_the_dependency_unit_sleep(self) -> None:
        """The LockServer unit never gets ready: the held login is refused naming it, and once the wake is over the unit is let go."""
        clock = Clock()
        lock_unit = Rig(name="BALANCE_LOCKSERVER", clock=clock)
        lock_unit.deps.use([])
        lockserver = UnitDependency("LOCKSERVER", UnitOf(lock_unit), clock)
        app = Rig(name="BALANCE_X", db=True, clock=clock)
        app.deps.use([app.db, lockserver])
        held = outcome(app.controller.hold("a"))
        self.assertEqual(lock_unit.controller.demands, {"BALANCE_X"})
        for _ in range(31):
            clock.advance(1)
        self.assertEqual(held[0].value.what, "dependency LOCKSERVER (unit BALANCE_LOCKSERVER) down: not woken")
        for _ in range(200):
            clock.advance(1)
        self.assertEqual((app.scaler.asked, lock_unit.controller.demands), ([], set()))
        self.assertEqual(lock_unit.scaler.asked[-1][0], 0)


class DrainsSafelyTests(SynchronousTestCase):
    def shrink(self, drains_safely: bool) -> list[int]:
        scaler = FakeScaler(ready=1)
        scaler.drains_safely = drains_safely  # type: ignore[attr-defined]
        rig = Rig(ready=1, db=True, lock=True, scaler=scaler, sessions_per_member=10)
        rig.sessions = 30
        rig.advance(2, step=1.0)
        rig.sessions = 5
        rig.advance(2, step=1.0)
        return [n for n, _ in scaler.asked]

    def test_local_scaler_follows_need(self) -> None:
        """A scaler that drains safely is asked for what load needs while sessions are open."""
        self.assertEqual(self.shrink(True), [3, 1])

    def test_kubernetes_keeps_what_was_asked(self) -> None:
        """A scaler that does not (Kubernetes) keeps what was asked while sessions are open."""
        self.assertEqual(self.shrink(False), [3])

    def test_scalers_say_so(self) -> None:
        """The local scaler drains safely, the Kubernetes scaler does not."""
        self.assertEqual((LocalScaler.drains_safely, KubernetesScaler.drains_safely), (True, False))




class UnitConfigTests(SynchronousTestCase):
    def test_unit_dependency_wired(self) -> None:
        """UNIT = BALANCE_SMART_CLIENT_DESKTOP in a dependency section: the web-services unit depends on that unit's pool, no TCP check."""
        text = DESKTOP + WEB + "DEPENDS_ON = LOCKRELAY, DBACCESS\n" + DBACCESS + "[LockRelay]\nUnit = BALANCE_SMART_CLIENT_DESKTOP\n"
        service, _ = broker(text, self)
        self.assertEqual(list(service.dependencies.checks), ["DBACCESS"])
        web = service.unit("BALANCE_WEB_SERVICES")
        relay = web.dependencies.dependencies[0]
        self.assertIsInstance(relay, UnitDependency)
        self.assertIs(relay.unit, service.desktop)
        self.assertEqual((relay.where, relay.up), ("unit BALANCE_SMART_CLIENT_DESKTOP", service.desktop.pool.can_take_session()))
        self.assertTrue(service.reload())
        self.assertIs(web.dependencies.dependencies[0], relay)  # a reload keeps it

    def test_unit_errors(self) -> None:
        """UNIT must name a unit of the file, and no unit may depend on itself, directly or through another."""
        cases = [
            (DESKTOP + "DEPENDS_ON = RELAY\n[RELAY]\nUNIT = BALANCE_LOCKSERVER\n", "UNIT: [BALANCE_LOCKSERVER] is not a balance unit"),
            (DESKTOP + "DEPENDS_ON = RELAY\n[RELAY]\nUNIT = BALANCE_SMART_CLIENT_DESKTOP\n",
             "BALANCE_SMART_CLIENT_DESKTOP -> BALANCE_SMART_CLIENT_DESKTOP"),
            (DESKTOP + "DEPENDS_ON = A\n" + WEB + "DEPENDS_ON = B\n[A]\nUNIT = BALANCE_WEB_SERVICES\n"
             "[B]\nUNIT = BALANCE_SMART_CLIENT_DESKTOP\n",
             "BALANCE_SMART_CLIENT_DESKTOP -> BALANCE_WEB_SERVICES -> BALANCE_SMART_CLIENT_DESKTOP"),
        ]
        for text, needle in cases:
            with self.assertRaises(ConfigError) as raised:
                parse_config(text, "a.ini")
            self.assertIn(needle, str(raised.exception))


class UnitWiringTests(SynchronousTestCase):
    def test_units_hand_their_dependencies_to_the_controller(self) -> None:
        """The desktop and the HTTP unit with SCALE_TO_ZERO=1 give their controller their DEPENDS_ON."""
        head = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 7890\nSORT_METHOD = CONNECTION\n"
                "NODE_COMMAND = appsrv --port {port}\nMIN_NODES = 0\nSCALE_TO_ZERO = 1\nDEPENDS_ON = DBACCESS\n")
        http = ("[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 8080\nNODE_COMMAND = appsrv --http --port {port}\n"
                "MIN_NODES = 0\nBASE_PORT = 31000\nSCALE_TO_ZERO = 1\nDEPENDS_ON = DBACCESS\n")
        service, _ = broker(head + http + DBACCESS, self)
        for unit in service.units:
            self.assertIsNotNone(unit.scale_to_zero, unit.name)
            self.assertIs(unit.scale_to_zero.dependencies, unit.dependencies)
            self.assertEqual(unit.scale_to_zero.missing()[0].name, "DBACCESS")  # no verdict yet
