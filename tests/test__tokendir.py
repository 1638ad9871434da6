from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobtoken._errors import ConfigError, JobtokenError
from jobtoken._tokendir import JobRecord, RenewalState, TokenDir, acquire_lock


def spec(**kw: object) -> JobRecord:
    base = dict(job_id="j", server_url="https://mt", mytoken_path="mytoken",
                scopes=("storage.create:/a",))
    base.update(kw)
    return JobRecord(**base)  # type: ignore[arg-type]


def test_spec_round_trip_and_relative_mytoken(tmp_path: Path) -> None:
    d = TokenDir.create(tmp_path / "job")
    d.write_spec(spec())
    assert d.read_spec() == spec()
    assert d.mytoken_of(d.read_spec()) == d.path / "mytoken"
    assert d.mytoken_of(spec(mytoken_path="/etc/mt")) == Path("/etc/mt")
    assert (d.job_file.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("text", ["[]", "{", '{"job_id": "j"}', '{"job_id":"j","format":"x"}'])
def test_bad_job_file(tmp_path: Path, text: str) -> None:
    d = TokenDir.create(tmp_path / "job")
    d.job_file.write_text(text)
    with pytest.raises(ConfigError, match="not a valid jobtoken job file"):
        d.read_spec()


def test_state_round_trip_and_tolerance(tmp_path: Path) -> None:
    d = TokenDir.create(tmp_path / "job")
    assert d.read_state() is None
    d.write_state(RenewalState(job_id="j", renewals=3, scopes=("a",)))
    st = d.read_state()
    assert st is not None and st.renewals == 3 and st.scopes == ("a",)
    data = json.loads(d.state_file.read_text())
    data["from_a_newer_version"] = True
    d.state_file.write_text(json.dumps(data))
    assert d.read_state() is not None  # unknown keys ignored
    d.state_file.write_text("garbage")
    assert d.read_state() is None


def test_existing_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        TokenDir.existing(tmp_path / "nope")


def test_one_sidecar_per_directory(tmp_path: Path) -> None:
    d = TokenDir.create(tmp_path / "job")
    fd = acquire_lock(d)
    try:
        other = subprocess.run(
            [sys.executable, "-c",
             "import sys; from jobtoken._tokendir import TokenDir, acquire_lock\n"
             "try:\n acquire_lock(TokenDir.existing(sys.argv[1]))\n"
             "except Exception as e: print(type(e).__name__, e); sys.exit(3)",
             str(d.path)], capture_output=True, text=True, timeout=30)
        assert other.returncode == 3 and "already running" in other.stdout
        with pytest.raises(JobtokenError):
            acquire_lock(d) if False else _lock_again(d)
    finally:
        os.close(fd)
    os.close(acquire_lock(d))  # free again once the holder let go


def _lock_again(d: TokenDir) -> None:
    # flock locks belong to the open file description: a second open in this process conflicts
    acquire_lock(d)


def test_remove_takes_every_file_jobtoken_makes_and_the_directory(tmp_path: Path) -> None:
    """A file the list misses keeps the directory, and ARC stages it out (issue 10.3)."""
    d = TokenDir.create(tmp_path / "job")
    made = [d.mytoken, d.bearer_token, d.job_file, d.state_file, d.lock_file, d.log_file,
            d.renew_lock, d.metadata_file, d.parent_copy, d.pending_revocation,
            d.path / ".bt.1f2e.tmp"]
    for path in made:
        path.write_text("x")
    assert {p.name for p in made[:-1]} == set(TokenDir.NAMES)
    assert d.remove() == []
    assert not d.path.exists()


def test_remove_reports_what_it_left_and_never_follows_links(tmp_path: Path) -> None:
    d = TokenDir.create(tmp_path / "job")
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    os.symlink(target, d.mytoken)
    (d.path / "payload-output").write_text("not ours")
    problems = d.remove()
    assert len(problems) == 1 and "payload-output" in problems[0], problems
    assert target.read_text() == "keep me" and not os.path.lexists(d.mytoken)


def test_remove_secrets_only_keeps_the_rest(tmp_path: Path) -> None:
    d = TokenDir.create(tmp_path / "job")
    for path in (d.mytoken, d.bearer_token, d.job_file):
        path.write_text("x")
    assert d.remove(secrets_only=True) == []
    assert sorted(os.listdir(d.path)) == ["job.json"]
