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
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

PROTOCOL_VERSION = 1
NONCE_BYTES = 32

log = Logger()


@dataclass(frozen=True)
class BoxLimits:
    """The most one received AMP box may hold: bytes on the wire (length prefixes and the closing
    empty key included) and keys.  Twisted's AMP keeps a box in memory until its closing empty
    key, with no limit: a peer could stream one endless box into our memory."""

    max_bytes: int
    max_keys: int


#: Before the peer has authenticated: a handshake box is well under 1 KiB (Hello is 4 keys).
BEFORE_AUTHENTICATION = BoxLimits(max_bytes=4096, max_keys=8)
#: Once authenticated: a report is one key of ~100 bytes; room for long problem texts.
AFTER_AUTHENTICATION = BoxLimits(max_bytes=65536, max_keys=32)
#: Boxes a peer may send before it has authenticated (the handshake takes 2 either way).
MAX_BOXES_BEFORE_AUTHENTICATION = 4
#: The error code of a command whose arguments do not parse.
BAD_ARGUMENTS = b"BAD_ARGUMENTS"

_PREFIX = 2  # the length prefix of every key and value
_MAX_KEY_LENGTH = 255  # AMP's own limit on a key


class QuietAMP(amp.AMP):
    """Our AMP peer, for every AMP listener and client we run (agent, broker's monitor side,
    license server).

    - No "connection established/lost" line per connection (probes connect every minute per
      server); our protocols log what matters: authenticated, refused, lost.
    - Bounded boxes: :attr:`limits_before` until :attr:`authenticated`, :attr:`limits_after`
      then, and at most :attr:`max_boxes_before` boxes before authenticating.
      Enforced while parsing: a key or value whose length prefix would take the box over its
      byte limit is refused before its bytes are buffered.  A peer over a limit is dropped
      (abortConnection) with one log line naming it and the limit.
    - A malformed box (no command/answer/error, an answer to no question), a command we do not
      know, or arguments that do not parse: one warning line and a clean error or disconnect,
      never a "critical" traceback.
    """

    transport: Any
    limits_before = BEFORE_AUTHENTICATION
    limits_after = AFTER_AUTHENTICATION
    max_boxes_before = MAX_BOXES_BEFORE_AUTHENTICATION
    #: Set by the subclass once the peer has proved who it is: the larger limits apply then.
    authenticated = False
    peer = "?"
    #: What the peer is, for log lines ("broker", "agent").
    peer_role = "peer"

    _box_bytes = 0
    _box_keys = 0
    _boxes_unauthenticated = 0
    _dropped = ""

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    @property
    def box_limits(self) -> BoxLimits:
        """The limits for the box being received now."""
        return self.limits_after if self.authenticated else self.limits_before

    @property
    def dropped(self) -> str:
        """Why this side dropped the connection for a bad box ('' if it did not)."""
        return self._dropped

    def box_refused(self, why: str) -> None:
        """Log the one line for a peer dropped for a bad box (subclasses route it elsewhere)."""
        log.warn("{role} {peer}: {why}; dropping the connection", role=self.peer_role,
                 peer=self.peer, why=why)

    def drop(self, why: str) -> None:
        """Drop the peer for a bad box: one log line, and no more of its bytes are parsed."""
        if self._dropped:
            return
        self._dropped = why
        self.box_refused(why)
        if self.transport is not None:
            self.transport.abortConnection()

    # --- parsing, bounded -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self._dropped:
            super().dataReceived(data)

    def stringReceived(self, string: bytes) -> None:
        """One key or value of the box being received: count it against the limits."""
        if self._dropped:
            return  # the rest of a read that arrived with the bad string
        limits = self.limits_after if self.authenticated else self.limits_before  # (hot path)
        in_key = self.state != "value"
        if in_key and not string:  # the closing empty key: the box is complete
            if not self.authenticated:
                self._boxes_unauthenticated += 1
                if self._boxes_unauthenticated > self.max_boxes_before:
                    self.drop(f"more than {self.max_boxes_before} AMP boxes before authenticating")
                    return
            self._box_bytes = self._box_keys = 0
            super().stringReceived(string)  # may authenticate: the next box's limits apply
            self.MAX_LENGTH = min(_MAX_KEY_LENGTH, self._room(self.box_limits))
            return
        self._box_bytes += _PREFIX + len(string)
        if in_key:
            self._box_keys += 1
            if self._box_keys > limits.max_keys:
                self.drop(self._too_big(limits, f"more than {limits.max_keys} keys"))
                return
        super().stringReceived(string)
        self.MAX_LENGTH = min(self.MAX_LENGTH, self._room(limits))

    def _room(self, limits: BoxLimits) -> int:
        """The longest next key or value that still leaves room for the closing empty key."""
        return max(0, limits.max_bytes - self._box_bytes - 2 * _PREFIX)

    def _too_big(self, limits: BoxLimits, what: str) -> str:
        when = "after" if self.authenticated else "before"
        return f"AMP box with {what} {when} authenticating (limit {limits.max_bytes} bytes, " \
               f"{limits.max_keys} keys)"

    def lengthLimitExceeded(self, length: int) -> None:
        """A key or value longer than the room left in the box: refused before buffering it."""
        limits = self.box_limits
        self.drop(self._too_big(limits, f"over {limits.max_bytes} bytes"))

    # --- dispatch, without tracebacks for a peer's mistakes ---------------------------------

    def ampBoxReceived(self, box: Any) -> None:
        try:
            super().ampBoxReceived(box)
        except (KeyError, amp.AmpError) as exc:  # an answer to no question, or no command at all
            self._malformed(f"malformed AMP box ({type(exc).__name__}: {str(exc)[:100]})")

    def _malformed(self, why: str) -> None:
        """One warning line and the connection closed (after what is queued is sent)."""
        if self._dropped:
            return
        self._dropped = why
        self.box_refused(why)
        if self.transport is not None:
            self.transport.loseConnection()

    def dispatchCommand(self, box: Any) -> defer.Deferred[Any]:
        """Like AMP's, but an unknown command or arguments that do not parse get one warning
        line and a fatal error answer (the connection closes), not a logged traceback."""
        name = box[amp.COMMAND]
        command = self._command_named(name)
        if command is None:
            return self._refuse_command(box, f"unknown AMP command {name[:40]!r}",
                                        amp.UNHANDLED_ERROR_CODE)
        try:
            command.parseArguments(box, self)
        except Exception as exc:
            return self._refuse_command(
                box, f"malformed {name.decode('ascii', 'replace')} arguments "
                     f"({type(exc).__name__}: {str(exc)[:100]})", BAD_ARGUMENTS)
        return defer.maybeDeferred(self.locateResponder(name), box)

    def _command_named(self, name: bytes) -> type[amp.Command] | None:
        """The Command class this protocol responds to under wire name *name*."""
        entry = type(self)._commandDispatch.get(name)  # type: ignore[attr-defined]
        return entry[0] if entry else None

    def _refuse_command(self, box: Any, why: str, code: bytes) -> defer.Deferred[Any]:
        if amp.ASK not in box:  # nobody waits for an answer: just close
            self._malformed(why)
            return defer.succeed(None)
        if not self._dropped:
            self._dropped = why
            self.box_refused(why)
        return defer.fail(amp.RemoteAmpError(code, why, fatal=True))


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
#: clock), accepting (the process runs, accepts what the kernel queues for it, and a local connect
#: to its port succeeded), problem (why not accepting).
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


# --- the server farm: a broker orders an agent's nodes (nodes/remote.py, agent/farm.py) ----------
#
# The farm channel is the same authenticated channel: ``Hello`` names AppServer port
# :data:`FARM_PORT` (0) and the proofs cover that port; the agent answers only when its ini has a
# [NODES] section.  Then the broker attaches under its id and gives orders by node id and the
# *name* of a template of the agent's ini: the agent's config owns every command line.

#: The ``appserver_port`` a broker names in ``Hello`` for the farm channel.
FARM_PORT = 0


class UnknownTemplate(Exception):
    """The agent's [NODES] has no command template of that name."""


class NodeRefused(Exception):
    """The agent will not start that node (why in the text): a persistent node another broker
    holds, MAX_NODES reached, no free port, the command cannot run."""


class NodeList(amp.Argument):
    """An agent's nodes of one broker in one value: one line per node,
    ``id port pid persistent state template application detail`` (spaces only in the detail)."""

    def toString(self, inObject: list[dict[str, Any]]) -> bytes:
        lines = []
        for node in inObject:
            lines.append(" ".join([str(int(node["node_id"])), str(int(node["port"])), str(int(node["pid"])),
                                   "1" if node["persistent"] else "0", node["state"] or "-",
                                   node["template"] or "-", node["application"] or "-",
                                   (node.get("detail") or "").replace("\n", " ")]))
        return "\n".join(lines).encode("utf-8")

    def fromString(self, inString: bytes) -> list[dict[str, Any]]:
        nodes = []
        for line in inString.decode("utf-8").split("\n") if inString else []:
            parts = line.split(" ", 7)
            if len(parts) != 8 or parts[3] not in ("0", "1"):
                raise ValueError(f"malformed node line: {line[:100]!r}")
            nodes.append({"node_id": int(parts[0]), "port": int(parts[1]), "pid": int(parts[2]),
                          "persistent": parts[3] == "1", "state": parts[4], "template": parts[5],
                          "application": "" if parts[6] == "-" else parts[6], "detail": parts[7]})
        return nodes


_FARM_ERRORS: dict[type[Exception], bytes] = {
    NotAuthenticated: b"NOT_AUTHENTICATED",
    UnknownTemplate: b"UNKNOWN_TEMPLATE",
    NodeRefused: b"NODE_REFUSED",
}


class Attach(amp.Command):
    """Broker -> agent (farm channel): who the broker is; the answer lists the nodes the agent
    runs for it (kept running while it was away: the broker adopts them or stops them)."""

    arguments = [(b"broker", amp.Unicode())]
    response = [(b"nodes", NodeList()), (b"host", amp.Unicode())]
    errors = _FARM_ERRORS


class StartNode(amp.Command):
    """Broker -> agent: start node *node_id* with the agent's template *template*; the answer
    says where it listens (it is not ready yet: ``NodeEvent`` says when)."""

    arguments = [(b"node_id", amp.Integer()), (b"template", amp.Unicode()),
                 (b"persistent", amp.Boolean()), (b"application", amp.Unicode())]
    response = [(b"host", amp.Unicode()), (b"port", amp.Integer()), (b"pid", amp.Integer())]
    errors = _FARM_ERRORS


class StopNode(amp.Command):
    """Broker -> agent: ask node *node_id* to stop (SIGTERM; SIGKILL with *kill* or after the
    agent's STOP_GRACE).  ``NodeEvent`` 'ended' follows."""

    arguments = [(b"node_id", amp.Integer()), (b"kill", amp.Boolean())]
    response = [(b"known", amp.Boolean())]
    errors = _FARM_ERRORS


class ProbeNode(amp.Command):
    """Broker -> agent: does node *node_id* accept a connection on the agent's host now?"""

    arguments = [(b"node_id", amp.Integer())]
    response = [(b"accepting", amp.Boolean()), (b"memory_bytes", amp.Integer())]
    errors = _FARM_ERRORS


class NodeEvent(amp.Command):
    """Agent -> broker: a node became ready, or ended (``detail``: its exit status)."""

    arguments = [(b"node_id", amp.Integer()), (b"state", amp.Unicode()), (b"detail", amp.Unicode())]
    requiresAnswer = False


class PersistentHolder(amp.Command):
    """Broker -> agent: who holds *application*'s persistent node here ('' if nobody else: this
    broker may start it).  A refused broker asks again now and then, without starting anything."""

    arguments = [(b"application", amp.Unicode())]
    response = [(b"refusal", amp.Unicode())]
    errors = _FARM_ERRORS
