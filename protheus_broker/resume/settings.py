"""Settings of resumable sessions: the broker's keys and the connector's smartclient.ini.

Broker (``[BALANCE_SMART_CLIENT_DESKTOP]``): ``STANDBY_TIME`` (seconds a session waits for its
connector after the link drops, TOTVS's key, default 180), ``RESUME_ENABLE`` (default 1),
``RESUME_BUFFER_SIZE`` (KiB of replay buffer per direction, default 1024), ``RESUME_KEEPALIVE``
(seconds between keepalives, default 1; a link silent for four of them is dead),
``STANDBY_MAX_SESSIONS`` (sessions held in standby at once, default 1000: at the cap a further
drop ends the oldest session in standby).

Connector: the section of a smartclient.ini that names the broker (``server``, ``port``,
``BrokerProxy=1``).
"""

from __future__ import annotations

from dataclasses import dataclass

from protheus_broker.ini import ConfigError, Section, parse_port, read_ini

DEFAULT_STANDBY_TIME = 180.0
DEFAULT_BUFFER = 1024 * 1024
DEAD_AFTER_KEEPALIVES = 4
#: Sessions in standby at once.  A thousand simultaneous drops is a whole large branch office losing
#: its WAN link; it is a tenth of the default MAX_SESSIONS, so standby can never take the slots real
#: logins need; idle, they cost the broker about 6 MiB (a few KiB each); at worst (each dropped with
#: a full unacknowledged window) RESUME_BUFFER_SIZE + 256 KiB each.
DEFAULT_STANDBY_MAX_SESSIONS = 1000


@dataclass(frozen=True)
class ResumeConfig:
    """Resumable sessions on the broker's SmartClient port."""

    enabled: bool = True
    standby_time: float = DEFAULT_STANDBY_TIME
    buffer_size: int = DEFAULT_BUFFER
    keepalive: float = 1.0
    standby_max_sessions: int = DEFAULT_STANDBY_MAX_SESSIONS

    @property
    def dead_after(self) -> float:
        return self.keepalive * DEAD_AFTER_KEEPALIVES


def read_resume(section: Section) -> ResumeConfig:
    """The resume keys of the desktop section."""
    return ResumeConfig(
        enabled=section.boolean("RESUME_ENABLE", True),
        standby_time=section.number("STANDBY_TIME", DEFAULT_STANDBY_TIME, 1.0, 86400.0),
        buffer_size=section.integer("RESUME_BUFFER_SIZE", DEFAULT_BUFFER // 1024, 64, 1024 * 1024) * 1024,
        keepalive=section.number("RESUME_KEEPALIVE", 1.0, 0.05, 60.0),
        standby_max_sessions=section.integer("STANDBY_MAX_SESSIONS", DEFAULT_STANDBY_MAX_SESSIONS,
                                             1, 1_000_000),
    )


@dataclass(frozen=True)
class ConnectorConfig:
    """Where the connector listens and the broker it carries sessions to."""

    path: str
    section: str
    broker_host: str
    broker_port: int
    listen_interface: str
    listen_port: int
    buffer_size: int = DEFAULT_BUFFER
    keepalive: float = 1.0
    connect_timeout: float = 0.75
    max_backoff: float = 0.25
    handshake_timeout: float = 3.0

    @property
    def dead_after(self) -> float:
        return self.keepalive * DEAD_AFTER_KEEPALIVES


def parse_smartclient_ini(text: str, path: str, section_name: str | None = None,
                          listen_port: int | None = None, listen_interface: str = "127.0.0.1",
                          keepalive: float = 1.0) -> ConnectorConfig:
    """The broker named in a smartclient.ini section (*section_name*, else ``[drivers] active``).

    Every problem is a ``ConfigError`` naming the file, line and key."""
    raw, where = read_ini(text, path)
    # configobj keeps the names as written; TOTVS names are case-insensitive.
    sections = {name.upper(): name for name in raw.sections}

    def section(name: str) -> Section:
        real = sections.get(name.upper())
        if real is None:
            known = ", ".join(f"[{n}]" for n in raw.sections) or "none"
            raise ConfigError(path, f"no [{name}] section (sections: {known})")
        return Section(path, real, dict(raw[real]), where)

    if section_name is None:
        if "DRIVERS" not in sections:
            raise ConfigError(path, "no [drivers] section to find the active connection in; "
                                    "name the section with --section")
        drivers = section("DRIVERS")
        section_name = drivers.text("ACTIVE", "")
        if not section_name:
            raise drivers.error("ACTIVE", "[drivers] active is empty; name the section with --section")
    chosen = section(section_name)
    host = chosen.text("SERVER", "")
    if not host:
        raise ConfigError(path, f"[{chosen.name}] has no server= key: the broker's host",
                          line=where.sections.get(chosen.name), key="server")
    port_text = chosen.text("PORT", "")
    if not port_text:
        raise ConfigError(path, f"[{chosen.name}] has no port= key: the broker's port",
                          line=where.sections.get(chosen.name), key="port")
    port = parse_port(chosen, "PORT", port_text)
    if not chosen.boolean("BROKERPROXY", False):
        raise ConfigError(path, "must be 1: this section connects straight to an AppServer, the "
                                "connector needs a broker", line=chosen.line("BROKERPROXY")
                          or where.sections.get(chosen.name), key="BrokerProxy")
    listen = port if listen_port is None else listen_port
    if host in ("127.0.0.1", "localhost", "::1") and listen in (port, 0) and listen_port is None:
        raise ConfigError(path, f"points at this workstation ({host}:{port}); the connector would "
                                f"connect to itself: use the section naming the broker",
                          line=chosen.line("SERVER"), key="server")
    return ConnectorConfig(path=path, section=chosen.name, broker_host=host, broker_port=port,
                           listen_interface=listen_interface, listen_port=listen,
                           keepalive=keepalive)
