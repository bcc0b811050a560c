"""Measure one AppServer process with psutil: memory, CPU, threads, users.  No Twisted here.

The process is found by pid file, by name and listening port, or as the process listening on the
AppServer's port (see :class:`~protheus_broker.config.WatchedAppServer`), and found again when it
restarts.  Users are the established TCP connections on the AppServer's port, or the whole number
in ``USERS_FILE`` when the AppServer (or a script) publishes its own count there.

A process can be there and listening and still not serve: stopped (SIGSTOP, a debugger), or hung.
The kernel completes TCP handshakes from the listen backlog on its own, so a local connect still
succeeds.  :class:`Responsiveness` judges it from the process state and from the accept queue in
``/proc/net/tcp`` (a connection the process has not accepted for ``ACCEPT_TIMEOUT`` seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import psutil

from protheus_broker.agent.settings import WatchedAppServer


class ProbeProblem(Exception):
    """The AppServer cannot be measured (no process, no permission...); the text says why."""


@dataclass(frozen=True)
class ProcessFigures:
    """What psutil read of the AppServer process."""

    pid: int
    memory_bytes: int
    users: int
    threads: int
    cpu_percent: float
    status: str = "running"  # psutil's: running, sleeping, stopped, tracing-stop, zombie...


def host_figures() -> tuple[int, int]:
    """Physical memory in bytes and logical CPU count of this host."""
    return int(psutil.virtual_memory().total), int(psutil.cpu_count() or 1)


def _connections(process: Any) -> list[Any]:
    method = getattr(process, "net_connections", None) or process.connections  # psutil >= 6 / 5.9
    return list(method(kind="tcp"))


def _listens_on(process: Any, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in _connections(process))
    except (psutil.Error, OSError):
        return False


class ProcessProbe:
    """Finds and measures the process of one watched AppServer."""

    def __init__(self, watched: WatchedAppServer) -> None:
        self.watched = watched
        self.process: Any = None

    def _find(self) -> Any:
        watched = self.watched
        if watched.pid_file:
            try:
                with open(watched.pid_file) as handle:
                    pid = int(handle.read().split()[0])
            except (OSError, ValueError, IndexError) as exc:
                raise ProbeProblem(f"pid file {watched.pid_file}: {getattr(exc, 'strerror', None) or exc}") from None
            try:
                return psutil.Process(pid)
            except psutil.Error:
                raise ProbeProblem(f"no process {pid} (from {watched.pid_file})") from None
        if watched.process_name:
            for process in psutil.process_iter(["name"]):
                if process.info["name"] == watched.process_name and _listens_on(process, watched.port):
                    return process
            raise ProbeProblem(f"no process {watched.process_name!r} listening on port {watched.port}")
        try:
            listening = [c for c in psutil.net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == watched.port]
        except (psutil.AccessDenied, OSError) as exc:
            raise ProbeProblem(f"cannot list sockets to find port {watched.port}'s process: {exc}") from None
        for connection in listening:
            if connection.pid:
                try:
                    return psutil.Process(connection.pid)
                except psutil.Error:
                    continue
        if listening:
            raise ProbeProblem(f"port {watched.port} is listening but its process is not visible "
                               "(another user's: run the agent as that user, or use PID_FILE)")
        raise ProbeProblem(f"no process listening on port {watched.port}")

    def measure(self) -> ProcessFigures:
        """Read the process's figures now; raises :class:`ProbeProblem` with the reason."""
        if self.process is None or not self.process.is_running():
            self.process = self._find()
            self.process.cpu_percent(None)  # the first call only starts the CPU clock
        process = self.process
        try:
            with process.oneshot():
                memory = int(process.memory_info().rss)
                threads = int(process.num_threads())
                cpu = float(process.cpu_percent(None))
                status = str(process.status())
                users = self._users(process)
        except psutil.NoSuchProcess:
            self.process = None
            raise ProbeProblem(f"process {process.pid} is gone") from None
        except psutil.Error as exc:
            raise ProbeProblem(f"process {process.pid}: {exc}") from None
        return ProcessFigures(pid=process.pid, memory_bytes=memory, users=users, threads=threads,
                              cpu_percent=cpu, status=status)

    def _users(self, process: Any) -> int:
        if self.watched.users_file:
            try:
                with open(self.watched.users_file) as handle:
                    return int(handle.read().split()[0])
            except (OSError, ValueError, IndexError) as exc:
                raise ProbeProblem(f"users file {self.watched.users_file}: {exc}") from None
        port = self.watched.port
        return sum(1 for c in _connections(process)
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)


# --- is it serving? ------------------------------------------------------------------------------

#: Process states in which it serves nobody, and how to say so.
_NOT_RUNNING = {
    psutil.STATUS_STOPPED: "is stopped (SIGSTOP or job control; SIGCONT resumes it)",
    psutil.STATUS_TRACING_STOP: "is stopped by a debugger or tracer",
    psutil.STATUS_ZOMBIE: "has exited (zombie, not yet reaped)",
    psutil.STATUS_DEAD: "is dead",
}
#: A tracer (strace) stops a process briefly at each system call: only this many samples in a
#: row in tracing-stop count as stopped.
TRACING_STOP_SAMPLES = 2

_LISTEN = "0A"
_ESTABLISHED = "01"
_CLOSE_WAIT = "08"  # the client already hung up, and the process never accepted it
PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")


@dataclass(frozen=True)
class AcceptQueue:
    """The AppServer's port as the kernel sees it: the accept-queue length of its listening
    sockets (their Recv-Q), and the connections in it (handshake done, not accepted: no socket
    inode yet), each as its ``local remote`` address pair."""

    queued: int = 0
    waiting: frozenset[str] = field(default_factory=frozenset)


def parse_proc_net_tcp(lines: Iterable[str], port: int) -> AcceptQueue:
    """The accept queue of *port* from the lines of ``/proc/net/tcp`` (or ``tcp6``)."""
    queued = 0
    waiting: set[str] = set()
    needle = f":{port:04X} "  # a cheap filter first: hosts with many connections have long files
    for line in lines:
        if needle not in line:
            continue
        fields = line.split()
        if len(fields) < 10 or ":" not in fields[1] or ":" not in fields[4]:
            continue  # the heading, or a line we do not understand
        local, remote, state, queues, inode = fields[1], fields[2], fields[3], fields[4], fields[9]
        try:
            if int(local.rsplit(":", 1)[1], 16) != port:
                continue
            if state == _LISTEN:
                queued += int(queues.split(":")[1], 16)
            elif state in (_ESTABLISHED, _CLOSE_WAIT) and inode == "0":
                waiting.add(f"{local} {remote}")
        except ValueError:
            continue
    return AcceptQueue(queued, frozenset(waiting))


def read_accept_queue(port: int, paths: Iterable[str] = PROC_NET_TCP) -> AcceptQueue | None:
    """*port*'s accept queue now, or None where there is no ``/proc/net/tcp`` (not Linux)."""
    queued = 0
    waiting: set[str] = set()
    found = False
    for path in paths:
        try:
            with open(path) as handle:
                queue = parse_proc_net_tcp(handle, port)
        except OSError:
            continue
        found = True
        queued += queue.queued
        waiting |= queue.waiting
    return AcceptQueue(queued, frozenset(waiting)) if found else None


class Responsiveness:
    """Judges, sample after sample, whether a process that is there also serves: its state
    (stopped, traced, zombie) and whether it accepts the connections the kernel queued for it.

    A connection seen waiting in the accept queue for *accept_timeout* seconds (on the samples'
    clock) means the process does not accept: a healthy one takes each within milliseconds.
    ``accept_timeout = 0`` turns the accept-queue check off."""

    def __init__(self, accept_timeout: float) -> None:
        self.accept_timeout = accept_timeout
        self.first_seen: dict[str, float] = {}
        self.tracing_samples = 0

    def judge(self, now: float, pid: int, status: str | None, queue: AcceptQueue | None) -> str:
        """'' if the process looks able to serve, else why not (for the report's problem)."""
        if status == psutil.STATUS_TRACING_STOP:
            self.tracing_samples += 1
        else:
            self.tracing_samples = 0
        waiting = queue.waiting if queue is not None and self.accept_timeout > 0 else frozenset()
        self.first_seen = {key: self.first_seen.get(key, now) for key in waiting}
        if status in _NOT_RUNNING and (status != psutil.STATUS_TRACING_STOP
                                       or self.tracing_samples >= TRACING_STOP_SAMPLES):
            return f"process {pid} {_NOT_RUNNING[status]}"
        if self.first_seen:
            oldest = now - min(self.first_seen.values())
            if oldest >= self.accept_timeout:
                # (a steady text: the agent logs and pushes each change of it)
                return (f"process {pid} does not accept connections (hung?): one waited "
                        f"{self.accept_timeout:g}s or more in its accept queue")
        return ""
