"""ARC-CE: what the ``ENV/JOBTOKEN`` runtime environment's three stages call.

ARC sources an RTE three times (``$1`` = stage). Stage 0 runs on the CE front end in the
LRMS submit script, with the job's ``joboption_*`` variables: here the job mytoken is
minted from the CE's robot/VO mytoken into ``<session dir>/.jobtoken`` (0700/0600),
with the first access token (``stage0``). Stages 1 and 2 run on the worker node inside
the job script, where the session dir is ``$RUNTIME_JOB_DIR`` (possibly moved to local
scratch, so ``relocate`` fixes the absolute path recorded in ``job.json``); the RTE
starts the sidecar in stage 1 and ``stage2`` stops it, revokes and cleans up.

A job that never reaches stage 2 (``arckill``: A-REX deletes the session directory while a
fork job may still run; a lost node) is covered on the CE: A-REX's ``statecallout`` for
FINISHED runs ``end``, which revokes what is left of the job's mytoken by its name, with the
CE's robot mytoken (no session directory needed).

Must NOT: start processes that outlive the job (stage 2 stops the sidecar), or take
settings from anything but the RTE parameters, the job's ``joboption_*`` values and the
jobtoken configuration.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, Sequence

from .._config import Config
from .._errors import ConfigError, JobtokenError
from .._prepare import JobFacts, PreparedJob, prepare_job, revoke_job_mytokens
from .._tokendir import TokenDir
from ._cleanup import revoke_and_clean, stop_sidecar

__all__ = ["TOKEN_DIR_NAME", "audit_lines_on_success", "end", "job_from_grami", "relocate",
           "stage0", "stage2"]

logger = logging.getLogger(__name__)

TOKEN_DIR_NAME = ".jobtoken"


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def audit_lines_on_success() -> Iterator[None]:
    """Hold stage 0's log records; print them when it succeeds, only the warnings when not.

    Stage 0's stderr is what a user reads with ``arccat -l``: after a failure it must be
    the one error line (the CLI prints it), not the audit trail of a job that never was.
    """
    root = logging.getLogger("jobtoken")
    held = _Held()
    handlers, root.handlers = root.handlers, [held]
    try:
        yield
    except BaseException:
        root.handlers = handlers
        _replay(handlers, [r for r in held.records if r.levelno >= logging.WARNING])
        raise
    root.handlers = handlers
    _replay(handlers, held.records)


def _replay(handlers: Sequence[logging.Handler], records: Sequence[logging.LogRecord]) -> None:
    for record in records:
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def job_from_grami(grami: Mapping[str, str]) -> JobFacts:
    """The job as ARC describes it to stage 0 (``joboption_walltime`` is in seconds).

    Raises:
        ConfigError: no job id; a wall time that is not a number.
    """
    job_id = grami.get("joboption_gridid") or grami.get("joboption_jobid")
    if not job_id:
        raise ConfigError("ARC stage 0 without joboption_gridid (not run by the submit script?)")
    raw = (grami.get("joboption_walltime") or "").strip()
    walltime = None
    if raw:
        try:
            walltime = float(raw)
        except ValueError:
            raise ConfigError(f"joboption_walltime {raw!r} is not a number of seconds") from None
        walltime = walltime if walltime > 0 else None
    return JobFacts(job_id=job_id, walltime_s=walltime)


def stage0(
    config: Config,
    grami: Mapping[str, str],
    *,
    scope_templates: Sequence[str] = (),
    audiences: Sequence[str] = (),
    vo: Optional[str] = None,
    dir_name: str = TOKEN_DIR_NAME,
) -> PreparedJob:
    """Mint the job mytoken and first token into the session directory (CE front end).

    ``vo`` is the RTE parameter ``JOBTOKEN_VO``, set by the CE admin: it is the site's VO
    (``site.vo``), not a value the job chose.

    Raises:
        ConfigError: no session directory or job id; JobtokenError: as ``prepare_job``.
    """
    session = grami.get("joboption_directory")
    if not session:
        raise ConfigError("ARC stage 0 without joboption_directory")
    site = config.site
    if scope_templates:
        site = replace(site, scope_templates=tuple(scope_templates))
    if vo:
        site = replace(site, vo=vo)
    token = config.token
    if audiences:
        token = replace(token, audiences=tuple(audiences))
        if not site.allowed_audiences:
            site = replace(site, allowed_audiences=tuple(audiences))
    config = replace(config, site=site, token=token)
    job = job_from_grami(grami)
    directory = Path(session) / dir_name
    try:
        prepared = prepare_job(config, job, directory=str(directory), env={})
    except JobtokenError:
        # the job fails at submission; nothing of ours may be staged out with its session dir
        if directory.is_dir():
            for problem in TokenDir(directory).remove():
                logger.warning("%s", problem)
        raise
    logger.info("arc stage 0 done job=%s mom_id=%s", job.job_id, prepared.mom_id)
    return prepared


def relocate(directory: Path) -> TokenDir:
    """Point ``job.json`` at the mytoken where the directory is now (session dir moved).

    Raises:
        ConfigError: not a prepared token directory.
    """
    tokendir = TokenDir.existing(directory)
    spec = tokendir.read_spec()
    here = str(tokendir.mytoken)
    if spec.mytoken_owned and spec.mytoken_path != here:
        tokendir.update_spec(mytoken_path=here)  # keeps what a newer CE's prepare wrote
        logger.info("token directory moved from=%s to=%s", spec.mytoken_path, here)
    return tokendir


def stage2(directory: Path, *, timeout_s: float = 25.0) -> bool:
    """Stop the sidecar, revoke the job mytoken and remove the token directory (worker node).

    Returns:
        True when the job mytoken is revoked (or was already gone).
    """
    if not (directory / "job.json").is_file():
        return True
    stop_sidecar(TokenDir.existing(directory), timeout_s=min(20.0, timeout_s))
    return revoke_and_clean(directory, timeout_s=timeout_s, remove_dir=True)


def end(config: Config, job_id: str) -> int:
    """CE side, when A-REX has finished a job: revoke the job's mytoken if it is still live.

    Returns:
        How many live job mytokens were revoked (0 when stage 2 or the sidecar did it).

    Raises:
        ConfigError: no parent mytoken configured; JobtokenError: the server could not list
        or revoke (A-REX logs the callout's failure).
    """
    revoked = revoke_job_mytokens(config, job_id, env={})
    for mom_id in revoked:
        logger.info("arc end: revoked job mytoken job=%s mom_id=%s", job_id, mom_id)
    return len(revoked)
