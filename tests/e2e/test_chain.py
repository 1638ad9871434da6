"""The whole chain, as a site runs it: parent mytoken → ``jobtoken prepare`` → ``jobtoken run``
→ a payload writing files to a real XRootD with real grid clients, across token renewals.

The issuer here mints 45-second access tokens, so every job below lives through at least
one renewal. Each client's payload transfers once, waits until jobtoken has replaced
``$BEARER_TOKEN_FILE``, and transfers again with the same one-line pattern of
docs/clients.md: xrdcp finding the file by itself, curl and davix-put reading it at each
call, gfal-copy getting ``BEARER_TOKEN`` set from it at each call. (That each pattern really
presents the new token, and not a cached old one, is shown by test_client_patterns.py with
a token for another path; the storage would accept the old token here too.) The monitoring
example (examples/monitoring) runs here as well, periodic under ``jobtoken run`` and as a
cron-style one-shot, and its own records show which token each transfer presented.

All jobs start together in one module fixture and each test then waits for its own job,
so the module costs one renewal cycle of wall time, not one per test.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobtoken._tokenfile import read_secret_file, write_secret_file
from jobtoken._tokens import decode_access_token

from ._chain import (
    CLIENT_PATTERNS,
    EXAMPLES,
    PROCESS_TIMEOUT_S,
    Finished,
    Job,
    Storage,
    records,
    short_lived_storage,
    wait_for,
    write_payload,
)
from .conftest import STORAGE_AUDIENCE

pytestmark = pytest.mark.e2e

# Long enough for a loaded machine (load 6-14 on 2 cores): a renewal child that needs
# 10 s to start and finish still lands inside the 15 s margin, so "every transfer
# presented an unexpired token" tests jobtoken, not the scheduler. 15 s tokens with a
# 5 s margin once handed a payload a token expired 7 s.
AT_LIFETIME_S = 45
MARGIN_S = 15.0  # renew at least 15 s before exp (a third of the lifetime)
RENEWAL_WAIT_S = 120  # a renewal is due after ~26-30 s; this only bounds a broken run
MONITOR_COUNT = 36  # one transfer a second: spans a renewal (due 25.5-30 s after iat)
# Each transfer also starts `jobtoken inspect` and a client: 5-8 s each at load 25 on 2
# cores, so 36 of them may take minutes. This only bounds a run that hangs.
MONITOR_FINISH_S = 600.0
MONITOR_CLIENTS = {"xrdcp": "root", "curl": "https"}  # the others: chain tests above
# The cron runs of `jobtoken ensure`: each run's decision must follow from the token's
# time left, whatever the machine's speed. Keep: a fresh 45 s token has more than
# ONCE_KEEP_MIN_VALID_S left for 40 s. Renew: the second run starts once the token has
# at most ONCE_RENEW_LEFT_S left, which only shrinks, and asks for more; the renewed
# 45 s token meets that for 25 s.
ONCE_KEEP_MIN_VALID_S = 5
ONCE_RENEW_LEFT_S = 12
ONCE_RENEW_MIN_VALID_S = 20
TOKEN_MIN_VALID_S = 4  # `jobtoken token` runs: the second keeps the first one's token


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
    endless: Job
    once_job: Job
    once_results: list[Finished]
    crons: list[Future[None]]
    token_results: list[Finished]
    token_file: Path


def _run_once(
    job: Job, env: dict[str, str], out: list[Finished], **extra: str
) -> bool:
    """One cron firing of test-transfer-once.sh; True when it succeeded."""
    proc = subprocess.run(
        [str(EXAMPLES / "test-transfer-once.sh")],
        env=job.env({**env, **extra}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
        check=False,
    )
    out.append(Finished(proc.returncode, proc.stdout, proc.stderr))
    return proc.returncode == 0


def _cron_schedule(job: Job, env: dict[str, str], out: list[Finished]) -> None:
    """Fire while the token is good long enough, once it is not, then again.

    Each run's decision (keep or renew) is known in advance from the token's time left,
    however long the runs themselves take (see ONCE_*).
    """
    keep = {"MONITOR_MIN_VALID": str(ONCE_KEEP_MIN_VALID_S)}
    if not _run_once(job, env, out, **keep):
        return
    token = decode_access_token(read_secret_file(job.bearer_token_file))
    time.sleep(max(0.0, token.expires_at - ONCE_RENEW_LEFT_S - time.time()))
    if _run_once(job, env, out, MONITOR_MIN_VALID=str(ONCE_RENEW_MIN_VALID_S)):
        _run_once(job, env, out, **keep)


@pytest.fixture(scope="module")
def storage() -> Iterator[Storage]:
    with short_lived_storage(AT_LIFETIME_S) as started:
        yield started


@pytest.fixture(scope="module")
def launched(storage: Storage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    def new_job(name: str, **kw: Any) -> Job:
        return Job(storage, tmp_path_factory.mktemp(name), margin_s=MARGIN_S, **kw)

    chains = {client: new_job(f"chain-{client}") for client in CLIENT_PATTERNS}
    monitors = {client: new_job(f"monitor-{client}") for client in MONITOR_CLIENTS}
    metrics = {client: job.base / "monitor.prom" for client, job in monitors.items()}
    # no transfer count, started by the pilot wrapper, stopped by the batch system
    endless = new_job("monitor-endless")
    # cron-style with a prepared token directory and `jobtoken ensure`; its parent mytoken
    # can mint nothing but this probe's scopes and audience
    once_job = new_job("once", parent_restricted=True)
    # cron-style without a token directory: `jobtoken token` and an AT-only mytoken
    token_job = new_job("once-token")
    jobs = [*chains.values(), *monitors.values(), endless, once_job, token_job]
    claims: dict[str, dict[str, Any]] = {}
    once_results: list[Finished] = []
    token_results: list[Finished] = []
    token_file = token_job.home / "bt"

    def start_chain(client: str) -> None:
        job = chains[client]
        job.prepare()
        claims[client] = job.inspect()
        job.start([str(write_payload(job.base, "payload.sh", chain_payload(client)))])

    def start_monitor(client: str) -> None:
        job = monitors[client]
        job.prepare()
        root = MONITOR_CLIENTS[client] == "root"
        job.start(
            [str(EXAMPLES / "test-transfer.sh")],
            env={
                "MONITOR_DEST": storage.root_dir(job.path) if root else storage.https_dir(job.path),
                "MONITOR_CLIENT": client,
                "MONITOR_INTERVAL": "1",
                "MONITOR_COUNT": str(MONITOR_COUNT),
                "MONITOR_SIZE": "1000",
                "MONITOR_TIMEOUT": "60",
                "MONITOR_NAME": f"e2e-{client}",
                "MONITOR_METRICS": str(metrics[client]),
            },
        )

    def start_endless() -> None:
        endless.start_wrapped(
            [str(EXAMPLES / "test-transfer.sh")],
            env={
                "MONITOR_DEST": storage.https_dir(endless.path),
                "MONITOR_INTERVAL": "1",
                "MONITOR_NAME": "endless",
            },
        )

    def cron_with_ensure() -> None:
        once_job.prepare()
        env = {
            "JOBTOKEN_DIR": str(once_job.tokendir),
            "MONITOR_DEST": storage.https_dir(once_job.path),
            "MONITOR_SIZE": "100",
            "MONITOR_NAME": "cron",
        }
        _cron_schedule(once_job, env, once_results)

    def cron_with_token() -> None:
        scope = " ".join(token_job.scopes)
        mytoken_file = token_job.base / "probe.mt"
        write_secret_file(
            mytoken_file,
            storage.server.issue_mytoken(
                capabilities=["AT"],
                restrictions=[{"scope": scope, "audience": [STORAGE_AUDIENCE]}],
            ),
            newline=False,
        )
        env = {
            "BEARER_TOKEN_FILE": str(token_file),
            "JOBTOKEN_MYTOKEN_FILE": str(mytoken_file),
            "JOBTOKEN_SCOPE": scope,
            "JOBTOKEN_AUDIENCE": STORAGE_AUDIENCE,
            "MONITOR_DEST": storage.root_dir(token_job.path),
            "MONITOR_MIN_VALID": str(TOKEN_MIN_VALID_S),
            "MONITOR_SIZE": "100",
            "MONITOR_NAME": "cron-token",
        }
        if _run_once(token_job, env, token_results):
            _run_once(token_job, env, token_results)

    # everything starts at once: the module waits for one renewal cycle, not one per test
    pool = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="launch")
    starts = [pool.submit(start_chain, client) for client in chains]
    starts += [pool.submit(start_monitor, client) for client in monitors]
    starts.append(pool.submit(start_endless))
    crons = [pool.submit(cron_with_ensure), pool.submit(cron_with_token)]
    try:
        for future in starts:
            future.result(timeout=PROCESS_TIMEOUT_S)
        yield Launched(
            chains=chains,
            first_claims=claims,
            monitors=monitors,
            metrics=metrics,
            endless=endless,
            once_job=once_job,
            once_results=once_results,
            crons=crons,
            token_results=token_results,
            token_file=token_file,
        )
    finally:
        for job in jobs:
            job.kill()
        pool.shutdown(wait=True)


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
    assert job.state()["failures_total"] == 0


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
    result = job.finish(MONITOR_FINISH_S)
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
            "interrupted": "0",
            "token_expired": "0",
            "stopped": "0",
        }
    ]
    stored = sorted(storage.on_disk(job.path).iterdir())
    assert [p.name for p in stored] == sorted(t["file"] for t in transfers)
    assert all(p.stat().st_size == 1000 for p in stored)
    prom = launched.metrics[client].read_text()
    counts = {s.labels["result"]: s.value for f in text_string_to_metric_families(prom)
              for s in f.samples if s.name == "storage_test_transfers_total"
              and s.labels.get("name") == f"e2e-{client}"}
    assert counts == {"ok": MONITOR_COUNT, "failed": 0}
    assert "eyJ" not in result.stdout + result.stderr + prom


def test_monitoring_example_under_the_pilot_wrapper_stops_cleanly(
    launched: Launched, storage: Storage
) -> None:
    job = launched.endless
    stored = storage.on_disk(job.path)
    wait_for(
        lambda: stored.is_dir() and len(list(stored.iterdir())) >= 2,
        PROCESS_TIMEOUT_S,
        "two transfers of the endless monitor",
    )
    job.send_signal(signal.SIGTERM)  # the wrapper exec'd jobtoken run, which forwards it
    result = job.finish()
    assert result.returncode == 0, result.tail()
    summary = records(result.stdout, "summary")
    assert len(summary) == 1 and summary[0]["stopped"] == "1", result.tail()
    assert summary[0]["failed"] == "0" and int(summary[0]["ok"]) >= 2
    transfers = records(result.stdout, "transfer")
    assert {t["result"] for t in transfers} <= {"ok", "interrupted"}
    assert (job.tokendir / "job.json").is_file()  # the wrapper ran `jobtoken prepare`
    assert "job mytoken revoked" in (job.tokendir / "sidecar.log").read_text()
    assert not job.bearer_token_file.exists()  # jobtoken cleaned up after the payload


def test_monitoring_example_refuses_bad_settings(tmp_path: Path) -> None:
    script = str(EXAMPLES / "test-transfer.sh")
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BEARER_TOKEN_FILE": "/nonexistent"}
    cases = [
        ({}, "MONITOR_DEST"),
        ({"MONITOR_DEST": "ftp://se.example.org/x/"}, "root://"),
        ({"MONITOR_DEST": "https://se.example.org/x/", "MONITOR_CLIENT": "wget"}, "xrdcp"),
        ({"MONITOR_DEST": "https://se.example.org/x/", "MONITOR_INTERVAL": "soon"}, "INTERVAL"),
    ]
    for extra, hint in cases:
        proc = subprocess.run(
            [script], env={**base, **extra}, capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 2 and hint in proc.stderr, (extra, proc.stderr)
    no_token = {k: v for k, v in base.items() if k != "BEARER_TOKEN_FILE"}
    proc = subprocess.run(
        [script],
        env={**no_token, "MONITOR_DEST": "https://se.example.org/x/"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "jobtoken run" in proc.stderr


def test_cron_one_shot_with_ensure_renews_only_when_needed(
    launched: Launched, storage: Storage
) -> None:
    launched.crons[0].result(timeout=PROCESS_TIMEOUT_S)
    results = launched.once_results
    assert [r.returncode for r in results] == [0, 0, 0], results[-1].tail()
    transfers = [records(r.stdout, "transfer")[0] for r in results]
    assert all(t["result"] == "ok" and t["token_state"] == "valid" for t in transfers)
    # each run started with a token good for its MIN_VALID more seconds ("token valid for N s")
    valid_for = [int(r.stdout.split("token valid for ", 1)[1].split()[0]) for r in results]
    asked = [ONCE_KEEP_MIN_VALID_S, ONCE_RENEW_MIN_VALID_S, ONCE_KEEP_MIN_VALID_S]
    assert all(v >= m for v, m in zip(valid_for, asked)), valid_for
    # kept the prepared token while it was good long enough, renewed it once it was not,
    # then kept the renewed one: no sidecar, no request more than needed
    assert ["(renewed)" in r.stdout for r in results] == [False, True, False]
    jtis = [t["token_jti"] for t in transfers]
    assert jtis[0] != jtis[1] == jtis[2]
    names = sorted(p.name for p in storage.on_disk(launched.once_job.path).iterdir())
    assert names == sorted(t["file"] for t in transfers)


def test_cron_one_shot_with_jobtoken_token_and_no_token_dir(launched: Launched) -> None:
    launched.crons[1].result(timeout=PROCESS_TIMEOUT_S)
    results = launched.token_results
    assert [r.returncode for r in results] == [0, 0], results[-1].tail()
    assert stat.S_IMODE(launched.token_file.stat().st_mode) == 0o600
    assert results[0].stdout.startswith("wrote ") and results[1].stdout.startswith("kept ")
    transfers = [records(r.stdout, "transfer")[0] for r in results]
    assert [t["result"] for t in transfers] == ["ok", "ok"]
    assert all(float(t["token_left_s"]) > TOKEN_MIN_VALID_S - 1 for t in transfers)


def test_chain_output_never_contains_a_token(launched: Launched) -> None:
    outputs = []
    for job in list(launched.chains.values()) + list(launched.monitors.values()):
        result = job.finish(MONITOR_FINISH_S)
        outputs += [result.stdout, result.stderr, (job.tokendir / "sidecar.log").read_text()]
        outputs.append(json.dumps(job.state()))
    for cron in launched.crons:
        cron.result(timeout=PROCESS_TIMEOUT_S)
    for result in launched.once_results + launched.token_results:
        outputs += [result.stdout, result.stderr]
    assert not [text for text in outputs if "eyJ" in text]
