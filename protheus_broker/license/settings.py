"""``protheus-license``'s ini: ``[LICENSESERVER]`` (listening, authentication, lease times,
bounds, journal, status) and ``[LICENSES]`` (license class = seat count)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from protheus_broker.ini import (
    ConfigError,
    Section,
    parse_port,
    read_file,
    read_ini,
    read_secret,
    writable_file,
)
from protheus_broker.license.journal import DEFAULT_JOURNAL_PATH
from protheus_broker.license.leases import Limits
from protheus_broker.license.protocol import DEFAULT_CLASS
from protheus_broker.tls.settings import TLSFiles, tls_files
from protheus_broker.web.auth import HashError, parse_token_hash

DEFAULT_LICENSE_CONFIG_PATH = "/etc/protheus-broker/license.ini"
#: TOTVS's own License Server listens on 5555.
DEFAULT_LICENSE_PORT = 5555
DEFAULT_STATUS_PORT = 5556

SERVER_SECTION = "LICENSESERVER"
LICENSES_SECTION = "LICENSES"

#: A class name: TOTVS_I or an application code (the lexer upper-cases keys).
_CLASS_RE = re.compile(r"^[A-Z0-9_][A-Z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class LicenseServerConfig:
    """Everything ``protheus-license`` reads from its ini."""

    path: str
    counts: dict[str, int]
    port: int = DEFAULT_LICENSE_PORT
    interface: str = ""
    secret: bytes | None = field(default=None, repr=False)
    tls: TLSFiles | None = None
    limits: Limits = Limits()
    #: Authenticated clients at once.
    max_clients: int = 256
    #: Connections not yet authenticated: in total, and from one address.
    max_pending: int = 64
    max_pending_per_address: int = 8
    handshake_timeout: float = 10.0
    journal: str = DEFAULT_JOURNAL_PATH
    compact_interval: float = 300.0
    status_port: int = DEFAULT_STATUS_PORT
    status_interface: str = "127.0.0.1"
    admin_token_hash: str | None = field(default=None, repr=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def restart_needed(self, other: "LicenseServerConfig") -> list[str]:
        """The keys whose change a reload cannot apply."""
        keys = [("PORT", self.port != other.port), ("INTERFACE", self.interface != other.interface),
                ("SSL_*", self.tls != other.tls), ("JOURNAL", self.journal != other.journal),
                ("STATUS_PORT", self.status_port != other.status_port),
                ("STATUS_INTERFACE", self.status_interface != other.status_interface)]
        return [key for key, changed in keys if changed]


def _counts(section: Section) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in section.values:
        if not _CLASS_RE.match(key):
            raise section.error(key, "a license class is letters, digits, '_', '.' or '-' "
                                     "(TOTVS_I or an application code), at most 64")
        counts[key] = section.integer(key, 0, 0, 1_000_000)
    return counts


def parse_license_config(text: str, path: str = "<license config>") -> LicenseServerConfig:
    """Parse the license server's ini text, or raise :class:`ConfigError`."""
    raw, where = read_ini(text, path)
    sections = {name: Section(path, name, dict(raw[name]), where) for name in raw.sections}
    if SERVER_SECTION not in sections:
        raise ConfigError(path, f"no [{SERVER_SECTION}] section: where the license server listens "
                                "and how brokers authenticate")
    if LICENSES_SECTION not in sections:
        raise ConfigError(path, f"no [{LICENSES_SECTION}] section: the seats of each class "
                                f"({DEFAULT_CLASS} = count, and one line per application code)")
    server = sections[SERVER_SECTION]
    warnings: list[str] = []
    port = parse_port(server, "PORT", server.text("PORT", str(DEFAULT_LICENSE_PORT)), allow_zero=True)
    tls = tls_files(server, "", None)
    secret = read_secret(server, "", None if tls else "when SSL_CERTIFICATE/SSL_KEY/SSL_CA are not set "
                                                     "(no broker may lease unauthenticated)")
    limits = Limits(
        ttl=server.number("LEASE_TTL", 30.0, 1.0, 86400.0),
        grace=server.number("GRACE_TIME", 10.0, 0.0, 86400.0),
        max_seats_per_lease=server.integer("MAX_SEATS_PER_LEASE", 100, 1, 1_000_000),
        max_leases_per_client=server.integer("MAX_LEASES_PER_CLIENT", 64, 1, 100_000),
    )
    journal = writable_file(server, "JOURNAL")
    if journal is None:
        journal = DEFAULT_JOURNAL_PATH
        server.raw("JOURNAL")
    token = server.text("ADMIN_TOKEN_HASH", "") or None
    if token is not None:
        try:
            parse_token_hash(token)
        except HashError as exc:
            raise server.error("ADMIN_TOKEN_HASH", f"{exc} (make one with protheus-broker-ctl "
                                                   "hash-token)") from None
    counts = _counts(sections[LICENSES_SECTION])
    if DEFAULT_CLASS not in counts:
        warnings.append(f"{path}:{where.sections[LICENSES_SECTION]}: [{LICENSES_SECTION}] has no "
                        f"{DEFAULT_CLASS}: requests without an application code get no seat")
    config = LicenseServerConfig(
        path=path, counts=counts, port=port, interface=server.text("INTERFACE", ""), secret=secret,
        tls=tls, limits=limits,
        max_clients=server.integer("MAX_CLIENTS", 256, 1, 100_000),
        max_pending=server.integer("MAX_PENDING", 64, 1, 100_000),
        max_pending_per_address=server.integer("MAX_PENDING_PER_ADDRESS", 8, 1, 100_000),
        handshake_timeout=server.number("HANDSHAKE_TIMEOUT", 10.0, 0.5, 300.0),
        journal=journal,
        compact_interval=server.number("COMPACT_INTERVAL", 300.0, 1.0, 86400.0),
        status_port=parse_port(server, "STATUS_PORT", server.text("STATUS_PORT", str(DEFAULT_STATUS_PORT)),
                               allow_zero=True),
        status_interface=server.text("STATUS_INTERFACE", "127.0.0.1"),
        admin_token_hash=token,
    )
    for key in server.unknown_keys():
        warnings.append(f"{path}:{server.line(key)}: [{SERVER_SECTION}] {key}: unknown key; ignored")
    for name in sections:
        if name not in (SERVER_SECTION, LICENSES_SECTION):
            warnings.append(f"{path}:{where.sections[name]}: unknown section [{name}]; ignored")
    return replace(config, warnings=tuple(warnings))


def load_license_config(path: str) -> LicenseServerConfig:
    """Read and parse the license server's ini at *path*; every problem is a :class:`ConfigError`."""
    return parse_license_config(read_file(path), os.fspath(path))
