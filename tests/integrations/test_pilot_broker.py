"""A pilot's own broker: ``jobtoken broker serve`` under the pilot's uid, payloads through
``wrappers/jobtoken-wrap`` (docs/pilots.md).

Everything runs as the test's uid, as in a pilot: the broker (a real process on a real
socket in the pilot's 0700 directory), the wrapper, ``jobtoken run --broker`` and the
payloads; the dev server issues short tokens, so each payload lives through renewals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from jobtoken.devserver import DevServer, DevServerConfig
from tests.brokerhelpers import Site, serving, wait_for
from tests.runhelpers import AUD

from .conftest import PAYLOADS, WRAPPERS_DIR, base_env
from .test_wrappers import pilot_env

PILOT_WRAP = str(WRAPPERS_DIR / "jobtoken-wrap")
#: Tokens live this long; each payload reads until its third token (two renewals: more
#: than one lifetime). The broker renews a third of a lifetime before expiry at the
#: latest, seconds of slack for a loaded machine's broker loop and payload start.
LIFETIME_S = 15
TOKENS = 3


@pytest.fixture()
def pilot(tmp_path: Path) -> Iterator[Site]:
    """The pilot's directory (0700, the test's uid) with a broker running in it."""
    with DevServer(DevServerConfig(at_lifetime_s=600, op_scopes=("storage.read:/",
                                                                 "storage.create:/"),
                                   default_audience=AUD)) as srv:
        home = tmp_path / "pilot"
        home.mkdir(mode=0o700)
        (home / "work").mkdir(mode=0o700)
        with serving(Site(srv, home, at_lifetime_s=LIFETIME_S,
                          margin_s=LIFETIME_S // 3)) as site:
            # set-up done at leisure (600 s tokens); the payloads see short ones
            srv.set_at_lifetime(LIFETIME_S)
            yield site


def wrap_env(site: Site, job_id: str, mode: str) -> Dict[str, str]:
    return base_env(JOBTOKEN_BROKER_SOCKET=site.socket, JOBTOKEN_JOB_ID=job_id,
                    JOBTOKEN_WRAP_MODE=mode, JOBTOKEN_WORK_DIR=str(site.base / "work"),
                    JOBTOKEN_WALLTIME="600", BEARER_TOKEN="stale-token-from-the-pilot")


def start_payload(site: Site, job_id: str, mode: str, argv: List[str]) -> subprocess.Popen:
    return subprocess.Popen([PILOT_WRAP, *argv], env=wrap_env(site, job_id, mode),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def token_reader() -> List[str]:
    return [sys.executable, str(PAYLOADS / "check_token.py"), "--until-tokens", str(TOKENS),
            "--seconds", "300", "--interval", "0.1"]


def job_mytoken(site: Site, job_id: str) -> Optional[object]:
    """The job mytoken the broker minted for ``job_id`` (its record at the server)."""
    for record in site.children():
        if record.name == f"jobtoken {job_id}":
            return record
    return None


def finished(site: Site, proc: subprocess.Popen, job_id: str) -> Dict[str, object]:
    """Wait for a token-reading payload; check what it read and that its job is over."""
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["bad"] == 0, summary  # no missing, torn or expired read, ever
    assert summary["tokens"] >= TOKENS, summary  # renewed while it ran
    assert summary["has_bearer_token"] is False and summary["env_mytoken"] == []
    record = job_mytoken(site, job_id)
    assert record is not None, f"no job mytoken named for {job_id}"
    wait_for(lambda: record.revoked, 60, f"{job_id}'s job mytoken revoked at its end")
    return summary


def test_one_broker_serves_payloads_in_sequence_and_in_parallel(pilot: Site) -> None:
    started = time.monotonic()
    for i, mode in enumerate(("run", "exec")):
        finished(pilot, start_payload(pilot, f"seq-{i}", mode, token_reader()), f"seq-{i}")
    procs = {f"par-{i}": start_payload(pilot, f"par-{i}", mode, token_reader())
             for i, mode in enumerate(("run", "exec", "run", "exec"))}
    for job_id, proc in procs.items():
        finished(pilot, proc, job_id)
    assert time.monotonic() - started > 3 * LIFETIME_S  # the payloads outlived their tokens
    # each payload had its own job mytoken, for its own path, and none is left anywhere
    names = sorted(r.name for r in pilot.children())
    assert names == sorted(f"jobtoken {j}" for j in ["seq-0", "seq-1", *procs])
    wait_for(lambda: not pilot.mytoken_files(), 30, "the broker forgets every job")
    # `run` made and removed its token directories; `exec` leaves only empty ones
    assert [list(d.iterdir()) for d in (pilot.base / "work").iterdir()] == [[]] * 3


def pid_file_payload(path: Path) -> List[str]:
    return ["/bin/sh", "-c", f'echo $$ > "{path}.tmp" && mv "{path}.tmp" "{path}"; '
            "exec sleep 300"]


@pytest.mark.parametrize("mode,victim", [("run", "payload"), ("run", "wrapper"),
                                         ("exec", "payload")])
def test_a_payload_killed_with_9_still_gets_its_job_mytoken_revoked(
        pilot: Site, tmp_path: Path, mode: str, victim: str) -> None:
    pid_file = tmp_path / "payload.pid"
    proc = start_payload(pilot, "doomed", mode, pid_file_payload(pid_file))
    try:
        wait_for(pid_file.exists, 120, "the payload started")
        record = job_mytoken(pilot, "doomed")
        assert record is not None and not record.revoked
        pid = int(pid_file.read_text())
        assert (pid == proc.pid) == (mode == "exec")  # exec: the payload is the wrapper
        os.kill(proc.pid if victim == "wrapper" else pid, signal.SIGKILL)
        # (not communicate: an orphaned payload holds the pipes)
        proc.wait(timeout=120)
        # killed itself, or (run mode) ended as its payload did
        assert proc.returncode == -signal.SIGKILL
        wait_for(lambda: record.revoked, 60, "the killed job's mytoken revoked")
        wait_for(lambda: not pilot.mytoken_files(), 30, "the broker forgets the job")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if victim == "wrapper" and pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_run_mode_passes_exit_code_and_signal_death_through(pilot: Site) -> None:
    exit_with = [sys.executable, str(PAYLOADS / "exit_with.py")]
    for job_id, argv, expected in (("code", [*exit_with, "code", "3"], 3),
                                   ("sig", [*exit_with, "signal", "15"], -15)):
        proc = start_payload(pilot, job_id, "run", argv)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == expected, err
        record = job_mytoken(pilot, job_id)
        assert record is not None
        wait_for(lambda record=record: record.revoked, 60, f"{job_id} revoked")


def test_a_broker_that_does_not_answer_fails_75_before_the_payload(tmp_path: Path) -> None:
    home = tmp_path / "pilot"
    home.mkdir(mode=0o700)
    dead = home / "broker.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))  # a socket file nobody listens on: the broker died
    marker = tmp_path / "payload-ran"
    proc = subprocess.run(
        [PILOT_WRAP, "touch", str(marker)], capture_output=True, text=True, timeout=120,
        env=base_env(JOBTOKEN_BROKER_SOCKET=str(dead), JOBTOKEN_WORK_DIR=str(home)))
    assert proc.returncode == 75, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "broker" in proc.stderr
    assert not marker.exists()
    assert [p.name for p in home.iterdir()] == ["broker.sock"]  # no directory left behind


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a socket to another uid")
def test_a_node_brokers_socket_is_left_alone(tmp_path: Path, srv: DevServer,
                                             parent_file: Path) -> None:
    """A pilot in a slot of an execute point with a node broker inherits its socket
    variable; that broker is not the pilot's, so the wrapper works as without one."""
    node = tmp_path / "run"
    node.mkdir()
    sock_path = node / "broker.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
    os.chown(sock_path, 61999, 61999)
    proc = subprocess.run(
        [PILOT_WRAP, "/bin/sh", "-c",
         'test -s "$BEARER_TOKEN_FILE" && test -f "$JOBTOKEN_DIR/job.json"'],
        capture_output=True, text=True, timeout=120,
        env=pilot_env(srv.url, parent_file, tmp_path, JOBTOKEN_BROKER_SOCKET=str(sock_path)))
    assert proc.returncode == 0, proc.stderr  # the classic way: a job.json of its own


def test_run_broker_called_in_process_supervises_here_and_releases(
        pilot: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``main()`` in process (no exec into the waiter): the same register, prepare,
    payload, release, in this interpreter."""
    from jobtoken.cli import main

    monkeypatch.delenv("BEARER_TOKEN", raising=False)
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    monkeypatch.setenv("JOBTOKEN_WORK_DIR", str(work))
    code = main(["run", "--broker", pilot.socket, "--job-id", "inproc", "--", "/bin/sh", "-c",
                 'test -s "$BEARER_TOKEN_FILE" && exit 7'])
    assert code == 7
    record = job_mytoken(pilot, "inproc")
    assert record is not None
    wait_for(lambda: record.revoked, 60, "the in-process job's mytoken revoked")
    assert list(work.iterdir()) == []  # the directory it made is gone
