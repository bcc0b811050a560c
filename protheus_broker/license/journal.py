"""The lease journal: the lease table survives a restart (and a crash) of the license server.

An append-only file of records, one a line: ``<crc32 hex> <json>``.  The table writes each
change (``grant``, ``renew`` that moves a deadline, ``release`` with its reason) and the file is
fsync'd before the change is applied and answered, so after a crash the journal holds everything
any client was told.  A crash in the middle of a write leaves a torn last record: it is ignored
with one log line (its change was never answered).  At start the journal is replayed and at once
compacted (a snapshot of the live leases is written to ``<path>.tmp``, fsync'd and renamed over
the journal, the folder fsync'd), which also drops a torn tail; the same compaction runs
periodically so the file stays small.

Deadlines are wall-clock times: a lease found at restart keeps what is left of its time to live,
so the seats of a broker that died while the license server was down come back after the TTL.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from twisted.logger import Logger
from zope.interface import implementer

from protheus_broker.license.leases import IJournal, Lease, Reason

log = Logger()

DEFAULT_JOURNAL_PATH = "/var/lib/protheus-broker/license.journal"

_REASONS = {reason.value for reason in Reason}


class JournalCorrupt(Exception):
    """A record that is not the last one does not read: not a crash, a damaged file."""

    def __init__(self, path: str, line: int, why: str) -> None:
        self.path, self.line, self.why = path, line, why
        super().__init__(f"{path}:{line}: {why}; the lease table cannot be trusted: move the file "
                         "aside to start with no leases (every client's leases are then forgotten)")


def encode(entry: dict[str, Any]) -> bytes:
    """One record, newline included."""
    payload = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _parse(line: bytes) -> dict[str, Any]:
    crc, space, payload = line.partition(b" ")
    if not space or len(crc) != 8:
        raise ValueError("not '<crc> <record>'")
    if int(crc, 16) != zlib.crc32(payload):
        raise ValueError("checksum mismatch")
    entry = json.loads(payload)
    if not isinstance(entry, dict):
        raise ValueError("not a record")
    return entry


@dataclass(frozen=True)
class Replayed:
    """What a journal held: the live leases, how many records were read, a torn tail ('' if
    none)."""

    leases: list[Lease]
    records: int
    torn: str


def _text(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value or " " in value or "\n" in value:
        raise ValueError(f"bad {key}")
    return value


def _integer(entry: dict[str, Any], key: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"bad {key}")
    return value


def _time(entry: dict[str, Any], key: str) -> float:
    value = entry.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"bad {key}")
    return float(value)


def _apply(leases: dict[str, Lease], entry: dict[str, Any]) -> str:
    """Apply one record; '' or why it was skipped (a record about a lease we do not know)."""
    op = entry.get("op")
    if op == "grant":
        lease = Lease(_text(entry, "lease"), _text(entry, "client"), _text(entry, "class"),
                      _integer(entry, "seats"), _time(entry, "expires"))
        if lease.lease_id in leases:
            raise ValueError(f"lease {lease.lease_id} granted twice")
        leases[lease.lease_id] = lease
        return ""
    lease_id = _text(entry, "lease")
    if op == "renew":
        expires = _time(entry, "expires")
        held = leases.get(lease_id)
        if held is None:
            return f"renewal of unknown lease {lease_id}"
        leases[lease_id] = Lease(held.lease_id, held.client, held.license_class, held.seats, expires)
        return ""
    if op == "release":
        seats = _integer(entry, "seats")
        if entry.get("reason") not in _REASONS:
            raise ValueError("bad reason")
        held = leases.get(lease_id)
        if held is None:
            return f"release of unknown lease {lease_id}"
        if seats >= held.seats:
            del leases[lease_id]
        else:
            leases[lease_id] = Lease(held.lease_id, held.client, held.license_class, held.seats - seats,
                                     held.expires)
        return ""
    raise ValueError(f"unknown op {str(op)[:20]!r}")


def replay(data: bytes, path: str = "<journal>") -> Replayed:
    """The leases *data* (a journal's bytes) holds.  A torn last record (a crash while writing
    it) is left out and named in :attr:`Replayed.torn`; any other bad record is
    :class:`JournalCorrupt`."""
    lines = data.split(b"\n")
    tail = lines.pop()  # the bytes after the last newline: a record whose write did not finish
    torn = f"{len(tail)} bytes of an unfinished record at line {len(lines) + 1}" if tail else ""
    leases: dict[str, Lease] = {}
    records = 0
    for number, line in enumerate(lines, start=1):
        try:
            entry = _parse(line)
            skipped = _apply(leases, entry)
        except (ValueError, UnicodeDecodeError) as exc:  # (json's errors are ValueErrors)
            if number == len(lines) and not tail:  # the last record: written in part (torn)
                torn = f"an unreadable last record at line {number} ({exc})"
                break
            raise JournalCorrupt(path, number, f"unreadable record ({exc})") from None
        if skipped:
            log.warn("journal {path}:{line}: {what}; skipped", path=path, line=number, what=skipped)
        records += 1
    return Replayed(sorted(leases.values(), key=lambda lease: lease.lease_id), records, torn)


def snapshot(leases: Iterable[Lease]) -> bytes:
    """A journal holding exactly *leases* (one grant record each)."""
    return b"".join(encode({"op": "grant", "lease": lease.lease_id, "client": lease.client,
                            "class": lease.license_class, "seats": lease.seats,
                            "expires": lease.expires}) for lease in leases)


@implementer(IJournal)
class FileJournal:
    """The journal file: each record written and fsync'd before :meth:`record` returns.

    A failed write (disk full) is undone (the file truncated back), so a later record never
    follows a torn one; if even that fails, every record is refused until a compaction succeeds.
    """

    def __init__(self, path: str, fsync: Callable[[int], None] = os.fsync) -> None:
        self.path = path
        self.fsync = fsync
        self.fd: int | None = None
        self.size = 0
        self.broken = ""
        #: Records appended since the last compaction.
        self.appended = 0

    def read(self) -> bytes:
        """The journal's bytes (none if there is no journal yet)."""
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return b""

    def record(self, entry: dict[str, Any]) -> None:
        if self.fd is None:
            raise OSError(f"journal {self.path} is not open")
        if self.broken:
            raise OSError(f"journal {self.path} unusable since a failed write ({self.broken})")
        data = encode(entry)
        try:
            _write_all(self.fd, data)
            self.fsync(self.fd)
        except OSError as exc:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                self.broken = exc.strerror or str(exc)
            raise
        self.size += len(data)
        self.appended += 1

    def compact(self, leases: Iterable[Lease]) -> int:
        """Replace the journal with a snapshot of *leases* (atomically: temp file, fsync,
        rename, fsync of the folder); the size written."""
        data = snapshot(leases)
        temporary = self.path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            _write_all(fd, data)
            self.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        folder = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            self.fsync(folder)
        finally:
            os.close(folder)
        self.close()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size, self.appended, self.broken = len(data), 0, ""
        return len(data)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def open_journal(journal: FileJournal, table: Any) -> Replayed:
    """Replay *journal* into *table* (a :class:`~.leases.LeaseTable` not yet journalling),
    compact it, and make it the table's journal."""
    replayed = replay(journal.read(), journal.path)
    if replayed.torn:
        log.warn("journal {path}: ignored {torn} (a crash while it was written; it was never "
                 "answered)", path=journal.path, torn=replayed.torn)
    table.load(replayed.leases)
    journal.compact(table.leases.values())
    table.journal = journal
    return replayed
