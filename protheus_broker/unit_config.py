"""The keys every balance unit's section has, whatever it serves: the listener, the pool and its
sources (REMOTE_SERVER_xx, managed nodes, Kubernetes), balancing, monitoring, TLS and sleep.
``DesktopBalanceConfig`` and ``HttpBalanceConfig`` add their own."""

from __future__ import annotations

from dataclasses import dataclass, field

from protheus_broker.balancing.methods import SortMethod
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.kube.settings import KubeSettings
from protheus_broker.monitoring.settings import MonitoringConfig, MonitoringType
from protheus_broker.nodes.manager import NodePolicy
from protheus_broker.scaling.controller import ScaleToZeroPolicy
from protheus_broker.scaling.forecast import WarmupPolicy
from protheus_broker.tls.settings import SessionTLSConfig


@dataclass(frozen=True)
class UnitConfig:
    """One ``[BALANCE_*]`` section's common keys."""

    local_port: int
    servers: tuple[RemoteServer, ...]
    local_interface: str = ""
    sort_method: SortMethod = SortMethod.CONNECTION
    monitoring_type: MonitoringType = MonitoringType.CONNECTION
    connect_timeout: float = 5.0
    max_sessions: int = 10000  # MAX_SESSIONS (0 = no cap for the HTTP units' client connections)
    max_pending_per_address: int = 128  # MAX_PENDING_PER_ADDRESS: not yet established, one address
    max_pending: int = 1024  # MAX_PENDING: not yet established, all addresses
    metrics_max_age: float = 3.0
    service_name: str = "protheus-broker"
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    tls: SessionTLSConfig = field(default_factory=SessionTLSConfig)
    nodes: NodePolicy | None = None  # managed AppServer nodes (NODE_COMMAND, FARM_HOSTS or NODES = <section>)
    kubernetes: KubeSettings | None = None  # KUBERNETES = <section>: a Kubernetes scaler
    scale_to_zero: ScaleToZeroPolicy = field(default_factory=ScaleToZeroPolicy)  # SCALE_TO_ZERO etc.
    warmup: WarmupPolicy | None = None  # WARMUP=1: the scale-to-zero floor from usage history

    @property
    def effective_sort_method(self) -> SortMethod:
        """The method actually used: SERVER_* need active monitoring, else CONNECTION (as TOTVS)."""
        if self.sort_method.needs_metrics and not self.monitoring_type.is_active:
            return SortMethod.CONNECTION
        return self.sort_method
