"""Attacks on failover with real processes (issue 12, findings 3 and 4): a rolling restart and a
stopped (SIGSTOP) AppServer, twistd broker plugin + sample AppServers on 127.0.0.1.

Each test prints its figures (failed logins, slowest login) for the release notes.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.python.failure import Failure

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import ProcessTestCase, login

#: Seconds a test login waits for its answer before it counts as failed (a SmartClient gives
#: up after about 15 s; shorter here to keep the tests bounded).
LOGIN_PATIENCE = 8.0


async def logins(port: int, count: int, concurrency: int, slow: float = 1.0) -> tuple[int, float, int]:
    """*count* logins, *concurrency* at a time: (failed, slowest seconds, how many took at
    least *slow* seconds)."""
    failed, slowest, waited = 0, 0.0, 0
    for first in range(0, count, concurrency):
        results = await defer.gatherResults([
            defer.ensureDeferred(login(port, n, patience=LOGIN_PATIENCE)) for n in range(first, min(count, first + concurrency))
        ])
        failed += sum(1 for ok, _ in results if not ok)
        slowest = max([slowest] + [seconds for _, seconds in results])
        waited += sum(1 for _, seconds in results if seconds >= slow)
    return failed, slowest, waited


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def logged(child: TwistdChild, text: str, within: float = 10.0) -> bool:
    """True once *child* has logged *text* (its output arrives a little after its effects)."""
    for _ in range(int(within / 0.05)):
        if text in child.text():
            return True
        await sleep(0.05)
    return text in child.text()


class Undecided(Protocol):
    """An attacker's connection: the first bytes of the resumable magic, then nothing."""

    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.received = 0

    def connectionMade(self) -> None:
        self.transport.write(b"PRSM")

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


class FailoverAttackTests(ProcessTestCase):
    timeout = 90

    async def sim(self, name: str, port: int = 0) -> tuple[TwistdChild, int]:
        child = self.start(name, twistd_argv("protheus-appserver-sim", "--name", name, "--port",
                                             f"tcp:{port}:interface=127.0.0.1"))
        return child, await child.listening()

    def broker_argv(self, path: str) -> list[str]:
        """twistd protheus-broker, started with a soft open-files limit of 256 (hard 4096)."""
        argv = twistd_argv("protheus-broker", "--config", path)
        argv[2] = ("import os, resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)); "
                   + argv[2])
        return argv

    async def broker(self, servers: dict[str, int], extra: str) -> tuple[TwistdChild, int]:
        lines = "".join(f"REMOTE_SERVER_{name} = 127.0.0.1 {port}\n" for name, port in servers.items())
        path = self.write_ini(
            "[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
            "LOCAL_SERVER_INTERFACE = 127.0.0.1\nMONITORING_TYPE = DISABLED\nCONNECT_TIMEOUT = 1\n"
            + extra + lines)
        child = self.start("broker", self.broker_argv(path))
        return child, await child.listening()

    @defer.inlineCallbacks
    def test_rolling_restart_fails_no_login(self) -> Any:
        """Kill 01, one login suspends it, restart 01, kill 02 within SUSPECT_TIME: every login
        lands on 01 (Suspended, tried after 02 refused); none fails."""
        yield defer.ensureDeferred(self._rolling_restart())

    async def _rolling_restart(self) -> None:
        one, one_port = await self.sim("01")
        two, two_port = await self.sim("02")
        broker, port = await self.broker({"01": one_port, "02": two_port},
                                         "SORT_METHOD = CONNECTION\nSUSPECT_TIME = 30\n")
        failed_before, _, _ = await logins(port, 4, 2)
        one.signal("KILL")
        await one.ended
        failed_01_down, _, _ = await logins(port, 1, 1)  # refused by 01, lands on 02; 01 suspended
        self.assertTrue(await logged(broker, "suspended: connect failed"))
        one, _ = await self.sim("01", one_port)  # 01 restarted on its port
        two.signal("KILL")
        await two.ended
        failed, slowest, _ = await logins(port, 20, 5)
        print(f"\nrolling restart: {failed} failed logins of 20 after 02 was killed "
              f"(slowest {slowest:.3f}s); before: {failed_before} of 4, with 01 down: "
              f"{failed_01_down} of 1")
        self.assertEqual((failed_before, failed_01_down, failed), (0, 0, 0))
        self.assertTrue(await logged(broker, "open files limit 4096 (hard 4096)"))

    @defer.inlineCallbacks
    def test_stopped_appserver_swallows_no_login(self) -> Any:
        """One of three AppServers stopped (SIGSTOP) under ROUND_ROBIN: its logins are replayed
        on the others after FIRST_RESPONSE_TIMEOUT; no login fails and none waits for the
        client to give up."""
        yield defer.ensureDeferred(self._stopped())

    async def _stopped(self) -> None:
        sims = {name: await self.sim(name) for name in ("01", "02", "03")}
        broker, port = await self.broker(
            {name: p for name, (_, p) in sims.items()},
            "SORT_METHOD = ROUND_ROBIN\nFIRST_RESPONSE_TIMEOUT = 1\nSUSPECT_TIME = 2\n")
        stopped = sims["02"][0]
        assert stopped.pid is not None
        os.kill(stopped.pid, signal.SIGSTOP)
        self.addCleanup(stopped.signal, "KILL")  # after SIGCONT (cleanups run last first)
        self.addCleanup(os.kill, stopped.pid, signal.SIGCONT)
        started = time.monotonic()
        failed, slowest, waited = await logins(port, 150, 30)
        await sleep(2.5)  # past SUSPECT_TIME: 02 is tried (and found hung) again
        failed_again, slowest_again, waited_again = await logins(port, 60, 30)
        took = time.monotonic() - started
        suspended = await logged(broker, "suspended: no answer within 1s", within=2.0)
        replays = broker.text().count("no answer within 1s; replaying")
        print(f"\nSIGSTOP: {failed + failed_again} failed logins of 210 (slowest "
              f"{max(slowest, slowest_again):.3f}s; {waited} of the first 150 and {waited_again} of "
              f"the 60 after SUSPECT_TIME waited for a replay; {replays} replays logged; "
              f"{took:.1f}s in all)", file=sys.stdout)
        self.assertEqual(failed + failed_again, 0)
        self.assertGreater(replays, 0)
        self.assertTrue(suspended)

    @defer.inlineCallbacks
    def test_undecided_flood_leaves_logins_to_others(self) -> Any:
        """1,000 connections held undecided from one address against a broker started with a
        soft limit of 256 open files: past MAX_PENDING_PER_ADDRESS they are closed at once, the
        refusal lines add up to every one, and a login from another address is served."""
        yield defer.ensureDeferred(self._flood())

    async def _flood(self) -> None:
        sim, sim_port = await self.sim("01")
        broker, port = await self.broker({"01": sim_port},
                                         "SORT_METHOD = CONNECTION\nFIRST_BYTES_WAIT = 10\n")
        attackers = [Undecided() for _ in range(1000)]
        for attacker in attackers:
            try:
                await ClientCreator(reactor, lambda: attacker).connectTCP("127.0.0.1", port, timeout=5)
            except Exception:
                attacker.lost.callback(None)
        await sleep(0.5)
        held = sum(1 for a in attackers if not a.lost.called)
        ok, seconds = await login(port, 1, source="127.0.0.2")
        for attacker in attackers:
            if not attacker.lost.called:
                attacker.transport.abortConnection()
        broker.signal("TERM")
        await broker.ended
        refused = sum(int(n) for n in re.findall(r"refused (\d+) connection", broker.text()))
        print(f"\nundecided flood: {held} of 1000 held, {refused} refused (logged), login from "
              f"another address {'served' if ok else 'FAILED'} in {seconds:.3f}s")
        self.assertTrue(ok)
        self.assertEqual((held, refused), (128, 872))
