"""Session keys and resume proofs of the resumable link (X25519 + HKDF, HMAC-SHA256).

The resume secret is never sent: each side derives it from an X25519 exchange when the session
opens.  A resume proves knowledge of it with HMACs over fresh nonces from both sides (so a
recorded proof cannot be replayed) and over the position claimed (so it cannot be altered).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protheus_broker.resume.frames import COUNT, ID_SIZE, NONCE_SIZE

SECRET_SIZE = 32  # 256 bits


class KeyPair:
    """One side's ephemeral X25519 key for a session's opening."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def secret(self, peer_public: bytes, session_id: bytes) -> bytes:
        """The shared resume secret; ValueError if *peer_public* is not a usable key."""
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        return HKDF(algorithm=hashes.SHA256(), length=SECRET_SIZE, salt=session_id,
                    info=b"protheus resumable session v1").derive(shared)


def new_session_id() -> bytes:
    return secrets.token_bytes(ID_SIZE)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def proof(secret: bytes, role: bytes, session_id: bytes, connector_nonce: bytes,
          broker_nonce: bytes, position: int) -> bytes:
    """HMAC of one side (*role* b"connector" or b"broker") for one resume attempt."""
    message = b"".join((b"PRSM resume ", role, b"\0", session_id, connector_nonce, broker_nonce,
                        COUNT.pack(position)))
    return hmac.new(secret, message, hashlib.sha256).digest()


def same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
