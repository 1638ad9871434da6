"""The node broker against ``jobtoken run`` per job and a bash+curl loop, in one run.

Three ways to keep N jobs' tokens fresh, each against its own loopback dev server issuing
short tokens (``--lifetime``, 20 s), so that many renewals happen in a short window:

1. **broker**: one ``jobtoken broker serve`` (identity ``registered``); each job is an
   anchor process (``sh``) that the benchmark registers, that runs ``jobtoken broker
   prepare --dir`` and then ``exec``s ``sleep`` (same pid: the anchor lives on). Jobs are
   added up to each count of ``--jobs`` (1, 16, 64); at each count, after one token
   lifetime (every job renewed), the broker's USS is sampled (``smaps_rollup``, largest
   of 3 s). Per-job USS = (USS at N - USS with no job) / N, and with the base shared:
   USS at N / N. At the largest
   count the broker's CPU (``/proc/PID/task/*/schedstat``) over ``--window`` seconds is
   divided by the renewals the jobs' ``state.json`` counted meanwhile (reconciles and
   idle wake-ups included: the whole cost). Start-up: broker start to its first ``ping``
   answer; register + prepare to the job's token file (median over the jobs).
   Then ``jobtoken run --broker`` (a pilot's payload in ``jobtoken-wrap``'s default mode) on
   the same broker: the USS of its waiting process.
2. **run**: ``--run-jobs`` ``jobtoken run -- sleep`` jobs side by side: USS of each
   waiting process (the ``_waiter``), CPU of the process and the step children it reaped
   (``/proc/PID/stat`` utime+stime+cutime+cstime) over the same window per renewal, and
   launch to the payload's start.
3. **bash+curl**: the least a job can do: ``while :; do curl ... > bt.tmp; mv; sleep; done``
   renewing every ``lifetime / 2`` with the mytoken read from a 0600 file (``--data
   @file``, never argv). USS = bash + its ``sleep`` child; CPU as for ``run``; renewals =
   access-token requests at its server.

``--quick``: jobs 1 and 2, 10 s tokens, short windows (a smoke test; figures meaningless).

Must NOT: print a token or mytoken, or write outside its temp dir and ``--json``. Needs
permission to make a 0755 directory for the broker's socket (root in CI; any uid works
here, since the jobs run as the benchmark's own uid, the broker's: a pilot's set-up).

Usage: ``python benchmarks/broker.py [--quick] [--json F] [--jobs 1,16,64] [--run-jobs K]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from _bench import (
    AUDIENCE,
    ROOT,
    bench_env,
    children,
    dev_server,
    emit,
    job_mytoken,
    jobtoken_command,
    run_argv,
    sched_cpu_s,
    tree_cpu_s,
    uss_bytes,
    write_private,
)

sys.path.insert(0, str(ROOT))  # the checkout: the broker site config the tests write too
from tests.siteconfig import broker_site_config  # noqa: E402

MIB = 1024.0 * 1024.0
GOALS = {"broker_uss_per_job_mib_at_64": 0.45, "broker_cpu_ms_per_renewal": 20.0}
SCOPE = "storage.create:/vo"
PARENT_CAPS = ("AT", "create_mytoken", "tokeninfo")


def _wait(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.05)


def _max_uss(pids: Sequence[int], seconds: float) -> List[int]:
    """The largest USS of each pid over ``seconds`` (sampled every 0.1 s)."""
    best = [0] * len(pids)
    deadline = time.monotonic() + seconds
    while True:
        for i, pid in enumerate(pids):
            try:
                best[i] = max(best[i], uss_bytes(pid))
            except OSError:
                pass
        if time.monotonic() >= deadline:
            return best
        time.sleep(0.1)


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _renewals(state_files: Sequence[Path]) -> int:
    total = 0
    for path in state_files:
        try:
            total += int(json.loads(path.read_text()).get("renewals", 0))
        except (OSError, ValueError):
            pass
    return total


def _med(values: Sequence[float]) -> Optional[float]:
    return round(statistics.median(values), 3) if values else None


# --- 1. the broker ------------------------------------------------------------------------


class BrokerSite:
    """A dev server's parent mytoken, a config, a broker process, and its jobs."""

    def __init__(self, srv: Any, base: Path, env: Dict[str, str], lifetime_s: int) -> None:
        self.srv, self.base, self.env = srv, base, env
        self.socket = str(base / "run" / "broker.sock")
        self.state_dir = base / "state"
        parent = write_private(base / "parent.mt", srv.issue_mytoken(
            capabilities=list(PARENT_CAPS)))
        self.config = base / "jobtoken.toml"
        self.config.write_text(broker_site_config(
            url=srv.url, parent=parent, scope=SCOPE, audience=AUDIENCE, lifetime_s=lifetime_s,
            margin_s=max(2, lifetime_s // 5), socket=self.socket, state_dir=self.state_dir,
            timeout_s=10))
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.anchors: List[subprocess.Popen[bytes]] = []
        self.first_token_s: List[float] = []

    def start(self) -> float:
        """Start the broker; seconds until it answers a ping."""
        from jobtoken._brokerclient import BrokerClient
        from jobtoken._errors import JobtokenError

        self.client = BrokerClient(self.socket, timeout_s=120.0)
        started = time.monotonic()
        self.proc = subprocess.Popen(
            jobtoken_command() + ["broker", "serve", "--config", str(self.config)],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.base / "broker.log", "ab"))

        def pong() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the broker exited {self.proc.returncode}: "
                                   f"{(self.base / 'broker.log').read_text()[-800:]}")
            try:
                self.client.ping()
            except JobtokenError:
                return False
            return True

        _wait(pong, 120, "the broker answers a ping")
        return time.monotonic() - started

    def add_jobs(self, count: int, batch: int = 8) -> None:
        """Register and prepare ``count`` more jobs, ``batch`` at a time."""
        while count > 0:
            n = min(batch, count)
            count -= n
            pending = []
            for _ in range(n):
                i = len(self.anchors)
                tokens = self.base / "jobs" / str(i) / "tokens"
                tokens.mkdir(parents=True, mode=0o700)
                out = self.base / "jobs" / str(i) / "prepare.out"
                anchor = subprocess.Popen(
                    ["sh", "-c", 'read go; "$@" >"$OUT" 2>&1; exec sleep 100000', "anchor",
                     *jobtoken_command(), "broker", "prepare", "--dir", str(tokens),
                     "--scope", SCOPE, "--socket", self.socket, "--json"],
                    env=dict(self.env, OUT=str(out)), stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.anchors.append(anchor)
                started = time.monotonic()
                self.client.register(dict(job_id=f"bench.{i}", uid=os.getuid(),
                                          anchor_pid=anchor.pid, walltime_s=86400))
                assert anchor.stdin is not None
                anchor.stdin.write(b"go\n")
                anchor.stdin.close()
                pending.append((tokens / "bt", out, started))
            for bt, out, started in pending:
                _wait(lambda bt=bt, out=out: bt.exists() or _failed(out), 300,
                      f"a token in {bt}")
                if not bt.exists():
                    raise RuntimeError(f"prepare failed: {out.read_text()[-400:]}")
                self.first_token_s.append(time.monotonic() - started)

    def state_files(self) -> List[Path]:
        return sorted((self.state_dir / "jobs").glob("*/state.json"))

    def stop(self) -> None:
        _stop(self.anchors)  # the broker notices each anchor's end and revokes
        if self.proc is not None:
            _stop([self.proc])


def _failed(out: Path) -> bool:
    try:
        return '"ok": false' in out.read_text() or "error" in out.read_text()
    except OSError:
        return False


def measure_broker(env: Dict[str, str], tmp: Path, counts: Sequence[int], lifetime_s: int,
                   window_s: float, sample_s: float) -> Dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="jtbench-broker-", dir="/tmp"))
    base.chmod(0o755)  # the socket's directory: 0755 (authorization is by peer credentials)
    try:
        with dev_server(at_lifetime_s=lifetime_s) as srv:
            site = BrokerSite(srv, base, env, lifetime_s)
            try:
                start_s = site.start()
                assert site.proc is not None
                pid = site.proc.pid
                base_uss = _max_uss([pid], sample_s)[0]
                per_count = []
                for n in counts:
                    site.add_jobs(n - len(site.anchors))
                    time.sleep(lifetime_s)  # every job renewed at least once
                    uss = _max_uss([pid], sample_s)[0]
                    per_count.append({
                        "jobs": n,
                        "uss_mib": round(uss / MIB, 3),
                        "uss_per_job_mib": round((uss - base_uss) / MIB / n, 4),
                        "uss_with_base_per_job_mib": round(uss / MIB / n, 4),
                    })
                files = site.state_files()
                cpu0, ren0, t0 = sched_cpu_s(pid) or 0.0, _renewals(files), time.monotonic()
                time.sleep(window_s)
                cpu1, ren1, t1 = sched_cpu_s(pid) or 0.0, _renewals(files), time.monotonic()
                statuses = sorted({r.status for r in srv.requests()})
                pilot_run = measure_pilot_run(site, sample_s)
            finally:
                site.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    renewals = ren1 - ren0
    return {
        "start_to_ping_s": round(start_s, 3),
        "register_prepare_to_token_s": _med(site.first_token_s),
        "base_uss_mib": round(base_uss / MIB, 3),
        "by_jobs": per_count,
        "window_s": round(t1 - t0, 1),
        "renewals_in_window": renewals,
        "cpu_s_in_window": round(cpu1 - cpu0, 4),
        "cpu_ms_per_renewal": round(1000 * (cpu1 - cpu0) / renewals, 2) if renewals else None,
        "http_statuses": statuses,
        "pilot_run_waiter_uss_mib": pilot_run,
    }


def measure_pilot_run(site: BrokerSite, sample_s: float, jobs: int = 2) -> float:
    """USS of ``jobtoken run --broker`` once its payload runs: what a pilot's payload
    costs on top of its share of the broker in ``jobtoken-wrap``'s default mode (the
    ``exec`` mode keeps no process of its own)."""
    work = site.base / "work"
    work.mkdir(mode=0o700, exist_ok=True)
    procs = []
    try:
        for i in range(jobs):
            ready = work / f"pilot{i}.ready"
            procs.append(subprocess.Popen(
                jobtoken_command() + ["run", "--broker", site.socket, "--job-id",
                                      f"bench.pilot{i}", "--", "sh", "-c",
                                      f'touch "{ready}"; exec sleep 100000'],
                env=dict(site.env, JOBTOKEN_WORK_DIR=str(work)), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait(ready.exists, 120, "jobtoken run --broker started its payload")
        time.sleep(1.0)  # the exec into the waiter follows the payload's start
        return round(max(_max_uss([p.pid for p in procs], sample_s)) / MIB, 3)
    finally:
        _stop(procs)  # TERM reaches the payload; each run releases its job


# --- 2. jobtoken run per job --------------------------------------------------------------


def measure_run(env: Dict[str, str], tmp: Path, jobs: int, lifetime_s: int, window_s: float,
                sample_s: float) -> Dict[str, Any]:
    with dev_server(at_lifetime_s=lifetime_s) as srv:
        procs, dirs, startup = [], [], []
        try:
            for i in range(jobs):
                d = tmp / f"run{i}"
                ready = tmp / f"run{i}.ready"
                started = time.monotonic()
                procs.append(subprocess.Popen(
                    run_argv(srv, job_mytoken(srv, tmp / f"run{i}.mt", SCOPE), d,
                             f"bench.run{i}", ["sh", "-c", f'touch "{ready}"; exec sleep 100000'],
                             SCOPE),
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
                dirs.append(d)
                _wait(ready.exists, 120, "jobtoken run started its payload")
                startup.append(time.monotonic() - started)
            pids = [p.pid for p in procs]
            time.sleep(1.0)  # the exec into the waiter follows the payload's start
            uss = _max_uss(pids, sample_s)
            files = [d / "state.json" for d in dirs]
            cpu0, ren0, t0 = sum(tree_cpu_s(p) for p in pids), _renewals(files), time.monotonic()
            time.sleep(window_s)
            # a step still running has not been reaped: its CPU would be missed
            _wait(lambda: all(len(children(p)) <= 1 for p in pids), 60, "steps done")
            cpu1, ren1, t1 = sum(tree_cpu_s(p) for p in pids), _renewals(files), time.monotonic()
        finally:
            _stop(procs)
    renewals = ren1 - ren0
    return {
        "jobs": jobs,
        "launch_to_payload_s": _med(startup),
        "uss_per_job_mib": round(max(uss) / MIB, 3),
        "window_s": round(t1 - t0, 1),
        "renewals_in_window": renewals,
        "cpu_ms_per_renewal": round(1000 * (cpu1 - cpu0) / renewals, 2) if renewals else None,
    }


# --- 3. a bash+curl loop --------------------------------------------------------------------

_LOOP = r"""
umask 077
while :; do
    reply=$(curl -s -X POST -H 'Content-Type: application/json' --data "@$REQ" "$URL") || reply=
    token=${reply#*\"access_token\":\"}
    token=${token%%\"*}
    if [ -n "$reply" ] && [ "$token" != "$reply" ]; then
        printf '%s' "$token" >"$DIR/bt.tmp" && mv -f "$DIR/bt.tmp" "$DIR/bt"
    fi
    sleep "$EVERY"
done
"""


def measure_shell(env: Dict[str, str], tmp: Path, jobs: int, lifetime_s: int, window_s: float,
                  sample_s: float) -> Dict[str, Any]:
    with dev_server(at_lifetime_s=lifetime_s) as srv:
        procs, startup = [], []
        try:
            for i in range(jobs):
                d = tmp / f"sh{i}"
                d.mkdir(mode=0o700)
                mytoken = job_mytoken(srv, tmp / f"sh{i}.mt", SCOPE).read_text()
                request = write_private(tmp / f"sh{i}.req", json.dumps({
                    "grant_type": "mytoken", "mytoken": mytoken, "scope": SCOPE,
                    "audience": AUDIENCE}))
                started = time.monotonic()
                procs.append(subprocess.Popen(
                    ["bash", "-c", _LOOP], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, env=dict(
                        PATH=env.get("PATH", "/usr/bin:/bin"), REQ=str(request), DIR=str(d),
                        URL=f"{srv.url}/api/v0/token/access", EVERY=str(lifetime_s / 2))))
                _wait((d / "bt").exists, 60, "the shell loop's first token")
                startup.append(time.monotonic() - started)
            pids = [p.pid for p in procs]
            time.sleep(1.0)
            # the loop is bash plus its sleep child between renewals
            uss = _max_uss(pids, sample_s)
            sleeps = [c for p in pids for c in children(p)]
            sleep_uss = _max_uss(sleeps, 0.0) if sleeps else [0]
            cpu0, t0 = sum(tree_cpu_s(p) for p in pids), time.monotonic()
            n0 = len(srv.requests("access"))
            time.sleep(window_s)
            cpu1, t1 = sum(tree_cpu_s(p) for p in pids), time.monotonic()
            renewals = len(srv.requests("access")) - n0
        finally:
            _stop(procs)
    return {
        "jobs": jobs,
        "launch_to_token_s": _med(startup),
        "uss_per_job_mib": round((max(uss) + max(sleep_uss)) / MIB, 3),
        "bash_uss_mib": round(max(uss) / MIB, 3),
        "window_s": round(t1 - t0, 1),
        "renewals_in_window": renewals,
        # CPU of the curls and sleeps reaped by bash shows once they have been waited for
        "cpu_ms_per_renewal": round(1000 * (cpu1 - cpu0) / renewals, 2) if renewals else None,
    }


# --- all three ------------------------------------------------------------------------------


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 2) if a is not None and b else None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    parser.add_argument("--jobs", default=None, help="job counts on one broker (1,16,64)")
    parser.add_argument("--run-jobs", type=int, default=None,
                        help="jobtoken run jobs and shell loops side by side (4)")
    parser.add_argument("--lifetime", type=int, default=None, help="token lifetime (20 s)")
    parser.add_argument("--window", type=float, default=None, help="CPU window (60 s)")
    parser.add_argument("--json", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    counts = [int(x) for x in (args.jobs or ("1,2" if args.quick else "1,16,64")).split(",")]
    run_jobs = args.run_jobs or (1 if args.quick else 4)
    lifetime = args.lifetime or (10 if args.quick else 20)
    window = args.window or (6.0 if args.quick else 60.0)
    sample = 0.5 if args.quick else 3.0
    with tempfile.TemporaryDirectory(prefix="jobtoken-bench-broker-") as name:
        tmp = Path(name)
        env = bench_env(tmp / "pycache")
        broker = measure_broker(env, tmp, counts, lifetime, window, sample)
        run = measure_run(env, tmp, run_jobs, lifetime, window, sample)
        shell = measure_shell(env, tmp, run_jobs, lifetime, window, sample)
    at_max = broker["by_jobs"][-1]
    result: Dict[str, Any] = {
        "generated_by": "benchmarks/broker.py" + (" --quick" if args.quick else ""),
        "token_lifetime_s": lifetime,
        "broker": broker,
        "run": run,
        "shell_loop": shell,
        "per_job_uss_mib": {
            f"broker_at_{at_max['jobs']}": at_max["uss_per_job_mib"],
            "run": run["uss_per_job_mib"],
            "shell_loop": shell["uss_per_job_mib"],
            "broker_over_shell": _ratio(at_max["uss_per_job_mib"], shell["uss_per_job_mib"]),
            "run_over_shell": _ratio(run["uss_per_job_mib"], shell["uss_per_job_mib"]),
        },
        "cpu_ms_per_renewal": {
            "broker": broker["cpu_ms_per_renewal"],
            "run": run["cpu_ms_per_renewal"],
            "shell_loop": shell["cpu_ms_per_renewal"],
        },
        "goals": GOALS,
    }
    emit(args.json, result)
    print(
        f"broker: {at_max['uss_per_job_mib']} MiB/job at {at_max['jobs']} jobs (base "
        f"{broker['base_uss_mib']} MiB; {at_max['uss_with_base_per_job_mib']} with it), "
        f"{broker['cpu_ms_per_renewal']} ms CPU/renewal, start {broker['start_to_ping_s']} s, "
        f"first token {broker['register_prepare_to_token_s']} s, run --broker waiter "
        f"{broker['pilot_run_waiter_uss_mib']} MiB; run: "
        f"{run['uss_per_job_mib']} MiB/job, {run['cpu_ms_per_renewal']} ms/renewal; bash+curl: "
        f"{shell['uss_per_job_mib']} MiB/job, {shell['cpu_ms_per_renewal']} ms/renewal",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
