"""protheus-broker-ctl's node commands as a process against a real twistd broker whose nodes are
real processes on 127.0.0.1: nodes, scale, recycle, discard, and the broker's refusals."""

from __future__ import annotations

import os
import random
import re
import json
import socket
import sys
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue

from protheus_broker.demo.children import TwistdChild, twistd_argv
from protheus_broker.web.auth import hash_token

from .helpers import FARM_NODE_PID, ProcessTestCase, kill_logged_groups, sleep
from .test_web_e2e import _SCREEN

TOKEN = "e2e-token-0123456789-abcdef"

#: A node: accepts connections on the port it is given (SIGTERM ends it).
NODE = """\
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", int(sys.argv[1])))
server.listen(16)
while True:
    connection, _ = server.accept()
    connection.close()
"""


class CtlNodesE2ETests(ProcessTestCase):
    timeout = 120

    async def broker(self) -> tuple[TwistdChild, str]:
        script = os.path.join(self.mktemp_dir(), "node.py")
        with open(script, "w") as handle:
            handle.write(NODE)
        base = random.randrange(20000, 32000, 10)
        path = self.write_ini(
            "[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
            "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
            f"NODE_COMMAND = {sys.executable} {script} {{port}}\nBASE_PORT = {base}\nMIN_NODES = 1\n"
            "MAX_NODES = 3\nPOLL_INTERVAL = 0.5\nIDLE_TIME = 1\nSTOP_GRACE = 2\n"
            f"[BROKER_ADMIN]\nENDPOINT = tcp:0:interface=127.0.0.1\n"
            f"TOKEN_HASH = {hash_token(TOKEN, iterations=20_000)}\n")
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        self.addCleanup(self.kill_nodes, broker)
        await broker.listening()
        match = _SCREEN.search(broker.text())
        assert match is not None, broker.text()
        return broker, f"http://127.0.0.1:{match.group(1)}"

    def kill_nodes(self, broker: TwistdChild) -> None:
        kill_logged_groups(broker.text())

    async def ctl(self, url: str, *argv: str) -> tuple[int, str, str]:
        started = time.monotonic()
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "protheus_broker.web.ctl", "--url", url, *argv],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PROTHEUS_BROKER_TOKEN": TOKEN})
        print(f"\n$ protheus-broker-ctl {' '.join(argv)}  -> exit {code} in {time.monotonic() - started:.2f}s\n"
              f"{out.decode()}{err.decode()}", end="")
        return code, out.decode(), err.decode()

    async def until_rows(self, url: str, wanted: list[str], patience: float = 30.0) -> str:
        """`nodes` until its rows (id and state) are *wanted*."""
        deadline = time.monotonic() + patience
        while True:
            out, _, code = await getProcessOutputAndValue(
                sys.executable, ["-m", "protheus_broker.web.ctl", "--url", url, "nodes"],
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            text = out.decode()
            rows = [" ".join(line.split()[:2]) for line in text.splitlines()[3:] if line[:1].isdigit()]
            if code == 0 and rows == wanted:
                return text
            if time.monotonic() > deadline:
                self.fail(f"nodes never showed {wanted}; last:\n{text}")
            await sleep(0.2)

    @defer.inlineCallbacks
    def test_nodes_scale_recycle_discard(self) -> Any:
        """nodes lists the running node; scale 2 starts one; recycle 1 replaces node 1; discard of an
        unknown node and a MIN above MAX_NODES are the broker's one-line refusals (exit 1)."""
        yield defer.ensureDeferred(self._flow())

    async def _flow(self) -> None:
        broker, url = await self.broker()
        started = time.monotonic()
        await self.until_rows(url, ["1 active"])
        print(f"\nfirst node active {time.monotonic() - started:.2f}s after the broker listened")
        code, out, err = await self.ctl(url, "nodes")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines()[1].split(), ["ID", "STATE", "PERSISTENT", "SESSIONS", "MEMORY", "AGE",
                                                       "ENDPOINT"])
        row = out.splitlines()[3].split()
        self.assertEqual(row[:4], ["1", "active", "no", "0"])
        self.assertGreater(int(row[4]), 1_000_000)  # the node's RSS, measured
        code, out, err = await self.ctl(url, "scale", "2")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("scale: MIN_NODES of BALANCE_SMART_CLIENT_DESKTOP is 2 for this run; "), out)
        await self.until_rows(url, ["1 active", "2 active"])
        code, out, err = await self.ctl(url, "recycle", "1", "--pool", "BALANCE_SMART_CLIENT_DESKTOP")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("recycle: node 1 of BALANCE_SMART_CLIENT_DESKTOP: done;"), out)
        await self.until_rows(url, ["2 active", "3 active"])  # a replacement first, then node 1 went
        self.assertRegex(broker.text(), r"node 1 (active|suspended) -> discarded")
        code, out, err = await self.ctl(url, "discard", "9")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "protheus-broker-ctl: POST /api/v1/nodes/9/discard: HTTP 404: "
                              "no node 9 in pool BALANCE_SMART_CLIENT_DESKTOP\n")
        code, out, err = await self.ctl(url, "scale", "9")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "protheus-broker-ctl: POST /api/v1/nodes/scale?min=9: HTTP 400: "
                              "min must be 0 to MAX_NODES=3, got 9\n")
        code, out, err = await self.ctl(url, "--token", "wrong-token-0123456789", "scale", "1")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("HTTP 401", err)
        code, out, err = await self.ctl(url, "status")
        self.assertEqual(code, 0)
        self.assertIn("\nnodes: 2 active (MIN_NODES 2, MAX_NODES 3; protheus-broker-ctl nodes)", out)


def closed_port(address: str) -> int:
    """A port on *address* that nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


class CtlFarmE2ETests(ProcessTestCase):
    """Farm links as the screen shows them: a real agent on 127.0.0.2, nothing on 127.0.0.3."""

    timeout = 120
    def kill_nodes(self, agent: TwistdChild) -> None:
        kill_logged_groups(agent.text(), FARM_NODE_PID)

    async def wait_for(self, child: TwistdChild, pattern: str, count: int, patience: float = 30.0) -> None:
        deadline = time.monotonic() + patience
        while len(re.findall(pattern, child.text())) < count:
            if time.monotonic() > deadline:
                self.fail(f"{child.name}: fewer than {count} of {pattern!r}:\n{child.text()[-4000:]}")
            await sleep(0.05)

    @defer.inlineCallbacks
    def test_farm_links_up_down_and_why(self) -> Any:
        """The agent's link is up with the broker's nodes on it; the host with nothing listening is
        down with the connect error; the agent stopped: its link goes down with the reason, in the
        status JSON, `nodes` and /metrics."""
        yield defer.ensureDeferred(self._farm())

    async def _farm(self) -> None:
        script = os.path.join(self.mktemp_dir(), "node.py")
        with open(script, "w") as handle:
            handle.write(NODE)
        base = random.randrange(20000, 32000, 10)
        agent_ini = self.write_ini(
            "[AGENT]\nPORT = 0\nINTERFACE = 127.0.0.2\nSECRET = farm-e2e-secret-0123456789\n[NODES]\n"
            f"COMMAND_APPSERVER = {sys.executable} {script} {{port}} 127.0.0.2\nHOST = 127.0.0.2\n"
            f"BASE_PORT = {base}\nMAX_NODES = 4\nSTOP_GRACE = 2\n", name="agent.ini")
        agent = self.start("agent", twistd_argv("protheus-agent", "--config", agent_ini))
        self.addCleanup(self.kill_nodes, agent)
        agent_port = await agent.listening()
        nobody = f"127.0.0.3:{closed_port('127.0.0.3')}"
        path = self.write_ini(
            "[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
            "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
            f"FARM_HOSTS = 127.0.0.2:{agent_port}, {nobody}\nFARM_SECRET = farm-e2e-secret-0123456789\n"
            "FARM_BROKER_ID = ctl-e2e\nFARM_WAIT = 1\nMIN_NODES = 2\nMAX_NODES = 4\nPOLL_INTERVAL = 0.5\n"
            f"[BROKER_ADMIN]\nENDPOINT = tcp:0:interface=127.0.0.1\n"
            f"TOKEN_HASH = {hash_token(TOKEN, iterations=20_000)}\n")
        started = time.monotonic()
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        await broker.listening()
        match = _SCREEN.search(broker.text())
        assert match is not None, broker.text()
        url = f"http://127.0.0.1:{match.group(1)}"
        await self.wait_for(broker, r"-> active", 2)
        print(f"\nfarm: 2 nodes active on the agent {time.monotonic() - started:.2f}s after the broker started")
        links = await self.farm(url)
        self.assertEqual([(x["host"], x["state"], x["nodes"]) for x in links],
                         [(f"127.0.0.2:{agent_port}", "up", [1, 2]), (nobody, "down", [])])
        self.assertIsNone(links[0]["problem"])
        self.assertIn("cannot connect: ", links[1]["problem"])
        self.assertIn("refused", links[1]["problem"])
        out = await self.ctl(url, "nodes")
        self.assertIn(f"\nfarm host 127.0.0.2:{agent_port} up since ", out)
        self.assertIn("2 node(s): 1, 2\n", out)
        self.assertIn(f"\nfarm host {nobody} down since ", out)
        metrics = await self.metrics(url)
        self.assertIn(f'protheus_broker_farm_link_up{{host="127.0.0.2:{agent_port}",'
                      'pool="BALANCE_SMART_CLIENT_DESKTOP"} 1.0', metrics)
        self.assertIn(f'protheus_broker_farm_link_up{{host="{nobody}",pool="BALANCE_SMART_CLIENT_DESKTOP"}} 0.0',
                      metrics)

        stopped = time.monotonic()
        agent.signal("TERM")
        await agent.ended
        deadline = time.monotonic() + 20
        while (links := await self.farm(url))[0]["state"] != "down":
            if time.monotonic() > deadline:
                self.fail(f"the agent's link never went down: {links}")
            await sleep(0.1)
        print(f"farm: the agent's link shown down {time.monotonic() - stopped:.2f}s after SIGTERM to the "
              f"agent; problem {links[0]['problem']!r}")
        self.assertTrue(links[0]["problem"], links)
        metrics = await self.metrics(url)
        self.assertIn(f'protheus_broker_farm_link_up{{host="127.0.0.2:{agent_port}",'
                      'pool="BALANCE_SMART_CLIENT_DESKTOP"} 0.0', metrics)
        print(await self.ctl(url, "nodes"))

    async def ctl(self, url: str, *argv: str) -> str:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "protheus_broker.web.ctl", "--url", url, *argv],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        self.assertEqual((code, err), (0, b""))
        return str(out.decode())

    async def farm(self, url: str) -> list[dict[str, Any]]:
        status = json.loads(await self.ctl(url, "--json", "status"))
        return list(status["pools"][0]["farm"])

    async def metrics(self, url: str) -> str:
        out, _, _ = await getProcessOutputAndValue(
            sys.executable, ["-c", "import sys, urllib.request; sys.stdout.write(urllib.request.build_opener("
                                   "urllib.request.ProxyHandler({})).open(sys.argv[1]).read().decode())",
                             url + "/metrics"])
        return str(out.decode())
