"""The agent as a farm host (``[NODES]``): nodes started and stopped on brokers' orders.  Logic
only: processes come from an :class:`INodeLauncher`, links are anything with ``event()``.

- A broker orders by node id and template *name*; the command line is the agent's own
  (``COMMAND_<name>``).  Unknown names are refused.
- Nodes belong to the broker that started them (its id, as given in ``Attach``).  When its link
  goes, they keep running; when it attaches again it gets them listed, adopts what it wants and
  stops the rest.  Nodes of a broker away longer than ``ORPHAN_TIMEOUT`` are stopped.
- One persistent node per application on this host, whichever broker asks: a second broker is
  refused with a reason while the first broker's link lives, and for ``PERSISTENT_GRACE`` after
  it is lost; then the orphaned persistent node is stopped and the next broker may start its own.
- A node is *ready* once it accepts a connection on HOST:port; brokers hear ``ready`` and
  ``ended`` (with the exit status) at once, and those that were away hear it on attaching.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from protheus_broker.agent.settings import FarmConfig
from protheus_broker.monitoring.commands import NodeRefused, UnknownTemplate

log = Logger()

_APPLICATION_RE = re.compile(r"^[A-Za-z0-9_.\-]{0,64}$")

#: Seconds between readiness probes of a starting node.
READY_PROBE_EVERY = 0.05


class INodeLauncher(Interface):
    """Starts node processes on this host and connects to them."""

    def launch(argv: list[str], env: dict[str, str], label: str, ended: Callable[[str], None]) -> Any:
        """Start *argv*; call *ended* with its exit status once; return an object with ``pid``,
        ``terminate()``, ``kill()`` and ``memory_bytes()``.  May raise OSError."""

    def port_free(host: str, port: int) -> bool:
        """True if no process listens on host:port."""

    def probe(host: str, port: int) -> Deferred[bool]:
        """True if host:port accepts a connection (never fails)."""


class FarmLink(Protocol):
    def event(self, node_id: int, state: str, detail: str) -> None: ...


@dataclass
class FarmNode:
    """One node this agent runs for a broker."""

    broker: str
    node_id: int
    template: str
    port: int
    persistent: bool
    application: str
    process: Any = None
    state: str = "starting"  # starting, ready, stopping, ended
    detail: str = ""
    release: bool = False  # its broker stopped it: the persistent hold goes with it
    timers: list[Any] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "port": self.port, "pid": getattr(self.process, "pid", 0) or 0,
                "persistent": self.persistent, "state": self.state, "template": self.template,
                "application": self.application, "detail": self.detail}


class Farm:
    """This host's nodes, by broker (see the module docstring)."""

    def __init__(self, clock: Any, config: FarmConfig, launcher: INodeLauncher) -> None:
        self.clock = clock
        self.config = config
        self.launcher = launcher
        self.nodes: dict[tuple[str, int], FarmNode] = {}
        self.links: dict[str, FarmLink] = {}
        self.lost_at: dict[str, float] = {}  # broker -> when its link went
        self._timers: dict[str, list[Any]] = {}
        self.ended: dict[str, list[FarmNode]] = {}  # ended while their broker was away
        #: application -> the broker holding its persistent node: while its link lives (a crashed
        #: persistent node is its to restart), and PERSISTENT_GRACE after; or until it stops it
        self.claims: dict[str, str] = {}

    # --- brokers ----------------------------------------------------------------------------

    def attach(self, broker: str, link: FarmLink) -> list[dict[str, Any]]:
        """A broker's link is up: its nodes (running, and those that ended while it was away)."""
        old = self.links.get(broker)
        self.links[broker] = link
        self.lost_at.pop(broker, None)
        for timer in self._timers.pop(broker, []):
            if timer.active():
                timer.cancel()
        rows = [n.row() for n in self.nodes.values() if n.broker == broker]
        rows += [n.row() for n in self.ended.pop(broker, [])]
        log.info("farm: broker {broker} attached{again}; {count} of its nodes here", broker=broker,
                 again=" (replacing its previous link)" if old is not None else "", count=len(rows))
        return rows

    def detach(self, broker: str, link: FarmLink) -> None:
        """A broker's link is gone: its nodes keep running; its persistent hold lasts
        PERSISTENT_GRACE, its other nodes ORPHAN_TIMEOUT."""
        if self.links.get(broker) is not link:
            return
        del self.links[broker]
        self.lost_at[broker] = self.clock.seconds()
        mine = [n for n in self.nodes.values() if n.broker == broker]
        log.info("farm: broker {broker} link lost; its {count} nodes keep running", broker=broker,
                 count=len(mine))
        timers = self._timers.setdefault(broker, [])
        if broker in self.claims.values():
            timers.append(self.clock.callLater(self.config.persistent_grace, self._grace_over, broker))
        if self.config.orphan_timeout:
            timers.append(self.clock.callLater(self.config.orphan_timeout, self._orphaned, broker))

    def _grace_over(self, broker: str) -> None:
        for application in [a for a, b in self.claims.items() if b == broker]:
            log.info("farm: broker {broker} no longer holds the persistent node of {application}",
                     broker=broker, application=application)
            del self.claims[application]
        for node in list(self.nodes.values()):
            if node.broker == broker and node.persistent:
                self.stop(broker, node.node_id, reason=f"its broker {broker} has been away over "
                                                       f"PERSISTENT_GRACE={self.config.persistent_grace:g}s")

    def _orphaned(self, broker: str) -> None:
        for node in list(self.nodes.values()):
            if node.broker == broker:
                self.stop(broker, node.node_id, reason=f"its broker {broker} has been away over "
                                                       f"ORPHAN_TIMEOUT={self.config.orphan_timeout:g}s")

    # --- orders -----------------------------------------------------------------------------

    def persistent_holder(self, broker: str, application: str) -> str | None:
        """Why *broker* may not run *application*'s persistent node here (None: it may)."""
        holder = self.claims.get(application)
        if holder is None or holder == broker:
            return None
        running = [n for n in self.nodes.values() if n.persistent and n.application == application]
        node = f"node {running[0].node_id} on port {running[0].port}" if running else "its node restarting"
        if holder in self.links:
            return f"the persistent node of {application} is held by broker {holder} ({node}, its link is up)"
        away = self.clock.seconds() - self.lost_at.get(holder, self.clock.seconds())
        return (f"the persistent node of {application} is held by broker {holder} ({node}, its link lost "
                f"{away:.0f}s ago; released after PERSISTENT_GRACE={self.config.persistent_grace:g}s)")

    def start(self, broker: str, node_id: int, template: str, persistent: bool,
              application: str) -> FarmNode:
        """Start a node for *broker*; raises UnknownTemplate or NodeRefused."""
        config = self.config
        argv_template = config.templates.get(template.upper())
        if argv_template is None:
            raise UnknownTemplate(f"no COMMAND_{template} in this agent's [NODES] "
                                  f"(it has {', '.join(sorted(config.templates))})")
        if not 1 <= node_id <= 1_000_000:
            raise NodeRefused(f"node id {node_id} out of range (1..1000000)")
        if not _APPLICATION_RE.match(application):
            raise NodeRefused(f"application name {application[:40]!r}: letters, digits, _ . - only (64 at most)")
        if (broker, node_id) in self.nodes:
            node = self.nodes[(broker, node_id)]
            raise NodeRefused(f"node {node_id} of broker {broker} still runs here ({node.state})")
        if persistent:
            held = self.persistent_holder(broker, application)
            if held:
                raise NodeRefused(held)
        used = {n.port for n in self.nodes.values()}
        if len(self.nodes) >= config.max_nodes:
            raise NodeRefused(f"MAX_NODES={config.max_nodes} nodes run here already")
        port = 0
        for candidate in range(config.base_port + 1, config.base_port + config.max_nodes + 1):
            if candidate not in used and self.launcher.port_free(config.host, candidate):
                port = candidate
                break
        if not port:
            raise NodeRefused(f"no free port in {config.base_port + 1}..{config.base_port + config.max_nodes}")
        values = {"id": str(node_id), "port": str(port), "persistent": "1" if persistent else "0",
                  "application": application}
        argv = [word.format(**values) for word in argv_template]
        node = FarmNode(broker, node_id, template.upper(), port, persistent, application)
        env = {"PROTHEUS_NODE_ID": str(node_id), "PROTHEUS_NODE_PERSISTENT": values["persistent"],
               "PROTHEUS_BROKER": broker}
        try:
            node.process = self.launcher.launch(argv, env, f"{broker} node {node_id}",
                                                lambda why: self._ended(node, why))
        except OSError as e:
            raise NodeRefused(f"cannot run COMMAND_{template.upper()}: {e}") from None
        self.nodes[(broker, node_id)] = node
        if persistent:
            self.claims[application] = broker
        log.info("farm: broker {broker} node {node_id}{persistent}: pid {pid} on {host}:{port}: {command}",
                 broker=broker, node_id=node_id, persistent=" (persistent)" if persistent else "",
                 pid=node.process.pid, host=config.host, port=port, command=" ".join(argv))
        node.timers.append(self.clock.callLater(config.start_timeout, self._start_timed_out, node))
        self._probe_ready(node)
        return node

    def stop(self, broker: str, node_id: int, kill: bool = False, reason: str = "") -> bool:
        """Ask a node to stop (killed after STOP_GRACE); False if there is no such node.  A
        broker that stops its persistent node itself gives up its hold once the node has ended."""
        node = self.nodes.get((broker, node_id))
        if node is None:
            return False
        if node.persistent and not reason:
            node.release = True
        log.info("farm: stopping broker {broker} node {node_id} (pid {pid}): {why}", broker=broker,
                 node_id=node_id, pid=node.process.pid, why=reason or ("killed by its broker" if kill
                                                                       else "asked by its broker"))
        if kill:
            node.process.kill()
        elif node.state != "stopping":
            node.state = "stopping"
            node.timers.append(self.clock.callLater(self.config.stop_grace, node.process.kill))
            node.process.terminate()  # (its end cancels the kill)
        return True

    def probe(self, broker: str, node_id: int) -> Deferred[tuple[bool, int]]:
        """(accepting, memory bytes) of one node; (False, 0) if there is no such node."""
        node = self.nodes.get((broker, node_id))
        if node is None:
            return succeed((False, 0))
        d = self.launcher.probe(self.config.host, node.port)
        return d.addCallback(lambda ok: (bool(ok), node.process.memory_bytes() or 0))

    # --- node life --------------------------------------------------------------------------

    def _probe_ready(self, node: FarmNode) -> None:
        if node.state != "starting" or self.nodes.get((node.broker, node.node_id)) is not node:
            return
        self.launcher.probe(self.config.host, node.port).addCallback(self._ready_probed, node)

    def _ready_probed(self, ok: bool, node: FarmNode) -> None:
        if node.state != "starting" or self.nodes.get((node.broker, node.node_id)) is not node:
            return
        if not ok:
            node.timers.append(self.clock.callLater(READY_PROBE_EVERY, self._probe_ready, node))
            return
        node.state = "ready"
        self._cancel(node)
        log.info("farm: broker {broker} node {node_id} ready on port {port}", broker=node.broker,
                 node_id=node.node_id, port=node.port)
        self._tell(node, "ready", "")

    def _start_timed_out(self, node: FarmNode) -> None:
        if node.state == "starting":
            self.stop(node.broker, node.node_id, reason=f"not accepting connections after "
                                                        f"START_TIMEOUT={self.config.start_timeout:g}s")

    def _ended(self, node: FarmNode, why: str) -> None:
        if self.nodes.get((node.broker, node.node_id)) is not node:
            return
        del self.nodes[(node.broker, node.node_id)]
        self._cancel(node)
        node.state, node.detail = "ended", why
        if node.release and self.claims.get(node.application) == node.broker:
            del self.claims[node.application]
        log.info("farm: broker {broker} node {node_id} ended: {why}", broker=node.broker,
                 node_id=node.node_id, why=why)
        if node.broker in self.links:
            self._tell(node, "ended", why)
        elif not (node.broker in self.lost_at and self._gone_long(node.broker)):
            self.ended.setdefault(node.broker, []).append(node)  # told when it attaches

    def _gone_long(self, broker: str) -> bool:
        timeout = self.config.orphan_timeout
        return bool(timeout) and self.clock.seconds() - self.lost_at[broker] >= timeout

    def _tell(self, node: FarmNode, state: str, detail: str) -> None:
        link = self.links.get(node.broker)
        if link is not None:
            link.event(node.node_id, state, detail)

    def _cancel(self, node: FarmNode) -> None:
        for timer in node.timers:
            if timer.active():
                timer.cancel()
        node.timers = []

    def stop_all(self) -> None:
        """The agent is stopping: every node is asked to stop (their process groups get SIGTERM
        anyway when the agent dies)."""
        for node in list(self.nodes.values()):
            self.stop(node.broker, node.node_id, reason="the agent is stopping")
