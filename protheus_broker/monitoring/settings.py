"""``MONITORING_TYPE`` and the keys that go with it (agents, secrets, intervals), as read from a
balance section."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.ini import Section, host_and_port, parse_port, read_secret
from protheus_broker.tls.settings import TLSFiles, tls_files


class MonitoringType(enum.Enum):
    """The TOTVS ``MONITORING_TYPE`` values (``DISABLE`` is an alias of ``DISABLED``)."""

    CONNECTION = "CONNECTION"
    SMARTCLIENT = "SMARTCLIENT"
    SMARTCLIENT_SSL = "SMARTCLIENT_SSL"
    SMARTCLIENT_ACTIVE = "SMARTCLIENT_ACTIVE"
    SMARTCLIENT_SSL_ACTIVE = "SMARTCLIENT_SSL_ACTIVE"
    DISABLED = "DISABLED"

    @property
    def is_active(self) -> bool:
        """True when a permanent channel reports live metrics (what SERVER_* methods need)."""
        return self in (MonitoringType.SMARTCLIENT_ACTIVE, MonitoringType.SMARTCLIENT_SSL_ACTIVE)

    @property
    def uses_agent(self) -> bool:
        """True when the broker talks to each server's agent (all but CONNECTION and DISABLED)."""
        return self not in (MonitoringType.CONNECTION, MonitoringType.DISABLED)

    @property
    def uses_tls(self) -> bool:
        """True when the agent channel is mutual TLS."""
        return self in (MonitoringType.SMARTCLIENT_SSL, MonitoringType.SMARTCLIENT_SSL_ACTIVE)


#: Where an agent listens when no ``AGENT_SERVER_<id>`` / ``AGENT_PORT`` says otherwise.
DEFAULT_AGENT_PORT = 7077


@dataclass(frozen=True)
class MonitoringConfig:
    """How the broker watches its servers (``MONITORING_TYPE`` and the keys that go with it)."""

    agents: dict[str, tuple[str, int]] = field(default_factory=dict)  # server id -> agent host, port
    secret: bytes | None = field(default=None, repr=False)
    tls: TLSFiles | None = None
    probe_interval: float = 60.0
    heartbeat_interval: float = 1.0
    suspend_misses: int = 1
    down_misses: int = 3
    suspect_time: float = 10.0
    session_memory_bytes: int = 20 * 1024 * 1024
    session_cpu_percent: float = 2.0


AGENT_KEY_RE = re.compile(r"^AGENT_SERVER_([A-Z0-9]+)$")


def read_monitoring(section: Section, monitoring_type: MonitoringType,
                servers: list[RemoteServer]) -> MonitoringConfig:
    ids = {s.server_id: s for s in servers}
    agent_port = parse_port(section, "AGENT_PORT", section.text("AGENT_PORT", str(DEFAULT_AGENT_PORT)))
    agents = {s.server_id: (s.host, agent_port) for s in servers}
    for key in section.values:
        match = AGENT_KEY_RE.match(key)
        if match:
            if match.group(1) not in ids:
                raise section.error(key, f"no REMOTE_SERVER_{match.group(1)} for this agent")
            agents[match.group(1)] = host_and_port(section, key)
    because = f"with MONITORING_TYPE={monitoring_type.value}"
    tls = tls_files(section, "AGENT_", because if monitoring_type.uses_tls else None)
    secret_needed = monitoring_type.uses_agent and not monitoring_type.uses_tls
    secret = read_secret(section, "AGENT_", because if secret_needed else None)
    suspend_misses = section.integer("HEARTBEAT_SUSPEND_MISSES", 1, 1, 1000)
    down_misses = section.integer("HEARTBEAT_DOWN_MISSES", 3, 1, 1000)
    if down_misses < suspend_misses:
        raise section.error("HEARTBEAT_DOWN_MISSES",
                            f"{down_misses} is below HEARTBEAT_SUSPEND_MISSES ({suspend_misses})")
    return MonitoringConfig(
        agents=agents,
        secret=secret,
        tls=tls,
        probe_interval=section.number("MONITORING_INTERVAL", 60.0, 0.1, 86400.0),
        heartbeat_interval=section.number("HEARTBEAT_INTERVAL", 1.0, 0.05, 3600.0),
        suspend_misses=suspend_misses,
        down_misses=down_misses,
        suspect_time=section.number("SUSPECT_TIME", 10.0, 0.0, 86400.0),
        session_memory_bytes=int(section.number("SESSION_MEMORY_MB", 20.0, 0.0, 1024.0 * 1024) * 1024 * 1024),
        session_cpu_percent=section.number("SESSION_CPU_PERCENT", 2.0, 0.0, 100000.0),
    )


def read_monitoring_type(section: Section) -> MonitoringType:
    value = section.text("MONITORING_TYPE", MonitoringType.CONNECTION.value).upper()
    if value == "DISABLE":
        return MonitoringType.DISABLED
    try:
        return MonitoringType(value)
    except ValueError:
        names = ", ".join(m.value for m in MonitoringType) + ", DISABLE"
        raise section.error("MONITORING_TYPE", f"unknown type {value!r} (one of {names})") from None
