from __future__ import annotations

import pytest

import jobtoken
from jobtoken import _errors as e
from jobtoken._errors import (
    ConfigError,
    ExitCode,
    JobtokenError,
    MytokenRejectedError,
    ProtocolError,
    RenewalReport,
    ServerUnavailableError,
    TokenCheckError,
    TokenFileError,
)


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
        (KeyboardInterrupt(), 130, False),
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


# --- the renewal report: what a renewal child tells the waiting process ----------------------


def test_a_report_survives_the_trip_through_the_child_s_stdout() -> None:
    sent = RenewalReport(ok=True, expires_at=2000.0, issued_at=1000.0, jti="j", subject="s",
                         scopes=("storage.read:/",), audiences=("https://se",))
    line = sent.to_json().encode()
    assert RenewalReport.from_child(b"a warning line\n" + line + b"\n", 0) == sent
    failed = RenewalReport.failure(
        ServerUnavailableError("busy", status=429, error="slow_down", retry_after_s=30.0)
    )
    assert RenewalReport.from_child(failed.to_json().encode(), 75) == failed
    assert failed.retry_after_s == 30.0 and failed.status == 429 and failed.exit_code == 75


@pytest.mark.parametrize("out", [b"", b"Traceback ...\n", b"[1, 2]\n", b'{"ok": true}\n'])
def test_a_child_that_crashed_or_printed_garbage_is_a_retryable_failure(out: bytes) -> None:
    report = RenewalReport.from_child(out, -9)
    assert not report.ok and report.retryable and not report.permanent
    assert "status -9" in (report.error or "")


@pytest.mark.parametrize(
    ("error", "permanent"),
    [(MytokenRejectedError("revoked"), True), (ConfigError("bad"), True),
     (ServerUnavailableError("down"), False), (ProtocolError("garbage"), False),
     (TokenCheckError("wider scope"), False), (TokenFileError("disk full"), False)],
)
def test_permanent_means_no_retry_can_help(error: JobtokenError, permanent: bool) -> None:
    assert RenewalReport.failure(error).permanent is permanent
    assert RenewalReport(ok=True, expires_at=1.0).permanent is False


def test_raise_for_failure_keeps_the_class_and_the_exit_code() -> None:
    RenewalReport(ok=True, expires_at=1.0).raise_for_failure()
    with pytest.raises(MytokenRejectedError) as info:
        RenewalReport.failure(MytokenRejectedError("revoked")).raise_for_failure()
    assert info.value.exit_code == ExitCode.MYTOKEN_REJECTED and not info.value.retryable
    odd = RenewalReport(ok=False, error="x", error_type="os.system", exit_code=75, retryable=True)
    with pytest.raises(JobtokenError) as info:
        odd.raise_for_failure()
    assert type(info.value) is JobtokenError and info.value.exit_code == 75
    assert info.value.retryable


def test_error_summary_is_what_json_mode_and_a_failed_child_report() -> None:
    """The one shape of a failure crossing a boundary (``--json`` errors, renewal reports)."""
    refused = e.MytokenRejectedError("revoked", status=401, error="invalid_token")
    summary = e.error_summary(refused)
    assert summary == {"ok": False, "error": "revoked", "error_type": "MytokenRejectedError",
                       "retryable": False, "exit_code": 77, "status": 401,
                       "oauth_error": "invalid_token", "retry_after_s": None}
    report = RenewalReport.failure(refused)
    assert (report.error, report.exit_code, report.status) == ("revoked", 77, 401)
    # a bug's own text may hold anything: only its class name
    bug = e.error_summary(ValueError("mytoken eyJ..."))
    assert bug["error"] == "ValueError" and bug["exit_code"] == 1
    assert e.error_summary(KeyboardInterrupt())["exit_code"] == 130
