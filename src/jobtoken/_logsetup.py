"""How jobtoken's entry points configure logging: stderr for the user, a file per job.

Shared by ``cli`` and ``_runstep`` (the step and finishing processes of ``jobtoken run``,
which must log exactly as the ``run`` command that started them). Entry points only:
the library never configures logging.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Optional

from ._logs import PrintableFilter

__all__ = ["JsonFormatter", "log_to_file", "setup_logging", "stderr_level"]


def stderr_level(verbose: int, quiet: int) -> int:
    """WARNING, one step up per ``-q`` and down per ``-v``."""
    return int(max(logging.DEBUG, min(logging.CRITICAL, logging.WARNING - 10 * (verbose - quiet))))


def setup_logging(verbose: int, quiet: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("jobtoken: %(message)s"))
    handler.addFilter(PrintableFilter())
    root = logging.getLogger("jobtoken")
    root.handlers[:] = [handler]
    root.setLevel(stderr_level(verbose, quiet))
    root.propagate = False


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def log_to_file(path: Optional[str], *, log_json: bool, verbose: int, quiet: int) -> None:
    """Events (INFO and up) also go to ``path``; stderr keeps the user's level."""
    root = logging.getLogger("jobtoken")
    if log_json:
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
    if not path:
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(
        JsonFormatter() if log_json else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    handler.setLevel(logging.INFO)
    handler.addFilter(PrintableFilter())
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO))
    for h in root.handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(stderr_level(verbose, quiet))
