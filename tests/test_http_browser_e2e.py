"""[BALANCE_HTTP] end to end with a real browser: two sample HTTP AppServers (``protheus-appserver-sim
--http``) behind a twistd broker, a headless Chromium driven by Selenium. The page keeps its session on
one server across reloads (same name, counter growing) through the affinity cookie, and holds a
WebSocket open through the broker (echo round trips shown on the page). A screenshot is saved to
$PROTHEUS_BROKER_ARTIFACTS (or the current directory)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

from twisted.internet import defer, threads

from protheus_broker.demo.children import TwistdChild, twistd_argv

from .helpers import ProcessTestCase

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
AFFINITY_COOKIE = "TOTVS_BROKER_SH_001"


def free_port() -> int:
    """A port nobody listens on right now (for the broker's [BALANCE_HTTP] unit)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, seconds: float) -> bool:
    """True once 127.0.0.1:*port* accepts a connection (blocking; run in a thread)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


class HttpBrowserTests(ProcessTestCase):
    timeout = 120

    async def sims(self, *names: str) -> dict[str, int]:
        """Sample HTTP AppServers on port 0: name -> port."""
        started = {n: self.start(n, twistd_argv("protheus-appserver-sim", "--http", "--name", n,
                                                "--port", "tcp:0:interface=127.0.0.1"))
                   for n in names}
        return {n: await c.listening() for n, c in started.items()}

    def ini(self, sims: dict[str, int], http_port: int) -> str:
        servers = "".join(f"REMOTE_SERVER_{i:02d} = 127.0.0.1 {port}\n"
                          for i, port in enumerate(sims.values(), 1))
        first = next(iter(sims.values()))
        return ("[GENERAL]\nConsoleLog = 1\n"
                "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
                f"REMOTE_SERVER_01 = 127.0.0.1 {first}\nSORT_METHOD = ROUND_ROBIN\nMONITORING_TYPE = DISABLED\n"
                f"[BALANCE_HTTP]\nLOCAL_SERVER_PORT = {http_port}\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
                + servers + "SORT_METHOD = ROUND_ROBIN\nMONITORING_TYPE = DISABLED\n")

    async def broker(self, sims: dict[str, int]) -> tuple[TwistdChild, int]:
        """A broker with [BALANCE_HTTP] over *sims*; its HTTP port once it accepts connections."""
        http_port = free_port()
        path = self.write_ini(self.ini(sims, http_port), "broker.ini")
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        await broker.listening()
        if "[BALANCE_HTTP] is not supported" in broker.text() or not await threads.deferToThread(wait_port, http_port, 15):
            self.fail(f"the broker does not serve [BALANCE_HTTP] on {http_port}:\n{broker.text()}")
        return broker, http_port

    @defer.inlineCallbacks
    def test_session_sticks_and_websocket_holds(self) -> Any:
        """Reloads stay on one AppServer (its counter grows) and the page's WebSocket echoes through
        the broker; a screenshot is saved (path printed)."""
        yield defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        sims = await self.sims("web-a", "web-b")
        _, port = await self.broker(sims)
        await self.browse(f"http://127.0.0.1:{port}/", set(sims), affinity=True)

    async def browse(self, url: str, names: set[str], affinity: bool) -> None:
        """Load *url*, reload it, check the session and the WebSocket, save a screenshot."""
        missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
        if missing:
            self.fail(f"the browser test needs {' and '.join(missing)}: "
                      "apt-get install chromium chromium-driver")
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def start() -> Any:
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--no-proxy-server", "--window-size=1024,700"):
                options.add_argument(flag)
            return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)

        driver = await threads.deferToThread(start)
        self.addCleanup(threads.deferToThread, driver.quit)

        def text(element_id: str) -> str:
            return str(driver.find_element(By.ID, element_id).text)

        def echoes_reach(count: int) -> Callable[[], None]:
            def wait() -> None:
                WebDriverWait(driver, 20).until(
                    lambda d: text("ws-state") == "open" and int(text("ws-count") or 0) >= count,
                    f"the WebSocket never reached {count} echoes")
            return wait

        def load() -> tuple[str, int]:
            driver.get(url)
            return text("server"), int(text("counter"))

        server, counter = await threads.deferToThread(load)
        self.assertIn(server, names)
        self.assertEqual(counter, 1)
        await threads.deferToThread(echoes_reach(1))
        for expected in (2, 3, 4):
            self.assertEqual(await threads.deferToThread(load), (server, expected))
        await threads.deferToThread(echoes_reach(3))  # held open across several round trips
        self.assertEqual(text("ws-echo")[:len("echo: hello ")], "echo: hello ")
        self.assertTrue(text("ws-echo").endswith(f"from {server}"), text("ws-echo"))
        cookies = {c["name"]: c for c in await threads.deferToThread(driver.get_cookies)}
        if affinity:
            self.assertIn(AFFINITY_COOKIE, cookies)
            self.assertTrue(cookies[AFFINITY_COOKIE].get("httpOnly"))
            self.assertNotIn("127.0.0.1", cookies[AFFINITY_COOKIE]["value"])

        shots = os.environ.get("PROTHEUS_BROKER_ARTIFACTS") or os.getcwd()
        os.makedirs(shots, exist_ok=True)
        path = os.path.abspath(os.path.join(shots, "http-balance-page.png"))
        self.assertTrue(await threads.deferToThread(driver.save_screenshot, path))
        print(f"\n[BALANCE_HTTP] page screenshot saved: {path}")

        await threads.deferToThread(driver.delete_all_cookies)  # a new browser session starts over
        server_after, counter_after = await threads.deferToThread(load)
        self.assertIn(server_after, names)
        self.assertEqual(counter_after, 1)
        errors = await threads.deferToThread(driver.get_log, "browser")
        self.assertEqual([e for e in errors if e.get("level") == "SEVERE"], [])
