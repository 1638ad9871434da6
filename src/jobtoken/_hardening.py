"""Process hardening for processes that hold a mytoken (Linux; a no-op elsewhere).

Two leaks the file rules cannot close, because the secret is in our *memory*:

* a core dump (SIGABRT with a core limit) or a same-uid reader of ``/proc/PID/mem``,
  ``/proc/PID/environ`` and friends. :func:`protect_process` sets ``PR_SET_DUMPABLE``
  to 0, which makes the kernel write no core (or, with ``fs.suid_dumpable=2``, one only
  root may read) and hands ``/proc/PID/*`` to root, and lowers ``RLIMIT_CORE`` to 0.
  Both are per process: ``execve`` of a normal binary makes the payload dumpable again,
  but the core limit is inherited, so ``run`` (which starts the payload) keeps it.
* ``run --mytoken-env VAR``: removing ``VAR`` from ``os.environ`` only drops libc's
  pointer; ``/proc/PID/environ`` shows the block the kernel laid out at ``execve``.
  :func:`scrub_environ` overwrites the value there too.

This module must NOT raise for an unsupported platform or a refused call: hardening is
best effort on top of the file rules, and never a reason not to run the job.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["protect_process", "scrub_environ"]

logger = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def protect_process(*, core_limit: bool = True) -> bool:
    """Make this process non-dumpable and (with ``core_limit``) give it no core limit.

    Returns whether the process is now non-dumpable. ``core_limit=False`` is for a
    process whose children (the payload) must keep the site's core limit.
    """
    libc = _libc()
    if libc is None:
        return False
    if core_limit:
        import resource

        try:
            _, hard = resource.getrlimit(resource.RLIMIT_CORE)
            resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
        except (OSError, ValueError) as exc:
            logger.debug("cannot lower the core limit: %s", exc)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        logger.debug("prctl(PR_SET_DUMPABLE) failed errno=%d", ctypes.get_errno())
        return False
    return bool(libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)


def _environ_block() -> tuple[int, int] | None:
    """Start and end address of the environment the kernel set up at ``execve``."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        start, end = int(fields[47]), int(fields[48])  # fields 50 and 51 (env_start/end)
    except (OSError, ValueError, IndexError):
        return None
    return (start, end) if 0 < start < end else None


def scrub_environ(name: str) -> bool:
    """Remove ``name`` from our environment, including the original block in memory.

    After this neither ``os.environ``, children, nor a reader of ``/proc/PID/environ``
    sees the value. Returns whether the original block was found and overwritten (False
    off Linux or when the variable was not in it).
    """
    os.environ.pop(name, None)
    if _libc() is None:
        return False
    block = _environ_block()
    if block is None:
        return False
    start, end = block
    data = ctypes.string_at(start, end - start)
    key = name.encode() + b"="
    scrubbed = False
    offset = 0
    for entry in data.split(b"\0"):
        if entry.startswith(key):
            ctypes.memset(start + offset + len(key), 0, len(entry) - len(key))
            scrubbed = True
        offset += len(entry) + 1
    return scrubbed
