"""``jobtoken run``'s waiting process (``_waiter``): small, and only builtin modules in it.

The behaviour of a waiting ``run`` (signals reach the payload, exit status and death by
signal passed on, renewals, escalation, clean-up) is tested through the real command in
``test__run.py``: every one of those tests goes through this process now.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Set

import pytest

from jobtoken import _waiter
from jobtoken.devserver import DevServer, DevServerConfig
from tests.runhelpers import AUD, jobtoken_argv, prepare, readline_within

SRC = Path(_waiter.__file__)
#: What the waiter may import: builtin modules that cost nothing over a bare interpreter.
ALLOWED = {"__future__", "_signal", "os", "select", "sys", "time"}
#: Never in the waiting process: each costs 0.7 to 20 MiB, and a mytoken client has no
#: business there.
FORBIDDEN = {
    "httpx", "httpcore", "jwt", "cryptography", "ssl", "_ssl", "_hashlib", "certifi", "jobtoken",
    "dataclasses", "typing", "logging", "subprocess", "json", "argparse", "signal", "enum",
    "re", "pathlib", "threading", "inspect", "tomllib", "tomli", "psutil", "ctypes",
}
USS_GOAL_MIB = 3.5
OP_SCOPES = ("storage.read:/", "storage.create:/")


def _uss_mib(pid: int) -> float:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024.0


def _imported(argv: List[str]) -> Set[str]:
    """Every module ``argv`` (a python command line) imports, from ``-X importtime``."""
    result = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True,
                            text=True, timeout=60)
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "_waiter" in names, result.stderr[-500:]
    return names


def test_the_waiter_source_imports_only_builtins() -> None:
    """Imports anywhere in the file (also inside functions) are in the allowed list."""
    found = set()
    for node in ast.walk(ast.parse(SRC.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    assert found <= ALLOWED, sorted(found - ALLOWED)


class _Waiting:
    def __init__(self, pid: int) -> None:
        self.pid = pid


@pytest.fixture(params=["run", "sidecar --detach"])
def waiting_run(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_Waiting]:
    """The waiting process of ``jobtoken run``, and of ``jobtoken sidecar --detach`` (it
    was a full interpreter, 12 MiB, while ``run``'s was this small one)."""
    with DevServer(DevServerConfig(at_lifetime_s=3600, op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as srv:
        job = prepare(srv, tmp_path, lifetime_s=3600)
        if request.param == "run":
            yield from _waiting_run(job)
        else:
            yield from _waiting_sidecar(job)


def _waiting_sidecar(job: object) -> Iterator[_Waiting]:
    import time

    tokendir = job.tokendir  # type: ignore[attr-defined]
    watched = subprocess.Popen(["sleep", "120"], stdin=subprocess.DEVNULL)
    pid = 0
    try:
        subprocess.run(jobtoken_argv("sidecar", "--detach", "--dir", str(tokendir.path),
                                     "--watch-pid", str(watched.pid)),
                       stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=120)
        deadline = time.monotonic() + 60
        while not (tokendir.lock_file.exists() and tokendir.lock_file.read_text().strip()):
            assert time.monotonic() < deadline, "the sidecar did not take its lock"
            time.sleep(0.05)
        pid = int(tokendir.lock_file.read_text())
        yield _Waiting(pid)
    finally:
        watched.kill()
        watched.wait()
    deadline = time.monotonic() + 60
    while pid and Path(f"/proc/{pid}").exists():  # it sees the end, cleans up and ends
        assert time.monotonic() < deadline, "the sidecar did not end with its process"
        time.sleep(0.05)
    assert not tokendir.bearer_token.exists()


def _waiting_run(job: object) -> Iterator[_Waiting]:
    tokendir = job.tokendir  # type: ignore[attr-defined]
    proc = subprocess.Popen(
        jobtoken_argv("run", "--dir", str(tokendir.path), "--", "sh", "-c",
                      "echo ready; exec sleep 120"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert readline_within(proc.stdout).strip() == "ready"
        yield _Waiting(proc.pid)
    finally:
        proc.terminate()  # forwarded to the payload; run ends like it
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _waiter_cmdline(pid: int) -> List[str]:
    """The run process's command line once it has become the waiter (same pid)."""
    import time

    deadline = time.monotonic() + 60
    while True:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [part.decode() for part in fh.read().split(b"\0") if part]
        if any("_waiter" in part for part in argv):
            return argv
        assert time.monotonic() < deadline, argv
        time.sleep(0.05)


def test_the_waiting_run_process_imports_nothing_heavy(waiting_run: _Waiting) -> None:
    argv = _waiter_cmdline(waiting_run.pid)
    assert argv[0] == sys.executable and "-I" in argv and "-S" in argv
    # the same command line with a plan it cannot use imports exactly what the waiter
    # imports at start; the source test above covers imports made later
    code = argv.index("-c")
    modules = _imported(argv[: code + 2] + ["not a plan"])
    assert not modules & FORBIDDEN, sorted(modules & FORBIDDEN)
    with open(f"/proc/{waiting_run.pid}/maps") as fh:
        mapped = fh.read()
    for library in ("_ssl", "_hashlib", "_ctypes", "cryptography", "libssl", "_json"):
        assert library not in mapped, library


def test_the_waiting_run_process_is_near_a_bare_interpreter(
    waiting_run: _Waiting,
) -> None:
    _waiter_cmdline(waiting_run.pid)
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import time

        time.sleep(1.0)
        bare_mib = _uss_mib(bare.pid)
    finally:
        bare.kill()
        bare.wait()
    uss = _uss_mib(waiting_run.pid)
    assert uss <= USS_GOAL_MIB, f"waiting run {uss:.2f} MiB, bare interpreter {bare_mib:.2f} MiB"
