"""HTCondor: the execute point's hooks, job wrapper, Chirp status, audit log, and the access
point's submit include.

Only jobs that ask (``HookKeyword = "JOBTOKEN"``, HTCondor's own per-job hook choice) get
any of this; the shipped ``USER_JOB_WRAPPER`` execs every other job unchanged. Each entry
point turns one HTCondor contract into one library call:

* ``PREPARE_JOB`` hook (``run_prepare_hook``): job ad on stdin → ``prepare_job`` →
  a ClassAd on stdout that adds ``BEARER_TOKEN_FILE``/``JOBTOKEN_DIR`` to the job's
  *whole* environment (the starter replaces ``Environment``, it does not merge).
  Transient failures requeue (``HookStatusCode`` 3xx), permanent ones hold (1-299).
  The hook has no timeout of its own in HTCondor, so ours bounds every call and the
  whole run; and it starts no process, because the starter kills the hook's family.
* ``JOB_EXIT`` hook (``run_exit_hook``): revoke the job mytoken, delete the token files,
  within HTCondor's 30 s.
* With a node broker (``JOBTOKEN_BROKER_SOCKET`` in the HTCondor config): the prepare hook
  sends ``prepare`` for ``.jobtoken`` and the exit hook ``release``; the broker holds the
  job mytoken and renews the token, so the sandbox gets neither a mytoken nor a sidecar
  (who the job is, the broker learns from HTCondor: ``condor_broker``).
* ``UPDATE_JOB_INFO`` hook / Chirp (``publish_chirp``): the sidecar's state as delayed
  ``Chirp*`` job attributes (no ``want_io_proxy`` needed). Best effort.
* ``include command : jobtoken condor submit`` (``submit_commands``): submit-language
  lines that ship the per-submission mytoken with the job, encrypted, and ask for a token.
* ``USER_JOB_WRAPPER`` (``run_job_wrapper``): the renewal sidecar, then the job in place;
  also after a self-checkpointing restart, which skips the prepare hook.
* Audit lines (``attach_audit_log``): ``JOBTOKEN_AUDIT_LOG/<user>.log``, because the
  StarterLog shows a successful hook's stderr only at ``D_FULLDEBUG``.

Status codes (``hook_status_code``): hold subcode = jobtoken's exit code (65-78, 1);
requeue = 300 + exit code (375 server unavailable, 376 protocol error).

Must NOT: import htcondor at module level (``classad2``, ``htcondor2`` or 23.x's
``htcondor`` are imported inside the functions that need them), hold a policy of its own
(scopes, lifetimes and budgets come from ``_prepare``), or write a token anywhere but the
token directory.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from .. import _policy as policy
from .._clock import utc_text
from .._config import Config
from .._errors import (
    ConfigError,
    ExitCode,
    JobtokenError,
    MytokenRejectedError,
    ServerUnavailableError,
    exit_code_for,
    printable,
)
from .._logs import PrintableFilter, UtcFormatter
from .._mytokenfile import check_mytoken_value
from .._prepare import JobFacts, PreparedJob, prepare_job, walltime_for
from .._tokendir import TokenDir
from .._tokenfile import (
    ensure_private_dir,
    read_secret_file,
    remove_secret_file,
    write_secret_file,
)
from .._tokens import unverified_claims
from ._cleanup import revoke_and_clean
from ._condor_bindings import condor_param_as_set
from ._env import EnvironmentSyntaxError, format_environment_v2, job_environment

__all__ = [
    "CHIRP_ATTRIBUTES",
    "HookOptions",
    "HookResult",
    "AdRequest",
    "extract_mytoken",
    "read_credential",
    "hook_status_code",
    "job_request_from_ad",
    "publish_chirp",
    "read_job_ad",
    "run_exit_hook",
    "run_prepare_hook",
    "submit_commands",
]

logger = logging.getLogger(__name__)

TOKEN_DIR_NAME = ".jobtoken"
_PARENT_COPY = "parent.mytoken"

# HTCondor's enforced run-time limits (seconds; the job is held when one is reached): the
# token chain must last until the sooner of them. See docs/htcondor.md.
ENFORCED_WALLTIME_ATTRIBUTES: Tuple[str, ...] = ("AllowedExecuteDuration", "AllowedJobDuration")
# Site conventions, used only when no enforced limit is set: (attribute, seconds per unit).
# MaxWallTimeMins is not an HTCondor attribute: jobs set it as +MaxWallTimeMins / My.
CONVENTION_WALLTIME_ATTRIBUTES: Tuple[Tuple[str, float], ...] = (("MaxWallTimeMins", 60.0),)
WALLTIME_ATTRIBUTES: Tuple[str, ...] = ENFORCED_WALLTIME_ATTRIBUTES + tuple(
    name for name, _ in CONVENTION_WALLTIME_ATTRIBUTES
)

# How a job asks for a token: HTCondor's own per-job hook keyword. Jobs without it get no
# jobtoken hook at all, and the job wrapper execs them unchanged.
HOOK_KEYWORD = "JOBTOKEN"

CHIRP_ATTRIBUTES = (
    "ChirpJobtokenExpiry",
    "ChirpJobtokenRenewals",
    "ChirpJobtokenFailures",
    "ChirpJobtokenCredentialLost",
)


@dataclass(frozen=True)
class HookOptions:
    """How the site runs the prepare hook (``<KEYWORD>_HOOK_PREPARE_JOB_ARGS``)."""

    creds_service: str = "jobtoken"
    require_walltime: bool = False  # True: hold jobs without a wall time in the ad
    deadline_s: float = 120.0  # the whole hook, all network calls included
    dir_name: str = TOKEN_DIR_NAME
    broker_socket: Optional[str] = None  # JOBTOKEN_BROKER_SOCKET: the node broker mints


@dataclass(frozen=True)
class AdRequest:
    """What the job ad asks for, validated; no secret."""

    job: JobFacts
    mytoken_file: Optional[str] = None  # basename of a transferred per-submission mytoken
    server: Optional[str] = None  # JobtokenServer: only honoured with a job-supplied mytoken
    walltime_source: Optional[str] = None
    environment: Dict[str, str] = field(default_factory=dict)
    oauth_services: Tuple[str, ...] = ()  # OAuthServicesNeeded: credential names, handles included


@dataclass(frozen=True)
class HookResult:
    """What the prepare hook prints: a status, a one-line message, the new environment."""

    status_code: int
    message: Optional[str] = None
    environment: Optional[str] = None  # the complete V2 Environment, on success only
    prepared: Optional[PreparedJob] = field(default=None, repr=False)

    def classad_text(self) -> str:
        """The hook's stdout in the ``Attr = value`` form the starter parses."""
        import classad2

        out = classad2.ClassAd()
        out["HookStatusCode"] = int(self.status_code)
        if self.message:
            out["HookStatusMessage"] = self.message
        if self.status_code == 0 and self.environment is not None:
            out["Environment"] = self.environment
        return str(out.printOld())


def hook_status_code(error: BaseException) -> int:
    """Hold (1-299) for permanent errors, requeue (300 + exit code) for transient ones."""
    code = exit_code_for(error)
    if isinstance(error, JobtokenError) and error.retryable:
        return 300 + code
    return code if 1 <= code <= 299 else int(ExitCode.ERROR)


def _log_line(text: str, limit: int = 300) -> str:
    """``text`` as one short printable line: the starter copies hook output into its log."""
    line = printable(" ".join(str(text).split()))
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --- reading the job ad ------------------------------------------------------------------


def read_job_ad(text: str) -> Any:
    """Parse the job ad the starter wrote on stdin (old ``Attr = value`` format).

    The parser stops silently at the first line it cannot read, so an ad that yields
    fewer attributes than it has lines is refused instead of half-used.

    Raises:
        ConfigError: empty or malformed ad.
    """
    import classad2

    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ConfigError("job ad on stdin is empty")
    try:
        ad = classad2.parseOne(text, parser=classad2.ParserType.Old)
    except Exception as exc:  # the bindings raise ClassAdException / ValueError
        raise ConfigError(f"job ad on stdin is malformed: {_log_line(str(exc), 120)}") from None
    if len(ad) < len(lines):
        raise ConfigError(f"job ad on stdin is malformed: read {len(ad)} of {len(lines)} lines")
    return ad


def _evaluated(ad: Any, name: str) -> Any:
    """The attribute's value, None when the ad lacks it."""
    if name not in ad:
        return None
    try:
        return ad.eval(name)
    except Exception:
        raise ConfigError(f"job attribute {name} cannot be evaluated") from None


def _string_attr(ad: Any, name: str) -> Optional[str]:
    value = _evaluated(ad, name)
    if value is None or type(value).__name__ in ("Value",):  # Undefined / Error
        return None
    if not isinstance(value, str):
        raise ConfigError(f"job attribute {name} must be a string")
    return value.strip() or None


def _number_attr(ad: Any, name: str) -> Optional[float]:
    value = _evaluated(ad, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _vo_from_ad(ad: Any) -> Optional[str]:
    vo = _string_attr(ad, "x509UserProxyVOName")
    if vo:
        return vo
    group = _string_attr(ad, "AcctGroup")
    if group:
        first = group.split(".")[0]
        return first[len("group_") :] if first.startswith("group_") else first
    return None


def job_walltime(ad: Any) -> Tuple[Optional[float], Optional[str]]:
    """(seconds, where from): the sooner enforced limit, else a site convention, else None."""
    enforced = [
        (value, name)
        for name in ENFORCED_WALLTIME_ATTRIBUTES
        for value in (_number_attr(ad, name),)
        if value is not None and value > 0
    ]
    if enforced:
        return min(enforced)
    for name, unit in CONVENTION_WALLTIME_ATTRIBUTES:
        value = _number_attr(ad, name)
        if value is not None and value > 0:
            return value * unit, name
    return None, None


def job_request_from_ad(ad: Any, *, require_walltime: bool = False) -> AdRequest:
    """Turn the job ad into a validated request (job id, wall time, wishes, environment).

    Raises:
        ConfigError: no GlobalJobId; no wall time when required; bad Jobtoken* values;
            a malformed environment; a mytoken file name that is a path.
    """
    job_id = _string_attr(ad, "GlobalJobId")
    if not job_id:
        raise ConfigError("job ad has no GlobalJobId")
    walltime, source = job_walltime(ad)
    if walltime is None and require_walltime:
        raise ConfigError(f"job {job_id} has no wall time ({', '.join(WALLTIME_ATTRIBUTES)})")
    scopes: List[str] = []
    wanted = _string_attr(ad, "JobtokenScope")
    if wanted:
        scopes.extend(wanted.split())
    path = _string_attr(ad, "JobtokenPath")
    if path:
        if not path.startswith("/") or any(c.isspace() for c in path):
            raise ConfigError(f"JobtokenPath {path!r} must be an absolute path without spaces")
        scopes.append(f"storage.create:{path}")
    audiences = tuple((_string_attr(ad, "JobtokenAudience") or "").split())
    mytoken_file = _string_attr(ad, "JobtokenMytokenFile")
    if mytoken_file and (
        "/" in mytoken_file or mytoken_file in (".", "..") or mytoken_file.startswith(".")
    ):
        raise ConfigError("JobtokenMytokenFile must be a plain file name in the sandbox")
    try:
        environment = job_environment(
            _string_attr_raw(ad, "Environment"),
            _string_attr_raw(ad, "Env"),
            _string_attr_raw(ad, "EnvDelim"),
        )
    except EnvironmentSyntaxError as exc:
        raise ConfigError(f"job {job_id}: {exc}") from None
    job = JobFacts(
        job_id=job_id,
        walltime_s=walltime,
        owner=_string_attr(ad, "Owner"),
        vo=_vo_from_ad(ad),
        scopes=tuple(dict.fromkeys(scopes)),
        audiences=audiences,
    )
    services = tuple(
        n.strip() for n in (_string_attr(ad, "OAuthServicesNeeded") or "").split(",") if n.strip()
    )
    return AdRequest(
        job=job,
        mytoken_file=mytoken_file,
        server=_string_attr(ad, "JobtokenServer"),
        walltime_source=source,
        environment=environment,
        oauth_services=services,
    )


def refuse_unsupported_job(ad: Any, job_id: str, *, broker: bool) -> None:
    """Hold container jobs whose token would silently stop being renewed.

    Without a broker the token is renewed by a sidecar that ``USER_JOB_WRAPPER`` starts,
    and HTCondor runs no job wrapper in the docker universe. With a broker nothing runs
    in the job: the starter bind-mounts the sandbox at the same path and runs the
    container as the job's uid, so the broker's renamed ``.jobtoken/bt`` shows through
    and docker jobs pass (``broker``: this job's token comes from the broker). With
    apptainer/singularity the wrapper and the payload see different paths
    (``SINGULARITY_TARGET_DIR`` rewrites the sandbox), with or without a broker. A job
    refused here gets the reason in its hold message.

    Raises:
        ConfigError: a container job, or a docker job not served by a broker.
    """
    if (_bool_attr(ad, "WantDocker") or _string_attr_raw(ad, "DockerImage")) and not broker:
        raise ConfigError(
            f"job {job_id}: the docker universe needs the node broker here (HTCondor runs "
            "no USER_JOB_WRAPPER there, so without the broker the token would not be renewed)"
        )
    if (
        _bool_attr(ad, "WantContainer")
        or _bool_attr(ad, "WantSingularity")
        or _string_attr_raw(ad, "ContainerImage")
        or _string_attr_raw(ad, "SingularityImage")
    ):
        raise ConfigError(
            f"job {job_id}: container (apptainer/singularity) jobs are not supported: the "
            "job wrapper runs outside the container and the token path would differ inside"
        )


def _bool_attr(ad: Any, name: str) -> bool:
    if name not in ad:
        return False
    try:
        return ad.eval(name) is True
    except Exception:
        return False


def _string_attr_raw(ad: Any, name: str) -> Optional[str]:
    # environment strings keep their spaces; only literal strings are accepted
    if name not in ad:
        return None
    value = ad.eval(name)
    return value if isinstance(value, str) else None


# --- where the parent mytoken comes from -------------------------------------------------


def read_credential(text: str, where: str) -> Tuple[str, Tuple[str, ...]]:
    """The mytoken in a credential file (bare, or JSON with ``mytoken`` or ``access_token``)
    and, from jobtoken's JSON, the scope strings it was minted for.

    Raises:
        ConfigError: no mytoken there (an access token is refused by name).
    """
    stripped = text.strip()
    if not stripped.startswith("{"):
        return check_mytoken_value(stripped, where), ()
    try:
        data = json.loads(stripped)
    except ValueError:
        raise ConfigError(f"{where} is neither a bare mytoken nor valid JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} holds JSON that is not an object")
    value = data.get("mytoken") or data.get("access_token")
    if not isinstance(value, str):
        raise ConfigError(f"{where} holds JSON without a 'mytoken' member")
    scopes = data.get("scopes")
    found = tuple(str(x) for x in scopes) if isinstance(scopes, list) else ()
    return check_mytoken_value(value, where), found


def extract_mytoken(text: str, where: str) -> str:
    """The mytoken in a credential file: bare, or JSON with ``mytoken`` (or ``access_token``).

    Raises:
        ConfigError: no mytoken there (an access token is refused by name).
    """
    return read_credential(text, where)[0]


def _job_supplied_mytoken(
    request: AdRequest, env: Mapping[str, str], scratch: Path, options: HookOptions
) -> Optional[Tuple[str, Path]]:
    """(description, path) of a mytoken the job brought, or None to use the site's."""
    if request.mytoken_file:
        path = scratch / request.mytoken_file
        if not path.is_file():
            raise ConfigError(
                f"JobtokenMytokenFile {request.mytoken_file} is not in the sandbox (was "
                "transfer_input_files set again after the jobtoken include line?)"
            )
        return "transferred file", path
    wanted = credential_files(request.oauth_services, options.creds_service)
    creds = env.get("_CONDOR_CREDS")
    if creds:
        for file_name in wanted or (options.creds_service + ".use",):
            path = Path(creds) / file_name
            if path.is_file():
                return f"$_CONDOR_CREDS/{file_name}", path
    if wanted:
        # the job asked for its own credential: never fall back to the site's robot
        raise ConfigError(
            f"the job asks for credential {', '.join(wanted)} (OAuthServicesNeeded) but "
            f"{'$_CONDOR_CREDS has no such file' if creds else 'there is no $_CONDOR_CREDS'}"
        )
    return None


def credential_files(services: Tuple[str, ...], service: str) -> Tuple[str, ...]:
    """The ``.use`` file names of our service in ``OAuthServicesNeeded``.

    HTCondor lists a credential with a handle as ``svc*handle`` and stores it as
    ``svc_handle.use``: the ``*`` is translated before matching, so a handle is found.
    """
    names = [n.replace("*", "_") for n in services]
    return tuple(
        f"{n}.use" for n in dict.fromkeys(names) if n == service or n.startswith(service + "_")
    )


def _environment_with(request: AdRequest, add: Mapping[str, str]) -> str:
    """The job's complete new ``Environment`` (the starter replaces it, it does not merge):
    its own variables without ``BEARER_TOKEN`` (it would win over the file in WLCG
    discovery and is never renewed), plus ``add``.

    Raises:
        ConfigError: a value the V2 syntax cannot carry.
    """
    current = {k: v for k, v in request.environment.items() if k != "BEARER_TOKEN"}
    current.update(add)
    try:
        return format_environment_v2(current)
    except EnvironmentSyntaxError as exc:
        raise ConfigError(f"job {request.job.job_id}: {exc}") from None


def _creds_access_token(
    request: AdRequest, where: str, path: Path, *, now: float
) -> Optional[HookResult]:
    """The job's token is the access token the AP's credmon keeps in ``$_CONDOR_CREDS``.

    jobtoken's AP credmon sends only access tokens (the mytoken stays on the AP); the
    starter re-copies the ``.use`` every ``SEC_CREDENTIAL_REFRESH`` s, so the file *is*
    the job's bare-token ``BEARER_TOKEN_FILE``: no job mytoken, no sidecar. None when
    the file holds a mytoken (older storers, or a site's own setup).

    Raises:
        ServerUnavailableError: the token has already expired (requeue: the AP renews it).
    """
    from .._tokens import decode_access_token, looks_like_jwt

    text = read_secret_file(path)
    if not looks_like_jwt(text):
        return None
    try:
        token = decode_access_token(text)
    except JobtokenError:
        return None
    if token.claims.get("token_type") == "mytoken":
        return None
    if token.expires_at <= now:
        raise ServerUnavailableError(
            f"the access token in {where} expired at {utc_text(token.expires_at)}; the access "
            "point's credmon has not renewed it"
        )
    environment = _environment_with(request, {"BEARER_TOKEN_FILE": str(path)})
    logger.info(
        "prepare hook done job=%s token=%s jti=%s exp=%s",
        request.job.job_id,
        where,
        token.jti,
        utc_text(token.expires_at),
    )
    return HookResult(0, None, environment)


# --- the prepare hook ---------------------------------------------------------------------


def _mytoken_expiry(mytoken: str) -> Optional[float]:
    claims = unverified_claims(mytoken)  # a short mytoken is opaque: no claims
    exp = claims.get("exp") if claims else None
    return float(exp) if isinstance(exp, (int, float)) else None


def _fit_into_parent(
    job: JobFacts, mytoken: str, config: Config, *, now: float
) -> Tuple[JobFacts, Optional[str]]:
    """Shorten the job's token chain to end with the job-supplied parent mytoken.

    A sub-mytoken cannot outlive its parent (the server refuses such a restriction), so
    a per-submission mytoken that expires before the job's wall time ends caps the job.

    Raises:
        MytokenRejectedError: the parent expires too soon to be worth starting the job.
    """
    exp = _mytoken_expiry(mytoken)
    if exp is None:
        return job, None
    walltime = walltime_for(job, config)
    room = exp - now - config.site.walltime_slack_s - 60.0
    if room >= walltime:
        return job, None
    if room < policy.MIN_JOB_MYTOKEN_S:
        raise MytokenRejectedError(
            f"the job's mytoken expires in {max(0.0, exp - now):.0f} s, too soon for job "
            f"{job.job_id} (submit again with a longer --lifetime)"
        )
    logger.warning(
        "job token chain shortened to the parent's expiry job=%s walltime_s=%.0f available_s=%.0f",
        job.job_id,
        walltime,
        room,
    )
    note = (
        f"jobtoken: the submission mytoken expires before the job's wall time ends; "
        f"tokens until {int(exp)} only"
    )
    return replace(job, walltime_s=room), note


class _Deadline(ServerUnavailableError):
    pass


class _deadline:
    """Bound the whole hook with SIGALRM (the starter gives prepare hooks no timeout)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = False
        self.previous: Any = None

    def _fire(self, signum: int, frame: Any) -> None:
        raise _Deadline(f"jobtoken prepare hook gave up after {self.seconds:.0f} s")

    def __enter__(self) -> _deadline:
        if self.seconds > 0 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
            self.armed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)


def run_prepare_hook(
    config: Config,
    ad_text: str,
    *,
    env: Mapping[str, str],
    options: HookOptions = HookOptions(),
    prepare: Callable[..., PreparedJob] = prepare_job,
) -> HookResult:
    """The whole PREPARE_JOB hook: never raises for expected failures, returns the verdict.

    Raises:
        Exception: only bugs (the CLI turns them into a hold, never a silent success).
    """
    try:
        with _deadline(options.deadline_s):
            return _prepare_hook(config, ad_text, env, options, prepare)
    except JobtokenError as exc:
        code = hook_status_code(exc)
        verdict = "requeue" if code >= 300 else "hold"
        logger.error("prepare hook failed verdict=%s code=%d error=%s", verdict, code, exc.message)
        return HookResult(code, _log_line(f"jobtoken: {exc.message}"))


def _prepare_hook(
    config: Config,
    ad_text: str,
    env: Mapping[str, str],
    options: HookOptions,
    prepare: Callable[..., PreparedJob],
) -> HookResult:
    ad = read_job_ad(ad_text)
    request = job_request_from_ad(ad, require_walltime=options.require_walltime)
    job = request.job
    if _number_attr(ad, "SuccessCheckpointExitCode") is not None:  # checkpoint_exit_code
        # a self-checkpointing job is restarted through the wrapper without this hook: the
        # job mytoken must outlive each run; the exit hook revokes it at the job's end
        config = replace(config, renewal=replace(config.renewal, revoke_at_end=False))
    scratch_env = env.get("_CONDOR_SCRATCH_DIR")
    scratch = Path(scratch_env) if scratch_env else Path.cwd()
    if not scratch_env:
        logger.warning("no $_CONDOR_SCRATCH_DIR; using the current directory %s", scratch)
    directory = scratch / options.dir_name
    supplied = _job_supplied_mytoken(request, env, scratch, options)
    refuse_unsupported_job(ad, job.job_id, broker=supplied is None and bool(options.broker_socket))
    if supplied is None and options.broker_socket:
        return _broker_prepare(request, directory, options.broker_socket, options.deadline_s)
    if supplied is not None and supplied[0].startswith("$_CONDOR_CREDS"):
        bearer = _creds_access_token(request, *supplied, now=time.time())
        if bearer is not None:
            return bearer
    parent_copy: Optional[Path] = None
    clamp_note: Optional[str] = None
    if supplied is not None:
        where, path = supplied
        mytoken, minted_for = read_credential(read_secret_file(path), where)
        if minted_for and not job.scopes:
            job = replace(job, scopes=minted_for)  # the submission's exact scope strings
        job, clamp_note = _fit_into_parent(job, mytoken, config, now=time.time())
        ensure_private_dir(directory)
        parent_copy = directory / _PARENT_COPY
        write_secret_file(parent_copy, mytoken, newline=False)
        site = replace(config.site, parent_mytoken_file=str(parent_copy))
        server = config.server
        if request.server:
            server = replace(server, url=request.server)
        config = replace(config, site=site, server=server)
        logger.info("parent mytoken from the job source=%s job=%s", where, job.job_id)
    else:
        if not (config.site.parent_mytoken_file or config.token.mytoken_file):
            raise ConfigError(
                f"no mytoken for job {job.job_id}: none transferred, no "
                f"$_CONDOR_CREDS/{options.creds_service}.use, no site.parent_mytoken_file"
            )
        logger.info(
            "parent mytoken from the site path=%s job=%s",
            config.site.parent_mytoken_file or config.token.mytoken_file,
            job.job_id,
        )
    try:
        prepared = prepare(config, job, directory=str(directory), env=env)
    finally:
        if parent_copy is not None:
            remove_secret_file(parent_copy)
    if supplied is not None and request.mytoken_file:
        # the job no longer needs the per-submission mytoken: keep it out of the payload's reach
        remove_secret_file(supplied[1])
    add = prepared.environment()
    current = dict(request.environment)
    dropped = [name for name in ("BEARER_TOKEN",) if name in current]
    for name in dropped:
        del current[name]  # it would win over the file in WLCG discovery and never be renewed
    current.update(add)
    try:
        environment = format_environment_v2(current)
    except EnvironmentSyntaxError as exc:
        raise ConfigError(f"job {job.job_id}: {exc}") from None
    message = None
    if supplied is not None and clamp_note:
        message = clamp_note
    elif request.walltime_source is None:
        message = (
            f"jobtoken: no wall time in the job ad; token chain sized for the site default "
            f"{config.site.default_walltime_s:.0f} s"
        )
        logger.warning(
            "no wall time in the job ad job=%s default_s=%.0f",
            job.job_id,
            config.site.default_walltime_s,
        )
    logger.info(
        "prepare hook done job=%s mom_id=%s dir=%s walltime_from=%s dropped=%s",
        job.job_id,
        prepared.mom_id,
        directory,
        request.walltime_source or "default",
        ",".join(dropped) or "-",
    )
    return HookResult(0, message, environment, prepared)


# --- the node broker (docs/htcondor.md, "Node broker") -------------------------------------

BROKER_KNOB = "JOBTOKEN_BROKER_SOCKET"


def broker_socket(param: Callable[[str], Optional[str]] = condor_param_as_set) -> Optional[str]:
    """The node broker's socket when the site runs one (HTCondor config
    ``JOBTOKEN_BROKER_SOCKET``, never the job's environment), else None."""
    value = param(BROKER_KNOB)
    return value.strip() or None if value else None


def _broker_prepare(
    request: AdRequest, directory: Path, socket_path: str, timeout_s: float
) -> HookResult:
    """Ask the node broker for the job's token: it mints and keeps the job mytoken itself,
    reads who the job is from the startd (not from this ad), and writes only the access
    token into ``directory``; no mytoken and no sidecar ever reach the sandbox.

    Raises:
        JobtokenError: the broker's refusal (its exit code) or ServerUnavailableError.
    """
    from .._brokerclient import BrokerClient

    ensure_private_dir(directory)
    reply = BrokerClient(socket_path, timeout_s).prepare(str(directory))
    environment = _environment_with(request, {
        "BEARER_TOKEN_FILE": reply.bearer_token_file or str(directory / "bt"),
        "JOBTOKEN_DIR": str(directory),
        BROKER_KNOB: socket_path,  # for `jobtoken broker ensure` in the payload
    })
    logger.info("prepare hook done job=%s broker=%s dir=%s exp=%s", reply.job_id or
                request.job.job_id, socket_path, directory,
                int(reply.expires_at) if reply.expires_at else "-")
    return HookResult(0, None, environment)


def _broker_release(directory: Path, socket_path: str, timeout_s: float,
                    chirp_factory: Optional[Callable[[], Any]] = None) -> bool:
    """Tell the broker the job ended (it revokes the job mytoken), remove the token file.

    The broker also notices on its own when the starter is gone, so a broker that cannot
    be reached now still revokes; this only makes it prompt.
    """
    from .._brokerclient import BrokerClient

    publish_broker_chirp(directory, socket_path, timeout_s=min(5.0, timeout_s / 4),
                         chirp_factory=chirp_factory)
    released = True
    try:
        BrokerClient(socket_path, timeout_s).release()
    except JobtokenError as exc:
        released = False
        logger.warning("exit hook: the broker did not release the job: %s", exc.message)
    remove_secret_file(directory / "bt")
    logger.info("exit hook done broker=%s released=%s dir=%s", socket_path, released, directory)
    return released


# --- the exit hook ------------------------------------------------------------------------


def run_exit_hook(
    env: Mapping[str, str],
    *,
    reason: str = "exit",
    timeout_s: float = 25.0,
    dir_name: str = TOKEN_DIR_NAME,
    jobtoken_argv: Optional[List[str]] = None,
    chirp_factory: Optional[Callable[[], Any]] = None,
    broker: Optional[str] = None,
) -> bool:
    """Publish the last status, revoke the job mytoken, delete the token files; never raises.

    With a node broker (``broker``, its socket) and no job mytoken in the sandbox, the
    broker is told to release the job instead.

    Bounded by ``timeout_s`` (HTCondor waits ``JOB_EXIT_TIMEOUT``, 30 s, at most).

    Returns:
        True when the job mytoken was revoked (or there was nothing to revoke).
    """
    scratch = env.get("_CONDOR_SCRATCH_DIR") or os.getcwd()
    directory = Path(scratch) / dir_name
    if broker and not (directory / "job.json").is_file():
        return _broker_release(directory, broker, timeout_s, chirp_factory)
    if not (directory / "job.json").is_file():
        logger.info("exit hook: no token directory reason=%s dir=%s", reason, directory)
        return True
    try:
        publish_chirp(TokenDir.existing(directory), chirp_factory=chirp_factory)
    except JobtokenError:
        pass
    revoked = revoke_and_clean(directory, timeout_s=timeout_s, jobtoken_argv=jobtoken_argv)
    logger.info("exit hook done reason=%s revoked=%s dir=%s", reason, revoked, directory)
    return revoked


# --- Chirp -----------------------------------------------------------------------------------


def chirp_values(tokendir: TokenDir) -> Dict[str, str]:
    """The ``Chirp*`` attributes (ClassAd expressions) for the directory's state."""
    state = tokendir.read_state()
    if state is None:
        return {}
    values = {
        "ChirpJobtokenRenewals": str(int(state.renewals)),
        "ChirpJobtokenFailures": str(int(state.consecutive_failures)),
        "ChirpJobtokenCredentialLost": "true" if state.credential_lost else "false",
    }
    if state.expires_at is not None:
        values["ChirpJobtokenExpiry"] = str(int(state.expires_at))
    return values


def chirp_client_class() -> Optional[Callable[[], Any]]:
    """HTChirp from the bindings the site has: ``htcondor2`` (24+), else ``htcondor`` (23.x)."""
    for module in ("htcondor2.htchirp", "htcondor.htchirp"):
        try:
            imported = __import__(module, fromlist=["HTChirp"])
        except ImportError:
            continue
        return getattr(imported, "HTChirp", None)
    return None


_NO_CHIRP_MARK = "chirp-unavailable"


def _warn_no_chirp_once(directory: Path) -> None:
    """One warning per job (each hook run is a new process, so the mark is a file)."""
    mark = directory / _NO_CHIRP_MARK
    if mark.exists():
        return
    logger.warning(
        "chirp unavailable: no htcondor2.htchirp or htcondor.htchirp (install the HTCondor "
        "Python bindings that come with the daemons); no ChirpJobtoken* attributes"
    )
    try:
        mark.touch(exist_ok=True)
    except OSError:
        pass


def publish_chirp(
    tokendir: TokenDir, *, chirp_factory: Optional[Callable[[], Any]] = None
) -> Dict[str, str]:
    """Send the state as delayed Chirp updates; best effort, returns what was sent."""
    return send_chirp(chirp_values(tokendir), tokendir.path, chirp_factory=chirp_factory)


#: broker phases in which a job has a token, and so renewal figures worth publishing
_PHASES_WITH_A_TOKEN = ("active", "ending")


def broker_chirp_values(reply: Any) -> Dict[str, str]:
    """The ``Chirp*`` attributes for the node broker's ``status`` reply about this job.

    Nothing unless the broker holds the job's token (phase ``active`` or ``ending``).
    When the job exits, HTCondor 23.9 starts an ``UPDATE_JOB_INFO`` hook (the
    time-of-exit update, ``OsProc::JobReaper``) together with the ``JOB_EXIT`` hook; the
    update hook may ask after the exit hook's ``release``, when the broker has forgotten
    the job and sees a new, never prepared one (0 renewals, no expiry). Its Chirp values
    would land last and overwrite the real count in the job's history.
    """
    detail = reply.detail or {}
    if detail.get("phase") not in _PHASES_WITH_A_TOKEN:
        return {}
    values = {}
    for name, key in (("ChirpJobtokenRenewals", "renewals"),
                      ("ChirpJobtokenFailures", "consecutive_failures")):
        value = detail.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            values[name] = str(value)
    if reply.expires_at:
        values["ChirpJobtokenExpiry"] = str(int(reply.expires_at))
    return values


def publish_broker_chirp(
    directory: Path, socket_path: str, *, timeout_s: float = 10.0,
    chirp_factory: Optional[Callable[[], Any]] = None,
) -> Dict[str, str]:
    """Ask the node broker for this job's state and send it as Chirp updates; best effort."""
    from .._brokerclient import BrokerClient

    try:
        reply = BrokerClient(socket_path, timeout_s).status()
    except JobtokenError as exc:
        logger.warning("no status from the broker for Chirp: %s", exc.message)
        return {}
    return send_chirp(broker_chirp_values(reply), directory, chirp_factory=chirp_factory)


def send_chirp(
    values: Mapping[str, str], directory: Path, *,
    chirp_factory: Optional[Callable[[], Any]] = None,
) -> Dict[str, str]:
    """Send ``values`` as delayed Chirp updates; best effort, returns what was sent.
    ``directory`` (the job's token directory) keeps the mark of a warning given once."""
    if not values:
        return {}
    if chirp_factory is None:
        chirp_factory = chirp_client_class()
        if chirp_factory is None:
            _warn_no_chirp_once(directory)
            return {}
    try:
        with chirp_factory() as chirp:
            for name, value in values.items():
                chirp.set_job_attr_delayed(name, value)
    except ValueError as exc:  # no .chirp.config: Chirp is off for this job
        logger.debug("chirp skipped: %s", exc)
        return {}
    except Exception as exc:  # network trouble with the starter: never fail the job for it
        logger.warning("chirp update failed: %s", _log_line(str(exc), 200))
        return {}
    logger.debug("chirp updated %s", " ".join(f"{k}={v}" for k, v in values.items()))
    return dict(values)


# --- condor_submit: include command -----------------------------------------------------------


def _quote(value: str) -> str:
    import classad2

    return str(classad2.quote(value))


def _append_list(macro: str, item: str) -> Iterator[str]:
    yield f"if defined {macro}"
    yield f"  {macro} = $({macro}), {item}"
    yield "else"
    yield f"  {macro} = {item}"
    yield "endif"


def submit_commands(
    *,
    mytoken_path: str,
    server_url: str,
    scopes: Tuple[str, ...],
    audiences: Tuple[str, ...],
    mom_id: Optional[str],
    expires_at: Optional[float],
) -> str:
    """Submit-language lines that send the per-submission mytoken with each job.

    The file goes into ``transfer_input_files`` and ``encrypt_input_files`` (appended to
    whatever the submit file set *before* the include line); ``My.Jobtoken*`` carry
    only non-secret facts for the execute point's prepare hook.

    Raises:
        ConfigError: a path that the submit language cannot list (comma or space).
    """
    if any(c in mytoken_path for c in ", \t\n\"'"):
        raise ConfigError(f"mytoken path {mytoken_path} cannot go into transfer_input_files")
    lines = [
        f"# jobtoken: per-submission mytoken mom_id={mom_id or '-'} "
        f"exp={utc_text(expires_at) if expires_at else '-'} (no token in this text)",
        *_append_list("transfer_input_files", mytoken_path),
        *_append_list("encrypt_input_files", mytoken_path),
        "if !defined should_transfer_files",
        "  should_transfer_files = YES",
        "endif",
        f"My.HookKeyword = {_quote(HOOK_KEYWORD)}",
        f"My.JobtokenMytokenFile = {_quote(os.path.basename(mytoken_path))}",
        f"My.JobtokenServer = {_quote(server_url)}",
        f"My.JobtokenScope = {_quote(' '.join(scopes))}",
    ]
    if audiences:
        lines.append(f"My.JobtokenAudience = {_quote(' '.join(audiences))}")
    if mom_id:
        lines.append(f"My.JobtokenSubmissionMomId = {_quote(mom_id)}")
    return "\n".join(lines) + "\n"


# --- the job wrapper (USER_JOB_WRAPPER) for jobs that asked ---------------------------------

# what a job's environment must not change in jobtoken's own processes (the wrapper runs
# with the job's environment): settings, the interpreter's module path
_NOT_FROM_THE_JOB = ("JOBTOKEN_", "PYTHON", "MYTOKEN", "BEARER_TOKEN")


def own_environment(env: Mapping[str, str]) -> Dict[str, str]:
    """The job's environment without what could steer jobtoken itself."""
    return {k: v for k, v in env.items() if not k.startswith(_NOT_FROM_THE_JOB)}


def start_job_sidecar(
    directory: Path,
    watch_pid: int,
    env: Mapping[str, str],
    *,
    previous_timeout_s: float = 60.0,
    ready_timeout_s: float = 30.0,
) -> None:
    """A valid token in ``directory`` and a renewal sidecar watching ``watch_pid``.

    A self-checkpointing job comes back here without the prepare hook: the previous run's
    sidecar may still be finishing, so it is waited for before the new one starts (two
    would fight over the lock, and the finishing one would delete the new token).

    Raises:
        ConfigError: no token directory (the prepare hook did not run for a job that asked).
        ServerUnavailableError: the previous sidecar does not end, or the new one does not
            start; JobtokenError: no first token (the sidecar's own error).
    """
    import subprocess
    import sys

    from .._run import sidecar_alive

    if not (directory / "job.json").is_file():
        raise ConfigError(
            f"the job asked for a token (HookKeyword {HOOK_KEYWORD}) but {directory} has no "
            "job.json: the prepare hook did not run on this execute point"
        )
    tokendir = TokenDir.existing(directory)
    deadline = time.monotonic() + previous_timeout_s
    while sidecar_alive(tokendir):
        if time.monotonic() > deadline:
            raise ServerUnavailableError(
                f"the previous run's token sidecar did not end within {previous_timeout_s:.0f} s"
            )
        time.sleep(0.1)
    proc = subprocess.run(
        [sys.executable, "-m", "jobtoken", "sidecar", "--detach", "--dir", str(directory),
         "--watch-pid", str(watch_pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=own_environment(env),
        text=True,
        timeout=ready_timeout_s + 120.0,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise JobtokenError(
            f"could not start the token renewal sidecar (exit {proc.returncode}): "
            f"{_log_line(lines[-1] if lines else 'no message', 200)}"
        )
    # the sidecar records the pid it watches once it holds the lock
    deadline = time.monotonic() + ready_timeout_s
    while True:
        state = tokendir.read_state()
        if state is not None and state.payload_pid == watch_pid and sidecar_alive(tokendir):
            return
        if time.monotonic() > deadline:
            raise ServerUnavailableError(
                f"the token sidecar did not take over within {ready_timeout_s:.0f} s"
            )
        time.sleep(0.05)


def _token_from_creds(env: Mapping[str, str]) -> bool:
    """Whether the job's ``BEARER_TOKEN_FILE`` is a ``.use`` in ``$_CONDOR_CREDS``."""
    creds, token = env.get("_CONDOR_CREDS"), env.get("BEARER_TOKEN_FILE")
    return bool(creds and token and token.endswith(".use") and Path(token).parent == Path(creds))


def _token_from_broker(env: Mapping[str, str], directory: Path) -> bool:
    """Whether the prepare hook set the job up with the node broker (no sidecar needed)."""
    return bool(env.get(BROKER_KNOB)) and env.get("BEARER_TOKEN_FILE") == str(directory / "bt")


def run_job_wrapper(
    argv: List[str],
    env: Mapping[str, str],
    *,
    dir_name: str = TOKEN_DIR_NAME,
    execute: Callable[[str, List[str], Dict[str, str]], Any] = os.execvpe,
) -> int:
    """``USER_JOB_WRAPPER`` for a job that asked: sidecar up, then exec the job in place.

    The job keeps this process id (the sidecar watches it), its exit status and signals.
    When the sidecar cannot start, HTCondor's ``$_CONDOR_WRAPPER_ERROR_FILE`` gets the
    reason (the starter requeues the job) and the job mytoken is revoked here, because
    the starter then runs no ``JOB_EXIT`` hook.

    Returns:
        Only on failure: 1 (sidecar), 127 (the job's executable cannot run).
    """
    if not argv:
        logger.error("job wrapper: no job command")
        return int(ExitCode.USAGE)
    scratch = Path(env.get("_CONDOR_SCRATCH_DIR") or os.getcwd())
    directory = scratch / dir_name
    if not (directory / "job.json").exists() and (
        _token_from_creds(env) or _token_from_broker(env, directory)
    ):
        # the credd path: the prepare hook pointed BEARER_TOKEN_FILE at $_CONDOR_CREDS,
        # which HTCondor refreshes from the AP's credmon; the node broker's: the broker
        # renews the token in the job's directory. No job mytoken here, nothing to renew.
        try:
            execute(argv[0], argv, dict(env))
        except OSError as exc:
            logger.error("cannot run the job's executable %s: %s", argv[0], exc.strerror)
        return 127
    try:
        start_job_sidecar(directory, os.getpid(), env)
    except JobtokenError as exc:
        message = _log_line(f"jobtoken: {exc.message}")
        logger.error("job wrapper failed: %s", exc.message)
        failure = env.get("_CONDOR_WRAPPER_ERROR_FILE")
        if failure:
            try:
                with open(failure, "w", encoding="utf-8") as fh:
                    fh.write(message + "\n")
            except OSError as err:
                logger.error("cannot write %s: %s", failure, err.strerror)
        revoked = revoke_and_clean(directory, timeout_s=20.0)
        logger.info("job wrapper cleaned up after its failure revoked=%s", revoked)
        return 1
    payload_env = {k: v for k, v in env.items() if k != "BEARER_TOKEN"}
    payload_env["BEARER_TOKEN_FILE"] = str(directory / "bt")
    payload_env["JOBTOKEN_DIR"] = str(directory)
    try:
        execute(argv[0], argv, payload_env)
    except OSError as exc:
        logger.error("cannot run the job's executable %s: %s", argv[0], exc.strerror)
    return 127


# --- the audit log ----------------------------------------------------------------------------

AUDIT_KNOB = "JOBTOKEN_AUDIT_LOG"
DEFAULT_AUDIT_DIR = "/var/log/jobtoken"


def audit_log_dir(
    param: Callable[[str], Optional[str]] = condor_param_as_set,
) -> Optional[str]:
    """Where hooks append their audit lines: ``JOBTOKEN_AUDIT_LOG`` (HTCondor config),
    default /var/log/jobtoken; ``none`` or empty turns the file off."""
    value = param(AUDIT_KNOB)
    if value is None:
        return DEFAULT_AUDIT_DIR
    value = value.strip()
    return None if value.lower() in ("", "none", "false") else value


def attach_audit_log(what: str, directory: Optional[str]) -> Optional[logging.Handler]:
    """Append this process's INFO+ log lines to ``DIRECTORY/<user>.log``.

    Hooks run as the job's user, so each user writes only their own file; the directory is
    the site's (mode 1733 like /tmp: anyone may create a file, nobody may touch another's).
    A missing or unwritable directory costs a warning on stderr, never the job.
    """
    if not directory:
        return None
    import pwd

    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    path = Path(directory) / f"{user}.log"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        logger.warning("no audit log: cannot open %s: %s", path, exc.strerror)
        return None
    handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    handler.setFormatter(UtcFormatter(
        f"%(asctime)s jobtoken[%(process)d] {what} user={user} %(levelname)s %(message)s"
    ))
    handler.addFilter(PrintableFilter())
    handler.setLevel(logging.INFO)
    logging.getLogger("jobtoken").addHandler(handler)
    return handler
