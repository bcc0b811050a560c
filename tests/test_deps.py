"""Dependency gating in memory: up/down with hysteresis, the checks (one in flight, bounded by
CONNECT_TIMEOUT), checks shared between units, DEPENDS_ON and the dependency sections read (one
line per error), the desktop gate and the HTTP 503, reload, and the broker screen."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from protheus_broker.config import parse_config
from protheus_broker.deps.checker import DependencyCheck, tcp_connect
from protheus_broker.deps.gates import DependencyDispatcher, DependencyGate
from protheus_broker.deps.settings import DependencyConfig
from protheus_broker.deps.state import (ChannelDependency, DependencyDown, DependencyState, IDependency,
                                        UnitDependencies)
from protheus_broker.desktop.lifecycle import GateRefused, IGate
from protheus_broker.http.proxy import IDispatcher, NoBackend, RequestInfo
from protheus_broker.ini import ConfigError
from protheus_broker.license.client_settings import DEFAULT_LICENSE_PORT
from protheus_broker.tap import BrokerService
from protheus_broker.web import metrics, model, page

from .helpers import LogCatcher

DESKTOP = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
           "REMOTE_SERVER_01 = 127.0.0.1 5001\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
           "RESUME_ENABLE = 0\n")
WEB = ("[BALANCE_WEB_SERVICES]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
       "REMOTE_SERVER_A = 127.0.0.1 6001 2\nMONITORING_TYPE = DISABLED\n")
DBACCESS = "[DBAccess]\nDataBase = POSTGRES\nAlias = P12\nServer = 10.0.0.5\nPort = 7890\n"
LOCKSERVER = "[LockServer]\nEnable = 0\nServer = 10.0.0.6\nPort = 1234\nMessagelog = 0\n"


def ini(desktop_deps: str = "DBACCESS", web_deps: str | None = None, extra: str = "") -> str:
    text = DESKTOP + (f"DEPENDS_ON = {desktop_deps}\n" if desktop_deps else "")
    if web_deps is not None:
        text += WEB + (f"DEPENDS_ON = {web_deps}\n" if web_deps else "")
    return text + DBACCESS + LOCKSERVER + extra


class FakeConnect:
    """connect(host, port, timeout): each call is a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float, Deferred[Any]]] = []

    def __call__(self, host: str, port: int, timeout: float) -> Deferred[Any]:
        attempt: Deferred[Any] = Deferred()
        self.calls.append((host, port, timeout, attempt))
        return attempt

    def answer(self, ok: bool = True) -> None:
        attempt = self.calls[-1][3]
        if ok:
            attempt.callback(None)
        else:
            attempt.errback(Failure(ConnectionRefusedError()))


def state(clock: Any = None, name: str = "DBACCESS", **kwargs: Any) -> DependencyState:
    return DependencyState(name, "10.0.0.5:7890", clock or Clock(), **kwargs)


class DependencyStateTests(SynchronousTestCase):
    def test_provides_the_interface(self) -> None:
        """A DependencyState is an IDependency, unchecked and not up at first."""
        dependency = state()
        verifyObject(IDependency, dependency)
        self.assertEqual((dependency.checked, dependency.up, dependency.reason), (False, False, "not checked yet"))

    def test_first_verdict_counts_at_once(self) -> None:
        """The first check decides (no earlier word to keep): one failure is down, one pass is up."""
        down, up = state(), state()
        self.assertTrue(down.failed("connection refused"))
        self.assertTrue(up.passed())
        self.assertEqual((down.checked, down.up, down.reason), (True, False, "connection refused"))
        self.assertEqual((up.checked, up.up), (True, True))

    def test_down_after_so_many_failures_in_a_row(self) -> None:
        """Up, it takes DOWN_AFTER_FAILURES failed checks in a row to go down; a pass between
        them starts the count again; since is the moment it went down."""
        clock = Clock()
        dependency = state(clock, down_after=3)
        dependency.passed()
        clock.advance(10)
        self.assertFalse(dependency.failed("refused"))
        self.assertFalse(dependency.failed("refused"))
        dependency.passed()
        self.assertFalse(dependency.failed("refused"))
        self.assertFalse(dependency.failed("refused"))
        self.assertTrue(dependency.up)
        clock.advance(5)
        self.assertTrue(dependency.failed("no connection in 3s"))
        self.assertEqual((dependency.up, dependency.since, dependency.reason), (False, 15.0, "no connection in 3s"))

    def test_up_after_so_many_passes_in_a_row(self) -> None:
        """Down, it takes UP_AFTER_SUCCESSES good checks in a row to come back."""
        clock = Clock()
        dependency = state(clock, up_after=2)
        dependency.failed("refused")
        self.assertFalse(dependency.passed())
        dependency.failed("refused")
        self.assertFalse(dependency.passed())
        clock.advance(7)
        self.assertTrue(dependency.passed())
        self.assertEqual((dependency.up, dependency.since), (True, 7.0))

    def test_each_transition_logged_once_and_told_to_subscribers(self) -> None:
        """Each change is one log line and one call of each subscriber; checks that change
        nothing are silent; an unsubscribed callback hears no more."""
        logs = LogCatcher(self)
        dependency = state(down_after=1, up_after=1)
        heard: list[bool] = []
        unsubscribe = dependency.subscribe(lambda d: heard.append(d.up))
        dependency.passed()
        dependency.passed()
        dependency.failed("refused")
        dependency.failed("still refused")
        dependency.passed()
        self.assertEqual(heard, [True, False, True])
        changes = [e for e in logs.events if "dependency_up" in e]
        self.assertEqual([e["dependency_up"] for e in changes], [True, False, True])
        self.assertIn("is down: refused", logs.texts()[-2])
        self.assertEqual(dependency.reason, "connected")
        unsubscribe()
        dependency.failed("refused")
        self.assertEqual(heard, [True, False, True])

    def test_reason_follows_the_latest_failure_while_down(self) -> None:
        """While down each failure updates the reason the screen shows, without a new log line."""
        logs = LogCatcher(self)
        dependency = state()
        dependency.failed("connection refused")
        dependency.failed("no connection in 3s")
        self.assertEqual(dependency.reason, "no connection in 3s")
        self.assertEqual(len([e for e in logs.events if "dependency_up" in e]), 1)

    def test_a_failing_subscriber_does_not_stop_the_others(self) -> None:
        """A subscriber that raises is logged; the next one still hears the change."""
        dependency = state()
        heard: list[bool] = []
        dependency.subscribe(lambda d: 1 / 0)  # type: ignore[func-returns-value]
        dependency.subscribe(lambda d: heard.append(d.up))
        dependency.passed()
        self.assertEqual(heard, [True])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class Channel:
    """The license client's shape: connected, since, reason, subscribe(callback) -> unsubscribe."""

    def __init__(self) -> None:
        self.connected, self.since, self.reason = True, 100.0, "handshake done"
        self.callbacks: list[Any] = []

    def subscribe(self, callback: Any) -> Any:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def set(self, connected: bool, since: float, reason: str) -> None:
        self.connected, self.since, self.reason = connected, since, reason
        for callback in list(self.callbacks):
            callback(connected)


class ChannelDependencyTests(SynchronousTestCase):
    def test_channel_plugs_in_as_a_dependency(self) -> None:
        """A channel with connected/since/reason/subscribe is one dependency: a unit refuses
        while it is disconnected, naming it, and passes again when it reconnects."""
        channel = Channel()
        dependency = ChannelDependency("LICENSECLIENT", channel)
        verifyObject(IDependency, dependency)
        unit = UnitDependencies("BALANCE_WEB_SERVICES")
        unit.use([dependency])
        self.successResultOf(unit.admit())
        heard: list[bool] = []
        dependency.subscribe(lambda d: heard.append(d.up))
        channel.set(False, 200.0, "license server unreachable")
        failure = self.failureResultOf(unit.admit(), DependencyDown)
        self.assertIn("dependency LICENSECLIENT (license channel) down", str(failure.value))
        self.assertIn("license server unreachable", str(failure.value))
        channel.set(True, 230.0, "reconnected")
        self.successResultOf(unit.admit())
        self.assertEqual((heard, dependency.since), ([False, True], 230.0))
        dependency.close()
        self.assertEqual(channel.callbacks, [])


class UnitDependenciesTests(SynchronousTestCase):
    def test_no_dependency_admits_at_once(self) -> None:
        """A unit without DEPENDS_ON admits every session at once."""
        self.successResultOf(UnitDependencies().admit())

    def test_refuses_naming_the_first_dependency_down(self) -> None:
        """Down: admit fails with DependencyDown naming the section, address, since and why,
        with a Retry-After; each refusal is counted for that dependency."""
        db, lock = state(name="DBACCESS", retry_after=10), state(name="LOCKSERVER")
        db.failed("connection refused")
        lock.failed("refused")
        unit = UnitDependencies()
        unit.use([db, lock])
        down = self.failureResultOf(unit.admit(), DependencyDown).value
        self.assertEqual(down.what, "dependency DBACCESS (10.0.0.5:7890) down")
        self.assertEqual(down.detail, "since 1970-01-01 00:00:00Z: connection refused")
        self.assertEqual(down.retry_after, 10)
        self.assertEqual(unit.refused, {"DBACCESS": 1})

    def test_waits_for_the_first_verdict(self) -> None:
        """Before the first check a session waits; a pass lets it go on, a failure refuses it."""
        db = state()
        unit = UnitDependencies()
        unit.use([db])
        first, second = unit.admit(), unit.admit()
        self.assertNoResult(first)
        db.passed()
        self.successResultOf(first)
        self.successResultOf(second)
        other = state()
        unit.use([other])
        waiting = unit.admit()
        other.failed("connection refused")
        self.failureResultOf(waiting, DependencyDown)

    def test_cancelled_wait_holds_nothing(self) -> None:
        """A client that leaves while waiting for the first verdict is forgotten."""
        db = state()
        unit = UnitDependencies()
        unit.use([db])
        waiting = unit.admit()
        waiting.cancel()
        self.failureResultOf(waiting)
        self.assertEqual(unit._waiting, [])
        db.passed()

    def test_use_replaces_the_dependencies(self) -> None:
        """use() from a reload replaces the set: a dependency no longer named stops gating."""
        db = state()
        db.failed("refused")
        unit = UnitDependencies()
        unit.use([db])
        self.failureResultOf(unit.admit(), DependencyDown)
        unit.use([])
        self.successResultOf(unit.admit())


def check_config(**kwargs: Any) -> DependencyConfig:
    values: dict[str, Any] = {"name": "DBACCESS", "host": "10.0.0.5", "port": 7890, "check_interval": 5.0,
                              "connect_timeout": 3.0, "down_after": 2, "up_after": 2}
    values.update(kwargs)
    return DependencyConfig(**values)


class DependencyCheckTests(SynchronousTestCase):
    def test_checks_every_interval(self) -> None:
        """A check now, then one every CHECK_INTERVAL; one that outlasts the interval moves the
        next to the following tick."""
        clock, connect = Clock(), FakeConnect()
        check = DependencyCheck(clock, check_config(), connect)
        check.start()
        self.assertEqual(len(connect.calls), 1)
        self.assertEqual(connect.calls[0][:3], ("10.0.0.5", 7890, 3.0))
        clock.advance(2)
        connect.answer(True)
        self.assertTrue(check.state.up)
        clock.advance(2.9)
        self.assertEqual(len(connect.calls), 1)
        clock.advance(0.1)
        self.assertEqual(len(connect.calls), 2)
        clock.advance(6)  # the second check answers at 11: the third runs at 15, not at 10
        connect.answer(True)
        clock.advance(3.9)
        self.assertEqual(len(connect.calls), 2)
        clock.advance(0.1)
        self.assertEqual(len(connect.calls), 3)
        check.stop()

    def test_one_check_in_flight(self) -> None:
        """A check that never answers holds the next ones: at most one in flight."""
        clock, connect = Clock(), FakeConnect()
        check = DependencyCheck(clock, check_config(), connect)
        check.start()
        clock.pump([5.0] * 20)
        self.assertEqual(len(connect.calls), 1)
        self.assertIsNone(check.check())
        check.stop()
        self.assertIsNone(check.in_flight)
        self.assertFalse(check.state.checked)  # a stopped check's result counts for nothing

    def test_failures_take_it_down_with_hysteresis(self) -> None:
        """Up; one refused check keeps it up, the second in a row takes it down; two good
        checks bring it back."""
        clock, connect = Clock(), FakeConnect()
        check = DependencyCheck(clock, check_config(), connect)
        check.start()
        connect.answer(True)
        for ok, up in ((False, True), (False, False), (True, False), (True, True)):
            clock.advance(5)
            connect.answer(ok)
            self.assertEqual(check.state.up, up)
        self.assertEqual(check.checks, 5)
        check.stop()

    def test_a_connect_that_raises_is_a_failed_check(self) -> None:
        """A connect function that raises is a failure, never a stopped loop."""
        clock = Clock()

        def broken(host: str, port: int, timeout: float) -> Deferred[Any]:
            raise ValueError("no such interface")
        check = DependencyCheck(clock, check_config(), broken)
        check.start()
        self.assertEqual((check.state.up, check.state.reason), (False, "no such interface"))
        clock.advance(5)
        self.assertEqual(check.checks, 2)
        check.stop()

    def test_tcp_connect_connects_and_closes(self) -> None:
        """The real check connects with the reactor given (its timeout passed on) and closes
        the connection as soon as it is made."""
        reactor = MemoryReactorClock()
        check = DependencyCheck(reactor, check_config(), tcp_connect(reactor))
        check.start()
        host, port, factory, timeout, _ = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.0.0.5", 7890, 3.0))
        transport = StringTransport()
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        self.assertTrue(check.state.up)
        self.assertTrue(transport.disconnecting)
        check.stop()

    def test_tcp_connect_refused_and_timed_out(self) -> None:
        """A refused connect and one with no answer in CONNECT_TIMEOUT fail with a short reason."""
        reactor = MemoryReactorClock()
        check = DependencyCheck(reactor, check_config(down_after=1), tcp_connect(reactor))
        check.start()
        connector = reactor.connectors[0]
        reactor.tcpClients[0][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.assertEqual((check.state.up, check.state.reason), (False, "connection refused"))
        reactor.advance(5)
        self.assertEqual(len(reactor.tcpClients), 2)
        reactor.advance(3)  # nobody answers: the check's own timeout
        self.assertEqual(check.state.reason, "no connection in 3s")
        self.assertIsNone(check.in_flight)
        check.stop()

    def test_a_new_address_starts_over(self) -> None:
        """A reload that moves the service: no verdict until the first check of the new address,
        which runs at once."""
        clock, connect = Clock(), FakeConnect()
        check = DependencyCheck(clock, check_config(), connect)
        check.start()
        connect.answer(False)
        check.reconfigure(check_config(host="10.0.0.9"))
        self.assertEqual((check.state.checked, check.state.where), (False, "10.0.0.9:7890"))
        self.assertEqual(connect.calls[-1][0], "10.0.0.9")
        connect.answer(True)
        self.assertTrue(check.state.up)
        check.reconfigure(check_config(host="10.0.0.9", check_interval=1.0))
        self.assertEqual(len(connect.calls), 2)  # same address: no new check, the next in 1 s
        clock.advance(1)
        self.assertEqual(len(connect.calls), 3)
        check.stop()


def broker(text: str, test: SynchronousTestCase, reactor: Any = None) -> tuple[BrokerService, FakeConnect]:
    """A BrokerService on a memory reactor whose dependency checks use a FakeConnect."""
    path = test.mktemp()
    with open(path, "w") as handle:
        handle.write(text)
    reactor = reactor or MemoryReactorClock()
    service = BrokerService(reactor, parse_config(text, path))
    connect = FakeConnect()
    service.dependencies.connect = connect
    for check in service.dependencies.checks.values():
        check.connect = connect
    return service, connect


class RegistryTests(SynchronousTestCase):
    def test_units_naming_one_section_share_its_check(self) -> None:
        """The desktop and the web-services unit both DEPENDS_ON DBACCESS: one check, one state."""
        service, connect = broker(ini("DBACCESS", "DBACCESS, LOCKSERVER"), self)
        registry = service.dependencies
        self.assertEqual(sorted(registry.checks), ["DBACCESS", "LOCKSERVER"])
        desktop, web = service.units
        self.assertIs(desktop.dependencies.dependencies[0], web.dependencies.dependencies[0])
        self.assertEqual(web.dependencies.names, ["DBACCESS", "LOCKSERVER"])
        registry.startService()
        self.assertEqual(sorted(c[0] for c in connect.calls), ["10.0.0.5", "10.0.0.6"])
        registry.stopService()

    def test_reload_adds_and_removes_checks(self) -> None:
        """SIGHUP: a section newly named gets a check (started when the broker runs), one no unit
        names any more loses it, and each unit's DEPENDS_ON is the new one."""
        service, connect = broker(ini("DBACCESS"), self)
        registry = service.dependencies
        registry.startService()
        self.assertEqual(list(registry.checks), ["DBACCESS"])
        with open(service.config.path, "w") as handle:
            handle.write(ini("LOCKSERVER"))
        logs = LogCatcher(self)
        self.assertTrue(service.reload())
        self.assertEqual(list(registry.checks), ["LOCKSERVER"])
        self.assertTrue(registry.checks["LOCKSERVER"].running)
        self.assertEqual(service.desktop.dependencies.names, ["LOCKSERVER"])
        self.assertIn("reload: [BALANCE_SMART_CLIENT_DESKTOP] DEPENDS_ON LOCKSERVER (was DBACCESS)", logs.texts())
        with open(service.config.path, "w") as handle:
            handle.write(ini(""))
        self.assertTrue(service.reload())
        self.assertEqual((registry.checks, service.desktop.dependencies.names), ({}, []))
        registry.stopService()

    def test_a_bad_reload_keeps_the_running_dependencies(self) -> None:
        """A reload naming an unknown section is refused: the running checks stay."""
        service, _ = broker(ini("DBACCESS"), self)
        with open(service.config.path, "w") as handle:
            handle.write(ini("DBACESS"))
        self.assertFalse(service.reload())
        self.assertEqual(list(service.dependencies.checks), ["DBACCESS"])
        self.assertEqual(service.desktop.dependencies.names, ["DBACCESS"])

    def test_provided_dependency_replaces_the_tcp_check(self) -> None:
        """provide_dependency puts the license channel in LICENSECLIENT's place: its check stops
        and the units gate on the channel."""
        extra = "[LicenseClient]\nserver = 10.0.0.7\nport = 5555\n"
        service, connect = broker(ini("LICENSECLIENT", extra=extra), self)
        service.dependencies.startService()
        channel = Channel()
        channel.connected = False
        service.provide_dependency("LICENSECLIENT", ChannelDependency("LICENSECLIENT", channel))
        self.assertFalse(service.dependencies.checks["LICENSECLIENT"].running)
        self.failureResultOf(service.desktop.dependencies.admit(), DependencyDown)
        service.dependencies.stopService()


class ConfigTests(SynchronousTestCase):
    def test_depends_on_and_sections_read(self) -> None:
        """DEPENDS_ON names sections as TOTVS writes them ([DBAccess], [LockServer]); their
        SERVER/PORT are read, TOTVS's other keys ignored without a remark, our keys defaulted."""
        config = parse_config(ini("DBAccess, [LockServer]"))
        self.assertEqual(config.depends_on, {"BALANCE_SMART_CLIENT_DESKTOP": ("DBACCESS", "LOCKSERVER")})
        db = config.dependencies["DBACCESS"]
        self.assertEqual((db.host, db.port, db.check_interval, db.connect_timeout, db.down_after, db.up_after),
                         ("10.0.0.5", 7890, 5.0, 3.0, 2, 2))
        self.assertEqual(config.dependencies["LOCKSERVER"].where, "10.0.0.6:1234")
        self.assertEqual(config.warnings, ())

    def test_our_keys_and_unknown_keys(self) -> None:
        """CHECK_INTERVAL, CONNECT_TIMEOUT, DOWN_AFTER_FAILURES, UP_AFTER_SUCCESSES are read; a
        misspelt key is one warning naming its line."""
        text = ini("DBACCESS").replace("Port = 7890\n", "Port = 7890\nCHECK_INTERVAL = 1.5\nCONNECT_TIMEOUT = 0.5\n"
                                       "DOWN_AFTER_FAILURES = 3\nUP_AFTER_SUCCESSES = 1\nCHECK_INTERVALL = 2\n")
        config = parse_config(text, "a.ini")
        db = config.dependencies["DBACCESS"]
        self.assertEqual((db.check_interval, db.connect_timeout, db.down_after, db.up_after, db.retry_after),
                         (1.5, 0.5, 3, 1, 2))
        self.assertIn("a.ini:18: [DBACCESS] CHECK_INTERVALL: unknown key; ignored", config.warnings)
        self.assertEqual(len(config.warnings), 2)  # and [LockServer], named by no unit

    def test_unknown_section_is_one_error_line(self) -> None:
        """A DEPENDS_ON name with no section is one ConfigError naming file, line and key."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(ini("DBACCESS, DBACESS"), "appserver.ini")
        self.assertEqual(str(caught.exception), "appserver.ini:8: DEPENDS_ON: no section [DBACESS] in this "
                         "file (a dependency is a section with SERVER and PORT, e.g. DBACCESS, LOCKSERVER)")

    def test_section_errors(self) -> None:
        """No SERVER, Server=NOCONFIG, a bad port, a bad CHECK_INTERVAL or one of the broker's
        own sections: each one line naming the place."""
        cases = {
            ini("DBACCESS").replace("Server = 10.0.0.5\n", ""): "a.ini:9: [DBACCESS]: SERVER is missing",
            ini("LOCKSERVER").replace("10.0.0.6", "NOCONFIG"): "a.ini:16: SERVER: NOCONFIG means",
            ini("DBACCESS").replace("Port = 7890", "Port = 70000"): "a.ini:13: PORT: port 70000 is out of range",
            ini("DBACCESS").replace("Port = 7890", "Port = 7890\nCHECK_INTERVAL = 0"):
                "a.ini:14: CHECK_INTERVAL: 0 is out of range",
            ini("BALANCE_SMART_CLIENT_DESKTOP"): "a.ini:8: DEPENDS_ON: [BALANCE_SMART_CLIENT_DESKTOP] is one of",
            ini("DBACCESS").replace("Server = 10.0.0.5", "Server = bad host!"): "a.ini:12: SERVER: 'bad host!'",
        }
        for text, start in cases.items():
            with self.assertRaises(ConfigError) as caught:
                parse_config(text, "a.ini")
            self.assertTrue(str(caught.exception).startswith(start), str(caught.exception))

    @given(st.lists(st.tuples(st.sampled_from(["DBAccess", "LOCKSERVER", "lockserver", "[DBACCESS]", "LicenseClient"]),
                              st.sampled_from([",", ", ", " ", " , "])), min_size=1, max_size=8))
    def test_depends_on_list_property(self, items: list[tuple[str, str]]) -> None:
        """Any case, brackets, and commas or spaces between: the names in first-seen
        order, once each, upper case."""
        value = "".join(name + separator for name, separator in items)
        config = parse_config(ini(value, extra="[LicenseClient]\nserver = 10.0.0.7\nport = 5555\n"))
        expected: list[str] = []
        for name, _ in items:
            upper = name.strip("[]").upper()
            if upper not in expected:
                expected.append(upper)
        self.assertEqual(config.depends_on["BALANCE_SMART_CLIENT_DESKTOP"], tuple(expected))
        self.assertEqual(sorted(config.dependencies), sorted(expected))

    def test_license_client_port_defaults_to_5555(self) -> None:
        """DEPENDS_ON = LICENSECLIENT with a [LICENSECLIENT] without PORT: 5555, as the license
        client's own default; other sections still need PORT."""
        config = parse_config(ini("LICENSECLIENT", extra="[LICENSECLIENT]\nSERVER = 10.0.0.7\n"))
        self.assertEqual(config.dependencies["LICENSECLIENT"].port, DEFAULT_LICENSE_PORT)
        self.assertEqual(config.dependencies["LICENSECLIENT"].where, "10.0.0.7:5555")
        with self.assertRaises(ConfigError) as caught:
            parse_config(ini("DBACCESS").replace("Port = 7890\n", ""), "a.ini")
        self.assertIn("PORT is missing", str(caught.exception))

    def test_ipv6_server(self) -> None:
        """SERVER may be an IPv6 address, with or without brackets; messages bracket it."""
        config = parse_config(ini("DBACCESS").replace("Server = 10.0.0.5", "Server = [::1]"))
        self.assertEqual((config.dependencies["DBACCESS"].host, config.dependencies["DBACCESS"].where),
                         ("::1", "[::1]:7890"))

    def test_unnamed_sections_are_still_unknown(self) -> None:
        """A [DBAccess] no unit names is an unknown section, as before."""
        config = parse_config(ini(""), "a.ini")
        self.assertEqual(config.dependencies, {})
        self.assertIn("a.ini:8: unknown section [DBACCESS]; ignored", config.warnings)


def desktop_session(unit: Any, peer_port: int = 50000) -> Any:
    client = unit.factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", peer_port))
    client.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", peer_port)))
    client.dataReceived(b"hello")
    return client


class DesktopGateTests(SynchronousTestCase):
    def test_gate_refuses_while_down_and_passes_after_up(self) -> None:
        """DBACCESS down: a new SmartClient is closed, the reason in its log line, no AppServer
        is dialled; an open session carries on; after DBACCESS is up a new session connects."""
        logs = LogCatcher(self)
        reactor = MemoryReactorClock()
        service, connect = broker(ini("DBACCESS"), self, reactor)
        service.dependencies.startService()
        unit = service.desktop
        connect.answer(True)
        open_client = desktop_session(unit, 50001)
        self.assertEqual(len(reactor.tcpClients), 1)
        server = reactor.tcpClients[-1][2].buildProtocol(None)
        server.makeConnection(StringTransport())
        server.dataReceived(b"")  # the AppServer answered: the session is established
        for _ in range(2):
            reactor.advance(5)
            connect.answer(False)
        refused = desktop_session(unit, 50002)
        self.assertTrue(refused.transport.disconnecting)
        self.assertEqual(len(reactor.tcpClients), 1)
        self.assertTrue(any("dependency DBACCESS (10.0.0.5:7890) down, closing the client (since "
                            "1970-01-01 00:00:10Z: connection refused)" in text for text in logs.texts()))
        open_client.dataReceived(b"more")  # the open session carries on
        self.assertEqual(server.transport.value(), b"hellomore")
        self.assertFalse(open_client.transport.disconnecting)
        for _ in range(2):
            reactor.advance(5)
            connect.answer(True)
        desktop_session(unit, 50003)
        self.assertEqual(len(reactor.tcpClients), 2)
        self.assertEqual(unit.dependencies.refused, {"DBACCESS": 1})
        service.dependencies.stopService()

    def test_gate_is_an_igate_first_in_line(self) -> None:
        """The unit's dependency gate is an IGate and asked before "a server can take it"."""
        service, _ = broker(ini("DBACCESS"), self)
        gate = service.desktop.factory.gates[0]
        verifyObject(IGate, gate)
        self.assertIsInstance(gate, DependencyGate)
        self.assertEqual(repr(gate), "the first check of DBACCESS")
        down = state()
        down.failed("refused")
        gate.dependencies.use([down])
        failure = self.failureResultOf(gate.acquire(None), GateRefused)
        self.assertEqual(failure.value.what, "dependency DBACCESS (10.0.0.5:7890) down")


REQUEST = b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n"


class HttpGateTests(SynchronousTestCase):
    def request(self, unit: Any) -> StringTransport:
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 50000))
        protocol = unit.factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 50000))
        protocol.makeConnection(transport)
        protocol.dataReceived(REQUEST)
        return transport

    def test_503_naming_the_dependency_while_down(self) -> None:
        """Web services, DBACCESS down: 503, Retry-After = CHECK_INTERVAL x UP_AFTER_SUCCESSES,
        and a JSON body naming the dependency; after it is up the request goes to an AppServer."""
        reactor = MemoryReactorClock()
        service, connect = broker(ini("", "DBACCESS"), self, reactor)
        service.dependencies.startService()
        unit = service.unit("BALANCE_WEB_SERVICES")
        connect.answer(False)
        answer = self.request(unit).value()
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"retry-after: 10", head.lower())
        self.assertEqual(json.loads(body), {"status": 503, "error": "dependency DBACCESS (10.0.0.5:7890) down "
                                                                   "since 1970-01-01 00:00:00Z: connection refused"})
        self.assertEqual(unit.slots.in_flight("A"), 0)
        for _ in range(2):
            reactor.advance(5)
            connect.answer(True)
        self.assertEqual(self.request(unit).value(), b"")  # no answer of ours: on its way upstream
        self.assertEqual(unit.slots.in_flight("A"), 1)
        service.dependencies.stopService()

    def test_dispatcher_wrapper_delegates(self) -> None:
        """The wrapper is an IDispatcher; with no dependency, or all up, choose is the inner one's."""
        inner = Inner()
        unit = UnitDependencies()
        wrapper = DependencyDispatcher(inner, unit)
        verifyObject(IDispatcher, wrapper)
        request = RequestInfo(b"GET", b"/", [], "10.0.0.9:1")
        self.assertEqual(self.successResultOf(wrapper.choose(request)), "choice")
        up = state()
        up.passed()
        unit.use([up])
        self.assertEqual(self.successResultOf(wrapper.choose(request)), "choice")
        self.assertEqual(wrapper.strip_request_headers, frozenset({b"x"}))
        self.assertEqual(wrapper.forward_cookie, True)
        wrapper.abandoned("c")  # type: ignore[arg-type]
        self.assertEqual(inner.calls, ["abandoned"])
        up.failed("refused")
        up.failed("refused")
        failure = self.failureResultOf(wrapper.choose(request), NoBackend)
        self.assertEqual(failure.value.retry_after, 5)


class Inner:
    strip_request_headers = frozenset({b"x"})
    forward_cookie = True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def choose(self, request: Any) -> Deferred[Any]:
        return succeed("choice")

    def abandoned(self, choice: Any) -> None:
        self.calls.append("abandoned")


class ScreenTests(SynchronousTestCase):
    def test_status_json_metrics_and_page(self) -> None:
        """Each pool lists its dependencies (state, since, reason, refusals); the status has each
        once with its pools; /metrics has a gauge per dependency and unit; the page draws them."""
        reactor = MemoryReactorClock()
        service, connect = broker(ini("DBACCESS", "DBACCESS"), self, reactor)
        service.dependencies.startService()
        reactor.advance(12)
        connect.answer(False)
        self.failureResultOf(service.desktop.dependencies.admit(), DependencyDown)
        status = model.status(service)
        pool = status["pools"][0]["dependencies"][0]
        self.assertEqual(pool, {"name": "DBACCESS", "where": "10.0.0.5:7890", "state": "down", "since": 12.0,
                                "for_seconds": 0.0, "reason": "connection refused", "refused": 1})
        self.assertEqual(status["dependencies"][0]["pools"], ["BALANCE_SMART_CLIENT_DESKTOP", "BALANCE_WEB_SERVICES"])
        text = metrics.render(service).decode()
        self.assertIn('protheus_broker_dependency_up{address="10.0.0.5:7890",dependency="DBACCESS",'
                      'pool="BALANCE_WEB_SERVICES"} 0.0', text)
        self.assertIn('protheus_broker_dependency_refusals_total{address="10.0.0.5:7890",dependency="DBACCESS",'
                      'pool="BALANCE_SMART_CLIENT_DESKTOP"} 1.0', text)
        for _ in range(2):
            reactor.advance(5)
            connect.answer(True)
        self.assertIn('dependency="DBACCESS",pool="BALANCE_WEB_SERVICES"} 1.0', metrics.render(service).decode())
        self.assertIn(b"renderDeps", page.PAGE_HTML)
        service.dependencies.stopService()

