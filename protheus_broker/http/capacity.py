"""Per-server caps on in-flight requests and the broker's FIFO queue, for ``[BALANCE_WEB_SERVICES]``.

``REMOTE_SERVER_xx = host port [max]``: the optional third field caps the requests a server works on at
once.  A full server leaves the rotation; when every candidate is full a request waits in one bounded FIFO
queue until a slot frees (:meth:`RequestSlots.release`) or the pool changes (:meth:`RequestSlots.poke`),
and fails after ``queue_timeout`` seconds.  Pure logic: no transport, the clock is passed in.

A request served from the queue takes its slot in the same step that removes it from the queue (no other
request can see that slot free in between), and the head of the queue is offered a slot before any later
request.  Every granted slot must be released exactly once, also when the client left meanwhile.
Pass the same ``candidates`` callable for every request of a unit (e.g. a bound method calling
``ServerPool.candidates``): a slot no waiter can use then costs one call, not one per waiter.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Protocol, Sequence, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


class HasServerId(Protocol):
    """What :class:`RequestSlots` needs of a candidate: the pool's ``Backend`` has it."""

    @property
    def server_id(self) -> str: ...


B = TypeVar("B", bound=HasServerId)

#: Why a request could not be placed, for the 503 body.
ALL_FULL = "every server is at its request cap"
NO_SERVER = "no server is up"


class QueueFull(Exception):
    """The queue is at its bounded length: answer 503 at once."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class QueueTimeout(Exception):
    """The request waited ``queue_timeout`` seconds: answer 503 with Retry-After."""

    def __init__(self, reason: str, waited: float) -> None:
        self.reason = reason
        self.waited = waited
        super().__init__(f"{reason} (waited {waited:g}s in the queue)")


class _Waiter:
    """One queued request."""

    __slots__ = ("seq", "deferred", "candidates", "since", "timer", "last_reason")

    def __init__(self, seq: int, deferred: Deferred[Any], candidates: Callable[[], Sequence[Any]],
                 since: float, last_reason: str) -> None:
        self.seq = seq
        self.deferred = deferred
        self.candidates = candidates
        self.since = since
        self.timer: IDelayedCall | None = None
        self.last_reason = last_reason


class RequestSlots:
    """In-flight requests per server against each server's cap (REMOTE_SERVER_xx = host port [max];
    0 or absent = no cap), and a FIFO queue of requests waiting for a free server."""

    def __init__(self, clock: IReactorTime, queue_length: int = 1000, queue_timeout: float = 15.0) -> None:
        self.clock = clock
        self.queue_length = queue_length
        self.queue_timeout = queue_timeout
        self._caps: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._queue: OrderedDict[int, _Waiter] = OrderedDict()
        self._callables: dict[int, int] = {}  # id(candidates) -> waiters using it
        self._seq = 0
        self._serving = False  # a pass over the queue is running (a callback may call back into us)
        self._again = False  # ... and something changed under it: run one more pass
        # counters for the broker screen and /metrics
        self.granted = 0  # slots handed out (at once or from the queue)
        self.released = 0
        self.queued_total = 0  # requests that had to wait
        self.served_from_queue = 0
        self.queue_full = 0
        self.queue_timeouts = 0
        self.cancelled = 0  # clients gone while waiting
        self.longest_wait = 0.0  # the longest wait of a request served from the queue

    # --- settings ------------------------------------------------------------------------

    def set_cap(self, server_id: str, cap: int) -> None:
        """*server_id* takes at most *cap* requests at once (0 = unlimited).  A lower cap applies to new
        requests (those in flight finish); a higher one serves the queue at once."""
        if cap < 0:
            raise ValueError(f"cap must be 0 (unlimited) or more, got {cap}")
        old = self._caps.get(server_id, 0)
        if cap:
            self._caps[server_id] = cap
        else:
            self._caps.pop(server_id, None)
        if self._queue and cap != old and (cap == 0 or (old != 0 and cap > old)):
            self._serve(until_taken=None)

    def forget(self, server_id: str) -> None:
        """*server_id* left the configuration: drop its cap (requests still on it are counted until
        they are released)."""
        self._caps.pop(server_id, None)

    def cap(self, server_id: str) -> int:
        """The cap of *server_id* (0 = unlimited)."""
        return self._caps.get(server_id, 0)

    def configure(self, queue_length: int, queue_timeout: float) -> None:
        """New queue bounds from a reload: they apply to requests queued from now on."""
        self.queue_length = queue_length
        self.queue_timeout = queue_timeout

    # --- reading -------------------------------------------------------------------------

    def in_flight(self, server_id: str) -> int:
        return self._in_flight.get(server_id, 0)

    def queued(self) -> int:
        return len(self._queue)

    def has_room(self, server_id: str) -> bool:
        """True if *server_id* is below its cap (or has none)."""
        cap = self._caps.get(server_id, 0)
        return cap == 0 or self._in_flight.get(server_id, 0) < cap

    def oldest_wait(self) -> float:
        """How long the head of the queue has waited so far (0 with an empty queue)."""
        if not self._queue:
            return 0.0
        head = next(iter(self._queue.values()))
        return max(0.0, self.clock.seconds() - head.since)

    def stats(self) -> dict[str, object]:
        """A plain dict for the broker screen, /metrics and tests."""
        servers = sorted(set(self._caps) | {s for s, n in self._in_flight.items() if n})
        return {
            "in_flight": {s: self.in_flight(s) for s in servers},
            "caps": {s: self.cap(s) for s in servers},
            "queued": self.queued(),
            "queue_length": self.queue_length,
            "queue_timeout": self.queue_timeout,
            "oldest_wait": round(self.oldest_wait(), 3),
            "longest_wait": round(self.longest_wait, 3),
            "granted": self.granted,
            "released": self.released,
            "queued_total": self.queued_total,
            "served_from_queue": self.served_from_queue,
            "queue_full": self.queue_full,
            "queue_timeouts": self.queue_timeouts,
            "cancelled": self.cancelled,
        }

    # --- requests ------------------------------------------------------------------------

    def acquire(self, candidates: Callable[[], Sequence[B]]) -> Deferred[B]:
        """A slot on the first of ``candidates()`` below its cap, at once if one has room; else a place
        at the tail of the queue.  Fails with :class:`QueueFull` or :class:`QueueTimeout`; cancelling the
        Deferred (client gone) leaves the queue.

        Waiters come first: after every release, poke and raised cap the queue is served, so a slot
        free when a request arrives is one no waiter can use.  If waiters could use it after all (the
        pool changed and :meth:`poke` is still to come) they are served before this request."""
        try:
            backend, reason = self._choose(candidates)
            if backend is not None and self._queue:
                if self._serving:  # called from a grant's callback: the running pass serves it in turn
                    return self._enqueue(candidates, reason or ALL_FULL)
                self._serve(until_taken=None)
                backend, reason = self._choose(candidates)
        except Exception as error:  # a broken candidates(): this request fails, nothing else
            return _failed(error)
        if backend is not None:
            self._take(backend.server_id)
            done: Deferred[B] = Deferred()
            done.callback(backend)
            return done
        if len(self._queue) >= self.queue_length:
            self.queue_full += 1
            log.debug("request refused: queue full ({queued} waiting)", queued=len(self._queue))
            return _failed(QueueFull(f"{reason} and the queue is full ({len(self._queue)} waiting)"))
        return self._enqueue(candidates, reason)

    def release(self, server_id: str) -> None:
        """A request on *server_id* ended: its slot frees and goes to the queue's head."""
        count = self._in_flight.get(server_id, 0)
        if count <= 0:
            log.warn("release on {server} with no request in flight: ignored", server=server_id)
            return
        if count == 1:
            del self._in_flight[server_id]
        else:
            self._in_flight[server_id] = count - 1
        self.released += 1
        if self._queue:
            self._serve(until_taken=server_id)

    def poke(self) -> None:
        """The pool changed (a server joined, came up or left): serve every waiter that can go now."""
        if self._queue:
            self._serve(until_taken=None)

    # --- internals -----------------------------------------------------------------------

    def _choose(self, candidates: Callable[[], Sequence[B]]) -> tuple[B | None, str]:
        """The first candidate with room, or None and why not."""
        servers = candidates()
        for backend in servers:
            if self.has_room(backend.server_id):
                return backend, ""
        return None, ALL_FULL if servers else NO_SERVER

    def _take(self, server_id: str) -> None:
        self._in_flight[server_id] = self._in_flight.get(server_id, 0) + 1
        self.granted += 1

    def _enqueue(self, candidates: Callable[[], Sequence[Any]], reason: str) -> Deferred[Any]:
        self._seq += 1
        seq = self._seq

        def cancel(_: Deferred[Any]) -> None:
            if self._drop(seq) is not None:
                self.cancelled += 1

        deferred: Deferred[Any] = Deferred(cancel)
        waiter = _Waiter(seq, deferred, candidates, self.clock.seconds(), reason)
        waiter.timer = self.clock.callLater(self.queue_timeout, self._expire, seq)
        self._queue[seq] = waiter
        key = id(candidates)
        self._callables[key] = self._callables.get(key, 0) + 1
        self.queued_total += 1
        return deferred

    def _drop(self, seq: int) -> _Waiter | None:
        """Take a waiter out of the queue and stop its timer (None if it already left)."""
        waiter = self._queue.pop(seq, None)
        if waiter is not None:
            self._left(waiter)
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
        return waiter

    def _left(self, waiter: _Waiter) -> None:
        key = id(waiter.candidates)
        count = self._callables[key]
        if count == 1:
            del self._callables[key]
        else:
            self._callables[key] = count - 1

    def _expire(self, seq: int) -> None:
        waiter = self._queue.pop(seq, None)
        if waiter is None:
            return
        self._left(waiter)
        waiter.timer = None
        self.queue_timeouts += 1
        waited = self.clock.seconds() - waiter.since
        log.debug("request timed out after {waited}s in the queue", waited=waited)
        waiter.deferred.errback(QueueTimeout(waiter.last_reason, waited))

    def _serve(self, until_taken: str | None) -> None:
        """Serve the queue in FIFO order.  With *until_taken* (one slot freed on that server) stop once
        that server's slot is taken again; else serve every waiter that can go.  Re-entrant calls (a
        callback releasing or acquiring) make the running pass go round once more."""
        if self._serving:
            self._again = True
            return
        self._serving = True
        try:
            while True:
                self._again = False
                self._serve_pass(until_taken)
                if not (self._again and self._queue):
                    break
                until_taken = None  # things changed under us: look at every waiter
        finally:
            self._serving = False

    def _serve_pass(self, until_taken: str | None) -> None:
        # The fast path: the head takes the slot (all requests of a unit share the pool's candidates,
        # so when the head cannot go, usually nobody can).
        while self._queue:
            head = self._queue[next(iter(self._queue))]
            if self._try(head) is None:
                if head.seq in self._queue:
                    break  # it still waits
                continue  # its candidates() failed: it left with that error
            if until_taken is not None and not self.has_room(until_taken):
                return
        else:
            return
        # The head cannot go: a later request whose candidates differ may (oldest first).  A candidates
        # callable that found no room is not asked again in this pass (only grants happened since, and
        # a release under us runs another pass): one shared callable per unit makes this O(1).
        stuck: set[int] = {id(head.candidates)}
        if len(self._callables) == 1:
            return  # every waiter shares the head's callable
        for waiter in list(self._queue.values())[1:]:
            if waiter.seq not in self._queue or id(waiter.candidates) in stuck:
                continue  # left during this pass (a callback cancelled it), or known to find no room
            if self._try(waiter) is None:
                stuck.add(id(waiter.candidates))
            elif until_taken is not None and not self.has_room(until_taken):
                return

    def _try(self, waiter: _Waiter) -> str | None:
        """Serve *waiter* if one of its candidates has room: take the slot, then fire (so the slot is
        booked before any callback runs).  Returns the server, or None if it still waits."""
        try:
            backend, reason = self._choose(waiter.candidates)
        except Exception as error:
            self._drop(waiter.seq)
            waiter.deferred.errback(error)
            return None
        if backend is None:
            waiter.last_reason = reason
            return None
        self._drop(waiter.seq)
        self._take(backend.server_id)
        self.served_from_queue += 1
        self.longest_wait = max(self.longest_wait, self.clock.seconds() - waiter.since)
        waiter.deferred.callback(backend)
        return backend.server_id


def _failed(error: Exception) -> Deferred[Any]:
    done: Deferred[Any] = Deferred()
    done.errback(error)
    return done
