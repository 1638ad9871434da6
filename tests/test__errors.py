from __future__ import annotations

import pytest

import jobtoken
from jobtoken import _errors as e


@pytest.mark.parametrize(
    ("error", "code", "retryable"),
    [
        (e.UsageError("x"), 2, False),
        (e.ConfigError("x"), 78, False),
        (e.MytokenRejectedError("x", status=401, error="invalid_token"), 77, False),
        (e.ServerUnavailableError("x", status=503), 75, True),
        (e.ProtocolError("x"), 76, True),
        (e.TokenCheckError("x"), 65, False),
        (e.TokenFileError("x"), 74, False),
        (e.CredentialLostError("x"), 69, False),
        (e.PayloadStartError("x"), 126, False),
        (e.PayloadStartError("x", not_found=True), 127, False),
        (ValueError("bug"), 1, False),
    ],
)
def test_exit_codes_and_retryability(error: BaseException, code: int, retryable: bool) -> None:
    assert e.exit_code_for(error) == code
    assert getattr(error, "retryable", False) is retryable


def test_every_error_derives_from_the_root() -> None:
    for name in e.__all__:
        obj = getattr(e, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, e.JobtokenError)


def test_retryable_can_be_overridden_per_instance() -> None:
    err = e.MytokenRejectedError("oidc_error from OP 503", status=503, retryable=True)
    assert err.retryable and err.status == 503


def test_exit_codes_are_distinct() -> None:
    values = [c.value for c in e.ExitCode]
    assert len(values) == len(set(values))


def test_exported_members() -> None:
    import types

    public = {
        n
        for n in dir(jobtoken)
        if not n.startswith("_")
        and not isinstance(getattr(jobtoken, n), types.ModuleType)
        and n != "annotations"
    }
    assert set(jobtoken.__all__) - {"__version__"} == public


@pytest.mark.parametrize(
    "given, shown",
    [
        ("unknown section [\r]", "unknown section [\\r]"),
        ("server said: bad\nrequest", "server said: bad\\nrequest"),
        ("colour \x1b[31mred", "colour \\x1b[31mred"),
        ("line\u2028separator", "line\\u2028separator"),
        ("plain text, ünïcode kept", "plain text, ünïcode kept"),
    ],
)
def test_messages_are_one_printable_line(given: str, shown: str) -> None:
    # messages quote user input and server text; they reach terminals and batch logs
    error = e.ConfigError(given)
    assert error.message == shown and str(error) == shown
