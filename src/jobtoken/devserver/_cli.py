"""``jobtoken devserver``: run the development Mytoken server, or steer a running one.

Must NOT: print or log a token (the parent mytoken only goes to ``--mytoken-out``, 0600),
or be presented as anything but a development and test tool.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import ssl
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import httpx

from .._errors import ConfigError, JobtokenError, UsageError, exit_code_for
from .._tokenfile import ensure_private_dir, read_secret_file
from .._tokenfile import write_file_atomically as write_private_file
from ._config import AT_ALGORITHMS, DEFAULT_OP_SCOPES, MT_ALGORITHMS, DevServerConfig
from ._faults import ENDPOINTS
from ._issuer import TOKEN_FAULTS
from ._server import DEFAULT_CAPABILITIES, DevServer

__all__ = ["build_parser", "main", "serve"]

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "DEVELOPMENT AND TEST TOOL. Runs a local, in-memory Mytoken API v0 server that is also "
    "the OIDC token issuer (OP) signing WLCG access tokens with throwaway keys. Never use it "
    "to protect real data; it binds loopback only unless --force-remote is given. Every "
    "local user can reach a loopback port, and whoever listens on it receives the mytokens "
    "clients send: on a shared machine use --tls-dir (clients then verify its CA). Faults are "
    "injected only by its owner: 'serve' writes a secret to a 0600 control file that "
    "'fault' reads."
)


def _rate_limit(value: str) -> Tuple[int, float]:
    try:
        count, window = value.split("/", 1)
        return int(count), float(window)
    except ValueError:
        raise argparse.ArgumentTypeError("expected N/WINDOW_SECONDS, e.g. 100/300") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobtoken devserver", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command")

    serve_p = sub.add_parser("serve", help="run the dev server (default)", description=DESCRIPTION)
    serve_p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve_p.add_argument("--port", type=int, default=0, help="port (default 0: pick a free one)")
    serve_p.add_argument("--tls-dir", help="serve HTTPS; write a throwaway CA (ca.pem) here")
    serve_p.add_argument("--at-lifetime", type=int, default=1200, metavar="SECONDS")
    serve_p.add_argument("--at-alg", choices=AT_ALGORITHMS, default="RS256")
    serve_p.add_argument("--mt-alg", choices=MT_ALGORITHMS, default="ES512")
    serve_p.add_argument("--audience", default=None, help="default AT audience")
    serve_p.add_argument("--subject", default="dev-user")
    serve_p.add_argument(
        "--op-scope",
        action="append",
        default=None,
        help="a scope the OP allows (repeatable; storage.* paths cover sub-paths)",
    )
    serve_p.add_argument("--rate-limit", type=_rate_limit, metavar="N/WINDOW")
    serve_p.add_argument(
        "--max-mytoken-lifetime", type=int, default=0, metavar="SECONDS",
        help="the provider's maximum mytoken lifetime (0: none), enforced as the real server",
    )
    serve_p.add_argument("--mytoken-out", metavar="FILE", help="write the parent mytoken (0600)")
    serve_p.add_argument("--parent-scope", action="append", default=[], metavar="SCOPE")
    serve_p.add_argument("--parent-audience", action="append", default=[], metavar="AUD")
    serve_p.add_argument("--parent-capability", action="append", default=[], metavar="CAP")
    serve_p.add_argument("--parent-usages-at", type=int, default=None, metavar="N")
    serve_p.add_argument("--parent-lifetime", type=int, default=None, metavar="SECONDS")
    serve_p.add_argument("--url-file", metavar="FILE", help="write the base URL once listening")
    serve_p.add_argument(
        "--control-file",
        metavar="FILE",
        help="write the control secret here (0600; default: a per-user file named after the "
        "URL, which 'fault' finds by itself)",
    )
    serve_p.add_argument(
        "--force-remote", action="store_true", help="allow a non-loopback --host (dangerous)"
    )

    fault_p = sub.add_parser(
        "fault",
        help="inject or clear faults in a running dev server (yours: needs its control file)",
        description="DEVELOPMENT AND TEST TOOL. Steer a dev server started by you.",
    )
    fault_p.add_argument("--url", required=True, help="dev server base URL")
    fault_p.add_argument("--control-file", metavar="FILE", help="the server's control file")
    fault_p.add_argument("--ca-file", help="CA bundle for an HTTPS dev server")
    fault_p.add_argument("--clear", action="store_true", help="remove all faults")
    fault_p.add_argument("--endpoint", choices=ENDPOINTS)
    fault_p.add_argument("--status", type=int)
    fault_p.add_argument("--error", help="OAuth/Mytoken error code for a JSON error body")
    fault_p.add_argument("--error-description")
    fault_p.add_argument("--body", help="literal response body")
    fault_p.add_argument("--count", type=int, help="affect only the next N requests")
    fault_p.add_argument("--for", dest="for_s", type=float, metavar="SECONDS")
    fault_p.add_argument("--delay", dest="delay_s", type=float, default=0.0, metavar="SECONDS")
    fault_p.add_argument("--retry-after", dest="retry_after_s", type=float, metavar="SECONDS")
    fault_p.add_argument("--drop", action="store_true", help="close without answering")
    fault_p.add_argument("--garbage", action="store_true", help="answer with non-JSON")
    fault_p.add_argument("--token", choices=TOKEN_FAULTS, help="mint a broken access token")
    fault_p.add_argument(
        "--process", action="store_true", help="let the request take effect, then break answer"
    )
    return parser


def _config_from(args: argparse.Namespace) -> DevServerConfig:
    kwargs: Dict[str, Any] = dict(
        host=args.host,
        port=args.port,
        tls_dir=args.tls_dir,
        at_lifetime_s=args.at_lifetime,
        at_alg=args.at_alg,
        mt_alg=args.mt_alg,
        subject=args.subject,
        op_scopes=tuple(args.op_scope) if args.op_scope else DEFAULT_OP_SCOPES,
        rate_limit=args.rate_limit,
        max_mytoken_lifetime_s=args.max_mytoken_lifetime,
        allow_remote=args.force_remote,
    )
    if args.audience:
        kwargs["default_audience"] = args.audience
    return DevServerConfig(**kwargs)


def _parent_restrictions(args: argparse.Namespace, now: float) -> List[Dict[str, Any]]:
    entry: Dict[str, Any] = {}
    if args.parent_scope:
        entry["scope"] = " ".join(args.parent_scope)
    if args.parent_audience:
        entry["audience"] = list(args.parent_audience)
    if args.parent_usages_at is not None:
        entry["usages_AT"] = args.parent_usages_at
    if args.parent_lifetime is not None:
        entry["exp"] = int(now) + args.parent_lifetime
    return [entry] if entry else []


def control_file_for(url: str) -> str:
    """The default control file of the dev server at ``url``, in a private per-user place."""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(os.path.expanduser("~"), ".cache")
    where = httpx.URL(url)
    name = f"{where.scheme}_{where.host}_{where.port}.control".replace(":", "_")
    return os.path.join(base, "jobtoken-devserver", name)


def serve(args: argparse.Namespace, stop: threading.Event) -> int:
    """Run until ``stop`` is set.

    Raises:
        JobtokenError: bad settings, bind failure, or unwritable output files.
    """
    with DevServer(_config_from(args)) as srv:
        if args.mytoken_out:
            token = srv.issue_mytoken(
                capabilities=args.parent_capability or list(DEFAULT_CAPABILITIES),
                restrictions=_parent_restrictions(args, srv.clock.now()),
            )
            write_private_file(args.mytoken_out, (token + "\n").encode())
            logger.info("parent mytoken written path=%s", args.mytoken_out)
        control = getattr(args, "control_file", None) or control_file_for(srv.url)
        if not getattr(args, "control_file", None):
            ensure_private_dir(os.path.dirname(control))
        write_private_file(control, (srv.control_token + "\n").encode())
        if args.url_file:  # last: who waits for the URL may use the control file at once
            write_private_file(args.url_file, (srv.url + "\n").encode(), mode=0o644)
        sys.stderr.write(f"jobtoken devserver (development/test only) listening on {srv.url}\n")
        if srv.ca_file:
            sys.stderr.write(f"CA certificate: {srv.ca_file}\n")
        sys.stderr.flush()
        try:
            while not stop.wait(0.2):
                pass
        finally:
            try:
                os.unlink(control)
            except OSError:
                pass
    return 0


def fault(args: argparse.Namespace) -> int:
    """Send a fault rule (or a clear) to a running dev server.

    Raises:
        UsageError: no --endpoint and no --clear.
        ConfigError: the server could not be reached or refused the rule.
    """
    verify: Any = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else True
    url = args.url.rstrip("/") + "/_devserver/faults"
    control = args.control_file or control_file_for(args.url)
    try:
        secret = read_secret_file(control, require_private=True)
    except JobtokenError as exc:
        raise ConfigError(
            f"devserver fault: no control secret ({exc.message}); only the user who started "
            "the server can steer it (give --control-file if it wrote one elsewhere)"
        ) from None
    headers = {"Authorization": f"Bearer {secret}"}
    try:
        with httpx.Client(timeout=10.0, verify=verify, headers=headers) as client:
            if args.clear:
                resp = client.delete(url)
            else:
                if not args.endpoint:
                    raise UsageError("devserver fault: --endpoint or --clear is required")
                spec = {
                    key: getattr(args, key)
                    for key in (
                        "endpoint",
                        "status",
                        "error",
                        "error_description",
                        "body",
                        "count",
                        "for_s",
                        "retry_after_s",
                        "token",
                    )
                    if getattr(args, key) is not None
                }
                spec.update({k: True for k in ("drop", "garbage", "process") if getattr(args, k)})
                if args.delay_s:
                    spec["delay_s"] = args.delay_s
                resp = client.post(url, json=spec)
    except httpx.HTTPError as exc:
        raise ConfigError(f"devserver fault: cannot reach {url}: {exc}") from exc
    if resp.status_code >= 400:
        try:
            why = resp.json().get("error_description", resp.text)
        except ValueError:
            why = resp.text
        raise ConfigError(f"devserver fault: {url} refused: {resp.status_code} {why}")
    if resp.status_code == 201:
        sys.stdout.write(json.dumps(resp.json()) + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point for ``jobtoken devserver``; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help")):
        args_list.insert(0, "serve")
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code or 0)
    try:
        if args.command == "fault":
            return fault(args)
        stop = threading.Event()
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
        try:
            return serve(args, stop)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    except JobtokenError as exc:
        sys.stderr.write(f"jobtoken devserver: {exc.message}\n")
        return exit_code_for(exc)
