"""``jobtoken credmon``: the access point's credmon for jobtoken credentials.

HTCondor delivers OAuth-type credentials to jobs as ``$_CONDOR_CREDS/<name>.use``;
the credd stores what the storer gave it as ``<cred dir>/<user>/<name>.top`` and
waits for a credmon to produce the ``.use``. This credmon follows the conventions of
HTCondor's own credmons (read from their sources): the credential directory is
``SEC_CREDENTIAL_DIRECTORY_OAUTH``; the credmon's pid goes into ``<cred dir>/pid`` so
that the credd can wake it with SIGHUP after storing a credential; ``CREDMON_COMPLETE``
is removed at start and touched after every full scan; every ``.use`` is written to a
temporary file in the same directory and renamed into place. The credd itself sweeps
users' credentials after ``SEC_CREDENTIAL_SWEEP_DELAY`` (``<user>.mark`` files).

What ``.use`` carries: the per-submission mytoken (JSON ``{"mytoken": ..}``), not an
access token. The execute point's prepare hook mints the *per-job* sub-mytoken from it
(job-id path in the scope, expiry at the job's wall time) and the job's sidecar renews
from that; an access token minted here could only carry the per-user/service scope,
and ``access_token`` is deliberately absent so that no tool mistakes the mytoken for
a bearer token. See docs/htcondor.md.

It stays in its lane: ``.top`` files that are not jobtoken JSON (other credmons' vault
or OAuth material) are never touched.

Must NOT: make network calls (nothing here needs the Mytoken server), log a mytoken,
or delete anything but the ``.use`` files it produced.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._clock import Clock, SystemClock
from .._errors import ConfigError, JobtokenError, TokenFileError
from .._mytokenfile import check_mytoken_value
from .._tokenfile import remove_secret_file, write_secret_file

__all__ = [
    "COMPLETE_MARKER",
    "PID_FILE",
    "ScanReport",
    "check_cred_dir",
    "run_credmon",
    "scan_credentials",
    "use_content",
]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "CREDMON_COMPLETE"
PID_FILE = "pid"
_MAX_TOP_BYTES = 64 * 1024


@dataclass(frozen=True)
class ScanReport:
    written: Tuple[str, ...] = ()  # "<user>/<name>" whose .use was (re)written
    unchanged: Tuple[str, ...] = ()
    expired: Tuple[str, ...] = ()  # .use removed: the mytoken has expired
    foreign: Tuple[str, ...] = ()  # not jobtoken's
    errors: Tuple[str, ...] = ()


def check_cred_dir(path: Path) -> Path:
    """The credential directory must exist and be closed to others (as the credmons require).

    Raises:
        ConfigError: missing, not a directory, or open to others.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"credential directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"credential directory {path} is not a directory")
    if st.st_mode & stat.S_IRWXO:
        raise ConfigError(f"credential directory {path} is accessible by others")
    return path


def use_content(top: bytes, where: str) -> Optional[Dict[str, Any]]:
    """The ``.use`` JSON for a jobtoken ``.top``, or None when the ``.top`` is not ours.

    Raises:
        ConfigError: jobtoken JSON whose mytoken is unusable.
    """
    try:
        data = json.loads(top.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("mytoken"), str):
        return None
    out: Dict[str, Any] = {"mytoken": check_mytoken_value(data["mytoken"], where)}
    for key in ("mytoken_server", "expires_at", "mom_id", "scopes", "audiences"):
        if key in data:
            out[key] = data[key]
    return out


def _read_top(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        return os.read(fd, _MAX_TOP_BYTES + 1)[:_MAX_TOP_BYTES]
    finally:
        os.close(fd)


def scan_credentials(
    cred_dir: Path, *, now: float, providers: Optional[Sequence[str]] = None
) -> ScanReport:
    """Produce or refresh every jobtoken ``.use`` under ``cred_dir``; never raises for one file."""
    written: List[str] = []
    unchanged: List[str] = []
    expired: List[str] = []
    foreign: List[str] = []
    errors: List[str] = []
    for user_dir in sorted(cred_dir.iterdir()):
        if user_dir.is_symlink() or not user_dir.is_dir():
            continue
        for top in sorted(user_dir.glob("*.top")):
            name = top.name[: -len(".top")]
            label = f"{user_dir.name}/{name}"
            if providers and name.split("_")[0] not in providers and name not in providers:
                foreign.append(label)
                continue
            use = top.with_suffix(".use")
            try:
                content = use_content(_read_top(top), str(top))
                if content is None:
                    foreign.append(label)
                    continue
                exp = content.get("expires_at")
                if isinstance(exp, (int, float)) and exp <= now:
                    if remove_secret_file(use):
                        logger.info("credential expired, .use removed cred=%s", label)
                    expired.append(label)
                    continue
                text = json.dumps(content, sort_keys=True)
                if write_secret_file(use, text):
                    logger.info(
                        "credential produced cred=%s mom_id=%s", label, content.get("mom_id") or "-"
                    )
                    written.append(label)
                else:
                    unchanged.append(label)
            except (OSError, JobtokenError) as exc:
                message = exc.message if isinstance(exc, JobtokenError) else exc.strerror
                logger.warning("credential skipped cred=%s error=%s", label, message)
                errors.append(label)
    return ScanReport(
        tuple(written), tuple(unchanged), tuple(expired), tuple(foreign), tuple(errors)
    )


def _mark_incomplete(cred_dir: Path) -> None:
    try:
        os.unlink(cred_dir / COMPLETE_MARKER)
    except FileNotFoundError:
        pass


def _mark_complete(cred_dir: Path) -> None:
    marker = cred_dir / COMPLETE_MARKER
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.close(fd)
    os.utime(marker, None)


def run_credmon(
    cred_dir: Path,
    *,
    interval_s: float = 60.0,
    once: bool = False,
    providers: Optional[Sequence[str]] = None,
    write_pid: bool = True,
    clock: Optional[Clock] = None,
    stop: Optional[threading.Event] = None,
    wake: Optional[threading.Event] = None,
    on_ready: Optional[Any] = None,
) -> int:
    """Scan until told to stop (TERM/INT/QUIT), rescanning at once on SIGHUP.

    Raises:
        ConfigError: unusable credential directory; TokenFileError: the pid file
            cannot be written.
    """
    check_cred_dir(cred_dir)
    real_clock = clock or SystemClock()
    stop = stop or threading.Event()
    wake = wake or threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous: Dict[int, Any] = {}
    if in_main and not once:

        def on_hup(signum: int, frame: Any) -> None:
            wake.set()

        def on_stop(signum: int, frame: Any) -> None:
            stop.set()
            wake.set()

        for sig, handler in (
            (signal.SIGHUP, on_hup),
            (signal.SIGTERM, on_stop),
            (signal.SIGINT, on_stop),
            (signal.SIGQUIT, on_stop),
        ):
            previous[sig] = signal.signal(sig, handler)
    try:
        if write_pid:
            try:
                write_secret_file(cred_dir / PID_FILE, str(os.getpid()), newline=False)
            except TokenFileError as exc:
                raise TokenFileError(f"credmon pid file: {exc.message}") from None
        _mark_incomplete(cred_dir)
        first = True
        while True:
            started = real_clock.monotonic()
            report = scan_credentials(cred_dir, now=real_clock.now(), providers=providers)
            _mark_complete(cred_dir)
            logger.debug(
                "credmon scan written=%d unchanged=%d expired=%d errors=%d",
                len(report.written),
                len(report.unchanged),
                len(report.expired),
                len(report.errors),
            )
            if first and on_ready is not None:
                on_ready()
            first = False
            if once or stop.is_set():
                return 0
            wake.clear()
            remaining = interval_s - (real_clock.monotonic() - started)
            real_clock.wait(wake, max(0.0, remaining))
            if stop.is_set():
                return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def tell_master_ready() -> None:
    """Tell condor_master the credmon is ready (DC_SET_READY), when it started us; best effort."""
    if not os.environ.get("CONDOR_INHERIT"):
        return
    try:
        import htcondor2

        htcondor2.set_ready_state("Ready")
    except Exception as exc:
        logger.warning("cannot tell condor_master the credmon is ready: %s", exc)


def default_cred_dir() -> Path:
    """``SEC_CREDENTIAL_DIRECTORY_OAUTH`` from the HTCondor configuration.

    Raises:
        ConfigError: the bindings are missing or the knob is unset.
    """
    try:
        import htcondor2

        value = htcondor2.param.get("SEC_CREDENTIAL_DIRECTORY_OAUTH")
    except ImportError:
        value = None
    if not value:
        raise ConfigError(
            "no credential directory: give --cred-dir or set SEC_CREDENTIAL_DIRECTORY_OAUTH"
        )
    return Path(value)
