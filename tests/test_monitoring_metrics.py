"""The monitoring example's probe metrics under cron (examples/monitoring): one process per
transfer must not reset its counters or its last success (a real XRootD run is in tests/e2e)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import jwtmint

pytestmark = pytest.mark.process

PROBE = Path(__file__).resolve().parents[1] / "examples" / "monitoring" / "test-transfer.sh"


def samples(path: Path) -> Dict[str, float]:
    return {f"{s.name}{{{s.labels.get('result', '')}}}": s.value
            for f in text_string_to_metric_families(path.read_text()) for s in f.samples}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cron_runs_count_failures_on_and_keep_the_last_success(tmp_path: Path) -> None:
    bt = tmp_path / "bt"
    bt.write_text(jwtmint.access_token() + "\n")
    bt.chmod(0o600)
    metrics = tmp_path / "probe.prom"
    # what an earlier cron run that transferred 5 files, the last at 1234, left behind
    metrics.write_text(
        '# TYPE storage_test_transfers_total counter\n'
        'storage_test_transfers_total{name="p",result="ok"} 5\n'
        'storage_test_transfers_total{name="p",result="failed"} 0\n'
        '# TYPE storage_test_last_success_timestamp_seconds gauge\n'
        'storage_test_last_success_timestamp_seconds{name="p"} 1234\n'
    )
    env = dict(
        os.environ,
        BEARER_TOKEN_FILE=str(bt),
        MONITOR_DEST=f"https://127.0.0.1:{closed_port()}/vo/probe/",  # refused: a failure
        MONITOR_CLIENT="curl",
        MONITOR_COUNT="1",
        MONITOR_INTERVAL="0",
        MONITOR_TIMEOUT="20",
        MONITOR_NAME="p",
        MONITOR_METRICS=str(metrics),
        JOBTOKEN_BIN=str(Path(sys.executable).parent / "jobtoken"),
    )
    env.pop("BEARER_TOKEN", None)
    for run in (1, 2):  # two cron firings, each its own process
        r = subprocess.run(["bash", str(PROBE)], env=env, capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 1, r.stderr  # this run's transfer failed
        assert "result=failed" in r.stdout
        s = samples(metrics)
        assert s["storage_test_transfers_total{failed}"] == run  # 1, then 2: not 1 and 1
        assert s["storage_test_transfers_total{ok}"] == 5
        assert s["storage_test_last_success_timestamp_seconds{}"] == 1234  # not 0
