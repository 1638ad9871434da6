"""A real XRootD storage endpoint (root:// and https://) that enforces WLCG tokens, on loopback.

``XrootdServer`` starts the distribution's ``xrootd`` with XrdHttp and the SciTokens
authorization plugin, trusting exactly one token issuer, on a free port of 127.0.0.1 with a
certificate from a throwaway CA. It runs as the unprivileged ``xrootd`` user (all uids
dropped with ``setpriv``; ``-R`` would keep a saved uid 0), with an empty scitokens key cache
per run and a log file the tests can read. It dies with the process that started it.

How it stays on loopback: xrootd 5.5 binds the wildcard address and has no listen-address
directive, so ``_bindshim.c`` is compiled at start into the run directory and preloaded; it
rewrites wildcard binds to loopback and refuses every other address. After start the listening
sockets of the process are checked; any non-loopback one kills the server. (A network
namespace would hide the loopback issuer that runs in the test process, hence the shim.)

How scitokens-cpp trusts the issuer: it fetches the issuer's discovery document and JWKS with
libcurl, which uses the compiled-in system bundle (/etc/ssl/certs/ca-certificates.crt) and
ignores SSL_CERT_FILE/CURL_CA_BUNDLE. Rather than edit the system store, xrootd runs in a
private mount namespace where a copy of that bundle plus the issuer's CA is bind-mounted over
it; the namespace dies with the process, so nothing on the host changes. (Tried and refused:
SSL_CERT_FILE and CURL_CA_BUNDLE in xrootd's environment; libcurl ignores both.)

Must NOT: listen on anything but loopback, install packages, modify the system trust store,
leave processes, mounts or files behind after ``stop()``, or ever see a token on a command line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ._pki import TestCA

logger = logging.getLogger(__name__)

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
INSTALL_HINT = "run .ci/install-system-packages.sh as root"
_SHIM_SOURCE = Path(__file__).with_name("_bindshim.c")
_INSTANCE = "e2e"
_RUNDIR_PREFIX = "jobtoken-xrootd-"
_PORT_ATTEMPTS = 3
_PORT_TAKEN = "address already in use"
_OWNER_FILE = "owner.pid"
_LOOPBACK_IPS = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
_REQUIRED_BINARIES = ("xrootd", "gcc", "openssl", "unshare", "mount", "setpriv")
_PLUGIN_NAMES = ("libXrdAccSciTokens-5.so", "libXrdHttp-5.so", "libXrdSecztn-5.so")


class XrootdError(RuntimeError):
    """The storage fixture could not be set up or misbehaved (test infrastructure failure)."""


@dataclass(frozen=True)
class XrootdConfig:
    """What the storage trusts and where it keeps its files.

    Attributes:
        issuer_url: the only accepted token issuer, exactly as in the tokens' ``iss``.
        issuer_ca_file: PEM CA that signed the issuer's HTTPS certificate.
        audiences: accepted ``aud`` values (besides the WLCG "any" audience).
        base_dir: parent for the run directory (a fresh ``mkdtemp`` inside it).
        user: unix user xrootd drops to; default ``xrootd`` if it exists, else ``nobody``.
        startup_timeout_s: how long to wait for the port and the HTTPS probe.
        port: fixed port on 127.0.0.1, or 0 to pick a free one at start (retried when another
            process takes it first).
        extra_env: added to xrootd's environment (e.g. ``XrdSecDEBUG=1`` when debugging).
    """

    issuer_url: str
    issuer_ca_file: Path
    audiences: tuple[str, ...] = ("https://wlcg.cern.ch/jwt/v1/any",)
    base_dir: Path | None = None
    user: str | None = None
    startup_timeout_s: float = 30.0
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)


def missing_prerequisites() -> list[str]:
    """Name the binaries and plugins the fixture needs but cannot find.

    Returns:
        Human-readable names; empty when everything is there.
    """
    missing = [name for name in _REQUIRED_BINARIES if shutil.which(name) is None]
    libdirs = [Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib")]
    for plugin in _PLUGIN_NAMES:
        if not any((d / plugin).exists() for d in libdirs):
            missing.append(plugin)
    return missing


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pick_user(name: str | None) -> pwd.struct_passwd:
    candidates = (name,) if name else ("xrootd", "nobody")
    for candidate in candidates:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(candidate)
    raise XrootdError(f"no unprivileged user for xrootd among {candidates}; {INSTALL_HINT}")


def _run(argv: list[str], timeout_s: float, what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise XrootdError(f"{what} failed rc={proc.returncode}: {' | '.join(detail)}")


def _mount_namespace_allowed() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return False
    proc = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "true"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return proc.returncode == 0


def remove_stale_rundirs(base_dir: Path) -> list[Path]:
    """Delete run directories whose owning test process is gone (it was killed mid-run).

    Directories of live owners (another engineer's test run) are left alone.

    Returns:
        The directories removed.
    """
    removed = []
    for rundir in base_dir.glob(f"{_RUNDIR_PREFIX}*"):
        try:
            owner = int((rundir / _OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if not psutil.pid_exists(owner):
            shutil.rmtree(rundir, ignore_errors=True)
            removed.append(rundir)
    return removed


def _terminate_group(proc: subprocess.Popen[bytes]) -> None:
    """TERM, then KILL, the process group xrootd leads (it was started in its own session)."""
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    # anything left in the group (helpers that outlived the leader)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


class XrootdServer:
    """One xrootd process serving root:// and https:// on the same loopback port.

    Use as a context manager or call ``start()``/``stop()``. Attributes valid after start:
    ``port``, ``url_root``, ``url_https``, ``datadir`` (the export root on disk), ``ca_file``
    (PEM to trust for the server's TLS), ``cert_dir`` (hashed ``X509_CERT_DIR`` with that CA),
    ``log_file``, ``cache_dir`` (this run's ``XDG_CACHE_HOME``: scitokens' key cache).
    """

    def __init__(self, config: XrootdConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._rundir: Path | None = None
        self.port = 0
        self.datadir = Path()
        self.cache_dir = Path()
        self.log_file = Path()
        self.ca_file = Path()
        self.cert_dir = Path()

    # -- public surface --------------------------------------------------------------------

    @property
    def url_root(self) -> str:
        return f"root://127.0.0.1:{self.port}/"

    @property
    def url_https(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise XrootdError("xrootd is not running")
        return self._proc.pid

    def log_text(self) -> str:
        """The xrootd log so far (empty before start)."""
        try:
            return self.log_file.read_text(errors="replace")
        except (FileNotFoundError, IsADirectoryError):
            return ""

    def __enter__(self) -> XrootdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Prepare the run directory, launch xrootd and wait until it serves HTTPS.

        Raises:
            XrootdError: a prerequisite is missing, xrootd died or never became ready, or it
                listens on a non-loopback address.
        """
        missing = missing_prerequisites()
        if missing:
            raise XrootdError(f"missing {', '.join(missing)}; {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise XrootdError(
                "the xrootd fixture must run as root (it mounts, then drops to a user)"
            )
        attempts = 1 if self.config.port else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                self._start()
                return
            except XrootdError as exc:
                self.stop()
                if attempt == attempts or _PORT_TAKEN not in str(exc):
                    raise
                logger.info("xrootd port taken, retrying port=%d attempt=%d", self.port, attempt)
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """Kill xrootd (and its process group) and delete the run directory."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate_group(proc)
        if self._rundir is not None:
            rundir, self._rundir = self._rundir, None
            shutil.rmtree(rundir, ignore_errors=True)
        logger.debug("xrootd stopped")

    # -- internals -------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.config
        user = _pick_user(cfg.user)
        owner = (user.pw_uid, user.pw_gid)
        remove_stale_rundirs(Path(cfg.base_dir or tempfile.gettempdir()))
        rundir = Path(tempfile.mkdtemp(prefix=_RUNDIR_PREFIX, dir=cfg.base_dir))
        self._rundir = rundir
        (rundir / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        os.chmod(rundir, 0o755)  # the unprivileged server must traverse it
        dirs = {name: rundir / name for name in ("data", "var", "cache", "log", "etc", "pki")}
        for name, path in dirs.items():
            path.mkdir(mode=0o755)
            if name in ("data", "var", "cache", "log"):
                os.chown(path, *owner)
        self.datadir = dirs["data"]
        self.cache_dir = dirs["cache"]
        # with -n NAME, xrootd writes "-l DIR/FILE" to DIR/NAME/FILE
        self.log_file = dirs["log"] / _INSTANCE / "xrootd.log"

        ca = TestCA(dirs["pki"], name="jobtoken e2e storage CA")
        server = ca.issue_server_cert("xrootd", owner=owner)
        self.ca_file = ca.ca_file
        self.cert_dir = ca.make_cert_dir()
        shim = self._build_shim(rundir)

        self.port = cfg.port or _free_loopback_port()
        scitokens_cfg = dirs["etc"] / "scitokens.cfg"
        scitokens_cfg.write_text(self._scitokens_cfg(user.pw_name))
        xrootd_cfg = dirs["etc"] / "xrootd.cfg"
        xrootd_cfg.write_text(
            self._xrootd_cfg(dirs, server.cert_file, server.key_file, scitokens_cfg)
        )
        for path in (scitokens_cfg, xrootd_cfg):
            os.chmod(path, 0o644)

        xrootd = shutil.which("xrootd")
        assert xrootd is not None  # checked by missing_prerequisites
        argv = [
            xrootd,
            "-c",
            str(xrootd_cfg),
            "-l",
            str(dirs["log"] / "xrootd.log"),
            "-n",
            _INSTANCE,
        ]
        argv = self._wrap_for_trust(argv, dirs["etc"], user)
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C",
            "HOME": str(dirs["var"]),
            "XDG_CACHE_HOME": str(dirs["cache"]),
            "LD_PRELOAD": str(shim),
            **cfg.extra_env,
        }
        logger.info("xrootd starting port=%d user=%s", self.port, user.pw_name)
        with (dirs["log"] / "stdout.log").open("wb") as stdout:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no token
                argv,
                cwd=dirs["var"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()
        self._assert_loopback_only()
        logger.info("xrootd ready port=%d pid=%d", self.port, self._proc.pid)

    def _build_shim(self, rundir: Path) -> Path:
        out = rundir / "bindshim.so"
        gcc = shutil.which("gcc")
        assert gcc is not None
        _run(
            [gcc, "-shared", "-fPIC", "-O2", "-o", str(out), str(_SHIM_SOURCE), "-ldl"],
            60,
            "compiling the loopback bind shim",
        )
        os.chmod(out, 0o755)
        return out

    def _scitokens_cfg(self, unix_user: str) -> str:
        audiences = ", ".join(self.config.audiences)
        return (
            "[Global]\n"
            f"audience = {audiences}\n"
            "\n"
            "[Issuer jobtoken-e2e]\n"
            f"issuer = {self.config.issuer_url}\n"
            "base_path = /\n"
            "map_subject = false\n"
            f"default_user = {unix_user}\n"
        )

    def _xrootd_cfg(self, dirs: dict[str, Path], cert: Path, key: Path, scitokens_cfg: Path) -> str:
        port = self.port
        lines = [
            "all.role server",
            "all.export /",
            f"all.adminpath {dirs['var']}",
            f"all.pidpath {dirs['var']}",
            f"oss.localroot {dirs['data']}",
            f"xrd.port {port}",
            "xrd.allow host localhost",
            "xrd.allow host 127.0.0.1",
            f"xrd.tls {cert} {key}",
            f"xrd.tlsca certdir {self.cert_dir}",
            f"xrd.protocol XrdHttp:{port} libXrdHttp.so",
            "http.header2cgi Authorization authz",
            "xrootd.seclib libXrdSec.so",
            "sec.protocol ztn",
            "sec.protbind * only ztn",
            "xrootd.tls capable all",
            "ofs.authorize 1",
            f"ofs.authlib libXrdAccSciTokens.so config={scitokens_cfg}",
        ]
        return "\n".join(lines) + "\n"

    def _wrap_for_trust(self, argv: list[str], etc: Path, user: pwd.struct_passwd) -> list[str]:
        """Wrap ``argv`` to run as ``user`` where the system CA bundle holds the issuer's CA.

        Root is needed only for the bind mount; ``setpriv`` then drops real, effective and saved
        ids before xrootd starts (xrootd's own ``-R`` changes only the effective uid). A second
        ``setpriv`` sets the parent-death signal (a uid change would clear it), so xrootd dies
        with the thread that started it even when the test process is SIGKILLed: start the
        server from a thread that lives as long as the server (pytest's main thread does).
        """
        if not _mount_namespace_allowed():
            raise XrootdError(
                "cannot create a private mount namespace (unshare --mount refused); the storage "
                "fixture needs it to let scitokens-cpp trust the test issuer"
            )
        bundle = etc / "ca-bundle.crt"
        parts = [SYSTEM_BUNDLE.read_bytes() if SYSTEM_BUNDLE.exists() else b""]
        parts.append(self.config.issuer_ca_file.read_bytes())
        bundle.write_bytes(b"\n".join(parts))
        os.chmod(bundle, 0o644)
        script = (
            'mount --bind "$1" "$2" && uid="$3" && gid="$4" && shift 4 && '
            'exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- '
            'setpriv --pdeathsig KILL -- "$@"'
        )
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            script,
            "xrootd-trust",
            str(bundle),
            str(SYSTEM_BUNDLE),
            str(user.pw_uid),
            str(user.pw_gid),
            *argv,
        ]

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise XrootdError(
                    f"xrootd exited rc={self._proc.returncode} during start; "
                    f"log tail: {self._log_tail()}"
                )
            if self._probe_https():
                return
            if time.monotonic() > deadline:
                raise XrootdError(
                    f"xrootd not ready on 127.0.0.1:{self.port} after "
                    f"{self.config.startup_timeout_s:.0f}s; log tail: {self._log_tail()}"
                )
            time.sleep(0.1)  # polling a child process, not waiting for time to pass

    def _probe_https(self) -> bool:
        """True once an HTTPS request with our CA gets any HTTP status line back."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    return tls.recv(16).startswith(b"HTTP/1.")
        except (OSError, ssl.SSLError):
            return False

    def _assert_loopback_only(self) -> None:
        assert self._proc is not None
        listening = [
            conn.laddr
            for conn in psutil.Process(self._proc.pid).net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN
        ]
        bad = [addr for addr in listening if addr.ip not in _LOOPBACK_IPS]
        if bad or not listening:
            raise XrootdError(f"xrootd listens on non-loopback or nothing: {listening}")

    def _log_tail(self, lines: int = 8) -> str:
        text = self.log_text()
        stdout = self.log_file.parent.parent / "stdout.log"
        with contextlib.suppress(OSError):
            text += stdout.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])
