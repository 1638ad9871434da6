"""``prepare``: mint the per-job sub-mytoken from a parent, fetch the first token, lay out the dir.

The job mytoken is the least a job needs: capability ``AT`` only, one restriction
with the exact scope strings the sidecar will request, the audience, ``exp`` at the
job's end plus slack, a ``usages_AT`` budget from the renewal rule, optional
``hosts``. ``error_on_restrictions`` is set so that a restriction the server would
silently drop (leaving a *wider* token) is an error instead. What the server returns
is checked, not trusted: a job mytoken with more capabilities or other restrictions
than asked is revoked and refused.

Scopes: jobs may narrow what the site allows (WLCG path semantics), never widen it.
Because Mytoken matches restriction scopes as exact strings, a per-job path such as
``storage.create:/vo/jobs/42`` can only be minted from a parent whose restriction
leaves ``scope`` open (or lists that very string); the AT check (granted ⊆ asked)
is then the guard. A parent that cannot mint the string gets a clear error.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from . import _policy as policy
from ._config import Config
from ._errors import (
    ConfigError,
    JobtokenError,
    MytokenRejectedError,
    ProtocolError,
    ServerUnavailableError,
)
from ._mytokenfile import MytokenSource, load_mytoken, save_rotated_mytoken
from ._scopes import invalid_scopes, scopes_within
from ._tokendir import JobSpec, TokenDir
from ._tokenfile import remove_secret_file, write_secret_file
from ._tokens import AccessToken

__all__ = ["JobInfo", "PreparedJob", "job_mytoken_name", "job_scopes", "prepare_job",
           "revoke_job_mytokens"]

logger = logging.getLogger(__name__)

_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class JobInfo:
    """What the batch system tells us about the job."""

    job_id: str
    walltime_s: Optional[float] = None
    owner: Optional[str] = None
    vo: Optional[str] = None
    scopes: Tuple[str, ...] = ()  # the job's own (narrower) wish; empty: site templates
    audiences: Tuple[str, ...] = ()


@dataclass(frozen=True)
class PreparedJob:
    tokendir: TokenDir
    spec: JobSpec
    token: AccessToken = field(repr=False)
    mom_id: Optional[str]

    def environment(self) -> Dict[str, str]:
        """What the payload's environment must gain (never a secret)."""
        return {
            "BEARER_TOKEN_FILE": str(self.tokendir.bearer_token),
            "JOBTOKEN_DIR": str(self.tokendir.path),
        }


def _template_values(job: JobInfo, config: Config) -> Dict[str, str]:
    # storage paths are URL paths: '#' (in HTCondor's GlobalJobId) or '/' would break them
    safe_id = _UNSAFE_PATH_CHARS.sub("_", job.job_id)
    values = {
        "job_id": safe_id,
        "GlobalJobId": safe_id,
        "owner": job.owner or "",
        "Owner": job.owner or "",
        "vo": job.vo or config.site.vo or "",
    }
    return values


def job_scopes(job: JobInfo, config: Config) -> Tuple[str, ...]:
    """The exact scope strings for this job: its wish, or the site's templates filled in.

    Raises:
        ConfigError: a template names an unknown field or leaves a value empty; a
            scope is malformed; the job asks for more than the site allows.
    """
    if job.scopes:
        wanted = tuple(job.scopes)
    else:
        values = _template_values(job, config)
        filled = []
        for template in config.site.scope_templates:
            try:
                text = template.format(**values)
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"scope template {template!r}: unknown field {exc}") from None
            if "//" in text or text.endswith(":") or "{" in text:
                raise ConfigError(
                    f"scope template {template!r} left a value empty for job {job.job_id} "
                    "(set site.vo or the job's VO)"
                )
            filled.append(text)
        wanted = tuple(filled)
    bad = invalid_scopes(wanted)
    if bad:
        raise ConfigError(f"malformed scope(s): {' '.join(bad)}")
    if not wanted:
        raise ConfigError("no scope for the job: configure site.scope_templates or ask for one")
    allowed = config.site.allowed_scopes
    if allowed:
        wider = scopes_within(wanted, allowed)
        if wider:
            raise MytokenRejectedError(
                f"job {job.job_id} asks for {' '.join(wider)}, wider than the site allows "
                f"({' '.join(allowed)})"
            )
    elif job.scopes:
        raise ConfigError(
            "the job asks for its own scopes but the site allows none (set site.allowed_scopes)"
        )
    return wanted


def _job_audiences(job: JobInfo, config: Config) -> Tuple[str, ...]:
    allowed = config.site.allowed_audiences or config.token.audiences
    if job.audiences:
        extra = [a for a in job.audiences if a not in allowed]
        if extra:
            raise MytokenRejectedError(
                f"job {job.job_id} asks for audience {' '.join(extra)}, not allowed by the site"
            )
        return tuple(job.audiences)
    if not allowed:
        raise ConfigError("no audience: set site.allowed_audiences or token.audiences")
    return tuple(allowed)


def _check_minted(response: Any, restriction: Mapping[str, Any], job_id: str) -> None:
    """Refuse a job mytoken that came back wider than asked."""
    caps = set(response.capabilities or ())
    if caps and not caps <= {"AT"}:
        raise ProtocolError(
            f"server minted job {job_id}'s mytoken with capabilities {sorted(caps)}, not ['AT']"
        )
    if not response.restrictions:
        raise ProtocolError(f"server minted job {job_id}'s mytoken without restrictions")
    asked_scopes = set(str(restriction["scope"]).split())
    asked_aud = set(restriction.get("audience") or ())
    for entry in response.restrictions:
        got_scopes = set(str(entry.get("scope") or "").split())
        got_aud = set(entry.get("audience") or ())
        if not got_scopes or not got_scopes <= asked_scopes:
            raise ProtocolError(f"server widened job {job_id}'s mytoken scope restriction")
        if asked_aud and (not got_aud or not got_aud <= asked_aud):
            raise ProtocolError(f"server widened job {job_id}'s mytoken audience restriction")
        exp = entry.get("exp")
        if not exp or float(exp) > float(restriction["exp"]) + 1:
            raise ProtocolError(f"server gave job {job_id}'s mytoken a later expiry than asked")


def prepare_job(
    config: Config,
    job: JobInfo,
    *,
    directory: str,
    now: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
) -> PreparedJob:
    """Mint the job mytoken, fetch and check its first token, write the token directory.

    Raises:
        ConfigError: bad settings or parent mytoken file; MytokenRejectedError: the
        site does not allow what the job asks, or the server refused (permanent);
        ServerUnavailableError/ProtocolError: transient; TokenCheckError: the first
        token failed the checks; TokenFileError: the directory cannot be written.
    """
    from ._actions import build_client, build_verifier, server_url_for
    from ._exchange import TokenRequest, fetch_access_token

    environ = os.environ if env is None else env
    start = time.time() if now is None else now
    parent_path = config.site.parent_mytoken_file or config.token.mytoken_file
    if not parent_path:
        raise ConfigError("no parent mytoken: set site.parent_mytoken_file or --mytoken-file")
    parent_source = MytokenSource(path=Path(parent_path))
    scopes = job_scopes(job, config)
    audiences = _job_audiences(job, config)
    walltime = job.walltime_s or config.site.default_walltime_s
    job_end = start + walltime
    renewal = config.renewal
    settings = policy.RenewalSettings(
        fraction=renewal.fraction,
        min_margin_s=min(60.0, renewal.margin_s),
        default_margin_s=renewal.margin_s,
        max_backoff_s=renewal.max_backoff_s,
    )
    usages = policy.usages_budget(walltime, config.site.expected_at_lifetime_s, settings)
    restriction: Dict[str, Any] = {
        "scope": " ".join(scopes),
        "audience": list(audiences),
        "exp": int(job_end + config.site.walltime_slack_s),
        "usages_AT": usages,
    }
    if config.site.hosts:
        restriction["hosts"] = list(config.site.hosts)
    tokendir = TokenDir.create(directory)
    parent = load_mytoken(parent_source, env=environ, allow_other_owner=True)
    _cap_at_parent_expiry(restriction, parent, start, job.job_id)
    url = server_url_for(config, parent)
    name = job_mytoken_name(job.job_id)
    with build_client(config, url) as client:
        client.discovery()  # its failures are not a lost job mytoken
        try:
            minted = client.create_mytoken(
                parent,
                restrictions=[restriction],
                capabilities=["AT"],
                name=name,
                error_on_restrictions=True,
            )
        except ServerUnavailableError as exc:
            if _answer_may_be_lost(exc):
                _reap_lost_job_mytokens(client, parent_source, parent, name, start)
            raise
        if minted.token_update is not None:
            save_rotated_mytoken(parent_source, minted.token_update.mytoken)
        try:
            _check_minted(minted, restriction, job.job_id)
            spec = _job_spec(config, job, url, scopes, audiences, job_end, minted.mom_id,
                             tokendir)
            write_secret_file(tokendir.mytoken, minted.mytoken, newline=False)
            logger.info(
                "job mytoken minted job=%s mom_id=%s scope=%s aud=%s exp=%d usages_AT=%d",
                job.job_id,
                minted.mom_id,
                restriction["scope"],
                " ".join(audiences),
                restriction["exp"],
                usages,
            )
            tokendir.write_spec(spec)
            token = fetch_access_token(
                client,
                MytokenSource(path=tokendir.mytoken),
                TokenRequest(scopes=scopes, audiences=audiences, comment=f"jobtoken {job.job_id}"),
                now=start,
                verifier=build_verifier(config),
            )
            _check_budget(token, walltime, usages, settings)
            write_secret_file(tokendir.bearer_token, token.raw)
        except JobtokenError:
            # nothing half-made may outlive a failed prepare: no live job mytoken anywhere
            _revoke_quietly(client, minted.mytoken)
            for path in (tokendir.mytoken, tokendir.bearer_token):
                try:
                    remove_secret_file(path)
                except JobtokenError as exc:
                    logger.warning("cannot remove %s: %s", path, exc.message)
            raise
    return PreparedJob(tokendir, spec, token, minted.mom_id)


_MIN_JOB_MYTOKEN_S = 300.0


def _check_budget(token: Any, walltime: float, usages: int, settings: Any) -> None:
    """The budget was sized from ``site.expected_at_lifetime_s``; the server's real token
    lifetime decides. Too small, the job would run out of tokens halfway (``403
    usage_restricted``), so the job fails now, where the site sees why.

    Raises:
        ConfigError: the server's tokens are shorter than the budget assumed.
    """
    if token.issued_at is None:
        return
    lifetime = token.expires_at - token.issued_at
    needed = policy.usages_budget(walltime, max(lifetime, 1.0), settings)
    if needed > usages:
        raise ConfigError(
            f"the server's {lifetime:.0f} s access tokens need a usages_AT budget of {needed} "
            f"for {walltime:.0f} s, but site.expected_at_lifetime_s sized it at {usages}: set "
            f"site.expected_at_lifetime_s = {max(1, int(lifetime))}"
        )


def _cap_at_parent_expiry(
    restriction: Dict[str, Any], parent: str, now: float, job_id: str
) -> None:
    """A child cannot outlive its parent: ask for no later ``exp`` than the parent has.

    Asking for more makes the server refuse the restriction (``error_on_restrictions``).
    Only a JWT parent says when it expires; a short token's expiry is not known here.

    Raises:
        MytokenRejectedError: the parent expires within minutes.
    """
    if parent.count(".") != 2:
        return
    import jwt

    try:
        parent_exp = jwt.decode(parent, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return
    if not isinstance(parent_exp, (int, float)) or parent_exp >= restriction["exp"]:
        return
    if parent_exp - now < _MIN_JOB_MYTOKEN_S:
        raise MytokenRejectedError(
            f"the parent mytoken expires in {max(0, parent_exp - now):.0f} s; too soon to mint "
            f"a mytoken for job {job_id}"
        )
    logger.warning(
        "parent mytoken expires before job %s would end; job mytoken capped at exp=%d",
        job_id, int(parent_exp),
    )
    restriction["exp"] = int(parent_exp)


def _job_spec(
    config: Config,
    job: JobInfo,
    url: str,
    scopes: Tuple[str, ...],
    audiences: Tuple[str, ...],
    job_end: float,
    mom_id: Optional[str],
    tokendir: TokenDir,
) -> JobSpec:
    return JobSpec.from_config(
        config,
        job_id=job.job_id,
        server_url=url,
        mytoken_path=tokendir.mytoken.name,  # relative: the directory may move
        scopes=scopes,
        audiences=audiences,
        job_end_at=job_end,
        mytoken_owned=True,
        remove_dir_at_end=False,
        mom_id=mom_id,
    )


# how much older than prepare's start (by the server's clock) a lost job mytoken may be
_LOST_MYTOKEN_SKEW_S = 120.0


def _answer_may_be_lost(exc: JobtokenError) -> bool:
    """Whether the server may have minted a job mytoken whose answer never arrived.

    A read timeout, a connection cut after the request went out, or a garbled answer:
    the request may have been committed. A status the server chose (5xx, 429, 4xx) was
    answered before anything was minted; a rotated-then-garbled answer (not retryable)
    means the parent we hold is dead, and using it again could revoke its whole chain.
    """
    import httpx

    if not isinstance(exc, ServerUnavailableError) or not exc.retryable:
        return False
    if isinstance(exc.__cause__, (httpx.ConnectError, httpx.ConnectTimeout)):
        return False  # never reached the server
    return isinstance(exc, ProtocolError) or exc.status is None


def _reap_lost_job_mytokens(
    client: Any, parent_source: MytokenSource, parent: str, name: str, start: float
) -> None:
    """Revoke the job mytoken a lost answer may have left live at the server.

    Found by tokeninfo ``subtokens`` of the parent: the children named for this job,
    created since just before this prepare began. Best effort: the parent may lack
    ``tokeninfo:subtokens``, or the server may still be unreachable; then the orphan
    lives until its ``exp`` (the job's wall time), as the warning says.
    """
    try:
        for mom_id in _revoke_children_named(client, parent_source, parent, name,
                                             created_after=start - _LOST_MYTOKEN_SKEW_S):
            logger.info(
                "revoked job mytoken %r mom_id=%s minted by a request whose answer was lost",
                name, mom_id,
            )
    except JobtokenError as exc:
        logger.warning(
            "cannot check for a job mytoken %r minted by a request whose answer was lost (it "
            "stays valid until it expires): %s", name, exc.message,
        )


def _revoke_children_named(
    client: Any, parent_source: MytokenSource, parent: str, name: str,
    created_after: Optional[float] = None,
) -> Tuple[str, ...]:
    """Revoke (recursively, by ``mom_id``) the parent's live children called ``name``;
    returns their mom_ids. A rotated parent is saved back to its file.

    Raises:
        JobtokenError: the listing or a revocation failed.
    """
    listing = client.subtokens(parent)
    if listing.token_update is not None:
        save_rotated_mytoken(parent_source, listing.token_update.mytoken)
        parent = listing.token_update.mytoken
    found = [
        e for e in listing.entries
        if e.name == name and (created_after is None
                               or (e.created is not None and e.created >= created_after))
    ]
    for entry in found:
        update = client.revoke(parent, recursive=True, mom_id=entry.mom_id)
        if update is not None:
            save_rotated_mytoken(parent_source, update.mytoken)
            parent = update.mytoken
    return tuple(e.mom_id for e in found)


def job_mytoken_name(job_id: str) -> str:
    """The name a job mytoken carries at the server (what ``revoke_job_mytokens`` finds)."""
    return f"jobtoken {job_id}"[:100]


def revoke_job_mytokens(config: Config, job_id: str, *, env: Optional[Mapping[str, str]] = None
                        ) -> Tuple[str, ...]:
    """Revoke every live job mytoken the site's parent minted for ``job_id``, by name.

    For the CE's side of a job's end: it needs neither the session directory nor the job
    mytoken, only the parent (with ``tokeninfo``), so it works after ``arckill`` or a lost
    node. Returns the revoked mom_ids (none when the job already revoked its own).

    Raises:
        ConfigError: no parent mytoken; JobtokenError: the server could not list or revoke.
    """
    from ._actions import build_client, server_url_for

    environ = os.environ if env is None else env
    parent_path = config.site.parent_mytoken_file or config.token.mytoken_file
    if not parent_path:
        raise ConfigError("no parent mytoken: set site.parent_mytoken_file or --mytoken-file")
    parent_source = MytokenSource(path=Path(parent_path))
    parent = load_mytoken(parent_source, env=environ, allow_other_owner=True)
    with build_client(config, server_url_for(config, parent)) as client:
        return _revoke_children_named(client, parent_source, parent, job_mytoken_name(job_id))


def _revoke_quietly(client: Any, mytoken: str) -> None:
    try:
        client.revoke(mytoken, recursive=True)
    except JobtokenError as exc:
        logger.warning("cannot revoke the refused job mytoken: %s", exc.message)
