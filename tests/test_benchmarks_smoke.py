"""Smoke tests for benchmarks/: the scripts run in their tiny mode and write well-formed output.

The three measuring scripts run as real subprocesses, side by side (their figures are
meaningless in ``--quick`` mode; only the shape of the output is checked). The fleet
simulation's building blocks are also checked in-process, because a wrong limiter or a
simulation that cannot show an expired token would make every fleet figure worthless.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
_TIMEOUT_S = 240.0  # broker.py --quick waits two token lifetimes on a loaded machine


@pytest.fixture(scope="module")
def quick_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    runs = {
        "startup": [
            str(BENCH / "startup.py"),
            "--quick",
            "--rounds",
            "1",
            "--json",
            str(out / "startup.json"),
        ],
        "sidecar": [
            str(BENCH / "sidecar_resources.py"),
            "--quick",
            "--json",
            str(out / "sidecar.json"),
        ],
        "waiting": [str(BENCH / "waiting_uss.py"), "--quick", "--json", str(out / "waiting.json")],
        # tiny: jobs 1 and 2 on one broker, one `run` job and one shell loop, 6 s windows
        "broker": [str(BENCH / "broker.py"), "--quick", "--json", str(out / "broker.json")],
        "fleet": [
            str(BENCH / "fleet.py"),
            "--quick",
            "--json",
            str(out / "fleet.json"),
            "--png",
            str(out / "fleet.png"),
        ],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(out)
        )
        for name, argv in runs.items()
    }
    failures = []
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failures.append(f"{name}: no end within {_TIMEOUT_S:.0f} s")
            continue
        if proc.returncode != 0:
            failures.append(f"{name}: exit {proc.returncode}: {err.decode()[-600:]}")
    assert not failures, failures
    return out


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_startup_reports_medians_and_ratios(quick_outputs: Path) -> None:
    data = _load(quick_outputs / "startup.json")
    for name in ("baseline_import_httpx_jwt", "prepare", "token", "floor_token"):
        assert data["seconds"][name]["median"] > 0
    assert data["prepare_over_baseline"] > 0 and data["token_over_baseline"] > 0
    assert set(data["breakdown_ms"]) >= {
        "httpcore_import",
        "jobtoken_imports",
        "tls_default_context",
    }
    counts = data["server_requests_per_command"]["counts"]
    assert counts["my"] >= 2 and counts["access"] >= 4  # prepare x2, token + floor x2


def test_sidecar_reports_memory_cpu_and_requests(quick_outputs: Path) -> None:
    data = _load(quick_outputs / "sidecar.json")
    mem = data["memory"]
    assert 1 < mem["idle_uss_mib"] <= mem["peak_uss_mib"]
    renewal = data["renewal"]  # counts depend on the machine's load in --quick mode
    assert renewal["renewal_children_reaped"] >= 1 and renewal["requests_per_renewal"] >= 0
    assert set(renewal["http_statuses"]) <= {200}
    assert data["per_job_hour_1h_tokens"]["cpu_s"] >= 0
    assert 1.5 < data["per_job_hour_1h_tokens"]["renewals_per_hour_worst_jitter"] < 1.8


def test_waiting_uss_reports_the_run_process_and_a_bare_interpreter(quick_outputs: Path) -> None:
    data = _load(quick_outputs / "waiting.json")
    assert data["waiting_process"] == "jobtoken._waiter"  # measured after the exec
    assert 1 < data["bare_interpreter_uss_mib"]["venv_python"]
    assert 1 < data["waiting_uss_mib"] < 50


def test_broker_reports_per_job_memory_cpu_and_startup_side_by_side(quick_outputs: Path) -> None:
    data = _load(quick_outputs / "broker.json")
    broker = data["broker"]
    assert [c["jobs"] for c in broker["by_jobs"]] == [1, 2]
    assert broker["base_uss_mib"] > 1 and all(c["uss_mib"] > 1 for c in broker["by_jobs"])
    assert broker["start_to_ping_s"] > 0 and broker["register_prepare_to_token_s"] > 0
    assert broker["pilot_run_waiter_uss_mib"] > 1  # a pilot's payload waiting on the broker
    assert set(broker["http_statuses"]) <= {200, 204}
    for side in ("run", "shell_loop"):
        assert data[side]["uss_per_job_mib"] > 0
    # the counts depend on the machine's load in --quick mode; the shape does not
    assert set(data["cpu_ms_per_renewal"]) == {"broker", "run", "shell_loop"}
    assert set(data["per_job_uss_mib"]) >= {"broker_at_2", "run", "shell_loop"}


def test_fleet_writes_json_and_png(quick_outputs: Path) -> None:
    data = _load(quick_outputs / "fleet.json")
    main = data["main"]
    assert main["jobs_with_expired_token"] == 0
    assert main["refused_outage"] > 0  # the outage happened inside the simulated time
    assert main["renewals"] > 0 and main["rejected_429"] == 0
    assert len(data["series"]["requests_per_s"]) == main["config"]["duration_s"] / 60
    assert data["largest_site"][0]["largest_site_jobs"] >= 1
    assert (quick_outputs / "fleet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_fills_the_markdown_between_markers(quick_outputs: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import report
    finally:
        sys.path.remove(str(BENCH))
    md = tmp_path / "b.md"
    md.write_text(f"# title\n\n{report.BEGIN}\nold table\n{report.END}\n\ntext after\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "report.py"),
            "--startup",
            str(quick_outputs / "startup.json"),
            "--sidecar",
            str(quick_outputs / "sidecar.json"),
            "--fleet",
            str(quick_outputs / "fleet.json"),
            "--waiting",
            str(quick_outputs / "waiting.json"),
            "--broker",
            str(quick_outputs / "broker.json"),
            "--out",
            str(tmp_path / "b.json"),
            "--md",
            str(md),
        ],
        capture_output=True,
        timeout=_TIMEOUT_S,
        check=True,
    )
    text = md.read_text()
    assert "old table" not in text and text.endswith("text after\n")
    assert "| figure | value | goal | met |" in text
    assert proc.stdout.decode() in text
    assert "USS of a waiting `jobtoken run`" in text and "broker: CPU per renewal" in text
    figures = _load(tmp_path / "b.json")["figures"]
    assert {f["met"] for f in figures} <= {"yes", "**no**", "n/a"}
    with pytest.raises(ValueError):
        report.replace_between_markers("no markers here", "x")


# --- the fleet simulation's parts, in-process ---------------------------------------------


@pytest.fixture()
def fleet(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import fleet as module

    return module


def test_limiter_is_fibers_fixed_window(fleet) -> None:
    lim = fleet.FixedWindowLimiter(3, 300)
    assert [lim.hit(1, 10.2 + i) for i in range(3)] == [None, None, None]
    assert lim.hit(1, 100.9) == 210  # window opened at second 10: rest of it
    assert lim.hit(2, 100.0) is None  # another IP has its own window
    assert lim.hit(1, 309.9) == 1
    assert lim.hit(1, 310.0) is None  # a new window opens at the first hit after the end


def test_simulation_is_deterministic(fleet) -> None:
    cfg = fleet.FleetConfig(jobs=60, duration_s=3 * 3600.0, outage_at_s=3600.0)
    first, second = fleet.simulate(cfg), fleet.simulate(cfg)
    assert fleet._digest(first) == fleet._digest(second)
    assert first.renewals == second.renewals > 0


def test_outage_longer_than_the_token_leaves_jobs_expired(fleet) -> None:
    cfg = fleet.FleetConfig(jobs=40, duration_s=4 * 3600.0, outage_at_s=3600.0, outage_s=5400.0)
    res = fleet.simulate(cfg)
    assert res.expired_jobs == 40
    assert res.max_expired_s > 0


def test_a_site_too_big_for_the_limit_meets_429s(fleet) -> None:
    cfg = fleet.FleetConfig(jobs=120, duration_s=2 * 3600.0, outage_at_s=None, jobs_per_ip=120)
    assert cfg.requests_per_renewal == 1  # the renewal child keeps the discovery document
    res = fleet.simulate(cfg)
    assert sum(res.rejected) > 0
    assert res.not_started == 120 - 100  # 100 first tokens x 1 request fill the window
    two = fleet.simulate(dataclasses.replace(cfg, requests_per_renewal=2))
    assert two.not_started == 120 - 50  # without the cache: discovery + token each
