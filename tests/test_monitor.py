"""Monitoring in memory: heartbeat timings (task.Clock), probes, the AMP agent channel over iosim,
SERVER_* from live reports, the 100-login burst, authentication, bad values, mutual TLS."""

from __future__ import annotations

import math
import os
import struct
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.monitoring import commands as cmd
from protheus_broker.agent.agent import Agent, AgentProtocol, AppServerWatch
from protheus_broker.balancing.methods import make_balancer
from protheus_broker.tls.certs import make_ca, make_cert, write_pair
from protheus_broker.agent.settings import AgentConfig, WatchedAppServer
from protheus_broker.balancing.methods import SortMethod
from protheus_broker.monitoring.settings import MonitoringConfig, MonitoringType
from protheus_broker.tls.settings import TLSFiles
from protheus_broker.agent.probe import ProbeProblem, ProcessFigures
from protheus_broker.monitoring.monitor import (
    ActiveMonitor,
    AgentLink,
    BadReport,
    ProbeMonitor,
    validate_report,
)
from protheus_broker.balancing.pool import ServerPool, ServerState
from protheus_broker.tls.options import client_options, server_options

from .helpers import LogCatcher, servers

SECRET = b"correct horse battery staple"
GIB = 1024 * 1024 * 1024
MIB = 1024 * 1024
PORTS = (5001, 5002, 5003)


class FakeAppServer:
    """What the agent measures, set by the test."""

    def __init__(self, memory: int = 100 * MIB, users: int = 0, threads: int = 10, cpu: float = 1.0) -> None:
        self.memory, self.users, self.threads, self.cpu = memory, users, threads, cpu
        self.up = True
        self.status = "sleeping"

    def measure(self) -> ProcessFigures:
        if not self.up:
            raise ProbeProblem("process 42 is gone")
        return ProcessFigures(42, self.memory, self.users, self.threads, self.cpu, status=self.status)

    async def connect_check(self) -> str:
        return "" if self.up else "Connection was refused"


class Harness:
    """A broker pool + monitor and an agent watching fake AppServers, on one task.Clock."""

    def __init__(self, test: SynchronousTestCase, method: SortMethod = SortMethod.SERVER_MEMORY,
                 monitoring_type: MonitoringType = MonitoringType.SMARTCLIENT_ACTIVE,
                 broker_secret: bytes | None = SECRET, agent_secret: bytes | None = SECRET,
                 physical: int = 16 * GIB, **settings: Any) -> None:
        self.clock = task.Clock()
        self.logs = LogCatcher(test)
        self.pool = ServerPool(servers(*PORTS), make_balancer(method, 3.0), clock=self.clock)
        self.settings = MonitoringConfig(
            agents={f"{n:02d}": ("127.0.0.1", 7077) for n in range(1, len(PORTS) + 1)},
            secret=broker_secret, **settings)
        kind = ActiveMonitor if monitoring_type.is_active else ProbeMonitor
        self.monitor = kind(self.clock, self.pool, monitoring_type, self.settings)
        self.apps = {port: FakeAppServer() for port in PORTS}
        watched = tuple(WatchedAppServer(f"A{port}", port) for port in PORTS)
        config = AgentConfig(path="<test>", port=7077, appservers=watched, secret=agent_secret)
        self.agent = Agent(self.clock, config, host=(physical, 8), watches={
            w.port: AppServerWatch(self.clock, w, measure=self.apps[w.port].measure,
                                   connect_check=self.apps[w.port].connect_check,
                                   accept_queue=lambda: None) for w in watched})
        self.pumps: list[iosim.IOPump] = []
        self.sampler = task.LoopingCall(self.agent.sample_all)
        self.sampler.clock = self.clock
        self.sampler.start(1.0, now=True)
        test.addCleanup(lambda: self.sampler.stop() if self.sampler.running else None)
        if isinstance(self.monitor, ActiveMonitor):
            watchdog = self.monitor.watchdog
            watchdog.start(self.monitor.interval / 2, now=False)
            test.addCleanup(lambda: watchdog.stop() if watchdog.running else None)

    def connect(self, server_id: str, agent_protocol: Protocol | None = None) -> tuple[AgentLink, Any]:
        """An authenticated-or-not channel from the monitor to the agent, in memory."""
        watched = self.monitor.watched[server_id]
        link = AgentLink(self.monitor, watched, self.monitor.interval)
        watched.link = link
        server = agent_protocol or AgentProtocol(self.agent)
        self.pumps.append(iosim.connect(server, iosim.makeFakeServer(server), link,
                                        iosim.makeFakeClient(link)))
        self.settle()
        return link, server

    def settle(self) -> None:
        for _ in range(3):
            self.clock.advance(0)
            for pump in self.pumps:
                pump.flush()

    def advance(self, seconds: float, step: float = 0.05) -> None:
        target = self.clock.seconds() + seconds + 1e-6  # float steps must not fall short
        while self.clock.seconds() < target:
            self.clock.advance(min(step, target - self.clock.seconds()))
            self.settle()

    def state(self, server_id: str) -> ServerState:
        return self.pool.get(server_id).state

    def changes(self, server_id: str) -> list[tuple[str, str]]:
        return [(e["old"], e["new"]) for e in self.logs.find(server_id=server_id) if "new" in e]


def closed(pump: iosim.IOPump) -> bool:
    """The broker's end of an in-memory channel was closed."""
    return bool(pump.clientIO.disconnecting or pump.clientIO.disconnected)


def report(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"memory_bytes": 100 * MIB, "users": 3, "threads": 20, "cpu_percent": 5.0,
                              "accepting": True, "problem": "", "age": 0.2,
                              "physical_memory": 16 * GIB, "cpu_count": 4}
    values.update(overrides)
    return values


class ActiveTimingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)
        self.links = {sid: self.h.connect(sid) for sid in ("01", "02", "03")}

    def test_reports_every_second(self) -> None:
        """SMARTCLIENT_ACTIVE: after the handshake a report arrives every second, per server."""
        self.h.advance(10)
        for server_id, (link, _) in self.links.items():
            self.assertTrue(link.authenticated)
            self.assertIn(self.h.monitor.watched[server_id].reports, (10, 11, 12))
            self.assertIs(self.h.state(server_id), ServerState.UP)
        snap = self.h.pool.get("01").snapshot(self.h.clock.seconds())
        self.assertEqual(snap["metrics"]["memory_bytes"], 100 * MIB)  # type: ignore[index]
        self.assertLessEqual(snap["metrics"]["age_seconds"], 1.0)  # type: ignore[index]
        self.assertEqual(snap["monitor"]["link"], "authenticated")  # type: ignore[index]

    def test_missed_heartbeats_suspend_then_down_then_back_up(self) -> None:
        """No report: Suspended within 2 s of the last one, Down after 3 missed, Up when reports
        resume; one log event per change, with the reason."""
        self.h.advance(3)
        pusher = self.links["01"][1].pusher
        pusher.stop()  # the agent hangs: no more heartbeats
        last = self.h.pool.get("01").monitor_status["last_report_at"]
        suspended_at = down_at = None
        while down_at is None:
            self.h.advance(0.05)
            now = self.h.clock.seconds()
            if suspended_at is None and self.h.state("01") is ServerState.SUSPENDED:
                suspended_at = now
            if self.h.state("01") is ServerState.DOWN:
                down_at = now
            self.assertLess(now, 20)
        assert suspended_at is not None
        self.assertGreater(suspended_at - last, 1.0)
        self.assertLessEqual(suspended_at - last, 2.0)
        self.assertLessEqual(down_at - last, 4.0)
        self.assertEqual([b.server_id for b in self.h.pool.candidates(self.h.clock.seconds())],
                         ["02", "03"])
        pusher.start(1.0, now=True)
        self.h.settle()
        self.assertIs(self.h.state("01"), ServerState.UP)
        self.assertEqual(self.h.changes("01"), [("up", "suspended"), ("suspended", "down"), ("down", "up")])
        reasons = [e["reason"] for e in self.h.logs.find(server_id="01") if "new" in e]
        self.assertIn("missed heartbeat", reasons[0])
        self.assertIn("reports resumed", reasons[2])
        self.assertIs(self.h.state("02"), ServerState.UP)

    def test_appserver_stops_accepting_goes_down_at_once(self) -> None:
        """The agent sees its AppServer refuse a local connect: Down within a second, then Up."""
        self.h.advance(2)
        self.h.apps[5002].up = False
        self.h.advance(1.0)
        self.assertIs(self.h.state("02"), ServerState.DOWN)
        self.assertIn("not accepting", self.h.pool.get("02").reason)
        self.h.apps[5002].up = True
        self.h.advance(1.0)
        self.assertIs(self.h.state("02"), ServerState.UP)

    def test_lost_link_leaves_rotation_within_two_seconds(self) -> None:
        """The agent channel drops: no heartbeat, so the server is Suspended within 2 s."""
        self.h.advance(2)
        link, _ = self.links["03"]
        link.transport.loseConnection()
        self.h.advance(2.0)
        self.assertIs(self.h.state("03"), ServerState.SUSPENDED)
        self.assertTrue(any("channel to" in t and "lost" in t for t in self.h.logs.texts()))

    def test_failed_connect_suspect_until_a_later_report(self) -> None:
        """A connect failure at session time suspends at once; a report sampled afterwards
        brings it back, an older one does not."""
        self.h.advance(2.5)
        backend = self.h.pool.get("01")
        self.h.pool.connect_failed(backend, "Connection was refused")
        self.assertIs(backend.state, ServerState.SUSPENDED)
        self.h.advance(1.0)  # the next report was sampled after the failure
        self.assertIs(backend.state, ServerState.UP)


class ProbeTimingTests(SynchronousTestCase):
    def fake_endpoints(self, monitor: ProbeMonitor, refused: set[int]) -> list[int]:
        attempts: list[int] = []

        class Endpoint:
            def __init__(self, port: int) -> None:
                self.port = port

            def connect(self, factory: Factory) -> defer.Deferred[Protocol]:
                attempts.append(self.port)
                if self.port in refused:
                    return defer.fail(ConnectionRefusedError())
                protocol = factory.buildProtocol(None)
                protocol.makeConnection(StringTransport())
                return defer.succeed(protocol)

        monitor.tcp_endpoint = lambda host, port: Endpoint(port)  # type: ignore[method-assign]
        return attempts

    def test_connection_probe_every_60_seconds(self) -> None:
        """CONNECTION: a connect per server every 60 s; failures: Suspended, then Down after
        3, then Up on the first success."""
        h = Harness(self, SortMethod.CONNECTION, MonitoringType.CONNECTION)
        self.assertEqual(h.monitor.interval, 60.0)
        refused = {5002}
        attempts = self.fake_endpoints(h.monitor, refused)  # type: ignore[arg-type]
        h.monitor.startService()
        self.addCleanup(h.monitor.stopService)
        self.assertEqual(sorted(attempts), [5001, 5002, 5003])
        self.assertIs(h.state("02"), ServerState.SUSPENDED)
        h.clock.advance(59.9)
        self.assertEqual(len(attempts), 3)
        h.clock.advance(0.1)
        self.assertEqual(len(attempts), 6)
        self.assertIs(h.state("02"), ServerState.SUSPENDED)
        h.clock.advance(60)
        self.assertIs(h.state("02"), ServerState.DOWN)
        refused.clear()
        h.clock.advance(60)
        self.assertIs(h.state("02"), ServerState.UP)
        self.assertEqual(h.changes("02"), [("up", "suspended"), ("suspended", "down"), ("down", "up")])
        self.assertIs(h.state("01"), ServerState.UP)

    def test_custom_interval(self) -> None:
        """MONITORING_INTERVAL sets the probe period."""
        h = Harness(self, SortMethod.CONNECTION, MonitoringType.CONNECTION, probe_interval=5.0)
        attempts = self.fake_endpoints(h.monitor, set())  # type: ignore[arg-type]
        h.monitor.startService()
        self.addCleanup(h.monitor.stopService)
        for _ in range(10):
            h.clock.advance(1)
        self.assertEqual(len(attempts), 9)

    def exploratory(self, h: Harness) -> None:
        def endpoint(host: str, port: int) -> Any:
            class Endpoint:
                def connect(self, factory: Factory) -> defer.Deferred[Protocol]:
                    link = factory.buildProtocol(None)
                    server = AgentProtocol(h.agent)
                    h.pumps.append(iosim.connect(server, iosim.makeFakeServer(server), link,
                                                 iosim.makeFakeClient(link), greet=False))
                    return defer.succeed(link)
            return Endpoint()

        h.monitor.tcp_endpoint = endpoint  # type: ignore[method-assign]

    def test_smartclient_exploratory_login_every_60_seconds(self) -> None:
        """SMARTCLIENT: every 60 s connect to the agent, authenticate, take one sample, hang up."""
        h = Harness(self, SortMethod.CONNECTION, MonitoringType.SMARTCLIENT)
        self.exploratory(h)
        h.monitor.startService()
        self.addCleanup(h.monitor.stopService)
        h.settle()
        self.assertEqual([w.reports for w in h.monitor.watched.values()], [1, 1, 1])
        self.assertTrue(all(closed(p) for p in h.pumps))
        h.apps[5003].up = False
        h.clock.advance(1)  # the agent samples
        h.advance(59.5)
        self.assertEqual([w.reports for w in h.monitor.watched.values()], [2, 2, 2])
        self.assertIs(h.state("03"), ServerState.DOWN)
        self.assertIs(h.state("01"), ServerState.UP)

    def test_smartclient_wrong_secret_is_a_failed_probe(self) -> None:
        """SMARTCLIENT with a wrong secret: the probe fails (Suspended) and says why."""
        h = Harness(self, SortMethod.CONNECTION, MonitoringType.SMARTCLIENT,
                    broker_secret=b"a different secret of 30 bytes")
        self.exploratory(h)
        h.monitor.startService()
        self.addCleanup(h.monitor.stopService)
        h.settle()
        self.assertIs(h.state("01"), ServerState.SUSPENDED)
        self.assertIn("proof is wrong", h.pool.get("01").reason)


class MetricBalancingTests(SynchronousTestCase):
    def test_each_server_method_picks_least_loaded_from_reports(self) -> None:
        """Reports over the agent channel drive SERVER_MEMORY/USERS/THREADS/CPU."""
        figures = {5001: (300, 1, 90, 50.0), 5002: (100, 9, 80, 70.0), 5003: (200, 5, 10, 20.0)}
        expected = {SortMethod.SERVER_MEMORY: "02", SortMethod.SERVER_USERS: "01",
                    SortMethod.SERVER_THREADS: "03", SortMethod.SERVER_CPU: "03"}
        for method, best in expected.items():
            h = Harness(self, method)
            for port, (memory, users, threads, cpu) in figures.items():
                app = h.apps[port]
                app.memory, app.users, app.threads, app.cpu = memory * MIB, users, threads, cpu
            h.agent.sample_all()
            for server_id in ("01", "02", "03"):
                h.connect(server_id)
            ranked = h.pool.candidates(h.clock.seconds())
            self.assertEqual(ranked[0].server_id, best, method)

    def burst(self, method: SortMethod, figures: dict[str, float], logins: int = 100) -> Counter[str]:
        h = Harness(self, method)
        now = h.clock.seconds()
        for server_id, figure in figures.items():
            values = report(memory_bytes=int(figure) if method is SortMethod.SERVER_MEMORY else 100 * MIB,
                            users=int(figure) if method is SortMethod.SERVER_USERS else 0,
                            cpu_percent=figure if method is SortMethod.SERVER_CPU else 0.0, age=0.0)
            self.assertTrue(h.monitor.report(h.monitor.watched[server_id], values, "test"))
        placed: Counter[str] = Counter()
        for _ in range(logins):  # all within one report interval: no new report
            backend = h.pool.candidates(now)[0]
            h.pool.session_opening(backend)
            placed[backend.server_id] += 1
        return placed

    def test_burst_of_100_logins_spreads_by_memory(self) -> None:
        """100 logins inside one interval fill the lowest-memory server up to the next, then
        share: 1000/1100/1300 MiB at 20 MiB a session -> about 40/35/25, not 100/0/0."""
        placed = self.burst(SortMethod.SERVER_MEMORY, {"01": 1000 * MIB, "02": 1100 * MIB, "03": 1300 * MIB})
        self.assertEqual(sum(placed.values()), 100)
        for server_id, want in {"01": 40, "02": 35, "03": 25}.items():
            self.assertLessEqual(abs(placed[server_id] - want), 1, placed)

    def test_burst_of_100_logins_spreads_by_users(self) -> None:
        """SERVER_USERS: 10/20/30 users + 100 logins level at about 53 users each."""
        placed = self.burst(SortMethod.SERVER_USERS, {"01": 10, "02": 20, "03": 30})
        totals = {"01": 10 + placed["01"], "02": 20 + placed["02"], "03": 30 + placed["03"]}
        self.assertLessEqual(max(totals.values()) - min(totals.values()), 1, totals)

    def test_burst_of_100_logins_spreads_by_cpu(self) -> None:
        """SERVER_CPU: the estimate rises 2 % a session, so the burst spreads over all three."""
        placed = self.burst(SortMethod.SERVER_CPU, {"01": 10.0, "02": 30.0, "03": 50.0})
        self.assertEqual(set(placed), {"01", "02", "03"})
        self.assertGreater(placed["01"], placed["02"])
        self.assertGreater(placed["02"], placed["03"])

    def test_new_report_resets_the_estimate(self) -> None:
        """A report already shows the sessions placed before it: the count starts again."""
        h = Harness(self)
        backend = h.pool.get("01")
        for _ in range(5):
            h.pool.session_opening(backend)
        self.assertEqual(backend.placed_since_report, 5)
        h.monitor.report(h.monitor.watched["01"], report(), "test")
        self.assertEqual(backend.placed_since_report, 0)


class AuthenticationTests(SynchronousTestCase):
    def test_wrong_agent_secret_is_dropped_and_logged(self) -> None:
        """An agent with another secret fails the broker's check: dropped, logged, no report."""
        h = Harness(self, agent_secret=b"another secret, also long enough")
        link, _ = h.connect("01")
        h.advance(3)
        self.assertFalse(link.authenticated)
        self.assertTrue(closed(h.pumps[0]))
        self.assertEqual(h.monitor.watched["01"].reports, 0)
        self.assertIsNone(h.pool.get("01").metrics)
        [error] = [t for t in h.logs.texts() if "handshake failed" in t]
        self.assertIn("proof is wrong", error)
        self.assertIn("127.0.0.1:7077", error)
        self.assertIsNot(h.state("01"), ServerState.UP)

    def test_broker_with_wrong_proof_is_refused_by_the_agent(self) -> None:
        """A peer that answers the agent's challenge wrongly gets AUTHENTICATION_FAILED and is
        dropped; the agent logs its address."""
        h = Harness(self)
        client = amp.AMP()
        server = AgentProtocol(h.agent)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client))
        answers: list[Any] = []
        client.callRemote(cmd.Hello, version=1, appserver_port=5001,
                          broker_nonce=b"n" * 32).addBoth(answers.append)
        pump.flush()
        self.assertTrue(answers[0]["agent_proof"])
        client.callRemote(cmd.Authenticate, broker_proof=b"x" * 32, interval=1.0).addBoth(answers.append)
        pump.flush()
        answers[1].trap(cmd.AuthenticationFailed)
        h.clock.advance(0)
        pump.flush()
        self.assertTrue(pump.serverIO.disconnecting or pump.serverIO.disconnected)
        self.assertFalse(server.authenticated)
        self.assertTrue(any("refused: wrong proof" in t for t in h.logs.texts()))

    def test_sample_before_authentication_refused(self) -> None:
        """Asking the agent for a sample without a handshake is refused."""
        h = Harness(self)
        client = amp.AMP()
        server = AgentProtocol(h.agent)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client))
        answers: list[Any] = []
        client.callRemote(cmd.Sample).addBoth(answers.append)
        pump.flush()
        answers[0].trap(cmd.NotAuthenticated)

    def test_unknown_appserver_port(self) -> None:
        """The broker asks for an AppServer the agent does not watch: a clear error."""
        h = Harness(self)
        h.pool.get("01").port = 6000
        link, _ = h.connect("01")
        self.assertFalse(link.authenticated)
        self.assertTrue(any("no AppServer on port 6000" in t for t in h.logs.texts()))

    def test_report_from_unauthenticated_peer_dropped(self) -> None:
        """A peer that pushes reports without authenticating is dropped; nothing is recorded."""
        h = Harness(self)

        class Rogue(amp.AMP):
            def connectionMade(self) -> None:
                super().connectionMade()
                self.callRemote(cmd.Report, figures=report())

        link, _ = h.connect("01", Rogue())
        self.assertTrue(closed(h.pumps[0]))
        self.assertEqual(h.monitor.watched["01"].reports, 0)
        self.assertTrue(any("unauthenticated peer" in t for t in h.logs.texts()))

    def test_handshake_never_reveals_the_secret(self) -> None:
        """The bytes on the wire during a handshake do not contain the secret."""
        wire: list[bytes] = []
        original = iosim.FakeTransport.write

        def recording_write(transport: Any, data: bytes) -> None:
            wire.append(data)
            original(transport, data)

        self.patch(iosim.FakeTransport, "write", recording_write)
        h = Harness(self)
        h.connect("01")
        h.advance(1)
        everything = b"".join(wire)
        self.assertIn(b"Authenticate", everything)  # the handshake was recorded
        self.assertNotIn(SECRET, everything)
        self.assertTrue(h.monitor.watched["01"].reports >= 1)


class BadValueTests(SynchronousTestCase):
    def test_absurd_values_are_refused_with_a_reason(self) -> None:
        """Negative, NaN, infinite or larger-than-the-host values are refused, naming the value."""
        cases = {
            "memory_bytes": (dict(memory_bytes=-1), "memory_bytes -1"),
            "above physical": (dict(memory_bytes=17 * GIB), "above the host's physical memory"),
            "users": (dict(users=-3), "users -3"),
            "threads": (dict(threads=10**9), "threads"),
            "cpu nan": (dict(cpu_percent=math.nan), "cpu_percent nan"),
            "cpu inf": (dict(cpu_percent=math.inf), "cpu_percent inf"),
            "cpu over cores": (dict(cpu_percent=401.0), "0 to 400"),
            "physical": (dict(physical_memory=0), "physical_memory 0"),
            "cpu count": (dict(cpu_count=0), "cpu_count 0"),
            "age": (dict(age=-5.0), "age -5.0"),
        }
        for name, (override, text) in cases.items():
            with self.assertRaises(BadReport, msg=name) as caught:
                validate_report(report(**override), 100.0)
            self.assertIn(text, str(caught.exception), name)
        metrics, accepting, _ = validate_report(report(age=0.5), 100.0)
        self.assertEqual((metrics.taken_at, accepting), (99.5, True))

    def test_bad_report_over_the_channel_is_logged_not_used(self) -> None:
        """An agent reporting more memory than its host has: refused, logged, metrics unchanged,
        and (no valid heartbeat) the server leaves rotation."""
        h = Harness(self, physical=1 * GIB)
        h.apps[5001].memory = 2 * GIB
        h.agent.sample_all()
        h.connect("01")
        h.advance(2.5)
        self.assertIsNone(h.pool.get("01").metrics)
        self.assertGreater(h.monitor.watched["01"].bad_reports, 0)
        self.assertTrue(any("refused: memory_bytes" in t for t in h.logs.texts()))
        self.assertIsNot(h.state("01"), ServerState.UP)


class TLSChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ca = make_ca()
        write_pair(self.dir, "ca", ca)
        write_pair(self.dir, "broker", make_cert(ca, "broker", client=True))
        write_pair(self.dir, "agent-good", make_cert(ca, "good", ["127.0.0.1", "localhost"]))
        write_pair(self.dir, "agent-other", make_cert(ca, "other", ["127.0.0.2", "other.example"]))
        rogue_ca = make_ca("rogue CA")
        write_pair(self.dir, "rogue-ca", rogue_ca)
        write_pair(self.dir, "rogue", make_cert(rogue_ca, "rogue", client=True))

    def files(self, stem: str, ca: str = "ca") -> TLSFiles:
        path = os.path.join(self.dir, stem)
        return TLSFiles(f"{path}.pem", f"{path}.key", os.path.join(self.dir, f"{ca}.pem"))

    def channel(self, agent_stem: str, broker_stem: str = "broker", expect_host: str = "127.0.0.1",
                broker_ca: str = "ca") -> Harness:
        h = Harness(self, SortMethod.SERVER_MEMORY, MonitoringType.SMARTCLIENT_SSL_ACTIVE,
                    broker_secret=None, agent_secret=None, tls=self.files(broker_stem, broker_ca))
        watched = h.monitor.watched["01"]
        link = AgentLink(h.monitor, watched, 1.0)
        watched.link = link

        class One(Factory):
            def buildProtocol(self, addr: Any) -> AgentLink:
                return link

        class AgentSide(Factory):
            def buildProtocol(self, addr: Any) -> AgentProtocol:
                return AgentProtocol(h.agent)

        def tls(options: Any, is_client: bool, factory: Factory) -> Any:
            try:  # Twisted >= 22.8 aggregates small TLS writes on a clock: ours
                wrapper = TLSMemoryBIOFactory(options, is_client, factory, clock=h.clock)  # type: ignore[call-arg]
            except TypeError:  # Debian's 22.4
                wrapper = TLSMemoryBIOFactory(options, is_client, factory)
            return wrapper.buildProtocol(None)

        client = tls(client_options(self.files(broker_stem, broker_ca), expect_host), True, One())
        server = tls(server_options(self.files(f"agent-{agent_stem}")), False, AgentSide())
        h.pumps.append(iosim.connect(server, iosim.makeFakeServer(server), client,
                                     iosim.makeFakeClient(client)))
        h.advance(2)
        self.link = link
        return h

    def test_mutual_tls_reports_flow(self) -> None:
        """SMARTCLIENT_SSL_ACTIVE: CA-signed certificates both ways and the agent's IP in its
        certificate: the channel authenticates and reports arrive (no shared secret needed)."""
        h = self.channel("good")
        self.assertTrue(self.link.authenticated)
        self.assertGreaterEqual(h.monitor.watched["01"].reports, 2)

    def test_agent_identity_mismatch_refused(self) -> None:
        """The agent's certificate is for another address: the broker refuses the channel."""
        h = self.channel("other", expect_host="127.0.0.1")
        self.assertFalse(self.link.authenticated)
        self.assertEqual(h.monitor.watched["01"].reports, 0)
        self.assertTrue(any("handshake failed" in t and "127.0.0.1:7077" in t and "Mismatch" in t
                            for t in h.logs.texts()),
                        h.logs.texts())

    def test_agent_certificate_not_a_client_certificate(self) -> None:
        """A client presenting an agent (server-only) certificate is refused by the agent."""
        h = self.channel("good", broker_stem="agent-other")
        self.assertFalse(self.link.authenticated)
        self.assertEqual(h.monitor.watched["01"].reports, 0)

    def test_broker_certificate_from_another_ca_refused(self) -> None:
        """A client certificate not signed by the agent's CA is refused."""
        h = self.channel("good", broker_stem="rogue")
        self.assertFalse(self.link.authenticated)
        self.assertEqual(h.monitor.watched["01"].reports, 0)


class ReloadTests(SynchronousTestCase):
    def test_joined_and_left_servers_follow_a_reload(self) -> None:
        """After a reload the monitor watches the servers that joined and forgets those that left;
        a server whose address changed is watched anew."""
        h = Harness(self)
        from protheus_broker.balancing.servers import RemoteServer

        h.pool.reconfigure([RemoteServer("01", "127.0.0.1", 5001), RemoteServer("03", "127.0.0.1", 6003),
                            RemoteServer("04", "127.0.0.1", 5004)])
        old_03 = h.monitor.watched["03"]
        h.monitor.reconfigure(h.settings)
        self.assertEqual(sorted(h.monitor.watched), ["01", "03", "04"])
        self.assertIsNot(h.monitor.watched["03"], old_03)
        self.assertEqual(h.monitor.watched["03"].backend.port, 6003)
        self.assertEqual(len(list(h.monitor)), 3)  # one ClientService per watched server


class MalformedReportTests(SynchronousTestCase):
    def test_malformed_report_drops_the_channel(self) -> None:
        """A report whose figures do not parse is logged and the channel dropped."""
        h = Harness(self)
        link, _ = h.connect("01")
        self.assertTrue(link.authenticated)
        before = h.monitor.watched["01"].reports
        link.ampBoxReceived(amp.AmpBox({b"_command": b"Report", b"figures": b"1 2 three"}))
        h.settle()
        self.assertTrue(closed(h.pumps[0]))
        self.assertEqual(h.monitor.watched["01"].reports, before)
        self.assertTrue(any("malformed report" in t for t in h.logs.texts()))


def pair(key: bytes, value: bytes) -> bytes:
    """One key/value of an AMP box on the wire."""
    return struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value


def held(protocol: amp.AMP) -> int:
    """Bytes of the box being received that *protocol* holds in memory (besides at most the
    rest of the read that brought the bad string, in ``recvd``)."""
    box = getattr(protocol, "_currentBox", None) or {}
    return sum(len(k) + len(v) for k, v in box.items())


def hello_box(tag: bytes = b"1", port: bytes = b"5001") -> bytes:
    return amp.AmpBox({b"_command": b"Hello", b"_ask": tag, b"version": b"1",
                       b"appserver_port": port, b"broker_nonce": b"n" * 32}).serialize()


def assert_no_traceback(test: SynchronousTestCase, logs: LogCatcher) -> None:
    """Nothing was logged as critical, with a failure, or as an unhandled error."""
    bad = [e for e in logs.events if e.get("log_level") is LogLevel.critical
           or "log_failure" in e or "failure" in e]
    test.assertEqual([formatEvent(e) for e in bad], [])
    test.assertEqual(test.flushLoggedErrors(), [])


class BoxLimitTests(SynchronousTestCase):
    def agent_side(self) -> tuple[Harness, AgentProtocol, StringTransport]:
        h = Harness(self)
        protocol = AgentProtocol(h.agent)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return h, protocol, transport

    def test_endless_box_to_the_agent_is_dropped_at_the_limit(self) -> None:
        """12 MB of one never-ending box (60 KB values, no closing key) before authenticating:
        the agent drops the connection at 4 KiB with one log line and holds no more than that."""
        h, protocol, transport = self.agent_side()
        most = 0
        for n in range(200):
            protocol.dataReceived(pair(b"k%d" % n, b"x" * 60000))
            most = max(most, held(protocol))
        self.assertLessEqual(most, 4096)
        self.assertLessEqual(len(protocol.recvd), 65536)  # the one read, never parsed
        self.assertTrue(transport.disconnected)  # aborted
        [line] = [t for t in h.logs.texts() if "dropping the connection" in t]
        self.assertIn("broker 192.168.1.1:54321", line)
        self.assertIn("before authenticating (limit 4096 bytes, 8 keys)", line)
        assert_no_traceback(self, h.logs)

    def test_stranger_reconnecting_in_a_loop_is_logged_once_a_minute(self) -> None:
        """100 connections from one address, each dropped for an endless box: one log line,
        then after a minute one more saying how many were held back."""
        h = Harness(self)
        for n in range(101):
            if n == 100:
                h.clock.advance(61)
            protocol = AgentProtocol(h.agent)
            transport = StringTransport()
            protocol.makeConnection(transport)
            protocol.dataReceived(pair(b"k", b"x" * 60000))
            self.assertTrue(transport.disconnected)
            protocol.connectionLost(Failure(ConnectionDone()))
        lines = [t for t in h.logs.texts() if "dropping the connection" in t]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("(99 more refused from 192.168.1.1 in the last 61s)", lines[1])

    def test_too_many_keys_before_authentication(self) -> None:
        """Many tiny keys in one box: dropped at the 9th key, before any is dispatched."""
        h, protocol, transport = self.agent_side()
        protocol.dataReceived(b"".join(pair(b"k%d" % n, b"v") for n in range(1000)))
        self.assertTrue(transport.disconnected)
        self.assertLessEqual(len(protocol._currentBox or {}), 8)  # type: ignore[attr-defined]
        [line] = [t for t in h.logs.texts() if "dropping the connection" in t]
        self.assertIn("more than 8 keys before authenticating", line)

    def test_more_boxes_than_a_handshake_before_authentication(self) -> None:
        """Hello after Hello without authenticating: four are answered, the fifth drops the peer."""
        h, protocol, transport = self.agent_side()
        for n in range(1, 7):
            protocol.dataReceived(hello_box(b"%d" % n))
        self.assertEqual(transport.value().count(b"agent_proof"), 4)
        self.assertTrue(transport.disconnected)
        self.assertTrue(any("more than 4 AMP boxes before authenticating" in t for t in h.logs.texts()))

    def test_a_real_handshake_fits_the_limits(self) -> None:
        """The broker's handshake and reports pass the limits both ways."""
        h = Harness(self)
        link, server = h.connect("01")
        h.advance(3)
        self.assertTrue(link.authenticated and server.authenticated)
        self.assertGreaterEqual(h.monitor.watched["01"].reports, 3)
        self.assertFalse(link.dropped or server.dropped)

    def test_after_authentication_the_larger_limit_applies(self) -> None:
        """Authenticated: a 20 KB report is taken; a box over 64 KiB drops the channel with one
        line naming the limit."""
        h = Harness(self)
        link, server = h.connect("01")
        before = h.monitor.watched["01"].reports
        server.callRemote(cmd.Report, figures=report(problem="p" * 20000))
        h.settle()
        self.assertEqual(h.monitor.watched["01"].reports, before + 1)
        self.assertEqual(len(h.pool.get("01").monitor_status["problem"]), 20000)
        server.transport.write(pair(b"a", b"x" * 40000) + pair(b"b", b"x" * 40000))
        h.settle()
        self.assertTrue(closed(h.pumps[0]))
        self.assertLessEqual(held(link), 65536)
        lines = [t for t in h.logs.texts() if "AMP box" in t]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("after authenticating (limit 65536 bytes, 32 keys)", lines[0])
        self.assertIn("server 01: agent 127.0.0.1:7077", lines[0])

    def test_fake_agent_streaming_an_endless_box_to_the_broker(self) -> None:
        """Something on the agent port answers the broker's Hello with an endless box: the
        broker drops it at 4 KiB with one line, holds no more, and the handshake fails."""
        h = Harness(self)
        watched = h.monitor.watched["01"]
        link = AgentLink(h.monitor, watched, 1.0)
        transport = StringTransport()
        link.makeConnection(transport)
        self.assertIn(b"Hello", transport.value())
        outcome: list[Any] = []
        link.ready.addBoth(outcome.append)
        most = 0
        for n in range(200):
            link.dataReceived(pair(b"k%d" % n, b"x" * 60000))
            most = max(most, held(link))
        self.assertLessEqual(most, 4096)
        self.assertTrue(transport.disconnected)
        link.connectionLost(Failure(ConnectionDone()))
        outcome[0].trap(cmd.AuthenticationFailed)
        lines = [t for t in h.logs.texts() if "agent" in t and ("AMP box" in t or "handshake" in t)]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("server 01: agent 127.0.0.1:7077: AMP box with over 4096 bytes before "
                      "authenticating", lines[0])
        assert_no_traceback(self, h.logs)


class MalformedBoxTests(SynchronousTestCase):
    def channel(self) -> tuple[Harness, amp.AMP, AgentProtocol, iosim.IOPump]:
        h = Harness(self)
        client = amp.AMP()
        server = AgentProtocol(h.agent)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client))
        return h, client, server, pump

    def test_non_integer_argument(self) -> None:
        """Hello with a version that is no integer: a BAD_ARGUMENTS error, the connection
        closed, one warning line, no critical traceback."""
        h, client, server, pump = self.channel()
        answers: list[Any] = []
        client.callRemoteString(b"Hello", version=b"one", appserver_port=b"5001",
                                broker_nonce=b"n" * 32).addBoth(answers.append)
        pump.flush()
        answers[0].trap(amp.RemoteAmpError)
        self.assertEqual(answers[0].value.errorCode, cmd.BAD_ARGUMENTS)
        self.assertTrue(pump.serverIO.disconnecting or pump.serverIO.disconnected)
        lines = [t for t in h.logs.texts() if "malformed" in t]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("malformed Hello arguments (ValueError", lines[0])
        assert_no_traceback(self, h.logs)

    def test_unknown_command(self) -> None:
        """A command the agent does not know: an UNHANDLED error, one warning line, closed."""
        h, client, server, pump = self.channel()
        answers: list[Any] = []
        client.callRemoteString(b"Shutdown").addBoth(answers.append)
        pump.flush()
        answers[0].trap(amp.UnhandledCommand, amp.RemoteAmpError)
        self.assertTrue(pump.serverIO.disconnecting or pump.serverIO.disconnected)
        self.assertEqual(len([t for t in h.logs.texts() if "unknown AMP command b'Shutdown'" in t]), 1)
        assert_no_traceback(self, h.logs)

    def test_unknown_command_without_answer(self) -> None:
        """An unknown command that asks no answer: one warning line and closed, no traceback."""
        h, client, server, pump = self.channel()
        client.callRemoteString(b"Shutdown", requiresAnswer=False)
        pump.flush()
        self.assertTrue(pump.serverIO.disconnecting or pump.serverIO.disconnected)
        self.assertEqual(len([t for t in h.logs.texts() if "unknown AMP command" in t]), 1)
        assert_no_traceback(self, h.logs)

    def test_box_that_is_no_command_nor_answer(self) -> None:
        """An empty box, or an answer to no question: one warning line and closed."""
        for wire in (b"\x00\x00", amp.AmpBox({b"_answer": b"99"}).serialize(),
                     amp.AmpBox({b"_error": b"7"}).serialize()):
            h, client, server, pump = self.channel()
            client.transport.write(wire)
            pump.flush()
            self.assertTrue(pump.serverIO.disconnecting or pump.serverIO.disconnected, wire)
            self.assertEqual(len([t for t in h.logs.texts() if "malformed AMP box" in t]), 1, wire)
            assert_no_traceback(self, h.logs)

    def test_malformed_report_through_the_responder(self) -> None:
        """A Report the fast path does not take (an extra key) whose figures do not parse:
        one warning line, the channel closed, no traceback on the broker."""
        h = Harness(self)
        link, server = h.connect("01")
        before = h.monitor.watched["01"].reports
        server.callRemoteString(b"Report", requiresAnswer=False, figures=b"1 2 three", extra=b"x")
        h.settle()
        self.assertTrue(closed(h.pumps[0]))
        self.assertEqual(h.monitor.watched["01"].reports, before)
        self.assertEqual(len([t for t in h.logs.texts() if "malformed Report arguments" in t]), 1)
        assert_no_traceback(self, h.logs)


class MalformedAnswerTests(SynchronousTestCase):
    def test_hello_answer_without_a_proof(self) -> None:
        """Something on the agent port answers Hello without a proof, then more boxes: one line
        saying the answer is malformed, the handshake fails, no traceback."""
        h = Harness(self)
        link = AgentLink(h.monitor, h.monitor.watched["01"], 1.0)
        transport = StringTransport()
        link.makeConnection(transport)
        outcome: list[Any] = []
        link.ready.addBoth(outcome.append)
        for _ in range(2):
            link.dataReceived(amp.AmpBox({b"_answer": b"1", b"agent_nonce": b"x"}).serialize())
        outcome[0].trap(cmd.AuthenticationFailed)
        self.assertTrue(transport.disconnecting)
        lines = [t for t in h.logs.texts() if "server 01" in t]
        self.assertEqual(lines, ["server 01: agent 127.0.0.1:7077: handshake failed: malformed answer "
                                 "(no b'agent_proof')"])
        assert_no_traceback(self, h.logs)


    def test_agent_port_that_never_answers(self) -> None:
        """Something on the agent port accepts and never answers: after 10 s the broker gives
        up with one line, so its channel retries instead of hanging forever."""
        h = Harness(self)
        link = AgentLink(h.monitor, h.monitor.watched["01"], 1.0)
        transport = StringTransport()
        link.makeConnection(transport)
        outcome: list[Any] = []
        link.ready.addBoth(outcome.append)
        h.clock.advance(9.9)
        self.assertEqual(outcome, [])
        h.clock.advance(0.1)
        outcome[0].trap(cmd.AuthenticationFailed)
        self.assertTrue(transport.disconnected)
        lines = [t for t in h.logs.texts() if "server 01: agent" in t]
        self.assertEqual(lines, ["server 01: agent 127.0.0.1:7077: handshake failed: no answer within 10s"])


class WrongSecretRetryTests(SynchronousTestCase):
    def test_wrong_secret_retries_without_unhandled_errors(self) -> None:
        """An agent with another secret: the broker retries with a growing backoff, logs one
        line (again at most once a minute, with the count), and no Unhandled Error or automat
        NoTransition; once the secrets match the channel authenticates."""
        h = Harness(self, agent_secret=b"another secret, also long enough")
        attempts: list[float] = []

        class Endpoint:
            def connect(self, factory: Factory) -> defer.Deferred[Protocol]:
                attempts.append(h.clock.seconds())
                link = factory.buildProtocol(None)
                server = AgentProtocol(h.agent)
                h.pumps.append(iosim.connect(server, iosim.makeFakeServer(server), link,
                                             iosim.makeFakeClient(link), greet=False))
                return defer.succeed(link)

        h.monitor.tcp_endpoint = lambda host, port: Endpoint()  # type: ignore[method-assign]
        h.monitor.watchdog.stop()  # (the harness runs it; the service starts its own)
        h.monitor.startService()
        self.addCleanup(h.monitor.stopService)
        h.advance(150, step=0.25)
        mine = [a for a in attempts]
        self.assertGreaterEqual(len(mine), 3 * 8)  # three servers
        gaps = [b - a for a, b in zip(attempts[::3], attempts[3::3])]
        self.assertGreater(max(gaps), 5.0)  # backed off (no retry storm)
        lines = [t for t in h.logs.texts() if "server 01" in t and "handshake failed" in t]
        self.assertIn(len(lines), (2, 3), lines)
        self.assertIn("proof is wrong", lines[0])
        self.assertRegex(lines[1], r"\(failed \d+ times since \d+s ago\)")
        assert_no_traceback(self, h.logs)
        self.assertFalse(any("NoTransition" in t or "Unhandled" in t for t in h.logs.texts()))
        h.agent.secret = SECRET
        h.advance(15, step=0.25)
        self.assertTrue(h.monitor.watched["01"].link and h.monitor.watched["01"].link.authenticated)
        self.assertIs(h.state("01"), ServerState.UP)


class FakeAgentEndpoints:
    """In-memory endpoints for the monitor's ClientServices: each connect is recorded (server,
    clock time) and either refused or joined to an AgentProtocol of the harness's agent by an
    iosim pump."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.attempts: list[tuple[str, float]] = []
        self.refusing: set[str] = set()
        self.agents: dict[str, AgentProtocol] = {}  # the agent's end of each server's latest channel
        h.monitor.agent_endpoint = self.endpoint  # type: ignore[method-assign]

    def endpoint(self, watched: Any) -> Any:
        fake = self

        class Endpoint:
            def connect(self, factory: Factory) -> defer.Deferred[Protocol]:
                server_id = watched.server_id
                fake.attempts.append((server_id, fake.h.clock.seconds()))
                if server_id in fake.refusing:
                    return defer.fail(ConnectionRefusedError("Connection was refused"))
                link = factory.buildProtocol(None)
                agent = AgentProtocol(fake.h.agent)
                fake.agents[server_id] = agent
                fake.h.pumps.append(iosim.connect(agent, iosim.makeFakeServer(agent), link,
                                                  iosim.makeFakeClient(link), greet=False))
                return defer.succeed(link)

        return Endpoint()

    def times(self, server_id: str) -> list[float]:
        return [at for sid, at in self.attempts if sid == server_id]


class MonitorClientServiceTests(SynchronousTestCase):
    """The ActiveMonitor's real path: one ClientService per server, on a task.Clock, over fake
    endpoints (the other tests build AgentLinks by hand)."""

    def setUp(self) -> None:
        self.h = Harness(self)
        self.fake = FakeAgentEndpoints(self.h)
        self.h.monitor.watchdog.stop()  # (the harness runs it; the service starts its own)
        self.h.monitor.startService()
        self.addCleanup(lambda: self.h.monitor.stopService() if self.h.monitor.running else None)
        self.h.settle()

    def link(self, server_id: str) -> AgentLink:
        link = self.h.monitor.watched[server_id].link
        assert link is not None
        return link

    def test_each_service_connects_once_handshakes_and_takes_reports(self) -> None:
        """startService: one connect per server, the handshake authenticates, reports arrive
        every second and no further connect is made while the channel holds."""
        self.assertEqual(sorted(sid for sid, _ in self.fake.attempts), ["01", "02", "03"])
        for server_id in ("01", "02", "03"):
            self.assertTrue(self.link(server_id).authenticated)
            self.assertEqual(self.h.pool.get(server_id).monitor_status["link"], "authenticated")
        lines = [t for t in self.h.logs.texts() if "agent channel to" in t and "authenticated" in t]
        self.assertEqual(len(lines), 3, lines)
        self.h.advance(5)
        for server_id in ("01", "02", "03"):
            self.assertIn(self.h.monitor.watched[server_id].reports, (5, 6, 7))
            self.assertIs(self.h.state(server_id), ServerState.UP)
        self.assertEqual(len(self.fake.attempts), 3)
        assert_no_traceback(self, self.h.logs)

    def test_lost_channel_retries_with_growing_backoff_then_recovers(self) -> None:
        """The channel drops and the agent refuses: retries come at 0.25 s x 1.5^n (plus up to
        1 s jitter), capped at 10 s; the server leaves rotation; once the agent accepts, the
        channel authenticates, reports bring it Up, and the backoff starts again from the
        first delay."""
        self.h.advance(2)
        self.fake.refusing.add("01")
        self.fake.agents["01"].transport.loseConnection()
        self.h.settle()
        lost_at = self.h.clock.seconds()
        self.assertIsNone(self.h.monitor.watched["01"].link)
        self.h.advance(60, step=0.05)
        times = [lost_at] + [t for t in self.fake.times("01") if t > lost_at]
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertGreaterEqual(len(gaps), 10)
        for attempt, gap in enumerate(gaps, start=1):
            delay = min(0.25 * 1.5 ** attempt, 10.0)
            self.assertGreaterEqual(gap, delay - 1e-6, (attempt, gaps))
            self.assertLessEqual(gap, delay + 1.0 + 0.05 + 1e-6, (attempt, gaps))
        self.assertGreater(max(gaps), 10.0 - 1e-6)  # it reached the cap
        self.assertIs(self.h.state("01"), ServerState.DOWN)  # no heartbeat: out of rotation
        self.assertEqual([b.server_id for b in self.h.pool.candidates(self.h.clock.seconds())],
                         ["02", "03"])
        self.fake.refusing.discard("01")
        self.h.advance(11.1)
        self.assertTrue(self.link("01").authenticated)
        self.h.advance(1.1)
        self.assertIs(self.h.state("01"), ServerState.UP)
        # connected again: a new loss retries after the first delay, not after the cap
        self.fake.agents["01"].transport.loseConnection()
        self.h.settle()
        lost_at = self.h.clock.seconds()
        self.h.advance(1.5)
        retry = [t for t in self.fake.times("01") if t > lost_at]
        self.assertEqual(len(retry), 1)
        self.assertLessEqual(retry[0] - lost_at, 0.375 + 1.0 + 0.05 + 1e-6)
        self.assertTrue(self.link("01").authenticated)
        self.assertEqual(len(self.fake.times("02")), 1)  # the others never reconnected
        assert_no_traceback(self, self.h.logs)

    def test_removed_server_stops_its_service(self) -> None:
        """A server that leaves on reload: its ClientService stops, its channel is closed, and
        no connect is made to its agent again; the others carry on."""
        from protheus_broker.balancing.servers import RemoteServer

        self.h.advance(2)
        service = self.h.monitor.watched["02"].service
        assert service is not None
        agent_end = self.fake.agents["02"]
        self.h.pool.reconfigure([RemoteServer("01", "127.0.0.1", 5001),
                                 RemoteServer("03", "127.0.0.1", 5003)])
        self.h.monitor.reconfigure(self.h.settings)
        self.h.settle()
        self.assertNotIn("02", self.h.monitor.watched)
        self.assertFalse(service.running)
        self.assertIsNone(service.parent)
        self.assertEqual(len(list(self.h.monitor)), 2)
        self.assertIsNone(agent_end.transport)  # the agent saw its channel close
        self.h.advance(30)
        self.assertEqual(len(self.fake.times("02")), 1)
        for server_id in ("01", "03"):
            self.assertEqual(len(self.fake.times(server_id)), 1)
            self.assertIs(self.h.state(server_id), ServerState.UP)
        assert_no_traceback(self, self.h.logs)

    def test_stop_service_closes_every_channel_and_stops_retrying(self) -> None:
        """stopService: every channel closed, its Deferred fires, and nothing reconnects."""
        links = [self.link(sid) for sid in ("01", "02", "03")]
        stopped = self.h.monitor.stopService()
        self.h.settle()
        self.successResultOf(defer.maybeDeferred(lambda: stopped))
        self.assertTrue(all(agent.transport is None for agent in self.fake.agents.values()))
        self.assertTrue(all(link.transport is None for link in links))
        self.assertEqual([w.link for w in self.h.monitor.watched.values()], [None, None, None])
        self.h.advance(30)
        self.assertEqual(len(self.fake.attempts), 3)


class StoppedAppServerTests(SynchronousTestCase):
    def test_stopped_process_reported_not_accepting(self) -> None:
        """SMARTCLIENT_ACTIVE: the agent sees its AppServer process stopped (SIGSTOP, its port
        still completing handshakes): Down within a second, with the reason; Up when resumed."""
        h = Harness(self)
        h.connect("02")
        h.advance(2)
        h.apps[5002].status = "stopped"
        h.advance(1.0)
        self.assertIs(h.state("02"), ServerState.DOWN)
        self.assertIn("process 42 is stopped", h.pool.get("02").reason)
        h.apps[5002].status = "sleeping"
        h.advance(1.0)
        self.assertIs(h.state("02"), ServerState.UP)

    def test_probe_mode_sees_a_stopped_process(self) -> None:
        """SMARTCLIENT (exploratory login through the agent): a stopped AppServer is Down."""
        h = Harness(self, SortMethod.CONNECTION, MonitoringType.SMARTCLIENT)
        ProbeTimingTests.exploratory(ProbeTimingTests(), h)  # type: ignore[arg-type]
        h.apps[5003].status = "stopped"
        h.clock.advance(1)  # the agent samples
        h.monitor.startService()
        self.addCleanup(h.monitor.stopService)
        h.settle()
        self.assertIs(h.state("03"), ServerState.DOWN)
        self.assertIn("is stopped", h.pool.get("03").reason)
        self.assertIs(h.state("01"), ServerState.UP)


class _Recorder(cmd.QuietAMP):
    """A QuietAMP that records the boxes it parses instead of dispatching them."""

    def __init__(self, authenticated: bool) -> None:
        super().__init__()
        self.authenticated = authenticated
        self.boxes: list[dict[bytes, bytes]] = []

    def ampBoxReceived(self, box: Any) -> None:
        self.boxes.append(dict(box))


_KEYS = st.binary(min_size=1, max_size=20)
_BOX = st.dictionaries(_KEYS, st.binary(max_size=200), min_size=1, max_size=cmd.AFTER_AUTHENTICATION.max_keys)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


class BoxFramingPropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(_BOX, min_size=1, max_size=6), st.lists(st.integers(min_value=0), max_size=20))
    def test_boxes_within_the_limits_arrive_intact_however_split(
            self, boxes: list[dict[bytes, bytes]], cuts: list[int]) -> None:
        """Boxes within the limits are parsed exactly as sent, whatever the read boundaries."""
        protocol = _Recorder(authenticated=True)
        transport = StringTransport()
        protocol.makeConnection(transport)
        for chunk in _split(b"".join(amp.AmpBox(b).serialize() for b in boxes), cuts):
            protocol.dataReceived(chunk)
        self.assertEqual(protocol.boxes, boxes)
        self.assertFalse(protocol.dropped or transport.disconnecting)

    @settings(max_examples=300, deadline=None)
    @given(st.booleans(),
           st.one_of(st.binary(max_size=5000),  # raw junk, and framed junk: empty keys end boxes
                     st.lists(st.tuples(st.binary(max_size=30), st.binary(max_size=3000)),
                              max_size=60).map(lambda pairs: b"".join(pair(k, v) for k, v in pairs))),
           st.lists(st.integers(min_value=0), max_size=20))
    def test_any_bytes_are_bounded_and_never_raise(self, authenticated: bool, data: bytes,
                                                   cuts: list[int]) -> None:
        """Any bytes at all: no exception, no box over the limits parsed or held, and a peer
        over them is dropped."""
        protocol = _Recorder(authenticated)
        transport = StringTransport()
        protocol.makeConnection(transport)
        limits = protocol.box_limits
        for chunk in _split(data, cuts):
            protocol.dataReceived(chunk)
            self.assertLessEqual(held(protocol), limits.max_bytes)
        for box in protocol.boxes:
            self.assertLessEqual(len(amp.AmpBox(box).serialize()), limits.max_bytes)
            self.assertLessEqual(len(box), limits.max_keys)
        if not authenticated:
            self.assertLessEqual(len(protocol.boxes), cmd.MAX_BOXES_BEFORE_AUTHENTICATION)
