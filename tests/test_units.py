"""Balance units in memory: two units in one service, a reload of one leaving the other
untouched, stopService waiting for its children, counters recorded through the stats recorder
and the screen (status, metrics, actions) with two pools."""

from __future__ import annotations

import itertools
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from protheus_broker.config import parse_config
from protheus_broker.desktop.settings import DESKTOP_SECTION
from protheus_broker.desktop.unit import DesktopUnit, endpoint_string
from protheus_broker.stats import COUNTERS, ISessionStats, SessionStats
from protheus_broker.tap import BrokerService
from protheus_broker.units import IBalanceUnit
from protheus_broker.web import ctl, metrics, model

from .helpers import LogCatcher


def desktop_ini(port: int = 0, servers: tuple[int, ...] = (5001, 5002), extra: str = "",
                interface: str = "127.0.0.1") -> str:
    lines = [f"REMOTE_SERVER_{i:02d} = 127.0.0.1 {p}" for i, p in enumerate(servers, 1)]
    return ("[BALANCE_SMART_CLIENT_DESKTOP]\n"
            f"LOCAL_SERVER_PORT = {port}\nLOCAL_SERVER_INTERFACE = {interface}\n"
            + "\n".join(lines) + "\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n" + extra)


def desktop_config(**kwargs: Any) -> Any:
    return parse_config(desktop_ini(**kwargs)).desktop


def open_session(unit: Any, reactor: MemoryReactorClock, peer_port: int = 50000) -> tuple[Any, Any]:
    """A SmartClient connection to *unit* that reaches its first-ranked AppServer: (client side,
    server side)."""
    client = unit.factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", peer_port))
    client.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", peer_port)))
    client.dataReceived(b"hello")
    server = reactor.tcpClients[-1][2].buildProtocol(None)
    server.makeConnection(StringTransport())
    server.dataReceived(b"")  # the AppServer answered: the session is established
    return client, server


class Pair:
    """Two desktop units (sections A and B) in one BrokerService on a memory reactor."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.reactor = MemoryReactorClock()
        self.path = test.mktemp()
        with open(self.path, "w") as handle:
            handle.write(desktop_ini())
        config = parse_config(desktop_ini(), self.path)
        ids = itertools.count(1)
        self.a = DesktopUnit(self.reactor, desktop_config(servers=(5001, 5002)), name="BALANCE_A",
                             path=self.path, ids=ids)
        self.b = DesktopUnit(self.reactor, desktop_config(servers=(6001, 5002)), name="BALANCE_B",
                             path=self.path, ids=ids)
        self.service = BrokerService(self.reactor, config, units=[self.a, self.b])


class StatsTests(SynchronousTestCase):
    def test_recorder_counts_and_snapshots(self) -> None:
        """record adds to a named counter; snapshot is a copy of every counter."""
        stats = SessionStats()
        verifyObject(ISessionStats, stats)
        stats.record("sessions_total")
        stats.record("bytes_in", 40)
        snap = stats.snapshot()
        self.assertEqual(set(snap), set(COUNTERS))
        self.assertEqual((snap["sessions_total"], snap["bytes_in"], stats.get("bytes_out")), (1, 40, 0))
        snap["sessions_total"] = 99
        self.assertEqual(stats.get("sessions_total"), 1)

    def test_unknown_counter_is_refused(self) -> None:
        """A misspelt counter is an error, not a new counter nobody reads."""
        self.assertRaises(KeyError, SessionStats().record, "sesions_total")

    def test_factory_records_through_the_units_recorder(self) -> None:
        """Sessions, their bytes and refusals land in the unit's recorder (and the factory's
        old attributes read them back)."""
        reactor = MemoryReactorClock()
        unit = DesktopUnit(reactor, parse_config(desktop_ini(extra="MAX_SESSIONS = 1\nRESUME_ENABLE = 0\n")).desktop)
        client, server = open_session(unit, reactor)
        self.assertIsNone(unit.factory.buildProtocol(IPv4Address("TCP", "10.0.0.8", 1)))  # full
        client.connectionLost(Failure(ConnectionDone()))
        server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(unit.factory.sessions, {})
        self.assertEqual(unit.stats.get("sessions_total"), 1)
        self.assertEqual(unit.stats.get("sessions_refused"), 1)
        self.assertEqual(unit.stats.get("bytes_in"), 5)
        self.assertEqual((unit.factory.sessions_total, unit.factory.refused_total), (1, 1))

    def test_resumable_sessions_share_the_units_recorder(self) -> None:
        """With RESUME_ENABLE the standby store records into the unit's recorder."""
        unit = DesktopUnit(MemoryReactorClock(), desktop_config(extra="RESUME_ENABLE = 1\n"))
        self.assertIs(unit.factory.standby.stats, unit.stats)
        unit.factory.standby.stats.record("resumes")
        self.assertEqual(unit.factory.standby.resumes, 1)
        self.assertEqual(model.unit_counters(unit)["resumes"], 1)


class DesktopUnitTests(SynchronousTestCase):
    def test_unit_provides_the_interface(self) -> None:
        """The desktop unit is an IBalanceUnit named by its section."""
        unit = DesktopUnit(MemoryReactorClock(), desktop_config())
        verifyObject(IBalanceUnit, unit)
        self.assertEqual(unit.name, DESKTOP_SECTION)

    def test_endpoint_string(self) -> None:
        """LOCAL_SERVER_PORT/INTERFACE become an endpoint string with backlog 1024; an IPv6
        interface is quoted."""
        self.assertEqual(endpoint_string(desktop_config(port=7890)),
                         "tcp:7890:backlog=1024:interface=127.0.0.1")
        self.assertEqual(endpoint_string(desktop_config(port=7890, interface="::1")),
                         r"tcp:7890:backlog=1024:interface=\:\:1")

    def test_listens_through_the_endpoint(self) -> None:
        """Starting the unit listens on its port, interface and backlog, and logs where."""
        reactor = MemoryReactorClock()
        unit = DesktopUnit(reactor, desktop_config(port=7890))
        logs = LogCatcher(self)
        unit.privilegedStartService()
        unit.startService()
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, backlog, interface), (7890, 1024, "127.0.0.1"))
        self.assertIs(factory, unit.factory)
        self.assertTrue([t for t in logs.texts() if "listening on" in t])

    def test_cannot_listen_is_one_line(self) -> None:
        """A port that is taken stops the daemon with one line naming the key and the address."""
        class Taken(MemoryReactorClock):
            def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))

        unit = DesktopUnit(Taken(), desktop_config(port=7890), path="/etc/x.ini")
        with self.assertRaises(SystemExit) as caught:
            unit.privilegedStartService()
        self.assertEqual(str(caught.exception),
                         "protheus-broker: /etc/x.ini: LOCAL_SERVER_PORT: cannot listen on "
                         "127.0.0.1:7890: [Errno 98] Address already in use")


class TwoUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.p = Pair(self)

    def test_both_units_listen_and_serve(self) -> None:
        """Two units in one service each listen and take sessions into their own pool."""
        p = self.p
        logs = LogCatcher(self)
        p.service.privilegedStartService()
        p.service.startService()
        self.addCleanup(p.service.stopService)
        self.assertEqual([f for _, f, _, _ in p.reactor.tcpServers], [p.a.factory, p.b.factory])
        [started] = [t for t in logs.texts() if "balance units" in t]
        self.assertIn("[BALANCE_B] 0.0.0.0:0 (protheus-broker)", started)
        open_session(p.a, p.reactor)
        open_session(p.b, p.reactor, 50001)
        self.assertEqual(p.a.pool.get("01").active, 1)
        self.assertEqual(p.b.pool.get("01").active, 1)
        self.assertEqual((p.a.stats.get("sessions_total"), p.b.stats.get("sessions_total")), (1, 1))

    def test_session_ids_are_unique_across_units(self) -> None:
        """The units share one numbering, so an id names one session in the broker."""
        open_session(self.p.a, self.p.reactor)
        open_session(self.p.b, self.p.reactor, 50001)
        self.assertEqual(sorted(self.p.a.factory.sessions) + sorted(self.p.b.factory.sessions), [1, 2])

    def test_reload_of_one_unit_leaves_the_other_untouched(self) -> None:
        """A reloaded unit gets its new servers and settings; the other keeps its members,
        sessions, counters and config."""
        p = self.p
        open_session(p.a, p.reactor)
        open_session(p.b, p.reactor, 50001)
        b_before = (list(p.b.pool), dict(p.b.factory.sessions), p.b.stats.snapshot(), p.b.config)
        new = desktop_config(servers=(5001, 5002, 5003), extra="MAX_SESSIONS = 7\n")
        self.assertTrue(p.a.reload(new))
        self.assertEqual([b.server_id for b in p.a.pool], ["01", "02", "03"])
        self.assertEqual(p.a.factory.max_sessions, 7)
        self.assertEqual(len(p.a.factory.sessions), 1)  # its session goes on
        self.assertEqual((list(p.b.pool), dict(p.b.factory.sessions), p.b.stats.snapshot(),
                          p.b.config), b_before)
        self.assertEqual(p.b.factory.max_sessions, p.b.config.max_sessions)
        self.assertNotEqual(p.b.factory.max_sessions, 7)

    def test_service_reload_hands_each_unit_its_section(self) -> None:
        """BrokerService.reload re-reads the file: the desktop unit gets its section, a unit
        whose section is gone keeps running and the log says a restart is needed."""
        reactor = MemoryReactorClock()
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(desktop_ini())
        service = BrokerService(reactor, parse_config(desktop_ini(), path))
        extra = DesktopUnit(reactor, desktop_config(servers=(7001,)), name="BALANCE_EXTRA")
        extra.setServiceParent(service)
        service.units.append(extra)
        with open(path, "w") as handle:
            handle.write(desktop_ini(servers=(5001, 5002, 5003)))
        logs = LogCatcher(self)
        self.assertTrue(service.reload())
        self.assertEqual(len(service.pool), 3)
        self.assertEqual([b.server_id for b in extra.pool], ["01"])
        [gone] = [t for t in logs.texts() if "BALANCE_EXTRA" in t]
        self.assertIn("restart", gone)


class StopTests(SynchronousTestCase):
    def test_stop_waits_for_children(self) -> None:
        """BrokerService.stopService fires only when every child's stop has."""
        class Slow(Service):
            def __init__(self) -> None:
                self.stopping: Deferred[None] = Deferred()

            def stopService(self) -> Deferred[None]:
                super().stopService()
                return self.stopping

        p = Pair(self)
        slow = Slow()
        slow.setServiceParent(p.service)
        p.service.privilegedStartService()
        p.service.startService()
        stopped = p.service.stopService()
        self.assertNoResult(stopped)
        slow.stopping.callback(None)
        self.successResultOf(stopped)

    def test_unit_stop_waits_for_its_port(self) -> None:
        """A unit's stop fires when its listening port has stopped."""
        class Port:
            def __init__(self) -> None:
                self.stopping: Deferred[None] = Deferred()

            def stopListening(self) -> Deferred[None]:
                return self.stopping

        unit = DesktopUnit(MemoryReactorClock(), desktop_config())
        unit.startService = Service.startService.__get__(unit)  # type: ignore[method-assign]
        unit.startService()
        port = unit.port = Port()
        stopped = unit.stopService()
        self.assertNoResult(stopped)
        port.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertIsNone(unit.port)


class TwoPoolScreenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.p = Pair(self)
        self.p.service.privilegedStartService()
        open_session(self.p.a, self.p.reactor)
        open_session(self.p.b, self.p.reactor, 50001)
        self.p.b.stats.record("handshake_failures", 3)

    def test_status_has_one_pool_per_unit(self) -> None:
        """status lists each unit as a pool with its own totals; the broker totals add them."""
        status = model.status(self.p.service)
        self.assertEqual([pool["section"] for pool in status["pools"]], ["BALANCE_A", "BALANCE_B"])
        a, b = status["pools"]
        self.assertEqual([s["id"] for s in a["servers"]], ["01", "02"])
        self.assertEqual(b["servers"][0]["address"], "127.0.0.1:6001")
        self.assertEqual((a["totals"]["handshake_failures"], b["totals"]["handshake_failures"]), (0, 3))
        self.assertEqual(status["totals"]["sessions_total"], 2)
        self.assertEqual(status["totals"]["handshake_failures"], 3)

    def test_metrics_are_labelled_by_pool(self) -> None:
        """Every counter and server metric carries the unit's section as its pool."""
        text = metrics.render(self.p.service).decode()
        self.assertIn('protheus_broker_sessions_total{pool="BALANCE_A"} 1.0', text)
        self.assertIn('protheus_broker_handshake_failures_total{pool="BALANCE_B"} 3.0', text)
        self.assertIn('protheus_broker_server_connections{address="127.0.0.1:6001",pool="BALANCE_B",'
                      'server="01"} 1.0', text)

    def test_servers_and_sessions_name_their_pool(self) -> None:
        """The server list and the session page say which pool each entry is in."""
        self.assertEqual([(s["pool"], s["id"]) for s in model.servers(self.p.service)],
                         [("BALANCE_A", "01"), ("BALANCE_A", "02"), ("BALANCE_B", "01"), ("BALANCE_B", "02")])
        page = model.sessions(self.p.service)
        self.assertEqual([(s["id"], s["pool"]) for s in page["sessions"]], [(1, "BALANCE_A"), (2, "BALANCE_B")])

    def test_ambiguous_server_needs_a_pool(self) -> None:
        """A server id in two pools is refused without ?pool=; with it, only that pool changes."""
        with self.assertRaises(model.ActionError) as caught:
            model.server_action(self.p.service, "01", "drain", "test")
        self.assertEqual(caught.exception.status, 409)
        self.assertIn("?pool=", caught.exception.message)
        answer = model.server_action(self.p.service, "01", "drain", "test", pool="BALANCE_B")
        self.assertEqual(answer["pool"], "BALANCE_B")
        self.assertEqual(self.p.b.pool.get("01").state.value, "draining")
        self.assertEqual(self.p.a.pool.get("01").state.value, "up")

    def test_unknown_pool_is_404(self) -> None:
        """A pool that does not exist is named in a 404."""
        with self.assertRaises(model.ActionError) as caught:
            model.server_action(self.p.service, "01", "drain", "test", pool="BALANCE_NOPE")
        self.assertEqual(caught.exception.status, 404)
        self.assertIn("BALANCE_NOPE", caught.exception.message)

    def test_close_finds_the_session_in_any_unit(self) -> None:
        """close_session finds a session of the second unit by its id."""
        self.assertEqual(model.close_session(self.p.service, 2, "test")["session"], 2)

    def test_history_samples_each_pool(self) -> None:
        """The chart keeps one ring per pool."""
        history = model.ConnectionHistory(5)
        history.sample_units(1.0, self.p.service.units)
        status = model.status(self.p.service, history)
        self.assertEqual([pool["history"]["samples"][0]["connections"] for pool in status["pools"]],
                         [{"01": 1, "02": 0}, {"01": 1, "02": 0}])


class CtlTests(SynchronousTestCase):
    def test_tables_per_pool_when_several(self) -> None:
        """protheus-broker-ctl prints the servers of each pool under its name, the sessions with
        their pool, and the status pools with their sections."""
        p = Pair(self)
        p.service.privilegedStartService()
        open_session(p.a, p.reactor)
        open_session(p.b, p.reactor, 50001)
        servers = ctl.render("servers", {"servers": model.servers(p.service)})
        self.assertIn("pool BALANCE_A:", servers)
        self.assertIn("pool BALANCE_B:", servers)
        sessions = ctl.render("sessions", model.sessions(p.service))
        self.assertIn("POOL", sessions)
        self.assertIn("BALANCE_B", sessions)
        status = ctl.render("status", model.status(p.service))
        self.assertIn("[BALANCE_A]", status)

    def test_one_pool_prints_as_before(self) -> None:
        """With one pool the tables have no pool column or heading."""
        reactor = MemoryReactorClock()
        service = BrokerService(reactor, parse_config(desktop_ini()))
        open_session(service.desktop, reactor)
        self.assertNotIn("pool", ctl.render("servers", {"servers": model.servers(service)}))
        self.assertNotIn("POOL", ctl.render("sessions", model.sessions(service)))
