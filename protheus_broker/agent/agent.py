"""``protheus-agent``: beside each AppServer, measures it and reports to the broker over AMP.

The agent listens (plain TCP with a shared secret, or mutual TLS); brokers connect, authenticate
(``amp_commands``), name the AppServer by its port, and then receive a ``Report`` every interval
they asked for.  Every ``SAMPLE_INTERVAL`` the agent measures each watched AppServer (psutil, see
``metrics_probe``), checks that the process runs (not stopped, traced or a zombie) and accepts what
the kernel queued for it (``ACCEPT_TIMEOUT``), and that it accepts a local connect; when that
answer changes, every broker watching it hears at once instead of at its next interval.

What a stranger gets before authenticating is bounded: AMP boxes of 4 KiB / 8 keys, 4 boxes,
``HANDSHAKE_TIMEOUT`` seconds; refusals are logged once a minute per address.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from protheus_broker.monitoring import commands as cmd
from protheus_broker.agent.farm import Farm
from protheus_broker.agent.settings import AgentConfig, WatchedAppServer
from protheus_broker.agent.probe import (
    AcceptQueue,
    ProbeProblem,
    ProcessFigures,
    ProcessProbe,
    Responsiveness,
    host_figures,
    read_accept_queue,
)

log = Logger()


class _QuietConnect(Factory):
    """Connect-and-hang-up checks, every second: no 'Starting factory' lines in the log."""

    noisy = False
    protocol = Protocol


_QUIET_CONNECT = _QuietConnect()

#: Seconds a broker has to finish the handshake before the agent hangs up.
HANDSHAKE_TIMEOUT = 10.0
#: The shortest report interval a broker may ask for.
MIN_INTERVAL = 0.05
#: The longest problem text a report carries (the broker's box limit leaves room for it).
MAX_PROBLEM = 1000
#: Refused peers are logged once per address at most this often (with how many were held back).
REFUSAL_LOG_INTERVAL = 60.0
#: Addresses the refusal log remembers (a flood from many addresses cannot grow it further).
MAX_REFUSAL_ADDRESSES = 1024


class RefusalLog:
    """Why peers were refused, without letting a stranger who reconnects in a loop flood the
    log: the first refusal of an address at once, then at most one line per address every
    *interval* seconds, saying how many were held back."""

    def __init__(self, clock: Any, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.clock = clock
        self.interval = interval
        self.last: dict[str, tuple[float, int]] = {}  # address -> (logged at, held back since)

    def emit(self, host: str, level: LogLevel, format: str, **fields: Any) -> None:
        now = self.clock.seconds()
        logged_at, held = self.last.get(host, (-math.inf, 0))
        if now - logged_at < self.interval:
            self.last[host] = (logged_at, held + 1)
            return
        if host not in self.last and len(self.last) >= MAX_REFUSAL_ADDRESSES:
            self.last = {h: v for h, v in self.last.items() if now - v[0] < self.interval}
            if len(self.last) >= MAX_REFUSAL_ADDRESSES:
                return  # (a flood from over a thousand addresses: their first lines are out)
        self.last[host] = (now, 0)
        more = f" ({held} more refused from {host} in the last {now - logged_at:.0f}s)" if held else ""
        log.emit(level, format + "{more}", more=more, **fields)


@dataclass(frozen=True)
class AppServerSample:
    """One measurement of one AppServer (agent clock)."""

    figures: ProcessFigures | None
    accepting: bool
    problem: str
    taken_at: float


class AppServerWatch:
    """One watched AppServer: its probe, its latest sample, the broker channels that follow it."""

    def __init__(self, reactor: Any, watched: WatchedAppServer,
                 measure: Callable[[], ProcessFigures] | None = None, connect_timeout: float = 1.0,
                 connect_check: Callable[[], Awaitable[str]] | None = None,
                 accept_queue: Callable[[], AcceptQueue | None] | None = None,
                 accept_timeout: float = 3.0) -> None:
        self.reactor = reactor
        self.watched = watched
        self.measure = measure or ProcessProbe(watched).measure
        self.connect_timeout = connect_timeout
        self.connect_check = connect_check or self._connect_check
        self.accept_queue = accept_queue or (lambda: read_accept_queue(watched.port))
        self.responsiveness = Responsiveness(accept_timeout)
        self.latest = AppServerSample(None, False, "not sampled yet", reactor.seconds())
        self.links: set[AgentProtocol] = set()

    async def sample(self) -> AppServerSample:
        """Measure the process, see that it runs and accepts what is queued for it, and try a
        local connect; tell the brokers at once on a change."""
        figures: ProcessFigures | None = None
        problem = ""
        try:
            figures = self.measure()
        except ProbeProblem as exc:
            problem = f"cannot measure: {exc}"
        hung = ""
        if figures is not None:  # (read before our own connect joins the queue)
            hung = self.responsiveness.judge(self.reactor.seconds(), figures.pid, figures.status,
                                             self.accept_queue())
        refused = await self.connect_check()
        if refused:
            problem = f"local connect to {self.watched.host}:{self.watched.port} failed: {refused}"
        elif hung:
            problem = hung
        problem = problem[:MAX_PROBLEM]
        accepting = figures is not None and not refused and not hung
        previous = self.latest
        self.latest = AppServerSample(figures, accepting, problem, self.reactor.seconds())
        if previous.accepting != accepting or (previous.problem != problem and problem):
            if problem:
                log.warn("AppServer {name} (port {port}) not accepting: {problem}",
                         name=self.watched.name, port=self.watched.port, problem=problem)
            else:
                log.info("AppServer {name} (port {port}) accepting connections (pid {pid})",
                         name=self.watched.name, port=self.watched.port, pid=figures.pid if figures else None)
            for link in list(self.links):
                link.push()
        return self.latest

    async def _connect_check(self) -> str:
        """'' if the AppServer accepts a local connect, else why not."""
        endpoint = HostnameEndpoint(self.reactor, self.watched.host, self.watched.port,
                                    timeout=self.connect_timeout)
        try:
            protocol: Any = await endpoint.connect(_QUIET_CONNECT)
        except Exception as exc:
            return str(exc).strip().rstrip(".") or type(exc).__name__
        protocol.transport.loseConnection()
        return ""


class Agent:
    """The agent's logic: the watched AppServers, the secret, the host's figures.  No listener."""

    def __init__(self, reactor: Any, config: AgentConfig,
                 watches: dict[int, AppServerWatch] | None = None,
                 host: tuple[int, int] | None = None, farm: Farm | None = None) -> None:
        self.reactor = reactor
        #: [NODES]: brokers may start nodes here (the tap gives it its process launcher)
        self.farm = farm
        self.config = config
        self.secret = config.secret
        self.watches = watches if watches is not None else {
            w.port: AppServerWatch(reactor, w, accept_timeout=config.accept_timeout)
            for w in config.appservers}
        self.physical_memory, self.cpu_count = host or host_figures()
        self.refusals = RefusalLog(reactor)

    def sample_all(self) -> defer.Deferred[Any]:
        return defer.DeferredList([defer.ensureDeferred(w.sample()) for w in self.watches.values()])

    def report_values(self, watch: AppServerWatch) -> dict[str, Any]:
        """The arguments of a ``Report`` (or a ``Sample`` answer) for *watch*'s latest sample."""
        sample = watch.latest
        figures = sample.figures
        return {
            "figures": {
                "memory_bytes": figures.memory_bytes if figures else 0,
                "users": figures.users if figures else 0,
                "threads": figures.threads if figures else 0,
                "cpu_percent": figures.cpu_percent if figures else 0.0,
                "accepting": sample.accepting,
                "age": max(0.0, self.reactor.seconds() - sample.taken_at),
                "physical_memory": self.physical_memory,
                "cpu_count": self.cpu_count,
                "problem": sample.problem,
            },
        }


class AgentProtocol(cmd.QuietAMP):
    """The agent's end of one broker channel."""

    transport: Any
    peer_role = "broker"

    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent
        self.watch: AppServerWatch | None = None
        self.broker_nonce = b""
        self.agent_nonce = b""
        self.authenticated = False
        self.pusher: task.LoopingCall | None = None
        self.peer = "?"
        self.peer_host = "?"
        self.timeout: Any = None
        self.farm_channel = False  # Hello named FARM_PORT: node orders, no reports
        self.broker_id = ""  # set by Attach on the farm channel

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.peer_host = str(getattr(peer, "host", peer))
        self.peer = f"{self.peer_host}:{getattr(peer, 'port', '')}"
        self.timeout = self.agent.reactor.callLater(HANDSHAKE_TIMEOUT, self._too_slow)

    def _too_slow(self) -> None:
        if self.dropped or self.transport is None:
            return
        self.agent.refusals.emit(self.peer_host, LogLevel.warn,
                                 "broker {peer}: no handshake within {timeout:g}s; dropping it",
                                 peer=self.peer, timeout=HANDSHAKE_TIMEOUT)
        self.transport.abortConnection()

    def box_refused(self, why: str) -> None:
        self.agent.refusals.emit(self.peer_host, LogLevel.warn,
                                 "broker {peer}: {why}; dropping the connection", peer=self.peer, why=why)

    def _refuse(self, why: str) -> None:
        self.agent.refusals.emit(self.peer_host, LogLevel.error, "broker {peer} refused: {why}; dropping it",
                                 peer=self.peer, why=why)
        self.agent.reactor.callLater(0, self.transport.loseConnection)  # after the error is sent

    @cmd.Hello.responder
    def hello(self, version: int, appserver_port: int, broker_nonce: bytes) -> dict[str, Any]:
        if version != cmd.PROTOCOL_VERSION:
            self._refuse(f"protocol version {version} (this agent speaks {cmd.PROTOCOL_VERSION})")
            raise cmd.UnsupportedVersion(f"agent speaks version {cmd.PROTOCOL_VERSION}")
        watch = self.agent.watches.get(appserver_port)
        if appserver_port == cmd.FARM_PORT and self.agent.farm is not None:
            if len(broker_nonce) != cmd.NONCE_BYTES:
                self._refuse("malformed challenge")
                raise cmd.AuthenticationFailed("malformed challenge")
            self.farm_channel = True
            self.broker_nonce = broker_nonce
            self.agent_nonce = os.urandom(cmd.NONCE_BYTES)
            return {"agent_nonce": self.agent_nonce, "appserver": "farm",
                    "agent_proof": cmd.proof(self.agent.secret, b"agent", broker_nonce, self.agent_nonce,
                                             cmd.FARM_PORT)}
        if watch is None:
            watched = sorted(self.agent.watches)
            ports = ", ".join(str(p) for p in watched[:10]) + (", ..." if len(watched) > 10 else "")
            # (the answer stays well inside the broker's 4 KiB box limit before authentication)
            self._refuse(f"asked for AppServer port {appserver_port}, not watched here ({ports})")
            raise cmd.UnknownAppServer(f"no AppServer on port {appserver_port} here (watching {ports})")
        if len(broker_nonce) != cmd.NONCE_BYTES:
            self._refuse("malformed challenge")
            raise cmd.AuthenticationFailed("malformed challenge")
        self.watch = watch
        self.broker_nonce = broker_nonce
        self.agent_nonce = os.urandom(cmd.NONCE_BYTES)
        return {
            "agent_nonce": self.agent_nonce,
            "agent_proof": cmd.proof(self.agent.secret, b"agent", broker_nonce, self.agent_nonce,
                                     appserver_port),
            "appserver": watch.watched.name,
        }

    @cmd.Authenticate.responder
    def authenticate(self, broker_proof: bytes, interval: float) -> dict[str, Any]:
        if self.farm_channel:
            return self._authenticate_farm(broker_proof)
        watch = self.watch
        if watch is None:
            self._refuse("Authenticate before Hello")
            raise cmd.AuthenticationFailed("Hello first")
        expected = cmd.proof(self.agent.secret, b"broker", self.agent_nonce, self.broker_nonce,
                             watch.watched.port)
        if not cmd.proof_matches(expected, broker_proof):
            self._refuse("wrong proof (a different AGENT_SECRET, or not our broker)")
            raise cmd.AuthenticationFailed("wrong proof")
        if not (interval == 0 or MIN_INTERVAL <= interval <= 3600):
            self._refuse(f"report interval {interval!r} out of range")
            raise cmd.AuthenticationFailed("bad interval")
        self.authenticated = True
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()
        log.info("broker {peer} authenticated for AppServer {name} (port {port}); "
                 "{what}", peer=self.peer, name=watch.watched.name, port=watch.watched.port,
                 what=f"reports every {interval:g}s" if interval else "probe")
        if interval:
            watch.links.add(self)
            self.pusher = task.LoopingCall(self.push)
            self.pusher.clock = self.agent.reactor
            self.pusher.start(interval, now=False)
            self.agent.reactor.callLater(0, self.push)  # the first report right after the answer
        return {}

    def _authenticate_farm(self, broker_proof: bytes) -> dict[str, Any]:
        if self.authenticated:
            self._refuse("Authenticate twice")
            raise cmd.AuthenticationFailed("already authenticated")
        expected = cmd.proof(self.agent.secret, b"broker", self.agent_nonce, self.broker_nonce, cmd.FARM_PORT)
        if not cmd.proof_matches(expected, broker_proof):
            self._refuse("wrong proof on the farm channel (a different secret, or not our broker)")
            raise cmd.AuthenticationFailed("wrong proof")
        self.authenticated = True
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()
        log.info("broker {peer} authenticated on the farm channel", peer=self.peer)
        return {}

    def _farm(self) -> Farm:
        """The farm, for an authenticated and attached farm channel (else NotAuthenticated)."""
        if not (self.farm_channel and self.authenticated and self.broker_id) or self.agent.farm is None:
            self._refuse("a node order before authenticating and attaching on the farm channel")
            raise cmd.NotAuthenticated("authenticate on the farm channel and Attach first")
        return self.agent.farm

    @cmd.Attach.responder
    def attach(self, broker: str) -> dict[str, Any]:
        if not (self.farm_channel and self.authenticated) or self.agent.farm is None:
            self._refuse("Attach before authenticating on the farm channel")
            raise cmd.NotAuthenticated("authenticate on the farm channel first")
        if self.broker_id or not broker or len(broker) > 200 or any(c.isspace() for c in broker):
            self._refuse(f"bad Attach ({broker[:40]!r})")
            raise cmd.NodeRefused("one Attach per channel, a broker id of 1..200 characters, no spaces")
        self.broker_id = broker
        nodes = self.agent.farm.attach(broker, self)
        return {"nodes": nodes, "host": self.agent.farm.config.host}

    @cmd.StartNode.responder
    def start_node(self, node_id: int, template: str, persistent: bool, application: str) -> dict[str, Any]:
        farm = self._farm()
        try:
            node = farm.start(self.broker_id, node_id, template, persistent, application)
        except (cmd.UnknownTemplate, cmd.NodeRefused) as e:
            log.warn("farm: broker {broker} node {node_id} refused: {why}", broker=self.broker_id,
                     node_id=node_id, why=str(e))
            raise
        return {"host": farm.config.host, "port": node.port, "pid": node.process.pid}

    @cmd.StopNode.responder
    def stop_node(self, node_id: int, kill: bool) -> dict[str, Any]:
        return {"known": self._farm().stop(self.broker_id, node_id, kill)}

    @cmd.ProbeNode.responder
    def probe_node(self, node_id: int) -> Any:
        d = self._farm().probe(self.broker_id, node_id)
        return d.addCallback(lambda r: {"accepting": r[0], "memory_bytes": r[1]})

    @cmd.PersistentHolder.responder
    def persistent_holder(self, application: str) -> dict[str, Any]:
        return {"refusal": self._farm().persistent_holder(self.broker_id, application) or ""}

    @cmd.NodeEvent.responder
    def node_event(self, node_id: int, state: str, detail: str) -> dict[str, Any]:
        self._refuse("sent a NodeEvent to the agent")
        return {}

    def event(self, node_id: int, state: str, detail: str) -> None:
        """Tell the broker about one of its nodes (farm channel)."""
        if self.transport is not None:
            self.callRemote(cmd.NodeEvent, node_id=node_id, state=state, detail=detail[:MAX_PROBLEM])

    def push(self) -> None:
        """Send the latest sample (also the heartbeat)."""
        if self.watch is not None and self.authenticated and self.transport is not None:
            self.callRemote(cmd.Report, **self.agent.report_values(self.watch))

    @cmd.Sample.responder
    def sample(self) -> dict[str, Any]:
        if not self.authenticated or self.watch is None:
            self._refuse("Sample before authentication")
            raise cmd.NotAuthenticated("authenticate first")
        return self.agent.report_values(self.watch)

    @cmd.Report.responder
    def report(self, figures: dict[str, Any]) -> dict[str, Any]:
        self._refuse("sent a Report to the agent")
        return {}

    def connectionLost(self, reason: Failure = Failure(Exception("connection lost"))) -> None:
        super().connectionLost(reason)
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()
        if self.pusher is not None and self.pusher.running:
            self.pusher.stop()
        if self.watch is not None:
            self.watch.links.discard(self)
        if self.broker_id and self.agent.farm is not None:
            self.agent.farm.detach(self.broker_id, self)


class AgentFactory(Factory):
    noisy = False

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def buildProtocol(self, addr: Any) -> AgentProtocol:
        return AgentProtocol(self.agent)
