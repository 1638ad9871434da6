"""Mytoken restriction and capability rules, as the real server applies them.

Pure: no I/O, no clock reads, no locks. Usage counters and "now" are passed in. Mirrors
``restrictions.Tighten``/``isTighterThan``, ``GetValidForAT``/``WithScopes``/``WithAudiences``
and ``api.Capabilities.Has``/``TightenCapabilities`` of oidc-mytoken/server.

Must NOT: use WLCG path semantics. Restriction scopes match as exact tokens (fact 6).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "Restriction",
    "has_capability",
    "host_allowed",
    "hosts_subset",
    "parse_restrictions",
    "enforce_max_lifetime",
    "restrictions_exp",
    "restrictions_nbf",
    "select_for_at",
    "select_for_other",
    "tighten",
    "tighten_capabilities",
]

_LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class Restriction:
    """One restriction entry. Keys inside an entry are AND'ed; entries are OR'ed."""

    nbf: int = 0
    exp: int = 0
    scope: str = ""
    audience: Tuple[str, ...] = ()
    hosts: Tuple[str, ...] = ()
    geoip_allow: Tuple[str, ...] = ()
    geoip_disallow: Tuple[str, ...] = ()
    usages_AT: Optional[int] = None  # noqa: N815 (wire name)
    usages_other: Optional[int] = None

    @property
    def scopes(self) -> Tuple[str, ...]:
        return tuple(s for s in self.scope.split(" ") if s)

    def to_json(self) -> Dict[str, Any]:
        """Wire shape: empty keys omitted (Go ``omitempty``)."""
        out: Dict[str, Any] = {}
        if self.nbf:
            out["nbf"] = self.nbf
        if self.exp:
            out["exp"] = self.exp
        if self.scope:
            out["scope"] = self.scope
        for key in ("audience", "hosts", "geoip_allow", "geoip_disallow"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        if self.usages_AT is not None:
            out["usages_AT"] = self.usages_AT
        if self.usages_other is not None:
            out["usages_other"] = self.usages_other
        return out

    def key(self) -> str:
        """Stable identity of the entry; usage counters are kept per entry (server: hash)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"restriction key {key} must be an integer")
    return value


def _str_list(value: Any, key: str) -> Tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"restriction key {key} must be an array of strings")
    return tuple(value)


def parse_restrictions(raw: Any) -> Tuple[Restriction, ...]:
    """Parse the JSON ``restrictions`` array, with the wire types the server demands.

    ``scope`` is a space-separated string, ``audience``/``hosts`` are arrays; the legacy key
    ``ip`` is read as ``hosts``.

    Raises:
        ValueError: wrong shape or type (the server answers 400 ``invalid_request``).
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError("restrictions must be an array of objects")
    return tuple(_parse_entry(item) for item in raw)


def _scope_string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError("restriction key scope must be a space-separated string")
    return value


# each key's wire type (``ip`` is the legacy spelling of ``hosts``)
_ENTRY_READERS: Tuple[Tuple[str, Callable[[Any, str], Any]], ...] = (
    ("nbf", _int),
    ("exp", _int),
    ("scope", _scope_string),
    ("hosts", _str_list),
    ("audience", _str_list),
    ("geoip_allow", _str_list),
    ("geoip_disallow", _str_list),
    ("usages_AT", _int),
    ("usages_other", _int),
)


def _parse_entry(item: Any) -> Restriction:
    """One entry of the array; null values count as absent."""
    if not isinstance(item, dict):
        raise ValueError("restrictions must be an array of objects")
    if "hosts" not in item and "ip" in item:
        item = {**item, "hosts": item["ip"]}
    return Restriction(**{
        key: read(item[key], key) for key, read in _ENTRY_READERS if item.get(key) is not None
    })


def replace_this(entries: Sequence[Restriction], client_ip: str) -> Tuple[Restriction, ...]:
    """Replace the special host ``this`` with the requesting client's IP."""
    return tuple(
        replace(e, hosts=tuple(client_ip if h == "this" else h for h in e.hosts)) for e in entries
    )


def restrictions_exp(entries: Sequence[Restriction]) -> int:
    """The mytoken's ``exp``: the latest entry ``exp``, 0 (none) if any entry lacks one."""
    if not entries or any(e.exp == 0 for e in entries):
        return 0
    return max(e.exp for e in entries)


def enforce_max_lifetime(
    entries: Sequence[Restriction], max_lifetime_s: int, now: float
) -> Tuple[Tuple[Restriction, ...], bool]:
    """Cap every entry's ``exp`` at ``now + max_lifetime_s``; ``(entries, changed)``.

    As the real server's ``EnforceMaxLifetime``: an entry without ``exp`` or a later
    one gets the cap, and no entries at all become one entry holding only the cap.
    ``max_lifetime_s`` 0: no limit.
    """
    if not max_lifetime_s:
        return tuple(entries), False
    cap = int(now) + int(max_lifetime_s)
    if not entries:
        return (Restriction(exp=cap),), True
    out = tuple(
        replace(e, exp=cap) if e.exp == 0 or e.exp > cap else e for e in entries
    )
    return out, out != tuple(entries)


def restrictions_nbf(entries: Sequence[Restriction]) -> int:
    """The earliest entry ``nbf``, 0 if any entry lacks one."""
    if not entries or any(e.nbf == 0 for e in entries):
        return 0
    return min(e.nbf for e in entries)


# --- hosts -------------------------------------------------------------------------------


def _network(value: str) -> Optional[Any]:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def host_allowed(client_ip: str, hosts: Sequence[str]) -> bool:
    """Whether ``client_ip`` matches one of ``hosts`` (IPs, subnets, host names).

    Host names (with ``*`` wildcards) are matched against the names the dev server knows for
    the client; it does no DNS, so only ``localhost`` for loopback clients.
    """
    if not hosts:
        return True
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip in hosts
    names = _LOOPBACK_NAMES if ip.is_loopback else ()
    for host in hosts:
        net = _network(host)
        if net is not None:
            if ip.version == net.version and ip in net:
                return True
            continue
        if any(fnmatch.fnmatchcase(name, host.lower()) for name in names):
            return True
    return False


def hosts_subset(wanted: Sequence[str], allowed: Sequence[str]) -> bool:
    """Every wanted host/subnet lies inside one allowed host/subnet (``IPsAreSubSet``)."""
    return all(any(_host_within(host, cand) for cand in allowed) for host in wanted)


def _host_within(host: str, cand: str) -> bool:
    """A subnet inside a subnet of the same IP version, or a name the pattern ``cand`` matches."""
    wnet, anet = _network(host), _network(cand)
    if wnet is not None and anet is not None:
        return bool(wnet.version == anet.version and wnet.subnet_of(anet))
    return host == cand or (wnet is None and fnmatch.fnmatchcase(host, cand))


# --- tightening (sub-mytokens) -------------------------------------------------------------


def _cmp_usages(a: Optional[int], b: Optional[int]) -> int:
    """Compare with None meaning infinity (``CompareNullableIntsWithNilAsInfinity``)."""
    if a is None and b is None:
        return 0
    if a is None:
        return 1
    if b is None:
        return -1
    return (a > b) - (a < b)


def _subset(a: Iterable[str], b: Iterable[str]) -> bool:
    return set(a) <= set(b)


def _within_window(r: Restriction, b: Restriction) -> bool:
    """``r``'s time window lies inside ``b``'s (``exp`` 0: no end)."""
    return r.nbf >= b.nbf and (b.exp == 0 or (r.exp != 0 and r.exp <= b.exp))


def _narrower_list(
    mine: Sequence[str],
    theirs: Sequence[str],
    within: Callable[[Sequence[str], Sequence[str]], bool] = _subset,
) -> bool:
    """An empty list allows anything: only an empty ``theirs`` admits an empty ``mine``."""
    return not theirs or (bool(mine) and within(mine, theirs))


def is_tighter(r: Restriction, b: Restriction) -> bool:
    """Whether entry ``r`` is at least as tight as entry ``b`` (``isTighterThan``)."""
    return _within_window(r, b) and all((
        _narrower_list(r.scopes, b.scopes),
        _narrower_list(r.audience, b.audience),
        _narrower_list(r.hosts, b.hosts, hosts_subset),
        _narrower_list(r.geoip_allow, b.geoip_allow),
        _subset(b.geoip_disallow, r.geoip_disallow),
        _cmp_usages(r.usages_AT, b.usages_AT) <= 0,
        _cmp_usages(r.usages_other, b.usages_other) <= 0,
    ))


def _subtract(budget: Optional[int], taken: Optional[int]) -> Optional[int]:
    return budget if budget is None or taken is None else budget - taken


def _spent(entry: Restriction, want: Restriction) -> Restriction:
    """``entry`` with the usage budgets ``want`` takes from it (None: unlimited)."""
    return replace(
        entry,
        usages_other=_subtract(entry.usages_other, want.usages_other),
        usages_AT=_subtract(entry.usages_AT, want.usages_AT),
    )


def tighten(
    parent: Sequence[Restriction], wanted: Sequence[Restriction]
) -> Tuple[Tuple[Restriction, ...], bool]:
    """Restrictions for a sub-mytoken and whether every wanted entry was kept.

    Each wanted entry survives only if it is as tight as some parent entry; the parent's
    usage budgets shrink by what earlier wanted entries took. If nothing survives, the
    parent's restrictions are used (``ok`` is then true only if nothing was asked for).
    """
    if not parent:
        return tuple(wanted), True
    base = list(parent)
    result: List[Restriction] = []
    dropped = False
    for want in wanted:
        for i, entry in enumerate(base):
            if is_tighter(want, entry):
                result.append(want)
                base[i] = _spent(entry, want)
                break
        else:
            dropped = True
    if not result:
        return tuple(parent), not wanted
    return tuple(result), not dropped


# --- selection at use time -------------------------------------------------------------------


UsageLookup = Callable[[Restriction], int]


def _usable(e: Restriction, now: float, client_ip: str) -> bool:
    if now < e.nbf:
        return False
    if e.exp != 0 and now > e.exp:
        return False
    if not host_allowed(client_ip, e.hosts):
        return False
    # No geo database: the client's country is unknown, so an allow-list never matches.
    return not e.geoip_allow


def select_for_at(
    entries: Sequence[Restriction],
    *,
    scopes: Sequence[str],
    audiences: Sequence[str],
    now: float,
    client_ip: str,
    at_used: UsageLookup,
) -> Optional[Restriction]:
    """The entry an AT request uses, or None if no entry allows it.

    Usable entries (time window, hosts, ``usages_AT`` with ``used < limit``) whose ``scope``
    tokens are a superset of the requested scopes (exact strings) and whose ``audience`` is a
    superset of the requested audiences (empty entry values allow anything); first wins.
    Callers handle "no restrictions at all" before calling.
    """
    for e in entries:
        if not _usable(e, now, client_ip):
            continue
        if e.usages_AT is not None and not at_used(e) < e.usages_AT:
            continue
        if _covers(e.scope, e.scopes, scopes) and _covers(e.audience, e.audience, audiences):
            return e
    return None


def _covers(restricted: object, allowed: Sequence[str], wanted: Sequence[str]) -> bool:
    """Nothing wanted, nothing ``restricted``, or every wanted string ``allowed`` exactly."""
    return not wanted or not restricted or _subset(wanted, allowed)


def select_for_other(
    entries: Sequence[Restriction], *, now: float, client_ip: str, other_used: UsageLookup
) -> Optional[Restriction]:
    """The entry a non-AT use (e.g. creating a sub-mytoken) counts against, or None."""
    for e in entries:
        if not _usable(e, now, client_ip):
            continue
        if e.usages_other is not None and not other_used(e) < e.usages_other:
            continue
        return e
    return None


# --- capabilities ----------------------------------------------------------------------------

_READ_ONLY = "read@"


def _cap_parts(name: str) -> Tuple[List[str], bool]:
    read_only = name.startswith(_READ_ONLY)
    if read_only:
        name = name[len(_READ_ONLY) :]
    return name.split(":"), read_only


def has_capability(capabilities: Iterable[str], wanted: str) -> bool:
    """Whether ``capabilities`` grant ``wanted``; a parent capability covers its children."""
    want_parts, want_ro = _cap_parts(wanted)
    for cap in capabilities:
        parts, ro = _cap_parts(cap)
        if ro and not want_ro:
            continue
        if len(parts) > len(want_parts):
            continue
        if want_parts[: len(parts)] == parts:
            return True
    return False


def tighten_capabilities(
    parent: Sequence[str], requested: Optional[Sequence[str]]
) -> Tuple[str, ...]:
    """Requested capabilities the parent holds; the parent's own if none were requested."""
    if requested is None:
        return tuple(parent)
    return tuple(c for c in requested if has_capability(parent, c))
