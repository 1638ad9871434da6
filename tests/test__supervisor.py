"""Tests for jobtoken._supervisor with real payload processes.

Two kinds: a driver script (``tests/payloads/supervise.py``, what ``jobtoken run`` does)
started as a separate process so that signals and ``exit_like`` act on it and not on
pytest; and in-process runs for the tick, stop and start-failure behaviour. Every wait
has an explicit timeout; no test sleeps to let time pass (we wait for "ready" lines).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Optional

import psutil
import pytest

from jobtoken._errors import ExitCode, JobtokenError, PayloadStartError, UsageError
from jobtoken._supervisor import (
    DEFAULT_FORWARD_SIGNALS,
    PayloadResult,
    Supervisor,
    _delivered_by_terminal,
    exit_like,
    run_payload,
)

pytestmark = pytest.mark.process

PAYLOADS = Path(__file__).parent / "payloads"
PRINT_SIGNALS = str(PAYLOADS / "print_signals.py")
EXIT_WITH = str(PAYLOADS / "exit_with.py")
SUPERVISE = str(PAYLOADS / "supervise.py")
TIMEOUT_S = 60.0  # liveness, not speed: a loaded machine may stall a child for seconds


class Driver:
    """``supervise.py -- payload`` in its own session, with line reads that time out."""

    def __init__(self, payload: list[str], options: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, SUPERVISE, *options, "--", sys.executable, *payload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # no controlling tty, and pytest's group stays out of it
        )
        self._buffer = b""
        self.ready_pgrp: Optional[int] = None

    def readline(self, timeout_s: float = TIMEOUT_S) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"no line within {timeout_s}s; have {self._buffer!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"payload output ended; have {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def wait_ready(self) -> int:
        line = self.readline()
        assert line.startswith("ready pid="), line
        fields = dict(word.split("=") for word in line.split()[1:])
        self.ready_pgrp = int(fields["pgrp"])
        return int(fields["pid"])

    def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, timeout_s: float = TIMEOUT_S) -> int:
        try:
            self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=TIMEOUT_S)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def driver():
    started: list[Driver] = []

    def start(payload: list[str], options: tuple[str, ...] = ()) -> Driver:
        started.append(Driver(payload, options))
        return started[-1]

    yield start
    for d in started:
        d.close()


def run_driver(payload: list[str], options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SUPERVISE, *options, "--", *payload],
        capture_output=True,
        timeout=TIMEOUT_S,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )


# --- exit status passthrough --------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 2, 255])
def test_exit_code_passes_through(code):
    done = run_driver([sys.executable, EXIT_WITH, "code", str(code)])
    assert done.returncode == code, done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_death_by_signal_is_reraised_on_the_wrapper(sig):
    """The batch system must see ExitBySignal N, not 128+N."""
    done = run_driver([sys.executable, EXIT_WITH, "signal", str(int(sig))])
    assert done.returncode == -sig, done.stderr


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGABRT, signal.SIGSEGV])
def test_payload_death_by_core_signal_leaves_no_core_of_ours(tmp_path, sig):
    """Re-raising a core-dumping signal must not drop a core of the wrapper next to the job's."""
    done = subprocess.run(
        [
            sys.executable,
            SUPERVISE,
            "--allow-core",
            "--",
            sys.executable,
            EXIT_WITH,
            "signal",
            str(int(sig)),
        ],
        capture_output=True,
        timeout=TIMEOUT_S,
        start_new_session=True,
        cwd=tmp_path,
    )
    assert done.returncode == -sig, done.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("core")]


def test_stdout_passes_through_untouched():
    done = run_driver([sys.executable, EXIT_WITH, "echo", "hello", "payload"])
    assert done.returncode == 0
    assert done.stdout == b"hello payload\n"


# --- start failures -----------------------------------------------------------------------


def test_missing_command_exits_127():
    done = run_driver(["/nonexistent/jobtoken-test-payload"])
    assert done.returncode == 127
    assert b"not found" in done.stderr


def test_missing_command_raises_not_found(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(PayloadStartError) as info:
        run_payload([str(tmp_path / "missing")])
    assert info.value.exit_code == ExitCode.NOT_FOUND
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_missing_command_searched_in_payload_path(tmp_path):
    with pytest.raises(PayloadStartError) as info:
        run_payload(["jobtoken-no-such-command"], env={"PATH": str(tmp_path)})
    assert info.value.exit_code == ExitCode.NOT_FOUND


@pytest.mark.parametrize("kind", ["not_executable", "directory"])
def test_command_that_cannot_be_executed_raises_126(tmp_path, kind):
    target = tmp_path / "payload"
    if kind == "directory":
        target.mkdir()
    else:
        target.write_text("#!/bin/sh\nexit 0\n")
        target.chmod(0o644)
    with pytest.raises(PayloadStartError) as info:
        run_payload([str(target)])
    assert info.value.exit_code == ExitCode.CANNOT_EXECUTE
    assert str(target) in str(info.value)


def test_missing_working_directory_is_not_reported_as_missing_command(tmp_path):
    with pytest.raises(PayloadStartError) as info:
        run_payload([sys.executable, EXIT_WITH, "code", "0"], cwd=str(tmp_path / "gone"))
    assert info.value.exit_code == ExitCode.CANNOT_EXECUTE
    assert "working directory" in str(info.value)


def test_empty_command_is_a_usage_error():
    with pytest.raises(UsageError):
        Supervisor([])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, 0, 1000])
def test_uncatchable_signals_cannot_be_forwarded(sig):
    with pytest.raises(UsageError):
        Supervisor([sys.executable], forward_signals=(signal.SIGTERM, sig))


# --- signal forwarding --------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1])
def test_signals_sent_to_the_wrapper_reach_the_payload(driver, sig):
    d = driver([PRINT_SIGNALS])
    payload_pid = d.wait_ready()
    assert payload_pid != d.proc.pid
    os.kill(d.proc.pid, sig)
    assert d.readline() == f"signal {int(sig)}"
    # the wrapper survived the signal and still passes the payload's status on
    d.send_line("exit 7")
    assert d.finish() == 7


def test_several_signals_arrive_in_order(driver):
    d = driver([PRINT_SIGNALS])
    d.wait_ready()
    received = []
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        os.kill(d.proc.pid, sig)
        received.append(d.readline())  # one at a time: the kernel merges equal pending ones
    assert received == [f"signal {int(s)}" for s in (signal.SIGUSR1, signal.SIGUSR2, 1)]
    d.send_line("exit 0")
    assert d.finish() == 0


def test_payload_shares_the_wrapper_process_group(driver):
    d = driver([PRINT_SIGNALS])
    d.wait_ready()
    assert d.ready_pgrp == os.getpgid(d.proc.pid) == d.proc.pid
    d.send_line("exit 0")
    assert d.finish() == 0


def test_signal_ignored_at_start_stays_ignored_for_the_payload():
    done = run_driver([sys.executable, EXIT_WITH, "ignored"], options=("--ignore", "SIGHUP"))
    assert done.returncode == 0
    assert "SIGHUP" in done.stdout.decode().split()
    done = run_driver([sys.executable, EXIT_WITH, "ignored"])
    assert "SIGHUP" not in done.stdout.decode().split()


@pytest.mark.parametrize(
    ("sig", "foreground", "expected"),
    [
        (signal.SIGINT, 100, True),  # Ctrl-C: the tty already told the payload
        (signal.SIGQUIT, 100, True),
        (signal.SIGTERM, 100, False),  # terminals never send TERM
        (signal.SIGINT, 200, False),  # we are in the background: forward
        (signal.SIGINT, None, False),  # no terminal (batch job): forward
    ],
)
def test_terminal_signals_are_not_doubled(sig, foreground, expected):
    assert _delivered_by_terminal(sig, foreground, 100) is expected


def test_waiting_wrapper_stays_small(driver):
    """The resident cost of ``jobtoken run`` while the payload works (brief: <= 12 MiB USS)."""
    d = driver([PRINT_SIGNALS])
    d.wait_ready()
    uss = psutil.Process(d.proc.pid).memory_full_info().uss
    assert uss <= 12 * 1024 * 1024, f"uss={uss / 2**20:.1f} MiB"
    modules = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, jobtoken._supervisor; print(' '.join(sorted(sys.modules)))",
        ],
        capture_output=True,
        timeout=TIMEOUT_S,
        check=True,
        text=True,
    ).stdout.split()
    assert not {"httpx", "jwt", "cryptography", "psutil"} & set(modules)
    d.send_line("exit 0")
    assert d.finish() == 0


# --- in-process: tick, stop, result -------------------------------------------------------


@pytest.fixture
def watchdog():
    """Bound an in-process ``run()``: KILL the payload if it is still there after TIMEOUT_S."""
    done = threading.Event()
    fired: list[int] = []
    watched: list[Supervisor] = []

    def watch() -> None:
        if done.wait(TIMEOUT_S):
            return
        for supervisor in watched:
            if supervisor.pid is not None:
                fired.append(supervisor.pid)
                os.kill(supervisor.pid, signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield watched.append
    done.set()
    thread.join(timeout=TIMEOUT_S)
    assert not fired, "payload had to be killed by the test watchdog"


def test_tick_is_called_at_the_requested_times_in_order(watchdog):
    calls: list[tuple[float, Optional[float]]] = []  # (called at, asked for next)
    supervisor: Optional[Supervisor] = None

    def tick() -> Optional[float]:
        now = time.time()
        if len(calls) == 4:
            assert supervisor is not None
            supervisor.stop_payload(signal.SIGTERM, grace_s=TIMEOUT_S)
            calls.append((now, None))
            return None
        calls.append((now, now + 0.02))
        return now + 0.02

    supervisor = Supervisor([sys.executable, "-c", "import signal; signal.pause()"], tick=tick)
    watchdog(supervisor)
    result = supervisor.run()
    assert len(calls) == 5  # called right after the start, then when asked; none after None
    times = [at for at, _ in calls]
    assert times == sorted(times)
    for (_, requested), (at, _) in zip(calls, calls[1:]):
        assert requested is not None and at >= requested  # never early
    assert result.stop_requested and not result.killed
    assert result.signal == signal.SIGTERM


def test_stop_payload_kills_after_the_grace_period(tmp_path, watchdog):
    supervisor: Optional[Supervisor] = None
    ready = tmp_path / "ready"
    give_up_at = time.monotonic() + TIMEOUT_S

    def tick() -> Optional[float]:
        assert supervisor is not None
        if not ready.exists():  # wait for the payload's handlers (bounded)
            assert time.monotonic() < give_up_at, "payload never became ready"
            return time.time() + 0.01
        supervisor.stop_payload(signal.SIGTERM, grace_s=0.2)
        return None

    # print_signals catches TERM and goes on: only the KILL after the grace ends it
    supervisor = Supervisor(
        [sys.executable, PRINT_SIGNALS, "--no-stdin", "--ready-file", str(ready)], tick=tick
    )
    start = time.monotonic()
    watchdog(supervisor)
    result = supervisor.run()
    assert result.signal == signal.SIGKILL
    assert result.killed and result.stop_requested
    assert time.monotonic() - start >= 0.2


def test_stop_payload_needs_no_kill_when_payload_obeys(watchdog):
    supervisor: Optional[Supervisor] = None

    def tick() -> Optional[float]:
        assert supervisor is not None
        supervisor.stop_payload(signal.SIGTERM, grace_s=TIMEOUT_S)
        return None

    supervisor = Supervisor([sys.executable, "-c", "import signal; signal.pause()"], tick=tick)
    watchdog(supervisor)
    result = supervisor.run()
    assert result.signal == signal.SIGTERM
    assert result.stop_requested and not result.killed
    assert result.exit_code == 128 + signal.SIGTERM


def test_send_signal_warns_the_payload_without_stopping_it(tmp_path, watchdog):
    ready = tmp_path / "ready"
    waiter = (
        "import signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
        "open(sys.argv[1], 'w').close()\n"
        "signal.sigwait({signal.SIGUSR1})\n"
        "sys.exit(42)\n"
    )
    supervisor: Optional[Supervisor] = None
    sent: list[bool] = []
    give_up_at = time.monotonic() + TIMEOUT_S

    def tick() -> Optional[float]:
        assert supervisor is not None
        if not ready.exists():
            assert time.monotonic() < give_up_at, "payload never became ready"
            return time.time() + 0.01
        sent.append(supervisor.send_signal(signal.SIGUSR1))
        return None

    supervisor = Supervisor([sys.executable, "-c", waiter, str(ready)], tick=tick)
    watchdog(supervisor)
    result = supervisor.run()
    assert sent == [True]
    assert result.exit_status == 42  # the payload got the warning and decided itself
    assert not result.stop_requested
    assert supervisor.send_signal(signal.SIGUSR1) is False  # gone: nothing is signalled


def _wait_for_file(path: Path, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        pause.wait(0.005)


def test_signal_arriving_during_a_tick_is_forwarded_after_it(tmp_path, watchdog):
    ready = tmp_path / "ready"
    waiter = (
        "import signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})\n"
        "open(sys.argv[1], 'w').close()\n"
        "signal.sigwait({signal.SIGUSR2})\n"
        "sys.exit(43)\n"
    )
    seen_pid: list[Optional[int]] = []
    supervisor: Optional[Supervisor] = None

    def tick() -> Optional[float]:
        assert supervisor is not None
        seen_pid.append(supervisor.pid)
        _wait_for_file(ready)
        os.kill(os.getpid(), signal.SIGUSR2)  # "the batch system" signals the wrapper
        return None

    supervisor = Supervisor([sys.executable, "-c", waiter, str(ready)], tick=tick)
    watchdog(supervisor)
    result = supervisor.run()
    assert result.exit_status == 43
    assert result.forwarded == (signal.SIGUSR2,)
    assert seen_pid == [result.pid]


def test_stop_payload_from_another_thread_wakes_the_loop(tmp_path, watchdog):
    """No tick: the loop sleeps without timeout; the stop must still get its KILL on time."""
    ready = tmp_path / "ready"
    supervisor = Supervisor(
        [sys.executable, PRINT_SIGNALS, "--no-stdin", "--ready-file", str(ready)]
    )

    def stopper() -> None:
        _wait_for_file(ready)
        supervisor.stop_payload(signal.SIGTERM, grace_s=0.1)  # print_signals shrugs TERM off

    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    watchdog(supervisor)
    result = supervisor.run()
    thread.join(timeout=TIMEOUT_S)
    assert result.signal == signal.SIGKILL and result.killed


def test_run_outside_the_main_thread_is_refused():
    errors: list[BaseException] = []

    def body() -> None:
        try:
            run_payload([sys.executable, EXIT_WITH, "code", "0"])
        except BaseException as exc:  # noqa: B036 - collected for the assertion
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=TIMEOUT_S)
    assert len(errors) == 1 and isinstance(errors[0], JobtokenError)


def test_children_of_the_tick_do_not_confuse_the_wait(watchdog):
    """A renewal run in a short-lived child process (SIGCHLD of its own) is not the payload."""
    helper_codes: list[int] = []
    supervisor: Optional[Supervisor] = None

    def tick() -> Optional[float]:
        assert supervisor is not None
        done = subprocess.run([sys.executable, "-c", "raise SystemExit(3)"], timeout=TIMEOUT_S)
        helper_codes.append(done.returncode)
        if len(helper_codes) == 3:
            supervisor.stop_payload(signal.SIGTERM, grace_s=TIMEOUT_S)
            return None
        return time.time() + 0.01

    supervisor = Supervisor([sys.executable, "-c", "import signal; signal.pause()"], tick=tick)
    watchdog(supervisor)
    result = supervisor.run()
    assert helper_codes == [3, 3, 3]
    assert result.signal == signal.SIGTERM and not result.killed


def test_failing_tick_does_not_lose_the_payload():
    def tick() -> Optional[float]:
        raise RuntimeError("scheduler bug")

    result = run_payload([sys.executable, EXIT_WITH, "code", "5"], tick=tick)
    assert result.exit_status == 5
    assert isinstance(result.tick_error, RuntimeError)


def test_handlers_and_wakeup_fd_are_restored_after_run():
    before = {s: signal.getsignal(s) for s in DEFAULT_FORWARD_SIGNALS + (signal.SIGCHLD,)}
    result = run_payload([sys.executable, EXIT_WITH, "code", "0"])
    assert result.exit_status == 0
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1


def test_payload_environment_is_the_given_one():
    result = run_payload(
        [sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ.get('X') == 'y' else 3)"],
        env={**os.environ, "X": "y"},
    )
    assert result.exit_status == 0


def test_supervisor_refuses_to_run_twice():
    supervisor = Supervisor([sys.executable, EXIT_WITH, "code", "0"])
    supervisor.run()
    with pytest.raises(JobtokenError):
        supervisor.run()


# --- result and exit_like -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "status", "sig", "code"),
    [(0, 0, None, 0), (3, 3, None, 3), (-15, None, 15, 143), (-9, None, 9, 137)],
)
def test_payload_result_views(returncode, status, sig, code):
    result = PayloadResult(pid=1, returncode=returncode)
    assert (result.exit_status, result.signal, result.exit_code) == (status, sig, code)


def test_exit_like_returns_the_exit_status():
    assert exit_like(PayloadResult(pid=1, returncode=42)) == 42


def test_exit_like_falls_back_to_128_plus_n_for_a_signal_we_survive():
    """SIGWINCH's default action is to ignore: we survive and exit 128+28 instead."""
    code = (
        "import sys, signal\n"
        "from jobtoken._supervisor import PayloadResult, exit_like\n"
        "sys.exit(exit_like(PayloadResult(pid=1, returncode=-int(signal.SIGWINCH))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=TIMEOUT_S, capture_output=True)
    assert done.returncode == 128 + signal.SIGWINCH


def test_exit_like_reraises_even_if_the_signal_was_handled():
    code = (
        "import sys, signal\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\n"
        "from jobtoken._supervisor import PayloadResult, exit_like\n"
        "sys.exit(exit_like(PayloadResult(pid=1, returncode=-15)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=TIMEOUT_S, capture_output=True)
    assert done.returncode == -signal.SIGTERM


# --- the two places a job's signals come from -----------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_batch_soft_kill_ends_payload_and_wrapper_by_the_same_signal(driver, sig):
    """``condor_rm``: KillSig goes to the job's top pid (us); both must die by it."""
    d = driver([EXIT_WITH, "wait"])
    d.wait_ready()
    os.kill(d.proc.pid, sig)
    assert d.finish() == -sig


def test_ctrl_c_on_a_terminal_reaches_the_payload_once(tmp_path):
    """Interactive use: the tty signals the whole foreground group; we must not add a copy."""
    master, slave = os.openpty()
    # NOFLSH: Ctrl-C must not also flush the tty's output queue; the kernel signals the
    # group before it flushes, so a quick payload's "signal 2" line could be thrown away
    attrs = termios.tcgetattr(slave)
    attrs[3] |= termios.NOFLSH
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    # a new session whose leader opens the tty by name gets it as controlling terminal
    take_terminal = (
        "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); os.dup2(fd, 0); os.dup2(fd, 1);"
        " os.execv(sys.argv[2], sys.argv[2:])"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            take_terminal,
            os.ttyname(slave),
            sys.executable,
            SUPERVISE,
            "--",
            sys.executable,
            PRINT_SIGNALS,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    buffer = b""

    def read_until(marker: bytes) -> bytes:
        nonlocal buffer
        deadline = time.monotonic() + TIMEOUT_S
        while marker not in buffer:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([master], [], [], left)[0], buffer
            buffer += os.read(master, 4096)  # we keep the slave open: no EIO here
        return buffer

    try:
        read_until(b"ready pid=")
        read_until(b"\n")
        os.write(master, b"\x03")  # Ctrl-C
        read_until(b"signal 2")
        os.kill(proc.pid, signal.SIGUSR1)  # a marker: anything doubled would come first
        out = read_until(b"signal 10")
        os.write(master, b"exit 6\n")
        assert proc.wait(timeout=TIMEOUT_S) == 6
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=TIMEOUT_S)
        os.close(master)
        os.close(slave)
    assert re.findall(r"signal \d+", out.decode()) == ["signal 2", "signal 10"]
