"""Wall time of ``jobtoken prepare`` and ``jobtoken token`` against ``import httpx, jwt``.

All commands run in the same loop, interleaved round by round (so a busy machine slows
every command alike), against a loopback dev server; the figure is the median per
command and the ratio of medians. Bytecode is cached for every command alike (see
``_bench.bench_env``). The baseline uses the same interpreter as jobtoken
(``.venv/bin/python -c 'import httpx, jwt'``): the system ``python3`` may not even have
httpx, and a different interpreter would measure a different thing.

A second baseline, ``floor_token``, is the least any tool must do for ``token``: the
same imports, an ``httpx.Client`` (which imports httpcore, lazily since httpx 0.28,
and loads the CA bundle), discovery + access-token request, decode the JWT, write the
file. A breakdown explains the gap: a child that first does the baseline's imports,
then times, one after the other, ``import httpcore``, jobtoken's own imports for
``prepare``, building the default TLS context (the system CA bundle), and the
package-version lookup.

Must NOT: print a token, or write outside its temporary directory and ``--json``.

Usage: ``python benchmarks/startup.py [--quick|--long] [--json F]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from _bench import (
    AUDIENCE,
    bench_env,
    dev_server,
    jobtoken_command,
    median,
    spread,
    work_dir,
    write_json,
    write_private,
)

GOAL_RATIO = 1.3
_TIMEOUT_S = 60.0

#: Timed inside one child after ``import httpx, jwt``; prints one JSON line.
_BREAKDOWN = r"""
import json, time
t0 = time.perf_counter()
import httpx, jwt
t1 = time.perf_counter()
import httpcore
t1b = time.perf_counter()
import jobtoken.cli, jobtoken._prepare, jobtoken._oneshot, jobtoken._exchange
t2 = time.perf_counter()
import ssl
ssl.create_default_context()
t3 = time.perf_counter()
from importlib.metadata import version
version("jobtoken")
t4 = time.perf_counter()
print(json.dumps({"baseline_imports": t1 - t0, "httpcore_import": t1b - t1,
                  "jobtoken_imports": t2 - t1b,
                  "tls_default_context": t3 - t2, "version_lookup_again": t4 - t3}))
"""


#: The least a hand-written ``token`` does (mytoken read from a file, never from argv).
_FLOOR = r"""
import os, sys, httpx, jwt
url, mt_file, out = sys.argv[1:4]
with open(mt_file) as fh:
    mt = fh.read().strip()
with httpx.Client() as client:
    disc = client.get(url + "/.well-known/mytoken-configuration").json()
    resp = client.post(disc["access_token_endpoint"], json={"grant_type": "mytoken",
                                                              "mytoken": mt})
    at = resp.json()["access_token"]
jwt.decode(at, options={"verify_signature": False})
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
os.write(fd, (at + "\n").encode())
os.close(fd)
"""


def _timed(argv: List[str], env: Dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=_TIMEOUT_S, check=False)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} {argv[1] if len(argv) > 1 else ''} exited "
            f"{proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}"
        )
    return took


def measure(rounds: int) -> Dict[str, object]:
    jt = jobtoken_command()
    py = sys.executable
    with work_dir("jobtoken-bench-startup-") as tmp, dev_server() as srv:
        env = bench_env(tmp / "pycache", {"JOBTOKEN_VO": "bench"})
        parent = write_private(
            tmp / "parent-mytoken",
            srv.issue_mytoken(capabilities=["AT", "create_mytoken", "tokeninfo"]),
        )
        server = ["--server", srv.url, "--allow-http"]
        out = tmp / "bt"
        counter = {"n": 0}

        def prepare() -> float:
            counter["n"] += 1
            job_dir = tmp / f"job{counter['n']}"
            took = _timed(
                jt
                + [
                    "prepare",
                    *server,
                    "--parent-mytoken-file",
                    str(parent),
                    "--dir",
                    str(job_dir),
                    "--job-id",
                    f"bench.{counter['n']}",
                    "--walltime",
                    "3600",
                    "--audience",
                    AUDIENCE,
                ],
                env,
            )
            shutil.rmtree(job_dir, ignore_errors=True)
            return took

        def token() -> float:
            if out.exists():
                os.unlink(out)
            return _timed(
                jt + ["token", *server, "--mytoken-file", str(parent), "--out", str(out)], env
            )

        commands = {
            "bare_python": lambda: _timed([py, "-c", "pass"], env),
            "baseline_import_httpx_jwt": lambda: _timed([py, "-c", "import httpx, jwt"], env),
            "prepare": prepare,
            "token": token,
            "floor_token": lambda: _timed(
                [py, "-c", _FLOOR, srv.url, str(parent), str(tmp / "bt-floor")], env
            ),
        }
        for run in commands.values():  # warm-up: fills the bytecode cache
            run()
        times: Dict[str, List[float]] = {name: [] for name in commands}
        parts: Dict[str, List[float]] = {}
        for _ in range(rounds):
            for name, run in commands.items():
                times[name].append(run())
            proc = subprocess.run(
                [py, "-c", _BREAKDOWN], env=env, capture_output=True, timeout=_TIMEOUT_S, check=True
            )
            for key, value in json.loads(proc.stdout.decode().strip().splitlines()[-1]).items():
                parts.setdefault(key, []).append(value)
        requests = {}
        for rec in srv.requests():
            requests[rec.endpoint] = requests.get(rec.endpoint, 0) + 1
    base = median(times["baseline_import_httpx_jwt"])
    result: Dict[str, object] = {
        "rounds": rounds,
        "interpreter": sys.version.split()[0],
        "seconds": {name: spread(values) for name, values in times.items()},
        "prepare_over_baseline": round(median(times["prepare"]) / base, 3),
        "token_over_baseline": round(median(times["token"]) / base, 3),
        "token_over_floor": round(median(times["token"]) / median(times["floor_token"]), 3),
        "goal_ratio": GOAL_RATIO,
        "breakdown_ms": {k: round(1000 * median(v), 1) for k, v in parts.items()},
        "server_requests_per_command": {
            "note": "all rounds incl. warm-up; prepare: discovery+my+access, token and "
            "floor_token: discovery+access",
            "counts": requests,
        },
    }
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 rounds (smoke test)")
    size.add_argument("--long", action="store_true", help="31 rounds")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--json", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 31 if args.long else 11)
    result = measure(rounds)
    result["generated_by"] = "benchmarks/startup.py" + (" --quick" if args.quick else "")
    if args.json:
        write_json(args.json, result)
    else:
        print(json.dumps(result, indent=1, sort_keys=True))
    s = result["seconds"]
    print(
        f"startup: prepare {s['prepare']['median']:.3f} s, token {s['token']['median']:.3f} s, "
        f"import httpx,jwt {s['baseline_import_httpx_jwt']['median']:.3f} s -> ratios "
        f"{result['prepare_over_baseline']} / {result['token_over_baseline']} (goal <= 1.3)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
