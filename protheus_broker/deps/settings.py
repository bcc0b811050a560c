"""``DEPENDS_ON`` on a balance unit's section and the dependency sections it names.

A unit names the services it needs: ``DEPENDS_ON = DBACCESS, LOCKSERVER, LICENSECLIENT``, each
the name of a section of the same file as TOTVS writes it in an AppServer's ``appserver.ini``
(``[DBAccess] SERVER=... PORT=7890``, ``[LockServer]``, ``[LicenseClient]``).  The broker uses
their ``SERVER`` and ``PORT``; the other TOTVS keys there are read and ignored; our own optional
keys tune the check (:class:`DependencyConfig`).

A dependency may instead be a balance unit of this same broker: ``UNIT = BALANCE_...`` in its
section (a unit balancing that service's nodes with scale to zero): it is up while that unit can
take a session, and waking a unit that depends on it wakes it first (see
``deps.state.UnitDependency``).  No check runs for it; SERVER and PORT are then not needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from protheus_broker.deps.state import LICENSE_CLIENT
from protheus_broker.ini import ConfigError, Section, parse_port, valid_host

DEPENDS_ON_KEY = "DEPENDS_ON"

#: Keys TOTVS writes in these sections that the broker has no use for ([DBAccess]: DATABASE,
#: ALIAS, PROTHEUSONLY; [LockServer]: ENABLE, MESSAGELOG): read so they are not "unknown".
TOTVS_KEYS = ("DATABASE", "ALIAS", "PROTHEUSONLY", "ENABLE", "MESSAGELOG")

#: TOTVS's value of SERVER for "no server configured" (``[LockServer] Server=NOCONFIG``).
NO_SERVER = "NOCONFIG"

#: PORT of a section that may leave it out: [LICENSECLIENT] (TOTVS's License Server listens on 5555,
#: the default of license.client_settings.DEFAULT_LICENSE_PORT too).
DEFAULT_PORTS = {LICENSE_CLIENT: 5555}

_SPLIT_RE = re.compile(r"[\s,]+")  # (a ";" starts a comment in TOTVS ini files)


@dataclass(frozen=True)
class DependencyConfig:
    """One dependency section: what to connect to and how often."""

    name: str  # the section, upper case
    host: str  # SERVER
    port: int  # PORT
    check_interval: float = 5.0  # CHECK_INTERVAL: seconds between two checks
    connect_timeout: float = 3.0  # CONNECT_TIMEOUT: a check without a connection this long failed
    down_after: int = 2  # DOWN_AFTER_FAILURES: failed checks in a row before down
    up_after: int = 2  # UP_AFTER_SUCCESSES: good checks in a row before up again
    unit: str = ""  # UNIT: a balance unit of this broker that is this service (no check then)

    @property
    def where(self) -> str:
        if self.unit:
            return f"unit {self.unit}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def retry_after(self) -> int:
        """The soonest a dependency that is down can be up again, in whole seconds."""
        return max(1, int(-(-(self.check_interval * self.up_after) // 1)))


def read_depends_on(section: Section, sections: Mapping[str, Section], reserved: Iterable[str]) -> tuple[str, ...]:
    """The section names in the unit *section*'s DEPENDS_ON (upper case, in order, once each);
    a name that is not a section of the file, or is one of the broker's own (*reserved*, a
    ``[BALANCE_*]``), is a :class:`ConfigError` naming the key's line."""
    value = section.text(DEPENDS_ON_KEY, "")
    names: list[str] = []
    for item in _SPLIT_RE.split(value):
        name = item.strip().strip("[]").upper()
        if not name or name in names:
            continue
        if name not in sections:
            present = ", ".join(sorted(n for n in sections if n not in set(reserved) and not n.startswith("BALANCE_")))
            raise section.error(DEPENDS_ON_KEY, f"no section [{name}] in this file (a dependency is a section "
                                                f"with SERVER and PORT{', e.g. ' + present if present else ''})")
        if name in set(reserved) or name.startswith("BALANCE_"):
            raise section.error(DEPENDS_ON_KEY, f"[{name}] is one of the broker's own sections, not a "
                                                f"service with SERVER and PORT")
        names.append(name)
    return tuple(names)


def read_dependency(section: Section) -> DependencyConfig:
    """A dependency section's SERVER and PORT (both required, but [LICENSECLIENT]'s PORT
    defaults to 5555 as the license client's does) and our check keys."""
    for key in TOTVS_KEYS:
        section.raw(key)
    unit = section.text("UNIT", "").strip().strip("[]").upper()
    if unit:  # a unit of this broker: its pool says up or down (SERVER and PORT are not used)
        section.raw("SERVER")
        section.raw("PORT")
        return DependencyConfig(name=section.name, host="", port=0, unit=unit)
    server = section.text("SERVER", "")
    where = section.where.sections.get(section.name)
    if not server:
        raise ConfigError(section.path, "SERVER is missing: the host of the service a unit DEPENDS_ON",
                          line=where, key=f"[{section.name}]")
    if server.upper() == NO_SERVER:
        raise section.error("SERVER", f"{NO_SERVER} means this service is not used; remove "
                                      f"{section.name} from DEPENDS_ON")
    if not valid_host(server):
        raise section.error("SERVER", f"{server!r} is not a host name or IP address")
    default_port = DEFAULT_PORTS.get(section.name)
    port_text = section.text("PORT", "" if default_port is None else str(default_port))
    if not port_text:
        raise ConfigError(section.path, "PORT is missing: the port of the service a unit DEPENDS_ON",
                          line=where, key=f"[{section.name}]")
    return DependencyConfig(
        name=section.name,
        host=server.strip("[]"),
        port=parse_port(section, "PORT", port_text),
        check_interval=section.number("CHECK_INTERVAL", 5.0, 0.1, 3600.0),
        connect_timeout=section.number("CONNECT_TIMEOUT", 3.0, 0.1, 300.0),
        down_after=section.integer("DOWN_AFTER_FAILURES", 2, 1, 100),
        up_after=section.integer("UP_AFTER_SUCCESSES", 2, 1, 100),
    )


def _cycle(start: str, woken: Mapping[str, list[str]]) -> list[str]:
    """The path from unit *start* back to itself through the units its dependencies are, or []."""
    path = [start]

    def visit(unit: str) -> bool:
        for other in woken.get(unit, []):
            if other == start:
                path.append(other)
                return True
            if other not in path:
                path.append(other)
                if visit(other):
                    return True
                path.pop()
        return False
    return path if visit(start) else []


def read_dependencies(units: Iterable[Section], sections: Mapping[str, Section],
                      reserved: Iterable[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, DependencyConfig]]:
    """DEPENDS_ON of each unit section (unit -> names) and each named section, read once."""
    reserved = tuple(reserved)
    units = list(units)
    depends_on = {unit.name: read_depends_on(unit, sections, reserved) for unit in units}
    dependencies: dict[str, DependencyConfig] = {}
    for names in depends_on.values():
        for name in names:
            if name not in dependencies:
                dependencies[name] = read_dependency(sections[name])
    unit_names = [unit.name for unit in units]
    for name, config in dependencies.items():
        if config.unit and config.unit not in unit_names:
            raise sections[name].error("UNIT", f"[{config.unit}] is not a balance unit of this file "
                                               f"({', '.join(unit_names) or 'none'})")
    woken = {unit: [dependencies[n].unit for n in names if dependencies[n].unit] for unit, names in depends_on.items()}
    for unit in units:
        cycle = _cycle(unit.name, woken)
        if cycle:
            raise unit.error(DEPENDS_ON_KEY, f"a unit cannot depend on itself: {' -> '.join(cycle)} "
                                             f"(through the UNIT of a dependency section)")
    return {unit: names for unit, names in depends_on.items() if names}, dependencies
