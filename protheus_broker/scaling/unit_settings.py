"""What every balance unit reads about where its AppServers come from and how they sleep: managed
nodes (``NODES``/``NODE_COMMAND``), a Kubernetes scaler (``KUBERNETES``), scale to zero and the
warm-up (in the ``NODES`` section when there is one).  The desktop and HTTP readers both call it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from protheus_broker.ini import Section
from protheus_broker.kube.settings import KubeSettings, read_kubernetes
from protheus_broker.nodes.manager import NodePolicy
from protheus_broker.nodes.settings import nodes_section, read_nodes
from protheus_broker.scaling.controller import ScaleToZeroPolicy
from protheus_broker.scaling.forecast import WarmupPolicy
from protheus_broker.scaling.settings import check_scale_to_zero, read_scale_to_zero
from protheus_broker.scaling.warmup_settings import read_warmup


@dataclass(frozen=True)
class UnitScaling:
    """A unit's AppServer sources beside REMOTE_SERVER_xx, and its sleep policy."""

    nodes: NodePolicy | None
    kubernetes: KubeSettings | None
    scale_to_zero: ScaleToZeroPolicy
    warmup: WarmupPolicy | None

    @property
    def has_source(self) -> bool:
        """True when nodes or Kubernetes supply AppServers (REMOTE_SERVER_xx become optional)."""
        return self.nodes is not None or self.kubernetes is not None


def read_scaling(section: Section, sections: Mapping[str, Section], warnings: list[str]) -> UnitScaling:
    """The unit's managed nodes, Kubernetes scaler, scale to zero and warm-up (the scale-to-zero
    keys in the NODES section when there is one)."""
    zero_section = nodes_section(section, sections) or section  # (read before NODES' unknown keys)
    scale_to_zero = read_scale_to_zero(zero_section)
    warmup = read_warmup(section, sections)
    nodes = read_nodes(section, sections, section.name, warnings)
    kubernetes = read_kubernetes(section, sections, warnings)
    scale_to_zero = check_scale_to_zero(scale_to_zero, zero_section, nodes, warnings, kubernetes is not None)
    if warmup is not None and not scale_to_zero.enabled:
        warnings.append(f"{zero_section.path}:{zero_section.line('WARMUP')}: [{zero_section.name}] WARMUP=1 "
                        "needs SCALE_TO_ZERO=1 (the warm-up is its floor); ignored")
        warmup = None
    return UnitScaling(nodes, kubernetes, scale_to_zero, warmup)
