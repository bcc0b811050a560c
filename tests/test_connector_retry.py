"""The connector's retry after a drop: the backoff policy alone, then sessions in memory (the
resumable-session rig) with a seeded jitter source, so every delay is known."""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.resume.connector import ConnectorFactory, backoff_policy, half_to_full

from .helpers import LogCatcher
from .test_resume_session import BROKER, Rig

SEED = 1313


def delayed(rng: random.Random, count: int, cap: float = 0.25) -> list[float]:
    """The delays the default policy gives for *count* retries, drawing jitter from *rng*."""
    delays = []
    for attempt in range(1, count + 1):
        if attempt <= 2:
            delays.append(0.0)
        else:
            delays.append(min(0.08 * 2 ** (attempt - 3), cap) * rng.uniform(0.5, 1.0))
    return delays


class BackoffPolicyTests(SynchronousTestCase):
    def test_twice_at_once_then_doubling_to_the_cap(self) -> None:
        """Without jitter: 0, 0, 80 ms, 160 ms, then 250 ms for ever."""
        policy = backoff_policy(jitter=lambda: 1.0)
        self.assertEqual([policy(n) for n in range(1, 8)], [0.0, 0.0, 0.08, 0.16, 0.25, 0.25, 0.25])

    def test_seeded_jitter_scales_each_delayed_retry(self) -> None:
        """Each delayed retry is its delay times a factor from 0.5 to 1.0 drawn from the Random
        passed in; retries at once draw nothing."""
        policy = backoff_policy(jitter=half_to_full(random.Random(SEED)))
        self.assertEqual([policy(n) for n in range(1, 11)], delayed(random.Random(SEED), 10))
        for n, delay in enumerate([policy(n) for n in range(11, 40)], start=11):
            self.assertTrue(0.125 <= delay <= 0.25, (n, delay))

    def test_parameters_like_twisted_backoff_policy(self) -> None:
        """initial_delay, factor, max_delay and the number of retries at once are the policy's."""
        policy = backoff_policy(initial_delay=1.0, factor=1.5, max_delay=3.0, jitter=lambda: 1.0, at_once=0)
        self.assertEqual([policy(n) for n in range(1, 6)], [1.0, 1.5, 2.25, 3.0, 3.0])

    def test_cap_holds_for_any_attempt(self) -> None:
        """However many failures, the delay stays at the cap (no overflow)."""
        policy = backoff_policy(factor=1e6, jitter=lambda: 1.0)
        self.assertEqual([policy(n) for n in (50, 10_000, 10**9)], [0.25, 0.25, 0.25])


class ConnectorRetryTests(SynchronousTestCase):
    def rig(self, standby: float = 30.0, seed: int = SEED) -> Rig:
        """The in-memory rig with a connector whose jitter comes from Random(*seed*); every
        connection attempt to the broker is recorded in ``rig.attempts`` with its time."""
        rig = Rig(standby=standby)
        rig.connector = ConnectorFactory(rig.reactor, rig.connector.config, rng=random.Random(seed))
        rig.attempts = []  # type: ignore[attr-defined]
        connect = rig.reactor.connectTCP

        def recording(host: str, port: int, factory: Any, *args: Any, **kwargs: Any) -> Any:
            if (host, port) == BROKER:
                rig.attempts.append(rig.reactor.seconds())  # type: ignore[attr-defined]
            return connect(host, port, factory, *args, **kwargs)

        rig.reactor.connectTCP = recording  # type: ignore[method-assign]
        return rig

    def run_until(self, rig: Rig, done: Callable[[], bool], limit: float = 600.0) -> None:
        """Move the clock from one timer to the next, the network settling in between."""
        end = rig.reactor.seconds() + limit
        rig.settle()
        while not done():
            calls = rig.reactor.getDelayedCalls()
            self.assertTrue(calls, "nothing left to happen")
            next_time = min(call.getTime() for call in calls)
            self.assertLessEqual(next_time, end, "did not happen in time")
            rig.reactor.advance(max(0.0, next_time - rig.reactor.seconds()))
            rig.settle()

    def outage(self, rig: Rig, retries: int) -> list[float]:
        """Cut the link with the network down and return the waits before the first *retries*."""
        rig.net.down = True
        cut_at = rig.reactor.seconds()
        before = len(rig.attempts)  # type: ignore[attr-defined]
        rig.cut()
        self.run_until(rig, lambda: len(rig.attempts) >= before + retries)  # type: ignore[attr-defined]
        times = [cut_at] + rig.attempts[before:before + retries]  # type: ignore[attr-defined]
        return [b - a for a, b in zip(times, times[1:])]

    def assertDelays(self, got: list[float], expected: list[float]) -> None:
        self.assertEqual(len(got), len(expected))
        for n, (a, b) in enumerate(zip(got, expected), start=1):
            self.assertAlmostEqual(a, b, places=9, msg=f"retry {n}: {got} != {expected}")

    def test_first_drop_retries_follow_the_seeded_policy(self) -> None:
        """A drop right after the session opened: retries twice at once, then 80 ms, 160 ms and
        250 ms, each scaled by the jitter drawn from the Random passed in."""
        rig = self.rig()
        rig.smartclient()
        self.assertDelays(self.outage(rig, 12), delayed(random.Random(SEED), 12))

    def test_waits_never_exceed_the_cap(self) -> None:
        """Through 20 s of outage no wait is longer than 250 ms, and the jitter spreads them."""
        rig = self.rig(standby=60.0)
        rig.smartclient()
        waits = self.outage(rig, 100)
        self.assertLessEqual(max(waits), 0.25)
        self.assertTrue(all(0.125 <= wait for wait in waits[4:]))
        self.assertGreater(len(set(waits[4:])), 50)

    def test_gives_up_at_the_window(self) -> None:
        """The first attempt failing once the broker's window has passed since the drop closes
        the SmartClient: one expiry, nothing retried after, nothing left."""
        logs = LogCatcher(self)
        rig = self.rig(standby=5.0)
        client = rig.smartclient()
        rig.net.down = True
        cut_at = rig.reactor.seconds()
        rig.cut()
        self.run_until(rig, lambda: client.lost is not None)
        attempts = [t - cut_at for t in rig.attempts[1:]]  # type: ignore[attr-defined]
        self.assertLess(attempts[-2], 5.0)
        self.assertGreaterEqual(attempts[-1], 5.0)
        self.assertEqual(rig.reactor.seconds() - cut_at, attempts[-1])
        [expired] = logs.find(event="connector.expired")
        self.assertEqual(expired["window"], 5.0)
        self.assertEqual((rig.connector.expiries, rig.connector.streams), (1, set()))
        count = len(rig.attempts)  # type: ignore[attr-defined]
        rig.advance(10.0, step=0.5)
        self.assertEqual(len(rig.attempts), count)  # type: ignore[attr-defined]
        self.assertTrue(rig.idle())

    def test_resume_resets_the_backoff(self) -> None:
        """After a resume the next drop starts over: twice at once, then 80 ms (with jitter)."""
        rig = self.rig()
        client = rig.smartclient()
        waits = self.outage(rig, 8)
        self.assertGreaterEqual(waits[-1], 0.125)  # at the cap
        rig.net.down = False
        self.run_until(rig, lambda: rig.connector.resumes == 1)
        client.transport.write(b"still here")
        rig.settle()
        self.assertEqual(bytes(client.data), b"still here")
        waits = self.outage(rig, 4)
        self.assertEqual(waits[:2], [0.0, 0.0])
        self.assertTrue(0.04 <= waits[2] <= 0.08, waits)
        self.assertTrue(0.08 <= waits[3] <= 0.16, waits)

    def test_retries_run_on_the_clock_passed_in(self) -> None:
        """A clock given to the factory times the retries; the reactor's clock does not."""
        rig = self.rig()
        clock = task.Clock()
        rig.connector = ConnectorFactory(rig.reactor, rig.connector.config, clock=clock,
                                         rng=random.Random(SEED))
        rig.smartclient()
        rig.net.down = True
        rig.cut()
        rig.settle()
        rig.reactor.advance(1.0)
        rig.settle()
        self.assertEqual(rig.attempts[1:], [])  # type: ignore[attr-defined]
        for _ in range(3):
            clock.advance(min(call.getTime() for call in clock.getDelayedCalls()) - clock.seconds())
            rig.settle()
        self.assertEqual(len(rig.attempts), 4)  # type: ignore[attr-defined]
