"""DevServerConfig.validate: every documented refusal, and the settings just inside them.

A refused setting must fail before anything binds or signs, with a one-line message that
names the setting and its value, so that whoever mistyped it can find it.
"""

from __future__ import annotations

import re
from typing import Any, Dict

import pytest

from jobtoken._errors import ConfigError
from jobtoken.devserver._config import DevServerConfig, is_loopback_host


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        # a development tool must not be reachable from the network by accident
        ({"host": "0.0.0.0"}, "host=0.0.0.0: not loopback"),
        ({"host": "::"}, "host=::: not loopback"),
        ({"host": ""}, "host=: not loopback"),  # "" binds every interface
        ({"host": "192.0.2.10"}, "host=192.0.2.10: not loopback"),
        ({"host": "devbox.example.org"}, "host=devbox.example.org: not loopback"),
        # RS256 and ES256 are all a WLCG relying party is required to support; no HMAC
        ({"at_alg": "HS256"}, "at_alg=HS256 unsupported; use one of RS256, ES256"),
        ({"at_alg": "ES512"}, "at_alg=ES512 unsupported"),
        ({"mt_alg": "HS256"}, "mt_alg=HS256 unsupported; use one of ES512, ES256, RS256"),
        ({"mt_alg": "none"}, "mt_alg=none unsupported"),
        ({"at_lifetime_s": 0}, "at_lifetime_s=0 must be >= 1"),
        ({"at_lifetime_s": -60}, "at_lifetime_s=-60 must be >= 1"),
        ({"port": -1}, "port=-1 out of range"),
        ({"port": 65536}, "port=65536 out of range"),
        ({"short_token_len": 31}, "short_token_len must be >= 32"),  # the API minimum
        ({"rate_limit": (0, 300)}, "rate_limit=(0, 300.0) must be (N>=1, window>0)"),
        ({"rate_limit": (100, 0)}, "rate_limit=(100, 0.0)"),
        ({"rate_limit": (100, -5)}, "rate_limit=(100, -5.0)"),
        ({"subject": ""}, "subject must not be empty"),
    ],
)
def test_refuses(settings: Dict[str, Any], message: str) -> None:
    config = DevServerConfig(**settings)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        config.validate()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"port": 0},
        {"port": 65535},
        {"at_lifetime_s": 1},
        {"short_token_len": 32},
        {"rate_limit": (1, 0.5)},
        {"host": "localhost"},
        {"host": "127.0.0.2"},
        {"host": "::1"},
        {"host": "[::1]"},
        {"at_alg": "ES256", "mt_alg": "RS256"},
        {"mt_alg": "ES256"},
        {"host": "0.0.0.0", "allow_remote": True},
        {"host": "devbox.example.org", "allow_remote": True},
    ],
)
def test_accepts(settings: Dict[str, Any]) -> None:
    DevServerConfig(**settings).validate()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.1", False),
        ("localhost.example.org", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_list_inputs_are_normalised_so_the_config_stays_a_hashable_value() -> None:
    config = DevServerConfig(
        op_scopes=["storage.read:/"],  # type: ignore[arg-type]
        extra_san=["devbox"],  # type: ignore[arg-type]
        rate_limit=["100", 300],  # type: ignore[arg-type]
    )
    assert config.op_scopes == ("storage.read:/",) and config.extra_san == ("devbox",)
    assert config.rate_limit == (100, 300.0)
    assert type(config.rate_limit[0]) is int and type(config.rate_limit[1]) is float
    same = DevServerConfig(
        op_scopes=("storage.read:/",), extra_san=("devbox",), rate_limit=(100, 300)
    )
    assert config == same and hash(config) == hash(same)
