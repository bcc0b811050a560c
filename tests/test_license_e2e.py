"""License on demand end to end with real processes on 127.0.0.1: ``twistd protheus-broker`` (a
``[BALANCE_WEB_SERVICES]`` unit gating ``/rest`` with ``Stateless=1``, and a desktop unit), ``twistd
protheus-license``, the sample AppServer, and in this process an AppServer that counts the requests in
flight at it, a load generator and a TCP relay that partitions broker and license server.

Shown: ``kill -9`` of the broker holding leases (adopted by a restart within the grace, back after the
grace or the TTL, none leaked), ``kill -9`` and restart of the license server under load (never more
than N requests at the AppServer, the leases kept across the restart, 503 "license server
unreachable" once they expire, serving resumes), a partition (served from leases, then 503 with the
reason, served again after healing), and ``DEPENDS_ON = LICENSECLIENT`` on the desktop unit.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
from collections import Counter
from typing import Any, Awaitable, Callable

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientCreator
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .fault_proxy import FaultProxy
from .helpers import ProcessTestCase
from .test_deps_sockets import SmartClient
from .test_license_gate_sockets import SlowBackendFactory

SECRET = "license-e2e-secret-0123456789"
CLIENT_NAME = "broker-e2e"
UNREACHABLE = "license server unreachable"
_WEB_RE = re.compile(r"\[BALANCE_WEB_SERVICES\] HTTP listening on 127\.0\.0\.1:(\d+)")
_DESKTOP_RE = re.compile(r"protheus-broker \S+ listening on 127\.0\.0\.1:(\d+)")
_STATUS_RE = re.compile(r"status on 127\.0\.0\.1:(\d+)")


def free_port() -> int:
    """A port nothing listens on now (the license server must come back on the same one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listen(factory: Any) -> Any:
    """*factory* on 127.0.0.1, port 0; the listening port."""
    return reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def until(predicate: Callable[[], Awaitable[bool]], seconds: float, what: str) -> float:
    """Poll the async *predicate* every 50 ms until it holds; the seconds it took (fails after *seconds*)."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"{what}: not so after {seconds}s")
        await sleep(0.05)
    return time.monotonic() - started


class Load:
    """*workers* clients, each sending GET *path* again as soon as its answer is in (a pause of
    50 ms after a refusal); answers are counted by the phase their request was sent in: status,
    and the refusal's reason."""

    def __init__(self, port: int, workers: int, path: str = "/rest/x") -> None:
        self.url = f"http://127.0.0.1:{port}{path}".encode()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = workers
        self.pool.retryAutomatically = False
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=5)
        self.workers = workers
        self.phase = "before"
        self.counts: dict[str, Counter[str]] = {}
        self.reasons: Counter[str] = Counter()
        self.last_ok = 0.0
        self.first_refused: dict[str, float] = {}
        self.running = False
        self._loops: list[defer.Deferred[None]] = []

    def start(self) -> None:
        self.running = True
        self._loops = [defer.ensureDeferred(self._worker()) for _ in range(self.workers)]

    async def stop(self) -> None:
        self.running = False
        await defer.DeferredList(self._loops)
        await self.pool.closeCachedConnections()

    def count(self, phase: str, outcome: str) -> None:
        self.counts.setdefault(phase, Counter())[outcome] += 1

    def total(self, phase: str, outcome: str) -> int:
        return self.counts.get(phase, Counter())[outcome]

    async def _worker(self) -> None:
        while self.running:
            phase = self.phase
            try:
                response = await self.agent.request(b"GET", self.url).addTimeout(30, reactor)
                body = await readBody(response)
            except Exception as exc:
                self.count(phase, f"error {type(exc).__name__}")
                await sleep(0.05)
                continue
            if response.code == 200:
                self.count(phase, "200")
                self.last_ok = time.monotonic()
                continue
            reason = "?"
            try:
                reason = str(json.loads(body).get("error", "?"))
            except ValueError:
                pass
            self.count(phase, f"{response.code}")
            self.reasons[f"{response.code} {reason.split(' (')[0]}"] += 1
            if response.code == 503:
                self.first_refused.setdefault(phase, time.monotonic())
            await sleep(0.05)

    def table(self) -> str:
        return "; ".join(f"{phase}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
                         for phase, counts in self.counts.items())


class LicenseEndToEndTests(ProcessTestCase):
    timeout = 150

    def setUp(self) -> None:
        super().setUp()
        folder = self.mktemp_dir()
        self.secret_file = os.path.join(folder, "license.secret")
        with open(self.secret_file, "w") as handle:
            handle.write(SECRET + "\n")
        self.journal = os.path.join(folder, "license.journal")

    # --- the processes ---------------------------------------------------------------------

    def license_ini(self, port: int, seats: int, ttl: float, grace: float) -> str:
        return self.write_ini(
            f"[LicenseServer]\nINTERFACE = 127.0.0.1\nPORT = {port}\nSTATUS_PORT = 0\n"
            f"SECRET_FILE = {self.secret_file}\nJOURNAL = {self.journal}\nLEASE_TTL = {ttl:g}\n"
            f"GRACE_TIME = {grace:g}\n[Licenses]\nTOTVS_I = {seats}\n", "license.ini")

    async def license_server(self, path: str, name: str = "license") -> tuple[TwistdChild, int]:
        """``twistd protheus-license``: the child and its status port."""
        child = self.start(name, twistd_argv("protheus-license", "--config", path))
        await child.listening()
        await until(lambda: defer.succeed(bool(_STATUS_RE.search(child.text()))), 10, "status port logged")
        match = _STATUS_RE.search(child.text())
        assert match is not None
        return child, int(match.group(1))

    def broker_ini(self, license_port: int, backend_port: int, desktop_port: int = 1, depends: bool = False,
                   low: int = 1, high: int = 4) -> str:
        return self.write_ini(
            "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
            f"REMOTE_SERVER_A = 127.0.0.1 {desktop_port}\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
            "CONNECT_TIMEOUT = 1\n" + ("DEPENDS_ON = LICENSECLIENT\n" if depends else "")
            + "[BALANCE_WEB_SERVICES]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
            f"REMOTE_SERVER_A = 127.0.0.1 {backend_port}\nMONITORING_TYPE = DISABLED\nACCESS_LOG = 0\n"
            "URIS = APP\nLICENSE_QUEUE_TIMEOUT = 2\n[APP]\nURL=/rest\nStateless=1\n"
            f"[LICENSECLIENT]\nSERVER = 127.0.0.1\nPORT = {license_port}\nSECRET_FILE = {self.secret_file}\n"
            f"CLIENT_NAME = {CLIENT_NAME}\nLOW_WATERMARK = {low}\nHIGH_WATERMARK = {high}\nCONNECT_TIMEOUT = 2\n")

    async def broker(self, path: str, name: str = "broker") -> tuple[TwistdChild, int, int]:
        """``twistd protheus-broker``: the child, its web-services port and its desktop port."""
        child = self.start(name, twistd_argv("protheus-broker", "--config", path))
        await child.listening()
        await until(lambda: defer.succeed(bool(_WEB_RE.search(child.text()) and _DESKTOP_RE.search(child.text()))),
                    10, "both units listening")
        web, desktop = _WEB_RE.search(child.text()), _DESKTOP_RE.search(child.text())
        assert web is not None and desktop is not None
        return child, int(web.group(1)), int(desktop.group(1))

    def backend(self) -> tuple[SlowBackendFactory, int]:
        """An AppServer in this process answering each request 20 ms later, counting those in flight."""
        factory = SlowBackendFactory()
        port = listen(factory)
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    async def status(self, port: int) -> dict[str, Any]:
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/status".encode())
        figures: dict[str, Any] = json.loads(await readBody(response))
        return figures

    async def get(self, port: int, path: str = "/rest/x") -> tuple[int, str]:
        """One request through the broker: its status and, for a refusal, the JSON body's error."""
        response = await Agent(reactor, connectTimeout=5).request(
            b"GET", f"http://127.0.0.1:{port}{path}".encode()).addTimeout(20, reactor)
        body = await readBody(response)
        if response.code == 200:
            return 200, ""
        return response.code, str(json.loads(body).get("error", ""))

    async def kill9(self, child: TwistdChild) -> None:
        child.signal("KILL")
        await child.ended

    # --- 1. kill -9 of the broker ------------------------------------------------------------

    def test_broker_kill_9_leases_adopted_then_returned(self) -> defer.Deferred[None]:
        """The broker is kill -9'd holding leases: a restart with the same CLIENT_NAME within the grace
        adopts them (no seat counted twice); kill -9'd again and not restarted, its seats come back after
        the grace; none leaked."""
        return defer.ensureDeferred(self._broker_killed())

    async def _broker_killed(self) -> None:
        seats, ttl, grace = 10, 8.0, 4.0
        license_port = free_port()
        _, status_port = await self.license_server(self.license_ini(license_port, seats, ttl, grace))
        backend, backend_port = self.backend()
        path = self.broker_ini(license_port, backend_port, high=6)
        broker, web_port, _ = await self.broker(path)

        await until(lambda: self._seats(status_port, 6), 15, "the broker leased 6 seats")
        self.assertEqual(await self.get(web_port), (200, ""))
        before = await self.status(status_port)
        leases = sorted(lease["lease_id"] for lease in before["leases"])
        self.assertEqual(before["classes"]["TOTVS_I"]["in_use"], 6)

        await self.kill9(broker)
        killed = time.monotonic()
        restarted, web_port, _ = await self.broker(path, "broker-restarted")
        await until(lambda: defer.succeed("the server holds" in restarted.text()), 10, "adopted")
        adopted_after = time.monotonic() - killed
        self.assertRegex(restarted.text(), r"the server holds [1-9]\d* lease\(s\) for us")
        self.assertEqual(await self.get(web_port), (200, ""))
        after = await self.status(status_port)
        self.assertEqual(after["classes"]["TOTVS_I"]["in_use"], 6, after)  # not 12: adopted, not leased again
        self.assertEqual(sorted(lease["lease_id"] for lease in after["leases"]), leases)
        self.assertEqual(after["grants"], before["grants"])
        self.assertTrue(after["clients"][CLIENT_NAME]["connected"])

        await self.kill9(restarted)
        killed = time.monotonic()
        await until(lambda: self._seats(status_port, 0), grace + 10, "the seats came back")
        back = time.monotonic() - killed
        final = await self.status(status_port)
        self.assertEqual(final["classes"]["TOTVS_I"], {"seats": seats, "in_use": 0, "free": seats})
        self.assertEqual(final["leases"], [])
        self.assertEqual(final["releases"]["client gone"], len(leases))
        self.assertGreaterEqual(back, grace - 0.5)
        print(f"\nbroker kill -9: {seats} seats, broker held 6 in {len(leases)} lease(s); restarted "
              f"with the same CLIENT_NAME, it adopted them {adopted_after:.2f}s after the kill (in use "
              f"stayed 6, grants {before['grants']} -> {after['grants']}); kill -9 again: in use 6 -> 0 "
              f"after {back:.2f}s (GRACE_TIME = {grace:g}, LEASE_TTL = {ttl:g}), releases {final['releases']}")

    async def _seats(self, status_port: int, in_use: int) -> bool:
        figures = await self.status(status_port)
        return bool(figures["classes"]["TOTVS_I"]["in_use"] == in_use)

    def test_broker_kill_9_behind_a_black_hole_seats_back_after_the_ttl(self) -> defer.Deferred[None]:
        """The broker's link goes silent (the server sees no close) and the broker is kill -9'd: its
        leases end unrenewed at the TTL, as expired; none leaked."""
        return defer.ensureDeferred(self._black_hole())

    async def _black_hole(self) -> None:
        seats, ttl, grace = 10, 6.0, 30.0
        license_port = free_port()
        _, status_port = await self.license_server(self.license_ini(license_port, seats, ttl, grace))
        relay = FaultProxy(reactor, license_port, [], random.Random(1), silent_ratio=1.0,
                           downtime=lambda rng: 3600.0)
        listening = listen(relay)
        self.addCleanup(listening.stopListening)
        _, backend_port = self.backend()
        broker, _, _ = await self.broker(self.broker_ini(listening.getHost().port, backend_port, high=5))
        await until(lambda: self._seats(status_port, 5), 15, "the broker leased 5 seats")
        relay.cut_all()  # silent: nothing moves, nobody is told
        await self.kill9(broker)
        killed = time.monotonic()
        await until(lambda: self._seats(status_port, 0), ttl + 10, "the seats came back")
        back = time.monotonic() - killed
        final = await self.status(status_port)
        self.assertEqual(final["leases"], [])
        self.assertGreaterEqual(final["releases"]["expired"], 1)
        self.assertEqual(final["releases"]["client gone"], 0)
        print(f"\nbroker kill -9 behind a black hole: 5 seats back {back:.2f}s after the kill, expired "
              f"unrenewed (LEASE_TTL = {ttl:g}, renewed every {ttl / 3:g}s; GRACE_TIME = {grace:g} not "
              f"reached); releases {final['releases']}")

    # --- 2. kill -9 and restart of the license server under load ---------------------------------

    def test_license_server_kill_9_and_restart_under_load(self) -> defer.Deferred[None]:
        """40 clients in a loop through N = 6 seats: never more than 6 at the AppServer before, during
        and after two kill -9 + restarts of the license server; a short outage is served from the
        leases the restarted server still holds; a long one ends in 503 "license server unreachable";
        after each restart the broker reconnects and serving resumes."""
        return defer.ensureDeferred(self._server_killed())

    async def _server_killed(self) -> None:
        seats, ttl, workers = 6, 12.0, 40
        license_port = free_port()
        license_path = self.license_ini(license_port, seats, ttl, 5.0)
        server, status_port = await self.license_server(license_path)
        backend, backend_port = self.backend()
        broker, web_port, _ = await self.broker(self.broker_ini(license_port, backend_port, low=1, high=seats))
        await until(lambda: self._seats(status_port, seats), 15, "the broker leased every seat")
        load = Load(web_port, workers)
        most_at_server = 0
        watching = True

        async def watch() -> None:  # the server's own count, all along
            nonlocal most_at_server
            while watching:
                try:
                    figures = await self.status(status_port)
                    most_at_server = max(most_at_server, figures["classes"]["TOTVS_I"]["in_use"])
                except Exception:
                    pass  # down
                await sleep(0.2)

        load.start()
        watcher = defer.ensureDeferred(watch())
        try:
            await until(lambda: defer.succeed(load.total("before", "200") >= 200), 30, "200 answers")
            # a short outage: kill -9, restart at once; the journal holds the leases
            load.phase = "short outage"
            await self.kill9(server)
            down = time.monotonic()
            server, status_port = await self.license_server(license_path, "license-2")
            restart_short = time.monotonic() - down
            await until(lambda: defer.succeed(broker.text().count("authenticated as") >= 2), 20, "reconnected")
            reconnect_short = time.monotonic() - down
            load.phase = "after short"
            mark = load.total("after short", "200")
            await until(lambda: defer.succeed(load.total("after short", "200") >= mark + 200), 30, "serving")
            adopted = re.findall(r"the server holds (\d+) lease\(s\) for us", broker.text())
            # a long outage: kill -9, leases expire at the broker, then 503 unreachable
            load.phase = "long outage"
            await self.kill9(server)
            down = time.monotonic()
            await until(lambda: defer.succeed(load.reasons[f"503 {UNREACHABLE}"] >= 20), ttl + 15, "503 unreachable")
            served_from_leases = load.first_refused["long outage"] - down
            await sleep(1.0)
            server, status_port = await self.license_server(license_path, "license-3")
            outage = time.monotonic() - down
            load.phase = "after long"
            restarted = time.monotonic()
            await until(lambda: defer.succeed(load.total("after long", "200") >= 200), 30, "serving again")
            resumed = time.monotonic() - restarted
        finally:
            watching = False
            await load.stop()
            await watcher
        figures = await self.status(status_port)
        if os.environ.get("LICE2E_DEBUG"):
            print("\n".join(line for line in broker.text().splitlines() if "license" in line))
        self.assertLessEqual(backend.most, seats, load.table())
        self.assertEqual(backend.in_flight, 0)
        self.assertLessEqual(most_at_server, seats)
        self.assertLessEqual(figures["classes"]["TOTVS_I"]["in_use"], seats)
        self.assertGreater(int(adopted[1]), 0)  # the restarted server still held the broker's leases
        self.assertEqual(load.total("short outage", "503") + load.total("after short", "503"), 0, load.table())
        self.assertGreater(load.total("long outage", "200"), 0)  # served from leases first
        self.assertEqual({reason for reason in load.reasons if reason.startswith("503")},
                         {f"503 {UNREACHABLE}"}, load.reasons)
        self.assertFalse([outcome for counts in load.counts.values() for outcome in counts
                          if outcome.startswith("error")], load.table())
        print(f"\nlicense server kill -9 under load: N = {seats} seats, {workers} clients in a loop, the "
              f"AppServer answering in 20 ms: at most {backend.most} in flight at the AppServer, at most "
              f"{most_at_server} in use at the server (polled), {len(backend.requests)} requests served.\n"
              f"  short outage: restarted in {restart_short:.2f}s, broker back {reconnect_short:.2f}s after the "
              f"kill, the restarted server still held {adopted[1]} lease(s) for it, adopted; no 503.\n"
              f"  long outage ({outage:.2f}s, LEASE_TTL = {ttl:g}): served from leases {served_from_leases:.2f}s, "
              f"then 503 '{UNREACHABLE}'; serving again {resumed:.2f}s after the restart.\n"
              f"  answers: {load.table()}; refusals: {dict(load.reasons)}")

    # --- 3. a partition between broker and license server -------------------------------------

    def test_partition_served_from_leases_then_503_then_healed(self) -> defer.Deferred[None]:
        """A relay between broker and license server cuts the link and refuses new connections:
        requests are served from the leases, then 503 "license server unreachable" once they expire;
        the relay heals: served again.  Never more than N at the AppServer."""
        return defer.ensureDeferred(self._partition(silent=False))

    def test_silent_partition_served_from_leases_then_503_then_healed(self) -> defer.Deferred[None]:
        """The same with a black hole (nothing moves, nobody is told): served from the leases, then
        503 "license server unreachable", served again after healing."""
        return defer.ensureDeferred(self._partition(silent=True))

    async def _partition(self, silent: bool) -> None:
        seats, ttl, workers = 4, 6.0, 12
        license_port = free_port()
        _, status_port = await self.license_server(self.license_ini(license_port, seats, ttl, 30.0))
        relay = FaultProxy(reactor, license_port, [], random.Random(1), silent_ratio=1.0 if silent else 0.0,
                           downtime=lambda rng: 3600.0)
        listening = listen(relay)
        self.addCleanup(listening.stopListening)
        backend, backend_port = self.backend()
        broker, web_port, _ = await self.broker(self.broker_ini(listening.getHost().port, backend_port,
                                                                low=1, high=seats))
        await until(lambda: self._seats(status_port, seats), 15, "the broker leased every seat")
        load = Load(web_port, workers)
        load.start()
        try:
            await until(lambda: defer.succeed(load.total("before", "200") >= 100), 30, "200 answers")
            load.phase = "partitioned"
            relay.cut_all()  # connections reset (or black holes), new ones refused
            cut = time.monotonic()
            await until(lambda: defer.succeed(load.reasons[f"503 {UNREACHABLE}"] >= 10), ttl + 15,
                        "503 unreachable")
            from_leases = load.first_refused["partitioned"] - cut
            await sleep(2.0)
            load.phase = "healed"
            relay.down_until = 0.0
            healed = time.monotonic()
            await until(lambda: defer.succeed(load.total("healed", "200") >= 100), 30, "served again")
            resumed = time.monotonic() - healed
        finally:
            await load.stop()
        if os.environ.get("LICE2E_DEBUG"):
            print("\n".join(line for line in broker.text().splitlines() if "license" in line))
        self.assertLessEqual(backend.most, seats, load.table())
        self.assertGreater(load.total("partitioned", "200"), 0)
        self.assertEqual({reason for reason in load.reasons if reason.startswith("503")},
                         {f"503 {UNREACHABLE}"}, load.reasons)
        self.assertFalse([outcome for counts in load.counts.values() for outcome in counts
                          if outcome.startswith("error")], load.table())
        self.assertIn("serving from the leases held", broker.text())
        if silent:  # no close to notice: the lease that expired unrenewed tells
            self.assertIn("lost: no answer from the license server (lease ", broker.text())
        self.assertGreater(relay.refused, 0)
        print(f"\n{'silent ' if silent else ''}partition: N = {seats} seats, {workers} clients, LEASE_TTL = "
              f"{ttl:g}: served from leases {from_leases:.2f}s after the cut, then 503 '{UNREACHABLE}' "
              f"({relay.refused} reconnects refused by the relay); healed: serving again after {resumed:.2f}s; at most {backend.most} "
              f"in flight at the AppServer.\n  answers: {load.table()}")

    # --- 4. DEPENDS_ON = LICENSECLIENT on the desktop unit ----------------------------------------

    def test_desktop_unit_depends_on_the_license_server(self) -> defer.Deferred[None]:
        """DEPENDS_ON = LICENSECLIENT: while the license server is down new desktop logins are closed
        with the reason logged; once it is back they pass."""
        return defer.ensureDeferred(self._depends())

    async def _depends(self) -> None:
        sim = self.start("sim", twistd_argv("protheus-appserver-sim", "--name", "a",
                                            "--port", "tcp:0:interface=127.0.0.1"))
        sim_port = await sim.listening()
        license_port = free_port()
        license_path = self.license_ini(license_port, 4, 6.0, 5.0)
        server, status_port = await self.license_server(license_path)
        _, backend_port = self.backend()
        broker, _, desktop_port = await self.broker(self.broker_ini(license_port, backend_port, sim_port,
                                                                    depends=True))
        await until(lambda: defer.succeed("authenticated as" in broker.text()), 15, "license channel up")

        async def login(payload: bytes) -> SmartClient:
            client = SmartClient(payload)
            await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", desktop_port, timeout=5)
            started = time.monotonic()
            while not (client.closed or client.data.endswith(payload)):
                if time.monotonic() - started > 15:
                    break
                await sleep(0.02)
            client.transport.loseConnection()
            return client

        first = await login(b"before")
        self.assertIn(b"PROTHEUS-SIM a", first.data)
        await self.kill9(server)
        down = time.monotonic()
        await until(lambda: defer.succeed("dependency LICENSECLIENT (license channel) is down" in broker.text()),
                    10, "dependency down")
        seen_down = time.monotonic() - down
        refused = await login(b"during")
        self.assertTrue(refused.closed)
        self.assertNotIn(b"PROTHEUS-SIM", refused.data)
        await until(lambda: defer.succeed("dependency LICENSECLIENT (license channel) down" in broker.text()), 5,
                    "the refusal logged")
        line = next(line for line in broker.text().splitlines() if "dependency LICENSECLIENT (license channel) down"
                    in line)
        server, _ = await self.license_server(license_path, "license-2")
        back = time.monotonic()
        await until(lambda: defer.succeed(broker.text().count("dependency LICENSECLIENT (license channel) is up") == 2),
                    20, "dependency up again")
        seen_up = time.monotonic() - back
        again = await login(b"after")
        self.assertIn(b"PROTHEUS-SIM a", again.data, broker.text())
        print(f"\nDEPENDS_ON = LICENSECLIENT: license server kill -9 seen down after {seen_down:.2f}s; a new "
              f"desktop login closed, logged as: {line[line.find('session '):]}\n  license server restarted: up again "
              f"after {seen_up:.2f}s; a new login passes")
