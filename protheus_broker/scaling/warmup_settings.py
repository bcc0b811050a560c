"""Warm-up keys of a balance unit: in the unit's own section, or in the section it names with
``NODES = <section>`` (TOTVS style, next to the node keys); ``WARMUP=1`` turns the warm-up on.

Every bad value is one :class:`ConfigError` naming file, line and key.
"""

from __future__ import annotations

import os
import re
from datetime import date
from typing import Mapping

from protheus_broker.ini import ConfigError, Section
from protheus_broker.scaling.forecast import WarmupPolicy

#: Where the usage history goes when HISTORY_FILE is not given and systemd names no StateDirectory.
STATE_DIR = "/var/lib/protheus-broker"

#: The keys this module reads (so a NODES section's reader can leave them out of its unknown keys).
WARMUP_KEYS = ("WARMUP", "HISTORY_FILE", "HISTORY_WEEKS", "FORECAST_WEEKS", "FORECAST_PERCENTILE",
               "FORECAST_HEADROOM", "HOLIDAYS", "WARMUP_MARGIN", "WARMUP_COLD_START", "FORECAST_ONLY",
               "SESSIONS_PER_NODE")

_HEADROOM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


def warmup_section(unit: Section, sections: Mapping[str, Section]) -> Section:
    """The section holding the unit's warm-up keys: the one ``NODES`` names, else the unit's own."""
    named = unit.raw("NODES")
    if named:
        target = sections.get(named)
        if target is None:
            raise unit.error("NODES", f"no [{named}] section in the file")
        return target
    return unit


def default_history_file(unit_name: str, environ: Mapping[str, str]) -> str:
    """``<state dir>/usage-<section>.json``: systemd's ``$STATE_DIRECTORY`` or /var/lib/protheus-broker."""
    folder = environ.get("STATE_DIRECTORY", "").split(":")[0] or STATE_DIR
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", unit_name).lower()
    return os.path.join(folder, f"usage-{slug}.json")


def read_history_file(section: Section, default: str) -> str:
    """HISTORY_FILE (or *default*), its folder checked so that a path the broker cannot write is one
    line at startup rather than a failed save every five minutes."""
    path = section.text("HISTORY_FILE", default)
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise section.error("HISTORY_FILE", f"{path!r} is a directory, not a file")
    if not os.path.isdir(folder):
        raise section.error("HISTORY_FILE", f"cannot write {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise section.error("HISTORY_FILE", f"cannot write {path!r}: no permission to create files in {folder!r}")
    return path


def read_headroom(section: Section) -> tuple[float, int]:
    """FORECAST_HEADROOM: ``20%`` (sessions above the forecast) or ``1`` (extra nodes); ``0%`` by
    default: the simulation (bench/sim_warmup.py) finds p90 of 4 weeks warm enough, and +20 % costs
    about a fifth more node-hours for half a point of warm logins."""
    text = section.text("FORECAST_HEADROOM", "0%")
    match = _HEADROOM.match(text)
    if not match:
        raise section.error("FORECAST_HEADROOM", f"expected a percentage like 20% or a number of nodes like 1, "
                                                 f"got {text!r}")
    value, percent = float(match.group(1)), match.group(2)
    if percent:
        if value > 1000:
            raise section.error("FORECAST_HEADROOM", f"{text} is out of range (0% to 1000%)")
        return value / 100.0, 0
    if value != int(value) or value > 1000:
        raise section.error("FORECAST_HEADROOM", f"{text}: a number of nodes is a whole number from 0 to 1000")
    return 0.0, int(value)


def read_holidays(section: Section) -> tuple[frozenset[date], frozenset[tuple[int, int]]]:
    """HOLIDAYS: dates (``2026-12-25``) or days of every year (``12-25``), separated by commas or spaces."""
    dates: set[date] = set()
    annual: set[tuple[int, int]] = set()
    for word in re.split(r"[,\s]+", section.text("HOLIDAYS", "")):
        if not word:
            continue
        try:
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", word):
                dates.add(date.fromisoformat(word))
                continue
            if re.fullmatch(r"\d{2}-\d{2}", word):
                month, day = (int(x) for x in word.split("-"))
                date(2024, month, day)  # a leap year: 02-29 is a day of some years
                annual.add((month, day))
                continue
        except ValueError:
            pass
        raise section.error("HOLIDAYS", f"{word!r} is not a date: use YYYY-MM-DD, or MM-DD for every year")
    return frozenset(dates), frozenset(annual)


def read_warmup(unit: Section, sections: Mapping[str, Section],
                environ: Mapping[str, str] | None = None) -> WarmupPolicy | None:
    """The unit's :class:`WarmupPolicy`, None unless ``WARMUP=1``."""
    section = warmup_section(unit, sections)
    if not section.boolean("WARMUP", False):
        for key in WARMUP_KEYS:  # read so that they are not reported unknown: WARMUP=0 keeps them off
            section.raw(key)
        return None
    history_weeks = section.integer("HISTORY_WEEKS", 8, 1, 52)
    weeks = section.integer("FORECAST_WEEKS", min(4, history_weeks), 1, 52)
    if weeks > history_weeks:
        raise section.error("FORECAST_WEEKS", f"{weeks} is above HISTORY_WEEKS={history_weeks}: "
                                              "the history would not hold them")
    ratio, nodes = read_headroom(section)
    holidays, annual = read_holidays(section)
    history_file = read_history_file(
        section, default_history_file(unit.name, os.environ if environ is None else environ))
    return WarmupPolicy(
        sessions_per_node=section.integer("SESSIONS_PER_NODE", 50, 1, 1_000_000),
        history_file=history_file,
        history_weeks=history_weeks,
        weeks=weeks,
        percentile=section.number("FORECAST_PERCENTILE", 90.0, 0.0, 100.0),
        headroom_ratio=ratio,
        headroom_nodes=nodes,
        holidays=holidays,
        annual_holidays=annual,
        margin=section.number("WARMUP_MARGIN", 120.0, 0.0, 86400.0),
        cold_start=section.number("WARMUP_COLD_START", 60.0, 0.0, 3600.0),
        forecast_only=section.boolean("FORECAST_ONLY", False),
    )


__all__ = ["ConfigError", "WARMUP_KEYS", "read_warmup", "warmup_section"]
