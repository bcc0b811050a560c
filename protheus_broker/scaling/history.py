"""Usage history for the warm-up (seed 003, Hypnus): per calendar day and 15-minute slot, the peak of
concurrent sessions, the logins counted and the peak of nodes running; a small JSON file keeps it
across restarts.

- :class:`UsageHistory` is pure logic: ``record`` folds an observation into its slot, ``sample``
  reads one back, ``prune`` keeps the last N weeks (the file's size is bounded: 8 weeks of 96 slots
  is about 60 KB).
- :class:`HistoryStore` loads and saves it atomically (temp file, fsync, rename, fsync of the
  folder); a corrupt or unreadable file is one log line and an empty history, never a crash.
- :class:`HistoryWriter` is the service that saves it periodically and at stop.

Slots are local wall-clock time (office hours are), of the time zone given (the machine's by default).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

#: One slot is 15 minutes; a day has 96.
SLOT_SECONDS = 900
SLOTS_PER_DAY = 86400 // SLOT_SECONDS

#: The file format's version; another version is read as corrupt (one line, start empty).
FORMAT_VERSION = 1


def slot_of(now: float, tz: tzinfo | None = None) -> tuple[date, int]:
    """The calendar day and the slot (0..95) of wall-clock time *now* in *tz* (None: local time)."""
    moment = datetime.fromtimestamp(now, tz)
    return moment.date(), (moment.hour * 3600 + moment.minute * 60 + moment.second) // SLOT_SECONDS


@dataclass
class Slot:
    """What one 15-minute slot of one day saw."""

    sessions: int = 0  # peak of concurrent sessions
    logins: int = 0  # logins counted in the slot
    nodes: int = 0  # peak of nodes running


class UsageHistory:
    """Slots per calendar day, the last *weeks* weeks of them.  A day present in the history was
    observed (the broker ran and recorded); a slot of an observed day that holds nothing saw nothing."""

    def __init__(self, weeks: int = 8) -> None:
        self.weeks = weeks
        self.days: dict[date, dict[int, Slot]] = {}

    def slot(self, day: date, index: int) -> Slot:
        """The slot, created empty (and the day marked observed) if new."""
        return self.days.setdefault(day, {}).setdefault(index, Slot())

    def record(self, day: date, index: int, sessions: int, logins: int = 0, nodes: int | None = None) -> None:
        """Fold an observation into its slot: peaks of sessions and nodes, sum of logins."""
        entry = self.slot(day, index)
        entry.sessions = max(entry.sessions, sessions)
        entry.logins += logins
        if nodes is not None:
            entry.nodes = max(entry.nodes, nodes)
        if len(self.days) > self.weeks * 7 + 1:
            self.prune(day)

    def observed(self, day: date) -> bool:
        return day in self.days

    def sample(self, day: date, index: int) -> Slot | None:
        """The slot of an observed day (an empty one if nothing happened), None if the day was not observed."""
        slots = self.days.get(day)
        if slots is None:
            return None
        return slots.get(index, Slot())

    def prune(self, today: date) -> None:
        """Forget the days older than *weeks* weeks before *today*."""
        oldest = today - timedelta(days=self.weeks * 7)
        for day in [d for d in self.days if d < oldest]:
            del self.days[day]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "slot_seconds": SLOT_SECONDS,
            "days": {day.isoformat(): [[i, s.sessions, s.logins, s.nodes] for i, s in sorted(slots.items())]
                     for day, slots in sorted(self.days.items())},
        }

    @classmethod
    def from_json(cls, data: Any, weeks: int) -> UsageHistory:
        """Parse what :meth:`to_json` wrote; ValueError on anything else."""
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a version {FORMAT_VERSION} usage history")
        if data.get("slot_seconds") != SLOT_SECONDS:
            raise ValueError(f"slots of {data.get('slot_seconds')!r} s, expected {SLOT_SECONDS}")
        days = data.get("days")
        if not isinstance(days, dict):
            raise ValueError("no 'days' object")
        history = cls(weeks)
        for text, rows in days.items():
            day = date.fromisoformat(text)
            if not isinstance(rows, list):
                raise ValueError(f"day {text}: not a list of slots")
            slots = history.days.setdefault(day, {})
            for row in rows:
                if (not isinstance(row, list) or len(row) != 4
                        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row)
                        or row[0] >= SLOTS_PER_DAY):
                    raise ValueError(f"day {text}: bad slot {row!r}")
                slots[row[0]] = Slot(row[1], row[2], row[3])
        if history.days:
            history.prune(max(history.days))
        return history


class HistoryStore:
    """The history's file: loaded once, saved whole and atomically."""

    def __init__(self, path: str, weeks: int = 8) -> None:
        self.path = path
        self.weeks = weeks

    def load(self) -> UsageHistory:
        """The saved history; missing: empty; corrupt or unreadable: one log line, empty."""
        try:
            with open(self.path, "rb") as handle:
                data = json.loads(handle.read().decode("utf-8"))
            history = UsageHistory.from_json(data, self.weeks)
        except FileNotFoundError:
            return UsageHistory(self.weeks)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
            kept = self._keep_corrupt() if not isinstance(e, OSError) else ""
            log.error("usage history {path}: cannot read it ({reason}); starting with an empty history{kept}",
                      path=self.path, reason=str(e) or e.__class__.__name__, kept=kept)
            return UsageHistory(self.weeks)
        log.info("usage history {path}: {days} days loaded", path=self.path, days=len(history.days))
        return history

    def _keep_corrupt(self) -> str:
        """Move an unreadable file aside (``.corrupt``) so the next save does not erase the evidence."""
        try:
            os.replace(self.path, f"{self.path}.corrupt")
        except OSError:
            return ""
        return f" (the file is kept as {self.path}.corrupt)"

    def save(self, history: UsageHistory) -> bool:
        """Write *history* to a temp file, fsync, rename over the file, fsync the folder; an error
        is one log line (the old file stays whole) and False."""
        folder = os.path.dirname(os.path.abspath(self.path))
        temp = f"{self.path}.tmp"
        body = json.dumps(history.to_json(), separators=(",", ":")).encode("utf-8")
        try:
            with open(temp, "wb") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
            descriptor = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError as e:
            log.error("usage history {path}: cannot save it ({reason})", path=self.path,
                      reason=e.strerror or str(e))
            return False
        return True


class HistoryWriter(Service):
    """Saves the history every *interval* seconds and when the service stops."""

    def __init__(self, store: HistoryStore, history: Callable[[], UsageHistory], clock: IReactorTime,
                 interval: float = 300.0) -> None:
        self.store = store
        self.history = history
        self.clock = clock
        self.interval = interval
        self._loop: LoopingCall | None = None

    def save(self) -> None:
        self.store.save(self.history())

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.save)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.save()
