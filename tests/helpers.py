"""Shared test helpers: a log catcher and small builders."""

from __future__ import annotations

from typing import Any

from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

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
