"""End of a job for the batch adapters: stop the sidecar, revoke the job mytoken, delete files.

HTCondor's ``JOB_EXIT`` hook and ARC's stage 2 both end a job this way, each inside a
time limit (HTCondor waits 30 s). The revocation runs as ``jobtoken revoke`` in its own
process group so the whole attempt can be killed at the deadline.

Must NOT: raise (cleanup is best effort and the batch system ignores our status), or
touch a directory that holds no ``job.json`` (it is not a jobtoken token directory).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from .._errors import JobtokenError
from .._tokendir import TokenDir

__all__ = ["revoke_and_clean", "stop_sidecar"]

logger = logging.getLogger(__name__)


def _sidecar_pid(tokendir: TokenDir) -> Optional[int]:
    try:
        text = tokendir.lock_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def stop_sidecar(tokendir: TokenDir, *, timeout_s: float = 20.0) -> bool:
    """Ask the directory's sidecar to finish (TERM) and wait for it; True when none is left."""
    from .._run import sidecar_alive

    if not sidecar_alive(tokendir):
        return True
    pid = _sidecar_pid(tokendir)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not sidecar_alive(tokendir):
            return True
        time.sleep(0.1)
    logger.warning("sidecar did not stop pid=%d within_s=%.0f", pid, timeout_s)
    return False


def _owns_a_job_mytoken(directory: Path) -> bool:
    """Whether ``job.json`` says a job mytoken was minted for this job (``run`` with the
    user's own mytoken mints none); an unreadable one counts as yes: better one needless
    revocation attempt than a live job mytoken."""
    try:
        return TokenDir(directory).read_spec().mytoken_owned
    except JobtokenError:
        return True


def _revoke(argv: List[str], timeout_s: float) -> bool:
    """Run ``jobtoken revoke`` in its own process group, killed whole at ``timeout_s``;
    True when it succeeded (revoked, or nothing left to revoke)."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    try:
        _out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        logger.warning("revocation timed out after_s=%.0f", timeout_s)
        return False
    if proc.returncode != 0:
        logger.warning(
            "revocation failed rc=%d error=%s",
            proc.returncode,
            " ".join(err.decode("utf-8", "replace").split())[:200],
        )
    return proc.returncode == 0


def revoke_and_clean(
    directory: Path,
    *,
    timeout_s: float = 25.0,
    jobtoken_argv: Optional[List[str]] = None,
    remove_dir: bool = False,
) -> bool:
    """Revoke the job mytoken and delete the token files: the secrets,
    or with ``remove_dir`` every file and the directory (``TokenDir.remove``).

    Returns:
        True when the job mytoken is revoked or was already gone.
    """
    if not (directory / "job.json").is_file():
        return True
    revoked = True
    if _owns_a_job_mytoken(directory):
        # also without the mytoken file: a payload that copied its mytoken and deleted the
        # file must still have it revoked, by mom_id through the site's parent if there is one
        argv = (jobtoken_argv or [sys.executable, "-m", "jobtoken"]) + ["revoke", str(directory)]
        revoked = _revoke(argv, timeout_s)
    for problem in TokenDir(directory).remove(secrets_only=not remove_dir):
        logger.warning("%s", problem)
    return revoked
