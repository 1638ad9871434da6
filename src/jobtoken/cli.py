"""Command line: parse arguments into typed settings, call one library function, map errors.

This is the only place that turns exceptions into exit codes (``_errors.exit_code_for``)
and the only place that configures logging. Heavy modules (httpx, cryptography) are
imported inside the subcommand that needs them, so that ``jobtoken run``'s waiting
process stays small.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import __version__
from ._batchcommands import register_commands as _batch_commands
from ._brokercommands import register_commands as _broker_commands
from ._cliargs import (
    add_common_options,
    add_server_options,
    add_token_options,
    config_from_args,
    split_values,
)
from ._config import Config
from ._errors import (
    ExitCode,
    JobtokenError,
    UsageError,
    error_summary,
    printable_values,
)
from ._installfiles import register as _register_install_files
from ._logsetup import log_to_file, setup_logging

if TYPE_CHECKING:  # imported for real inside the subcommands (start-up time)
    from ._policy import HealthThresholds
    from ._tokendir import JobRecord, TokenDir

__all__ = ["main"]

logger = logging.getLogger("jobtoken")

EXIT_CODES_HELP = """exit codes:
  0    success
  2    usage error (bad command line)
  65   access token refused by jobtoken's checks (expired, wider scope, wrong audience)
  67   node broker: the caller is not a job it knows, or may not do this
  69   credentials lost: the token expired and renewal kept failing (run: payload stopped)
  74   a token file could not be read or written
  75   Mytoken server unavailable (5xx, 429, timeout, network): retrying later can help
  76   Mytoken server answered garbage (protocol error): retrying later can help
  77   mytoken rejected (revoked, expired, restricted, lacking a capability): permanent
  78   configuration error (config file, variables, mytoken file)
  126  payload cannot be executed; 127 payload not found
  130  interrupted (SIGINT)
  run: otherwise the payload's own exit status, or death by the same signal
with --json, a failure prints {"ok": false, "error": ..., "exit_code": ...} on stdout"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, our exit code for usage
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _emit(
    args: argparse.Namespace, data: Dict[str, Any], human: Callable[[Dict[str, Any]], str],
    *, chatter: bool = False,
) -> None:
    """Print ``data`` as JSON (which escapes control characters itself) or as ``human``
    text made from an escaped copy: token and server values never reach a terminal raw.

    ``chatter``: the human text only confirms what was done (``token``, ``ensure``,
    ``revoke``); ``-q`` leaves it out, the exit code says it. Data asked for (``status``,
    ``inspect``, ``--json``) is printed whatever ``-q`` says.
    """
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    elif not (chatter and getattr(args, "quiet", 0) > 0):
        sys.stdout.write(human(printable_values(data)) + "\n")


# --- subcommands -----------------------------------------------------------------------------


def _cmd_token(args: argparse.Namespace) -> int:
    from ._oneshot import get_token

    cfg = config_from_args(args)
    if args.min_valid is not None:
        from dataclasses import replace

        cfg = replace(cfg, token=replace(cfg.token, min_valid_s=args.min_valid))
    result = get_token(cfg, out=args.out, metrics_dir=args.metrics_dir)
    _emit(args, result.summary(), lambda _: result.human(), chatter=True)
    return ExitCode.OK


HEALTH_CODES_HELP = """exit codes (Nagios plugin codes, for monitoring):
  0    OK: the token is valid (for at least --warn S); (status) or the job ended
  1    WARNING: less than --warn S left; (status) the job mytoken's revocation is pending
  2    CRITICAL: expired, less than --crit S left, credential lost, or (status) no
       renewer alive although the job's sidecar started and did not finish
  3    UNKNOWN: (status) no token known yet
  otherwise an error, with the codes of 'jobtoken --help' (e.g. 78 bad config, 74 file)"""


def _add_health_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warn", type=float, default=0.0, metavar="S",
                   help="exit 1 (WARNING) when the token has less than S seconds left (0)")
    p.add_argument("--crit", type=float, default=0.0, metavar="S",
                   help="exit 2 (CRITICAL) when it has less than S seconds left (0: only "
                   "when expired)")


def _health_thresholds(args: argparse.Namespace) -> HealthThresholds:
    from ._policy import HealthThresholds

    try:
        return HealthThresholds(warn_s=args.warn, crit_s=args.crit)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _health_code(data: Dict[str, Any]) -> int:
    from ._policy import Health

    return int(Health[data["health"]])


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ._oneshot import inspect_token

    summary = inspect_token(args.file, _health_thresholds(args))
    _emit(args, summary, _human_inspect)
    return _health_code(summary)


def _human_inspect(s: Dict[str, Any]) -> str:
    lines = [f"source:    {s['source']}"]
    for key in ("iss", "sub", "jti", "audiences", "scopes", "wlcg.ver", "alg", "kid"):
        value = s.get(key)
        if isinstance(value, list):
            value = " ".join(value)
        lines.append(f"{key + ':':<10} {value if value is not None else '-'}")
    lines.append(f"{'exp:':<10} {s.get('exp_utc')} ({s.get('remaining_human')})")
    lines.append(f"{'health:':<10} {s['health']} - {s['health_reason']}")
    return "\n".join(lines)


def _renewal_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    return {
        "on_failure": getattr(args, "on_failure", None),
        "warn_signal": getattr(args, "warn_signal", None),
        "warn_before_s": getattr(args, "warn_before", None),
        "margin_s": getattr(args, "margin", None),
        "metrics_dir": getattr(args, "metrics_dir", None),
        "log_json": True if getattr(args, "log_json", False) else None,
    }


def _job_config(args: argparse.Namespace) -> Config:
    from dataclasses import replace

    from ._config import _apply

    cfg = config_from_args(args)
    given = {k: v for k, v in _renewal_overrides(args).items() if v is not None}
    if given:
        cfg = _apply(cfg, "renewal", given, "command line")
    if getattr(args, "token_dir_base", None):
        cfg = replace(cfg, site=replace(cfg.site, token_dir_base=args.token_dir_base))
    return cfg


# Flags that shape a *new* token directory. A prepared one (job.json) fixes them for every
# renewal child, which reads only job.json: accepting them would be a silent no-op.
_FIXED_BY_JOB_JSON = (
    ("server", "--server"), ("ca_file", "--ca-file"), ("ca_dir", "--ca-dir"),
    ("allow_http", "--allow-http"), ("timeout", "--timeout"),
    ("server_deadline", "--server-deadline"), ("scope", "--scope"), ("audience", "--audience"),
    ("mytoken_file", "--mytoken-file"), ("mytoken_env", "--mytoken-env"),
    ("trusted_issuer", "--trusted-issuer"), ("token_dir_base", "--token-dir-base"),
    ("job_id", "--job-id"), ("walltime", "--walltime"),
)


def _refuse_flags_for_prepared(args: argparse.Namespace) -> None:
    """Refuse flags a prepared directory's ``job.json`` would silently override.

    Raises:
        UsageError: naming the flags.
    """
    from pathlib import Path

    if not args.dir or not (Path(args.dir) / "job.json").is_file():
        return
    given = [flag for name, flag in _FIXED_BY_JOB_JSON if getattr(args, name, None) is not None]
    if given:
        raise UsageError(
            f"{', '.join(given)} cannot change the prepared directory {args.dir}: its job.json "
            "fixes them for every renewal (prepare it with them, or run without --dir)"
        )


def _job_setup(args: argparse.Namespace) -> Tuple[Config, TokenDir, JobRecord]:
    import os

    from ._run import RunOptions, setup_tokendir

    _refuse_flags_for_prepared(args)
    cfg = _job_config(args)
    tokendir, spec = setup_tokendir(
        cfg, RunOptions(dir=args.dir, job_id=args.job_id, walltime_s=args.walltime), env=os.environ
    )
    # flags given now win over a prepared job.json (for this process; the file stays)
    given = {k: v for k, v in _renewal_overrides(args).items() if v is not None}
    if given:
        from dataclasses import replace

        spec = replace(spec, **given)
    _log_to_dir(args, tokendir, spec)
    return cfg, tokendir, spec


def _log_to_dir(args: argparse.Namespace, tokendir: TokenDir, spec: JobRecord) -> None:
    """Events go to the token directory's log (kept when the directory is), warnings to stderr."""
    log_to_file(_log_path(args, tokendir, spec), log_json=spec.log_json, verbose=args.verbose,
                quiet=args.quiet)


def _log_path(args: argparse.Namespace, tokendir: TokenDir, spec: JobRecord) -> Optional[str]:
    return getattr(args, "log_file", None) or (
        None if spec.remove_dir_at_end else str(tokendir.log_file)
    )


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    from ._run import payload_environment, run_job

    if not args.payload:
        raise UsageError("no payload command: use 'jobtoken run [OPTIONS] -- CMD [ARGS...]'")
    if args.broker is not None:
        from ._pilotrun import run_with_broker

        return run_with_broker(args.payload, socket_path=args.broker or None, tokendir=args.dir,
                               job_id=args.job_id, walltime_s=args.walltime, env=os.environ,
                               may_exec=getattr(args, "may_exec", False),
                               log_args=(f"-v{args.verbose}", f"-q{args.quiet}"))
    cfg, tokendir, spec = _job_setup(args)
    if cfg.token.mytoken_env:
        from ._hardening import scrub_environ

        # the directory holds a private copy now; the payload could read the variable
        # in /proc/<our pid>/environ, which unsetenv alone does not change
        scrub_environ(cfg.token.mytoken_env)
    env = payload_environment(os.environ, tokendir, spec, cfg)
    slim = None
    if getattr(args, "may_exec", False):  # the real command: wait as the small _waiter
        from ._runstep import step_arguments

        slim = step_arguments(spec=spec, verbose=args.verbose, quiet=args.quiet,
                              log_file=_log_path(args, tokendir, spec))
    return run_job(tokendir, spec, args.payload, env=env, slim=slim)


def _cmd_sidecar(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from ._run import first_token, run_sidecar
    from ._runstep import step_arguments

    cfg, tokendir, spec = _job_setup(args)
    if args.detach:
        # a valid token before the wrapper execs the payload, then renew in the background
        first_token(tokendir, spec)
        argv = [sys.executable, "-m", "jobtoken", "sidecar", "--dir", str(tokendir.path),
                "--watch-pid", str(args.watch_pid)]
        if args.log_file:
            argv += ["--log-file", args.log_file]
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        sys.stdout.write(f"BEARER_TOKEN_FILE={tokendir.bearer_token}\n")
        return ExitCode.OK
    if not getattr(args, "may_exec", False):
        raise UsageError("'jobtoken sidecar' waits as a process of its own (it execs its "
                         "small waiting loop); run it as a command")
    slim = step_arguments(spec=spec, verbose=args.verbose, quiet=args.quiet,
                          log_file=_log_path(args, tokendir, spec))
    return run_sidecar(tokendir, spec, watch_pid=args.watch_pid or os.getppid(),
                       step_args=[*slim, "--sidecar"])


def _cmd_status(args: argparse.Namespace) -> int:
    import os

    from ._run import status
    from ._tokendir import TokenDir

    directory = args.dir or os.environ.get("JOBTOKEN_DIR")
    if not directory:
        raise UsageError("which token directory? give DIR or set $JOBTOKEN_DIR")
    data = status(TokenDir.existing(directory), thresholds=_health_thresholds(args))
    _emit(args, data, _human_status)
    return _health_code(data)


def _human_status(d: Dict[str, Any]) -> str:
    from ._clock import utc_text

    def at(value: Any) -> str:
        return "-" if value is None else utc_text(value, sep=" ")

    remaining = d.get("remaining_s")
    lines = [
        f"directory:     {d['dir']}",
        f"job:           {d['job_id']}",
        f"sidecar:       {'running' if d['sidecar_alive'] else 'not running'}",
        f"token file:    {d['token_file']} ({'present' if d['token_present'] else 'absent'})",
        f"expires:       {at(d.get('expires_at'))}"
        + ("" if remaining is None else f" ({remaining:.0f} s left)"),
        f"scope:         {' '.join(d.get('scopes') or []) or '-'}",
        f"audience:      {' '.join(d.get('audiences') or []) or '-'}",
        f"renewals:      {d.get('renewals', 0)}",
        f"failures:      {d.get('consecutive_failures', 0)} in a row, "
        f"{d.get('failures_total', 0)} in all",
        f"next attempt:  {at(d.get('next_attempt_at'))}",
    ]
    if d.get("last_error"):
        lines.append(f"last error:    {d['last_error']}")
    if d.get("credential_lost"):
        lines.append("CREDENTIAL LOST: the token will expire and renewal is failing")
    lines.append(f"health:        {d['health']} - {d['health_reason']}")
    return "\n".join(lines)


def _cmd_ensure(args: argparse.Namespace) -> int:
    import os

    from ._clock import SystemClock
    from ._run import ensure_token
    from ._tokendir import TokenDir

    directory = args.dir or os.environ.get("JOBTOKEN_DIR")
    if not directory:
        raise UsageError("which token directory? give --dir DIR or set $JOBTOKEN_DIR")
    tokendir = TokenDir.existing(directory)
    report = ensure_token(tokendir, tokendir.read_spec(), min_valid_s=args.min_valid)
    left = (report.expires_at or 0.0) - SystemClock().now()
    data = {"expires_at": report.expires_at, "remaining_s": int(left),
            "renewed": not report.reused}
    _emit(args, data, lambda _: f"token valid for {int(left)} s"
          + (" (renewed)" if data["renewed"] else ""), chatter=True)
    return ExitCode.OK


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ._prepare import JobFacts, prepare_job

    cfg = _job_config(args)
    from ._config import _apply

    cfg = _apply(cfg, "site", {k: v for k, v in {
        "parent_mytoken_file": args.parent_mytoken_file,
        "expected_at_lifetime_s": args.expected_at_lifetime,
        "vo": args.vo,  # the caller is the site or pilot: its VO is the site's
    }.items() if v is not None}, "command line")
    job = JobFacts(
        job_id=args.job_id or _default_job_id(),
        walltime_s=args.walltime,
        owner=args.owner,
        scopes=tuple(split_values(args.job_scope) or ()),
        audiences=tuple(split_values(args.job_audience) or ()),
    )
    prepared = prepare_job(cfg, job, directory=args.dir)
    env = prepared.environment()
    data = dict(
        env,
        job_id=job.job_id,
        mom_id=prepared.mom_id,
        expires_at=prepared.token.expires_at,
        scopes=list(prepared.token.scopes),
    )
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        import shlex

        for key, value in env.items():
            sys.stdout.write(f"export {key}={shlex.quote(value)}\n")
    return ExitCode.OK


def _default_job_id() -> str:
    import os

    from ._run import default_job_id

    return default_job_id(os.environ)


def _cmd_revoke(args: argparse.Namespace) -> int:
    from ._run import revoke_job
    from ._tokendir import TokenDir

    cfg = config_from_args(args)
    parent = args.parent_mytoken_file or cfg.site.parent_mytoken_file
    revoked = revoke_job(TokenDir.existing(args.dir), config=cfg, parent_file=parent,
                         mom_id=args.mom_id)
    _emit(args, {"revoked": revoked},
          lambda _: "job mytoken revoked" if revoked else "nothing to revoke", chatter=True)
    return ExitCode.OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ._checkconfig import CheckOptions, as_json, as_text, overall, run_checks
    from ._clock import SystemClock
    from ._errors import ConfigError

    config, problem = None, None
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        problem = exc
    checks = run_checks(config, problem, CheckOptions(
        parent_file=args.parent_mytoken_file, online=not args.offline,
        arc_conf=Path(args.arc_conf)), now=SystemClock().now())
    _emit(args, as_json(checks), lambda _: as_text(checks))
    return int(overall(checks))


CHECK_CONFIG_HELP = """exit codes (Nagios plugin codes):
  0    every check OK (or skipped: no ARC, no HTCondor here)
  1    a WARN: works, but needs attention (e.g. the parent mytoken expires before the
       longest job would end, group-readable parent, RTE older than this jobtoken)
  2    a FAIL: jobs will not get tokens (or a wrong command line)"""


def _job_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job")
    g.add_argument("--dir", metavar="DIR",
                   help="token directory (a prepared one is adopted; default: a new private one)")
    g.add_argument("--token-dir-base", metavar="DIR", help="where to make a new token directory")
    g.add_argument("--job-id", metavar="ID", help="job identity for logs and renewal jitter")
    g.add_argument("--walltime", type=float, metavar="S", help="no renewals after S seconds")
    r = p.add_argument_group("renewal")
    r.add_argument("--margin", type=float, metavar="S", help="renew at least S s before expiry")
    r.add_argument("--on-failure", choices=("keep", "stop"),
                   help="when the token expired and renewal keeps failing: keep the payload "
                   "running, or stop it (exit 69)")
    r.add_argument("--warn-signal", metavar="SIG",
                   help="signal the payload this long before expiry when renewal is failing")
    r.add_argument("--warn-before", type=float, metavar="S", help="see --warn-signal (120)")
    r.add_argument("--metrics-dir", metavar="DIR", help="write Prometheus textfile metrics here")
    r.add_argument("--log-file", metavar="FILE", help="event log (default DIR/sidecar.log)")
    r.add_argument("--log-json", action="store_true", help="log JSON lines")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jobtoken",
        description="Keep WLCG bearer tokens alive inside grid batch jobs, from a Mytoken.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jobtoken {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "token",
        help="exchange a mytoken for an access token file",
        description="Exchange a mytoken for a checked access token and write it to a file "
        "(never to the terminal). The safe equivalent of `mytoken AT`.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(p)
    add_server_options(p)
    add_token_options(p)
    p.add_argument(
        "--out",
        metavar="FILE",
        help="where to write the token (default: $BEARER_TOKEN_FILE, else "
        "$XDG_RUNTIME_DIR/bt_u<uid>, else /tmp/bt_u<uid>)",
    )
    p.add_argument(
        "--min-valid",
        type=float,
        metavar="S",
        help="keep the existing token in --out if it is valid for at least S seconds",
    )
    p.add_argument("--metrics-dir", metavar="DIR",
                   help="add this run's outcome to Prometheus textfile metrics here (cron)")
    p.add_argument("--json", action="store_true", help="print a JSON summary (never the token)")
    p.set_defaults(func=_cmd_token)

    p = sub.add_parser(
        "inspect",
        help="show an access token's claims (never the token)",
        description="Show the claims, scopes and remaining lifetime of an access token. "
        "Without FILE, the token WLCG bearer-token discovery finds.",
        epilog=HEALTH_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(p)
    p.add_argument("file", nargs="?", help="token file (default: WLCG discovery)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_health_options(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "devserver",
        help="run the embedded Mytoken-compatible dev server (development and tests only)",
        add_help=False,
    )
    # listed here for `jobtoken --help`; main() hands `devserver ...` to its own parser
    p.add_argument("devserver_args", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "run",
        help="run a payload and keep its bearer token fresh: jobtoken run [OPTIONS] -- CMD",
        description="Get a valid access token, run CMD with BEARER_TOKEN_FILE pointing at it, "
        "renew it before it expires for as long as CMD runs, then clean up. CMD's exit status "
        "(or death by signal) is passed on unchanged.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(p)
    add_server_options(p)
    add_token_options(p)
    _job_options(p)
    p.add_argument(
        "--broker", nargs="?", const="", metavar="SOCKET",
        help="let a broker of this uid (a pilot's own) renew instead: register this process "
        "as the payload's job, release it at the end (socket: $JOBTOKEN_BROKER_SOCKET; "
        "docs/pilots.md)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "sidecar",
        help="renew a token directory while another process runs (for exec-ing wrappers)",
        description="Keep a token directory's access token fresh until the watched process "
        "ends. With --detach: make sure a token is valid, start the renewer in the background "
        "and return, so a wrapper can exec the payload.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(p)
    add_server_options(p)
    add_token_options(p)
    _job_options(p)
    p.add_argument("--watch-pid", type=int, metavar="PID",
                   help="stop when this process ends (default: the parent)")
    p.add_argument("--detach", action="store_true", help="renew in the background and return")
    p.set_defaults(func=_cmd_sidecar)

    p = sub.add_parser(
        "status",
        help="show a token directory's state (never the token)",
        description="Remaining lifetime, scopes, audience, renewals, failures and whether the "
        "sidecar runs, for a token directory (default $JOBTOKEN_DIR).",
        epilog=HEALTH_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(p)
    p.add_argument("dir", nargs="?", help="token directory (default $JOBTOKEN_DIR)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_health_options(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "ensure",
        help="make sure the job's token is valid for at least S more seconds",
        description="Return at once when the token in the directory is valid for --min-valid "
        "seconds; else renew it now and wait (e.g. right before a long stage-out).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(p)
    p.add_argument("--dir", metavar="DIR", help="token directory (default $JOBTOKEN_DIR)")
    p.add_argument("--min-valid", type=float, required=True, metavar="S")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_ensure)

    p = sub.add_parser(
        "prepare",
        help="mint a job's own restricted mytoken and first access token (pre-job hook)",
        description="From the parent mytoken, mint a sub-mytoken for one job (capability AT, "
        "the job's scopes and audience, expiring with the job's wall time, a usages_AT "
        "budget), fetch the first access token, and lay out the private token directory. "
        "Prints the variables the payload needs (never a token).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(p)
    add_server_options(p)
    add_token_options(p)
    p.add_argument("--dir", required=True, metavar="DIR", help="the job's token directory")
    p.add_argument("--parent-mytoken-file", metavar="FILE",
                   help="the site's or VO's parent mytoken (site.parent_mytoken_file)")
    p.add_argument("--job-id", metavar="ID", help="job identity (scope templates, logs)")
    p.add_argument("--walltime", type=float, metavar="S", help="the job's wall time limit")
    p.add_argument("--expected-at-lifetime", type=float, metavar="S",
                   help="access-token lifetime to size the job mytoken's usages_AT budget "
                   "(site.expected_at_lifetime_s, 1200)")
    p.add_argument("--owner", metavar="USER", help="the job's owner (scope templates)")
    p.add_argument("--vo", metavar="VO", help="the VO for the scope templates (site.vo)")
    p.add_argument("--job-scope", action="append", metavar="SCOPE",
                   help="narrower scope the job asks for (must be within site.allowed_scopes)")
    p.add_argument("--job-audience", action="append", metavar="AUD",
                   help="audience the job asks for (must be in site.allowed_audiences)")
    p.add_argument("--json", action="store_true", help="print JSON instead of export lines")
    p.set_defaults(func=_cmd_prepare, token_dir_base=None, on_failure=None, warn_signal=None,
                   warn_before=None, margin=None, metrics_dir=None, log_json=False)

    p = sub.add_parser(
        "revoke",
        help="revoke a job's mytoken (and its children) and delete its token files",
        description="Revoke the job mytoken that 'jobtoken prepare' minted into DIR.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(p)
    p.add_argument("dir", metavar="DIR", help="the job's token directory")
    p.add_argument("--parent-mytoken-file", metavar="FILE",
                   help="revoke by mom_id through this parent (default site.parent_mytoken_file); "
                   "a payload that replaced the job mytoken file keeps no working copy")
    p.add_argument("--mom-id", metavar="ID",
                   help="the job mytoken's mom_id as recorded at prepare (default: job.json's)")
    p.set_defaults(func=_cmd_revoke)

    p = sub.add_parser(
        "check-config",
        help="check this node's jobtoken setup: config, parent mytoken, server, hooks, RTE",
        description="Validate the site config, the parent mytoken file (place, owner, mode, "
        "capabilities, expiry against site.max_walltime_s), the Mytoken server (its discovery "
        "document over verified TLS) and the installed HTCondor hooks and ARC RTE. One line "
        "per check: OK|WARN|FAIL|SKIP what - next step. Never prints a secret and never sends "
        "the parent mytoken anywhere.",
        epilog=CHECK_CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(p)
    add_server_options(p)
    p.add_argument("--parent-mytoken-file", metavar="FILE",
                   help="the parent mytoken to check (default site.parent_mytoken_file)")
    p.add_argument("--offline", action="store_true", help="do not contact the server")
    p.add_argument("--arc-conf", default="/etc/arc.conf", metavar="FILE",
                   help="the ARC CE configuration naming the RTE directory (/etc/arc.conf)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_check_config)

    for name, register in _EXTRA_COMMANDS:
        register(sub, name)
    return parser


# Subcommands defined in their own modules: (name, register(subparsers, name)).
_EXTRA_COMMANDS: List[Any] = [*_batch_commands(), *_broker_commands(),
                               ("install-files", _register_install_files)]


def _setup_logging(verbose: int, quiet: int) -> None:
    setup_logging(verbose, quiet)


def _report_error(exc: BaseException, *, as_json: bool) -> int:
    """The one place a failed command tells its caller; returns the exit code.

    Without ``--json``: one line on stderr. With ``--json``: one JSON object on one line
    on **stdout**, where the result would have been, so a script reads one stream and
    gets JSON either way (``ok`` false, ``error``, ``error_type``, ``retryable``,
    ``exit_code``, and for a server's refusal ``status``, ``oauth_error``,
    ``retry_after_s``); stderr keeps only log lines.
    """
    data = error_summary(exc)
    if not isinstance(exc, (JobtokenError, KeyboardInterrupt)):
        data["error"] = f"internal error: {data['error']} (run with -vv for details)"
    if as_json:
        sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    elif isinstance(exc, JobtokenError):
        sys.stderr.write(f"jobtoken: error: {data['error']}\n")
    else:
        sys.stderr.write(f"jobtoken: {data['error']}\n")
    return int(data["exit_code"])


def _unrecognized(args: argparse.Namespace, extra: List[str]) -> UsageError:
    """The usage error for arguments no option took; for ``run``, how to give a command."""
    if getattr(args, "command", None) == "run" and not extra[0].startswith("-"):
        rest = " ..." if len(extra) > 1 else ""
        return UsageError(
            f"the command to run goes after '--': jobtoken run [OPTIONS] -- {extra[0]}{rest}"
        )
    where = f"jobtoken {args.command}" if getattr(args, "command", None) else "jobtoken"
    return UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{where} --help')")


def _devserver_main() -> Callable[[List[str]], int]:
    """The dev server's own command line. The system packages ship it apart
    (``jobtoken-devserver``): a worker node has no use for a fake Mytoken server."""
    try:
        from .devserver._cli import main as devserver_main
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.devserver":
            raise
        raise UsageError(
            "the dev server is not installed here: install the jobtoken-devserver package"
        ) from None
    return devserver_main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``jobtoken`` command; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    verbose = 0
    # known before parsing, so that a usage error is JSON too; the payload's own --json
    # (after --) is not ours
    as_json = "--json" in args_list[: args_list.index("--") if "--" in args_list else None]
    try:
        if args_list[:1] == ["devserver"]:
            return int(_devserver_main()(args_list[1:]))
        parser = build_parser()
        if not args_list:
            parser.print_help(sys.stderr)
            return ExitCode.USAGE
        payload: List[str] = []
        if "--" in args_list:
            cut = args_list.index("--")
            args_list, payload = args_list[:cut], args_list[cut + 1 :]
        args, extra = parser.parse_known_args(args_list)
        if extra:
            raise _unrecognized(args, extra)
        as_json = bool(getattr(args, "json", False))
        args.payload = payload
        args.may_exec = argv is None  # not a test calling main() in process
        if payload and args.command != "run" and not getattr(args, "takes_payload", False):
            raise UsageError(f"'--' is only used with 'jobtoken run' (got {args.command})")
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return ExitCode.USAGE
        verbose = args.verbose
        _setup_logging(args.verbose, args.quiet)
        if argv is None:  # the real command, not a test calling main() in-process
            from ._hardening import protect_process

            # no core and no /proc/PID/* for others: most commands hold a mytoken; the
            # payload of 'run' inherits the core limit, so 'run' leaves that alone
            protect_process(core_limit=args.command != "run")
        return int(args.func(args))
    except (JobtokenError, KeyboardInterrupt) as exc:
        return _report_error(exc, as_json=as_json)
    except Exception as exc:  # a bug: one line, traceback only when asked for
        if verbose >= 2:
            raise
        return _report_error(exc, as_json=as_json)
