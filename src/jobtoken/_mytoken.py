"""Mytoken API v0 client (``MytokenClient``) on httpx.

Speaks the wire format of the real oidc-mytoken server: endpoints always come from the
discovery document (``/.well-known/mytoken-configuration`` under the server URL, path
prefix kept), which is fetched once per process per server URL; AT requests send
``scope``/``audience`` as space-separated strings and get ``audience`` back as an array;
a rotated mytoken arrives nested in ``token_update`` (never ``updated_token``);
``error_description`` may be missing; 429 bodies are plain text.

Error mapping (every httpx exception is translated here, via ``_http``):

* 400/401/403 and other 4xx → ``MytokenRejectedError`` (status, error, description);
  except OAuth-style transient codes (``temporarily_unavailable``, ``server_error``,
  including an ``oidc_error`` whose OP error is one of those) → ``ServerUnavailableError``.
* 429, 5xx (JSON or HTML), 408 → ``ServerUnavailableError`` with ``retry_after_s`` from
  ``Retry-After`` (seconds or HTTP date).
* timeouts, refused/reset connections → ``ServerUnavailableError``; a failed TLS
  certificate verification → ``ConfigError`` (not retryable: a wrong trust store or a
  bad server certificate does not heal by retrying).
* 3xx (never followed), non-JSON/truncated bodies, missing or mistyped fields, an
  implausible ``token_update.mytoken``, a body over :data:`MAX_RESPONSE_BYTES`, JSON
  nested deeper than Python parses, a number no float holds, a restriction time or
  count that is not a plausible integer → ``ProtocolError``. A freshly minted mytoken
  whose answer is unusable this way is revoked before the error is raised.
* the client's overall ``deadline_s`` (a slow server dripping a byte at a time never
  trips a per-read timeout) → ``ServerUnavailableError``; revocation, the clean-up
  after a failure, always gets at least ``timeout_s`` of its own.

This module must NOT write files (persisting a rotated mytoken is the caller's job, and
must happen before the next request), retry (the renewal policy owns retries), or log,
repr or put into a message any token or mytoken.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import httpx

from ._clock import Clock, SystemClock
from ._errors import (
    ConfigError,
    MytokenError,
    MytokenRejectedError,
    ProtocolError,
    ServerUnavailableError,
)
from ._http import http_client, parse_retry_after, translate_http_error, url_problem
from ._scopes import parse_scopes
from ._tokens import string_or_strings, unverified_claims

__all__ = [
    "DISCOVERY_PATH",
    "MAX_RESPONSE_BYTES",
    "AccessTokenResponse",
    "ServerMetadata",
    "MytokenClient",
    "MytokenResponse",
    "SubtokenEntry",
    "SubtokenListing",
    "clear_discovery_cache",
    "is_plausible_mytoken",
]

logger = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/mytoken-configuration"

# Nothing the Mytoken API answers comes near this (a JWT mytoken is at most 64 KiB);
# without a cap a hostile server makes us hold whatever it sends in memory.
MAX_RESPONSE_BYTES = 1 << 20
# Restriction numbers (times, usage counts) above this are no time and no count.
_MAX_RESTRICTION_NUMBER = 1 << 53
_RESTRICTION_NUMBERS = ("nbf", "exp", "iat", "usages_AT", "usages_other")

# The server treats anything shorter as "not a token"; short tokens default to 64 chars.
MIN_MYTOKEN_CHARS = 32
MAX_MYTOKEN_CHARS = 65536
_MAX_DESCRIPTION_CHARS = 300
_RESPONSE_TYPES = ("token", "short_token", "transfer_code")
# OAuth error codes that say "try again later" even under a 4xx status.
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "internal_server_error"})
# What the server's own text leaves out, keyed by a piece of its error_description.
_DESCRIPTION_HINTS = (
    (
        "not subset of original restrictions",
        "Mytoken compares scope strings exactly, without WLCG path rules: the parent mytoken "
        "must leave 'scope' open or list the exact scope string the job asks for",
    ),
)
_HINTS = {
    "invalid_token": "the mytoken was revoked, has expired or is not this server's: create a "
    "new mytoken (a job's: prepare the job again)",
    "usage_restricted": "no restriction of the mytoken allows this use (time, host, usage "
    "count, or scope/audience strings that do not match the restriction exactly)",
    "insufficient_capabilities": "the mytoken lacks the capability for this request",
}


@dataclass(frozen=True)
class ServerMetadata:
    """The parts of the server's discovery document jobtoken uses (endpoints validated)."""

    issuer: str
    access_token_endpoint: str
    mytoken_endpoint: str
    revocation_endpoint: Optional[str]
    tokeninfo_endpoint: Optional[str]
    jwks_uri: Optional[str]
    version: Optional[str]
    raw: Mapping[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class MytokenResponse:
    """A mytoken response: a created sub-mytoken, or a ``token_update`` (rotation).

    For ``response_type="transfer_code"`` ``mytoken`` is empty and ``transfer_code`` set.
    """

    mytoken: str = field(repr=False)
    mytoken_type: str
    expires_in: Optional[float]
    mom_id: Optional[str]
    restrictions: tuple[Mapping[str, Any], ...]
    capabilities: tuple[str, ...]
    rotation: Optional[Mapping[str, Any]]
    token_update: Optional[MytokenResponse]
    transfer_code: Optional[str] = field(default=None, repr=False)


@dataclass(frozen=True)
class AccessTokenResponse:
    """The access-token endpoint's answer.

    ``expires_in`` is None when the OP sent none or 0 (compute renewal from the AT's
    ``exp``). ``token_update`` is the *replacement for the mytoken just used*; the caller
    must persist it before the next request (the old one is dead at once).
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_in: Optional[float]
    scope: str
    audience: tuple[str, ...]
    token_update: Optional[MytokenResponse]


@dataclass(frozen=True)
class SubtokenEntry:
    """One descendant listed by tokeninfo ``subtokens`` (the token itself is not shown)."""

    mom_id: str
    name: str
    created: Optional[float]


@dataclass(frozen=True)
class SubtokenListing:
    """Tokeninfo ``subtokens``: every live descendant, flattened, and a possible rotation."""

    entries: tuple[SubtokenEntry, ...]
    token_update: Optional[MytokenResponse]


_METADATA_CACHE: dict[tuple[str, bool], ServerMetadata] = {}
_DISCOVERY_LOCK = threading.Lock()


def clear_discovery_cache() -> None:
    """Forget every cached discovery document (tests; or after a server migration)."""
    with _DISCOVERY_LOCK:
        _METADATA_CACHE.clear()


def is_plausible_mytoken(value: Any) -> bool:
    """Whether ``value`` can be a mytoken (JWT or short token) the server handed out.

    ASCII printable without whitespace, at least 32 characters (the server's own floor),
    at most 64 KiB. This guards the *write-back* of a rotated mytoken: persisting garbage
    would lose the chain as surely as not persisting at all.
    """
    return (
        isinstance(value, str)
        and MIN_MYTOKEN_CHARS <= len(value) <= MAX_MYTOKEN_CHARS
        and all(33 <= ord(c) <= 126 for c in value)
    )


def _scrubbed_description(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = " ".join(text.split())
    if len(text) > _MAX_DESCRIPTION_CHARS:
        text = text[: _MAX_DESCRIPTION_CHARS - 3] + "..."
    return text


def _malformed(message: str, url: str, *, rotated: bool) -> ProtocolError:
    """A ``ProtocolError`` for a 200 body we cannot use.

    When the body carried a ``token_update`` the server has (most likely) rotated the
    mytoken we sent: the old one is dead, and with ``auto_revoke`` a retry with it would
    revoke the whole chain. Such errors are therefore *not* retryable.
    """
    if rotated:
        return ProtocolError(
            message + " (the server rotated the mytoken; do not retry with the old one)",
            status=200,
            url=url,
            retryable=False,
        )
    return ProtocolError(message, status=200, url=url)


def _load_json(response: httpx.Response) -> Any:
    """The body as JSON; ``ValueError`` for anything we cannot use as such.

    Besides malformed text that covers JSON nested past Python's recursion limit and
    numbers with more digits than Python converts: a server's odd answer is a protocol
    error, never a crash.
    """
    try:
        return json.loads(response.content.decode(response.encoding or "utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except (LookupError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from None


def _rotation_of(mytoken: str) -> Mapping[str, Any]:
    """The ``rotation`` claim of a JWT mytoken (unverified; empty if none or not a JWT)."""
    rotation = (unverified_claims(mytoken) or {}).get("rotation")
    return rotation if isinstance(rotation, Mapping) else {}


def _maybe_rotated(
    error: ServerUnavailableError, action: str, secrets: Sequence[str]
) -> ServerUnavailableError:
    """``error`` for a request the server may have carried out although its answer was
    lost, saying so when the mytoken sent rotates on such a use.

    Then the server may already hold its successor (which we never saw) and the mytoken
    we kept is dead; with ``auto_revoke`` using it again revokes the whole chain. "Retry
    later" alone would be the wrong advice.
    """
    rotation = _rotation_of(secrets[0]) if secrets and secrets[0] else {}
    on_use = rotation.get("on_AT") if action == "access token request" else rotation.get(
        "on_other"
    )
    if on_use is not True:
        return error
    if rotation.get("auto_revoke") is True:
        risk = "using it again revokes it and every mytoken made from it (auto_revoke)"
    else:
        risk = "using it again fails"
    return type(error)(
        f"{error.message}; the answer was lost after the request was sent, and this mytoken "
        f"rotates on use: if the server carried it out, the mytoken we hold is dead and {risk}"
        "; check it with 'mytoken info' (or tokeninfo) before retrying, and replace it if "
        "the server no longer knows it",
        status=error.status,
        url=error.url,
        retry_after_s=error.retry_after_s,
        retryable=error.retryable,
        reached_server=True,
    )


def _finite(value: Any) -> Optional[float]:
    """``value`` as a finite float, or None when it is no number a float can hold."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _restriction_problem(restriction: Mapping[str, Any]) -> Optional[str]:
    for key in _RESTRICTION_NUMBERS:
        value = restriction.get(key)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 0 <= value <= _MAX_RESTRICTION_NUMBER
        ):
            return f"restriction {key} is not a plausible integer"
    return None


# Field readers for the server's JSON answers: each returns the value or raises what
# ``bad`` makes of the problem, so the response parsers read as one line per field.
_Bad = Callable[[str], ProtocolError]


def _text_field(data: Mapping[str, Any], key: str, default: str, bad: _Bad, problem: str) -> str:
    """A string field where absent and null both mean ``default``."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad(problem)
    return value


def _audiences(value: Any, bad: _Bad) -> tuple[str, ...]:
    """``audience`` as the OP sends it: absent, one string, or an array of strings."""
    audiences = string_or_strings(value)
    if audiences is None:
        raise bad("audience is not an array of strings")
    return audiences


def _access_token_value(value: Any, bad: _Bad) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad("response has no access_token")
    if any(c.isspace() for c in value.strip()):
        raise bad("access_token contains whitespace")
    return value.strip()


def _mytoken_or_transfer_code(data: Mapping[str, Any], bad: _Bad) -> tuple[str, Optional[str]]:
    """``(mytoken, transfer_code)``: a transfer code stands in for an absent mytoken."""
    mytoken = data.get("mytoken")
    transfer_code = data.get("transfer_code")
    if mytoken is None and transfer_code is not None:
        if not isinstance(transfer_code, str) or not transfer_code.strip():
            raise bad("has an empty transfer_code")
        return "", transfer_code
    if not isinstance(mytoken, str) or not is_plausible_mytoken(mytoken):
        raise bad("has no plausible mytoken (missing, empty, short, or not ASCII)")
    return mytoken, None


def _restriction_list(value: Any, bad: _Bad) -> tuple[dict[str, Any], ...]:
    restrictions = value or []
    if not isinstance(restrictions, list) or not all(
        isinstance(r, Mapping) for r in restrictions
    ):
        raise bad("restrictions is not an array of objects")
    for restriction in restrictions:
        problem = _restriction_problem(restriction)
        if problem:
            raise bad(problem)
    return tuple(dict(r) for r in restrictions)


def _capability_list(value: Any, bad: _Bad) -> tuple[str, ...]:
    capabilities = value or []
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        raise bad("capabilities is not an array of strings")
    return tuple(capabilities)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _creation_body(
    secret: str,
    *,
    restrictions: Optional[Iterable[Mapping[str, Any]]],
    capabilities: Optional[Iterable[str]],
    rotation: Optional[Mapping[str, Any]],
    name: Optional[str],
    response_type: str,
    error_on_restrictions: bool,
    max_token_len: Optional[int],
) -> dict[str, Any]:
    """The mytoken endpoint's request body; what is left as None is left out (inherited).

    Raises:
        ConfigError: an unknown ``response_type`` or a ``max_token_len`` that is no integer.
    """
    if response_type not in _RESPONSE_TYPES:
        raise ConfigError(
            f"unknown mytoken response_type {response_type!r} "
            f"(one of {', '.join(_RESPONSE_TYPES)})"
        )
    if max_token_len is not None and not _is_integer(max_token_len):
        raise ConfigError(f"max_token_len must be an integer, got {max_token_len!r}")
    body: dict[str, Any] = {
        "grant_type": "mytoken",
        "mytoken": secret,
        "response_type": response_type,
        "error_on_restrictions": bool(error_on_restrictions),
    }
    if restrictions is not None:
        body["restrictions"] = [_normalise_restriction(r) for r in restrictions]
    if capabilities is not None:
        body["capabilities"] = _string_items(capabilities, "capability")
    if rotation is not None:
        body["rotation"] = dict(rotation)
    if name:
        body["name"] = name
    if max_token_len is not None:
        body["max_token_len"] = max_token_len
    return body


def _descendants(tree: Any) -> tuple[SubtokenEntry, ...]:
    """Every node below the root of a tokeninfo ``subtokens`` tree.

    Raises:
        ValueError: the tree is not the documented shape (says where).
    """
    if not isinstance(tree, Mapping):
        raise ValueError("'mytokens' is not a tree")
    entries: list[SubtokenEntry] = []
    pending = list(tree.get("children") or ())
    while pending:
        node = pending.pop()
        entries.append(_subtoken_entry(node))
        pending.extend(node.get("children") or ())
    return tuple(entries)


def _subtoken_entry(node: Any) -> SubtokenEntry:
    """One tree node's token; ValueError unless it names a ``mom_id`` and has a child list."""
    token = node.get("token") if isinstance(node, Mapping) else None
    mom_id = token.get("mom_id") if isinstance(token, Mapping) else None
    if not isinstance(token, Mapping) or not isinstance(mom_id, str) or not mom_id or (
        not isinstance(node.get("children") or [], list)
    ):
        raise ValueError("malformed tree entry")
    name = token.get("name")
    return SubtokenEntry(
        mom_id=mom_id,
        name=name if isinstance(name, str) else "",
        created=_finite(token.get("created")),
    )


def _status_hint(error: Optional[str], description: Optional[str]) -> Optional[str]:
    """What to do about an error answer, where the server's own words leave it out."""
    for part, hint in _DESCRIPTION_HINTS:
        if part in (description or ""):
            return hint
    return _HINTS.get(error or "")


def _is_transient(error: Optional[str], description: Optional[str]) -> bool:
    """An OAuth error (or the OP's, relayed in an ``oidc_error``) that says "try later"."""
    if error in _TRANSIENT_ERRORS:
        return True
    if error == "oidc_error" and description:
        op_error = description.split(":", 1)[0].strip()
        return op_error in _TRANSIENT_ERRORS
    return False


def _error_class_for(
    status: int, error: Optional[str], description: Optional[str]
) -> type[MytokenError]:
    """Retry later (unavailable, rate limited, transient OAuth error) or give up (rejected)."""
    if status >= 500 or status in (408, 425, 429) or _is_transient(error, description):
        return ServerUnavailableError
    return MytokenRejectedError


def _string_items(values: Union[str, Iterable[str], None], what: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        return list(parse_scopes(values))
    items: list[str] = []
    for value in values:
        if not isinstance(value, str) or not value or any(c.isspace() for c in value):
            raise ConfigError(f"invalid {what} {value!r}: need a non-empty string without spaces")
        if value not in items:
            items.append(value)
    return items


def _require_secret(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"no {what} given (empty)")
    return value.strip()


def _normalise_restriction(restriction: Mapping[str, Any]) -> dict[str, Any]:
    """Restriction wire shape: ``scope`` a space-separated string, ``audience`` an array."""
    if not isinstance(restriction, Mapping):
        raise ConfigError("each restriction must be a mapping of restriction keys")
    out = dict(restriction)
    scope = out.get("scope")
    if scope is not None and not isinstance(scope, str):
        out["scope"] = " ".join(_string_items(scope, "restriction scope"))
    audience = out.get("audience")
    if audience is not None:  # a lone string becomes a one-element array
        out["audience"] = _string_items(audience, "restriction audience")
    return out


class MytokenClient:
    """Client for one Mytoken server (API v0).

    One instance per server URL and thread of use; the discovery document is shared by
    all instances in the process. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        server_url: str,
        *,
        timeout_s: float = 10.0,
        ca_file: Optional[str] = None,
        ca_dir: Optional[str] = None,
        allow_http: bool = False,
        transport: Optional[httpx.BaseTransport] = None,
        user_agent: Optional[str] = None,
        clock: Optional[Clock] = None,
        deadline_s: Optional[float] = None,
    ) -> None:
        """Build the HTTP client; no request is sent yet.

        Args:
            timeout_s: per connect/read/write step.
            deadline_s: all requests of this client together, counted from now (None
                or 0: no overall limit). ``prepare`` and ``token`` set it, so a server
                that answers one byte every few seconds cannot keep them alive.

        Raises:
            ConfigError: bad URL (http to a non-loopback host, ...), timeout or CA option.
        """
        if not isinstance(server_url, str) or not server_url.strip():
            raise ConfigError("no Mytoken server URL given")
        self.server_url = server_url.strip().rstrip("/")
        self._allow_http = allow_http
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._timeout_s = float(timeout_s)
        self._deadline_s = float(deadline_s) if deadline_s else None
        self._deadline = (
            self._clock.monotonic() + self._deadline_s if self._deadline_s else None
        )
        self._closed = False
        self._client = http_client(
            self.server_url,
            timeout_s=timeout_s,
            ca_file=ca_file,
            ca_dir=ca_dir,
            allow_http=allow_http,
            transport=transport,
            user_agent=user_agent,
        )

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        self._client.close()

    def __enter__(self) -> MytokenClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MytokenClient(server_url={self.server_url!r})"

    # -- discovery ---------------------------------------------------------------------

    def metadata(self) -> ServerMetadata:
        """The server's discovery document, fetched once per process per server URL.

        Raises:
            ServerUnavailableError: the server could not be reached or answered 5xx/429.
            ProtocolError: the document is not JSON or lacks the required endpoints.
            MytokenRejectedError: the server answered 4xx (wrong URL?).
            ConfigError: TLS verification failed.
        """
        key = (self.server_url, self._allow_http)
        with _DISCOVERY_LOCK:
            cached = _METADATA_CACHE.get(key)
            if cached is not None:
                return cached
            url = self.server_url + DISCOVERY_PATH
            response = self._send("GET", url, None, action="mytoken discovery", secrets=())
            self._raise_for_status(response, url, action="mytoken discovery", secrets=())
            data = self._json_object(response, url, action="mytoken discovery", secrets=())
            found = self._parse_metadata(data, url)
            _METADATA_CACHE[key] = found
            logger.debug("mytoken discovery fetched url=%s version=%s", url, found.version)
            return found

    def remember_metadata(self, data: Mapping[str, Any]) -> ServerMetadata:
        """Seed the per-process cache with a discovery document kept from an earlier run.

        Renewal children are short-lived processes; keeping the document in the job's
        token directory spares one request per renewal against the server's per-IP
        rate limit. The document is validated exactly like a fetched one.

        Raises:
            ProtocolError: the document lacks endpoints or lists unusable ones.
        """
        url = self.server_url + DISCOVERY_PATH
        found = self._parse_metadata(data, url)
        with _DISCOVERY_LOCK:
            _METADATA_CACHE[(self.server_url, self._allow_http)] = found
        return found

    def _parse_metadata(self, data: Mapping[str, Any], url: str) -> ServerMetadata:
        def endpoint(name: str, required: bool) -> Optional[str]:
            value = data.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value:
                raise ProtocolError(
                    f"mytoken discovery at {url} has no {name}", url=url, status=200
                )
            problem = url_problem(value, allow_http=self._allow_http)
            if problem:
                raise ProtocolError(
                    f"mytoken discovery at {url} lists an unusable {name} "
                    f"{_scrubbed_description(value, ())[:200]}: {problem}",
                    url=url,
                    status=200,
                )
            return value

        access = endpoint("access_token_endpoint", True)
        mytoken = endpoint("mytoken_endpoint", True)
        assert access is not None and mytoken is not None
        issuer = data.get("issuer")
        version = data.get("version")
        return ServerMetadata(
            issuer=issuer if isinstance(issuer, str) and issuer else self.server_url,
            access_token_endpoint=access,
            mytoken_endpoint=mytoken,
            revocation_endpoint=endpoint("revocation_endpoint", False),
            tokeninfo_endpoint=endpoint("tokeninfo_endpoint", False),
            jwks_uri=endpoint("jwks_uri", False),
            version=version if isinstance(version, str) else None,
            raw=dict(data),
        )

    # -- API calls ---------------------------------------------------------------------

    def get_access_token(
        self,
        mytoken: str,
        *,
        scopes: Union[str, Iterable[str]] = (),
        audiences: Union[str, Iterable[str]] = (),
        comment: Optional[str] = None,
    ) -> AccessTokenResponse:
        """Exchange ``mytoken`` for an access token.

        Send scopes and audiences explicitly: with none, the server asks the OP for
        its defaults (often the ``any`` audience). The server matches them against the
        mytoken's restriction as exact strings.

        Raises:
            ConfigError: empty mytoken, a scope/audience with whitespace, TLS failure.
            MytokenRejectedError: 4xx (revoked, expired, restricted, OP refused).
            ServerUnavailableError: 5xx, 429, network trouble, timeout.
            ProtocolError: redirect, non-JSON body, no ``access_token``, bad
                ``token_update``.
        """
        secret = _require_secret(mytoken, "mytoken")
        body: dict[str, Any] = {"grant_type": "mytoken", "mytoken": secret}
        scope_items = _string_items(scopes, "scope")
        audience_items = _string_items(audiences, "audience")
        if scope_items:
            body["scope"] = " ".join(scope_items)
        if audience_items:
            body["audience"] = " ".join(audience_items)
        if comment:
            body["comment"] = comment
        url = self.metadata().access_token_endpoint
        data = self._call(url, body, action="access token request", secrets=(secret,))
        return self._parse_access_token_response(data, url, secrets=(secret,))

    def create_mytoken(
        self,
        mytoken: str,
        *,
        restrictions: Optional[Iterable[Mapping[str, Any]]] = None,
        capabilities: Optional[Iterable[str]] = None,
        rotation: Optional[Mapping[str, Any]] = None,
        name: Optional[str] = None,
        response_type: str = "token",
        error_on_restrictions: bool = True,
        max_token_len: Optional[int] = None,
    ) -> MytokenResponse:
        """Create a sub-mytoken from ``mytoken`` (which needs ``create_mytoken``).

        ``restrictions``/``capabilities`` left as None inherit the parent's. A
        ``token_update`` in the result is the *parent's* replacement (parent rotation
        ``on_other``); the caller must persist it.

        Raises:
            ConfigError: bad arguments or TLS failure.
            MytokenRejectedError: 4xx (e.g. restrictions not a subset of the parent's).
            ServerUnavailableError: 5xx, 429, network trouble, timeout.
            ProtocolError: redirect, non-JSON body, implausible mytoken in the response.
        """
        secret = _require_secret(mytoken, "parent mytoken")
        body = _creation_body(
            secret,
            restrictions=restrictions,
            capabilities=capabilities,
            rotation=rotation,
            name=name,
            response_type=response_type,
            error_on_restrictions=error_on_restrictions,
            max_token_len=max_token_len,
        )
        url = self.metadata().mytoken_endpoint
        action = "mytoken creation"
        data = self._call(url, body, action=action, secrets=(secret,))
        try:
            result = self._parse_mytoken_response(
                data, url, action=action, secrets=(secret,), what="created mytoken"
            )
        except ProtocolError as exc:
            raise self._revoke_unusable(data.get("mytoken"), exc) from None
        if result.token_update is not None:
            logger.info("mytoken rotated action=%s url=%s", action, url)
        return result

    def revoke(
        self, token: str, *, recursive: bool = False, mom_id: Optional[str] = None
    ) -> Optional[MytokenResponse]:
        """Revoke ``token`` (or, with ``mom_id``, the token it identifies).

        Returns the authenticating token's replacement when the server rotated it
        (HTTP 200 with ``token_update``), else None (HTTP 204).

        Raises:
            MytokenRejectedError: 4xx, or revocation disabled on the server.
            ServerUnavailableError / ProtocolError / ConfigError: as for the other calls.
        """
        secret = _require_secret(token, "token to revoke")
        action = "mytoken revocation"
        url = self._optional_endpoint(
            self.metadata().revocation_endpoint, action, "revocation endpoint"
        )
        body: dict[str, Any] = {"token": secret, "recursive": bool(recursive)}
        if mom_id:
            body["mom_id"] = mom_id
        response = self._send("POST", url, body, action=action, secrets=(secret,))
        self._raise_for_status(response, url, action=action, secrets=(secret,))
        if response.status_code == 204 or not response.content.strip():
            return None
        data = self._json_object(response, url, action=action, secrets=(secret,))
        return self._token_update(data, url, action=action, secret=secret)

    def introspect(self, mytoken: str) -> dict[str, Any]:
        """The tokeninfo ``introspect`` answer for ``mytoken`` (claims, usage counts).

        An invalid mytoken yields 401 (``MytokenRejectedError``), not ``valid: false``.

        Raises:
            MytokenRejectedError: 4xx, or tokeninfo disabled on the server.
            ServerUnavailableError / ProtocolError / ConfigError: as for the other calls.
        """
        secret = _require_secret(mytoken, "mytoken")
        action = "mytoken introspection"
        url = self._optional_endpoint(
            self.metadata().tokeninfo_endpoint, action, "tokeninfo endpoint"
        )
        body = {"action": "introspect", "mytoken": secret}
        return self._call(url, body, action=action, secrets=(secret,))

    def subtokens(self, mytoken: str) -> SubtokenListing:
        """Every live descendant of ``mytoken`` (needs ``tokeninfo:subtokens``).

        The server answers a tree rooted at ``mytoken`` itself; the root is left out.
        A ``token_update`` is ``mytoken``'s replacement (rotation ``on_other``).

        Raises:
            MytokenRejectedError: 4xx (e.g. the capability is missing), or no tokeninfo.
            ProtocolError: the tree is not the documented shape.
            ServerUnavailableError / ConfigError: as for the other calls.
        """
        secret = _require_secret(mytoken, "mytoken")
        action = "mytoken subtokens listing"
        url = self._optional_endpoint(
            self.metadata().tokeninfo_endpoint, action, "tokeninfo endpoint"
        )
        data = self._call(
            url, {"action": "subtokens", "mytoken": secret}, action=action, secrets=(secret,)
        )
        try:
            entries = _descendants(data.get("mytokens"))
        except ValueError as exc:
            raise ProtocolError(f"{action} at {url}: {exc}", url=url) from None
        return SubtokenListing(
            entries=entries,
            token_update=self._token_update(data, url, action=action, secret=secret),
        )

    # -- plumbing ----------------------------------------------------------------------

    def _revoke_unusable(self, minted: Any, error: ProtocolError) -> ProtocolError:
        """Revoke a mytoken the server minted in an answer we cannot use; ``error`` says so.

        Nobody else learns of that mytoken, so nobody else could revoke it.
        """
        if not is_plausible_mytoken(minted):
            return error
        try:
            self.revoke(minted)
        except (ConfigError, MytokenRejectedError, ServerUnavailableError) as exc:
            note = f"; revoking the minted mytoken failed too: {exc.message}"
        else:
            note = "; the minted mytoken was revoked"
            logger.info("unusable minted mytoken revoked url=%s", error.url)
        return ProtocolError(
            error.message + note,
            status=error.status,
            url=error.url,
            retryable=error.retryable,
        )

    def _timeout_for(self, action: str, url: str) -> float:
        """This request's time limit: ``timeout_s``, or what is left of the deadline.

        Revocation cleans up after a failure (often the deadline itself), so it always
        gets at least ``timeout_s``.

        Raises:
            ServerUnavailableError: the deadline has passed.
        """
        if self._deadline is None or action == "mytoken revocation":
            return self._timeout_s
        left = self._deadline - self._clock.monotonic()
        if left <= 0:
            raise self._deadline_error(action, url)
        return min(self._timeout_s, left)

    def _deadline_error(self, action: str, url: str) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"{action} failed at {url}: gave up after the overall deadline of "
            f"{self._deadline_s:.0f} s (server too slow)",
            url=url,
        )

    def _read_capped(
        self, response: httpx.Response, url: str, *, action: str, timeout_s: float
    ) -> bytes:
        """The (decoded) body: at most :data:`MAX_RESPONSE_BYTES`, within ``timeout_s``
        in all, and not past the client's deadline.

        Raises:
            ProtocolError: the body is too large.
            ServerUnavailableError: it came too slowly.
        """
        give_up = self._clock.monotonic() + timeout_s
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise ProtocolError(
                    f"{action} failed at {url}: HTTP {response.status_code} body is larger "
                    f"than {MAX_RESPONSE_BYTES} bytes",
                    status=response.status_code,
                    url=url,
                )
            chunks.append(chunk)
            now = self._clock.monotonic()
            if self._deadline is not None and now > self._deadline:
                raise self._deadline_error(action, url)
            if now > give_up:
                raise ServerUnavailableError(
                    f"{action} failed at {url}: body not received within {timeout_s:.0f} s "
                    "(server too slow)",
                    url=url,
                )
        return b"".join(chunks)

    def _optional_endpoint(self, url: Optional[str], action: str, what: str) -> str:
        """``url`` from discovery, or the refusal for a server with that feature off."""
        if not url:
            raise MytokenRejectedError(
                f"{action} impossible: {self.server_url} offers no {what}",
                url=self.server_url,
            )
        return url

    def _token_update(
        self, data: Mapping[str, Any], url: str, *, action: str, secret: str
    ) -> Optional[MytokenResponse]:
        """The authenticating mytoken's replacement in an answer (rotation ``on_other``)."""
        update = data.get("token_update")
        if update is None:
            return None
        if not isinstance(update, Mapping):
            raise ProtocolError(f"{action} at {url}: token_update is not an object", url=url)
        logger.info("mytoken rotated action=%s url=%s", action, url)
        return self._parse_mytoken_response(
            update, url, action=action, secrets=(secret,), what="token_update"
        )

    def _call(
        self, url: str, body: Mapping[str, Any], *, action: str, secrets: Sequence[str]
    ) -> dict[str, Any]:
        response = self._send("POST", url, body, action=action, secrets=secrets)
        self._raise_for_status(response, url, action=action, secrets=secrets)
        return self._json_object(response, url, action=action, secrets=secrets)

    def _send(
        self,
        method: str,
        url: str,
        body: Optional[Mapping[str, Any]],
        *,
        action: str,
        secrets: Sequence[str],
    ) -> httpx.Response:
        if self._closed:
            raise RuntimeError("MytokenClient used after close()")
        logger.debug("mytoken request action=%s url=%s", action, url)
        timeout_s = self._timeout_for(action, url)
        try:
            request = self._client.build_request(
                method, url, json=body, timeout=httpx.Timeout(timeout_s)
            )
            streamed = self._client.send(request, stream=True)
            try:
                content = self._read_capped(streamed, url, action=action, timeout_s=timeout_s)
            finally:
                streamed.close()
        except httpx.HTTPError as exc:
            error = translate_http_error(exc, url=url, action=action)
            if isinstance(error, MytokenError):
                # classified here, where httpx is known, so callers never inspect httpx
                error.reached_server = not isinstance(exc, (httpx.ConnectError,
                                                            httpx.ConnectTimeout))
            if isinstance(error, ServerUnavailableError) and error.reached_server:
                error = _maybe_rotated(error, action, secrets)
            logger.debug("mytoken request failed action=%s url=%s error=%s", action, url, error)
            raise error from exc
        except ServerUnavailableError as error:  # body too slow: the server did answer
            error.reached_server = True
            raise _maybe_rotated(error, action, secrets) from None
        # the body is read and decoded: a fresh response must not decode it again
        headers = [
            (k, v)
            for k, v in streamed.headers.raw  # bytes: any header a server sends survives
            if k.lower() not in (b"content-encoding", b"content-length", b"transfer-encoding")
        ]
        response = httpx.Response(
            streamed.status_code, headers=headers, content=content, request=request
        )
        logger.debug(
            "mytoken response action=%s url=%s status=%s", action, url, response.status_code
        )
        return response

    def _raise_for_status(
        self, response: httpx.Response, url: str, *, action: str, secrets: Sequence[str]
    ) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        if 300 <= status < 400:
            raise self._redirect_error(response, url, action=action)
        error, description = self._error_fields(response, secrets)
        retry_after = parse_retry_after(response.headers.get("retry-after"), self._clock.now())
        said = f"HTTP {status}"
        if error:
            said += f" {error}"
        if description:
            said += f": {description}"
        hint = _status_hint(error, description)
        if hint is None and error is None and not description:
            hint = self._plain_text(response, secrets)
        if hint:
            said += f" ({hint})"
        message = f"{action} failed at {url}: {said}"
        if status == 429:
            message += " (rate limited)"
        raise _error_class_for(status, error, description)(
            message,
            status=status,
            error=error,
            error_description=description,
            url=url,
            retry_after_s=retry_after,
        )

    @staticmethod
    def _redirect_error(response: httpx.Response, url: str, *, action: str) -> ProtocolError:
        """Redirects are never followed: a mytoken must not go where the site did not say."""
        status = response.status_code
        target = response.headers.get("location", "")
        try:
            host = httpx.URL(target).host if target else "nowhere"
        except httpx.InvalidURL:
            host = "an unparsable location"
        return ProtocolError(
            f"{action} failed at {url}: HTTP {status} redirect to {host or target!r} "
            "(redirects are never followed; fix the server URL)",
            status=status,
            url=url,
        )

    @staticmethod
    def _plain_text(response: httpx.Response, secrets: Sequence[str]) -> Optional[str]:
        """A short, redacted excerpt of a text/plain error body (e.g. fiber's 429)."""
        if not response.headers.get("content-type", "").startswith("text/plain"):
            return None
        try:
            text = response.text
        except (UnicodeDecodeError, LookupError):
            return None
        excerpt = _scrubbed_description(text, secrets)[:100]
        return excerpt or None

    @staticmethod
    def _error_fields(
        response: httpx.Response, secrets: Sequence[str]
    ) -> tuple[Optional[str], Optional[str]]:
        try:
            data = _load_json(response)
        except ValueError:
            return None, None
        if not isinstance(data, Mapping):
            return None, None
        error = data.get("error")
        description = data.get("error_description")
        return (
            _scrubbed_description(error, secrets) if isinstance(error, str) and error else None,
            _scrubbed_description(description, secrets)
            if isinstance(description, str) and description
            else None,
        )

    @staticmethod
    def _json_object(
        response: httpx.Response, url: str, *, action: str, secrets: Sequence[str]
    ) -> dict[str, Any]:
        status = response.status_code
        try:
            data = _load_json(response)
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise ProtocolError(
                f"{action} failed at {url}: HTTP {status} body is not JSON ({kind})",
                status=status,
                url=url,
            ) from None
        if not isinstance(data, dict):
            raise ProtocolError(
                f"{action} failed at {url}: HTTP {status} body is not a JSON object",
                status=status,
                url=url,
            )
        return data

    def _parse_access_token_response(
        self, data: Mapping[str, Any], url: str, *, secrets: Sequence[str]
    ) -> AccessTokenResponse:
        action = "access token request"
        rotated = data.get("token_update") is not None

        def bad(what: str) -> ProtocolError:
            return _malformed(f"{action} failed at {url}: {what}", url, rotated=rotated)

        access_token = _access_token_value(data.get("access_token"), bad)
        token_type = _text_field(data, "token_type", "Bearer", bad, "token_type is not a string")
        scope = _text_field(data, "scope", "", bad, "scope is not a space-separated string")
        audiences = _audiences(data.get("audience"), bad)
        update = data.get("token_update")
        token_update = None
        if update is not None:
            if not isinstance(update, Mapping):
                raise bad("token_update is not an object")
            token_update = self._parse_mytoken_response(
                update, url, action=action, secrets=secrets, what="token_update"
            )
            logger.info("mytoken rotated action=%s url=%s", action, url)
        return AccessTokenResponse(
            access_token=access_token,
            token_type=token_type,
            expires_in=self._seconds(data.get("expires_in"), bad),
            scope=scope,
            audience=audiences,
            token_update=token_update,
        )

    def _parse_mytoken_response(
        self,
        data: Mapping[str, Any],
        url: str,
        *,
        action: str,
        secrets: Sequence[str],
        what: str,
        depth: int = 0,
    ) -> MytokenResponse:
        rotated = what == "token_update" or data.get("token_update") is not None

        def bad(problem: str) -> ProtocolError:
            return _malformed(f"{action} failed at {url}: {what} {problem}", url, rotated=rotated)

        mytoken, transfer_code = _mytoken_or_transfer_code(data, bad)
        mytoken_type = _text_field(data, "mytoken_type", "token", bad,
                                   "mytoken_type is not a string")
        mom_id = data.get("mom_id")
        if mom_id is not None and not isinstance(mom_id, str):
            raise bad("mom_id is not a string")
        restrictions = _restriction_list(data.get("restrictions"), bad)
        capabilities = _capability_list(data.get("capabilities"), bad)
        rotation = data.get("rotation")
        if rotation is not None and not isinstance(rotation, Mapping):
            raise bad("rotation is not an object")
        nested = data.get("token_update")
        token_update = None
        if nested is not None:
            if not isinstance(nested, Mapping) or depth >= 1:
                raise bad("has a malformed token_update")
            token_update = self._parse_mytoken_response(
                nested, url, action=action, secrets=secrets, what="token_update", depth=depth + 1
            )
        return MytokenResponse(
            mytoken=mytoken,
            mytoken_type=mytoken_type,
            expires_in=self._seconds(data.get("expires_in"), bad),
            mom_id=mom_id,
            restrictions=restrictions,
            capabilities=capabilities,
            rotation=dict(rotation) if rotation is not None else None,
            token_update=token_update,
            transfer_code=transfer_code,
        )

    @staticmethod
    def _seconds(value: Any, bad: Any) -> Optional[float]:
        """``expires_in`` as seconds; None when absent or 0 (the OP did not say)."""
        if value is None:
            return None
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            value = int(value.strip())
        number = _finite(value)
        if number is None or number < 0:
            raise bad("expires_in is not a non-negative number")
        return number if number else None
