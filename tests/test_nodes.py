"""The node manager in memory: a fake spawner, task.Clock, a real ServerPool."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from protheus_broker.balancing.methods import SortMethod, make_balancer
from protheus_broker.balancing.pool import ServerPool, ServerState
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.nodes.manager import (BACKOFF_BASE, NODES, INodeProcess, INodeSpawner, NodeManager,
                                           NodePolicy, NodeSpec, Transport)
from tests.helpers import LogCatcher


@implementer(INodeProcess)
class FakeProcess:
    def __init__(self, spawner: FakeSpawner, spec: NodeSpec, ended: Callable[[str], None]) -> None:
        self.spawner = spawner
        self.spec = spec
        self.pid = 1000 + len(spawner.spawned)
        self.ended = ended
        self.signals: list[str] = []
        self.memory = 10 * 1024 * 1024
        self.ignore_term = False
        self.alive = True

    def terminate(self) -> None:
        self.signals.append("TERM")
        if not self.ignore_term:
            self.exit("stopped by SIGTERM")

    def kill(self) -> None:
        self.signals.append("KILL")
        self.exit("killed by SIGKILL")

    def exit(self, why: str) -> None:
        if self.alive:
            self.alive = False
            self.spawner.listening.discard(self.spec.node_id)
            self.ended(why)

    def memory_bytes(self) -> int | None:
        return self.memory


@implementer(INodeSpawner)
class FakeSpawner:
    """Nodes listen when the test says so (or at once with *auto_ready*)."""

    def __init__(self, auto_ready: bool = True) -> None:
        self.auto_ready = auto_ready
        self.spawned: list[FakeProcess] = []
        self.listening: set[int] = set()
        self.fail_spawn = False

    def spawn(self, spec: NodeSpec, ended: Callable[[str], None]) -> FakeProcess:
        if self.fail_spawn:
            raise OSError("no such file: appsrv")
        process = FakeProcess(self, spec, ended)
        self.spawned.append(process)
        if self.auto_ready:
            self.listening.add(spec.node_id)
        return process

    def probe(self, spec: NodeSpec) -> Deferred[bool]:
        return succeed(spec.node_id in self.listening)

    def process(self, node_id: int) -> FakeProcess:
        return [p for p in self.spawned if p.spec.node_id == node_id and p.alive][-1]


class FixedRandom:
    def __init__(self, *values: float) -> None:
        self.values = list(values) or [0.0]

    def random(self) -> float:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


POLICY = NodePolicy(command=("appsrv", "{port}"), min_nodes=2, max_nodes=4, sessions_per_node=3,
                    base_port=21000, start_timeout=10.0, poll_interval=1.0, poll_misses=3,
                    recycle_jitter=0.0, drain_timeout=60.0, stop_grace=5.0, idle_time=30.0)


class Harness(SynchronousTestCase):
    def make(self, policy: NodePolicy = POLICY, auto_ready: bool = True, config: tuple[RemoteServer, ...] = (),
             random: Any = None) -> NodeManager:
        self.clock = Clock()
        self.pool = ServerPool(config, make_balancer(SortMethod.CONNECTION, 3.0, {}), clock=self.clock)
        self.spawner = FakeSpawner(auto_ready)
        self.logs = LogCatcher(self)
        self.manager = NodeManager(self.clock, self.pool, self.spawner, policy, random or FixedRandom(0.0),
                                   name="desktop")
        self.manager.start()
        return self.manager

    def states(self) -> dict[int, str]:
        return {n: node.state.value for n, node in self.manager.nodes.items()}

    def open_sessions(self, member: str, count: int) -> list[Any]:
        backend = self.pool.get(member)
        for _ in range(count):
            self.pool.session_opening(backend)
            self.pool.session_connected(backend)
        return [backend] * count

    def close_sessions(self, member: str, count: int) -> None:
        backend = self.pool.get(member)
        for _ in range(count):
            self.pool.session_closed(backend)


class StartTests(Harness):
    def test_starts_min_nodes_and_they_join_the_pool(self) -> None:
        """MIN_NODES nodes start, become active when they accept a connection and join the pool as "nodes"."""
        self.make()
        self.assertEqual(self.states(), {1: "active", 2: "active"})
        self.assertEqual([(b.server_id, b.port, b.source) for b in self.pool],
                         [("NODE1", 21001, NODES), ("NODE2", 21002, NODES)])

    def test_starting_node_takes_no_sessions(self) -> None:
        """A node not yet accepting connections is starting and not in the pool."""
        self.make(auto_ready=False)
        self.assertEqual(self.states(), {1: "starting", 2: "starting"})
        self.assertEqual(len(self.pool), 0)
        self.spawner.listening.add(1)
        self.clock.advance(0.05)
        self.assertEqual(self.states(), {1: "active", 2: "starting"})
        self.assertEqual([b.server_id for b in self.pool], ["NODE1"])

    def test_start_timeout_purges_and_replaces(self) -> None:
        """A node silent for START_TIMEOUT is purged (asked, then killed) and replaced."""
        self.make(replace(POLICY, min_nodes=1), auto_ready=False)
        first = self.spawner.process(1)
        first.ignore_term = True
        self.clock.advance(10.0)
        self.assertEqual(first.signals, ["TERM"])
        self.assertEqual(self.states(), {1: "purged", 2: "starting"})  # replaced at once
        self.clock.advance(5.0)
        self.assertEqual(first.signals, ["TERM", "KILL"])
        self.assertEqual(self.states(), {2: "starting"})
        self.assertEqual(len(self.spawner.spawned), 2)

    def test_unix_transport_members_have_socket_paths(self) -> None:
        """Over UNIX each node gets SOCKET_DIR/node-<id>.sock and the pool member carries it."""
        self.make(replace(POLICY, transport=Transport.UNIX, socket_dir="/run/pb/"))
        self.assertEqual([(b.server_id, b.unix, b.address) for b in self.pool],
                         [("NODE1", "/run/pb/node-1.sock", "unix:/run/pb/node-1.sock"),
                          ("NODE2", "/run/pb/node-2.sock", "unix:/run/pb/node-2.sock")])
        self.assertEqual(self.spawner.spawned[0].spec.argv(("srv", "--unix", "{socket}", "--id={id}")),
                         ["srv", "--unix", "/run/pb/node-1.sock", "--id=1"])

    def test_config_servers_sit_beside_nodes(self) -> None:
        """REMOTE_SERVERs from the config stay members beside the nodes."""
        self.make(config=(RemoteServer("01", "127.0.0.1", 1234),))
        self.assertEqual(sorted((b.server_id, b.source) for b in self.pool),
                         [("01", "config"), ("NODE1", NODES), ("NODE2", NODES)])


class PollTests(Harness):
    def test_missed_poll_suspends_then_answer_restores(self) -> None:
        """A missed poll makes a node suspended (no new sessions); an answer makes it active again."""
        self.make()
        self.spawner.listening.discard(1)
        self.clock.advance(1.0)
        self.assertEqual(self.states()[1], "suspended")
        self.assertIs(self.pool.get("NODE1").state, ServerState.SUSPENDED)
        self.spawner.listening.add(1)
        self.clock.advance(1.0)
        self.assertEqual(self.states()[1], "active")
        self.assertIs(self.pool.get("NODE1").state, ServerState.UP)

    def test_poll_misses_purge_and_replace(self) -> None:
        """POLL_MISSES misses in a row purge the node: out of the pool, stopped, replaced under its id."""
        self.make()
        old = self.spawner.process(1)
        self.spawner.listening.discard(1)
        self.clock.pump([1.0, 1.0])
        self.assertEqual(old.signals, [])
        self.clock.advance(1.0)
        self.assertEqual(old.signals, ["TERM"])
        self.assertEqual(self.states(), {1: "active", 2: "active"})
        self.assertIsNot(self.spawner.process(1), old)


class SessionsTests(Harness):
    def test_scale_up_on_load(self) -> None:
        """When every node carries SESSIONS_PER_NODE sessions, one more starts, up to MAX_NODES."""
        self.make()
        self.open_sessions("NODE1", 3)
        self.open_sessions("NODE2", 2)
        self.clock.advance(1.0)
        self.assertEqual(len(self.manager.nodes), 2)
        self.open_sessions("NODE2", 1)
        self.clock.advance(1.0)
        self.assertEqual(self.states(), {1: "active", 2: "active", 3: "active"})
        self.open_sessions("NODE3", 30)
        self.clock.advance(1.0)
        self.assertEqual(len(self.manager.nodes), 4)  # MAX_NODES

    def test_scale_down_to_min_nodes_when_idle(self) -> None:
        """Nodes above the need that stay idle IDLE_TIME are discarded and stopped, down to MIN_NODES."""
        self.make()
        self.open_sessions("NODE1", 3)
        self.open_sessions("NODE2", 3)
        self.clock.advance(1.0)
        self.assertEqual(len(self.manager.nodes), 3)
        self.close_sessions("NODE1", 3)
        self.close_sessions("NODE2", 3)
        self.clock.pump([1.0] * 29)
        self.assertEqual(len(self.manager.nodes), 3)
        self.clock.pump([1.0] * 2)
        self.assertEqual(sorted(self.manager.nodes), [1, 2])
        self.assertEqual(self.spawner.spawned[2].signals, ["TERM"])

    def test_admin_scale_sets_the_minimum(self) -> None:
        """scale(n) starts nodes up to n and lets idle ones go down to n."""
        manager = self.make()
        manager.scale(4)
        self.assertEqual(len(manager.nodes), 4)
        manager.scale(1)
        self.assertEqual(sorted(manager.nodes), [1])


class DiscardTests(Harness):
    def test_discarded_keeps_sessions_and_is_purged_after_the_last(self) -> None:
        """A discarded node takes no new session, keeps its own, and is purged when the last one ends."""
        manager = self.make()
        self.open_sessions("NODE1", 2)
        self.assertTrue(manager.discard(1))
        self.assertEqual(self.states()[1], "discarded")
        self.assertIs(self.pool.get("NODE1").state, ServerState.DRAINING)
        self.assertNotIn("NODE1", [b.server_id for b in self.pool.candidates(0.0)])
        process = self.spawner.spawned[0]
        self.close_sessions("NODE1", 1)
        self.assertEqual(process.signals, [])
        self.close_sessions("NODE1", 1)
        self.assertEqual(process.signals, ["TERM"])
        self.assertNotIn(1, [n for n, node in manager.nodes.items() if node.process is process])

    def test_drain_timeout_purges_with_sessions(self) -> None:
        """A discarded node still carrying sessions after DRAIN_TIMEOUT is purged anyway."""
        manager = self.make()
        self.open_sessions("NODE1", 1)
        manager.discard(1)
        process = self.spawner.spawned[0]
        self.clock.advance(59.0)
        self.assertEqual(process.signals, [])
        self.clock.advance(1.0)
        self.assertEqual(process.signals, ["TERM"])
        self.assertTrue(self.logs.find(log_format="{unit}: node {node_id} {old} -> {new}: {why}",
                                       new="purged", node_id=1))

    def test_ids_are_reused_after_purge(self) -> None:
        """The replacement of a purged node takes the lowest free id, the purged one's."""
        manager = self.make()
        manager.discard(1)
        self.assertEqual(sorted(manager.nodes), [1, 2])
        self.assertEqual(self.spawner.spawned[-1].spec.node_id, 1)
        self.assertEqual(len(self.spawner.spawned), 3)

    def test_purged_ignoring_term_is_killed_after_grace(self) -> None:
        """Ask then kill: SIGTERM, and SIGKILL STOP_GRACE later if the node is still there."""
        manager = self.make()
        process = self.spawner.spawned[0]
        process.ignore_term = True
        manager.discard(1)
        self.assertEqual(self.states()[1], "purged")
        self.clock.advance(4.9)
        self.assertEqual(process.signals, ["TERM"])
        self.clock.advance(0.1)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.assertEqual(self.states(), {2: "active", 3: "active"})  # id 1 was still held


class RecycleTests(Harness):
    def test_recycle_starts_replacement_before_discarding(self) -> None:
        """Recycling waits for a ready replacement before it discards the old node."""
        manager = self.make(auto_ready=False)
        self.spawner.listening.update({1, 2})
        self.clock.advance(0.05)
        self.open_sessions("NODE1", 1)
        manager.recycle(1)
        self.assertEqual(self.states(), {1: "active", 2: "active", 3: "starting"})
        self.spawner.listening.add(3)
        self.clock.advance(0.05)
        self.assertEqual(self.states(), {1: "discarded", 2: "active", 3: "active"})
        self.close_sessions("NODE1", 1)
        self.assertEqual(self.spawner.spawned[0].signals, ["TERM"])
        self.assertEqual(sorted(manager.nodes), [2, 3])

    def test_recycle_after_sessions_with_jitter(self) -> None:
        """RECYCLE_SESSIONS with jitter: each node's limit is raised by up to that fraction."""
        policy = replace(POLICY, recycle_sessions=10, recycle_jitter=0.5, sessions_per_node=1000)
        self.make(policy, random=FixedRandom(0.0, 0.8))
        self.assertEqual([n.limits["sessions"] for n in self.manager.nodes.values()], [10.0, 14.0])
        self.open_sessions("NODE1", 10)
        self.open_sessions("NODE2", 10)
        self.close_sessions("NODE1", 10)
        self.close_sessions("NODE2", 10)
        self.clock.advance(1.0)
        self.assertEqual(sorted(self.manager.nodes), [2, 3])
        self.assertEqual(self.spawner.spawned[0].signals, ["TERM"])  # node 1 recycled ...
        self.assertEqual(self.spawner.spawned[1].signals, [])  # ... node 2 not yet
        self.open_sessions("NODE2", 4)
        self.close_sessions("NODE2", 4)
        self.clock.advance(1.0)
        self.assertEqual(self.spawner.spawned[1].signals, ["TERM"])

    def test_recycle_after_age_with_jitter(self) -> None:
        """RECYCLE_AGE with jitter: nodes of one start do not recycle together."""
        self.make(replace(POLICY, recycle_age=100.0, recycle_jitter=0.2), random=FixedRandom(0.0, 0.5))
        self.clock.advance(100.0)
        self.assertEqual([p.signals for p in self.spawner.spawned[:2]], [["TERM"], []])
        self.clock.advance(10.5)
        self.assertEqual([p.signals for p in self.spawner.spawned[:2]], [["TERM"], ["TERM"]])

    def test_recycle_above_memory(self) -> None:
        """RECYCLE_MEMORY: a node whose resident memory reaches the limit is recycled."""
        self.make(replace(POLICY, recycle_memory=100 * 1024 * 1024, recycle_jitter=0.1),
                  random=FixedRandom(0.5))
        process = self.spawner.spawned[1]
        process.memory = 104 * 1024 * 1024
        self.clock.advance(1.0)
        self.assertEqual(process.signals, [])  # under 105 MiB, its limit with jitter
        process.memory = 106 * 1024 * 1024
        self.clock.advance(1.0)
        self.assertEqual(process.signals, ["TERM"])
        self.assertTrue(any("resident" in t for t in self.logs.texts()))

    def test_recycle_keeps_old_node_while_replacement_fails(self) -> None:
        """If the replacement never gets ready the old node keeps serving."""
        manager = self.make(replace(POLICY, min_nodes=1), auto_ready=False)
        self.spawner.listening.add(1)
        self.clock.advance(0.05)
        manager.recycle(1)
        self.assertEqual(self.states(), {1: "active", 2: "starting"})
        self.clock.advance(10.0)  # START_TIMEOUT: the replacement fails and is replaced
        self.assertEqual(self.states()[1], "active")
        self.assertEqual(self.spawner.spawned[0].signals, [])
        self.assertEqual(self.spawner.spawned[1].signals, ["TERM"])


class CrashTests(Harness):
    def test_crash_purges_and_replaces_at_once_then_backs_off(self) -> None:
        """A crash is replaced at once; crashes in a row wait 1, 2, 4 s ... and are logged each time."""
        manager = self.make(replace(POLICY, min_nodes=1))
        self.spawner.process(1).exit("exit status 1")
        self.assertEqual(self.states(), {1: "active"})
        self.assertEqual(len(self.spawner.spawned), 2)
        self.spawner.process(1).exit("exit status 1")
        self.assertEqual(self.states(), {})
        self.clock.advance(BACKOFF_BASE)
        self.assertEqual(len(self.spawner.spawned), 3)
        self.spawner.process(1).exit("exit status 1")
        self.clock.advance(1.9)
        self.assertEqual(len(self.spawner.spawned), 3)
        self.clock.advance(0.1)
        self.assertEqual(len(self.spawner.spawned), 4)
        loops = [e for e in self.logs.events if e.get("streak")]
        self.assertEqual([e["streak"] for e in loops], [1, 2, 3])
        self.assertEqual(manager.crash_streak, 3)

    def test_crash_streak_ends_after_stable_node(self) -> None:
        """A node that stays active 30 s ends the crash streak (logged once)."""
        manager = self.make(replace(POLICY, min_nodes=1))
        self.spawner.process(1).exit("boom")
        self.spawner.process(1).exit("boom")
        self.clock.advance(1.0)
        self.clock.advance(31.0)
        self.assertEqual(manager.crash_streak, 0)
        self.assertTrue(any("crash loop over" in t for t in self.logs.texts()))

    def test_stable_old_node_does_not_hide_a_crash_loop(self) -> None:
        """A node up for long does not reset the streak: only one started after the last failure does."""
        manager = self.make(replace(POLICY, min_nodes=2))
        self.clock.pump([1.0] * 40)  # both nodes long stable
        for spawned, wait in ((2, 0.0), (3, 1.0), (4, 2.0), (5, 4.0)):
            self.spawner.process(2).exit("exit status 1")
            if wait:
                self.clock.advance(wait - 0.01)
                self.assertEqual(len(self.spawner.spawned), spawned)  # still backing off
                self.clock.advance(0.01)
            self.assertEqual(len(self.spawner.spawned), spawned + 1)
        self.assertEqual(manager.crash_streak, 4)

    def test_command_that_cannot_start_is_not_a_tight_loop(self) -> None:
        """A spawn that raises is retried only after the backoff."""
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.spawner.fail_spawn = True
        self.logs = LogCatcher(self)
        pool = ServerPool((), make_balancer(SortMethod.CONNECTION, 3.0, {}), clock=self.clock)
        manager = NodeManager(self.clock, pool, self.spawner, replace(POLICY, min_nodes=1), FixedRandom())
        manager.start()
        self.assertEqual(manager.crash_streak, 1)
        self.clock.advance(1.0)
        self.assertEqual(manager.crash_streak, 2)
        self.clock.advance(1.0)
        self.assertEqual(manager.crash_streak, 3)
        self.assertEqual(len(manager.nodes), 0)


class PersistentTests(Harness):
    policy = replace(POLICY, persistent=True, min_nodes=2)

    def test_persistent_started_first(self) -> None:
        """The persistent node is started first, with id 1 and the flag in its command."""
        self.make(self.policy)
        self.assertTrue(self.spawner.spawned[0].spec.persistent)
        self.assertEqual(self.spawner.spawned[0].spec.argv(("x", "{persistent}")), ["x", "1"])
        self.assertFalse(self.spawner.spawned[1].spec.persistent)

    def test_persistent_never_scaled_away(self) -> None:
        """Scaling down to zero keeps the persistent node."""
        manager = self.make(self.policy)
        manager.scale(0)
        self.assertEqual([n.persistent for n in manager.nodes.values()], [True])

    def test_persistent_restarted_at_once_after_recycle_never_two(self) -> None:
        """A recycled persistent node is started again as soon as its process ends, never beside it."""
        manager = self.make(self.policy)
        old = self.spawner.spawned[0]
        old.ignore_term = True
        self.open_sessions("NODE1", 1)
        manager.recycle(1)
        self.assertEqual(self.states()[1], "discarded")
        self.close_sessions("NODE1", 1)
        self.assertEqual(self.states()[1], "purged")
        self.assertEqual(sum(1 for p in self.spawner.spawned if p.spec.persistent and p.alive), 1)
        self.clock.advance(5.0)
        alive = [p for p in self.spawner.spawned if p.spec.persistent and p.alive]
        self.assertEqual(len(alive), 1)
        self.assertIsNot(alive[0], old)

    def test_persistent_restarted_at_once_after_crash(self) -> None:
        """A crashed persistent node is started again at once."""
        self.make(self.policy)
        self.spawner.process(1).exit("segfault")
        self.assertTrue(self.spawner.process(1).spec.persistent)
        self.assertEqual(self.states()[1], "active")


class StopTests(Harness):
    def test_stop_asks_every_node_and_fires_when_all_ended(self) -> None:
        """stop() purges every node; its Deferred fires when the last process has ended."""
        manager = self.make()
        self.spawner.spawned[1].ignore_term = True
        d = manager.stop()
        self.assertNoResult(d)
        self.clock.advance(5.0)
        self.successResultOf(d)
        self.assertEqual(manager.nodes, {})
        self.assertEqual(len(self.spawner.spawned), 2)

    def test_snapshot_rows(self) -> None:
        """The snapshot names each node's state, member, endpoint and sessions."""
        manager = self.make()
        self.open_sessions("NODE2", 2)
        rows = manager.snapshot()
        self.assertEqual([(r["id"], r["state"], r["endpoint"], r["sessions"]) for r in rows],
                         [(1, "active", "127.0.0.1:21001", 0), (2, "active", "127.0.0.1:21002", 2)])


class PersistentLockGateTests(Harness):
    def test_refused_persistent_node_logged_once_and_taken_later(self) -> None:
        """A broker refused the persistent lock runs no persistent node, says why once, and takes over when free."""
        self.clock = Clock()
        self.logs = LogCatcher(self)
        self.pool = ServerPool((), make_balancer(SortMethod.CONNECTION, 3.0, {}), clock=self.clock)
        self.spawner = FakeSpawner()
        manager = NodeManager(self.clock, self.pool, self.spawner, replace(POLICY, persistent=True), FixedRandom())
        holder: list[str | None] = ["the persistent node of APP is held by pid 4711 (lock /run/x.lock)"]
        manager.claim_persistent = lambda: holder[0]
        manager.start()
        self.manager = manager
        self.clock.pump([1.0] * 3)
        self.assertEqual([p.spec.persistent for p in self.spawner.spawned], [False, False])
        refusals = [t for t in self.logs.texts() if "no persistent node here" in t]
        self.assertEqual(len(refusals), 1)
        self.assertIn("pid 4711", refusals[0])
        holder[0] = None
        self.clock.advance(1.0)
        self.assertEqual([n.persistent for n in manager.nodes.values()].count(True), 1)
