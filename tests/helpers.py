"""Shared test helpers: a log catcher and small builders."""

from __future__ import annotations

from typing import Any

import os

from twisted.internet import reactor
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from protheus_broker.children import TwistdChild, spawn
from protheus_broker.demo import stop_all

from protheus_broker.config import RemoteServer


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
