"""The interfaces the scaling pieces meet at.

- :class:`IScaler`: what starts and stops a unit's AppServers.  The local node manager
  (``protheus_broker.nodes``) and Kubernetes (a Deployment's ``/scale``, members from its
  EndpointSlices) implement it; ready AppServers join the unit's :class:`ServerPool` as members of
  the scaler's source, so the pool (and its ``when_available``) is where sessions wait.
- :class:`IUsageForecast`: how many AppServers should already run at a moment, from usage history
  (the warm-up); the controller never goes below it, nor below what current load needs.
"""

from __future__ import annotations

from typing import Callable

from zope.interface import Attribute, Interface


class IScaler(Interface):
    """Starts and stops the AppServers of one unit."""

    name = Attribute("What it is, for logs and the screen: 'nodes', 'kubernetes'.")
    drains_safely = Attribute(
        "True when a scale-down never stops an AppServer that has sessions (the local node manager "
        "stops idle nodes only), so the controller may ask for what load needs while sessions are "
        "open; False when the platform picks which one stops (Kubernetes): then, while sessions are "
        "open, the controller never asks for fewer than it asked before.")

    def desired() -> int:
        """The number of AppServers last asked for."""

    def ready() -> int:
        """AppServers ready to take sessions now (pool members of this scaler's source)."""

    def scale(replicas: int, reason: str) -> None:
        """Ask for *replicas* AppServers (0: scale to zero); *reason* goes to the log.  Returns at
        once; readiness shows in :meth:`ready`, in the pool, and through :meth:`subscribe`."""

    def subscribe(callback: Callable[[], None]) -> Callable[[], None]:
        """Call *callback* whenever :meth:`desired` or :meth:`ready` changes; returns the
        unsubscribe function."""


class IUsageForecast(Interface):
    """Usage history and what it says about the near future."""

    def record(now: float, sessions: int) -> None:
        """Note that *sessions* sessions were open (or opened) at wall-clock time *now*."""

    def floor(now: float) -> int:
        """AppServers that should already run at *now* (lead time included): the warm-up floor."""
