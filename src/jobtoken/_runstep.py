"""The short-lived processes behind ``jobtoken run``'s waiting process (``_waiter``).

A step: rebuild the job's ``Sidecar`` from ``state.json``, run its tick to the end
(the renewal runs in this process, under the same time limit the sidecar gives a
renewal child), and answer the waiter with one line: when to wake next, which token
file mtime to watch, and whether to signal or stop the payload. The decisions are
``Sidecar``'s and ``_policy``'s, unchanged; only where they run differs.

The finish (``--finish``): the waiter ``exec``s this when the payload ended, in the
same pid; it cleans up (``Sidecar.finish``) and ends the way the payload ended
(``_run.job_exit``). With ``--sidecar`` it ends ``jobtoken sidecar`` (0, or 69 when the
credential was lost); with ``--broker`` a broker-served run (``_pilotrun``: release).

Both log exactly as the ``jobtoken run`` that started them (its ``-v``/``-q``, log file
and JSON setting are passed along). Never prints a token: the answer has none.

Usage (by ``_waiter`` only): ``python -m jobtoken._runstep DIR [options]``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ._errors import RenewalReport, ServerUnavailableError
from ._tokendir import JobRecord, TokenDir

__all__ = ["main", "step_arguments"]

logger = logging.getLogger("jobtoken._run")


def step_arguments(
    *, spec: JobRecord, verbose: int, quiet: int, log_file: Optional[str]
) -> List[str]:
    """What ``run`` passes to every step: the job's settings as ``run`` holds them (its
    command line wins over ``job.json``, and the directory may vanish under a job, as it
    could under the in-process sidecar), and how it logs."""
    args = ["--spec", spec.to_json(), f"-v{verbose}", f"-q{quiet}"]
    if log_file:
        args += ["--log-file", log_file]
    return args


class _Overran(Exception):
    pass


class _InProcessRenewal:
    """A renewal run here and now, as ``Sidecar`` would run it in a child (``ChildHandle``)."""

    def __init__(self, tokendir: TokenDir, limit_s: float, args: Tuple[str, ...]) -> None:
        from ._renewal import renew

        # as the renewal child does first: a vanished directory fails with that message
        min_valid = float(args[args.index("--min-valid") + 1]) if "--min-valid" in args else None

        def overran(signum: int, frame: object) -> None:
            raise _Overran()

        previous = signal.signal(signal.SIGALRM, overran)
        signal.setitimer(signal.ITIMER_REAL, max(limit_s, 0.001))
        try:
            self.report = renew(TokenDir.existing(tokendir.path), min_valid_s=min_valid)
        except _Overran:
            self.report = RenewalReport.failure(ServerUnavailableError(
                f"renewal took longer than {limit_s:.0f} s; killed"
            ))
        except Exception as exc:  # reported like the child's outcome; the sidecar decides
            self.report = RenewalReport.failure(exc)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def poll(self) -> Optional[RenewalReport]:
        return self.report

    def kill(self) -> None:
        pass


def _sidecar(tokendir: TokenDir, args: argparse.Namespace, actions: dict[str, Any]) -> Any:
    from . import _policy as policy
    from ._sidecar import Sidecar

    spec = JobRecord.from_json(args.spec, "the run's command line")
    limit = policy.child_timeout_s(spec.timeout_s, requests=4)

    def send(sig: int) -> None:
        actions["signal"] = sig

    def stop() -> None:
        actions["stop"] = 1

    sidecar = Sidecar(
        tokendir, spec, spawn=lambda *a: _InProcessRenewal(tokendir, limit, a),
        send_signal=send, stop_payload=stop,
    )
    watched = int(args.watch) if args.watch else None
    sidecar.resume(tokendir.read_state(), watched_mtime=watched, stopped=args.stopped)
    return sidecar


def _wait_until(at: Optional[float]) -> None:
    """Sleep until the waiter's instant with the renewal's modules loaded; TERM (the
    payload ended meanwhile) ends the step before it did anything."""
    from . import _exchange, _mytoken  # noqa: F401  (loaded now, not at the instant)
    from ._clock import SystemClock

    def end(signum: int, frame: object) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, end)
    try:
        clock = SystemClock()
        while at is not None and clock.now() < at:
            time.sleep(min(at - clock.now(), 1.0))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _step(tokendir: TokenDir, args: argparse.Namespace) -> str:
    from ._waiter import encode_plan

    actions: dict[str, Any] = {"signal": None, "stop": 0}
    sidecar = _sidecar(tokendir, args, actions)
    _wait_until(args.at)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # at work: the waiter gives us 5 s
    sidecar.tick()
    while sidecar.busy:
        sidecar.tick()
    return encode_plan(
        next=sidecar.next_wakeup(watch=False), watch=sidecar.watched_mtime, **actions
    )


def _finish(tokendir: TokenDir, args: argparse.Namespace) -> int:
    from ._run import job_exit

    sidecar = _sidecar(tokendir, args, {})
    sidecar.stopped_payload = args.stop_requested
    result = _payload_result(args, sidecar.state.payload_pid or 0)
    logger.info("payload ended pid=%d exit_status=%s signal=%s", result.pid,
                result.exit_status, result.signal or "none")
    sidecar.finish()
    return job_exit(result, stopped_payload=sidecar.stopped_payload)


def _finish_sidecar(tokendir: TokenDir, args: argparse.Namespace) -> int:
    """The end of ``jobtoken sidecar``: its process ended (or TERM/INT/HUP came)."""
    from ._errors import ExitCode

    sidecar = _sidecar(tokendir, args, {})
    if args.stopped_by is not None:
        logger.info("sidecar stopped by signal %d; cleaning up", args.stopped_by)
    else:
        logger.info("watched process %d ended; cleaning up", args.payload_pid)
    sidecar.finish()
    return int(ExitCode.CREDENTIAL_LOST) if sidecar.state.credential_lost else 0


def _payload_result(args: argparse.Namespace, pid: int) -> Any:
    from ._supervisor import PayloadResult

    forwarded = tuple(int(s) for s in (args.forwarded or "").split(",") if s)
    return PayloadResult(
        pid=args.payload_pid or pid, returncode=args.returncode, forwarded=forwarded,
        stop_requested=args.stop_requested, killed=args.killed,
    )


def _finish_broker(args: argparse.Namespace) -> int:
    """The end of a broker-served run: release the job, end like the payload."""
    from ._pilotrun import BrokerJob, finish_broker_job

    job = BrokerJob(socket=args.broker, job_id=args.job_id or "", tokendir=args.dir,
                    remove_dir=args.remove_dir)
    return finish_broker_job(job, _payload_result(args, 0))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jobtoken-runstep")
    parser.add_argument("dir")
    parser.add_argument("--spec")
    parser.add_argument("--broker", metavar="SOCKET")  # a broker-served run (_pilotrun)
    parser.add_argument("--job-id")
    parser.add_argument("--remove-dir", action="store_true")
    parser.add_argument("--payload-pid", type=int, default=0)
    parser.add_argument("--sidecar", action="store_true")  # the standalone sidecar's waiter
    parser.add_argument("--stopped-by", type=int)
    parser.add_argument("-v", dest="verbose", type=int, default=0)
    parser.add_argument("-q", dest="quiet", type=int, default=0)
    parser.add_argument("--log-file")
    parser.add_argument("--watch")
    parser.add_argument("--at", type=float)
    parser.add_argument("--stopped", action="store_true")
    parser.add_argument("--finish", action="store_true")
    parser.add_argument("--returncode", type=int, default=0)
    parser.add_argument("--forwarded")
    parser.add_argument("--stop-requested", action="store_true")
    parser.add_argument("--killed", action="store_true")
    args = parser.parse_args(argv)
    if args.spec is None and not (args.broker and args.finish):
        parser.error("--spec is required")
    # the terminal's Ctrl-C reaches our whole group; the waiter passes it to the payload
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ._hardening import protect_process
    from ._logsetup import log_to_file, setup_logging

    # a step holds the job mytoken in memory; the finish starts nothing that needs a core
    protect_process(core_limit=not args.finish)
    setup_logging(args.verbose, args.quiet)
    if args.broker:
        return _finish_broker(args)
    tokendir = TokenDir(Path(args.dir))
    try:
        log_to_file(args.log_file, log_json=JobRecord.from_json(args.spec, "--spec").log_json,
                    verbose=args.verbose, quiet=args.quiet)
    except OSError:  # the job's directory went away: stderr still has every event
        pass
    if args.finish and args.sidecar:
        return _finish_sidecar(tokendir, args)
    if args.finish:
        return _finish(tokendir, args)
    sys.stdout.write(_step(tokendir, args) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
