"""One persistent node per application on this host: an ``fcntl.flock`` on
``<LOCK_DIR>/persistent-<application>.lock`` (the holder's pid written inside).  The broker hands
the locked file to its persistent node as file descriptor 3, so the lock lasts while either of
them lives: a broker that dies leaves the lock with its node, and no second broker starts another
persistent node beside it.  The kernel drops the lock when both are gone.  Across hosts this does
not reach: a farm needs the agents (not done here)."""

from __future__ import annotations

import fcntl
import os
import re

from twisted.logger import Logger

log = Logger()


def lock_path(lock_dir: str, application: str) -> str:
    """The lock file of *application*'s persistent node."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", application) or "default"
    return os.path.join(lock_dir, f"persistent-{safe}.lock")


class PersistentLock:
    """Held while this broker may run *application*'s persistent node."""

    def __init__(self, lock_dir: str, application: str) -> None:
        self.path = lock_path(lock_dir, application)
        self.application = application
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """None if held (now or already), else why not (naming the holder's pid)."""
        if self.fd is not None:
            return None
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return f"cannot open the lock {self.path}: {e.strerror or e}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            return (f"the persistent node of {self.application} is held by pid {holder} "
                    f"(lock {self.path})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return None

    def note_node(self, pid: int) -> None:
        """Name the persistent node's pid in the lock file, beside the broker's."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}, persistent node pid {pid}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing drops the flock
