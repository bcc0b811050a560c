"""The agent's psutil probe on a real process (this one) and its sampling, on 127.0.0.1."""

from __future__ import annotations

import os
import socket
from typing import Any

import psutil
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from protheus_broker.agent.agent import AppServerWatch
from protheus_broker.agent.settings import WatchedAppServer
from protheus_broker.agent.probe import (
    AcceptQueue,
    ProbeProblem,
    ProcessFigures,
    ProcessProbe,
    Responsiveness,
    parse_proc_net_tcp,
    read_accept_queue,
)


class ListeningTestCase(SynchronousTestCase):
    def listener(self) -> socket.socket:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        self.addCleanup(server.close)
        return server


class ProcessProbeTests(ListeningTestCase):
    def test_by_pid_file(self) -> None:
        """PID_FILE: this process is found and measured: memory, threads, CPU."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        figures = ProcessProbe(WatchedAppServer("X", 1, pid_file=path)).measure()
        self.assertEqual(figures.pid, os.getpid())
        self.assertAlmostEqual(figures.memory_bytes, psutil.Process().memory_info().rss, delta=64 * 2**20)
        self.assertGreaterEqual(figures.threads, 1)
        self.assertGreaterEqual(figures.cpu_percent, 0.0)

    def test_by_listening_port_counts_established_users(self) -> None:
        """By port alone: the process listening there; users are established connections on it."""
        server = self.listener()
        port = server.getsockname()[1]
        clients = []
        for _ in range(2):
            client = socket.create_connection(("127.0.0.1", port))
            self.addCleanup(client.close)
            accepted, _ = server.accept()
            self.addCleanup(accepted.close)
            clients.append(client)
        figures = ProcessProbe(WatchedAppServer("X", port)).measure()
        self.assertEqual((figures.pid, figures.users), (os.getpid(), 2))

    def test_by_process_name_and_port(self) -> None:
        """PROCESS_NAME + PORT: the process of that name listening on the port."""
        port = self.listener().getsockname()[1]
        name = psutil.Process().name()
        figures = ProcessProbe(WatchedAppServer("X", port, process_name=name)).measure()
        self.assertEqual(figures.pid, os.getpid())
        with self.assertRaises(ProbeProblem) as caught:
            ProcessProbe(WatchedAppServer("X", port, process_name="no-such-appsrv")).measure()
        self.assertIn("no process 'no-such-appsrv' listening on port", str(caught.exception))

    def test_users_file(self) -> None:
        """USERS_FILE: the count the AppServer publishes replaces the connection count."""
        port = self.listener().getsockname()[1]
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("37\n")
        figures = ProcessProbe(WatchedAppServer("X", port, users_file=path)).measure()
        self.assertEqual(figures.users, 37)

    def test_problems_say_why(self) -> None:
        """A missing pid file, a dead pid, a port nobody listens on: ProbeProblem with the reason."""
        unused = socket.socket()
        unused.bind(("127.0.0.1", 0))
        free_port = unused.getsockname()[1]
        unused.close()
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("999999999\n")
        for watched, text in [
            (WatchedAppServer("X", 1, pid_file="/nonexistent.pid"), "pid file /nonexistent.pid"),
            (WatchedAppServer("X", 1, pid_file=path), "no process 999999999"),
            (WatchedAppServer("X", free_port), f"no process listening on port {free_port}"),
        ]:
            with self.assertRaises(ProbeProblem) as caught:
                ProcessProbe(watched).measure()
            self.assertIn(text, str(caught.exception))


class SampleTests(TestCase):
    @defer.inlineCallbacks
    def test_sample_accepting_then_not(self) -> Any:
        """A sample measures the process and makes a local connect; a closed port is reported
        as not accepting, with the reason."""
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        port = server.getsockname()[1]
        watch = AppServerWatch(reactor, WatchedAppServer("X", port))
        sample = yield defer.ensureDeferred(watch.sample())
        self.assertTrue(sample.accepting, sample.problem)
        self.assertEqual(sample.figures.pid, os.getpid())
        server.close()
        sample = yield defer.ensureDeferred(watch.sample())
        self.assertFalse(sample.accepting)
        self.assertIn(f"127.0.0.1:{port} failed", sample.problem)


#: /proc/net/tcp as Linux writes it: port 8080 (1F90) listening with 3 in its accept queue
#: (Recv-Q 3), two connections to it not accepted (inode 0: one established, one the client
#: closed), one accepted (an inode), a client socket of ours to it, and another port.
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 0 1 0 20 4 30 10 -1
   2: 0100007F:1F90 0100007F:C351 08 00000000:00000000 00:00000000 00000000  1000        0 0 1 0 20 4 30 10 -1
   3: 0100007F:1F90 0100007F:C352 01 00000000:00000000 00:00000000 00000000  1000        0 5151 1 0 20 4 30 10 -1
   4: 0100007F:C353 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 6161 1 0 20 4 30 10 -1
   5: 0100007F:0050 00000000:0000 0A 00000000:00000007 00:00000000 00000000     0        0 7171 1 0 100 0 0 10 0
garbage line
"""


class AcceptQueueTests(ListeningTestCase):
    def test_parse_proc_net_tcp(self) -> None:
        """The listening socket's Recv-Q is the queue length; not-accepted connections are the
        port's established or close-wait ones with no inode; other ports and lines are ignored."""
        queue = parse_proc_net_tcp(PROC_NET_TCP.splitlines(), 8080)
        self.assertEqual(queue.queued, 3)
        self.assertEqual(queue.waiting, frozenset({"0100007F:1F90 0100007F:C350",
                                                   "0100007F:1F90 0100007F:C351"}))
        self.assertEqual(parse_proc_net_tcp(PROC_NET_TCP.splitlines(), 80).queued, 7)
        self.assertEqual(parse_proc_net_tcp(PROC_NET_TCP.splitlines(), 1), AcceptQueue())

    def test_real_listener_that_never_accepts(self) -> None:
        """A socket that listens and never accepts: the kernel completes the connects, and
        /proc/net/tcp shows them queued until accepted."""
        server = self.listener()
        port = server.getsockname()[1]
        for _ in range(2):
            self.addCleanup(socket.create_connection(("127.0.0.1", port)).close)
        queue = read_accept_queue(port)
        assert queue is not None
        self.assertEqual((queue.queued, len(queue.waiting)), (2, 2))
        accepted, _ = server.accept()
        self.addCleanup(accepted.close)
        queue = read_accept_queue(port)
        assert queue is not None
        self.assertEqual((queue.queued, len(queue.waiting)), (1, 1))

    def test_no_proc(self) -> None:
        """Without /proc/net/tcp (not Linux) there is no queue to judge."""
        self.assertIsNone(read_accept_queue(1, paths=("/nonexistent/tcp",)))


def waiting(*keys: str) -> AcceptQueue:
    return AcceptQueue(len(keys), frozenset(keys))


class ResponsivenessTests(SynchronousTestCase):
    def test_stopped_zombie_dead_at_once(self) -> None:
        """A stopped, zombie or dead process is reported on the first sample, saying which."""
        for status, text in (("stopped", "is stopped (SIGSTOP"), ("zombie", "zombie"),
                             ("dead", "is dead")):
            problem = Responsiveness(3.0).judge(0.0, 42, status, AcceptQueue())
            self.assertIn(f"process 42 ", problem)
            self.assertIn(text, problem)
        self.assertEqual(Responsiveness(3.0).judge(0.0, 42, "sleeping", AcceptQueue()), "")
        self.assertEqual(Responsiveness(3.0).judge(0.0, 42, "running", None), "")

    def test_tracing_stop_needs_two_samples(self) -> None:
        """tracing-stop (a tracer stops a process at each system call) counts from the second
        sample in a row."""
        judge = Responsiveness(3.0)
        self.assertEqual(judge.judge(0.0, 42, "tracing-stop", None), "")
        self.assertIn("stopped by a debugger", judge.judge(1.0, 42, "tracing-stop", None))
        self.assertEqual(judge.judge(2.0, 42, "running", None), "")
        self.assertEqual(judge.judge(3.0, 42, "tracing-stop", None), "")

    def test_connection_left_in_the_accept_queue(self) -> None:
        """A connection still not accepted ACCEPT_TIMEOUT seconds after it was first seen: the
        process does not accept (hung); once it drains, fine again."""
        judge = Responsiveness(3.0)
        self.assertEqual(judge.judge(0.0, 42, "sleeping", waiting("a")), "")
        self.assertEqual(judge.judge(1.0, 42, "sleeping", waiting("a", "b")), "")
        self.assertEqual(judge.judge(2.0, 42, "sleeping", waiting("a", "b", "c")), "")
        problem = judge.judge(3.0, 42, "sleeping", waiting("a", "b", "c", "d"))
        self.assertIn("process 42 does not accept connections", problem)
        self.assertEqual(judge.judge(4.0, 42, "sleeping", waiting("b", "c", "d", "e")), problem)
        self.assertEqual(judge.judge(5.0, 42, "sleeping", AcceptQueue()), "")

    def test_busy_but_draining_queue_is_fine(self) -> None:
        """A queue never empty at sample time but holding new connections each time (a busy
        server accepting them) is not a hang; nor is anything with ACCEPT_TIMEOUT = 0."""
        judge = Responsiveness(1.0)
        for second in range(20):
            self.assertEqual(judge.judge(float(second), 42, "running",
                                         waiting(f"x{second}", f"y{second}")), "")
        off = Responsiveness(0.0)
        for second in range(20):
            self.assertEqual(off.judge(float(second), 42, "running", waiting("stuck")), "")


class HungSampleTests(SynchronousTestCase):
    def test_sample_reports_a_stopped_or_hung_process_not_accepting(self) -> None:
        """The agent's sample: a stopped process, or a connection stuck in its accept queue,
        makes the sample not accepting with the reason, though the local connect succeeds."""
        from twisted.internet import task

        clock = task.Clock()
        state = {"status": "sleeping", "queue": AcceptQueue()}

        async def connects() -> str:
            return ""

        watch = AppServerWatch(clock, WatchedAppServer("X", 5001),
                               measure=lambda: ProcessFigures(7, 1, 0, 1, 0.0, status=state["status"]),
                               connect_check=connects, accept_queue=lambda: state["queue"],
                               accept_timeout=2.0)

        def sample() -> Any:
            result = self.successResultOf(defer.ensureDeferred(watch.sample()))
            clock.advance(1.0)
            return result

        self.assertTrue(sample().accepting)
        state["status"] = "stopped"
        stopped = sample()
        self.assertFalse(stopped.accepting)
        self.assertEqual(stopped.problem, "process 7 is stopped (SIGSTOP or job control; SIGCONT resumes it)")
        state["status"] = "sleeping"
        self.assertTrue(sample().accepting)
        state["queue"] = waiting("k")
        self.assertTrue(sample().accepting)
        self.assertTrue(sample().accepting)
        hung = sample()
        self.assertFalse(hung.accepting)
        self.assertIn("process 7 does not accept connections", hung.problem)
