from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobtoken._errors import TokenFileError
from jobtoken._metrics import metrics_path, remove_metrics, render_metrics, write_metrics
from jobtoken._tokendir import RenewalState


def test_render_is_textfile_format() -> None:
    st = RenewalState(job_id="x", expires_at=1100.0, renewals=2, failures_total=1,
                      consecutive_failures=1, last_success_at=900.0)
    text = render_metrics('a"b\\c', st, now=1000.0)
    assert 'jobtoken_token_expiry_seconds{job_id="a\\"b\\\\c"} 100.000' in text
    assert "# TYPE jobtoken_renewals_total counter" in text
    assert 'jobtoken_credential_lost{job_id="a\\"b\\\\c"} 0.000' in text
    assert text.endswith("\n")


def test_missing_values_are_left_out() -> None:
    text = render_metrics("x", RenewalState(), now=0.0)
    assert "expiry_seconds" not in text and "jobtoken_renewals_total" in text


def test_write_is_atomic_and_readable_by_the_collector(tmp_path: Path) -> None:
    write_metrics(str(tmp_path), "ce#1.0", RenewalState(renewals=1), now=0.0)
    path = metrics_path(str(tmp_path), "ce#1.0")
    assert path.name == f"jobtoken_u{os.geteuid()}_ce_1.0.prom"
    assert (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    remove_metrics(str(tmp_path), "ce#1.0")
    assert list(tmp_path.iterdir()) == []


# --- a shared 1777 directory (issue 12 item 10) -----------------------------------------


@pytest.fixture()
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "textfile"
    d.mkdir()
    d.chmod(0o1777)
    return d


def test_another_users_file_under_our_name_is_not_replaced(shared: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    forged = metrics_path(str(shared), "job-a")
    forged.write_text("jobtoken_credential_lost 1\n")
    os.chown(forged, 4242, 4242)
    with pytest.raises(TokenFileError, match="belongs to uid 4242"):
        write_metrics(str(shared), "job-a", RenewalState(renewals=1), now=0.0)
    remove_metrics(str(shared), "job-a")
    assert forged.read_text() == "jobtoken_credential_lost 1\n"  # not ours to remove either
    # the other user's own files carry their uid: they cannot take our name by accident
    assert metrics_path(str(shared), "job-a", uid=4242).name == "jobtoken_u4242_job-a.prom"


def test_a_symlink_under_our_name_is_not_written_through(shared: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    metrics_path(str(shared), "job-a").symlink_to(victim)
    with pytest.raises(TokenFileError, match="symlink"):
        write_metrics(str(shared), "job-a", RenewalState(renewals=1), now=0.0)
    assert victim.read_text() == "precious\n"


def test_a_world_writable_directory_needs_the_sticky_bit(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(TokenFileError, match="sticky"):
        write_metrics(str(d), "job-a", RenewalState(renewals=1), now=0.0)
    assert list(d.iterdir()) == []
