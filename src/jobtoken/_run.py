"""``jobtoken run``, ``sidecar``, ``status`` and ``ensure``: wiring the parts for one job.

``run``: lay out (or adopt) the token directory, get a first valid token (in a
child), then supervise the payload with the sidecar plugged into the supervisor's
loop, and end exactly as the payload ended (or with 69 when jobtoken stopped it
because its credential was lost).

``sidecar``: the same renewal loop without owning the payload, for wrappers that
must ``exec`` the payload themselves (HTCondor's USER_JOB_WRAPPER, ARC's stage 1):
it watches the payload's pid (pidfd, immune to pid reuse) and cleans up when it ends.

Light imports only (no httpx/jwt/cryptography): this process waits for hours.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, NoReturn, Optional, Sequence

from . import _policy as policy
from ._clock import Clock, SystemClock
from ._config import Config, missing_setting
from ._errors import ConfigError, ExitCode, RenewalReport, TokenCheckError
from ._sidecar import Sidecar, run_renewal_child, signal_number
from ._supervisor import PayloadResult, Supervisor, exit_like
from ._tokendir import JobRecord, TokenDir, acquire_lock
from ._tokenfile import write_secret_file

__all__ = [
    "RunOptions",
    "ensure_token",
    "exec_waiter",
    "first_token",
    "job_exit",
    "payload_environment",
    "revoke_job",
    "run_job",
    "run_sidecar",
    "setup_tokendir",
    "start_forwarding",
    "status",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Per-job settings given on the command line of ``run``/``sidecar``."""

    dir: Optional[str] = None
    job_id: Optional[str] = None
    walltime_s: Optional[float] = None


def default_job_id(env: Mapping[str, str]) -> str:
    """A stable identity for jitter and logs: the batch system's id when there is one."""
    for var in ("JOBTOKEN_JOB_ID", "CONDOR_JOB_ID", "GRID_GLOBAL_JOBID", "PANDAID", "SLURM_JOB_ID",
                "PBS_JOBID"):
        if env.get(var):
            return env[var]
    return f"{socket.gethostname()}:{os.getpid()}"


def _base_dir(env: Mapping[str, str], config: Config) -> str:
    for candidate in (config.site.token_dir_base, env.get("_CONDOR_SCRATCH_DIR"),
                      env.get("RUNTIME_JOB_DIR"), env.get("XDG_RUNTIME_DIR")):
        if candidate and os.path.isdir(candidate):
            return candidate
    return tempfile.gettempdir()


def setup_tokendir(
    config: Config, options: RunOptions, *, env: Optional[Mapping[str, str]] = None,
    now: Optional[float] = None,
) -> tuple[TokenDir, JobRecord]:
    """Adopt a prepared token directory, or lay out a new one from the settings.

    A directory with a ``job.json`` (from ``jobtoken prepare``) is used as it is. Else
    a private directory is made (``options.dir`` or a fresh one in the job's sandbox),
    and the job file records where the mytoken lives: the configured file (rotations
    are written back there), or a private copy of a mytoken given in a variable.

    Raises:
        ConfigError, TokenFileError.
    """
    environ = os.environ if env is None else env
    if options.dir and (Path(options.dir) / "job.json").is_file():
        tokendir = TokenDir.existing(options.dir)
        return tokendir, tokendir.read_spec()
    created = options.dir is None
    if created:
        path = tempfile.mkdtemp(prefix="jobtoken-", dir=_base_dir(environ, config))
    else:
        path = str(options.dir)
    tokendir = TokenDir.create(path)
    token = config.token
    mytoken_path = _job_mytoken_path(config, tokendir, environ)
    start = SystemClock().now() if now is None else now
    renewal = config.renewal
    spec = JobRecord.from_config(
        config,
        job_id=options.job_id or default_job_id(environ),
        server_url=config.server.url or "",
        mytoken_path=mytoken_path,
        scopes=token.scopes,
        audiences=token.audiences,
        job_end_at=start + options.walltime_s if options.walltime_s else None,
        mytoken_owned=False,
        revoke_at_end=False,  # the mytoken is the user's own: never revoke it
        remove_dir_at_end=created,
    )
    if renewal.warn_signal:
        signal_number(renewal.warn_signal)  # a bad name fails before the payload starts
    tokendir.write_spec(spec)
    return tokendir, spec


def _job_mytoken_path(config: Config, tokendir: TokenDir, environ: Mapping[str, str]) -> str:
    """The configured mytoken file, or a private copy of the mytoken given in a variable.

    Raises:
        ConfigError: neither is configured, or the variable is empty.
    """
    token = config.token
    if token.mytoken_file:
        return str(Path(token.mytoken_file).resolve())
    if token.mytoken_env:
        value = environ.get(token.mytoken_env, "").strip()
        if not value:
            raise ConfigError(f"mytoken variable ${token.mytoken_env} is not set")
        write_secret_file(tokendir.mytoken, value, newline=False)
        return str(tokendir.mytoken)
    raise missing_setting("mytoken", "token.mytoken_file", "token.mytoken_env")


def payload_environment(
    env: Mapping[str, str], tokendir: TokenDir, spec: JobRecord, config: Optional[Config] = None
) -> Dict[str, str]:
    """The payload's environment: ours, pointing WLCG discovery at the token file.

    ``BEARER_TOKEN`` is removed (it would win over the file in discovery and is never
    renewed), and so is any variable that held the mytoken.
    """
    out = dict(env)
    out.pop("BEARER_TOKEN", None)
    if config is not None and config.token.mytoken_env:
        out.pop(config.token.mytoken_env, None)
    out.pop("JOBTOKEN_MYTOKEN_ENV", None)
    out["BEARER_TOKEN_FILE"] = str(tokendir.bearer_token)
    out["JOBTOKEN_DIR"] = str(tokendir.path)
    return out


def first_token(
    tokendir: TokenDir, spec: JobRecord, *, min_valid_s: Optional[float] = None
) -> RenewalReport:
    """Make sure the directory holds a valid token before the payload starts.

    Raises:
        JobtokenError: with the documented exit code of what went wrong.
    """
    need = spec.margin_s if min_valid_s is None else min_valid_s
    report = run_renewal_child(
        tokendir, "--min-valid", f"{need:.0f}",
        timeout_s=policy.child_timeout_s(spec.timeout_s, requests=4),
    )
    report.raise_for_failure()
    return report


def run_job(
    tokendir: TokenDir,
    spec: JobRecord,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    clock: Optional[Clock] = None,
    slim: Optional[Sequence[str]] = None,
) -> int:
    """Run the payload with a fresh token for its whole life; return its exit status.

    Dies by the payload's signal when the payload died by one (``exit_like``).

    With ``slim`` (the arguments every step gets, ``_runstep.step_arguments``), this
    process waits as ``_waiter`` after the payload started: it ``exec``s it and never
    returns (the real ``jobtoken run``). Without, it supervises in this interpreter
    (tests that call the command in process).

    Raises:
        JobtokenError: before the payload started (another sidecar holds the
            directory, no first token, payload not found or not executable).
    """
    lock_fd = acquire_lock(tokendir)
    if slim is not None:
        _exec_waiter(tokendir, spec, argv, env=env, lock_fd=lock_fd, step_args=slim)
    holder: Dict[str, Supervisor] = {}

    def send(sig: int) -> None:
        pid = holder["sup"].pid if "sup" in holder else None
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop() -> None:
        holder["sup"].stop_payload(signal.SIGTERM, spec.stop_grace_s)

    sidecar = Sidecar(
        tokendir, spec, clock=clock or SystemClock(), send_signal=send, stop_payload=stop
    )
    try:
        sidecar.adopt(first_token(tokendir, spec))
        started = {"done": False}

        def tick() -> Optional[float]:
            if not started["done"]:
                started["done"] = True
                sidecar.set_payload_pid(holder["sup"].pid)
            return sidecar.tick()

        supervisor = Supervisor(argv, env=env, tick=tick, clock=clock)
        holder["sup"] = supervisor
        result = supervisor.run()
    finally:
        sidecar.finish()
        os.close(lock_fd)
    return job_exit(result, stopped_payload=sidecar.stopped_payload)


def job_exit(result: PayloadResult, *, stopped_payload: bool) -> int:
    """How ``run`` ends: 69 when jobtoken stopped the payload (credential lost), else
    like the payload (``exit_like``)."""
    if stopped_payload:
        logger.error(
            "payload stopped because its credential was lost; exit status %d",
            ExitCode.CREDENTIAL_LOST,
        )
        return int(ExitCode.CREDENTIAL_LOST)
    return exit_like(result)


def _exec_waiter(
    tokendir: TokenDir,
    spec: JobRecord,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    lock_fd: int,
    step_args: Sequence[str],
) -> None:
    """First token, start the payload, then become the small waiting process (``_waiter``).

    Raises:
        JobtokenError: no first token, or the payload cannot start (then cleaned up).
    """
    sidecar = Sidecar(tokendir, spec)

    def undo() -> None:
        try:
            sidecar.finish()
        finally:
            os.close(lock_fd)

    try:
        sidecar.adopt(first_token(tokendir, spec))
    except BaseException:
        undo()
        raise
    proc = start_forwarding(argv, env=env, on_failure=undo)
    sidecar.set_payload_pid(proc.pid)
    first = _early_step(tokendir, sidecar, step_args)
    exec_waiter(
        dict(
            step=first,
            payload=proc.pid,
            dir=tokendir.path,
            bt=tokendir.bearer_token,
            grace=spec.stop_grace_s,
            limit=policy.child_timeout_s(spec.timeout_s, requests=4) + _STEP_SLACK_S,
            next=sidecar.next_wakeup(watch=False),
            watch=sidecar.watched_mtime,
        ),
        step_args,
        keep_fds=(lock_fd,),
    )


def start_forwarding(
    argv: Sequence[str], *, env: Mapping[str, str], on_failure: Callable[[], object]
) -> Any:
    """Start the payload with the forwarded signals caught from before its start (so that
    none is lost or kills us), then blocked: a blocked signal stays pending across
    ``exec_waiter``, and the waiter takes it once its handlers are in place. A signal
    caught meanwhile is passed on now (unless the terminal sent it to the payload too).

    Raises:
        PayloadStartError: the payload cannot start (``on_failure`` ran first).
    """
    from ._supervisor import DEFAULT_FORWARD_SIGNALS, start_payload
    from ._waiter import delivered_by_terminal, foreground_pgrp, open_controlling_tty

    caught: list[int] = []
    previous: Dict[int, Any] = {}
    try:
        for signum in DEFAULT_FORWARD_SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:
                previous[signum] = signal.signal(signum, lambda n, f: caught.append(n))
        proc = start_payload(argv, env=env)
    except BaseException:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        on_failure()
        raise
    signal.pthread_sigmask(signal.SIG_BLOCK, DEFAULT_FORWARD_SIGNALS)
    tty_fd = open_controlling_tty()
    for signum in caught:
        if not delivered_by_terminal(signum, foreground_pgrp(tty_fd), os.getpgrp()):
            os.kill(proc.pid, signum)
    if tty_fd is not None:
        os.close(tty_fd)
    return proc


def exec_waiter(plan: Mapping[str, object], step_args: Sequence[str], *,
                keep_fds: Sequence[int] = ()) -> NoReturn:
    """Become ``_waiter`` (same pid) with ``plan`` (``Waiter``'s keys; ``forward`` is
    added) and the arguments its steps get; ``keep_fds`` stay open across ``exec``."""
    import sys

    from ._supervisor import DEFAULT_FORWARD_SIGNALS
    from ._waiter import encode_plan

    fields = dict(plan)
    fields.setdefault("forward", ",".join(str(int(s)) for s in DEFAULT_FORWARD_SIGNALS))
    for fd in keep_fds:
        os.set_inheritable(fd, True)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # Isolated (-I: no PYTHON* variables, no user site), no site (-S), and not through
    # the package (its __init__ loads the error tree and logging): the module alone,
    # from its cached bytecode; compiling it from source would keep ~1 MiB of heap.
    code = (
        "import _signal, os, select, sys, time; "
        f"sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import _waiter; _waiter.main(sys.argv[1:])"
    )
    os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", code, encode_plan(**fields),
                              *step_args])


#: Room above the renewal limit for a step's own start-up before the waiter kills it.
_STEP_SLACK_S = 30.0


def _early_step(tokendir: TokenDir, sidecar: Sidecar, step_args: Sequence[str]) -> Optional[str]:
    """Start the first step now when it is due within the waiter's lead, so that its
    start-up overlaps our ``exec`` (short tokens); the waiter adopts it ("PID,FD")."""
    import subprocess
    import sys

    from ._waiter import LEAD_S

    at = sidecar.next_wakeup(watch=False)
    if at is None or at - SystemClock().now() > LEAD_S:
        return None
    argv = [sys.executable, "-m", "jobtoken._runstep", str(tokendir.path), *step_args,
            "--at", repr(at)]
    if sidecar.watched_mtime is not None:
        argv += ["--watch", str(sidecar.watched_mtime)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            close_fds=True)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_inheritable(fd, True)
    return f"{proc.pid},{fd}"


# --- the standalone sidecar ---------------------------------------------------------------

#: What ends the standalone sidecar (it cleans up first); the payload is not ours to signal.
SIDECAR_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _open_pidfd(pid: int) -> Optional[int]:
    """A pidfd for ``pid`` (None where the kernel has none: the waiter then polls ``/proc``).

    Raises:
        ProcessLookupError: no such process.
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return int(pidfd_open(pid))
    except ProcessLookupError:
        raise
    except OSError:  # ENOSYS: a kernel before 5.3
        return None


def run_sidecar(
    tokendir: TokenDir, spec: JobRecord, *, watch_pid: int, step_args: Sequence[str]
) -> int:
    """Keep the token fresh until ``watch_pid`` ends (or TERM/INT/HUP), then clean up.

    Set-up (lock, first token, ``state.json``) happens here; the waiting is ``_waiter``'s,
    the same small process ``jobtoken run`` waits in (``exec``, same pid: the lock file
    names it for ``stop_sidecar``), in its watch mode. Returns only when there is nothing
    to wait for: the pid was gone already, or a stop signal came during set-up.

    Raises:
        JobtokenError: another sidecar holds the directory, or no first token (then the
            job mytoken is cleaned up as at the end).
    """
    from ._waiter import start_ticks

    lock_fd = acquire_lock(tokendir)
    try:
        pidfd = _open_pidfd(watch_pid)
    except ProcessLookupError:
        pidfd = None
    started = start_ticks(watch_pid)
    if started is None:
        # the payload ended before we could watch it: still clean up and revoke
        logger.info("watched process %d already gone; cleaning up", watch_pid)
        if pidfd is not None:
            os.close(pidfd)
        try:
            Sidecar(tokendir, spec).finish()
        finally:
            os.close(lock_fd)
        return 0
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda n, f: caught.append(n)) for s in SIDECAR_STOP_SIGNALS}
    sidecar = Sidecar(tokendir, spec)
    state = tokendir.read_state()
    try:
        sidecar.adopt(first_token(tokendir, spec, min_valid_s=0))
        if state is not None:
            sidecar.state.renewals = max(sidecar.state.renewals, state.renewals)
        sidecar.set_payload_pid(watch_pid)
        first = _early_step(tokendir, sidecar, step_args)  # before the mask: not inherited
        signal.pthread_sigmask(signal.SIG_BLOCK, SIDECAR_STOP_SIGNALS)
        if caught or start_ticks(watch_pid) != started:
            _stop_step(first)
            raise _NothingToWatch()
    except BaseException as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIDECAR_STOP_SIGNALS)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pidfd is not None:
            os.close(pidfd)
        try:
            sidecar.finish()
        finally:
            os.close(lock_fd)
        if isinstance(exc, _NothingToWatch):
            return int(ExitCode.CREDENTIAL_LOST) if sidecar.state.credential_lost else 0
        raise
    exec_waiter(
        dict(
            step=first,
            payload=watch_pid,
            pidfd=pidfd,
            start=started,
            dir=tokendir.path,
            bt=tokendir.bearer_token,
            grace=None,  # the sidecar asks a failing payload to stop; it never kills it
            limit=policy.child_timeout_s(spec.timeout_s, requests=4) + _STEP_SLACK_S,
            next=sidecar.next_wakeup(watch=False),
            watch=sidecar.watched_mtime,
            forward="",
            stop=",".join(str(int(s)) for s in SIDECAR_STOP_SIGNALS),
        ),
        step_args,
        keep_fds=(lock_fd,) if pidfd is None else (lock_fd, pidfd),
    )


def _stop_step(step: Optional[str]) -> None:
    """End an early step (``PID,FD``) that no waiter will adopt."""
    if step is None:
        return
    pid, fd = (int(x) for x in step.split(","))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    os.close(fd)


class _NothingToWatch(Exception):
    """A stop signal during set-up, or the watched process ended meanwhile."""


def _revoked_through_parent(config: Config, parent_file: str, mom_id: str) -> Optional[bool]:
    """Revoke by ``mom_id`` through the parent: True when done, False when the server
    has no live ``mom_id`` below the parent, None when the parent cannot be read (a
    party without it falls back to the job's own file).

    Raises:
        JobtokenError: the server refused or could not be reached.
    """
    from ._errors import MytokenRejectedError, TokenFileError
    from ._renewal import revoke_by_mom_id

    try:
        revoke_by_mom_id(config, parent_file, mom_id)
    except (ConfigError, TokenFileError) as exc:
        logger.warning("cannot revoke through the parent, revoking the job's file instead "
                       "(a copy the payload made may stay live): %s", exc.message)
        return None
    except MytokenRejectedError as exc:
        if exc.status != 403:
            raise
        # the server knows no live mytoken mom_id below this parent: revoked already
        # (by the sidecar), or not minted from it; what the file holds is still revoked
        logger.info("no live job mytoken mom_id=%s below the parent: %s", mom_id, exc.message)
        return False
    return True


# --- status and ensure ----------------------------------------------------------------------


def sidecar_alive(tokendir: TokenDir) -> bool:
    """Whether a sidecar holds the directory's lock right now."""
    try:
        fd = os.open(tokendir.lock_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def status(
    tokendir: TokenDir, *, now: Optional[float] = None,
    thresholds: Optional[policy.HealthThresholds] = None,
) -> Dict[str, Any]:
    """A non-secret view of a token directory for ``jobtoken status``, with its verdict.

    The token's expiry, scopes and audience come from the token file itself when it can
    be read (straight after ``prepare`` no sidecar has written ``state.json`` yet), else
    from the sidecar's state. ``health`` and ``health_reason`` are ``_policy.token_health``'s
    verdict: a renewer is expected once a sidecar started and until it finished.

    Raises:
        ConfigError: no readable ``job.json``, or a file of a newer major format.
    """
    t = SystemClock().now() if now is None else now
    spec = tokendir.read_spec()
    state = tokendir.read_state()
    alive = sidecar_alive(tokendir)
    data: Dict[str, Any] = {
        "dir": str(tokendir.path),
        "job_id": spec.job_id,
        "server": spec.server_url,
        "requested_scopes": list(spec.scopes),
        "requested_audiences": list(spec.audiences),
        "token_file": str(tokendir.bearer_token),
        "token_present": tokendir.bearer_token.exists(),
        "sidecar_alive": alive,
        "job_end_at": spec.job_end_at,
    }
    if state is not None:
        data.update(
            expires_at=state.expires_at,
            scopes=list(state.scopes),
            audiences=list(state.audiences),
            jti=state.jti,
            renewals=state.renewals,
            failures_total=state.failures_total,
            consecutive_failures=state.consecutive_failures,
            last_success_at=state.last_success_at,
            next_attempt_at=state.next_attempt_at,
            last_error=state.last_error,
            credential_lost=state.credential_lost,
            finished=state.finished,
        )
    token = tokendir.current_token()
    if token is not None:
        data.update(expires_at=token.expires_at, scopes=list(token.scopes),
                    audiences=list(token.audiences), jti=token.jti)
    expires_at = data.get("expires_at")
    data["remaining_s"] = None if expires_at is None else round(expires_at - t, 1)
    from ._revocation import read_pending

    data["revocation_pending"] = read_pending(tokendir) is not None
    verdict, reason = policy.token_health(
        data["remaining_s"], thresholds or policy.HealthThresholds(),
        renewer_expected=state is not None and not state.finished,
        renewer_alive=alive,
        credential_lost=bool(state is not None and state.credential_lost),
        finished=bool(state is not None and state.finished),
        revocation_pending=data["revocation_pending"],
    )
    data.update(health=verdict.name, health_reason=reason)
    return data


def ensure_token(
    tokendir: TokenDir, spec: JobRecord, *, min_valid_s: float, clock: Optional[Clock] = None
) -> RenewalReport:
    """Return at once when the token is valid ``min_valid_s`` longer, else renew now.

    Safe next to a running sidecar: renewals of one directory are serialised by its
    renewal lock, and the sidecar notices the new token. With no sidecar (cron), each
    call adds its outcome to the job's metrics file, if the job has one.

    Raises:
        JobtokenError: renewal failed; TokenCheckError: the server's token is valid
            for less than ``min_valid_s``.
    """
    asked_at = (clock or SystemClock()).now()  # the child judged "valid long enough" after this
    report = run_renewal_child(
        tokendir, "--min-valid", repr(float(min_valid_s)),
        timeout_s=policy.child_timeout_s(
            spec.timeout_s, requests=4, lock_wait_s=policy.RENEWAL_LOCK_WAIT_S
        ),
    )
    if spec.metrics_dir and not sidecar_alive(tokendir):  # a live sidecar writes the file
        from ._metrics import record_oneshot

        record_oneshot(spec.metrics_dir, spec.job_id, ok=report.ok,
                       expires_at=report.expires_at, renewed=report.ok and not report.reused,
                       now=SystemClock().now())
    report.raise_for_failure()
    left = (report.expires_at or 0.0) - asked_at
    if left < min_valid_s:
        raise TokenCheckError(
            f"the server issued a token valid for {left:.0f} s, less than the {min_valid_s:.0f} s "
            "asked for"
        )
    return report


def revoke_job(
    tokendir: TokenDir,
    *,
    config: Optional[Config] = None,
    parent_file: Optional[str] = None,
    mom_id: Optional[str] = None,
) -> bool:
    """Revoke the directory's job mytoken at the server and delete the token files.

    With the parent at hand (``parent_file``: the site's, as ``prepare`` used), the job
    mytoken is revoked by its ``mom_id`` through the parent, so a payload that copied
    it and replaced the file keeps no working copy; ``mom_id`` given here (recorded by
    the integration at ``prepare``) wins over the one in ``job.json``, which the job can
    write; the server is the site's (``config``), never ``job.json``'s. Without the
    parent (or when it cannot be read), the file's mytoken is revoked. True only when the server
    said the job mytoken is revoked; a ``revoke.pending`` record is cleared then.

    Raises:
        JobtokenError: the server could not be reached or refused; files stay.
    """
    from ._revocation import clear_pending, read_pending

    spec = tokendir.read_spec()
    if not spec.mytoken_owned:
        raise ConfigError(
            f"{tokendir.path} holds no job mytoken of its own ({spec.mytoken_path} is not one); "
            "refusing to revoke it"
        )
    mom = mom_id or spec.mom_id
    via_parent = _revoked_through_parent(config or Config(), parent_file, mom) if (
        parent_file and mom) else None
    if via_parent:
        logger.info("job mytoken revoked through its parent job=%s mom_id=%s", spec.job_id, mom)
        revoked = True
    elif via_parent is None and not tokendir.mytoken_of(spec).exists() and read_pending(
            tokendir) is not None:
        raise ConfigError(
            f"the job mytoken of {tokendir.path} is gone but its revocation is pending: "
            "revoke it through the parent (--parent-mytoken-file or site.parent_mytoken_file)"
        )
    else:
        report = run_renewal_child(
            tokendir, "--revoke", timeout_s=policy.child_timeout_s(spec.timeout_s, requests=2)
        )
        report.raise_for_failure()
        revoked = report.revoked
    from ._tokenfile import remove_secret_file

    remove_secret_file(tokendir.mytoken_of(spec))
    remove_secret_file(tokendir.bearer_token)
    clear_pending(tokendir)
    if spec.metrics_dir and os.geteuid() != 0:
        # the end of a job kept alive by cron (``ensure``): its series go. Not as root:
        # job.json is the job's to write, and root removes nothing where it points
        from ._metrics import remove_metrics

        remove_metrics(spec.metrics_dir, spec.job_id)
    return revoked
