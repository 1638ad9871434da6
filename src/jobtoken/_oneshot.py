"""Library entry points behind the one-shot commands (``jobtoken token`` / ``inspect``).

Each takes typed settings and returns a typed, non-secret result; the CLI only
formats it. Building the HTTP client and the optional signature verifier from the
settings lives here too, so that ``run``, ``prepare`` and the integrations build
them the same way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence

from ._bearerdiscovery import default_token_path, discover_bearer_token, refuse_foreign_file
from ._clock import SystemClock, utc_text
from ._config import Config, ServerConfig, missing_setting
from ._errors import ConfigError, JobtokenError, TokenCheckError, TokenFileError, printable
from ._mytokenfile import MytokenSource, check_mytoken_value, load_mytoken
from ._policy import HealthThresholds, token_health
from ._tokenfile import read_secret_file, write_secret_file
from ._tokens import (
    AccessToken,
    check_access_token,
    decode_access_token,
    describe,
    unverified_claims,
)

if TYPE_CHECKING:  # the real imports are lazy: httpx stays out of light processes
    from ._jwks import SignatureVerifier
    from ._mytoken import MytokenClient

__all__ = [
    "TokenResult",
    "mytoken_client",
    "build_verifier",
    "client_for",
    "get_token",
    "inspect_token",
    "mytoken_source",
    "server_url_for",
    "summarize",
    "verifier_for",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenResult:
    path: Path
    token: AccessToken = field(repr=False)
    reused: bool
    now: float

    def summary(self) -> Dict[str, Any]:
        data = summarize(self.token, self.now)
        data.update({"path": str(self.path), "reused": self.reused})
        return data

    def human(self) -> str:
        verb = "kept" if self.reused else "wrote"
        left = _human_duration(self.token.remaining_s(self.now))
        scope = printable(" ".join(self.token.scopes))
        return f"{verb} {printable(str(self.path))} (expires in {left}; scope: {scope})"


def _human_duration(seconds: float) -> str:
    s = int(seconds)
    sign = "-" if s < 0 else ""
    s = abs(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{sign}{h}h{m:02d}m{sec:02d}s" if h else f"{sign}{m}m{sec:02d}s"


def summarize(token: AccessToken, now: float) -> Dict[str, Any]:
    """Non-secret facts about a token, for ``inspect`` and JSON output."""
    data = dict(describe(token))
    remaining = token.remaining_s(now)
    data["remaining_s"] = int(remaining)
    data["remaining_human"] = (
        "expired " + _human_duration(-remaining) + " ago" if remaining < 0
        else _human_duration(remaining) + " left"
    )
    data["exp_utc"] = utc_text(token.expires_at)
    return data


def mytoken_source(config: Config) -> MytokenSource:
    """The configured mytoken source.

    Raises:
        ConfigError: none configured.
    """
    if config.token.mytoken_file:
        return MytokenSource(path=Path(config.token.mytoken_file))
    if config.token.mytoken_env:
        return MytokenSource(env_var=config.token.mytoken_env)
    raise missing_setting("mytoken", "token.mytoken_file", "token.mytoken_env")


def server_url_for(config: Config, mytoken: Optional[str]) -> str:
    """The server URL: configured, else the ``iss`` of a JWT mytoken (as the mytoken CLI does).

    Raises:
        ConfigError: no URL configured and the mytoken does not name its server.
    """
    if config.server.url:
        return config.server.url
    claims = unverified_claims(mytoken) if mytoken else None
    iss = claims.get("iss") if claims else None
    if isinstance(iss, str) and iss:
        return iss
    raise missing_setting("Mytoken server", "server.url")


def mytoken_client(config: Config, url: str) -> MytokenClient:
    """A ``MytokenClient`` configured from the settings (imports httpx lazily)."""
    return client_for(config.server, url)


def build_verifier(config: Config) -> Optional[SignatureVerifier]:
    """A signature verifier when trusted issuers are configured, else None."""
    return verifier_for(config.server, config.token.trusted_issuers)


def client_for(server: ServerConfig, url: str) -> MytokenClient:
    """A ``MytokenClient`` for ``url`` with the TLS, timeout and deadline of ``server``.

    The deadline runs from here: build the client when the command's work starts.
    """
    from ._mytoken import MytokenClient

    return MytokenClient(
        url,
        timeout_s=server.timeout_s,
        deadline_s=server.deadline_s,
        ca_file=server.ca_file,
        ca_dir=server.ca_dir,
        allow_http=server.allow_http,
    )


def verifier_for(
    server: ServerConfig, trusted_issuers: Sequence[str]
) -> Optional[SignatureVerifier]:
    """A JWKS signature verifier for ``trusted_issuers`` (None when there are none)."""
    if not trusted_issuers:
        return None
    from ._http import http_client
    from ._jwks import SignatureVerifier

    def http_factory(base_url: str) -> Any:
        return http_client(
            base_url,
            timeout_s=server.timeout_s,
            ca_file=server.ca_file,
            ca_dir=server.ca_dir,
            allow_http=server.allow_http,
        )

    return SignatureVerifier(tuple(trusted_issuers), http_factory=http_factory)


def _existing_if_fresh(path: Path, config: Config, now: float) -> Optional[AccessToken]:
    try:
        raw = read_secret_file(path)
        token = decode_access_token(raw)
        check_access_token(
            token,
            requested_scopes=config.token.scopes,
            requested_audiences=config.token.audiences,
            now=now,
            min_valid_s=config.token.min_valid_s,
        )
    except JobtokenError as exc:
        logger.debug("existing token not reused path=%s reason=%s", path, exc.message)
        return None
    return token


def get_token(
    config: Config,
    *,
    out: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    metrics_dir: Optional[str] = None,
) -> TokenResult:
    """Write a checked access token from the configured mytoken to ``out``.

    With ``token.min_valid_s`` > 0 an existing token at ``out`` that is valid that
    long (and within the requested scopes and audiences) is kept and no request is
    made: cheap to call before every transfer. With ``metrics_dir`` (cron), the outcome
    is added to the metrics of the token file (its path is the ``job_id`` label).

    Raises:
        ConfigError, MytokenError, TokenCheckError, TokenFileError.
    """
    environ = os.environ if env is None else env
    path = Path(out or environ.get("BEARER_TOKEN_FILE") or default_token_path(environ))
    if not metrics_dir:
        return _get_token(config, path, environ)
    from ._metrics import record_oneshot

    try:
        result = _get_token(config, path, environ)
    except JobtokenError:
        record_oneshot(metrics_dir, str(path), ok=False, expires_at=None, renewed=False,
                       now=SystemClock().now())
        raise
    record_oneshot(metrics_dir, str(path), ok=True, expires_at=result.token.expires_at,
                   renewed=not result.reused, now=result.now)
    return result


def _get_token(config: Config, path: Path, environ: Mapping[str, str]) -> TokenResult:
    from ._exchange import TokenRequest, fetch_access_token

    if not path.parent.is_dir():
        raise TokenFileError(f"cannot write {path}: directory {path.parent} does not exist")
    refuse_foreign_file(path)
    now = SystemClock().now()
    if config.token.min_valid_s > 0:
        existing = _existing_if_fresh(path, config, now)
        if existing is not None:
            return TokenResult(path, existing, True, now)
    source = mytoken_source(config)
    mytoken = load_mytoken(source, env=environ)
    url = server_url_for(config, mytoken)
    with mytoken_client(config, url) as client:
        try:
            token = fetch_access_token(
                client,
                source,
                TokenRequest(
                    scopes=config.token.scopes,
                    audiences=config.token.audiences,
                    min_valid_s=config.token.min_valid_s,
                ),
                now=now,
                env=environ,
                verifier=build_verifier(config),
            )
        except TokenCheckError as exc:
            if config.token.scopes and not _restricts_scope(mytoken):
                raise TokenCheckError(
                    f"{exc.message}; this mytoken has no scope restriction, and for such a "
                    "mytoken the Mytoken server ignores the requested scopes and hands out "
                    "the OP's defaults: use a mytoken restricted to the scopes you ask for"
                ) from None
            raise
    write_secret_file(path, token.raw)
    return TokenResult(path, token, False, now)


def _restricts_scope(mytoken: str) -> bool:
    """Whether a JWT mytoken's restrictions name scopes (True when we cannot tell)."""
    if mytoken.count(".") != 2:
        return True
    import jwt

    try:
        claims = jwt.decode(mytoken, options={"verify_signature": False})
    except (jwt.PyJWTError, RecursionError, ValueError):
        return True
    restrictions = claims.get("restrictions") if isinstance(claims, dict) else None
    if not isinstance(restrictions, list) or not restrictions:
        return False
    return all(isinstance(r, dict) and r.get("scope") for r in restrictions)


def inspect_token(
    file: Optional[str] = None, thresholds: Optional[HealthThresholds] = None
) -> Dict[str, Any]:
    """Decode the token in ``file`` (or the one WLCG discovery finds) without verifying it.

    ``health`` and ``health_reason`` are ``_policy.token_health``'s verdict on its
    remaining lifetime under ``thresholds`` (default: only an expired token is CRITICAL).

    Raises:
        TokenFileError: no token found or unreadable; TokenCheckError: not a usable JWT.
    """
    if file:
        raw, source = read_secret_file(file), file
        if not raw:
            raise TokenFileError(f"token file {file} is empty")
    else:
        found = discover_bearer_token()
        if found is None:
            raise TokenFileError("no bearer token found by WLCG discovery")
        raw, source = found.token, found.source
    try:
        check_mytoken_value(raw, "")
    except ConfigError:
        pass
    else:
        if raw.count(".") == 2:
            raise TokenCheckError(f"{source} holds a mytoken, not an access token")
    token = decode_access_token(raw)
    now = SystemClock().now()
    data = summarize(token, now)
    data["source"] = source
    verdict, reason = token_health(token.remaining_s(now), thresholds or HealthThresholds())
    data.update(health=verdict.name, health_reason=reason)
    return data
