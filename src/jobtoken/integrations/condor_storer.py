"""Access point: mint the per-submission sub-mytoken, and HTCondor's ``SEC_CREDENTIAL_STORER``.

Both the ``include command`` path (``jobtoken condor submit``) and the credd path (the
storer) start the same way: the user's own mytoken (a file, a variable, or where the
mytoken CLI keeps one: ``$XDG_RUNTIME_DIR/mt_u<uid>``, ``/tmp/mt_u<uid>``) is used to
mint a *per-submission* sub-mytoken: capabilities ``AT`` and ``create_mytoken`` (the
execute point mints the per-job token from it), the requested scope strings and
audience, a bounded lifetime, optionally a ``usages_other`` budget of one per job.

The storer contract (condor_submit, since 25.14): one argv item per credential,
``service[&handle=H][&scopes=a,b][&audience=A][&options=...]``, run as the user without
a shell, ``CONDOR_CREDENTIAL_STORER_MODE`` = ``vault``/``pelican``, any non-zero exit
aborts the submit. The minted mytoken is stored as the service's ``.top`` through the
bindings' credd API; ``jobtoken credmon`` turns it into the ``.use`` jobs receive.

Must NOT: print or log a mytoken, store anything wider than the user's mytoken allows
(``error_on_restrictions``), or import htcondor at module level.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import unquote

from .._config import Config
from .._errors import ConfigError, UsageError
from .._mytokenfile import MytokenSource, load_mytoken

__all__ = [
    "CredentialRequest",
    "SubmissionToken",
    "find_user_mytoken",
    "mint_submission_mytoken",
    "parse_storer_argument",
    "run_storer",
    "top_content",
]

logger = logging.getLogger(__name__)

SUBMISSION_CAPABILITIES = ("AT", "create_mytoken")
DEFAULT_LIFETIME_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class SubmissionToken:
    """A freshly minted per-submission mytoken and its non-secret facts."""

    mytoken: str = field(repr=False)
    server_url: str
    mom_id: Optional[str]
    expires_at: float
    scopes: Tuple[str, ...]
    audiences: Tuple[str, ...]


@dataclass(frozen=True)
class CredentialRequest:
    """One argv item of the storer: ``service[&handle=..][&scopes=..][&audience=..]``."""

    service: str
    handle: Optional[str] = None
    scopes: Tuple[str, ...] = ()
    audiences: Tuple[str, ...] = ()
    options: Optional[str] = None

    @property
    def name(self) -> str:
        """The credential's name on the credd and in ``$_CONDOR_CREDS``."""
        return f"{self.service}_{self.handle}" if self.handle else self.service


def parse_storer_argument(item: str) -> CredentialRequest:
    """Parse one storer argv item.

    Raises:
        UsageError: empty service, unknown or repeated key.
    """
    service, *pairs = item.split("&")
    if not service:
        raise UsageError(f"storer argument {item!r} names no service")
    values: Dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in ("handle", "scopes", "audience", "options") or key in values:
            raise UsageError(f"storer argument for {service}: cannot read {key!r}")
        values[key] = unquote(value)
    scopes = tuple(s for part in values.get("scopes", "").split(",") for s in part.split() if s)
    audiences = tuple(
        a for part in values.get("audience", "").split(",") for a in part.split() if a
    )
    return CredentialRequest(
        service, values.get("handle") or None, scopes, audiences, values.get("options")
    )


def find_user_mytoken(config: Config, env: Mapping[str, str]) -> MytokenSource:
    """The user's mytoken: configured file or variable, else where the mytoken CLI keeps one.

    Raises:
        ConfigError: none found.
    """
    if config.token.mytoken_file or config.token.mytoken_env:
        from .._actions import mytoken_source

        return mytoken_source(config)
    uid = os.geteuid()
    candidates = []
    if env.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(env["XDG_RUNTIME_DIR"]) / f"mt_u{uid}")
    candidates.append(Path("/tmp") / f"mt_u{uid}")
    for path in candidates:
        if path.is_file():
            return MytokenSource(path=path)
    raise ConfigError(
        "no mytoken: use --mytoken-file, $JOBTOKEN_MYTOKEN_FILE, or keep one in "
        + " or ".join(str(p) for p in candidates)
    )


def mint_submission_mytoken(
    config: Config,
    source: MytokenSource,
    *,
    scopes: Sequence[str],
    audiences: Sequence[str] = (),
    lifetime_s: float = DEFAULT_LIFETIME_S,
    max_jobs: Optional[int] = None,
    name: str = "jobtoken submission",
    env: Optional[Mapping[str, str]] = None,
    now: Optional[float] = None,
) -> SubmissionToken:
    """Mint the per-submission sub-mytoken from the user's mytoken.

    Minting, the parent's rotation, the check of the answer and revoking a refused token
    are ``_submytoken.mint_sub_mytoken``'s, shared with ``prepare``.

    Raises:
        ConfigError: no scope, bad mytoken source; MytokenRejectedError: the user's
            mytoken lacks ``create_mytoken`` or does not allow the scope/audience;
        ServerUnavailableError/ProtocolError: transient, or an answer wider than asked.
    """
    from .._actions import build_client, server_url_for
    from .._submytoken import SubMytokenRequest, mint_sub_mytoken

    if not scopes:
        raise ConfigError("no scope for the submission: give --scope (or token.scopes)")
    start = time.time() if now is None else now
    parent = load_mytoken(source, env=env)
    url = server_url_for(config, parent)
    request = SubMytokenRequest(
        name=name,
        label="the submission mytoken",
        capabilities=SUBMISSION_CAPABILITIES,
        scopes=tuple(scopes),
        audiences=tuple(audiences),
        exp=int(start + lifetime_s),
        usages_other=None if max_jobs is None else int(max_jobs),
    )
    with build_client(config, url) as client:
        # a shared name ("jobtoken submission"): a lost answer is not searched for by name
        minted = mint_sub_mytoken(client, parent, source, request)
    logger.info(
        "submission mytoken minted mom_id=%s scope=%s aud=%s exp=%d server=%s",
        minted.mom_id,
        " ".join(request.scopes),
        " ".join(audiences) or "-",
        request.exp,
        url,
    )
    return SubmissionToken(
        minted.mytoken,
        url,
        minted.mom_id,
        float(request.exp),
        tuple(scopes),
        tuple(audiences),
    )


def top_content(token: SubmissionToken) -> bytes:
    """What the storer hands the credd as ``<service>.top`` (JSON; read by jobtoken credmon)."""
    return json.dumps(
        {
            "mytoken": token.mytoken,
            "mytoken_server": token.server_url,
            "mom_id": token.mom_id,
            "expires_at": int(token.expires_at),
            "scopes": list(token.scopes),
            "audiences": list(token.audiences),
        },
        sort_keys=True,
    ).encode("ascii")


def run_storer(
    config: Config,
    arguments: Sequence[str],
    *,
    env: Mapping[str, str],
    lifetime_s: float = DEFAULT_LIFETIME_S,
    credd: Any = None,
) -> List[str]:
    """The storer program: mint and store one ``.top`` per argv item; returns the names.

    Raises:
        UsageError: no argument, or a mode other than ``vault``; JobtokenError: minting
            failed; ConfigError: the credd refused the credential.
    """
    mode = env.get("CONDOR_CREDENTIAL_STORER_MODE", "vault")
    if mode != "vault":
        raise UsageError(
            f"jobtoken handles vault-classified services only, not mode {mode!r} "
            "(set VAULT_CREDMON_PROVIDER_NAMES to the jobtoken services)"
        )
    if not arguments:
        raise UsageError("no credential requested (condor_submit passes service&... items)")
    requests = [parse_storer_argument(a) for a in arguments]
    source = find_user_mytoken(config, env)
    import htcondor2

    if credd is None:
        credd = htcondor2.Credd()

    stored = []
    for request in requests:
        scopes = request.scopes or config.token.scopes
        audiences = request.audiences or config.token.audiences
        token = mint_submission_mytoken(
            config,
            source,
            scopes=scopes,
            audiences=audiences,
            lifetime_s=lifetime_s,
            name=f"jobtoken condor {request.name}",
            env=env,
        )
        try:
            credd.add_user_service_cred(
                credtype=htcondor2.CredType.OAuth,
                credential=top_content(token),
                service=request.service,
                handle=request.handle,
                refresh=True,
            )
        except Exception as exc:  # HTCondorException and friends from the bindings
            raise ConfigError(
                f"credd refused the {request.name} credential: {' '.join(str(exc).split())}"
            ) from None
        logger.info("credential stored name=%s mom_id=%s", request.name, token.mom_id)
        stored.append(request.name)
    return stored
