"""Managed nodes in [BALANCE_HTTP] end to end: a real broker starts sample AppServers in --http
mode (on Unix sockets, or TCP ports) and answers browser requests through them."""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, readBody

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import ProcessTestCase, kill_logged_groups

TWISTD = "from twisted.scripts.twistd import run; run()"
_HTTP_LISTENING = re.compile(r"\[BALANCE_HTTP\] HTTP listening on 127\.0\.0\.1:(\d+)")


class HttpNodesE2ETests(ProcessTestCase):
    timeout = 90

    def node_dir(self) -> str:
        path = tempfile.mkdtemp(prefix="hnodes-", dir="/tmp")  # short: Unix socket paths are <= 107 bytes
        self.addCleanup(shutil.rmtree, path, True)
        return path

    async def broker(self, nodes: str) -> tuple[TwistdChild, int]:
        ini = ("[GENERAL]\nConsoleLog = 1\n"
               "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
               "REMOTE_SERVER_01 = 127.0.0.1 1\nMONITORING_TYPE = DISABLED\n"
               "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
               "MONITORING_TYPE = DISABLED\nNODES = NODES_HTTP\n[NODES_HTTP]\n" + nodes)
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", self.write_ini(ini, "broker.ini")))
        self.addCleanup(self.kill_nodes, broker)
        deadline = time.monotonic() + 30
        while not (_HTTP_LISTENING.search(broker.text()) and len(re.findall("-> active", broker.text())) >= 2):
            if time.monotonic() > deadline or broker.ended.called:
                self.fail(f"no HTTP port or fewer than 2 active nodes:\n{broker.text()[-4000:]}")
            await task.deferLater(reactor, 0.05, lambda: None)
        match = _HTTP_LISTENING.search(broker.text())
        assert match is not None
        return broker, int(match.group(1))

    def kill_nodes(self, broker: TwistdChild) -> None:
        kill_logged_groups(broker.text())

    def command(self, where: str) -> str:
        script = os.path.join(self.node_dir(), "twistd.py")
        with open(script, "w") as handle:
            handle.write(TWISTD + "\n")
        return (f"NODE_COMMAND = {sys.executable} {script} --nodaemon --pidfile= protheus-appserver-sim --http "
                f"{where} --name hnode{{id}}\n")

    async def requests(self, port: int, count: int) -> tuple[int, set[str]]:
        """*count* GET /health at once (so the balancing spreads them)."""
        agent = Agent(reactor)

        async def one() -> str:
            response = await agent.request(b"GET", f"http://127.0.0.1:{port}/health".encode())
            body = (await readBody(response)).decode()
            return body.split()[1] if response.code == 200 and body.startswith("ok hnode") else ""
        answers = await defer.gatherResults([defer.ensureDeferred(one()) for _ in range(count)])
        return sum(1 for a in answers if a), {a for a in answers if a}

    @defer.inlineCallbacks
    def test_unix_socket_nodes_answer_http(self) -> Any:
        """TRANSPORT=UNIX: the HTTP unit reaches its nodes at their socket paths."""
        yield defer.ensureDeferred(self._scenario("UNIX"))

    @defer.inlineCallbacks
    def test_tcp_nodes_answer_http(self) -> Any:
        """TRANSPORT=TCP: the HTTP unit's nodes listen on BASE_PORT + id."""
        yield defer.ensureDeferred(self._scenario("TCP"))

    async def _scenario(self, transport: str) -> None:
        if transport == "UNIX":
            sockets = self.node_dir()
            nodes = self.command("--unix {socket}") + f"TRANSPORT = UNIX\nSOCKET_DIR = {sockets}\n"
        else:
            base = random.randrange(20000, 32000, 10)
            nodes = self.command("--port tcp:{port}:interface=127.0.0.1") + f"BASE_PORT = {base}\n"
        started = time.monotonic()
        broker, port = await self.broker(nodes + "MIN_NODES = 2\nPOLL_INTERVAL = 0.5\n")
        ready = time.monotonic() - started
        ok, names = await self.requests(port, 20)
        print(f"\nHTTP unit, {transport} nodes: 2 active {ready:.2f}s after start; {ok}/20 requests answered "
              f"by {sorted(names)}")
        self.assertEqual(ok, 20)
        self.assertTrue(names <= {"hnode1", "hnode2"} and names, names)
        if transport == "UNIX":
            self.assertIn(f"unix:{sockets}/node-1.sock", broker.text())
        self.assertNotIn("Traceback", broker.text())
