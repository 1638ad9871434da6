"""Helpers for the chain tests: a job's whole path from a parent mytoken to files on storage.

The chain is the one a site runs: the dev server (over HTTPS) holds the parent mytoken's
grant, ``jobtoken prepare`` (the real CLI, in a subprocess, configured by a TOML file) mints
the job's own mytoken and first token, ``jobtoken run`` keeps ``$BEARER_TOKEN_FILE`` fresh
while a bash payload writes files to a real XRootD with real grid clients.

``short_lived_storage`` starts a private issuer/storage pair (a TLS ``DevServer`` with
short-lived access tokens and an ``XrootdServer`` trusting it), for tests that must see
tokens renewed or expire, or that inject an outage without disturbing the session fixtures.

Must NOT: put a token or mytoken into argv (except in the davix-put pattern: davix offers no
other way, see docs/clients.md), logs or assertion messages; wait on a process without a
timeout; write outside the test's directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from jobtoken._tokenfile import write_secret_file
from jobtoken.devserver import DevServer, DevServerConfig

from ._xrootd import XrootdConfig, XrootdServer
from .conftest import STORAGE_AUDIENCE, STORAGE_OP_SCOPES, StorageIssuer, require_software

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "monitoring"
WRAPPER = REPO / "wrappers" / "jobtoken-wrap"
VO = "vo"
PARENT_CAPABILITIES = ["AT", "create_mytoken", "tokeninfo"]
PROCESS_TIMEOUT_S = 120.0

# The one-line patterns of docs/clients.md. The token only ever comes from
# $BEARER_TOKEN_FILE, read at each call; $SRC is the local file, $DEST the file name.
CLIENT_PATTERNS = {
    "xrdcp": 'xrdcp --nopbar "$SRC" "$ROOT_DIR$DEST"',
    "curl": (
        'curl -sS -f -o /dev/null -T "$SRC" '
        '-H @<(printf \'Authorization: Bearer %s\\n\' "$(<"$BEARER_TOKEN_FILE")") '
        '"$HTTPS_DIR$DEST"'
    ),
    "davix-put": (
        'davix-put --capath "$X509_CERT_DIR" '
        '-H "Authorization: Bearer $(<"$BEARER_TOKEN_FILE")" "$SRC" "$HTTPS_DIR$DEST"'
    ),
    "gfal-copy": (
        'BEARER_TOKEN="$(<"$BEARER_TOKEN_FILE")" gfal-copy "file://$SRC" "$HTTPS_DIR$DEST"'
    ),
}


def jobtoken_bin() -> Path:
    """The ``jobtoken`` entry point next to the running interpreter (the venv's)."""
    path = Path(sys.executable).with_name("jobtoken")
    if not path.exists():
        pytest.fail(f"no jobtoken entry point at {path}; run scripts/bootstrap", pytrace=False)
    return path


def new_job_id() -> str:
    """A random job id of fixed length.

    Equal lengths keep every job path from being a string prefix of another one (XRootD
    5.5.3 matches scope paths by string prefix).
    """
    return "j" + os.urandom(5).hex()


def job_path(job_id: str) -> str:
    """The storage path a job's token may write under (the site's scope template)."""
    return f"/{VO}/jobs/{job_id}"


@dataclass
class Storage:
    """A running issuer and the storage that trusts it."""

    server: DevServer
    issuer: StorageIssuer
    xrootd: XrootdServer
    at_lifetime_s: int

    def root_dir(self, path: str) -> str:
        """``root://`` URL of the directory ``path`` (ends in ``/``)."""
        return f"{self.xrootd.url_root}/{path.strip('/')}/"

    def https_dir(self, path: str) -> str:
        """``https://`` URL of the directory ``path`` (ends in ``/``)."""
        return f"{self.xrootd.url_https}{path.strip('/')}/"

    def on_disk(self, path: str) -> Path:
        """Where the storage keeps ``path``."""
        return self.xrootd.datadir / path.strip("/")


@contextlib.contextmanager
def short_lived_storage(at_lifetime_s: int) -> Iterator[Storage]:
    """A TLS dev server issuing ``at_lifetime_s`` access tokens, and an xrootd trusting it.

    The lifetime must be a whole number: the dev server adds it to ``iat`` as given, and
    scitokens-cpp refuses a token whose ``exp`` is a JSON float ("Failed to deserialize
    SciToken: std::bad_cast").
    """
    if not isinstance(at_lifetime_s, int):
        raise TypeError("at_lifetime_s must be an int (scitokens-cpp needs an integer exp)")
    require_software()
    tls_dir = Path(tempfile.mkdtemp(prefix="jobtoken-e2e-short-"))
    config = DevServerConfig(
        tls_dir=str(tls_dir),
        op_scopes=STORAGE_OP_SCOPES,
        default_audience=STORAGE_AUDIENCE,
        at_lifetime_s=at_lifetime_s,
    )
    try:
        with DevServer(config) as server:
            issuer = StorageIssuer(server)
            try:
                xrootd_config = XrootdConfig(
                    issuer_url=issuer.issuer_url,
                    issuer_ca_file=issuer.ca_file,
                    audiences=(STORAGE_AUDIENCE,),
                )
                with XrootdServer(xrootd_config) as xrootd:
                    yield Storage(server, issuer, xrootd, at_lifetime_s)
            finally:
                issuer.close()
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)


def site_config_text(
    storage: Storage,
    parent_file: Path,
    *,
    margin_s: float,
    metrics_dir: Path | None = None,
    revoke_at_end: bool = True,
) -> str:
    """A site's jobtoken.toml for this storage: per-job create+read scopes under /vo/jobs."""
    server = storage.server
    lines = [
        "[server]",
        f"url = {json.dumps(server.url)}",
        f"ca_file = {json.dumps(str(server.ca_file))}",
        "timeout_s = 5",
        "",
        "[site]",
        f"parent_mytoken_file = {json.dumps(str(parent_file))}",
        f"vo = {json.dumps(VO)}",
        f'allowed_scopes = ["storage.create:/{VO}", "storage.read:/{VO}"]',
        f"allowed_audiences = [{json.dumps(STORAGE_AUDIENCE)}]",
        'scope_templates = ["storage.create:/{vo}/jobs/{job_id}", '
        '"storage.read:/{vo}/jobs/{job_id}"]',
        f"expected_at_lifetime_s = {float(storage.at_lifetime_s)}",
        "",
        "[renewal]",
        f"margin_s = {float(margin_s)}",
        f"revoke_at_end = {'true' if revoke_at_end else 'false'}",
    ]
    if metrics_dir is not None:
        lines.append(f"metrics_dir = {json.dumps(str(metrics_dir))}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Finished:
    """A finished process: exit status and output (the chain never prints a token)."""

    returncode: int
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)

    def tail(self, chars: int = 1500) -> str:
        """The end of both streams, for assertion messages."""
        return (
            f"rc={self.returncode}\nstdout: {self.stdout[-chars:]}\nstderr: {self.stderr[-chars:]}"
        )


class Job:
    """One batch job of the chain: its own directory, config file, environment and token dir.

    ``prepare()`` runs ``jobtoken prepare`` as the pre-job hook would; ``start()`` runs a
    payload under ``jobtoken run``; ``finish()`` waits for it.
    """

    def __init__(
        self,
        storage: Storage,
        base: Path,
        *,
        margin_s: float,
        job_id: str | None = None,
        metrics_dir: Path | None = None,
        revoke_at_end: bool = True,
        parent_restricted: bool = False,
    ) -> None:
        self.storage = storage
        self.job_id = job_id or new_job_id()
        self.path = job_path(self.job_id)
        self.base = base
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tokendir = base / "job"
        self.home = base / "home"
        self.home.mkdir(mode=0o700, exist_ok=True)
        self.parent_file = base / "parent.mt"
        # unrestricted, as a VO robot's parent for many jobs; or restricted to exactly this
        # job's scope strings and audience, as a site's parent for one fixed probe path
        restrictions = (
            [{"scope": " ".join(self.scopes), "audience": [STORAGE_AUDIENCE]}]
            if parent_restricted
            else None
        )
        write_secret_file(
            self.parent_file,
            storage.server.issue_mytoken(
                capabilities=PARENT_CAPABILITIES, restrictions=restrictions
            ),
            newline=False,
        )
        self.config_file = base / "jobtoken.toml"
        self.config_file.write_text(
            site_config_text(
                storage,
                self.parent_file,
                margin_s=margin_s,
                metrics_dir=metrics_dir,
                revoke_at_end=revoke_at_end,
            )
        )
        self._proc: subprocess.Popen[str] | None = None
        self._finished: Finished | None = None

    @property
    def scopes(self) -> tuple[str, str]:
        """The scopes the site's templates give this job."""
        return (f"storage.create:{self.path}", f"storage.read:{self.path}")

    @property
    def bearer_token_file(self) -> Path:
        return self.tokendir / "bt"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of jobtoken and of the payload: a worker node's, minimal."""
        xrootd = self.storage.xrootd
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            "TMPDIR": str(self.home),
            "JOBTOKEN_CONFIG": str(self.config_file),
            "JOBTOKEN_BIN": str(jobtoken_bin()),
            "X509_CERT_DIR": str(xrootd.cert_dir),
            "CURL_CA_BUNDLE": str(xrootd.ca_file),
            # gfal-* run the first python on PATH that imports gfal2: the system one
            "GFAL_PYTHONBIN": "/usr/bin/python3",
            "ROOT_DIR": self.storage.root_dir(self.path),
            "HTTPS_DIR": self.storage.https_dir(self.path),
        }
        env.update(extra or {})
        return env

    def jobtoken(self, *args: str, env: Mapping[str, str] | None = None) -> Finished:
        """Run one ``jobtoken`` command to its end."""
        proc = subprocess.run(
            [str(jobtoken_bin()), *args],
            env=self.env(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT_S,
            check=False,
        )
        return Finished(proc.returncode, proc.stdout, proc.stderr)

    def prepare(self, *, walltime_s: float = 600) -> dict[str, Any]:
        """``jobtoken prepare`` (the pre-job hook); returns its JSON (never a token)."""
        done = self.jobtoken(
            "prepare",
            "--dir",
            str(self.tokendir),
            "--job-id",
            self.job_id,
            "--walltime",
            str(walltime_s),
            "--json",
        )
        assert done.returncode == 0, done.tail()
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def inspect(self, token_file: Path | None = None) -> dict[str, Any]:
        """``jobtoken inspect --json`` of the job's token (claims, never the token)."""
        done = self.jobtoken("inspect", "--json", str(token_file or self.bearer_token_file))
        assert done.returncode == 0, done.tail()
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def start(self, payload: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``jobtoken run --dir DIR -- payload`` in the background."""
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no token
            [str(jobtoken_bin()), "run", "--dir", str(self.tokendir), "--", *payload],
            env=self.env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.home,
        )

    def start_wrapped(self, payload: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``wrappers/jobtoken-wrap -- payload``: the pilot wrapper prepares the token
        directory itself (``JOBTOKEN_DIR``, ``JOBTOKEN_JOB_ID``) and execs ``jobtoken run``."""
        wrap_env = {
            "JOBTOKEN_DIR": str(self.tokendir),
            "JOBTOKEN_JOB_ID": self.job_id,
            "JOBTOKEN_WALLTIME": "600",
            **(env or {}),
        }
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no token
            [str(WRAPPER), "--", *payload],
            env=self.env(wrap_env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.home,
        )

    def finish(self, timeout_s: float = PROCESS_TIMEOUT_S) -> Finished:
        """Wait for the payload started by ``start()``; kill it after ``timeout_s``.

        Later calls return the same result.
        """
        assert self._proc is not None, "start() first"
        if self._finished is None:
            try:
                out, err = self._proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._kill_family()
                out, err = self._proc.communicate(timeout=30)
                # psutil reaped it: its returncode (0) would hide that the test killed it
                err += f"\n[test] killed: no end within {timeout_s:.0f} s\n"
                self._finished = Finished(-signal.SIGKILL, out, err)
                return self._finished
            self._finished = Finished(self._proc.returncode, out, err)
        return self._finished

    def state(self) -> dict[str, Any]:
        """The token directory's ``state.json`` (no secrets)."""
        data: dict[str, Any] = json.loads((self.tokendir / "state.json").read_text())
        return data

    @property
    def pid(self) -> int:
        """Process id of ``jobtoken run``."""
        assert self._proc is not None, "start() first"
        return self._proc.pid

    def send_signal(self, sig: int) -> None:
        """Signal ``jobtoken run`` (as a batch system stopping the job would)."""
        assert self._proc is not None, "start() first"
        self._proc.send_signal(sig)

    def kill(self) -> None:
        """Kill a still running ``jobtoken run`` and its payload (cleanup after a failure).

        The payload runs in its own session, so killing ``jobtoken run`` alone would leave
        it running and holding the output pipes.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._kill_family()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def _kill_family(self) -> None:
        assert self._proc is not None
        try:
            family = [psutil.Process(self._proc.pid)]
            family += family[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(family, timeout=10)


class SecretWatch(threading.Thread):
    """Samples the argv and environment of every process below ``pid`` for a JWT.

    What a job's processes expose: ``/proc/<pid>/cmdline`` is readable by every local user,
    ``/proc/<pid>/environ`` by the same user. Only the process names of offenders are kept,
    never what was found.
    """

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(name=f"secret-watch-{pid}", daemon=True)
        self._root = pid
        self._interval_s = interval_s
        self._stop_event = threading.Event()
        self.samples = 0
        self.pids_seen: set[int] = set()
        self.in_argv: set[str] = set()
        self.in_environ: set[str] = set()

    def run(self) -> None:
        while not self._stop_event.wait(self._interval_s):
            try:
                family = psutil.Process(self._root).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            self.samples += 1
            for proc in family:
                try:
                    argv = proc.cmdline()
                    environ = proc.environ()
                    name = proc.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.pids_seen.add(proc.pid)
                if any(_JWT_START in arg for arg in argv):
                    self.in_argv.add(name)
                if any(_JWT_START in value for value in environ.values()):
                    self.in_environ.add(name)

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop_event.set()
        self.join(timeout=10)


_JWT_START = "eyJ"  # base64url of '{"': how every JWT (access token or mytoken) begins


def write_payload(directory: Path, name: str, body: str) -> Path:
    """A bash payload script (``set -u``) in ``directory``."""
    path = directory / name
    path.write_text("#!/usr/bin/env bash\nset -u\n" + body)
    path.chmod(0o700)
    return path


def records(text: str, kind: str) -> list[dict[str, str]]:
    """The ``key=value`` fields of every output line whose event word is ``kind``.

    Lines look like ``[STAMP] kind key=value key=value ...`` (test-transfer.sh's format).
    """
    found = []
    for line in text.splitlines():
        words = line.split()
        if kind not in words:
            continue
        fields = words[words.index(kind) + 1 :]
        found.append(dict(w.split("=", 1) for w in fields if "=" in w))
    return found


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    """Poll ``predicate()`` until true; fail after ``timeout_s`` (real processes, real time)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}", pytrace=False)
        time.sleep(interval_s)
