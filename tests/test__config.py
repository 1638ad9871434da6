from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from jobtoken._config import Config, TokenConfig, _coerce, load_config
from jobtoken._errors import ConfigError

SAMPLE = """
[server]
url = "https://mytoken.example.org"
timeout_s = 5

[token]
scopes = ["storage.read:/vo", "storage.create:/vo/out"]
audiences = "https://se.example.org"
mytoken_file = "/etc/jobtoken/mt"

[site]
allowed_scopes = ["storage.create:/vo"]

[renewal]
on_failure = "stop"
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "jobtoken.toml"
    p.write_text(text)
    return str(p)


def test_defaults_without_any_file() -> None:
    cfg = load_config(env={})
    assert cfg.server.url is None and cfg.server.allow_http is False
    assert cfg.renewal.on_failure == "keep"


def test_file_values_are_typed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SAMPLE), env={})
    assert cfg.server.timeout_s == 5.0
    assert cfg.token.scopes == ("storage.read:/vo", "storage.create:/vo/out")
    assert cfg.token.audiences == ("https://se.example.org",)
    assert cfg.site.allowed_scopes == ("storage.create:/vo",)
    assert cfg.renewal.on_failure == "stop"
    assert cfg.source and cfg.source.endswith("jobtoken.toml")


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, SAMPLE)
    env = {"JOBTOKEN_SERVER": "https://env.example.org", "JOBTOKEN_SCOPE": "storage.read:/a"}
    cfg = load_config(path, env=env)
    assert cfg.server.url == "https://env.example.org"
    assert cfg.token.scopes == ("storage.read:/a",)
    cfg = load_config(path, env=env, overrides={"server": {"url": "https://flag.example.org"}})
    assert cfg.server.url == "https://flag.example.org"


def test_config_file_from_environment(tmp_path: Path) -> None:
    cfg = load_config(env={"JOBTOKEN_CONFIG": write(tmp_path, SAMPLE)})
    assert cfg.server.url == "https://mytoken.example.org"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server\nurl=1", "not valid TOML"),
        ("[serverz]\nurl='x'", r"unknown section \[serverz\]"),
        ("[server]\nurll='x'", "unknown setting server.urll"),
        ("[server]\ntimeout_s='soon'", "server.timeout_s"),
        ("[server]\ntimeout_s=-1", "non-negative"),
        ("[server]\ntimeout_s=inf", "finite"),
        ("[server]\nallow_http='maybe'", "true or false"),
        ("[token]\nscopes=[1, 2]", "list of strings"),
        ("[renewal]\non_failure='panic'", "keep' or 'stop"),
        ("[token]\nmytoken_file='a'\nmytoken_env='B'", "not both"),
    ],
)
def test_malformed_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, text), env={})
    assert "\n" not in str(info.value)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"), env={})


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"\$JOBTOKEN_ALLOW_HTTP"):
        load_config(env={"JOBTOKEN_ALLOW_HTTP": "perhaps"})


def test_config_is_immutable() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.server = None  # type: ignore[misc]


@dataclass(frozen=True)
class _ModernSpelling:
    """Settings annotated the way Python 3.9+ code spells them."""

    scopes: tuple[str, ...] = ()
    url: Optional[str] = None
    timeout_s: float = 1.0
    allow_http: bool = False


@pytest.mark.parametrize("cls", [_ModernSpelling, TokenConfig])
def test_the_parser_follows_the_type_however_it_is_spelled(cls: type) -> None:
    # $JOBTOKEN_SCOPE's text, parsed for a field written tuple[str, ...] or Tuple[str, ...]
    text = " storage.read:/a  storage.create:/b "
    scopes = _coerce("token", "scopes", text, cls, "$JOBTOKEN_SCOPE")
    assert scopes == ("storage.read:/a", "storage.create:/b")
    named = r"\$JOBTOKEN_SCOPE: token.scopes \(--scope, \$JOBTOKEN_SCOPE\): expected a list"
    with pytest.raises(ConfigError, match=named):
        _coerce("token", "scopes", 5, cls, "$JOBTOKEN_SCOPE")


def test_each_setting_type_parses_its_loose_forms() -> None:
    m = _ModernSpelling
    assert _coerce("s", "url", "", m, "w") is None and _coerce("s", "url", "x", m, "w") == "x"
    assert _coerce("s", "timeout_s", "2.5", m, "w") == 2.5
    assert _coerce("s", "allow_http", "yes", m, "w") is True
    for key, bad in (("timeout_s", True), ("timeout_s", "-1"), ("timeout_s", "nan"),
                     ("allow_http", "maybe"), ("url", 3)):
        with pytest.raises(ConfigError, match=f"w: s.{key}: "):
            _coerce("s", key, bad, m, "w")
