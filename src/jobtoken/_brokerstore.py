"""The node broker's job store: one crash-safe directory per job in the broker's state dir.

Why: the broker may be killed at any moment, and a restart must find every job as it
was: which phase it was in, who it is (its identity and anchor), which token directory
it was bound to. So every change of phase is written here, atomically and fsynced,
*before* the broker acts on it (docs/broker.md "State layout").

Per job, in ``<state_dir>/jobs/<safe id>-<sha256/16>/`` (a ``TokenDir``, 0700, the
broker's own): ``mytoken`` (the job mytoken), ``bt`` (the current access token),
``job.json``, ``state.json`` and ``broker.json`` (the phase, the identity with the
anchor, the job's token directory and the device/inode it had at ``prepare``, and
whether the job handed its mytoken in: ``adopt``).

Phases: ``registered`` → ``preparing`` → ``active`` → ``ending``.

Must NOT talk to the Mytoken server or write into a job's own directory; the jobs'
in-memory table and what the phases mean for them are ``_brokerops``'.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

from ._brokeridentity import JobIdentity
from ._brokerproto import BrokerReply
from ._errors import JobtokenError
from ._tokendir import JobRecord, RenewalState, TokenDir
from ._tokenfile import ensure_private_dir, write_file_atomically

if TYPE_CHECKING:
    from ._brokerloop import Conn

__all__ = [
    "ACTIVE",
    "BROKER_FILE",
    "ENDING",
    "PHASES",
    "PREPARING",
    "REGISTERED",
    "TOKEN_NAME",
    "BrokerJob",
    "JobStore",
    "job_key",
]

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
#: the token file's name, in the job's directory and in the broker's copy
TOKEN_NAME = "bt"
BROKER_FILE = "broker.json"

# phases of a job in its broker.json, in their order
REGISTERED, PREPARING, ACTIVE, ENDING = "registered", "preparing", "active", "ending"
PHASES = (REGISTERED, PREPARING, ACTIVE, ENDING)


def job_key(job_id: str) -> str:
    """A directory name for ``job_id``: readable, and unique (a hash of the exact id)."""
    digest = hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:16]
    return f"{_SAFE.sub('_', job_id)[:60].lstrip('.') or 'job'}-{digest}"


@dataclass
class BrokerJob:
    """One job as the loop sees it (changed only on the loop's thread)."""

    identity: JobIdentity
    store: TokenDir
    phase: str
    tokendir: Optional[str] = None
    dir_identity: Optional[Tuple[int, int]] = None
    spec: Optional[JobRecord] = None
    state: RenewalState = field(default_factory=RenewalState)
    busy: bool = False
    end_wanted: bool = False
    generation: int = 0
    pidfd: Optional[int] = None
    waiters: List[Tuple[Conn, Callable[[], BrokerReply]]] = field(default_factory=list)
    revoke_attempts: int = 0
    requeue: bool = False  # after revoking a cut-short prepare, the job may prepare again
    adopted: bool = False  # its mytoken came from the job (adopt): revoked by itself

    @property
    def job_id(self) -> str:
        return self.identity.job_id

    def record(self) -> Dict[str, Any]:
        """What ``broker.json`` keeps (no secret)."""
        return {
            "v": 1, "phase": self.phase, "identity": self.identity.to_dict(),
            "tokendir": self.tokendir,
            "dir_identity": list(self.dir_identity) if self.dir_identity else None,
            "adopted": self.adopted,
        }


class JobStore:
    """``<state_dir>``: the lock that makes one broker per directory, and the job dirs."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.jobs_dir = state_dir / "jobs"
        self._lock_fd: Optional[int] = None

    def lock(self) -> None:
        """Make the directories (0700) and take ``broker.lock`` for this process's life.

        Raises:
            TokenFileError: the directories cannot be made safely;
            JobtokenError: another broker holds the state directory.
        """
        ensure_private_dir(self.state_dir)
        ensure_private_dir(self.jobs_dir)
        self._lock_fd = os.open(self.state_dir / "broker.lock",
                                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise JobtokenError(f"another broker runs on {self.state_dir}") from None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def create(self, identity: JobIdentity, phase: str, *, adopted: bool = False) -> BrokerJob:
        """A new job's directory, its phase persisted."""
        store = TokenDir.create(self.jobs_dir / job_key(identity.job_id))
        job = BrokerJob(identity=identity, store=store, phase=phase, adopted=adopted)
        job.state.job_id = identity.job_id
        self.persist(job)
        return job

    def persist(self, job: BrokerJob) -> None:
        """Write the job's phase and binding before acting on it (crash safety)."""
        write_file_atomically(job.store.path / BROKER_FILE,
                              json.dumps(job.record(), sort_keys=True).encode(), mode=0o600)

    def write_state(self, job: BrokerJob, now: float) -> None:
        """Save ``state.json``; a failure is logged (the job's renewals go on)."""
        job.state.updated_at = now
        try:
            job.store.write_state(job.state)
        except JobtokenError as exc:
            logger.warning("job %s: cannot write its state: %s", job.job_id, exc.message)

    def load_all(self) -> Iterator[BrokerJob]:
        """Every job directory that can be read, in name order; others stay for an operator."""
        for entry in sorted(os.scandir(self.jobs_dir), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                job = self.load(Path(entry.path))
            except (JobtokenError, OSError, ValueError, KeyError, TypeError) as exc:
                logger.error("cannot reload %s (kept for an operator): %s", entry.path, exc)
                continue
            yield job

    def load(self, path: Path) -> BrokerJob:
        """One job from its directory; an ``active`` job without its spec is ``ending``."""
        data = json.loads((path / BROKER_FILE).read_text(encoding="utf-8"))
        identity = JobIdentity.from_dict(data["identity"])
        store = TokenDir(path)
        dir_identity = data.get("dir_identity")
        job = BrokerJob(identity=identity, store=store, phase=str(data["phase"]),
                        tokendir=data.get("tokendir"), adopted=data.get("adopted") is True,
                        dir_identity=tuple(dir_identity) if dir_identity else None)
        if job.phase in (ACTIVE, ENDING):
            try:
                job.spec = store.read_spec()
            except JobtokenError:
                if job.phase == ACTIVE:
                    job.phase = ENDING
        job.state = store.read_state() or RenewalState(job_id=identity.job_id)
        return job

    def remove(self, job: BrokerJob) -> None:
        """Delete the job's directory; what could not go is logged.

        ``broker.json`` goes first: ``TokenDir.remove`` removes the directory only when
        nothing but its own files is left (else every job's end logged a warning).
        """
        problems: List[str] = []
        try:
            os.unlink(job.store.path / BROKER_FILE)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot remove {job.store.path / BROKER_FILE}: {exc.strerror}")
        problems += job.store.remove()
        for problem in problems:
            if "No such file" not in problem:
                logger.warning("job %s: %s", job.job_id, problem)
