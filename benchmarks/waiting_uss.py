"""USS of ``jobtoken run``'s (and ``sidecar``'s) waiting process next to a bare interpreter.

``jobtoken run -- sh -c 'touch READY; sleep N'`` against a loopback dev server with 1 h
tokens (no renewal while measured); once the payload has started, the run process's
USS (``/proc/PID/smaps_rollup``: Private_Clean + Private_Dirty, as psutil's ``uss``) is
sampled for a few seconds and the largest value kept. ``jobtoken sidecar --detach``
watching a ``sleep`` is measured the same way (its pid from ``sidecar.lock``). The
baselines run the same way:
``python3 -c 'import time; time.sleep(60)'`` with the interpreter jobtoken runs on and,
when there, ``/usr/bin/python3``. A warm-up run fills the bytecode cache first
(``bench_env``), as installing the package does. USS counts the interpreter's code pages
as private while no other process maps the same binary (``/usr/bin/python3`` alone: about
5.9 MiB; next to another of its processes: 2.7): compare processes of one binary, run while
this script (same interpreter) runs.

Must NOT: print a token, or write outside its temp dir and ``--json``.

Usage: ``python benchmarks/waiting_uss.py [--quick] [--json F]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from _bench import (
    bench_env,
    dev_server,
    emit,
    job_mytoken,
    run_argv,
    uss_bytes,
    work_dir,
)

MIB = 1024.0 * 1024.0
GOALS = {"waiting_uss_mib": 3.5}
_BARE = "import time; time.sleep(60)"


def _sample_max(pid: int, seconds: float) -> int:
    best = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            best = max(best, uss_bytes(pid))
        except OSError:
            break
        time.sleep(0.05)
    return best


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"jobtoken run ended early ({proc.returncode}): {err[-400:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"payload did not start within {timeout_s:.0f} s")
        time.sleep(0.05)


def run_once(srv: Any, tmp: Path, name: str, sample_s: float) -> Dict[str, Any]:
    """One ``jobtoken run`` measured once its payload runs."""
    env = bench_env(tmp / "pycache")
    ready = tmp / f"{name}-ready"
    argv = run_argv(srv, job_mytoken(srv, tmp / f"{name}-mytoken"), tmp / f"{name}-dir",
                    f"bench.{name}", ["sh", "-c", f'touch "{ready}"; exec sleep 300'])
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(ready, proc, 120)
        time.sleep(0.5)  # the exec into the waiter follows the payload's start
        uss = _sample_max(proc.pid, sample_s)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
            cmdline = [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]
    finally:
        proc.terminate()  # forwarded to the payload; run then cleans up and ends like it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    waiting_as = "jobtoken._waiter" if any("_waiter" in p for p in cmdline) else " ".join(cmdline)
    return {"uss_mib": round(uss / MIB, 3), "process": waiting_as}


def sidecar_once(srv: Any, tmp: Path, name: str, sample_s: float) -> Dict[str, Any]:
    """One ``jobtoken sidecar --detach`` watching a ``sleep``, measured once it waits."""
    env = bench_env(tmp / "pycache")
    watched = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
    pid = 0
    tokendir = tmp / f"{name}-dir"
    argv = run_argv(srv, job_mytoken(srv, tmp / f"{name}-mytoken"), tokendir,
                    f"bench.{name}", [])
    argv = [a for a in argv if a != "--"]
    argv[argv.index("run")] = "sidecar"
    try:
        subprocess.run([*argv, "--detach", "--watch-pid", str(watched.pid)], env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True,
                       timeout=120)
        lock = tokendir / "sidecar.lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError("the sidecar did not take its lock")
            time.sleep(0.05)
        pid = int(lock.read_text())
        time.sleep(2.0)  # set-up, first token, then (if it does) the exec into the waiter
        uss = _sample_max(pid, sample_s)
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]
    finally:
        watched.kill()  # the sidecar sees it end, cleans up and ends
        watched.wait()
        deadline = time.monotonic() + 120
        while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # its clean-up writes bytecode into our temp dir
    waiting_as = "jobtoken._waiter" if any("_waiter" in p for p in cmdline) else " ".join(
        cmdline[:4])
    return {"uss_mib": round(uss / MIB, 3), "process": waiting_as}


def bare_uss(python: str, sample_s: float) -> float:
    proc = subprocess.Popen([python, "-c", _BARE], stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        return round(_sample_max(proc.pid, sample_s) / MIB, 3)
    finally:
        proc.kill()
        proc.wait()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short sample (smoke test)")
    parser.add_argument("--json", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    sample_s = 0.5 if args.quick else 3.0
    with work_dir("jobtoken-bench-uss-") as tmp, dev_server(at_lifetime_s=3600) as srv:
        run_once(srv, tmp, "warmup", 0.1)
        runs = [run_once(srv, tmp, f"run{i}", sample_s) for i in range(1 if args.quick else 3)]
        sidecar_once(srv, tmp, "sidecar-warmup", 0.1)
        sidecars = [sidecar_once(srv, tmp, f"sidecar{i}", sample_s)
                    for i in range(1 if args.quick else 3)]
    bare: Dict[str, float] = {"venv_python": bare_uss(sys.executable, sample_s)}
    if Path("/usr/bin/python3").exists():
        bare["usr_bin_python3"] = bare_uss("/usr/bin/python3", sample_s)
    waiting = max(r["uss_mib"] for r in runs)
    result = {
        "generated_by": "benchmarks/waiting_uss.py" + (" --quick" if args.quick else ""),
        "waiting_uss_mib": waiting,
        "waiting_process": runs[0]["process"],
        "runs": runs,
        "sidecar_waiting_uss_mib": max(r["uss_mib"] for r in sidecars),
        "sidecar_process": sidecars[0]["process"],
        "sidecar_runs": sidecars,
        "bare_interpreter_uss_mib": bare,
        "over_bare_mib": round(waiting - bare["venv_python"], 3),
        "goals": GOALS,
    }
    emit(args.json, result)
    print(
        f"waiting jobtoken run: USS {waiting:.2f} MiB (goal <= {GOALS['waiting_uss_mib']}); "
        f"jobtoken sidecar --detach: {result['sidecar_waiting_uss_mib']:.2f} MiB; "
        f"bare python -c 'import time; time.sleep(60)': {bare['venv_python']:.2f} MiB"
        + (f" (/usr/bin/python3 {bare['usr_bin_python3']:.2f})" if "usr_bin_python3" in bare
           else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
