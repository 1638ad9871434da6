"""Server-side mytoken state: issued tokens, short tokens, usage counters, rotation.

Thread-safe through one re-entrant lock (``store.lock``); handlers hold it for a whole
request, which gives the "one transaction" behaviour of the real server.

Must NOT: speak HTTP, read a clock (``now`` is passed in) or log token strings.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import string
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jwt

from ._keys import SigningKey
from ._responses import ApiError
from ._restrictions import Restriction, restrictions_exp, restrictions_nbf

__all__ = ["MytokenRecord", "MytokenStore", "Rotation", "TOKEN_VERSION"]

logger = logging.getLogger(__name__)

TOKEN_VERSION = "0.7"
MIN_TOKEN_LEN = 32
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_ALNUM = string.ascii_letters + string.digits


def is_jwt(token: str) -> bool:
    return bool(_JWT_SHAPE.match(token))


@dataclass(frozen=True)
class Rotation:
    """Per-token rotation policy (wire keys on_AT, on_other, lifetime, auto_revoke)."""

    on_AT: bool = False  # noqa: N815
    on_other: bool = False
    lifetime: int = 0
    auto_revoke: bool = False

    @classmethod
    def from_json(cls, raw: Any) -> Optional[Rotation]:
        """Raises ValueError on a wrong shape."""
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise ValueError("rotation must be an object")
        kwargs: Dict[str, Any] = {}
        for key in ("on_AT", "on_other", "auto_revoke"):
            if key in raw:
                if not isinstance(raw[key], bool):
                    raise ValueError(f"rotation key {key} must be a boolean")
                kwargs[key] = raw[key]
        if "lifetime" in raw:
            life = raw["lifetime"]
            if isinstance(life, bool) or not isinstance(life, int) or life < 0:
                raise ValueError("rotation key lifetime must be a non-negative integer")
            kwargs["lifetime"] = life
        return cls(**kwargs)

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.on_AT:
            out["on_AT"] = True
        if self.on_other:
            out["on_other"] = True
        if self.lifetime:
            out["lifetime"] = self.lifetime
        if self.auto_revoke:
            out["auto_revoke"] = True
        return out


@dataclass
class MytokenRecord:
    """What the server stores for one mytoken (mutable; guarded by the store lock)."""

    id: str
    mom_id: str
    parent_id: Optional[str]
    name: str
    restrictions: Tuple[Restriction, ...]
    capabilities: Tuple[str, ...]
    rotation: Optional[Rotation]
    claims: Dict[str, Any] = field(repr=False)
    jwt: str = field(repr=False)
    seq_no: int = 1
    last_rotated_at: float = 0.0
    revoked: bool = False
    created_at: float = 0.0


class MytokenStore:
    """Issued mytokens of one dev server instance."""

    def __init__(
        self, *, key: SigningKey, issuer: str, oidc_issuer: str, short_token_len: int = 64
    ) -> None:
        self.lock = threading.RLock()
        self._key = key
        self.issuer = issuer
        self.oidc_issuer = oidc_issuer
        self._short_len = short_token_len
        self._records: Dict[str, MytokenRecord] = {}
        self._short: Dict[str, str] = {}  # short token -> JWT
        self._short_owner: Dict[str, str] = {}  # short token -> record id
        self._at_used: Dict[Tuple[str, str], int] = {}
        self._other_used: Dict[Tuple[str, str], int] = {}

    # --- creation --------------------------------------------------------------------------

    def create(
        self,
        *,
        oidc_sub: str,
        restrictions: Sequence[Restriction],
        capabilities: Sequence[str],
        rotation: Optional[Rotation],
        name: str,
        now: float,
        parent: Optional[MytokenRecord] = None,
        auth_time: Optional[int] = None,
    ) -> MytokenRecord:
        """Issue and remember a new mytoken (``seq_no`` 1)."""
        with self.lock:
            mt_id = str(uuid.uuid4())
            inow = int(now)
            claims: Dict[str, Any] = {
                "ver": TOKEN_VERSION,
                "token_type": "mytoken",
                "iss": self.issuer,
                "sub": hashlib.sha256(f"{oidc_sub}@{self.oidc_issuer}".encode()).hexdigest(),
                "nbf": inow,
                "iat": inow,
                "auth_time": auth_time if auth_time is not None else inow,
                "jti": mt_id,
                "seq_no": 1,
                "aud": self.issuer,
                "oidc_sub": oidc_sub,
                "oidc_iss": self.oidc_issuer,
                "capabilities": list(capabilities),
            }
            if name:
                claims["name"] = name
            if restrictions:
                claims["restrictions"] = [r.to_json() for r in restrictions]
                exp = restrictions_exp(restrictions)
                if exp:
                    claims["exp"] = exp
                nbf = restrictions_nbf(restrictions)
                if nbf > inow:
                    claims["nbf"] = nbf
            if rotation is not None:
                claims["rotation"] = rotation.to_json()
            record = MytokenRecord(
                id=mt_id,
                mom_id=hashlib.sha512(mt_id.encode()).hexdigest()[:64],
                parent_id=parent.id if parent else None,
                name=name,
                restrictions=tuple(restrictions),
                capabilities=tuple(capabilities),
                rotation=rotation,
                claims=claims,
                jwt=self._sign(claims),
                last_rotated_at=now,
                created_at=now,
            )
            self._records[mt_id] = record
            logger.info(
                "mytoken issued mom_id=%s parent=%s",
                record.mom_id[:12],
                parent.mom_id[:12] if parent else "-",
            )
            return record

    def _sign(self, claims: Dict[str, Any]) -> str:
        return self._key.sign(claims, headers={"typ": "MT+JWT"})

    def short_token_for(self, record: MytokenRecord) -> str:
        with self.lock:
            token = "".join(secrets.choice(_ALNUM) for _ in range(self._short_len))
            self._short[token] = record.jwt
            self._short_owner[token] = record.id
            return token

    def represent(self, record: MytokenRecord, response_type: str) -> Tuple[str, str]:
        """The token string to hand out and its ``mytoken_type``."""
        if response_type == "short_token":
            return self.short_token_for(record), "short_token"
        return record.jwt, "token"

    def token_response(
        self, record: MytokenRecord, response_type: str, now: float
    ) -> Dict[str, Any]:
        """A Mytoken API mytoken response object (empty fields omitted like the server)."""
        token, token_type = self.represent(record, response_type)
        out: Dict[str, Any] = {"mytoken": token, "mytoken_type": token_type}
        exp = record.claims.get("exp", 0)
        if exp and exp > now:
            out["expires_in"] = int(exp - int(now))
        out["mom_id"] = record.mom_id
        if record.restrictions:
            out["restrictions"] = [r.to_json() for r in record.restrictions]
        if record.capabilities:
            out["capabilities"] = list(record.capabilities)
        if record.rotation is not None and record.rotation.to_json():
            out["rotation"] = record.rotation.to_json()
        return out

    # --- lookup and validation ---------------------------------------------------------------

    def resolve(self, token: str) -> Tuple[str, str]:
        """Map a presented string to ``(jwt, original_type)``.

        Raises:
            ApiError: 400 ``invalid_request`` "token not valid" for strings under 32 chars and
                unknown short tokens (the server fails these while parsing the body).
        """
        if len(token) < MIN_TOKEN_LEN:
            raise ApiError(400, "invalid_request", "token not valid")
        if is_jwt(token):
            return token, "token"
        with self.lock:
            jwt_str = self._short.get(token)
        if jwt_str is None:
            raise ApiError(400, "invalid_request", "token not valid")
        return jwt_str, "short_token"

    def parse(self, token_jwt: str, now: float) -> Dict[str, Any]:
        """Signature and claim checks of the JWT itself (``ParseJWT``).

        Raises:
            ApiError: 401 ``invalid_token`` with the JWT library's message.
        """
        try:
            claims = self._key.verify(token_jwt)
        except jwt.InvalidSignatureError:
            raise ApiError(401, "invalid_token", "signature is invalid") from None
        except jwt.InvalidTokenError as exc:
            raise ApiError(401, "invalid_token", f"token is malformed: {exc}") from None
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and exp and now > exp:
            raise ApiError(401, "invalid_token", f"token is expired by {int(now - exp)}s")
        nbf = claims.get("nbf")
        if isinstance(nbf, (int, float)) and now < nbf:
            raise ApiError(401, "invalid_token", "token is not valid yet")
        if claims.get("iss") != self.issuer:
            raise ApiError(401, "invalid_token", "invalid issuer")
        if claims.get("aud") != self.issuer:
            raise ApiError(401, "invalid_token", "invalid Audience")
        return claims

    def authenticate(self, token_jwt: str, now: float) -> MytokenRecord:
        """Parse the JWT and check it is the live, current token of its chain.

        A superseded ``seq_no`` or an expired rotation lifetime is "revoked" (401 without a
        description); with ``auto_revoke`` the whole subtree is revoked on such a use.

        Raises:
            ApiError: 401 ``invalid_token``.
        """
        claims = self.parse(token_jwt, now)
        with self.lock:
            record = self._records.get(str(claims.get("jti")))
            if record is None or record.revoked:
                raise ApiError(401, "invalid_token")
            stale = claims.get("seq_no") != record.seq_no
            rot = record.rotation
            if not stale and rot is not None and rot.lifetime > 0:
                stale = now > record.last_rotated_at + rot.lifetime
            if stale:
                if rot is not None and rot.auto_revoke:
                    logger.info("mytoken auto-revoked on stale use mom_id=%s", record.mom_id[:12])
                    self.revoke(record.id, recursive=True)
                raise ApiError(401, "invalid_token")
            return record

    # --- counters, rotation, revocation ------------------------------------------------------

    def at_used(self, record: MytokenRecord, entry: Restriction) -> int:
        return self._at_used.get((record.id, entry.key()), 0)

    def other_used(self, record: MytokenRecord, entry: Restriction) -> int:
        return self._other_used.get((record.id, entry.key()), 0)

    def count_at(self, record: MytokenRecord, entry: Restriction) -> None:
        with self.lock:
            k = (record.id, entry.key())
            self._at_used[k] = self._at_used.get(k, 0) + 1

    def count_other(self, record: MytokenRecord, entry: Restriction) -> None:
        with self.lock:
            k = (record.id, entry.key())
            self._other_used[k] = self._other_used.get(k, 0) + 1

    def rotate(self, record: MytokenRecord, now: float) -> MytokenRecord:
        """Next token of the chain: ``seq_no``+1, fresh ``iat``/``nbf``, old JWT dead at once."""
        with self.lock:
            inow = int(now)
            claims = dict(record.claims)
            claims["seq_no"] = record.seq_no + 1
            claims["iat"] = inow
            claims["nbf"] = inow
            if record.rotation is not None and record.rotation.lifetime > 0:
                claims["exp"] = inow + record.rotation.lifetime
            record.claims = claims
            record.seq_no += 1
            record.jwt = self._sign(claims)
            record.last_rotated_at = now
            logger.info("mytoken rotated mom_id=%s seq_no=%d", record.mom_id[:12], record.seq_no)
            return record

    def children(self, record_id: str) -> List[MytokenRecord]:
        return [r for r in self._records.values() if r.parent_id == record_id]

    def revoke(self, record_id: str, *, recursive: bool) -> int:
        """Revoke one token (and its descendants if ``recursive``); returns how many.

        As in the server's database: the row goes, its short tokens with it (ON DELETE
        CASCADE), and children left alive lose their parent (ON DELETE SET NULL), so a
        later recursive revocation of an ancestor no longer reaches them.
        """
        with self.lock:
            record = self._records.get(record_id)
            if record is None:
                return 0
            count = 0 if record.revoked else 1
            record.revoked = True
            for short, owner in list(self._short_owner.items()):
                if owner == record_id:
                    self.drop_short_token(short)
            for child in self.children(record_id):
                if recursive:
                    count += self.revoke(child.id, recursive=True)
                else:
                    child.parent_id = None
            return count

    def revoke_all(self) -> int:
        with self.lock:
            return sum(self.revoke(rid, recursive=False) for rid in list(self._records))

    def by_mom_id(self, mom_id: str) -> Optional[MytokenRecord]:
        with self.lock:
            for record in self._records.values():
                if record.mom_id == mom_id:
                    return record
            return None

    def is_ancestor(self, ancestor: MytokenRecord, record: MytokenRecord) -> bool:
        with self.lock:
            current = record.parent_id
            while current is not None:
                if current == ancestor.id:
                    return True
                parent = self._records.get(current)
                current = parent.parent_id if parent else None
            return False

    def drop_short_token(self, token: str) -> None:
        with self.lock:
            self._short.pop(token, None)
            self._short_owner.pop(token, None)

    def introspection(self, record: MytokenRecord, token_type: str) -> Dict[str, Any]:
        """Tokeninfo ``introspect`` body, with per-entry ``usages_*_done`` (absent = never)."""
        with self.lock:
            token = dict(record.claims)
            token.pop("restrictions", None)
            if record.restrictions:
                used = []
                for entry in record.restrictions:
                    item = entry.to_json()
                    k = (record.id, entry.key())
                    if k in self._at_used:
                        item["usages_AT_done"] = self._at_used[k]
                    if k in self._other_used:
                        item["usages_other_done"] = self._other_used[k]
                    used.append(item)
                token["restrictions"] = used
            return {
                "valid": True,
                "token_type": token_type,
                "token": token,
                "mom_id": record.mom_id,
            }

    def subtree(self, record: MytokenRecord) -> Dict[str, Any]:
        """Tokeninfo ``subtokens`` tree: this token's entry plus its live children."""
        with self.lock:
            # the API's MytokenEntry: name omitted when empty, created = creation time
            token: Dict[str, Any] = {"mom_id": record.mom_id, "created": int(record.created_at)}
            if record.name:
                token["name"] = record.name
            entry: Dict[str, Any] = {"token": token}
            kids = [self.subtree(c) for c in self.children(record.id) if not c.revoked]
            if kids:
                entry["children"] = kids
            return entry
