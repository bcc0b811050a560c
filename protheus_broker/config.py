"""The broker's ``appserver.ini``, read into one typed :class:`BrokerConfig`.

Each component owns the reader of its section (:mod:`.desktop.settings`, :mod:`.logs`,
:mod:`.web.settings`, ...); this module knows which sections exist and puts the results together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from protheus_broker.deps.settings import DependencyConfig, read_dependencies
from protheus_broker.desktop.settings import DESKTOP_SECTION, DesktopBalanceConfig, read_desktop
from protheus_broker.http.settings import HTTP_SECTION, WEB_SERVICES_SECTION, read_http, read_web_services
from protheus_broker.ini import ConfigError, Section, read_file, read_ini
from protheus_broker.license.client_settings import LICENSE_CLIENT_SECTION, LicenseClientConfig, read_license_client
from protheus_broker.logs import GENERAL_SECTION, GeneralConfig, read_general
from protheus_broker.tls.settings import SSL_SECTION
from protheus_broker.web.settings import ADMIN_SECTION, AdminConfig, read_admin


DEFAULT_CONFIG_PATH = "/etc/protheus-broker/appserver.ini"


#: TOTVS broker sections this version recognises but does not serve yet.
FUTURE_SECTIONS: tuple[str, ...] = ()


@dataclass(frozen=True)
class BrokerConfig:
    """Everything the broker needs from its ini file, typed and validated."""

    path: str
    general: GeneralConfig
    #: one (section name, its config) per ``[BALANCE_*]`` section this version serves, in file order
    units: tuple[tuple[str, Any], ...]
    warnings: tuple[str, ...] = field(default=(), compare=False)
    admin: AdminConfig | None = None  # [BROKER_ADMIN]: the broker screen; None when absent
    license_client: LicenseClientConfig | None = None  # [LICENSECLIENT]: the license server; None when absent
    #: unit section -> the dependency sections its DEPENDS_ON names (units without: absent)
    depends_on: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: each section some DEPENDS_ON names -> its SERVER/PORT and check keys
    dependencies: Mapping[str, DependencyConfig] = field(default_factory=dict)

    def unit(self, section: str) -> Any:
        """The config of the unit of ``[section]``, or None when the file has no such section."""
        return dict(self.units).get(section)

    @property
    def desktop(self) -> DesktopBalanceConfig:
        """The ``[BALANCE_SMART_CLIENT_DESKTOP]`` unit's config (always present)."""
        config: DesktopBalanceConfig = self.unit(DESKTOP_SECTION)
        return config


#: Reads one section into its part of the config; may look at other sections (a unit's
#: ``[SSLConfigure]``) and append warnings.
SectionReader = Callable[[Section, Mapping[str, Section], list[str]], Any]

#: The balance units this version serves: ``[BALANCE_*]`` section -> its reader.
UNIT_READERS: dict[str, SectionReader] = {DESKTOP_SECTION: read_desktop, HTTP_SECTION: read_http,
                                          WEB_SERVICES_SECTION: read_web_services}

#: Sections read by a unit's reader besides its own (their keys are checked there).
COMPANION_SECTIONS = (SSL_SECTION,)


def parse_config(text: str, path: str = "<config>") -> BrokerConfig:
    """Parse ini text into a :class:`BrokerConfig`, or raise :class:`ConfigError`."""
    raw, where = read_ini(text, path)
    warnings: list[str] = []
    top_level = [k for k in raw.scalars]
    if top_level:
        first = top_level[0]
        warnings.append(f"{path}:{where.lines.get(('', first))}: {first}: outside any [SECTION]; ignored")

    sections = {name: Section(path, name, dict(raw[name]), where) for name in raw.sections}
    reserved = (GENERAL_SECTION, ADMIN_SECTION, *COMPANION_SECTIONS)
    depends_on, dependencies = read_dependencies([sections[n] for n in sections if n in UNIT_READERS],
                                                 sections, reserved)
    known = set(UNIT_READERS) | set(reserved) | set(dependencies) | {LICENSE_CLIENT_SECTION}
    known |= _uri_sections(sections)
    known |= {str(s.values["NODES"]).strip() for s in sections.values() if s.values.get("NODES")}  # nodes
    known |= {str(s.values["KUBERNETES"]).strip() for s in sections.values() if s.values.get("KUBERNETES")}
    for name in sections:
        if name in FUTURE_SECTIONS:
            warnings.append(f"{path}:{where.sections[name]}: [{name}] is not supported yet; ignored")
        elif name.startswith("BALANCE_") and name not in known:
            warnings.append(f"{path}:{where.sections[name]}: [{name}] is not a balance unit this "
                            f"broker knows ({', '.join(sorted(UNIT_READERS))}); ignored")
        elif name not in known:
            warnings.append(f"{path}:{where.sections[name]}: unknown section [{name}]; ignored")

    if DESKTOP_SECTION not in sections:
        raise ConfigError(path, f"no [{DESKTOP_SECTION}] section: nothing for the broker to serve")
    units = {name: UNIT_READERS[name](sections[name], sections, warnings)
             for name in sections if name in UNIT_READERS}  # file order
    general_section = sections.get(GENERAL_SECTION, Section(path, GENERAL_SECTION, {}, where))
    general = read_general(general_section)
    admin = read_admin(sections[ADMIN_SECTION], warnings) if ADMIN_SECTION in sections else None
    license_client = read_license_client(sections[LICENSE_CLIENT_SECTION]) \
        if LICENSE_CLIENT_SECTION in sections else None
    if license_client is None:
        why = (f"its [{LICENSE_CLIENT_SECTION}] has no SECRET/SECRET_FILE (or SERVER = NOCONFIG)"
               if LICENSE_CLIENT_SECTION in sections else f"the file has no [{LICENSE_CLIENT_SECTION}]")
        for name, unit in units.items():
            gate = getattr(unit, "license", None)
            if gate is not None and gate.stateless:
                warnings.append(f"{path}:{where.sections[name]}: [{name}] has Stateless=1 URIs but {why}: "
                                f"their requests get 503 'license server not configured'")

    checked = [sections[name] for name in units] + [general_section] + [sections[n] for n in dependencies]
    if admin is not None:
        checked.append(sections[ADMIN_SECTION])
    if LICENSE_CLIENT_SECTION in sections and LICENSE_CLIENT_SECTION not in dependencies:
        checked.append(sections[LICENSE_CLIENT_SECTION])
    for section in checked:
        for key in section.unknown_keys():
            warnings.append(f"{path}:{section.line(key)}: [{section.name}] {key}: unknown key; ignored")
    return BrokerConfig(path=path, general=general, units=tuple(units.items()),
                        warnings=tuple(warnings), admin=admin, depends_on=depends_on, dependencies=dependencies,
                        license_client=license_client)


def _uri_sections(sections: Mapping[str, Section]) -> set[str]:
    """The URI sections the HTTP units name in ``URIS`` (read by the units' readers)."""
    names: set[str] = set()
    for unit in (HTTP_SECTION, WEB_SERVICES_SECTION):
        section = sections.get(unit)
        if section is not None:
            text = section.values.get("URIS", "")
            names.update(part.strip().upper() for part in text.replace(";", ",").replace(" ", ",").split(",")
                         if part.strip())
    return names


def load_config(path: str) -> BrokerConfig:
    """Read and parse the ini file at *path*; every problem is a :class:`ConfigError`."""
    return parse_config(read_file(path), os.fspath(path))
