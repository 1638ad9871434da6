"""The command-line options several subcommands share, and the ``Config`` built from them.

Both ``cli`` and ``_batchcommands`` (the HTCondor and ARC subcommands) build their parsers
from these, so a flag means the same everywhere and is spelled once.

Must NOT: import ``cli`` or anything heavy; the library never imports this module.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ._config import Config, load_config

if TYPE_CHECKING:
    #: what ``add_subparsers`` returns: each command module registers its parsers there
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = [
    "add_common_options",
    "add_server_options",
    "add_token_options",
    "config_from_args",
    "site_config_from_args",
    "split_values",
]


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="count", default=0,
                   help="errors only: no warnings, no confirmations")
    p.add_argument("--config", metavar="FILE", help="config file (default $JOBTOKEN_CONFIG)")


def add_server_options(p: argparse.ArgumentParser) -> None:
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
    g.add_argument(
        "--server-deadline",
        type=float,
        metavar="S",
        help="overall limit for all server requests of this command "
        "(default 120; 0: none; $JOBTOKEN_DEADLINE)",
    )


def add_token_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("token")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--mytoken-file", metavar="FILE", help="file holding the mytoken")
    src.add_argument(
        "--mytoken-env",
        metavar="VAR",
        help="environment variable holding the mytoken (run copies it to a private file and "
        "wipes it from its own environment, /proc/PID/environ included; a file is still "
        "safer: a variable may have been copied before jobtoken started)",
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


def split_values(values: Optional[List[str]]) -> Optional[List[str]]:
    """Repeated options whose values may each hold several words; None: not given."""
    if not values:
        return None
    return [part for v in values for part in v.split() if part]


def _server_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``[server]`` settings the options of ``add_server_options`` give (None: not given)."""
    return {
        "url": getattr(args, "server", None),
        "ca_file": getattr(args, "ca_file", None),
        "ca_dir": getattr(args, "ca_dir", None),
        "allow_http": getattr(args, "allow_http", None),
        "timeout_s": getattr(args, "timeout", None),
        "deadline_s": getattr(args, "server_deadline", None),
    }


def config_from_args(args: argparse.Namespace) -> Config:
    """Settings from the config file, ``JOBTOKEN_*`` variables and the command line."""
    overrides: Dict[str, Dict[str, Any]] = {
        "server": _server_overrides(args),
        "token": {
            "scopes": split_values(getattr(args, "scope", None)),
            "audiences": split_values(getattr(args, "audience", None)),
            "mytoken_file": getattr(args, "mytoken_file", None),
            "mytoken_env": getattr(args, "mytoken_env", None),
            "trusted_issuers": split_values(getattr(args, "trusted_issuer", None)),
        },
    }
    # a mytoken source on the command line replaces whichever source the config named
    if overrides["token"]["mytoken_file"]:
        overrides["token"]["mytoken_env"] = ""
    elif overrides["token"]["mytoken_env"]:
        overrides["token"]["mytoken_file"] = ""
    return load_config(args.config, overrides=overrides)


def site_config_from_args(args: argparse.Namespace) -> Config:
    """Settings for code that runs with the *job's* environment (hooks, RTE stage 0).

    ``JOBTOKEN_*`` variables are ignored there: the job chooses its environment, and a
    job that could set ``JOBTOKEN_SERVER`` would get the site's mytoken sent to its server.
    Only the command line (the hook's ``_ARGS`` knob) and the config file count.
    """
    overrides: Dict[str, Dict[str, Any]] = {
        "server": _server_overrides(args),
        "token": {"audiences": split_values(getattr(args, "audience", None))},
    }
    return load_config(args.config, env={}, overrides=overrides)
