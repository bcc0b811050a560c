"""The server farm in memory: real agent and broker AMP ends over iosim pumps, a fake process
launcher on the agent's side, a real NodeManager and ServerPool on the broker's, task.Clock."""

from __future__ import annotations

from dataclasses import replace
from itertools import count
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from protheus_broker.agent.agent import Agent, AgentProtocol
from protheus_broker.agent.farm import Farm, INodeLauncher
from protheus_broker.agent.settings import AgentConfig, FarmConfig, parse_agent_config
from protheus_broker.balancing.methods import SortMethod, make_balancer
from protheus_broker.balancing.pool import ServerPool
from protheus_broker.config import parse_config
from protheus_broker.ini import ConfigError
from protheus_broker.monitoring import commands as cmd
from protheus_broker.nodes.manager import FarmSettings, NodeManager, NodePolicy
from protheus_broker.nodes.remote import FarmChannel, FarmSpawner
from tests.helpers import LogCatcher

SECRET = b"farm-secret-0123456789"


class FakeNodeProcess:
    def __init__(self, launcher: FakeLauncher, argv: list[str], env: dict[str, str],
                 ended: Callable[[str], None]) -> None:
        self.launcher = launcher
        self.argv = argv
        self.env = env
        self.port = int(argv[-1])
        self.pid = next(launcher.pids)
        self.ended = ended
        self.signals: list[str] = []
        self.alive = True

    def terminate(self) -> None:
        self.signals.append("TERM")
        self.exit("exit status 0")

    def kill(self) -> None:
        self.signals.append("KILL")
        self.exit("killed by signal 9")

    def exit(self, why: str) -> None:
        if self.alive:
            self.alive = False
            self.launcher.listening.discard(self.port)
            self.ended(why)

    def memory_bytes(self) -> int:
        return 7 * 1024 * 1024


@implementer(INodeLauncher)
class FakeLauncher:
    def __init__(self) -> None:
        self.launched: list[FakeNodeProcess] = []
        self.listening: set[int] = set()
        self.taken: set[int] = set()
        self.pids = count(5000)

    def launch(self, argv: list[str], env: dict[str, str], label: str,
               ended: Callable[[str], None]) -> FakeNodeProcess:
        process = FakeNodeProcess(self, argv, env, ended)
        self.launched.append(process)
        self.listening.add(process.port)
        return process

    def port_free(self, host: str, port: int) -> bool:
        return port not in self.taken

    def probe(self, host: str, port: int) -> Deferred[bool]:
        return succeed(port in self.listening)

    def alive(self) -> list[FakeNodeProcess]:
        return [p for p in self.launched if p.alive]


def farm_config(**kw: Any) -> FarmConfig:
    values: dict[str, Any] = dict(templates={"APPSERVER": ("appsrv", "--node", "{id}", "--port", "{port}")},
                                  host="127.0.0.2", base_port=21000, max_nodes=4, stop_grace=5.0,
                                  persistent_grace=30.0, orphan_timeout=3600.0, start_timeout=10.0)
    values.update(kw)
    return FarmConfig(**values)


class Broker:
    """One broker's unit: pool, manager, farm spawner (its channels are connected by the test)."""

    def __init__(self, clock: Clock, broker_id: str, hosts: int = 1, template: str = "APPSERVER",
                 min_nodes: int = 2, persistent: bool = False) -> None:
        farm = FarmSettings(hosts=tuple((f"127.0.0.{2 + i}", 7077) for i in range(hosts)), template=template,
                            secret=SECRET, broker_id=broker_id, wait=5.0)
        self.policy = NodePolicy(command=("{port}",), min_nodes=min_nodes, max_nodes=4, sessions_per_node=3,
                                 start_timeout=10.0, poll_interval=1.0, poll_misses=3, recycle_jitter=0.0,
                                 drain_timeout=60.0, stop_grace=5.0, idle_time=30.0, persistent=persistent,
                                 application="ERP", farm=farm)
        self.pool = ServerPool((), make_balancer(SortMethod.CONNECTION, 3.0, {}), clock=clock)
        self.spawner = FarmSpawner(clock, self.policy, "desktop")
        self.manager = NodeManager(clock, self.pool, self.spawner, self.policy, _Zero(), name="desktop")
        self.manager.claim_persistent = self.spawner.claim(self.manager.claim_persistent)  # (FarmService.watch)

    def members(self) -> list[tuple[str, str, int]]:
        return sorted((b.server_id, b.host, b.port) for b in self.pool)

    def states(self) -> dict[int, str]:
        return {n: node.state.value for n, node in self.manager.nodes.items()}


class _Zero:
    def random(self) -> float:
        return 0.0


class FarmHarness(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCatcher(self)
        self.pumps: list[Any] = []

    def agent(self, **kw: Any) -> tuple[Agent, FakeLauncher]:
        launcher = FakeLauncher()
        config = AgentConfig(path="agent.ini", port=0, appservers=(), secret=SECRET, farm=farm_config(**kw))
        assert config.farm is not None
        agent = Agent(self.clock, config, watches={}, host=(1 << 30, 2),
                      farm=Farm(self.clock, config.farm, launcher))
        return agent, launcher

    def connect(self, agent: Agent, broker: Broker, host: int = 0) -> Any:
        server = AgentProtocol(agent)
        client = FarmChannel(broker.spawner.hosts[host])
        pump = iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                             client, iosim.FakeTransport(client, isServer=False), greet=False)
        self.pumps.append(pump)
        self.turn(0)
        return pump

    def disconnect(self, pump: Any) -> None:
        pump.client.transport.loseConnection()
        self.turn(0)

    def turn(self, seconds: float, step: float = 0.05) -> None:
        """Pump every link and advance the clock by *seconds* in steps."""
        elapsed = 0.0
        while True:
            for _ in range(5):
                for pump in self.pumps:
                    pump.flush()
                self.clock.advance(0)
            if elapsed >= seconds:
                return
            self.clock.advance(step)
            elapsed += step


class StartStopTests(FarmHarness):
    def test_start_orders_put_nodes_on_the_agent_and_in_the_pool(self) -> None:
        """StartNode runs the agent's own template; ready nodes join the pool at the agent's host."""
        agent, launcher = self.agent()
        broker = Broker(self.clock, "b1")
        broker.manager.start()
        self.connect(agent, broker)
        self.turn(0.5)
        self.assertEqual([p.argv for p in launcher.launched],
                         [["appsrv", "--node", "1", "--port", "21001"], ["appsrv", "--node", "2", "--port", "21002"]])
        self.assertEqual(broker.states(), {1: "active", 2: "active"})
        self.assertEqual(broker.members(), [("NODE1", "127.0.0.2", 21001), ("NODE2", "127.0.0.2", 21002)])
        self.assertEqual(launcher.launched[0].env["PROTHEUS_BROKER"], "b1")

    def test_stop_order_ends_the_node_and_frees_its_id(self) -> None:
        """A discarded idle node gets StopNode (SIGTERM on the agent); its end reaches the manager."""
        agent, launcher = self.agent()
        broker = Broker(self.clock, "b1", min_nodes=1)
        broker.manager.start()
        self.connect(agent, broker)
        self.turn(0.5)
        broker.manager.discard(1, "test")
        self.turn(0.2)
        self.assertEqual(launcher.launched[0].signals, ["TERM"])
        self.assertNotIn(1, agent.farm.nodes if agent.farm else {})
        self.assertTrue(self.logs.find(unit="desktop", node_id=1, why="exit status 0"))

    def test_unknown_template_is_refused_with_a_reason(self) -> None:
        """A template name the agent's [NODES] lacks is refused; nothing runs; the manager backs off."""
        agent, launcher = self.agent()
        broker = Broker(self.clock, "b1", template="SHELL", min_nodes=1)
        broker.manager.start()
        self.connect(agent, broker)
        self.turn(0.2)
        self.assertEqual(launcher.launched, [])
        texts = "\n".join(self.logs.texts())
        self.assertIn("refused it: no COMMAND_SHELL in this agent's [NODES] (it has APPSERVER)", texts)
        self.assertGreaterEqual(broker.manager.crash_streak, 1)

    def test_nodes_spread_over_two_farm_hosts(self) -> None:
        """With two agents, nodes go to the host with the fewest."""
        agent2, launcher2 = self.agent()
        agent3, launcher3 = self.agent(host="127.0.0.3")
        broker = Broker(self.clock, "b1", hosts=2, min_nodes=2)
        broker.manager.start()
        self.connect(agent2, broker, 0)
        self.connect(agent3, broker, 1)
        self.turn(0.5)
        self.assertEqual((len(launcher2.launched), len(launcher3.launched)), (1, 1))
        self.assertEqual([h for _, h, _ in broker.members()], ["127.0.0.2", "127.0.0.3"])

    def test_wrong_secret_starts_nothing(self) -> None:
        """A broker with another FARM_SECRET fails the handshake; the agent runs nothing for it."""
        agent, launcher = self.agent()
        broker = Broker(self.clock, "b1", min_nodes=1)
        broker.spawner.farm = replace(broker.spawner.farm, secret=b"another-secret-0123456789")
        broker.manager.start()
        self.connect(agent, broker)
        self.turn(1.0)
        broker.spawner.settle("FARM_WAIT passed")  # (FarmService's timer)
        self.turn(0.5)
        self.assertEqual(launcher.launched, [])
        texts = "\n".join(self.logs.texts())
        self.assertIn("farm channel failed: the agent's proof is wrong (a different FARM_SECRET", texts)
        self.assertIn("node 1 failed: process ended unexpectedly (no farm host linked)", texts)

    def test_orders_before_attach_are_refused(self) -> None:
        """A StartNode on a channel that has not authenticated and attached is refused and closed."""
        agent, launcher = self.agent()
        server = AgentProtocol(agent)
        client = cmd.QuietAMP()
        pump = iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                             client, iosim.FakeTransport(client, isServer=False), greet=False)
        errors: list[Any] = []
        client.callRemote(cmd.StartNode, node_id=1, template="APPSERVER", persistent=False,
                          application="").addErrback(errors.append)
        pump.flush()
        self.clock.advance(0)
        pump.flush()
        self.assertTrue(errors[0].check(cmd.NotAuthenticated))
        self.assertIsNone(server.transport)  # (the agent closed the channel)
        self.assertEqual(launcher.launched, [])


class AdoptionTests(FarmHarness):
    def test_link_loss_keeps_nodes_running_and_the_return_changes_nothing(self) -> None:
        """The agent keeps the nodes through a lost link; on return nothing restarts."""
        agent, launcher = self.agent()
        broker = Broker(self.clock, "b1")
        broker.manager.start()
        pump = self.connect(agent, broker)
        self.turn(0.5)
        self.disconnect(pump)
        self.pumps.remove(pump)
        self.turn(3.0)  # polls go straight to the nodes meanwhile (no reactor here: they fail)
        self.assertEqual(len(launcher.alive()), 2)
        self.assertEqual([p.signals for p in launcher.launched], [[], []])
        self.connect(agent, broker)
        self.turn(0.5)
        self.assertEqual(len(launcher.launched), 2)
        self.assertEqual(broker.states(), {1: "active", 2: "active"})

    def test_restarted_broker_adopts_its_nodes_and_stops_the_unwanted(self) -> None:
        """A new broker with the same id adopts the nodes it asks for; the rest are stopped after FARM_WAIT."""
        agent, launcher = self.agent()
        first = Broker(self.clock, "b1", min_nodes=3)
        first.manager.start()
        pump = self.connect(agent, first)
        self.turn(0.5)
        self.assertEqual(len(launcher.alive()), 3)
        first.spawner.leaving = True  # the broker stops (FarmService): its nodes are left running
        first.manager.stop()
        self.disconnect(pump)
        self.pumps.remove(pump)
        self.assertEqual(len(launcher.alive()), 3)
        second = Broker(self.clock, "b1", min_nodes=2)
        second.manager.start()
        self.connect(agent, second)
        self.turn(0.5)
        self.assertEqual(len(launcher.launched), 3)  # no new process
        self.assertEqual(second.members(), [("NODE1", "127.0.0.2", 21001), ("NODE2", "127.0.0.2", 21002)])
        self.turn(5.0)
        self.assertEqual([p.signals for p in launcher.launched], [[], [], ["TERM"]])
        self.assertEqual(len(launcher.alive()), 2)

    def test_node_that_ended_while_away_is_replaced_on_return(self) -> None:
        """A node that ended while the link was down is reported on attach and replaced."""
        agent, launcher = self.agent()
        broker = Broker(self.clock, "b1")
        broker.manager.start()
        pump = self.connect(agent, broker)
        self.turn(0.5)
        self.disconnect(pump)
        self.pumps.remove(pump)
        launcher.launched[1].exit("killed by signal 9")
        self.connect(agent, broker)
        self.turn(2.0)
        self.assertEqual(len(launcher.launched), 3)
        self.assertEqual(broker.states(), {1: "active", 2: "active"})
        self.assertIn("killed by signal 9", "\n".join(self.logs.texts()))


class PersistentTests(FarmHarness):
    def test_second_broker_is_refused_the_persistent_node_with_a_reason(self) -> None:
        """Two brokers, one application: the agent runs one persistent node and names its holder."""
        agent, launcher = self.agent()
        first = Broker(self.clock, "b1", min_nodes=1, persistent=True)
        first.manager.start()
        self.connect(agent, first)
        self.turn(0.5)
        second = Broker(self.clock, "b2", min_nodes=1, persistent=True)
        second.manager.start()
        self.connect(agent, second)
        self.turn(0.5)
        self.turn(30.0, step=0.5)
        persistent = [p for p in launcher.alive() if p.env["PROTHEUS_NODE_PERSISTENT"] == "1"]
        self.assertEqual([p.env["PROTHEUS_BROKER"] for p in persistent], ["b1"])
        self.assertEqual(second.manager.persistent_refused,
                         "the first farm host 127.0.0.2:7077: the persistent node of ERP is held by broker b1 "
                         "(node 1 on port 21001, its link is up)")
        self.assertEqual(second.manager.crash_streak, 0)  # one refusal, then it waits: no crash loop
        self.assertEqual(second.states(), {1: "active"})  # its other nodes run (id 1 reused)
        self.assertFalse(second.manager.nodes[1].persistent)
        self.assertEqual(len([e for e in self.logs.texts() if "ended: farm host 127.0.0.2:7077 refused it" in e]), 1)

    def test_hold_lapses_after_the_grace_and_the_next_broker_gets_it(self) -> None:
        """A holder away past PERSISTENT_GRACE loses its persistent node; the other broker then runs one."""
        agent, launcher = self.agent(persistent_grace=30.0)
        first = Broker(self.clock, "b1", min_nodes=1, persistent=True)
        first.manager.start()
        pump = self.connect(agent, first)
        self.turn(0.5)
        self.disconnect(pump)
        self.pumps.remove(pump)
        second = Broker(self.clock, "b2", min_nodes=1, persistent=True)
        second.manager.start()
        self.connect(agent, second)
        self.turn(10.0)
        self.assertIn("its link lost", "\n".join(self.logs.texts()))
        self.turn(60.0, step=0.5)
        persistent = [p for p in launcher.alive() if p.env["PROTHEUS_NODE_PERSISTENT"] == "1"]
        self.assertEqual([p.env["PROTHEUS_BROKER"] for p in persistent], ["b2"])
        self.assertEqual(launcher.launched[0].signals, ["TERM"])


class PersistentClaimTests(SynchronousTestCase):
    """The agent's persistent hold, on the Farm logic alone."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.launcher = FakeLauncher()
        self.farm = Farm(self.clock, farm_config(persistent_grace=30.0), self.launcher)
        self.links = {"b1": _Link(), "b2": _Link()}
        for broker, link in self.links.items():
            self.farm.attach(broker, link)

    def test_a_crashed_persistent_node_stays_its_brokers(self) -> None:
        """While its broker is linked, a crashed persistent node is still its broker's to restart."""
        self.farm.start("b1", 1, "APPSERVER", True, "ERP")
        self.launcher.launched[0].exit("killed by signal 9")
        with self.assertRaises(cmd.NodeRefused) as caught:
            self.farm.start("b2", 1, "APPSERVER", True, "ERP")
        self.assertIn("held by broker b1 (its node restarting, its link is up)", str(caught.exception))
        self.farm.start("b1", 1, "APPSERVER", True, "ERP")
        self.assertEqual(self.links["b1"].events, [(1, "ready", ""), (1, "ended", "killed by signal 9"), (1, "ready", "")])

    def test_stopping_it_by_order_gives_the_hold_up(self) -> None:
        """A broker that stops its own persistent node releases the application once it has ended."""
        self.farm.start("b1", 1, "APPSERVER", True, "ERP")
        self.farm.stop("b1", 1)
        node = self.farm.start("b2", 1, "APPSERVER", True, "ERP")
        self.assertEqual((node.broker, self.farm.claims), ("b2", {"ERP": "b2"}))

    def test_application_names_and_ids_are_checked(self) -> None:
        """An application name the agent would put on a command line is letters, digits, _ . - only; ids 1..10**6."""
        with self.assertRaises(cmd.NodeRefused):
            self.farm.start("b1", 1, "APPSERVER", True, "ERP; rm -rf /")
        with self.assertRaises(cmd.NodeRefused):
            self.farm.start("b1", -1, "APPSERVER", False, "ERP")
        self.assertEqual(self.launcher.launched, [])


class _Link:
    def __init__(self) -> None:
        self.events: list[tuple[int, str, str]] = []

    def event(self, node_id: int, state: str, detail: str) -> None:
        self.events.append((node_id, state, detail))


class FarmConfigTests(SynchronousTestCase):
    def test_agent_nodes_section(self) -> None:
        """[NODES] gives templates by name and limits; an agent may have no AppServer to watch."""
        config = parse_agent_config("[AGENT]\nSECRET=0123456789abcdef\n[NODES]\n"
                                    "COMMAND_APPSERVER=/opt/appsrv -port={port} -node={id}\nHOST=10.0.0.5\n"
                                    "MAX_NODES=6\nBASE_PORT=22000\n")
        assert config.farm is not None
        self.assertEqual(config.farm.templates, {"APPSERVER": ("/opt/appsrv", "-port={port}", "-node={id}")})
        self.assertEqual((config.farm.host, config.farm.max_nodes, config.farm.base_port), ("10.0.0.5", 6, 22000))

    def test_agent_template_without_port_is_one_line(self) -> None:
        """A template without {port} is refused naming the key."""
        with self.assertRaises(ConfigError) as caught:
            parse_agent_config("[AGENT]\nSECRET=0123456789abcdef\n[NODES]\nCOMMAND_X=/opt/appsrv {socket}\n")
        self.assertIn("COMMAND_X", str(caught.exception))


HEAD = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 7890\nSORT_METHOD = CONNECTION\n"


class BrokerFarmKeysTests(SynchronousTestCase):
    def test_farm_hosts_alone_manage_nodes(self) -> None:
        """FARM_HOSTS with its secret turns nodes on without NODE_COMMAND; defaults apply."""
        config = parse_config(HEAD + "FARM_HOSTS = 127.0.0.2:7077, [::1]:7078\nFARM_SECRET = 0123456789abcdef\n")
        nodes = config.desktop.nodes
        assert nodes is not None and nodes.farm is not None
        self.assertEqual(nodes.farm.hosts, (("127.0.0.2", 7077), ("::1", 7078)))
        self.assertEqual((nodes.farm.template, nodes.farm.local, nodes.farm.wait), ("APPSERVER", False, 5.0))
        self.assertTrue(nodes.farm.broker_id.endswith("/BALANCE_SMART_CLIENT_DESKTOP"))

    def test_farm_mistakes_are_one_line(self) -> None:
        """A host without a port, no secret, or UNIX transport with a farm: one line naming the key."""
        cases = {
            "FARM_HOSTS = 127.0.0.2\nFARM_SECRET = 0123456789abcdef\n": "FARM_HOSTS",
            "FARM_HOSTS = 127.0.0.2:7077\n": "FARM_SECRET",
            "FARM_HOSTS = 127.0.0.2:7077\nFARM_SECRET = 0123456789abcdef\nTRANSPORT = UNIX\n": "TRANSPORT=TCP",
            "FARM_HOSTS = 127.0.0.2:7077\nFARM_SECRET = 0123456789abcdef\nLOCAL_NODES = 1\n": "NODE_COMMAND",
        }
        for text, message in cases.items():
            with self.assertRaises(ConfigError, msg=text) as caught:
                parse_config(HEAD + text)
            self.assertIn(message, str(caught.exception), text)


class HttpNodeKeysTests(SynchronousTestCase):
    def test_http_units_take_node_keys(self) -> None:
        """[BALANCE_HTTP] and [BALANCE_WEB_SERVICES] manage nodes without REMOTE_SERVER lines."""
        config = parse_config(HEAD + "REMOTE_SERVER_01 = 127.0.0.1 5001\n"
                              "[BALANCE_HTTP]\nLOCAL_SERVER_PORT = 8080\nNODE_COMMAND = sim --http --unix {socket}\n"
                              "TRANSPORT = UNIX\nSOCKET_DIR = /tmp/x\n"
                              "[BALANCE_WEB_SERVICES]\nLOCAL_SERVER_PORT = 8081\nNODES = WS_NODES\n"
                              "[WS_NODES]\nNODE_COMMAND = sim --http --port tcp:{port}\nBASE_PORT = 23000\n")
        http, ws = config.unit("BALANCE_HTTP"), config.unit("BALANCE_WEB_SERVICES")
        assert http is not None and ws is not None and http.nodes is not None and ws.nodes is not None
        self.assertEqual((http.servers, http.nodes.socket_dir), ((), "/tmp/x"))
        self.assertEqual((ws.servers, ws.nodes.base_port), ((), 23000))
