"""The ``[BALANCE_HTTP]`` balance unit: its listener, HTTP proxy, pool, monitor, affinity cookie
and counters."""

from __future__ import annotations

import random
from itertools import count
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol, quoteStringArgument
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.balancing.methods import make_balancer
from protheus_broker.balancing.pool import ServerPool, ServerState, UnknownServer
from protheus_broker.deps.gates import DependencyDispatcher
from protheus_broker.deps.state import UnitDependencies
from protheus_broker.desktop.pending import PendingLimits
from protheus_broker.desktop.tls import ReloadableServerContext, server_options
from protheus_broker.http.affinity import AffinityCookies
from protheus_broker.http.health import HttpProbeMonitor, make_http_monitor
from protheus_broker.http.gate import LicenseGate
from protheus_broker.http.capacity import QueueFull, QueueTimeout, RequestSlots
from protheus_broker.http.proxy import Choice, Headers, HttpProxyFactory, IDispatcher, NoBackend, ProxySettings, RequestInfo
from protheus_broker.http.settings import HTTP_SECTION, WEB_SERVICES_SECTION, HttpBalanceConfig, WebServicesConfig
from protheus_broker.http.upstream import UpstreamPool, UpstreamProtocol, tcp_connector
from protheus_broker.nodes.manager import NodeManager
from protheus_broker.nodes.remote import make_spawner
from protheus_broker.nodes.spawner import NodeService
from protheus_broker.ini import ConfigError
from protheus_broker.kube.scaler import make_scaler
from protheus_broker.scaling.controller import ScaleToZero
from protheus_broker.scaling.gates import WakeDispatcher
from protheus_broker.scaling.wiring import build_scale_to_zero, reload_nodes
from protheus_broker.stats import ISessionStats, SessionStats
from protheus_broker.units import IBalanceUnit, listen_or_exit, stop_unit

log = Logger()


@implementer(IDispatcher)
class PoolDispatcher:
    """Balances requests over a :class:`ServerPool` (in-flight requests count as its sessions),
    with an optional affinity cookie: a request naming a server that is not Down goes there first
    (a connect failure moves it on and the cookie is replaced)."""

    def __init__(self, clock: Any, pool: ServerPool, affinity: AffinityCookies | None = None,
                 forward_cookie: bool = False) -> None:
        self.clock = clock
        self.pool = pool
        self.affinity = affinity
        self.forward_cookie = forward_cookie
        self.strip_request_headers: frozenset[bytes] = frozenset()

    def choose(self, request: RequestInfo) -> "Deferred[Choice]":
        candidates = self.pool.candidates(self.clock.seconds())
        pinned = None
        if self.affinity is not None:
            value = self.affinity.value_in(request.headers)
            if value:
                server_id = self.affinity.server_of(value, [b.server_id for b in self.pool])
                if server_id is not None:
                    try:
                        backend = self.pool.get(server_id)
                    except UnknownServer:
                        backend = None
                    if backend is not None and backend.state is not ServerState.DOWN:
                        pinned = backend  # Up, Suspended (try it), Draining (its session carries on)
        if pinned is not None:
            candidates = [pinned] + [b for b in candidates if b is not pinned]
        if not candidates:
            reasons = "; ".join(f"{b.server_id} {b.state.value}: {b.reason}" for b in self.pool) or "no servers"
            return fail(NoBackend(f"no AppServer can take the request ({reasons})", retry_after=5))
        return succeed(Choice(candidates, {"pinned": pinned.server_id if pinned is not None else None}))

    def opening(self, choice: Choice, backend: Any) -> None:
        choice.state["probe"] = self.pool.session_opening(backend)

    def connect_failed(self, choice: Choice, backend: Any, reason: str) -> None:
        self.pool.connect_failed(backend, reason)

    def answered(self, choice: Choice, backend: Any) -> None:
        self.pool.session_answered(backend)
        if choice.state.get("probe"):
            self.pool.probe_ended(backend)
            choice.state["probe"] = False

    def released(self, choice: Choice, backend: Any, outcome: str) -> None:
        self._close(choice, backend)

    def _close(self, choice: Choice, backend: Any) -> None:
        if choice.state.get("probe"):
            self.pool.probe_ended(backend)
            choice.state["probe"] = False
        self.pool.session_closed(backend)

    def again(self, choice: Choice) -> "Deferred[Choice] | None":
        return None  # the first choice listed every server

    def abandoned(self, choice: Choice) -> None:
        pass

    def request_headers(self, choice: Choice, headers: Headers) -> Headers:
        if self.affinity is None or self.forward_cookie:
            return headers
        return self.affinity.strip(headers)

    def response_headers(self, choice: Choice, backend: Any) -> Headers:
        affinity = self.affinity
        if affinity is None:
            return []
        if choice.state.get("pinned") == backend.server_id and affinity.max_age <= 0:
            return []  # the browser already has it
        return [affinity.set_cookie(backend.server_id)]


@implementer(IDispatcher)
class SlotsDispatcher(PoolDispatcher):
    """``[BALANCE_WEB_SERVICES]``: a request takes a slot on the best candidate below its cap
    (:class:`RequestSlots`), or waits in the broker's FIFO queue; a full queue or a wait past
    QUEUE_TIMEOUT is a 503 naming why.  A connect failure tries the next server (a new slot)."""

    def __init__(self, clock: Any, pool: ServerPool, slots: Any) -> None:
        super().__init__(clock, pool, None)
        self.slots = slots

    def choose(self, request: RequestInfo) -> "Deferred[Choice]":
        return self._acquire({"tried": set(), "slot": None}, self.candidates)

    def candidates(self) -> list[Any]:
        """The pool's servers for a request, best first (one callable for every first try: the
        queue then scans once per freed slot, not once per waiter)."""
        return self.pool.candidates(self.clock.seconds())

    def _acquire(self, state: dict[str, Any], candidates: Any) -> "Deferred[Choice]":
        tried: set[str] = state["tried"]

        def granted(backend: Any) -> Choice:
            state["slot"] = backend.server_id
            tried.add(backend.server_id)
            return Choice([backend], state)

        def refused(failure: Failure) -> Failure:
            error = failure.trap(QueueFull, QueueTimeout)
            retry_after = 1 if error is QueueFull else 5
            return Failure(NoBackend(str(failure.value), retry_after=retry_after))

        acquiring: Deferred[Any] = self.slots.acquire(candidates)
        acquiring.addCallbacks(granted, refused)
        return acquiring

    def again(self, choice: Choice) -> "Deferred[Choice] | None":
        tried: set[str] = choice.state["tried"]
        if len(tried) >= len(self.pool):
            return None

        def untried() -> list[Any]:
            return [b for b in self.candidates() if b.server_id not in tried]
        return self._acquire(choice.state, untried)

    def released(self, choice: Choice, backend: Any, outcome: str) -> None:
        super().released(choice, backend, outcome)
        if outcome != "retry":  # a retry on a fresh connection keeps its slot
            self.abandoned(choice)

    def abandoned(self, choice: Choice) -> None:
        slot, choice.state["slot"] = choice.state.get("slot"), None
        if slot is not None:
            self.slots.release(slot)


def node_connector(reactor: Any, pool: ServerPool, timeout: float) -> Any:
    """The TCP connector, except for members on a Unix socket (managed nodes with
    TRANSPORT=UNIX): those are reached at their socket path."""
    tcp = tcp_connector(reactor, timeout)

    def connect(server_id: str, host: str, port: int) -> "Deferred[UpstreamProtocol]":
        try:
            path = pool.get(server_id).unix
        except UnknownServer:
            path = ""
        if not path:
            return tcp(server_id, host, port)  # type: ignore[no-any-return]
        endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
        return connectProtocol(endpoint, UpstreamProtocol(server_id))  # type: ignore[no-any-return]
    return connect


def endpoint_string(config: HttpBalanceConfig, backlog: int = 1024) -> str:
    text = f"tcp:{config.local_port}:backlog={backlog}"
    if config.local_interface:
        text += f":interface={quoteStringArgument(config.local_interface)}"
    return text


def proxy_settings(config: HttpBalanceConfig) -> ProxySettings:
    return ProxySettings(tls=config.tls.terminate, header_timeout=config.header_timeout, keepalive_timeout=config.keepalive_timeout,
                         max_header_bytes=config.max_header_bytes, max_headers=config.max_headers,
                         forwarded_headers=config.forwarded_headers, access_log=config.access_log,
                         server_timeout=config.server_timeout, max_connections=config.max_sessions)


@implementer(IBalanceUnit)
class HttpUnit(MultiService):
    """Browser requests spread over the section's REMOTE_SERVER_xx, kept on one by a cookie."""

    def __init__(self, reactor: Any, config: HttpBalanceConfig, name: str = HTTP_SECTION,
                 path: str = "<config>", ids: "count[int] | None" = None, connector: Any = None,
                 licenses: Any = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.name = name
        self.path = path
        self.config = config
        self.stats: ISessionStats = SessionStats()
        self.pool = ServerPool(config.servers, make_balancer(config.effective_sort_method, config.metrics_max_age),
                               clock=reactor, suspect_time=config.monitoring.suspect_time)
        self.monitor = make_http_monitor(reactor, self.pool, config.monitoring_type, config.monitoring,
                                         connect_timeout=config.connect_timeout, health_path=config.health_path)
        if self.monitor is not None:
            self.monitor.setServiceParent(self)
        self.scaler: Any = None  # an IScaler: KUBERNETES = <section> (pods join the pool as "kubernetes")
        if config.kubernetes is not None:
            self.scaler = make_scaler(reactor, self.pool, config.kubernetes, name, path)
            self.scaler.setServiceParent(self)
        self.affinity = AffinityCookies(max_age=config.affinity_timeout,
                                        secure=config.secure_cookie or config.tls.terminate)
        self.dispatcher = self.make_dispatcher(config)
        self.nodes: NodeManager | None = None
        if config.nodes is not None:  # managed AppServer nodes join the pool as source "nodes"
            spawner, farm = make_spawner(reactor, config.nodes, name)  # FARM_HOSTS: nodes on agents too
            self.nodes = NodeManager(reactor, self.pool, spawner, config.nodes, random.Random(), name)
            NodeService(self.nodes).setServiceParent(self)
            if farm is not None:
                farm.watch(self.nodes)  # the farm's persistent hold, after this host's lock
                farm.setServiceParent(self)  # (after NodeService: stops first, farm nodes are left running)
        # the license gate (URIS, Stateless=1) around the balancing; *licenses*: the LicenseClient
        self.licenses = licenses
        self.gate = LicenseGate(reactor, self.dispatcher, licenses.pool if licenses is not None else None,
                                config.license, name)
        connector = connector or node_connector(reactor, self.pool, config.connect_timeout)
        self.upstreams = UpstreamPool(reactor, connector,
                                      max_idle=config.upstream_max_idle,
                                      idle_timeout=config.upstream_idle_timeout, reuse=config.upstream_reuse)
        self.dependencies = UnitDependencies(name)  # DEPENDS_ON (tap.py): 503 while one is down
        #: scale to zero: a scaler's ScaleToZero set as ``wake.controller`` holds requests while it
        #: wakes (before the license gate: a held request takes no seat)
        self.wake = WakeDispatcher(self.gate, pool=self.pool)
        #: SCALE_TO_ZERO=1: the nodes (or pods) sleep after ZERO_IDLE_TIME without a request in
        #: flight (an open WebSocket is one); a request to the empty pool wakes them
        self.scale_to_zero: ScaleToZero | None = build_scale_to_zero(
            reactor, self, name, config.scale_to_zero, config.warmup, self.nodes, self.scaler,
            self._requests_in_flight, dependencies=self.dependencies)  # (a wake waits for DEPENDS_ON)
        self.wake.controller = self.scale_to_zero
        self.factory = HttpProxyFactory(reactor, DependencyDispatcher(self.wake, self.dependencies),
                                        self.upstreams, proxy_settings(config),
                                        stats=self.stats, name=name,
                                        pending=PendingLimits(config.max_pending_per_address, config.max_pending))
        # TLS termination (SSL_CERTIFICATE/SSL_KEY or [SSLConfigure]); ConfigError: a bad file
        self.tls_context = ReloadableServerContext(server_options(config.tls)) if config.tls.terminate else None
        self.endpoint = endpoint_string(config)
        self.port: Any = None

    def listening_factory(self) -> Any:
        """The proxy, behind TLS when the section terminates it."""
        if self.tls_context is None:
            return self.factory
        factory = TLSMemoryBIOFactory(self.tls_context, False, self.factory)
        factory.noisy = False
        return factory

    def make_dispatcher(self, config: Any) -> PoolDispatcher:
        """Balancing with the affinity cookie."""
        return PoolDispatcher(self.reactor, self.pool, self.affinity, config.affinity_forward_cookie)

    def privilegedStartService(self) -> None:
        self.port = listen_or_exit(self.reactor, self.endpoint, self.listening_factory(),
                                   f"{self.config.local_interface or '*'}:{self.config.local_port}",
                                   f"{self.path}: [{self.name}] LOCAL_SERVER_PORT")
        super().privilegedStartService()

    def describe(self) -> str:
        host = self.port.getHost() if self.port is not None else None
        where = f"{host.host}:{host.port}" if host is not None else self.endpoint
        tls = ", TLS terminated" if self.tls_context is not None else ""
        return f"{where} (HTTP{tls}, affinity cookie {self.affinity.name})"

    def startService(self) -> None:
        log.info("[{section}] HTTP listening on {where}; {count} AppServers, SORT_METHOD={sort_method}",
                 section=self.name, where=self.describe(), count=len(self.pool),
                 sort_method=self.config.effective_sort_method.value, pool=self.name)
        super().startService()

    def stopService(self) -> Any:
        port, self.port = self.port, None
        self.upstreams.close_all()
        return stop_unit(super().stopService, port)

    def _requests_in_flight(self) -> int:
        """Scale to zero's activity: requests in flight (a WebSocket until it closes), those held
        by the wake not counted (the controller adds them)."""
        held = len(self.scale_to_zero.held) if self.scale_to_zero is not None else 0
        return max(0, self.stats.get("http_in_flight") - held)

    def reload(self, config: HttpBalanceConfig) -> bool:
        """Apply a reloaded section; open connections carry on.  False (nothing applied) when a
        certificate or key file is bad."""
        old = self.config
        if config.tls.terminate != old.tls.terminate:
            log.warn("reload: [{section}] TLS termination switched; restart to apply", section=self.name)
        elif self.tls_context is not None:
            try:
                self.tls_context.options = server_options(config.tls)  # new handshakes use it
            except ConfigError as exc:
                log.error("reload refused, keeping the running config: {error}", error=str(exc))
                return False
        if (config.local_port, config.local_interface) != (old.local_port, old.local_interface):
            log.warn("reload: [{section}] LOCAL_SERVER_PORT/LOCAL_SERVER_INTERFACE changed; restart to apply",
                     section=self.name)
        if config.kubernetes != old.kubernetes:
            log.warn("reload: [{section}] KUBERNETES or its section changed; restart to apply", section=self.name)
        if config.monitoring_type != old.monitoring_type:
            log.warn("reload: [{section}] MONITORING_TYPE changed; restart to apply", section=self.name)
        elif isinstance(self.monitor, HttpProbeMonitor):
            self.monitor.health_path = config.health_path
            self.monitor.connect_timeout = config.connect_timeout
        result = self.pool.reconfigure(config.servers)
        reload_nodes(str(self.name), self.nodes, self.scale_to_zero, old.nodes, config.nodes,
                     old.scale_to_zero, config.scale_to_zero)
        if self.monitor is not None and config.monitoring_type == old.monitoring_type:
            self.monitor.reconfigure(config.monitoring)  # type: ignore[attr-defined]  # watch added servers
        self.pool.balancer = make_balancer(config.effective_sort_method, config.metrics_max_age)
        self.pool.suspect_time = config.monitoring.suspect_time
        self.factory.settings = proxy_settings(config)
        self.factory.settings.tls = self.tls_context is not None
        self.factory.pending.per_address = config.max_pending_per_address
        self.factory.pending.total = config.max_pending
        self.upstreams.max_idle = config.upstream_max_idle
        self.upstreams.idle_timeout = config.upstream_idle_timeout
        self.upstreams.reuse = config.upstream_reuse
        self.affinity.max_age = config.affinity_timeout
        self.affinity.secure = config.secure_cookie or self.tls_context is not None
        self.dispatcher.forward_cookie = config.affinity_forward_cookie
        self.gate.configure(config.license)
        self.config = config
        self.reloaded(config)
        log.info("reloaded [{section}]: added {added}, removed {removed}, kept {kept}", section=self.name,
                 added=result.added or "none", removed=result.removed or "none", kept=len(result.kept),
                 pool=self.name)
        return True

    def reloaded(self, config: Any) -> None:
        """What a subclass applies besides (the web-services caps)."""


@implementer(IBalanceUnit)
class WebServicesUnit(HttpUnit):
    """REST and SOAP requests over the section's REMOTE_SERVER_xx, each server capped at its
    ``[max]`` in-flight requests, the rest waiting in a bounded FIFO queue."""

    dispatcher: SlotsDispatcher

    def __init__(self, reactor: Any, config: WebServicesConfig, name: str = WEB_SERVICES_SECTION,
                 path: str = "<config>", ids: "count[int] | None" = None, connector: Any = None,
                 licenses: Any = None) -> None:
        self.slots = RequestSlots(reactor, queue_length=config.queue_length, queue_timeout=config.queue_timeout)
        super().__init__(reactor, config, name=name, path=path, ids=ids, connector=connector, licenses=licenses)
        self.pool.subscribe(lambda event: self.slots.poke())
        self.reloaded(config)

    def make_dispatcher(self, config: Any) -> PoolDispatcher:
        return SlotsDispatcher(self.reactor, self.pool, self.slots)

    def describe(self) -> str:
        host = self.port.getHost() if self.port is not None else None
        where = f"{host.host}:{host.port}" if host is not None else self.endpoint
        config: WebServicesConfig = self.config  # type: ignore[assignment]
        capped = len([cap for cap in config.caps.values() if cap])
        return (f"{where} (web services, {capped} servers capped, queue {config.queue_length} "
                f"for {config.queue_timeout:g}s)")

    def reloaded(self, config: Any) -> None:
        for server_id in set(self.slots.stats()["caps"]) - set(config.caps):  # type: ignore[call-overload]
            self.slots.forget(server_id)
        for server_id, cap in config.caps.items():
            self.slots.set_cap(server_id, cap)
        self.slots.configure(config.queue_length, config.queue_timeout)
        self.slots.poke()
