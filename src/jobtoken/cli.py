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
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import __version__
from ._config import Config, load_config
from ._errors import ExitCode, JobtokenError, UsageError, exit_code_for

__all__ = ["main"]

logger = logging.getLogger("jobtoken")

EXIT_CODES_HELP = """exit codes:
  0    success
  2    usage error (bad command line)
  65   access token refused by jobtoken's checks (expired, wider scope, wrong audience)
  69   credentials lost: the token expired and renewal kept failing (run: payload stopped)
  74   a token file could not be read or written
  75   Mytoken server unavailable (5xx, 429, timeout, network): retrying later can help
  76   Mytoken server answered garbage (protocol error): retrying later can help
  77   mytoken rejected (revoked, expired, restricted, lacking a capability): permanent
  78   configuration error (config file, variables, mytoken file)
  126  payload cannot be executed; 127 payload not found
  run: otherwise the payload's own exit status, or death by the same signal"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, our exit code for usage
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    p.add_argument("--config", metavar="FILE", help="config file (default $JOBTOKEN_CONFIG)")


def _server_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--server", metavar="URL", help="Mytoken server URL ($JOBTOKEN_SERVER)")
    g.add_argument("--ca-file", metavar="FILE", help="CA bundle to verify the server")
    g.add_argument("--ca-dir", metavar="DIR", help="CA directory (default $X509_CERT_DIR)")
    g.add_argument(
        "--allow-http",
        action="store_true",
        default=None,
        help="allow plain http, to a loopback address only (dev server)",
    )
    g.add_argument("--timeout", type=float, metavar="S", help="per-request timeout in seconds")


def _token_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("token")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--mytoken-file", metavar="FILE", help="file holding the mytoken")
    src.add_argument(
        "--mytoken-env", metavar="VAR", help="environment variable holding the mytoken"
    )
    g.add_argument(
        "--scope", action="append", metavar="SCOPE", help="requested scope (repeatable)"
    )
    g.add_argument(
        "--audience", action="append", metavar="AUD", help="requested audience (repeatable)"
    )
    g.add_argument(
        "--trusted-issuer",
        action="append",
        metavar="URL",
        help="verify the token's signature against this issuer's JWKS (repeatable)",
    )


def _split(values: Optional[List[str]]) -> Optional[List[str]]:
    if not values:
        return None
    return [part for v in values for part in v.split() if part]


def _config_from(args: argparse.Namespace) -> Config:
    overrides: Dict[str, Dict[str, Any]] = {
        "server": {
            "url": getattr(args, "server", None),
            "ca_file": getattr(args, "ca_file", None),
            "ca_dir": getattr(args, "ca_dir", None),
            "allow_http": getattr(args, "allow_http", None),
            "timeout_s": getattr(args, "timeout", None),
        },
        "token": {
            "scopes": _split(getattr(args, "scope", None)),
            "audiences": _split(getattr(args, "audience", None)),
            "mytoken_file": getattr(args, "mytoken_file", None),
            "mytoken_env": getattr(args, "mytoken_env", None),
            "trusted_issuers": _split(getattr(args, "trusted_issuer", None)),
        },
    }
    # a mytoken source on the command line replaces whichever source the config named
    if overrides["token"]["mytoken_file"]:
        overrides["token"]["mytoken_env"] = ""
    elif overrides["token"]["mytoken_env"]:
        overrides["token"]["mytoken_file"] = ""
    return load_config(args.config, overrides=overrides)


def _emit(args: argparse.Namespace, data: Dict[str, Any], human: Callable[[], str]) -> None:
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(human() + "\n")


# --- subcommands -----------------------------------------------------------------------------


def _cmd_token(args: argparse.Namespace) -> int:
    from ._actions import get_token

    cfg = _config_from(args)
    if args.min_valid is not None:
        from dataclasses import replace

        cfg = replace(cfg, token=replace(cfg.token, min_valid_s=args.min_valid))
    result = get_token(cfg, out=args.out)
    _emit(args, result.summary(), result.human)
    return ExitCode.OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ._actions import inspect_token

    summary = inspect_token(args.file)
    _emit(args, summary, lambda: _human_inspect(summary))
    return ExitCode.OK


def _human_inspect(s: Dict[str, Any]) -> str:
    lines = [f"source:    {s['source']}"]
    for key in ("iss", "sub", "jti", "aud", "scope", "wlcg.ver", "alg", "kid"):
        value = s.get(key)
        if isinstance(value, list):
            value = " ".join(value)
        lines.append(f"{key + ':':<10} {value if value is not None else '-'}")
    lines.append(f"{'exp:':<10} {s.get('exp_utc')} ({s.get('remaining_human')})")
    return "\n".join(lines)


def _cmd_devserver(args: argparse.Namespace) -> int:
    from .devserver._cli import main as devserver_main

    return int(devserver_main(list(args.devserver_args)))


def _cmd_passthrough(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        module = __import__(f"jobtoken._cmd_{name}", fromlist=["main"])
        return int(module.main(args))

    return run


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
    _common(p)
    _server_options(p)
    _token_options(p)
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
    p.add_argument("--json", action="store_true", help="print a JSON summary (never the token)")
    p.set_defaults(func=_cmd_token)

    p = sub.add_parser(
        "inspect",
        help="show an access token's claims (never the token)",
        description="Show the claims, scopes and remaining lifetime of an access token. "
        "Without FILE, the token WLCG bearer-token discovery finds.",
    )
    _common(p)
    p.add_argument("file", nargs="?", help="token file (default: WLCG discovery)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "devserver",
        help="run the embedded Mytoken-compatible dev server (development and tests only)",
        add_help=False,
    )
    p.add_argument("devserver_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_devserver, verbose=0, quiet=0)

    for name, register in _EXTRA_COMMANDS:
        register(sub, name)
    return parser


# Commands added by later modules register here: (name, register(subparsers, name)).
_EXTRA_COMMANDS: List[Any] = []


def _setup_logging(verbose: int, quiet: int) -> None:
    level = max(logging.DEBUG, min(logging.CRITICAL, logging.WARNING - 10 * (verbose - quiet)))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("jobtoken: %(message)s"))
    root = logging.getLogger("jobtoken")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``jobtoken`` command; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    verbose = 0
    try:
        parser = build_parser()
        if not args_list:
            parser.print_help(sys.stderr)
            return ExitCode.USAGE
        args = parser.parse_args(args_list)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return ExitCode.USAGE
        verbose = args.verbose
        _setup_logging(args.verbose, args.quiet)
        return int(args.func(args))
    except JobtokenError as exc:
        sys.stderr.write(f"jobtoken: error: {exc.message}\n")
        return exit_code_for(exc)
    except KeyboardInterrupt:
        sys.stderr.write("jobtoken: interrupted\n")
        return 130
    except Exception as exc:  # a bug: one line, traceback only when asked for
        if verbose >= 2:
            raise
        sys.stderr.write(
            f"jobtoken: internal error: {type(exc).__name__} (run with -vv for details)\n"
        )
        return ExitCode.ERROR

