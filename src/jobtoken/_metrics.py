"""Prometheus textfile metrics (node_exporter textfile collector) for one job's token.

Sites alert on tokens about to die. Only absolute times are exported (Unix
timestamps of expiry and of the last success) and counters that only grow, so a file
nobody rewrites any more cannot claim that all is well: ``expiry - time()`` keeps
falling in the alert rule, not in the file. (The old relative gauge,
``jobtoken_token_expiry_seconds``, was dropped: frozen at the moment of writing, it
showed a healthy hour left for as long as a dead writer's file stayed.)

One file per writer, user and job (``jobtoken_u<uid>_<job>.prom``) in a per-node
directory, written atomically (temp file + rename in the same directory) so the
collector never reads half a file. Writers:

* the sidecar of ``run``/``sidecar``: from its state, on every event and at least
  every ``REFRESH_S`` (so the file's mtime shows it is alive); the file goes at job end;
* the one-shot commands (``ensure`` on a directory no sidecar renews, ``token
  --metrics-dir``): no process stays between runs, so each run reads the counters back
  from its own previous file (``record_oneshot``) and adds its outcome: the failure
  counter rises run after run and the last success is kept through failures.

The ``job_id`` label stays (a node runs many jobs of one account, and an alert must
name the job); its series stay bounded because each file goes with its job, and every
writer deletes its own account's files nobody rewrote for ``STALE_AFTER_S`` (jobs
killed before their cleanup); root's cleanup of accounts that never come back is in
README "Metrics".

The directory is usually shared by every job user (mode 1777, README "Metrics"). The
uid in the name keeps users' files apart; a file of ours that another user created
first, a symlink there, or a directory anyone may write into without the sticky bit
(so anyone could replace our file) is refused, never written through, read or replaced.
The node broker (``jobtoken broker serve``) writes one file of its own,
``jobtoken_u<uid>_broker-<hash of its state dir>.prom``: node totals (jobs by phase,
renewals, failures, 429 pauses, revocations pending), with the same conventions; its
counters carry on across restarts from its previous file.

Stdlib only: the waiting sidecar writes these.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Tuple

from ._errors import TokenFileError
from ._tokenfile import write_file_atomically

if TYPE_CHECKING:
    from ._tokendir import RenewalState

__all__ = [
    "REFRESH_S",
    "STALE_AFTER_S",
    "BrokerValues",
    "MetricValues",
    "after_oneshot",
    "broker_metrics_path",
    "expire_stale",
    "metrics_path",
    "parse_broker_metrics",
    "parse_metrics",
    "read_broker_metrics",
    "render_broker_metrics",
    "record_oneshot",
    "remove_metrics",
    "render_metrics",
    "write_broker_metrics",
    "write_metrics",
]

#: a sidecar rewrites its file at least this often, events or not
REFRESH_S = 300.0
#: a file of ours nobody rewrote for this long is a dead writer's: removed (one-shot
#: writers must run at least this often to keep their counters)
STALE_AFTER_S = 86400.0
_MAX_READ = 65536  # our own file is < 2 KiB; anything bigger is not ours to parse

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_SAMPLE = re.compile(r"^([a-z_]+)\{.*\} (\S+)$")


@dataclass(frozen=True)
class MetricValues:
    """What one job's file says; ``None`` leaves a metric out (not known yet)."""

    expires_at: Optional[float] = None
    last_success_at: Optional[float] = None
    renewals: int = 0
    failures_total: int = 0
    consecutive_failures: int = 0
    credential_lost: bool = False

    @classmethod
    def of_state(cls, state: RenewalState) -> MetricValues:
        return cls(
            expires_at=state.expires_at,
            last_success_at=state.last_success_at,
            renewals=state.renewals,
            failures_total=state.failures_total,
            consecutive_failures=state.consecutive_failures,
            credential_lost=state.credential_lost,
        )


# name, type, help, field of MetricValues: the one list render and parse share
_ROWS: Tuple[Tuple[str, str, str, str], ...] = (
    ("jobtoken_token_expiry_timestamp_seconds", "gauge",
     "Unix time at which the job's current access token expires.", "expires_at"),
    ("jobtoken_last_success_timestamp_seconds", "gauge",
     "Unix time jobtoken last obtained or confirmed a valid access token.", "last_success_at"),
    ("jobtoken_renewals_total", "counter", "Successful access-token renewals.", "renewals"),
    ("jobtoken_renewal_failures_total", "counter", "Failed renewal attempts.",
     "failures_total"),
    ("jobtoken_renewal_consecutive_failures", "gauge",
     "Renewal failures since the last success.", "consecutive_failures"),
    ("jobtoken_credential_lost", "gauge",
     "1 when the token expired or will expire and renewal keeps failing.", "credential_lost"),
)


@dataclass(frozen=True)
class BrokerValues:
    """What the node broker's file says: totals over every job it holds or held."""

    updated_at: float
    jobs_by_phase: Tuple[Tuple[str, int], ...] = ()
    renewals: int = 0
    failures_total: int = 0
    rate_limit_pauses: int = 0
    revocations: int = 0
    revocations_pending: int = 0


# name, type, help, field of BrokerValues (jobs_by_phase: one sample per phase)
_BROKER_ROWS: Tuple[Tuple[str, str, str, str], ...] = (
    ("jobtoken_broker_updated_timestamp_seconds", "gauge",
     "Unix time the node broker last wrote this file (at least every 5 minutes).",
     "updated_at"),
    ("jobtoken_broker_jobs", "gauge", "Jobs the node broker holds, by phase.", "jobs_by_phase"),
    ("jobtoken_broker_renewals_total", "counter",
     "Successful access-token renewals by the node broker.", "renewals"),
    ("jobtoken_broker_renewal_failures_total", "counter",
     "Failed renewal attempts by the node broker.", "failures_total"),
    ("jobtoken_broker_rate_limit_pauses_total", "counter",
     "Node-wide renewal pauses for a 429 answer with Retry-After.", "rate_limit_pauses"),
    ("jobtoken_broker_revocations_total", "counter",
     "Job mytokens the node broker revoked at the end of their job.", "revocations"),
    ("jobtoken_broker_revocations_pending", "gauge",
     "Ended jobs whose mytoken the node broker has not revoked yet.", "revocations_pending"),
)


def metrics_path(directory: str, job_id: str, uid: Optional[int] = None) -> Path:
    """This user's metrics file for ``job_id`` (the uid is in the name)."""
    owner = os.geteuid() if uid is None else uid
    return Path(directory) / f"jobtoken_u{owner}_{_SAFE.sub('_', job_id)[:120]}.prom"


def broker_metrics_path(directory: str, state_dir: str) -> Path:
    """The node broker's file: one per broker (state directory) and uid, in the name
    pattern every writer's and root's cleanup knows (``jobtoken_u<uid>_*.prom``)."""
    digest = hashlib.sha256(os.path.abspath(state_dir).encode("utf-8")).hexdigest()[:16]
    return Path(directory) / f"jobtoken_u{os.geteuid()}_broker-{digest}.prom"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _family(name: str, kind: str, help_text: str,
            samples: Iterable[Tuple[Mapping[str, str], float]]) -> List[str]:
    """One metric's HELP and TYPE lines and its samples (no sample timestamps: the
    textfile collector refuses those)."""
    out = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    out += [f"{name}{_labels(labels)} {float(value):.3f}" for labels, value in samples]
    return out


def render_metrics(job_id: str, values: MetricValues) -> str:
    """The exposition text for one job (pure)."""
    labels = {"job_id": job_id}
    out: List[str] = []
    for name, kind, help_text, field in _ROWS:
        value = getattr(values, field)
        if value is not None:
            out += _family(name, kind, help_text, [(labels, value)])
    return "\n".join(out) + "\n"


def render_broker_metrics(state_dir: str, values: BrokerValues) -> str:
    """The exposition text for one node broker (pure); every sample carries its
    ``state_dir`` (a pilot's broker and the node's are two series)."""
    labels = {"state_dir": state_dir}
    out: List[str] = []
    for name, kind, help_text, field in _BROKER_ROWS:
        if field == "jobs_by_phase":
            samples = [(dict(labels, phase=phase), float(count))
                       for phase, count in values.jobs_by_phase]
        else:
            samples = [(labels, float(getattr(values, field)))]
        out += _family(name, kind, help_text, samples)
    return "\n".join(out) + "\n"


def _samples(text: str) -> Dict[str, float]:
    """Name → finite value of each sample line (the last of a name); garbage skipped."""
    found: Dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        if math.isfinite(value):
            found[m.group(1)] = value
    return found


def parse_metrics(text: str) -> MetricValues:
    """Read back what ``render_metrics`` wrote (pure); what is missing or garbled is 0/None."""
    by_name = _samples(text)
    found = {field: by_name[name] for name, _, _, field in _ROWS if name in by_name}

    def count(field: str) -> int:
        return max(0, int(found.get(field, 0)))

    return MetricValues(
        expires_at=found.get("expires_at"),
        last_success_at=found.get("last_success_at"),
        renewals=count("renewals"),
        failures_total=count("failures_total"),
        consecutive_failures=count("consecutive_failures"),
        credential_lost=found.get("credential_lost", 0) > 0,
    )


def parse_broker_metrics(text: str) -> BrokerValues:
    """The counters of a broker's previous file (pure); what is missing or garbled is 0."""
    by_name = _samples(text)
    names = {field: name for name, _, _, field in _BROKER_ROWS}

    def count(field: str) -> int:
        return max(0, int(by_name.get(names[field], 0)))

    return BrokerValues(
        updated_at=by_name.get(names["updated_at"], 0.0),
        renewals=count("renewals"),
        failures_total=count("failures_total"),
        rate_limit_pauses=count("rate_limit_pauses"),
        revocations=count("revocations"),
    )


def after_oneshot(
    previous: MetricValues, *, ok: bool, expires_at: Optional[float], renewed: bool, now: float
) -> MetricValues:
    """The values after one run of a one-shot command (pure).

    A success sets the token's expiry and the last success; a failure counts and keeps
    both (a failed renewal never replaced the token on disk, and the last success did
    happen). The credential is lost once the kept token has expired while failing.
    """
    if ok:
        return MetricValues(
            expires_at=expires_at,
            last_success_at=now,
            renewals=previous.renewals + (1 if renewed else 0),
            failures_total=previous.failures_total,
        )
    return replace(
        previous,
        failures_total=previous.failures_total + 1,
        consecutive_failures=previous.consecutive_failures + 1,
        credential_lost=previous.expires_at is None or previous.expires_at <= now,
    )


def _check_place(path: Path) -> None:
    """Refuse a missing or unusable directory, a shared one without the sticky bit, and
    a file under our name that we do not own.

    Raises:
        TokenFileError: with what is wrong and what the site should do.
    """
    uid = os.geteuid()
    try:
        dir_st = os.stat(path.parent)
    except OSError as exc:
        raise TokenFileError(
            f"cannot use metrics directory {path.parent}: {exc.strerror}; the site creates "
            "it once, owned by root with mode 1777 (README, Metrics)"
        ) from exc
    if dir_st.st_mode & stat.S_IWOTH and not dir_st.st_mode & stat.S_ISVTX:
        raise TokenFileError(
            f"metrics directory {path.parent} is writable by everyone without the sticky "
            "bit, so anyone could replace our metrics: chmod 1777 it (README, Metrics)"
        )
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise TokenFileError(
            f"metrics directory {path.parent} is not writable by uid {uid}: every job "
            "account writes there, so it must be mode 1777 (README, Metrics)"
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


def write_metrics(directory: str, job_id: str, values: MetricValues, now: float) -> None:
    """Replace the job's metrics file atomically (0644: the collector runs as another
    user), then remove this account's stale files.

    Raises:
        TokenFileError: the directory is missing, not writable, or unsafe (no sticky bit
            on a world-writable directory), or the file there is not ours.
    """
    _write(metrics_path(directory, job_id), render_metrics(job_id, values), now)


def write_broker_metrics(directory: str, state_dir: str, values: BrokerValues) -> None:
    """Replace the node broker's file (as ``write_metrics`` does a job's).

    Raises:
        TokenFileError: as ``write_metrics``.
    """
    path = broker_metrics_path(directory, state_dir)
    _write(path, render_broker_metrics(state_dir, values), values.updated_at)


def read_broker_metrics(directory: str, state_dir: str) -> BrokerValues:
    """The counters of the broker's own previous file (none: zeros)."""
    text = _read_own(broker_metrics_path(directory, state_dir))
    return parse_broker_metrics(text) if text is not None else BrokerValues(updated_at=0.0)


def _write(path: Path, text: str, now: float) -> None:
    _check_place(path)
    write_file_atomically(path, text.encode("utf-8"), mode=0o644)
    expire_stale(str(path.parent), now, keep=path)


def _read_own(path: Path) -> Optional[str]:
    """Our previous file's text, or None: never through a link, never another user's
    file, never anything but a small regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > _MAX_READ:
            return None
        return os.read(fd, _MAX_READ).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def record_oneshot(
    directory: str, job_id: str, *, ok: bool, expires_at: Optional[float], renewed: bool,
    now: float,
) -> Optional[MetricValues]:
    """Add one run's outcome to the job's file; the counters persist in the file itself.

    Metrics never fail the command: a problem is logged and None returned. Two runs of
    one job at the same instant may count as one (no lock: another user could hold it).
    """
    text = _read_own(metrics_path(directory, job_id))
    previous = parse_metrics(text) if text is not None else MetricValues()
    values = after_oneshot(previous, ok=ok, expires_at=expires_at, renewed=renewed, now=now)
    try:
        write_metrics(directory, job_id, values, now)
    except TokenFileError as exc:
        logger.warning("cannot write metrics error=%s", exc.message)
        return None
    return values


def expire_stale(
    directory: str, now: float, *, max_age_s: float = STALE_AFTER_S, keep: Optional[Path] = None
) -> List[str]:
    """Remove this account's jobtoken files (and temp files of a writer killed mid-write)
    not rewritten for ``max_age_s``; returns their names.

    In a sticky directory only the owner (and root) may remove a file, so each account
    cleans up after its own killed jobs; root's cron does the rest (README, Metrics).
    """
    uid = os.geteuid()
    prefix = f"jobtoken_u{uid}_"
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    removed: List[str] = []
    for entry in entries:
        if not _our_kind(entry.name, prefix) or (keep is not None and entry.name == keep.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid == uid and now - st.st_mtime > max_age_s:
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            continue
    return removed


def _our_kind(name: str, prefix: str) -> bool:
    """A metrics file of this account, or the temp file of one killed mid-write."""
    return (name.startswith(prefix) and name.endswith(".prom")) or (
        name.startswith("." + prefix) and name.endswith(".tmp"))


def remove_metrics(directory: str, job_id: str) -> None:
    """Remove this user's metrics file for the job (its end); another user's file stays."""
    path = metrics_path(directory, job_id)
    try:
        if os.lstat(path).st_uid == os.geteuid():
            os.unlink(path)
    except OSError:
        pass
