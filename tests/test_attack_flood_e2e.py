"""Attack with real processes on 127.0.0.1: a resumable-session flood (issue 12, finding 1).

The sample AppServer and protheus-broker (MAX_SESSIONS=200, resumable sessions on) run as child
processes.  The attacker opens FLOOD_E2E_COUNT (default 1,000) connector links from 127.0.0.1, at
most FLOOD_E2E_PARALLEL (default 40) at once: each sends the magic and a HELLO, waits for the
broker's answer and resets the connection.  A second attack completes a login round trip on each
link before the reset, so that its sessions earn standby; STANDBY_MAX_SESSIONS bounds them.  Real users log in (plain SmartClient sessions, from
127.0.0.2 so that no per-address cap on 127.0.0.1 is what decides) during and right after the
flood.  Before the fix every flooded session sat in standby for STANDBY_TIME holding a session
slot, so MAX_SESSIONS filled and every login was refused.
"""

from __future__ import annotations

import os
import re
from typing import Any

import psutil
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.python.failure import Failure

from protheus_broker.resume import crypto
from protheus_broker.demo.children import TwistdChild, twistd_argv
from protheus_broker.resume.frames import HELLO, MAGIC, FrameParser, Kind, count_frame, encode

from .helpers import ProcessTestCase, login

FLOOD = int(os.environ.get("FLOOD_E2E_COUNT", "1000"))
PARALLEL = int(os.environ.get("FLOOD_E2E_PARALLEL", "40"))
MAX_SESSIONS = 200
USER_ADDRESS = "127.0.0.2"  # real users: another loopback address than the attacker's


class HelloThenReset(Protocol):
    """One flood connection: magic + HELLO, then a reset as soon as the broker answers (WELCOME or
    REFUSE) or closes."""

    transport: Any

    def __init__(self) -> None:
        self.parser = FrameParser()
        self.answer: Kind | None = None
        self.done: defer.Deferred[Kind | None] = defer.Deferred()

    def connectionMade(self) -> None:
        hello = HELLO.pack(crypto.KeyPair().public, 1024 * 1024)
        self.transport.write(MAGIC + encode(Kind.HELLO, hello))

    def dataReceived(self, data: bytes) -> None:
        if self.answer is not None:
            return
        frames = self.parser.feed(data)
        if frames:
            self.answer = frames[0].kind
            self.transport.abortConnection()  # TCP reset: SO_LINGER 0, then close

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(self.answer)


class LoginThenReset(Protocol):
    """One flood connection that earns standby: magic + HELLO, acknowledges the AppServer's
    greeting, sends one byte and waits for its echo (a login's round trip), then resets."""

    transport: Any

    def __init__(self) -> None:
        self.parser = FrameParser()
        self.received = 0
        self.acked = False
        self.answer: Kind | None = None
        self.done: defer.Deferred[Kind | None] = defer.Deferred()

    def connectionMade(self) -> None:
        hello = HELLO.pack(crypto.KeyPair().public, 1024 * 1024)
        self.transport.write(MAGIC + encode(Kind.HELLO, hello))

    def dataReceived(self, data: bytes) -> None:
        for frame in self.parser.feed(data):
            if self.answer is None:
                self.answer = frame.kind
            if frame.kind is Kind.REFUSE:
                self.transport.abortConnection()
                return
            if frame.kind is not Kind.DATA:
                continue
            self.received += len(frame.payload)
            if not self.acked:
                self.acked = True
                self.transport.write(count_frame(Kind.ACK, self.received) + encode(Kind.DATA, b"x"))
            elif frame.payload.endswith(b"x"):
                self.transport.abortConnection()  # the echo came: established; now a reset
                return

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(self.answer)


class ResumableFloodTests(ProcessTestCase):
    timeout = 90
    logins = 0

    async def start_broker(self, extra: str = "") -> tuple[TwistdChild, int]:
        self.sim = sim = self.start("sim", twistd_argv("protheus-appserver-sim", "--name", "a",
                                                       "--port", "tcp:0:interface=127.0.0.1"))
        sim_port = await sim.listening()
        ini = self.write_ini(
            "[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
            "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\n"
            f"MONITORING_TYPE = DISABLED\nMAX_SESSIONS = {MAX_SESSIONS}\n"
            f"REMOTE_SERVER_A = 127.0.0.1 {sim_port}\n{extra}")
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", ini))
        return broker, await broker.listening()

    async def login(self, port: int) -> bool:
        """One real login from another address, given up after 10 s (then it counts as refused)."""
        self.logins += 1
        answered, _ = await login(port, self.logins, source=USER_ADDRESS, patience=10)
        return answered

    async def flood_one(self, port: int, kind: type = HelloThenReset) -> Kind | None:
        attacker = kind()
        try:
            await ClientCreator(reactor, lambda: attacker).connectTCP("127.0.0.1", port, timeout=10)
        except Exception:
            return None
        timer = reactor.callLater(10, lambda: attacker.transport.abortConnection())
        answer = await attacker.done
        if timer.active():
            timer.cancel()
        return answer

    @defer.inlineCallbacks
    def test_hello_then_reset_flood_does_not_lock_users_out(self) -> Any:
        """1,000 HELLO-then-reset links from one address against MAX_SESSIONS=200: every real login
        during and right after the flood is served, no flooded session waits in standby, and
        the broker's memory stays flat."""
        yield defer.ensureDeferred(self._flood())

    @defer.inlineCallbacks
    def test_flood_that_earns_standby_is_capped(self) -> Any:
        """600 links that each complete a login round trip (so their sessions earn standby) and
        then reset, against MAX_SESSIONS=200 and STANDBY_MAX_SESSIONS=50: the oldest sessions in
        standby are ended, at most 50 AppServer connections stay open, and every real login
        during and right after the flood is served."""
        yield defer.ensureDeferred(self._flood(count=600, attack=LoginThenReset, cap=50))

    async def _flood(self, count: int = FLOOD, attack: type = HelloThenReset,
                     cap: int | None = None) -> None:
        extra = f"STANDBY_MAX_SESSIONS = {cap}\n" if cap is not None else ""
        broker, port = await self.start_broker(extra)
        assert broker.pid is not None
        process = psutil.Process(broker.pid)
        self.assertTrue(await self.login(port), "a login before the flood failed")
        rss_before = process.memory_info().rss
        answers: dict[str, int] = {}
        logins_during: list[bool] = []
        pending: list[defer.Deferred[Any]] = []
        started = reactor.seconds()
        peak = rss_before

        async def attacker(worker: int) -> None:
            for n in range(worker, count, PARALLEL):
                answer = await self.flood_one(port, attack)
                name = answer.name if answer is not None else "closed"
                answers[name] = answers.get(name, 0) + 1
                if n % 100 == 99:  # a real user logs in every 100 flood connections
                    pending.append(defer.ensureDeferred(self.login(port)).addCallback(
                        logins_during.append))

        await defer.gatherResults([defer.ensureDeferred(attacker(w)) for w in range(PARALLEL)])
        flood_seconds = reactor.seconds() - started
        await defer.gatherResults(pending)
        peak = max(peak, process.memory_info().rss)
        logins_after = [await self.login(port) for _ in range(10)]
        await task.deferLater(reactor, 0.5, lambda: None)
        rss_after = process.memory_info().rss
        text = broker.text()
        standby = len(re.findall(r"link dropped \(.*\); standby up to", text))
        refused_during = logins_during.count(False)
        refused_after = logins_after.count(False)
        # AppServer connections still open: the sim logs each one it closes (give it 10 s)
        made = answers.get("WELCOME", 0) + 1 + logins_during.count(True) + logins_after.count(True)
        deadline = reactor.seconds() + 10
        while True:
            closed = len(re.findall(r"session \d+ closed after echoing", self.sim.text()))
            app_open = made - closed
            if app_open <= (cap or 0) or reactor.seconds() > deadline:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        print(f"\nresumable flood: {count} {attack.__name__} links ({PARALLEL} at once) in "
              f"{flood_seconds:.1f}s, broker answers {answers}; {standby} flooded sessions put in "
              f"standby, {app_open} AppServer connections still open after it; real logins "
              f"refused: {refused_during} of {len(logins_during)} during the flood, "
              f"{refused_after} of {len(logins_after)} right after; broker RSS "
              f"{rss_before / 2**20:.1f} MiB before, {rss_after / 2**20:.1f} MiB after "
              f"(peak seen {peak / 2**20:.1f} MiB)", flush=True)
        self.assertEqual((refused_during, refused_after), (0, 0))
        self.assertEqual(len(logins_during), count // 100)
        self.assertGreater(answers.get("WELCOME", 0), 0)  # the flood did reach the broker
        if cap is None:
            self.assertEqual(standby, 0)
        else:
            self.assertEqual(standby, answers["WELCOME"])  # each earned standby ...
            self.assertLessEqual(app_open, cap)  # ... but only the newest are kept
            self.assertIn("standby full (STANDBY_MAX_SESSIONS=50)", text)
        self.assertNotIn("Traceback", text)
