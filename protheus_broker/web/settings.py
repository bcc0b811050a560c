"""``[BROKER_ADMIN]``: where the broker screen listens and who may use it."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from twisted.internet.endpoints import serverFromString

from protheus_broker.ini import Section
from protheus_broker.web.auth import HashError, parse_token_hash


ADMIN_SECTION = "BROKER_ADMIN"


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


def _allowed_hosts(section: Section) -> tuple[str, ...]:
    names = [n for n in re.split(r"[,\s]+", section.text("ALLOWED_HOSTS", "")) if n]
    for name in names:
        if name != "*" and not _HOST_NAME_RE.match(name):
            raise section.error("ALLOWED_HOSTS", f"{name!r} is not a host name (expected names such "
                                                 f"as broker.example.com, separated by commas, or *)")
    return tuple(n.lower().rstrip(".") for n in names)


def read_admin(section: Section, warnings: list[str]) -> AdminConfig:
    """The broker screen's config, every key checked (the endpoint string is parsed, not opened)."""
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
