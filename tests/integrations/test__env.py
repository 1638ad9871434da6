"""HTCondor environment strings: V2 ``Environment`` and V1 ``Env``, as the starter reads them."""

from __future__ import annotations

import pytest

from jobtoken.integrations._env import (
    EnvironmentSyntaxError,
    format_environment_v2,
    job_environment,
    parse_environment_v1,
    parse_environment_v2,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A=1 B=2", [("A", "1"), ("B", "2")]),
        ("  A=1\tB=two  ", [("A", "1"), ("B", "two")]),
        ("A='x y' B='it''s'", [("A", "x y"), ("B", "it's")]),
        ("'A=a b'", [("A", "a b")]),
        ("A= B=", [("A", ""), ("B", "")]),
        ("P=/a=b", [("P", "/a=b")]),
        ("", []),
    ],
)
def test_parse_v2(text: str, expected: list) -> None:
    assert parse_environment_v2(text) == expected


@pytest.mark.parametrize("bad", ["A='x", "NOEQUALS", "=value"])
def test_parse_v2_refuses_what_the_starter_refuses(bad: str) -> None:
    with pytest.raises(EnvironmentSyntaxError):
        parse_environment_v2(bad)


def test_parse_v1_semicolons_and_newlines() -> None:
    assert parse_environment_v1("A=1;B=x y\nC=3;") == [("A", "1"), ("B", "x y"), ("C", "3")]
    assert parse_environment_v1("A=1|B=2", "|") == [("A", "1"), ("B", "2")]


@pytest.mark.parametrize("value", ["plain", "with space", "it's", "a''b", "", "x=y", "tab\there"])
def test_format_round_trips(value: str) -> None:
    text = format_environment_v2({"V": value, "W": "1"})
    assert dict(parse_environment_v2(text)) == {"V": value, "W": "1"}


def test_format_refuses_newlines() -> None:
    with pytest.raises(EnvironmentSyntaxError):
        format_environment_v2({"V": "a\nb"})


def test_job_environment_prefers_v2_like_the_starter() -> None:
    assert job_environment("A=2", "A=1;B=1") == {"A": "2"}
    assert job_environment(None, "A=1;B=1") == {"A": "1", "B": "1"}
    assert job_environment(None, "A=1|B=1", "|") == {"A": "1", "B": "1"}
    assert job_environment(None, None) == {}
    assert job_environment("A=1 A=2", None) == {"A": "2"}
