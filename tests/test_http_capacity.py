"""Per-server request caps and the FIFO queue of [BALANCE_WEB_SERVICES] (http/capacity.py), in memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.http.capacity import (
    ALL_FULL,
    NO_SERVER,
    QueueFull,
    QueueTimeout,
    RequestSlots,
)
from protheus_broker.http.capacity_settings import parse_capped_server
from protheus_broker.ini import ConfigError, Located, Section


@dataclass(frozen=True)
class FakeBackend:
    """All RequestSlots needs of a pool Backend."""

    server_id: str


A, B, C = FakeBackend("A"), FakeBackend("B"), FakeBackend("C")


class Pool:
    """The servers that are up, best first: what ServerPool.candidates would give."""

    def __init__(self, *backends: FakeBackend) -> None:
        self.up = list(backends)

    def candidates(self) -> list[FakeBackend]:
        return list(self.up)


class Outcome:
    """What became of one acquire: granted a backend, failed, or still waiting."""

    def __init__(self, deferred: Deferred[Any],
                 candidates: Callable[[], list[FakeBackend]] | None = None) -> None:
        self.deferred = deferred
        self.candidates = candidates
        self.backend: FakeBackend | None = None
        self.failure: Failure | None = None
        self.fired = 0
        deferred.addCallbacks(self._granted, self._failed)

    def _granted(self, backend: FakeBackend) -> None:
        self.fired += 1
        self.backend = backend

    def _failed(self, failure: Failure) -> None:
        self.fired += 1
        self.failure = failure

    @property
    def waiting(self) -> bool:
        return self.fired == 0


def slots_with(caps: dict[str, int], clock: Clock | None = None, **kwargs: Any) -> RequestSlots:
    slots = RequestSlots(clock or Clock(), **kwargs)
    for server_id, cap in caps.items():
        slots.set_cap(server_id, cap)
    return slots


class MustShowTests(SynchronousTestCase):
    def test_n_plus_k_requests_n_granted_k_queued_over_timeout_fail(self) -> None:
        """N+k concurrent requests with caps summing to N: N in flight, k wait, the over-timeout ones fail."""
        clock = Clock()
        pool = Pool(A, B, C)
        slots = slots_with({"A": 2, "B": 3, "C": 1}, clock, queue_timeout=15.0)
        outcomes = [Outcome(slots.acquire(pool.candidates)) for _ in range(6 + 4)]
        granted = [o for o in outcomes if o.backend is not None]
        self.assertEqual(len(granted), 6)
        self.assertEqual([slots.in_flight(s) for s in "ABC"], [2, 3, 1])
        self.assertEqual(slots.queued(), 4)
        # two requests end at t=5: the two oldest waiters get their slots, in order
        clock.advance(5)
        slots.release("B")
        slots.release("A")
        self.assertEqual([o.backend for o in outcomes[6:]], [B, A, None, None])
        self.assertEqual(slots.queued(), 2)
        # the other two fail at exactly 15 s, not a moment before
        clock.advance(10 - 0.001)
        self.assertTrue(outcomes[8].waiting and outcomes[9].waiting)
        clock.advance(0.001)
        for outcome in outcomes[8:]:
            assert outcome.failure is not None
            error = outcome.failure.value
            assert isinstance(error, QueueTimeout)
            self.assertEqual(error.reason, ALL_FULL)
            self.assertEqual(error.waited, 15.0)
        self.assertEqual(slots.queued(), 0)
        self.assertEqual([slots.in_flight(s) for s in "ABC"], [2, 3, 1])
        self.assertEqual(slots.stats()["queue_timeouts"], 2)
        self.assertEqual(clock.getDelayedCalls(), [])


class ImmediateTests(SynchronousTestCase):
    def test_first_candidate_with_room_is_chosen(self) -> None:
        """A full server leaves the rotation: the next candidate with room gets the request."""
        slots = slots_with({"A": 1, "B": 1})
        pool = Pool(A, B)
        self.assertEqual(Outcome(slots.acquire(pool.candidates)).backend, A)
        self.assertEqual(Outcome(slots.acquire(pool.candidates)).backend, B)
        self.assertTrue(Outcome(slots.acquire(pool.candidates)).waiting)
        self.assertEqual(slots.queued(), 1)

    def test_uncapped_server_never_fills(self) -> None:
        """A server without a cap (0 or never set) takes every request at once."""
        slots = slots_with({"A": 0})
        outcomes = [Outcome(slots.acquire(Pool(A, B).candidates)) for _ in range(500)]
        self.assertTrue(all(o.backend is A for o in outcomes))
        self.assertEqual(slots.in_flight("A"), 500)
        self.assertEqual(slots.queued(), 0)

    def test_capped_then_uncapped(self) -> None:
        """Once the capped first choice is full, the uncapped one behind it takes the rest."""
        slots = slots_with({"A": 2})
        backends = [Outcome(slots.acquire(Pool(A, B).candidates)).backend for _ in range(5)]
        self.assertEqual(backends, [A, A, B, B, B])

    def test_broken_candidates_fail_only_that_request(self) -> None:
        """candidates() raising fails that one request's Deferred; nothing is booked."""
        slots = slots_with({"A": 1})

        def broken() -> list[FakeBackend]:
            raise RuntimeError("pool gone")

        outcome = Outcome(slots.acquire(broken))
        assert outcome.failure is not None
        self.assertIsInstance(outcome.failure.value, RuntimeError)
        self.assertEqual((slots.in_flight("A"), slots.queued()), (0, 0))


class QueueTests(SynchronousTestCase):
    def test_release_serves_head_in_fifo_order(self) -> None:
        """Each freed slot goes to the oldest waiter."""
        slots = slots_with({"A": 1})
        pool = Pool(A)
        first = Outcome(slots.acquire(pool.candidates))
        waiters = [Outcome(slots.acquire(pool.candidates)) for _ in range(5)]
        self.assertEqual(first.backend, A)
        order = []
        for _ in range(5):
            slots.release("A")
            order.append(next(i for i, w in enumerate(waiters) if w.backend is not None and i not in order))
            self.assertEqual(slots.in_flight("A"), 1)
        self.assertEqual(order, [0, 1, 2, 3, 4])
        self.assertEqual(slots.stats()["served_from_queue"], 5)

    def test_queue_full_refuses_at_once(self) -> None:
        """Past the queue length a request fails with QueueFull at once; the queue is untouched."""
        slots = slots_with({"A": 1}, queue_length=2)
        pool = Pool(A)
        outcomes = [Outcome(slots.acquire(pool.candidates)) for _ in range(4)]
        self.assertEqual([o.waiting for o in outcomes], [False, True, True, False])
        assert outcomes[3].failure is not None
        self.assertIsInstance(outcomes[3].failure.value, QueueFull)
        self.assertIn(ALL_FULL, str(outcomes[3].failure.value))
        self.assertEqual(slots.queued(), 2)
        self.assertEqual(slots.stats()["queue_full"], 1)

    def test_queue_length_zero_means_no_waiting(self) -> None:
        """queue_length 0: a request finding every server full fails at once."""
        slots = slots_with({"A": 1}, queue_length=0)
        Outcome(slots.acquire(Pool(A).candidates))
        refused = Outcome(slots.acquire(Pool(A).candidates))
        assert refused.failure is not None
        self.assertIsInstance(refused.failure.value, QueueFull)

    def test_new_request_takes_slot_no_waiter_can_use(self) -> None:
        """A new request whose candidates have room no waiter can use goes at once; the waiter stays."""
        slots = slots_with({"A": 1, "B": 1})
        Outcome(slots.acquire(Pool(A).candidates))
        waiting = Outcome(slots.acquire(Pool(A).candidates))
        late = Outcome(slots.acquire(Pool(B).candidates))
        self.assertEqual(late.backend, B)
        self.assertTrue(waiting.waiting)
        self.assertEqual(slots.queued(), 1)

    def test_new_request_does_not_overtake_waiters(self) -> None:
        """Room appearing before the pool's poke goes to the waiters first, then to a new request."""
        slots = slots_with({"A": 1, "B": 1})
        pool = Pool(A)
        Outcome(slots.acquire(pool.candidates))
        waiting = Outcome(slots.acquire(pool.candidates))
        pool.up.append(B)  # B came up; the pool has not poked yet
        late = Outcome(slots.acquire(pool.candidates))
        self.assertEqual(waiting.backend, B)
        self.assertTrue(late.waiting)
        self.assertEqual(slots.queued(), 1)

    def test_acquire_from_a_grant_callback_queues_in_turn(self) -> None:
        """A request made while a grant's callback runs queues behind the waiters being served."""
        slots = slots_with({"A": 1, "B": 0})
        pool = Pool(A)
        Outcome(slots.acquire(pool.candidates))
        order: list[str] = []
        first = slots.acquire(pool.candidates)
        second = slots.acquire(pool.candidates)
        second.addCallback(lambda backend: order.append("second"))
        first.addCallback(lambda backend: slots.acquire(pool.candidates).addCallback(
            lambda backend: order.append("nested")))
        pool.up.append(B)
        slots.poke()
        self.assertEqual(order, ["second", "nested"])
        self.assertEqual((slots.in_flight("B"), slots.queued()), (3, 0))

    def test_head_served_first_when_candidates_differ(self) -> None:
        """A slot freed on a server both could use goes to the head, not to a later waiter."""
        slots = slots_with({"A": 1, "B": 1})
        Outcome(slots.acquire(Pool(A).candidates))
        Outcome(slots.acquire(Pool(B).candidates))
        head = Outcome(slots.acquire(Pool(A, B).candidates))
        later = Outcome(slots.acquire(Pool(B).candidates))
        slots.release("B")
        self.assertEqual(head.backend, B)
        self.assertTrue(later.waiting)
        slots.release("A")
        self.assertTrue(later.waiting)  # A is of no use to it
        slots.release("B")
        self.assertEqual(later.backend, B)

    def test_later_waiter_takes_slot_head_cannot_use(self) -> None:
        """A slot freed on a server the head cannot use goes to the oldest waiter that can."""
        slots = slots_with({"A": 1, "B": 1})
        Outcome(slots.acquire(Pool(A).candidates))
        Outcome(slots.acquire(Pool(B).candidates))
        head = Outcome(slots.acquire(Pool(A).candidates))
        later = Outcome(slots.acquire(Pool(B).candidates))
        slots.release("B")
        self.assertTrue(head.waiting)
        self.assertEqual(later.backend, B)

    def test_timeout_counts_from_each_request(self) -> None:
        """Each waiter fails queue_timeout after its own arrival."""
        clock = Clock()
        slots = slots_with({"A": 1}, clock, queue_timeout=10.0)
        Outcome(slots.acquire(Pool(A).candidates))
        first = Outcome(slots.acquire(Pool(A).candidates))
        clock.advance(4)
        second = Outcome(slots.acquire(Pool(A).candidates))
        clock.advance(6)
        self.assertFalse(first.waiting)
        self.assertTrue(second.waiting)
        self.assertEqual(slots.stats()["oldest_wait"], 6.0)
        clock.advance(4)
        self.assertFalse(second.waiting)
        assert second.failure is not None
        self.assertIsInstance(second.failure.value, QueueTimeout)

    def test_served_waiter_timer_is_stopped(self) -> None:
        """A waiter served from the queue never times out later."""
        clock = Clock()
        slots = slots_with({"A": 1}, clock, queue_timeout=10.0)
        Outcome(slots.acquire(Pool(A).candidates))
        waiter = Outcome(slots.acquire(Pool(A).candidates))
        clock.advance(3)
        slots.release("A")
        self.assertEqual(waiter.backend, A)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(20)
        self.assertEqual(waiter.fired, 1)
        self.assertEqual(slots.stats()["longest_wait"], 3.0)

    def test_reconfigured_queue_applies_to_new_requests(self) -> None:
        """configure() changes the bounds for requests queued from then on."""
        clock = Clock()
        slots = slots_with({"A": 1}, clock, queue_timeout=10.0)
        Outcome(slots.acquire(Pool(A).candidates))
        old = Outcome(slots.acquire(Pool(A).candidates))
        slots.configure(queue_length=1, queue_timeout=2.0)
        refused = Outcome(slots.acquire(Pool(A).candidates))
        self.assertFalse(refused.waiting)
        clock.advance(9.9)
        self.assertTrue(old.waiting)


class CancelTests(SynchronousTestCase):
    def test_cancel_leaves_queue_without_slot(self) -> None:
        """Cancelling a queued request removes it and books no slot; the next waiter moves up."""
        clock = Clock()
        slots = slots_with({"A": 1}, clock)
        Outcome(slots.acquire(Pool(A).candidates))
        gone = Outcome(slots.acquire(Pool(A).candidates))
        next_one = Outcome(slots.acquire(Pool(A).candidates))
        gone.deferred.cancel()
        assert gone.failure is not None
        self.assertIsInstance(gone.failure.value, CancelledError)
        self.assertEqual(slots.queued(), 1)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        slots.release("A")
        self.assertEqual(next_one.backend, A)
        self.assertEqual(gone.fired, 1)
        self.assertEqual(slots.in_flight("A"), 1)
        self.assertEqual(slots.stats()["cancelled"], 1)

    def test_cancel_after_grant_keeps_slot_until_release(self) -> None:
        """Cancelling an already granted request changes nothing: the holder still releases it."""
        slots = slots_with({"A": 1})
        granted = Outcome(slots.acquire(Pool(A).candidates))
        granted.deferred.cancel()
        self.assertEqual(slots.in_flight("A"), 1)
        slots.release("A")
        self.assertEqual(slots.in_flight("A"), 0)

    def test_cancel_from_a_grant_callback(self) -> None:
        """A waiter cancelled by another's grant callback is skipped, never served twice."""
        slots = slots_with({"A": 2})
        Outcome(slots.acquire(Pool(A).candidates))
        Outcome(slots.acquire(Pool(A).candidates))
        first = slots.acquire(Pool(A).candidates)
        second = Outcome(slots.acquire(Pool(A).candidates))
        third = Outcome(slots.acquire(Pool(A).candidates))
        first.addCallback(lambda backend: second.deferred.cancel())
        slots.set_cap("A", 4)  # room for two: first and (second being gone) third
        self.assertIsInstance(second.failure.value if second.failure else None, CancelledError)
        self.assertEqual(third.backend, A)
        self.assertEqual(slots.in_flight("A"), 4)

    def test_release_from_a_grant_callback(self) -> None:
        """A grant whose holder releases at once (connect refused) passes the slot on in order."""
        slots = slots_with({"A": 1})
        Outcome(slots.acquire(Pool(A).candidates))
        bounce = slots.acquire(Pool(A).candidates)
        bounce.addCallback(lambda backend: slots.release(backend.server_id))
        after = Outcome(slots.acquire(Pool(A).candidates))
        slots.release("A")
        self.assertEqual(after.backend, A)
        self.assertEqual(slots.in_flight("A"), 1)
        self.assertEqual(slots.queued(), 0)

    def test_release_of_another_server_from_a_grant_callback(self) -> None:
        """A slot freed on another server while a grant's callback runs goes to the next waiter too."""
        slots = slots_with({"A": 1, "B": 1})
        pool = Pool(A, B)
        Outcome(slots.acquire(pool.candidates))
        Outcome(slots.acquire(pool.candidates))
        first = slots.acquire(pool.candidates)
        first.addCallback(lambda backend: slots.release("B"))  # e.g. B's request ended meanwhile
        second = Outcome(slots.acquire(pool.candidates))
        slots.release("A")
        self.assertEqual(second.backend, B)
        self.assertEqual((slots.in_flight("A"), slots.in_flight("B"), slots.queued()), (1, 1, 0))

    def test_release_of_idle_server_is_ignored(self) -> None:
        """A stray release never drives a count below zero nor frees a phantom slot."""
        slots = slots_with({"A": 1})
        slots.release("A")
        Outcome(slots.acquire(Pool(A).candidates))
        waiter = Outcome(slots.acquire(Pool(A).candidates))
        slots.release("B")
        self.assertTrue(waiter.waiting)
        self.assertEqual(slots.in_flight("A"), 1)


class PoolChangeTests(SynchronousTestCase):
    def test_poke_after_server_comes_up(self) -> None:
        """Waiters go to a server that joins or comes up as soon as the pool pokes."""
        slots = slots_with({"A": 1, "B": 2})
        pool = Pool(A)
        Outcome(slots.acquire(pool.candidates))
        waiters = [Outcome(slots.acquire(pool.candidates)) for _ in range(3)]
        pool.up.append(B)
        self.assertTrue(all(w.waiting for w in waiters))  # nobody told us yet
        slots.poke()
        self.assertEqual([w.backend for w in waiters], [B, B, None])
        self.assertEqual(slots.queued(), 1)

    def test_no_server_up_waits_for_one(self) -> None:
        """With no server up a request waits; a poke after one comes up serves it, else it times out."""
        clock = Clock()
        slots = slots_with({}, clock, queue_timeout=5.0)
        pool = Pool()
        served = Outcome(slots.acquire(pool.candidates))
        clock.advance(1)
        pool.up.append(A)
        slots.poke()
        self.assertEqual(served.backend, A)
        pool.up.clear()
        timed_out = Outcome(slots.acquire(pool.candidates))
        clock.advance(5)
        assert timed_out.failure is not None
        error = timed_out.failure.value
        assert isinstance(error, QueueTimeout)
        self.assertEqual(error.reason, NO_SERVER)

    def test_server_down_while_waiting(self) -> None:
        """A server going down while requests wait: its releases do not serve them, a poke sends them on."""
        slots = slots_with({"A": 1, "B": 1, "C": 1})
        pool = Pool(A, B)
        Outcome(slots.acquire(pool.candidates))
        Outcome(slots.acquire(pool.candidates))
        waiter = Outcome(slots.acquire(pool.candidates))
        pool.up.remove(A)  # A goes down; its request still finishes
        slots.release("A")
        self.assertTrue(waiter.waiting)
        self.assertEqual(slots.in_flight("A"), 0)
        pool.up.append(C)
        slots.poke()
        self.assertEqual(waiter.backend, C)

    def test_release_serves_until_the_freed_slot_is_taken(self) -> None:
        """A head that goes elsewhere (a server came up, no poke yet) leaves the freed slot to the next."""
        slots = slots_with({"A": 1, "B": 1})
        pool = Pool(A)
        Outcome(slots.acquire(pool.candidates))
        head = Outcome(slots.acquire(pool.candidates))
        second = Outcome(slots.acquire(pool.candidates))
        pool.up.insert(0, B)
        slots.release("A")
        self.assertEqual([head.backend, second.backend], [B, A])

    def test_release_nobody_can_use_asks_a_shared_callable_once(self) -> None:
        """Waiters sharing one candidates callable cost one call when a freed slot is of no use to them."""
        slots = slots_with({"A": 1, "B": 1})
        pool = Pool(A, B)
        calls = []

        def candidates() -> list[FakeBackend]:
            calls.append(1)
            return pool.candidates()

        Outcome(slots.acquire(candidates))
        Outcome(slots.acquire(candidates))
        waiters = [Outcome(slots.acquire(candidates)) for _ in range(100)]
        pool.up.remove(A)
        del calls[:]
        slots.release("A")
        self.assertEqual(len(calls), 1)
        self.assertTrue(all(w.waiting for w in waiters))

    def test_lowered_cap_applies_to_new_requests(self) -> None:
        """A cap lowered on reload lets in-flight requests finish and admits new ones below it only."""
        slots = slots_with({"A": 3})
        pool = Pool(A)
        for _ in range(3):
            Outcome(slots.acquire(pool.candidates))
        slots.set_cap("A", 1)
        self.assertEqual(slots.in_flight("A"), 3)
        waiter = Outcome(slots.acquire(pool.candidates))
        slots.release("A")
        slots.release("A")
        self.assertTrue(waiter.waiting)  # 1 in flight = the new cap
        slots.release("A")
        self.assertEqual(waiter.backend, A)
        self.assertEqual(slots.in_flight("A"), 1)

    def test_raised_or_removed_cap_serves_the_queue(self) -> None:
        """A higher cap, or none, serves waiters at once."""
        slots = slots_with({"A": 1})
        Outcome(slots.acquire(Pool(A).candidates))
        waiters = [Outcome(slots.acquire(Pool(A).candidates)) for _ in range(4)]
        slots.set_cap("A", 2)
        self.assertEqual([w.backend for w in waiters], [A, None, None, None])
        slots.set_cap("A", 0)
        self.assertEqual([w.backend for w in waiters], [A, A, A, A])
        self.assertEqual(slots.in_flight("A"), 5)
        self.assertEqual(slots.cap("A"), 0)

    def test_negative_cap_is_refused(self) -> None:
        """set_cap refuses a negative cap."""
        self.assertRaises(ValueError, RequestSlots(Clock()).set_cap, "A", -1)

    def test_stats_for_the_screen(self) -> None:
        """stats() gives in-flight and caps per server, queue length and the counters."""
        clock = Clock()
        slots = slots_with({"A": 1}, clock, queue_length=1)
        Outcome(slots.acquire(Pool(A).candidates))
        Outcome(slots.acquire(Pool(A).candidates))
        Outcome(slots.acquire(Pool(A).candidates))
        clock.advance(2)
        stats = slots.stats()
        self.assertEqual(stats["in_flight"], {"A": 1})
        self.assertEqual(stats["caps"], {"A": 1})
        self.assertEqual((stats["queued"], stats["oldest_wait"], stats["queue_full"]), (1, 2.0, 1))


class CappedServerSettingTests(SynchronousTestCase):
    def section(self, value: str) -> Section:
        where = Located(lines={("BALANCE_WEB_SERVICES", "REMOTE_SERVER_01"): 7})
        return Section("/etc/broker.ini", "BALANCE_WEB_SERVICES", {"REMOTE_SERVER_01": value}, where)

    def test_two_fields_no_cap(self) -> None:
        """'host port' is a server without a cap."""
        self.assertEqual(parse_capped_server(self.section("127.0.0.1 8080"), "REMOTE_SERVER_01", "01"),
                         (RemoteServer("01", "127.0.0.1", 8080), 0))

    def test_third_field_is_the_cap(self) -> None:
        """'host port max' caps the server's in-flight requests."""
        self.assertEqual(parse_capped_server(self.section("[::1] 8080 25"), "REMOTE_SERVER_01", "01"),
                         (RemoteServer("01", "::1", 8080), 25))

    def test_bad_values_are_one_line_naming_file_line_and_key(self) -> None:
        """Each bad value is one ConfigError line naming file, line and key."""
        for value, words in [("127.0.0.1 8080 ten", "whole number, got 'ten'"),
                             ("127.0.0.1 8080 -1", "out of range"),
                             ("127.0.0.1 8080 1.5", "whole number"),
                             ("127.0.0.1 http 5", "port must be a number"),
                             ("127.0.0.1 70000 5", "out of range"),
                             ("bad_host! 8080 5", "not a host name"),
                             ("127.0.0.1 8080 5 6", "expected 'host port [max]'"),
                             ("127.0.0.1", "missing port")]:
            with self.assertRaises(ConfigError) as caught:
                parse_capped_server(self.section(value), "REMOTE_SERVER_01", "01")
            text = str(caught.exception)
            self.assertTrue(text.startswith("/etc/broker.ini:7: REMOTE_SERVER_01: "), text)
            self.assertIn(words, text)
            self.assertNotIn("\n", text)


#: One step of the property test: (operation, argument).
Step = tuple[str, int]

steps = st.lists(st.tuples(st.sampled_from(["acquire", "release", "cancel", "advance", "cap", "toggle",
                                             "poke"]),
                           st.integers(0, 50)), max_size=80)


class InvariantTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(steps, st.lists(st.integers(0, 3), min_size=3, max_size=3), st.integers(0, 6))
    def test_caps_hold_and_no_slot_is_lost(self, ops: list[Step], caps: list[int], queue_length: int) -> None:
        """Any interleaving of acquire/release/cancel/advance/cap/pool changes keeps in_flight <= cap at
        every grant, never loses nor double-grants a slot, and leaves nobody waiting who could go."""
        clock = Clock()
        servers = [FakeBackend(s) for s in "ABC"]
        slots = slots_with(dict(zip("ABC", caps)), clock, queue_length=queue_length, queue_timeout=10.0)
        current_caps = dict(zip("ABC", caps))
        up = {s: True for s in "ABC"}
        held: list[str] = []  # one entry per granted, not yet released slot
        pending: list[Outcome] = []
        grants = releases = 0

        def candidates_for(order: int) -> Callable[[], list[FakeBackend]]:
            chosen = [servers[(order + i) % 3] for i in range(1 + order % 3)]
            return lambda: [b for b in chosen if up[b.server_id]]

        def on_grant(backend: FakeBackend) -> FakeBackend:
            nonlocal grants
            grants += 1
            cap = current_caps[backend.server_id]
            # the slot is booked before the callback: the count includes it and stays within the cap
            self.assertTrue(cap == 0 or slots.in_flight(backend.server_id) <= cap)
            held.append(backend.server_id)
            return backend

        for op, arg in ops:
            if op == "acquire":
                candidates = candidates_for(arg)
                deferred = slots.acquire(candidates)
                deferred.addCallback(on_grant)
                outcome = Outcome(deferred, candidates)
                if outcome.waiting:
                    pending.append(outcome)
                elif outcome.failure is not None:
                    self.assertIsInstance(outcome.failure.value, QueueFull)
                    self.assertEqual(slots.queued(), queue_length)
            elif op == "release" and held:
                slots.release(held.pop(arg % len(held)))
                releases += 1
            elif op == "cancel" and pending:
                pending[arg % len(pending)].deferred.cancel()
            elif op == "advance":
                clock.advance(arg / 5)
            elif op == "cap":
                server_id = "ABC"[arg % 3]
                current_caps[server_id] = arg % 4
                slots.set_cap(server_id, arg % 4)
            elif op == "toggle":
                server_id = "ABC"[arg % 3]
                up[server_id] = not up[server_id]
                slots.poke()
            elif op == "poke":
                slots.poke()
            for outcome in pending:
                self.assertLessEqual(outcome.fired, 1)
                if outcome.failure is not None:
                    self.assertIsInstance(outcome.failure.value, (QueueTimeout, CancelledError))
            pending = [o for o in pending if o.waiting]
            # nothing lost, nothing granted twice
            self.assertEqual(grants - releases, len(held))
            self.assertEqual(sum(slots.in_flight(s) for s in "ABC"), len(held))
            for server_id in "ABC":
                self.assertEqual(slots.in_flight(server_id), held.count(server_id))
            self.assertEqual(slots.queued(), len(pending))
            self.assertEqual(len(clock.getDelayedCalls()), len(pending))
            self.assertEqual(sum(slots._callables.values()), len(pending))  # its skip-ahead bookkeeping
            self.assertLessEqual(slots.queued(), max(queue_length, 0))
            if op in ("poke", "toggle", "cap"):
                # after the pool changed nobody waits who could go now
                for outcome in pending:
                    assert outcome.candidates is not None
                    self.assertFalse(any(slots.has_room(b.server_id) for b in outcome.candidates()))
