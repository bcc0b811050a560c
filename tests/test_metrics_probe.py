"""The agent's psutil probe on a real process (this one) and its sampling, on 127.0.0.1."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.agent.agent import AppServerWatch
from protheus_broker.agent.settings import WatchedAppServer
from protheus_broker.agent.probe import (
    AcceptQueue,
    ProcessFigures,
    Responsiveness,
    parse_proc_net_tcp,
    read_accept_queue,
)


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


class AcceptQueueTests(SynchronousTestCase):
    def test_parse_proc_net_tcp(self) -> None:
        """The listening socket's Recv-Q is the queue length; not-accepted connections are the
        port's established or close-wait ones with no inode; other ports and lines are ignored."""
        queue = parse_proc_net_tcp(PROC_NET_TCP.splitlines(), 8080)
        self.assertEqual(queue.queued, 3)
        self.assertEqual(queue.waiting, frozenset({"0100007F:1F90 0100007F:C350",
                                                   "0100007F:1F90 0100007F:C351"}))
        self.assertEqual(parse_proc_net_tcp(PROC_NET_TCP.splitlines(), 80).queued, 7)
        self.assertEqual(parse_proc_net_tcp(PROC_NET_TCP.splitlines(), 1), AcceptQueue())

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
