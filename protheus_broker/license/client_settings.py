"""``[LICENSECLIENT]`` in the broker's ini: where the broker's license client connects, and its
seat pool's keys (protheus-license's own ini is read by settings.py).

The section and its ``SERVER`` / ``PORT`` keys are the ones TOTVS's own ``appserver.ini`` has
(an AppServer names its License Server there); ours adds the shared secret of the license
channel, the client's name and the local seat pool's watermarks.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from protheus_broker.ini import Section, parse_port, read_secret, valid_host
from protheus_broker.tls.settings import TLSFiles, tls_files

LICENSE_CLIENT_SECTION = "LICENSECLIENT"
DEFAULT_LICENSE_PORT = 5555


@dataclass(frozen=True)
class LicenseClientConfig:
    """``[LICENSECLIENT]``, typed and checked."""

    server: str  # SERVER: the license server's host
    port: int = DEFAULT_LICENSE_PORT  # PORT
    secret: bytes | None = field(default=None, repr=False)  # SECRET_FILE (or SECRET): the HMAC handshake
    client_name: str = ""  # CLIENT_NAME: how the server knows us across restarts (default: host name)
    low_watermark: int = 2  # LOW_WATERMARK: fewer free seats of a class than this: lease more
    high_watermark: int = 16  # HIGH_WATERMARK: more free seats than this: give the surplus back
    trace: bool = False  # FWFRAME_TRACELS: log every lease message
    connect_timeout: float = 5.0  # CONNECT_TIMEOUT
    max_classes: int = 256  # MAX_CLASSES: license classes (application codes) tracked at once
    idle_release: float = 60.0  # IDLE_RELEASE: a class unused this long gives its free seats back (0: never)
    tls: TLSFiles | None = None  # SSL_CERTIFICATE/SSL_KEY/SSL_CA: mutual TLS to the license server


def _client_name(section: Section) -> str:
    name = section.text("CLIENT_NAME", "") or socket.gethostname() or "broker"
    if not all(33 <= ord(c) < 127 for c in name) or len(name) > 200:
        raise section.error("CLIENT_NAME", f"{name[:60]!r} must be printable ASCII without spaces "
                            f"(at most 200 characters)")
    return name


def read_license_client(section: Section) -> LicenseClientConfig | None:
    """The ``[LICENSECLIENT]`` section, or None when it configures no license client of ours: no
    credentials (``SECRET``/``SECRET_FILE``, or ``SSL_CERTIFICATE``/``SSL_KEY``/``SSL_CA`` for
    mutual TLS; the section as an AppServer's appserver.ini writes it, e.g. for ``DEPENDS_ON``)
    or ``SERVER = NOCONFIG`` (TOTVS: not used).  The keys are checked either way."""
    server = section.text("SERVER", "")
    if not server:
        raise section.error("SERVER", "is required: the license server's host name or address")
    unused = server.upper() == "NOCONFIG"
    if not unused and not valid_host(server):
        raise section.error("SERVER", f"{server!r} is not a host name or IP address")
    port_text = section.text("PORT", str(DEFAULT_LICENSE_PORT))
    secret = read_secret(section, "", None)
    tls = tls_files(section, "", None)
    low = section.integer("LOW_WATERMARK", 2, 0, 100_000)
    high = section.integer("HIGH_WATERMARK", max(16, low), 1, 100_000)
    if high < low:
        raise section.error("HIGH_WATERMARK", f"{high} is below LOW_WATERMARK={low}")
    config = LicenseClientConfig(
        server=server.strip("[]"),
        port=parse_port(section, "PORT", port_text),
        secret=secret,
        client_name=_client_name(section),
        low_watermark=low,
        high_watermark=high,
        trace=section.boolean("FWFRAME_TRACELS", False),
        connect_timeout=section.number("CONNECT_TIMEOUT", 5.0, 0.1, 300.0),
        max_classes=section.integer("MAX_CLASSES", 256, 1, 100_000),
        idle_release=section.number("IDLE_RELEASE", 60.0, 0.0, 86400.0),
        tls=tls,
    )
    return None if unused or (secret is None and tls is None) else config
