"""Child processes in their own process group, shared by the broker's node spawner
(``nodes/spawner.py``) and the farm agent's launcher (``agent/launcher.py``).

A child is started through a tiny Python wrapper that asks for SIGTERM when its parent dies
(PR_SET_PDEATHSIG, kept across exec: no orphan keeps the node's port), calls ``setsid()`` and
execs the command: its own process group without a preexec hook (Twisted 22.4 and newest).
Signals go to the whole group; memory counts the group leader and its children.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Callable

import psutil
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

#: The wrapper: SIGTERM when the parent dies, its own session, then the command.
SETSID = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); os.setsid(); "
          "os.execvp(sys.argv[1], sys.argv[1:])")

#: Longest output line logged (the rest is cut).
LINE_MAX = 2000


def describe_exit(reason: Failure) -> str:
    """'exit status N' or 'killed by signal N' for a process's end."""
    if reason.check(ProcessDone):
        return "exit status 0"
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"killed by signal {value.signal}"
        return f"exit status {value.exitCode}"
    return str(value)


class LineOutput(ProcessProtocol):
    """Hands each stdout/stderr line (cut at LINE_MAX) to *line*; tells *ended* how it ended."""

    transport: Any

    def __init__(self, line: Callable[[int, str], None], ended: Callable[[str], None]) -> None:
        self.line = line
        self.ended = ended
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()[-LINE_MAX:]
        for line in lines:
            self._emit(childFD, line)

    def _emit(self, fd: int, line: bytes) -> None:
        text = line[:LINE_MAX].decode(errors="replace").rstrip("\r")
        if text:
            self.line(fd, text)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._emit(fd, rest)
        self.ended(describe_exit(reason))


def spawn_in_group(reactor: Any, protocol: ProcessProtocol, argv: list[str], env: dict[str, str],
                   path: str | None = None, child_fds: dict[int, Any] | None = None) -> Any:
    """``reactor.spawnProcess`` of *argv* through :data:`SETSID`; returns the process transport."""
    fds = child_fds if child_fds is not None else {0: "w", 1: "r", 2: "r"}
    return reactor.spawnProcess(protocol, sys.executable, [sys.executable, "-c", SETSID, *argv],
                                env=env, path=path, usePTY=False, childFDs=fds)


class ProcessGroup:
    """A spawned child by its pid: signals go to its whole process group."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, signum)  # not yet its own group leader (just forked)
            except OSError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def memory_bytes(self) -> int | None:
        """Resident memory of the child and its descendants, or None once it is gone."""
        try:
            process = psutil.Process(self.pid)
            total = process.memory_info().rss
            for child in process.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            return int(total)
        except psutil.Error:
            return None


def port_free(host: str, port: int) -> bool:
    """False when another process holds *port* on *host* (a child there could not listen)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
