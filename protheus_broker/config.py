"""Read the broker's ``appserver.ini`` as TOTVS users write it, into one typed config object.

The raw ini never leaves this module: the rest of the broker sees :class:`BrokerConfig`.

TOTVS files use ``;`` comments (configobj only knows ``#``), mixed-case keys and sections, and are
often saved by Windows editors (cp1252 or UTF-16).  :func:`_normalise` rewrites each line so that
configobj can read it while keeping the line numbers, so every error names file, line and key.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field

from configobj import ConfigObj, ConfigObjError, DuplicateError  # type: ignore[import-untyped]

DEFAULT_CONFIG_PATH = "/etc/protheus-broker/appserver.ini"

DESKTOP_SECTION = "BALANCE_SMART_CLIENT_DESKTOP"
GENERAL_SECTION = "GENERAL"
#: TOTVS broker sections this version recognises but does not serve yet.
FUTURE_SECTIONS = ("BALANCE_HTTP", "BALANCE_WEB_SERVICES")


class ConfigError(Exception):
    """A config problem that stops startup: one line naming file, line, key and what is wrong."""

    def __init__(self, path: str, message: str, line: int | None = None, key: str | None = None):
        self.path = path
        self.line = line
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        what = f"{self.key}: {self.message}" if self.key else self.message
        return f"{where}: {what}"


class SortMethod(enum.Enum):
    """The TOTVS ``SORT_METHOD`` values."""

    CONNECTION = "CONNECTION"
    ROUND_ROBIN = "ROUND_ROBIN"
    SERVER_MEMORY = "SERVER_MEMORY"
    SERVER_USERS = "SERVER_USERS"
    SERVER_THREADS = "SERVER_THREADS"
    SERVER_CPU = "SERVER_CPU"

    @property
    def needs_metrics(self) -> bool:
        """True for the methods that rank servers by what their agent reports."""
        return self.name.startswith("SERVER_")


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


@dataclass(frozen=True)
class RemoteServer:
    """One ``REMOTE_SERVER_<id> = host port`` line."""

    server_id: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class GeneralConfig:
    """``[GENERAL]``: TOTVS console-log keys."""

    console_log: bool = True
    console_log_date: bool = False
    console_file: str | None = None
    console_max_size: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class DesktopBalanceConfig:
    """``[BALANCE_SMART_CLIENT_DESKTOP]``: the SmartClient desktop broker."""

    local_port: int
    servers: tuple[RemoteServer, ...]
    local_interface: str = ""
    sort_method: SortMethod = SortMethod.SERVER_MEMORY
    monitoring_type: MonitoringType = MonitoringType.CONNECTION
    connect_timeout: float = 5.0
    max_sessions: int = 10000
    metrics_max_age: float = 3.0
    service_name: str = "protheus-broker"
    service_display_name: str = "protheus-broker"

    @property
    def effective_sort_method(self) -> SortMethod:
        """The method actually used: SERVER_* need active monitoring, else CONNECTION (as TOTVS)."""
        if self.sort_method.needs_metrics and not self.monitoring_type.is_active:
            return SortMethod.CONNECTION
        return self.sort_method


@dataclass(frozen=True)
class BrokerConfig:
    """Everything the broker needs from its ini file, typed and validated."""

    path: str
    general: GeneralConfig
    desktop: DesktopBalanceConfig
    warnings: tuple[str, ...] = field(default=(), compare=False)


# --- lexical layer: make TOTVS text readable by configobj, keeping line numbers ---------------

_SECTION_RE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*$")
_KEY_RE = re.compile(r"^\s*([^=\s][^=]*?)\s*=(.*)$")
_SERVER_KEY_RE = re.compile(r"^REMOTE_SERVER_([A-Z0-9]+)$")
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*|[A-Za-z0-9]([A-Za-z0-9.\-_]*[A-Za-z0-9])?)$")


def _strip_comment(line: str) -> str:
    """Drop a ``;`` or ``#`` comment that is not inside double quotes."""
    in_quotes = False
    for index, char in enumerate(line):
        if char == '"':
            in_quotes = not in_quotes
        elif char in ";#" and not in_quotes:
            return line[:index]
    return line


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


@dataclass
class _Located:
    """Where each (section, key) came from, for error messages."""

    lines: dict[tuple[str, str], int] = field(default_factory=dict)
    sections: dict[str, int] = field(default_factory=dict)


def _normalise(text: str) -> tuple[list[str], _Located]:
    """Rewrite each line for configobj: comments gone, names upper-cased, values quoted safely."""
    out: list[str] = []
    where = _Located()
    section = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            out.append("")
            continue
        match = _SECTION_RE.match(line)
        if match:
            section = match.group(1).upper()
            where.sections.setdefault(section, number)
            out.append(f"[{section}]")
            continue
        match = _KEY_RE.match(line)
        if match:
            key = match.group(1).strip().upper()
            value = _unquote(match.group(2))
            where.lines.setdefault((section, key), number)
            # configobj would read quotes, commas and '#' itself: hand it a value it keeps verbatim.
            out.append(f"{key} = '''{value}'''" if value else f"{key} = ''")
            continue
        out.append(line)  # configobj reports it as an invalid line, with this line number
    return out, where


def _decode(path: str, data: bytes) -> str:
    """Decode UTF-8 (with or without BOM), UTF-16 with BOM, or Windows cp1252 text."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise ConfigError(path, f"unreadable text: bad UTF-16 ({exc.reason})") from None
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise ConfigError(path, "unreadable text: a NUL byte; this is not an ini text file", line=line)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


# --- semantic layer: typed values -----------------------------------------------------------

_TRUE = {"1", "TRUE", "YES", "ON"}
_FALSE = {"0", "FALSE", "NO", "OFF"}

_SORT_ALIASES = {f"PROTHEUS_{m.name[len('SERVER_'):]}": m for m in SortMethod if m.needs_metrics}


class _Section:
    """Typed access to one section's values; every error names the key and its line."""

    def __init__(self, path: str, name: str, values: dict[str, str], where: _Located):
        self.path = path
        self.name = name
        self.values = values
        self.where = where
        self.used: set[str] = set()

    def line(self, key: str) -> int | None:
        return self.where.lines.get((self.name, key))

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, message, line=self.line(key), key=key)

    def raw(self, key: str) -> str | None:
        self.used.add(key)
        value = self.values.get(key)
        return None if value is None else value.strip()

    def text(self, key: str, default: str) -> str:
        value = self.raw(key)
        return default if value in (None, "") else value  # type: ignore[return-value]

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value in (None, ""):
            return default
        upper = value.upper()  # type: ignore[union-attr]
        if upper in _TRUE:
            return True
        if upper in _FALSE:
            return False
        raise self.error(key, f"expected 1 or 0, got {value!r}")

    def number(self, key: str, default: float, minimum: float, maximum: float) -> float:
        value = self.raw(key)
        if value in (None, ""):
            return default
        try:
            result = float(value)  # type: ignore[arg-type]
        except ValueError:
            raise self.error(key, f"expected a number, got {value!r}") from None
        if not minimum <= result <= maximum:
            raise self.error(key, f"{value} is out of range ({minimum:g} to {maximum:g})")
        return result

    def integer(self, key: str, default: int, minimum: int, maximum: int) -> int:
        value = self.raw(key)
        if value in (None, ""):
            return default
        try:
            result = int(value)  # type: ignore[arg-type]
        except ValueError:
            raise self.error(key, f"expected a whole number, got {value!r}") from None
        if not minimum <= result <= maximum:
            raise self.error(key, f"{result} is out of range ({minimum} to {maximum})")
        return result

    def unknown_keys(self) -> list[str]:
        return sorted(k for k in self.values if k not in self.used)


def _port(section: _Section, key: str, text: str, allow_zero: bool = False) -> int:
    try:
        port = int(text)
    except ValueError:
        raise section.error(key, f"port must be a number, got {text!r}") from None
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise section.error(key, f"port {port} is out of range ({low} to 65535)")
    return port


def _remote_server(section: _Section, key: str, server_id: str) -> RemoteServer:
    value = section.raw(key) or ""
    fields = value.split()
    if len(fields) == 1:
        raise section.error(key, f"missing port: expected 'host port', got {value!r}")
    if len(fields) != 2:
        raise section.error(key, f"expected 'host port', got {value!r}")
    host, port_text = fields
    if not _HOST_RE.match(host):
        raise section.error(key, f"{host!r} is not a host name or IP address")
    host = host.strip("[]")  # [::1] as people write it; connectTCP wants ::1
    return RemoteServer(server_id=server_id, host=host, port=_port(section, key, port_text))


def _sort_method(section: _Section) -> SortMethod:
    value = section.text("SORT_METHOD", SortMethod.SERVER_MEMORY.value).upper()
    if value in _SORT_ALIASES:
        return _SORT_ALIASES[value]
    try:
        return SortMethod(value)
    except ValueError:
        names = ", ".join(m.value for m in SortMethod)
        raise section.error("SORT_METHOD", f"unknown method {value!r} (one of {names})") from None


def _monitoring_type(section: _Section) -> MonitoringType:
    value = section.text("MONITORING_TYPE", MonitoringType.CONNECTION.value).upper()
    if value == "DISABLE":
        return MonitoringType.DISABLED
    try:
        return MonitoringType(value)
    except ValueError:
        names = ", ".join(m.value for m in MonitoringType) + ", DISABLE"
        raise section.error("MONITORING_TYPE", f"unknown type {value!r} (one of {names})") from None


def _desktop(section: _Section, warnings: list[str]) -> DesktopBalanceConfig:
    port_text = section.raw("LOCAL_SERVER_PORT")
    if not port_text:
        raise ConfigError(
            section.path,
            "LOCAL_SERVER_PORT is missing: the port SmartClients connect to",
            line=section.where.sections.get(section.name),
            key=f"[{section.name}]",
        )
    local_port = _port(section, "LOCAL_SERVER_PORT", port_text, allow_zero=True)

    servers: list[RemoteServer] = []
    for key in section.values:  # file order: the server table as the user wrote it
        match = _SERVER_KEY_RE.match(key)
        if match:
            servers.append(_remote_server(section, key, match.group(1)))
        elif key.startswith("REMOTE_SERVER"):
            raise section.error(key, "server id must be letters and digits after REMOTE_SERVER_")
    if not servers:
        raise ConfigError(
            section.path,
            "no REMOTE_SERVER_<id> = host port lines: the broker has no AppServer to send users to",
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

    config = DesktopBalanceConfig(
        local_port=local_port,
        servers=tuple(servers),
        local_interface=section.text("LOCAL_SERVER_INTERFACE", ""),
        sort_method=_sort_method(section),
        monitoring_type=_monitoring_type(section),
        connect_timeout=section.number("CONNECT_TIMEOUT", 5.0, 0.1, 300.0),
        max_sessions=section.integer("MAX_SESSIONS", 10000, 0, 1_000_000),
        metrics_max_age=section.number("METRICS_MAX_AGE", 3.0, 0.1, 3600.0),
        service_name=section.text("SERVICE_NAME", "protheus-broker"),
        service_display_name=section.text("SERVICE_DISPLAY_NAME", "protheus-broker"),
    )
    if config.sort_method != config.effective_sort_method:
        warnings.append(
            f"{section.path}: SORT_METHOD={config.sort_method.value} needs MONITORING_TYPE="
            f"SMARTCLIENT_ACTIVE or SMARTCLIENT_SSL_ACTIVE (is {config.monitoring_type.value}); "
            f"balancing by CONNECTION instead"
        )
    return config


def _general(section: _Section) -> GeneralConfig:
    console_file = section.text("CONSOLEFILE", "") or None
    return GeneralConfig(
        console_log=section.boolean("CONSOLELOG", True),
        console_log_date=section.boolean("CONSOLELOGDATE", False),
        console_file=console_file,
        console_max_size=section.integer("CONSOLEMAXSIZE", 10 * 1024 * 1024, 0, 2**40),
    )


def parse_config(text: str, path: str = "<config>") -> BrokerConfig:
    """Parse ini text into a :class:`BrokerConfig`, or raise :class:`ConfigError`."""
    lines, where = _normalise(text)
    try:
        raw = ConfigObj(lines, interpolation=False, list_values=True, encoding=None)
    except DuplicateError as exc:
        key = exc.line.split("=")[0].strip() if "=" in exc.line else exc.line.strip()
        if key.startswith("["):
            first = where.sections.get(key.strip("[]"))
            what = "duplicate section"
        else:
            earlier = [n for (_, k), n in where.lines.items() if k == key and n < exc.line_number]
            first = max(earlier) if earlier else None
            what = "duplicate key"
        also = f" (first at line {first})" if first else ""
        raise ConfigError(path, f"{what}{also}; each may appear once", line=exc.line_number, key=key) from None
    except ConfigObjError as exc:
        shown = text.splitlines()[exc.line_number - 1].strip() if exc.line_number else ""
        raise ConfigError(
            path, f"expected 'KEY = value' or '[SECTION]', got {shown!r}", line=exc.line_number
        ) from None

    warnings: list[str] = []
    top_level = [k for k in raw.scalars]
    if top_level:
        first = top_level[0]
        warnings.append(f"{path}:{where.lines.get(('', first))}: {first}: outside any [SECTION]; ignored")

    sections = {name: _Section(path, name, dict(raw[name]), where) for name in raw.sections}
    for name in sections:
        if name in FUTURE_SECTIONS:
            warnings.append(f"{path}:{where.sections[name]}: [{name}] is not supported yet; ignored")
        elif name not in (DESKTOP_SECTION, GENERAL_SECTION):
            warnings.append(f"{path}:{where.sections[name]}: unknown section [{name}]; ignored")

    if DESKTOP_SECTION not in sections:
        raise ConfigError(path, f"no [{DESKTOP_SECTION}] section: nothing for the broker to serve")
    desktop = _desktop(sections[DESKTOP_SECTION], warnings)
    general_section = sections.get(GENERAL_SECTION, _Section(path, GENERAL_SECTION, {}, where))
    general = _general(general_section)

    for section in (sections[DESKTOP_SECTION], general_section):
        for key in section.unknown_keys():
            warnings.append(f"{path}:{section.line(key)}: [{section.name}] {key}: unknown key; ignored")
    return BrokerConfig(path=path, general=general, desktop=desktop, warnings=tuple(warnings))


def load_config(path: str) -> BrokerConfig:
    """Read and parse the ini file at *path*; every problem is a :class:`ConfigError`."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a directory, not an ini file") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror or exc}") from None
    return parse_config(_decode(path, data), os.fspath(path))
