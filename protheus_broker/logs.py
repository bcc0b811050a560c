"""``[GENERAL]``: the TOTVS console-log keys, and their mapping onto twisted.logger."""

from __future__ import annotations

import os
from dataclasses import dataclass

from twisted.logger import FileLogObserver, formatEvent, formatEventAsClassicLogText
from twisted.logger._interfaces import LogEvent
from twisted.python.logfile import LogFile

from protheus_broker.ini import Section, writable_file


GENERAL_SECTION = "GENERAL"


@dataclass(frozen=True)
class GeneralConfig:
    """``[GENERAL]``: TOTVS console-log keys."""

    console_log: bool = True
    console_log_date: bool = False
    console_file: str | None = None
    console_max_size: int = 10 * 1024 * 1024


def read_general(section: Section) -> GeneralConfig:
    console_file = writable_file(section, "CONSOLEFILE")
    return GeneralConfig(
        console_log=section.boolean("CONSOLELOG", True),
        console_log_date=section.boolean("CONSOLELOGDATE", False),
        console_file=console_file,
        console_max_size=section.integer("CONSOLEMAXSIZE", 10 * 1024 * 1024, 0, 2**40),
    )


def _plain_line(event: LogEvent) -> str | None:
    text = formatEvent(event)
    if not text:
        return None
    return f"[{event.get('log_namespace', '-')}] {text}\n"


def console_file_observer(general: GeneralConfig) -> tuple[FileLogObserver, LogFile] | None:
    """An observer writing to ``ConsoleFile`` (rotated at ``ConsoleMaxSize``), or None if unset.

    ``ConsoleLogDate=1`` puts the date and time on each line, as TOTVS does.
    """
    if not general.console_file:
        return None
    path = os.path.abspath(general.console_file)
    logfile = LogFile.fromFullPath(path, rotateLength=general.console_max_size or None,
                                   maxRotatedFiles=5)
    if general.console_log_date:
        observer = FileLogObserver(logfile, formatEventAsClassicLogText)
    else:
        observer = FileLogObserver(logfile, _plain_line)
    return observer, logfile
