"""Scale to zero end to end: a real broker (MIN_NODES=0, SCALE_TO_ZERO=1) wakes a real sample
AppServer node on the first login, holds the login meanwhile without losing a byte, keeps the node
while the session is open, and goes back to zero ZERO_IDLE_TIME after the last session ended."""

from __future__ import annotations

import os
import random
import re
import sys
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.python.failure import Failure

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import ProcessTestCase, kill_logged_groups, sleep

TWISTD = "from twisted.scripts.twistd import run; run()"


class TimedLogin(Protocol):
    """A SmartClient stand-in: notes when it connected and when the first AppServer byte came."""

    transport: Any

    def __init__(self) -> None:
        self.data = b""
        self.lost = False
        self.connected_at = 0.0
        self.first_byte_at: float | None = None

    def connectionMade(self) -> None:
        self.connected_at = time.monotonic()

    def dataReceived(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True

    async def until(self, size: int, patience: float) -> bool:
        deadline = time.monotonic() + patience
        while len(self.data) < size and not self.lost and time.monotonic() < deadline:
            await sleep(0.005)
        return len(self.data) >= size


async def wait_for(broker: TwistdChild, pattern: str, count: int = 1, patience: float = 30.0) -> float:
    """Wait until *pattern* appears *count* times in the broker's output; the monotonic time then."""
    deadline = time.monotonic() + patience
    while len(re.findall(pattern, broker.text())) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not seen {count} times:\n{broker.text()[-4000:]}")
        await sleep(0.01)
    return time.monotonic()


class ScaleToZeroE2ETests(ProcessTestCase):
    timeout = 120

    def broker(self, nodes: str) -> TwistdChild:
        script = os.path.join(self.mktemp_dir(), "twistd.py")
        with open(script, "w") as handle:
            handle.write(TWISTD + "\n")
        path = self.write_ini(
            "[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
            "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
            "CONNECT_TIMEOUT = 2\nNODES = NODES_DESKTOP\n[NODES_DESKTOP]\n"
            f"NODE_COMMAND = {sys.executable} {script} --nodaemon --pidfile= protheus-appserver-sim "
            "--port tcp:{port}:interface=127.0.0.1 --name node{id}\n" + nodes)
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        self.addCleanup(self.kill_nodes, broker)
        return broker

    def kill_nodes(self, broker: TwistdChild) -> None:
        kill_logged_groups(broker.text())

    async def login(self, port: int, payload: bytes) -> TimedLogin:
        """Connect and send *payload* at once (the pool may be asleep); wait for greeting + echo."""
        client = TimedLogin()
        await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port, timeout=5)
        client.transport.write(payload)
        await client.until(1, 60.0)
        line_end = client.data.find(b"\r\n")
        while line_end < 0 and not client.lost:
            await sleep(0.005)
            line_end = client.data.find(b"\r\n")
        self.assertGreater(line_end, 0, client.data[:200])
        await client.until(line_end + 2 + len(payload), 10.0)
        return client

    @defer.inlineCallbacks
    def test_wakes_from_zero_and_sleeps_again(self) -> Any:
        """The first login to an empty pool wakes a node and gets its first byte, byte-exact (the
        time to it beside the node's start time is printed: a figure, not asserted); the node stays while the session is open (longer than
        ZERO_IDLE_TIME after the wake) and is stopped ZERO_IDLE_TIME after the session ended."""
        yield defer.ensureDeferred(self._wake_and_sleep())

    async def _wake_and_sleep(self) -> None:
        base = random.randrange(20000, 32000, 10)
        idle = 2.0
        broker = self.broker(f"BASE_PORT = {base}\nMIN_NODES = 0\nMAX_NODES = 2\nSCALE_TO_ZERO = 1\n"
                             f"ZERO_IDLE_TIME = {idle:g}\nWAKE_TIMEOUT = 30\nSTART_TIMEOUT = 20\n"
                             "POLL_INTERVAL = 0.5\nIDLE_TIME = 1\nSTOP_GRACE = 5\n")
        port = await broker.listening()
        await sleep(0.5)
        self.assertNotIn("starting node", broker.text())  # asleep from the start: no node
        rng = random.Random(3)
        first_payload = rng.randbytes(64 * 1024)
        client = await self.login(port, first_payload)
        assert client.first_byte_at is not None
        to_first_byte = client.first_byte_at - client.connected_at
        text = broker.text()
        ready = re.search(r"node 1 starting -> active: ready in ([\d.]+)s", text)
        woke = re.search(r"woke in ([\d.]+)s", text)
        assert ready is not None and woke is not None, text[-4000:]
        spawn_to_ready, wake = float(ready.group(1)), float(woke.group(1))
        line, _, echoed = client.data.partition(b"\r\n")
        print(f"\nscale to zero, first login: connect -> first AppServer byte {to_first_byte * 1000:.1f} ms; "
              f"node spawn -> ready {spawn_to_ready * 1000:.1f} ms; controller wake -> ready "
              f"{wake * 1000:.1f} ms; margin {(spawn_to_ready + 0.1 - to_first_byte) * 1000:.1f} ms "
              f"({line.decode()})")
        self.assertTrue(line.startswith(b"PROTHEUS-SIM node1"))
        self.assertEqual(echoed, first_payload)  # no byte lost while held
        self.assertIn("session 1 from", text)
        self.assertRegex(text, r"session 1 from \S+: waiting \(waking a node")
        # The session stays open longer than ZERO_IDLE_TIME after the wake: the node stays.
        await sleep(idle + 1.5)
        second = rng.randbytes(4096)
        client.transport.write(second)
        total = len(line) + 2 + len(first_payload) + len(second)
        self.assertTrue(await client.until(total, 10.0))
        self.assertTrue(client.data.endswith(first_payload + second))
        self.assertNotIn("node 1 ended", broker.text())
        client.transport.loseConnection()
        ended_at = time.monotonic()
        stopped_at = await wait_for(broker, r"node 1 ended", patience=idle + 15)
        asleep = stopped_at - ended_at
        print(f"scale to zero: the node was stopped {asleep:.2f}s after the last session ended "
              f"(ZERO_IDLE_TIME={idle:g}s)")
        self.assertGreaterEqual(asleep, idle)
        self.assertRegex(broker.text(), r"scale 1 -> 0: no session for \d+s \(ZERO_IDLE_TIME=2s\)")
        # Asleep again: the next login wakes a node again.
        again = await self.login(port, b"again" * 100)
        assert again.first_byte_at is not None
        print(f"scale to zero, second wake: connect -> first AppServer byte "
              f"{(again.first_byte_at - again.connected_at) * 1000:.1f} ms")
        self.assertTrue(again.data.endswith(b"again" * 100))
        again.transport.loseConnection()

    @defer.inlineCallbacks
    def test_wake_timeout_closes_login_with_reason(self) -> Any:
        """A node that never gets ready: the held login is closed after WAKE_TIMEOUT, the reason logged."""
        yield defer.ensureDeferred(self._timeout())

    async def _timeout(self) -> None:
        script = os.path.join(self.mktemp_dir(), "mute.py")
        with open(script, "w") as handle:
            handle.write("import time\ntime.sleep(60)\n")
        path = self.write_ini(
            "[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
            "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
            f"NODE_COMMAND = {sys.executable} {script} {{port}}\nBASE_PORT = {random.randrange(20000, 32000, 10)}\n"
            "MIN_NODES = 0\nSCALE_TO_ZERO = 1\nWAKE_TIMEOUT = 1.5\nSTART_TIMEOUT = 1\nSTOP_GRACE = 1\n")
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        self.addCleanup(self.kill_nodes, broker)
        port = await broker.listening()
        client = TimedLogin()
        await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port, timeout=5)
        client.transport.write(b"hello")
        started = time.monotonic()
        deadline = started + 15
        while not client.lost and time.monotonic() < deadline:
            await sleep(0.02)
        took = time.monotonic() - started
        print(f"\nscale to zero, wake timeout: login closed after {took:.2f}s (WAKE_TIMEOUT=1.5)")
        self.assertTrue(client.lost)
        self.assertEqual(client.data, b"")
        self.assertGreaterEqual(took, 1.4)
        self.assertIn("no AppServer woke in time, closing the client (none ready within WAKE_TIMEOUT=1.5s",
                      broker.text())
