"""The ``jobtoken condor``, ``jobtoken credmon`` and ``jobtoken arc`` subcommands.

This module only builds argument parsers and turns a Namespace into typed calls of
``integrations.condor``, ``condor_storer``, ``condor_credmon`` and ``arc``; ``cli`` adds
them through ``register_commands``. The integrations themselves are library code and
never import the command line.

Must NOT: import htcondor (or anything heavy) at import time: ``jobtoken`` without the
HTCondor bindings installed must keep working, and ``jobtoken run``'s process stays small.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Tuple

from ._cliargs import (
    add_common_options,
    add_server_options,
    add_token_options,
    config_from_args,
    site_config_from_args,
    split_values,
)

if TYPE_CHECKING:
    from ._cliargs import Subparsers
    from ._config import Config

__all__ = ["register_commands"]

logger = logging.getLogger(__name__)


def _hook_logging(what: str = "") -> None:
    """Hooks log their audit trail at INFO to stderr (the StarterLog shows it only at
    D_FULLDEBUG) and, for HTCondor, to the site's audit log (``JOBTOKEN_AUDIT_LOG``)."""
    root = logging.getLogger("jobtoken")
    root.setLevel(min(root.level, logging.INFO))
    if what:
        from .integrations.condor import attach_audit_log, audit_log_dir

        attach_audit_log(what, audit_log_dir())


def _drain_stdin() -> None:
    """Read the job ad the starter writes, to its end: closing early makes the starter log
    a failed write (EPIPE) at its default level for every hook run."""
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except (OSError, ValueError):
        pass


# --- jobtoken condor ... ---------------------------------------------------------------------


def _cmd_prepare_hook(args: argparse.Namespace) -> int:
    from .integrations.condor import HookOptions, broker_socket, run_prepare_hook

    _hook_logging("prepare-hook")
    try:
        config = site_config_from_args(args)
    except Exception as exc:  # a broken site config must hold the job, with its reason
        from ._errors import ConfigError, JobtokenError
        from .integrations.condor import HookResult, hook_status_code

        error = exc if isinstance(exc, JobtokenError) else ConfigError(str(exc))
        sys.stdout.write(
            HookResult(hook_status_code(error), f"jobtoken: {error.message}").classad_text()
        )
        return 0
    options = HookOptions(
        creds_service=args.creds_service,
        require_walltime=args.require_walltime,
        deadline_s=args.deadline,
        broker_socket=broker_socket(),
    )
    try:
        result = run_prepare_hook(config, sys.stdin.read(), env=os.environ, options=options)
    except Exception as exc:  # a bug: hold the job rather than run it without a token
        from .integrations.condor import HookResult

        logger.error("prepare hook internal error: %s: %s", type(exc).__name__, exc)
        result = HookResult(
            1, f"jobtoken: internal error in the prepare hook ({type(exc).__name__})"
        )
    sys.stdout.write(result.classad_text())
    sys.stdout.flush()
    return 0


def _cmd_exit_hook(args: argparse.Namespace) -> int:
    from .integrations.condor import broker_socket, run_exit_hook

    _hook_logging(f"exit-hook:{args.reason}")
    _drain_stdin()  # the job ad is not needed
    run_exit_hook(os.environ, reason=args.reason, timeout_s=args.timeout, broker=broker_socket())
    return 0


def _cmd_update_hook(args: argparse.Namespace) -> int:
    from ._errors import JobtokenError
    from ._tokendir import TokenDir
    from .integrations.condor import (
        TOKEN_DIR_NAME,
        broker_socket,
        publish_broker_chirp,
        publish_chirp,
    )

    _drain_stdin()
    scratch = os.environ.get("_CONDOR_SCRATCH_DIR") or os.getcwd()
    directory = Path(args.dir or Path(scratch) / TOKEN_DIR_NAME)
    if (directory / "job.json").is_file():
        try:
            publish_chirp(TokenDir.existing(directory))
        except JobtokenError as exc:
            logger.warning("update hook: %s", exc.message)
    elif directory.is_dir():
        socket_path = broker_socket()
        if socket_path:
            publish_broker_chirp(directory, socket_path)
    return 0


def _submit_dir(base: Path, expires_at: float) -> Path:
    from ._tokenfile import ensure_private_dir

    ensure_private_dir(base)
    _prune_submit_dirs(base)
    name = f"exp{int(expires_at)}-{os.urandom(4).hex()}"
    return ensure_private_dir(base / name)


def _prune_submit_dirs(base: Path) -> None:
    import time

    for entry in base.iterdir():
        if not entry.name.startswith("exp") or entry.is_symlink() or not entry.is_dir():
            continue
        stamp = entry.name[3:].split("-")[0]
        if stamp.isdigit() and int(stamp) < time.time():
            for child in entry.iterdir():
                try:
                    child.unlink()
                except OSError:
                    pass
            try:
                entry.rmdir()
            except OSError:
                pass


def _cmd_submit(args: argparse.Namespace) -> int:
    from ._tokenfile import write_secret_file
    from .integrations.condor import submit_commands
    from .integrations.condor_storer import find_user_mytoken, mint_submission_mytoken

    config = config_from_args(args)
    source = find_user_mytoken(config, os.environ)
    token = mint_submission_mytoken(
        config,
        source,
        scopes=config.token.scopes,
        audiences=config.token.audiences,
        lifetime_s=args.lifetime,
        max_jobs=args.max_jobs,
        env=os.environ,
    )
    base = Path(
        args.out_dir
        or os.environ.get("JOBTOKEN_SUBMIT_DIR")
        or Path.home() / ".local" / "state" / "jobtoken" / "submit"
    )
    directory = _submit_dir(base, token.expires_at)
    path = directory / "jobtoken_submission.mytoken"
    write_secret_file(path, token.mytoken, newline=False)
    sys.stdout.write(
        submit_commands(
            mytoken_path=str(path.resolve()),
            server_url=token.server_url,
            scopes=token.scopes,
            audiences=token.audiences,
            mom_id=token.mom_id,
            expires_at=token.expires_at,
        )
    )
    return 0


def _config_from_condor(args: argparse.Namespace) -> None:
    """No --config and no $JOBTOKEN_CONFIG: HTCondor's ``JOBTOKEN_CONFIG``, when set.

    condor_submit runs the storer, and condor_master the credmon, without arguments of
    ours; the AP config names the file once for both.
    """
    if args.config or os.environ.get("JOBTOKEN_CONFIG"):
        return
    from .integrations._condor_bindings import condor_param

    args.config = condor_param("JOBTOKEN_CONFIG")


def _cmd_storer(args: argparse.Namespace) -> int:
    from .integrations.condor_storer import run_storer

    sys.stderr.write("\n")  # condor_submit leaves the cursor mid-line
    _config_from_condor(args)
    config = config_from_args(args)
    names = run_storer(config, args.credentials, env=os.environ, lifetime_s=args.lifetime)
    if names:
        sys.stderr.write(f"jobtoken: stored {', '.join(names)}\n")
    return 0


def _cmd_job_wrapper(args: argparse.Namespace) -> int:
    from .integrations.condor import run_job_wrapper

    _hook_logging()  # the job's environment: the audit knob is not visible here
    return run_job_wrapper(list(args.payload), os.environ)


def _register_condor(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="HTCondor hooks, job wrapper support and submit-side helpers",
        description="HTCondor integration: execute-point hooks (prepare-hook, exit-hook, "
        "update-hook) and access-point helpers (submit, storer). See docs/htcondor.md.",
    )
    csub = p.add_subparsers(dest="condor_command", metavar="ACTION", parser_class=type(p))

    h = csub.add_parser("prepare-hook", help="<KEYWORD>_HOOK_PREPARE_JOB: job ad on stdin")
    add_common_options(h)
    add_server_options(h)
    h.add_argument(
        "--creds-service",
        default="jobtoken",
        metavar="NAME",
        help="look for $_CONDOR_CREDS/NAME.use (default jobtoken)",
    )
    h.add_argument(
        "--require-walltime",
        action="store_true",
        help="hold jobs whose ad has no wall time (default: use site default)",
    )
    h.add_argument(
        "--deadline",
        type=float,
        default=120.0,
        metavar="S",
        help="give up (requeue) after S seconds in all (default 120)",
    )
    h.set_defaults(func=_cmd_prepare_hook)

    h = csub.add_parser("exit-hook", help="<KEYWORD>_HOOK_JOB_EXIT: revoke and clean up")
    add_common_options(h)
    h.add_argument("reason", nargs="?", default="exit", help="exit, remove, hold or evict")
    h.add_argument(
        "--timeout",
        type=float,
        default=25.0,
        metavar="S",
        help="give up revoking after S seconds (HTCondor waits 30)",
    )
    h.set_defaults(func=_cmd_exit_hook)

    h = csub.add_parser(
        "update-hook", help="<KEYWORD>_HOOK_UPDATE_JOB_INFO: token status into the job ad (Chirp)"
    )
    add_common_options(h)
    h.add_argument("--dir", metavar="DIR", help="token directory (default scratch/.jobtoken)")
    h.set_defaults(func=_cmd_update_hook)

    h = csub.add_parser(
        "job-wrapper",
        help="USER_JOB_WRAPPER for a job that asked: start the sidecar, exec the job",
        description="Run by condor/jobtoken-job-wrapper for jobs with HookKeyword JOBTOKEN: "
        "a valid token and a renewal sidecar, then the job in this process. Settings come "
        "from the token directory only, never from the job's environment.",
    )
    add_common_options(h)
    h.set_defaults(func=_cmd_job_wrapper, takes_payload=True)  # -- the job's argv

    h = csub.add_parser(
        "submit",
        help="for 'include command : jobtoken condor submit ...' in a submit file",
        description="Mint a per-submission mytoken from yours, keep it in a private file and "
        "print submit commands that send it with each job, encrypted. Put the include line "
        "after your own transfer_input_files.",
    )
    add_common_options(h)
    add_server_options(h)
    add_token_options(h)
    h.add_argument(
        "--lifetime",
        type=float,
        default=7 * 24 * 3600.0,
        metavar="S",
        help="the submission mytoken's lifetime (default 7 days)",
    )
    h.add_argument(
        "--max-jobs",
        type=int,
        metavar="N",
        help="at most N jobs can mint their job token from it (usages_other)",
    )
    h.add_argument(
        "--out-dir", metavar="DIR", help="where to keep it (default ~/.local/state/jobtoken/submit)"
    )
    h.set_defaults(func=_cmd_submit)

    h = csub.add_parser("storer", help="SEC_CREDENTIAL_STORER program (run by condor_submit)")
    add_common_options(h)
    add_server_options(h)
    h.add_argument(
        "credentials",
        nargs="*",
        metavar="SERVICE&...",
        help="service[&handle=H][&scopes=S][&audience=A] as condor_submit passes",
    )
    h.add_argument("--lifetime", type=float, default=7 * 24 * 3600.0, metavar="S")
    h.set_defaults(
        func=_cmd_storer,
        scope=None,
        audience=None,
        mytoken_file=None,
        mytoken_env=None,
        trusted_issuer=None,
    )


# --- jobtoken credmon ---------------------------------------------------------------------------


def _cmd_credmon(args: argparse.Namespace) -> int:
    from ._errors import ConfigError, JobtokenError
    from ._logs import file_handler
    from .integrations.condor_credmon import (
        LOG_KNOB,
        credmon_log_path,
        credmon_settings,
        default_cred_dir,
        run_credmon,
        tell_master_ready,
        token_minter,
    )

    root = logging.getLogger("jobtoken")
    root.setLevel(min(root.level, logging.INFO))
    log_path = args.log_file or credmon_log_path()
    handler = None
    if log_path and log_path != "-":
        try:
            handler = file_handler(log_path)
            root.addHandler(handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot open the credmon log {log_path}: {exc.strerror} "
                f"(choose another with {LOG_KNOB} or --log-file)"
            ) from None
    try:
        _config_from_condor(args)
        config = config_from_args(args)
        site = credmon_settings()
        cred_dir = Path(args.cred_dir) if args.cred_dir else default_cred_dir()
        primary = site["primary"] if args.role == "auto" else args.role == "primary"
        services = tuple(args.service or site["services"])
        logger.info("credmon starting cred_dir=%s role=%s services=%s", cred_dir,
                    "primary" if primary else "guest", ",".join(services))
        return run_credmon(
            cred_dir,
            mint=token_minter(config),
            interval_s=args.interval,
            once=args.once,
            services=services,
            primary=primary,
            min_remaining_s=site["starter_refresh_s"] + args.interval + 60.0,
            on_ready=tell_master_ready,
        )
    except JobtokenError as exc:  # condor_master records only the exit code: say why here
        if handler is not None:  # (stderr gets the error line from cli.main)
            handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0,
                                             "credmon stopped: %s", (exc.message,), None))
        raise


def _register_credmon(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="access-point credmon: keep an access token in each jobtoken .use",
        description="Scan SEC_CREDENTIAL_DIRECTORY_OAUTH; for every jobtoken <user>/<name>.top "
        "(the per-submission mytoken) keep <name>.use holding a fresh access token; rescan "
        "on SIGHUP or when a .top changes. See docs/htcondor-ap.md.",
    )
    add_common_options(p)
    add_server_options(p)
    p.add_argument(
        "--cred-dir",
        metavar="DIR",
        help="credential directory (default SEC_CREDENTIAL_DIRECTORY_OAUTH)",
    )
    p.add_argument("--interval", type=float, default=60.0, metavar="S", help="rescan period")
    p.add_argument("--once", action="store_true", help="scan once and exit")
    p.add_argument(
        "--service",
        action="append",
        metavar="NAME",
        help="credentials of this service are ours (default JOBTOKEN_SERVICES or jobtoken)",
    )
    p.add_argument(
        "--role",
        choices=("auto", "primary", "guest"),
        default="auto",
        help="primary writes <cred dir>/pid and CREDMON_COMPLETE; guest leaves them to the "
        "site's CREDMON_OAUTH (auto: guest when DAEMON_LIST has CREDMON_OAUTH)",
    )
    p.add_argument("--log-file", metavar="FILE",
                   help="log here (default: HTCondor's JOBTOKEN_CREDMON_LOG, else "
                   "$(LOG)/JobtokenCredmonLog; -: stderr only)")
    p.set_defaults(
        func=_cmd_credmon, scope=None, audience=None, mytoken_file=None, mytoken_env=None
    )


# --- jobtoken arc ... -------------------------------------------------------------------------


def _arcsite_config_from_args(args: argparse.Namespace) -> Config:
    """Site settings for the CE-side commands, with the RTE's robot mytoken file."""
    from dataclasses import replace

    config = site_config_from_args(args)
    if args.parent_mytoken_file:
        config = replace(
            config, site=replace(config.site, parent_mytoken_file=args.parent_mytoken_file)
        )
    return config


def _cmd_arc_stage0(args: argparse.Namespace) -> int:
    from .integrations.arc import audit_lines_on_success, stage0

    _hook_logging()
    config = _arcsite_config_from_args(args)
    # joboption_* are shell variables of ARC's submit script, not exported: the RTE passes them
    grami = {
        "joboption_directory": args.session_dir,
        "joboption_gridid": args.job_id,
        "joboption_walltime": args.walltime or "",
    }
    with audit_lines_on_success():
        stage0(
            config,
            grami,
            scope_templates=args.scope_template or (),
            audiences=split_values(args.job_audience) or (),
            vo=args.vo,
        )
    return 0


def _cmd_arc_relocate(args: argparse.Namespace) -> int:
    from .integrations.arc import relocate

    relocate(Path(args.dir))
    return 0


def _cmd_arc_stage2(args: argparse.Namespace) -> int:
    from .integrations.arc import stage2

    _hook_logging()
    stage2(Path(args.dir), timeout_s=args.timeout)
    return 0


def _cmd_arc_end(args: argparse.Namespace) -> int:
    from .integrations.arc import end

    _hook_logging()
    end(_arcsite_config_from_args(args), args.job_id)
    return 0


def _register_arc(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="ARC-CE runtime environment stages (wrappers/arc/ENV/JOBTOKEN)",
        description="Called by the ENV/JOBTOKEN RTE. See docs/arc.md.",
    )
    asub = p.add_subparsers(dest="arc_command", metavar="STAGE", parser_class=type(p))
    h = asub.add_parser("stage0", help="CE front end: mint the job mytoken into the session dir")
    add_common_options(h)
    add_server_options(h)
    h.add_argument("--session-dir", required=True, metavar="DIR", help="$joboption_directory")
    h.add_argument("--job-id", required=True, metavar="ID", help="$joboption_gridid")
    h.add_argument("--walltime", metavar="S", help="$joboption_walltime (seconds; may be empty)")
    h.add_argument("--parent-mytoken-file", metavar="FILE", help="the CE's robot/VO mytoken")
    h.add_argument(
        "--scope-template",
        action="append",
        metavar="TEMPLATE",
        help="e.g. storage.create:/{vo}/jobs/{job_id} (repeatable)",
    )
    h.add_argument("--job-audience", action="append", metavar="AUD", help="token audience")
    h.add_argument("--vo", metavar="VO")
    h.set_defaults(func=_cmd_arc_stage0)
    h = asub.add_parser("relocate", help="worker node: adopt a moved session directory")
    add_common_options(h)
    h.add_argument("--dir", required=True, metavar="DIR")
    h.set_defaults(func=_cmd_arc_relocate)
    h = asub.add_parser("stage2", help="worker node: stop the sidecar, revoke, clean up")
    add_common_options(h)
    h.add_argument("--dir", required=True, metavar="DIR")
    h.add_argument("--timeout", type=float, default=25.0, metavar="S")
    h.set_defaults(func=_cmd_arc_stage2)
    h = asub.add_parser(
        "end", help="CE (A-REX statecallout FINISHED): revoke a job mytoken left live"
    )
    add_common_options(h)
    add_server_options(h)
    h.add_argument("--job-id", required=True, metavar="ID", help="%%I of the statecallout")
    h.add_argument("--parent-mytoken-file", metavar="FILE", help="the CE's robot/VO mytoken")
    h.set_defaults(func=_cmd_arc_end)


def register_commands() -> List[Tuple[str, Callable[[Any, str], None]]]:
    """The subcommands this package adds, as ``(name, register(subparsers, name))``."""
    return [("condor", _register_condor), ("credmon", _register_credmon), ("arc", _register_arc)]
