"""The local scaler: :class:`~protheus_broker.scaling.interfaces.IScaler` over a unit's
:class:`~protheus_broker.nodes.manager.NodeManager` (AppServer processes on this host).

``scale(n)`` sets the manager's minimum (``MIN_NODES`` for this run, 0 allowed): the manager
still adds nodes above it by load (``SESSIONS_PER_NODE``) and lets those go after its own
``IDLE_TIME``; at 0 with no session it keeps no node at all.  ``ready()`` counts the pool members
of source ``"nodes"`` that can take a session (the ones ``when_available`` waits for).
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger
from zope.interface import implementer

from protheus_broker.balancing.pool import PoolEvent, ServerState
from protheus_broker.nodes.manager import NODES, NodeManager
from protheus_broker.scaling.interfaces import IScaler

log = Logger()


@implementer(IScaler)
class LocalScaler:
    """Scale a unit's managed nodes (see the module docstring)."""

    name = "nodes"
    drains_safely = True  # the node manager never stops a node that has sessions

    def __init__(self, manager: NodeManager) -> None:
        self.manager = manager
        manager.scale_to_zero = True  # MIN_NODES=0 and no session: no node
        self._asked = manager.policy.min_nodes
        self._callbacks: list[Callable[[], None]] = []
        self._unsubscribe_pool = manager.pool.subscribe(self._pool_event)

    def desired(self) -> int:
        return self._asked

    def ready(self) -> int:
        return sum(1 for b in self.manager.pool
                   if b.source == NODES and b.state in (ServerState.UP, ServerState.SUSPENDED))

    def scale(self, replicas: int, reason: str) -> None:
        replicas = max(0, min(self.manager.policy.max_nodes, replicas))
        changed = replicas != self._asked
        self._asked = replicas
        self.manager.scale(replicas, reason)
        if changed:
            self._notify()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)
        return unsubscribe

    def _pool_event(self, event: PoolEvent) -> None:
        if event.source == NODES:
            self._notify()

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.failure("{unit}: a scaler subscriber failed", unit=self.manager.name)

    def close(self) -> None:
        """Stop listening to the pool."""
        self._unsubscribe_pool()
        self._callbacks = []
