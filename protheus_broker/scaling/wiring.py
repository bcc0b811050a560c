"""Scale to zero for one balance unit, built from its settings: the construction the desktop
unit and the two HTTP units share.

:func:`build_scale_to_zero` picks the :class:`~.interfaces.IScaler` (the unit's managed nodes
through :class:`~.local.LocalScaler`, else its Kubernetes scaler), the warm-up forecast with its
history file and writer (``WARMUP=1``), the :class:`~.controller.ScaleToZero` and the service that
starts it with the unit.  :func:`reload_nodes` applies a reloaded section's node and scale-to-zero
keys live (the same rules in every unit).  The unit keeps its own *activity* (what counts as an
open session) and where it holds new sessions (the desktop gate, the HTTP dispatcher).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from twisted.application.service import MultiService
from twisted.logger import Logger

from protheus_broker.nodes.manager import NodeManager, NodePolicy
from protheus_broker.scaling.controller import ScaleToZero, ScaleToZeroPolicy
from protheus_broker.scaling.forecast import UsageForecast, WarmupPolicy
from protheus_broker.scaling.gates import ScaleToZeroService
from protheus_broker.scaling.history import HistoryStore, HistoryWriter
from protheus_broker.scaling.local import LocalScaler

log = Logger()

#: Node keys a reload cannot apply (the processes already run with them).
FIXED_NODE_KEYS = ("command", "transport", "base_port", "socket_dir", "persistent", "application", "lock_dir",
                   "farm")


def build_scale_to_zero(reactor: Any, parent: MultiService, name: str, policy: ScaleToZeroPolicy,
                        warmup: WarmupPolicy | None, nodes: NodeManager | None, scaler: Any,
                        activity: Callable[[], int], dependencies: Any = None) -> ScaleToZero | None:
    """The unit's controller (None when ``SCALE_TO_ZERO`` is off or there is nothing to scale),
    its services added to *parent* (call it after the nodes' and the scaler's services: it starts
    after them and stops before them).  *scaler*: the unit's Kubernetes scaler, used when there
    are no managed *nodes*; *activity*: the unit's open sessions, held ones not included;
    *dependencies*: the unit's DEPENDS_ON (``deps.state.UnitDependencies``): a wake waits for them."""
    if not policy.enabled:
        return None
    chosen: Any = LocalScaler(nodes) if nodes is not None else scaler  # nodes, else Kubernetes
    if chosen is None:
        return None
    forecast = warmup_forecast(reactor, parent, name, warmup, chosen, nodes)
    controller = ScaleToZero(reactor, chosen, policy, activity, forecast=forecast, name=name,
                             dependencies=dependencies)
    ScaleToZeroService(controller).setServiceParent(parent)
    return controller


def warmup_forecast(reactor: Any, parent: MultiService, name: str, policy: WarmupPolicy | None,
                    scaler: Any, nodes: NodeManager | None) -> UsageForecast | None:
    """WARMUP=1: the usage forecast (its history loaded, saved every 5 minutes and at stop by a
    writer added to *parent*), told the members ready and, with local *nodes*, each node's
    spawn-to-ready time (Kubernetes: ``WARMUP_COLD_START`` stands for it)."""
    if policy is None:
        return None
    store = HistoryStore(policy.history_file, policy.history_weeks)
    forecast = UsageForecast(policy, store.load(), name=str(name))
    forecast.running = scaler.ready
    HistoryWriter(store, lambda: forecast.history, reactor).setServiceParent(parent)
    if nodes is None:
        return forecast
    manager = nodes
    reported: set[int] = set()

    def cold_starts() -> None:
        for node in manager.nodes.values():
            if node.ready_at is not None and id(node) not in reported:
                reported.add(id(node))
                forecast.observe_cold_start(node.ready_at - node.started_at)
        reported.intersection_update(id(node) for node in manager.nodes.values())

    scaler.subscribe(cold_starts)
    return forecast


def reload_nodes(name: str, nodes: NodeManager | None, controller: ScaleToZero | None,
                 old_nodes: NodePolicy | None, new_nodes: NodePolicy | None,
                 old_zero: ScaleToZeroPolicy, new_zero: ScaleToZeroPolicy) -> None:
    """A reload's node and scale-to-zero keys: sizes, polls, recycle limits, ZERO_IDLE_TIME,
    WAKE_TIMEOUT and MAX_HELD apply live; turning SCALE_TO_ZERO or node management on or off,
    the command, transport, ports, sockets, persistence and farm need a restart (one line each)."""
    if old_zero.enabled != new_zero.enabled:
        log.warn("reload: [{section}] SCALE_TO_ZERO changed; restart to apply", section=name, pool=name)
    if old_nodes == new_nodes and old_zero == new_zero:
        return
    if nodes is None and new_nodes is None:  # scale to zero around the Kubernetes scaler
        if controller is not None and new_zero.enabled:
            controller.policy = new_zero
        return
    if nodes is None or new_nodes is None or old_nodes is None:
        log.warn("reload: [{section}] node management turned on or off; restart to apply", section=name, pool=name)
        return
    if any(getattr(old_nodes, k) != getattr(new_nodes, k) for k in FIXED_NODE_KEYS):
        log.warn("reload: [{section}] NODE_COMMAND, TRANSPORT, BASE_PORT, SOCKET_DIR, PERSISTENT or FARM_* "
                 "changed; restart to apply", section=name, pool=name)
        new_policy = replace(new_nodes, **{k: getattr(old_nodes, k) for k in FIXED_NODE_KEYS})
    else:
        new_policy = new_nodes
    if controller is not None:  # the controller owns MIN_NODES while it runs
        new_policy = replace(new_policy, min_nodes=nodes.policy.min_nodes)
        if new_zero.enabled:
            controller.policy = new_zero  # ZERO_IDLE_TIME, WAKE_TIMEOUT, MAX_HELD
    nodes.policy = new_policy
    nodes.reconcile()
