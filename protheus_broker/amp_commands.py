"""The agent channel: every AMP command between the broker and a ``protheus-agent``.

The broker connects; the agent listens.  One channel watches one AppServer (named by its port).

Handshake (challenge-response both ways; the shared secret never crosses the wire)::

    broker -> Hello(version, appserver_port, broker_nonce)
    agent  <- agent_nonce, agent_proof = HMAC(secret, "agent" | broker_nonce | agent_nonce | port)
    broker -> Authenticate(broker_proof = HMAC(secret, "broker" | agent_nonce | broker_nonce | port),
                           interval)
    agent  <- {} ; from now on the agent pushes Report every *interval* seconds

On a mutual-TLS channel the certificates authenticate both ends; the HMAC proofs are checked too
when a secret is configured, and are empty otherwise.  ``Sample`` asks for one report at once (the
probe modes' "exploratory login").
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.protocols import amp

PROTOCOL_VERSION = 1
NONCE_BYTES = 32


class AuthenticationFailed(Exception):
    """The peer's proof does not match: wrong secret, or not an agent/broker of ours."""


class NotAuthenticated(Exception):
    """A command that needs a completed handshake came before it."""


class UnknownAppServer(Exception):
    """The agent watches no AppServer on the port the broker asked for."""


class UnsupportedVersion(Exception):
    """The peers speak different versions of this protocol."""


_HANDSHAKE_ERRORS: dict[type[Exception], bytes] = {
    AuthenticationFailed: b"AUTHENTICATION_FAILED",
    UnknownAppServer: b"UNKNOWN_APPSERVER",
    UnsupportedVersion: b"UNSUPPORTED_VERSION",
}


def proof(secret: bytes | None, role: bytes, first: bytes, second: bytes, port: int) -> bytes:
    """The HMAC-SHA256 one side sends to show it holds *secret* (empty when there is none)."""
    if secret is None:
        return b""
    message = role + b"|" + first + b"|" + second + b"|" + str(port).encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def proof_matches(expected: bytes, given: bytes) -> bool:
    """Constant-time comparison of two proofs."""
    return hmac.compare_digest(expected, given)


class Hello(amp.Command):
    """Broker -> agent: which AppServer, and the broker's challenge."""

    arguments = [
        (b"version", amp.Integer()),
        (b"appserver_port", amp.Integer()),
        (b"broker_nonce", amp.String()),
    ]
    response = [
        (b"agent_nonce", amp.String()),
        (b"agent_proof", amp.String()),
        (b"appserver", amp.Unicode()),  # the agent's name for it, for logs
    ]
    errors = _HANDSHAKE_ERRORS


class Authenticate(amp.Command):
    """Broker -> agent: the broker's proof, and how often it wants reports."""

    arguments = [
        (b"broker_proof", amp.String()),
        (b"interval", amp.Float()),
    ]
    response = []  # type: ignore[var-annotated]
    errors = {**_HANDSHAKE_ERRORS, NotAuthenticated: b"NOT_AUTHENTICATED"}


#: What a report carries; the broker validates each value (see ``monitor.validate_report``).
REPORT_ARGUMENTS: list[tuple[bytes, amp.Argument]] = [
    (b"memory_bytes", amp.Integer()),  # resident set size of the AppServer process
    (b"users", amp.Integer()),  # established connections on its port (or what it publishes)
    (b"threads", amp.Integer()),
    (b"cpu_percent", amp.Float()),  # of one core; up to 100 x cpu_count
    (b"accepting", amp.Boolean()),  # a local connect to its port succeeded
    (b"problem", amp.Unicode()),  # why not accepting / not measured; empty when all is well
    (b"age", amp.Float()),  # seconds since the sample was taken, on the agent's clock
    (b"physical_memory", amp.Integer()),  # of the agent's host: the ceiling for memory_bytes
    (b"cpu_count", amp.Integer()),
]


class Report(amp.Command):
    """Agent -> broker: the latest sample; also the heartbeat.  May be lost (no answer)."""

    arguments = REPORT_ARGUMENTS
    requiresAnswer = False


class Sample(amp.Command):
    """Broker -> agent: one report now (the probe modes' exploratory check)."""

    arguments = []  # type: ignore[var-annotated]
    response = REPORT_ARGUMENTS
    errors = {NotAuthenticated: b"NOT_AUTHENTICATED"}
