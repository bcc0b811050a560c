"""Managed AppServer nodes of one balance unit, HyperServer-style: the logic, no I/O.

A :class:`NodeManager` starts AppServer processes (*nodes*) through an :class:`INodeSpawner`,
adds each to the unit's pool (source ``"nodes"``) once it accepts a connection, polls it, sizes
the pool between ``MIN_NODES`` and ``MAX_NODES`` by sessions per node, and recycles nodes (after N
sessions, an age or a memory size, each with jitter) without dropping a session.

Node states, with uniGUI HyperServer's meanings:

* **starting**: spawned, not yet accepting connections (not a HyperServer state; no sessions);
* **active**: takes sessions;
* **suspended**: missed a poll; no new sessions; purged after ``POLL_MISSES`` misses in a row;
* **discarded**: still has sessions but takes no new ones; purged when its last session ends
  (or after ``DRAIN_TIMEOUT``);
* **purged**: out of the pool, queued for recycling: asked to stop (SIGTERM), killed after
  ``STOP_GRACE``; gone from the list when its process has ended, and its id is free again.

*Persistent* is a flag: the unit's persistent node is started first, never scaled away, and
started again at once (once its old process has ended: never two at a time) after a recycle or
a crash.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from protheus_broker.balancing.pool import PoolEvent, ServerPool, ServerState, UnknownServer
from protheus_broker.balancing.servers import RemoteServer

log = Logger()

#: The pool source of managed nodes.
NODES = "nodes"

#: Seconds between readiness probes of a starting node.
READY_PROBE_EVERY = 0.05

#: A node that stays active this long ends a crash streak.
STABLE_AFTER = 30.0

#: Backoff before replacing the n-th crash in a row (n >= 2): BACKOFF_BASE * 2**(n-2), at most BACKOFF_MAX.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 60.0


class NodeState(enum.Enum):
    """Where a node stands (see the module docstring)."""

    STARTING = "starting"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DISCARDED = "discarded"
    PURGED = "purged"


class Transport(enum.Enum):
    """How the broker reaches its nodes."""

    TCP = "TCP"
    UNIX = "UNIX"


@dataclass(frozen=True)
class FarmSettings:
    """FARM_HOSTS and the keys with them: nodes on other hosts, started by their protheus-agent
    (nodes/remote.py)."""

    hosts: tuple[tuple[str, int], ...]
    template: str = "APPSERVER"
    local: bool = False  # nodes on this host too (NODE_COMMAND)
    secret: bytes | None = field(default=None, repr=False)
    broker_id: str = ""
    wait: float = 5.0  # seconds to wait at start for the agents' node lists (adoption)


@dataclass(frozen=True)
class NodePolicy:
    """What a unit's node manager is told by its config (see nodes/settings.py for the keys)."""

    command: tuple[str, ...] = ()  # argv template: {id} {port} {socket} {persistent}
    min_nodes: int = 1
    max_nodes: int = 4
    sessions_per_node: int = 50
    transport: Transport = Transport.TCP
    host: str = "127.0.0.1"
    base_port: int = 21000  # node n listens on base_port + n
    socket_dir: str = "/run/protheus-broker"
    start_timeout: float = 30.0
    poll_interval: float = 5.0
    poll_misses: int = 3
    recycle_sessions: int = 0  # 0: off
    recycle_age: float = 0.0  # seconds; 0: off
    recycle_memory: int = 0  # bytes of RSS; 0: off
    recycle_jitter: float = 0.1  # each node's limits are raised by up to this fraction
    drain_timeout: float = 3600.0
    stop_grace: float = 10.0
    idle_time: float = 60.0  # a node idle this long above the need is scaled away
    persistent: bool = False
    application: str = ""  # the name the persistent lock is taken under
    lock_dir: str = "/run/protheus-broker"  # where that lock file lives
    farm: FarmSettings | None = None  # FARM_HOSTS: nodes on farm hosts too


@dataclass(frozen=True)
class NodeSpec:
    """What a spawner needs to start one node."""

    node_id: int
    port: int  # TCP transport; 0 for Unix sockets
    socket: str  # Unix transport; "" for TCP
    persistent: bool

    def argv(self, template: tuple[str, ...]) -> list[str]:
        """The command line: each word of *template* with the placeholders filled in."""
        values = {"id": str(self.node_id), "port": str(self.port), "socket": self.socket,
                  "persistent": "1" if self.persistent else "0"}
        return [word.format(**values) for word in template]


class INodeProcess(Interface):
    """A running node process, as the spawner started it."""

    pid = Attribute("The process id (also its process group's).")

    def terminate() -> None:
        """Ask the node to stop (SIGTERM to its process group)."""

    def kill() -> None:
        """Stop it now (SIGKILL to its process group)."""

    def memory_bytes() -> int | None:
        """Its resident memory in bytes (with its children), None if unknown."""


class INodeSpawner(Interface):
    """Starts and probes node processes."""

    def spawn(spec: NodeSpec, ended: Callable[[str], None]) -> INodeProcess:
        """Start a node; call *ended* (with a reason text) once when its process has ended."""

    def probe(spec: NodeSpec) -> Deferred[bool]:
        """True if the node accepts a connection on its endpoint (never fails)."""


class Random(Protocol):
    def random(self) -> float: ...


class Node:
    """One managed node as the manager sees it."""

    def __init__(self, spec: NodeSpec, started_at: float, limits: dict[str, float]) -> None:
        self.spec = spec
        self.node_id = spec.node_id
        self.persistent = spec.persistent
        self.state = NodeState.STARTING
        self.reason = "starting"
        self.process: Any = None
        self.started_at = started_at
        self.ready_at: float | None = None
        self.limits = limits  # recycle thresholds with this node's jitter: sessions, age, memory
        self.recycling: str | None = None  # why it is being recycled (still active until replaced)
        self.misses = 0
        self.polled_at: float | None = None
        self.probing = False
        self.idle_since: float | None = None
        self.memory: int | None = None
        self.sessions_done = 0  # sessions that reached it (kept after it leaves the pool)
        self.timers: list[Any] = []
        self.exit_expected = False
        self.stop_requested_at: float | None = None

    @property
    def member_id(self) -> str:
        return member_id(self.node_id)

    @property
    def live(self) -> bool:
        return self.state is not NodeState.PURGED


def member_id(node_id: int) -> str:
    """The pool id of node *node_id*."""
    return f"NODE{node_id}"


class NodeManager:
    """The nodes of one balance unit (see the module docstring)."""

    def __init__(self, clock: Any, pool: ServerPool, spawner: INodeSpawner, policy: NodePolicy,
                 random: Random, name: str = "nodes") -> None:
        self.clock = clock
        self.pool = pool
        self.spawner = spawner
        self.policy = policy
        self.random = random
        self.name = name
        self.nodes: dict[int, Node] = {}
        self.running = False
        self.crash_streak = 0
        self.backoff_until = 0.0
        self.failed_at = 0.0  # when the latest node failure happened
        self._backoff_timer: Any = None
        self._loop: LoopingCall | None = None
        self._stopped: list[Deferred[None]] = []
        self._unsubscribe = pool.subscribe(self._pool_event)
        self.tick_every = min(1.0, policy.poll_interval)
        #: Asked before a persistent node starts: None to go ahead, else why not (another
        #: broker holds it); the unit sets a lock's ``acquire`` here.
        self.claim_persistent: Callable[[], str | None] = lambda: None
        self.persistent_refused: str | None = None
        #: Set by the local scaler (SCALE_TO_ZERO=1): with MIN_NODES=0 and no session the need
        #: is 0 nodes, not the one node of headroom.
        self.scale_to_zero = False

    # --- life ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the minimum (the persistent node first) and the periodic check."""
        self.running = True
        log.info("{unit}: managing {min}..{max} nodes over {transport}{persistent}", unit=self.name,
                 min=self.policy.min_nodes, max=self.policy.max_nodes,
                 transport=self.policy.transport.value,
                 persistent=", one persistent" if self.policy.persistent else "")
        self.reconcile()
        loop = LoopingCall(self.tick)
        loop.clock = self.clock
        loop.start(self.tick_every, now=False)
        self._loop = loop

    def stop(self) -> Deferred[None]:
        """Stop every node (asked, then killed after the grace); fires when all have ended."""
        self.running = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._backoff_timer is not None and self._backoff_timer.active():
            self._backoff_timer.cancel()
        for node in list(self.nodes.values()):
            if node.live:
                self._purge(node, "the broker is stopping")
        if not self.nodes:
            self._unsubscribe()
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stopped.append(d)
        return d

    # --- counting -----------------------------------------------------------------------

    def _backend(self, node: Node) -> Any:
        try:
            backend = self.pool.get(node.member_id)
        except UnknownServer:
            return None
        return backend if backend.source == NODES else None

    def sessions(self, node: Node) -> int:
        """The sessions *node* carries now (from the pool)."""
        backend = self._backend(node)
        return backend.active if backend is not None else 0

    def total_sessions(self, node: Node) -> int:
        """Sessions that reached *node* (the last count seen once it left the pool)."""
        backend = self._backend(node)
        if backend is not None and node.live:
            node.sessions_done = backend.total
        return node.sessions_done

    def serving(self) -> list[Node]:
        """Nodes that take (or will take) sessions and are not being recycled."""
        return [n for n in self.nodes.values()
                if n.state in (NodeState.STARTING, NodeState.ACTIVE, NodeState.SUSPENDED)
                and n.recycling is None]

    def desired(self) -> int:
        """How many serving nodes the load asks for: one more whenever every node would carry
        SESSIONS_PER_NODE, within MIN_NODES..MAX_NODES."""
        policy = self.policy
        load = sum(self.sessions(n) for n in self.nodes.values()
                   if n.state in (NodeState.ACTIVE, NodeState.SUSPENDED))
        if load == 0 and policy.min_nodes == 0 and self.scale_to_zero:
            return 0
        need = math.ceil((load + 1) / max(1, policy.sessions_per_node))
        return max(policy.min_nodes, min(policy.max_nodes, need))

    def _free_id(self) -> int:
        node_id = 1
        while node_id in self.nodes or self._member_held(node_id):
            node_id += 1
        return node_id

    def _member_held(self, node_id: int) -> bool:
        try:
            self.pool.get(member_id(node_id))
        except UnknownServer:
            return False
        return True

    # --- the periodic check -------------------------------------------------------------

    def tick(self) -> None:
        """Poll, apply the recycle policies and the size (every second or POLL_INTERVAL)."""
        now = self.clock.seconds()
        for node in list(self.nodes.values()):
            if node.state in (NodeState.ACTIVE, NodeState.SUSPENDED):
                self._check_node(node, now)
        if self.crash_streak and any(  # a node started since the last failure has held up
                n.state is NodeState.ACTIVE and n.ready_at is not None and n.started_at >= self.failed_at
                and now - n.ready_at >= STABLE_AFTER for n in self.nodes.values()):
            if self.crash_streak > 1:
                log.info("{unit}: crash loop over after {count} crashes in a row", unit=self.name,
                         count=self.crash_streak)
            self.crash_streak = 0
        self.reconcile()

    def _check_node(self, node: Node, now: float) -> None:
        backend = self._backend(node)
        if backend is not None and backend.active:
            node.idle_since = None
        elif node.idle_since is None:
            node.idle_since = now
        if node.polled_at is None or now - node.polled_at >= self.policy.poll_interval:
            if node.process is not None:
                node.memory = node.process.memory_bytes()  # psutil: for the screen and RECYCLE_MEMORY
            if not node.probing:
                node.polled_at = now
                self._poll(node)
        if node.recycling is None and node.state in (NodeState.ACTIVE, NodeState.SUSPENDED):
            why = self._recycle_due(node, now)
            if why:
                self.recycle(node.node_id, why)

    def _recycle_due(self, node: Node, now: float) -> str:
        limits = node.limits
        if limits["sessions"] and self.total_sessions(node) >= limits["sessions"]:
            return f"recycle after {self.total_sessions(node)} sessions (limit {limits['sessions']:.0f})"
        if limits["age"] and node.ready_at is not None and now - node.ready_at >= limits["age"]:
            return f"recycle at age {now - node.ready_at:.0f}s (limit {limits['age']:.0f}s)"
        if limits["memory"] and node.memory is not None and node.memory >= limits["memory"]:
            return (f"recycle at {node.memory // (1024 * 1024)} MiB resident "
                    f"(limit {limits['memory'] / (1024 * 1024):.0f} MiB)")
        return ""

    def _poll(self, node: Node) -> None:
        node.probing = True
        d = self.spawner.probe(node.spec)
        d.addCallback(lambda ok: self._polled(node, bool(ok)))

    def _polled(self, node: Node, ok: bool) -> None:
        node.probing = False
        if node.state not in (NodeState.ACTIVE, NodeState.SUSPENDED) or self.nodes.get(node.node_id) is not node:
            return
        if ok:
            node.misses = 0
            if node.state is NodeState.SUSPENDED:
                self._set(node, NodeState.ACTIVE, "answered a poll")
                if self._backend(node) is not None:
                    self.pool.set_state(node.member_id, ServerState.UP, "node answered a poll")
            return
        node.misses += 1
        if node.misses >= self.policy.poll_misses:
            self._failed(node, f"missed {node.misses} polls in a row")
            return
        if node.state is NodeState.ACTIVE:
            self._set(node, NodeState.SUSPENDED, f"missed a poll ({node.misses} of {self.policy.poll_misses})")
            if self._backend(node) is not None:
                self.pool.set_state(node.member_id, ServerState.SUSPENDED, "node missed a poll")

    # --- sizing -------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Start the nodes the need asks for (persistent first, not during a crash backoff),
        discard recycling nodes whose replacements are ready, scale idle ones away."""
        if not self.running:
            return
        now = self.clock.seconds()
        if now < self.backoff_until:
            self._discard_replaced()
            return
        policy = self.policy
        if policy.persistent and not any(n.persistent for n in self.nodes.values()) \
                and now >= self.backoff_until:
            refused = self.claim_persistent()
            if refused != self.persistent_refused:
                if refused:
                    log.error("{unit}: no persistent node here: {why}", unit=self.name, why=refused)
                else:
                    log.info("{unit}: persistent node lock taken", unit=self.name)
                self.persistent_refused = refused
            if refused is None:
                self._spawn(persistent=True)
        desired = self.desired()
        while len(self.serving()) < desired and self.clock.seconds() >= self.backoff_until:
            self._spawn(persistent=False)
        self._discard_replaced()
        self._scale_down(now, desired)

    def _discard_replaced(self) -> None:
        ready = [n for n in self.serving() if n.state is NodeState.ACTIVE]
        for node in list(self.nodes.values()):
            if node.recycling is not None and node.state in (NodeState.ACTIVE, NodeState.SUSPENDED):
                if len(ready) >= self.desired() or not self.running:
                    self.discard(node.node_id, node.recycling)

    def _scale_down(self, now: float, desired: int) -> None:
        serving = self.serving()
        if len(serving) <= desired:
            return
        for node in sorted(serving, key=lambda n: -n.node_id):
            if len(self.serving()) <= desired:
                return
            if node.persistent or node.state is not NodeState.ACTIVE or node.idle_since is None:
                continue
            if now - node.idle_since >= self.policy.idle_time and not self.sessions(node):
                self.discard(node.node_id, f"idle {now - node.idle_since:.0f}s above the need of {desired}")

    def scale(self, min_nodes: int, why: str = "admin") -> None:
        """An admin (or the scale-to-zero controller) sets the minimum (within 0..MAX_NODES)
        for this run."""
        min_nodes = max(0, min(self.policy.max_nodes, min_nodes))
        log.info("{unit}: MIN_NODES {old} -> {new} ({why})", unit=self.name, old=self.policy.min_nodes,
                 new=min_nodes, why=why)
        self.policy = replace(self.policy, min_nodes=min_nodes)
        for node in self.serving():  # scaling down by hand need not wait for IDLE_TIME
            node.idle_since = self.clock.seconds() - self.policy.idle_time if node.idle_since is not None else None
        self.reconcile()

    # --- spawning and readiness ---------------------------------------------------------

    def _limits(self) -> dict[str, float]:
        p = self.policy

        def jittered(value: float) -> float:
            return value * (1.0 + p.recycle_jitter * self.random.random()) if value else 0.0
        sessions = jittered(float(p.recycle_sessions))
        return {"sessions": float(math.floor(sessions)), "age": jittered(p.recycle_age),
                "memory": jittered(float(p.recycle_memory))}

    def _spawn(self, persistent: bool) -> Node:
        node_id = self._free_id()
        policy = self.policy
        if policy.transport is Transport.UNIX:
            spec = NodeSpec(node_id, 0, f"{policy.socket_dir.rstrip('/')}/node-{node_id}.sock", persistent)
        else:
            spec = NodeSpec(node_id, policy.base_port + node_id, "", persistent)
        now = self.clock.seconds()
        node = Node(spec, now, self._limits())
        self.nodes[node_id] = node
        log.info("{unit}: starting node {node_id}{persistent} on {where}", unit=self.name, node_id=node_id,
                 persistent=" (persistent)" if persistent else "", where=spec.socket or f"port {spec.port}")
        try:
            node.process = self.spawner.spawn(spec, lambda why: self._ended(node, why))
        except Exception as e:  # the command cannot run at all: a failure, with backoff
            del self.nodes[node_id]
            self._failed(node, f"cannot start: {e}", min_delay=BACKOFF_BASE)
            return node
        node.timers.append(self.clock.callLater(policy.start_timeout, self._start_timed_out, node))
        self._probe_ready(node)
        return node

    def _probe_ready(self, node: Node) -> None:
        if node.state is not NodeState.STARTING or self.nodes.get(node.node_id) is not node:
            return
        d = self.spawner.probe(node.spec)
        d.addCallback(lambda ok: self._ready_probed(node, bool(ok)))

    def _ready_probed(self, node: Node, ok: bool) -> None:
        if node.state is not NodeState.STARTING or self.nodes.get(node.node_id) is not node:
            return
        if not ok:
            node.timers.append(self.clock.callLater(READY_PROBE_EVERY, self._probe_ready, node))
            return
        self._cancel_timers(node)
        now = self.clock.seconds()
        node.ready_at = node.idle_since = node.polled_at = now
        node.memory = node.process.memory_bytes() if node.process is not None else None
        self._set(node, NodeState.ACTIVE, f"ready in {now - node.started_at:.3f}s")
        policy = self.policy
        host, port = getattr(node.process, "address", None) or (policy.host, node.spec.port)  # farm nodes
        server = RemoteServer(node.member_id, host, port, unix=node.spec.socket)
        try:
            self.pool.add(server, source=NODES)
        except ValueError as e:
            self._failed(node, f"cannot join the pool: {e}")
            return
        self.reconcile()

    def _start_timed_out(self, node: Node) -> None:
        if node.state is NodeState.STARTING:
            self._failed(node, f"not accepting connections after START_TIMEOUT={self.policy.start_timeout:g}s")

    # --- recycling, discarding, purging ---------------------------------------------------

    def recycle(self, node_id: int, why: str = "recycle (admin)") -> bool:
        """Recycle a node: its replacement first (when the pool needs one), then it is
        discarded.  False if it is not active or suspended."""
        node = self.nodes.get(node_id)
        if node is None or node.state not in (NodeState.ACTIVE, NodeState.SUSPENDED) or node.recycling:
            return False
        node.recycling = why
        log.info("{unit}: node {node_id}: {why}", unit=self.name, node_id=node_id, why=why)
        self.reconcile()
        if not self.running:
            self.discard(node_id, why)
        return True

    def discard(self, node_id: int, why: str = "discarded (admin)") -> bool:
        """No new sessions for the node; purged when its last session ends or after
        DRAIN_TIMEOUT.  False if it is not active, suspended or starting."""
        node = self.nodes.get(node_id)
        if node is None or node.state not in (NodeState.ACTIVE, NodeState.SUSPENDED, NodeState.STARTING):
            return False
        if node.state is NodeState.STARTING:
            self._purge(node, why)
            return True
        self._set(node, NodeState.DISCARDED, why)
        node.timers.append(self.clock.callLater(self.policy.drain_timeout, self._drain_timed_out, node))
        if self._backend(node) is None:
            self._purge(node, f"{why}; no sessions")
            return True
        self.pool.remove(node.member_id, source=NODES)  # idle: gone at once (-> _pool_event)
        self.reconcile()
        return True

    def _drain_timed_out(self, node: Node) -> None:
        if node.state is NodeState.DISCARDED:
            self._purge(node, f"DRAIN_TIMEOUT={self.policy.drain_timeout:g}s with {self.sessions(node)} sessions left")

    def _pool_event(self, event: PoolEvent) -> None:
        if event.source != NODES or event.kind != "removed":
            return
        for node in self.nodes.values():
            if node.member_id == event.server_id and node.state is NodeState.DISCARDED:
                self._purge(node, "its last session ended")
                return

    def _purge(self, node: Node, why: str) -> None:
        """Out of the pool, out of the serving list; asked to stop, killed after STOP_GRACE."""
        if node.state is NodeState.PURGED:
            return
        self._cancel_timers(node)
        self.total_sessions(node)  # keep its count
        backend = self._backend(node)
        self._set(node, NodeState.PURGED, why)
        if backend is not None and not backend.leaving:
            self.pool.remove(node.member_id, source=NODES)
        node.exit_expected = True
        if node.process is not None:
            node.stop_requested_at = self.clock.seconds()
            node.process.terminate()
            node.timers.append(self.clock.callLater(self.policy.stop_grace, self._kill, node))
        self.reconcile()

    def _kill(self, node: Node) -> None:
        if self.nodes.get(node.node_id) is node and node.process is not None:
            log.warn("{unit}: node {node_id} (pid {pid}) did not stop within STOP_GRACE={grace:g}s: killing it",
                     unit=self.name, node_id=node.node_id, pid=node.process.pid, grace=self.policy.stop_grace)
            node.process.kill()

    def _failed(self, node: Node, why: str, min_delay: float = 0.0) -> None:
        """A node that failed (start timeout, missed polls, crash, cannot start): purged, and
        its replacement waits out the crash backoff."""
        self.crash_streak += 1
        self.failed_at = self.clock.seconds()
        streak = self.crash_streak
        delay = 0.0 if streak == 1 else min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (streak - 2))
        delay = max(delay, min_delay)
        self.backoff_until = self.clock.seconds() + delay
        log.warn("{unit}: node {node_id} failed: {why}; {next}", unit=self.name, node_id=node.node_id,
                 why=why, next=(f"crash loop: {streak} failures in a row, next start in {delay:g}s"
                                if streak > 1 or delay else "replacing it at once"), streak=streak, delay=delay)
        if delay and self.running:
            if self._backoff_timer is not None and self._backoff_timer.active():
                self._backoff_timer.cancel()
            self._backoff_timer = self.clock.callLater(delay, self.reconcile)
        if node.state is NodeState.PURGED:
            return
        self._purge(node, f"failed: {why}")

    def _ended(self, node: Node, why: str) -> None:
        """The node's process ended: expected (asked to stop) or a crash.  Its id is free."""
        if self.nodes.get(node.node_id) is not node:
            return
        self._cancel_timers(node)
        del self.nodes[node.node_id]
        took = ("" if node.stop_requested_at is None
                else f" {self.clock.seconds() - node.stop_requested_at:.3f}s after the stop request")
        log.info("{unit}: node {node_id} ended{took}: {why}", unit=self.name, node_id=node.node_id,
                 why=why, took=took)
        if not node.exit_expected:
            node.exit_expected = True
            node.process = None
            sessions = self.sessions(node)
            self._failed(node, f"process ended unexpectedly ({why}) with {sessions} sessions")
        if not self.running:
            if not self.nodes:
                waiters, self._stopped = self._stopped, []
                self._unsubscribe()
                for d in waiters:
                    d.callback(None)
            return
        self.reconcile()

    # --- helpers ------------------------------------------------------------------------

    def _set(self, node: Node, state: NodeState, why: str) -> None:
        if node.state is not state:
            log.info("{unit}: node {node_id} {old} -> {new}: {why}", unit=self.name, node_id=node.node_id,
                     old=node.state.value, new=state.value, why=why, node_state=state.value)
        node.state = state
        node.reason = why

    def _cancel_timers(self, node: Node) -> None:
        for timer in node.timers:
            if timer.active():
                timer.cancel()
        node.timers = []

    def snapshot(self) -> list[dict[str, object]]:
        """The nodes as plain dicts (screen, JSON, /metrics), by id."""
        now = self.clock.seconds()
        rows = []
        for node in sorted(self.nodes.values(), key=lambda n: n.node_id):
            rows.append({
                "id": node.node_id, "member": node.member_id, "state": node.state.value,
                "reason": node.reason, "persistent": node.persistent,
                "pid": getattr(node.process, "pid", None),
                "endpoint": node.spec.socket or "{}:{}".format(
                    *(getattr(node.process, "address", None) or (self.policy.host, node.spec.port))),
                "sessions": self.sessions(node), "total_sessions": self.total_sessions(node),
                "age_seconds": None if node.ready_at is None else round(now - node.ready_at, 3),
                "memory_bytes": node.memory, "recycling": node.recycling,
            })
        return rows

