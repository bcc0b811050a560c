"""Connections not yet established, counted against their caps; rate-limited refusal lines.

No I/O: a clock is passed in.  Pending is everything a stranger can hold without an AppServer
having said a word (see :class:`PendingLimits`).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

from twisted.logger import Logger

log = Logger()

#: Seconds between two log lines about refused connections (each says how many since the last).
REFUSAL_LOG_INTERVAL = 10.0


def client_host(addr: Any) -> str:
    """The client address a cap counts by: its IPv4 address, or its IPv6 /64 (one site's
    prefix: a single host can use any address in it); "" when unknown."""
    host = str(getattr(addr, "host", "") or "")
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def client_text(addr: Any) -> str:
    """A client address as host:port, for log lines."""
    return f"{getattr(addr, 'host', addr)}:{getattr(addr, 'port', '')}"


class RefusalLog:
    """Log lines about refused connections, at most one per *interval*: the first refusal is
    logged at once, later ones are counted and the count is logged at the end of each interval
    that had some, so every refusal is in exactly one line (``flush`` logs what is left)."""

    def __init__(self, clock: Any, describe: Callable[[], str],
                 interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.clock = clock
        self.describe = describe
        self.interval = interval
        self.count = 0  # refused since the last line
        self.latest = ""
        self.timer: Any = None

    def refused(self, client: str) -> None:
        self.count += 1
        self.latest = client
        if self.timer is None:
            self._emit(first=True)
            self.timer = self.clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self.timer = None
        if self.count:
            self._emit(first=False)
            self.timer = self.clock.callLater(self.interval, self._tick)

    def _emit(self, first: bool) -> None:
        count, self.count = self.count, 0
        when = "" if first else f" in the last {self.interval:g}s"
        log.warn("{what}: refused {count} connection(s){when}, latest from {client}",
                 what=self.describe(), count=count, when=when, client=self.latest,
                 refused=count)

    def flush(self) -> None:
        """Log what was refused since the last line and stop the timer (the port is closing)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.count:
            self._emit(first=False)


class PendingToken:
    """One connection counted as not yet established; ``release`` (idempotent) uncounts it."""

    __slots__ = ("limits", "host", "held")

    def __init__(self, limits: PendingLimits, host: str) -> None:
        self.limits = limits
        self.host = host
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.limits._release(self.host)


class PendingLimits:
    """Connections not yet established, per client address and in all, against their caps.

    Pending is everything a stranger can hold without an AppServer having said a word: a
    connection whose first bytes are undecided, one served by a non-session recogniser (the
    port's ``/status``), and a session whose AppServer has not sent its first byte.  Established
    sessions never count, so a branch office behind one NAT address is not capped.  A cap of 0
    is no cap.
    """

    def __init__(self, per_address: int = 0, total: int = 0) -> None:
        self.per_address = per_address
        self.total = total
        self.count = 0
        self.by_address: dict[str, int] = {}

    def over(self, host: str) -> str | None:
        """The key of the cap one more connection from *host* would pass, or None."""
        if self.total and self.count >= self.total:
            return "MAX_PENDING"
        if self.per_address and self.by_address.get(host, 0) >= self.per_address:
            return "MAX_PENDING_PER_ADDRESS"
        return None

    def take(self, host: str) -> PendingToken:
        """Count one more (no check: see :meth:`over`)."""
        self.count += 1
        self.by_address[host] = self.by_address.get(host, 0) + 1
        return PendingToken(self, host)

    def _release(self, host: str) -> None:
        self.count -= 1
        left = self.by_address.get(host, 0) - 1
        if left > 0:
            self.by_address[host] = left
        else:
            self.by_address.pop(host, None)
