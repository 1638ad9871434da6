"""Prometheus textfile metrics (node_exporter textfile collector) for one job's token.

Sites alert on tokens about to die: seconds to expiry, renewals, failures, last
success. One file per user and job (``jobtoken_u<uid>_<job>.prom``) in a per-node
directory, written atomically (temp file + rename in the same directory) so the
collector never reads half a file. Stdlib only: the waiting sidecar writes these.

The directory is usually shared by every job user (mode 1777, README "Metrics"). The
uid in the name keeps users' files apart; a file of ours that another user created
first, a symlink there, or a directory anyone may write into without the sticky bit
(so anyone could replace our file) is refused, never written through or replaced.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, List, Optional

from ._errors import TokenFileError
from ._tokenfile import write_file_atomically

__all__ = ["metrics_path", "remove_metrics", "render_metrics", "write_metrics"]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def metrics_path(directory: str, job_id: str, uid: Optional[int] = None) -> Path:
    """This user's metrics file for ``job_id`` (the uid is in the name)."""
    owner = os.geteuid() if uid is None else uid
    return Path(directory) / f"jobtoken_u{owner}_{_SAFE.sub('_', job_id)[:120]}.prom"


def _check_place(path: Path) -> None:
    """Refuse a shared directory without the sticky bit, and a file we do not own.

    Raises:
        TokenFileError: with what is wrong and what the site should do.
    """
    uid = os.geteuid()
    try:
        dir_st = os.stat(path.parent)
    except OSError as exc:
        raise TokenFileError(f"cannot use metrics directory {path.parent}: {exc.strerror}") from exc
    if dir_st.st_mode & stat.S_IWOTH and not dir_st.st_mode & stat.S_ISVTX:
        raise TokenFileError(
            f"metrics directory {path.parent} is writable by everyone without the sticky "
            "bit, so anyone could replace our metrics: chmod 1777 it (README, Metrics)"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TokenFileError(f"cannot inspect {path}: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode) or st.st_uid != uid:
        raise TokenFileError(
            f"metrics file {path} is a symlink or belongs to uid {st.st_uid}, not to us "
            f"(uid {uid}): another user created it first; not writing through or over it"
        )


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(job_id: str, state: Any, now: float) -> str:
    """The exposition text for one job (pure)."""
    labels = f'{{job_id="{_label(job_id)}"}}'
    rows: List[tuple] = [
        ("jobtoken_token_expiry_seconds", "gauge", "Seconds until the job's access token expires.",
         (state.expires_at - now) if state.expires_at is not None else None),
        ("jobtoken_token_expiry_timestamp_seconds", "gauge",
         "Unix time at which the access token expires.", state.expires_at),
        ("jobtoken_renewals_total", "counter", "Successful access-token renewals.",
         state.renewals),
        ("jobtoken_renewal_failures_total", "counter", "Failed renewal attempts.",
         state.failures_total),
        ("jobtoken_renewal_consecutive_failures", "gauge",
         "Renewal failures since the last success.", state.consecutive_failures),
        ("jobtoken_last_success_timestamp_seconds", "gauge",
         "Unix time of the last successful renewal.", state.last_success_at),
        ("jobtoken_credential_lost", "gauge",
         "1 when the token expired or will expire and renewal keeps failing.",
         1 if state.credential_lost else 0),
    ]
    out = []
    for name, kind, help_text, value in rows:
        if value is None:
            continue
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.append(f"{name}{labels} {float(value):.3f}")
    return "\n".join(out) + "\n"


def write_metrics(directory: str, job_id: str, state: Any, now: float) -> None:
    """Replace the job's metrics file atomically (0644: the collector runs as another user).

    Raises:
        TokenFileError: the directory is missing, not writable, or unsafe (no sticky bit
            on a world-writable directory), or the file there is not ours.
    """
    text = render_metrics(job_id, state, now)
    path = metrics_path(directory, job_id)
    _check_place(path)
    write_file_atomically(path, text.encode("utf-8"), mode=0o644)


def remove_metrics(directory: str, job_id: str) -> None:
    """Remove this user's metrics file for the job; another user's file stays."""
    path = metrics_path(directory, job_id)
    try:
        if os.lstat(path).st_uid == os.geteuid():
            os.unlink(path)
    except OSError:
        pass
