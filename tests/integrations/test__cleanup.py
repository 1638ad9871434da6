"""End-of-job cleanup shared by the HTCondor exit hook and ARC stage 2."""

from __future__ import annotations

from pathlib import Path

from jobtoken._tokendir import TokenDir
from jobtoken.integrations._cleanup import revoke_and_clean, stop_sidecar


def test_directory_without_job_file_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "bt").write_text("not ours")
    assert revoke_and_clean(tmp_path, remove_dir=True) is True
    assert (tmp_path / "bt").exists()


def test_without_the_mytoken_file_revocation_still_runs_and_files_go(tmp_path: Path) -> None:
    """A payload that copied its job mytoken and deleted the file must not escape: the
    revocation runs anyway (``jobtoken revoke`` goes through the site's parent by mom_id)."""
    d = tmp_path / "tok"
    TokenDir.create(d)
    for name in ("job.json", "bt", "state.json"):
        (d / name).write_text("{}")
    argv_marker = tmp_path / "called"
    assert revoke_and_clean(
        d, remove_dir=True, jobtoken_argv=["/bin/sh", "-c", f"touch {argv_marker}", "x"]
    )
    assert argv_marker.exists()
    assert not d.exists()


def test_revocation_is_killed_at_the_deadline(tmp_path: Path) -> None:
    d = tmp_path / "tok"
    TokenDir.create(d)
    for name in ("job.json", "mytoken", "bt"):
        (d / name).write_text("x")
    revoked = revoke_and_clean(d, timeout_s=0.5, jobtoken_argv=["/bin/sh", "-c", "sleep 30", "x"])
    assert revoked is False
    assert not (d / "mytoken").exists() and not (d / "bt").exists()
    assert (d / "job.json").exists()  # kept without remove_dir


def test_stop_sidecar_without_sidecar(tmp_path: Path) -> None:
    assert stop_sidecar(TokenDir.create(tmp_path / "tok"), timeout_s=1) is True
