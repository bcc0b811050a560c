"""Managed nodes end to end: a real broker starts, polls and recycles real sample AppServers."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.python.failure import Failure

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import ProcessTestCase, kill_logged_groups, sleep

#: Starts twistd with this Python (the node command's first words).
TWISTD = "from twisted.scripts.twistd import run; run()"

IGNORES_TERM = """\
import signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(16)
print("stubborn node listening", flush=True)
while True:
    connection, _ = server.accept()
    connection.close()
"""


def alive(pid: int) -> bool:
    """True while *pid* runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


class HeldSession(Protocol):
    """A SmartClient stand-in that logs in, keeps its session open, echoes again, and closes."""

    transport: Any

    def __init__(self) -> None:
        self.data = b""
        self.lost = False
        self.closing = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True

    async def until(self, expected: int, patience: float) -> bool:
        deadline = time.monotonic() + patience
        while len(self.data) < expected and not self.lost and time.monotonic() < deadline:
            await sleep(0.01)
        return len(self.data) >= expected


class Tally:
    def __init__(self) -> None:
        self.logins = self.failed_logins = self.dropped = self.completed = 0
        self.nodes: set[str] = set()


class NodesE2ETests(ProcessTestCase):
    timeout = 120

    def node_dir(self) -> str:
        path = tempfile.mkdtemp(prefix="nodes-", dir="/tmp")  # short: Unix socket paths are <= 107 bytes
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def broker(self, nodes: str) -> TwistdChild:
        """A broker with managed nodes; every node pid it logs is killed when the test ends."""
        path = self.write_ini(
            "[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
            "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
            "CONNECT_TIMEOUT = 2\nWAIT_FOR_SERVER = 10\nNODES = NODES_DESKTOP\n[NODES_DESKTOP]\n" + nodes)
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        self.addCleanup(self.kill_nodes, broker)
        return broker

    def kill_nodes(self, broker: TwistdChild) -> None:
        kill_logged_groups(broker.text())

    def sim_command(self, transport: str) -> str:
        """NODE_COMMAND running the sample AppServer (a script file: ';' starts an ini comment)."""
        script = os.path.join(self.node_dir(), "twistd.py")
        with open(script, "w") as handle:
            handle.write(TWISTD + "\n")
        where = "--unix {socket}" if transport == "UNIX" else "--port tcp:{port}:interface=127.0.0.1"
        return (f"NODE_COMMAND = {sys.executable} {script} --nodaemon --pidfile= "
                f"protheus-appserver-sim {where} --name node{{id}}\n")

    async def active_nodes(self, broker: TwistdChild, count: int, patience: float = 30.0) -> None:
        deadline = time.monotonic() + patience
        while len(re.findall(r"-> active", broker.text())) < count:
            if time.monotonic() > deadline:
                self.fail(f"fewer than {count} nodes got active:\n{broker.text()[-3000:]}")
            await sleep(0.05)

    async def held_session(self, port: int, number: int, hold: float, tally: Tally) -> None:
        session = HeldSession()
        first, second = f"login-{number}-".encode() * 4, f"still-{number}-".encode() * 4
        tally.logins += 1
        try:
            await ClientCreator(reactor, lambda: session).connectTCP("127.0.0.1", port, timeout=5)
        except Exception:
            tally.failed_logins += 1
            return
        session.transport.write(first)
        if not await session.until(len(first), 10.0) or b"\r\n" not in session.data:
            tally.failed_logins += 1
            session.transport.abortConnection()
            return
        line = session.data.split(b"\r\n", 1)[0]
        if not await session.until(len(line) + 2 + len(first), 10.0):
            tally.failed_logins += 1
            session.transport.abortConnection()
            return
        tally.nodes.add(line.split()[1].decode())
        await sleep(hold)
        if session.lost:
            tally.dropped += 1
            return
        session.transport.write(second)
        if not await session.until(len(line) + 2 + len(first) + len(second), 10.0) \
                or not session.data.endswith(first + second):
            tally.dropped += 1
            session.transport.abortConnection()
            return
        tally.completed += 1
        session.transport.loseConnection()

    @defer.inlineCallbacks
    def test_rolling_recycle_drops_nothing(self) -> Any:
        """Every node is recycled (RECYCLE_AGE with jitter) while a client logs in 20 times a
        second and holds each session 1.5 s (four for the whole run): no failed login, no
        dropped session."""
        yield defer.ensureDeferred(self._rolling())

    async def _rolling(self) -> None:
        base = random.randrange(20000, 32000, 10)
        broker = self.broker(self.sim_command("TCP") + f"BASE_PORT = {base}\nMIN_NODES = 2\nMAX_NODES = 4\n"
                             "SESSIONS_PER_NODE = 100\nRECYCLE_AGE = 4\nRECYCLE_JITTER = 0.5\n"
                             "POLL_INTERVAL = 0.5\nSTART_TIMEOUT = 20\nDRAIN_TIMEOUT = 60\nSTOP_GRACE = 5\n")
        port = await broker.listening()
        await self.active_nodes(broker, 2)
        tally, sessions = Tally(), []
        # Four sessions held through the whole run: their nodes stay discarded, not stopped.
        long_lived = [defer.ensureDeferred(self.held_session(port, 1000 + n, 12.0, tally)) for n in range(4)]
        started = time.monotonic()
        for number in range(220):  # 11 s at 20 logins a second
            sessions.append(defer.ensureDeferred(self.held_session(port, number, 1.5, tally)))
            await sleep(max(0.0, started + (number + 1) * 0.05 - time.monotonic()))
        took = time.monotonic() - started  # the login phase
        await defer.gatherResults(sessions + long_lived)
        text = broker.text()
        recycles = len(re.findall(r"recycle at age", text))
        ended = len(re.findall(r"node \d+ ended .*after the stop request", text))
        print(f"\nrolling recycle: {tally.logins} logins in {took:.1f}s ({tally.logins / took:.1f}/s), "
              f"failed {tally.failed_logins}, dropped {tally.dropped}, completed {tally.completed}; "
              f"{recycles} recycles, {ended} nodes stopped; node names seen {sorted(tally.nodes)}")
        self.assertEqual((tally.failed_logins, tally.dropped), (0, 0))
        self.assertEqual(tally.completed, 224)
        for first in (1, 2):  # both first nodes were recycled
            self.assertRegex(text, rf"node {first} (active|suspended) -> discarded: recycle at age")
        self.assertGreaterEqual(recycles, 2)  # both first nodes, at least
        self.assertGreaterEqual(ended, 2)
        self.assertNotIn("failed:", text)

    @defer.inlineCallbacks
    def test_node_ignoring_sigterm_is_killed_after_grace(self) -> Any:
        """A node that ignores SIGTERM is killed with SIGKILL after STOP_GRACE."""
        yield defer.ensureDeferred(self._stubborn())

    async def _stubborn(self) -> None:
        script = os.path.join(self.node_dir(), "stubborn.py")
        with open(script, "w") as handle:
            handle.write(IGNORES_TERM)
        base = random.randrange(20000, 32000, 10)
        broker = self.broker(f"NODE_COMMAND = {sys.executable} {script} {{port}}\nBASE_PORT = {base}\n"
                             "MIN_NODES = 1\nRECYCLE_AGE = 1\nRECYCLE_JITTER = 0\nSTOP_GRACE = 1\n"
                             "POLL_INTERVAL = 0.2\n")
        await broker.listening()
        deadline = time.monotonic() + 30
        while "killed by signal 9" not in broker.text():
            if time.monotonic() > deadline:
                self.fail(f"no node was killed:\n{broker.text()[-3000:]}")
            await sleep(0.05)
        text = broker.text()
        self.assertIn("did not stop within STOP_GRACE=1s: killing it", text)
        took = re.search(r"node 1 ended ([\d.]+)s after the stop request: killed by signal 9", text)
        assert took is not None, text[-3000:]
        print(f"\nstubborn node killed {float(took.group(1)):.3f}s after SIGTERM (STOP_GRACE=1)")
        self.assertGreaterEqual(float(took.group(1)), 1.0)
        self.assertIn("stubborn node listening", text)  # its output, logged with its id

    @defer.inlineCallbacks
    def test_unix_socket_nodes_carry_20_mb_exact(self) -> Any:
        """Nodes on Unix sockets take sessions through the broker; 20 MB echo byte-exact."""
        yield defer.ensureDeferred(self._unix())

    async def _unix(self) -> None:
        sockets = self.node_dir()
        broker = self.broker(self.sim_command("UNIX") + f"TRANSPORT = UNIX\nSOCKET_DIR = {sockets}\n"
                             "MIN_NODES = 2\n")
        port = await broker.listening()
        await self.active_nodes(broker, 2)
        self.assertTrue(os.path.exists(os.path.join(sockets, "node-1.sock")))
        size = 20 * 1024 * 1024
        payload = random.Random(20).randbytes(size)
        session = HeldSession()
        await ClientCreator(reactor, lambda: session).connectTCP("127.0.0.1", port, timeout=5)
        started = time.monotonic()
        session.transport.write(payload)
        await session.until(size, 60.0)
        line, _, echoed = session.data.partition(b"\r\n")
        while len(echoed) < size and not session.lost:
            await sleep(0.01)
            line, _, echoed = session.data.partition(b"\r\n")
        took = time.monotonic() - started
        print(f"\n20 MB echo through a Unix-socket node: {size / took / 1e6:.1f} MB/s ({line.decode()})")
        self.assertTrue(line.startswith(b"PROTHEUS-SIM node"))
        self.assertEqual(hashlib.sha256(echoed).hexdigest(), hashlib.sha256(payload).hexdigest())
        session.transport.loseConnection()
        self.assertIn("unix:" + os.path.join(sockets, "node-1.sock"), broker.text())
        # A broker killed outright leaves no orphan: its nodes get SIGTERM (PR_SET_PDEATHSIG).
        pids = {int(p) for p in re.findall(r"node \d+: pid (\d+):", broker.text())}
        broker.signal("KILL")
        await broker.ended
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids):
            if time.monotonic() > deadline:
                self.fail(f"nodes {sorted(p for p in pids if alive(p))} outlived their killed broker")
            await sleep(0.05)

    @defer.inlineCallbacks
    def test_second_broker_refused_the_persistent_node(self) -> Any:
        """Two brokers on one host with PERSISTENT=1 for one application: the second runs no
        persistent node and names the holders; the lock outlives a killed broker while its
        persistent node lives, and passes to the second broker when that node is gone."""
        yield defer.ensureDeferred(self._persistent())

    async def _persistent(self) -> None:
        where = self.node_dir()
        script = os.path.join(where, "stubborn.py")
        with open(script, "w") as handle:
            handle.write(IGNORES_TERM)
        brokers = []
        for n in range(2):
            base = random.randrange(20000, 32000, 10)
            broker = self.broker(f"NODE_COMMAND = {sys.executable} {script} {{port}}\nBASE_PORT = {base}\n"
                                 f"MIN_NODES = 1\nPERSISTENT = 1\nAPPLICATION = ERP\nLOCK_DIR = {where}\n")
            await broker.listening()
            await self.active_nodes(broker, 1)
            brokers.append(broker)
        first, second = brokers
        self.assertIn("(persistent)", first.text())
        self.assertNotIn("(persistent)", second.text())
        node_pid = int(re.findall(r"node 1: pid (\d+):", first.text())[0])
        refusal = (f"no persistent node here: the persistent node of ERP is held by pid {first.pid}, "
                   f"persistent node pid {node_pid}")
        self.assertIn(refusal, second.text())
        first.signal("KILL")  # the broker dies; its node (ignoring the SIGTERM it gets) keeps the lock
        await first.ended
        await sleep(2.5)
        self.assertNotIn("persistent node lock taken", second.text())
        os.kill(node_pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while "(persistent)" not in second.text():
            if time.monotonic() > deadline:
                self.fail(f"the second broker did not take over:\n{second.text()[-3000:]}")
            await sleep(0.05)
        self.assertEqual(second.text().count("no persistent node here"), 1)  # logged once
        print(f"\nsecond broker refused ({refusal}); took over after the node's death")
