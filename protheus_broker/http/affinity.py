"""The ``[BALANCE_HTTP]`` affinity cookie ``TOTVS_BROKER_SH_001``.

Its value is an HMAC tag of the server id under a random key the broker draws at start: it names
the server to this broker only, leaks neither its id nor its address, and cannot be forged to
pick a server.  (A restart draws a new key: old cookies are then simply re-dispatched.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Iterable

COOKIE_NAME = "TOTVS_BROKER_SH_001"

Headers = list[tuple[bytes, bytes]]


class AffinityCookies:
    """Makes and reads the affinity cookie.  *max_age* 0: a browser-session cookie; above 0 the
    cookie's Max-Age (AFFINITY_TIMEOUT), refreshed on every response (a sliding expiry)."""

    def __init__(self, key: bytes | None = None, max_age: int = 0, secure: bool = False,
                 name: str = COOKIE_NAME) -> None:
        self.key = key if key is not None else os.urandom(32)
        self.max_age = max_age
        self.secure = secure
        self.name = name
        self._name = name.encode()
        self._tags: dict[str, str] = {}  # server id -> tag (the key never changes)

    def tag(self, server_id: str) -> str:
        """The cookie value naming *server_id* (made once per server: an HMAC per request and
        server was a visible part of a proxied request's CPU)."""
        tag = self._tags.get(server_id)
        if tag is None:
            digest = hmac.new(self.key, server_id.encode(), hashlib.sha256).digest()[:16]
            tag = self._tags[server_id] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        return tag

    def server_of(self, value: str, server_ids: Iterable[str]) -> str | None:
        """The server among *server_ids* that *value* names, or None (forged, stale, unknown)."""
        for server_id in server_ids:
            if hmac.compare_digest(self.tag(server_id), value):
                return server_id
        return None

    def set_cookie(self, server_id: str) -> tuple[bytes, bytes]:
        """The Set-Cookie header naming *server_id*."""
        parts = [f"{self.name}={self.tag(server_id)}", "Path=/", "HttpOnly", "SameSite=Lax"]
        if self.max_age > 0:
            parts.append(f"Max-Age={self.max_age}")
        if self.secure:
            parts.append("Secure")
        return (b"set-cookie", "; ".join(parts).encode())

    def value_in(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """The affinity cookie's value in a request's Cookie headers, or None."""
        for name, value in headers:
            if name != b"cookie":
                continue
            for pair in value.split(b";"):
                key, _, cookie = pair.strip().partition(b"=")
                if key == self._name:
                    return cookie.strip().decode("latin-1")
        return None

    def strip(self, headers: Iterable[tuple[bytes, bytes]]) -> Headers:
        """*headers* with the affinity cookie taken out of the Cookie headers (an empty one goes)."""
        out: Headers = []
        for name, value in headers:
            if name == b"cookie":
                kept = [p.strip() for p in value.split(b";")
                        if p.strip() and p.strip().partition(b"=")[0] != self._name]
                if not kept:
                    continue
                value = b"; ".join(kept)
            out.append((name, value))
        return out
