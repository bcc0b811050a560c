"""A SmartClient session's lifecycle as a small state machine, with no transport inside.

::

    accepted -> choosing -> waiting -> connecting <-> linked -> closing -> ended
                   |           |           |   (failover, replay: back to connecting)
                   +-----------+-----------+--> closing

*Waiting* is where a session asks its gates (:class:`IGate`) whether it may go on: today one,
"a server can take a session" (:class:`ServerAvailable`, ``WAIT_FOR_SERVER``); later a license,
a server under its cap, a node waking.  A gate answers with a Deferred that fires when the
session may go on or fails with :class:`GateRefused` and a reason that reaches the log and the
client's close; a client that leaves meanwhile cancels it.

The machine is an enum and a transition table, not Automat: a session is made thousands of times
a second, a table lookup costs nothing beside Automat's per-instance machinery, mypy checks it,
and an illegal move is one log line (never an exception in a reactor callback).  The relay (bytes
from one side to the other) never goes through it.
"""

from __future__ import annotations

import enum
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from protheus_broker.balancing.pool import NoServerAvailable, ServerPool

log = Logger()


class SessionState(enum.Enum):
    """Where one session stands."""

    ACCEPTED = "accepted"  # a SmartClient connection, paused
    CHOOSING = "choosing"  # asking the pool for candidates
    WAITING = "waiting"  # held by a gate (no server up yet, later a license, ...)
    CONNECTING = "connecting"  # resolving, connecting, handshaking, or replaying on the next
    LINKED = "linked"  # both sides relay (the first answer may still be awaited)
    CLOSING = "closing"  # one side is gone or no server was found; the other is being closed
    ENDED = "ended"  # accounted for


S = SessionState

#: Every legal move; anything else is a bug, logged once, and ignored.
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    S.ACCEPTED: frozenset({S.CHOOSING, S.CLOSING}),
    S.CHOOSING: frozenset({S.WAITING, S.CONNECTING, S.CLOSING}),
    S.WAITING: frozenset({S.CHOOSING, S.CONNECTING, S.CLOSING}),
    S.CONNECTING: frozenset({S.CONNECTING, S.LINKED, S.CLOSING}),
    S.LINKED: frozenset({S.CONNECTING, S.CLOSING}),  # CONNECTING: replay on the next server
    S.CLOSING: frozenset({S.CLOSING, S.ENDED}),
    S.ENDED: frozenset(),
}


class Lifecycle:
    """The state of one session and its legal moves."""

    __slots__ = ("state", "name")

    def __init__(self, name: object) -> None:
        self.state = SessionState.ACCEPTED
        self.name = name  # for the log line of an illegal move

    def move(self, to: SessionState) -> bool:
        """Go to *to* if the table allows it (True); else log one line and stay (False)."""
        if to in TRANSITIONS[self.state]:
            self.state = to
            return True
        log.error("session {session_id}: illegal lifecycle move {old} -> {new}, ignored",
                  session_id=self.name, old=self.state.value, new=to.value)
        return False

    @property
    def ended(self) -> bool:
        return self.state is SessionState.ENDED


class GateRefused(Exception):
    """A gate will not let a session go on: *what* ("no AppServer available") and *detail*
    (why) reach the session's end line and its log line."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what} ({detail})")
        self.what = what
        self.detail = detail


class IGate(Interface):
    """Something a session must pass before it connects (a server up, a license, ...)."""

    def acquire(session: Any) -> Deferred[None]:
        """A Deferred that fires when *session* may go on, or fails with :class:`GateRefused`.
        Cancelling it (the client left) gives up the wait and holds nothing."""


@implementer(IGate)
class ServerAvailable:
    """A server can take a session (Up, or Suspended as a last resort): at once when one can,
    else wait up to *wait* seconds (``WAIT_FOR_SERVER``; 0: go on at once, and the session fails
    as it always did with "no AppServer available (none is up)")."""

    def __init__(self, pool: ServerPool, wait: float = 0.0) -> None:
        self.pool = pool
        self.wait = wait

    def acquire(self, session: Any) -> Deferred[None]:
        if self.wait <= 0 or self.pool.can_take_session():
            return succeed(None)
        return self.pool.when_available(self.wait).addErrback(self._refused)

    @staticmethod
    def _refused(reason: Failure) -> None:
        reason.trap(NoServerAvailable)
        raise GateRefused("no AppServer available", reason.getErrorMessage())

    def __repr__(self) -> str:
        return f"no AppServer can take a session yet: WAIT_FOR_SERVER={self.wait:g}s"
