"""The broker screen end to end: a twistd broker with [BROKER_ADMIN], the CLI, the status query
on the SmartClient port, malformed requests, and a headless Chromium driven by Selenium."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.internet.utils import getProcessOutputAndValue

from protheus_broker.children import TwistdChild, twistd_argv
from protheus_broker.web.auth import hash_token

from . import test_e2e
from .helpers import ProcessTestCase
from .test_e2e import Client

TOKEN = "e2e-token-0123456789-abcdef"
_SCREEN = re.compile(r"broker screen at http://127\.0\.0\.1:(\d+)/")
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # package builds set http_proxy
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def http(method: str, url: str, token: str | None = None, data: bytes | None = None) -> tuple[int, Any]:
    """Blocking HTTP call (run in a thread): status and parsed JSON (or text)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=data if data is not None else (b"" if method == "POST" else None))
    try:
        with NO_PROXY.open(request, timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def raw(port: int, data: bytes) -> bytes:
    """Send *data* on a fresh connection and read until the peer closes (thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


class ScreenProcessTests(ProcessTestCase):
    timeout = 120
    sims = test_e2e.ProcessTests.sims
    ini = test_e2e.ProcessTests.ini
    login = test_e2e.ProcessTests.login
    echo = test_e2e.ProcessTests.echo

    async def broker(self, sims: dict[str, tuple[TwistdChild, int]]) -> tuple[TwistdChild, int, str]:
        admin = (f"[BROKER_ADMIN]\nENDPOINT = tcp:0:interface=127.0.0.1\n"
                 f"TOKEN_HASH = {hash_token(TOKEN, iterations=20_000)}\nHISTORY_INTERVAL = 0.5\n")
        path = self.write_ini(self.ini(sims, admin))
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        port = await broker.listening()
        match = _SCREEN.search(broker.text())
        assert match is not None, broker.text()
        return broker, port, f"http://127.0.0.1:{match.group(1)}"

    async def ctl(self, url: str, *args: str) -> tuple[str, int]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "protheus_broker.ctl", "--url", url, *args],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PROTHEUS_BROKER_TOKEN": TOKEN})
        return (out + err).decode(), code

    @defer.inlineCallbacks
    def test_api_cli_port_status_and_bad_requests(self) -> Any:
        """The CLI prints tables and drains; the SmartClient port answers /status; garbage and
        unauthenticated actions get 4xx while sessions carry on."""
        yield defer.ensureDeferred(self._api_scenario())

    async def _api_scenario(self) -> None:
        sims = await self.sims("a", "b")
        broker, port, url = await self.broker(sims)
        first = await self.login(port)
        out, code = await self.ctl(url, "servers")
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"A\s+127\.0\.0\.1:\d+\s+up\s+1")
        out, code = await self.ctl(url, "drain", "B")
        self.assertEqual((code, out.strip()), (0, "drain: server B is now draining (drained by admin (token@127.0.0.1))"))
        self.assertEqual([(await self.login(port)).name for _ in range(2)], ["a", "a"])
        out, code = await self.ctl(url, "sessions")
        self.assertIn("3 sessions", out)
        out, code = await self.ctl(url, "--token", "wrong-token-000000", "ready", "B")
        self.assertEqual(code, 1)
        self.assertIn("HTTP 401: wrong token", out)

        # HTTP on the SmartClient port: the TOTVS-style status query; no session is opened.
        text = await threads.deferToThread(raw, port, b"GET /status HTTP/1.0\r\n\r\n")
        self.assertIn(b"HTTP/1.0 200", text)
        self.assertIn(b"server B", text)
        self.assertIn(b"draining", text)

        # Malformed and unauthenticated requests: clear 4xx, broker unaffected.
        garbage = await threads.deferToThread(raw, int(url.rsplit(":", 1)[1]), b"\x00\xffNOT HTTP\r\n\r\n")
        self.assertIn(b" 400 ", garbage.split(b"\r\n")[0] + b" ")
        status, body = await threads.deferToThread(http, "POST", url + "/api/v1/servers/A/down")
        self.assertEqual(status, 401)
        status, body = await threads.deferToThread(http, "GET", url + "/api/v1/sessions?page=zero")
        self.assertEqual((status, body["error"]), (400, "query parameter page: expected a whole number, got 'zero'"))
        status, metrics = await threads.deferToThread(http, "GET", url + "/metrics")
        self.assertIn('protheus_broker_server_state{address=', metrics)
        await self.echo(first, 1000, 1)
        out, code = await self.ctl(url, "status")
        self.assertIn("sessions 3", out)

    @defer.inlineCallbacks
    def test_browser_sees_sessions_and_drains(self) -> Any:
        """Headless Chromium: the page follows sessions opening and closing, Drain works, and a
        screenshot is saved (path printed)."""
        yield defer.ensureDeferred(self._browser_scenario())

    async def _browser_scenario(self) -> None:
        missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
        if missing:
            self.fail(f"the browser test needs {' and '.join(missing)}: "
                      "apt-get install chromium chromium-driver")
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        sims = await self.sims("a", "b")
        broker, port, url = await self.broker(sims)

        def start() -> Any:
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--window-size=1280,1000"):
                options.add_argument(flag)
            return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)

        driver = await threads.deferToThread(start)
        self.addCleanup(threads.deferToThread, driver.quit)

        def text_becomes(selector: str, wanted: str) -> Callable[[], None]:
            def wait() -> None:
                # the cards are redrawn on each refresh: an element may go stale between
                # finding it and reading it, which is only "not yet"
                WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,)).until(
                    lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, selector)] == [wanted],
                    f"{selector} never showed {wanted!r}")
            return wait

        await threads.deferToThread(driver.get, url + "/")
        await threads.deferToThread(text_becomes("#sessions-count", "0"))
        clients: list[Client] = [await self.login(port) for _ in range(3)]
        await threads.deferToThread(text_becomes("#sessions-count", "3"))
        await threads.deferToThread(text_becomes('tr[data-server="A"] td.connections', "2"))
        clients[0].transport.loseConnection()
        await clients[0].done
        await threads.deferToThread(text_becomes("#sessions-count", "2"))

        def drain() -> None:
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            driver.find_element(By.ID, "use").click()
            for _ in range(10):  # the table is redrawn every refresh: find the button afresh
                try:
                    driver.find_element(By.CSS_SELECTOR, 'button[data-action="drain"][data-server="B"]').click()
                    return
                except StaleElementReferenceException:
                    continue
            raise AssertionError("the Drain button kept going stale")
        await threads.deferToThread(drain)
        await threads.deferToThread(text_becomes('tr[data-server="B"] .state', "draining"))
        self.assertEqual((await self.login(port)).name, "a")
        await threads.deferToThread(text_becomes("#sessions-count", "3"))
        await threads.deferToThread(text_becomes("#msg", "Drain B: done"))

        shots = os.environ.get("PROTHEUS_BROKER_ARTIFACTS") or os.getcwd()
        os.makedirs(shots, exist_ok=True)
        path = os.path.abspath(os.path.join(shots, "broker-screen.png"))
        self.assertTrue(await threads.deferToThread(driver.save_screenshot, path))
        print(f"\nbroker screen screenshot saved: {path}")
        errors = await threads.deferToThread(driver.get_log, "browser")
        self.assertEqual([e for e in errors if e.get("level") == "SEVERE"], [])
