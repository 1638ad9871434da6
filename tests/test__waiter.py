"""``jobtoken run``'s waiting process (``_waiter``): small, and only builtin modules in it.

The behaviour of a waiting ``run`` (signals reach the payload, exit status and death by
signal passed on, renewals, escalation, clean-up) is tested through the real command in
``test__run.py``: every one of those tests goes through this process now.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set, Tuple

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


def _importtime(argv: List[str]) -> Tuple[Set[str], str]:
    """Every module ``argv`` (a python command line) imports, from ``-X importtime``."""
    result = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True,
                            text=True, timeout=60)
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names, result.stderr


def _imported(argv: List[str]) -> Set[str]:
    """What the waiter's command line ``argv`` imports itself.

    The probe ends in an uncaught error, and printing its traceback imports modules of the
    interpreter's own (none on 3.11; ``traceback``, ``re``, ``enum``... on 3.13): those
    are left out, measured on the same interpreter with the same flags."""
    names, stderr = _importtime(argv)
    assert "_waiter" in names, stderr[-500:]
    printing, _ = _importtime([argv[0], "-I", "-S", "-c", "raise ValueError('probe')"])
    return names - printing


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
        time.sleep(1.0)
        bare_mib = _uss_mib(bare.pid)
    finally:
        bare.kill()
        bare.wait()
    uss = _uss_mib(waiting_run.pid)
    assert uss <= USS_GOAL_MIB, f"waiting run {uss:.2f} MiB, bare interpreter {bare_mib:.2f} MiB"


# --- watch mode (``jobtoken sidecar``), driven directly ------------------------------------
#
# The real ``_waiter`` in its own ``-I -S`` interpreter, with a plan as ``run_sidecar``
# writes it, watching a real process that is not its child. One seam only: its
# ``sys.executable`` is a shell script standing in for ``python -m jobtoken._runstep``, so
# a step answers what the test chose and the finishing ``exec`` leaves a record of its
# arguments instead of cleaning up a real token directory.

#: ``jobtoken sidecar``'s stop signals (``_run.SIDECAR_STOP_SIGNALS``).
SIDECAR_STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WARN = signal.SIGUSR2
#: What the watched process records (one line per signal), instead of acting on it.
RECORDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
WAIT_S = 60.0  # a waiter ending (it polls /proc every 2 s) on a loaded machine

_STEP_STUB = """#!/bin/sh
# in place of: python -m jobtoken._runstep DIR [ARGS...]   ($3 is DIR)
case " $* " in
*" --finish "*) printf '%s\\n' "$*" > "$3/finished" ;;
*) cat "$3/answer" ;;
esac
"""

_RECORDER = f"""
import os, signal
# one write(2) per signal: a second signal landing inside print() split its line ("1215")
for signum in {tuple(int(s) for s in RECORDED)!r}:
    signal.signal(signum, lambda n, f: os.write(1, b"%d\\n" % n))
signal.pthread_sigmask(signal.SIG_SETMASK, [])
print("ready", flush=True)
while True:
    signal.pause()
"""


def _recorder() -> subprocess.Popen[str]:
    """A process that prints each of ``RECORDED`` it receives, whatever it inherited."""
    proc = subprocess.Popen([sys.executable, "-c", _RECORDER], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True)
    assert readline_within(proc.stdout).strip() == "ready"
    return proc


def _start_waiter(tmp_path: Path, *, pass_fds: Tuple[int, ...] = (),
                  **plan: object) -> subprocess.Popen[bytes]:
    """The waiter as ``_run.exec_waiter`` starts it; the stop signals blocked and at their
    default beforehand, as ``run_sidecar`` leaves them (not as our caller may have)."""
    stub = tmp_path / "runstep"
    stub.write_text(_STEP_STUB, encoding="utf-8")
    stub.chmod(0o755)
    stop = [int(s) for s in SIDECAR_STOP]
    code = (
        "import _signal, sys; "
        f"[_signal.signal(s, _signal.SIG_DFL) for s in {stop!r}]; "
        f"_signal.pthread_sigmask(_signal.SIG_SETMASK, {stop!r}); "
        f"sys.path.insert(0, {str(SRC.parent)!r}); "
        f"sys.executable = {str(stub)!r}; "
        "import _waiter; _waiter.main(sys.argv[1:])"
    )
    fields: Dict[str, object] = dict(
        step=None, dir=tmp_path, bt=tmp_path / "bt", grace=None, limit=30, next=0,
        watch=None, forward="", stop=",".join(str(s) for s in stop),
    )
    fields.update(plan)
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", code,
                             _waiter.encode_plan(**fields)],
                            stdin=subprocess.DEVNULL, pass_fds=pass_fds)


def _finished(waiter: subprocess.Popen[bytes], tmp_path: Path) -> List[str]:
    """The arguments of the finishing step the waiter ``exec``ed (it ends with it)."""
    try:
        assert waiter.wait(timeout=WAIT_S) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the waiter did not finish within {WAIT_S:.0f} s") from None
    return (tmp_path / "finished").read_text(encoding="utf-8").split()


def _answer(tmp_path: Path, **actions: object) -> None:
    """What every step of the stub answers: no wake-up for an hour, and ``actions``."""
    (tmp_path / "answer").write_text(
        _waiter.encode_plan(next=time.time() + 3600, watch=None, **actions))


def _ticks(pid: int) -> int:
    ticks = _waiter.start_ticks(pid)
    assert ticks is not None, pid
    return ticks


def _ended(*procs: subprocess.Popen[Any]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_without_a_pidfd_the_sidecar_waiter_signals_by_pid_and_sees_the_end_in_proc(
    tmp_path: Path,
) -> None:
    """A kernel without pidfds: the watched process's ``/proc`` start ticks stand in. The
    step's warning signal reaches it by pid, and its end is noticed by polling."""
    watched = _recorder()
    waiter = None
    try:
        _answer(tmp_path, signal=int(WARN))
        waiter = _start_waiter(tmp_path, payload=watched.pid, start=_ticks(watched.pid))
        assert readline_within(watched.stdout).strip() == str(int(WARN))
        assert waiter.poll() is None  # it watches on
        watched.kill()
        watched.wait()
        argv = _finished(waiter, tmp_path)
    finally:
        _ended(watched, *([waiter] if waiter else []))
    assert argv[argv.index("--finish"):] == [
        "--finish", "--sidecar", "--payload-pid", str(watched.pid)]


def test_without_a_pidfd_a_recycled_pid_is_not_the_watched_process(tmp_path: Path) -> None:
    """The pid names a live process that started at another tick than the watched one:
    the watched process is gone (its pid was reused), so the sidecar finishes, and the
    stranger is neither waited for nor sent the step's warning."""
    stranger = _recorder()
    waiter = None
    try:
        _answer(tmp_path, signal=int(WARN))
        waiter = _start_waiter(tmp_path, payload=stranger.pid, start=_ticks(stranger.pid) - 1)
        argv = _finished(waiter, tmp_path)
        assert stranger.poll() is None
    finally:
        _ended(stranger, *([waiter] if waiter else []))
    assert argv[argv.index("--finish"):] == [
        "--finish", "--sidecar", "--payload-pid", str(stranger.pid)]
    assert stranger.stdout is not None and stranger.stdout.read() == ""


def test_the_sidecar_waiter_signals_the_watched_process_through_its_pidfd(
    tmp_path: Path,
) -> None:
    """The step's warning and its stop (TERM) go through the pidfd: they reach the process
    the pidfd names even when the plan's pid (with matching start ticks) is another's
    now, as after pid reuse; and the pidfd tells the end."""
    watched = _recorder()
    stranger = subprocess.Popen(["sleep", "120"], stdin=subprocess.DEVNULL)
    pidfd = os.pidfd_open(watched.pid)
    waiter = None
    try:
        _answer(tmp_path, signal=int(WARN), stop=1)
        waiter = _start_waiter(tmp_path, payload=stranger.pid, start=_ticks(stranger.pid),
                               pidfd=pidfd, pass_fds=(pidfd,))
        assert readline_within(watched.stdout).strip() == str(int(WARN))
        assert readline_within(watched.stdout).strip() == str(int(signal.SIGTERM))
        assert waiter.poll() is None and stranger.poll() is None
        watched.kill()
        watched.wait()
        argv = _finished(waiter, tmp_path)
        assert stranger.poll() is None
    finally:
        os.close(pidfd)
        _ended(watched, stranger, *([waiter] if waiter else []))
    assert argv[argv.index("--finish"):] == [
        "--finish", "--sidecar", "--payload-pid", str(stranger.pid), "--stop-requested",
        "--stopped"]
