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

from .._clock import Clock, SystemClock, utc_text
from .._config import Config, missing_setting, setting
from .._errors import ConfigError, JobtokenError, UsageError
from .._mytokenfile import MytokenSource, load_mytoken
from ._condor_bindings import bindings, condor_param

__all__ = [
    "CondorCredd",
    "CredentialRequest",
    "SubmissionToken",
    "find_user_mytoken",
    "mint_submission_mytoken",
    "parse_storer_argument",
    "run_storer",
    "split_requests",
    "top_content",
    "wait_for_use",
]

logger = logging.getLogger(__name__)

SUBMISSION_CAPABILITIES = ("AT", "create_mytoken")
DEFAULT_LIFETIME_S = 7 * 24 * 3600.0
# the "format" member of every .top the storer writes
TOP_FORMAT = "jobtoken-top-1"
HANDLES_PARENT = json.dumps({"format": TOP_FORMAT, "handles": True}).encode()


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
        from .._oneshot import mytoken_source

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
        f"no mytoken: set {setting('token.mytoken_file')}, or keep one in "
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
    from .._oneshot import mytoken_client, server_url_for
    from .._submytoken import SubMytokenRequest, mint_sub_mytoken

    if not scopes:
        raise missing_setting("scope for the submission", "token.scopes")
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
    with mytoken_client(config, url) as client:
        # a shared name ("jobtoken submission"): a lost answer is not searched for by name
        minted = mint_sub_mytoken(client, parent, source, request)
    logger.info(
        "submission mytoken minted mom_id=%s scope=%s aud=%s exp=%s server=%s",
        minted.mom_id,
        " ".join(request.scopes),
        " ".join(audiences) or "-",
        utc_text(request.exp),
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
    """What the storer hands the credd as ``<name>.top`` (JSON; read by ``jobtoken credmon``).

    Not ``scopes``/``audience``: the credd compares those members with the query's (empty)
    ones when anyone asks whether the credential exists, and then says it does not.
    """
    return json.dumps(
        {
            "format": TOP_FORMAT,
            "mytoken": token.mytoken,
            "mytoken_server": token.server_url,
            "mom_id": token.mom_id,
            "expires_at": int(token.expires_at),
            "jobtoken_scopes": list(token.scopes),
            "jobtoken_audiences": list(token.audiences),
        },
        sort_keys=True,
    ).encode("ascii")


@dataclass(frozen=True)
class CondorCredd:
    """The installed bindings' credd API, whichever HTCondor version they come from.

    ``add_user_service_cred(refresh=True)`` exists from 24.10 on, and there the credd
    would store a credential of a service no credmon type claims as a ``.use`` (sent to
    jobs as is) unless told it needs refreshing; 23.x and 24.0 have no ``refresh`` and
    always store a ``.top``. ``htcondor2`` exists from 23.x; ``htcondor`` is the older
    module (``CredTypes``).
    """

    credd: Any
    oauth: Any
    has_refresh: bool
    module: Any

    @classmethod
    def from_bindings(cls, credd: Any = None) -> CondorCredd:
        """Raises: ConfigError: no HTCondor bindings."""
        module = bindings()
        if module is None:
            raise ConfigError("no HTCondor python bindings (htcondor2 or htcondor) on this host")
        oauth = (getattr(module, "CredType", None) or module.CredTypes).OAuth
        target = credd if credd is not None else module.Credd()
        return cls(target, oauth, _accepts(target.add_user_service_cred, "refresh"), module)

    def store(self, request: CredentialRequest, content: bytes) -> None:
        kwargs: Dict[str, Any] = {
            "credtype": self.oauth,
            "credential": content,
            "service": request.service,
            "handle": request.handle,
        }
        if self.has_refresh:
            kwargs["refresh"] = True
        self.credd.add_user_service_cred(**kwargs)

    def use_time(self, request: CredentialRequest) -> Tuple[Optional[int], Optional[int]]:
        """(mtime of the ``.top``, mtime of the ``.use``) as the credd reports them."""
        answer = self.credd.query_user_service_cred(self.oauth, request.service, request.handle)
        if not isinstance(answer, str):
            return None, None
        found: Dict[str, int] = {}
        for line in answer.splitlines():
            key, sep, value = line.partition("=")
            if sep and value.strip().lstrip("-").isdigit():
                found[key.strip().lower()] = int(value.strip())
        return found.get(f"top{request.name}time".lower()), found.get(request.name.lower())

    def knob(self, name: str, default: str) -> str:
        return condor_param(name, default, self.module) or default


def _accepts(function: Any, keyword: str) -> bool:
    import inspect

    try:
        return keyword in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False  # a compiled (boost) function: the old API


def split_requests(
    arguments: Sequence[str], services: Sequence[str]
) -> Tuple[List[CredentialRequest], List[str]]:
    """(the requests for our services, the argv items of every other service as given).

    Raises:
        UsageError: an item of ours cannot be read.
    """
    ours: List[CredentialRequest] = []
    others: List[str] = []
    for item in arguments:
        service = item.split("&", 1)[0]
        if service in services:
            ours.append(parse_storer_argument(item))
        else:
            others.append(item)
    return ours, others


def _run_site_storer(storer: str, items: Sequence[str], env: Mapping[str, str]) -> None:
    """Hand the other services to the site's own storer, as condor_submit would have."""
    import subprocess

    try:
        rc = subprocess.run([storer, *items], env=dict(env), stdin=subprocess.DEVNULL).returncode
    except OSError as exc:
        raise ConfigError(
            f"cannot run the site's credential storer {storer}: {exc.strerror}"
        ) from None
    if rc != 0:
        raise ConfigError(f"the site's credential storer {storer} failed (exit {rc})")


def wait_for_use(
    credd: CondorCredd,
    request: CredentialRequest,
    *,
    timeout_s: float,
    poll_s: float = 0.5,
    clock: Optional[Clock] = None,
) -> bool:
    """Wait until the credd has a ``.use`` at least as new as the ``.top`` just stored.

    condor_submit does not wait for a storer's credential, and a job that starts before
    the credmon wrote its ``.use`` is held ("Job credentials are not available").

    Returns:
        True when it is there; False when the time ran out.
    """
    import threading

    real_clock = clock or SystemClock()
    never = threading.Event()
    deadline = real_clock.monotonic() + timeout_s
    while True:
        try:
            top_at, use_at = credd.use_time(request)
        except Exception as exc:
            logger.debug("credd query failed: %s", exc)
            top_at, use_at = None, None
        if use_at is not None and (top_at is None or use_at >= top_at):
            return True
        left = deadline - real_clock.monotonic()
        if left <= 0:
            return False
        real_clock.wait(never, min(poll_s, left))


def run_storer(
    config: Config,
    arguments: Sequence[str],
    *,
    env: Mapping[str, str],
    lifetime_s: float = DEFAULT_LIFETIME_S,
    credd: Any = None,
    wait_s: Optional[float] = None,
) -> List[str]:
    """The storer program: mint and store one ``.top`` per credential of ours.

    condor_submit 23.x/24.0 runs the storer for *every* service in
    ``use_oauth_services`` (25.x: those classified Vault, once per mode). Services that
    are not ours (``JOBTOKEN_SERVICES``, default ``jobtoken``) go to the site's own
    storer (``JOBTOKEN_SITE_CREDENTIAL_STORER``) when one is configured, else are left
    to whichever credmon owns them.

    Returns:
        The names of the credentials stored.

    Raises:
        UsageError: an unreadable argument of ours; JobtokenError: minting failed;
        ConfigError: the credd refused the credential, its ``.use`` did not appear, or
        the site's storer failed.
    """
    bindings = CondorCredd.from_bindings(credd)
    services = tuple(bindings.knob("JOBTOKEN_SERVICES", "jobtoken").replace(",", " ").split())
    mode = env.get("CONDOR_CREDENTIAL_STORER_MODE", "vault")
    ours, others = split_requests(arguments, services) if mode == "vault" else ([], list(arguments))
    if others:
        site_storer = bindings.knob("JOBTOKEN_SITE_CREDENTIAL_STORER", "")
        if site_storer:
            _run_site_storer(site_storer, others, env)
        else:
            logger.info(
                "not ours, left to their credmon: %s",
                " ".join(item.split("&", 1)[0] for item in others),
            )
    if not ours:
        return []
    source = find_user_mytoken(config, env)
    if wait_s is None:
        try:
            wait_s = float(bindings.knob("CREDD_POLLING_TIMEOUT", "20"))
        except ValueError:
            wait_s = 20.0
    stored = []
    for parent in sorted({r.service for r in ours if r.handle}):
        # HTCondor 23.9's Vault credmon reads every .top and deletes <svc>_<handle> when
        # <svc>.top is missing; a parent without a mytoken keeps it away (ours skip it).
        # An existing <svc>.top (another submission's credential without a handle) is kept.
        try:
            if bindings.use_time(CredentialRequest(parent))[0] is not None:
                continue
            bindings.store(CredentialRequest(parent), HANDLES_PARENT)
        except Exception as exc:
            raise ConfigError(
                f"credd refused the {parent} credential: {' '.join(str(exc).split())}"
            ) from None
    for request in ours:
        token = mint_submission_mytoken(
            config,
            source,
            scopes=request.scopes or config.token.scopes,
            audiences=request.audiences or config.token.audiences,
            lifetime_s=lifetime_s,
            name=f"jobtoken condor {request.name}",
            env=env,
        )
        try:
            bindings.store(request, top_content(token))
        except Exception as exc:  # HTCondorException and friends from the bindings
            _revoke_quietly(config, token)
            raise ConfigError(
                f"credd refused the {request.name} credential: {' '.join(str(exc).split())}"
            ) from None
        logger.info("credential stored name=%s mom_id=%s", request.name, token.mom_id)
        if not wait_for_use(bindings, request, timeout_s=wait_s):
            raise ConfigError(
                f"no {request.name}.use from the access point's credmon after {wait_s:.0f} s "
                "(is JOBTOKEN_CREDMON in DAEMON_LIST running? see its log, "
                "JOBTOKEN_CREDMON_LOG)"
            )
        stored.append(request.name)
    return stored


def _revoke_quietly(config: Config, token: SubmissionToken) -> None:
    """A minted mytoken we cannot use is revoked (best effort, one line on failure)."""
    from .._oneshot import mytoken_client

    try:
        with mytoken_client(config, token.server_url) as client:
            client.revoke(token.mytoken, recursive=True)
    except JobtokenError as exc:
        logger.warning("cannot revoke the unstored submission mytoken: %s", exc.message)
