"""Real node processes: ``reactor.spawnProcess`` in their own process group, output lines to the
log with the node id, readiness and polls by connecting to the node's endpoint."""

from __future__ import annotations

import os
import stat
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from protheus_broker.nodes.lock import PersistentLock
from protheus_broker.processes import LineOutput, ProcessGroup, port_free, spawn_in_group
from protheus_broker.nodes.manager import INodeProcess, INodeSpawner, NodeManager, NodePolicy, NodeSpec

log = Logger()

#: The persistent node gets the locked lock file as this descriptor (nodes/lock.py).
LOCK_FD = 3

#: Seconds a readiness or poll connect may take.
PROBE_TIMEOUT = 2.0

class NodeOutput(LineOutput):
    """Logs a node's stdout/stderr lines with its id; tells the manager when it has ended."""

    def __init__(self, unit: str, node_id: int, ended: Callable[[str], None]) -> None:
        super().__init__(self._log, ended)
        self.unit = unit
        self.node_id = node_id

    def _log(self, fd: int, text: str) -> None:
        log.info("{unit} node {node_id}: {line}", unit=self.unit, node_id=self.node_id, line=text,
                 stream="stderr" if fd == 2 else "stdout")


@implementer(INodeProcess)
class NodeProcess(ProcessGroup):
    """A spawned node: signals go to its whole process group."""

    def __init__(self, transport: Any) -> None:
        super().__init__(transport.pid)
        self.transport = transport


def port_in_use(host: str, port: int) -> None:
    """Raise OSError if another process holds *port*: a node there would fail to listen and the
    readiness probe would reach the other process instead."""
    if not port_free(host, port):
        raise OSError(f"port {host}:{port} is in use by another process")


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
        transport = spawn_in_group(self.reactor, protocol, argv, env, path=self.cwd, child_fds=child_fds)
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
