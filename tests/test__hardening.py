"""Processes holding a mytoken: no core dump, no /proc/PID/* for others, no copy in the
original environment block (issue 12 items 11 and 12). Real processes, Linux only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobtoken.devserver import DevServer, DevServerConfig
from tests.prerequisites import need
from tests.runhelpers import AUD, jobtoken_argv, readline_within, run

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

SRC = str(Path(__file__).resolve().parent.parent / "src")
SECRET = "mytoken-secret-" + "s" * 40

HOLDER = textwrap.dedent(
    """
    import resource, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # a site allowing cores
    from jobtoken._hardening import protect_process
    protect_process()
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def _as_nobody() -> dict:
    """Popen arguments that run a process as an unprivileged user when we are root.

    As root every /proc file is readable anyway; only an ordinary user shows what the
    kernel keeps from whom. The test venv may live where 'nobody' cannot reach, so such
    processes use the system Python (the code under test needs only the stdlib).
    """
    if os.geteuid() != 0:
        return {"python": sys.executable}
    python = "/usr/bin/python3"
    need(os.access(python, os.X_OK), "no /usr/bin/python3")
    return {"python": python, "user": 65534, "group": 65534, "extra_groups": []}


def _holder(cwd: Path, python: str = sys.executable, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC, HELD_MYTOKEN=SECRET)
    proc = subprocess.Popen([python, "-c", HOLDER], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=str(cwd), **popen)
    try:  # a handshake with a timeout: a holder that never answers fails the test
        line = readline_within(proc.stdout)
        assert line.strip() == "ready", line
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    return proc


@pytest.fixture()
def cwd(tmp_path: Path) -> Path:
    d = tmp_path / "cwd"
    d.mkdir()
    d.chmod(0o777)
    return d


def test_a_protected_process_has_no_core_limit_and_is_not_dumpable(cwd: Path) -> None:
    proc = _holder(cwd, **_as_nobody())
    try:
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        [core] = [line for line in limits.splitlines() if line.startswith("Max core file size")]
        assert core.split()[4] == "0"  # the soft limit it had raised is 0 again
        # a non-dumpable process's /proc files belong to root, whoever runs it
        assert os.stat(f"/proc/{proc.pid}/environ").st_uid == 0
        proc.send_signal(signal.SIGABRT)
        assert proc.wait(30) == -signal.SIGABRT
        assert not [p for p in cwd.iterdir() if p.name.startswith("core")]
    finally:
        proc.kill()
        proc.wait()


def test_another_process_of_the_same_user_cannot_read_its_memory_or_environment(
    cwd: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run both processes as another, unprivileged user")
    nobody = _as_nobody()
    python = nobody.pop("python")
    proc = _holder(cwd, python, **nobody)
    try:
        reader = subprocess.run(
            [python, "-c",
             f"for p in ('environ', 'mem', 'maps'):\n"
             f"    try:\n        open('/proc/{proc.pid}/' + p, 'rb').close()\n"
             f"    except PermissionError:\n        continue\n"
             f"    print('readable', p)"],
            capture_output=True, text=True, timeout=30, cwd=str(cwd), **nobody)
        assert reader.returncode == 0, reader.stderr
        assert reader.stdout == ""
    finally:
        proc.kill()
        proc.wait()


def test_run_with_a_mytoken_variable_leaves_it_nowhere_the_payload_can_read(
    tmp_path: Path,
) -> None:
    peek = textwrap.dedent(
        """
        import os, sys
        secret = open(sys.argv[1], "rb").read()
        found = []
        for what in ("environ", "cmdline"):
            try:
                data = open(f"/proc/{os.getppid()}/{what}", "rb").read()
            except PermissionError:
                continue
            if secret in data:
                found.append(what)
        if secret.decode() in "".join(os.environ.values()):
            found.append("own environment")
        print("found:", " ".join(found))
        """
    )
    with DevServer(DevServerConfig(at_lifetime_s=300, op_scopes=("storage.create:/",),
                                   default_audience=AUD)) as srv:
        mt = srv.issue_mytoken(capabilities=["AT"], restrictions=[
            {"scope": "storage.create:/vo/out", "audience": [AUD]}])
        env = dict(os.environ, MY_MT=mt, TMPDIR=str(tmp_path))
        known = tmp_path / "known"  # how the peeking payload recognises the mytoken
        known.write_text(mt)
        result = run(jobtoken_argv(
            "run", "--server", srv.url, "--allow-http", "--mytoken-env", "MY_MT",
            "--scope", "storage.create:/vo/out", "--audience", AUD, "--",
            sys.executable, "-c", peek, str(known)), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "found:"
