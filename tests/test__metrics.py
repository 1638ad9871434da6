"""Textfile metrics: what node_exporter's collector and Prometheus read, and what an alert
rule can rely on (absolute times, counters that only grow, series that go away)."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobtoken._errors import TokenFileError
from jobtoken._metrics import (
    STALE_AFTER_S,
    BrokerValues,
    MetricValues,
    after_oneshot,
    broker_metrics_path,
    expire_stale,
    metrics_path,
    parse_broker_metrics,
    parse_metrics,
    read_broker_metrics,
    record_oneshot,
    remove_metrics,
    render_broker_metrics,
    render_metrics,
    write_broker_metrics,
    write_metrics,
)
from jobtoken._tokendir import RenewalState

Samples = Dict[str, Tuple[str, Dict[str, str], float]]


def parse(text: str) -> Samples:
    """Every sample by name, through Prometheus' own parser (which rejects what the
    collector would reject: bad escaping, a sample without its TYPE's suffix...)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP"
        for sample in family.samples:
            assert sample.timestamp is None  # the textfile collector refuses timestamps
            out[sample.name] = (family.type, sample.labels, sample.value)
    return out


def test_render_follows_the_textfile_conventions() -> None:
    st = RenewalState(job_id="x", expires_at=1100.0, renewals=2, failures_total=1,
                      consecutive_failures=1, last_success_at=900.0)
    text = render_metrics('a"b\\c\nd', MetricValues.of_state(st))
    samples = parse(text)
    assert samples == {
        "jobtoken_token_expiry_timestamp_seconds": ("gauge", {"job_id": 'a"b\\c\nd'}, 1100.0),
        "jobtoken_last_success_timestamp_seconds": ("gauge", {"job_id": 'a"b\\c\nd'}, 900.0),
        "jobtoken_renewals_total": ("counter", {"job_id": 'a"b\\c\nd'}, 2.0),
        "jobtoken_renewal_failures_total": ("counter", {"job_id": 'a"b\\c\nd'}, 1.0),
        "jobtoken_renewal_consecutive_failures": ("gauge", {"job_id": 'a"b\\c\nd'}, 1.0),
        "jobtoken_credential_lost": ("gauge", {"job_id": 'a"b\\c\nd'}, 0.0),
    }
    for name, (kind, _, _) in samples.items():
        assert name.endswith("_total") == (kind == "counter")  # node_exporter naming
        assert name.endswith("_seconds") == ("timestamp" in name)
        assert f"# TYPE {name} {kind}\n" in text and f"# HELP {name} " in text
    assert text.endswith("\n")


def test_a_file_nobody_rewrites_cannot_say_the_token_is_fine() -> None:
    # the defect: a relative "seconds to expiry" written at t=1000 said 100 s for as long
    # as the file stayed; now the file holds when, and the alert rule computes how long
    text = render_metrics("x", MetricValues(expires_at=1100.0, last_success_at=900.0))
    samples = parse(text)
    assert "jobtoken_token_expiry_seconds" not in samples
    expiry = samples["jobtoken_token_expiry_timestamp_seconds"][2]
    for later in (1000.0, 1100.0, 5000.0):  # Prometheus' time() at three scrapes
        assert expiry - later == 1100.0 - later  # the rule sees it fall, then go negative
    assert all(not name.endswith("expiry_seconds") or "timestamp" in name for name in samples)


def test_unknown_values_are_left_out() -> None:
    samples = parse(render_metrics("x", MetricValues()))
    assert "jobtoken_token_expiry_timestamp_seconds" not in samples
    assert "jobtoken_last_success_timestamp_seconds" not in samples
    assert samples["jobtoken_renewal_failures_total"][2] == 0.0


def test_parse_reads_back_what_render_wrote() -> None:
    values = MetricValues(expires_at=1100.5, last_success_at=900.25, renewals=7,
                          failures_total=3, consecutive_failures=2, credential_lost=True)
    assert parse_metrics(render_metrics('j"1', values)) == values
    assert parse_metrics("garbage\njobtoken_renewals_total{job_id=\"x\"} NaN\n") == \
        MetricValues()


def test_write_is_atomic_and_readable_by_the_collector(tmp_path: Path) -> None:
    write_metrics(str(tmp_path), "ce#1.0", MetricValues(renewals=1), now=0.0)
    path = metrics_path(str(tmp_path), "ce#1.0")
    assert path.name == f"jobtoken_u{os.geteuid()}_ce_1.0.prom"
    assert (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    parse(path.read_text())
    remove_metrics(str(tmp_path), "ce#1.0")
    assert list(tmp_path.iterdir()) == []


# --- one-shot commands (cron): the counters live on between runs ------------------------


def test_oneshot_failures_count_up_and_keep_the_last_success(tmp_path: Path) -> None:
    d = str(tmp_path)
    record_oneshot(d, "probe", ok=True, expires_at=2000.0, renewed=True, now=1000.0)
    record_oneshot(d, "probe", ok=True, expires_at=2000.0, renewed=False, now=1300.0)  # kept
    record_oneshot(d, "probe", ok=False, expires_at=None, renewed=False, now=1600.0)
    record_oneshot(d, "probe", ok=False, expires_at=None, renewed=False, now=1900.0)
    s = parse(metrics_path(d, "probe").read_text())
    assert s["jobtoken_renewal_failures_total"][2] == 2  # rose run after run, not 1 and 1
    assert s["jobtoken_renewal_consecutive_failures"][2] == 2
    assert s["jobtoken_last_success_timestamp_seconds"][2] == 1300.0  # not dropped to 0
    assert s["jobtoken_token_expiry_timestamp_seconds"][2] == 2000.0  # the token on disk
    assert s["jobtoken_renewals_total"][2] == 1
    assert s["jobtoken_credential_lost"][2] == 0  # still valid at 1900
    record_oneshot(d, "probe", ok=False, expires_at=None, renewed=False, now=2100.0)
    s = parse(metrics_path(d, "probe").read_text())
    assert s["jobtoken_credential_lost"][2] == 1 and s["jobtoken_renewal_failures_total"][2] == 3
    record_oneshot(d, "probe", ok=True, expires_at=3000.0, renewed=True, now=2200.0)
    s = parse(metrics_path(d, "probe").read_text())
    assert s["jobtoken_renewal_failures_total"][2] == 3  # a counter never goes back
    assert s["jobtoken_renewal_consecutive_failures"][2] == 0
    assert s["jobtoken_credential_lost"][2] == 0 and s["jobtoken_renewals_total"][2] == 2


def test_after_oneshot_without_any_token_is_a_lost_credential() -> None:
    v = after_oneshot(MetricValues(), ok=False, expires_at=None, renewed=False, now=5.0)
    assert v.credential_lost and v.failures_total == 1 and v.last_success_at is None


def test_oneshot_never_reads_through_a_symlink(tmp_path: Path, caplog) -> None:
    d = tmp_path / "textfile"
    d.mkdir()
    elsewhere = tmp_path / "elsewhere.prom"
    elsewhere.write_text(render_metrics("probe", MetricValues(failures_total=99)))
    metrics_path(str(d), "probe").symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING):
        assert record_oneshot(str(d), "probe", ok=False, expires_at=None, renewed=False,
                              now=1.0) is None  # logged, not the command's failure
    assert "symlink" in caplog.text
    assert parse_metrics(elsewhere.read_text()).failures_total == 99


# --- series go away --------------------------------------------------------------------


def test_stale_files_of_our_account_expire_on_the_next_write(tmp_path: Path) -> None:
    d = str(tmp_path)
    now = 10 * STALE_AFTER_S
    for job, age in (("dead", STALE_AFTER_S + 60), ("quiet", STALE_AFTER_S - 60)):
        write_metrics(d, job, MetricValues(), now=now - age)
        os.utime(metrics_path(d, job), (now - age, now - age))
    torn = tmp_path / f".{metrics_path(d, 'killed').name}.0123456789ab.tmp"  # killed writer
    torn.write_text("jobtoken_renewals_total")
    os.utime(torn, (0, 0))
    other = tmp_path / "node_cpu.prom"  # not ours to judge: another writer's file
    other.write_text("x 1\n")
    os.utime(other, (0, 0))
    write_metrics(d, "live", MetricValues(), now=now)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [metrics_path(d, "quiet").name, metrics_path(d, "live").name, "node_cpu.prom"])
    assert expire_stale(d, now + 120) == [metrics_path(d, "quiet").name]


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
    forged.write_text("jobtoken_renewal_failures_total{job_id=\"job-a\"} 50\n")
    os.chown(forged, 4242, 4242)
    with pytest.raises(TokenFileError, match="belongs to uid 4242"):
        write_metrics(str(shared), "job-a", MetricValues(renewals=1), now=0.0)
    # a one-shot neither takes its counters nor writes over it
    assert record_oneshot(str(shared), "job-a", ok=True, expires_at=9.0, renewed=True,
                          now=1.0) is None
    remove_metrics(str(shared), "job-a")
    assert forged.read_text().endswith(" 50\n")  # not ours to remove either
    # another account's stale files stay: only the owner (or root's cron) removes them
    theirs = metrics_path(str(shared), "old", uid=4242)
    theirs.write_text("")
    os.chown(theirs, 4242, 4242)
    os.utime(theirs, (0, 0))
    assert expire_stale(str(shared), now=10 * STALE_AFTER_S) == []
    assert theirs.exists()
    # the other user's own files carry their uid: they cannot take our name by accident
    assert metrics_path(str(shared), "job-a", uid=4242).name == "jobtoken_u4242_job-a.prom"


@pytest.fixture()
def reachable() -> Iterator[Path]:
    """A place other accounts can reach (pytest's tmp, and maybe the checkout, are not):
    ``textfile``, root-owned 1777 as README "Metrics" says, and ``lib``, a copy of jobtoken."""
    base = Path(tempfile.mkdtemp(prefix="jobtoken-metrics-"))
    try:
        base.chmod(0o755)
        (base / "textfile").mkdir()
        (base / "textfile").chmod(0o1777)
        src = Path(__file__).resolve().parents[1] / "src" / "jobtoken"
        shutil.copytree(src, base / "lib" / "jobtoken",
                        ignore=shutil.ignore_patterns("__pycache__", "devserver", "_data"))
        for path in (base / "lib").rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (base / "lib").chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base)


def test_a_job_account_can_write_into_the_documented_directory(reachable: Path) -> None:
    """README "Metrics": root-owned, 1777. Every job account (here: nobody) writes there."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another account")
    shared = reachable / "textfile"
    nobody = pwd.getpwnam("nobody")
    code = (
        "import sys; from jobtoken._metrics import MetricValues, write_metrics; "
        "write_metrics(sys.argv[1], 'job-n', MetricValues(renewals=1), now=0.0)"
    )
    python = "/usr/bin/python3"  # the venv's interpreter may sit in root's home
    r = subprocess.run(
        [python, "-c", code, str(shared)], capture_output=True, text=True, timeout=60,
        user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(reachable / "lib")}, cwd="/",
    )
    assert r.returncode == 0, r.stderr
    written = metrics_path(str(shared), "job-n", uid=nobody.pw_uid)
    assert written.stat().st_uid == nobody.pw_uid
    assert parse(written.read_text())["jobtoken_renewals_total"][2] == 1


def test_a_missing_directory_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="mode 1777"):
        write_metrics(str(tmp_path / "absent"), "job-a", MetricValues(), now=0.0)


def test_a_symlink_under_our_name_is_not_written_through(shared: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    metrics_path(str(shared), "job-a").symlink_to(victim)
    with pytest.raises(TokenFileError, match="symlink"):
        write_metrics(str(shared), "job-a", MetricValues(renewals=1), now=0.0)
    assert victim.read_text() == "precious\n"


def test_a_world_writable_directory_needs_the_sticky_bit(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(TokenFileError, match="sticky"):
        write_metrics(str(d), "job-a", MetricValues(renewals=1), now=0.0)
    assert list(d.iterdir()) == []


def test_the_docs_and_alert_examples_name_only_metrics_that_exist() -> None:
    """An alert rule on a misspelt or removed name never fires; the docs' rules must not."""
    import re

    root = Path(__file__).resolve().parents[1]
    written = set(parse(render_metrics("x", MetricValues(expires_at=1.0, last_success_at=1.0))))
    written |= set(parse(render_broker_metrics("/s", BrokerValues(updated_at=1.0))))
    removed = {"jobtoken_token_expiry_seconds"}  # named only to say it is gone
    for doc in (root / "README.md", root / "examples" / "monitoring" / "README.md"):
        named = set(re.findall(r"\bjobtoken_[a-z_]+_(?:seconds|total|failures|lost)\b",
                               doc.read_text()))
        assert named, doc
        assert named - removed <= written, (doc.name, named - removed - written)
    assert "jobtoken_token_expiry_timestamp_seconds - time()" in (root / "README.md").read_text()


# --- the node broker's file (one per broker: node totals) -----------------------------------

BROKER = BrokerValues(updated_at=1000.0, jobs_by_phase=(("active", 3), ("ending", 1)),
                      renewals=7, failures_total=2, rate_limit_pauses=1, revocations=4,
                      revocations_pending=1)


def test_broker_render_follows_the_textfile_conventions() -> None:
    text = render_broker_metrics('/var/lib/"b"', BROKER)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    label = {"state_dir": '/var/lib/"b"'}
    jobs = families["jobtoken_broker_jobs"]
    assert jobs.type == "gauge" and jobs.documentation
    assert {s.labels["phase"]: s.value for s in jobs.samples} == {"active": 3.0, "ending": 1.0}
    assert all(s.labels["state_dir"] == label["state_dir"] for s in jobs.samples)
    samples = parse(text)
    del samples["jobtoken_broker_jobs"]  # one sample per phase: checked above
    assert samples == {
        "jobtoken_broker_updated_timestamp_seconds": ("gauge", label, 1000.0),
        "jobtoken_broker_renewals_total": ("counter", label, 7.0),
        "jobtoken_broker_renewal_failures_total": ("counter", label, 2.0),
        "jobtoken_broker_rate_limit_pauses_total": ("counter", label, 1.0),
        "jobtoken_broker_revocations_total": ("counter", label, 4.0),
        "jobtoken_broker_revocations_pending": ("gauge", label, 1.0),
    }


def test_broker_counters_carry_on_from_its_own_previous_file(tmp_path: Path) -> None:
    assert read_broker_metrics(str(tmp_path), "/state") == BrokerValues(updated_at=0.0)
    write_broker_metrics(str(tmp_path), "/state", BROKER)
    back = read_broker_metrics(str(tmp_path), "/state")
    assert (back.renewals, back.failures_total, back.rate_limit_pauses, back.revocations) == (
        7, 2, 1, 4)
    assert parse_broker_metrics("garbage\njobtoken_broker_renewals_total{} x\n") == \
        BrokerValues(updated_at=0.0)
    # another broker (state directory) of the node has its own file
    assert read_broker_metrics(str(tmp_path), "/other").renewals == 0


def test_broker_file_is_in_the_cleanup_pattern_and_ours_only(shared: Path) -> None:
    path = broker_metrics_path(str(shared), "/state")
    assert path.name.startswith(f"jobtoken_u{os.geteuid()}_") and path.suffix == ".prom"
    write_broker_metrics(str(shared), "/state", BROKER)
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    os.utime(path, (0, 0))
    assert expire_stale(str(shared), now=STALE_AFTER_S + 1) == [path.name]
    path.symlink_to(shared / "elsewhere")
    with pytest.raises(TokenFileError, match="symlink"):
        write_broker_metrics(str(shared), "/state", BROKER)
