from __future__ import annotations

from pathlib import Path

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
    assert path.name == "jobtoken_ce_1.0.prom"
    assert (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    remove_metrics(str(tmp_path), "ce#1.0")
    assert list(tmp_path.iterdir()) == []
