"""Helpers shared by the benchmark scripts: environment, dev server, files, statistics.

Must NOT: print or log a token (the parent mytoken goes into a 0600 file only), write
outside the directories the caller names, or change anything under ``src/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
SCOPES = ("storage.read:/", "storage.create:/")
AUDIENCE = "https://se.example.org"

#: Stripped from the benchmark's children so that host settings cannot leak in.
_STRIP_PREFIXES = ("BEARER_TOKEN", "MYTOKEN", "JOBTOKEN", "_CONDOR_", "SSL_CERT", "X509_")


def bench_env(pycache: Path, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for measured children: an installed-package view of the interpreter.

    ``PYTHONDONTWRITEBYTECODE`` is dropped and bytecode goes to a private
    ``PYTHONPYCACHEPREFIX``, so after one warm-up run every command (baseline included)
    loads cached bytecode, as an installed package does; the source tree is not touched.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_STRIP_PREFIXES) and k not in ("PYTHONDONTWRITEBYTECODE",)
    }
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def jobtoken_command() -> List[str]:
    """How a user starts jobtoken: the console script next to this interpreter."""
    script = Path(sys.executable).parent / "jobtoken"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "jobtoken"]


def write_private(path: Path, text: str) -> Path:
    """A 0600 file for a benchmark secret (never follows a symlink)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    return path


@contextlib.contextmanager
def dev_server(at_lifetime_s: int = 1200, rate_limit: Any = None) -> Iterator[Any]:
    """A loopback dev server on a free port (http; ``--allow-http`` on the client)."""
    from jobtoken.devserver import DevServer, DevServerConfig

    cfg = DevServerConfig(
        at_lifetime_s=at_lifetime_s,
        op_scopes=SCOPES,
        default_audience=AUDIENCE,
        rate_limit=rate_limit,
    )
    with DevServer(cfg) as srv:
        yield srv


@contextlib.contextmanager
def work_dir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        yield Path(name)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Median, min, max and count of a sample (seconds kept as given)."""
    return {
        "median": round(median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def uss_bytes(pid: int) -> int:
    """Private (unshared) memory of ``pid`` (``smaps_rollup``: Private_Clean +
    Private_Dirty, as psutil's ``uss``): what ending the process would give back."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def sched_cpu_s(pid: int) -> Optional[float]:
    """CPU time of all threads of ``pid`` in ns resolution (``/proc/PID/task/*/schedstat``).

    ``cpu_times()`` counts in clock ticks (10 ms): one tick in a 60 s idle window
    would read as 0.6 s per hour.
    """
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def children(pid: int) -> List[int]:
    """Direct children of ``pid`` from /proc (cheap; psutil scans every process)."""
    out: List[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(x) for x in fh.read().split())
    except OSError:
        pass
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU of ``pid`` and of the children it has reaped (utime+stime+cutime+cstime of
    ``/proc/PID/stat``, clock ticks): a process that runs short-lived children."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:15]) / ticks


def job_mytoken(srv: Any, path: Path, scope: str = "storage.create:/bench") -> Path:
    """A job's own mytoken (AT only, ``scope`` for ``AUDIENCE``) in a 0600 file."""
    return write_private(path, srv.issue_mytoken(
        capabilities=["AT"], restrictions=[{"scope": scope, "audience": [AUDIENCE]}]))


def run_argv(srv: Any, mytoken: Path, tokendir: Path, job_id: str, payload: Sequence[str],
             scope: str = "storage.create:/bench") -> List[str]:
    """``jobtoken run`` for one job against the dev server ``srv``."""
    return jobtoken_command() + [
        "run", "--server", srv.url, "--allow-http", "--mytoken-file", str(mytoken),
        "--scope", scope, "--audience", AUDIENCE, "--dir", str(tokendir), "--job-id", job_id,
        "--", *payload,
    ]


def emit(path: Optional[Path], data: Any) -> None:
    """The benchmark's JSON: to ``path`` (``--json``), else to stdout."""
    if path:
        write_json(path, data)
    else:
        print(json.dumps(data, indent=1, sort_keys=True))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
