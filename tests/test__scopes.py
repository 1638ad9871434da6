from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobtoken._scopes import (
    invalid_scopes,
    is_valid_scope,
    join_scopes,
    narrower_or_equal,
    not_exactly_within,
    parse_scope,
    parse_scopes,
    scope_covers,
    scopes_within,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ()),
        (None, ()),
        ("openid", ("openid",)),
        ("a b  c", ("a", "b", "c")),
        ("  a\tb\nc ", ("a", "b", "c")),
        ("a b a", ("a", "b")),
    ],
)
def test_parse_scopes_splits_on_whitespace_and_dedups(value, expected):
    assert parse_scopes(value) == expected


def test_join_scopes_is_space_separated_wire_form():
    assert join_scopes(["storage.read:/a", "", "openid", "openid"]) == "storage.read:/a openid"


@pytest.mark.parametrize(
    ("scope", "valid"),
    [
        ("openid", True),
        ("compute.read", True),
        ("wlcg.groups:/cms", True),
        ("storage.read:/", True),
        ("storage.read:/foo", True),
        ("storage.create:/foo/bar/", True),
        ("storage.read", False),  # storage scope without path
        ("storage.read:", False),
        ("storage.read:foo", False),  # relative
        ("storage.read:/foo//bar", False),
        ("storage.read:/foo/../bar", False),
        ("storage.read:/./foo", False),
        ("storage.:/foo", False),
        ("", False),
        ("a b", False),
    ],
)
def test_scope_validity(scope, valid):
    assert is_valid_scope(scope) is valid
    assert (scope in invalid_scopes([scope])) is (not valid)


def test_parse_scope_splits_kind_and_path():
    s = parse_scope("storage.create:/vo/out")
    assert (s.kind, s.path, s.is_storage) == ("storage.create", "/vo/out", True)
    assert parse_scope("openid").path is None


@pytest.mark.parametrize(
    ("granted", "wanted", "covers"),
    [
        # per path component
        ("storage.read:/foo", "storage.read:/foo", True),
        ("storage.read:/foo", "storage.read:/foo/bar", True),
        ("storage.read:/foo", "storage.read:/foo/bar/baz", True),
        ("storage.read:/foo", "storage.read:/foobar", False),
        ("storage.read:/foo/bar", "storage.read:/foo/bargain", False),
        ("storage.read:/foo/bar", "storage.read:/foo", False),
        ("storage.read:/", "storage.read:/anything/at/all", True),
        ("storage.read:/", "storage.read:/", True),
        # trailing slash = directory only
        ("storage.create:/foo/", "storage.create:/foo", False),
        ("storage.create:/foo/", "storage.create:/foo/", True),
        ("storage.create:/foo/", "storage.create:/foo/x", True),
        ("storage.create:/foo", "storage.create:/foo/", True),
        # kinds
        ("storage.modify:/foo", "storage.create:/foo/x", True),
        ("storage.create:/foo", "storage.modify:/foo", False),
        ("storage.modify:/foo", "storage.read:/foo", False),
        ("storage.stage:/foo", "storage.read:/foo", False),
        ("storage.read:/foo", "storage.create:/foo", False),
        # invalid on either side
        ("storage.read", "storage.read:/foo", False),
        ("storage.read:/", "storage.read", False),
        ("storage.read:/foo/../bar", "storage.read:/foo/../bar", False),
        # non-storage scopes are exact
        ("openid", "openid", True),
        ("compute.read", "compute.create", False),
        ("wlcg.groups:/cms", "wlcg.groups:/cms/higgs", False),
        ("storage.read:/cms", "wlcg.groups:/cms", False),
        ("Openid", "openid", False),
    ],
)
def test_scope_covers(granted, wanted, covers):
    assert scope_covers(granted, wanted) is covers


@pytest.mark.parametrize(
    ("granted", "allowed", "outside"),
    [
        (["storage.create:/vo/jobs/1"], ["storage.create:/vo/jobs"], ()),
        (["storage.create:/vo/jobs1"], ["storage.create:/vo/jobs"], ("storage.create:/vo/jobs1",)),
        (
            ["storage.create:/a/x", "storage.read:/b", "openid"],
            ["storage.modify:/a", "openid"],
            ("storage.read:/b",),
        ),
        (["storage.read"], ["storage.read:/"], ("storage.read",)),
        ([], ["openid"], ()),
        (["openid"], [], ("openid",)),
    ],
)
def test_scopes_within_returns_the_uncovered_granted_scopes(granted, allowed, outside):
    assert scopes_within(granted, allowed) == outside


@pytest.mark.parametrize(
    ("wanted", "allowed", "ok"),
    [
        (["storage.create:/vo/jobs/42"], ["storage.create:/vo/jobs"], True),
        (["storage.modify:/vo/jobs/42"], ["storage.create:/vo/jobs"], False),
        (["storage.create:/vo/jobsX"], ["storage.create:/vo/jobs"], False),
        (["storage.create"], ["storage.create:/"], False),
        ([], ["storage.create:/vo"], True),
    ],
)
def test_narrower_or_equal_jobs_may_narrow_never_widen(wanted, allowed, ok):
    assert narrower_or_equal(wanted, allowed) is ok


def test_not_exactly_within_is_mytokens_exact_string_rule():
    parent = ["storage.create:/vo/out", "openid"]
    assert not_exactly_within(["storage.create:/vo/out"], parent) == ()
    # a WLCG-narrower path is still refused by the Mytoken server
    assert not_exactly_within(["storage.create:/vo/out/job42"], parent) == (
        "storage.create:/vo/out/job42",
    )


# --- properties -------------------------------------------------------------------------

_segment = st.text(alphabet="abcxyz0-_", min_size=1, max_size=4).filter(
    lambda s: s not in (".", "..")
)
_paths = st.lists(_segment, min_size=0, max_size=4).map(lambda parts: "/" + "/".join(parts))
_kinds = st.sampled_from(["storage.read", "storage.create", "storage.modify", "storage.stage"])
_storage_scopes = st.builds(lambda k, p: f"{k}:{p}", _kinds, _paths)


@given(_storage_scopes)
def test_valid_scope_covers_itself(scope):
    assert scope_covers(scope, scope)


@given(_kinds, _paths)
def test_root_grant_covers_every_path_of_its_kind(kind, path):
    assert scope_covers(f"{kind}:/", f"{kind}:{path}")


@given(_kinds, _paths, _segment)
def test_grant_covers_children_but_not_siblings_sharing_a_prefix(kind, path, extra):
    base = path.rstrip("/") or ""
    granted = f"{kind}:{base}/{extra}"
    assert scope_covers(granted, f"{granted}/child")
    assert not scope_covers(granted, f"{granted}x")


@given(_storage_scopes, _storage_scopes, _storage_scopes)
def test_coverage_is_transitive(a, b, c):
    if scope_covers(a, b) and scope_covers(b, c):
        assert scope_covers(a, c)


@given(st.lists(_storage_scopes, max_size=5))
def test_a_set_is_within_itself(scopes):
    assert scopes_within(scopes, scopes) == ()
    assert narrower_or_equal(scopes, scopes)


@given(_storage_scopes, _storage_scopes)
def test_mutual_coverage_only_for_equal_or_trailing_slash_variants(a, b):
    if scope_covers(a, b) and scope_covers(b, a):
        assert a.rstrip("/") == b.rstrip("/") or a == b
