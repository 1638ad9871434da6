"""Optional signature verification of access tokens: trusted issuers, OIDC discovery, JWKS.

jobtoken does not need to verify access tokens to do its job (storage does that), but a
site may want to refuse writing a token that no trusted issuer signed. The path follows
the WLCG Common JWT Profile: ``iss`` (unverified) must be in the trusted list; the issuer's
OIDC discovery document is fetched (RFC 8414 form
``https://host/.well-known/openid-configuration/<path>`` first, then
``<iss>/.well-known/openid-configuration``), its ``issuer`` must equal ``iss``; the JWKS
at ``jwks_uri`` is fetched; the key is chosen by the token's ``kid`` (required); pyjwt
verifies the signature with that key and an algorithm the key can actually use; ``exp``
is checked against the injected clock. Discovery and JWKS are cached per issuer for
``cache_s`` (the profile asks for at least an hour); an unknown ``kid`` triggers one early
refetch (key rotation), rate-limited so that garbage tokens cannot hammer the issuer; if a
refresh fails, keys younger than ``stale_s`` are still used.

This module must NOT decide what a token may do (scopes/audiences are ``_tokens``'s job),
accept symmetric algorithms, or log/put into messages the raw token.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import httpx
import jwt

from ._clock import Clock, SystemClock
from ._errors import JobtokenError, ProtocolError, ServerUnavailableError, TokenCheckError
from ._http import translate_http_error
from ._tokens import ALLOWED_ALGORITHMS, AccessToken

__all__ = ["SignatureVerifier", "discovery_urls"]

logger = logging.getLogger(__name__)

_WELL_KNOWN = "/.well-known/openid-configuration"
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


def discovery_urls(issuer: str) -> tuple[str, ...]:
    """Where to look for ``issuer``'s OIDC discovery document, in order of preference.

    For an issuer with a path, RFC 8414's insertion form comes first and the OIDC
    appended form second; without a path both are the same single URL.
    """
    base = issuer.rstrip("/")
    url = httpx.URL(base)
    path = url.path.rstrip("/")
    appended = base + _WELL_KNOWN
    if not path:
        return (appended,)
    inserted = str(url.copy_with(path=_WELL_KNOWN + path, query=None, fragment=None))
    return (inserted, appended)


def _algorithms_for(jwk: Mapping[str, Any]) -> frozenset[str]:
    """The asymmetric algorithms a JWK may verify (empty for unusable keys)."""
    kty = jwk.get("kty")
    if kty == "RSA":
        usable = set(_RSA_ALGORITHMS)
    elif kty == "EC":
        alg = _EC_ALGORITHMS.get(str(jwk.get("crv")))
        usable = {alg} if alg else set()
    elif kty == "OKP":
        usable = {"EdDSA"}
    else:  # "oct" (HMAC) and unknown types are never acceptable
        usable = set()
    declared = jwk.get("alg")
    if isinstance(declared, str):
        usable &= {declared}
    return frozenset(usable & ALLOWED_ALGORITHMS)


@dataclass(frozen=True)
class _KeySet:
    keys: Mapping[str, Mapping[str, Any]]  # kid -> JWK
    fetched_at: float  # monotonic


class SignatureVerifier:
    """Verify access-token signatures against a fixed list of trusted issuers.

    ``http_factory(url)`` returns an ``httpx.Client`` suitable for fetching ``url``
    (normally ``lambda url: _http.http_client(url, timeout_s=...)``, which enforces the
    TLS and loopback rules); the verifier closes each client after use. ``clock``
    defaults to the system clock; tests inject a fake one.
    """

    def __init__(
        self,
        trusted_issuers: Iterable[str],
        *,
        http_factory: Callable[[str], httpx.Client],
        clock: Optional[Clock] = None,
        cache_s: float = 3600.0,
        refetch_min_interval_s: float = 30.0,
        stale_s: float = 2 * 86400.0,
    ) -> None:
        self._trusted = frozenset(i for i in trusted_issuers if i)
        self._http_factory = http_factory
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._cache_s = cache_s
        self._refetch_min_interval_s = refetch_min_interval_s
        self._stale_s = stale_s
        self._cache: dict[str, _KeySet] = {}
        self._lock = threading.Lock()

    @property
    def trusted_issuers(self) -> frozenset[str]:
        return self._trusted

    def verify(self, token: AccessToken) -> Mapping[str, Any]:
        """Verify ``token``'s signature and expiry; return the verified claims.

        Raises:
            TokenCheckError: untrusted issuer, no or unknown ``kid``, algorithm not usable
                with the key, bad signature, expired.
            ServerUnavailableError: discovery or JWKS could not be fetched (transient).
            ProtocolError: discovery or JWKS documents are malformed.
            ConfigError: TLS verification failed, or a URL breaks the http rules.
        """
        ident = f"jti={token.jti or '-'}"
        if token.issuer not in self._trusted:
            raise TokenCheckError(
                f"access token {ident} has untrusted issuer {token.issuer!r} "
                f"(trusted: {', '.join(sorted(self._trusted)) or 'none'})"
            )
        if not token.key_id:
            raise TokenCheckError(f"access token {ident} has no 'kid' header; cannot pick a key")
        jwk = self._key(token.issuer, token.key_id)
        if jwk is None:
            raise TokenCheckError(
                f"access token {ident} is signed with key {token.key_id!r}, "
                f"which issuer {token.issuer} does not publish"
            )
        usable = _algorithms_for(jwk)
        if token.algorithm not in usable:
            raise TokenCheckError(
                f"access token {ident} uses {token.algorithm}, which key {token.key_id!r} "
                f"cannot verify (key allows: {', '.join(sorted(usable)) or 'nothing'})"
            )
        try:
            key = jwt.PyJWK(dict(jwk), algorithm=token.algorithm).key
            claims = jwt.decode(
                token.raw,
                key=key,
                algorithms=[token.algorithm],
                options={
                    "verify_signature": True,
                    "verify_exp": False,  # checked below against the injected clock
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "require": ["exp"],
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenCheckError(
                f"access token {ident} has a bad signature (key {token.key_id!r} of {token.issuer})"
            ) from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise TokenCheckError(
                f"access token {ident} could not be verified with key {token.key_id!r} "
                f"of {token.issuer} ({type(exc).__name__})"
            ) from None
        now = self._clock.now()
        if token.expires_at <= now:
            raise TokenCheckError(f"access token {ident} expired {now - token.expires_at:.0f}s ago")
        logger.debug(
            "access token signature verified iss=%s kid=%s jti=%s",
            token.issuer,
            token.key_id,
            token.jti,
        )
        return claims

    # -- key cache ---------------------------------------------------------------------

    def _key(self, issuer: str, kid: str) -> Optional[Mapping[str, Any]]:
        with self._lock:
            now = self._clock.monotonic()
            entry = self._cache.get(issuer)
            fetched_now = False
            if entry is None or now - entry.fetched_at >= self._cache_s:
                entry = self._refresh(issuer, entry, now)
                fetched_now = entry.fetched_at == now
            if kid in entry.keys:
                return entry.keys[kid]
            if fetched_now or now - entry.fetched_at < self._refetch_min_interval_s:
                return None
            logger.info("jwks refetch for unknown key iss=%s kid=%s", issuer, kid)
            entry = self._refresh(issuer, entry, now)
            return entry.keys.get(kid)

    def _refresh(self, issuer: str, old: Optional[_KeySet], now: float) -> _KeySet:
        try:
            keys = self._fetch_keys(issuer)
        except ServerUnavailableError as exc:
            if old is not None and now - old.fetched_at < self._stale_s:
                logger.warning(
                    "jwks refresh failed, using cached keys iss=%s error=%s", issuer, exc
                )
                return old
            raise
        entry = _KeySet(keys=keys, fetched_at=now)
        self._cache[issuer] = entry
        return entry

    def _fetch_keys(self, issuer: str) -> Mapping[str, Mapping[str, Any]]:
        jwks_uri = self._jwks_uri(issuer)
        data = self._get_json(jwks_uri, action="jwks fetch")
        raw_keys = data.get("keys")
        if not isinstance(raw_keys, list):
            raise ProtocolError(f"jwks fetch failed at {jwks_uri}: no 'keys' array", url=jwks_uri)
        keys: dict[str, Mapping[str, Any]] = {}
        for jwk in raw_keys:
            if not isinstance(jwk, dict):
                continue
            kid = jwk.get("kid")
            if not isinstance(kid, str) or not kid:
                continue
            if jwk.get("use", "sig") != "sig" or not _algorithms_for(jwk):
                continue
            keys.setdefault(kid, jwk)
        logger.debug("jwks fetched iss=%s url=%s keys=%d", issuer, jwks_uri, len(keys))
        return keys

    def _jwks_uri(self, issuer: str) -> str:
        failure: Optional[JobtokenError] = None
        for url in discovery_urls(issuer):
            try:
                doc = self._get_json(url, action="oidc discovery")
            except ProtocolError as exc:  # not found / not JSON here: try the next form
                failure = exc
                continue
            except ServerUnavailableError as exc:
                failure = exc
                continue
            if doc.get("issuer") != issuer:
                failure = ProtocolError(
                    f"oidc discovery failed at {url}: document is for issuer "
                    f"{doc.get('issuer')!r}, not {issuer!r}",
                    url=url,
                )
                continue
            jwks_uri = doc.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri:
                failure = ProtocolError(f"oidc discovery failed at {url}: no jwks_uri", url=url)
                continue
            return jwks_uri
        assert failure is not None
        raise failure

    def _get_json(self, url: str, *, action: str) -> dict[str, Any]:
        client = self._http_factory(url)
        try:
            logger.debug("%s request url=%s", action, url)
            try:
                response = client.get(url)
            except httpx.HTTPError as exc:
                raise translate_http_error(exc, url=url, action=action) from exc
            status = response.status_code
            logger.debug("%s response url=%s status=%s", action, url, status)
            if status == 429 or status >= 500:
                raise ServerUnavailableError(
                    f"{action} failed at {url}: HTTP {status}", status=status, url=url
                )
            if status != 200:
                raise ProtocolError(
                    f"{action} failed at {url}: HTTP {status}", status=status, url=url
                )
            try:
                data = json.loads(response.content)
            except ValueError:
                raise ProtocolError(
                    f"{action} failed at {url}: body is not JSON", status=status, url=url
                ) from None
            if not isinstance(data, dict):
                raise ProtocolError(
                    f"{action} failed at {url}: body is not a JSON object", status=status, url=url
                )
            return data
        finally:
            client.close()
