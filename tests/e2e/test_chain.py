"""The whole chain, as a site runs it: parent mytoken → ``jobtoken prepare`` → ``jobtoken run``
→ a payload writing files to a real XRootD with real grid clients, across token renewals.

The issuer here mints 15-second access tokens, so every job below lives through at least
one renewal and each client's second transfer proves it picked up the renewed token the
way docs/clients.md says: xrdcp by itself (``BEARER_TOKEN_FILE``), curl and davix-put by
reading the file at each call, gfal-copy by getting ``BEARER_TOKEN`` set from the file at
each call. The monitoring example (examples/monitoring) runs here too, periodic under
``jobtoken run`` and as a cron-style one-shot.

All jobs start together in one module fixture and each test then waits for its own job,
so the module costs one renewal cycle of wall time, not one per test.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ._chain import (
    CLIENT_PATTERNS,
    EXAMPLES,
    PROCESS_TIMEOUT_S,
    Finished,
    Job,
    Storage,
    records,
    short_lived_storage,
    write_payload,
)
from .conftest import STORAGE_AUDIENCE

pytestmark = pytest.mark.e2e

AT_LIFETIME_S = 15
MARGIN_S = 5.0  # renew at least 5 s before exp (a third of the lifetime)
RENEWAL_WAIT_S = 60  # a renewal is due after ~10 s; this only bounds a broken run
MONITOR_COUNT = 12  # one transfer a second: spans a renewal
MONITOR_CLIENTS = {"xrdcp": "root", "curl": "https"}  # the others: chain tests above
ONCE_MAX_RUNS = 20
ONCE_MIN_VALID_S = 10  # fresh tokens have 14-15 s: some runs keep, a later one renews


def storage_log_tail(storage: Storage, lines: int = 15) -> str:
    """The storage's last log lines (the refusal reasons; no tokens), for failure messages."""
    return "\nxrootd log:\n" + "\n".join(storage.xrootd.log_text().splitlines()[-lines:])


def chain_payload(client: str) -> str:
    """Transfer, wait for the sidecar's renewal, transfer again with the same pattern."""
    pattern = CLIENT_PATTERNS[client]
    return f"""\
SRC="$HOME/out.dat"
printf 'job output of the {client} chain\\n' >"$SRC"
first=$(cksum <"$BEARER_TOKEN_FILE")
DEST=first.dat
{pattern} || {{ echo "transfer n=1 result=failed rc=$?"; exit 10; }}
echo "transfer n=1 result=ok"
deadline=$((SECONDS + {RENEWAL_WAIT_S}))
while [ "$(cksum <"$BEARER_TOKEN_FILE")" = "$first" ]; do
    [ "$SECONDS" -lt "$deadline" ] || {{ echo "renewal result=missing"; exit 11; }}
    sleep 0.2
done
echo "renewal result=seen"
DEST=second.dat
{pattern} || {{ echo "transfer n=2 result=failed rc=$?"; exit 12; }}
echo "transfer n=2 result=ok"
"""


@dataclass
class Launched:
    """Everything the module started at once, each test waits for its part."""

    chains: dict[str, Job]
    first_claims: dict[str, dict[str, Any]]
    monitors: dict[str, Job]
    metrics: dict[str, Path]
    once_job: Job
    once_results: list[Finished]
    once_thread: threading.Thread
    token_results: list[Finished]
    token_file: Path


def _run_once(
    job: Job, env: dict[str, str], runs: int, out: list[Finished], *, until_renewed: bool = False
) -> None:
    """Cron firing back to back: test-transfer-once.sh up to ``runs`` times.

    Stops at a failure, and with ``until_renewed`` once a run renewed after one that did not.
    """
    for _ in range(runs):
        proc = subprocess.run(
            [str(EXAMPLES / "test-transfer-once.sh")],
            env=job.env(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT_S,
            check=False,
        )
        out.append(Finished(proc.returncode, proc.stdout, proc.stderr))
        if proc.returncode != 0:
            return
        renewed = ["(renewed)" in r.stdout for r in out]
        if until_renewed and renewed[-1] and not all(renewed):
            return


@pytest.fixture(scope="module")
def storage() -> Iterator[Storage]:
    with short_lived_storage(AT_LIFETIME_S) as started:
        yield started


@pytest.fixture(scope="module")
def launched(storage: Storage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    jobs: list[Job] = []
    chains: dict[str, Job] = {}
    claims: dict[str, dict[str, Any]] = {}
    monitors: dict[str, Job] = {}
    metrics: dict[str, Path] = {}
    try:
        for client in CLIENT_PATTERNS:
            base = tmp_path_factory.mktemp(f"chain-{client}")
            job = Job(storage, base, margin_s=MARGIN_S)
            jobs.append(job)
            job.prepare()
            claims[client] = job.inspect()
            script = write_payload(base, "payload.sh", chain_payload(client))
            job.start([str(script)])
            chains[client] = job
        for client, scheme in MONITOR_CLIENTS.items():
            base = tmp_path_factory.mktemp(f"monitor-{client}")
            job = Job(storage, base, margin_s=MARGIN_S)
            jobs.append(job)
            job.prepare()
            metrics[client] = base / "monitor.prom"
            dest = storage.root_dir(job.path) if scheme == "root" else storage.https_dir(job.path)
            job.start(
                [str(EXAMPLES / "test-transfer.sh")],
                env={
                    "MONITOR_DEST": dest,
                    "MONITOR_CLIENT": client,
                    "MONITOR_INTERVAL": "1",
                    "MONITOR_COUNT": str(MONITOR_COUNT),
                    "MONITOR_SIZE": "1000",
                    "MONITOR_TIMEOUT": "60",
                    "MONITOR_NAME": f"e2e-{client}",
                    "MONITOR_METRICS": str(metrics[client]),
                },
            )
            monitors[client] = job

        # cron-style, with a prepared token directory and `jobtoken ensure`
        once_job = Job(storage, tmp_path_factory.mktemp("once"), margin_s=MARGIN_S)
        once_job.prepare()
        once_env = {
            "JOBTOKEN_DIR": str(once_job.tokendir),
            "MONITOR_DEST": storage.https_dir(once_job.path),
            "MONITOR_MIN_VALID": str(ONCE_MIN_VALID_S),
            "MONITOR_SIZE": "100",
            "MONITOR_NAME": "cron",
        }
        once_results: list[Finished] = []
        once_thread = threading.Thread(
            target=_run_once,
            args=(once_job, once_env, ONCE_MAX_RUNS, once_results),
            kwargs={"until_renewed": True},
            daemon=True,
        )
        once_thread.start()

        # cron-style without a token directory: `jobtoken token` and a restricted mytoken
        token_job = Job(storage, tmp_path_factory.mktemp("once-token"), margin_s=MARGIN_S)
        scope = f"storage.create:{token_job.path} storage.read:{token_job.path}"
        mytoken_file = token_job.base / "probe.mt"
        fd = os.open(mytoken_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(
                storage.server.issue_mytoken(
                    capabilities=["AT"],
                    restrictions=[{"scope": scope, "audience": [STORAGE_AUDIENCE]}],
                )
            )
        token_file = token_job.home / "bt"
        token_results: list[Finished] = []
        _run_once(
            token_job,
            {
                "BEARER_TOKEN_FILE": str(token_file),
                "JOBTOKEN_MYTOKEN_FILE": str(mytoken_file),
                "JOBTOKEN_SCOPE": scope,
                "JOBTOKEN_AUDIENCE": STORAGE_AUDIENCE,
                "MONITOR_DEST": storage.root_dir(token_job.path),
                "MONITOR_MIN_VALID": str(ONCE_MIN_VALID_S),
                "MONITOR_SIZE": "100",
                "MONITOR_NAME": "cron-token",
            },
            2,
            token_results,
        )

        yield Launched(
            chains=chains,
            first_claims=claims,
            monitors=monitors,
            metrics=metrics,
            once_job=once_job,
            once_results=once_results,
            once_thread=once_thread,
            token_results=token_results,
            token_file=token_file,
        )
    finally:
        for job in jobs:
            job.kill()


@pytest.mark.parametrize("client", sorted(CLIENT_PATTERNS))
def test_first_token_has_the_storage_audience_and_the_https_issuer(
    client: str, launched: Launched, storage: Storage
) -> None:
    claims = launched.first_claims[client]
    path = launched.chains[client].path
    assert claims["iss"] == storage.server.op_issuer
    assert claims["iss"].startswith("https://127.0.0.1:")
    assert claims["audiences"] == [STORAGE_AUDIENCE]
    assert sorted(claims["scopes"]) == [f"storage.create:{path}", f"storage.read:{path}"]


@pytest.mark.parametrize("client", sorted(CLIENT_PATTERNS))
def test_client_writes_with_the_first_and_the_renewed_token(
    client: str, launched: Launched, storage: Storage
) -> None:
    job = launched.chains[client]
    result = job.finish()
    assert result.returncode == 0, result.tail() + storage_log_tail(storage)
    assert [r["result"] for r in records(result.stdout, "transfer")] == ["ok", "ok"]
    assert records(result.stdout, "renewal") == [{"result": "seen"}]
    for name in ("first.dat", "second.dat"):
        on_disk = storage.on_disk(f"{job.path}/{name}")
        assert on_disk.read_text() == f"job output of the {client} chain\n"
    state = job.state()
    assert state["renewals"] >= 1 and state["failures_total"] == 0


@pytest.mark.parametrize("client", sorted(CLIENT_PATTERNS))
def test_run_cleans_up_and_revokes_at_the_end(client: str, launched: Launched) -> None:
    job = launched.chains[client]
    assert job.finish().returncode == 0
    assert not job.bearer_token_file.exists()
    assert not (job.tokendir / "mytoken").exists()
    assert "job mytoken revoked" in (job.tokendir / "sidecar.log").read_text()


@pytest.mark.parametrize("client", sorted(MONITOR_CLIENTS))
def test_monitoring_example_under_jobtoken_run(
    client: str, launched: Launched, storage: Storage
) -> None:
    job = launched.monitors[client]
    result = job.finish()
    assert result.returncode == 0, result.tail()
    transfers = records(result.stdout, "transfer")
    assert [t["result"] for t in transfers] == ["ok"] * MONITOR_COUNT, result.tail()
    # the token each transfer presented was unexpired at that moment (the storage would
    # accept a recently seen expired token from its cache, so this is checked here)
    assert all(t["token_state"] == "valid" for t in transfers), transfers
    assert min(float(t["token_left_s"]) for t in transfers) > 0
    assert len({t["token_jti"] for t in transfers}) >= 2  # lived through a renewal
    summary = records(result.stdout, "summary")
    assert summary == [
        {
            "transfers": str(MONITOR_COUNT),
            "ok": str(MONITOR_COUNT),
            "failed": "0",
            "token_expired": "0",
            "stopped": "0",
        }
    ]
    stored = sorted(storage.on_disk(job.path).iterdir())
    assert [p.name for p in stored] == sorted(t["file"] for t in transfers)
    assert all(p.stat().st_size == 1000 for p in stored)
    prom = launched.metrics[client].read_text()
    assert f'storage_test_transfers_total{{name="e2e-{client}",result="ok"}} {MONITOR_COUNT}' in prom
    assert f'storage_test_transfers_total{{name="e2e-{client}",result="failed"}} 0' in prom
    assert "eyJ" not in result.stdout + result.stderr + prom


def test_cron_one_shot_with_ensure_renews_only_when_needed(
    launched: Launched, storage: Storage
) -> None:
    launched.once_thread.join(timeout=PROCESS_TIMEOUT_S)
    assert not launched.once_thread.is_alive()
    results = launched.once_results
    assert [r.returncode for r in results] == [0] * len(results), results[-1].tail()
    transfers = [records(r.stdout, "transfer")[0] for r in results]
    assert all(t["result"] == "ok" and t["token_state"] == "valid" for t in transfers)
    # ensure left at least MIN_VALID; the copy was taken a moment later
    assert min(float(t["token_left_s"]) for t in transfers) > ONCE_MIN_VALID_S - 1
    renewed = ["(renewed)" in r.stdout for r in results]
    # kept the prepared token while it was good for MIN_VALID more seconds, then renewed
    assert not renewed[0] and renewed[-1], [r.stdout for r in results]
    jtis = [t["token_jti"] for t in transfers]
    assert jtis[0] == jtis[-2] != jtis[-1]
    names = sorted(p.name for p in storage.on_disk(launched.once_job.path).iterdir())
    assert names == sorted(t["file"] for t in transfers)


def test_cron_one_shot_with_jobtoken_token_and_no_token_dir(
    launched: Launched, storage: Storage
) -> None:
    results = launched.token_results
    assert [r.returncode for r in results] == [0, 0], results[-1].tail()
    assert stat.S_IMODE(launched.token_file.stat().st_mode) == 0o600
    assert results[0].stdout.startswith("wrote ") and results[1].stdout.startswith("kept ")
    transfers = [records(r.stdout, "transfer")[0] for r in results]
    assert [t["result"] for t in transfers] == ["ok", "ok"]
    assert all(float(t["token_left_s"]) > ONCE_MIN_VALID_S - 1 for t in transfers)


def test_chain_output_never_contains_a_token(launched: Launched) -> None:
    outputs = []
    for job in list(launched.chains.values()) + list(launched.monitors.values()):
        result = job.finish()
        outputs += [result.stdout, result.stderr, (job.tokendir / "sidecar.log").read_text()]
        outputs.append(json.dumps(job.state()))
    launched.once_thread.join(timeout=PROCESS_TIMEOUT_S)
    for result in launched.once_results + launched.token_results:
        outputs += [result.stdout, result.stderr]
    assert not [text for text in outputs if "eyJ" in text]

