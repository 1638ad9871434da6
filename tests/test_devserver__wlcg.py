"""What the dev server's OP grants: WLCG per-path-component scope semantics."""

from __future__ import annotations

import pytest

from jobtoken.devserver._wlcg import grant_scopes, scope_allowed


@pytest.mark.parametrize(
    ("allowed", "wanted", "ok"),
    [
        (["storage.create:/vo"], "storage.create:/vo/jobs/42", True),
        (["storage.create:/vo"], "storage.create:/vo", True),
        (["storage.create:/vo"], "storage.create:/vobargain", False),
        (["storage.create:/vo/"], "storage.create:/vo/x", True),
        (["storage.create:/"], "storage.create:/anything", True),
        (["storage.read:/vo"], "storage.create:/vo/x", False),
        (["storage.modify:/vo"], "storage.create:/vo/x", True),
        (["storage.create:/vo"], "storage.modify:/vo/x", False),
        (["openid"], "openid", True),
        (["compute.read"], "compute.create", False),
    ],
)
def test_scope_allowed_per_path_component(allowed: list, wanted: str, ok: bool) -> None:
    assert scope_allowed(allowed, wanted) is ok


def test_grant_keeps_allowed_requested_scopes_only() -> None:
    allowed = ["storage.create:/vo", "openid"]
    assert grant_scopes(allowed, ["storage.create:/vo/a", "storage.read:/vo", "openid"]) == (
        "storage.create:/vo/a",
        "openid",
    )


def test_grant_everything_allowed_when_nothing_requested() -> None:
    assert grant_scopes(["a", "b"], []) == ("a", "b")
