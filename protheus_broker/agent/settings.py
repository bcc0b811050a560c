"""``protheus-agent``'s own ini: ``[AGENT]`` (listening, authentication) and one
``[APPSERVER_<name>]`` per watched AppServer."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from protheus_broker.ini import ConfigError, Section, parse_port, read_file, read_ini, read_secret
from protheus_broker.monitoring.settings import DEFAULT_AGENT_PORT
from protheus_broker.tls.settings import TLSFiles, tls_files


DEFAULT_AGENT_CONFIG_PATH = "/etc/protheus-broker/agent.ini"


AGENT_SECTION = "AGENT"


_APPSERVER_SECTION_RE = re.compile(r"^APPSERVER_([A-Z0-9_\-]+)$")


@dataclass(frozen=True)
class WatchedAppServer:
    """One ``[APPSERVER_<name>]`` the agent watches.

    The process is found by ``PID_FILE`` if given, else by ``PROCESS_NAME`` listening on ``PORT``,
    else as whatever process listens on ``PORT``.
    """

    name: str
    port: int
    host: str = "127.0.0.1"
    pid_file: str | None = None
    process_name: str | None = None
    users_file: str | None = None

    @property
    def found_by(self) -> str:
        if self.pid_file:
            return f"pid file {self.pid_file}"
        if self.process_name:
            return f"process {self.process_name!r} listening on port {self.port}"
        return f"the process listening on port {self.port}"


@dataclass(frozen=True)
class AgentConfig:
    """``protheus-agent``'s ini: where it listens, how brokers authenticate, what it watches."""

    path: str
    port: int
    appservers: tuple[WatchedAppServer, ...]
    interface: str = ""
    secret: bytes | None = field(default=None, repr=False)
    tls: TLSFiles | None = None
    sample_interval: float = 1.0
    #: A connection left this long in an AppServer's accept queue means it does not accept
    #: (hung or stopped); 0 turns the check off.
    accept_timeout: float = 3.0
    warnings: tuple[str, ...] = field(default=(), compare=False)


def read_watched(section: Section, name: str) -> WatchedAppServer:
    port_text = section.raw("PORT")
    if not port_text:
        raise ConfigError(section.path, "PORT is missing: the AppServer's listening port",
                          line=section.where.sections.get(section.name), key=f"[{section.name}]")
    return WatchedAppServer(
        name=name,
        port=parse_port(section, "PORT", port_text),
        host=section.text("HOST", "127.0.0.1"),
        pid_file=section.text("PID_FILE", "") or None,
        process_name=section.text("PROCESS_NAME", "") or None,
        users_file=section.text("USERS_FILE", "") or None,
    )


def parse_agent_config(text: str, path: str = "<agent config>") -> AgentConfig:
    """Parse the agent's ini text into an :class:`AgentConfig`, or raise :class:`ConfigError`."""
    raw, where = read_ini(text, path)
    warnings: list[str] = []
    sections = {name: Section(path, name, dict(raw[name]), where) for name in raw.sections}
    if AGENT_SECTION not in sections:
        raise ConfigError(path, f"no [{AGENT_SECTION}] section: where the agent listens and how "
                                "brokers authenticate")
    agent = sections[AGENT_SECTION]
    port = parse_port(agent, "PORT", agent.text("PORT", str(DEFAULT_AGENT_PORT)), allow_zero=True)
    tls = tls_files(agent, "", None)
    secret = read_secret(agent, "", None if tls else "when SSL_CERTIFICATE/SSL_KEY/SSL_CA are not set "
                                                 "(no broker may connect unauthenticated)")
    watched: list[WatchedAppServer] = []
    for name, section in sections.items():
        match = _APPSERVER_SECTION_RE.match(name)
        if match:
            watched.append(read_watched(section, match.group(1)))
        elif name != AGENT_SECTION:
            warnings.append(f"{path}:{where.sections[name]}: unknown section [{name}]; ignored")
    if not watched:
        raise ConfigError(path, "no [APPSERVER_<name>] section: the agent has nothing to watch")
    ports: dict[int, str] = {}
    for server in watched:
        if server.port in ports:
            section = sections[f"APPSERVER_{server.name}"]
            raise section.error("PORT", f"port {server.port} is also [APPSERVER_{ports[server.port]}]'s")
        ports[server.port] = server.name
    config = AgentConfig(
        path=path, port=port, appservers=tuple(watched), interface=agent.text("INTERFACE", ""),
        secret=secret, tls=tls, sample_interval=agent.number("SAMPLE_INTERVAL", 1.0, 0.05, 3600.0),
        accept_timeout=agent.number("ACCEPT_TIMEOUT", 3.0, 0.0, 3600.0),
    )
    for section in sections.values():
        if section.name == AGENT_SECTION or _APPSERVER_SECTION_RE.match(section.name):
            for key in section.unknown_keys():
                warnings.append(f"{path}:{section.line(key)}: [{section.name}] {key}: unknown key; ignored")
    return replace(config, warnings=tuple(warnings))


def load_agent_config(path: str) -> AgentConfig:
    """Read and parse the agent's ini file at *path*; every problem is a :class:`ConfigError`."""
    return parse_agent_config(read_file(path), os.fspath(path))
