"""Counters of one balance unit, recorded through a small interface.

The proxy, TLS termination and the resumable sessions record what happened here
(:meth:`ISessionStats.record`); the broker screen and ``/metrics`` read :meth:`snapshot`.
Nothing here knows about transports or the web.
"""

from __future__ import annotations

from zope.interface import Interface, implementer

#: Every counter a unit keeps, in the order the screen lists them.
COUNTERS = (
    "sessions_total",       # sessions accepted since start
    "sessions_failed",      # sessions closed because no AppServer answered
    "sessions_refused",     # connections refused by MAX_SESSIONS
    "pending_refused",      # connections refused by MAX_PENDING or MAX_PENDING_PER_ADDRESS
    "bytes_in",             # bytes from clients to servers, of ended sessions
    "bytes_out",            # bytes from servers to clients, of ended sessions
    "handshake_failures",   # TLS handshakes on the unit's port that failed or timed out
    "drops",                # resumable sessions whose link dropped (put in standby)
    "resumes",              # standby sessions resumed by a reconnecting client
    "expiries",             # standby sessions that expired unresumed
    "resume_failures",      # resume attempts refused
    "unestablished_drops",  # resumable sessions whose link dropped before they were established
    "standby_evictions",    # standby sessions ended at STANDBY_MAX_SESSIONS to make room
    "http_requests",        # HTTP units: requests received (a complete head)
    "http_5xx",             # HTTP units: requests answered 5xx (by the broker or the AppServer)
    "http_in_flight",       # HTTP units: requests being answered now (goes down too)
    "http_bad_requests",    # HTTP units: requests refused 400/408/431 as malformed
)


class ISessionStats(Interface):
    """Where a unit's components count what happened."""

    def record(name: str, n: int = 1) -> None:
        """Add *n* to the counter *name* (one of :data:`COUNTERS`)."""

    def get(name: str) -> int:
        """The counter *name* now."""

    def snapshot() -> dict[str, int]:
        """Every counter, by name (a copy)."""


@implementer(ISessionStats)
class SessionStats:
    """Counters in memory, from zero at start (a reload keeps them)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def record(self, name: str, n: int = 1) -> None:
        if name not in self.counts:
            raise KeyError(f"no counter {name!r} (one of {', '.join(COUNTERS)})")
        self.counts[name] += n

    def get(self, name: str) -> int:
        return self.counts[name]

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)
