"""Dependency gating end to end: twistd protheus-broker and a sample AppServer as real
processes, the dependency a port this test opens and closes, DEPENDS_ON switched by SIGHUP."""

from __future__ import annotations

import os
import signal
import time
import json
from typing import Any, Callable

from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import ClientCreator, Factory, Protocol

from protheus_broker.demo.children import twistd_argv

from .helpers import ProcessTestCase
from .test_deps_sockets import SmartClient, until
from .test_web_e2e import CHROMEDRIVER, CHROMIUM, NO_PROXY, _SCREEN


class DependencyProcessTests(ProcessTestCase):
    timeout = 90

    def ini(self, sim_port: int, dep_port: int, depends_on: str) -> str:
        return ("[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
                "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
                f"CONNECT_TIMEOUT = 1\nREMOTE_SERVER_A = 127.0.0.1 {sim_port}\n"
                + (f"DEPENDS_ON = {depends_on}\n" if depends_on else "")
                + f"[LockServer]\nEnable = 0\nServer = 127.0.0.1\nPort = {dep_port}\nMessagelog = 0\n"
                "CHECK_INTERVAL = 0.2\nCONNECT_TIMEOUT = 1\nDOWN_AFTER_FAILURES = 1\nUP_AFTER_SUCCESSES = 1\n")

    async def login(self, port: int, payload: bytes) -> SmartClient:
        client = SmartClient(payload)
        await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        self.addCleanup(lambda: client.transport.loseConnection())
        await until(lambda: client.closed or client.data.endswith(payload), 20)
        return client

    @defer.inlineCallbacks
    def test_reload_gates_logins_on_a_dependency(self) -> Any:
        """SIGHUP adds DEPENDS_ON = LOCKSERVER while its port is closed: new logins are closed with
        the reason logged, the open session carries on; the port reopens: logins pass; SIGHUP
        removes DEPENDS_ON: its check stops and logins pass with the port closed."""
        yield defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        sim = self.start("sim", twistd_argv("protheus-appserver-sim", "--name", "a",
                                            "--port", "tcp:0:interface=127.0.0.1"))
        sim_port = await sim.listening()
        service = Factory.forProtocol(Protocol)
        listening = reactor.listenTCP(0, service, interface="127.0.0.1")  # type: ignore[attr-defined]
        dep_port = listening.getHost().port
        path = self.write_ini(self.ini(sim_port, dep_port, ""))
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        port = await broker.listening()
        first = await self.login(port, b"one")
        self.assertIn(b"PROTHEUS-SIM a", first.data)

        await listening.stopListening()
        with open(path, "w") as handle:
            handle.write(self.ini(sim_port, dep_port, "LOCKSERVER"))
        signalled = time.monotonic()
        broker.signal("HUP")
        await until(lambda: "dependency LOCKSERVER" in broker.text() and "is down" in broker.text(), 20)
        down_after = time.monotonic() - signalled
        refused = await self.login(port, b"two")
        self.assertTrue(refused.closed)
        self.assertNotIn(b"PROTHEUS-SIM", refused.data)
        await until(lambda: f"dependency LOCKSERVER (127.0.0.1:{dep_port}) down, closing the client"
                    in broker.text(), 20)
        first.transport.write(b" more")  # the open session carries on
        await until(lambda: first.data.endswith(b"one more"), 20)

        listening = reactor.listenTCP(dep_port, service, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(lambda: listening.stopListening())
        reopened = time.monotonic()
        await until(lambda: "is up again after" in broker.text(), 20)
        up_after = time.monotonic() - reopened
        third = await self.login(port, b"three")
        self.assertIn(b"PROTHEUS-SIM a", third.data)

        with open(path, "w") as handle:
            handle.write(self.ini(sim_port, dep_port, ""))
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGHUP)  # (TwistdChild.signal sends each signal once)
        await until(lambda: "no unit depends on it any more" in broker.text(), 20)
        await listening.stopListening()
        fourth = await self.login(port, b"four")
        self.assertIn(b"PROTHEUS-SIM a", fourth.data)
        self.assertFalse(fourth.closed)
        self.assertNotIn("Starting factory", broker.text())  # the checks are quiet
        print(f"\n  deps e2e: CHECK_INTERVAL=0.2 DOWN_AFTER_FAILURES=1 UP_AFTER_SUCCESSES=1; down logged "
              f"{down_after * 1000:.0f} ms after SIGHUP, up logged {up_after * 1000:.0f} ms after the port "
              f"reopened; 1 login refused, 3 passed, the open session echoed through")

    @defer.inlineCallbacks
    def test_screen_shows_the_dependency(self) -> Any:
        """Headless Chromium on the broker screen: the pool shows LOCKSERVER down (since, why),
        then up once its port opens; the status JSON and /metrics say the same."""
        yield defer.ensureDeferred(self._screen_scenario())

    async def _screen_scenario(self) -> None:
        missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
        if missing:
            self.fail(f"the browser test needs {' and '.join(missing)}: apt-get install chromium chromium-driver")
        from selenium import webdriver
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        sim = self.start("sim", twistd_argv("protheus-appserver-sim", "--name", "a",
                                            "--port", "tcp:0:interface=127.0.0.1"))
        sim_port = await sim.listening()
        service = Factory.forProtocol(Protocol)
        listening = reactor.listenTCP(0, service, interface="127.0.0.1")  # type: ignore[attr-defined]
        dep_port = listening.getHost().port
        await listening.stopListening()  # closed: LOCKSERVER is down from the start
        admin = "[BROKER_ADMIN]\nENDPOINT = tcp:0:interface=127.0.0.1\n"
        path = self.write_ini(self.ini(sim_port, dep_port, "LOCKSERVER") + admin)
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        port = await broker.listening()
        match = _SCREEN.search(broker.text())
        assert match is not None, broker.text()
        url = f"http://127.0.0.1:{match.group(1)}"
        refused = await self.login(port, b"x")
        self.assertTrue(refused.closed)

        def start() -> Any:
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--window-size=1280,800"):
                options.add_argument(flag)
            return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver = await threads.deferToThread(start)
        self.addCleanup(threads.deferToThread, driver.quit)

        def shows(wanted: str) -> Callable[[], str]:
            def wait() -> str:
                selector = 'span[data-dependency="LOCKSERVER"]'
                WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,)).until(
                    lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, selector)] == [wanted],
                    f"{selector} never showed {wanted!r}")
                text: str = driver.find_element(By.CSS_SELECTOR, ".pool-deps").text
                return text
            return wait

        await threads.deferToThread(driver.get, url + "/")
        line = await threads.deferToThread(shows("LOCKSERVER down"))
        self.assertIn("(connection refused, 1 refused)", line)
        status = json.loads((await threads.deferToThread(fetch, url + "/api/v1/status")))
        self.assertEqual([(d["name"], d["state"], d["refused"]) for d in status["dependencies"]],
                         [("LOCKSERVER", "down", 1)])
        self.assertIn('protheus_broker_dependency_up{address="127.0.0.1:%d",dependency="LOCKSERVER",'
                      'pool="BALANCE_SMART_CLIENT_DESKTOP"} 0.0' % dep_port,
                      await threads.deferToThread(fetch, url + "/metrics"))
        shots = os.environ.get("PROTHEUS_BROKER_ARTIFACTS") or os.getcwd()
        os.makedirs(shots, exist_ok=True)
        shot = os.path.abspath(os.path.join(shots, "broker-screen-dependency-down.png"))
        self.assertTrue(await threads.deferToThread(driver.save_screenshot, shot))

        listening = reactor.listenTCP(dep_port, service, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(lambda: listening.stopListening())
        await threads.deferToThread(shows("LOCKSERVER up"))
        self.assertIn(b"PROTHEUS-SIM a", (await self.login(port, b"y")).data)
        errors = await threads.deferToThread(driver.get_log, "browser")
        self.assertEqual([e for e in errors if e.get("level") == "SEVERE"], [])
        print(f"\n  deps screen: LOCKSERVER down then up drawn by the page; screenshot {shot}")


def fetch(url: str) -> str:
    """GET *url* from the broker screen (thread): the body as text."""
    with NO_PROXY.open(url, timeout=10) as response:
        return response.read().decode()  # type: ignore[no-any-return]
