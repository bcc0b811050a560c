"""Balance units: one per ``[BALANCE_*]`` section, each its own listener, factory, pool,
monitor and counters.

:class:`~protheus_broker.tap.BrokerService` is a ``MultiService`` of units; a reload hands each
unit its new section; the broker screen, ``/metrics`` and the CLI iterate units.  The desktop
unit (:mod:`protheus_broker.desktop.unit`) is the first; HTTP and web-services units slot in
beside it.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface


class IBalanceUnit(Interface):
    """One balance unit: what the broker service, its reload and its screen need from it."""

    name = Attribute("The unit's section name, e.g. BALANCE_SMART_CLIENT_DESKTOP (the `pool` label).")
    config = Attribute("The unit's running section config.")
    pool = Attribute("Its ServerPool.")
    factory = Attribute("Its ServerFactory: sessions (id -> session), standby, recognisers.")
    monitor = Attribute("Its monitor service, or None (MONITORING_TYPE=DISABLED).")
    stats = Attribute("Its ISessionStats.")
    port = Attribute("Its listening port once started (getHost()), or None.")

    def reload(config: Any) -> bool:
        """Apply a reloaded section without dropping any session, logging what needs a restart.
        False (nothing applied, logged) when the new config cannot be used."""

    def describe() -> str:
        """One phrase for the startup log: where it listens and what it serves."""


def listened(listening: "Deferred[Any]") -> Any:
    """The port, or the :class:`Failure`, of an endpoint's ``listen()`` that has already fired
    (TCP and Unix endpoints fire at once); None when it has not fired yet."""
    result: list[Any] = []
    listening.addBoth(result.append)
    return result[0] if result else None


def listen_or_exit(reactor: Any, endpoint: str, factory: Any, where: str, what: str) -> Any:
    """Listen on the *endpoint* string with *factory* and return the port; a port that cannot
    be had stops the daemon with one line: ``protheus-broker: <what>: cannot listen on <where>:
    <why>`` (*what* names the config file and key)."""
    outcome = listened(serverFromString(reactor, endpoint).listen(factory))
    if isinstance(outcome, Failure):
        error = outcome.value
        why = error.socketError if isinstance(error, CannotListenError) else error
        raise SystemExit(f"protheus-broker: {what}: cannot listen on {where}: {why}")
    return outcome


def stop_unit(stop_children: Callable[[], Any], port: Any) -> "Deferred[Any]":
    """Stop a unit's child services (its monitor) and its listening *port* (None: not
    listening); the Deferred fires when both have, so twistd waits for them."""
    stopping = [maybeDeferred(stop_children)]
    if port is not None:
        stopping.append(maybeDeferred(port.stopListening))
    return DeferredList(stopping, consumeErrors=True)
