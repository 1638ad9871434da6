"""Log record hygiene shared by every handler jobtoken installs (CLI, hooks, credmon).

Must NOT configure logging (only ``cli`` and the hook entry points do) nor do I/O.
"""

from __future__ import annotations

import logging

from ._errors import printable

__all__ = ["PrintableFilter"]


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
