"""What the [BALANCE_WEB_SERVICES] request slots and queue cost (http/capacity.py): no network.

``PYTHONPATH=. python bench/bench_capacity.py [--queued 0 100 1000] [--ops 200000] [--rounds 5]``

For each queue depth, acquire+release pairs per second in steady state, median of the rounds:
- depth 0: three servers with room (caps 0/100/100): each acquire is granted at once, each release
  finds nobody waiting;
- depth N: one server at its cap (1) with N requests waiting: each release serves the queue's head
  (timer stopped, Deferred fired) and each new acquire joins the tail (timer started), so the queue
  stays at N.  The reactor (not running) takes one turn (``runUntilCurrent``) every 50 pairs, as a
busy broker would between reads.
Then the worst case: a release on a server no waiter can use (it went down) with N waiting, with
every waiter sharing the unit's candidates callable (what the HTTP unit does) and with a distinct
callable per waiter (each one asked).  The clock is the real reactor's (not running), so timers
cost what they cost in the broker.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from twisted.internet import reactor

from protheus_broker.http.capacity import RequestSlots


@dataclass(frozen=True)
class Server:
    server_id: str


A, B, C = Server("A"), Server("B"), Server("C")

#: Pairs per reactor turn: new timers join the reactor's heap, cancelled ones are swept, once a turn.
TURN = 50


def steady(queued: int, ops: int) -> float:
    """Acquire+release pairs per second with *queued* requests waiting throughout."""
    slots = RequestSlots(reactor, queue_length=queued + 10, queue_timeout=3600.0)  # type: ignore[arg-type]
    if queued == 0:
        up = [A, B, C]
        slots.set_cap("B", 100)
        slots.set_cap("C", 100)
    else:
        up = [A]
        slots.set_cap("A", 1)

    def candidates() -> list[Server]:
        return up

    held: list[str] = []
    grant: Callable[[Server], None] = lambda server: held.append(server.server_id)  # noqa: E731
    slots.acquire(candidates).addCallback(grant)
    for _ in range(queued):
        slots.acquire(candidates).addCallback(grant)
    assert slots.queued() == queued, slots.queued()
    start = time.perf_counter()
    for n in range(ops):
        slots.release(held.pop())
        slots.acquire(candidates).addCallback(grant)
        if n % TURN == 0:
            reactor.runUntilCurrent()  # type: ignore[attr-defined]  # what each reactor turn does
    elapsed = time.perf_counter() - start
    assert slots.queued() == queued
    for delayed in reactor.getDelayedCalls():  # type: ignore[attr-defined]
        delayed.cancel()
    return ops / elapsed


def worst_release(queued: int, shared: bool, ops: int) -> float:
    """Seconds per release on a server no waiter can use, *queued* waiting."""
    slots = RequestSlots(reactor, queue_length=queued + 10, queue_timeout=3600.0)  # type: ignore[arg-type]
    slots.set_cap("A", ops + 1)
    slots.set_cap("B", 1)
    up = [A, B]

    def candidates() -> list[Server]:
        return up

    for _ in range(ops + 1):
        slots.acquire(candidates)
    slots.set_cap("A", 1)
    slots.acquire(candidates)  # B is full too
    for _ in range(queued):
        slots.acquire(candidates if shared else (lambda: up))
    reactor.runUntilCurrent()  # type: ignore[attr-defined]
    up.remove(A)  # A goes down with its requests still running
    start = time.perf_counter()
    for _ in range(ops):
        slots.release("A")
    elapsed = time.perf_counter() - start
    assert slots.queued() == queued
    for delayed in reactor.getDelayedCalls():  # type: ignore[attr-defined]
        delayed.cancel()
    return elapsed / ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queued", type=int, nargs="+", default=[0, 100, 1000])
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("steady state, acquire+release pairs per second (median of rounds):")
    for queued in args.queued:
        rates = [steady(queued, args.ops) for _ in range(args.rounds)]
        rate = statistics.median(rates)
        print(f"  {queued:>5} queued: {rate:>10,.0f} pairs/s  ({1e6 / rate:.2f} us per pair)")
    print("worst case: release on a server no waiter can use (median of rounds):")
    for queued in args.queued:
        if not queued:
            continue
        for shared in (True, False):
            ops = max(10, args.ops // (100 if shared else max(queued, 1) * 10))
            cost = statistics.median(worst_release(queued, shared, ops) for _ in range(args.rounds))
            kind = "one shared candidates callable" if shared else "a callable per waiter"
            print(f"  {queued:>5} queued, {kind:<31}: {cost * 1e6:>9.2f} us per release")


if __name__ == "__main__":
    main()
