"""Nodes on farm hosts: an :class:`INodeSpawner` that has ``protheus-agent``s on other hosts start
and stop nodes (``FARM_HOSTS``), beside or instead of nodes on this host (``LOCAL_NODES``).

The broker keeps one farm channel per agent (the agent channel's handshake, naming port 0), then
``Attach``es under its broker id: the agent lists the nodes it runs for this broker.  Nodes the
:class:`NodeManager` asks for under an id the agent still runs are *adopted* (no restart: a
restarted broker takes its nodes back); those it does not ask for within ``FARM_WAIT`` after the
attach are stopped.  Orders name a node id and the template's name (``FARM_TEMPLATE``); the
agent's ini owns the command line.  A node is ready when it accepts a connection on the agent's
host (the agent probes it, and says ``ready``/``ended`` at once); its pool member is at the
address the agent gives.  While a channel is down its nodes keep running: polls connect to them
directly, stop orders wait for the channel to return.  A broker that stops leaves its farm
nodes running for its next start.  The persistent node always goes to the first farm host,
whose agent allows one per application across brokers.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.monitoring import commands as cmd
from protheus_broker.nodes.manager import FarmSettings, INodeProcess, INodeSpawner, NodePolicy, NodeSpec
from protheus_broker.nodes.spawner import ProcessSpawner

log = Logger()

#: Seconds the agent has to answer the handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds a direct poll connect may take (while a node's channel is down).
PROBE_TIMEOUT = 2.0
#: Seconds between asking the first farm host whether a refused persistent node is free now.
PERSISTENT_RETRY = 5.0


class _Quiet(Factory):
    noisy = False
    protocol = Protocol


def _why(failure: Failure) -> str:
    value = failure.value
    return str(value).strip().rstrip(".") or type(value).__name__


@implementer(INodeProcess)
class RemoteNode:
    """A node the manager asked for: on a farm host (``address`` once placed), or local."""

    def __init__(self, spawner: FarmSpawner, spec: NodeSpec, ended: Callable[[str], None]) -> None:
        self.spawner = spawner
        self.spec = spec
        self._ended = ended
        self.host: FarmHost | None = None
        self.address: tuple[str, int] | None = None  # the pool member (read by the manager)
        self.pid: int = 0
        self.memory: int | None = None
        self.local: Any = None  # the local process, when placed on this host
        self.placed = False  # a farm host answered StartNode (or it was adopted)
        self.stop_wanted: bool | None = None  # None, or kill
        self.ended = False

    def terminate(self) -> None:
        self.spawner.stop(self, kill=False)

    def kill(self) -> None:
        self.spawner.stop(self, kill=True)

    def memory_bytes(self) -> int | None:
        return self.local.memory_bytes() if self.local is not None else self.memory

    def end(self, why: str) -> None:
        """The node is gone: tell the manager once (on the next turn)."""
        if self.ended:
            return
        self.ended = True
        self.spawner.forget(self)
        self.spawner.reactor.callLater(0, self._ended, why)


class FarmChannel(cmd.QuietAMP):
    """The broker's end of one farm channel: handshake, Attach, then orders and events."""

    transport: Any
    peer_role = "agent"

    def __init__(self, host: FarmHost) -> None:
        super().__init__()
        self.host = host
        self.peer = f"{host.address[0]}:{host.address[1]}"
        self.attached: defer.Deferred[None] = defer.Deferred()
        self._timeout: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._timeout = self.host.spawner.reactor.callLater(HANDSHAKE_TIMEOUT, self._too_slow)
        defer.ensureDeferred(self._handshake()).addErrback(self._failed)

    def _too_slow(self) -> None:
        self._failed(Failure(cmd.AuthenticationFailed(f"no answer within {HANDSHAKE_TIMEOUT:g}s")))

    async def _handshake(self) -> None:
        farm = self.host.spawner.farm
        nonce = os.urandom(cmd.NONCE_BYTES)
        answer = await self.callRemote(cmd.Hello, version=cmd.PROTOCOL_VERSION, appserver_port=cmd.FARM_PORT,
                                       broker_nonce=nonce)
        expected = cmd.proof(farm.secret, b"agent", nonce, answer["agent_nonce"], cmd.FARM_PORT)
        if not cmd.proof_matches(expected, answer["agent_proof"]):
            raise cmd.AuthenticationFailed("the agent's proof is wrong (a different FARM_SECRET, or not our agent)")
        await self.callRemote(cmd.Authenticate, interval=0.0,
                              broker_proof=cmd.proof(farm.secret, b"broker", answer["agent_nonce"], nonce,
                                                     cmd.FARM_PORT))
        self.authenticated = True
        attached = await self.callRemote(cmd.Attach, broker=farm.broker_id)
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self.host.up(self, attached["host"], attached["nodes"])
        if not self.attached.called:
            self.attached.callback(None)

    def _failed(self, failure: Failure) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        if self.attached.called:
            return
        self.host.problem(self.dropped or f"farm channel failed: {_why(failure)}")
        self.attached.callback(None)  # (ClientService retries when the connection closes)
        if self.transport is not None:
            self.transport.loseConnection()

    def box_refused(self, why: str) -> None:
        self.host.problem(why)

    @cmd.NodeEvent.responder
    def node_event(self, node_id: int, state: str, detail: str) -> dict[str, Any]:
        if not self.authenticated:
            self.drop("a NodeEvent before authenticating")
            return {}
        self.host.spawner.event(self.host, node_id, state, detail)
        return {}

    def connectionLost(self, reason: Failure = Failure(Exception("connection lost"))) -> None:
        super().connectionLost(reason)
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        if not self.attached.called:
            self.attached.callback(None)
        self.host.down(self, _why(reason))


class _ChannelFactory(Factory):
    noisy = False

    def __init__(self, host: FarmHost) -> None:
        self.host = host

    def buildProtocol(self, addr: Any) -> FarmChannel:
        return FarmChannel(self.host)


class FarmHost:
    """One farm host (its agent's address), its channel and the nodes it listed on attaching."""

    def __init__(self, spawner: FarmSpawner, address: tuple[str, int]) -> None:
        self.spawner = spawner
        self.address = address
        self.channel: FarmChannel | None = None
        self.node_host = address[0]  # where its nodes listen (the agent says, on Attach)
        self.orphans: dict[int, dict[str, Any]] = {}  # listed by the agent, not (yet) adopted
        self.attached_once = False
        self.last_problem = ""
        self.since = spawner.reactor.seconds()  # when the link last went up or down (the screen)

    @property
    def name(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def up(self, channel: FarmChannel, node_host: str, rows: list[dict[str, Any]]) -> None:
        if self.channel is None:
            self.since = self.spawner.reactor.seconds()
        self.channel = channel
        self.node_host = node_host or self.address[0]
        self.last_problem = ""
        self.attached_once = True
        log.info("{unit}: farm host {host} attached; it runs {count} nodes of ours", unit=self.spawner.unit,
                 host=self.name, count=sum(1 for r in rows if r["state"] != "ended"))
        self.spawner.attached(self, rows)

    def down(self, channel: FarmChannel, why: str) -> None:
        if self.channel is channel:
            self.channel = None
            self.since = self.spawner.reactor.seconds()
            self.last_problem = self.last_problem or f"channel lost: {why}"
            log.warn("{unit}: farm host {host} channel lost ({why}); its nodes keep running",
                     unit=self.spawner.unit, host=self.name, why=why)

    def snapshot(self, now: float) -> dict[str, Any]:
        """The link as the screen shows it: up or down, since when, the last problem, our nodes
        placed there (ids)."""
        nodes = sorted(n.spec.node_id for n in self.spawner.nodes.values() if n.host is self and not n.ended)
        return {"host": self.name, "state": "up" if self.channel is not None else "down",
                "since": round(self.since, 3), "for_seconds": round(max(0.0, now - self.since), 3),
                "problem": self.last_problem or None, "nodes": nodes}

    def problem(self, why: str) -> None:
        if why != self.last_problem:
            log.warn("{unit}: farm host {host}: {why}", unit=self.spawner.unit, host=self.name, why=why)
            self.last_problem = why


@implementer(INodeSpawner)
class FarmSpawner:
    """Places nodes on the farm hosts (and on this host with LOCAL_NODES)."""

    def __init__(self, reactor: Any, policy: NodePolicy, unit: str, local: Any = None) -> None:
        assert policy.farm is not None
        self.reactor = reactor
        self.policy = policy
        self.farm: FarmSettings = policy.farm
        self.unit = unit
        self.local = local  # an INodeSpawner for this host, or None
        self.hosts = [FarmHost(self, address) for address in self.farm.hosts]
        self.nodes: dict[int, RemoteNode] = {}
        self.pending: list[RemoteNode] = []
        self.settled = False  # every host attached once, or FARM_WAIT passed
        self.leaving = False  # the broker stops: farm nodes are left running
        #: why the first farm host refused our persistent node (another broker holds it), until
        #: it says the application is free again (asked every PERSISTENT_RETRY seconds)
        self.persistent_refused: str | None = None
        self._retry: Any = None

    def snapshot(self) -> list[dict[str, Any]]:
        """Each farm host's link, in FARM_HOSTS order (status JSON ``pools[].farm``, /metrics)."""
        now = self.reactor.seconds()
        return [host.snapshot(now) for host in self.hosts]

    # --- placing --------------------------------------------------------------------------

    def settle(self, why: str) -> None:
        """Place the nodes asked for so far (adopting what the agents listed)."""
        if self.settled:
            return
        self.settled = True
        log.info("{unit}: farm settled ({why}); placing {count} nodes", unit=self.unit, why=why,
                 count=len(self.pending))
        pending, self.pending = self.pending, []
        for node in pending:
            if not node.ended:
                self._place(node)

    def spawn(self, spec: NodeSpec, ended: Callable[[str], None]) -> RemoteNode:
        node = RemoteNode(self, spec, ended)
        self.nodes[spec.node_id] = node
        if self.settled:
            self._place(node)
        else:
            self.pending.append(node)
        return node

    def _count(self, host: FarmHost | None) -> int:
        return sum(1 for n in self.nodes.values() if not n.ended and (n.host is host if host else n.local))

    def _place(self, node: RemoteNode) -> None:
        spec = node.spec
        for host in self.hosts:  # adoption: the agent still runs this node for us
            row = host.orphans.get(spec.node_id)
            if host.channel is not None and row is not None and row["persistent"] == spec.persistent:
                del host.orphans[spec.node_id]
                node.host, node.placed, node.pid = host, True, row["pid"]
                node.address = (host.node_host, row["port"])
                log.info("{unit}: node {node_id} adopted on farm host {host} (pid {pid}, port {port}, {state})",
                         unit=self.unit, node_id=spec.node_id, host=host.name, pid=row["pid"], port=row["port"],
                         state=row["state"])
                return
        linked = [h for h in self.hosts if h.channel is not None]
        if spec.persistent:  # one arbiter for the application's persistent node: the first host
            linked = [h for h in linked if h is self.hosts[0]]
            if not linked:
                node.end(f"the first farm host {self.hosts[0].name} (which runs the persistent node) "
                         "is not linked")
                return
        choices: list[FarmHost | None] = list(linked)
        if self.local is not None and not spec.persistent:
            choices.insert(0, None)
        if not choices:
            node.end("no farm host linked")
            return
        target = min(choices, key=self._count)
        if target is None:
            try:
                node.local = self.local.spawn(spec, node.end)
            except Exception as e:
                node.end(f"cannot start: {e}")
                return
            node.pid = node.local.pid
            return
        self._start(node, target)

    def _start(self, node: RemoteNode, host: FarmHost) -> None:
        assert host.channel is not None
        node.host = host
        spec = node.spec
        d = host.channel.callRemote(cmd.StartNode, node_id=spec.node_id, template=self.farm.template,
                                    persistent=spec.persistent, application=self.policy.application)

        def started(answer: dict[str, Any]) -> None:
            node.placed, node.pid = True, answer["pid"]
            node.address = (answer["host"] or host.node_host, answer["port"])
            log.info("{unit}: node {node_id} started on farm host {host}: pid {pid}, port {port}",
                     unit=self.unit, node_id=spec.node_id, host=host.name, pid=node.pid, port=answer["port"])
            if node.stop_wanted is not None:
                self._send_stop(node, node.stop_wanted)

        def refused(failure: Failure) -> None:
            if spec.persistent and failure.check(cmd.NodeRefused) and "persistent node" in _why(failure):
                self._persistent_refused(_why(failure))
            node.end(f"farm host {host.name} refused it: {_why(failure)}")
        d.addCallbacks(started, refused)

    def _persistent_refused(self, why: str) -> None:
        """Another broker holds the persistent node: the manager is told (claim_persistent) and
        does not try again until the first farm host says the application is free."""
        self.persistent_refused = why
        if self._retry is None or not self._retry.active():
            self._retry = self.reactor.callLater(PERSISTENT_RETRY, self._ask_persistent)

    def _ask_persistent(self) -> None:
        channel = self.hosts[0].channel
        if channel is None:
            self._retry = self.reactor.callLater(PERSISTENT_RETRY, self._ask_persistent)
            return

        def answered(answer: dict[str, Any]) -> None:
            if answer["refusal"]:
                self._persistent_refused(answer["refusal"])
            else:
                self.persistent_refused = None
        channel.callRemote(cmd.PersistentHolder, application=self.policy.application).addCallbacks(
            answered, lambda _: self._persistent_refused(self.persistent_refused or "no answer"))

    def claim(self, local: Callable[[], str | None]) -> Callable[[], str | None]:
        """The manager's ``claim_persistent``: this host's lock (*local*), then the farm's."""
        def claim_persistent() -> str | None:
            return local() or (f"the first farm host {self.hosts[0].name}: {self.persistent_refused}"
                               if self.persistent_refused else None)
        return claim_persistent

    # --- orders and events ----------------------------------------------------------------

    def stop(self, node: RemoteNode, kill: bool) -> None:
        if node.ended:
            return
        if node.local is not None:
            node.local.kill() if kill else node.local.terminate()
            return
        if node in self.pending or node.host is None:
            if node in self.pending:
                self.pending.remove(node)
            node.end("stopped before it was placed")
            return
        if self.leaving:
            node.end(f"left running on farm host {node.host.name} (the broker stops)")
            return
        node.stop_wanted = kill or bool(node.stop_wanted)
        if node.placed:
            self._send_stop(node, node.stop_wanted)

    def _send_stop(self, node: RemoteNode, kill: bool) -> None:
        host = node.host
        if host is None or host.channel is None:
            return  # sent when the channel returns (attached)
        d = host.channel.callRemote(cmd.StopNode, node_id=node.spec.node_id, kill=kill)

        def answered(answer: dict[str, Any]) -> None:
            if not answer["known"]:
                node.end(f"no longer on farm host {host.name}")
        d.addCallbacks(answered, lambda f: None)  # (a lost channel: sent again on attaching)

    def _stop_orphan(self, host: FarmHost, node_id: int, why: str) -> None:
        if host.channel is not None:
            log.info("{unit}: stopping node {node_id} on farm host {host}: {why}", unit=self.unit,
                     node_id=node_id, host=host.name, why=why)
            host.channel.callRemote(cmd.StopNode, node_id=node_id, kill=False).addErrback(lambda f: None)

    def event(self, host: FarmHost, node_id: int, state: str, detail: str) -> None:
        """NodeEvent from *host*: 'ready' (polls see it) or 'ended'."""
        node = self.nodes.get(node_id)
        if state == "ended":
            if node is not None and node.host is host:
                node.end(detail or "ended")
            else:
                host.orphans.pop(node_id, None)

    def attached(self, host: FarmHost, rows: list[dict[str, Any]]) -> None:
        """The agent listed our nodes: known ones carry on (or ended while we were away, or
        wait for a stop); the rest are orphans, adopted or stopped after FARM_WAIT."""
        listed = {row["node_id"]: row for row in rows}
        for node in [n for n in self.nodes.values() if n.host is host and n.placed]:
            row = listed.pop(node.spec.node_id, None)
            if row is None or row["state"] == "ended" or row["port"] != (node.address or ("", 0))[1]:
                node.end(f"gone from farm host {host.name} while its channel was down"
                         + (f" ({row['detail']})" if row and row["detail"] else ""))
            elif node.stop_wanted is not None:
                self._send_stop(node, node.stop_wanted)
        host.orphans = {i: r for i, r in listed.items() if r["state"] != "ended"}
        if host.orphans:
            self.reactor.callLater(self.farm.wait, self._stop_unadopted, host)
        if all(h.attached_once for h in self.hosts):
            self.settle("every farm host attached")

    def _stop_unadopted(self, host: FarmHost) -> None:
        if not self.settled:  # the manager has not asked for its nodes yet
            self.reactor.callLater(self.farm.wait, self._stop_unadopted, host)
            return
        for node_id in list(host.orphans):
            del host.orphans[node_id]
            self._stop_orphan(host, node_id, "the broker no longer wants it (not adopted)")

    def forget(self, node: RemoteNode) -> None:
        if self.nodes.get(node.spec.node_id) is node:
            del self.nodes[node.spec.node_id]
        if node in self.pending:
            self.pending.remove(node)

    # --- polls ----------------------------------------------------------------------------

    def probe(self, spec: NodeSpec) -> defer.Deferred[bool]:
        node = self.nodes.get(spec.node_id)
        if node is None:
            return defer.succeed(False)
        if node.local is not None:
            result: defer.Deferred[bool] = self.local.probe(spec)
            return result
        host = node.host
        if host is None or not node.placed or node.address is None:
            return defer.succeed(False)
        if host.channel is not None:
            d = host.channel.callRemote(cmd.ProbeNode, node_id=spec.node_id)

            def answered(answer: dict[str, Any]) -> bool:
                node.memory = answer["memory_bytes"] or None
                return bool(answer["accepting"])
            return d.addCallbacks(answered, lambda _: False)
        endpoint = HostnameEndpoint(self.reactor, node.address[0], node.address[1], timeout=PROBE_TIMEOUT)
        connecting: defer.Deferred[Any] = endpoint.connect(_Quiet())

        def connected(protocol: Any) -> bool:
            protocol.transport.loseConnection()
            return True
        return connecting.addCallbacks(connected, lambda _: False)


def _attached(channel: Any) -> defer.Deferred[None]:
    """``prepareConnection``: the handshake and Attach done (or failed: the channel closes and
    ClientService retries with backoff)."""
    attached: defer.Deferred[None] = channel.attached
    return attached


@implementer(IStreamClientEndpoint)
class _Reporting:
    """The farm host's endpoint: a failed connect is the host's last problem (the screen)."""

    def __init__(self, endpoint: Any, host: FarmHost) -> None:
        self.endpoint = endpoint
        self.host = host

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            self.host.problem(f"cannot connect: {_why(failure)}")
            return failure
        connecting: defer.Deferred[Any] = self.endpoint.connect(factory)
        return connecting.addErrback(failed)


class FarmService(MultiService):
    """The farm channels of one unit (reconnected with backoff).  Add it to the unit after the
    NodeService: it stops first, so the manager's stop leaves the farm nodes running."""

    def __init__(self, reactor: Any, spawner: FarmSpawner) -> None:
        super().__init__()
        self.reactor = reactor
        self.spawner = spawner
        self._settle_timer: Any = None
        for host in spawner.hosts:
            backoff = backoffPolicy(initialDelay=0.25, maxDelay=10.0, factor=1.5)
            service = ClientService(
                _Reporting(HostnameEndpoint(reactor, host.address[0], host.address[1], timeout=5), host),
                _ChannelFactory(host), retryPolicy=backoff, clock=reactor,
                prepareConnection=_attached)
            service.setServiceParent(self)

    def startService(self) -> None:
        self.spawner.leaving = False
        super().startService()
        self._settle_timer = self.reactor.callLater(
            self.spawner.farm.wait, self.spawner.settle, f"FARM_WAIT={self.spawner.farm.wait:g}s passed")

    def watch(self, manager: Any) -> None:
        """A persistent node another broker holds on the farm waits like a locked local one
        (the manager's ``claim_persistent``), instead of failing again and again."""
        manager.claim_persistent = self.spawner.claim(manager.claim_persistent)

    def stopService(self) -> Any:
        self.spawner.leaving = True
        if self.spawner._retry is not None and self.spawner._retry.active():
            self.spawner._retry.cancel()
        if self._settle_timer is not None and self._settle_timer.active():
            self._settle_timer.cancel()
        return super().stopService()


def make_spawner(reactor: Any, policy: NodePolicy, unit: str) -> tuple[INodeSpawner, Any]:
    """The unit's spawner, and the service to add after its NodeService (None without a farm)."""
    if policy.farm is None:
        return ProcessSpawner(reactor, policy, unit), None
    local = ProcessSpawner(reactor, policy, unit) if policy.farm.local else None
    spawner = FarmSpawner(reactor, policy, unit, local)
    return spawner, FarmService(reactor, spawner)
