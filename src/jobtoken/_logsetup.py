"""How jobtoken's entry points configure logging: stderr for the user, a file per job.

Shared by ``cli`` and ``_runstep`` (the step and finishing processes of ``jobtoken run``,
which must log exactly as the ``run`` command that started them). Entry points only:
the library never configures logging. The line formats and the file handler (UTC times,
reopened after logrotate, never through a symlink) are ``_logs``'.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

from ._logs import JsonFormatter, PrintableFilter, file_handler

__all__ = ["log_to_file", "setup_logging", "stderr_level"]


def stderr_level(verbose: int, quiet: int) -> int:
    """WARNING by default; each -v one level more, each -q one less (-q: errors only)."""
    return int(max(logging.DEBUG, min(logging.CRITICAL, logging.WARNING - 10 * (verbose - quiet))))


def setup_logging(verbose: int, quiet: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("jobtoken: %(message)s"))
    handler.addFilter(PrintableFilter())
    root = logging.getLogger("jobtoken")
    root.handlers[:] = [handler]
    root.setLevel(stderr_level(verbose, quiet))
    root.propagate = False


def log_to_file(path: Optional[str], *, log_json: bool, verbose: int, quiet: int) -> None:
    """Events (INFO and up) also go to ``path``; stderr keeps the user's level."""
    root = logging.getLogger("jobtoken")
    if log_json:
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
    if not path:
        return
    stderr_handlers = list(root.handlers)
    root.addHandler(file_handler(path, json_lines=log_json, level=logging.INFO))
    root.setLevel(min(root.level, logging.INFO))
    for h in stderr_handlers:
        h.setLevel(stderr_level(verbose, quiet))
