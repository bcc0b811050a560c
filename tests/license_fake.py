"""A minimal license server implementing the server side of ``license/protocol.py``, for tests and
``make bench-license`` (not the real protheus-license: no journal, no grace, no status).

Counted seats per class; leases with a TTL (expired lazily on each command); every message it
gets is recorded in ``FakeLicenseServer.log`` so tests can count them.
"""

from __future__ import annotations

import os
from itertools import count
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols import amp

from protheus_broker.license import protocol as lp


class FakeLicenseServer:
    """The state: seats per class, leases per client."""

    def __init__(self, clock: Any, seats: dict[str, int], secret: bytes | None, ttl: float = 30.0) -> None:
        self.clock = clock
        self.seats = dict(seats)
        self.secret = secret
        self.ttl = ttl
        self.leases: dict[str, dict[str, Any]] = {}  # id -> client, class, seats, expires
        self.ids = count(1)
        self.log: list[tuple[str, Any]] = []
        self.channels: list[FakeLicenseChannel] = []
        self.refuse_all = False  # Lease answers NoSeats whatever is free

    def expire(self) -> None:
        now = self.clock.seconds()
        for lease_id in [i for i, lease in self.leases.items() if lease["expires"] <= now]:
            self.log.append(("expired", lease_id))
            del self.leases[lease_id]

    def leased(self, license_class: str) -> int:
        self.expire()
        return sum(lease["seats"] for lease in self.leases.values() if lease["license_class"] == license_class)

    def of(self, client: str) -> list[dict[str, Any]]:
        self.expire()
        now = self.clock.seconds()
        return [{"lease_id": i, "license_class": x["license_class"], "seats": x["seats"],
                 "ttl": max(0.0, x["expires"] - now)} for i, x in self.leases.items() if x["client"] == client]


class FakeLicenseChannel(amp.AMP):
    """One broker's channel."""

    def __init__(self, server: FakeLicenseServer) -> None:
        super().__init__()
        self.server = server
        self.client = ""
        self.nonce = b""
        self.authenticated = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.server.channels.append(self)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if self in self.server.channels:
            self.server.channels.remove(self)

    @lp.LicenseHello.responder
    def hello(self, version: int, client: str, client_nonce: bytes) -> dict[str, Any]:
        self.server.log.append(("hello", client))
        if version != lp.PROTOCOL_VERSION:
            raise lp.UnsupportedVersion()
        self.client = client
        self.client_nonce = client_nonce
        self.nonce = os.urandom(lp.NONCE_BYTES)
        return {"server_nonce": self.nonce,
                "server_proof": lp.proof(self.server.secret, lp.SERVER_ROLE, client_nonce, self.nonce, client)}

    @lp.LicenseAuthenticate.responder
    def authenticate(self, client_proof: bytes) -> dict[str, Any]:
        expected = lp.proof(self.server.secret, lp.CLIENT_ROLE, self.nonce, self.client_nonce, self.client)
        if not self.nonce or not lp.proof_matches(expected, client_proof):
            self.server.log.append(("refused", self.client))
            raise lp.AuthenticationFailed()
        self.authenticated = True
        self.server.log.append(("authenticated", self.client))
        return {"leases": self.server.of(self.client)}

    def _check(self) -> None:
        if not self.authenticated:
            raise lp.NotAuthenticated()
        self.server.expire()

    @lp.Lease.responder
    def lease(self, license_class: str, seats: int) -> dict[str, Any]:
        self._check()
        server = self.server
        server.log.append(("lease", (license_class, seats)))
        if license_class not in server.seats:
            raise lp.UnknownClass()
        free = server.seats[license_class] - server.leased(license_class)
        if free <= 0 or server.refuse_all:
            raise lp.NoSeats()
        granted = min(free, max(1, seats))
        lease_id = f"L{next(server.ids)}"
        server.leases[lease_id] = {"client": self.client, "license_class": license_class, "seats": granted,
                                   "expires": server.clock.seconds() + server.ttl}
        return {"lease_id": lease_id, "seats": granted, "ttl": server.ttl}

    @lp.Renew.responder
    def renew(self, lease_id: str) -> dict[str, Any]:
        self._check()
        self.server.log.append(("renew", lease_id))
        lease = self.server.leases.get(lease_id)
        if lease is None or lease["client"] != self.client:
            raise lp.UnknownLease()
        lease["expires"] = self.server.clock.seconds() + self.server.ttl
        return {"ttl": self.server.ttl}

    @lp.Release.responder
    def release(self, lease_id: str, seats: int) -> dict[str, Any]:
        self._check()
        self.server.log.append(("release", (lease_id, seats)))
        lease = self.server.leases.get(lease_id)
        if lease is None or lease["client"] != self.client:
            raise lp.UnknownLease()
        lease["seats"] -= min(seats, lease["seats"])
        if lease["seats"] <= 0:
            del self.server.leases[lease_id]
            return {"seats": 0}
        return {"seats": lease["seats"]}

    def revoke(self, lease_id: str, reason: str) -> None:
        self.server.leases.pop(lease_id, None)
        self.callRemote(lp.Revoked, lease_id=lease_id, reason=reason)


class FakeLicenseFactory(Factory):
    noisy = False

    def __init__(self, server: FakeLicenseServer) -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> FakeLicenseChannel:
        return FakeLicenseChannel(self.server)
