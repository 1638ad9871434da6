"""The ``jobtoken broker`` subcommands: ``serve`` the node broker, and its clients.

This module only builds argument parsers and turns a Namespace into calls of ``_broker``
(``serve``) or ``_brokerclient`` (the rest); ``cli`` adds them through
``register_commands``. The client commands stay light: they import neither httpx nor
the broker, and read no config file (the socket comes from ``--socket`` or
``$JOBTOKEN_BROKER_SOCKET``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import Any, Callable, Dict, List, Tuple

from ._cliargs import add_common_options, split_values

__all__ = ["register_commands"]


def _client(args: argparse.Namespace) -> Any:
    from ._brokerclient import BrokerClient

    return BrokerClient(args.socket, timeout_s=args.timeout)


def _print(args: argparse.Namespace, reply: Any, text: str) -> int:
    if args.json:
        data: Dict[str, Any] = {"ok": reply.ok, "message": reply.message,
                                "expires_at": reply.expires_at, "job_id": reply.job_id,
                                "bearer_token_file": reply.bearer_token_file,
                                "detail": dict(reply.detail)}
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        from ._errors import printable

        sys.stdout.write(printable(text) + "\n")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ._broker import serve
    from ._cliargs import config_from_args
    from ._config import _apply
    from ._errors import JobtokenError

    root = logging.getLogger("jobtoken")
    if args.log_file:  # first: under condor_master stderr is /dev/null, the file is all
        _log_to_file(args)
    elif not args.quiet:
        root.setLevel(min(root.level, logging.INFO))  # a daemon's log is its audit trail
    try:
        config = config_from_args(args)
        config = _apply(config, "broker", {k: v for k, v in {
            "socket": args.socket, "state_dir": args.state_dir}.items() if v}, "command line")
        return serve(config)
    except Exception as exc:
        if args.log_file:  # stderr gets the CLI's one line; the file must say why too
            why = exc.message if isinstance(exc, JobtokenError) \
                else f"internal error {type(exc).__name__}: {exc}"
            record = root.makeRecord(root.name, logging.ERROR, __file__, 0,
                                     "broker cannot run: %s", (why,), None)
            for handler in root.handlers:
                if isinstance(handler, logging.FileHandler):
                    handler.handle(record)
        raise


def _log_to_file(args: argparse.Namespace) -> None:
    """The broker's events (INFO and up) go to ``--log-file``, stderr keeps the user's
    level: a file reopened after logrotate renames it, never opened through a symlink.

    Raises:
        ConfigError: the file cannot be opened (exit 78, before the broker starts).
    """
    from ._errors import ConfigError
    from ._logsetup import log_to_file

    try:
        log_to_file(args.log_file, log_json=False, verbose=args.verbose, quiet=args.quiet)
    except OSError as exc:
        raise ConfigError(f"cannot open the broker log {args.log_file}: {exc.strerror} "
                          "(choose another with --log-file)") from None


def _cmd_prepare(args: argparse.Namespace) -> int:
    reply = _client(args).prepare(args.dir, scopes=split_values(args.scope) or (),
                                  audiences=split_values(args.audience) or ())
    return _print_environment(args, reply)


def _cmd_adopt(args: argparse.Namespace) -> int:
    return _print_environment(args, _client(args).adopt(args.dir, args.anchor_pid))


def _print_environment(args: argparse.Namespace, reply: Any) -> int:
    """What the payload's environment gains (shell ``export`` lines), or the JSON reply."""
    if args.json:
        return _print(args, reply, "")
    env = {"BEARER_TOKEN_FILE": reply.bearer_token_file or "",
           "JOBTOKEN_DIR": os.path.dirname(reply.bearer_token_file or "")}
    for key, value in env.items():
        sys.stdout.write(f"export {key}={shlex.quote(value)}\n")
    return 0


def _cmd_ensure(args: argparse.Namespace) -> int:
    from ._clock import SystemClock

    reply = _client(args).ensure(args.min_valid)
    left = int((reply.expires_at or 0.0) - SystemClock().now())
    return _print(args, reply, f"token valid for {left} s"
                  + (" (renewed)" if reply.detail.get("renewed") else ""))


def _cmd_status(args: argparse.Namespace) -> int:
    reply = _client(args).status(args.job_id)
    detail = dict(reply.detail)
    lines = [f"{reply.job_id or 'node'}: {reply.message}"]
    lines += [f"  {k}: {v}" for k, v in sorted(detail.items()) if v is not None]
    if reply.expires_at:
        lines.append(f"  expires_at: {reply.expires_at:.0f}")
    return _print(args, reply, "\n".join(lines))


def _cmd_release(args: argparse.Namespace) -> int:
    reply = _client(args).release(args.job_id)
    return _print(args, reply, reply.message)


def _cmd_register(args: argparse.Namespace) -> int:
    job: Dict[str, Any] = {"job_id": args.job_id, "uid": args.uid, "anchor_pid": args.anchor_pid}
    if args.walltime is not None:
        job["walltime_s"] = args.walltime
    for key, value in (("owner", args.owner), ("vo", args.vo)):
        if value:
            job[key] = value
    if args.scope:
        job["scopes"] = split_values(args.scope)
    if args.audience:
        job["audiences"] = split_values(args.audience)
    reply = _client(args).register(job)
    return _print(args, reply, reply.message)


def _cmd_ping(args: argparse.Namespace) -> int:
    reply = _client(args).ping()
    return _print(args, reply, reply.message)


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    p.add_argument("--socket", metavar="PATH",
                   help="the broker's socket ($JOBTOKEN_BROKER_SOCKET, /run/jobtoken/broker.sock)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="how long to wait for the broker's answer (120)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _register_broker(sub: Any, name: str) -> None:
    from ._cliargs import add_server_options

    broker = sub.add_parser(
        name, help="the node broker: one service per node holds the mytokens, jobs get tokens",
        description="The node token broker (docs/broker.md): 'serve' runs it; the other "
        "subcommands ask it over its Unix socket.")
    commands = broker.add_subparsers(dest="broker_command", metavar="COMMAND",
                                     parser_class=type(broker))

    def usage(args: argparse.Namespace) -> int:
        broker.print_help(sys.stderr)
        return 2

    broker.set_defaults(func=usage, verbose=0, quiet=0)
    p = commands.add_parser("serve", help="run the broker (root or a service account)")
    add_common_options(p)
    add_server_options(p)
    p.add_argument("--socket", metavar="PATH", help="listen here (broker.socket)")
    p.add_argument("--state-dir", metavar="DIR", help="keep the mytokens here (broker.state_dir)")
    p.add_argument("--log-file", metavar="FILE",
                   help="log events here (reopened after logrotate); stderr then shows "
                   "warnings only (-v: more)")
    p.set_defaults(func=_cmd_serve)

    p = commands.add_parser("prepare", help="mint this job's mytoken and write its first token")
    _client_options(p)
    p.add_argument("--dir", required=True, metavar="DIR",
                   help="the job's token directory (owned by the job's uid, mode 0700)")
    p.add_argument("--scope", action="append", metavar="S", help="narrower scope (repeatable)")
    p.add_argument("--audience", action="append", metavar="A", help="audience (repeatable)")
    p.set_defaults(func=_cmd_prepare)

    p = commands.add_parser(
        "adopt", help="hand this job's mytoken (in DIR, e.g. ARC's stage 0) to the broker",
        description="The broker takes the job mytoken and job.json from DIR (owned by the "
        "caller's uid), removes every mytoken from DIR, and renews the job's token into "
        "DIR/bt until the anchor process ends or 'release' (docs/broker.md). Only a broker "
        "with broker.adopt = true accepts it.")
    _client_options(p)
    p.add_argument("--dir", required=True, metavar="DIR",
                   help="the job's token directory holding its mytoken and job.json")
    p.add_argument("--anchor-pid", type=int, metavar="PID",
                   help="the process whose end is the job's end: this command or one of its "
                   "ancestors of the same uid (default: its parent, e.g. the job script)")
    p.set_defaults(func=_cmd_adopt)

    p = commands.add_parser("ensure", help="make sure this job's token is valid S more seconds")
    _client_options(p)
    p.add_argument("--min-valid", type=float, default=0.0, metavar="S")
    p.set_defaults(func=_cmd_ensure)

    for what, func, text in (("status", _cmd_status, "this job's (or the node's) state"),
                             ("release", _cmd_release, "end this job: revoke its mytoken")):
        p = commands.add_parser(what, help=text)
        _client_options(p)
        p.add_argument("--job-id", metavar="ID", help="a job by id (root or the broker's uid)")
        p.set_defaults(func=func)

    p = commands.add_parser("register", help="describe a job to the broker (root or its uid)")
    _client_options(p)
    p.add_argument("--job-id", required=True, metavar="ID")
    p.add_argument("--uid", required=True, type=int, metavar="UID", help="the job's uid")
    p.add_argument("--anchor-pid", required=True, type=int, metavar="PID",
                   help="the process whose end is the job's end")
    p.add_argument("--walltime", type=float, metavar="S")
    p.add_argument("--owner", metavar="USER")
    p.add_argument("--vo", metavar="VO")
    p.add_argument("--scope", action="append", metavar="S",
                   help="the most the job may have (repeatable)")
    p.add_argument("--audience", action="append", metavar="A")
    p.set_defaults(func=_cmd_register)

    p = commands.add_parser("ping", help="is the broker there?")
    _client_options(p)
    p.set_defaults(func=_cmd_ping)


def register_commands() -> List[Tuple[str, Callable[[Any, str], None]]]:
    """The subcommands this module adds, as ``(name, register(subparsers, name))``."""
    return [("broker", _register_broker)]
