"""Access tokens: decode a JWT access token and judge it against what was asked for.

``decode_access_token`` reads the header and claims with pyjwt *without* verifying the
signature (that is ``_jwks``'s optional job): jobtoken is a client that holds the token,
not the relying party, and uses the claims to schedule renewals and to catch an OP or
Mytoken server that handed out more, less or older than requested.
``check_access_token`` is pure: it takes ``now`` as an argument.

This module must NOT do network I/O, read clocks, write files, or ever put the raw token
into a message, a log line or a repr.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import jwt

from ._errors import TokenCheckError
from ._scopes import invalid_scopes, join_scopes, parse_scopes, scopes_within

__all__ = [
    "ALLOWED_ALGORITHMS",
    "ANY_AUDIENCE",
    "CLOCK_SKEW_S",
    "IDENTITY_SCOPES",
    "MAX_TOKEN_CHARS",
    "AccessToken",
    "check_access_token",
    "decode_access_token",
    "describe",
    "is_identity_scope",
    "looks_like_jwt",
    "string_or_strings",
]

# Asymmetric JWS algorithms only (WLCG profile: RS256 and ES256 MUST be supported; HMAC
# is incompatible with a relying party that does not share the issuer's secret).
ALLOWED_ALGORITHMS = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)

# How far in the future ``iat``/``nbf`` may lie before we call the token (or our clock)
# broken. Issuers backdate ``nbf`` by about a minute; worker-node clocks drift more.
CLOCK_SKEW_S = 300.0

# Real WLCG access tokens are 1-4 KB; anything past this is not a token we should hold.
MAX_TOKEN_CHARS = 16384

# The WLCG profile's "any relying party" audience: accepted only when it was asked for.
ANY_AUDIENCE = "https://wlcg.cern.ch/jwt/v1/any"

# OpenID Connect / WLCG scopes that name who the user is or which token profile to use,
# and grant no storage or compute right. The real Mytoken server appends
# ``offline_access`` to every scoped refresh request (oidc-mytoken/server,
# internal/oidc/oidcreqres/request.go), and OPs echo it and ``openid`` in the AT's
# ``scope``; refusing them would refuse every token. ``wlcg:<MAJOR.MINOR>`` (a profile
# version request) is one of them too.
IDENTITY_SCOPES = frozenset(
    {"openid", "offline_access", "profile", "email", "address", "phone", "wlcg"}
)
_WLCG_VERSION_SCOPE = re.compile(r"wlcg:[0-9]+\.[0-9]+")
_GROUPS_CLAIM = "wlcg.groups"
_GROUPS_SCOPE = "wlcg.groups"

_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class AccessToken:
    """A decoded (not signature-verified) JWT access token.

    ``raw`` and ``claims`` are kept out of ``repr`` so a token never lands in a log or a
    traceback by accident.
    """

    raw: str = field(repr=False)
    issuer: str
    subject: str
    jti: str
    issued_at: Optional[float]
    expires_at: float
    not_before: Optional[float]
    scopes: tuple[str, ...]
    audiences: tuple[str, ...]
    wlcg_ver: Optional[str]
    algorithm: str
    key_id: Optional[str]
    claims: Mapping[str, Any] = field(repr=False)

    def remaining_s(self, now: float) -> float:
        """Seconds until ``exp`` at wall-clock time ``now`` (negative once expired)."""
        return self.expires_at - now

    @property
    def has_scope_claim(self) -> bool:
        """Whether the token carries a ``scope`` claim at all (even an empty one)."""
        return "scope" in self.claims


def looks_like_jwt(raw: str) -> bool:
    """Whether ``raw`` has the shape of a compact JWS (three base64url parts).

    Surrounding whitespace is ignored (token files end with a newline). This is a shape
    test only; :func:`decode_access_token` does the real parsing.
    """
    if not isinstance(raw, str):
        return False
    text = raw.strip()
    return len(text) <= MAX_TOKEN_CHARS and _JWT_SHAPE.fullmatch(text) is not None


def _fail(what: str) -> TokenCheckError:
    return TokenCheckError(f"access token refused: {what}")


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> Optional[float]:
    value = claims.get(name)
    if value is None:
        if required:
            raise _fail(f"no '{name}' claim")
        return None
    # bool is an int subclass in Python; a JSON true is not a time.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"'{name}' claim is not a number")
    try:
        number = float(value)
    except OverflowError:  # a 400-digit integer is valid JSON, but no time
        raise _fail(f"'{name}' claim is not a finite number") from None
    if not math.isfinite(number):
        raise _fail(f"'{name}' claim is not a finite number")
    return number


def _string(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name, "")
    if not isinstance(value, str):
        raise _fail(f"'{name}' claim is not a string")
    return value


def string_or_strings(value: Any) -> Optional[tuple[str, ...]]:
    """A JSON member that may be one string or an array of strings (``aud``, an OP's
    ``audience``), as its non-empty items once each; None when it has another shape."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(dict.fromkeys(v for v in value if v))
    return None


def _string_list(value: Any, name: str) -> tuple[str, ...]:
    items = string_or_strings(value)
    if items is None:
        raise _fail(f"'{name}' claim is neither a string nor a list of strings")
    return items


def _scopes_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    value = claims.get("scope")
    if value is None:
        return ()
    if isinstance(value, str):
        return parse_scopes(value)
    # Some issuers send a JSON array; accept it rather than pretend there is no scope.
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return parse_scopes(" ".join(value))
    raise _fail("'scope' claim is neither a string nor a list of strings")


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _strict_payload(text: str) -> dict[str, Any]:
    """A compact JWT's payload as a JSON object, refusing duplicate keys at any depth.

    JSON leaves duplicates to the parser: Python keeps the last, other libraries the
    first. A payload with ``"scope"`` twice means different things to us and to the
    storage (or Mytoken server) that reads it, so it is not a token we hand on.

    Raises:
        ValueError: unreadable, not an object, or a repeated key (``_DuplicateKey``).
    """
    segment = text.split(".")[1]
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        claims = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey:
        raise
    except (ValueError, binascii.Error, RecursionError) as exc:
        raise ValueError(type(exc).__name__) from None
    if not isinstance(claims, dict):
        raise ValueError("not a JSON object")
    return claims


def _strict_claims(text: str) -> dict[str, Any]:
    """``_strict_payload`` for an access token, failing as a refused token."""
    try:
        return _strict_payload(text)
    except _DuplicateKey as exc:
        raise _fail(f"JWT claims repeat the key {exc.key[:64]!r}") from None
    except ValueError as exc:
        if str(exc) == "not a JSON object":
            raise _fail("JWT claims are not a JSON object") from None
        raise _fail(f"unreadable JWT claims ({exc})") from None


def _jwt_text(raw: Any) -> str:
    """``raw`` stripped, if it has a JWT's size and shape (``TokenCheckError`` if not)."""
    if not isinstance(raw, str):
        raise _fail("not a string")
    text = raw.strip()
    if len(text) > MAX_TOKEN_CHARS:
        raise _fail(f"longer than {MAX_TOKEN_CHARS} characters")
    if not _JWT_SHAPE.fullmatch(text):
        raise _fail("not a JWT (expected three base64url parts separated by dots)")
    return text


def _signing_header(text: str) -> tuple[str, Optional[str]]:
    """``(alg, kid)`` of an asymmetrically signed JWT; never ``none`` or HMAC.

    Raises:
        TokenCheckError: unreadable header, or an algorithm a WLCG token cannot have.
    """
    try:
        header = jwt.get_unverified_header(text)
    except (jwt.PyJWTError, RecursionError) as exc:
        raise _fail(f"unreadable JWT header ({type(exc).__name__})") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise _fail("JWT header has no 'alg'")
    if alg.lower() == "none":
        raise _fail("unsigned JWT (alg 'none')")
    if alg.upper().startswith("HS"):
        raise _fail(f"symmetric JWT algorithm {alg} (WLCG tokens are signed asymmetrically)")
    if alg not in ALLOWED_ALGORITHMS:
        raise _fail(f"unsupported JWT algorithm {alg!r}")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _fail("JWT header 'kid' is not a string")
    return alg, kid


def _wlcg_version(ver: Any) -> Optional[str]:
    """``wlcg.ver`` as text; some issuers send the number ``1.0``."""
    if isinstance(ver, (int, float)) and not isinstance(ver, bool):
        return str(ver)
    if ver is not None and not isinstance(ver, str):
        raise _fail("'wlcg.ver' claim is not a string")
    return ver


def decode_access_token(raw: str) -> AccessToken:
    """Decode a JWT access token's header and claims without verifying the signature.

    Surrounding whitespace is stripped (WLCG discovery readers strip it too).

    Raises:
        TokenCheckError: not a JWT, oversize, algorithm ``none``/HMAC/unknown, no ``exp``,
            non-numeric ``exp``/``iat``/``nbf``, or claims of the wrong type. The message
            never contains the token.
    """
    text = _jwt_text(raw)
    alg, kid = _signing_header(text)
    try:
        claims = jwt.decode(
            text,
            options={
                "verify_signature": False,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except (jwt.PyJWTError, RecursionError) as exc:
        # pyjwt's messages may quote parts of the payload; keep only the class name.
        raise _fail(f"unreadable JWT claims ({type(exc).__name__})") from None
    claims = _strict_claims(text)
    expires_at = _number(claims, "exp", required=True)
    assert expires_at is not None
    return AccessToken(
        raw=text,
        issuer=_string(claims, "iss"),
        subject=_string(claims, "sub"),
        jti=_string(claims, "jti"),
        issued_at=_number(claims, "iat", required=False),
        expires_at=expires_at,
        not_before=_number(claims, "nbf", required=False),
        scopes=_scopes_of(claims),
        audiences=_string_list(claims.get("aud"), "aud"),
        wlcg_ver=_wlcg_version(claims.get("wlcg.ver")),
        algorithm=alg,
        key_id=kid,
        claims=claims,
    )


def _as_items(values: Iterable[str]) -> tuple[str, ...]:
    # A bare string is the space-separated wire form, not an iterable of characters.
    if isinstance(values, str):
        return parse_scopes(values)
    return tuple(dict.fromkeys(v for v in values if v))


def check_access_token(
    token: AccessToken,
    *,
    requested_scopes: Iterable[str],
    requested_audiences: Iterable[str],
    now: float,
    min_valid_s: float = 0.0,
    previous: Optional[AccessToken] = None,
) -> None:
    """Refuse an access token that is not what the job asked for.

    Checks, in order: not expired and at least ``min_valid_s`` left; ``nbf``/``iat`` not
    more than :data:`CLOCK_SKEW_S` in the future; no ``storage.*`` scope without a path;
    when scopes were requested, a ``scope`` claim exists, is not empty and every granted
    capability scope (in ``scope`` or ``scp``) is covered by a requested one (WLCG path
    rules, so an OP may narrow but never widen), identity scopes such as
    ``offline_access`` aside, and every ``wlcg.groups`` entry was asked for; when
    audiences were requested, ``aud`` is exactly that set (exact strings; the ``any``
    wildcard only if asked for). With nothing requested there is no upper bound to
    judge against;
    when ``previous`` (the token being replaced) is given, the new one extends it
    (``_extends``).

    Raises:
        TokenCheckError: the first failed check, as a one-line message naming the token by
            its ``jti`` only.
    """
    ident = f"jti={token.jti or '-'}"
    _check_time(token, ident, now, min_valid_s)
    bad = invalid_scopes(token.scopes)
    if bad:
        raise TokenCheckError(
            f"access token {ident} carries invalid scopes: {join_scopes(bad)} "
            "(storage scopes need an absolute path)"
        )
    wanted_scopes = _as_items(requested_scopes)
    if wanted_scopes:
        _check_scopes(token, ident, wanted_scopes)
    wanted_audiences = _as_items(requested_audiences)
    if wanted_audiences:
        _check_audiences(token, ident, wanted_audiences)
    if previous is not None and not _extends(token, previous):
        raise TokenCheckError(
            f"access token {ident} did not extend the expiry "
            f"(exp={token.expires_at:.0f}, previous exp={previous.expires_at:.0f})"
        )


def _check_time(token: AccessToken, ident: str, now: float, min_valid_s: float) -> None:
    """Valid now, for ``min_valid_s`` more, and not issued in the future (beyond skew)."""
    remaining = token.remaining_s(now)
    if remaining <= 0:
        raise TokenCheckError(
            f"access token {ident} expired {-remaining:.0f}s ago (exp={token.expires_at:.0f})"
        )
    if remaining < min_valid_s:
        raise TokenCheckError(
            f"access token {ident} is valid for only {remaining:.0f}s, "
            f"need at least {min_valid_s:.0f}s"
        )
    for name, instant in (("nbf", token.not_before), ("iat", token.issued_at)):
        if instant is not None and instant > now + CLOCK_SKEW_S:
            raise TokenCheckError(
                f"access token {ident} has '{name}' {instant - now:.0f}s in the future "
                f"(more than {CLOCK_SKEW_S:.0f}s clock skew; check this host's clock)"
            )


def is_identity_scope(scope: str) -> bool:
    """Whether ``scope`` only names the user or the token profile (see IDENTITY_SCOPES)."""
    return scope in IDENTITY_SCOPES or _WLCG_VERSION_SCOPE.fullmatch(scope) is not None


def _capabilities(scopes: Iterable[str]) -> tuple[str, ...]:
    return tuple(s for s in scopes if not is_identity_scope(s))


def _check_scopes(token: AccessToken, ident: str, wanted: tuple[str, ...]) -> None:
    """Capability scopes, ``scp`` and ``wlcg.groups`` within the request; identity ones free.

    The WLCG profile defines only ``scope`` and tells relying parties to ignore claims
    it does not define; not every one does (RFC 9068 and several libraries read
    ``scp``), so an ``scp`` claim is judged like ``scope``. Groups are asked for with
    the ``wlcg.groups`` scope (bare: the default groups; ``wlcg.groups:/vo/sub``: that
    group); any group the request did not name is a wider token.
    """
    if not token.has_scope_claim or not token.scopes:
        raise TokenCheckError(
            f"access token {ident} has no scopes, but {join_scopes(wanted)} were requested"
        )
    extra = scopes_within(_capabilities(token.scopes), wanted)
    if extra:
        raise TokenCheckError(
            f"access token {ident} grants scopes beyond the request: {join_scopes(extra)} "
            f"(requested: {join_scopes(wanted)})"
        )
    if "scp" in token.claims:
        scp = _string_list(token.claims.get("scp"), "scp")
        granted = tuple(dict.fromkeys(p for item in scp for p in parse_scopes(item)))
        extra = scopes_within(_capabilities(granted), wanted)
        if extra:
            raise TokenCheckError(
                f"access token {ident} has an 'scp' claim granting beyond the request: "
                f"{join_scopes(extra)} (requested: {join_scopes(wanted)})"
            )
    unasked = _unasked_groups(_string_list(token.claims.get(_GROUPS_CLAIM), _GROUPS_CLAIM), wanted)
    if unasked:
        raise TokenCheckError(
            f"access token {ident} carries groups that were not requested: "
            f"{' '.join(unasked)} (ask with the scope {_GROUPS_SCOPE}:<group>)"
        )


def _unasked_groups(groups: tuple[str, ...], wanted: tuple[str, ...]) -> list[str]:
    """Groups the request did not name; a bare ``wlcg.groups`` asked for the defaults."""
    if _GROUPS_SCOPE in wanted:
        return []
    asked = {s[len(_GROUPS_SCOPE) + 1 :] for s in wanted if s.startswith(_GROUPS_SCOPE + ":")}
    return [g for g in groups if g not in asked]


def _check_audiences(token: AccessToken, ident: str, wanted: tuple[str, ...]) -> None:
    """``aud`` must be exactly the requested set: an extra audience (above all the WLCG
    ``any`` wildcard) makes the token usable at services the job never named."""
    got = " ".join(token.audiences) or "none"
    missing = [a for a in wanted if a not in token.audiences]
    if missing:
        raise TokenCheckError(
            f"access token {ident} lacks audience {' '.join(missing)} (aud: {got}); "
            "the OP may ignore the audience parameter"
        )
    extra = [a for a in token.audiences if a not in wanted]
    if extra:
        raise TokenCheckError(
            f"access token {ident} is valid for audiences beyond the request: "
            f"{' '.join(extra)} (requested: {' '.join(wanted)})"
        )


def _extends(token: AccessToken, previous: AccessToken) -> bool:
    """Whether replacing ``previous`` by ``token`` is a renewal, not a stale answer.

    A later ``exp`` is. Token times are whole seconds, so a token issued in the same
    second as the previous one has the same ``exp`` and is just as good (``ensure`` and
    the sidecar may renew back to back); it is told apart from the same token handed out
    again by its ``jti`` and bytes. An ``exp`` that stayed while ``iat`` moved is stale:
    accepting it would make the sidecar renew again at once, and again.
    """
    if token.expires_at > previous.expires_at:
        return True
    return (
        token.expires_at == previous.expires_at
        and token.issued_at is not None
        and token.issued_at == previous.issued_at
        and token.raw != previous.raw
        and not (token.jti and token.jti == previous.jti)
    )


def describe(token: AccessToken) -> dict[str, Any]:
    """A non-secret summary of ``token`` for ``jobtoken inspect`` and logs.

    Contains only ``iss, sub, jti, scopes, audiences, iat, nbf, exp, wlcg.ver, alg, kid``;
    never the raw token or the signature.
    """
    return {
        "iss": token.issuer,
        "sub": token.subject,
        "jti": token.jti,
        "scopes": list(token.scopes),
        "audiences": list(token.audiences),
        "iat": token.issued_at,
        "nbf": token.not_before,
        "exp": token.expires_at,
        "wlcg.ver": token.wlcg_ver,
        "alg": token.algorithm,
        "kid": token.key_id,
    }


def unverified_jwt(text: str) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """``(header, claims)`` of a JWT read WITHOUT verifying it; None if it is not one.

    Only for decisions a forged value cannot turn against us: which server a mytoken
    names (TLS still checks that server), when a parent expires (the server enforces it),
    whether a file holds a mytoken or an access token, and to refuse a minted
    mytoken whose own claims are wider than asked. Never for trusting a token. A
    payload that repeats a key is no readable JWT (None), as in ``decode_access_token``.
    """
    if not isinstance(text, str) or text.count(".") != 2:
        return None
    try:
        header = jwt.get_unverified_header(text)
        claims = jwt.decode(text, options={"verify_signature": False, "verify_exp": False,
                                           "verify_nbf": False, "verify_iat": False,
                                           "verify_aud": False, "verify_iss": False})
        claims = _strict_payload(text)  # pyjwt keeps the last of duplicate keys
    except (jwt.PyJWTError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    return header, claims


def unverified_claims(text: str) -> Optional[dict[str, Any]]:
    """The claims of ``unverified_jwt``; None if ``text`` is not a readable JWT."""
    read = unverified_jwt(text)
    return None if read is None else read[1]
