"""Measure one AppServer process with psutil: memory, CPU, threads, users.  No Twisted here.

The process is found by pid file, by name and listening port, or as the process listening on the
AppServer's port (see :class:`~protheus_broker.config.WatchedAppServer`), and found again when it
restarts.  Users are the established TCP connections on the AppServer's port, or the whole number
in ``USERS_FILE`` when the AppServer (or a script) publishes its own count there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil

from .config import WatchedAppServer


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
                users = self._users(process)
        except psutil.NoSuchProcess:
            self.process = None
            raise ProbeProblem(f"process {process.pid} is gone") from None
        except psutil.Error as exc:
            raise ProbeProblem(f"process {process.pid}: {exc}") from None
        return ProcessFigures(pid=process.pid, memory_bytes=memory, users=users, threads=threads,
                              cpu_percent=cpu)

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
