from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobtoken._errors import ConfigError, ProtocolError
from jobtoken._mytokenfile import (
    MytokenSource,
    check_mytoken_value,
    load_mytoken,
    save_rotated_mytoken,
)
from tests import jwtmint

SHORT = "S" * 64


def write(p: Path, text: str, mode: int = 0o600) -> Path:
    p.write_text(text)
    p.chmod(mode)
    return p


def test_jwt_mytoken_and_short_token_are_accepted(tmp_path: Path) -> None:
    mt = jwtmint.mytoken_jwt()
    assert load_mytoken(MytokenSource(path=write(tmp_path / "mt", mt + "\n"))) == mt
    assert load_mytoken(MytokenSource(path=write(tmp_path / "st", SHORT))) == SHORT


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("abc", "too short"),
        ("two words" * 5, "not a single token"),
        ("a.b.c" + "x" * 40, "malformed JWT"),
    ],
)
def test_bad_contents(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_mytoken(MytokenSource(path=write(tmp_path / "mt", content)))


def test_access_token_instead_of_mytoken_is_named(tmp_path: Path) -> None:
    at = jwtmint.access_token()
    with pytest.raises(ConfigError, match="holds an access token, not a mytoken"):
        load_mytoken(MytokenSource(path=write(tmp_path / "mt", at)))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_mytoken(MytokenSource(path=tmp_path / "nope"))


def test_world_readable_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path / "mt", SHORT, 0o644)
    with pytest.raises(ConfigError, match="readable by everyone"):
        load_mytoken(MytokenSource(path=p))


def test_group_readable_is_accepted(tmp_path: Path) -> None:
    p = write(tmp_path / "mt", SHORT, 0o640)
    assert load_mytoken(MytokenSource(path=p)) == SHORT


def test_foreign_symlink_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:  # pragma: no cover
        pytest.skip("needs root to chown a symlink")
    target = write(tmp_path / "mt", SHORT)
    link = tmp_path / "link"
    link.symlink_to(target)
    os.lchown(link, 4242, 4242)
    with pytest.raises(ConfigError, match="symlink owned by uid 4242"):
        load_mytoken(MytokenSource(path=link))


def test_env_source(monkeypatch: pytest.MonkeyPatch) -> None:
    src = MytokenSource(env_var="MY_MT")
    with pytest.raises(ConfigError, match=r"\$MY_MT is not set"):
        load_mytoken(src, env={})
    assert load_mytoken(src, env={"MY_MT": SHORT}) == SHORT


def test_source_needs_exactly_one_kind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        MytokenSource()
    with pytest.raises(ConfigError):
        MytokenSource(path=tmp_path, env_var="X")


def test_rotation_is_saved_atomically_where_it_came_from(tmp_path: Path) -> None:
    p = write(tmp_path / "mt", SHORT)
    new = "N" * 64
    save_rotated_mytoken(MytokenSource(path=p), new)
    assert p.read_text() == new
    assert (p.stat().st_mode & 0o777) == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["mt"]


def test_malformed_rotation_keeps_the_old_mytoken(tmp_path: Path) -> None:
    p = write(tmp_path / "mt", SHORT)
    with pytest.raises(ProtocolError, match="malformed rotated mytoken"):
        save_rotated_mytoken(MytokenSource(path=p), "short")
    assert p.read_text() == SHORT


def test_rotation_of_env_mytoken_is_an_error() -> None:
    with pytest.raises(ConfigError, match="cannot be updated"):
        save_rotated_mytoken(MytokenSource(env_var="MT"), "N" * 64)


def test_check_mytoken_value_non_mytoken_jwt() -> None:
    other = jwtmint.access_token(scope=None, **{"wlcg.ver": None})
    with pytest.raises(ConfigError):
        check_mytoken_value(other, "x")
