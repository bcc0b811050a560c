"""TLS for SmartClient sessions, as read from the broker's ini: typed settings and their parser.

Three shapes: passthrough (no keys: the client's TLS goes through untouched), termination (the
broker serves TLS on LOCAL_SERVER_PORT with ``SSL_CERTIFICATE``/``SSL_KEY`` or ``[SSLConfigure]``
``CertificateServer``/``KeyServer``) and upstream (``SSL_ENCRYPT_UPSTREAM=1``: TLS to the
AppServers).  Files are only checked readable here; :mod:`.session_tls` loads and validates them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from protheus_broker.ini import Section, readable_file

#: The TOTVS section holding an AppServer's own TLS identity; the broker reads three of its keys.
SSL_SECTION = "SSLCONFIGURE"

#: ``[SSLConfigure]`` key -> the ``[BALANCE_SMART_CLIENT_DESKTOP]`` key it stands for.
SSLCONFIGURE_KEYS = {"CERTIFICATESERVER": "SSL_CERTIFICATE", "KEYSERVER": "SSL_KEY",
                     "PASSPHRASE": "SSL_PASSPHRASE"}
_SSLCONFIGURE_SPELLING = {"CERTIFICATESERVER": "CertificateServer", "KEYSERVER": "KeyServer",
                          "PASSPHRASE": "PassPhrase"}

_VERSION_RE = re.compile(r"^(?:TLS\s*V?)?\s*1[._]([23])$")


@dataclass(frozen=True)
class TLSIdentity:
    """A certificate (PEM, leaf first, then any intermediates) and its private key.

    *certificate_key* and *key_key* name the ini keys they came from, for error messages.
    """

    certificate: str
    key: str
    passphrase: bytes | None = field(default=None, repr=False)
    certificate_key: str = "SSL_CERTIFICATE"
    key_key: str = "SSL_KEY"


@dataclass(frozen=True)
class SessionTLSConfig:
    """TLS settings of the SmartClient listener and of the connections to the AppServers."""

    server: TLSIdentity | None = None  # termination when set
    client_ca: str | None = None
    require_client_cert: bool = False
    min_version: str = "1.2"  # "1.2" or "1.3"
    handshake_timeout: float = 10.0
    upstream: bool = False
    upstream_ca: str | None = None  # None: the system's trusted CAs
    upstream_verify: bool = True
    upstream_identity: TLSIdentity | None = None

    @property
    def terminate(self) -> bool:
        """True when the broker itself serves TLS on the SmartClient port."""
        return self.server is not None


def _file(section: Section, key: str, required_because: str | None) -> str | None:

    return readable_file(section, key, required_because)


def _identity(section: Section, prefix: str, cert_name: str, key_name: str,
              passphrase_name: str, shown: dict[str, str] | None = None) -> TLSIdentity | None:
    """Certificate and key from *section* (both or neither), the passphrase optional."""
    cert_key, key_key = prefix + cert_name, prefix + key_name
    given = section.text(cert_key, "") or section.text(key_key, "")
    if not given:
        section.text(prefix + passphrase_name, "")  # read, so it is not "unknown"
        return None
    show = shown or {}
    certificate = _file(section, cert_key, f"with {show.get(key_key, key_key)}")
    key = _file(section, key_key, f"with {show.get(cert_key, cert_key)}")
    passphrase = section.text(prefix + passphrase_name, "")
    return TLSIdentity(certificate or "", key or "", passphrase.encode() if passphrase else None,
                       show.get(cert_key, cert_key), show.get(key_key, key_key))


def _min_version(section: Section) -> str:
    value = section.text("SSL_MIN_VERSION", "1.2")
    match = _VERSION_RE.match(value.strip().upper())
    if not match:
        raise section.error("SSL_MIN_VERSION", f"expected TLS1.2 or TLS1.3, got {value!r} "
                                               "(older versions are not offered)")
    return f"1.{match.group(1)}"


def session_tls_config(desktop: Section, ssl_configure: Section | None,
                       warnings: list[str]) -> SessionTLSConfig:
    """Read the TLS keys of ``[BALANCE_SMART_CLIENT_DESKTOP]`` and ``[SSLConfigure]``.

    The broker section's ``SSL_CERTIFICATE``/``SSL_KEY``/``SSL_PASSPHRASE`` win over
    ``[SSLConfigure]``'s ``CertificateServer``/``KeyServer``/``PassPhrase`` as a whole (never one
    file from each); both given is a warning.
    """
    server = _identity(desktop, "", "SSL_CERTIFICATE", "SSL_KEY", "SSL_PASSPHRASE")
    if ssl_configure is not None:
        shown = {k: f"[SSLConfigure] {_SSLCONFIGURE_SPELLING[k]}" for k in SSLCONFIGURE_KEYS}
        if server is None:
            server = _identity(ssl_configure, "", "CERTIFICATESERVER", "KEYSERVER", "PASSPHRASE", shown)
        elif ssl_configure.text("CERTIFICATESERVER", "") or ssl_configure.text("KEYSERVER", ""):
            ssl_configure.text("PASSPHRASE", "")
            warnings.append(
                f"{desktop.path}:{desktop.line('SSL_CERTIFICATE') or desktop.line('SSL_KEY')}: "
                "SSL_CERTIFICATE/SSL_KEY given: [SSLConfigure] CertificateServer/KeyServer/PassPhrase "
                "are ignored")
        else:
            ssl_configure.text("PASSPHRASE", "")
        for key in ssl_configure.unknown_keys():
            warnings.append(f"{ssl_configure.path}:{ssl_configure.line(key)}: [SSLConfigure] {key}: "
                            "not used by the broker; ignored")
    client_ca = _file(desktop, "SSL_CLIENT_CA", None)
    require = desktop.boolean("SSL_REQUIRE_CLIENT_CERT", False)
    if require and not client_ca:
        raise desktop.error("SSL_REQUIRE_CLIENT_CERT", "needs SSL_CLIENT_CA (the CA that signs "
                                                       "SmartClient certificates)")
    if (require or client_ca) and server is None:
        key = "SSL_REQUIRE_CLIENT_CERT" if require else "SSL_CLIENT_CA"
        raise desktop.error(key, "client certificates need TLS termination (SSL_CERTIFICATE and SSL_KEY)")
    upstream = desktop.boolean("SSL_ENCRYPT_UPSTREAM", False)
    upstream_ca = _file(desktop, "SSL_UPSTREAM_CA", None)
    verify = desktop.boolean("SSL_UPSTREAM_VERIFY", True)
    identity = _identity(desktop, "SSL_UPSTREAM_", "CERTIFICATE", "KEY", "PASSPHRASE")
    if not upstream:
        for key in ("SSL_UPSTREAM_CA", "SSL_UPSTREAM_CERTIFICATE"):
            if desktop.text(key, ""):
                warnings.append(f"{desktop.path}:{desktop.line(key)}: {key}: "
                                "SSL_ENCRYPT_UPSTREAM is not 1; ignored")
    return SessionTLSConfig(
        server=server,
        client_ca=client_ca,
        require_client_cert=require,
        min_version=_min_version(desktop),
        handshake_timeout=desktop.number("SSL_HANDSHAKE_TIMEOUT", 10.0, 0.05, 3600.0),
        upstream=upstream,
        upstream_ca=upstream_ca,
        upstream_verify=verify,
        upstream_identity=identity,
    )


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for one end of a mutual-TLS agent channel: our certificate, its key, the CA."""

    certificate: str
    key: str
    ca: str


def tls_files(section: Section, prefix: str, required_because: str | None) -> TLSFiles | None:
    """``<prefix>SSL_CERTIFICATE``, ``<prefix>SSL_KEY``, ``<prefix>SSL_CA``: all three or none."""
    keys = [f"{prefix}SSL_CERTIFICATE", f"{prefix}SSL_KEY", f"{prefix}SSL_CA"]
    given = [k for k in keys if section.text(k, "")]
    if not given and not required_because:
        return None
    why = required_because or f"with {given[0]} (mutual TLS needs all three)"
    certificate, key, ca = (readable_file(section, k, why) for k in keys)
    return TLSFiles(certificate=certificate or "", key=key or "", ca=ca or "")
