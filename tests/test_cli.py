"""`jobtoken token` / `inspect` in-process against the dev server: every bad input gives a
one-line error and a documented exit code, and loses nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Tuple

import pytest

from jobtoken import cli
from jobtoken.devserver import DevServer, DevServerConfig
from tests import jwtmint

AUD = "https://se.example.org"
SCOPE = "storage.create:/vo/out"


@pytest.fixture()
def srv() -> Iterator[DevServer]:
    with DevServer(DevServerConfig(at_lifetime_s=600, op_scopes=("storage.create:/",),
                                   default_audience=AUD)) as server:
        yield server


@pytest.fixture()
def setup(srv: DevServer, tmp_path: Path) -> Tuple[DevServer, Path, Path, list]:
    mt = tmp_path / "mt"
    mt.write_text(srv.issue_mytoken(capabilities=["AT"], restrictions=[
        {"scope": SCOPE, "audience": [AUD]}]))
    mt.chmod(0o600)
    out = tmp_path / "bt"
    args = ["token", "--server", srv.url, "--allow-http", "--mytoken-file", str(mt),
            "--scope", SCOPE, "--audience", AUD, "--out", str(out)]
    return srv, mt, out, args


def call(args: list, capsys: pytest.CaptureFixture) -> Tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_token_writes_a_checked_token(setup: Any, capsys: pytest.CaptureFixture) -> None:
    srv, mt, out, args = setup
    code, stdout, err = call(args + ["--json"], capsys)
    assert code == 0, err
    data = json.loads(stdout)
    assert data["scopes"] == [SCOPE] and data["audiences"] == [AUD] and data["reused"] is False
    assert (out.stat().st_mode & 0o777) == 0o600
    token = out.read_text().strip()
    assert token not in stdout and token not in err
    # --min-valid keeps a token that is still good: no second request
    before = len(srv.requests("access"))
    code, stdout, _ = call(args + ["--min-valid", "60", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["reused"] is True
    assert len(srv.requests("access")) == before


def test_token_from_cron_counts_failures_and_keeps_the_last_success(
    setup: Any, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from jobtoken._metrics import metrics_path

    srv, _, out, args = setup
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    args = args + ["--metrics-dir", str(metrics)]

    def samples() -> dict:
        [prom] = list(metrics.iterdir())  # one file per token file, run after run
        assert prom == metrics_path(str(metrics), str(out))  # job_id: the token file
        return {s.name: s.value for f in text_string_to_metric_families(prom.read_text())
                for s in f.samples}

    assert call(args, capsys)[0] == 0
    assert call(args + ["--min-valid", "60"], capsys)[0] == 0  # kept: a success, no renewal
    good = samples()
    assert good["jobtoken_renewals_total"] == 1 and good["jobtoken_renewal_failures_total"] == 0
    srv.faults.add("access", status=503)
    for attempt in (1, 2):
        assert call(args, capsys)[0] == 75
        now = samples()
        assert now["jobtoken_renewal_failures_total"] == attempt
        assert now["jobtoken_last_success_timestamp_seconds"] == \
            good["jobtoken_last_success_timestamp_seconds"]
        assert now["jobtoken_token_expiry_timestamp_seconds"] == \
            good["jobtoken_token_expiry_timestamp_seconds"]


def test_inspect_shows_claims_never_the_token(setup: Any, capsys) -> None:
    _, _, out, args = setup
    assert call(args, capsys)[0] == 0
    code, stdout, _ = call(["inspect", str(out)], capsys)
    assert code == 0 and SCOPE in stdout and "left" in stdout
    assert out.read_text().strip() not in stdout


def test_inspect_uses_wlcg_discovery(setup: Any, capsys, monkeypatch) -> None:
    _, _, out, args = setup
    assert call(args, capsys)[0] == 0
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(out))
    code, stdout, _ = call(["inspect", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["source"] == str(out)


def test_inspect_refuses_a_mytoken(tmp_path: Path, capsys) -> None:
    f = tmp_path / "mt"
    f.write_text(jwtmint.mytoken_jwt())
    code, _, err = call(["inspect", str(f)], capsys)
    assert code == 65 and "holds a mytoken" in err


SERVER_FAULTS = {
    "400 json": (dict(status=400, error="invalid_request"), 77),
    "401 json": (dict(status=401, error="invalid_token"), 77),
    "403 json": (dict(status=403, error="usage_restricted"), 77),
    "500 json": (dict(status=500, error="internal_server_error"), 75),
    "503 plain": (dict(status=503, body="Service Unavailable"), 75),
    "429 plain": (dict(status=429, retry_after_s=30), 75),
    "timeout": (dict(delay_s=3.0), 75),
    "reset": (dict(drop=True), 75),
    "garbage": (dict(garbage=True), 76),
    "no access_token": (dict(status=200, body='{"token_type": "Bearer"}'), 76),
    "not a JWT": (dict(status=200, body='{"access_token": "' + "x" * 40 + '"}'), 65),
    "malformed token_update": (
        dict(status=200, body=json.dumps({
            "access_token": jwtmint.access_token(scope=SCOPE, aud=AUD),
            "token_update": {"mytoken": "short"},
        })), 76),
    "expired AT": (dict(token="expired"), 65),
    "other audience": (dict(token="wrong_audience"), 65),
    "wider scopes": (dict(token="wider_scope"), 65),
    "unsigned": (dict(token="alg_none"), 65),
    "HS256": (dict(token="hs256"), 65),
}


@pytest.mark.parametrize("name", list(SERVER_FAULTS))
def test_server_faults_give_documented_codes_and_lose_nothing(
    setup: Any, capsys: pytest.CaptureFixture, name: str
) -> None:
    srv, mt, out, args = setup
    assert call(args, capsys)[0] == 0
    old_token, old_mt = out.read_bytes(), mt.read_bytes()
    srv.faults.add("access", **SERVER_FAULTS[name][0])
    code, stdout, err = call(args + ["--timeout", "1"], capsys)
    assert code == SERVER_FAULTS[name][1], err
    assert len(err.strip().splitlines()) == 1 and err.startswith("jobtoken: error: ")
    assert "Traceback" not in err and "eyJ" not in err
    assert out.read_bytes() == old_token and mt.read_bytes() == old_mt


def test_connection_refused(setup: Any, capsys, tmp_path: Path) -> None:
    srv, mt, out, args = setup
    args = list(args)
    args[args.index(srv.url)] = "http://127.0.0.1:9"  # discard port: nobody listens
    code, _, err = call(args, capsys)
    assert code == 75 and "jobtoken: error:" in err


@pytest.mark.parametrize("body", ["<html>not json</html>", '{"issuer": "x"}'])
def test_bad_discovery(setup: Any, capsys, body: str) -> None:
    srv, _, _, args = setup
    srv.faults.add("discovery", status=200, body=body)
    code, _, err = call(args, capsys)
    assert code == 76, err


def test_plain_http_is_refused_unless_loopback_and_asked(setup: Any, capsys) -> None:
    srv, _, _, args = setup
    no_flag = [a for a in args if a != "--allow-http"]
    assert call(no_flag, capsys)[0] == 78
    remote = list(args)
    remote[remote.index(srv.url)] = "http://mytoken.example.org"
    code, _, err = call(remote, capsys)
    assert code == 78 and "loopback" in err


@pytest.mark.parametrize("problem", ["missing", "empty", "world-readable", "access token"])
def test_bad_mytoken_file(setup: Any, capsys, problem: str) -> None:
    srv, mt, out, args = setup
    if problem == "missing":
        mt.unlink()
    elif problem == "empty":
        mt.write_text("")
    elif problem == "world-readable":
        mt.chmod(0o644)
    else:
        mt.write_text(jwtmint.access_token())
    code, _, err = call(args, capsys)
    assert code == 78 and len(err.strip().splitlines()) == 1
    assert len(srv.requests("access")) == 0 and not out.exists()


def test_rotated_mytoken_is_saved_before_the_token_is_used(srv: DevServer, tmp_path: Path,
                                                          capsys) -> None:
    mt = tmp_path / "mt"
    mt.write_text(srv.issue_mytoken(capabilities=["AT"], restrictions=[
        {"scope": SCOPE, "audience": [AUD]}], rotation={"on_AT": True}))
    mt.chmod(0o600)
    first = mt.read_text()
    args = ["token", "--server", srv.url, "--allow-http", "--mytoken-file", str(mt),
            "--scope", SCOPE, "--audience", AUD, "--out", str(tmp_path / "bt")]
    # even when the token then fails the checks, the rotated mytoken is on disk
    srv.faults.add("access", token="wider_scope", count=1)
    assert call(args, capsys)[0] == 65
    second = mt.read_text()
    assert second != first and srv.introspect(second)["valid"] is True
    assert call(args, capsys)[0] == 0


@pytest.mark.parametrize("problem", ["missing dir", "symlink", "disk full"])
def test_output_problems(setup: Any, capsys, problem: str, mocker, tmp_path: Path) -> None:
    srv, mt, out, args = setup
    args = list(args)
    if problem == "missing dir":
        args[args.index(str(out))] = str(tmp_path / "nope" / "bt")
    elif problem == "symlink":
        victim = tmp_path / "victim"
        victim.write_text("keep")
        out.symlink_to(victim)
    else:
        import errno

        mocker.patch("jobtoken._tokenfile.os.write",
                     side_effect=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    code, _, err = call(args, capsys)
    assert code == 74, err
    if problem == "symlink":
        assert (tmp_path / "victim").read_text() == "keep"


def test_usage_errors(capsys) -> None:
    assert call(["token", "--no-such-flag"], capsys)[0] == 2
    assert call(["frobnicate"], capsys)[0] == 2
    assert call([], capsys)[0] == 2
    code, _, err = call(["run", "--", "true", "--"], capsys)  # no mytoken configured
    assert code == 78


def test_token_without_any_mytoken(capsys) -> None:
    code, _, err = call(["token", "--server", "https://mt.example.org"], capsys)
    # the config keys and the flags that set them
    assert code == 78 and "no mytoken: set token.mytoken_file (--mytoken-file" in err
    assert "token.mytoken_env (--mytoken-env" in err


def test_help_everywhere(capsys) -> None:
    for command in (["--help"], ["token", "--help"], ["inspect", "--help"], ["run", "--help"],
                    ["status", "--help"], ["ensure", "--help"], ["prepare", "--help"],
                    ["revoke", "--help"], ["sidecar", "--help"], ["devserver", "--help"]):
        try:
            code = cli.main(command)
        except SystemExit as exc:
            code = exc.code
        assert code == 0
        assert "usage:" in capsys.readouterr().out


def test_devserver_missing_names_its_package(tmp_path: Path) -> None:
    """The worker-node package leaves the dev server out (jobtoken-devserver has it):
    `jobtoken devserver` there says which package to install, in one line, exit 2."""
    import shutil
    import subprocess
    import sys

    source = Path(cli.__file__).parent
    shutil.copytree(source, tmp_path / "jobtoken",
                    ignore=shutil.ignore_patterns("devserver", "__pycache__"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "jobtoken", "devserver", "--port", "0"],
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout) == (2, ""), done
    assert done.stderr == ("jobtoken: error: the dev server is not installed here: install "
                           "the jobtoken-devserver package\n")


def test_signature_verified_against_trusted_issuer(setup: Any, capsys) -> None:
    srv, mt, out, args = setup
    code, _, err = call(args + ["--trusted-issuer", srv.op_issuer], capsys)
    assert code == 0, err
    code, _, err = call(args + ["--trusted-issuer", "https://other-issuer.example.org"], capsys)
    assert code == 65 and "trusted" in err


EVIL = "x\r\njobtoken: job mytoken revoked mom_id=all\x1b]0;owned\x07\x1b[2J"


def test_inspect_escapes_what_the_token_says(tmp_path: Path, capsys) -> None:
    # issue 12 item 8: sub/jti with CR/LF/ESC must not forge lines or drive the terminal
    token = tmp_path / "bt"
    token.write_text(jwtmint.access_token(sub=EVIL, jti=EVIL, scope="storage.read:/\x1b[31m"))
    token.chmod(0o600)
    code, stdout, _ = call(["inspect", str(token)], capsys)
    assert code == 0
    assert "\x1b" not in stdout and "\r" not in stdout and "\x07" not in stdout
    assert not any(line.startswith("jobtoken: job mytoken") for line in stdout.splitlines())
    assert "\\r\\njobtoken: job mytoken revoked" in stdout  # shown, as text
    code, stdout, _ = call(["inspect", "--json", str(token)], capsys)
    assert json.loads(stdout)["sub"] == EVIL  # JSON carries the value, escaped by JSON


def test_log_lines_escape_server_values(capsys) -> None:
    import logging

    cli._setup_logging(1, 0)
    try:
        logging.getLogger("jobtoken._exchange").info("access token obtained sub=%s", EVIL)
    finally:
        cli._setup_logging(0, 0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err and "\x1b" not in err
    assert err.startswith("jobtoken: access token obtained sub=x\\r\\njobtoken: job mytoken")


@pytest.mark.parametrize("flags", [["--timeout", "3"], ["--scope", "storage.read:/"],
                                   ["--server-deadline", "5", "--walltime", "60"]])
def test_run_refuses_flags_a_prepared_directory_would_ignore(
    tmp_path: Path, capsys, flags: list
) -> None:
    # issue 12 item 18: the renewal children read job.json only; a flag that silently
    # does nothing is worse than a refusal
    prepared = tmp_path / "job"
    prepared.mkdir(mode=0o700)
    (prepared / "job.json").write_text("{}")
    marker = tmp_path / "payload-ran"
    code, _, err = call(["run", "--dir", str(prepared), *flags, "--", "touch", str(marker)],
                        capsys)
    assert code == 2
    assert flags[0] in err and "job.json" in err
    assert not marker.exists()


def test_server_deadline_reaches_hooks_and_arc_stage0(tmp_path: Path, monkeypatch) -> None:
    # issue 12 item 7: the overall deadline is a setting the batch-system adapters honour
    import argparse

    from jobtoken._cliargs import site_config_from_args

    monkeypatch.setenv("JOBTOKEN_CONFIG", str(tmp_path / "none.toml"))
    cfg_file = tmp_path / "site.toml"
    cfg_file.write_text("[server]\ndeadline_s = 30\n")
    args = argparse.Namespace(config=str(cfg_file), server_deadline=None)
    assert site_config_from_args(args).server.deadline_s == 30
    args = argparse.Namespace(config=str(cfg_file), server_deadline=7.0)
    assert site_config_from_args(args).server.deadline_s == 7


# --- issue 14 item 5: messages a user can act on ----------------------------------------------


def test_json_mode_errors_are_one_json_object_on_stdout(tmp_path: Path, capsys) -> None:
    """A script reading ``--json`` output gets JSON on failure too, with the exit code."""
    code, out, err = call(["status", "--json", str(tmp_path / "gone")], capsys)
    data = json.loads(out)  # one object, nothing else on stdout
    assert code == 78 == data["exit_code"] and data["ok"] is False
    assert data["error_type"] == "ConfigError" and "does not exist" in data["error"]
    assert err == ""
    # a usage error is JSON too, although parsing never finished
    code, out, err = call(["status", "--json", "--no-such-flag"], capsys)
    assert code == 2 == json.loads(out)["exit_code"] and err == ""


def test_json_mode_server_refusal_says_what_the_server_said(setup: Any, capsys) -> None:
    srv, _, _, args = setup
    srv.faults.add("access", status=401, error="invalid_token")
    code, out, _ = call(args + ["--json"], capsys)
    data = json.loads(out)
    assert code == 77 == data["exit_code"] and data["retryable"] is False
    assert data["status"] == 401 and data["oauth_error"] == "invalid_token"
    # ... and the next step: a revoked or expired mytoken is not coming back
    assert "create a new mytoken" in data["error"]


def test_json_mode_internal_error_is_json(monkeypatch, capsys) -> None:
    def broken(args: Any) -> int:
        raise RuntimeError("secret-looking detail")

    monkeypatch.setattr(cli, "_cmd_status", broken)
    code, out, _ = call(["status", "--json", "/nowhere"], capsys)
    data = json.loads(out)
    assert code == 1 == data["exit_code"] and data["error_type"] == "RuntimeError"
    assert "internal error" in data["error"] and "secret-looking" not in out


def test_quiet_prints_only_errors(setup: Any, capsys) -> None:
    """``-q``: no confirmation chatter on stdout or stderr; the exit code says it worked."""
    _, _, out, args = setup
    assert call(args + ["-q"], capsys) == (0, "", "")
    assert out.is_file()
    code, stdout, _ = call(args, capsys)
    assert code == 0 and "expires in" in stdout  # without -q, the confirmation
    # errors still reach stderr under -q
    code, stdout, err = call(args + ["-q", "--server", "https://"], capsys)
    assert code == 78 and stdout == "" and err.startswith("jobtoken: error: ")


def test_run_without_double_dash_says_how(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    code, _, err = call(["run", "touch", str(marker)], capsys)
    assert code == 2 and not marker.exists()
    assert "goes after '--': jobtoken run [OPTIONS] -- touch ..." in err
    assert len(err.splitlines()) == 1
    # an unknown option stays an unknown option
    code, _, err = call(["run", "--no-such-flag", "--", "true"], capsys)
    assert code == 2 and "unrecognized arguments: --no-such-flag" in err


def _option_strings(parser: Any) -> set:
    import argparse

    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def test_messages_name_flags_that_exist() -> None:
    """Every flag a message names for a setting (``_config.setting``) is a real option."""
    from jobtoken._config import _FLAGS

    assert set(_FLAGS.values()) <= _option_strings(cli.build_parser())


def test_missing_token_directory_says_how_to_make_one(tmp_path: Path, capsys) -> None:
    code, _, err = call(["status", str(tmp_path / "gone")], capsys)
    assert code == 78 and "--dir or $JOBTOKEN_DIR" in err and "jobtoken prepare" in err
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    code, _, err = call(["ensure", "--dir", str(empty), "--min-valid", "1"], capsys)
    assert code == 78 and "job.json" in err and "run 'jobtoken prepare' again" in err


def test_plain_http_refusal_names_the_flag_and_key(setup: Any, capsys) -> None:
    srv, _, _, args = setup
    code, _, err = call([a for a in args if a != "--allow-http"], capsys)
    assert code == 78 and "--allow-http" in err and "server.allow_http" in err
