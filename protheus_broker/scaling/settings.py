"""Scale-to-zero keys of a balance unit: in the section holding its node keys (the unit's own,
or the one ``NODES = <section>`` names), else in the unit's section.

========================  =========  =========================================================
``SCALE_TO_ZERO``         0          1: the pool may sleep at zero AppServers; logins wake it
``ZERO_IDLE_TIME``        900        seconds with no session open before the pool sleeps
``WAKE_TIMEOUT``          see below  seconds a login is held waiting for a woken AppServer
``MAX_HELD``              200        logins held at once while waking (more: refused)
========================  =========  =========================================================

``WAKE_TIMEOUT`` defaults to twice the node's ``START_TIMEOUT`` and at least 60 s; one not
above ``START_TIMEOUT`` draws a warning (a cold start would outlast the wait).
"""

from __future__ import annotations

from dataclasses import replace

from protheus_broker.ini import ConfigError, Section
from protheus_broker.nodes.manager import NodePolicy
from protheus_broker.scaling.controller import ScaleToZeroPolicy

#: WAKE_TIMEOUT's smallest default.
WAKE_TIMEOUT_MIN_DEFAULT = 60.0


def read_scale_to_zero(section: Section) -> ScaleToZeroPolicy:
    """The keys as written (``wake_timeout`` 0 when not given: :func:`check_scale_to_zero`
    fills it in)."""
    return ScaleToZeroPolicy(
        enabled=section.boolean("SCALE_TO_ZERO", False),
        idle_time=section.number("ZERO_IDLE_TIME", 900.0, 0.0, 7 * 86400.0),
        wake_timeout=section.number("WAKE_TIMEOUT", 0.0, 0.0, 3600.0),
        max_held=section.integer("MAX_HELD", 200, 1, 1_000_000),
    )


def check_scale_to_zero(policy: ScaleToZeroPolicy, section: Section, nodes: NodePolicy | None,
                        warnings: list[str], kubernetes: bool = False) -> ScaleToZeroPolicy:
    """*policy* checked against the unit's nodes: WAKE_TIMEOUT's default from START_TIMEOUT, a
    warning when it is not longer than START_TIMEOUT, MIN_NODES as the awake minimum; an error
    when it asks for scale to zero without managed nodes or with a persistent node."""
    if not policy.enabled:
        return policy
    if nodes is None and kubernetes:  # a Kubernetes scaler: pods start in their own time (WAKE_TIMEOUT)
        return replace(policy, wake_timeout=policy.wake_timeout or WAKE_TIMEOUT_MIN_DEFAULT, min_awake=1)
    if nodes is None:
        raise ConfigError(section.path, "SCALE_TO_ZERO=1 needs managed nodes (NODE_COMMAND or NODES = "
                          "<section>) or KUBERNETES = <section>", line=section.line("SCALE_TO_ZERO"),
                          key="SCALE_TO_ZERO")
    if nodes.persistent:
        raise ConfigError(section.path, "SCALE_TO_ZERO=1 cannot stop a PERSISTENT=1 node: turn one off",
                          line=section.line("SCALE_TO_ZERO"), key="SCALE_TO_ZERO")
    wake = policy.wake_timeout or max(WAKE_TIMEOUT_MIN_DEFAULT, 2 * nodes.start_timeout)
    if wake <= nodes.start_timeout:
        warnings.append(
            f"{section.path}:{section.line('WAKE_TIMEOUT')}: [{section.name}] WAKE_TIMEOUT={wake:g} is not "
            f"longer than START_TIMEOUT={nodes.start_timeout:g}: a login may give up before a cold node "
            f"is ready")
    return replace(policy, wake_timeout=wake, min_awake=max(1, nodes.min_nodes))
