"""Node keys, the persistent lock and the real spawner's pieces (no processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from twisted.internet.error import ConnectionRefusedError, ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.methods import ConnectionBalancer
from protheus_broker.balancing.pool import ServerPool
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.config import parse_config
from protheus_broker.desktop.proxy import BrokerFactory
from protheus_broker.desktop.unit import DesktopUnit
from protheus_broker.ini import ConfigError
from protheus_broker.nodes.lock import PersistentLock
from protheus_broker.nodes.manager import NodePolicy, NodeSpec, Transport
from protheus_broker.nodes.settings import default_run_dir
from protheus_broker.nodes.spawner import NodeOutput, NodeService, ProcessSpawner
from protheus_broker.processes import SETSID, describe_exit
from tests.helpers import LogCatcher
from tests.test_proxy import HalfCloseTransport

HEAD = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 7890\nSORT_METHOD = CONNECTION\n"


class NodeKeysTests(SynchronousTestCase):
    def test_defaults_in_the_unit_section(self) -> None:
        """NODE_COMMAND alone enables nodes with the defaults; no REMOTE_SERVER needed."""
        config = parse_config(HEAD + "NODE_COMMAND = appsrv --port {port}\n")
        nodes = config.desktop.nodes
        assert nodes is not None
        self.assertEqual((nodes.command, nodes.min_nodes, nodes.max_nodes, nodes.transport, nodes.base_port),
                         (("appsrv", "--port", "{port}"), 1, 4, Transport.TCP, 21000))
        self.assertEqual(config.desktop.servers, ())
        self.assertEqual(config.desktop.wait_for_server, 10.0)  # logins wait for the first node
        self.assertEqual(config.warnings, ())

    def test_named_section(self) -> None:
        """NODES = <section> reads the keys there; that section is not an unknown one."""
        config = parse_config(HEAD + "REMOTE_SERVER_01 = 127.0.0.1 5000\nNODES = NODES_DESKTOP\n"
                              "[NODES_DESKTOP]\nNODE_COMMAND = appsrv --unix {socket}\nTRANSPORT = unix\n"
                              "MIN_NODES = 2\nMAX_NODES = 3\nRECYCLE_MEMORY = 512\nRECYCLE_AGE = 3600\n"
                              "RECYCLE_SESSIONS = 100\nRECYCLE_JITTER = 0.2\nPERSISTENT = 1\n"
                              "SOCKET_DIR = /tmp/n\n")
        nodes = config.desktop.nodes
        assert nodes is not None
        self.assertEqual((nodes.transport, nodes.min_nodes, nodes.max_nodes, nodes.recycle_memory,
                          nodes.recycle_age, nodes.recycle_sessions, nodes.recycle_jitter, nodes.persistent,
                          nodes.socket_dir, nodes.application),
                         (Transport.UNIX, 2, 3, 512 * 1024 * 1024, 3600.0, 100, 0.2, True, "/tmp/n",
                          "BALANCE_SMART_CLIENT_DESKTOP"))
        self.assertEqual(config.warnings, ())

    def test_run_dir_default_follows_systemd(self) -> None:
        """SOCKET_DIR and LOCK_DIR default to $RUNTIME_DIRECTORY, else $STATE_DIRECTORY, else /run/protheus-broker."""
        self.assertEqual(default_run_dir({"RUNTIME_DIRECTORY": "/run/pb:/run/x", "STATE_DIRECTORY": "/var/lib/pb"}),
                         "/run/pb")
        self.assertEqual(default_run_dir({"STATE_DIRECTORY": "/var/lib/pb"}), "/var/lib/pb")
        self.assertEqual(default_run_dir({}), "/run/protheus-broker")

    def test_unknown_key_in_named_section_warned(self) -> None:
        """A misspelt key in the section NODES names is one warning with its line."""
        config = parse_config(HEAD + "NODES = N\n[N]\nNODE_COMMAND = a {port}\nMIN_NODE = 2\n", "b.ini")
        self.assertEqual(config.warnings, ("b.ini:7: [N] MIN_NODE: unknown key; ignored",))

    def test_bad_values_name_file_line_and_key(self) -> None:
        """A bad node key is one ConfigError naming its line and key."""
        cases = {
            "NODE_COMMAND = appsrv {nope}\n": "NODE_COMMAND",
            "NODE_COMMAND = appsrv {port}\nTRANSPORT = PIPE\n": "TRANSPORT",
            "NODE_COMMAND = appsrv {port}\nTRANSPORT = UNIX\n": "NODE_COMMAND",
            "NODE_COMMAND = appsrv {port}\nMIN_NODES = 5\nMAX_NODES = 2\n": "MAX_NODES",
            "NODE_COMMAND = appsrv {port}\nRECYCLE_JITTER = 2\n": "RECYCLE_JITTER",
            "NODE_COMMAND = 'appsrv {port}\n": "NODE_COMMAND",
            "NODES = NOWHERE\n": "NODES",
        }
        for text, key in cases.items():
            with self.assertRaises(ConfigError) as caught:
                parse_config(HEAD + text, "broker.ini")
            self.assertIn(key, str(caught.exception), text)
            self.assertIn("broker.ini:", str(caught.exception))


class PersistentLockTests(SynchronousTestCase):
    def test_second_holder_refused_naming_the_pid(self) -> None:
        """A second broker asking for the same application's lock is refused, naming the holder's pid."""
        lock_dir = self.mktemp()
        script = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                  "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d\\n' % os.getpid()); "
                  "print('held', flush=True); time.sleep(30)")
        os.makedirs(lock_dir)
        mine = PersistentLock(lock_dir, "APP/1")
        holder = subprocess.Popen([sys.executable, "-c", script, mine.path], stdout=subprocess.PIPE)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        assert holder.stdout is not None
        self.assertEqual(holder.stdout.readline(), b"held\n")
        why = mine.acquire()
        assert why is not None
        self.assertIn(f"held by pid {holder.pid}", why)
        holder.kill()
        holder.wait()
        self.assertIsNone(mine.acquire())  # the holder died: the kernel dropped its lock
        with open(mine.path) as handle:
            self.assertEqual(handle.read(), f"{os.getpid()}\n")
        mine.release()

    def test_same_process_other_lock_refused(self) -> None:
        """Two locks on one application in one host are exclusive; another application is independent."""
        lock_dir = self.mktemp()
        first, second, other = (PersistentLock(lock_dir, "A"), PersistentLock(lock_dir, "A"),
                                PersistentLock(lock_dir, "B"))
        self.assertIsNone(first.acquire())
        self.assertIn("held by pid", second.acquire() or "")
        self.assertIsNone(other.acquire())
        first.release()
        self.assertIsNone(second.acquire())
        second.release()
        other.release()


class SpawnerPiecesTests(SynchronousTestCase):
    def test_output_lines_logged_with_node_id(self) -> None:
        """Each stdout/stderr line is one log event with the node id; the exit is described."""
        logs = LogCatcher(self)
        ended: list[str] = []
        output = NodeOutput("desktop", 3, ended.append)
        output.childDataReceived(1, b"hello\nwor")
        output.childDataReceived(2, b"oops\n")
        output.childDataReceived(1, b"ld")
        output.processEnded(Failure(ProcessTerminated(exitCode=None, signal=9)))
        self.assertEqual([(e["node_id"], e["line"], e["stream"]) for e in logs.find(unit="desktop")
                          if "line" in e], [(3, "hello", "stdout"), (3, "oops", "stderr"), (3, "world", "stdout")])
        self.assertEqual(ended, ["killed by signal 9"])
        self.assertEqual(describe_exit(Failure(ProcessDone(0))), "exit status 0")
        self.assertEqual(describe_exit(Failure(ProcessTerminated(exitCode=3))), "exit status 3")

    def test_spawn_runs_the_command_in_its_own_session(self) -> None:
        """The command runs under a setsid wrapper, placeholders filled, node id in the environment."""
        reactor = MemoryReactorClock()
        calls: list[tuple[object, ...]] = []

        class Transport:
            pid = 4242

        def spawnProcess(protocol: object, executable: str, args: list[str], env: dict[str, str],
                         path: object, usePTY: bool, childFDs: dict[int, object]) -> Transport:
            calls.append((executable, args, env["PROTHEUS_NODE_ID"], usePTY))
            self.assertEqual(childFDs, {0: "w", 1: "r", 2: "r"})
            return Transport()
        reactor.spawnProcess = spawnProcess  # type: ignore[method-assign]
        spawner = ProcessSpawner(reactor, NodePolicy(command=("srv", "--port={port}", "{id}")), "desktop")
        process = spawner.spawn(NodeSpec(2, 21002, "", False), lambda why: None)
        self.assertEqual(process.pid, 4242)
        self.assertEqual(calls, [(sys.executable, [sys.executable, "-c", SETSID, "srv", "--port=21002", "2"],
                                  "2", False)])

    def test_spawn_refuses_a_port_in_use(self) -> None:
        """A node port another process listens on is refused before spawning (the probe would reach that process)."""
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        spawner = ProcessSpawner(MemoryReactorClock(), NodePolicy(command=("srv", "{port}")), "desktop")
        with self.assertRaises(OSError) as caught:
            spawner.spawn(NodeSpec(1, port, "", False), lambda why: None)
        self.assertIn(f"port 127.0.0.1:{port} is in use", str(caught.exception))


class UnixMemberProxyTests(SynchronousTestCase):
    def test_session_connects_to_a_unix_member(self) -> None:
        """A pool member with a Unix socket path is reached with connectUNIX (no name lookup); a
        failed connect there fails over to the next member."""
        reactor = MemoryReactorClock()
        pool = ServerPool([RemoteServer("NODE1", "127.0.0.1", 0, unix="/run/pb/node-1.sock"),
                           RemoteServer("01", "127.0.0.1", 5001)], ConnectionBalancer(), clock=reactor)
        factory = BrokerFactory(reactor, pool, connect_timeout=2.5)
        logs = LogCatcher(self)
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(HalfCloseTransport())
        self.assertEqual([(c[0], c[2]) for c in reactor.unixClients], [("/run/pb/node-1.sock", 2.5)])
        self.assertEqual(reactor.tcpClients, [])
        reactor.unixClients[0][1].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual([c[:2] for c in reactor.tcpClients], [("127.0.0.1", 5001)])
        self.assertTrue(any("NODE1 (unix:/run/pb/node-1.sock) failed" in t for t in logs.texts()))


class UnitWiringTests(SynchronousTestCase):
    def make(self, extra: str = "") -> DesktopUnit:
        config = parse_config("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
                              "NODE_COMMAND = appsrv --port {port}\nMIN_NODES = 1\n" + extra)
        return DesktopUnit(MemoryReactorClock(), config.desktop)

    def test_unit_runs_a_node_manager_service(self) -> None:
        """A desktop unit with NODE_COMMAND (default monitoring, no REMOTE_SERVER) has a node manager as a child service."""
        unit = self.make()
        assert unit.nodes is not None
        self.assertIs(unit.nodes.pool, unit.pool)
        self.assertEqual([type(s).__name__ for s in unit if isinstance(s, NodeService)], ["NodeService"])

    def test_reload_applies_sizes_and_keeps_the_command(self) -> None:
        """A reload applies MIN_NODES and the recycle keys live; a new NODE_COMMAND waits for a restart (logged)."""
        unit = self.make()
        logs = LogCatcher(self)
        new = parse_config("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
                           "NODE_COMMAND = other --port {port}\nMIN_NODES = 3\nRECYCLE_AGE = 60\n").desktop
        self.assertTrue(unit.reload(new))
        assert unit.nodes is not None
        self.assertEqual((unit.nodes.policy.min_nodes, unit.nodes.policy.recycle_age, unit.nodes.policy.command),
                         (3, 60.0, ("appsrv", "--port", "{port}")))
        self.assertTrue(any("NODE_COMMAND, TRANSPORT" in t and "restart to apply" in t for t in logs.texts()))
