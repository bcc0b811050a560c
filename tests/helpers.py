"""Shared test helpers: a log catcher and small builders."""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from protheus_broker.demo.children import TwistdChild, spawn
from protheus_broker.demo.run import stop_all

from protheus_broker.balancing.servers import RemoteServer


def servers(*ports: int) -> list[RemoteServer]:
    return [RemoteServer(f"{n:02d}", "127.0.0.1", port) for n, port in enumerate(ports, start=1)]


class LogCatcher:
    """Collects log events for the length of a test."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def find(self, **match: Any) -> list[LogEvent]:
        return [e for e in self.events if all(e.get(k) == v for k, v in match.items())]

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def ended(self) -> list[LogEvent]:
        return [e for e in self.events if "how" in e and "session_id" in e]


class ProcessTestCase(TestCase):
    """End-to-end tests with real daemons: each child is stopped by pid when the test ends."""

    def setUp(self) -> None:
        self.children: list[TwistdChild] = []
        self.addCleanup(lambda: stop_all(reactor, self.children, grace=5))

    def start(self, name: str, argv: list[str]) -> TwistdChild:
        child = spawn(reactor, TwistdChild(name), argv, cwd=self.mktemp_dir())
        self.children.append(child)
        return child

    def mktemp_dir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def write_ini(self, text: str, name: str = "appserver.ini") -> str:
        path = os.path.join(self.mktemp_dir(), name)
        with open(path, "w") as handle:
            handle.write(text)
        return path


class Login(Protocol):
    """A SmartClient stand-in against the sample AppServer: speaks first, then expects the
    AppServer's greeting line and the echo of what it sent."""

    transport: Any

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.data = b""
        self.done: defer.Deferred[bool] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.ok() and not self.done.called:
            self.done.callback(True)
            self.transport.loseConnection()

    def ok(self) -> bool:
        line, _, rest = self.data.partition(b"\r\n")
        return line.startswith(b"PROTHEUS-SIM ") and rest == self.payload

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:
        if not self.done.called:
            self.done.callback(self.ok())


async def login(port: int, number: int, source: str = "127.0.0.1",
                patience: float = 8.0) -> tuple[bool, float]:
    """One login through the broker on 127.0.0.1:*port* from *source*, given up after
    *patience* seconds: (answered in full, seconds it took)."""
    started = time.monotonic()
    protocol = Login(f"login-{number}-".encode() * 8)
    try:
        await ClientCreator(reactor, lambda: protocol).connectTCP(
            "127.0.0.1", port, timeout=patience, bindAddress=(source, 0))
    except Exception:
        return False, time.monotonic() - started
    timer = reactor.callLater(patience, protocol.transport.abortConnection)
    answered = await protocol.done
    if timer.active():
        timer.cancel()
    return answered, time.monotonic() - started


#: How a broker logs a node's pid (nodes/spawner.py) and how an agent logs a farm node's.
NODE_PID = r"node \d+: pid (\d+):"
FARM_NODE_PID = r"node \d+(?: \(persistent\))?: pid (\d+) on"


def sleep(seconds: float) -> defer.Deferred[None]:
    """A Deferred that fires after *seconds* on the global reactor."""
    return task.deferLater(reactor, seconds, lambda: None)


def kill_logged_groups(text: str, pattern: str = NODE_PID) -> None:
    """SIGKILL the process group of every pid *pattern* finds in a daemon's log *text* (the nodes it
    started: cleanup that holds even when the daemon itself was killed)."""
    for pid in {int(p) for p in re.findall(pattern, text)}:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
