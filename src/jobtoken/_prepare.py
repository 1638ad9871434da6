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

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Mapping, Optional, Tuple

from . import _policy as policy
from ._clock import SystemClock, utc_text
from ._config import Config, missing_setting, setting
from ._errors import ConfigError, JobtokenError, MytokenRejectedError
from ._mytokenfile import MytokenSource, load_mytoken
from ._scopes import invalid_scopes, scopes_within
from ._submytoken import (
    SubMytokenRequest,
    mint_sub_mytoken,
    revoke_children_named,
    revoke_quietly,
)
from ._tokendir import JobRecord, TokenDir
from ._tokenfile import remove_secret_file, write_secret_file
from ._tokens import AccessToken, unverified_claims

if TYPE_CHECKING:
    from ._mytoken import MytokenClient

__all__ = ["JobFacts", "PreparedJob", "job_mytoken_name", "job_scopes", "parent_source_of",
           "prepare_job", "revoke_job_mytokens"]

logger = logging.getLogger(__name__)

_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_SAFE_PATH_VALUE = re.compile(r"[A-Za-z0-9._-]+")
_TEMPLATE_FIELDS = ("job_id", "GlobalJobId", "owner", "Owner", "vo")


@dataclass(frozen=True)
class JobFacts:
    """What the batch system tells us about the job."""

    job_id: str
    walltime_s: Optional[float] = None
    owner: Optional[str] = None
    vo: Optional[str] = None  # the VO the job names (job ad): used only if the site lets it
    scopes: Tuple[str, ...] = ()  # the job's own (narrower) wish; empty: site templates
    audiences: Tuple[str, ...] = ()


@dataclass(frozen=True)
class PreparedJob:
    tokendir: TokenDir
    spec: JobRecord
    token: AccessToken = field(repr=False)
    mom_id: Optional[str]

    def environment(self) -> Dict[str, str]:
        """What the payload's environment must gain (never a secret)."""
        return {
            "BEARER_TOKEN_FILE": str(self.tokendir.bearer_token),
            "JOBTOKEN_DIR": str(self.tokendir.path),
        }


def _is_path_value(value: str) -> bool:
    """Whether ``value`` is safe as one path component of a scope.

    A ``/`` or ``..`` would move the job into another directory (another VO's, another
    user's), so values are held to a plain set of characters rather than cleaned.
    """
    return _SAFE_PATH_VALUE.fullmatch(value) is not None and value not in (".", "..")


def _job_vo(job: JobFacts, config: Config) -> Optional[str]:
    """The VO for the scope templates: the site's, never the job's unless the site says so.

    The job's VO (``x509UserProxyVOName``, ``AcctGroup``) is set by the submitter, so it
    may only pick another VO when ``site.job_may_choose_vo`` is on, and then only one of
    ``site.allowed_vos``.

    Raises:
        ConfigError: ``site.vo`` is not a plain name; MytokenRejectedError: the job
            names a VO the site does not let it choose, or one that is not a plain name.
    """
    site = config.site
    if site.vo is not None and not _is_path_value(site.vo):
        raise ConfigError(
            f"{setting('site.vo')} {site.vo!r} must be a plain name (letters, digits, . _ -)"
        )
    claimed = job.vo
    if not claimed or claimed == site.vo:
        return site.vo
    if not site.job_may_choose_vo:
        logger.debug("job %s names VO %r; site.vo is used", job.job_id, claimed)
        return site.vo
    if not _is_path_value(claimed) or claimed not in site.allowed_vos:
        raise MytokenRejectedError(
            f"job {job.job_id} names VO {claimed!r}, not one the site allows "
            f"(site.allowed_vos: {' '.join(site.allowed_vos) or 'none'})"
        )
    return claimed


def _template_values(job: JobFacts, config: Config) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(usable values, refused values) for the scope templates.

    The job id is the batch system's and only mapped (``#`` in HTCondor's GlobalJobId,
    ``/``, a leading ``.``); owner and VO must already be plain names, else a template
    that uses them fails.
    """
    safe_id = _UNSAFE_PATH_CHARS.sub("_", job.job_id)
    if safe_id.startswith("."):
        safe_id = "_" + safe_id[1:]
    raw = {
        "job_id": safe_id,
        "GlobalJobId": safe_id,
        "owner": job.owner or "",
        "Owner": job.owner or "",
        "vo": _job_vo(job, config) or "",
    }
    values = {k: v for k, v in raw.items() if v and _is_path_value(v)}
    refused = {k: v for k, v in raw.items() if v and k not in values}
    return values, refused


def _filled_templates(job: JobFacts, config: Config) -> Tuple[str, ...]:
    values, refused = _template_values(job, config)
    filled = []
    for template in config.site.scope_templates:
        try:
            text = template.format(**values)
        except KeyError as exc:
            name = exc.args[0] if exc.args else ""
            if name in refused:
                raise MytokenRejectedError(
                    f"job {job.job_id}: {name} {refused[name]!r} cannot be part of a scope path"
                ) from None
            if name in _TEMPLATE_FIELDS:
                hint = f"; set {setting('site.vo')}" if name == "vo" else ""
                raise ConfigError(
                    f"scope template {template!r} left a value empty for job {job.job_id} "
                    f"({name}{hint})"
                ) from None
            raise ConfigError(f"scope template {template!r}: unknown field {exc}") from None
        except (IndexError, ValueError) as exc:
            raise ConfigError(f"scope template {template!r}: unknown field {exc}") from None
        if "//" in text or text.endswith(":") or "{" in text:
            raise ConfigError(
                f"scope template {template!r} left a value empty for job {job.job_id} "
                f"(set {setting('site.vo')})"
            )
        filled.append(text)
    return tuple(filled)


def job_scopes(job: JobFacts, config: Config) -> Tuple[str, ...]:
    """The exact scope strings for this job: its wish, or the site's templates filled in.

    A job may narrow, never widen: its wish must lie within ``site.allowed_scopes``, or,
    when the site sets none, within what the templates give it.

    Raises:
        ConfigError: a template names an unknown field or leaves a value empty; a
            scope is malformed. MytokenRejectedError: the job asks for more than the
            site allows, names a VO it may not, or brings a value unsafe in a path.
    """
    wanted = tuple(job.scopes) if job.scopes else _filled_templates(job, config)
    bad = invalid_scopes(wanted)
    if bad:
        raise ConfigError(f"malformed scope(s): {' '.join(bad)}")
    if not wanted:
        raise ConfigError("no scope for the job: set site.scope_templates, or ask for one "
                          "(--job-scope)")
    allowed = config.site.allowed_scopes
    if not allowed and not job.scopes:
        return wanted  # only what the templates produce
    if not allowed:
        allowed = _filled_templates(job, config)
    wider = scopes_within(wanted, allowed)
    if wider:
        raise MytokenRejectedError(
            f"job {job.job_id} asks for {' '.join(wider)}, wider than the site allows "
            f"({' '.join(allowed)})"
        )
    return wanted


def _job_audiences(job: JobFacts, config: Config) -> Tuple[str, ...]:
    allowed = config.site.allowed_audiences or config.token.audiences
    if job.audiences:
        extra = [a for a in job.audiences if a not in allowed]
        if extra:
            raise MytokenRejectedError(
                f"job {job.job_id} asks for audience {' '.join(extra)}, not allowed by the site"
            )
        return tuple(job.audiences)
    if not allowed:
        raise missing_setting("audience", "site.allowed_audiences", "token.audiences")
    return tuple(allowed)


def prepare_job(
    config: Config,
    job: JobFacts,
    *,
    directory: str,
    now: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    client: Optional[MytokenClient] = None,
    write_token: Optional[Callable[[str], None]] = None,
) -> PreparedJob:
    """Mint the job mytoken, fetch and check its first token, write the token directory.

    Args:
        client: a kept client for the site's server (the node broker's); else one is
            built for this call and closed.
        write_token: where the first access token goes (the broker writes into the
            job's own directory); default ``directory``'s ``bt``.

    Raises:
        ConfigError: bad settings or parent mytoken file; MytokenRejectedError: the
        site does not allow what the job asks, or the server refused (permanent);
        ServerUnavailableError/ProtocolError: transient; TokenCheckError: the first
        token failed the checks; TokenFileError: the directory cannot be written.
    """
    from ._exchange import TokenRequest, fetch_access_token
    from ._oneshot import build_verifier, mytoken_client, server_url_for

    start = SystemClock().now() if now is None else now
    parent_source = parent_source_of(config)
    scopes = job_scopes(job, config)
    audiences = _job_audiences(job, config)
    walltime = walltime_for(job, config)
    job_end = start + walltime
    renewal = config.renewal
    settings = policy.renewal_settings(renewal.fraction, renewal.margin_s, renewal.max_backoff_s)
    budget = policy.usages_budget(walltime, config.site.expected_at_lifetime_s, settings)
    usages = min(budget, config.site.max_usages_at or budget)
    tokendir = TokenDir.create(directory)
    parent = load_mytoken(parent_source, env=env, allow_other_owner=True)
    request = SubMytokenRequest(
        name=job_mytoken_name(job.job_id),
        label=f"job {job.job_id}'s mytoken",
        capabilities=("AT",),
        scopes=scopes,
        audiences=audiences,
        exp=_capped_at_parent_expiry(
            _capped_at_site_lifetime(int(job_end + config.site.walltime_slack_s), config, start),
            parent, start, job.job_id,
        ),
        usages_at=usages,
        hosts=tuple(config.site.hosts),
    )
    url = client.server_url if client is not None else server_url_for(config, parent)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(mytoken_client(config, url))
        client.metadata()  # its failures are not a lost job mytoken
        minted = mint_sub_mytoken(client, parent, parent_source, request, started_at=start)
        try:
            spec = _job_spec(config, job, url, scopes, audiences, job_end, minted.mom_id,
                             tokendir)
            write_secret_file(tokendir.mytoken, minted.mytoken, newline=False)
            logger.info(
                "job mytoken minted job=%s mom_id=%s scope=%s aud=%s exp=%s usages_AT=%d",
                job.job_id,
                minted.mom_id,
                " ".join(scopes),
                " ".join(audiences),
                utc_text(request.exp),
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
            _check_budget(budget, token, walltime, settings)
            if write_token is None:
                write_secret_file(tokendir.bearer_token, token.raw)
            else:
                write_token(token.raw)
        except JobtokenError:
            # nothing half-made may outlive a failed prepare: no live job mytoken anywhere
            revoke_quietly(client, minted.mytoken, request.label)
            for path in (tokendir.mytoken, tokendir.bearer_token):
                try:
                    remove_secret_file(path)
                except JobtokenError as exc:
                    logger.warning("cannot remove %s: %s", path, exc.message)
            raise
    return PreparedJob(tokendir, spec, token, minted.mom_id)


def _check_budget(
    usages: int, token: AccessToken, walltime: float, settings: policy.RenewalSettings
) -> None:
    """A job mytoken whose ``usages_AT`` cannot last the wall time with the tokens the
    issuer really hands out would leave the job without a token halfway: refuse it now.

    Raises:
        ConfigError: the budget is too small (the site's expected_at_lifetime_s is too long).
    """
    if token.issued_at is None:
        return
    lifetime = token.expires_at - token.issued_at
    needed = policy.usages_budget(walltime, max(lifetime, 1.0), settings)
    if needed > usages:
        raise ConfigError(
            f"the job mytoken's usages_AT budget ({usages}) cannot last {walltime:.0f} s with "
            f"the issuer's {lifetime:.0f} s tokens (needs {needed}): set "
            f"{setting('site.expected_at_lifetime_s')} to {max(1, int(lifetime))}"
        )


def walltime_for(job: JobFacts, config: Config) -> float:
    """The wall time a job's tokens must cover: its own, else the site default, at most
    the site maximum (a job never sizes its chain beyond what the site allows)."""
    return min(job.walltime_s or config.site.default_walltime_s, config.site.max_walltime_s)


def _capped_at_site_lifetime(exp: int, config: Config, now: float) -> int:
    """The site's maximum mytoken lifetime bounds the job mytoken's ``exp`` (whatever the
    job's wall time asks); a server that enforces a limit refuses longer requests."""
    limit = config.site.max_mytoken_lifetime_s
    return min(exp, int(now + limit)) if limit else exp


def _capped_at_parent_expiry(exp: int, parent: str, now: float, job_id: str) -> int:
    """A child cannot outlive its parent: ask for no later ``exp`` than the parent has.

    Asking for more makes the server refuse the restriction (``error_on_restrictions``).
    Only a JWT parent says when it expires; a short token's expiry is not known here.

    Raises:
        MytokenRejectedError: the parent expires within minutes.
    """
    claims = unverified_claims(parent)
    parent_exp = claims.get("exp") if claims else None
    if not isinstance(parent_exp, (int, float)) or parent_exp >= exp:
        return exp
    if policy.parent_expires_too_soon(parent_exp, now):
        raise MytokenRejectedError(
            f"the parent mytoken expires in {max(0, parent_exp - now):.0f} s; too soon to mint "
            f"a mytoken for job {job_id}"
        )
    logger.warning(
        "parent mytoken expires before job %s would end; job mytoken capped at exp=%s",
        job_id, utc_text(parent_exp),
    )
    return int(parent_exp)


def _job_spec(
    config: Config,
    job: JobFacts,
    url: str,
    scopes: Tuple[str, ...],
    audiences: Tuple[str, ...],
    job_end: float,
    mom_id: Optional[str],
    tokendir: TokenDir,
) -> JobRecord:
    return JobRecord.from_config(
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


def job_mytoken_name(job_id: str) -> str:
    """The name a job mytoken carries at the server (what ``revoke_job_mytokens`` finds)."""
    return f"jobtoken {job_id}"[:100]


def parent_source_of(config: Config) -> MytokenSource:
    """The site's parent mytoken file (``site.parent_mytoken_file``, else the token's).

    Raises:
        ConfigError: none configured.
    """
    parent_path = config.site.parent_mytoken_file or config.token.mytoken_file
    if not parent_path:
        raise missing_setting("parent mytoken", "site.parent_mytoken_file", "token.mytoken_file")
    return MytokenSource(path=Path(parent_path))


def revoke_job_mytokens(config: Config, job_id: str, *, env: Optional[Mapping[str, str]] = None,
                        client: Optional[MytokenClient] = None) -> Tuple[str, ...]:
    """Revoke every live job mytoken the site's parent minted for ``job_id``, by name.

    For the CE's side of a job's end: it needs neither the session directory nor the job
    mytoken, only the parent (with ``tokeninfo``), so it works after ``arckill`` or a lost
    node. Returns the revoked mom_ids (none when the job already revoked its own).

    Raises:
        ConfigError: no parent mytoken; JobtokenError: the server could not list or revoke.
    """
    from ._oneshot import mytoken_client, server_url_for

    parent_source = parent_source_of(config)
    parent = load_mytoken(parent_source, env=env, allow_other_owner=True)
    if client is not None:
        return revoke_children_named(client, parent_source, parent, job_mytoken_name(job_id))
    with mytoken_client(config, server_url_for(config, parent)) as kept:
        return revoke_children_named(kept, parent_source, parent, job_mytoken_name(job_id))
