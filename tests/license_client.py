"""A tiny license client for the tests of protheus-license (the broker's own client lives in
protheus_broker.license.client): the handshake, and a record of Revoked pushes."""

from __future__ import annotations

import os
from typing import Any

from twisted.protocols import amp
from twisted.python.failure import Failure

from protheus_broker.license import protocol as lic


class TestLicenseClient(amp.AMP):
    """The broker's end of the channel, as little of it as the tests need."""

    transport: Any

    def __init__(self) -> None:
        super().__init__()
        self.revoked: list[tuple[str, str]] = []
        self.lost = False

    @lic.Revoked.responder
    def on_revoked(self, lease_id: str, reason: str) -> dict[str, Any]:
        self.revoked.append((lease_id, reason))
        return {}

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:
        self.lost = True
        super().connectionLost(reason)


async def handshake(client: amp.AMP, name: str, secret: bytes | None,
                    proof_secret: bytes | None = None) -> list[dict[str, Any]]:
    """Hello and Authenticate as *name*; the leases the server holds for it.  *proof_secret*
    (default: *secret*) is what the client proves with."""
    nonce = os.urandom(lic.NONCE_BYTES)
    answer = await client.callRemote(lic.LicenseHello, version=lic.PROTOCOL_VERSION, client=name,
                                     client_nonce=nonce)
    expected = lic.proof(secret, lic.SERVER_ROLE, nonce, answer["server_nonce"], name)
    if not lic.proof_matches(expected, answer["server_proof"]):
        raise lic.AuthenticationFailed("the server's proof does not match")
    mine = proof_secret if proof_secret is not None else secret
    result = await client.callRemote(lic.LicenseAuthenticate,
                                     client_proof=lic.proof(mine, lic.CLIENT_ROLE, answer["server_nonce"],
                                                            nonce, name))
    leases: list[dict[str, Any]] = result["leases"]
    return leases
