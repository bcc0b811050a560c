"""Farm links (FARM_HOSTS) on the broker screen: FarmSpawner.snapshot over real AMP ends in
memory, and pools[].farm in the status JSON, the page and /metrics."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.nodes.remote import _Reporting

from protheus_broker.web.page import PAGE_HTML

from .test_farm import Broker, FarmHarness
from .test_web import Harness, ini


class FarmSnapshotTests(FarmHarness):
    def test_link_up_down_and_back(self) -> None:
        """A farm host is down (no problem yet) before its agent attaches, up with our node ids after,
        down with the reason and the moment when the channel is lost, and up again on return."""
        agent, _ = self.agent()
        broker = Broker(self.clock, "b1")
        self.clock.advance(100)
        self.assertEqual(broker.spawner.snapshot(), [{"host": "127.0.0.2:7077", "state": "down", "since": 0.0,
                                                      "for_seconds": 100.0, "problem": None, "nodes": []}])
        broker.manager.start()
        pump = self.connect(agent, broker)
        self.turn(0.5)
        [link] = broker.spawner.snapshot()
        self.assertEqual((link["state"], link["since"], link["problem"], link["nodes"]), ("up", 100.0, None, [1, 2]))
        self.clock.advance(20)
        lost_at = self.clock.seconds()
        self.disconnect(pump)
        self.pumps.remove(pump)
        [link] = broker.spawner.snapshot()
        self.assertEqual((link["state"], link["nodes"]), ("down", [1, 2]))  # its nodes keep running
        self.assertEqual(link["since"], round(lost_at, 3))
        self.assertTrue(link["problem"].startswith("channel lost: "), link["problem"])
        self.clock.advance(5)
        back_at = self.clock.seconds()
        self.connect(agent, broker)
        [link] = broker.spawner.snapshot()
        self.assertEqual((link["state"], link["problem"], link["nodes"]), ("up", None, [1, 2]))
        self.assertEqual(link["since"], round(back_at, 3))

    def test_two_hosts_each_list_their_nodes(self) -> None:
        """With two farm hosts, each link lists only the nodes placed on it."""
        agent2, _ = self.agent()
        agent3, _ = self.agent(host="127.0.0.3")
        broker = Broker(self.clock, "b1", hosts=2, min_nodes=2)
        broker.manager.start()
        self.connect(agent2, broker, 0)
        self.connect(agent3, broker, 1)
        self.turn(0.5)
        links = broker.spawner.snapshot()
        self.assertEqual([(x["host"], x["state"]) for x in links], [("127.0.0.2:7077", "up"), ("127.0.0.3:7077", "up")])
        self.assertEqual(sorted(x["nodes"][0] for x in links), [1, 2])
        self.assertEqual([len(x["nodes"]) for x in links], [1, 1])


class _Refusing:
    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.fail(ConnectionRefusedError("127.0.0.2:7077"))


class ConnectProblemTests(FarmHarness):
    def test_failed_connect_is_the_last_problem(self) -> None:
        """A farm host whose agent refuses the connection shows why (the failure still reaches ClientService)."""
        broker = Broker(self.clock, "b1")
        host = broker.spawner.hosts[0]
        failure = self.failureResultOf(_Reporting(_Refusing(), host).connect(Factory()), ConnectionRefusedError)
        self.assertTrue(failure)
        [link] = broker.spawner.snapshot()
        self.assertEqual(link["state"], "down")
        self.assertIn("cannot connect: Connection was refused by other side", link["problem"])


class FarmScreenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self, ini("FARM_HOSTS = 127.0.0.2:7077, 127.0.0.3:7078\n"
                                   "FARM_SECRET = 0123456789abcdef\n"))
        [self.unit] = [u for u in self.h.service.units if getattr(u, "nodes", None) is not None]

    def test_status_json_has_a_link_per_farm_host(self) -> None:
        """pools[].farm lists each farm host with state, since, problem and node ids."""
        [pool] = self.h.request("GET", "/api/v1/status").json()["pools"]
        self.assertEqual([(x["host"], x["state"], x["problem"], x["nodes"]) for x in pool["farm"]],
                         [("127.0.0.2:7077", "down", None, []), ("127.0.0.3:7078", "down", None, [])])
        self.assertEqual(pool["farm"][0]["since"], 1_700_000_000.0)

    def test_metrics_have_the_link_gauge(self) -> None:
        """/metrics has farm_link_up (0 down, 1 up) and farm_nodes per pool and host."""
        host: Any = self.unit.nodes.spawner.hosts[1]
        host.channel = object()  # (as FarmHost.up leaves it)
        text = self.h.request("GET", "/metrics").body.decode()
        self.assertIn('protheus_broker_farm_link_up{host="127.0.0.2:7077",pool="BALANCE_SMART_CLIENT_DESKTOP"} 0.0',
                      text)
        self.assertIn('protheus_broker_farm_link_up{host="127.0.0.3:7078",pool="BALANCE_SMART_CLIENT_DESKTOP"} 1.0',
                      text)
        self.assertIn('protheus_broker_farm_nodes{host="127.0.0.2:7077",pool="BALANCE_SMART_CLIENT_DESKTOP"} 0.0',
                      text)

    def test_pool_without_farm(self) -> None:
        """A pool without FARM_HOSTS has farm null and no farm_link_up sample."""
        h = Harness(self, ini())
        [pool] = h.request("GET", "/api/v1/status").json()["pools"]
        self.assertIsNone(pool["farm"])
        self.assertNotIn("protheus_broker_farm_link_up{", h.request("GET", "/metrics").body.decode())

    def test_page_renders_farm_lines(self) -> None:
        """The screen draws a line per farm host under the pool's nodes."""
        for needle in (b"function renderFarm", b'"sub farm"', b"data-farm-host", b"last problem: "):
            self.assertIn(needle, PAGE_HTML)
