"""The agent's psutil probe on a real process (this one) with real sockets on 127.0.0.1, and its
sampling: the parts that need the kernel's view of listeners and connections."""

from __future__ import annotations

import os
import socket
from typing import Any

import psutil
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from protheus_broker.agent.agent import AppServerWatch
from protheus_broker.agent.settings import WatchedAppServer
from protheus_broker.agent.probe import ProbeProblem, ProcessProbe, read_accept_queue


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


class AcceptQueueSocketTests(ListeningTestCase):
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
