"""The waiting process of ``jobtoken run``: forward signals, sleep, wake a step child on time.

Why it exists: a job holds its ``jobtoken run`` process for hours, on every job slot
of a node, so its resident memory is paid per job. Any stdlib module beyond the
interpreter's own costs: ``dataclasses`` 2.5 MiB, ``logging`` 2.1, ``subprocess`` 2.0,
``typing`` 1.5, ``signal`` 0.75 (its enums). ``jobtoken run`` therefore does its setup,
first token and payload start in a full process (``_run.run_job``), then ``exec``s this
file in a fresh interpreter (same pid, so the batch system and the payload see no
change; the payload stays our child; the sidecar lock is kept across ``exec``).

``jobtoken sidecar`` waits here too (``watch`` mode: plan key ``pidfd``, or ``start``
without one): the process it watches is not its child, so its end is seen through a
pidfd (or, on kernels without them, its ``/proc`` start time, polled), its signals
go through that pidfd, and TERM/INT/HUP (plan key ``stop``) end the waiting instead of
being forwarded; the finishing step then cleans up as the sidecar (``--sidecar``).

This process decides nothing about tokens. When a wake-up instant comes (or the token
file changed under it: ``jobtoken ensure`` renewed), it starts one step child
(``python -m jobtoken._runstep DIR``), which runs the real ``Sidecar`` tick (renewal in
process, escalation, ``state.json``) and answers one line: the next instant, the token
file's mtime to watch, and what to do to the payload (a warning signal, a stop). When
the payload ends it ``exec``s the finishing step, which cleans up (``Sidecar.finish``)
and ends the way the payload ended (``_supervisor.exit_like``).

Must NOT: import anything but builtin modules (``_signal``, not ``signal``: the test
``test_the_waiting_run_process_imports_nothing_heavy`` lists what it may hold), import
the ``jobtoken`` package (it is imported alone, with ``-I -S``), log, or read a secret.
The terminal helpers below are shared with ``_supervisor``: one place for that rule.

Usage (by ``_run`` only): ``python -I -S -c "...; import _waiter; _waiter.main(...)"
PLAN [STEP ARGS...]`` with the package directory on ``sys.path``, PLAN being
``key=value`` words joined by ``;`` (see ``Waiter``).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # builtin; typeshed stubs only ``signal``
import os
import select
import sys
import time

__all__ = ["delivered_by_terminal", "foreground_pgrp", "main", "open_controlling_tty"]

_STAT_EVERY_S = 60.0  # as _sidecar: how often the token file is checked for outside renewals
_FINISH_WAIT_S = 5.0  # a step in flight when the payload ends may be writing a token
#: A step starts this much before its instant and waits there with its modules loaded:
#: an interpreter's start-up takes seconds on a loaded node, and short tokens have no
#: seconds to spare.
LEAD_S = 3.0
_TERMINAL_SIGNALS = (_signal.SIGINT, _signal.SIGQUIT)


def delivered_by_terminal(signum: int, foreground_pgrp: int | None, own_pgrp: int) -> bool:
    """Whether the tty already sent ``signum`` to the payload (it shares our group).

    True for the terminal's INT/QUIT while our group is in the foreground. A ``kill``
    of our pid alone from elsewhere at that moment is then not forwarded: the price of
    not doubling every Ctrl-C.
    """
    return signum in _TERMINAL_SIGNALS and foreground_pgrp == own_pgrp


def open_controlling_tty() -> int | None:
    """A descriptor on our controlling terminal, or ``None`` in a batch job."""
    try:
        return os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None


def foreground_pgrp(tty_fd: int | None) -> int | None:
    if tty_fd is None:
        return None
    try:
        return os.tcgetpgrp(tty_fd)
    except OSError:
        return None


def encode_plan(**fields: object) -> str:
    """``key=value;...`` (values without ``;`` or ``=``; ``None`` as ``-``)."""
    return ";".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())


def decode_plan(text: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in text.strip().split(";"):
        if "=" in item:
            key, _, value = item.partition("=")
            out[key] = None if value == "-" else value
    return out


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _int(value: str | None) -> int | None:
    return int(value) if value else None


def _given(plan: dict[str, str | None], key: str) -> str:
    """A key ``_run`` always writes; a plan without it is a bug, said by name."""
    value = plan.get(key)
    if value is None:
        raise ValueError(f"_waiter: the plan has no {key}")
    return value


def _ints(value: str | None) -> tuple[int, ...]:
    return tuple(int(s) for s in (value or "").split(",") if s)


def start_ticks(pid: int) -> int | None:
    """The start time of a live process (``/proc/PID/stat`` field 22), None once it is
    gone or a zombie. (The fallback where the kernel has no pidfd.)"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 1 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


#: How often a watched process is looked at where the kernel has no pidfd.
_POLL_WATCHED_S = 2.0


class _Step:
    """One step child: its pid, its stdout pipe and what it said so far."""

    def __init__(self, argv: list[str], adopt: str | None = None) -> None:
        if adopt:  # "PID,FD": started by ``_run`` before the exec (see ``early_step``)
            pid_text, fd_text = adopt.split(",")
            self.pid, self.fd = int(pid_text), int(fd_text)
            os.set_blocking(self.fd, False)
            self.started = time.monotonic()
            self.out = b""
            self.eof = False
            return
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: stdout is the pipe, nothing else of ours stays open
            try:
                os.dup2(write_fd, 1)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.closerange(3, 1 << 16)
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.pid = pid
        self.fd = read_fd
        self.started = time.monotonic()
        self.out = b""
        self.eof = False  # then only its exit (SIGCHLD) is waited for, not the pipe

    def read(self) -> None:
        try:
            while True:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    self.eof = True
                    return
                self.out += chunk[: 1 << 16]
        except BlockingIOError:
            pass

    def poll(self) -> dict[str, str | None] | None:
        """The step's answer once it ended (``{}`` if it said nothing), else None."""
        self.read()
        pid, _ = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.read()
        os.close(self.fd)
        lines = self.out.decode("ascii", "replace").strip().splitlines()
        return decode_plan(lines[-1]) if lines else {}

    def kill(self) -> None:
        try:
            os.kill(self.pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.fd)


class Waiter:
    """The loop; ``plan`` is what ``_run`` handed over (see ``main``)."""

    def __init__(self, plan: dict[str, str | None], step_args: list[str]) -> None:
        self.payload = int(_given(plan, "payload"))
        self.dir = plan["dir"]
        self.grace = _float(plan.get("grace"))
        self.step_limit = float(_given(plan, "limit"))
        self.next_at = _float(plan.get("next"))
        self.watch = plan.get("watch")
        self.token_file = _given(plan, "bt")
        self.forward = _ints(plan.get("forward"))
        # watch mode (``jobtoken sidecar``): the payload is not our child
        self.pidfd = _int(plan.get("pidfd"))
        self.start = _int(plan.get("start"))
        self.watching = self.pidfd is not None or self.start is not None
        self.stop_on = _ints(plan.get("stop"))
        self.stopped_by: int | None = None
        self.step_args = list(step_args)
        self.pending: list[int] = []
        self.forwarded: list[int] = []
        self.kill_at: float | None = None
        self.stop_requested = False
        self.killed = False
        self.step = _Step([], plan["step"]) if plan.get("step") else None
        self.next_stat = time.monotonic() + _STAT_EVERY_S

    def _record(self, signum: int, frame: object) -> None:
        if signum != _signal.SIGCHLD:
            self.pending.append(signum)

    def run(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        _signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in self.forward + self.stop_on + (_signal.SIGCHLD,):
            # _run left these blocked across exec, so none was lost; SIG_IGN ones
            # (nohup) stay ignored, as the payload inherited them
            if signum == _signal.SIGCHLD or _signal.getsignal(signum) != _signal.SIG_IGN:
                _signal.signal(signum, self._record)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, self.forward + self.stop_on)
        tty_fd = open_controlling_tty()
        status = 0
        while True:
            self._forward_pending(tty_fd)
            if self.watching:
                if self.stopped_by is not None or self._watched_gone():
                    break
            else:
                pid, status = os.waitpid(self.payload, os.WNOHANG)
                if pid:
                    break
            self._kill_if_due()
            self._collect_step()
            if self.step is None and self._step_due():
                at = () if self.next_at is None else ("--at", repr(self.next_at))
                self.step = _Step(self._step_argv(at))
            ready, _, _ = select.select(
                [read_fd] + ([self.step.fd] if self.step and not self.step.eof else [])
                + ([self.pidfd] if self.pidfd is not None else []), [], [],
                self._timeout_s(),
            )
            if read_fd in ready:
                try:
                    while os.read(read_fd, 4096):
                        pass
                except BlockingIOError:
                    pass
        self._finish_step()
        _signal.set_wakeup_fd(-1)
        if self.watching:
            extra = ["--finish", "--sidecar", "--payload-pid", str(self.payload)]
            if self.stopped_by is not None:
                extra += ["--stopped-by", str(self.stopped_by)]
        else:
            extra = ["--finish", "--returncode", str(os.waitstatus_to_exitcode(status)),
                     "--payload-pid", str(self.payload)]
        if self.forwarded:
            extra += ["--forwarded", ",".join(str(s) for s in self.forwarded)]
        if self.stop_requested:
            extra.append("--stop-requested")
        if self.killed:
            extra.append("--killed")
        argv = self._step_argv(extra)
        sys.stdout.flush()
        os.execv(argv[0], argv)  # the lock fd (inheritable) goes along; we end there

    def _step_argv(self, extra: list[str] | tuple[str, ...]) -> list[str]:
        argv = [sys.executable, "-m", "jobtoken._runstep", self.dir, *self.step_args, *extra]
        if self.watch is not None:
            argv += ["--watch", self.watch]
        if self.stop_requested:
            argv.append("--stopped")
        return argv

    def _watched_gone(self) -> bool:
        if self.pidfd is not None:
            readable, _, _ = select.select([self.pidfd], [], [], 0)
            return bool(readable)
        return start_ticks(self.payload) != self.start

    def _forward_pending(self, tty_fd: int | None) -> None:
        while self.pending:
            signum = self.pending.pop(0)
            if signum in self.stop_on:
                self.stopped_by = signum
                continue
            if delivered_by_terminal(signum, foreground_pgrp(tty_fd), os.getpgrp()):
                continue
            if self._send(signum):
                self.forwarded.append(signum)

    def _send(self, signum: int) -> bool:
        """Signal the payload: our unreaped child (its pid cannot be reused), or the
        watched process through its pidfd (nor can that be fooled)."""
        try:
            if self.pidfd is not None:
                _signal.pidfd_send_signal(self.pidfd, signum)
            elif self.watching:
                if start_ticks(self.payload) != self.start:
                    return False
                os.kill(self.payload, signum)
            else:
                os.kill(self.payload, signum)
        except ProcessLookupError:
            return False
        return True

    def _kill_if_due(self) -> None:
        if self.kill_at is not None and time.monotonic() >= self.kill_at:
            self.kill_at = None
            self.killed = True
            self._send(_signal.SIGKILL)

    def _step_due(self) -> bool:
        if self.next_at is not None and time.time() >= self.next_at - LEAD_S:
            return True
        if self.watch is not None and time.monotonic() >= self.next_stat:
            self.next_stat = time.monotonic() + _STAT_EVERY_S
            try:
                mtime: str | None = str(os.stat(self.token_file).st_mtime_ns)
            except OSError:
                mtime = None
            return mtime != self.watch
        return False

    def _collect_step(self) -> None:
        step = self.step
        if step is None:
            return
        answer = step.poll()
        if answer is None:
            if time.monotonic() - step.started <= LEAD_S + self.step_limit:
                return
            step.kill()  # the step's own renewal limit failed to end it: retry later
            answer = {"next": str(time.time() + _STAT_EVERY_S), "watch": self.watch}
        self.step = None
        if "next" not in answer:  # died without answering: retry, never spin
            answer = {"next": str(time.time() + _STAT_EVERY_S), "watch": self.watch}
        self.next_at = _float(answer.get("next"))
        self.watch = answer.get("watch")
        signum = _int(answer.get("signal"))
        if signum:
            self._send(signum)
        if answer.get("stop") == "1" and not self.stop_requested:
            self.stop_requested = True
            self._send(_signal.SIGTERM)
            if self.grace is not None:
                self.kill_at = time.monotonic() + max(0.0, self.grace)

    def _finish_step(self) -> None:
        """Let a step in flight end (its token may already be on disk), then stop it."""
        step = self.step
        if step is None:
            return
        try:  # a step still waiting for its instant ends at once; one at work goes on
            os.kill(step.pid, _signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + _FINISH_WAIT_S
        while step.poll() is None:
            if time.monotonic() >= deadline:
                step.kill()
                break
            select.select([] if step.eof else [step.fd], [], [], 0.05)
        self.step = None

    def _timeout_s(self) -> float | None:
        now = time.time()
        mono = time.monotonic()
        timeouts = []
        if self.step is not None:
            timeouts.append(self.step.started + LEAD_S + self.step_limit - mono + 0.1)
        elif self.next_at is not None:
            timeouts.append(self.next_at - LEAD_S - now)
        if self.watch is not None and self.step is None:
            timeouts.append(self.next_stat - mono)
        if self.kill_at is not None:
            timeouts.append(self.kill_at - mono)
        if self.watching and self.pidfd is None:
            timeouts.append(_POLL_WATCHED_S)
        return max(0.0, min(timeouts)) if timeouts else None


def main(argv: list[str]) -> None:
    Waiter(decode_plan(argv[0]), argv[1:]).run()


if __name__ == "__main__":
    main(sys.argv[1:])
