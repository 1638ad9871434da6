"""Pure restriction/capability rules of the dev server (mirrors the real server's code)."""

from __future__ import annotations

import pytest

from jobtoken.devserver._restrictions import (
    Restriction,
    has_capability,
    host_allowed,
    hosts_subset,
    is_tighter,
    parse_restrictions,
    replace_this,
    restrictions_exp,
    select_for_at,
    select_for_other,
    tighten,
    tighten_capabilities,
)

NOW = 1_800_000_000


def never_used(_entry: Restriction) -> int:
    return 0


def test_parse_reads_wire_types_and_legacy_ip_key() -> None:
    (entry,) = parse_restrictions(
        [{"scope": "a b", "audience": ["x"], "ip": ["10.0.0.0/8"], "usages_AT": 3}]
    )
    assert entry.scopes == ("a", "b")
    assert entry.hosts == ("10.0.0.0/8",)
    assert entry.to_json() == {
        "scope": "a b",
        "audience": ["x"],
        "hosts": ["10.0.0.0/8"],
        "usages_AT": 3,
    }


@pytest.mark.parametrize(
    "bad",
    [
        [{"scope": ["storage.read:/"]}],  # fact 4: restriction scope is a string
        [{"audience": "https://se"}],  # fact 4: restriction audience is an array
        [{"usages_AT": "3"}],
        {"scope": "x"},
    ],
)
def test_parse_rejects_wrong_wire_types(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_restrictions(bad)


def test_this_host_becomes_client_ip() -> None:
    (entry,) = replace_this(parse_restrictions([{"hosts": ["this", "10.1.1.1"]}]), "192.0.2.7")
    assert entry.hosts == ("192.0.2.7", "10.1.1.1")


def test_mytoken_exp_is_latest_entry_exp_or_none_if_any_entry_unlimited() -> None:
    assert restrictions_exp([Restriction(exp=10), Restriction(exp=20)]) == 20
    assert restrictions_exp([Restriction(exp=10), Restriction()]) == 0


@pytest.mark.parametrize(
    ("ip", "hosts", "allowed"),
    [
        ("127.0.0.1", [], True),
        ("127.0.0.1", ["127.0.0.1"], True),
        ("127.0.0.1", ["127.0.0.0/8"], True),
        ("127.0.0.1", ["10.0.0.0/8"], False),
        ("127.0.0.1", ["localhost"], True),
        ("127.0.0.1", ["*.example.org"], False),
        ("::1", ["::1"], True),
    ],
)
def test_host_matching(ip: str, hosts: list, allowed: bool) -> None:
    assert host_allowed(ip, hosts) is allowed


def test_hosts_subset_uses_subnets() -> None:
    assert hosts_subset(["10.1.0.0/16", "10.2.3.4"], ["10.0.0.0/8"])
    assert not hosts_subset(["192.0.2.1"], ["10.0.0.0/8"])


def test_hosts_subset_matches_names_by_pattern_and_never_mixes_ip_versions() -> None:
    assert hosts_subset(["node1.example.org"], ["*.example.org"])
    assert not hosts_subset(["10.0.0.1"], ["::/0"])
    assert not hosts_subset(["node1.example.org"], ["10.0.0.0/8"])
    assert hosts_subset([], ["10.0.0.0/8"])


PARENT = Restriction(
    nbf=NOW, exp=NOW + 100, scope="a b", audience=("x",), hosts=("10.0.0.0/8",),
    geoip_allow=("de", "fr"), geoip_disallow=("zz",), usages_AT=10, usages_other=3,
)


@pytest.mark.parametrize(
    ("change", "tighter"),
    [
        ({}, True),
        ({"nbf": NOW - 1}, False),
        ({"nbf": NOW + 1, "exp": NOW + 99}, True),
        ({"exp": 0}, False),
        ({"exp": NOW + 101}, False),
        ({"scope": ""}, False),
        ({"scope": "a"}, True),
        ({"audience": ()}, False),
        ({"audience": ("x", "y")}, False),
        ({"hosts": ()}, False),
        ({"hosts": ("10.1.0.0/16",)}, True),
        ({"hosts": ("192.0.2.0/24",)}, False),
        ({"geoip_allow": ()}, False),
        ({"geoip_allow": ("de",)}, True),
        ({"geoip_disallow": ()}, False),
        ({"geoip_disallow": ("zz", "yy")}, True),
        ({"usages_AT": None}, False),
        ({"usages_AT": 11}, False),
        ({"usages_other": None}, False),
        ({"usages_other": 2}, True),
    ],
)
def test_is_tighter_entry_by_entry(change: dict, tighter: bool) -> None:
    from dataclasses import replace

    assert is_tighter(replace(PARENT, **change), PARENT) is tighter


def test_unrestricted_parent_entry_admits_any_child_entry() -> None:
    assert is_tighter(Restriction(exp=NOW, usages_other=1), Restriction())
    assert is_tighter(Restriction(), Restriction())


class TestTighten:
    parent = (Restriction(scope="a b", audience=("x", "y"), exp=NOW + 100, usages_AT=10),)

    def test_tighter_entry_is_kept(self) -> None:
        want = (Restriction(scope="a", audience=("x",), exp=NOW + 50, usages_AT=5),)
        assert tighten(self.parent, want) == (want, True)

    @pytest.mark.parametrize(
        "want",
        [
            Restriction(scope="a c", audience=("x",), exp=NOW + 50, usages_AT=5),  # extra scope
            Restriction(scope="a", audience=("x",), exp=NOW + 500, usages_AT=5),  # later exp
            Restriction(scope="a", audience=("x",), exp=0, usages_AT=5),  # unlimited exp
            Restriction(scope="a", audience=("x",), exp=NOW + 50),  # unlimited usages
            Restriction(scope="", audience=("x",), exp=NOW + 50, usages_AT=5),  # any scope
            Restriction(scope="a/sub", audience=("x",), exp=NOW + 50, usages_AT=5),
        ],
    )
    def test_wider_entry_is_dropped_and_parent_used(self, want: Restriction) -> None:
        assert tighten(self.parent, (want,)) == (self.parent, False)

    def test_mixed_request_keeps_only_tight_entries_and_reports_not_ok(self) -> None:
        good = Restriction(scope="a", audience=("x",), exp=NOW + 50, usages_AT=5)
        bad = Restriction(scope="zzz", audience=("x",), exp=NOW + 50, usages_AT=5)
        assert tighten(self.parent, (good, bad)) == ((good,), False)

    def test_usage_budget_is_shared_between_wanted_entries(self) -> None:
        first = Restriction(scope="a", audience=("x",), exp=NOW + 50, usages_AT=7)
        second = Restriction(scope="b", audience=("x",), exp=NOW + 50, usages_AT=7)
        # 7 + 7 > 10: the second entry no longer fits the reduced parent budget
        assert tighten(self.parent, (first, second)) == ((first,), False)

    def test_usages_other_budget_is_shared_too(self) -> None:
        parent = (Restriction(scope="a", usages_other=3),)
        first = Restriction(scope="a", usages_other=2)
        assert tighten(parent, (first, first)) == ((first,), False)

    def test_no_request_inherits_parent(self) -> None:
        assert tighten(self.parent, ()) == (self.parent, True)

    def test_unrestricted_parent_accepts_anything(self) -> None:
        want = (Restriction(scope="anything"),)
        assert tighten((), want) == (want, True)


class TestSelectForAt:
    entries = (
        Restriction(scope="storage.read:/a storage.create:/b", audience=("x",)),
        Restriction(scope="compute.read", usages_AT=1),
    )

    def select(self, scopes=(), audiences=(), now=NOW, ip="127.0.0.1", used=never_used):
        return select_for_at(
            self.entries, scopes=scopes, audiences=audiences, now=now, client_ip=ip, at_used=used
        )

    def test_exact_scope_subset_selects_entry(self) -> None:
        assert self.select(["storage.create:/b"], ["x"]) is self.entries[0]

    def test_narrower_path_is_not_a_subset(self) -> None:
        """Fact 6: exact-token matching, no WLCG path semantics."""
        assert self.select(["storage.create:/b/job42"]) is None

    def test_blank_scope_restriction_allows_no_scope(self) -> None:
        entries = (Restriction(scope=" "),)
        kwargs = dict(audiences=(), now=NOW, client_ip="127.0.0.1", at_used=never_used)
        assert select_for_at(entries, scopes=["a"], **kwargs) is None
        assert select_for_at(entries, scopes=[], **kwargs) is entries[0]

    def test_audience_must_be_subset(self) -> None:
        assert self.select(["storage.read:/a"], ["other"]) is None

    def test_usage_limit_is_used_lt_limit(self) -> None:
        assert self.select(["compute.read"], used=lambda e: 0) is self.entries[1]
        assert self.select(["compute.read"], used=lambda e: 1) is None

    def test_time_window_per_entry(self) -> None:
        entries = (Restriction(nbf=NOW + 10, exp=NOW + 20),)
        kwargs = dict(scopes=(), audiences=(), client_ip="127.0.0.1", at_used=never_used)
        assert select_for_at(entries, now=NOW, **kwargs) is None
        assert select_for_at(entries, now=NOW + 20, **kwargs) is entries[0]
        assert select_for_at(entries, now=NOW + 21, **kwargs) is None

    def test_hosts_restriction(self) -> None:
        entries = (Restriction(hosts=("10.0.0.0/8",)),)
        kwargs = dict(scopes=(), audiences=(), now=NOW, at_used=never_used)
        assert select_for_at(entries, client_ip="127.0.0.1", **kwargs) is None
        assert select_for_at(entries, client_ip="10.2.3.4", **kwargs) is entries[0]


def test_select_for_other_counts_usages_other() -> None:
    entries = (Restriction(usages_other=1),)
    assert select_for_other(entries, now=NOW, client_ip="::1", other_used=lambda e: 0)
    assert select_for_other(entries, now=NOW, client_ip="::1", other_used=lambda e: 1) is None


@pytest.mark.parametrize(
    ("caps", "wanted", "has"),
    [
        (["tokeninfo"], "tokeninfo:introspect", True),
        (["tokeninfo:introspect"], "tokeninfo", False),
        (["manage_mytokens"], "manage_mytokens:revoke", True),
        (["read@tokeninfo"], "tokeninfo:introspect", False),
        (["tokeninfo"], "read@tokeninfo:introspect", True),
        (["AT"], "create_mytoken", False),
    ],
)
def test_capability_hierarchy(caps: list, wanted: str, has: bool) -> None:
    assert has_capability(caps, wanted) is has


def test_capabilities_intersect_and_default_to_parent() -> None:
    parent = ("AT", "tokeninfo", "create_mytoken")
    assert tighten_capabilities(parent, ["AT", "settings"]) == ("AT",)
    assert tighten_capabilities(parent, ["tokeninfo:introspect"]) == ("tokeninfo:introspect",)
    assert tighten_capabilities(parent, None) == parent
    assert tighten_capabilities(parent, ["settings"]) == ()
