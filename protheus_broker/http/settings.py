"""``[BALANCE_HTTP]``: the HTTP unit's keys, typed and checked (the server table, SORT_METHOD and
MONITORING_TYPE as in the desktop section)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from protheus_broker.balancing.methods import SortMethod
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.desktop.settings import read_sort_method
from protheus_broker.http.capacity_settings import parse_capped_server
from protheus_broker.ini import ConfigError, Section, host_and_port, parse_port
from protheus_broker.scaling.unit_settings import read_scaling
from protheus_broker.tls.settings import SSL_SECTION, session_tls_config
from protheus_broker.monitoring.settings import MonitoringType, read_monitoring, read_monitoring_type
from protheus_broker.unit_config import UnitConfig

HTTP_SECTION = "BALANCE_HTTP"
WEB_SERVICES_SECTION = "BALANCE_WEB_SERVICES"

_SERVER_KEY_RE = re.compile(r"^REMOTE_SERVER_([A-Z0-9]+)$")


@dataclass(frozen=True)
class UriRule:
    """One URI section as the AppServer's config writes it: ``URL=/rest`` and ``Stateless=1``
    (a request under that path takes a license seat while it runs)."""

    section: str
    url: str
    stateless: bool


@dataclass(frozen=True)
class LicenseGateConfig:
    """The license gate of an HTTP unit: ``URIS`` (the URI sections), ``TRUSTED_API_MANAGERS``,
    the wait for a seat and ``FWFRAME_TIMELS``."""

    uris: tuple[UriRule, ...] = ()
    trusted_api_managers: tuple[Any, ...] = ()  # ip_network objects
    queue_length: int = 1000  # LICENSE_QUEUE_LENGTH: requests that may wait for a seat per class
    queue_timeout: float = 10.0  # LICENSE_QUEUE_TIMEOUT: a request waits this long for a seat, then 503
    time_log: bool = False  # FWFRAME_TIMELS: log the time each request waited for its seat

    @property
    def stateless(self) -> bool:
        """True when some URI takes license seats."""
        return any(rule.stateless for rule in self.uris)


@dataclass(frozen=True)
class HttpBalanceConfig(UnitConfig):
    """``[BALANCE_HTTP]``: SmartClient HTML / WebApp and portals, with session affinity.  (Its
    MAX_SESSIONS counts open client connections, each holding at most one upstream; 0 = no cap;
    SERVER_* sort methods fall back to CONNECTION: HTTP units have no active monitoring.)"""

    health_path: str = ""  # HEALTH_PATH: the CONNECTION probe GETs it (2xx/3xx = up); empty = connect only
    header_timeout: float = 10.0  # HEADER_TIMEOUT (408)
    keepalive_timeout: float = 60.0  # KEEPALIVE_TIMEOUT
    max_header_bytes: int = 65536  # MAX_HEADER_BYTES (431)
    max_headers: int = 100  # MAX_HEADERS (431)
    forwarded_headers: bool = True  # FORWARDED_HEADERS
    access_log: bool = True  # ACCESS_LOG: one log event per request (0: off, for throughput)
    server_timeout: float = 300.0  # SERVER_TIMEOUT: a request with no byte either way this long: 504/close
    upstream_reuse: bool = True  # UPSTREAM_REUSE
    upstream_max_idle: int = 16  # UPSTREAM_MAX_IDLE: idle connections kept per server
    upstream_idle_timeout: float = 30.0  # UPSTREAM_IDLE_TIMEOUT
    affinity_timeout: int = 0  # AFFINITY_TIMEOUT: cookie Max-Age in seconds, 0 = browser session
    affinity_forward_cookie: bool = False  # AFFINITY_FORWARD_COOKIE: send the cookie upstream too
    secure_cookie: bool = False  # SECURE_COOKIE: mark it Secure (behind a TLS front)
    service_name: str = "protheus-broker-http"
    license: LicenseGateConfig = field(default_factory=LicenseGateConfig)  # URIS, TRUSTED_API_MANAGERS, ...


@dataclass(frozen=True)
class WebServicesConfig(HttpBalanceConfig):
    """``[BALANCE_WEB_SERVICES]``: REST and SOAP, stateless; in-flight requests capped per server by
    ``REMOTE_SERVER_xx = host port [max]``, a FIFO queue when every server is full."""

    caps: Mapping[str, int] = field(default_factory=dict)  # server id -> cap (0 = none)
    queue_length: int = 1000  # QUEUE_LENGTH: requests that may wait; one more gets 503 at once
    queue_timeout: float = 15.0  # QUEUE_TIMEOUT: a request waits this long, then 503
    service_name: str = "protheus-broker-web-services"


def read_servers(section: Section, warnings: list[str], caps: dict[str, int] | None = None,
                 required: bool = True) -> list[RemoteServer]:
    """The REMOTE_SERVER_<id> = host port lines, in file order (with *caps*: ``host port [max]``,
    the third field stored in *caps*); none is fine when not *required* (managed nodes or
    ``KUBERNETES`` bring the servers)."""
    servers: list[RemoteServer] = []
    for key in section.values:
        match = _SERVER_KEY_RE.match(key)
        if match and caps is not None:
            server, cap = parse_capped_server(section, key, match.group(1))
            servers.append(server)
            caps[server.server_id] = cap
        elif match:
            host, port = host_and_port(section, key)
            servers.append(RemoteServer(server_id=match.group(1), host=host, port=port))
        elif key.startswith("REMOTE_SERVER"):
            raise section.error(key, "server id must be letters and digits after REMOTE_SERVER_")
    if not servers and required:
        raise ConfigError(section.path, "no REMOTE_SERVER_<id> = host port lines (nor managed nodes, nor "
                          "KUBERNETES): nothing to send requests to",
                          line=section.where.sections.get(section.name), key=f"[{section.name}]")
    return servers


def read_http(section: Section, sections: Mapping[str, Section], warnings: list[str]) -> HttpBalanceConfig:
    """The ``[BALANCE_HTTP]`` unit's config."""
    scaling = read_scaling(section, sections, warnings)
    return _read_unit(section, sections, warnings, HttpBalanceConfig,
                      read_servers(section, warnings, required=not scaling.has_source), {
        **vars(scaling),
        "affinity_timeout": section.integer("AFFINITY_TIMEOUT", 0, 0, 10 * 365 * 86400),
        "affinity_forward_cookie": section.integer("AFFINITY_FORWARD_COOKIE", 0, 0, 1) == 1,
        "secure_cookie": section.integer("SECURE_COOKIE", 0, 0, 1) == 1,
        "service_name": section.text("SERVICE_NAME", "protheus-broker-http"),
    })


def read_web_services(section: Section, sections: Mapping[str, Section], warnings: list[str]) -> WebServicesConfig:
    """The ``[BALANCE_WEB_SERVICES]`` unit's config (no affinity cookie: stateless)."""
    caps: dict[str, int] = {}
    scaling = read_scaling(section, sections, warnings)
    servers = read_servers(section, warnings, caps, required=not scaling.has_source)
    config = _read_unit(section, sections, warnings, WebServicesConfig, servers, {
        **vars(scaling),
        "caps": caps,
        "queue_length": section.integer("QUEUE_LENGTH", 1000, 0, 1_000_000),
        "queue_timeout": section.number("QUEUE_TIMEOUT", 15.0, 0.0, 3600.0),
        "service_name": section.text("SERVICE_NAME", "protheus-broker-web-services"),
    })
    assert isinstance(config, WebServicesConfig)
    return config


def read_health_path(section: Section, monitoring_type: MonitoringType, warnings: list[str]) -> str:
    """``HEALTH_PATH``: empty, or an origin-form target (``/health``, ``/status?deep=1``)."""
    path = section.text("HEALTH_PATH", "")
    if not path:
        return ""
    if not path.startswith("/") or not all(33 <= ord(c) < 127 for c in path):
        raise section.error("HEALTH_PATH", f"{path!r} is not a path (it starts with / and has no spaces "
                            f"or non-ASCII characters)")
    if monitoring_type is not MonitoringType.CONNECTION:
        warnings.append(f"{section.path}: [{section.name}] HEALTH_PATH is used by MONITORING_TYPE=CONNECTION "
                        f"only; ignored with {monitoring_type.value}")
    return path


def read_uri_rules(section: Section, sections: Mapping[str, Section]) -> tuple[UriRule, ...]:
    """``URIS = HTTPURI, APP``: each named section's ``URL`` (a path prefix) and ``Stateless``
    (0 or 1).  The sections' other keys (PrepareIn, Instances, CORSEnable...) are the AppServer's."""
    text = section.text("URIS", "")
    rules: list[UriRule] = []
    for name in [part.strip().upper() for part in re.split(r"[,;\s]+", text) if part.strip()]:
        uri = sections.get(name)
        if uri is None:
            raise section.error("URIS", f"names [{name}], which the file does not have")
        if any(rule.section == name for rule in rules):
            raise section.error("URIS", f"names [{name}] twice")
        url = uri.text("URL", "")
        if not url.startswith("/") or not all(33 <= ord(c) < 127 for c in url):
            raise uri.error("URL", f"{url!r} is not a path (it starts with / and has no spaces or "
                            f"non-ASCII characters)" if url else "is required: the URI's path prefix")
        stateless = uri.integer("STATELESS", 0, 0, 1) == 1
        rules.append(UriRule(section=name, url=url, stateless=stateless))
    return tuple(rules)


def read_trusted(section: Section) -> tuple[Any, ...]:
    """``TRUSTED_API_MANAGERS = 10.0.0.0/8, 127.0.0.1``: addresses or networks whose
    ``x-totvs-appcode`` header is honoured."""
    text = section.text("TRUSTED_API_MANAGERS", "")
    networks: list[Any] = []
    for part in [p for p in re.split(r"[,;\s]+", text) if p]:
        try:
            networks.append(ipaddress.ip_network(part.strip("[]"), strict=False))
        except ValueError:
            raise section.error("TRUSTED_API_MANAGERS", f"{part!r} is not an IP address or network "
                                f"(e.g. 10.0.0.0/8, 192.0.2.7)") from None
    return tuple(networks)


def read_license_gate(section: Section, sections: Mapping[str, Section]) -> LicenseGateConfig:
    """The unit's license gate keys."""
    return LicenseGateConfig(
        uris=read_uri_rules(section, sections),
        trusted_api_managers=read_trusted(section),
        queue_length=section.integer("LICENSE_QUEUE_LENGTH", 1000, 0, 1_000_000),
        queue_timeout=section.number("LICENSE_QUEUE_TIMEOUT", 10.0, 0.0, 3600.0),
        time_log=section.boolean("FWFRAME_TIMELS", False),
    )


def _read_unit(section: Section, sections: Mapping[str, Section], warnings: list[str],
               kind: type[HttpBalanceConfig], servers: list[RemoteServer], extra: dict[str, object]) -> HttpBalanceConfig:
    """The keys both HTTP units share (TLS termination with the desktop section's SSL_* keys and
    ``[SSLConfigure]``), and *extra*."""
    tls = session_tls_config(section, sections.get(SSL_SECTION), warnings)
    if tls.upstream:
        raise section.error("SSL_ENCRYPT_UPSTREAM", "HTTP units speak plain HTTP to AppServers (TLS to "
                            "AppServers is not supported for HTTP yet)")
    port_text = section.raw("LOCAL_SERVER_PORT")
    if not port_text:
        raise ConfigError(section.path, "LOCAL_SERVER_PORT is missing: the port HTTP clients connect to",
                          line=section.where.sections.get(section.name), key=f"[{section.name}]")
    monitoring_type = read_monitoring_type(section)
    if monitoring_type.is_active:
        raise section.error("MONITORING_TYPE", "HTTP units probe by CONNECTION (or DISABLED)")
    config = kind(
        local_port=parse_port(section, "LOCAL_SERVER_PORT", port_text, allow_zero=True),
        servers=tuple(servers),
        local_interface=section.text("LOCAL_SERVER_INTERFACE", ""),
        sort_method=read_sort_method(section) if section.raw("SORT_METHOD") else SortMethod.CONNECTION,
        monitoring_type=monitoring_type,
        health_path=read_health_path(section, monitoring_type, warnings),
        connect_timeout=section.number("CONNECT_TIMEOUT", 5.0, 0.1, 300.0),
        max_sessions=section.integer("MAX_SESSIONS", 10000, 0, 1_000_000),
        max_pending_per_address=section.integer("MAX_PENDING_PER_ADDRESS", 128, 0, 1_000_000),
        max_pending=section.integer("MAX_PENDING", 1024, 0, 1_000_000),
        metrics_max_age=section.number("METRICS_MAX_AGE", 3.0, 0.1, 3600.0),
        header_timeout=section.number("HEADER_TIMEOUT", 10.0, 0.1, 3600.0),
        keepalive_timeout=section.number("KEEPALIVE_TIMEOUT", 60.0, 0.0, 86400.0),
        max_header_bytes=section.integer("MAX_HEADER_BYTES", 65536, 1024, 1 << 24),
        max_headers=section.integer("MAX_HEADERS", 100, 1, 10000),
        forwarded_headers=section.integer("FORWARDED_HEADERS", 1, 0, 1) == 1,
        access_log=section.integer("ACCESS_LOG", 1, 0, 1) == 1,
        server_timeout=section.number("SERVER_TIMEOUT", 300.0, 0.0, 86400.0),
        upstream_reuse=section.integer("UPSTREAM_REUSE", 1, 0, 1) == 1,
        upstream_max_idle=section.integer("UPSTREAM_MAX_IDLE", 16, 0, 100000),
        upstream_idle_timeout=section.number("UPSTREAM_IDLE_TIMEOUT", 30.0, 0.0, 86400.0),
        monitoring=read_monitoring(section, monitoring_type, servers),
        tls=tls,
        license=read_license_gate(section, sections),
        **extra,  # type: ignore[arg-type]
    )
    if config.sort_method != config.effective_sort_method:
        warnings.append(f"{section.path}: [{section.name}] SORT_METHOD={config.sort_method.value} needs "
                        f"active monitoring; balancing by CONNECTION (in-flight requests) instead")
    return config
