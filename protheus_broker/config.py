"""Read the broker's ``appserver.ini`` as TOTVS users write it, into one typed config object.

The raw ini never leaves this module: the rest of the broker sees :class:`BrokerConfig`.

TOTVS files use ``;`` comments (configobj only knows ``#``), mixed-case keys and sections, and are
often saved by Windows editors (cp1252 or UTF-16).  :func:`_normalise` rewrites each line so that
configobj can read it while keeping the line numbers, so every error names file, line and key.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from dataclasses import dataclass, field, replace

from configobj import ConfigObj, ConfigObjError, DuplicateError  # type: ignore[import-untyped]

from protheus_broker.resume.settings import ResumeConfig, read_resume
from protheus_broker.tls.settings import SSL_SECTION, SessionTLSConfig, session_tls_config

DEFAULT_CONFIG_PATH = "/etc/protheus-broker/appserver.ini"

DESKTOP_SECTION = "BALANCE_SMART_CLIENT_DESKTOP"
GENERAL_SECTION = "GENERAL"
#: TOTVS broker sections this version recognises but does not serve yet.
FUTURE_SECTIONS = ("BALANCE_HTTP", "BALANCE_WEB_SERVICES")
ADMIN_SECTION = "BROKER_ADMIN"


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
class TLSFiles:
    """PEM files for one end of a mutual-TLS agent channel: our certificate, its key, the CA."""

    certificate: str
    key: str
    ca: str


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
    first_bytes_wait: float = 0.5  # FIRST_BYTES_WAIT: silent client -> plain SmartClient after this
    first_response_timeout: float = 5.0  # FIRST_RESPONSE_TIMEOUT: no AppServer byte -> replay (0: off)
    max_pending_per_address: int = 128  # MAX_PENDING_PER_ADDRESS: not yet established, one address
    max_pending: int = 1024  # MAX_PENDING: not yet established, all addresses
    metrics_max_age: float = 3.0
    service_name: str = "protheus-broker"
    service_display_name: str = "protheus-broker"
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    tls: SessionTLSConfig = field(default_factory=SessionTLSConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)  # resumable sessions (connector)

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
    admin: AdminConfig | None = None  # [BROKER_ADMIN]: the broker screen; None when absent


# --- lexical layer: make TOTVS text readable by configobj, keeping line numbers ---------------

_SECTION_RE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*$")
_KEY_RE = re.compile(r"^\s*([^=\s][^=]*?)\s*=(.*)$")
_SERVER_KEY_RE = re.compile(r"^REMOTE_SERVER_([A-Z0-9]+)$")
_AGENT_KEY_RE = re.compile(r"^AGENT_SERVER_([A-Z0-9]+)$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?$")
#: Control characters that never appear in a text ini (tab is fine; CR is the Windows line end).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f\x80-\x9f\u2028\u2029]")


def valid_host(host: str) -> bool:
    """True for an IPv4 or IPv6 address (IPv6 with or without brackets) or a DNS host name."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            return False
    if ":" in host or host.replace(".", "").isdigit():
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    return all(_LABEL_RE.match(label) for label in name.split("."))


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


def _lines(text: str) -> list[str]:
    """The file's lines as an editor numbers them: split at LF (a CR before it is the Windows line
    end), not at the other characters ``str.splitlines`` also breaks on (form feed, U+0085, ...),
    so every line number we report is the one the user sees.  A trailing Ctrl-Z (the DOS end of
    file some Windows tools still write) is dropped."""
    text = text.rstrip("\x1a")
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _normalise(text: str, path: str = "<config>") -> tuple[list[str], _Located]:
    """Rewrite each line for configobj: comments gone, names upper-cased, values quoted safely.

    A control character (binary data, a file that is not text) is a :class:`ConfigError` naming
    its line and column."""
    out: list[str] = []
    where = _Located()
    section = ""
    for number, raw in enumerate(_lines(text), start=1):
        bad = _CONTROL_RE.search(raw)
        if bad is not None:
            raise ConfigError(path, f"unreadable text: control character {bad.group()!r} at column "
                                    f"{bad.start() + 1}; this is not an ini text file", line=number)
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
        raise ConfigError(path, f"expected 'KEY = value' or '[SECTION]', got {raw.strip()!r}", line=number)
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


def _host_port(section: _Section, key: str) -> tuple[str, int]:
    value = section.raw(key) or ""
    fields = value.split()
    if len(fields) == 1:
        raise section.error(key, f"missing port: expected 'host port', got {value!r}")
    if len(fields) != 2:
        raise section.error(key, f"expected 'host port', got {value!r}")
    host, port_text = fields
    if not valid_host(host):
        raise section.error(key, f"{host!r} is not a host name or IP address")
    host = host.strip("[]")  # [::1] as people write it; connectTCP wants ::1
    return host, _port(section, key, port_text)


def _remote_server(section: _Section, key: str, server_id: str) -> RemoteServer:
    host, port = _host_port(section, key)
    return RemoteServer(server_id=server_id, host=host, port=port)


#: The shortest shared secret we accept: shorter ones are guessable offline from one handshake.
MIN_SECRET_LENGTH = 16


def _readable_file(section: _Section, key: str, required_because: str | None) -> str | None:
    """The path in *key*, checked readable; missing and *required_because* given: an error."""
    path = section.text(key, "")
    if not path:
        if required_because:
            raise section.error(key, f"is required {required_because}")
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise section.error(key, f"cannot read {path!r}: {exc.strerror or exc}") from None
    return path


def _secret(section: _Section, prefix: str, required_because: str | None) -> bytes | None:
    """``<prefix>SECRET`` (inline) or ``<prefix>SECRET_FILE`` (first line of a file)."""
    inline_key, file_key = f"{prefix}SECRET", f"{prefix}SECRET_FILE"
    inline = section.text(inline_key, "")
    path = _readable_file(section, file_key, None)
    if inline and path:
        raise section.error(file_key, f"give {inline_key} or {file_key}, not both")
    if path:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
        secret, key = (lines[0].strip() if lines else b""), file_key
    elif inline:
        secret, key = inline.encode(), inline_key
    else:
        if required_because:
            raise section.error(inline_key, f"{inline_key} or {file_key} is required {required_because}")
        return None
    if len(secret) < MIN_SECRET_LENGTH:
        raise section.error(key, f"the secret is too short ({len(secret)} bytes; at least "
                                 f"{MIN_SECRET_LENGTH})")
    return secret


def _tls_files(section: _Section, prefix: str, required_because: str | None) -> TLSFiles | None:
    """``<prefix>SSL_CERTIFICATE``, ``<prefix>SSL_KEY``, ``<prefix>SSL_CA``: all three or none."""
    keys = [f"{prefix}SSL_CERTIFICATE", f"{prefix}SSL_KEY", f"{prefix}SSL_CA"]
    given = [k for k in keys if section.text(k, "")]
    if not given and not required_because:
        return None
    why = required_because or f"with {given[0]} (mutual TLS needs all three)"
    certificate, key, ca = (_readable_file(section, k, why) for k in keys)
    return TLSFiles(certificate=certificate or "", key=key or "", ca=ca or "")


def _monitoring(section: _Section, monitoring_type: MonitoringType,
                servers: list[RemoteServer]) -> MonitoringConfig:
    ids = {s.server_id: s for s in servers}
    agent_port = _port(section, "AGENT_PORT", section.text("AGENT_PORT", str(DEFAULT_AGENT_PORT)))
    agents = {s.server_id: (s.host, agent_port) for s in servers}
    for key in section.values:
        match = _AGENT_KEY_RE.match(key)
        if match:
            if match.group(1) not in ids:
                raise section.error(key, f"no REMOTE_SERVER_{match.group(1)} for this agent")
            agents[match.group(1)] = _host_port(section, key)
    because = f"with MONITORING_TYPE={monitoring_type.value}"
    tls = _tls_files(section, "AGENT_", because if monitoring_type.uses_tls else None)
    secret_needed = monitoring_type.uses_agent and not monitoring_type.uses_tls
    secret = _secret(section, "AGENT_", because if secret_needed else None)
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
        elif key.startswith("AGENT_SERVER") and not _AGENT_KEY_RE.match(key):
            raise section.error(key, "server id must be letters and digits after AGENT_SERVER_")
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

    monitoring_type = _monitoring_type(section)
    config = DesktopBalanceConfig(
        local_port=local_port,
        servers=tuple(servers),
        local_interface=section.text("LOCAL_SERVER_INTERFACE", ""),
        sort_method=_sort_method(section),
        monitoring_type=monitoring_type,
        connect_timeout=section.number("CONNECT_TIMEOUT", 5.0, 0.1, 300.0),
        max_sessions=section.integer("MAX_SESSIONS", 10000, 0, 1_000_000),
        first_bytes_wait=section.number("FIRST_BYTES_WAIT", 0.5, 0.0, 10.0),
        first_response_timeout=section.number("FIRST_RESPONSE_TIMEOUT", 5.0, 0.0, 300.0),
        max_pending_per_address=section.integer("MAX_PENDING_PER_ADDRESS", 128, 0, 1_000_000),
        max_pending=section.integer("MAX_PENDING", 1024, 0, 1_000_000),
        metrics_max_age=section.number("METRICS_MAX_AGE", 3.0, 0.1, 3600.0),
        service_name=section.text("SERVICE_NAME", "protheus-broker"),
        service_display_name=section.text("SERVICE_DISPLAY_NAME", "protheus-broker"),
        monitoring=_monitoring(section, monitoring_type, servers),
        resume=read_resume(section),
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


def _writable_file(section: _Section, key: str) -> str | None:
    """The log file path in *key*, checked now so that a file the broker cannot write is one line
    at startup (or a refused reload), not a traceback when the log opens."""
    path = section.text(key, "")
    if not path:
        return None
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise section.error(key, f"{path!r} is a directory, not a log file")
    if not os.path.isdir(folder):
        raise section.error(key, f"cannot write {path!r}: folder {folder!r} does not exist")
    if os.path.exists(full):
        if not os.access(full, os.W_OK):
            raise section.error(key, f"cannot write {path!r}: permission denied")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise section.error(key, f"cannot write {path!r}: no permission to create files in {folder!r}")
    return path


def _general(section: _Section) -> GeneralConfig:
    console_file = _writable_file(section, "CONSOLEFILE")
    return GeneralConfig(
        console_log=section.boolean("CONSOLELOG", True),
        console_log_date=section.boolean("CONSOLELOGDATE", False),
        console_file=console_file,
        console_max_size=section.integer("CONSOLEMAXSIZE", 10 * 1024 * 1024, 0, 2**40),
    )


def _read_ini(text: str, path: str) -> tuple[ConfigObj, _Located]:
    """configobj over normalised TOTVS text; syntax problems are one-line :class:`ConfigError`s."""
    lines, where = _normalise(text, path)
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
    except ConfigObjError as exc:  # every line was checked above: what is left is configobj's word
        first = (getattr(exc, "errors", None) or [exc])[0]
        raise ConfigError(path, str(first).strip() or type(first).__name__,
                          line=getattr(first, "line_number", None)) from None
    return raw, where


def parse_config(text: str, path: str = "<config>") -> BrokerConfig:
    """Parse ini text into a :class:`BrokerConfig`, or raise :class:`ConfigError`."""
    raw, where = _read_ini(text, path)
    warnings: list[str] = []
    top_level = [k for k in raw.scalars]
    if top_level:
        first = top_level[0]
        warnings.append(f"{path}:{where.lines.get(('', first))}: {first}: outside any [SECTION]; ignored")

    sections = {name: _Section(path, name, dict(raw[name]), where) for name in raw.sections}
    for name in sections:
        if name in FUTURE_SECTIONS:
            warnings.append(f"{path}:{where.sections[name]}: [{name}] is not supported yet; ignored")
        elif name not in (DESKTOP_SECTION, GENERAL_SECTION, ADMIN_SECTION, SSL_SECTION):
            warnings.append(f"{path}:{where.sections[name]}: unknown section [{name}]; ignored")

    if DESKTOP_SECTION not in sections:
        raise ConfigError(path, f"no [{DESKTOP_SECTION}] section: nothing for the broker to serve")
    desktop = _desktop(sections[DESKTOP_SECTION], warnings)
    desktop = replace(desktop, tls=session_tls_config(sections[DESKTOP_SECTION],
                                                      sections.get(SSL_SECTION), warnings))
    general_section = sections.get(GENERAL_SECTION, _Section(path, GENERAL_SECTION, {}, where))
    general = _general(general_section)
    admin = _admin(sections[ADMIN_SECTION], warnings) if ADMIN_SECTION in sections else None

    checked = [sections[DESKTOP_SECTION], general_section]
    if admin is not None:
        checked.append(sections[ADMIN_SECTION])
    for section in checked:
        for key in section.unknown_keys():
            warnings.append(f"{path}:{section.line(key)}: [{section.name}] {key}: unknown key; ignored")
    return BrokerConfig(path=path, general=general, desktop=desktop, warnings=tuple(warnings),
                        admin=admin)


# --- [BROKER_ADMIN]: the broker screen (status page, JSON API, /metrics, admin actions) ---------

DEFAULT_ADMIN_ENDPOINT = "tcp:8480:interface=127.0.0.1"


class ReadAccess(enum.Enum):
    """Who may read the status views without the admin token (actions always need it)."""

    LOCALHOST = "LOCALHOST"  # clients on a loopback address (default)
    ANYWHERE = "ANYWHERE"
    NOWHERE = "NOWHERE"


@dataclass(frozen=True)
class AdminConfig:
    """``[BROKER_ADMIN]``: where the broker screen listens and who may use it."""

    endpoint: str = DEFAULT_ADMIN_ENDPOINT
    token_hash: str | None = field(default=None, repr=False)  # ``pbkdf2_sha256$...``; None: no actions
    read_access: ReadAccess = ReadAccess.LOCALHOST
    port_status: bool = True  # answer GET /status, /status.json, /ping on LOCAL_SERVER_PORT
    history_interval: float = 5.0  # seconds between samples of the connections chart
    history_samples: int = 120
    #: Host names (besides localhost and IP literals) the screen answers to: the names a browser
    #: may use for it; others are refused (DNS rebinding).  ``*``: any name.
    allowed_hosts: tuple[str, ...] = ()


_HOST_NAME_RE = re.compile(r"^(?=.{1,253}\.?$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                           r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?$", re.IGNORECASE)


def _allowed_hosts(section: _Section) -> tuple[str, ...]:
    names = [n for n in re.split(r"[,\s]+", section.text("ALLOWED_HOSTS", "")) if n]
    for name in names:
        if name != "*" and not _HOST_NAME_RE.match(name):
            raise section.error("ALLOWED_HOSTS", f"{name!r} is not a host name (expected names such "
                                                 f"as broker.example.com, separated by commas, or *)")
    return tuple(n.lower().rstrip(".") for n in names)


def _admin(section: _Section, warnings: list[str]) -> AdminConfig:
    from twisted.internet.endpoints import serverFromString

    from protheus_broker.web.auth import HashError, parse_token_hash

    endpoint = section.text("ENDPOINT", DEFAULT_ADMIN_ENDPOINT)
    try:
        serverFromString(None, endpoint)  # parses only; listening happens at start
    except Exception as exc:  # endpoint parsers raise ValueError, KeyError, TypeError, ...
        raise section.error("ENDPOINT", f"not a server endpoint string ({exc or type(exc).__name__}); "
                                        f"e.g. {DEFAULT_ADMIN_ENDPOINT}") from None
    token_hash = section.text("TOKEN_HASH", "") or None
    if token_hash is not None:
        try:
            parse_token_hash(token_hash)
        except HashError as exc:
            raise section.error("TOKEN_HASH", f"{exc} (make one with: protheus-broker-ctl hash-token)") from None
    else:
        warnings.append(f"{section.path}:{section.where.sections.get(section.name)}: [{section.name}] "
                        "no TOKEN_HASH: the screen is read-only (make one with: protheus-broker-ctl hash-token)")
    access_text = section.text("READ_ACCESS", ReadAccess.LOCALHOST.value).upper()
    try:
        read_access = ReadAccess(access_text)
    except ValueError:
        raise section.error("READ_ACCESS", f"expected LOCALHOST, ANYWHERE or NOWHERE, got {access_text!r}") from None
    return AdminConfig(
        endpoint=endpoint, token_hash=token_hash, read_access=read_access,
        port_status=section.boolean("PORT_STATUS", True),
        history_interval=section.number("HISTORY_INTERVAL", 5.0, 0.1, 3600.0),
        history_samples=section.integer("HISTORY_SAMPLES", 120, 2, 10000),
        allowed_hosts=_allowed_hosts(section),
    )


def _read_file(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a directory, not an ini file") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror or exc}") from None
    return _decode(path, data)


def load_config(path: str) -> BrokerConfig:
    """Read and parse the ini file at *path*; every problem is a :class:`ConfigError`."""
    return parse_config(_read_file(path), os.fspath(path))


# --- the agent's own ini ----------------------------------------------------------------------

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


def _watched(section: _Section, name: str) -> WatchedAppServer:
    port_text = section.raw("PORT")
    if not port_text:
        raise ConfigError(section.path, "PORT is missing: the AppServer's listening port",
                          line=section.where.sections.get(section.name), key=f"[{section.name}]")
    return WatchedAppServer(
        name=name,
        port=_port(section, "PORT", port_text),
        host=section.text("HOST", "127.0.0.1"),
        pid_file=section.text("PID_FILE", "") or None,
        process_name=section.text("PROCESS_NAME", "") or None,
        users_file=section.text("USERS_FILE", "") or None,
    )


def parse_agent_config(text: str, path: str = "<agent config>") -> AgentConfig:
    """Parse the agent's ini text into an :class:`AgentConfig`, or raise :class:`ConfigError`."""
    raw, where = _read_ini(text, path)
    warnings: list[str] = []
    sections = {name: _Section(path, name, dict(raw[name]), where) for name in raw.sections}
    if AGENT_SECTION not in sections:
        raise ConfigError(path, f"no [{AGENT_SECTION}] section: where the agent listens and how "
                                "brokers authenticate")
    agent = sections[AGENT_SECTION]
    port = _port(agent, "PORT", agent.text("PORT", str(DEFAULT_AGENT_PORT)), allow_zero=True)
    tls = _tls_files(agent, "", None)
    secret = _secret(agent, "", None if tls else "when SSL_CERTIFICATE/SSL_KEY/SSL_CA are not set "
                                                 "(no broker may connect unauthenticated)")
    watched: list[WatchedAppServer] = []
    for name, section in sections.items():
        match = _APPSERVER_SECTION_RE.match(name)
        if match:
            watched.append(_watched(section, match.group(1)))
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
    return parse_agent_config(_read_file(path), os.fspath(path))
