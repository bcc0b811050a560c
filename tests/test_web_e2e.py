"""The broker screen end to end: a twistd broker with [BROKER_ADMIN], the CLI, the status query
on the SmartClient port, malformed requests, and a headless Chromium driven by Selenium."""

from __future__ import annotations

import collections
import json
import os
import re
import select
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection
from typing import Any, Callable

from twisted.internet import defer, reactor, task, threads
from twisted.internet.utils import getProcessOutputAndValue

from protheus_broker.demo.children import TwistdChild, twistd_argv
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
            sys.executable, ["-m", "protheus_broker.web.ctl", "--url", url, *args],
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


def timed(port: int, method: str, path: str, token: str | None = None, source: str = "127.0.0.1",
          host: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, float]:
    """One request to 127.0.0.1:*port* from *source* (thread): status and seconds taken."""
    started = time.monotonic()
    connection = HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"
        if host is not None:
            sent["Host"] = host
        connection.request(method, path, headers=sent, body=b"" if method == "POST" else None)
        response = connection.getresponse()
        response.read()
        return response.status, time.monotonic() - started
    finally:
        connection.close()


def slowloris(port: int, request_line: bytes, every: float, cap: float) -> float:
    """Send *request_line*, then one header byte every *every* s until the peer closes (thread):
    seconds until it closed, or *cap* if it never did."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=cap) as sock:
        sock.sendall(request_line)
        while time.monotonic() - started < cap:
            ready, _, _ = select.select([sock], [], [], every)
            if ready:
                try:
                    if sock.recv(65536) == b"":
                        return time.monotonic() - started
                except ConnectionError:
                    return time.monotonic() - started
                continue
            try:
                sock.sendall(b"X")
            except OSError:
                return time.monotonic() - started
    return cap


def counts(statuses: list[int]) -> dict[int, int]:
    return dict(sorted(collections.Counter(statuses).items()))


class AdminAttackProcessTests(ProcessTestCase):
    """Finding 5 and the web part of 6 against a real broker: lockout, reactor stalls, DNS
    rebinding, an absurd TOKEN_HASH, slowloris and 413, with the figures printed."""

    timeout = 180
    sims = test_e2e.ProcessTests.sims
    ini = test_e2e.ProcessTests.ini

    async def broker(self, iterations: int) -> tuple[TwistdChild, int, int]:
        sims = await self.sims("a")
        admin = (f"[BROKER_ADMIN]\nENDPOINT = tcp:0:interface=127.0.0.1\n"
                 f"TOKEN_HASH = {hash_token(TOKEN, iterations=iterations)}\n")
        path = self.write_ini(self.ini(sims, admin))
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        port = await broker.listening()
        match = _SCREEN.search(broker.text())
        assert match is not None, broker.text()
        return broker, port, int(match.group(1))

    @defer.inlineCallbacks
    def test_wrong_tokens_cannot_lock_out_or_stall(self) -> Any:
        """120 wrong tokens from 40 addresses, 8 at a time (TOKEN_HASH at the 1,000,000-iteration
        bound): /ping is served throughout, hashing is bounded.  Wrong tokens 4/s from 127.0.0.2:
        none of 50 right-token requests (from 127.0.0.1 and from 127.0.0.2 itself) is refused.
        Host: evil.example is refused."""
        yield defer.ensureDeferred(self._lockout_scenario())

    async def _lockout_scenario(self) -> None:
        broker, _, admin = await self.broker(1_000_000)
        wrong = "wrong-token-0123456789-abcdef"

        # A: a sweep of wrong tokens from 40 addresses while /ping is timed from another.
        swept_all = threading.Event()

        def sweep(first: int) -> list[int]:
            return [timed(admin, "GET", "/api/v1/status", wrong, source=f"127.0.0.{first + n % 5}")[0]
                    for n in range(15)]

        def pinger() -> list[float]:
            latencies = []
            while not swept_all.is_set():
                latencies.append(timed(admin, "GET", "/ping", source="127.0.1.1")[1])
                swept_all.wait(0.02)
            return latencies

        def sweeps_done(result: Any) -> Any:
            swept_all.set()
            return result

        started = time.monotonic()
        pinging = threads.deferToThread(pinger)
        sweeps = await defer.gatherResults([threads.deferToThread(sweep, 10 + 5 * k)
                                            for k in range(8)]).addBoth(sweeps_done)
        swept = [s for statuses in sweeps for s in statuses]
        pings = sorted(await pinging)
        print(f"\nsweep: {len(swept)} wrong tokens from 40 addresses, 8 at a time, in "
              f"{time.monotonic() - started:.1f}s: {counts(swept)} (401 = hashed); /ping meanwhile: "
              f"median {pings[len(pings) // 2] * 1000:.1f} ms, max {pings[-1] * 1000:.1f} ms over {len(pings)}")

        # B: the finding's lockout.  The attacker keeps sending wrong tokens while the admin works.
        stop, limited = threading.Event(), threading.Event()

        def attacker() -> list[int]:
            statuses: list[int] = []
            while not stop.is_set() and len(statuses) < 400:
                statuses.append(timed(admin, "POST", "/api/v1/reload", wrong, source="127.0.0.2")[0])
                if statuses[-1] == 429:
                    limited.set()
                    stop.wait(0.25)
            return statuses

        def administrator() -> list[int]:
            limited.wait(60)  # the attacker has spent its 10 wrong tokens
            statuses = []
            for source in ["127.0.0.1"] * 25 + ["127.0.0.2"] * 25:
                statuses.append(timed(admin, "GET", "/api/v1/status", TOKEN, source=source)[0])
                time.sleep(0.1)
            stop.set()
            return statuses

        attacked, right = await defer.gatherResults([threads.deferToThread(attacker),
                                                     threads.deferToThread(administrator)])
        print(f"lockout: wrong tokens from 127.0.0.2 {counts(attacked)}; "
              f"right token from 127.0.0.1 {counts(right[:25])}, from 127.0.0.2 {counts(right[25:])}")

        # C: DNS rebinding.
        rebound = await threads.deferToThread(timed, admin, "GET", "/api/v1/sessions", host="evil.example")
        local = await threads.deferToThread(timed, admin, "GET", "/api/v1/sessions", host=f"localhost:{admin}")
        print(f"rebinding: Host evil.example -> {rebound[0]}, Host localhost:{admin} -> {local[0]}")

        self.assertEqual(set(right), {200})
        self.assertEqual(attacked[:11], [401] * 10 + [429])
        self.assertEqual(set(attacked[10:]), {429})
        self.assertLessEqual(set(swept), {401, 429, 503})
        self.assertIn(503, swept)  # more than 1 running + 4 waiting were asked for
        self.assertEqual((rebound[0], local[0]), (421, 200))
        self.assertNotIn("Unhandled Error", broker.text())
        self.assertNotIn("Traceback", broker.text())

    @defer.inlineCallbacks
    def test_absurd_iterations_refused_at_start(self) -> Any:
        """A TOKEN_HASH of 2,000,000,000 iterations: the broker does not start, and says why in
        one line naming the key."""
        digest = hash_token(TOKEN, iterations=10_000).split("$")
        absurd = "$".join([digest[0], "2000000000", digest[2], digest[3]])
        sims = yield defer.ensureDeferred(self.sims("a"))
        path = self.write_ini(self.ini(sims, f"[BROKER_ADMIN]\nENDPOINT = tcp:0:interface=127.0.0.1\n"
                                             f"TOKEN_HASH = {absurd}\n"))
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        yield defer.DeferredList([broker.listening(), broker.ended], fireOnOneCallback=True, consumeErrors=True)
        print(f"\nTOKEN_HASH with 2000000000 iterations: {broker.text().strip()}")
        self.assertTrue(broker.ended.called, "the broker started with 2,000,000,000 iterations")
        code = yield broker.ended
        self.assertNotEqual(code, 0)
        lines = [line for line in broker.text().splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"{path}:", lines[0])
        self.assertIn("TOKEN_HASH: 2000000000 iterations is too many (at most 1000000", lines[0])

    @defer.inlineCallbacks
    def test_slow_clients_dropped_and_413_clean(self) -> Any:
        """A /status slowloris (one byte every 2 s) on the SmartClient port and on the admin port
        is closed by the broker; a 413 on either port logs no Unhandled Error."""
        yield defer.ensureDeferred(self._slow_scenario())

    async def _slow_scenario(self) -> None:
        broker, port, admin = await self.broker(20_000)
        cap = 40.0
        closed = await defer.gatherResults([
            threads.deferToThread(slowloris, port, b"GET /status HTTP/1.1\r\n", 2.0, cap),
            threads.deferToThread(slowloris, admin, b"GET /api/v1/status HTTP/1.1\r\n", 2.0, cap)])
        print(f"\nslowloris (1 byte / 2 s): SmartClient port /status closed after {closed[0]:.1f}s, "
              f"admin port after {closed[1]:.1f}s (cap {cap:.0f}s)")

        big = await threads.deferToThread(raw, admin, b"POST /api/v1/reload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                       b"Content-Length: 1000000000\r\n\r\n")
        chunked = await threads.deferToThread(raw, port, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                         b"Transfer-Encoding: chunked\r\n\r\n")
        status, _ = await threads.deferToThread(http, "GET", f"http://127.0.0.1:{admin}/ping")
        await task.deferLater(reactor, 0.5, lambda: None)  # the broker's log reaches us
        print(f"413: admin port {big.split(b' ', 2)[1].decode()}, SmartClient port "
              f"{chunked.split(b' ', 2)[1].decode()}; Unhandled Error lines in the broker log: "
              f"{broker.text().count('Unhandled Error')}")
        self.assertLess(max(closed), cap)
        self.assertIn(b" 413 ", big.split(b"\r\n")[0] + b" ")
        self.assertIn(b" 413 ", chunked.split(b"\r\n")[0] + b" ")
        self.assertEqual(status, 200)
        self.assertNotIn("Unhandled Error", broker.text())
        self.assertNotIn("Traceback", broker.text())
