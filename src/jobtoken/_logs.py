"""How jobtoken's log lines look, for every handler it installs (CLI, sidecar, hooks, credmon).

One formatter: each line starts with its time as ISO 8601 UTC with a ``Z``
(``2026-11-30T13:45:58Z``, the text ``utc_text`` prints for token times), so the logs of
a worker node, an access point and a CE in different time zones line up with each other
and with the ``exp`` of the tokens they mention; ``--log-json`` writes the same time as
the ``time`` member. One file handler: reopened when logrotate moved the file away
(``WatchedFileHandler``), never through a symlink.

Must NOT configure logging (only ``cli``, ``_batchcommands`` and the hook entry points
attach handlers).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
from typing import Any, Optional

from ._clock import utc_text
from ._errors import printable

__all__ = ["LINE_FORMAT", "JsonFormatter", "PrintableFilter", "UtcFormatter", "file_handler"]

LINE_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class UtcFormatter(logging.Formatter):
    """``%(asctime)s`` as ISO 8601 UTC with ``Z``, whatever the host's time zone."""

    def __init__(self, fmt: str = LINE_FORMAT) -> None:
        super().__init__(fmt)

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        return utc_text(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``--log-json``, ``renewal.log_json``) for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": utc_text(record.created),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


class PrintableFilter(logging.Filter):
    """A handler filter that applies :func:`printable` to each record's message.

    Every handler jobtoken installs carries it, so a server value logged anywhere (a
    ``sub`` with a CR/LF that would forge a "job mytoken revoked" line) stays one line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = printable(message), None
        return True


def _open_no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


class _WatchedNoFollowHandler(logging.handlers.WatchedFileHandler):
    """A ``WatchedFileHandler`` whose (re)open refuses a symlink planted at the path."""

    def _open(self) -> Any:
        return open(self.baseFilename, self.mode, encoding=self.encoding,
                    opener=_open_no_follow)

    def emit(self, record: logging.LogRecord) -> None:
        # a (re)open that fails (a symlink planted after a rotation, a full disk) costs
        # this line, reported through handleError, not the daemon that logs it
        try:
            self.reopenIfNeeded()
            if self.stream is None:
                self.stream = self._open()
                self._statstream()
        except OSError:
            self.handleError(record)
            return
        logging.FileHandler.emit(self, record)


def file_handler(path: str, *, json_lines: bool = False, fmt: str = LINE_FORMAT,
                 level: int = logging.NOTSET) -> logging.Handler:
    """A handler appending to ``path`` that survives logrotate and escapes each message.

    logrotate renames the file; the handler notices at its next line and opens a new
    one, so no ``copytruncate`` (which loses the lines written between its copy and its
    truncate) is needed.

    Raises:
        OSError: the file cannot be opened (a symlink: ``ELOOP``).
    """
    handler = _WatchedNoFollowHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter() if json_lines else UtcFormatter(fmt))
    handler.addFilter(PrintableFilter())
    handler.setLevel(level)
    return handler
