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
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

PROTOCOL_VERSION = 1
NONCE_BYTES = 32


class QuietAMP(amp.AMP):
    """AMP without its "connection established/lost" line per connection (probes connect every
    minute per server); our protocols log what matters: authenticated, refused, lost."""

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


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


class Figures(amp.Argument):
    """A report in one AMP value (one key instead of nine: reports are the hot path, a thousand
    a second on a big farm).  Typed on both ends: a dict of exactly these fields; the numbers in
    ASCII, then the problem text in UTF-8."""

    INTEGERS = ("memory_bytes", "users", "threads", "physical_memory", "cpu_count")
    FLOATS = ("cpu_percent", "age")
    FIELDS = INTEGERS + FLOATS + ("accepting",)

    def toString(self, inObject: dict[str, Any]) -> bytes:
        parts = [str(int(inObject[name])) for name in self.INTEGERS]
        parts += [repr(float(inObject[name])) for name in self.FLOATS]
        parts.append("1" if inObject["accepting"] else "0")
        parts.append(inObject.get("problem") or "")
        return " ".join(parts).encode("utf-8")

    def fromString(self, inString: bytes) -> dict[str, Any]:
        parts = inString.decode("utf-8").split(" ", len(self.FIELDS))
        if len(parts) != len(self.FIELDS) + 1 or parts[-2] not in ("0", "1"):
            raise ValueError(f"malformed figures: {inString[:100]!r}")
        problem = parts.pop()
        values: dict[str, Any] = {}
        for name, text in zip(self.INTEGERS, parts):
            values[name] = int(text)
        for name, text in zip(self.FLOATS, parts[len(self.INTEGERS):]):
            values[name] = float(text)
        values["accepting"] = parts[-1] == "1"
        values["problem"] = problem
        return values


#: What a report carries; the broker validates each value (see ``monitor.validate_report``):
#: memory_bytes (resident set of the AppServer process), users (established
#: connections on its port, or what it publishes), threads, physical_memory and cpu_count of the
#: agent's host (the ceilings), cpu_percent (of one core), age (seconds since the sample, agent
#: clock), accepting (a local connect to its port succeeded), problem (why not accepting).
REPORT_ARGUMENTS: list[tuple[bytes, amp.Argument]] = [(b"figures", Figures())]


class Report(amp.Command):
    """Agent -> broker: the latest sample; also the heartbeat.  May be lost (no answer)."""

    arguments = REPORT_ARGUMENTS
    requiresAnswer = False


class Sample(amp.Command):
    """Broker -> agent: one report now (the probe modes' exploratory check)."""

    arguments = []  # type: ignore[var-annotated]
    response = REPORT_ARGUMENTS
    errors = {NotAuthenticated: b"NOT_AUTHENTICATED"}
