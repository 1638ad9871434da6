"""Run the payload as our child, the way tini does: forward signals, wait, pass the status on.

``jobtoken run -- CMD ARGS`` stays the payload's parent. This module starts the payload,
forwards the signals the job receives, calls the renewal scheduler back when it asks to
be woken (``tick``), stops the payload on request, and reports how it ended so that the
caller can end the same way (``exit_like``).

This module must NOT: import heavy modules (httpx, jwt, cryptography, psutil; the
waiting process has to stay near a bare interpreter), touch the payload's stdin, stdout
or stderr (inherited untouched), block signals (a blocked mask survives ``exec``), do
work inside a signal handler beyond recording the signal, call ``sys.exit`` or print.

Process model (decided):

* The payload stays in jobtoken's process group and session (no ``setsid``). On a
  terminal it keeps the controlling tty and shell job control; a new session would cut it
  off the tty, and a new group would need tini's ``tcsetpgrp`` hand-over, which Python
  cannot do safely between fork and exec.
* Caught signals are forwarded to the payload's pid with ``kill`` (not to a group).
  HTCondor's soft kill (``condor_rm``, vacate: the job's ``KillSig``, default TERM) goes
  to the job's top pid, which is us; forwarding to the payload pid alone gives the
  payload exactly what it would have got without jobtoken. The hard kill (KILL) and
  suspension go to the whole process family or cgroup, which includes the payload.
* Signals sent to the whole process group already reach the payload directly. For the
  terminal's INT and QUIT (Ctrl-C, Ctrl-\\ while our group is the tty's foreground
  group) we therefore do not forward, so the payload sees one Ctrl-C, not two. Other
  group-wide senders (``kill -- -PGID``, SLURM's ``scancel``) deliver twice; payloads
  handle repeated TERM in practice.
* Signals that were ignored when jobtoken started (``nohup``: HUP; ``&`` in a script:
  INT, QUIT) stay ignored, so the payload inherits SIG_IGN as it would have.
* If jobtoken itself is killed with KILL the payload is orphaned; batch systems kill
  the whole family, and ``PR_SET_PDEATHSIG`` would need an unsafe ``preexec_fn``.
* Stop signals (TSTP, TTIN, TTOU) are not handled: on a terminal they reach the whole
  foreground group anyway.
* Signals arriving while ``tick`` runs are forwarded when it returns: keep ticks short.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

from ._clock import Clock, SystemClock
from ._errors import JobtokenError, PayloadStartError, UsageError
from ._policy import exit_code_from_returncode, wait_status_to_exit
from ._waiter import delivered_by_terminal as _delivered_by_terminal
from ._waiter import foreground_pgrp as _foreground_pgrp
from ._waiter import open_controlling_tty as _open_controlling_tty

__all__ = [
    "DEFAULT_FORWARD_SIGNALS",
    "PayloadResult",
    "Supervisor",
    "Tick",
    "exit_like",
    "run_payload",
    "start_payload",
]

logger = logging.getLogger(__name__)

#: What ``kill`` or a batch system sends to a job; all forwarded to the payload.
DEFAULT_FORWARD_SIGNALS: Tuple[int, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
)

#: Signals whose default action dumps core; ``exit_like`` must not leave a core of its own.
_CORE_SIGNALS = frozenset(
    getattr(signal, name)
    for name in (
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGSEGV",
        "SIGSYS",
        "SIGXCPU",
        "SIGXFSZ",
    )
    if hasattr(signal, name)
)

#: Called once right after the payload started, then whenever the instant it returned
#: (wall clock, ``clock.now()``) has come; ``None`` means "no timed wake-up needed".
Tick = Callable[[], Optional[float]]

#: Cannot be caught (KILL, STOP) or is the supervisor's own business (CHLD).
_UNFORWARDABLE = frozenset({signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD})

_WAKE_BYTE = b"\0"  # not a signal number; written by stop_payload to wake the loop


@dataclass(frozen=True)
class PayloadResult:
    """How the payload ended.

    Attributes:
        pid: the payload's process id.
        returncode: ``subprocess`` style: the exit status, or ``-N`` for death by signal N.
        forwarded: the signals forwarded to the payload, in order.
        stop_requested: ``stop_payload`` was called (escalation stopped the payload).
        killed: KILL was sent because the payload outlived the stop grace period.
        tick_error: the exception that made ``tick`` stop being called, if any.
    """

    pid: int
    returncode: int
    forwarded: Tuple[int, ...] = ()
    stop_requested: bool = False
    killed: bool = False
    tick_error: Optional[BaseException] = field(default=None, compare=False)

    @property
    def exit_status(self) -> Optional[int]:
        """The payload's exit status, or ``None`` if a signal ended it."""
        return wait_status_to_exit(self.returncode)[0]

    @property
    def signal(self) -> Optional[int]:
        """The signal that ended the payload, or ``None`` if it exited."""
        return wait_status_to_exit(self.returncode)[1]

    @property
    def exit_code(self) -> int:
        """The shell's view: the exit status, or ``128 + N`` (what a wrapper exits with)."""
        return exit_code_from_returncode(self.returncode)


class Supervisor:
    """Start a payload, forward signals to it, wake the caller on time, report its end.

    Must be run in the main thread (only there can Python install signal handlers).
    ``tick`` is how the renewal scheduler plugs in without a thread: the loop blocks in
    ``select`` on the signal wake-up pipe with a timeout equal to the time until the
    instant ``tick`` last asked for.

    Args:
        argv: the payload command; ``argv[0]`` is searched in ``PATH`` (of ``env``).
        env: the payload's environment (default: ours).
        cwd: the payload's working directory (default: ours).
        forward_signals: signals to catch and forward.
        tick: see ``Tick``.
        clock: the wall and monotonic clocks (tests may inject one).

    Raises:
        UsageError: ``argv`` is empty, or a signal to forward cannot be caught.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        forward_signals: Iterable[int] = DEFAULT_FORWARD_SIGNALS,
        tick: Optional[Tick] = None,
        clock: Optional[Clock] = None,
    ) -> None:
        if not argv:
            raise UsageError("no payload command given: expected 'jobtoken run -- CMD [ARGS]'")
        self._argv = [str(arg) for arg in argv]
        self._env = None if env is None else dict(env)
        self._cwd = cwd
        self._forward_signals = tuple(dict.fromkeys(int(s) for s in forward_signals))
        for signum in self._forward_signals:
            if signum in _UNFORWARDABLE or signum not in signal.valid_signals():
                raise UsageError(f"cannot forward signal {_signame(signum)}: it cannot be caught")
        self._tick = tick
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._pending: Deque[int] = deque()
        self._forwarded: list[int] = []
        self._wake_fd: Optional[int] = None
        self._kill_at: Optional[float] = None
        self._stop_requested = False
        self._killed = False
        self._tick_error: Optional[BaseException] = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> Optional[int]:
        """The payload's pid once started, else ``None``."""
        return None if self._proc is None else self._proc.pid

    def run(self) -> PayloadResult:
        """Start the payload and supervise it until it ends.

        Returns:
            How the payload ended; the caller passes it to ``exit_like``.

        Raises:
            PayloadStartError: the payload cannot be executed (126) or found (127).
            JobtokenError: not called in the main thread, or called twice.
        """
        if threading.current_thread() is not threading.main_thread():
            raise JobtokenError("cannot supervise the payload: not in the main thread")
        if self._proc is not None:
            raise JobtokenError("cannot supervise the payload: this supervisor already ran")
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        tty_fd = _open_controlling_tty()
        previous: Dict[int, Union[Callable[..., object], int, None]] = {}
        old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._wake_fd = write_fd
        try:
            self._install_handlers(previous)
            proc = self._start()
            return self._loop(proc, read_fd, tty_fd)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            signal.set_wakeup_fd(old_wakeup)
            with self._lock:
                self._wake_fd = None
            for fd in (read_fd, write_fd, tty_fd):
                if fd is not None:
                    os.close(fd)
            if self._proc is not None and self._proc.returncode is None:
                logger.error(
                    "supervisor stopped early; payload left running pid=%d", self._proc.pid
                )

    def send_signal(self, sig: int) -> bool:
        """Send ``sig`` to the payload now, e.g. to warn it that its token runs out.

        Returns:
            Whether the payload was still there to receive it.
        """
        proc = self._proc
        if proc is None:
            return False
        logger.info("signalling payload pid=%d signal=%s", proc.pid, _signame(sig))
        return self._send(proc, sig)

    def stop_payload(self, sig: int = signal.SIGTERM, grace_s: Optional[float] = 30.0) -> None:
        """Ask the payload to stop: send ``sig`` now, KILL after ``grace_s`` (never if None).

        Used by escalation when the credential is lost. Returns at once; the supervising
        loop sends the KILL. Safe to call from ``tick`` or from another thread.
        """
        proc = self._proc
        self._stop_requested = True
        if proc is None or proc.returncode is not None:
            return
        logger.info(
            "stopping payload pid=%d signal=%s grace_s=%s", proc.pid, _signame(sig), grace_s
        )
        self._send(proc, sig)
        if grace_s is not None:
            deadline = self._clock.monotonic() + max(0.0, grace_s)
            if self._kill_at is None or deadline < self._kill_at:
                self._kill_at = deadline
        self._wake()

    # --- internals ---------------------------------------------------------------------

    def _install_handlers(
        self, previous: Dict[int, Union[Callable[..., object], int, None]]
    ) -> None:
        for signum in self._forward_signals + (signal.SIGCHLD,):
            current = signal.getsignal(signum)
            if signum != signal.SIGCHLD and current == signal.SIG_IGN:
                logger.debug("signal ignored at start, left ignored signal=%s", _signame(signum))
                continue
            previous[signum] = current
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: object) -> None:
        """Signal handler: only remember the signal; the loop does the work."""
        if signum != signal.SIGCHLD:
            self._pending.append(signum)

    def _wake(self) -> None:
        with self._lock:
            if self._wake_fd is None:
                return
            try:
                os.write(self._wake_fd, _WAKE_BYTE)
            except BlockingIOError:
                pass  # the pipe is full: the loop is going to wake anyway

    def _start(self) -> subprocess.Popen[bytes]:
        proc = start_payload(self._argv, env=self._env, cwd=self._cwd)
        self._proc = proc
        return proc

    def _loop(
        self, proc: subprocess.Popen[bytes], read_fd: int, tty_fd: Optional[int]
    ) -> PayloadResult:
        next_tick_at: Optional[float] = None
        if self._tick is not None:
            next_tick_at = self._call_tick()
        while True:
            self._forward_pending(proc, tty_fd)
            returncode = proc.poll()
            if returncode is not None:
                break
            if self._kill_at is not None and self._clock.monotonic() >= self._kill_at:
                self._kill_at = None
                self._killed = True
                logger.warning("payload outlived its stop grace period; killing pid=%d", proc.pid)
                self._send(proc, signal.SIGKILL)
                continue
            if next_tick_at is not None and self._clock.now() >= next_tick_at:
                next_tick_at = self._call_tick()
                continue
            self._block(read_fd, self._timeout_s(next_tick_at))
        self._pending.clear()
        result = PayloadResult(
            pid=proc.pid,
            returncode=returncode,
            forwarded=tuple(self._forwarded),
            stop_requested=self._stop_requested,
            killed=self._killed,
            tick_error=self._tick_error,
        )
        logger.info(
            "payload ended pid=%d exit_status=%s signal=%s",
            proc.pid,
            result.exit_status,
            _signame(result.signal),
        )
        return result

    def _timeout_s(self, next_tick_at: Optional[float]) -> Optional[float]:
        timeouts = []
        if next_tick_at is not None:
            timeouts.append(next_tick_at - self._clock.now())
        if self._kill_at is not None:
            timeouts.append(self._kill_at - self._clock.monotonic())
        return max(0.0, min(timeouts)) if timeouts else None

    def _block(self, read_fd: int, timeout_s: Optional[float]) -> None:
        """Sleep until a signal, a wake-up or the timeout; no polling."""
        ready, _, _ = select.select([read_fd], [], [], timeout_s)
        if ready:
            try:
                while os.read(read_fd, 4096):
                    pass
            except BlockingIOError:
                pass

    def _call_tick(self) -> Optional[float]:
        assert self._tick is not None
        try:
            return self._tick()
        except Exception as exc:  # keep supervising the payload whatever the scheduler did
            logger.error("tick failed, no more ticks error=%s", type(exc).__name__)
            logger.debug("tick failure details", exc_info=True)
            self._tick_error = exc
            self._tick = None
            return None

    def _forward_pending(self, proc: subprocess.Popen[bytes], tty_fd: Optional[int]) -> None:
        while self._pending:
            signum = self._pending.popleft()
            if _delivered_by_terminal(signum, _foreground_pgrp(tty_fd), os.getpgrp()):
                logger.debug(
                    "signal from terminal reached payload directly signal=%s", _signame(signum)
                )
                continue
            logger.debug("forwarding signal=%s pid=%d", _signame(signum), proc.pid)
            if self._send(proc, signum):
                self._forwarded.append(signum)

    @staticmethod
    def _send(proc: subprocess.Popen[bytes], signum: int) -> bool:
        """Signal the payload unless it is already reaped (guards against pid reuse)."""
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            logger.debug("payload already gone pid=%d signal=%s", proc.pid, _signame(signum))
            return False
        return proc.returncode is None


def start_payload(
    argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None
) -> subprocess.Popen[bytes]:
    """Start the payload (``argv[0]`` searched in ``PATH``); no fd of ours leaks into it.

    Raises:
        PayloadStartError: it cannot be executed (126) or found (127).
    """
    argv0 = argv[0]
    try:
        proc = subprocess.Popen(list(argv), env=env, cwd=cwd, close_fds=True)
    except FileNotFoundError as exc:
        if cwd is not None and exc.filename == cwd:
            raise PayloadStartError(
                f"cannot start payload {argv0!r}: working directory {cwd!r}: {exc.strerror}"
            ) from exc
        raise PayloadStartError(
            f"cannot start payload {argv0!r}: command not found", not_found=True
        ) from exc
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise PayloadStartError(f"cannot execute payload {argv0!r}: {reason}") from exc
    logger.info("payload started pid=%d argv0=%s", proc.pid, argv0)
    return proc


def run_payload(
    argv: Sequence[str],
    *,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    forward_signals: Iterable[int] = DEFAULT_FORWARD_SIGNALS,
    tick: Optional[Tick] = None,
    clock: Optional[Clock] = None,
) -> PayloadResult:
    """Run ``argv`` under a ``Supervisor`` until it ends (see there).

    Raises:
        UsageError: ``argv`` is empty.
        PayloadStartError: the payload cannot be executed (126) or found (127).
        JobtokenError: not called in the main thread.
    """
    supervisor = Supervisor(
        argv, env=env, cwd=cwd, forward_signals=forward_signals, tick=tick, clock=clock
    )
    return supervisor.run()


def exit_like(result: PayloadResult) -> int:
    """End the current process the way the payload ended; else return the exit code.

    A payload that exited returns its status for the caller to exit with. A payload
    killed by signal N makes this process die by N too (handler reset to default,
    unblocked, raised on ourselves), so batch systems record ``ExitBySignal``. Our own
    core dump is disabled first (it would overwrite the payload's ``core`` file). If we
    survive (a signal whose default action is to ignore, such as CHLD or WINCH), this
    returns ``128 + N``. Buffered output and log handlers are flushed before dying.

    Must be called from the main thread to re-raise; elsewhere it only returns the code.
    """
    signum = result.signal
    if signum is None:
        return result.exit_code
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    if threading.current_thread() is threading.main_thread():
        if signum in _CORE_SIGNALS:
            _disable_core_dump()
        try:
            if signum not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
            signal.raise_signal(signum)
        except (OSError, ValueError):
            pass
    return result.exit_code


def _disable_core_dump() -> None:
    try:
        import resource  # lazily: only needed on the way out

        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    except (ImportError, OSError, ValueError):
        pass


def _signame(signum: Optional[int]) -> str:
    if signum is None:
        return "none"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
