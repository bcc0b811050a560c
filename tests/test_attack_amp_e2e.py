"""Attacks on the AMP channels and a hung AppServer, against real processes on 127.0.0.1
(issue 12, findings 2 and 4).  Each test prints its figures (peak RSS, seconds) for the notes.

- One never-ending AMP box streamed to an agent's port: the agent drops it, its RSS stays small,
  and a real broker still authenticates afterwards.
- A fake agent on the broker's agent port streaming an endless box: the broker's RSS stays small.
- A sample AppServer stopped with SIGSTOP (its port still completes TCP handshakes): its agent
  reports it not accepting and the broker takes it out of rotation.
- A process that listens and never accepts (hung without being stopped): the same, from the
  connections its agent sees left in the accept queue.
- A broker with the wrong AGENT_SECRET: retries with backoff, one line, no Unhandled Error.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import sys
import time
from typing import Any

import psutil
from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import ProcessTestCase, login

SECRET = "a-secret-of-enough-length-for-e2e"
MIB = 1024 * 1024
#: How long, and how much, each attack streams at most.
STREAM_SECONDS = 3.0
STREAM_BYTES = 512 * MIB
#: What a dropped attacker may still cost a daemon: far below the GBs before the fix.
RSS_GROWTH_LIMIT = 48 * MIB


def figure(text: str) -> None:
    """A measured figure, on the test's output for the notes."""
    sys.stdout.write(f"\n    [figure] {text}\n")
    sys.stdout.flush()


@implementer(IPushProducer)
class EndlessBox(Protocol):
    """Writes one AMP box that never ends: distinct keys with 65,535-byte values and no closing
    empty key, as fast as the peer takes it, until *limit* bytes or it is closed."""

    def __init__(self, limit: int = STREAM_BYTES) -> None:
        self.limit = limit
        self.sent = 0
        self.keys = 0
        self.paused = False
        self.closed: defer.Deferred[float] = defer.Deferred()
        self.value = struct.pack("!H", 65535) + b"x" * 65535

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def chunk(self) -> bytes:
        parts = []
        for _ in range(16):  # 1 MiB
            key = b"k%07d" % self.keys
            self.keys += 1
            parts.append(struct.pack("!H", len(key)) + key + self.value)
        return b"".join(parts)

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.limit and not self.closed.called:
            data = self.chunk()
            self.sent += len(data)
            self.transport.write(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if not self.closed.called:
            self.closed.callback(time.monotonic())


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


class AmpAttackTests(ProcessTestCase):
    timeout = 90

    def logs(self) -> str:
        return "\n".join(f"--- {c.name}\n{c.text()}" for c in self.children)

    async def wait_for(self, child: TwistdChild, pattern: str, limit: float = 20.0) -> float:
        """Poll *child*'s output until *pattern* matches; returns when (monotonic)."""
        deadline = time.monotonic() + limit
        while not re.search(pattern, child.text()):
            if time.monotonic() > deadline:
                self.fail(f"{pattern!r} not seen in {limit}s:\n{self.logs()}")
            await task.deferLater(reactor, 0.02, lambda: None)
        return time.monotonic()

    async def watch_rss(self, pid: int, until: defer.Deferred[Any], seconds: float) -> int:
        """The peak RSS of *pid*, sampled every 20 ms until *until* fires or *seconds* pass."""
        peak = rss(pid)
        deadline = time.monotonic() + seconds
        while not until.called and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.02, lambda: None)
            peak = max(peak, rss(pid))
        for _ in range(10):  # and a little after
            await task.deferLater(reactor, 0.02, lambda: None)
            peak = max(peak, rss(pid))
        return peak

    async def sim_and_agent(self) -> tuple[TwistdChild, int, TwistdChild, int]:
        sim = self.start("sim", twistd_argv("protheus-appserver-sim", "--name", "a",
                                            "--port", "tcp:0:interface=127.0.0.1"))
        port = await sim.listening()
        agent, agent_port = await self.agent(port)
        return sim, port, agent, agent_port

    async def agent(self, appserver_port: int, extra: str = "") -> tuple[TwistdChild, int]:
        ini = self.write_ini(f"[AGENT]\nPORT = 0\nINTERFACE = 127.0.0.1\nSECRET = {SECRET}\n{extra}"
                             f"[APPSERVER_A]\nPORT = {appserver_port}\n", "agent.ini")
        agent = self.start("agent", twistd_argv("protheus-agent", "--config", ini))
        return agent, await agent.listening()

    async def broker(self, appserver_port: int, agent_port: int, extra: str = "",
                     secret: str = SECRET) -> TwistdChild:
        path = self.write_ini(
            "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
            f"MONITORING_TYPE = SMARTCLIENT_ACTIVE\nAGENT_SECRET = {secret}\nCONNECT_TIMEOUT = 1\n"
            f"REMOTE_SERVER_A = 127.0.0.1 {appserver_port}\nAGENT_SERVER_A = 127.0.0.1 {agent_port}\n"
            + extra)
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        await broker.listening()
        return broker

    def assert_no_tracebacks(self, child: TwistdChild) -> None:
        for word in ("Traceback", "Unhandled Error", "NoTransition", "CRITICAL", "critical"):
            self.assertNotIn(word, child.text(), f"{child.name}:\n{child.text()}")

    @defer.inlineCallbacks
    def test_endless_box_to_the_agent(self) -> Any:
        """A never-ending AMP box to the agent's port: dropped, the agent's RSS stays small, and
        a real broker then authenticates."""
        yield defer.ensureDeferred(self._endless_box_to_the_agent())

    async def _endless_box_to_the_agent(self) -> None:
        _, appserver_port, agent, agent_port = await self.sim_and_agent()
        assert agent.pid is not None
        before = rss(agent.pid)
        attacker = EndlessBox()
        started = time.monotonic()
        await ClientCreator(reactor, lambda: attacker).connectTCP("127.0.0.1", agent_port)
        peak = await self.watch_rss(agent.pid, attacker.closed, STREAM_SECONDS)
        dropped_by_agent = attacker.closed.called
        if not dropped_by_agent:
            attacker.transport.abortConnection()
            await attacker.closed
        figure(f"agent: endless AMP box: {attacker.sent / MIB:.1f} MiB sent, connection closed "
               f"after {attacker.closed.result - started:.2f}s; agent RSS {before / MIB:.1f} MiB "
               f"before, peak {peak / MIB:.1f} MiB (+{(peak - before) / MIB:.1f} MiB)")
        self.assertTrue(dropped_by_agent, "the agent took the whole stream without dropping it")
        self.assertLess(peak - before, RSS_GROWTH_LIMIT)
        await self.wait_for(agent, r"broker 127\.0\.0\.1:\d+: AMP box with over 4096 bytes before "
                                   r"authenticating \(limit 4096 bytes, 8 keys\); dropping the connection")
        broker = await self.broker(appserver_port, agent_port)
        await self.wait_for(broker, r"agent channel to \S+ authenticated")
        self.assert_no_tracebacks(agent)
        self.assert_no_tracebacks(broker)

    @defer.inlineCallbacks
    def test_fake_agent_streams_an_endless_box_to_the_broker(self) -> Any:
        """Something on the broker's agent port streams an endless box at each connect: the
        broker drops it each time, logs it once, and its RSS stays small."""
        yield defer.ensureDeferred(self._fake_agent())

    async def _fake_agent(self) -> None:
        attackers: list[EndlessBox] = []

        class Fake(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> EndlessBox:
                attackers.append(EndlessBox())
                return attackers[-1]

        listener = reactor.listenTCP(0, Fake(), interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        broker = await self.broker(9, listener.getHost().port)  # (no AppServer needed)
        assert broker.pid is not None
        while not attackers:
            await task.deferLater(reactor, 0.02, lambda: None)
        before = rss(broker.pid)
        never: defer.Deferred[None] = defer.Deferred()
        peak = await self.watch_rss(broker.pid, never, STREAM_SECONDS)
        sent = sum(a.sent for a in attackers)
        figure(f"broker: fake agent streaming endless AMP boxes for {STREAM_SECONDS:g}s: "
               f"{len(attackers)} connection(s), {sent / MIB:.1f} MiB sent; broker RSS "
               f"{before / MIB:.1f} MiB before, peak {peak / MIB:.1f} MiB (+{(peak - before) / MIB:.1f} MiB)")
        self.assertTrue(attackers[0].closed.called, "the broker did not drop the fake agent")
        self.assertLess(peak - before, RSS_GROWTH_LIMIT)
        lines = re.findall(r"AMP box with over 4096 bytes before authenticating.*", broker.text())
        self.assertEqual(len(lines), 1, broker.text())  # once, not once per retry
        self.assertIn("server A: agent 127.0.0.1:", broker.text())
        self.assert_no_tracebacks(broker)

    @defer.inlineCallbacks
    def test_stopped_appserver_leaves_rotation(self) -> Any:
        """A sample AppServer stopped with SIGSTOP (its port still completes handshakes): its
        agent reports it not accepting and the broker takes it out of rotation; SIGCONT brings
        it back."""
        yield defer.ensureDeferred(self._stopped_appserver())

    async def _stopped_appserver(self) -> None:
        sim, appserver_port, agent, agent_port = await self.sim_and_agent()
        broker = await self.broker(appserver_port, agent_port)
        await self.wait_for(broker, r"agent channel to \S+ authenticated")
        await task.deferLater(reactor, 1.5, lambda: None)  # reports flowing
        assert sim.pid is not None
        pid = sim.pid

        def resume() -> None:
            if not sim.ended.called:
                os.kill(pid, signal.SIGCONT)

        self.addCleanup(resume)  # runs before the children are stopped
        stopped_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        # The trap: the stopped process's port still completes a TCP handshake.
        connected = await ClientCreator(reactor, Protocol).connectTCP("127.0.0.1", appserver_port)
        connected.transport.loseConnection()
        down_at = await self.wait_for(
            broker, rf"server A \(\S+\) up -> down: SMARTCLIENT_ACTIVE: agent: AppServer not "
                    rf"accepting: process {pid} is stopped", limit=15)
        figure(f"SIGSTOPped AppServer: down on the broker {down_at - stopped_at:.2f}s after SIGSTOP")
        os.kill(pid, signal.SIGCONT)
        await self.wait_for(broker, r"server A \(\S+\) down -> up", limit=15)
        # A login through it: bounded, and tried again while the agent may still report the
        # handshake that queued during the stop (on a loaded machine it can flap once).
        deadline, attempt, answered = time.monotonic() + 20, 0, False
        while not answered and time.monotonic() < deadline:
            attempt += 1
            answered, _ = await login(broker.port or 0, attempt, patience=5)
            if not answered:
                await task.deferLater(reactor, 0.5, lambda: None)
        self.assertTrue(answered, f"no login through the resumed AppServer in 20 s:\n{self.logs()}")
        self.assert_no_tracebacks(broker)
        self.assert_no_tracebacks(agent)

    @defer.inlineCallbacks
    def test_hung_listener_leaves_rotation(self) -> Any:
        """A process that listens but never accepts (hung, not stopped: its connects succeed):
        its agent sees connections left in the accept queue past ACCEPT_TIMEOUT and the broker
        takes it out of rotation."""
        yield defer.ensureDeferred(self._hung_listener())

    async def _hung_listener(self) -> None:
        hung = socket.socket()  # this test process plays the hung AppServer
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        self.addCleanup(hung.close)
        port = hung.getsockname()[1]
        agent, agent_port = await self.agent(port, "ACCEPT_TIMEOUT = 1\n")
        broker = await self.broker(port, agent_port)
        started = await self.wait_for(broker, r"agent channel to \S+ authenticated")
        down_at = await self.wait_for(
            broker, rf"server A \(\S+\) \w+ -> down: SMARTCLIENT_ACTIVE: agent: AppServer not "
                    r"accepting: process \d+ does not accept connections", limit=15)
        # (\d+: the agent may find a child forked by this process, before its exec, holding
        # the listening socket too)
        figure(f"hung listener (never accepts), ACCEPT_TIMEOUT = 1: down on the broker "
               f"{down_at - started:.2f}s after its agent channel came up")
        self.assert_no_tracebacks(broker)
        self.assert_no_tracebacks(agent)

    @defer.inlineCallbacks
    def test_broker_with_the_wrong_secret_retries_quietly(self) -> Any:
        """A broker whose AGENT_SECRET differs from the agent's retries with backoff: one clear
        line on each side, no Unhandled Error (automat NoTransition) per retry."""
        yield defer.ensureDeferred(self._wrong_secret())

    async def _wrong_secret(self) -> None:
        _, appserver_port, agent, agent_port = await self.sim_and_agent()
        broker = await self.broker(appserver_port, agent_port, secret="another-secret-of-enough-length")
        await self.wait_for(broker, r"server A: agent \S+: handshake failed")
        await task.deferLater(reactor, 4.0, lambda: None)  # several retries (0.25 s, x1.5, jitter)
        retries = len(re.findall(r"Scheduling retry", broker.text()))
        lines = re.findall(r"server A: agent \S+: handshake failed.*", broker.text())
        figure(f"wrong secret: {retries} retries in 4 s, {len(lines)} line(s) saying why on the broker")
        self.assertGreaterEqual(retries, 2, broker.text())
        self.assertEqual(len(lines), 1, broker.text())
        self.assertIn("the agent's proof is wrong (a different AGENT_SECRET", lines[0])
        self.assert_no_tracebacks(broker)
        self.assert_no_tracebacks(agent)
