"""The file-format rule: older and newer-minor files are read, a newer major is refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from jobtoken._errors import ConfigError
from jobtoken._formats import CURRENT, parse_version, readable
from jobtoken._revocation import PendingRevocation, read_pending, write_pending
from jobtoken._tokendir import JobRecord, RenewalState, TokenDir


def spec() -> JobRecord:
    return JobRecord(job_id="j", server_url="https://mt", mytoken_path="mytoken",
                   scopes=("storage.create:/a",))


@pytest.mark.parametrize(("value", "pair"), [("1.0", (1, 0)), ("1.7", (1, 7)), ("2", (2, 0)),
                                              (1, (1, 0)), ("12.30", (12, 30))])
def test_versions_parse(value: object, pair: tuple) -> None:
    assert parse_version(value) == pair


@pytest.mark.parametrize("value", ["", "1.", ".1", "x", "0.1", "1.0.0", -1, 0, True, None, 1.5])
def test_garbage_is_no_version(value: object) -> None:
    with pytest.raises(ValueError):
        parse_version(value)


def test_only_a_newer_major_is_unreadable() -> None:
    assert readable((1, 0), (1, 0)) and readable((1, 9), (1, 0)) and readable((1, 0), (2, 3))
    assert not readable((2, 0), (1, 9))


def test_every_file_is_written_with_its_format(tmp_path: Path) -> None:
    d = TokenDir.create(tmp_path / "job")
    d.write_spec(spec())
    d.write_state(RenewalState(job_id="j"))
    write_pending(d, PendingRevocation("j", None, 1.0, 1, "boom"))
    for name, path in (("job.json", d.job_file), ("state.json", d.state_file),
                       ("revoke.pending", d.pending_revocation)):
        major, minor = CURRENT[name]
        assert json.loads(path.read_text())["format"] == f"{major}.{minor}", name


def _rewrite(path: Path, **change: object) -> None:
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))


def test_files_of_a_newer_minor_are_read_and_their_new_keys_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = TokenDir.create(tmp_path / "job")
    d.write_spec(spec())
    d.write_state(RenewalState(job_id="j", renewals=4))
    write_pending(d, PendingRevocation("j", "m1", 1.0, 2, "boom"))
    for path in (d.job_file, d.state_file, d.pending_revocation):
        _rewrite(path, format="1.9", from_the_future={"x": 1})
    with caplog.at_level(logging.DEBUG, logger="jobtoken"):
        assert d.read_spec() == spec()
        assert d.read_spec() == spec()
        state = d.read_state()
        pending = read_pending(d)
    assert state is not None and state.renewals == 4
    assert pending is not None and pending.mom_id == "m1"
    ignored = [r for r in caplog.records if "from_the_future" in r.getMessage()]
    assert ignored and all(r.levelno == logging.DEBUG for r in ignored)
    # logged once per file kind, not once per read
    assert sum(str(d.job_file) in r.getMessage() for r in ignored) == 1


def test_files_without_a_format_are_version_1(tmp_path: Path) -> None:
    d = TokenDir.create(tmp_path / "job")
    old_spec = {k: v for k, v in json.loads(spec().to_json()).items() if k != "format"}
    d.job_file.write_text(json.dumps(old_spec))
    # what state.json said before formats: an integer "version"
    d.state_file.write_text(json.dumps({"job_id": "j", "renewals": 2, "version": 1}))
    d.pending_revocation.write_text(json.dumps(
        {"job_id": "j", "mom_id": None, "since": 1.0, "attempts": 1, "error": "e"}))
    d.pending_revocation.chmod(0o600)
    assert d.read_spec() == spec()
    state = d.read_state()
    assert state is not None and state.renewals == 2
    assert read_pending(d) is not None


def test_a_newer_major_fails_with_one_line_naming_file_and_version(tmp_path: Path) -> None:
    d = TokenDir.create(tmp_path / "job")
    d.write_spec(spec())
    d.write_state(RenewalState(job_id="j"))
    write_pending(d, PendingRevocation("j", None, 1.0, 1, "boom"))
    for path, read in ((d.job_file, d.read_spec), (d.state_file, d.read_state),
                       (d.pending_revocation, lambda: read_pending(d))):
        _rewrite(path, format="2.0")
        with pytest.raises(ConfigError) as info:
            read()
        message = info.value.message
        assert str(path) in message and "format 2.0" in message and "\n" not in message
        assert "upgrade jobtoken" in message


def test_a_format_that_is_no_version_is_a_bad_file(tmp_path: Path) -> None:
    d = TokenDir.create(tmp_path / "job")
    d.write_spec(spec())
    _rewrite(d.job_file, format="banana")
    with pytest.raises(ConfigError, match="not a valid jobtoken job file"):
        d.read_spec()
    d.write_state(RenewalState(job_id="j"))
    _rewrite(d.state_file, format="banana")
    assert d.read_state() is None  # the sidecar rewrites an unreadable state


def test_an_older_node_changing_job_json_keeps_what_a_newer_one_wrote(tmp_path: Path) -> None:
    # ARC: the CE's newer prepare wrote job.json, the worker's older stage 1 relocates it
    d = TokenDir.create(tmp_path / "job")
    d.write_spec(spec())
    _rewrite(d.job_file, format="1.9", from_the_future={"x": 1})
    changed = d.update_spec(mytoken_path="/new/session/.jobtoken/mytoken")
    data = json.loads(d.job_file.read_text())
    assert data["format"] == "1.9" and data["from_the_future"] == {"x": 1}
    assert data["mytoken_path"] == "/new/session/.jobtoken/mytoken"
    assert d.read_spec() == changed and changed.mytoken_path == "/new/session/.jobtoken/mytoken"
    # a file of the releases before formats becomes a file of this format
    old = {k: v for k, v in json.loads(spec().to_json()).items() if k != "format"}
    d.job_file.write_text(json.dumps(old))
    d.update_spec(mytoken_path="mytoken")
    major, minor = CURRENT["job.json"]
    assert json.loads(d.job_file.read_text())["format"] == f"{major}.{minor}"
    _rewrite(d.job_file, format="2.0")
    with pytest.raises(ConfigError, match="format 2.0"):
        d.update_spec(mytoken_path="x")
    assert json.loads(d.job_file.read_text())["mytoken_path"] == "mytoken"  # untouched
