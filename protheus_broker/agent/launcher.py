"""Real node processes for a farm host: ``reactor.spawnProcess`` in their own process group
(SIGTERM to them if the agent dies), output lines to the agent's log, readiness by connecting."""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Callable

import psutil
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.agent.farm import INodeLauncher

log = Logger()

#: The child asks for SIGTERM when the agent dies, starts its own session, and execs the command.
SETSID = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); os.setsid(); "
          "os.execvp(sys.argv[1], sys.argv[1:])")
PROBE_TIMEOUT = 2.0
LINE_MAX = 2000


class _Quiet(Factory):
    noisy = False
    protocol = Protocol


def describe_exit(reason: Failure) -> str:
    if reason.check(ProcessDone):
        return "exit status 0"
    value = reason.value
    if isinstance(value, ProcessTerminated):
        return f"killed by signal {value.signal}" if value.signal is not None else f"exit status {value.exitCode}"
    return str(value)


class _Output(ProcessProtocol):
    def __init__(self, label: str, ended: Callable[[str], None]) -> None:
        self.label = label
        self.ended = ended
        self.partial = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[-LINE_MAX:]
        for line in lines:
            text = line[:LINE_MAX].decode(errors="replace").rstrip("\r")
            if text:
                log.info("farm: {label}: {line}", label=self.label, line=text)

    def processEnded(self, reason: Failure) -> None:
        self.ended(describe_exit(reason))


class _Process:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except OSError:
            try:
                os.kill(self.pid, signum)
            except OSError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def memory_bytes(self) -> int | None:
        try:
            process = psutil.Process(self.pid)
            return int(process.memory_info().rss + sum(c.memory_info().rss for c in process.children(True)))
        except psutil.Error:
            return None


@implementer(INodeLauncher)
class ProcessLauncher:
    """Starts farm nodes on this host."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def launch(self, argv: list[str], env: dict[str, str], label: str, ended: Callable[[str], None]) -> _Process:
        full_env = dict(os.environ)
        full_env.update(env)
        transport = self.reactor.spawnProcess(_Output(label, ended), sys.executable,
                                              [sys.executable, "-c", SETSID, *argv], env=full_env,
                                              usePTY=False, childFDs={0: "w", 1: "r", 2: "r"})
        return _Process(transport.pid)

    def port_free(self, host: str, port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                return False
        return True

    def probe(self, host: str, port: int) -> Deferred[bool]:
        d: Deferred[Any] = HostnameEndpoint(self.reactor, host, port, timeout=PROBE_TIMEOUT).connect(_Quiet())

        def connected(protocol: Any) -> bool:
            protocol.transport.loseConnection()
            return True
        return d.addCallbacks(connected, lambda _: False)
