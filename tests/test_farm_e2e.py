"""The server farm end to end: two real protheus-agents on 127.0.0.2 and 127.0.0.3 run the sample
AppServer as nodes of a real broker; the broker restarts and adopts them without a restart."""

from __future__ import annotations

import os
import random
import re
import sys
import tempfile
import shutil
import time
from typing import Any

from twisted.internet import defer

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import FARM_NODE_PID, ProcessTestCase, kill_logged_groups, login, sleep

TWISTD = "from twisted.scripts.twistd import run; run()"
SECRET = "farm-e2e-secret-0123456789"


class FarmE2ETests(ProcessTestCase):
    timeout = 120

    def script(self) -> str:
        path = tempfile.mkdtemp(prefix="farm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, path, True)
        script = os.path.join(path, "twistd.py")
        with open(script, "w") as handle:
            handle.write(TWISTD + "\n")
        return script

    def agent(self, address: str, base: int, script: str) -> TwistdChild:
        path = self.write_ini(
            f"[AGENT]\nPORT = 0\nINTERFACE = {address}\nSECRET = {SECRET}\n[NODES]\n"
            f"COMMAND_APPSERVER = {sys.executable} {script} --nodaemon --pidfile= protheus-appserver-sim "
            f"--port tcp:{{port}}:interface={address} --name farm{address.rsplit('.', 1)[1]}-node{{id}}\n"
            f"HOST = {address}\nBASE_PORT = {base}\nMAX_NODES = 4\nSTOP_GRACE = 3\n", name="agent.ini")
        agent = self.start(f"agent-{address}", twistd_argv("protheus-agent", "--config", path))
        self.addCleanup(self.kill_nodes, agent)
        return agent

    def kill_nodes(self, agent: TwistdChild) -> None:
        kill_logged_groups(agent.text(), FARM_NODE_PID)

    def broker(self, hosts: str, extra: str = "", broker_id: str = "e2e-broker") -> TwistdChild:
        path = self.write_ini(
            "[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
            "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
            "CONNECT_TIMEOUT = 2\nWAIT_FOR_SERVER = 10\nNODES = NODES_DESKTOP\n[NODES_DESKTOP]\n"
            f"FARM_HOSTS = {hosts}\nFARM_SECRET = {SECRET}\nFARM_BROKER_ID = {broker_id}\nFARM_WAIT = 3\n"
            "MIN_NODES = 2\nMAX_NODES = 4\nSESSIONS_PER_NODE = 100\nPOLL_INTERVAL = 0.5\nSTART_TIMEOUT = 20\n" + extra)
        return self.start("broker", twistd_argv("protheus-broker", "--config", path))

    async def wait_for(self, child: TwistdChild, pattern: str, count: int, patience: float = 30.0) -> None:
        deadline = time.monotonic() + patience
        while len(re.findall(pattern, child.text())) < count:
            if time.monotonic() > deadline:
                self.fail(f"{child.name}: fewer than {count} of {pattern!r}:\n{child.text()[-4000:]}")
            await sleep(0.05)

    async def logins(self, port: int, count: int) -> tuple[int, set[str]]:
        ok = 0
        for number in range(count):
            answered, _ = await login(port, number)
            ok += answered
        return ok, set()

    @defer.inlineCallbacks
    def test_two_farm_hosts_take_sessions_and_survive_a_broker_restart(self) -> Any:
        """Nodes on two agents take sessions; a restarted broker adopts them (no new node process)."""
        yield defer.ensureDeferred(self._farm())

    async def _farm(self) -> None:
        script = self.script()
        base = random.randrange(20000, 32000, 10)
        agents = [self.agent("127.0.0.2", base, script), self.agent("127.0.0.3", base, script)]
        ports = [await a.listening() for a in agents]
        hosts = f"127.0.0.2:{ports[0]}, 127.0.0.3:{ports[1]}"
        started = time.monotonic()
        broker = self.broker(hosts)
        port = await broker.listening()
        await self.wait_for(broker, r"-> active", 2)
        ready = time.monotonic() - started
        for agent in agents:
            await self.wait_for(agent, r"farm: broker e2e-broker node \d+: pid \d+ on", 1)
        ok, _ = await self.logins(port, 20)
        text = broker.text()
        members = sorted(set(re.findall(r"on farm host (127\.0\.0\.[23]):\d+: pid \d+, port (\d+)", text)))
        print(f"\nfarm: 2 nodes on {members} active {ready:.2f}s after the broker started; "
              f"{ok}/20 logins answered")
        self.assertEqual(ok, 20)
        self.assertEqual([h for h, _ in members], ["127.0.0.2", "127.0.0.3"])
        launched = [len(re.findall(r"farm: broker e2e-broker node \d+: pid \d+ on", a.text())) for a in agents]
        node_pids = sorted(int(p) for a in agents
                           for p in re.findall(r"farm: broker e2e-broker node \d+: pid (\d+) on", a.text()))

        broker.signal("TERM")  # the broker goes (its farm channels with it); the nodes stay
        await broker.ended
        self.assertIn("left running on farm host", broker.text())
        for agent in agents:
            await self.wait_for(agent, r"broker e2e-broker link lost; its 1 nodes keep running", 1)
        restarted_at = time.monotonic()
        second = self.broker(hosts)
        port = await second.listening()
        await self.wait_for(second, r"-> active", 2)
        adopted_in = time.monotonic() - restarted_at
        ok, _ = await self.logins(port, 20)
        print(f"farm: broker restarted, 2 nodes adopted {adopted_in:.2f}s after its start; {ok}/20 logins; "
              f"node pids {node_pids}")
        self.assertEqual(ok, 20)
        self.assertEqual(len(re.findall(r"node \d+ adopted on farm host", second.text())), 2)
        self.assertEqual([len(re.findall(r"farm: broker e2e-broker node \d+: pid \d+ on", a.text()))
                          for a in agents], launched)  # no node process started again
        for pid in node_pids:
            os.kill(pid, 0)  # still running
        for child in [broker, second, *agents]:
            self.assertNotIn("Traceback", child.text())
            self.assertNotIn("Unhandled", child.text())

    @defer.inlineCallbacks
    def test_second_broker_is_refused_the_farms_persistent_node(self) -> Any:
        """Two brokers (their own lock dirs), one application: the first farm host runs one persistent node."""
        yield defer.ensureDeferred(self._persistent())

    async def _persistent(self) -> None:
        script = self.script()
        base = random.randrange(20000, 32000, 10)
        agent = self.agent("127.0.0.2", base, script)
        hosts = f"127.0.0.2:{await agent.listening()}"
        extra = "PERSISTENT = 1\nAPPLICATION = ERP\nLOCK_DIR = {}\n"
        first = self.broker(hosts, extra.format(self.mktemp_dir()), "broker-a")
        await first.listening()
        await self.wait_for(first, r"node 1 starting -> active", 1)
        second = self.broker(hosts, extra.format(self.mktemp_dir()), "broker-b")
        await second.listening()
        await self.wait_for(second, r"no persistent node here: the first farm host", 1)
        await self.wait_for(second, r"-> active", 2)  # its ordinary nodes run
        await sleep(6.0)  # a PERSISTENT_RETRY round (5 s): asked again, still refused, no crash loop
        text = second.text()
        reason = re.search(r"no persistent node here: (.*)", text)
        assert reason is not None, text[-3000:]
        print(f"\nsecond broker: no persistent node here: {reason.group(1)}")
        persistent = re.findall(r"farm: broker (\S+) node \d+ \(persistent\): pid", agent.text())
        self.assertEqual(persistent, ["broker-a"])
        self.assertEqual(len(re.findall(r"node 1 ended: farm host \S+ refused it: the persistent node of ERP", text)), 1)
        self.assertNotIn("crash loop", text)
