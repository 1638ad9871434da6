"""One renewal (or revocation) of a token directory, run as a short-lived child process.

Why a child: httpx, cryptography and pyjwt cost ~20 MiB of resident memory that
Python never gives back. The sidecar that waits between renewals stays near a bare
interpreter by importing none of them and running this module instead, about once
per token lifetime. The child reports one JSON line on stdout (never a secret) and
exits with the documented exit code of its outcome.

Usage: ``python -m jobtoken._renewal DIR [--min-valid S] [--revoke]``
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional

from ._clock import Clock, SystemClock
from ._errors import JobtokenError, MytokenError, RenewalReport, TokenFileError
from ._policy import RENEWAL_LOCK_WAIT_S
from ._tokendir import JobRecord, TokenDir

if TYPE_CHECKING:  # imported lazily below: this module's import must stay cheap
    from ._config import Config, ServerConfig
    from ._exchange import Verifier
    from ._jwks import SignatureVerifier
    from ._mytoken import MytokenClient
    from ._tokens import AccessToken

__all__ = ["main", "renew", "renew_token", "revoke", "revoke_by_mom_id"]

logger = logging.getLogger(__name__)


def _server(spec: JobRecord) -> ServerConfig:
    from ._config import ServerConfig

    return ServerConfig(
        url=spec.server_url or None,
        ca_file=spec.ca_file,
        ca_dir=spec.ca_dir,
        allow_http=spec.allow_http,
        timeout_s=spec.timeout_s,
    )


def _client(spec: JobRecord, mytoken: Optional[str] = None) -> MytokenClient:
    from ._config import Config
    from ._oneshot import client_for, server_url_for

    server = _server(spec)
    return client_for(server, server_url_for(Config(server=server), mytoken))


def _verifier(spec: JobRecord) -> Optional[SignatureVerifier]:
    from ._oneshot import verifier_for

    return verifier_for(_server(spec), spec.trusted_issuers)


def _report(token: AccessToken, reused: bool) -> RenewalReport:
    return RenewalReport(
        ok=True,
        reused=reused,
        expires_at=token.expires_at,
        issued_at=token.issued_at,
        jti=token.jti,
        subject=token.subject,
        scopes=tuple(token.scopes),
        audiences=tuple(token.audiences),
    )


@contextlib.contextmanager
def _renewal_lock(
    tokendir: TokenDir, timeout_s: float = RENEWAL_LOCK_WAIT_S, clock: Optional[Clock] = None
) -> Iterator[None]:
    """Serialise renewals of one directory (sidecar and ``jobtoken ensure``).

    Two concurrent uses of one rotating mytoken would kill its chain; two of a
    non-rotating one would waste a ``usages_AT``.
    """
    path = tokendir.renew_lock
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise TokenFileError(f"cannot open {path}: {exc.strerror}") from exc
    clock = clock or SystemClock()
    never = threading.Event()
    try:
        deadline = clock.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if clock.monotonic() > deadline:
                    raise JobtokenError(
                        f"another renewal of {tokendir.path} still runs after {timeout_s:.0f} s"
                    ) from None
                clock.wait(never, 0.05)
        yield
    finally:
        os.close(fd)


def renew(tokendir: TokenDir, *, min_valid_s: Optional[float] = None) -> RenewalReport:
    with _renewal_lock(tokendir):
        return _renew_locked(tokendir, min_valid_s=min_valid_s)


def _renew_locked(tokendir: TokenDir, *, min_valid_s: Optional[float] = None) -> RenewalReport:
    """Make sure ``bt`` holds a fresh, checked token; return a non-secret report.

    With ``min_valid_s``, a current token valid at least that long (and within the
    job's scopes and audiences) is kept without asking the server.

    Raises:
        JobtokenError: any failure; the current token file is then untouched.
    """
    from ._mytokenfile import MytokenSource, load_mytoken
    from ._tokenfile import write_secret_file

    spec = tokendir.read_spec()
    now = SystemClock().now()
    current = tokendir.current_token()
    if current is not None and min_valid_s is not None and _good_for(
        current, spec, now, min_valid_s
    ):
        return _report(current, True)
    path = tokendir.mytoken_of(spec)
    mytoken = None if spec.server_url else load_mytoken(MytokenSource(path=path))
    with _client(spec, mytoken) as client:
        kept = _load_metadata(tokendir, client)
        try:
            token = renew_token(
                tokendir, spec, client, mytoken=path, now=now, verifier=_verifier(spec),
                write_token=lambda raw: write_secret_file(tokendir.bearer_token, raw),
            )
        except JobtokenError as exc:
            if kept and isinstance(exc, MytokenError) and exc.status in (None, 404, 405, 410):
                _forget_metadata(tokendir)  # maybe the server moved its endpoints
            raise
        if not kept:
            _save_metadata(tokendir, client)
    return _report(token, False)


def renew_token(
    tokendir: TokenDir,
    spec: JobRecord,
    client: MytokenClient,
    *,
    mytoken: Path,
    now: float,
    verifier: Optional[Verifier],
    write_token: Callable[[str], object],
) -> AccessToken:
    """One renewal of the job ``spec``: the one routine of the sidecar and the node broker.

    Why one: the order is what keeps a job alive, and two copies of it drift. The
    exchange (``_exchange``) saves a rotated mytoken durably before anything else (the old
    one is dead now), then checks the new token against the job's scopes and audiences,
    against the token it replaces (``tokendir``'s ``bt``: it must last longer) and its
    signature; only a token that passed reaches ``write_token``. A failure anywhere leaves
    the current token where it was.

    Args:
        mytoken: the job mytoken's file. The broker passes its own copy, never a path
            that ``job.json`` names (a privileged process follows no job-written path).
        now: wall-clock time captured before the request.
        write_token: where the token goes: the token directory's ``bt`` for the sidecar
            and ``ensure``; the broker's copy and, through a dirfd, the job's directory
            for the broker.

    Raises:
        JobtokenError: the exchange, a check, or ``write_token`` failed.
    """
    from ._exchange import TokenRequest, fetch_access_token
    from ._mytokenfile import MytokenSource

    token = fetch_access_token(
        client,
        MytokenSource(path=mytoken),
        TokenRequest(
            scopes=spec.scopes, audiences=spec.audiences, comment=f"jobtoken {spec.job_id}"
        ),
        now=now,
        previous=tokendir.current_token(),
        verifier=verifier,
    )
    write_token(token.raw)
    return token


def _good_for(token: AccessToken, spec: JobRecord, now: float, min_valid_s: float) -> bool:
    """Whether the current token passes the job's checks for ``min_valid_s`` more seconds."""
    from ._tokens import check_access_token

    try:
        check_access_token(
            token,
            requested_scopes=spec.scopes,
            requested_audiences=spec.audiences,
            now=now,
            min_valid_s=min_valid_s,
        )
    except JobtokenError:
        return False
    return True


_DISCOVERY_MAX_AGE_S = 6 * 3600.0


def _load_metadata(tokendir: TokenDir, client: MytokenClient) -> bool:
    path = tokendir.metadata_file
    try:
        if SystemClock().now() - path.stat().st_mtime > _DISCOVERY_MAX_AGE_S:
            return False
        client.remember_metadata(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, JobtokenError):
        return False
    return True


def _save_metadata(tokendir: TokenDir, client: MytokenClient) -> None:
    from ._tokenfile import write_secret_file

    try:
        write_secret_file(tokendir.metadata_file, json.dumps(client.metadata().raw))
    except (JobtokenError, TypeError, ValueError):
        pass


def _forget_metadata(tokendir: TokenDir) -> None:
    try:
        os.unlink(tokendir.metadata_file)
    except OSError:
        pass


def revoke(tokendir: TokenDir) -> RenewalReport:
    """Revoke the job's mytoken (and its children) at the server, then delete it.

    Raises:
        JobtokenError: the server could not be reached or refused; the file stays.
    """
    from ._mytokenfile import MytokenSource, load_mytoken
    from ._tokenfile import remove_secret_file

    spec = tokendir.read_spec()
    path = tokendir.mytoken_of(spec)
    if not path.exists():
        return RenewalReport(ok=True, revoked=False)
    mytoken = load_mytoken(MytokenSource(path=path))
    with _client(spec, mytoken) as client:
        client.revoke(mytoken, recursive=True)
    remove_secret_file(path)
    return RenewalReport(ok=True, revoked=True)


def revoke_by_mom_id(config: Config, parent_path: str, mom_id: str, *,
                     client: Optional[MytokenClient] = None) -> None:
    """Revoke the job mytoken ``mom_id`` (and its children) through its parent.

    The job's own mytoken file proves nothing at the job's end: a payload may have
    copied it and put something else in its place, and revoking that something else
    answers 204 all the same. The parent names the job mytoken by the ``mom_id`` the
    server gave when minting it, so this revokes the real one (issue 12 item 14).
    The server comes from the site's ``config`` (as in ``prepare``), never from
    ``job.json``: the job can write that file, and the parent must not follow it.

    ``client``: a kept client for the site's server (the node broker's); else one is
    built for this call.

    Raises:
        JobtokenError: the parent cannot be read, or the server refused or failed.
    """
    from ._mytokenfile import MytokenSource, load_mytoken, save_rotated_mytoken
    from ._oneshot import mytoken_client, server_url_for

    source = MytokenSource(path=Path(parent_path))
    parent = load_mytoken(source, allow_other_owner=True)
    if client is not None:
        update = client.revoke(parent, recursive=True, mom_id=mom_id)
    else:
        with mytoken_client(config, server_url_for(config, parent)) as built:
            update = built.revoke(parent, recursive=True, mom_id=mom_id)
    if update is not None:
        save_rotated_mytoken(source, update.mytoken)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jobtoken-renewal")
    parser.add_argument("dir")
    parser.add_argument("--min-valid", type=float)
    parser.add_argument("--revoke", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="jobtoken: %(message)s")
    try:
        tokendir = TokenDir.existing(args.dir)
        report = revoke(tokendir) if args.revoke else renew(tokendir, min_valid_s=args.min_valid)
    except Exception as exc:  # reported as one JSON line; the parent decides
        report = RenewalReport.failure(exc)
    sys.stdout.write(report.to_json() + "\n")
    sys.stdout.flush()
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
