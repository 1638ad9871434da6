from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobtoken._bearerdiscovery import default_token_path, discover_bearer_token
from jobtoken._errors import TokenFileError

UID = os.geteuid()


@pytest.fixture()
def tmp_bt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Redirect the spec's /tmp step into a private directory for the test."""
    fake_tmp = tmp_path / "tmp"
    fake_tmp.mkdir()
    real_path = Path

    def fake(p: str, *rest: str) -> Path:
        return real_path(str(fake_tmp) if p == "/tmp" else p, *rest)

    monkeypatch.setattr("jobtoken._bearerdiscovery.Path", fake)
    return fake_tmp


def test_bearer_token_variable_wins(tmp_path: Path, tmp_bt: Path) -> None:
    f = tmp_path / "file"
    f.write_text("from-file")
    found = discover_bearer_token({"BEARER_TOKEN": " tok \n", "BEARER_TOKEN_FILE": str(f)})
    assert found is not None and (found.token, found.source) == ("tok", "BEARER_TOKEN")


def test_empty_variable_falls_through_to_file(tmp_path: Path, tmp_bt: Path) -> None:
    f = tmp_path / "file"
    f.write_text("\v\ffrom-file\n")
    found = discover_bearer_token({"BEARER_TOKEN": " \t", "BEARER_TOKEN_FILE": str(f)})
    assert found is not None and (found.token, found.source) == ("from-file", str(f))


def test_xdg_runtime_dir_then_tmp_with_effective_uid(tmp_path: Path, tmp_bt: Path) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    (tmp_bt / f"bt_u{UID}").write_text("from-tmp")
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    found = discover_bearer_token(env)
    assert found is not None and found.token == "from-tmp"  # missing in XDG: fall back to /tmp
    (xdg / f"bt_u{UID}").write_text("from-xdg")
    found = discover_bearer_token(env)
    assert found is not None and found.token == "from-xdg"


def test_empty_file_means_next_step(tmp_path: Path, tmp_bt: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    (tmp_bt / f"bt_u{UID}").write_text("from-tmp")
    found = discover_bearer_token({"BEARER_TOKEN_FILE": str(empty)})
    assert found is not None and found.token == "from-tmp"


def test_nothing_found(tmp_bt: Path) -> None:
    assert discover_bearer_token({}) is None


def test_unsafe_file_stops_discovery(tmp_path: Path, tmp_bt: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("tok")
    bad.chmod(0o666)
    (tmp_bt / f"bt_u{UID}").write_text("from-tmp")
    with pytest.raises(TokenFileError, match="writable by anyone"):
        discover_bearer_token({"BEARER_TOKEN_FILE": str(bad)})


def test_default_token_path() -> None:
    assert default_token_path({}, euid=1221) == Path("/tmp/bt_u1221")
    assert default_token_path({"XDG_RUNTIME_DIR": "/run/user/1221"}, euid=1221) == Path(
        "/run/user/1221/bt_u1221"
    )


def test_a_token_file_of_another_user_is_refused_with_the_reason(tmp_bt: Path) -> None:
    # issue 12 item 9: a planted /tmp/bt_u<uid> would feed our tools someone else's token
    planted = tmp_bt / f"bt_u{UID}"
    planted.write_text("the attacker's token")
    if UID == 0:
        os.chown(planted, 4242, 4242)
        owner = 4242
    else:  # pose as another user: then our own file is "someone else's"
        owner = UID
        planted.rename(tmp_bt / f"bt_u{UID + 1}")
    with pytest.raises(TokenFileError, match=f"belongs to uid {owner}, not to you.*planted"):
        discover_bearer_token({}, euid=UID if UID == 0 else UID + 1)
