"""Admin credentials: the token hash kept in the config, and checks of what a request presents.

The config holds only ``pbkdf2_sha256$<iterations>$<salt>$<hash>`` (base64 without padding), never
the token.  ``protheus-broker-ctl hash-token`` makes a random token and its hash.  A token that
verified once is remembered by its SHA-256, so a page polling every few seconds costs one PBKDF2
per token, not one per request; every comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass

SCHEME = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 200_000
MIN_ITERATIONS = 10_000


class HashError(ValueError):
    """A TOKEN_HASH that is not ours."""


@dataclass(frozen=True)
class TokenHash:
    iterations: int
    salt: bytes
    digest: bytes


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_token(token: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """The TOKEN_HASH line for *token*."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", token.encode(), salt, iterations)
    return f"{SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def new_token() -> str:
    """A random admin token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def parse_token_hash(text: str) -> TokenHash:
    """Split and check a TOKEN_HASH; :class:`HashError` says what is wrong."""
    parts = text.strip().split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise HashError(f"expected {SCHEME}$<iterations>$<salt>$<hash>")
    try:
        iterations = int(parts[1])
    except ValueError:
        raise HashError(f"iterations {parts[1]!r} is not a whole number") from None
    if iterations < MIN_ITERATIONS:
        raise HashError(f"{iterations} iterations is too few (at least {MIN_ITERATIONS})")
    try:
        salt, digest = _unb64(parts[2]), _unb64(parts[3])
    except (ValueError, TypeError):
        raise HashError("salt or hash is not base64") from None
    if len(salt) < 8 or len(digest) != 32:
        raise HashError("salt shorter than 8 bytes or hash not 32 bytes")
    return TokenHash(iterations, salt, digest)


class TokenChecker:
    """Checks presented tokens against one TOKEN_HASH (None: every token is refused)."""

    def __init__(self, token_hash: str | None) -> None:
        self.source = token_hash
        self.hash = parse_token_hash(token_hash) if token_hash else None
        self._verified: bytes | None = None  # sha256 of the token that verified last

    @property
    def configured(self) -> bool:
        return self.hash is not None

    def check(self, token: str) -> bool:
        if self.hash is None or not token:
            return False
        quick = hashlib.sha256(token.encode()).digest()
        if self._verified is not None and hmac.compare_digest(quick, self._verified):
            return True
        digest = hashlib.pbkdf2_hmac("sha256", token.encode(), self.hash.salt, self.hash.iterations)
        if hmac.compare_digest(digest, self.hash.digest):
            self._verified = quick
            return True
        return False


def bearer_token(header: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not value.strip():
        return None
    try:
        return value.strip().decode("ascii")
    except UnicodeDecodeError:
        return None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; Unix sockets count as local."""
    if host in ("", "unix"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def origin_matches(origin: bytes | None, host: bytes | None) -> bool:
    """A browser's Origin must name the host it sent the request to (absent: not a browser
    cross-site request, allowed)."""
    if origin is None:
        return True
    if host is None:
        return False
    text = origin.strip().lower()
    for scheme in (b"http://", b"https://"):
        if text.startswith(scheme):
            return hmac.compare_digest(text[len(scheme):], host.strip().lower())
    return False
