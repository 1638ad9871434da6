"""Helpers for the node broker tests: a real broker process, a dev server, job anchors.

The broker runs as ``python -m jobtoken broker serve`` (a real process on a real Unix
socket); the dev server runs in the test's process; each job is anchored to a real
process (``tests/payloads/broker_job.py``) whose children act as the job's payload, as
another uid through ``setuid`` (root is needed for that; CI runs as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from jobtoken._brokerclient import BrokerClient
from jobtoken._errors import JobtokenError
from jobtoken._tokenfile import write_secret_file
from jobtoken.devserver import DevServer, DevServerConfig
from tests.prerequisites import need
from tests.runhelpers import AUD, PARENT_CAPS, ROOT, readline_within
from tests.siteconfig import broker_site_config

JOB_PAYLOAD = ROOT / "tests" / "payloads" / "broker_job.py"
#: the interpreter job processes run: the test's own may live where other uids cannot go
#: (a pyenv under /root); the job side needs only the standard library
JOB_PYTHON = "/usr/bin/python3"


def require_root() -> None:
    """Skip (outside CI) or fail (in CI) when not root: jobs run as other uids."""
    need(os.path.exists(JOB_PYTHON), f"{JOB_PYTHON} is needed to run job processes as other uids")
    need(os.geteuid() == 0, "needs root (jobs run as other uids)")


def spare_uids(count: int) -> List[int]:
    """Uids no account uses: a job's uid needs no passwd entry, only a number."""
    used = {p.pw_uid for p in pwd.getpwall()}
    found = [uid for uid in range(61000, 62000) if uid not in used][:count]
    assert len(found) == count
    return found


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something true; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(interval_s)


class Site:
    """A dev server, a parent mytoken, a config, and the broker process on top of them."""

    def __init__(self, srv: DevServer, base: Path, *, at_lifetime_s: float,
                 margin_s: float, workers: int = 4, adopt: bool = False) -> None:
        self.srv = srv
        self.base = base  # 0755, root's: job directories live below it
        self.state_dir = base / "state"
        self.metrics_dir = base / "textfile"  # as README "Metrics" says: root's, 1777
        self.metrics_dir.mkdir()
        self.metrics_dir.chmod(0o1777)
        self.socket = str(base / "run" / "broker.sock")
        self.parent = base / "parent.mt"
        write_secret_file(self.parent, srv.issue_mytoken(capabilities=list(PARENT_CAPS)),
                          newline=False)
        self.config = base / "jobtoken.toml"
        self.config.write_text(broker_site_config(
            # an adopting broker (a worker node behind an ARC-CE) has no parent: the CE has it
            url=srv.url, parent=None if adopt else self.parent, scope="storage.create:/vo",
            audience=AUD,
            lifetime_s=at_lifetime_s, margin_s=margin_s, socket=self.socket,
            state_dir=self.state_dir, timeout_s=5, metrics_dir=self.metrics_dir,
            reconcile_s=1, workers=workers, adopt=adopt))
        # the job side's copy of jobtoken and its payload, where every uid may read them
        self.pythonpath = base / "py"
        shutil.copytree(ROOT / "src" / "jobtoken", self.pythonpath / "jobtoken",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(JOB_PAYLOAD, self.pythonpath / JOB_PAYLOAD.name)
        self.proc: Optional[subprocess.Popen] = None
        self.log = base / "broker.log"
        self.client = BrokerClient(self.socket, timeout_s=60.0)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBTOKEN_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jobtoken", "broker", "serve", "--config",
                 str(self.config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        wait_for(self._pong, 60, f"the broker answers a ping (log: {self.log_text()})")

    def _pong(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the broker exited {self.proc.returncode}: {self.log_text()}")
        try:
            self.client.ping()
        except JobtokenError:
            return False
        return True

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def register(self, job_id: str, uid: int, anchor_pid: int, **extra: Any) -> None:
        self.client.register(dict(job_id=job_id, uid=uid, anchor_pid=anchor_pid,
                                  walltime_s=600, **extra))

    def job_dir(self, name: str, uid: int) -> Path:
        """``jobs/NAME/tokens``: a token directory in the job's own scratch directory
        (both the job's, 0700), as a batch system lays out a sandbox."""
        scratch = self.base / "jobs" / name
        scratch.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chown(scratch, uid, uid)
        path = scratch / "tokens"
        path.mkdir(mode=0o700)
        os.chown(path, uid, uid)
        return path

    def mytoken_files(self) -> List[Path]:
        """Every mytoken file in the state directory now.

        os.walk, not rglob: a job directory the broker removes meanwhile (an ended job)
        is skipped rather than raising."""
        return sorted(Path(top) / "mytoken" for top, _, files in os.walk(self.state_dir)
                      if "mytoken" in files)

    def children(self) -> List[Any]:
        """The job mytokens the parent minted (revoked ones included)."""
        store = self.srv._store
        record = store.by_mom_id(self.srv.introspect(self.parent.read_text())["mom_id"])
        return list(store.children(record.id))


class Anchor:
    """A job's anchor process (``broker_job.py``), running as ``uid`` (None: as the test)."""

    def __init__(self, site: Site, uid: Optional[int] = None) -> None:
        extra: Dict[str, Any] = {}
        if uid is not None:
            extra = {"user": uid, "group": uid, "extra_groups": []}
        self.socket = site.socket
        self.env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site.pythonpath),
                    "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen(
            [JOB_PYTHON, str(site.pythonpath / JOB_PAYLOAD.name), site.socket],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/", env=self.env,
            **extra)
        self.pid = json.loads(readline_within(self.proc.stdout))["pid"]
        assert self.pid == self.proc.pid

    def _ask(self, command: Dict[str, Any]) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = readline_within(self.proc.stdout, 180)
        assert line, "the anchor ended without an answer"
        return json.loads(line)  # type: ignore[no-any-return]

    def call(self, op: str, **request: Any) -> Dict[str, Any]:
        """The broker's reply to a request the anchor itself sends."""
        return self._ask({"op": "call", "request": dict(op=op, **request)})

    def spawn(self, argv: Sequence[str], uid: Optional[int] = None) -> Dict[str, Any]:
        """Run a child of the anchor (as ``uid``): a payload process of the job."""
        return self._ask({"op": "spawn", "argv": list(argv), "uid": uid, "gid": uid,
                          "env": self.env})

    def client(self, uid: Optional[int], *args: str) -> Dict[str, Any]:
        """``jobtoken broker ARGS --json`` run by a payload process below the anchor."""
        return self.spawn([JOB_PYTHON, "-m", "jobtoken", "broker", *args, "--socket",
                           self.socket, "--json"], uid)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def client_reply(result: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON a ``jobtoken broker ... --json`` child printed (or its error line)."""
    out = result["out"].strip()
    return json.loads(out) if out.startswith("{") else {"error": result["err"].strip()}


def base_dir() -> Iterator[Path]:
    """A 0755 root-owned directory in /tmp that other uids can traverse (pytest's is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="jtbroker-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_site(*, at_lifetime_s: float, margin_s: float, workers: int = 4,
                 adopt: bool = False) -> Iterator[Site]:
    """A dev server issuing ``at_lifetime_s`` tokens and a started broker for it.

    At the end the broker's log must show no internal error (a bug the replies hid).
    """
    require_root()
    with DevServer(DevServerConfig(at_lifetime_s=int(at_lifetime_s),
                                   op_scopes=("storage.read:/", "storage.create:/"),
                                   default_audience=AUD)) as srv:
        for base in base_dir():
            with serving(Site(srv, base, at_lifetime_s=at_lifetime_s, margin_s=margin_s,
                              workers=workers, adopt=adopt)) as site:
                yield site


@contextlib.contextmanager
def serving(site: Site) -> Iterator[Site]:
    """``site``'s broker, started and, at the end, stopped; then its log must show no
    internal error (a bug the replies hid)."""
    site.start()
    try:
        yield site
    finally:
        site.stop()
    log = site.log_text()
    assert "internal error" not in log and "Traceback" not in log, log
