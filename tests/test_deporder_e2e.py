"""Dependency order when waking, end to end: a real broker (SCALE_TO_ZERO=1, managed sample
AppServer nodes, DEPENDS_ON = DBACCESS) gets its first login while DBACCESS's port is closed: the
login is held and no node is started; the port opens 1 s later, the node starts, the login is
served byte-exact."""

from __future__ import annotations

import os
import random
import re
import socket
import sys
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientCreator, Protocol, ServerFactory

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import ProcessTestCase, sleep
from .test_scaling_e2e import TWISTD, TimedLogin, wait_for


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (for now)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


class DependencyOrderE2ETests(ProcessTestCase):
    timeout = 120

    def broker(self, db_port: int) -> TwistdChild:
        script = os.path.join(self.mktemp_dir(), "twistd.py")
        with open(script, "w") as handle:
            handle.write(TWISTD + "\n")
        path = self.write_ini(
            "[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
            "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
            "CONNECT_TIMEOUT = 2\nDEPENDS_ON = DBACCESS\nNODES = NODES_DESKTOP\n[NODES_DESKTOP]\n"
            f"NODE_COMMAND = {sys.executable} {script} --nodaemon --pidfile= protheus-appserver-sim "
            "--port tcp:{port}:interface=127.0.0.1 --name node{id}\n"
            f"BASE_PORT = {random.randrange(20000, 32000, 10)}\nMIN_NODES = 0\nMAX_NODES = 2\n"
            "SCALE_TO_ZERO = 1\nZERO_IDLE_TIME = 30\nWAKE_TIMEOUT = 30\nSTART_TIMEOUT = 20\n"
            "POLL_INTERVAL = 0.5\nSTOP_GRACE = 5\n"
            f"[DBACCESS]\nSERVER = 127.0.0.1\nPORT = {db_port}\nDATABASE = POSTGRES\nALIAS = P12\n"
            "CHECK_INTERVAL = 0.2\nCONNECT_TIMEOUT = 0.5\nDOWN_AFTER_FAILURES = 1\nUP_AFTER_SUCCESSES = 1\n")
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        self.addCleanup(self.kill_nodes, broker)
        return broker

    def kill_nodes(self, broker: TwistdChild) -> None:
        for pid in {int(p) for p in re.findall(r"node \d+: pid (\d+):", broker.text())}:
            try:
                os.killpg(pid, 9)
            except OSError:
                pass

    @defer.inlineCallbacks
    def test_login_held_until_dependency_up_then_served(self) -> Any:
        """DBACCESS closed at the first login: held, no node started; opened 1 s later: the node starts and the login is served."""
        yield defer.ensureDeferred(self._held_then_served())

    async def _held_then_served(self) -> None:
        db_port = closed_port()
        broker = self.broker(db_port)
        port = await broker.listening()
        await wait_for(broker, rf"dependency DBACCESS \(127.0.0.1:{db_port}\) is down")
        payload = random.Random(5).randbytes(32 * 1024)
        client = TimedLogin()
        await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port, timeout=5)
        client.transport.write(payload)
        await wait_for(broker, r"waking BALANCE_SMART_CLIENT_DESKTOP: waiting for DBACCESS")
        await sleep(1.0)
        text = broker.text()
        self.assertIsNone(re.search(r"node 1: pid", text), text[-3000:])  # no AppServer without DbAccess
        self.assertEqual((client.data, client.lost), (b"", False))  # held, not refused
        dbaccess = ServerFactory()
        dbaccess.protocol = Protocol
        listener = reactor.listenTCP(db_port, dbaccess, interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        opened_at = time.monotonic()
        self.assertTrue(await client.until(1, 30.0), broker.text()[-3000:])
        line_end = client.data.find(b"\r\n")
        while line_end < 0 and not client.lost:
            await sleep(0.005)
            line_end = client.data.find(b"\r\n")
        self.assertTrue(await client.until(line_end + 2 + len(payload), 10.0))
        assert client.first_byte_at is not None
        text = broker.text()
        deps_up = re.search(r"DBACCESS up after ([\d.]+) s; starting 1 node", text)
        ready = re.search(r"node 1 starting -> active: ready in ([\d.]+)s", text)
        assert deps_up is not None and ready is not None, text[-4000:]
        line, _, echoed = client.data.partition(b"\r\n")
        print(f"\ndependency order: login held {client.first_byte_at - client.connected_at:.2f}s in all; "
              f"DBACCESS opened after {opened_at - client.connected_at:.2f}s, broker saw it up after "
              f"{float(deps_up.group(1)):.1f} s of waiting; DBACCESS open -> first AppServer byte "
              f"{(client.first_byte_at - opened_at) * 1000:.0f} ms (node spawn -> ready "
              f"{float(ready.group(1)) * 1000:.0f} ms)")
        self.assertTrue(line.startswith(b"PROTHEUS-SIM node1"))
        self.assertEqual(echoed, payload)
        self.assertLess(text.index("DBACCESS up after"), text.index("node 1: pid"))
        client.transport.loseConnection()
