"""The SmartClient desktop balance unit (``[BALANCE_SMART_CLIENT_DESKTOP]``): its listener, factory,
pool, monitor, resumable sessions and counters, and what of a reload applies live."""

from __future__ import annotations

import random
from itertools import count
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import quoteStringArgument
from twisted.logger import Logger
from zope.interface import implementer

from protheus_broker import __version__
from protheus_broker.balancing.methods import SortMethod, make_balancer
from protheus_broker.balancing.pool import ServerPool
from protheus_broker.deps.gates import DependencyGate
from protheus_broker.deps.state import UnitDependencies
from protheus_broker.desktop.proxy import BrokerFactory
from protheus_broker.desktop.settings import DESKTOP_SECTION, DesktopBalanceConfig
from protheus_broker.desktop.tls import SessionTLS
from protheus_broker.ini import ConfigError
from protheus_broker.kube.scaler import make_scaler
from protheus_broker.monitoring.monitor import make_monitor
from protheus_broker.nodes.manager import NodeManager
from protheus_broker.nodes.remote import make_spawner
from protheus_broker.nodes.spawner import NodeService
from protheus_broker.resume.broker import ResumableSessions
from protheus_broker.scaling.controller import ScaleToZero
from protheus_broker.scaling.gates import WakeGate
from protheus_broker.scaling.wiring import build_scale_to_zero, reload_nodes
from protheus_broker.stats import ISessionStats, SessionStats
from protheus_broker.units import IBalanceUnit, listen_or_exit, stop_unit

log = Logger()


def balancer(desktop: DesktopBalanceConfig) -> Any:
    """The balancer for SORT_METHOD, with the per-session costs of the monitoring section."""
    monitoring = desktop.monitoring
    costs = {SortMethod.SERVER_MEMORY: float(monitoring.session_memory_bytes),
             SortMethod.SERVER_CPU: monitoring.session_cpu_percent}
    return make_balancer(desktop.effective_sort_method, desktop.metrics_max_age, costs)


def endpoint_string(desktop: DesktopBalanceConfig, backlog: int = 1024) -> str:
    """The listening endpoint of LOCAL_SERVER_PORT / LOCAL_SERVER_INTERFACE, e.g.
    ``tcp:7890:backlog=1024:interface=127.0.0.1``."""
    text = f"tcp:{desktop.local_port}:backlog={backlog}"
    if desktop.local_interface:
        text += f":interface={quoteStringArgument(desktop.local_interface)}"
    return text


@implementer(IBalanceUnit)
class DesktopUnit(MultiService):
    """SmartClient desktop sessions spread over the section's REMOTE_SERVER_xx."""

    def __init__(self, reactor: Any, config: DesktopBalanceConfig, name: str = DESKTOP_SECTION,
                 path: str = "<config>", ids: "count[int] | None" = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.name = name
        self.path = path  # the config file, for messages
        self.config = config
        self.stats: ISessionStats = SessionStats()
        self.pool = ServerPool(config.servers, balancer(config), clock=reactor,
                               suspect_time=config.monitoring.suspect_time)
        self.monitor = make_monitor(reactor, self.pool, config.monitoring_type, config.monitoring,
                                    connect_timeout=config.connect_timeout)
        if self.monitor is not None:
            self.monitor.setServiceParent(self)
        self.nodes: NodeManager | None = None
        if config.nodes is not None:  # managed AppServer nodes join the pool as source "nodes"
            spawner, farm = make_spawner(reactor, config.nodes, name)  # FARM_HOSTS: nodes on agents too
            self.nodes = NodeManager(reactor, self.pool, spawner, config.nodes, random.Random(), name)
            NodeService(self.nodes).setServiceParent(self)
            if farm is not None:
                farm.watch(self.nodes)  # the farm's persistent hold, after this host's lock
                farm.setServiceParent(self)  # (after NodeService: stops first, farm nodes are left running)
        self.scaler: Any = None  # an IScaler: KUBERNETES = <section> (pods join the pool as "kubernetes")
        if config.kubernetes is not None:
            self.scaler = make_scaler(reactor, self.pool, config.kubernetes, name, path)
            self.scaler.setServiceParent(self)
        resumable = (ResumableSessions(reactor, config.resume, stats=self.stats)
                     if config.resume.enabled else None)
        self.factory = BrokerFactory(
            reactor, self.pool, connect_timeout=config.connect_timeout,
            max_sessions=config.max_sessions, sort_method=config.effective_sort_method.value,
            first_bytes_wait=config.first_bytes_wait,
            first_response_timeout=config.first_response_timeout,
            max_pending_per_address=config.max_pending_per_address,
            max_pending=config.max_pending,
            wait_for_server=config.wait_for_server,
            recognisers=[resumable.recogniser] if resumable is not None else [],
            stats=self.stats,
        )
        self.factory.ids = ids if ids is not None else count(1)  # one numbering per broker
        #: DEPENDS_ON: the broker hands them over (tap.py); a new session asks them first
        self.dependencies = UnitDependencies(name)
        self.factory.gates.insert(0, DependencyGate(self.dependencies))
        self.factory.standby = resumable
        #: SCALE_TO_ZERO=1: the nodes sleep after ZERO_IDLE_TIME without a session; a login wakes them
        self.scale_to_zero: ScaleToZero | None = build_scale_to_zero(
            reactor, self, name, config.scale_to_zero, config.warmup, self.nodes, self.scaler,
            self._open_sessions, dependencies=self.dependencies)  # (a wake waits for DEPENDS_ON)
        if self.scale_to_zero is not None:
            self.factory.gates.insert(self.factory.gates.index(self.factory.server_gate),
                                      WakeGate(self.scale_to_zero, self.pool))
        self.session_tls = SessionTLS(reactor, config.tls, self.factory)  # ConfigError: bad file
        self.endpoint = endpoint_string(config)
        self.port: Any = None

    def _open_sessions(self) -> int:
        """Sessions open (scale to zero's activity): SmartClient sessions not held by the wake,
        or sessions the pool counts on its members (resume standby included)."""
        held = len(self.scale_to_zero.held) if self.scale_to_zero is not None else 0
        return max(len(self.factory.sessions) - held, sum(b.active for b in self.pool))

    def privilegedStartService(self) -> None:
        """Listen (ports below 1024 need the privilege); a port that is taken stops the daemon
        with one line naming it."""
        desktop = self.config
        self.port = listen_or_exit(self.reactor, self.endpoint, self.session_tls.listening_factory(),
                                   f"{desktop.local_interface or '*'}:{desktop.local_port}",
                                   f"{self.path}: LOCAL_SERVER_PORT")
        super().privilegedStartService()

    def describe(self) -> str:
        host = self.port.getHost() if self.port is not None else None
        where = f"{host.host}:{host.port}" if host is not None else self.endpoint
        return f"{where} ({self.config.service_name})"

    def startService(self) -> None:
        desktop = self.config
        host = self.port.getHost()
        self.session_tls.warn_at_startup()
        log.info("SmartClient sessions: {tls}", tls=self.session_tls.describe(), pool=self.name)
        log.info(
            "protheus-broker {version} listening on {host}:{port} ({service}); {count} AppServers, "
            "SORT_METHOD={sort_method}, MONITORING_TYPE={monitoring}",
            version=__version__, host=host.host, port=host.port, service=desktop.service_name,
            count=len(self.pool), sort_method=desktop.effective_sort_method.value,
            monitoring=desktop.monitoring_type.value, pool=self.name,
        )
        super().startService()

    def stopService(self) -> Any:
        """Stop the monitor and the listener; the Deferred fires when both have."""
        port, self.port = self.port, None
        return stop_unit(super().stopService, port)

    def reload(self, config: DesktopBalanceConfig) -> bool:
        """Apply a reloaded section without dropping any session.  False (nothing applied) when a
        certificate or key file is bad."""
        old, desktop = self.config, config
        try:
            self.session_tls.reload(desktop.tls)  # certificates re-read; open sessions keep theirs
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: {error}", error=str(exc))
            return False
        if (desktop.local_port, desktop.local_interface) != (old.local_port, old.local_interface):
            log.warn("reload: LOCAL_SERVER_PORT/LOCAL_SERVER_INTERFACE changed; restart to apply")
        result = self.pool.reconfigure(desktop.servers)
        self.pool.balancer = balancer(desktop)
        self.pool.suspect_time = desktop.monitoring.suspect_time
        if (desktop.monitoring_type, desktop.monitoring.tls, desktop.monitoring.heartbeat_interval,
                desktop.monitoring.probe_interval) != (old.monitoring_type, old.monitoring.tls,
                                                        old.monitoring.heartbeat_interval,
                                                        old.monitoring.probe_interval):
            log.warn("reload: MONITORING_TYPE, AGENT_SSL_* or the intervals changed; restart to apply")
        elif self.monitor is not None:
            self.monitor.reconfigure(desktop.monitoring)  # type: ignore[attr-defined]
        factory = self.factory
        factory.connect_timeout = desktop.connect_timeout
        factory.max_sessions = desktop.max_sessions
        factory.first_bytes_wait = desktop.first_bytes_wait
        factory.first_response_timeout = desktop.first_response_timeout  # new sessions
        factory.wait_for_server = desktop.wait_for_server  # new sessions
        factory.pending.per_address = desktop.max_pending_per_address
        factory.pending.total = desktop.max_pending
        factory.sort_method = desktop.effective_sort_method.value
        if factory.standby is not None:  # new links and drops use the new STANDBY_TIME etc.
            factory.standby.config = desktop.resume
        reload_nodes(str(self.name), self.nodes, self.scale_to_zero, old.nodes, desktop.nodes,
                     old.scale_to_zero, desktop.scale_to_zero)
        if desktop.kubernetes != old.kubernetes:
            log.warn("reload: KUBERNETES or its section changed; restart to apply", pool=self.name)
        if desktop.resume.enabled != old.resume.enabled:
            log.warn("reload: RESUME_ENABLE changed; restart to apply")
        self.config = desktop
        log.info(
            "reloaded {path}: added {added}, removed {removed}, draining {draining}, kept {kept}; "
            "SORT_METHOD={sort_method}", path=self.path, added=result.added or "none",
            removed=result.removed or "none", draining=result.draining or "none",
            kept=len(result.kept), sort_method=desktop.effective_sort_method.value, pool=self.name,
        )
        return True
