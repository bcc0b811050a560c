"""Scale to zero in [BALANCE_HTTP] end to end: a real broker (MIN_NODES=0, SCALE_TO_ZERO=1) holds
the first browser request while it wakes a real sample AppServer (``--http``), answers it from
that node, and goes back to zero ZERO_IDLE_TIME after the last request ended."""

from __future__ import annotations

import os
import random
import re
import sys
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.web.client import Agent, readBody

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import ProcessTestCase, kill_logged_groups, sleep

TWISTD = "from twisted.scripts.twistd import run; run()"
_HTTP_LISTENING = re.compile(r"\[BALANCE_HTTP\] HTTP listening on 127\.0\.0\.1:(\d+)")


async def wait_for(broker: TwistdChild, pattern: str, count: int = 1, patience: float = 30.0) -> float:
    """Wait until *pattern* appears *count* times in the broker's output; the monotonic time then."""
    deadline = time.monotonic() + patience
    while len(re.findall(pattern, broker.text())) < count:
        if time.monotonic() > deadline or broker.ended.called:
            raise AssertionError(f"{pattern!r} not seen {count} times:\n{broker.text()[-4000:]}")
        await sleep(0.01)
    return time.monotonic()


class HttpScaleToZeroE2ETests(ProcessTestCase):
    timeout = 120

    async def broker(self, idle: float) -> tuple[TwistdChild, int]:
        script = os.path.join(self.mktemp_dir(), "twistd.py")
        with open(script, "w") as handle:
            handle.write(TWISTD + "\n")
        base = random.randrange(20000, 32000, 10)
        ini = ("[GENERAL]\nConsoleLog = 1\n"
               "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
               "SORT_METHOD = CONNECTION\nREMOTE_SERVER_01 = 127.0.0.1 1\nMONITORING_TYPE = DISABLED\n"
               "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\nMONITORING_TYPE = DISABLED\n"
               f"NODE_COMMAND = {sys.executable} {script} --nodaemon --pidfile= protheus-appserver-sim --http "
               "--port tcp:{port}:interface=127.0.0.1 --name hnode{id}\n"
               f"BASE_PORT = {base}\nMIN_NODES = 0\nMAX_NODES = 2\nSCALE_TO_ZERO = 1\nZERO_IDLE_TIME = {idle:g}\n"
               "WAKE_TIMEOUT = 30\nSTART_TIMEOUT = 20\nPOLL_INTERVAL = 0.5\nIDLE_TIME = 1\nSTOP_GRACE = 5\n")
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", self.write_ini(ini, "broker.ini")))
        self.addCleanup(self.kill_nodes, broker)
        await wait_for(broker, _HTTP_LISTENING.pattern)
        match = _HTTP_LISTENING.search(broker.text())
        assert match is not None
        return broker, int(match.group(1))

    def kill_nodes(self, broker: TwistdChild) -> None:
        kill_logged_groups(broker.text())

    async def get(self, port: int, path: str) -> tuple[int, str, float]:
        """GET *path*: the status, the body and the seconds from sending to the whole answer."""
        started = time.monotonic()
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        body = (await readBody(response)).decode()
        return response.code, body, time.monotonic() - started

    @defer.inlineCallbacks
    def test_first_request_wakes_a_node_and_pool_sleeps_again(self) -> Any:
        """The first request to the empty pool is held, wakes a node and is answered 200 by it; the
        node is stopped ZERO_IDLE_TIME after the last request ended; the next request wakes one again."""
        yield defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        idle = 2.0
        broker, port = await self.broker(idle)
        await sleep(0.5)
        self.assertNotIn("starting node", broker.text())  # asleep from the start: no node
        self.assertNotIn("-> active", broker.text())
        code, body, took = await self.get(port, "/health")
        answered_at = time.monotonic()
        text = broker.text()
        ready = re.search(r"node 1 starting -> active: ready in ([\d.]+)s", text)
        woke = re.search(r"woke in ([\d.]+)s", text)
        assert ready is not None and woke is not None, text[-4000:]
        spawn_to_ready, wake = float(ready.group(1)), float(woke.group(1))
        print(f"\nHTTP scale to zero, first request: arrival -> response {took * 1000:.1f} ms; node spawn -> "
              f"ready {spawn_to_ready * 1000:.1f} ms; controller wake -> ready {wake * 1000:.1f} ms; "
              f"margin {(spawn_to_ready + 0.1 - took) * 1000:.1f} ms")
        self.assertEqual((code, body), (200, "ok hnode1\n"))
        self.assertIn("first connection to an empty pool", text)
        # awake: a second request goes straight to the node
        code, body, warm = await self.get(port, "/health")
        print(f"HTTP scale to zero, warm request: arrival -> response {warm * 1000:.1f} ms")
        self.assertEqual((code, body), (200, "ok hnode1\n"))
        answered_at = time.monotonic()
        stopped_at = await wait_for(broker, r"node 1 ended", patience=idle + 15)
        asleep = stopped_at - answered_at
        print(f"HTTP scale to zero: the node was stopped {asleep:.2f}s after the last request ended "
              f"(ZERO_IDLE_TIME={idle:g}s)")
        self.assertGreaterEqual(asleep, idle - 0.05)  # the countdown runs from the end of the request
        self.assertRegex(broker.text(), r"scale 1 -> 0: no session for \d+s \(ZERO_IDLE_TIME=2s\)")
        # asleep again: the next request wakes a node again
        code, body, again = await self.get(port, "/health")
        print(f"HTTP scale to zero, second wake: arrival -> response {again * 1000:.1f} ms")
        self.assertEqual((code, body), (200, "ok hnode1\n"))  # (the id is free again)
        self.assertEqual(len(re.findall(r"node 1 starting -> active", broker.text())), 2)  # a new process
        self.assertNotIn("Traceback", broker.text())
