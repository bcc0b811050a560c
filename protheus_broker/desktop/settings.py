"""``[BALANCE_SMART_CLIENT_DESKTOP]``: the SmartClient desktop unit's keys, typed and checked."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from protheus_broker.balancing.methods import SortMethod
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.ini import ConfigError, Section, host_and_port, parse_port
from protheus_broker.scaling.unit_settings import read_scaling
from protheus_broker.monitoring.settings import (AGENT_KEY_RE, read_monitoring, read_monitoring_type)
from protheus_broker.resume.settings import ResumeConfig, read_resume
from protheus_broker.tls.settings import SSL_SECTION, session_tls_config
from protheus_broker.unit_config import UnitConfig


DESKTOP_SECTION = "BALANCE_SMART_CLIENT_DESKTOP"


@dataclass(frozen=True)
class DesktopBalanceConfig(UnitConfig):
    """``[BALANCE_SMART_CLIENT_DESKTOP]``: the SmartClient desktop broker."""

    sort_method: SortMethod = SortMethod.SERVER_MEMORY
    first_bytes_wait: float = 0.5  # FIRST_BYTES_WAIT: silent client -> plain SmartClient after this
    first_response_timeout: float = 5.0  # FIRST_RESPONSE_TIMEOUT: no AppServer byte -> replay (0: off)
    wait_for_server: float = 0.0  # WAIT_FOR_SERVER: no server can take a session -> wait this long (0: fail at once)
    service_display_name: str = "protheus-broker"
    resume: ResumeConfig = field(default_factory=ResumeConfig)  # resumable sessions (connector)


_SERVER_KEY_RE = re.compile(r"^REMOTE_SERVER_([A-Z0-9]+)$")


_SORT_ALIASES = {f"PROTHEUS_{m.name[len('SERVER_'):]}": m for m in SortMethod if m.needs_metrics}


def _remote_server(section: Section, key: str, server_id: str) -> RemoteServer:
    host, port = host_and_port(section, key)
    return RemoteServer(server_id=server_id, host=host, port=port)


def read_sort_method(section: Section) -> SortMethod:
    value = section.text("SORT_METHOD", SortMethod.SERVER_MEMORY.value).upper()
    if value in _SORT_ALIASES:
        return _SORT_ALIASES[value]
    try:
        return SortMethod(value)
    except ValueError:
        names = ", ".join(m.value for m in SortMethod)
        raise section.error("SORT_METHOD", f"unknown method {value!r} (one of {names})") from None


def read_desktop(section: Section, sections: Mapping[str, Section],
                 warnings: list[str]) -> DesktopBalanceConfig:
    """The desktop unit's config; TLS may also come from ``[SSLConfigure]`` in *sections*."""
    port_text = section.raw("LOCAL_SERVER_PORT")
    if not port_text:
        raise ConfigError(
            section.path,
            "LOCAL_SERVER_PORT is missing: the port SmartClients connect to",
            line=section.where.sections.get(section.name),
            key=f"[{section.name}]",
        )
    local_port = parse_port(section, "LOCAL_SERVER_PORT", port_text, allow_zero=True)

    servers: list[RemoteServer] = []
    for key in section.values:  # file order: the server table as the user wrote it
        match = _SERVER_KEY_RE.match(key)
        if match:
            servers.append(_remote_server(section, key, match.group(1)))
        elif key.startswith("REMOTE_SERVER"):
            raise section.error(key, "server id must be letters and digits after REMOTE_SERVER_")
        elif key.startswith("AGENT_SERVER") and not AGENT_KEY_RE.match(key):
            raise section.error(key, "server id must be letters and digits after AGENT_SERVER_")
    scaling = read_scaling(section, sections, warnings)
    if not servers and not scaling.has_source:
        raise ConfigError(
            section.path,
            "no REMOTE_SERVER_<id> = host port lines (nor NODE_COMMAND, nor KUBERNETES): the broker has no AppServer "
            "to send users to",
            line=section.where.sections.get(section.name),
            key=f"[{section.name}]",
        )
    seen: dict[str, str] = {}
    for server in servers:
        if server.address in seen:
            warnings.append(
                f"{section.path}:{section.line('REMOTE_SERVER_' + server.server_id)}: "
                f"REMOTE_SERVER_{server.server_id}: same address {server.address} as "
                f"REMOTE_SERVER_{seen[server.address]}"
            )
        seen.setdefault(server.address, server.server_id)

    monitoring_type = read_monitoring_type(section)
    config = DesktopBalanceConfig(
        local_port=local_port,
        servers=tuple(servers),
        local_interface=section.text("LOCAL_SERVER_INTERFACE", ""),
        sort_method=read_sort_method(section),
        monitoring_type=monitoring_type,
        connect_timeout=section.number("CONNECT_TIMEOUT", 5.0, 0.1, 300.0),
        max_sessions=section.integer("MAX_SESSIONS", 10000, 0, 1_000_000),
        first_bytes_wait=section.number("FIRST_BYTES_WAIT", 0.5, 0.0, 10.0),
        first_response_timeout=section.number("FIRST_RESPONSE_TIMEOUT", 5.0, 0.0, 300.0),
        max_pending_per_address=section.integer("MAX_PENDING_PER_ADDRESS", 128, 0, 1_000_000),
        max_pending=section.integer("MAX_PENDING", 1024, 0, 1_000_000),
        # With managed nodes a login may arrive while none is ready yet (start, a crash): wait.
        wait_for_server=section.number("WAIT_FOR_SERVER", 10.0 if scaling.has_source else 0.0, 0.0, 3600.0),
        metrics_max_age=section.number("METRICS_MAX_AGE", 3.0, 0.1, 3600.0),
        service_name=section.text("SERVICE_NAME", "protheus-broker"),
        service_display_name=section.text("SERVICE_DISPLAY_NAME", "protheus-broker"),
        monitoring=read_monitoring(section, monitoring_type, servers),
        resume=read_resume(section),
        tls=session_tls_config(section, sections.get(SSL_SECTION), warnings),
        nodes=scaling.nodes,
        scale_to_zero=scaling.scale_to_zero,
        kubernetes=scaling.kubernetes,
        warmup=scaling.warmup,
    )
    if config.sort_method != config.effective_sort_method:
        warnings.append(
            f"{section.path}: SORT_METHOD={config.sort_method.value} needs MONITORING_TYPE="
            f"SMARTCLIENT_ACTIVE or SMARTCLIENT_SSL_ACTIVE (is {config.monitoring_type.value}); "
            f"balancing by CONNECTION instead"
        )
    standby_cap = config.resume.standby_max_sessions
    if config.resume.enabled and config.max_sessions and standby_cap >= config.max_sessions:
        warnings.append(
            f"{section.path}:{section.line('STANDBY_MAX_SESSIONS') or section.line('MAX_SESSIONS')}: "
            f"STANDBY_MAX_SESSIONS={standby_cap} is not below MAX_SESSIONS={config.max_sessions}: "
            f"sessions in standby could take every slot that logins need"
        )
    return config
