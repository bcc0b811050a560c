"""The license channel: every AMP command between a broker (the client) and ``protheus-license``.

The broker connects; the license server listens.  One channel per broker process; the client
names itself (``client``: a stable name from its config, e.g. the host name) so that a broker
coming back finds the leases it held.

Handshake (challenge-response both ways, as on the agent channel; the secret never crosses)::

    client -> LicenseHello(version, client, client_nonce)
    server <- server_nonce, server_proof = HMAC(secret, "license-server" | client_nonce | server_nonce | client)
    client -> LicenseAuthenticate(client_proof = HMAC(secret, "license-client" | server_nonce | client_nonce | client))
    server <- leases: what the server holds for this client (its leases survive a lost link for
              the grace time, and a restart of the broker: the client adopts or returns them)

On a mutual-TLS channel the certificates authenticate both ends; the proofs are checked too when a
secret is configured and are empty otherwise.

Leases, not single checkouts::

    client -> Lease(license_class, seats)      server <- lease_id, seats (1..asked), ttl
    client -> Renew(lease_id)                  server <- ttl          (the heartbeat)
    client -> Release(lease_id, seats)         server <- seats left   (0: the lease is gone)
    server -> Revoked(lease_id, reason)        (no answer: an admin took the lease back)

A lease not renewed within its *ttl* expires; a lost connection releases the client's leases
after the server's grace time unless the client comes back within it.  Seats are per class:
``TOTVS_I`` (the TOTVS I license every REST call takes) and one per application code.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.protocols import amp

PROTOCOL_VERSION = 1
NONCE_BYTES = 32
#: The class of the TOTVS I license (what a request without an honoured x-totvs-appcode takes).
DEFAULT_CLASS = "TOTVS_I"


class AuthenticationFailed(Exception):
    """The peer's proof does not match: wrong secret, or not a broker/license server of ours."""


class NotAuthenticated(Exception):
    """A command that needs a completed handshake came before it."""


class UnsupportedVersion(Exception):
    """The peers speak different versions of this protocol."""


class NoSeats(Exception):
    """Every seat of the class is leased ("all licenses in use")."""


class UnknownClass(Exception):
    """The server has no license of that class ("no license for application X")."""


class UnknownLease(Exception):
    """No such lease (expired, revoked, released): the client drops it at once."""


_HANDSHAKE_ERRORS: dict[type[Exception], bytes] = {
    AuthenticationFailed: b"AUTHENTICATION_FAILED",
    UnsupportedVersion: b"UNSUPPORTED_VERSION",
}
_COMMAND_ERRORS: dict[type[Exception], bytes] = {
    NotAuthenticated: b"NOT_AUTHENTICATED",
    NoSeats: b"NO_SEATS",
    UnknownClass: b"UNKNOWN_CLASS",
    UnknownLease: b"UNKNOWN_LEASE",
}

SERVER_ROLE = b"license-server"
CLIENT_ROLE = b"license-client"


def proof(secret: bytes | None, role: bytes, first: bytes, second: bytes, client: str) -> bytes:
    """The HMAC-SHA256 one side sends to show it holds *secret* (empty when there is none)."""
    if secret is None:
        return b""
    message = role + b"|" + first + b"|" + second + b"|" + client.encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).digest()


def proof_matches(expected: bytes, given: bytes) -> bool:
    """Constant-time comparison of two proofs."""
    return hmac.compare_digest(expected, given)


class LeaseList(amp.Argument):
    """Leases in one AMP value: ``id class seats ttl_left`` per line (ids and classes have no
    spaces; the server validates class names at load)."""

    def toString(self, inObject: list[dict[str, Any]]) -> bytes:
        lines = [f"{lease['lease_id']} {lease['license_class']} {int(lease['seats'])} {float(lease['ttl']):.3f}"
                 for lease in inObject]
        return "\n".join(lines).encode("utf-8")

    def fromString(self, inString: bytes) -> list[dict[str, Any]]:
        leases: list[dict[str, Any]] = []
        for line in inString.decode("utf-8").splitlines():
            parts = line.split(" ")
            if len(parts) != 4:
                raise ValueError(f"malformed lease line: {line[:100]!r}")
            seats, ttl = int(parts[2]), float(parts[3])
            if seats < 1 or ttl < 0:
                raise ValueError(f"malformed lease line: {line[:100]!r}")
            leases.append({"lease_id": parts[0], "license_class": parts[1], "seats": seats, "ttl": ttl})
        return leases


class LicenseHello(amp.Command):
    """Client -> server: who it is, and its challenge."""

    arguments = [
        (b"version", amp.Integer()),
        (b"client", amp.Unicode()),
        (b"client_nonce", amp.String()),
    ]
    response = [
        (b"server_nonce", amp.String()),
        (b"server_proof", amp.String()),
    ]
    errors = _HANDSHAKE_ERRORS


class LicenseAuthenticate(amp.Command):
    """Client -> server: the client's proof; the answer lists the leases the server holds for it."""

    arguments = [(b"client_proof", amp.String())]
    response = [(b"leases", LeaseList())]
    errors = {**_HANDSHAKE_ERRORS, NotAuthenticated: b"NOT_AUTHENTICATED"}


class Lease(amp.Command):
    """Client -> server: a block of up to *seats* seats of *license_class*.  The grant may be
    smaller (what is free); none free fails with :class:`NoSeats`."""

    arguments = [
        (b"license_class", amp.Unicode()),
        (b"seats", amp.Integer()),
    ]
    response = [
        (b"lease_id", amp.Unicode()),
        (b"seats", amp.Integer()),
        (b"ttl", amp.Float()),
    ]
    errors = _COMMAND_ERRORS


class Renew(amp.Command):
    """Client -> server: the lease's heartbeat; the answer is its new time to live."""

    arguments = [(b"lease_id", amp.Unicode())]
    response = [(b"ttl", amp.Float())]
    errors = _COMMAND_ERRORS


class Release(amp.Command):
    """Client -> server: give *seats* of the lease back (all of them ends the lease)."""

    arguments = [
        (b"lease_id", amp.Unicode()),
        (b"seats", amp.Integer()),
    ]
    response = [(b"seats", amp.Integer())]
    errors = _COMMAND_ERRORS


class Revoked(amp.Command):
    """Server -> client: an admin took the lease back; its seats are no longer the client's."""

    arguments = [
        (b"lease_id", amp.Unicode()),
        (b"reason", amp.Unicode()),
    ]
    requiresAnswer = False
