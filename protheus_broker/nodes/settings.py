"""Managed node keys of a balance unit: in the unit's own section, or in a section it names with
``NODES = <section>``; ``NODE_COMMAND`` turns node management on."""

from __future__ import annotations

import os
import re
import shlex
import socket
from typing import Mapping

from protheus_broker.ini import ConfigError, Section, parse_port, read_secret, valid_host
from protheus_broker.nodes.manager import FarmSettings, NodePolicy, Transport

#: Where Unix sockets and the persistent-node locks go when systemd names no directory.
RUN_DIR = "/run/protheus-broker"


def default_run_dir(environ: Mapping[str, str]) -> str:
    """SOCKET_DIR's and LOCK_DIR's default: systemd's ``RuntimeDirectory=`` (``$RUNTIME_DIRECTORY``),
    else its ``StateDirectory=`` (``$STATE_DIRECTORY``: the shipped unit's /var/lib/protheus-broker,
    writable under ``ProtectSystem=strict``), else /run/protheus-broker."""
    for name in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY"):
        value = environ.get(name, "").split(":")[0]
        if value:
            return value
    return RUN_DIR

_PLACEHOLDERS = {"id": "1", "port": "21001", "socket": "/run/x.sock", "persistent": "0"}


def nodes_section(section: Section, sections: Mapping[str, Section]) -> Section | None:
    """The section holding *section*'s node keys, None when it manages no nodes."""
    named = section.raw("NODES")
    if named:
        target = sections.get(named)
        if target is None:
            raise section.error("NODES", f"no [{named}] section in the file")
        return target
    return section if section.raw("NODE_COMMAND") or section.raw("FARM_HOSTS") else None


def read_farm_hosts(section: Section) -> tuple[tuple[str, int], ...]:
    """FARM_HOSTS: agents as host:port (``[v6]:port``), separated by commas or spaces."""
    hosts: list[tuple[str, int]] = []
    for word in section.text("FARM_HOSTS", "").replace(",", " ").split():
        host, sep, port_text = word.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not valid_host(host):
            raise section.error("FARM_HOSTS", f"expected host:port (the agent's), got {word!r}")
        address = (host, parse_port(section, "FARM_HOSTS", port_text))
        if address in hosts:
            raise section.error("FARM_HOSTS", f"{word} is listed twice")
        hosts.append(address)
    return tuple(hosts)


def read_farm(section: Section, unit: str) -> FarmSettings | None:
    """FARM_HOSTS and its keys (None without FARM_HOSTS)."""
    hosts = read_farm_hosts(section)
    if not hosts:
        return None
    template = section.text("FARM_TEMPLATE", "APPSERVER").upper()
    if not re.match(r"^[A-Z0-9_\-]+$", template):
        raise section.error("FARM_TEMPLATE", f"{template!r}: the name of a COMMAND_<name> of the agents' [NODES]")
    broker_id = section.text("FARM_BROKER_ID", f"{socket.gethostname()}/{unit}")
    if not broker_id or len(broker_id) > 200 or any(c.isspace() for c in broker_id):
        raise section.error("FARM_BROKER_ID", "1..200 characters, no spaces")
    return FarmSettings(
        hosts=hosts, template=template, local=section.boolean("LOCAL_NODES", False),
        secret=read_secret(section, "FARM_", "with FARM_HOSTS (the agents' [AGENT] SECRET)"),
        broker_id=broker_id, wait=section.number("FARM_WAIT", 5.0, 0.0, 600.0))


def read_command(section: Section) -> tuple[str, ...]:
    """NODE_COMMAND split like a shell would, each placeholder checked."""
    text = section.text("NODE_COMMAND", "")
    if not text:
        raise section.error("NODE_COMMAND", "missing: the command that starts one AppServer node")
    try:
        words = tuple(shlex.split(text))
    except ValueError as e:
        raise section.error("NODE_COMMAND", f"cannot split it into words: {e}") from None
    for word in words:
        try:
            word.format(**_PLACEHOLDERS)
        except (KeyError, IndexError, ValueError) as e:
            raise section.error("NODE_COMMAND", f"bad placeholder in {word!r} ({e!s}): use "
                                "{id}, {port}, {socket} or {persistent}; {{ and }} for braces") from None
    return words


def read_nodes(unit: Section, sections: Mapping[str, Section], application: str,
               warnings: list[str] | None = None, environ: Mapping[str, str] | None = None) -> NodePolicy | None:
    """The unit's :class:`NodePolicy`, or None without node keys.  *application* names the
    persistent node's lock (the unit's section by default; ``APPLICATION`` overrides).  Unknown
    keys of a section named by ``NODES`` are added to *warnings*."""
    section = nodes_section(unit, sections)
    if section is None:
        return None
    farm = read_farm(section, unit.name)
    if farm is not None and not farm.local and not section.raw("NODE_COMMAND"):
        command: tuple[str, ...] = ("{port}",)  # (no local nodes: the agents own the commands)
    else:
        command = read_command(section)
    run_dir = default_run_dir(os.environ if environ is None else environ)
    transport_text = section.text("TRANSPORT", "TCP").upper()
    try:
        transport = Transport(transport_text)
    except ValueError:
        raise section.error("TRANSPORT", f"expected TCP or UNIX, got {transport_text!r}") from None
    if farm is not None and transport is not Transport.TCP:
        raise section.error("TRANSPORT", "FARM_HOSTS needs TRANSPORT=TCP (nodes on other hosts are reached over TCP)")
    placeholder = "{socket}" if transport is Transport.UNIX else "{port}"
    if not any(placeholder in word for word in command):
        raise section.error("NODE_COMMAND", f"TRANSPORT={transport.value} needs {placeholder} in the command")
    min_nodes = section.integer("MIN_NODES", 1, 0, 1000)
    max_nodes = section.integer("MAX_NODES", max(4, min_nodes), 1, 1000)
    if max_nodes < min_nodes:
        raise section.error("MAX_NODES", f"{max_nodes} is below MIN_NODES={min_nodes}")
    base_text = section.raw("BASE_PORT")
    base_port = parse_port(section, "BASE_PORT", base_text) if base_text else 21000
    if base_port + max_nodes * 2 > 65535:
        raise section.error("BASE_PORT", f"{base_port} leaves no room for {max_nodes} nodes below 65536")
    policy = NodePolicy(
        command=command,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        sessions_per_node=section.integer("SESSIONS_PER_NODE", 50, 1, 1_000_000),
        transport=transport,
        base_port=base_port,
        socket_dir=section.text("SOCKET_DIR", run_dir),
        start_timeout=section.number("START_TIMEOUT", 30.0, 0.1, 3600.0),
        poll_interval=section.number("POLL_INTERVAL", 5.0, 0.1, 3600.0),
        poll_misses=section.integer("POLL_MISSES", 3, 1, 1000),
        recycle_sessions=section.integer("RECYCLE_SESSIONS", 0, 0, 1_000_000_000),
        recycle_age=section.number("RECYCLE_AGE", 0.0, 0.0, 365 * 86400.0),
        recycle_memory=section.integer("RECYCLE_MEMORY", 0, 0, 1_048_576) * 1024 * 1024,
        recycle_jitter=section.number("RECYCLE_JITTER", 0.1, 0.0, 1.0),
        drain_timeout=section.number("DRAIN_TIMEOUT", 3600.0, 0.0, 7 * 86400.0),
        stop_grace=section.number("STOP_GRACE", 10.0, 0.0, 3600.0),
        idle_time=section.number("IDLE_TIME", 60.0, 0.0, 86400.0),
        persistent=section.boolean("PERSISTENT", False),
        application=section.text("APPLICATION", application),
        lock_dir=section.text("LOCK_DIR", run_dir),
        farm=farm,
    )
    if policy.persistent and policy.max_nodes < 1:
        raise ConfigError(section.path, "PERSISTENT=1 needs MAX_NODES of 1 or more", key="PERSISTENT")
    if section is not unit and warnings is not None:
        for key in section.unknown_keys():
            warnings.append(f"{section.path}:{section.line(key)}: [{section.name}] {key}: unknown key; ignored")
    return policy
