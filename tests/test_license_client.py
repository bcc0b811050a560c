"""The broker's license client and its local seat pool, in memory against a fake license server
(AMP over twisted.test.iosim pumps, a task.Clock)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.license.pool import ALL_IN_USE, NO_LICENSE, UNREACHABLE, NoSeat, SeatPool

from .helpers import LogCatcher
from .license_rig import Rig


def error_of(test: SynchronousTestCase, deferred: Any) -> NoSeat:
    failure = test.failureResultOf(deferred, NoSeat)
    value: NoSeat = failure.value
    return value


class HandshakeTests(SynchronousTestCase):
    """Connecting, proving the secret both ways, reconnecting."""

    def test_handshake_connects_and_fills_the_default_class(self) -> None:
        """After the handshake the client is connected and holds HIGH_WATERMARK TOTVS_I seats."""
        rig = Rig()
        self.assertTrue(rig.client.connected)
        self.assertEqual(rig.changes, [(True, "connected to 127.0.0.1:5555")])
        self.assertEqual(rig.count("authenticated"), 1)
        self.assertEqual(rig.pool.stats()["TOTVS_I"]["held"], 8)
        self.assertEqual(rig.server.leased("TOTVS_I"), 8)

    def test_wrong_secret_never_connects_and_backs_off(self) -> None:
        """A server with another secret: its proof is refused, nothing is leased, retries go on."""
        catcher = LogCatcher(self)
        rig = Rig(server_secret=b"x" * 32)
        self.assertFalse(rig.client.connected)
        self.assertEqual(rig.count("lease"), 0)
        self.assertIn("proof is wrong", rig.client.reason)
        attempts = rig.endpoint.attempts
        rig.advance(5.0)
        self.assertGreater(rig.endpoint.attempts, attempts)
        self.assertEqual(len([t for t in catcher.texts() if "proof is wrong" in t]), 1)  # repeats not logged

    def test_subscribe_and_unsubscribe(self) -> None:
        """A subscriber hears every change of connected until it unsubscribes."""
        rig = Rig()
        heard: list[bool] = []
        unsubscribe = rig.client.subscribe(lambda up, why: heard.append(up))
        since = rig.client.since
        rig.clock.advance(3)
        rig.endpoint.cut()
        self.assertEqual(heard, [False])
        self.assertFalse(rig.client.connected)
        self.assertEqual(rig.client.since, since + 3)
        self.assertIn("channel lost", rig.client.reason)
        unsubscribe()
        rig.endpoint.refuse = False
        rig.advance(2.0)
        self.assertTrue(rig.client.connected)
        self.assertEqual(heard, [False])

    def test_request_before_the_first_channel_waits(self) -> None:
        """A request arriving while the first channel opens waits for it, not 503 at once."""
        rig = Rig(start=False)
        rig.client.startService()
        self.assertTrue(rig.client.connecting)
        waiting = rig.pool.wait("TOTVS_I", 10.0, 10)
        self.assertNoResult(waiting)
        rig.flush()
        self.assertEqual(self.successResultOf(waiting), 0.0)
        self.assertFalse(rig.client.connecting)

    def test_no_server_at_start_is_unreachable_after_connect_timeout(self) -> None:
        """No license server at start: waiters get 'license server unreachable' after CONNECT_TIMEOUT."""
        rig = Rig(start=False)
        rig.endpoint.refuse = True
        rig.client.startService()
        waiting = rig.pool.wait("TOTVS_I", 60.0, 10)
        rig.advance(4.5)
        self.assertNoResult(waiting)
        rig.advance(1.0)
        self.assertEqual(error_of(self, waiting).kind, UNREACHABLE)
        self.assertEqual(error_of(self, rig.pool.wait("TOTVS_I", 60.0, 10)).kind, UNREACHABLE)

    def test_unanswered_message_reopens_the_channel(self) -> None:
        """A lease message unanswered for 10 s: the channel is dropped and opened again."""
        catcher = LogCatcher(self)
        rig = Rig()
        for _ in range(7):
            rig.pool.try_take("TOTVS_I")  # a Lease goes out, and is never delivered
        rig.clock.advance(10.5)
        rig.flush()
        self.assertFalse(rig.client.connected)
        self.assertTrue(any("did not answer Lease within 10s" in t for t in catcher.texts()))
        rig.advance(2.0)
        self.assertTrue(rig.client.connected)
        self.assertEqual(rig.pool.stats()["TOTVS_I"]["held"], rig.server.leased("TOTVS_I"))

    def test_reconnect_adopts_the_leases_held(self) -> None:
        """A broker coming back (restart, same CLIENT_NAME) adopts the server's leases for it."""
        first = Rig()
        first.endpoint.cut()  # the broker dies without returning its leases
        second = Rig(start=False)
        second.server = first.server
        second.endpoint.server = first.server
        second.endpoint.factory.server = first.server
        second.client.startService()
        second.flush()
        self.assertTrue(second.client.connected)
        self.assertEqual(second.pool.stats()["TOTVS_I"]["held"], 8)
        self.assertEqual(first.server.leased("TOTVS_I"), 8)  # adopted, no new lease
        self.assertEqual(first.count("lease"), 1)

    def test_adopted_surplus_is_returned(self) -> None:
        """Leases the server lists above the high watermark go back after the release delay."""
        rig = Rig(start=False)
        rig.server.leases["OLD"] = {"client": "broker-1", "license_class": "TOTVS_I", "seats": 20,
                                    "expires": 30.0}
        rig.client.startService()
        rig.flush()
        self.assertEqual(rig.pool.stats()["TOTVS_I"]["held"], 20)
        rig.advance(3.0)
        self.assertEqual(rig.pool.stats()["TOTVS_I"]["held"], 8)
        self.assertEqual(rig.server.leased("TOTVS_I"), 8)

    def test_many_leases_adopted(self) -> None:
        """A server holding 400 leases for us (a long run of small grants): all adopted, surplus returned."""
        rig = Rig(start=False, seats={"TOTVS_I": 1000})
        for n in range(400):
            rig.server.leases[f"OLD{n}"] = {"client": "broker-1", "license_class": "TOTVS_I", "seats": 1,
                                            "expires": 30.0}
        rig.client.startService()
        rig.flush()
        self.assertTrue(rig.client.connected)
        self.assertEqual(rig.pool.stats()["TOTVS_I"]["held"], 400)
        rig.advance(3.0)
        self.assertEqual(rig.server.leased("TOTVS_I"), 8)

    def test_leases_the_server_forgot_are_dropped(self) -> None:
        """On reconnect, a local lease the server does not list is gone."""
        rig = Rig()
        rig.endpoint.cut()
        rig.server.leases.clear()
        rig.endpoint.refuse = False
        rig.advance(1.0)
        self.assertTrue(rig.client.connected)
        stats = rig.pool.stats()["TOTVS_I"]
        self.assertEqual(stats["held"], rig.server.leased("TOTVS_I"))
        self.assertEqual(stats["leases"], 1)  # a fresh one


class LeaseTests(SynchronousTestCase):
    """Renewal, watermarks, expiry, revocation."""

    def test_renewed_at_a_third_of_the_ttl(self) -> None:
        """A lease with a 30 s TTL is renewed every 10 s and never expires while connected."""
        rig = Rig(ttl=30.0, idle_release=0.0)
        rig.advance(9.5)
        self.assertEqual(rig.count("renew"), 0)
        rig.advance(1.0)
        self.assertEqual(rig.count("renew"), 1)
        rig.advance(100.0)
        self.assertEqual(rig.count("renew"), 11)
        self.assertEqual(rig.server.leased("TOTVS_I"), 8)
        self.assertEqual(rig.pool.stats()["TOTVS_I"]["held"], 8)

    def test_refill_below_the_low_watermark(self) -> None:
        """Taking seats until fewer than LOW_WATERMARK are free leases a new block."""
        rig = Rig()
        for _ in range(6):
            self.assertTrue(rig.pool.try_take("TOTVS_I"))
        self.assertEqual(rig.count("lease"), 1)  # 2 free: not below low
        self.assertTrue(rig.pool.try_take("TOTVS_I"))
        rig.flush()
        self.assertEqual(rig.count("lease"), 2)
        stats = rig.pool.stats()["TOTVS_I"]
        self.assertEqual((stats["in_use"], stats["free"]), (7, 8))

    def test_fast_growth_takes_few_leases(self) -> None:
        """400 requests at once: served with a handful of leases (a server caps leases per client)."""
        rig = Rig(seats={"TOTVS_I": 1000})
        waiting = [rig.pool.wait("TOTVS_I", 10.0, 1000) for _ in range(400)]
        rig.flush()
        self.assertEqual(len([d for d in waiting if d.called]), 400)
        self.assertLessEqual(rig.pool.stats()["TOTVS_I"]["leases"], 4)

    def test_release_above_the_high_watermark(self) -> None:
        """After a burst the free seats above HIGH_WATERMARK are given back."""
        rig = Rig()
        waiting = [rig.pool.wait("TOTVS_I", 10.0, 100) for _ in range(30)]
        rig.flush()
        self.assertEqual([self.successResultOf(d) >= 0 for d in waiting], [True] * 30)
        for _ in range(30):
            rig.pool.give_back("TOTVS_I")
        rig.advance(0.5)
        self.assertGreater(rig.pool.stats()["TOTVS_I"]["held"], 8)
        rig.advance(3.0)
        self.assertEqual(rig.pool.stats()["TOTVS_I"]["held"], 8)
        self.assertEqual(rig.server.leased("TOTVS_I"), 8)
        self.assertGreater(rig.count("release"), 0)

    def test_idle_class_gives_its_seats_back(self) -> None:
        """A class unused for IDLE_RELEASE gives its free seats back; TOTVS_I keeps LOW_WATERMARK."""
        rig = Rig(seats={"TOTVS_I": 100, "APP7": 10}, idle_release=60.0)
        waiting = rig.pool.wait("APP7", 10.0, 10)
        rig.flush()
        self.successResultOf(waiting)
        rig.pool.give_back("APP7")
        rig.advance(29.0)
        self.assertEqual((rig.server.leased("APP7"), rig.server.leased("TOTVS_I")), (8, 8))
        rig.advance(31.0)  # idle through a whole sweep interval
        self.assertEqual((rig.server.leased("APP7"), rig.server.leased("TOTVS_I")), (0, 2))
        self.assertEqual(rig.pool.stats()["APP7"]["held"], 0)

    def test_busy_class_keeps_its_seats(self) -> None:
        """A class used between sweeps keeps its seats."""
        rig = Rig(idle_release=60.0)
        for _ in range(10):
            rig.advance(10.0)
            self.assertTrue(rig.pool.try_take("TOTVS_I"))
            rig.pool.give_back("TOTVS_I")
        self.assertEqual(rig.server.leased("TOTVS_I"), 8)

    def test_unreachable_serves_from_leases_then_refuses(self) -> None:
        """Cut off: seats held keep serving until their TTL; then 503 'license server unreachable'."""
        rig = Rig(ttl=30.0)
        rig.endpoint.cut()
        self.assertFalse(rig.client.connected)
        self.assertTrue(rig.pool.try_take("TOTVS_I"))
        rig.pool.give_back("TOTVS_I")
        rig.advance(26.0)
        self.assertTrue(rig.pool.try_take("TOTVS_I"))
        rig.pool.give_back("TOTVS_I")
        rig.advance(3.5)  # past 30 - 1 s: expired here before the server's TTL
        self.assertFalse(rig.pool.try_take("TOTVS_I"))
        error = error_of(self, rig.pool.wait("TOTVS_I", 5.0, 10))
        self.assertEqual(error.kind, UNREACHABLE)
        self.assertEqual(error.reason, "license server unreachable")

    def test_black_hole_is_unreachable_when_a_lease_expires_unrenewed(self) -> None:
        """A silent partition (no answer, no close): when a lease expires unrenewed the channel is
        taken for dead at once, so requests get 'license server unreachable' (not 'all licenses in
        use' until CALL_TIMEOUT); after healing the client reconnects."""
        rig = Rig(ttl=6.0)
        pumps, rig.endpoint.pumps = rig.endpoint.pumps, []  # bytes sent are never delivered
        rig.endpoint.refuse = True
        rig.advance(5.0)  # renewal sent at 2 s, unanswered; the lease ends here at 5.4 s
        self.assertTrue(rig.client.connected)
        rig.advance(0.5)
        self.assertFalse(rig.client.connected)
        self.assertIn("expired unrenewed", rig.client.reason)
        error = error_of(self, rig.pool.wait("TOTVS_I", 5.0, 10))
        self.assertEqual(error.kind, UNREACHABLE)
        rig.endpoint.pumps, rig.endpoint.refuse = pumps, False
        rig.advance(2.0)
        self.assertTrue(rig.client.connected)
        self.assertTrue(rig.pool.try_take("TOTVS_I"))

    def test_lease_in_flight_when_the_channel_drops_is_not_a_warning(self) -> None:
        """A Lease unanswered when the channel is lost fails with the loss (logged once, as the
        channel's): no second warning line for the lease."""
        catcher = LogCatcher(self)
        rig = Rig()
        for _ in range(7):
            self.assertTrue(rig.pool.try_take("TOTVS_I"))  # below LOW_WATERMARK: a Lease is sent
        self.assertTrue(rig.pool.classes["TOTVS_I"].asking)
        rig.endpoint.cut()
        self.assertFalse(rig.client.connected)
        self.assertEqual([t for t in catcher.texts() if "lease of TOTVS_I failed" in t], [])

    def test_waiters_of_a_lost_class_get_unreachable(self) -> None:
        """Waiting when the last lease expires with no channel: 503 at once, unreachable."""
        rig = Rig(ttl=30.0)
        for _ in range(8):
            rig.pool.try_take("TOTVS_I")
        rig.flush()
        rig.server.refuse_all = True
        for _ in range(8):
            rig.pool.try_take("TOTVS_I")
        waiting = rig.pool.wait("TOTVS_I", 60.0, 10)
        rig.endpoint.cut()
        self.assertNoResult(waiting)
        rig.advance(30.0)
        self.assertEqual(error_of(self, waiting).kind, UNREACHABLE)

    def test_all_in_use_after_the_wait(self) -> None:
        """Every seat leased elsewhere: a request waits LICENSE_QUEUE_TIMEOUT, then 'all licenses in use'."""
        rig = Rig(seats={"TOTVS_I": 8})
        for _ in range(8):
            self.assertTrue(rig.pool.try_take("TOTVS_I"))
        rig.flush()
        waiting = rig.pool.wait("TOTVS_I", 3.0, 10)
        rig.advance(2.5)
        self.assertNoResult(waiting)
        self.assertGreater(rig.count("lease"), 2)  # asked again while it waited
        rig.advance(1.0)
        error = error_of(self, waiting)
        self.assertEqual(error.kind, ALL_IN_USE)
        self.assertTrue(error.reason.startswith("all licenses in use"))

    def test_a_seat_given_back_goes_to_the_oldest_waiter(self) -> None:
        """Waiters are served first come, first served, with no round trip."""
        rig = Rig(seats={"TOTVS_I": 8})
        for _ in range(8):
            rig.pool.try_take("TOTVS_I")
        rig.flush()
        first = rig.pool.wait("TOTVS_I", 10.0, 10)
        second = rig.pool.wait("TOTVS_I", 10.0, 10)
        rig.clock.advance(0.25)
        rig.pool.give_back("TOTVS_I")
        self.assertEqual(self.successResultOf(first), 0.25)
        self.assertNoResult(second)

    def test_queue_is_bounded(self) -> None:
        """Beyond LICENSE_QUEUE_LENGTH waiters a request is refused at once."""
        rig = Rig(seats={"TOTVS_I": 8})
        for _ in range(8):
            rig.pool.try_take("TOTVS_I")
        rig.flush()
        rig.pool.wait("TOTVS_I", 10.0, 1)
        error = error_of(self, rig.pool.wait("TOTVS_I", 10.0, 1))
        self.assertEqual(error.kind, ALL_IN_USE)
        self.assertIn("1 requests already waiting", error.reason)

    def test_cancelled_waiter_leaves_the_queue(self) -> None:
        """A waiter whose client left takes no seat later."""
        rig = Rig(seats={"TOTVS_I": 8})
        for _ in range(8):
            rig.pool.try_take("TOTVS_I")
        rig.flush()
        waiting = rig.pool.wait("TOTVS_I", 10.0, 10)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        rig.pool.give_back("TOTVS_I")
        self.assertEqual(rig.pool.stats()["TOTVS_I"]["in_use"], 7)
        self.assertEqual(rig.pool.stats()["TOTVS_I"]["waiting"], 0)

    def test_unknown_class_is_no_license(self) -> None:
        """An application code the server has no license for: 'no license for application X'."""
        rig = Rig(seats={"TOTVS_I": 10})
        waiting = rig.pool.wait("APP42", 10.0, 10)
        rig.flush()
        error = error_of(self, waiting)
        self.assertEqual(error.kind, NO_LICENSE)
        self.assertEqual(error.reason, "no license for application APP42")
        self.assertEqual(error_of(self, rig.pool.wait("APP42", 10.0, 10)).kind, NO_LICENSE)  # remembered
        self.assertEqual(rig.count("lease"), 2)  # TOTVS_I at start, APP42 once

    def test_application_class_leases_its_own_seats(self) -> None:
        """An application code with licenses gets seats of its class."""
        rig = Rig(seats={"TOTVS_I": 10, "APP7": 3})
        waiting = rig.pool.wait("APP7", 10.0, 10)
        rig.flush()
        self.assertEqual(self.successResultOf(waiting), 0.0)
        self.assertEqual(rig.server.leased("APP7"), 3)
        self.assertEqual(rig.pool.stats()["APP7"]["in_use"], 1)

    def test_revoked_lease_is_dropped(self) -> None:
        """The server revokes a lease: its seats are no longer ours."""
        catcher = LogCatcher(self)
        rig = Rig(seats={"TOTVS_I": 8})
        lease_id = next(iter(rig.server.leases))
        rig.server.refuse_all = True
        rig.server.channels[0].revoke(lease_id, "admin")
        rig.flush()
        self.assertEqual(rig.pool.stats()["TOTVS_I"]["held"], 0)
        self.assertFalse(rig.pool.try_take("TOTVS_I"))
        self.assertTrue(any("revoked" in t for t in catcher.texts()))

    def test_renewal_of_an_unknown_lease_drops_it(self) -> None:
        """A renewal the server answers UnknownLease: the lease is dropped and a new one leased."""
        rig = Rig()
        rig.server.leases.clear()
        rig.advance(10.5)
        stats = rig.pool.stats()["TOTVS_I"]
        self.assertEqual(stats["held"], rig.server.leased("TOTVS_I"))
        self.assertEqual(rig.count("lease"), 2)

    def test_stop_returns_the_leases(self) -> None:
        """Stopping the broker gives every lease back at once."""
        rig = Rig()
        rig.stop()
        self.assertEqual(rig.server.leased("TOTVS_I"), 0)

    def test_trace_logs_each_lease_message(self) -> None:
        """FWFRAME_TRACELS=1: every lease message and its answer is one log line."""
        catcher = LogCatcher(self)
        Rig(trace=True)
        traces = [t for t in catcher.texts() if t.startswith("license trace:")]
        self.assertIn("license trace: -> Lease license_class=TOTVS_I seats=8", traces)
        self.assertTrue(any(t.startswith("license trace: <- Lease lease_id=") for t in traces))
        self.assertTrue(any("LicenseHello" in t for t in traces))

    def test_no_trace_by_default(self) -> None:
        """Without FWFRAME_TRACELS no lease message is logged."""
        catcher = LogCatcher(self)
        Rig()
        self.assertEqual([t for t in catcher.texts() if t.startswith("license trace:")], [])


class FakeWire:
    """A wire that is never connected."""

    connected = False


class PoolTests(SynchronousTestCase):
    """The pool alone."""

    def test_never_connected_is_unreachable(self) -> None:
        """Before any channel, a request gets 'license server unreachable' at once."""
        pool = SeatPool(Clock(), FakeWire())
        self.assertFalse(pool.try_take("TOTVS_I"))
        self.assertEqual(error_of(self, pool.wait("TOTVS_I", 5.0, 10)).kind, UNREACHABLE)

    def test_class_count_is_bounded(self) -> None:
        """More classes than MAX_CLASSES with seats: the new one is refused."""
        rig = Rig(seats={"TOTVS_I": 10, "A1": 5, "A2": 5}, max_classes=2)
        first = rig.pool.wait("A1", 1.0, 10)
        rig.flush()
        self.successResultOf(first)
        error = error_of(self, rig.pool.wait("A2", 1.0, 10))
        self.assertEqual(error.kind, NO_LICENSE)
        self.assertIn("license classes", error.reason)
