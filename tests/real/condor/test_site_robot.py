"""A real HTCondor pool runs jobtoken jobs end to end (site robot mytoken on the EP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List

import pytest

from jobtoken.devserver import DevServer

from ._pool import COMPLETED, Pool
from .conftest import AT_LIFETIME_S

pytestmark = pytest.mark.slow

PAYLOADS = Path(__file__).parent / "payloads"


def job_children(devserver: DevServer, robot: str) -> List[Any]:
    """The job mytokens minted from the robot (revoked ones included)."""
    store = devserver._store
    record = store.by_mom_id(devserver.introspect(robot)["mom_id"])
    return list(store.children(record.id))


def reader_files() -> dict:
    return {"reader.py": (PAYLOADS / "reader.py").read_text()}


def submit_text(seconds: float, code: int, extra: str = "") -> str:
    return f"""\
executable = reader.py
arguments = {seconds} {code}
output = out.txt
error = err.txt
log = job.log
should_transfer_files = YES
when_to_transfer_output = ON_EXIT
{extra}
queue
"""


def result(directory: Path) -> dict:
    lines = (directory / "out.txt").read_text().strip().splitlines()
    return json.loads(lines[-1])


def test_site_robot_job_reads_a_fresh_token_over_three_lifetimes(
    site: Pool, devserver: DevServer, robot: str
) -> None:
    before = {c.id for c in job_children(devserver, robot)}
    directory = site.job_dir("robot3")
    seconds = 3 * AT_LIFETIME_S + 5
    cluster = site.submit(directory, submit_text(seconds, 7, "+JobtokenWanted = true"),
                          reader_files())
    ad = site.wait_done(cluster, timeout=seconds + 120)
    assert ad["JobStatus"] == COMPLETED, ad
    assert ad["ExitCode"] == 7
    out = result(directory)
    assert out["bad"] == 0, out
    assert out["reads"] >= seconds - 2, out
    assert out["tokens"] >= 3, out
    minted = [c for c in job_children(devserver, robot) if c.id not in before]
    assert len(minted) == 1, "one job mytoken per job"
    assert minted[0].revoked, "the job mytoken is revoked when the job ends"
