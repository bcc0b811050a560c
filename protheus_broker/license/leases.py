"""The license server's lease table: pure logic, a clock passed in, every change journalled first.

Seats are counted per class (``TOTVS_I``, one class per application code).  A client holds
*leases*: a block of seats of one class with a deadline.  A lease ends when the client returns it,
when its deadline passes unrenewed (``expired``), when the client's connection stays lost for the
grace time (``client gone``), or when an admin revokes it (``revoked by admin``); each end is one
log line with its reason.

Every change is handed to the :class:`IJournal` *before* it is applied (and so before any answer
is sent): after a crash the journal holds at least what any client was told.  A config reload
that shrinks a class below what is leased takes nothing back: new grants wait until enough
leases end.
"""

from __future__ import annotations

import enum
import math
import secrets
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

from twisted.logger import Logger
from zope.interface import Interface, implementer

from protheus_broker.license.protocol import NoSeats, UnknownClass, UnknownLease

log = Logger()


class Reason(enum.Enum):
    """Why seats came back (the journal, the log and ``/metrics`` use the value)."""

    RETURNED = "returned"
    CLIENT_GONE = "client gone"
    EXPIRED = "expired"
    REVOKED = "revoked by admin"


@dataclass(frozen=True)
class Lease:
    """A block of seats of one class held by one client until *expires* (wall-clock seconds)."""

    lease_id: str
    client: str
    license_class: str
    seats: int
    expires: float

    def wire(self, now: float) -> dict[str, Any]:
        """The lease as :class:`~protheus_broker.license.protocol.LeaseList` sends it."""
        return {"lease_id": self.lease_id, "license_class": self.license_class, "seats": self.seats,
                "ttl": max(0.0, self.expires - now)}


@dataclass(frozen=True)
class Limits:
    """How long leases live and how much one client may hold."""

    ttl: float = 30.0
    grace: float = 10.0
    max_seats_per_lease: int = 100
    max_leases_per_client: int = 64


class IJournal(Interface):
    """Where the table writes each change before applying it (durably: it returns once the
    record is on disk; it raises ``OSError`` if it cannot, and the change is not made)."""

    def record(entry: dict[str, Any]) -> None:
        """Write one change: ``grant``, ``renew`` or ``release`` (see :mod:`.journal`)."""


@implementer(IJournal)
class NoJournal:
    """A table that remembers nothing across restarts (tests, and while a journal is replayed)."""

    def record(self, entry: dict[str, Any]) -> None:
        pass


def new_lease_id() -> str:
    """A lease id no restart can repeat (64 random bits, hex)."""
    return secrets.token_hex(8)


class LeaseTable:
    """Every lease the server holds, and the seat counts they are drawn from."""

    def __init__(self, clock: Any, counts: Mapping[str, int], limits: Limits = Limits(),
                 journal: Any = None, new_id: Callable[[], str] = new_lease_id) -> None:
        self.clock = clock
        self.counts: dict[str, int] = dict(counts)
        self.limits = limits
        self.journal: Any = journal if journal is not None else NoJournal()
        self.new_id = new_id
        self.leases: dict[str, Lease] = {}
        # Indexes kept with every change, so a grant costs no scan of the table.
        self._used: dict[str, int] = {}
        self._by_client: dict[str, set[str]] = {}
        self._earliest = math.inf  # no lease ends before this (a lower bound)
        #: Clients whose connection is lost: since when (their leases end after the grace).
        self.lost: dict[str, float] = {}
        self.releases: dict[Reason, int] = {reason: 0 for reason in Reason}
        self.grants = 0
        self.refusals = 0

    # --- reading -----------------------------------------------------------------------------

    def in_use(self, license_class: str) -> int:
        return self._used.get(license_class, 0)

    def free(self, license_class: str) -> int:
        """Seats that may be granted now (0 while a shrunk class is still over its count)."""
        return max(0, self.counts.get(license_class, 0) - self.in_use(license_class))

    def held_by(self, client: str) -> list[Lease]:
        return sorted((self.leases[lease_id] for lease_id in self._by_client.get(client, ())),
                      key=lambda lease: lease.lease_id)

    def classes(self) -> list[str]:
        """The configured classes, then any class only leases still hold (removed by a reload)."""
        extra = sorted({name for name, used in self._used.items() if used > 0} - set(self.counts))
        return sorted(self.counts) + extra

    # --- changes -----------------------------------------------------------------------------

    def load(self, leases: Iterable[Lease]) -> None:
        """Take the leases a journal replay found (not journalled again); those past their
        deadline end at once as ``expired``; the others keep their wall-clock deadline."""
        for lease in leases:
            self._add(lease)
        self.tick()

    def grant(self, client: str, license_class: str, seats: int) -> Lease:
        """Up to *seats* seats of *license_class* for *client* (fewer if fewer are free)."""
        self.tick()
        if license_class not in self.counts:
            self.refusals += 1
            raise UnknownClass(f"no license of class {license_class!r} on this server")
        if seats < 1:
            self.refusals += 1
            raise NoSeats(f"asked for {seats} seats; ask for at least 1")
        if len(self._by_client.get(client, ())) >= self.limits.max_leases_per_client:
            self.refusals += 1
            raise NoSeats(f"client {client} already holds {self.limits.max_leases_per_client} leases "
                          "(MAX_LEASES_PER_CLIENT)")
        free = self.free(license_class)
        if free == 0:
            self.refusals += 1
            raise NoSeats(f"all {self.counts[license_class]} seats of {license_class} are in use")
        granted = min(seats, free, self.limits.max_seats_per_lease)
        lease = Lease(self.new_id(), client, license_class, granted, self.clock.seconds() + self.limits.ttl)
        while lease.lease_id in self.leases:  # (64 random bits: never, but never is cheap to check)
            lease = replace(lease, lease_id=self.new_id())
        self.journal.record({"op": "grant", "lease": lease.lease_id, "client": client,
                             "class": license_class, "seats": granted, "expires": lease.expires})
        self._add(lease)
        self.grants += 1
        log.info("lease {lease_id}: {seats} seats of {license_class} to {client} ({asked} asked, "
                 "{left} left)", lease_id=lease.lease_id, seats=granted, license_class=license_class,
                 client=client, asked=seats, left=free - granted)
        return lease

    def _owned(self, client: str, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None or lease.client != client:
            raise UnknownLease(f"no lease {lease_id[:40]!r} held by {client}")
        return lease

    def renew(self, client: str, lease_id: str) -> float:
        """Reset the lease's time to live; the answer is that time."""
        self.tick()
        lease = self._owned(client, lease_id)
        expires = self.clock.seconds() + self.limits.ttl
        if expires > lease.expires:
            self.journal.record({"op": "renew", "lease": lease_id, "expires": expires})
            self.leases[lease_id] = replace(lease, expires=expires)  # (the earliest bound holds)
        return self.limits.ttl

    def release(self, client: str, lease_id: str, seats: int) -> int:
        """*client* gives *seats* seats of the lease back (all, or more: the lease ends);
        the answer is the seats it still holds.  Fewer than one seat changes nothing."""
        self.tick()
        lease = self._owned(client, lease_id)
        if seats < 1:
            return lease.seats
        return self._release(lease, min(seats, lease.seats), Reason.RETURNED)

    def revoke(self, lease_id: str, by: str = "admin") -> Lease:
        """An admin takes the lease back (the caller tells the client)."""
        self.tick()
        lease = self.leases.get(lease_id)
        if lease is None:
            raise UnknownLease(f"no lease {lease_id[:40]!r}")
        self._release(lease, lease.seats, Reason.REVOKED, by=by)
        return lease

    def client_lost(self, client: str) -> None:
        """The client's connection is gone: its leases end after the grace unless it returns."""
        if self.held_by(client):
            self.lost.setdefault(client, self.clock.seconds())
            log.info("client {client} gone; its {count} leases are kept {grace:g}s for it to "
                     "come back", client=client, count=len(self.held_by(client)), grace=self.limits.grace)

    def client_back(self, client: str) -> list[Lease]:
        """The client authenticated again: the leases it still holds."""
        self.lost.pop(client, None)
        self.tick()
        return self.held_by(client)

    def tick(self) -> None:
        """End every lease past its deadline, and those of clients gone longer than the grace."""
        now = self.clock.seconds()
        gone = {client for client, since in self.lost.items() if now - since >= self.limits.grace}
        if now < self._earliest and not gone:
            return
        for lease in sorted(self.leases.values(), key=lambda lease: lease.lease_id):
            if lease.expires <= now:
                self._release(lease, lease.seats, Reason.EXPIRED)
            elif lease.client in gone:
                self._release(lease, lease.seats, Reason.CLIENT_GONE)
        for client in gone:
            del self.lost[client]
        self._earliest = min((lease.expires for lease in self.leases.values()), default=math.inf)

    def set_counts(self, counts: Mapping[str, int]) -> None:
        """A reload: new seat counts.  Nothing leased is taken back."""
        for license_class in sorted(set(counts) | set(self.counts)):
            before, after = self.counts.get(license_class, 0), counts.get(license_class, 0)
            in_use = self.in_use(license_class)
            if before != after:
                over = (f"; {in_use} are leased: no new grant until below {after}"
                        if in_use > after else "")
                log.info("reload: {license_class}: {before} -> {after} seats{over}",
                         license_class=license_class, before=before, after=after, over=over)
        self.counts = dict(counts)

    def _add(self, lease: Lease) -> None:
        self.leases[lease.lease_id] = lease
        self._used[lease.license_class] = self._used.get(lease.license_class, 0) + lease.seats
        self._by_client.setdefault(lease.client, set()).add(lease.lease_id)
        self._earliest = min(self._earliest, lease.expires)

    def _release(self, lease: Lease, seats: int, reason: Reason, by: str = "") -> int:
        self.journal.record({"op": "release", "lease": lease.lease_id, "seats": seats,
                             "reason": reason.value})
        left = lease.seats - seats
        self._used[lease.license_class] -= seats
        if left > 0:
            self.leases[lease.lease_id] = replace(lease, seats=left)
        else:
            del self.leases[lease.lease_id]
            held = self._by_client[lease.client]
            held.discard(lease.lease_id)
            if not held:
                del self._by_client[lease.client]
        self.releases[reason] += 1
        log.info("lease {lease_id} of {client}: {seats} seats of {license_class} released "
                 "({reason}{by}); {left} left in the lease", lease_id=lease.lease_id, seats=seats,
                 license_class=lease.license_class, reason=reason.value, by=f" {by}" if by else "",
                 client=lease.client, left=left)
        return left
