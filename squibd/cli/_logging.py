"""The daemon's log formats: text, journald (priority prefixes) and JSON lines.

Under systemd (``$JOURNAL_STREAM`` set, systemd.exec(5)) each line starts with
``<N>``, the syslog priority journald parses (sd-daemon(3)), so
``journalctl -p err`` works; journald adds timestamps itself. ``--log-format
json`` writes one JSON object per line (``ts``, ``level``, ``priority``,
``logger``, ``message``, and ``exc`` for tracebacks).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Final

__all__ = ["JournalFormatter", "JsonFormatter", "setup_logging", "syslog_priority"]

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JOURNAL_FORMAT: Final = "%(levelname)s %(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    """syslog(3) priority of a logging level: 7 debug ... 3 err, 2 crit."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>`` before every line of a record (a traceback's lines too)."""

    def __init__(self) -> None:
        super().__init__(_JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record (prefixed with ``<N>`` under journald)."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        data = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "priority": syslog_priority(record.levelno),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        text = json.dumps(data, ensure_ascii=False)
        return f"<{data['priority']}>{text}" if self._journal else text


def setup_logging(level: str, log_format: str = "text") -> None:
    """Configure the root logger on stderr for ``level`` and ``log_format`` (text or json)."""
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter(journal)
    elif journal:
        formatter = JournalFormatter()
    else:
        formatter = logging.Formatter(_TEXT_FORMAT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
