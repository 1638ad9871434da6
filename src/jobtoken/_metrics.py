"""Prometheus textfile metrics (node_exporter textfile collector) for one job's token.

Sites alert on tokens about to die: seconds to expiry, renewals, failures, last
success. One file per job (``jobtoken_<job>.prom``) in a per-node directory, written
atomically (temp file + rename in the same directory) so the collector never reads
half a file. Stdlib only: the waiting sidecar writes these.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, List

from ._tokenfile import write_file_atomically

__all__ = ["metrics_path", "remove_metrics", "render_metrics", "write_metrics"]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def metrics_path(directory: str, job_id: str) -> Path:
    return Path(directory) / f"jobtoken_{_SAFE.sub('_', job_id)[:120]}.prom"


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
        TokenFileError: the directory is missing or not writable.
    """
    text = render_metrics(job_id, state, now)
    write_file_atomically(metrics_path(directory, job_id), text.encode("utf-8"), mode=0o644)


def remove_metrics(directory: str, job_id: str) -> None:
    try:
        os.unlink(metrics_path(directory, job_id))
    except OSError:
        pass
