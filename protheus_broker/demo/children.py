"""Run our twistd daemons as child processes (the demo and the end-to-end tests use this)."""

from __future__ import annotations

import os
import re
import signal
import sys
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

_LISTENING = re.compile(rb"listening on (\S+):(\d+)")
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def twistd_argv(plugin: str, *args: str) -> list[str]:
    """Command line running *plugin* in the foreground with this Python, in its own session (a
    terminal's Ctrl-C reaches only the parent, which stops its children by pid)."""
    return [sys.executable, "-c", "import os; os.setsid(); from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", plugin, *args]


class TwistdChild(ProcessProtocol):
    """One daemon: its output lines, the port it reports listening on, its exit."""

    transport: Any

    def __init__(self, name: str, echo: Callable[[str, bytes], None] | None = None) -> None:
        self.name = name
        self.echo = echo
        self.output: list[bytes] = []
        self.port: int | None = None
        self._port_waiters: list[defer.Deferred[int]] = []
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self._partial = b""
        self.pid: int | None = None
        self._signalled: set[str] = set()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self.output.append(line)
            if self.echo is not None:
                self.echo(self.name, line)
            match = _LISTENING.search(line)
            if match and self.port is None:
                self.port = int(match.group(2))
                waiters, self._port_waiters = self._port_waiters, []
                for waiter in waiters:
                    waiter.callback(self.port)

    errReceived = outReceived

    def text(self) -> str:
        return b"\n".join(self.output + [self._partial]).decode(errors="replace")

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        if self._partial:
            self.output.append(self._partial)
            self._partial = b""
        self.ended.callback(code)
        waiters, self._port_waiters = self._port_waiters, []
        for waiter in waiters:
            waiter.errback(self._exited_early())

    def _exited_early(self) -> RuntimeError:
        return RuntimeError(f"{self.name} exited before listening:\n{self.text()}")

    def listening(self) -> defer.Deferred[int]:
        """Fires with the port the child reports listening on; fails if it exits first."""
        if self.port is not None:
            return defer.succeed(self.port)
        if self.ended.called:
            return defer.fail(self._exited_early())
        waiter: defer.Deferred[int] = defer.Deferred()
        self._port_waiters.append(waiter)
        return waiter

    def signal(self, name: str = "TERM") -> None:
        """Send SIG*name* to the child, once (a second TERM makes twistd log a traceback)."""
        if name in self._signalled:
            return
        self._signalled.add(name)
        if not self.ended.called and self.pid is not None:
            try:
                os.kill(self.pid, getattr(signal, f"SIG{name}"))
            except ProcessLookupError:
                pass


def spawn(reactor: Any, child: TwistdChild, argv: list[str], cwd: str | None = None) -> TwistdChild:
    """Start *argv* with this project importable; returns *child* (its pid is set)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    reactor.spawnProcess(child, argv[0], argv, env=env, path=cwd)
    return child
