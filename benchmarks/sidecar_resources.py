"""Memory, CPU and renewal requests of one ``jobtoken run`` job, measured on real processes.

After a warm-up run that fills the bytecode cache (as installing the package does),
process model measured: ``jobtoken run -- sleep N`` is one long-lived small process
(``_waiter``, exec'd after the payload started) plus one short-lived step child per
renewal (``python -m jobtoken._runstep DIR``, started a few seconds early; the renewal
runs in it). Three runs against a loopback dev server:

1. memory: short tokens; every ``--sample-ms`` (5 ms) the USS (``memory_full_info``) of
   the run process and of any step child alive at that instant. Idle = the run
   process while no step child is alive; peak = max of run + step child.
2. idle CPU: a 1 h token, no renewal during the run; CPU of the run process per second
   (``/proc/PID/task/*/schedstat``, ns resolution; ``cpu_times()`` ticks are 10 ms) and
   its voluntary context switches (= wake-ups) per second.
3. renewals: short tokens; CPU of the run process and of its reaped children, renewals
   (``state.json``) and the server's request log, between payload start and end.

``--quick`` makes one 5 s run with 2 s tokens stand in for all three (shape only).

Extrapolation to 1 h tokens (the real rule for one job): CPU per job-hour =
idle CPU per hour + CPU per renewal x ``renewals_per_hour(3600)`` at the largest jitter
(most renewals). Renewals per job-hour: the access-token requests counted at the
server during run 3 against ``window / interval`` (``interval`` = the rule's
``next_renewal_at`` for this job's jitter and token lifetime); the ratio does not
depend on the lifetime except through the child's start-up latency, which only
lowers it (each cycle is ``interval + latency``), so it bounds the 1 h ratio from above.

Must NOT: print a token, sample so often in the CPU runs that sampling becomes the
load (CPU runs sample every 0.25 s), or write outside its temp dir and ``--json``.

Usage: ``python benchmarks/sidecar_resources.py [--quick|--long] [--json F]``
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import psutil
from _bench import (
    bench_env,
    children,
    dev_server,
    emit,
    job_mytoken,
    run_argv,
    sched_cpu_s,
    work_dir,
)

from jobtoken import _policy as policy
from jobtoken._sidecar import Sidecar
from jobtoken._tokendir import TokenDir

MIB = 1024.0 * 1024.0
GOALS = {
    "idle_uss_mib": 3.5,
    "peak_uss_mib": 40.0,
    "cpu_s_per_job_hour": 0.5,
    "renewals_over_rule": 1.05,
}
#: The run process's short-lived children: a step (``_runstep``: the renewal runs in it)
#: or, from the standalone sidecar, a renewal child.
_RENEWAL_MARKS = ("jobtoken._runstep", "jobtoken._renewal")
_WAITER_MARK = "_waiter"


@dataclass
class Sample:
    t: float
    cpu_self: float = 0.0
    cpu_children: float = 0.0
    vol_ctx: int = 0
    run_uss: int = 0
    renewal_uss: int = 0
    renewal_children: int = 0
    payload_alive: bool = False
    waiting: bool = False  # the run process has become the waiter (after its exec)
    state: Dict[str, Any] = field(default_factory=dict)


class Watcher:
    """Samples one ``jobtoken run`` process tree."""

    def __init__(self, pid: int, state_file: Path, memory: bool) -> None:
        self.proc = psutil.Process(pid)
        self.state_file = state_file
        self.memory = memory
        self._kinds: Dict[int, str] = {}
        self.samples: List[Sample] = []
        self._waiting = False

    def _kind(self, pid: int) -> str:
        if pid not in self._kinds:
            try:
                cmd = psutil.Process(pid).cmdline()
            except psutil.Error:
                return "gone"
            if any(_WAITER_MARK in part for part in cmd):
                return "starting"  # forked by the waiter, not yet exec'd: ask again
            self._kinds[pid] = "renewal" if set(_RENEWAL_MARKS) & set(cmd) else "payload"
        return self._kinds[pid]

    def _is_waiting(self) -> bool:
        """Whether the run process has ``exec``'d its waiter (set-up and first token done)."""
        if not self._waiting:
            try:
                with open(f"/proc/{self.proc.pid}/cmdline", "rb") as fh:
                    self._waiting = _WAITER_MARK.encode() in fh.read()
            except OSError:
                pass
        return self._waiting

    def sample(self) -> None:
        s = Sample(t=time.time(), waiting=self._is_waiting())
        try:
            with self.proc.oneshot():
                cpu = self.proc.cpu_times()
                sched = sched_cpu_s(self.proc.pid)
                s.cpu_self = cpu.user + cpu.system if sched is None else sched
                s.cpu_children = cpu.children_user + cpu.children_system
                s.vol_ctx = self.proc.num_ctx_switches().voluntary
                if self.memory:
                    s.run_uss = self.proc.memory_full_info().uss
        except psutil.Error:
            return
        for child in children(self.proc.pid):
            kind = self._kind(child)
            if kind == "payload":
                s.payload_alive = True
            elif kind == "renewal":
                s.renewal_children += 1
                if self.memory:
                    try:
                        s.renewal_uss += psutil.Process(child).memory_full_info().uss
                    except psutil.Error:
                        pass
        try:
            s.state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            pass
        self.samples.append(s)


@dataclass
class RunResult:
    samples: List[Sample]
    started: float
    ended: float
    rusage_children_s: float
    returncode: int
    requests: List[Tuple[float, str, int]]
    tokendir: Path


def run_job(
    *,
    lifetime_s: int,
    payload_s: float,
    sample_s: float,
    memory: bool,
    tmp: Path,
    name: str,
    timeout_s: float,
) -> RunResult:
    """One ``jobtoken run -- sleep payload_s`` against a fresh dev server, sampled."""
    with dev_server(at_lifetime_s=lifetime_s) as srv:
        env = bench_env(tmp / "pycache")
        tokendir = tmp / f"{name}-dir"
        argv = run_argv(srv, job_mytoken(srv, tmp / f"{name}-mytoken"), tokendir,
                        f"bench.{name}", ["sleep", f"{payload_s:g}"])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.time()
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        watcher = Watcher(proc.pid, tokendir / "state.json", memory)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"jobtoken run did not end within {timeout_s:.0f} s")
            watcher.sample()
            time.sleep(sample_s)
        _, err = proc.communicate()
        ended = time.time()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(
                f"jobtoken run exited {proc.returncode}: {err.decode(errors='replace')[-400:]}"
            )
        requests = [(r.time, r.endpoint, r.status) for r in srv.requests()]
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return RunResult(watcher.samples, started, ended, used, proc.returncode, requests, tokendir)


def _payload_window(samples: List[Sample]) -> Tuple[Sample, Sample]:
    # from the exec into the waiter on: before it, the set-up's interpreter is measured
    alive = [s for s in samples if s.payload_alive and s.waiting]
    if len(alive) < 2:
        raise RuntimeError("too few samples while the payload ran; raise the payload time")
    return alive[0], alive[-1]


def memory_figures(res: RunResult) -> Dict[str, Any]:
    alive = [s for s in res.samples if s.payload_alive and s.waiting and s.run_uss]
    # the run process's own USS (a step child's is not in it), whether or not a step runs:
    # with short tokens a step (started 3 s early) may always be there
    idle = [s.run_uss for s in alive]
    peak = max(alive, key=lambda s: s.run_uss + s.renewal_uss)
    renewal_only = [s.renewal_uss for s in alive if s.renewal_children]
    return {
        "samples": len(res.samples),
        "samples_during_renewal": len(renewal_only),
        "idle_uss_mib": round(max(idle) / MIB, 2),
        "idle_uss_median_mib": round(sorted(idle)[len(idle) // 2] / MIB, 2),
        "peak_uss_mib": round((peak.run_uss + peak.renewal_uss) / MIB, 2),
        "peak_renewal_child_uss_mib": round(max(renewal_only or [0]) / MIB, 2),
    }


def idle_figures(res: RunResult) -> Dict[str, Any]:
    a, b = _payload_window(res.samples)
    span = b.t - a.t
    return {
        "window_s": round(span, 2),
        "cpu_s_per_s": (b.cpu_self - a.cpu_self) / span,
        "wakeups_per_s": (b.vol_ctx - a.vol_ctx) / span,
        "renewals_in_window": int(b.state.get("renewals", 0)) - int(a.state.get("renewals", 0)),
    }


def rule_for(tokendir: Path, lifetime_s: float) -> Dict[str, float]:
    """The sidecar's own settings for this job (built by ``Sidecar`` from ``job.json``)."""
    td = TokenDir(tokendir)
    sidecar = Sidecar(td, td.read_spec())
    st = sidecar.settings
    worst = math.nextafter(st.jitter_fraction, 0.0)
    return {
        "jitter": sidecar.jitter,
        "interval_s": policy.next_renewal_at(0.0, lifetime_s, jitter=sidecar.jitter, settings=st),
        "renewals_per_hour_1h_this_job": policy.renewals_per_hour(3600.0, st, sidecar.jitter),
        "renewals_per_hour_1h_worst": policy.renewals_per_hour(3600.0, st, worst),
    }


def renewal_figures(
    res: RunResult, lifetime_s: int, idle_cpu_per_s: float, quick: bool = False
) -> Dict[str, Any]:
    a, b = _payload_window(res.samples)
    span = b.t - a.t
    attempts = (
        int(b.state.get("renewals", 0))
        + int(b.state.get("failures_total", 0))
        - int(a.state.get("renewals", 0))
        - int(a.state.get("failures_total", 0))
    )
    if attempts < 1 and not quick:
        raise RuntimeError("no renewal while the payload ran; raise the payload time")
    attempts = max(attempts, 1)  # --quick on a loaded machine: shape only
    cpu_self = b.cpu_self - a.cpu_self
    cpu_children = b.cpu_children - a.cpu_children
    per_renewal = (cpu_self + cpu_children - idle_cpu_per_s * span) / attempts
    in_window = [r for r in res.requests if a.t <= r[0] < b.t]
    at_times = sorted(r[0] for r in in_window if r[1] == "access")
    at_requests = len(at_times)
    rule = rule_for(res.tokendir, float(lifetime_s))
    expected = span / rule["interval_s"]
    # Counting requests in a window is off by up to one (a 14.3 expectation counts 14 or
    # 15: +-7 %); the mean spacing of consecutive renewals has no such quantisation.
    if at_requests >= 2:
        observed_interval = (at_times[-1] - at_times[0]) / (at_requests - 1)
        over_rule = rule["interval_s"] / observed_interval
    else:
        over_rule = at_requests / expected if expected else 0.0
    statuses = sorted({r[2] for r in res.requests})
    return {
        "token_lifetime_s": lifetime_s,
        "window_s": round(span, 2),
        "renewal_children_reaped": attempts,
        "cpu_self_s": round(cpu_self, 4),
        "cpu_children_s": round(cpu_children, 4),
        "cpu_per_renewal_s": round(per_renewal, 4),
        "at_requests": at_requests,
        "all_requests": len(in_window),
        "requests_per_renewal": round(len(in_window) / at_requests, 3) if at_requests else 0.0,
        "rule_min_renewals": round(expected, 3),
        "renewals_over_rule": round(over_rule, 3),
        "http_statuses": statuses,
        "rule": {k: round(v, 4) for k, v in rule.items()},
        "run_total_cpu_s": round(res.rusage_children_s, 3),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="seconds-long runs (smoke test)")
    size.add_argument("--long", action="store_true", help="5-10 minute runs")
    parser.add_argument("--sample-ms", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    if args.quick:
        mem_s, idle_s, renew_s, short_l = 5.0, 0.0, 0.0, 2
    elif args.long:
        mem_s, idle_s, renew_s, short_l = 60.0, 600.0, 300.0, 10
    else:
        mem_s, idle_s, renew_s, short_l = 25.0, 60.0, 90.0, 10
    with work_dir("jobtoken-bench-sidecar-") as tmp:
        # warm-up: fills the bytecode cache (compiling from source costs memory for good)
        run_job(
            lifetime_s=short_l,
            payload_s=0.0,
            sample_s=0.05,
            memory=False,
            tmp=tmp,
            name="warmup",
            timeout_s=60,
        )
        mem = run_job(
            lifetime_s=short_l,
            payload_s=mem_s,
            sample_s=args.sample_ms / 1000.0,
            memory=True,
            tmp=tmp,
            name="memory",
            timeout_s=mem_s + 60,
        )
        if args.quick:  # one run stands in for all three: shape only, no figures
            idle = renew = mem
        else:
            idle = run_job(
                lifetime_s=3600,
                payload_s=idle_s,
                sample_s=0.25,
                memory=False,
                tmp=tmp,
                name="idle",
                timeout_s=idle_s + 60,
            )
            renew = run_job(
                lifetime_s=short_l,
                payload_s=renew_s,
                sample_s=0.25,
                memory=False,
                tmp=tmp,
                name="renew",
                timeout_s=renew_s + 60,
            )
        memory = memory_figures(mem)
        idle_f = idle_figures(idle)
        renew_f = renewal_figures(renew, short_l, idle_f["cpu_s_per_s"], args.quick)
    per_hour_idle = idle_f["cpu_s_per_s"] * 3600.0
    rph = renew_f["rule"]["renewals_per_hour_1h_worst"]
    cpu_job_hour = per_hour_idle + renew_f["cpu_per_renewal_s"] * rph
    result: Dict[str, Any] = {
        "generated_by": "benchmarks/sidecar_resources.py" + (" --quick" if args.quick else ""),
        "memory": memory,
        "idle": {
            "window_s": idle_f["window_s"],
            "cpu_s_per_hour": round(per_hour_idle, 4),
            "wakeups_per_hour": round(idle_f["wakeups_per_s"] * 3600.0, 1),
            "cpu_ms_per_wakeup": round(1000 * idle_f["cpu_s_per_s"] / idle_f["wakeups_per_s"], 3)
            if idle_f["wakeups_per_s"]
            else None,
            "renewals_in_window": idle_f["renewals_in_window"],
        },
        "renewal": renew_f,
        "per_job_hour_1h_tokens": {
            "renewals_per_hour_worst_jitter": round(rph, 4),
            "cpu_s": round(cpu_job_hour, 4),
            "cpu_s_idle_part": round(per_hour_idle, 4),
            "cpu_s_renewal_part": round(renew_f["cpu_per_renewal_s"] * rph, 4),
            "how": "idle CPU/s x 3600 + CPU per renewal x renewals_per_hour(3600, worst jitter)",
        },
        "goals": GOALS,
    }
    emit(args.json, result)
    print(
        f"sidecar: idle USS {memory['idle_uss_mib']} MiB, peak {memory['peak_uss_mib']} MiB; "
        f"CPU/job-hour {cpu_job_hour:.3f} s (idle {per_hour_idle:.3f}, "
        f"{result['idle']['wakeups_per_hour']:.0f} wake-ups/h); renewals/rule "
        f"{renew_f['renewals_over_rule']}; requests/renewal {renew_f['requests_per_renewal']}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
