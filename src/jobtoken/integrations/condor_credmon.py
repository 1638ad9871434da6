"""``jobtoken credmon``: the access point's credmon for jobtoken credentials.

The credd stores what ``jobtoken condor storer`` gave it as ``<cred dir>/<user>/<name>.top``:
the per-submission mytoken and what it was minted for. This credmon turns each one
into ``<name>.use`` holding a bare **access token** plus newline, and keeps it fresh;
HTCondor copies ``.use`` to the execute point (``$_CONDOR_CREDS/<name>.use``, refreshed
by the starter every ``SEC_CREDENTIAL_REFRESH`` s) and the prepare hook points the job's
``BEARER_TOKEN_FILE`` at it. The mytoken itself never leaves the AP's root-only
credential directory (HTCondor's own Vault credmon and KIT's Mytoken credmon do the same).

Conventions read from HTCondor's credmons and credd (23.9 to 25.x): the directory is
``SEC_CREDENTIAL_DIRECTORY_OAUTH``; a ``.use`` is written to a temporary file in the same
directory and renamed into place; a ``.use`` is renewed when its ``.top`` is newer or
its token is past half its lifetime or within ``min_remaining_s`` of its end.

Living beside the site's own credential machinery: ``CREDMON_OAUTH`` is one daemon
(HTCondor's OAuth/Vault/local credmons, KIT's Mytoken credmon) with one ``<dir>/pid``
and one ``CREDMON_COMPLETE``. When the site runs it, this credmon is a *guest*: it
writes neither, and notices new ``.top`` files by polling their mtimes (cheap ``stat``
calls), since the credd's SIGHUP goes to the pid in the pid file. Alone, it is the
*primary* credmon and writes both. Either way it only touches ``.use`` files whose
``.top`` is jobtoken JSON and whose service it owns.

One user's credential never stops the scan for the others: ``.top`` size and JSON
nesting are bounded before parsing, and each credential's failure is caught and logged
as one line.

Must NOT: log a mytoken or token, delete a ``.use`` (the shadow holds running jobs
whose ``.use`` disappears; the credd sweeps a user's directory when they have no jobs),
follow a symlink in the credential directory, or write anything for a foreign ``.top``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

from .._clock import Clock, SystemClock, utc_text
from .._config import Config
from .._errors import ConfigError, JobtokenError, TokenFileError
from .._mytokenfile import MytokenSource, check_mytoken_value
from .._tokenfile import write_secret_file
from ._condor_bindings import condor_param

if TYPE_CHECKING:  # the token code (jwt, cryptography) loads only when a token is read
    from .._tokens import AccessToken

__all__ = [
    "COMPLETE_MARKER",
    "PID_FILE",
    "ScanReport",
    "TopCredential",
    "check_cred_dir",
    "credmon_log_path",
    "json_depth_within",
    "read_top",
    "refresh_reason",
    "run_credmon",
    "scan_credentials",
]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "CREDMON_COMPLETE"
PID_FILE = "pid"
MAX_TOP_BYTES = 64 * 1024
MAX_JSON_DEPTH = 8
DEFAULT_MIN_REMAINING_S = 300.0 + 60.0 + 60.0  # starter refresh + scan interval + margin

# (now, top) -> the checked access token for the .use; the seam tests replace
Minter = Callable[[float, "TopCredential"], "AccessToken"]


@dataclass(frozen=True)
class TopCredential:
    """A jobtoken ``.top``: the per-submission mytoken and what it may be exchanged for."""

    mytoken: str = field(repr=False)
    server_url: Optional[str]
    mom_id: Optional[str]
    expires_at: Optional[float]
    scopes: Tuple[str, ...]
    audiences: Tuple[str, ...]


@dataclass(frozen=True)
class ScanReport:
    written: Tuple[str, ...] = ()  # "<user>/<name>" whose .use was (re)written
    unchanged: Tuple[str, ...] = ()
    expired: Tuple[str, ...] = ()  # the mytoken has expired; the last .use is left alone
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


def json_depth_within(text: str, limit: int) -> bool:
    """Whether ``text``'s arrays and objects nest at most ``limit`` deep (strings skipped).

    Checked before ``json.loads``, whose recursion a few thousand brackets exhaust.
    """
    depth = 0
    in_string = False
    escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _items(value: Any) -> Tuple[str, ...]:
    """Scope or audience strings from a JSON list (anything else: none)."""
    if isinstance(value, list):
        return tuple(str(s) for s in value if isinstance(s, str) and s)
    return ()


def read_top(data: bytes, where: str) -> Optional[TopCredential]:
    """The jobtoken credential in a ``.top``, or None when the ``.top`` is not ours.

    Raises:
        ConfigError: too large, too deeply nested, or jobtoken JSON with an unusable
            mytoken.
    """
    if len(data) > MAX_TOP_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_TOP_BYTES} bytes")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.lstrip().startswith("{"):
        return None
    if not json_depth_within(text, MAX_JSON_DEPTH):
        raise ConfigError(f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels")
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("mytoken"), str):
        return None
    return _top_credential(doc, where)


def _top_credential(doc: Mapping[str, Any], where: str) -> TopCredential:
    """The fields of a jobtoken ``.top``; a field of the wrong type counts as absent."""
    exp = doc.get("expires_at")
    server = doc.get("mytoken_server")
    mom_id = doc.get("mom_id")
    return TopCredential(
        check_mytoken_value(doc["mytoken"], where),
        server if isinstance(server, str) and server else None,
        mom_id if isinstance(mom_id, str) else None,
        float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None,
        _items(doc.get("jobtoken_scopes")),
        _items(doc.get("jobtoken_audiences")),
    )


def refresh_reason(
    *,
    now: float,
    top_mtime: float,
    use_mtime: Optional[float],
    issued_at: Optional[float],
    expires_at: Optional[float],
    min_remaining_s: float,
) -> Optional[str]:
    """Why the ``.use`` must be minted again, or None while it is good (pure).

    A job reads the ``.use`` up to one starter refresh plus one scan after it was
    written, so a token is renewed while it still has ``min_remaining_s`` left, and
    at half its lifetime (as HTCondor's OAuth credmon does) when that comes first.
    """
    if use_mtime is None or expires_at is None:
        return "missing"
    if top_mtime > use_mtime:
        return "new credential"
    remaining = expires_at - now
    lifetime = expires_at - issued_at if issued_at is not None else 0.0
    if remaining <= max(min_remaining_s, lifetime / 2.0):
        return "expiring"
    return None


def _read_bounded(path: Path, limit: int) -> Tuple[bytes, float]:
    """Content (at most ``limit`` + 1 bytes) and mtime; never follows a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        chunks: List[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks), st.st_mtime
    finally:
        os.close(fd)


def _current_use(use: Path) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """(mtime, iat, exp) of the access token in ``use``; Nones when absent or unreadable."""
    from .._tokens import decode_access_token

    try:
        data, mtime = _read_bounded(use, MAX_TOP_BYTES)
        token = decode_access_token(data.decode("ascii").strip())
    except FileNotFoundError:
        return None, None, None
    except (OSError, UnicodeDecodeError, JobtokenError):
        return None, None, None  # unreadable or not a token: mint a new one
    return mtime, token.issued_at, token.expires_at


def owns(name: str, services: Sequence[str]) -> bool:
    """Whether credential ``name`` (``svc`` or ``svc_handle``) belongs to one of ``services``."""
    return any(name == s or name.startswith(s + "_") for s in services)


def _label(exc: BaseException) -> str:
    if isinstance(exc, JobtokenError):
        return exc.message
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


def scan_credentials(
    cred_dir: Path,
    *,
    now: float,
    mint: Minter,
    services: Sequence[str] = ("jobtoken",),
    min_remaining_s: float = DEFAULT_MIN_REMAINING_S,
    remembered: Optional[Dict[str, str]] = None,
) -> ScanReport:
    """Produce or refresh every jobtoken ``.use`` under ``cred_dir``; never raises for one file.

    Args:
        mint: exchanges a ``TopCredential`` for an access token (``.raw``).
        remembered: last outcome per credential, so a lasting condition (expired,
            broken) is logged once, not every scan.
    """
    memory: Dict[str, str] = {} if remembered is None else remembered
    found: Dict[str, List[str]] = {outcome: [] for outcome in _OUTCOMES}
    for user_dir in sorted(cred_dir.iterdir()):
        if user_dir.is_symlink() or not user_dir.is_dir():
            continue
        for top in sorted(user_dir.glob("*.top")):
            name = top.name[: -len(".top")]
            label = f"{user_dir.name}/{name}"
            if not owns(name, services):
                found["foreign"].append(label)
                continue
            try:
                outcome = _scan_top(top, label, now=now, mint=mint,
                                    min_remaining_s=min_remaining_s, memory=memory)
            except Exception as exc:  # one user's credential must not stop the others
                _note(memory, label, "error:" + _label(exc), logging.WARNING,
                      "credential skipped cred=%s error=%s", label, _label(exc))
                outcome = "errors"
            found[outcome].append(label)
    return ScanReport(**{outcome: tuple(labels) for outcome, labels in found.items()})


# the ScanReport field each credential ends up in
_OUTCOMES = ("written", "unchanged", "expired", "foreign", "errors")


def _note(memory: Dict[str, str], label: str, outcome: str, level: int, message: str,
          *args: Any) -> None:
    """Log ``message`` only when ``label``'s outcome changed: a lasting condition once."""
    if memory.get(label) != outcome:
        logger.log(level, message, *args)
    memory[label] = outcome


def _scan_top(top: Path, label: str, *, now: float, mint: Minter, min_remaining_s: float,
              memory: Dict[str, str]) -> str:
    """Refresh one owned ``.top``'s ``.use`` if due; the ``ScanReport`` field it belongs in."""
    data, top_mtime = _read_bounded(top, MAX_TOP_BYTES)
    cred = read_top(data, str(top))
    if cred is None:
        return "foreign"
    use = top.with_suffix(".use")
    use_mtime, iat, exp = _current_use(use)
    reason = refresh_reason(
        now=now,
        top_mtime=top_mtime,
        use_mtime=use_mtime,
        issued_at=iat,
        expires_at=exp,
        min_remaining_s=min_remaining_s,
    )
    if reason is None:
        return "unchanged"
    if cred.expires_at is not None and cred.expires_at <= now:
        _note(memory, label, "expired", logging.INFO,
              "credential's mytoken expired; .use left as is cred=%s", label)
        return "expired"
    token = mint(now, cred)
    write_secret_file(use, token.raw)
    memory[label] = "ok"
    lifetime = token.expires_at - (token.issued_at or now)
    if lifetime < min_remaining_s:
        _note(
            memory,
            label + "#lifetime",
            "short",
            logging.WARNING,
            "access tokens live %d s, less than %d s (SEC_CREDENTIAL_REFRESH + "
            "scan interval + 60 s): jobs may read expired tokens; lower "
            "SEC_CREDENTIAL_REFRESH on the execute points cred=%s",
            int(lifetime),
            int(min_remaining_s),
            label,
        )
    logger.info(
        "access token written cred=%s reason=%s mom_id=%s jti=%s exp=%s",
        label,
        reason,
        cred.mom_id or "-",
        token.jti,
        utc_text(token.expires_at),
    )
    return "written"


Signature = Tuple[Tuple[str, int], ...]


def top_signature(cred_dir: Path, services: Sequence[str]) -> Signature:
    """(path, mtime_ns) of every owned ``.top``: what a guest credmon polls for changes."""
    found: List[Tuple[str, int]] = []
    try:
        users = list(os.scandir(cred_dir))
    except OSError:
        return ()
    for user in users:
        if not user.is_dir(follow_symlinks=False):
            continue
        try:
            entries = list(os.scandir(user.path))
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(".top") and owns(entry.name[:-4], services):
                try:
                    found.append((entry.path, entry.stat(follow_symlinks=False).st_mtime_ns))
                except OSError:
                    continue
    return tuple(sorted(found))


def token_minter(config: Config) -> Minter:
    """Exchange a ``.top``'s mytoken at its server for a checked access token.

    Only the site's server (``server.url``) is used when one is configured: the
    ``.top`` is written by the user, and this runs as root.
    """
    from .._exchange import TokenRequest, fetch_access_token
    from .._oneshot import build_verifier, client_for

    verifier = build_verifier(config)

    def mint(now: float, cred: TopCredential) -> AccessToken:
        url = config.server.url or cred.server_url
        if not url:
            raise ConfigError(
                "the credential names no Mytoken server and none is configured: set "
                "server.url in JOBTOKEN_CONFIG (or --server in JOBTOKEN_CREDMON_ARGS)"
            )
        if config.server.url and cred.server_url and cred.server_url != config.server.url:
            raise ConfigError(f"the credential's server {cred.server_url} is not the site's")
        request = TokenRequest(
            scopes=cred.scopes, audiences=cred.audiences, comment="jobtoken credmon"
        )
        with client_for(config.server, url) as client:
            return fetch_access_token(
                client,
                MytokenSource(env_var="MYTOKEN"),
                request,
                now=now,
                env={"MYTOKEN": cred.mytoken},
                verifier=verifier,
            )

    return mint


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
    mint: Minter,
    interval_s: float = 60.0,
    poll_s: float = 2.0,
    once: bool = False,
    services: Sequence[str] = ("jobtoken",),
    primary: bool = True,
    min_remaining_s: float = DEFAULT_MIN_REMAINING_S,
    clock: Optional[Clock] = None,
    stop: Optional[threading.Event] = None,
    wake: Optional[threading.Event] = None,
    on_ready: Optional[Callable[[], None]] = None,
) -> int:
    """Scan every ``interval_s``, and at once on SIGHUP or when an owned ``.top`` changes.

    Args:
        primary: the only OAuth credmon on this AP: write ``<dir>/pid`` (the credd's
            SIGHUP) and ``CREDMON_COMPLETE`` (the schedd waits for it at start). A guest
            writes neither: they belong to the site's ``CREDMON_OAUTH``.

    Raises:
        ConfigError: unusable credential directory; TokenFileError: the pid file
            cannot be written.
    """
    check_cred_dir(cred_dir)
    real_clock = clock or SystemClock()
    stop = stop or threading.Event()
    wake = wake or threading.Event()
    remembered: Dict[str, str] = {}
    with _signals_caught(stop, wake, enabled=not once):
        if primary:
            _start_primary(cred_dir)
        while True:
            started = real_clock.monotonic()
            signature = top_signature(cred_dir, services)
            _scan_and_report(cred_dir, primary=primary, now=real_clock.now(), mint=mint,
                             services=services, min_remaining_s=min_remaining_s,
                             remembered=remembered)
            if on_ready is not None:
                on_ready()  # after the first scan only
                on_ready = None
            if once or stop.is_set():
                return 0
            wake.clear()
            _wait_for_next_scan(real_clock, stop, wake, started + interval_s, poll_s,
                                since=signature,
                                current=functools.partial(top_signature, cred_dir, services))
            if stop.is_set():
                return 0


@contextlib.contextmanager
def _signals_caught(stop: threading.Event, wake: threading.Event, *,
                    enabled: bool) -> Iterator[None]:
    """SIGHUP scans at once, TERM/INT/QUIT stop; the previous handlers come back after.

    Only the main thread may set handlers: elsewhere (tests, an embedding program) the
    caller's ``stop`` and ``wake`` are the only controls.
    """
    enabled = enabled and threading.current_thread() is threading.main_thread()

    def on_hup(signum: int, frame: Any) -> None:
        wake.set()

    def on_stop(signum: int, frame: Any) -> None:
        stop.set()
        wake.set()

    previous: Dict[signal.Signals, Any] = {}
    try:
        if enabled:
            for sig, handler in (
                (signal.SIGHUP, on_hup),
                (signal.SIGTERM, on_stop),
                (signal.SIGINT, on_stop),
                (signal.SIGQUIT, on_stop),
            ):
                previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_primary(cred_dir: Path) -> None:
    """Write the pid file the credd signals, and say no scan has completed yet."""
    try:
        write_secret_file(cred_dir / PID_FILE, str(os.getpid()), newline=False)
    except TokenFileError as exc:
        raise TokenFileError(f"credmon pid file: {exc.message}") from None
    _mark_incomplete(cred_dir)


def _scan_and_report(cred_dir: Path, *, primary: bool, now: float, mint: Minter,
                     services: Sequence[str], min_remaining_s: float,
                     remembered: Dict[str, str]) -> None:
    """One scan; the primary credmon then tells the schedd a scan has completed."""
    report = scan_credentials(cred_dir, now=now, mint=mint, services=services,
                              min_remaining_s=min_remaining_s, remembered=remembered)
    if primary:
        _mark_complete(cred_dir)
    logger.debug(
        "credmon scan written=%d unchanged=%d expired=%d errors=%d",
        len(report.written),
        len(report.unchanged),
        len(report.expired),
        len(report.errors),
    )


def _wait_for_next_scan(clock: Clock, stop: threading.Event, wake: threading.Event,
                        deadline: float, poll_s: float, *, since: Signature,
                        current: Callable[[], Signature]) -> None:
    """Until ``deadline``, a stop, a SIGHUP (``wake``), or until the owned ``.top`` files
    differ from ``since`` (taken before the last scan), polling every ``poll_s``."""
    while not stop.is_set():
        remaining = deadline - clock.monotonic()
        if remaining <= 0 or clock.wait(wake, min(poll_s, remaining)):
            return  # interval over, or SIGHUP
        if current() != since:
            return


def site_runs_oauth_credmon(daemon_list: Optional[str]) -> bool:
    """Whether ``DAEMON_LIST`` starts the site's ``CREDMON_OAUTH`` (then ours is a guest)."""
    names = (daemon_list or "").replace(",", " ").split()
    return any(n.upper() == "CREDMON_OAUTH" for n in names)


def tell_master_ready() -> None:
    """Tell condor_master the credmon is ready, where the bindings can (not 23.9's htcondor2)."""
    if not os.environ.get("CONDOR_INHERIT"):
        return
    for name in ("htcondor2", "htcondor"):
        try:
            setter = getattr(__import__(name), "set_ready_state", None)
        except ImportError:
            continue
        if setter is not None:
            try:
                setter("Ready")
            except Exception as exc:
                logger.debug("condor_master not told the credmon is ready: %s", exc)
            return


def default_cred_dir() -> Path:
    """``SEC_CREDENTIAL_DIRECTORY_OAUTH`` from the HTCondor configuration.

    Raises:
        ConfigError: the bindings are missing or the knob is unset.
    """
    value = condor_param("SEC_CREDENTIAL_DIRECTORY_OAUTH")
    if not value:
        raise ConfigError(
            "no credential directory: give --cred-dir or set SEC_CREDENTIAL_DIRECTORY_OAUTH"
        )
    return Path(value)


LOG_KNOB = "JOBTOKEN_CREDMON_LOG"
DEFAULT_LOG_NAME = "JobtokenCredmonLog"


def credmon_log_path(
    param: Callable[[str], Optional[str]] = condor_param,
) -> Optional[str]:
    """Where the credmon logs, found the way HTCondor's own credmons find theirs.

    HTCondor's credmons (``credmon/utils``, 24.x and later) read their daemon's
    ``<NAME>_LOG`` knob and default to ``$(LOG)/<CamelName>Log``: ``CREDMON_OAUTH_LOG``,
    ``$(LOG)/CredmonOauthLog``. Ours is the daemon ``JOBTOKEN_CREDMON``, so
    ``JOBTOKEN_CREDMON_LOG``, default ``$(LOG)/JobtokenCredmonLog``. The older
    ``SEC_CREDENTIAL_MONITOR_LOG`` and ``SEC_CREDENTIAL_MONITOR_OAUTH_LOG`` name the site's
    own credmon's file (Kerberos, OAuth): two daemons in one file is not read there.
    None: no HTCondor configuration (log to stderr only).
    """
    value = param(LOG_KNOB)
    if value:
        return value
    log_dir = param("LOG")
    return str(Path(log_dir) / DEFAULT_LOG_NAME) if log_dir else None


def credmon_settings() -> Dict[str, Any]:
    """Services, role and refresh margin from the HTCondor configuration (for the CLI)."""
    services = (condor_param("JOBTOKEN_SERVICES", "jobtoken") or "jobtoken").replace(",", " ")
    refresh = condor_param("SEC_CREDENTIAL_REFRESH", "300") or "300"
    try:
        starter_refresh_s = max(0.0, float(refresh))
    except ValueError:
        starter_refresh_s = 300.0
    return {
        "services": tuple(services.split()),
        "primary": not site_runs_oauth_credmon(condor_param("DAEMON_LIST")),
        "starter_refresh_s": starter_refresh_s,
    }
