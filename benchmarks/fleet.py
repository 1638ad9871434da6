"""Fleet-scale renewal simulation: the real renewal policy driven by a simulated clock.

Thousands of ``jobtoken run`` sidecars renewing 1 h access tokens at one Mytoken server,
with an outage and the server's per-IP rate limit, simulated as discrete events on a heap
(no threads, no sleeping, about 10 s for 10,000 jobs x 24 h in pure Python).

What is real and what is modelled:

* Every decision comes from ``jobtoken._policy`` with the settings and per-job jitter
  that ``jobtoken._sidecar.Sidecar`` builds from a job spec (one Sidecar is constructed
  to read them); the sidecar's own glue (``max(at, now + min_backoff_s)`` after a
  success, backoff on transient failures, the token's margin) is mirrored line by line.
* One renewal is one short-lived child process that sends ``requests_per_renewal``
  HTTP requests: 1 (``POST /api/v0/token/access``; the discovery document is kept in the
  job's token directory, so a child refetches it only every 6 h, which is left out).
  The child's start-up latency (``child_latency_s``) passes between the wake-up and the
  requests; the server issues a token with ``iat = now``, ``exp = now + lifetime``.
* The outage: every request in ``[outage_at_s, outage_at_s + outage_s)`` fails as
  "connection refused" (transient, no Retry-After, never reaches the rate limiter).
* The rate limit is Mytoken's default fiber v2 limiter: ``Max=100``, ``Expiration=300 s``,
  no ``LimiterMiddleware`` set, i.e. fiber's FixedWindow: per client IP, the window opens
  at the first hit (second resolution), every hit counts (rejected ones too), a rejected
  hit gets 429 with ``Retry-After`` = seconds left in the window. All jobs of a site share
  one NAT IP.
* A job whose first token is refused does not start (``jobtoken run`` exits 75).

Must NOT: sleep, read the wall clock as simulated time, touch the network or the disk
(except writing its own outputs), or re-implement the renewal rule.

Usage: ``python benchmarks/fleet.py [--quick|--long] [--json F] [--png F]``
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import random
import sys
import time
from array import array
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from jobtoken import _policy as policy
from jobtoken._sidecar import Sidecar
from jobtoken._tokendir import JobRecord, TokenDir

ROOT = Path(__file__).resolve().parent.parent

#: Mytoken's default limiter (config ``server.limiter``): 100 requests per 300 s per IP.
DEFAULT_RATE_LIMIT = (100, 300)


@dataclass(frozen=True)
class FleetConfig:
    """One simulated scenario. Times are seconds from the simulation start."""

    jobs: int = 10_000
    start_spread_s: float = 60.0
    duration_s: float = 24 * 3600.0
    at_lifetime_s: float = 3600.0
    outage_at_s: Optional[float] = 3 * 3600.0
    outage_s: float = 600.0
    rate_limit: Optional[Tuple[int, int]] = DEFAULT_RATE_LIMIT
    jobs_per_ip: int = 50
    requests_per_renewal: int = 1
    child_latency_s: float = 0.5
    steady_start: bool = False  # phases spread over one renewal interval, no start burst
    seed: int = 5
    max_backoff_s: float = 300.0  # config ``renewal.max_backoff_s`` (a JobRecord field)
    jitter_fraction: Optional[float] = None  # what-if only: not configurable today


@dataclass(frozen=True)
class FleetResult:
    """Counts and per-second request series of one run (series not in ``summary``)."""

    config: FleetConfig
    requests: array  # all HTTP requests sent, per second
    ok: array  # answered 2xx, per second
    rejected: array  # 429 from the limiter, per second
    refused: array  # connection refused (outage), per second
    renewals: int
    failures: int
    not_started: int
    expired_jobs: int
    expired_job_s: float
    max_expired_s: float
    rule_renewals_per_job_hour: float
    renewals_per_job_hour: float
    wall_s: float


def sidecar_rule(
    job_id: str, *, max_backoff_s: float = 300.0, jitter_fraction: Optional[float] = None
) -> Tuple[policy.RenewalSettings, float]:
    """The settings and jitter a production sidecar uses for ``job_id``.

    Built by the real ``Sidecar`` constructor from a ``JobRecord`` with default values
    (except ``max_backoff_s``), so the simulation follows whatever the sidecar derives
    from a job spec. ``jitter_fraction`` is a what-if knob (the sidecar uses the
    ``RenewalSettings`` default); the jitter is then re-derived the sidecar's way.
    """
    spec = JobRecord(
        job_id=job_id,
        server_url="https://mytoken.example.org",
        mytoken_path="/-",
        max_backoff_s=max_backoff_s,
    )
    sidecar = Sidecar(TokenDir(Path("/nonexistent/jobtoken-fleet")), spec)
    if jitter_fraction is None:
        return sidecar.settings, sidecar.jitter
    settings = replace(sidecar.settings, jitter_fraction=jitter_fraction)
    return settings, policy.job_jitter(job_id, jitter_fraction)


def job_ids(n: int) -> List[str]:
    """HTCondor-style global job ids: one schedd, one cluster, ``n`` procs."""
    return [f"schedd.example.org#4711.{i}#1767225600" for i in range(n)]


class FixedWindowLimiter:
    """fiber v2 ``limiter.FixedWindow`` per key, with fiber's one-second timestamps."""

    def __init__(self, max_requests: int, window_s: int) -> None:
        self.max_requests = max_requests
        self.window_s = window_s
        self._entries: Dict[int, List[int]] = {}  # key -> [window end, hits]

    def hit(self, key: int, now: float) -> Optional[int]:
        """Count one request; None if allowed, else the Retry-After in seconds."""
        ts = int(now)
        entry = self._entries.get(key)
        if entry is None or ts >= entry[0]:
            entry = [ts + self.window_s, 0]
            self._entries[key] = entry
        entry[1] += 1
        if entry[1] > self.max_requests:
            return entry[0] - ts
        return None


def simulate(cfg: FleetConfig) -> FleetResult:
    """Run one scenario to its end; see the module docstring for the model."""
    started = time.perf_counter()
    ids = job_ids(cfg.jobs)
    settings, jitter0 = sidecar_rule(
        ids[0], max_backoff_s=cfg.max_backoff_s, jitter_fraction=cfg.jitter_fraction
    )
    jitters = [policy.job_jitter(job_id, settings.jitter_fraction) for job_id in ids]
    assert jitters[0] == jitter0, "sidecar jitter differs from job_jitter"
    lifetime = cfg.at_lifetime_s
    margin = policy.margin_for(lifetime, settings)
    rnd = random.Random(cfg.seed)
    limiter = FixedWindowLimiter(*cfg.rate_limit) if cfg.rate_limit else None
    outage_end = (cfg.outage_at_s + cfg.outage_s) if cfg.outage_at_s is not None else None

    bins = int(math.ceil(cfg.duration_s)) + 1
    requests = array("l", bytes(8 * bins))
    ok = array("l", bytes(8 * bins))
    rejected = array("l", bytes(8 * bins))
    refused = array("l", bytes(8 * bins))

    expires: List[Optional[float]] = [None] * cfg.jobs
    failing = [0] * cfg.jobs
    ever_expired = [False] * cfg.jobs
    expired_s = [0.0] * cfg.jobs
    heap: List[Tuple[float, int]] = []
    for j in range(cfg.jobs):
        if cfg.steady_start:
            # a token obtained at a uniformly random point of this job's renewal cycle
            interval = policy.next_renewal_at(0.0, lifetime, jitter=jitters[j], settings=settings)
            iat = -rnd.uniform(0.0, interval)
            expires[j] = iat + lifetime
            at = policy.next_renewal_at(iat, iat + lifetime, jitter=jitters[j], settings=settings)
            heap.append((at, j))
        else:
            heap.append((rnd.uniform(0.0, cfg.start_spread_s), j))
    heapq.heapify(heap)

    renewals = failures = not_started = 0
    per_attempt = cfg.requests_per_renewal
    while heap:
        wake, j = heapq.heappop(heap)
        now = wake + cfg.child_latency_s  # the child's imports, then its requests
        if now >= cfg.duration_s:
            continue
        second = int(now)
        retry_after: Optional[float] = None
        success = False
        if outage_end is not None and cfg.outage_at_s <= now < outage_end:
            requests[second] += 1  # the first connection is refused; the child gives up
            refused[second] += 1
        else:
            success = True
            for _ in range(per_attempt):
                requests[second] += 1
                wait = limiter.hit(j // cfg.jobs_per_ip, now) if limiter is not None else None
                if wait is not None:
                    rejected[second] += 1
                    retry_after = float(wait)
                    success = False
                    break
                ok[second] += 1
        exp = expires[j]
        if success:
            if exp is not None:
                renewals += 1
                if now > exp:
                    ever_expired[j] = True
                    expired_s[j] += now - exp
            failing[j] = 0
            expires[j] = now + lifetime
            # Sidecar._plan_renewal
            at = policy.next_renewal_at(
                now, now + lifetime, jitter=jitters[j], settings=settings, obtained_at=now
            )
            heapq.heappush(heap, (max(at, now + settings.min_backoff_s), j))
            continue
        failures += 1
        if exp is None:
            not_started += 1  # first token refused: ``jobtoken run`` exits before the payload
            continue
        failing[j] += 1
        # Sidecar._failure (transient)
        at = policy.next_attempt_at(
            now,
            attempt=failing[j],
            retry_after_s=retry_after,
            expires_at=exp,
            settings=settings,
            rnd=rnd,
            margin_s=margin,
        )
        heapq.heappush(heap, (at, j))

    for j in range(cfg.jobs):  # tokens still expired at the end of the run
        exp = expires[j]
        if exp is not None and exp < cfg.duration_s:
            ever_expired[j] = True
            expired_s[j] += cfg.duration_s - exp
    rule = sum(policy.renewals_per_hour(lifetime, settings, jt) for jt in jitters) / cfg.jobs
    job_hours = (cfg.jobs - not_started) * cfg.duration_s / 3600.0
    return FleetResult(
        config=cfg,
        requests=requests,
        ok=ok,
        rejected=rejected,
        refused=refused,
        renewals=renewals,
        failures=failures,
        not_started=not_started,
        expired_jobs=sum(ever_expired),
        expired_job_s=sum(expired_s),
        max_expired_s=max(expired_s) if expired_s else 0.0,
        rule_renewals_per_job_hour=rule,
        renewals_per_job_hour=renewals / job_hours if job_hours else 0.0,
        wall_s=time.perf_counter() - started,
    )


# --- figures -------------------------------------------------------------------------------


def binned(
    series: array, width_s: int, start_s: int = 0, end_s: Optional[int] = None
) -> List[float]:
    """Mean rate (per second) in consecutive bins of ``width_s`` seconds."""
    end = len(series) - 1 if end_s is None else min(end_s, len(series) - 1)
    out = []
    for lo in range(start_s, end, width_s):
        hi = min(lo + width_s, end)
        out.append(sum(series[lo:hi]) / float(hi - lo))
    return out


def recovery_figures(res: FleetResult, after_s: float, bin_s: int = 300) -> Dict[str, Any]:
    """Peak/mean request rate after the outage.

    mean: all requests over ``[lifetime, end)`` (after the start burst) per second.
    peak: the busiest ``bin_s`` bin (300 s = the limiter window) within one token lifetime
    after ``after_s`` (the end of the outage). The same figure for a twin run without
    outage (same window) shows the fleet's own unevenness; see ``main``.
    """
    cfg = res.config
    life = int(cfg.at_lifetime_s)
    end = int(cfg.duration_s)
    mean = sum(res.requests[life:end]) / float(end - life)
    lo = int(after_s)
    hi = min(lo + life, end)
    peaks = binned(res.requests, bin_s, lo, hi)
    peak = max(peaks) if peaks else 0.0
    peak_1m = max(binned(res.requests, 60, lo, hi) or [0.0])
    return {
        "window": f"[{lo}, {hi}) s",
        "bin_s": bin_s,
        "mean_rps": round(mean, 3),
        "peak_rps": round(peak, 3),
        "peak_over_mean": round(peak / mean, 3) if mean else None,
        "peak_1min_rps": round(peak_1m, 3),
        "peak_1min_over_mean": round(peak_1m / mean, 3) if mean else None,
    }


def site_fits(jobs: int, requests_per_renewal: int, *, duration_s: float, seed: int) -> bool:
    """Whether one NAT IP with ``jobs`` jobs in steady state never meets a 429."""
    cfg = FleetConfig(
        jobs=jobs,
        duration_s=duration_s,
        outage_at_s=None,
        jobs_per_ip=jobs,
        requests_per_renewal=requests_per_renewal,
        steady_start=True,
        seed=seed,
    )
    res = simulate(cfg)
    return sum(res.rejected) == 0 and res.expired_jobs == 0


def largest_site(requests_per_renewal: int, *, duration_s: float, seed: int) -> Dict[str, Any]:
    """Bisection over jobs per NAT IP: the largest steady-state site without a 429."""
    settings, _ = sidecar_rule("x")
    worst_rate = policy.renewals_per_hour(
        3600.0, settings, math.nextafter(settings.jitter_fraction, 0.0)
    )
    max_req, window = DEFAULT_RATE_LIMIT
    analytic = max_req / (requests_per_renewal * worst_rate * window / 3600.0)
    lo, hi = 1, int(analytic * 2) + 2
    while not site_fits(hi, requests_per_renewal, duration_s=duration_s, seed=seed):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if site_fits(mid, requests_per_renewal, duration_s=duration_s, seed=seed):
            lo = mid
        else:
            hi = mid
    return {
        "requests_per_renewal": requests_per_renewal,
        "largest_site_jobs": lo,
        "analytic_bound_jobs": round(analytic, 1),
        "start_burst_jobs": max_req // requests_per_renewal,
    }


def plot(res: FleetResult, path: Path) -> None:
    """Requests per second over the day, and a zoom on the outage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res.config
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5))
    minute = binned(res.requests, 60)
    hours = [i / 60.0 for i in range(len(minute))]
    top.plot(hours, minute, lw=0.8, color="tab:blue", label="requests/s (1-min mean)")
    top.plot(hours, binned(res.rejected, 60), lw=0.8, color="tab:red", label="429 answers/s")
    life = int(cfg.at_lifetime_s)
    mean = sum(res.requests[life:]) / max(1, len(res.requests) - life)
    top.axhline(mean, ls="--", lw=0.8, color="gray", label=f"mean {mean:.2f}/s")
    if cfg.outage_at_s is not None:
        for ax in (top, bottom):
            lo = cfg.outage_at_s / (3600.0 if ax is top else 60.0)
            hi = (cfg.outage_at_s + cfg.outage_s) / (3600.0 if ax is top else 60.0)
            ax.axvspan(lo, hi, color="orange", alpha=0.3, label="outage" if ax is top else None)
    burst = max(minute[:5] or [0.0])
    ceiling = max(max(minute[5:] or [0.0]), 3 * mean) * 1.15
    if burst > ceiling:  # the start burst would flatten the rest of the day
        top.set_ylim(0, ceiling)
        top.annotate(
            f"start: {burst:.0f}/s",
            xy=(0.0, ceiling),
            xytext=(0.6, ceiling * 0.9),
            fontsize=8,
            arrowprops={"arrowstyle": "->", "lw": 0.6},
        )
    top.set_xlabel("hours since the jobs started")
    top.set_ylabel("requests / s")
    top.set_title(
        f"{cfg.jobs} jobs, 1 h tokens, {cfg.jobs_per_ip} jobs per NAT IP, "
        f"{cfg.requests_per_renewal} requests per renewal"
    )
    top.legend(loc="upper right", fontsize=8)
    if cfg.outage_at_s is not None:
        lo = max(0, int(cfg.outage_at_s) - 1800)
        hi = min(len(res.requests) - 1, int(cfg.outage_at_s + cfg.outage_s) + 2 * life)
        ten = binned(res.requests, 10, lo, hi)
        five = binned(res.requests, 300, lo, hi)
        bottom.plot(
            [(lo + 10 * i) / 60.0 for i in range(len(ten))],
            ten,
            lw=0.6,
            color="tab:blue",
            alpha=0.6,
            label="10-s mean",
        )
        bottom.step(
            [(lo + 300 * i) / 60.0 for i in range(len(five))],
            five,
            where="post",
            lw=1.2,
            color="black",
            label="5-min mean (limiter window)",
        )
        bottom.axhline(mean, ls="--", lw=0.8, color="gray")
        bottom.set_xlabel("minutes since the jobs started")
        bottom.set_ylabel("requests / s")
        bottom.set_title("around the outage")
        bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary(res: FleetResult, recovery_from_s: float) -> Dict[str, Any]:
    cfg = res.config
    return {
        "config": asdict(cfg),
        "sim_wall_s": round(res.wall_s, 2),
        "requests": sum(res.requests),
        "ok": sum(res.ok),
        "rejected_429": sum(res.rejected),
        "refused_outage": sum(res.refused),
        "renewals": res.renewals,
        "failed_attempts": res.failures,
        "jobs_not_started": res.not_started,
        "jobs_with_expired_token": res.expired_jobs,
        "expired_job_seconds": round(res.expired_job_s, 1),
        "max_expired_s": round(res.max_expired_s, 1),
        "renewals_per_job_hour": round(res.renewals_per_job_hour, 4),
        "rule_renewals_per_job_hour": round(res.rule_renewals_per_job_hour, 4),
        "recovery": recovery_figures(res, recovery_from_s),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    size.add_argument("--long", action="store_true", help="also sweep outage times")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--hours", type=float)
    parser.add_argument("--outage-at-h", type=float, default=3.0)
    parser.add_argument("--outage-min", type=float, default=10.0)
    parser.add_argument("--jobs-per-ip", type=int, default=50)
    parser.add_argument("--requests-per-renewal", type=int, default=1)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "fleet.json")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "fleet.png")
    args = parser.parse_args(argv)

    jobs = args.jobs or (200 if args.quick else 10_000)
    hours = args.hours or (4.0 if args.quick else 24.0)
    cfg = FleetConfig(
        jobs=jobs,
        duration_s=hours * 3600.0,
        outage_at_s=args.outage_at_h * 3600.0,
        outage_s=args.outage_min * 60.0,
        jobs_per_ip=args.jobs_per_ip,
        requests_per_renewal=args.requests_per_renewal,
        seed=args.seed,
    )
    recovered_at = cfg.outage_at_s + cfg.outage_s
    main_run = simulate(cfg)
    twin = simulate(replace(cfg, outage_at_s=None))
    bisect_s = 2 * 3600.0 if args.quick else 24 * 3600.0
    sites = [
        largest_site(n, duration_s=bisect_s, seed=args.seed)
        for n in ((2,) if args.quick else (2, 1))
    ]
    settings, _ = sidecar_rule("x")
    margin = policy.margin_for(cfg.at_lifetime_s, settings)
    out: Dict[str, Any] = {
        "generated_by": "benchmarks/fleet.py" + (" --quick" if args.quick else ""),
        "rate_limit": {
            "max_requests": DEFAULT_RATE_LIMIT[0],
            "window_s": DEFAULT_RATE_LIMIT[1],
            "kind": "fixed window per client IP, opened by the first hit (fiber v2 default)",
        },
        "rule": {
            "fraction": settings.fraction,
            "jitter_fraction": settings.jitter_fraction,
            "margin_s": margin,
            "min_backoff_s": settings.min_backoff_s,
            "max_backoff_s": settings.max_backoff_s,
            "quick_retries": settings.quick_retries,
        },
        "main": summary(main_run, recovered_at),
        "no_outage": summary(twin, recovered_at),
        "largest_site": sites,
        "goals": {
            "peak_over_mean_after_recovery": 1.3,
            "jobs_with_expired_token": 0,
            "outage_shorter_than_lifetime_minus_margin": cfg.outage_s < cfg.at_lifetime_s - margin,
        },
        "series": {
            "bin_s": 60,
            "requests_per_s": [round(x, 3) for x in binned(main_run.requests, 60)],
            "rejected_per_s": [round(x, 3) for x in binned(main_run.rejected, 60)],
        },
    }
    if args.long:
        sweep = []
        for at_h in (0.75, 1.0, 1.5, 2.0, 3.0, 5.5):
            res = simulate(replace(cfg, outage_at_s=at_h * 3600.0))
            row = summary(res, at_h * 3600.0 + cfg.outage_s)
            sweep.append(
                {
                    "outage_at_h": at_h,
                    "jobs_with_expired_token": res.expired_jobs,
                    "rejected_429": row["rejected_429"],
                    "recovery": row["recovery"],
                }
            )
        out["outage_sweep"] = sweep
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    plot(main_run, args.png)
    m = out["main"]
    print(
        f"fleet: {jobs} jobs x {hours:g} h in {main_run.wall_s:.1f} s; "
        f"peak/mean after recovery {m['recovery']['peak_over_mean']} (goal <= 1.3, "
        f"no-outage twin {out['no_outage']['recovery']['peak_over_mean']}); "
        f"expired {m['jobs_with_expired_token']}; 429s {m['rejected_429']}; "
        f"largest site {', '.join(str(s['largest_site_jobs']) for s in sites)} jobs/IP",
        file=sys.stderr,
    )
    return 0


def _digest(res: FleetResult) -> str:
    """Fingerprint of a run's request series (determinism checks)."""
    return hashlib.sha256(res.requests.tobytes()).hexdigest()[:16]


if __name__ == "__main__":
    sys.exit(main())
