"""``jobtoken run --broker``: one payload whose token a broker of the same uid keeps fresh.

Why: a pilot runs many payloads under its own uid. Started once by the pilot, ``jobtoken
broker serve`` keeps one HTTP client and one TLS context for all of them, so a payload
needs no renewer of its own (docs/pilots.md). This command is the per-payload part: it
registers its own process as the payload's job (the pilot's uid is the broker's, so it
is trusted), has the broker prepare the token directory, starts the payload with
``BEARER_TOKEN_FILE``, waits as ``_waiter`` (no renewal steps: the broker renews), and
at the end releases the job (the broker revokes its mytoken by ``mom_id``) and ends as
the payload ended. The anchor is this process, whose pid and start time stay the same
through the ``exec`` into the waiter and into the finish: if it is killed (even -9),
the broker sees the anchor end and revokes all the same.

Must NOT: read, hold or log a token or mytoken (there is none here: the broker writes the
token file), renew, or import httpx/jwt (``_brokerclient`` is stdlib only).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

from ._brokerclient import BrokerClient
from ._errors import JobtokenError
from ._supervisor import PayloadResult

__all__ = ["BrokerJob", "finish_broker_job", "run_with_broker", "step_arguments"]

logger = logging.getLogger("jobtoken._run")


@dataclass(frozen=True)
class BrokerJob:
    """One payload on a pilot's broker, as the finishing step needs to know it."""

    socket: str
    job_id: str
    tokendir: str
    remove_dir: bool  # we made the directory: it goes at the end


def step_arguments(job: BrokerJob, log_args: Sequence[str] = ()) -> list[str]:
    """What the waiter hands its finishing step (``_runstep --broker``)."""
    return ["--broker", job.socket, "--job-id", job.job_id, *log_args] + (
        ["--remove-dir"] if job.remove_dir else [])


def _work_dir(env: Mapping[str, str]) -> str:
    """Where a fresh token directory goes: ``$JOBTOKEN_WORK_DIR`` (``jobtoken-wrap`` sets
    its choice there), else where ``jobtoken run`` puts one."""
    from ._config import Config
    from ._run import _base_dir

    given = env.get("JOBTOKEN_WORK_DIR")
    return given if given and os.path.isdir(given) else _base_dir(env, Config())


def _token_dir(given: Optional[str], env: Mapping[str, str]) -> tuple[str, bool]:
    """The directory for the token (its real path: the broker walks it without following
    a link) and whether we made it.

    Raises:
        TokenFileError: it cannot be made.
    """
    from ._errors import TokenFileError

    try:
        if given is None:
            return os.path.realpath(tempfile.mkdtemp(prefix=".jobtoken-",
                                                     dir=_work_dir(env))), True
        if not os.path.isdir(given):
            os.mkdir(given, 0o700)
            return os.path.realpath(given), True
    except OSError as exc:
        raise TokenFileError(f"cannot make a token directory in "
                             f"{given or _work_dir(env)}: {exc.strerror}") from exc
    return os.path.realpath(given), False


def _payload_environment(env: Mapping[str, str], job: BrokerJob, bearer_token_file: str
                         ) -> Dict[str, str]:
    out = dict(env)
    out.pop("BEARER_TOKEN", None)  # it would win over the file and is never renewed
    out["BEARER_TOKEN_FILE"] = bearer_token_file
    out["JOBTOKEN_DIR"] = job.tokendir
    out["JOBTOKEN_BROKER_SOCKET"] = job.socket  # for `jobtoken broker ensure` in the payload
    return out


def run_with_broker(
    argv: Sequence[str],
    *,
    socket_path: Optional[str],
    tokendir: Optional[str],
    job_id: Optional[str],
    walltime_s: Optional[float],
    env: Mapping[str, str],
    may_exec: bool,
    log_args: Sequence[str] = (),
) -> int:
    """Register, prepare, run the payload, release; return (or end) as the payload did.

    With ``may_exec`` (the real command) this process waits as ``_waiter`` and never
    returns; else it supervises in this interpreter (tests calling ``main`` in process).

    Raises:
        JobtokenError: before the payload started: the broker refused or cannot be
            reached (its exit code: 67 not trusted, 75 unreachable, 77, 78, ...), the
            directory cannot be made, the payload cannot start (126/127). Nothing
            stays registered then.
    """
    from ._run import default_job_id

    client = BrokerClient(socket_path)
    path, made = _token_dir(tokendir, env)
    job = BrokerJob(socket=client.socket_path, job_id=job_id or default_job_id(env),
                    tokendir=path, remove_dir=made)
    record: Dict[str, object] = {"job_id": job.job_id, "uid": os.getuid(),
                                 "anchor_pid": os.getpid()}
    if walltime_s:
        record["walltime_s"] = walltime_s
    try:
        client.register(record)
    except BaseException:
        _remove_dir(job)
        raise
    try:
        reply = client.prepare(path)
    except BaseException:
        _release(job)
        raise
    bearer = reply.bearer_token_file or os.path.join(path, "bt")
    logger.info("token from the broker job=%s file=%s", job.job_id, bearer)
    payload_env = _payload_environment(env, job, bearer)
    if may_exec:
        from ._run import exec_waiter, start_forwarding

        proc = start_forwarding(argv, env=payload_env, on_failure=lambda: _release(job))
        exec_waiter(dict(step=None, payload=proc.pid, dir=path, bt=bearer, grace=None,
                         limit=0, next=None, watch=None), step_arguments(job, log_args))
    from ._supervisor import Supervisor

    try:
        result = Supervisor(argv, env=payload_env).run()
    except BaseException:
        _release(job)
        raise
    return finish_broker_job(job, result)


def _release(job: BrokerJob) -> bool:
    """Tell the broker the job is over; it revokes the job mytoken. A broker that does not
    answer revokes anyway once it sees the anchor (this process) end."""
    try:
        BrokerClient(job.socket).release()
    except JobtokenError as exc:
        logger.warning("release failed job=%s (the broker revokes when it sees this process "
                       "end): %s", job.job_id, exc.message)
        ok = False
    else:
        logger.info("job released job=%s: the broker revokes its mytoken", job.job_id)
        ok = True
    _remove_dir(job)
    return ok


def _remove_dir(job: BrokerJob) -> None:
    if job.remove_dir:
        shutil.rmtree(job.tokendir, ignore_errors=True)


def finish_broker_job(job: BrokerJob, result: PayloadResult) -> int:
    """Release the job and end the way the payload ended (``exit_like``)."""
    from ._supervisor import exit_like

    logger.info("payload ended pid=%d exit_status=%s signal=%s", result.pid,
                result.exit_status, result.signal or "none")
    _release(job)
    return exit_like(result)
