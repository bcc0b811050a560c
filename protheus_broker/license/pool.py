"""The local seat pool: per license class, the seats this broker holds by lease, those in use,
and the requests waiting for one.  Pure logic: the clock and the wire to the license server
(:class:`ILeaseWire`) are passed in.

The idea of YouTube's Doorman: capacity is leased from the server in blocks and enforced here,
so a request pays a dictionary look-up (:meth:`SeatPool.try_take`), never a round trip.  Per
class the pool keeps between ``low`` and ``high`` free seats: a take that leaves fewer than
``low`` free asks the server for a block (one request in flight per class), and free seats above
``high`` are given back a little later (``release_delay``: a burst's seats are not returned and
leased again at once).  Every lease is renewed at a third of its TTL; a lease not renewed (the
server is unreachable) expires here a little before the server's TTL, so a seat is never used
after the server may have given it to someone else.  While the server is unreachable the pool
keeps serving from its unexpired leases; a class with no seat left answers "license server
unreachable".
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from protheus_broker.license.protocol import DEFAULT_CLASS, NoSeats, UnknownClass, UnknownLease

log = Logger()

#: The 503 reasons, in the seed's terms (the text starts the JSON body's ``error``).
ALL_IN_USE = "all licenses in use"
UNREACHABLE = "license server unreachable"
NOT_CONFIGURED = "license server not configured"
NO_LICENSE = "no license for application"

#: Short codes of the reasons (``/metrics`` labels, the screen's counters).
REASON_CODES = {ALL_IN_USE: "all_in_use", UNREACHABLE: "unreachable", NOT_CONFIGURED: "not_configured",
                NO_LICENSE: "no_license"}
#: Retry-After per reason: a seat frees in seconds; a missing license or server takes an admin.
RETRY_AFTER = {ALL_IN_USE: 2, UNREACHABLE: 10, NOT_CONFIGURED: 60, NO_LICENSE: 60}


class NoSeat(Exception):
    """No seat for the request: *kind* is one of the reason constants, *reason* the full text."""

    def __init__(self, kind: str, reason: str | None = None) -> None:
        self.kind = kind
        self.reason = reason or kind
        self.code = REASON_CODES[kind]
        self.retry_after = RETRY_AFTER[kind]
        super().__init__(self.reason)


def no_license(license_class: str) -> NoSeat:
    """"no license for application X" (X the class: an application code, or TOTVS_I)."""
    return NoSeat(NO_LICENSE, f"{NO_LICENSE} {license_class}")


class NotConnected(Exception):
    """The license channel is down: the wire cannot send."""


class ILeaseWire(Interface):
    """The pool's way to the license server (the license client's channel)."""

    connected = Attribute("True while an authenticated channel is up.")
    connecting = Attribute("True while the first channel is being opened (requests wait, not refused).")

    def lease(license_class: str, seats: int) -> "Deferred[dict[str, Any]]":
        """Ask for up to *seats* seats: ``lease_id``, ``seats``, ``ttl``; NoSeats, UnknownClass."""

    def renew(lease_id: str) -> "Deferred[dict[str, Any]]":
        """The lease's heartbeat: ``ttl``; UnknownLease."""

    def release(lease_id: str, seats: int) -> "Deferred[dict[str, Any]]":
        """Give *seats* of the lease back: ``seats`` left."""

    def unresponsive(why: str) -> None:
        """A lease expired unrenewed while the channel looked up (a black hole: no answer and no
        close): take the channel for dead now (``connected`` false at once) and open a new one."""


class HeldLease:
    """One lease the broker holds, with its renewal and local expiry timers."""

    __slots__ = ("lease_id", "license_class", "seats", "expires_at", "expire_call", "renew_call")

    def __init__(self, lease_id: str, license_class: str, seats: int) -> None:
        self.lease_id = lease_id
        self.license_class = license_class
        self.seats = seats
        self.expires_at = 0.0
        self.expire_call: IDelayedCall | None = None
        self.renew_call: IDelayedCall | None = None

    def stop(self) -> None:
        for call in (self.expire_call, self.renew_call):
            if call is not None and call.active():
                call.cancel()
        self.expire_call = self.renew_call = None


class _Waiter:
    __slots__ = ("deferred", "since", "timer")

    def __init__(self, deferred: Deferred[float], since: float) -> None:
        self.deferred = deferred
        self.since = since
        self.timer: IDelayedCall | None = None


class SeatClass:
    """One license class: seats held (sum of its leases), in use, free = held - in_use."""

    __slots__ = ("name", "held", "in_use", "leases", "waiters", "asking", "next_ask_at", "unknown_until",
                 "last_refusal", "retry_call", "trim_call", "seq", "granted", "waited", "timeouts", "asking_call",
                 "swept_granted")

    def __init__(self, name: str) -> None:
        self.name = name
        self.held = 0
        self.in_use = 0
        self.leases: dict[str, HeldLease] = {}
        self.waiters: OrderedDict[int, _Waiter] = OrderedDict()
        self.asking = False  # a Lease is in flight
        self.asking_call: Deferred[Any] | None = None  # ... and its answer
        self.next_ask_at = 0.0  # after a refusal: no new Lease before
        self.unknown_until = 0.0  # the server has no such class: "no license" until then
        self.last_refusal = ""
        self.retry_call: IDelayedCall | None = None
        self.trim_call: IDelayedCall | None = None
        self.seq = 0
        self.granted = 0  # seats taken by requests
        self.waited = 0  # of those, after waiting
        self.timeouts = 0
        self.swept_granted = 0  # granted at the last idle sweep

    @property
    def free(self) -> int:
        return self.held - self.in_use


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


class SeatPool:
    """The seats of every class this broker uses, kept between the watermarks."""

    def __init__(self, clock: Any, wire: Any, low: int = 2, high: int = 16, max_classes: int = 256,
                 retry_delay: float = 1.0, release_delay: float = 2.0, unknown_ttl: float = 30.0,
                 idle_release: float = 60.0) -> None:
        self.clock = clock
        self.wire = wire
        self.low = low
        self.high = max(high, low, 1)
        self.max_classes = max_classes
        self.retry_delay = retry_delay
        self.release_delay = release_delay
        self.unknown_ttl = unknown_ttl
        self.idle_release = idle_release  # a class unused this long gives its free seats back (0: never)
        self._sweep_call: IDelayedCall | None = None
        self.classes: dict[str, SeatClass] = {}
        self.closed = False  # stopping: every lease goes back, none is taken
        self._limit_logged = -60.0

    # --- the requests' side (the hot path) -------------------------------------------------

    def try_take(self, license_class: str) -> bool:
        """Take a free seat of *license_class* at once (no waiter ahead), or False."""
        seats = self.classes.get(license_class)
        if seats is None or seats.held <= seats.in_use or seats.waiters:
            return False
        seats.in_use += 1
        seats.granted += 1
        if seats.held - seats.in_use < self.low and not seats.asking:
            self._refill(seats)
        return True

    def wait(self, license_class: str, timeout: float, max_waiters: int) -> "Deferred[float]":
        """A seat of *license_class*: at once, or after waiting (FIFO) at most *timeout* seconds
        behind at most *max_waiters* others.  Fires with the seconds waited; fails with
        :class:`NoSeat`; cancelling it (client gone) leaves the queue."""
        seats = self.classes.get(license_class)
        now = self.clock.seconds()
        if seats is None:
            if len(self.classes) >= self.max_classes and not self._forget_idle_class():
                return fail(NoSeat(NO_LICENSE, f"{NO_LICENSE} {license_class} (more than "
                                   f"{self.max_classes} license classes in use)"))
            seats = self.classes[license_class] = SeatClass(license_class)
        if seats.unknown_until > now:
            return fail(no_license(license_class))
        if seats.held > seats.in_use and not seats.waiters:
            seats.in_use += 1
            seats.granted += 1
            return succeed(0.0)
        if not self.wire.connected and seats.held == 0 and not getattr(self.wire, "connecting", False):
            return fail(NoSeat(UNREACHABLE))
        if len(seats.waiters) >= max_waiters:
            kind = ALL_IN_USE if self.wire.connected else UNREACHABLE
            return fail(NoSeat(kind, f"{kind} ({len(seats.waiters)} requests already waiting)"))
        seats.seq += 1
        key = seats.seq

        def cancel(_: Deferred[float]) -> None:
            waiter = seats.waiters.pop(key, None)
            if waiter is not None:
                _cancel(waiter.timer)

        deferred: Deferred[float] = Deferred(cancel)
        waiter = _Waiter(deferred, now)
        waiter.timer = self.clock.callLater(timeout, self._timed_out, seats, key)
        seats.waiters[key] = waiter
        self._refill(seats)
        return deferred

    def give_back(self, license_class: str) -> None:
        """A request that held a seat of *license_class* is over."""
        seats = self.classes.get(license_class)
        if seats is None or seats.in_use <= 0:
            log.warn("license: a seat of {license_class} given back that was not taken; ignored",
                     license_class=license_class)
            return
        seats.in_use -= 1
        if seats.waiters:
            self._serve(seats)
        elif seats.held - seats.in_use > self.high and seats.trim_call is None:
            seats.trim_call = self.clock.callLater(self.release_delay, self._trim, seats)

    # --- waiting ---------------------------------------------------------------------------

    def _why(self, seats: SeatClass) -> NoSeat:
        if not self.wire.connected:
            return NoSeat(UNREACHABLE)
        if seats.unknown_until > self.clock.seconds():
            return no_license(seats.name)
        return NoSeat(ALL_IN_USE)

    def _timed_out(self, seats: SeatClass, key: int) -> None:
        waiter = seats.waiters.pop(key, None)
        if waiter is None:
            return
        waiter.timer = None
        seats.timeouts += 1
        waited = self.clock.seconds() - waiter.since
        error = self._why(seats)
        error.reason = f"{error.reason} (waited {waited:g}s for a seat)"
        waiter.deferred.errback(error)

    def _serve(self, seats: SeatClass) -> None:
        """Free seats to the waiters, oldest first (the seat is booked before its callback runs)."""
        now = self.clock.seconds()
        while seats.waiters and seats.held > seats.in_use:
            _, waiter = seats.waiters.popitem(last=False)
            _cancel(waiter.timer)
            seats.in_use += 1
            seats.granted += 1
            seats.waited += 1
            waiter.deferred.callback(now - waiter.since)
        if seats.waiters or seats.free < self.low:
            self._refill(seats)

    def _fail_waiters(self, seats: SeatClass, error: NoSeat) -> None:
        while seats.waiters:
            _, waiter = seats.waiters.popitem(last=False)
            _cancel(waiter.timer)
            waiter.deferred.errback(NoSeat(error.kind, error.reason))

    # --- leasing ---------------------------------------------------------------------------

    def _refill(self, seats: SeatClass, top_up: bool = False) -> None:
        """Ask for a block when below the low watermark or requests wait (one Lease in flight);
        *top_up*: also when merely below the high one (after a grant smaller than asked)."""
        if seats.asking or not self.wire.connected or self.closed:
            return
        free = seats.held - seats.in_use
        if free >= (self.high if top_up else self.low) and not seats.waiters:
            return
        now = self.clock.seconds()
        if seats.unknown_until > now:
            return
        if seats.next_ask_at > now:
            if seats.retry_call is None and seats.waiters:
                seats.retry_call = self.clock.callLater(seats.next_ask_at - now, self._retry, seats)
            return
        # at least back up to the high watermark; when growing fast, a quarter of what is in use
        # more (few, large leases: a server caps the leases per client)
        want = max(1, self.high - max(free, 0) + len(seats.waiters), seats.in_use // 4)
        seats.asking = True
        asking = seats.asking_call = self.wire.lease(seats.name, want)
        asking.addCallbacks(self._granted, self._refused, callbackArgs=(seats, want), errbackArgs=(seats,))
        asking.addErrback(lambda failure: log.failure("license: lease bookkeeping", failure))

    def _retry(self, seats: SeatClass) -> None:
        seats.retry_call = None
        self._refill(seats)

    def _granted(self, answer: dict[str, Any], seats: SeatClass, asked: int) -> "Deferred[Any] | None":
        seats.asking = False
        seats.asking_call = None
        granted = int(answer["seats"])
        if self.closed or self.classes.get(seats.name) is not seats or granted < 1:  # stopping, or forgotten
            if granted >= 1:
                return self._send_release(answer["lease_id"], granted)
            return None
        seats.last_refusal = ""
        self._hold(seats, str(answer["lease_id"]), granted, float(answer["ttl"]))
        self._serve(seats)
        if granted < asked:  # a per-lease cap, or the last free seats (the next ask learns NoSeats)
            self._refill(seats, top_up=True)
        return None

    def _refused(self, failure: Failure, seats: SeatClass) -> None:
        seats.asking = False
        seats.asking_call = None
        now = self.clock.seconds()
        if failure.check(UnknownClass):
            seats.unknown_until = now + self.unknown_ttl
            seats.last_refusal = NO_LICENSE
            log.warn("license: the license server has no license of class {license_class}",
                     license_class=seats.name)
            self._fail_waiters(seats, no_license(seats.name))
            return
        if failure.check(NoSeats):
            seats.last_refusal = ALL_IN_USE
            why = failure.getErrorMessage()
            if "MAX_LEASES_PER_CLIENT" in why and now - self._limit_logged >= 60.0:
                self._limit_logged = now
                log.warn("license: the license server refuses more leases: {why}; raise its "
                         "MAX_LEASES_PER_CLIENT or our HIGH_WATERMARK (bigger blocks)", why=why)
            seats.next_ask_at = now + self.retry_delay
            if seats.waiters and seats.retry_call is None:
                seats.retry_call = self.clock.callLater(self.retry_delay, self._retry, seats)
            return
        # the channel went down (its loss is handled by link_down) or a bad answer: ask again later
        seats.next_ask_at = now + self.retry_delay
        if not failure.check(NotConnected, ConnectionClosed):  # (a lost channel is logged as such)
            log.warn("license: lease of {license_class} failed: {why}", license_class=seats.name,
                     why=failure.getErrorMessage())

    def _hold(self, seats: SeatClass, lease_id: str, count: int, ttl: float) -> None:
        lease = seats.leases.get(lease_id)
        if lease is None:
            lease = seats.leases[lease_id] = HeldLease(lease_id, seats.name, 0)
        seats.held += count - lease.seats
        lease.seats = count
        self._schedule(lease, ttl)

    def _schedule(self, lease: HeldLease, ttl: float) -> None:
        """Renew at ttl/3; expire here a little before the server would (never use a seat the
        server may have handed on)."""
        lease.stop()
        now = self.clock.seconds()
        local = max(0.0, ttl - min(1.0, ttl / 10))
        lease.expires_at = now + local
        lease.expire_call = self.clock.callLater(local, self._expired, lease)
        lease.renew_call = self.clock.callLater(ttl / 3, self._renew, lease)

    def _renew(self, lease: HeldLease) -> None:
        lease.renew_call = None
        if not self.wire.connected:
            return  # renewed at adoption when the channel is back
        renewing = self.wire.renew(lease.lease_id)
        renewing.addCallbacks(self._renewed, self._renew_failed, callbackArgs=(lease,), errbackArgs=(lease,))
        renewing.addErrback(lambda failure: log.failure("license: renewal bookkeeping", failure))

    def _renewed(self, answer: dict[str, Any], lease: HeldLease) -> None:
        if self._owner(lease) is not None:
            self._schedule(lease, float(answer["ttl"]))

    def _renew_failed(self, failure: Failure, lease: HeldLease) -> None:
        if failure.check(UnknownLease):
            log.warn("license: lease {lease_id} ({license_class}, {seats} seats) is gone at the server; "
                     "dropping it", lease_id=lease.lease_id, license_class=lease.license_class, seats=lease.seats)
            self._drop(lease)
        # else: the channel is down; the lease is renewed (or dropped) at adoption

    def _owner(self, lease: HeldLease) -> SeatClass | None:
        seats = self.classes.get(lease.license_class)
        if seats is None or seats.leases.get(lease.lease_id) is not lease:
            return None
        return seats

    def _expired(self, lease: HeldLease) -> None:
        lease.expire_call = None
        log.warn("license: lease {lease_id} ({license_class}, {seats} seats) expired unrenewed",
                 lease_id=lease.lease_id, license_class=lease.license_class, seats=lease.seats)
        if self.wire.connected:  # renewed from a third of its TTL on, never answered: the channel is dead
            self.wire.unresponsive(f"lease {lease.lease_id} expired unrenewed")
        self._drop(lease)

    def _drop(self, lease: HeldLease) -> None:
        """The lease's seats are no longer ours (expired, revoked, unknown at the server).
        Requests using them carry on; new ones wait for what is left."""
        lease.stop()
        seats = self._owner(lease)
        if seats is None:
            return
        del seats.leases[lease.lease_id]
        seats.held -= lease.seats
        if seats.held <= 0 and seats.waiters and not self.wire.connected:
            self._fail_waiters(seats, NoSeat(UNREACHABLE))
        elif seats.free < self.low or seats.waiters:
            self._refill(seats)

    def _trim(self, seats: SeatClass) -> None:
        """Give back free seats above the high watermark, smallest leases first (whole leases end)."""
        seats.trim_call = None
        surplus = seats.held - seats.in_use - self.high
        if surplus <= 0 or seats.waiters or not self.wire.connected:
            return
        self._give_free_seats_back(seats, surplus)

    def _give_free_seats_back(self, seats: SeatClass, surplus: int) -> None:
        """Release *surplus* free seats of the class, smallest leases first (whole leases end)."""
        for lease in sorted(seats.leases.values(), key=lambda held: held.seats):
            if surplus <= 0:
                break
            count = min(lease.seats, surplus)
            surplus -= count
            lease.seats -= count
            seats.held -= count
            if lease.seats == 0:
                lease.stop()
                del seats.leases[lease.lease_id]
            self._send_release(lease.lease_id, count)

    def _send_release(self, lease_id: str, count: int) -> "Deferred[Any]":
        releasing = self.wire.release(lease_id, count)
        releasing.addErrback(lambda failure: log.info(
            "license: release of {count} seats of lease {lease_id} not confirmed: {why}",
            count=count, lease_id=lease_id, why=failure.getErrorMessage()))
        return releasing

    def _forget_idle_class(self) -> bool:
        """Make room for a new class: forget one holding nothing and used by nobody."""
        for name, seats in self.classes.items():
            if name != DEFAULT_CLASS and not seats.held and not seats.in_use and not seats.waiters \
                    and not seats.asking:
                _cancel(seats.retry_call)
                _cancel(seats.trim_call)
                del self.classes[name]
                return True
        return False

    def _sweep(self) -> None:
        """Every ``idle_release / 2`` seconds: a class no request took a seat of since the last
        sweep gives its free seats back (TOTVS_I keeps the low watermark), so seats this broker
        does not use go to other brokers (application licenses are often few)."""
        self._sweep_call = self.clock.callLater(self.idle_release / 2, self._sweep)
        for name, seats in self.classes.items():
            idle = seats.granted == seats.swept_granted and not seats.in_use and not seats.waiters
            seats.swept_granted = seats.granted
            if not idle or not self.wire.connected or seats.asking:
                continue
            surplus = seats.held - (self.low if name == DEFAULT_CLASS else 0)
            if surplus > 0:
                log.info("license: {license_class} unused for {idle:g}s; giving {count} seats back",
                         license_class=name, idle=self.idle_release / 2, count=surplus)
                self._give_free_seats_back(seats, surplus)

    def start(self) -> None:
        """Begin the idle sweep (the client calls this once it runs)."""
        if self.idle_release > 0 and self._sweep_call is None:
            self._sweep_call = self.clock.callLater(self.idle_release / 2, self._sweep)

    # --- the channel's events --------------------------------------------------------------

    def adopt(self, leases: list[dict[str, Any]]) -> None:
        """The channel is (back) up and the server listed the leases it holds for us: those are
        ours (with their TTL left); ours it did not list are gone.  Surplus above the high
        watermark goes back after ``release_delay``; classes below the low one refill."""
        listed = {lease["lease_id"]: lease for lease in leases}
        for seats in list(self.classes.values()):
            for lease in list(seats.leases.values()):
                if lease.lease_id not in listed:
                    log.info("license: lease {lease_id} ({license_class}, {seats} seats) is no longer held "
                             "by the server", lease_id=lease.lease_id, license_class=lease.license_class,
                             seats=lease.seats)
                    self._drop(lease)
        for lease_id, entry in listed.items():
            name = str(entry["license_class"])
            known = self.classes.get(name)
            if known is None:
                if len(self.classes) >= self.max_classes and not self._forget_idle_class():
                    self._send_release(lease_id, int(entry["seats"]))
                    continue
                known = self.classes[name] = SeatClass(name)
            self._hold(known, lease_id, int(entry["seats"]), float(entry["ttl"]))
        if DEFAULT_CLASS not in self.classes and len(self.classes) < self.max_classes:
            self.classes[DEFAULT_CLASS] = SeatClass(DEFAULT_CLASS)  # warm: the class every REST call takes
        for name, seats in list(self.classes.items()):
            seats.next_ask_at = 0.0
            if seats.waiters:
                self._serve(seats)
            elif name == DEFAULT_CLASS or seats.in_use:  # an idle application class waits for use
                self._refill(seats)
            if seats.free > self.high and seats.trim_call is None:
                seats.trim_call = self.clock.callLater(self.release_delay, self._trim, seats)

    def link_down(self) -> None:
        """The channel is lost: leases are served until they expire; classes with no seat at all
        fail their waiters with "license server unreachable"."""
        for seats in self.classes.values():
            seats.asking = False  # its answer will not come (AMP fails it)
            seats.asking_call = None
            if seats.held <= 0 and seats.waiters:
                self._fail_waiters(seats, NoSeat(UNREACHABLE))

    def revoked(self, lease_id: str, reason: str) -> None:
        """An admin took a lease back at the server."""
        for seats in self.classes.values():
            lease = seats.leases.get(lease_id)
            if lease is not None:
                log.warn("license: lease {lease_id} ({license_class}, {seats} seats) revoked by the license "
                         "server: {reason}", lease_id=lease_id, license_class=seats.name, seats=lease.seats,
                         reason=reason)
                self._drop(lease)
                return

    def release_all(self) -> "list[Deferred[Any]]":
        """Shutting down: give every lease back (requests still running finish on the AppServer);
        the answers, to wait for (a lease still being asked for goes back when it comes)."""
        self.closed = True
        _cancel(self._sweep_call)
        self._sweep_call = None
        answers: list[Deferred[Any]] = []
        for seats in self.classes.values():
            if seats.asking_call is not None:
                answers.append(seats.asking_call)
            for lease in list(seats.leases.values()):
                lease.stop()
                if self.wire.connected:
                    answers.append(self._send_release(lease.lease_id, lease.seats))
            seats.leases.clear()
            seats.held = 0
            _cancel(seats.retry_call)
            _cancel(seats.trim_call)
            seats.retry_call = seats.trim_call = None
        return answers

    # --- reading ---------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per class: seats held, in use, free, waiting, leases, and the counters."""
        now = self.clock.seconds()
        return {name: {"held": seats.held, "in_use": seats.in_use, "free": max(0, seats.free),
                       "waiting": len(seats.waiters), "leases": len(seats.leases),
                       "granted": seats.granted, "waited": seats.waited, "timeouts": seats.timeouts,
                       "unknown": seats.unknown_until > now, "last_refusal": seats.last_refusal}
                for name, seats in sorted(self.classes.items())}
