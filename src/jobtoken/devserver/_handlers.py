"""Mytoken API v0 and OP endpoints: request in, response out.

Wire shapes, status codes and error codes follow oidc-mytoken/server (see
docs/devserver.md). Each handler holds the store lock for the whole request, like the
server's single database transaction.

Must NOT: touch sockets, sleep, apply faults other than the token-content fault it is
handed, or log token strings.
"""

from __future__ import annotations

import builtins
import json
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import parse_qs

from ._config import DevServerConfig
from ._issuer import AccessTokenIssuer
from ._keys import SigningKey
from ._responses import ApiError, Request, Response, bad_request, http_error, json_response
from ._restrictions import (
    Restriction,
    enforce_max_lifetime,
    has_capability,
    parse_restrictions,
    replace_this,
    select_for_at,
    select_for_other,
    tighten,
    tighten_capabilities,
)
from ._state import MytokenRecord, MytokenStore, Rotation, is_jwt

__all__ = ["API_PATHS", "MytokenApi"]

logger = logging.getLogger(__name__)

API_PATHS = {
    "access": "/api/v0/token/access",
    "my": "/api/v0/token/my",
    "revoke": "/api/v0/token/revoke",
    "tokeninfo": "/api/v0/tokeninfo",
    "settings": "/api/v0/settings",
}
RESTRICTION_CLAIMS = [
    "nbf",
    "exp",
    "scope",
    "audience",
    "hosts",
    "geoip_allow",
    "geoip_disallow",
    "usages_AT",
    "usages_other",
]
Handler = Callable[[Request, Optional[str]], Response]


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"


def scopes_and_audience_to_use(
    used: Optional[Restriction], scope: str, audience: str, op_scopes: Sequence[str]
) -> Tuple[List[str], List[str]]:
    """What the OP is asked for (``parseScopesAndAudienceToUse``).

    No restriction used: all the provider's scopes, no audience. Otherwise the requested
    scopes, else the entry's; and the requested audience as Go's ``strings.Split`` makes
    it: ``""`` splits into ``[""]``, so with no requested audience the entry's audience is
    NOT forwarded and the OP picks its default (reference fact 21).
    """
    if used is None:
        return list(op_scopes), []
    if scope:
        scopes = scope.split(" ")
    elif used.scope:
        scopes = list(used.scopes)
    else:
        scopes = list(op_scopes)
    return scopes, audience.split(" ")


def response_type_for_length(requested: str, max_len: int, jwt_len: int, short_len: int) -> str:
    """``max_token_len`` picks the form: the JWT if it fits, else a short token if that fits,
    else the JWT anyway (as the server does). 0: whatever was asked for."""
    if max_len <= 0:
        return requested
    if max_len < jwt_len and max_len >= short_len:
        return "short_token"
    return "token"


def cookie_mytoken(cookie_header: str) -> str:
    """The last non-empty ``mytoken`` cookie ("" if none)."""
    token = ""
    for part in cookie_header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == "mytoken" and value:
            token = value
    return token


def _check_mytoken_grant(grant_type: str) -> None:
    if grant_type == "oidc_flow":
        raise ApiError(
            501,
            "not_yet_implemented",
            "the dev server has no browser login; use DevServer.issue_mytoken",
        )
    if grant_type != "mytoken":
        raise ApiError(400, "invalid_grant", "Unsupported grant_type")


def _requested_capabilities(value: Any) -> Optional[List[str]]:
    """The ``capabilities`` asked for; None: the parent's."""
    if value is not None and (
        not isinstance(value, list) or not all(isinstance(c, str) for c in value)
    ):
        raise bad_request("capabilities must be an array of strings")
    return value


class _Body:
    """A request body's fields with the type checks Go's decoders would do.

    The getters are named after the Go types they check; inside the class body those
    names hide the builtins, so later annotations spell ``builtins.str``.
    """

    def __init__(self, fields: Mapping[str, Any], *, form: bool, struct: str) -> None:
        self.fields = fields
        self.form = form
        self._struct = struct

    def _type_error(self, key: str, value: Any, want: str) -> ApiError:
        return bad_request(
            f"json: cannot unmarshal {_go_type(value)} into Go struct field "
            f"{self._struct}.{key} of type {want}"
        )

    def str(self, key: str) -> str:
        value = self.fields.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self._type_error(key, value, "string")
        return value

    def bool(self, key: builtins.str) -> bool:
        value = self.fields.get(key)
        if value is None:
            return False
        if self.form and isinstance(value, str):
            if value.lower() in ("true", "1"):
                return True
            if value.lower() in ("false", "0", ""):
                return False
            raise bad_request(f"invalid boolean value for {key}")
        if not isinstance(value, bool):
            raise self._type_error(key, value, "bool")
        return value

    def int(self, key: builtins.str) -> int:
        value = self.fields.get(key)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._type_error(key, value, "int")
        return value


def _json_body(req: Request, struct: str) -> _Body:
    try:
        obj = json.loads(req.body.decode("utf-8") or "null")
    except (UnicodeDecodeError, ValueError):
        raise bad_request("invalid character in request body: not JSON") from None
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise bad_request(f"json: cannot unmarshal {_go_type(obj)} into Go value of type {struct}")
    return _Body(obj, form=False, struct=struct)


def _any_body(req: Request, struct: str) -> _Body:
    """JSON or form body, like fiber's ``BodyParser``."""
    ctype = req.header("content-type").split(";")[0].strip().lower()
    if ctype == "application/json":
        return _json_body(req, struct)
    if ctype == "application/x-www-form-urlencoded":
        parsed = parse_qs(req.body.decode("utf-8", "replace"), keep_blank_values=True)
        return _Body({k: v[0] for k, v in parsed.items()}, form=True, struct=struct)
    if not req.body:
        return _Body({}, form=False, struct=struct)
    raise bad_request("Unprocessable Entity")


class MytokenApi:
    """All HTTP endpoints of one dev server (Mytoken at the root, OP under ``/op``)."""

    def __init__(
        self,
        *,
        config: DevServerConfig,
        base_url: str,
        store: MytokenStore,
        mt_key: SigningKey,
        issuer: AccessTokenIssuer,
        now: Callable[[], float],
        add_fault: Callable[[Mapping[str, Any]], Any],
        clear_faults: Callable[[], None],
    ) -> None:
        self.config = config
        self.url = base_url
        self.store = store
        self.mt_key = mt_key
        self.issuer = issuer
        self._now = now
        self._add_fault = add_fault
        self._clear_faults = clear_faults
        self.routes: Dict[str, Tuple[str, Dict[str, Handler]]] = {
            "/.well-known/mytoken-configuration": ("discovery", {"GET": self.discovery}),
            "/.well-known/openid-configuration": ("discovery", {"GET": self.discovery}),
            "/jwks": ("jwks", {"GET": self.jwks}),
            API_PATHS["access"]: ("access", {"POST": self.access}),
            API_PATHS["my"]: ("my", {"POST": self.mytoken}),
            API_PATHS["revoke"]: ("revoke", {"POST": self.revoke}),
            API_PATHS["tokeninfo"]: ("tokeninfo", {"POST": self.tokeninfo}),
            "/op/.well-known/openid-configuration": ("op-discovery", {"GET": self.op_discovery}),
            "/.well-known/openid-configuration/op": ("op-discovery", {"GET": self.op_discovery}),
            "/op/jwks": ("op-jwks", {"GET": self.op_jwks}),
            "/_devserver/faults": (
                "control",
                {"POST": self.faults_post, "DELETE": self.faults_delete},
            ),
        }

    # --- routing -----------------------------------------------------------------------------

    def route(self, method: str, path: str) -> Tuple[str, Optional[Handler], Optional[Response]]:
        """``(endpoint name, handler, None)`` or ``(name, None, 404/405 response)``."""
        if len(path) > 1:
            path = path.rstrip("/")
        entry = self.routes.get(path)
        if entry is None:
            return "unknown", None, http_error(404, f"Cannot {method} {path}")
        name, methods = entry
        handler = methods.get(method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            resp = http_error(405)
            return name, None, Response(resp.status, resp.body, resp.headers + (("Allow", allow),))
        return name, handler, None

    @staticmethod
    def call(handler: Handler, req: Request, token_fault: Optional[str] = None) -> Response:
        try:
            return handler(req, token_fault)
        except ApiError as exc:
            return exc.response()

    # --- discovery and keys -------------------------------------------------------------------

    def discovery_document(self) -> Dict[str, Any]:
        u = self.url
        return {
            "issuer": u,
            "access_token_endpoint": u + API_PATHS["access"],
            "mytoken_endpoint": u + API_PATHS["my"],
            "tokeninfo_endpoint": u + API_PATHS["tokeninfo"],
            "revocation_endpoint": u + API_PATHS["revoke"],
            "usersettings_endpoint": u + API_PATHS["settings"],
            "jwks_uri": u + "/jwks",
            "providers_supported": [
                {
                    "issuer": self.issuer.issuer,
                    "name": self.config.provider_name,
                    "scopes_supported": list(self.config.op_scopes),
                }
            ],
            "token_signing_alg_value": self.mt_key.alg,
            "tokeninfo_endpoint_actions_supported": ["introspect", "subtokens"],
            "access_token_endpoint_grant_types_supported": ["mytoken"],
            "mytoken_endpoint_grant_types_supported": ["oidc_flow", "mytoken"],
            "mytoken_endpoint_oidc_flows_supported": ["authorization_code"],
            "response_types_supported": ["token", "short_token"],
            "service_documentation": "https://mytoken-docs.data.kit.edu/",
            "restriction_claims_supported": list(RESTRICTION_CLAIMS),
            "version": self.config.version,
            "token_endpoint": u + API_PATHS["access"],
        }

    def discovery(self, req: Request, _fault: Optional[str]) -> Response:
        return json_response(200, self.discovery_document())

    def jwks(self, req: Request, _fault: Optional[str]) -> Response:
        return json_response(200, self.mt_key.jwks(), (("Cache-Control", "max-age=3600"),))

    def op_discovery(self, req: Request, _fault: Optional[str]) -> Response:
        return json_response(200, self.issuer.discovery())

    def op_jwks(self, req: Request, _fault: Optional[str]) -> Response:
        return json_response(200, self.issuer.key.jwks(), (("Cache-Control", "max-age=3600"),))

    # --- shared steps ---------------------------------------------------------------------------

    def _token_from_request(self, req: Request) -> Tuple[str, str]:
        """Mytoken from the Authorization header or the ``mytoken`` cookie (401 if absent)."""
        auth = req.header("authorization")
        candidate = ""
        if auth[:7].lower() == "bearer ":
            candidate = auth[7:].strip()
        if not candidate:
            for part in req.header("cookie").split(";"):
                name, _, value = part.strip().partition("=")
                if name == "mytoken" and value:
                    candidate = value
        if not candidate:
            raise ApiError(401, "invalid_token", "no mytoken found in request")
        try:
            return self.store.resolve(candidate)
        except ApiError:
            raise ApiError(401, "invalid_token", "token not valid") from None

    def _require_capability(self, record: MytokenRecord, capability: str) -> None:
        if not has_capability(record.capabilities, capability):
            raise ApiError(
                403,
                "insufficient_capabilities",
                "The provided token does not have the required capability for this operation",
            )

    @staticmethod
    def _restricted() -> ApiError:
        return ApiError(
            403, "usage_restricted", "The restrictions of this token does not allow this usage"
        )

    def _other_restriction(self, record: MytokenRecord, req: Request) -> Optional[Restriction]:
        if not record.restrictions:
            return None
        entry = select_for_other(
            record.restrictions,
            now=self._now(),
            client_ip=req.client_ip,
            other_used=lambda e: self.store.other_used(record, e),
        )
        if entry is None:
            raise self._restricted()
        return entry

    def _at_restriction(
        self, record: MytokenRecord, req: Request, scope: str, audience: str, now: float
    ) -> Optional[Restriction]:
        """The entry this AT request uses (None: the mytoken is unrestricted)."""
        if not record.restrictions:
            return None
        used = select_for_at(
            record.restrictions,
            scopes=[s for s in scope.split(" ") if s],
            audiences=[a for a in audience.split(" ") if a],
            now=now,
            client_ip=req.client_ip,
            at_used=lambda e: self.store.at_used(record, e),
        )
        if used is None:
            raise self._restricted()
        return used

    def _check_issuer(self, record: MytokenRecord, issuer: str) -> None:
        if issuer and issuer != record.claims.get("oidc_iss"):
            raise bad_request("token not for specified issuer")

    def _rotate_for_response(
        self, record: MytokenRecord, token_type: str, when: str
    ) -> Optional[Dict[str, Any]]:
        rot = record.rotation
        if rot is None or not (rot.on_AT if when == "AT" else rot.on_other):
            return None
        self.store.rotate(record, self._now())
        return self.store.token_response(record, token_type, self._now())

    # --- access token endpoint -----------------------------------------------------------------

    def access(self, req: Request, token_fault: Optional[str]) -> Response:
        body = _any_body(req, "AccessTokenRequest")
        given = next((key for key in ("mytoken", "refresh_token") if key in body.fields), None)
        resolved = self.store.resolve(body.str(given)) if given else None
        grant_type = body.str("grant_type")
        scope, audience = body.str("scope"), body.str("audience")
        issuer = body.str("issuer" if body.form else "oidc_issuer")
        if grant_type not in ("mytoken", "refresh_token"):
            raise ApiError(400, "invalid_grant", "Unsupported grant_type")
        with self.store.lock:
            token_jwt, token_type = resolved or self._token_from_request(req)
            now = self._now()
            record = self.store.authenticate(token_jwt, now)
            self._require_capability(record, "AT")
            used = self._at_restriction(record, req, scope, audience, now)
            self._check_issuer(record, issuer)
            op_scopes, op_auds = scopes_and_audience_to_use(
                used, scope, audience, self.config.op_scopes
            )
            minted = self.issuer.mint(
                scopes=op_scopes, audiences=op_auds, now=now, fault=token_fault
            )
            if used is not None:
                self.store.count_at(record, used)
            update = self._rotate_for_response(record, token_type, "AT")
            logger.info("access token issued mom_id=%s jti=%s", record.mom_id[:12], minted.jti)
        out: Dict[str, Any] = {
            "access_token": minted.access_token,
            "token_type": "Bearer",
            "expires_in": minted.expires_in,
            "scope": minted.scope,
            "audience": list(minted.audiences),
        }
        if update is not None:
            out["token_update"] = update
        return json_response(200, out)

    # --- mytoken endpoint ----------------------------------------------------------------------

    def mytoken(self, req: Request, _fault: Optional[str]) -> Response:
        grant_type = parse_qs(req.query).get("grant_type", [""])[0]
        body = _json_body(req, "MytokenFromMytokenRequest")
        if not grant_type:
            grant_type = body.str("grant_type")
        _check_mytoken_grant(grant_type)
        resolved = self.store.resolve(body.str("mytoken")) if "mytoken" in body.fields else None
        try:
            wanted = parse_restrictions(body.fields.get("restrictions"))
            rotation = Rotation.from_json(body.fields.get("rotation"))
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        caps_raw = _requested_capabilities(body.fields.get("capabilities"))
        response_type = body.str("response_type") or "token"
        if response_type not in ("token", "short_token", "transfer_code"):
            raise bad_request(f"unknown response_type '{response_type}'")
        max_len = body.int("max_token_len")
        error_on_restrictions = body.bool("error_on_restrictions")
        name = body.str("name")
        issuer = body.str("oidc_issuer")
        wanted = replace_this(wanted, req.client_ip)
        with self.store.lock:
            token_jwt, token_type = resolved or self._token_from_request(req)
            now = self._now()
            parent = self.store.authenticate(token_jwt, now)
            self._require_capability(parent, "create_mytoken")
            used = self._other_restriction(parent, req)
            self._check_issuer(parent, issuer)
            restrictions = self._child_restrictions(parent, wanted, now, error_on_restrictions)
            caps = tighten_capabilities(parent.capabilities, caps_raw)
            if not caps:
                raise bad_request(
                    "mytoken to be issued cannot have any of the requested capabilities"
                )
            if used is not None:
                self.store.count_other(parent, used)
            update = self._rotate_for_response(parent, token_type, "other")
            child = self.store.create(
                oidc_sub=str(parent.claims.get("oidc_sub")),
                restrictions=restrictions,
                capabilities=caps,
                rotation=rotation,
                name=name,
                now=now,
                parent=parent,
                auth_time=parent.claims.get("auth_time"),
            )
            response_type = response_type_for_length(
                response_type, max_len, len(child.jwt), self.config.short_token_len
            )
            out = self.store.token_response(child, response_type, now)
        if update is not None:
            out["token_update"] = update
        return json_response(200, out)

    def _child_restrictions(
        self, parent: MytokenRecord, wanted: Sequence[Restriction], now: float, strict: bool
    ) -> Tuple[Restriction, ...]:
        """The sub-mytoken's restrictions: capped lifetime, tightened to the parent's.

        ``strict`` (``error_on_restrictions``): refuse instead of quietly narrowing.
        """
        wanted, capped = enforce_max_lifetime(wanted, self.config.max_mytoken_lifetime_s, now)
        if capped and strict:
            raise bad_request("requested restrictions do not respect maximum mytoken lifetime")
        restrictions, ok = tighten(parent.restrictions, wanted)
        if not ok and strict:
            raise bad_request("requested restrictions are not subset of original restrictions")
        return restrictions

    # --- revocation ----------------------------------------------------------------------------

    def revoke(self, req: Request, _fault: Optional[str]) -> Response:
        body = _any_body(req, "RevocationRequest")
        token = body.str("token")
        recursive = body.bool("recursive")
        issuer = body.str("issuer" if body.form else "oidc_issuer")
        mom_id = body.str("mom_id")
        token = token or cookie_mytoken(req.header("cookie"))
        if not token:
            raise bad_request("no token given")
        with self.store.lock:
            if mom_id:
                return self._revoke_by_mom_id(token, mom_id, recursive=recursive)
            self._revoke_token(token, issuer, recursive=recursive)
        return Response(204)

    def _revoke_by_mom_id(self, token: str, mom_id: str, *, recursive: bool) -> Response:
        """Revoke another token by ``mom_id``: ``token`` is its ancestor or may manage all."""
        token_jwt, token_type = self.store.resolve(token)
        auth = self.store.authenticate(token_jwt, self._now())
        target = self.store.by_mom_id(mom_id)
        if target is not None and target.revoked:
            target = None  # the real server deletes revoked tokens: no parent of it
        is_parent = target is not None and self.store.is_ancestor(auth, target)
        if not is_parent and not has_capability(auth.capabilities, "manage_mytokens:revoke"):
            raise ApiError(
                403,
                "insufficient_capabilities",
                "The provided token is neither a parent of the token to be "
                "revoked nor does it have the 'manage_mytokens:revoke' "
                "capability",
            )
        if target is not None:
            self.store.revoke(target.id, recursive=recursive)
        update = self._rotate_for_response(auth, token_type, "other")
        if update is not None:
            return json_response(200, {"token_update": update})
        return Response(204)

    def _revoke_token(self, token: str, issuer: str, *, recursive: bool) -> None:
        """Revoke ``token`` itself; unknown or invalid tokens count as revoked already."""
        if is_jwt(token):
            token_jwt = token
        elif len(token) < 32:
            return  # transfer codes: none exist here
        else:
            try:
                token_jwt, _ = self.store.resolve(token)
            except ApiError:
                return  # unknown short token: already revoked
            self.store.drop_short_token(token)
        try:
            claims = self.store.parse(token_jwt, self._now())
        except ApiError:
            return
        if issuer and claims.get("oidc_iss") != issuer:
            raise bad_request("token not for specified issuer")
        count = self.store.revoke(str(claims.get("jti")), recursive=recursive)
        logger.info("mytoken revoked count=%d recursive=%s", count, recursive)

    # --- tokeninfo -----------------------------------------------------------------------------

    def tokeninfo(self, req: Request, _fault: Optional[str]) -> Response:
        body = _json_body(req, "TokenInfoRequest")
        resolved = self.store.resolve(body.str("mytoken")) if "mytoken" in body.fields else None
        action = body.str("action")
        with self.store.lock:
            token_jwt, token_type = resolved or self._token_from_request(req)
            record = self.store.authenticate(token_jwt, self._now())
            if action == "introspect":
                self._require_capability(record, "tokeninfo:introspect")
                return json_response(200, self.store.introspection(record, token_type))
            if action == "subtokens":
                self._require_capability(record, "tokeninfo:subtokens")
                used = self._other_restriction(record, req)
                if used is not None:
                    self.store.count_other(record, used)
                tree = self.store.subtree(record)
                out: Dict[str, Any] = {"mytokens": tree}
                update = self._rotate_for_response(record, token_type, "other")
                if update is not None:
                    out["token_update"] = update
                return json_response(200, out)
        raise bad_request(f"unknown action '{action}'")

    # --- control API (loopback only; checked by the server) -----------------------------------

    def faults_post(self, req: Request, _fault: Optional[str]) -> Response:
        body = _json_body(req, "FaultSpec")
        try:
            fault = self._add_fault(body.fields)
        except (TypeError, ValueError) as exc:
            raise bad_request(str(exc)) from None
        return json_response(201, {"id": fault.id, "fault": fault.describe()})

    def faults_delete(self, req: Request, _fault: Optional[str]) -> Response:
        self._clear_faults()
        return Response(204)
