"""Minting a restricted sub-mytoken: the one routine behind job and submission mytokens.

``prepare`` mints a job mytoken (capability ``AT``) and the HTCondor credential storer a
per-submission one (``AT`` + ``create_mytoken``). Both must do the same four things, in
this order, and a copy of them drifts (the storer once accepted a widened audience):

1. ask with ``error_on_restrictions``, so the server refuses a restriction it would
   otherwise drop silently (leaving a *wider* token);
2. save the parent's rotation (``token_update``) before anything else can fail: the old
   parent is dead the moment the server answered;
3. check the answer against what was asked (capabilities, scopes, audiences, ``exp``,
   usages), and, when the minted mytoken is a JWT, its own claims too (they are
   what the server honours): what a server returns is checked, not trusted;
4. revoke a minted token that failed the check (it must not stay live anywhere).

A server that refuses the asked ``exp`` as beyond its maximum mytoken lifetime is asked
once more without ``error_on_restrictions``: it then caps ``exp`` itself, and the check
(3) still refuses anything else it changed.

A lost answer (the request may have minted a token we never saw) can be searched for
and revoked by name when the caller knows the name is unique (``started_at``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Set, Tuple

from ._clock import utc_text
from ._errors import (
    JobtokenError,
    MytokenRejectedError,
    ProtocolError,
    ServerUnavailableError,
)
from ._mytokenfile import MytokenSource, save_rotated_mytoken

if TYPE_CHECKING:
    from ._mytoken import MytokenClient, MytokenResponse

__all__ = [
    "SubMytokenRequest",
    "check_minted",
    "mint_sub_mytoken",
    "revoke_children_named",
    "revoke_quietly",
]

logger = logging.getLogger(__name__)

# how much older than the mint's start (by the server's clock) a lost sub-mytoken may be
_LOST_MYTOKEN_SKEW_S = 120.0


@dataclass(frozen=True)
class SubMytokenRequest:
    """What to ask the server for; ``label`` names the token in messages ("job 7's mytoken").

    ``audiences`` empty: no audience restriction is asked (the parent's applies).
    """

    name: str
    label: str
    capabilities: Tuple[str, ...]
    scopes: Tuple[str, ...]
    exp: int
    audiences: Tuple[str, ...] = ()
    usages_at: Optional[int] = None
    usages_other: Optional[int] = None
    hosts: Tuple[str, ...] = ()

    def restriction(self) -> Dict[str, Any]:
        """The one Mytoken restriction clause this request stands for."""
        clause: Dict[str, Any] = {"scope": " ".join(self.scopes), "exp": self.exp}
        if self.audiences:
            clause["audience"] = list(self.audiences)
        if self.usages_at is not None:
            clause["usages_AT"] = self.usages_at
        if self.usages_other is not None:
            clause["usages_other"] = self.usages_other
        if self.hosts:
            clause["hosts"] = list(self.hosts)
        return clause


def mint_sub_mytoken(
    client: MytokenClient,
    parent: str,
    parent_source: MytokenSource,
    request: SubMytokenRequest,
    *,
    started_at: Optional[float] = None,
) -> MytokenResponse:
    """Mint, save the parent's rotation, check, and revoke what fails the check.

    Args:
        started_at: when the caller began (epoch s); given only when ``request.name``
            is unique to this request, it lets a lost answer be found and revoked.

    Raises:
        MytokenRejectedError: the server refused (not allowed by the parent);
        ServerUnavailableError: transient; ProtocolError: the answer was wider than asked
            (the minted token is then revoked, best effort).
    """
    name = request.name[:100]
    try:
        try:
            minted = _create(client, parent, request, name, strict=True)
        except MytokenRejectedError as exc:
            if not _beyond_max_lifetime(exc):
                raise
            # The server's limit is not published: let it cap ``exp`` (the one change
            # it makes without ``error_on_restrictions``); ``check_minted`` still refuses
            # and revokes anything wider than asked.
            minted = _create(client, parent, request, name, strict=False)
            logger.warning(
                "the server caps %s at its maximum mytoken lifetime (asked exp=%s); set "
                "site.max_mytoken_lifetime_s to ask for no more", request.label,
                utc_text(request.exp),
            )
    except ServerUnavailableError as exc:
        if started_at is not None and answer_may_be_lost(exc):
            _reap_lost(client, parent_source, parent, name, started_at)
        raise
    if minted.token_update is not None:
        save_rotated_mytoken(parent_source, minted.token_update.mytoken)
    try:
        check_minted(minted, request)
    except JobtokenError:
        revoke_quietly(client, minted.mytoken, request.label)
        raise
    return minted


# the real server's error_description (oidc-mytoken/server, mytokenHandler.go), 400
# invalid_request, when a request with error_on_restrictions asks beyond the provider's
# mytokens_max_lifetime
MAX_LIFETIME_REFUSAL = "requested restrictions do not respect maximum mytoken lifetime"


def _beyond_max_lifetime(exc: MytokenRejectedError) -> bool:
    return exc.status == 400 and MAX_LIFETIME_REFUSAL in str(exc.error_description or "")


def _create(
    client: MytokenClient, parent: str, request: SubMytokenRequest, name: str, *, strict: bool
) -> MytokenResponse:
    return client.create_mytoken(
        parent,
        restrictions=[request.restriction()],
        capabilities=list(request.capabilities),
        name=name,
        error_on_restrictions=strict,
    )


def check_minted(minted: MytokenResponse, request: SubMytokenRequest) -> None:
    """Refuse a sub-mytoken that came back wider than asked.

    Raises:
        ProtocolError: more capabilities, no restriction, a wider scope or audience, or
            a later ``exp`` than asked.
    """
    what = request.label
    caps = set(minted.capabilities or ())
    if caps and not caps <= set(request.capabilities):
        raise ProtocolError(
            f"server minted {what} with capabilities {sorted(caps)}, "
            f"not {sorted(request.capabilities)}"
        )
    if not minted.restrictions:
        raise ProtocolError(f"server minted {what} without restrictions")
    for entry in minted.restrictions:
        problem = _wider_than_asked(entry, request)
        if problem:
            raise ProtocolError(f"server {problem.format(what=what)}")
    _check_own_claims(str(getattr(minted, "mytoken", "") or ""), request)


def _check_own_claims(mytoken: str, request: SubMytokenRequest) -> None:
    """Refuse a JWT mytoken whose own claims are not what was asked.

    The JSON answer is the server's description; the token's claims are what the
    server will honour when the token is used, so a server that describes a narrow
    token and signs a wide one is caught here. A short (opaque) mytoken carries no
    claims: the JSON answer is all there is to check.
    """
    if mytoken.count(".") != 2:
        return
    from ._tokens import unverified_claims

    what = request.label
    claims = unverified_claims(mytoken)
    if claims is None:
        raise ProtocolError(f"server minted {what} with unreadable (or repeated) claims")
    problem = _claimed_capabilities_problem(claims.get("capabilities"), request) or (
        _claimed_restrictions_problem(claims.get("restrictions"), request))
    if problem:
        raise ProtocolError(f"server {problem}")


def _claimed_capabilities_problem(caps: Any, request: SubMytokenRequest) -> Optional[str]:
    """The token's ``capabilities`` claim must be exactly what was asked."""
    if isinstance(caps, list) and {str(c) for c in caps} == set(request.capabilities):
        return None
    granted = sorted(str(c) for c in caps) if isinstance(caps, list) else "unreadable"
    return (f"minted {request.label} whose claims grant capabilities {granted}, "
            f"not {sorted(request.capabilities)}")


def _claimed_restrictions_problem(entries: Any, request: SubMytokenRequest) -> Optional[str]:
    """Every clause of the token's ``restrictions`` claim within the request."""
    if not isinstance(entries, list) or not entries:
        return f"minted {request.label} whose claims carry no restrictions"
    for entry in entries:
        problem = _wider_than_asked(entry, request) if isinstance(entry, dict) else (
            "minted {what} with an unreadable restriction claim")
        if problem:
            return problem.format(what=request.label) + " (in the token's claims)"
    return None


def _wider_than_asked(entry: Mapping[str, Any], request: SubMytokenRequest) -> Optional[str]:
    """What makes one returned restriction clause wider than the request, if anything."""
    got_scopes = set(str(entry.get("scope") or "").split())
    if not got_scopes or not got_scopes <= set(request.scopes):
        return "widened {what}'s scope restriction"
    got_aud = _audiences(entry)
    if request.audiences and (not got_aud or not got_aud <= set(request.audiences)):
        return "widened {what}'s audience restriction"
    if not _number_within(entry.get("exp"), request.exp + 1):
        return "gave {what} a later expiry than asked"
    return _usages_problem(entry, request)


def _usages_problem(entry: Mapping[str, Any], request: SubMytokenRequest) -> Optional[str]:
    """A usage limit asked for must come back, and no higher."""
    for key, asked in (("usages_AT", request.usages_at), ("usages_other", request.usages_other)):
        if asked is not None and not _number_within(entry.get(key), asked):
            return "gave {what} more " + key + " than asked"
    return None


def _number_within(value: Any, limit: float) -> bool:
    """Whether a restriction number is present, positive and at most ``limit``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value:
        return False
    try:
        return float(value) <= limit
    except OverflowError:
        return False


def _audiences(entry: Mapping[str, Any]) -> Set[str]:
    """A clause's audience restriction: one string or a list of them (both are valid)."""
    value = entry.get("audience") or ()
    return {value} if isinstance(value, str) else {str(a) for a in value}


def revoke_quietly(client: MytokenClient, mytoken: str, label: str) -> None:
    """Revoke a minted token we will not use; a failure is logged, never raised."""
    try:
        client.revoke(mytoken, recursive=True)
    except JobtokenError as exc:
        logger.warning("cannot revoke the refused %s: %s", label, exc.message)


def answer_may_be_lost(exc: JobtokenError) -> bool:
    """Whether the server may have minted a token whose answer never arrived.

    A read timeout, a connection cut after the request went out, or a garbled answer:
    the request may have been committed. A status the server chose (5xx, 429, 4xx) was
    answered before anything was minted; a refused or timed-out connection
    (``reached_server`` False, classified where httpx errors are translated) sent
    nothing; a rotated-then-garbled answer (not retryable) means the parent we hold is
    dead, and using it again could revoke its whole chain.
    """
    if not isinstance(exc, ServerUnavailableError) or not exc.retryable:
        return False
    if exc.reached_server is False:
        return False
    return isinstance(exc, ProtocolError) or exc.status is None


def _reap_lost(
    client: MytokenClient, parent_source: MytokenSource, parent: str, name: str, start: float
) -> None:
    """Revoke the sub-mytoken a lost answer may have left live at the server.

    Found by tokeninfo ``subtokens`` of the parent: the children with this name, created
    since just before the mint began. Best effort: the parent may lack
    ``tokeninfo:subtokens``, or the server may still be unreachable; then the orphan
    lives until its ``exp``, as the warning says.
    """
    try:
        lost = revoke_children_named(
            client, parent_source, parent, name, created_after=start - _LOST_MYTOKEN_SKEW_S
        )
    except JobtokenError as exc:
        logger.warning(
            "cannot check for a mytoken %r minted by a request whose answer was lost (it "
            "stays valid until it expires): %s", name, exc.message,
        )
        return
    for mom_id in lost:
        logger.info(
            "revoked mytoken %r mom_id=%s minted by a request whose answer was lost",
            name, mom_id,
        )


def revoke_children_named(
    client: MytokenClient, parent_source: MytokenSource, parent: str, name: str,
    *, created_after: Optional[float] = None,
) -> Tuple[str, ...]:
    """Revoke (recursively, by ``mom_id``) the parent's live children called ``name``
    (created since ``created_after``, if given) and return their mom_ids.

    Needs only the parent (with ``tokeninfo``), never the child: so a CE can revoke a
    killed job's mytoken after its session directory is gone. A rotated parent is saved
    back to its file before it is used again.

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
