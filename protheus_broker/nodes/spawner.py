"""Real node processes: ``reactor.spawnProcess`` in their own process group, output lines to the
log with the node id, readiness and polls by connecting to the node's endpoint."""

from __future__ import annotations

import os
import signal
import socket
import stat
import sys
from typing import Any, Callable

import psutil
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.nodes.lock import PersistentLock
from protheus_broker.nodes.manager import INodeProcess, INodeSpawner, NodeManager, NodePolicy, NodeSpec

log = Logger()

#: Runs the node's command in a new session (its own process group) without a preexec hook,
#: which spawnProcess does not have: the child asks for SIGTERM if the broker dies
#: (PR_SET_PDEATHSIG, kept across exec: no orphan holds the node's port), calls setsid() and
#: execs the command.
SETSID = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); os.setsid(); "
          "os.execvp(sys.argv[1], sys.argv[1:])")

#: The persistent node gets the locked lock file as this descriptor (nodes/lock.py).
LOCK_FD = 3

#: Seconds a readiness or poll connect may take.
PROBE_TIMEOUT = 2.0

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


class NodeOutput(ProcessProtocol):
    """Logs a node's stdout/stderr lines with its id; tells the manager when it has ended."""

    transport: Any

    def __init__(self, unit: str, node_id: int, ended: Callable[[str], None]) -> None:
        self.unit = unit
        self.node_id = node_id
        self.ended = ended
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()[-LINE_MAX:]
        for line in lines:
            self._log(childFD, line)

    def _log(self, fd: int, line: bytes) -> None:
        text = line[:LINE_MAX].decode(errors="replace").rstrip("\r")
        if text:
            log.info("{unit} node {node_id}: {line}", unit=self.unit, node_id=self.node_id, line=text,
                     stream="stderr" if fd == 2 else "stdout")

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._log(fd, rest)
        self.ended(describe_exit(reason))


@implementer(INodeProcess)
class NodeProcess:
    """A spawned node: signals go to its whole process group."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.pid: int = transport.pid

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


def port_in_use(host: str, port: int) -> None:
    """Raise OSError if another process holds *port*: a node there would fail to listen and the
    readiness probe would reach the other process instead."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(f"port {host}:{port} is in use by another process ({e.strerror})") from None


def remove_stale_socket(path: str) -> None:
    """A socket file left by an earlier node under this id would make the new one fail to listen."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("cannot remove the old socket {path}: {error}", path=path, error=e)


@implementer(INodeSpawner)
class ProcessSpawner:
    """Starts nodes with ``reactor.spawnProcess``; probes them by connecting."""

    def __init__(self, reactor: Any, policy: NodePolicy, unit: str, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.lock: PersistentLock | None = None  # set by NodeService with PERSISTENT=1
        self.reactor = reactor
        self.policy = policy
        self.unit = unit
        self.env = env
        self.cwd = cwd

    def spawn(self, spec: NodeSpec, ended: Callable[[str], None]) -> NodeProcess:
        argv = spec.argv(self.policy.command)
        if spec.port:
            port_in_use(self.policy.host, spec.port)
        if spec.socket:
            os.makedirs(os.path.dirname(spec.socket) or ".", exist_ok=True)
            remove_stale_socket(spec.socket)
        env = dict(os.environ if self.env is None else self.env)
        env["PROTHEUS_NODE_ID"] = str(spec.node_id)
        env["PROTHEUS_NODE_PERSISTENT"] = "1" if spec.persistent else "0"
        protocol = NodeOutput(self.unit, spec.node_id, ended)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        lock = self.lock if spec.persistent else None
        if lock is not None and lock.fd is not None:
            child_fds[LOCK_FD] = lock.fd  # the node holds the lock too, as long as it lives
        transport = self.reactor.spawnProcess(protocol, sys.executable, [sys.executable, "-c", SETSID, *argv],
                                              env=env, path=self.cwd, usePTY=False, childFDs=child_fds)
        process = NodeProcess(transport)
        if lock is not None:
            lock.note_node(process.pid)
        log.info("{unit} node {node_id}: pid {pid}: {command}", unit=self.unit, node_id=spec.node_id,
                 pid=process.pid, command=" ".join(argv))
        return process

    def probe(self, spec: NodeSpec) -> Deferred[bool]:
        if spec.socket:
            endpoint: Any = UNIXClientEndpoint(self.reactor, spec.socket, timeout=PROBE_TIMEOUT)
        else:
            endpoint = TCP4ClientEndpoint(self.reactor, self.policy.host, spec.port, timeout=PROBE_TIMEOUT)
        factory = Factory.forProtocol(Protocol)
        factory.noisy = False  # no "Starting factory" line per poll
        d: Deferred[Any] = endpoint.connect(factory)

        def connected(protocol: Protocol) -> bool:
            protocol.transport.loseConnection()  # type: ignore[union-attr]
            return True
        d.addCallbacks(connected, lambda _: False)
        return d


class NodeService(Service):
    """Runs a unit's :class:`NodeManager` while the unit runs; stopping waits for every node.
    With PERSISTENT=1 the persistent node needs this host's lock for the application."""

    def __init__(self, manager: NodeManager) -> None:
        self.manager = manager
        policy = manager.policy
        self.lock = PersistentLock(policy.lock_dir, policy.application) if policy.persistent else None
        if self.lock is not None:
            manager.claim_persistent = self.lock.acquire
            if isinstance(manager.spawner, ProcessSpawner):
                manager.spawner.lock = self.lock

    def startService(self) -> None:
        super().startService()
        self.manager.start()

    def stopService(self) -> Any:
        super().stopService()
        d = self.manager.stop()
        if self.lock is not None:
            d.addBoth(self._release)
        return d

    def _release(self, result: Any) -> Any:
        if self.lock is not None:
            self.lock.release()
        return result
