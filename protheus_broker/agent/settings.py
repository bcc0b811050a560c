"""``protheus-agent``'s own ini: ``[AGENT]`` (listening, authentication) and one
``[APPSERVER_<name>]`` per watched AppServer."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field, replace

from protheus_broker.ini import ConfigError, Section, parse_port, read_file, read_ini, read_secret
from protheus_broker.monitoring.settings import DEFAULT_AGENT_PORT
from protheus_broker.tls.settings import TLSFiles, tls_files


DEFAULT_AGENT_CONFIG_PATH = "/etc/protheus-broker/agent.ini"


AGENT_SECTION = "AGENT"
NODES_SECTION = "NODES"


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


#: Placeholders a [NODES] COMMAND_<name> may use (filled in by the agent, never by the broker).
FARM_PLACEHOLDERS = {"id": "1", "port": "21001", "persistent": "0", "application": "app"}
_TEMPLATE_KEY_RE = re.compile(r"^COMMAND_([A-Z0-9_\-]+)$")


@dataclass(frozen=True)
class FarmConfig:
    """``[NODES]``: this agent is a farm host; brokers may start nodes here, each with one of
    these command templates (by name), on ports BASE_PORT+1..BASE_PORT+MAX_NODES of HOST."""

    templates: dict[str, tuple[str, ...]]
    host: str = "127.0.0.1"
    base_port: int = 21000
    max_nodes: int = 8
    stop_grace: float = 10.0
    persistent_grace: float = 60.0
    orphan_timeout: float = 3600.0
    start_timeout: float = 60.0


def read_farm(section: Section) -> FarmConfig:
    """The [NODES] section: COMMAND_<name> templates and the limits."""
    templates: dict[str, tuple[str, ...]] = {}
    for key in section.values:
        match = _TEMPLATE_KEY_RE.match(key)
        if not match:
            continue
        try:
            words = tuple(shlex.split(section.text(key, "")))
        except ValueError as e:
            raise section.error(key, f"cannot split it into words: {e}") from None
        if not words:
            raise section.error(key, "empty command")
        for word in words:
            try:
                word.format(**FARM_PLACEHOLDERS)
            except (KeyError, IndexError, ValueError) as e:
                raise section.error(key, f"bad placeholder in {word!r} ({e!s}): use {{id}}, {{port}}, "
                                         "{persistent} or {application}") from None
        if not any("{port}" in word for word in words):
            raise section.error(key, "the command needs {port} (where the node listens)")
        templates[match.group(1)] = words
    if not templates:
        raise ConfigError(section.path, "[NODES] has no COMMAND_<name>: the commands brokers may run here",
                          key="[NODES]")
    max_nodes = section.integer("MAX_NODES", 8, 1, 500)  # (its node list fits one AMP box)
    base_text = section.raw("BASE_PORT")
    base_port = parse_port(section, "BASE_PORT", base_text) if base_text else 21000
    if base_port + max_nodes > 65535:
        raise section.error("BASE_PORT", f"{base_port} leaves no room for {max_nodes} nodes below 65536")
    return FarmConfig(
        templates=templates, host=section.text("HOST", "127.0.0.1"), base_port=base_port,
        max_nodes=max_nodes, stop_grace=section.number("STOP_GRACE", 10.0, 0.0, 3600.0),
        persistent_grace=section.number("PERSISTENT_GRACE", 60.0, 0.0, 86400.0),
        orphan_timeout=section.number("ORPHAN_TIMEOUT", 3600.0, 0.0, 30 * 86400.0),
        start_timeout=section.number("START_TIMEOUT", 60.0, 0.1, 3600.0),
    )


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
    farm: FarmConfig | None = None  # [NODES]: a farm host
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
        elif name not in (AGENT_SECTION, NODES_SECTION):
            warnings.append(f"{path}:{where.sections[name]}: unknown section [{name}]; ignored")
    farm = read_farm(sections[NODES_SECTION]) if NODES_SECTION in sections else None
    if not watched and farm is None:
        raise ConfigError(path, "no [APPSERVER_<name>] section and no [NODES]: the agent has nothing to do")
    ports: dict[int, str] = {}
    for server in watched:
        if server.port in ports:
            section = sections[f"APPSERVER_{server.name}"]
            raise section.error("PORT", f"port {server.port} is also [APPSERVER_{ports[server.port]}]'s")
        ports[server.port] = server.name
    config = AgentConfig(
        path=path, port=port, appservers=tuple(watched), interface=agent.text("INTERFACE", ""),
        secret=secret, tls=tls, sample_interval=agent.number("SAMPLE_INTERVAL", 1.0, 0.05, 3600.0),
        accept_timeout=agent.number("ACCEPT_TIMEOUT", 3.0, 0.0, 3600.0), farm=farm,
    )
    for section in sections.values():
        if section.name in (AGENT_SECTION, NODES_SECTION) or _APPSERVER_SECTION_RE.match(section.name):
            for key in section.unknown_keys():
                warnings.append(f"{path}:{section.line(key)}: [{section.name}] {key}: unknown key; ignored")
    return replace(config, warnings=tuple(warnings))


def load_agent_config(path: str) -> AgentConfig:
    """Read and parse the agent's ini file at *path*; every problem is a :class:`ConfigError`."""
    return parse_agent_config(read_file(path), os.fspath(path))
