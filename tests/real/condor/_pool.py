"""A real HTCondor personal pool on loopback, with jobtoken installed as a site admin would:
the Debian package, installed with apt into the pool environment; the pool's configuration
includes the package's config.d snippet and runs its hooks from /usr/libexec/jobtoken.

Where HTCondor lives (the "pool environment"): on Debian 13 the host itself, on Debian 12
the Debian 13 chroot that ``.ci/install-htcondor.sh`` made. Every command runs through one
prefix (``PoolEnv.argv``: ``chroot ROOT`` or nothing, then ``env -i`` so that no host
variable leaks in), so both hosts share one code path.

Each pool has its own directory (LOCAL_DIR, config, site config) and its own collector
port, so several pools (two engineers' test runs, CI on a shared machine) can run at once in
the same chroot. The chroot's /proc, /sys and /dev mounts and the installed package are
shared between those pools and counted: the last pool to stop purges the package and
unmounts them, and nothing is deleted while they exist.

The daemons are driven with the pool's own command-line tools (``condor_submit``,
``condor_q -json``...), never with the test's Python bindings: the PyPI htcondor wheel
cannot authenticate to the Debian 23.9 daemons.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from tests.debpackages import SharedInstall

CHROOT_DEFAULT = "/var/lib/jobtoken-ci/trixie"
STAMP = ".jobtoken-ci-complete"
TEST_USER = "jobtoken-ci"  # made by .ci/install-htcondor.sh
JOBS_GROUP = "jobtoken-jobs"  # may read the site's robot mytoken
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
INSTALLER = ".ci/install-htcondor.sh"

# JobStatus values
IDLE, RUNNING, REMOVED, COMPLETED, HELD = 1, 2, 3, 4, 5


def debian_major() -> int:
    try:
        text = Path("/etc/debian_version").read_text().strip()
    except OSError:
        return 0
    if text[:1].isdigit():
        return int(text.split(".")[0])
    return 13 if text.startswith("trixie") else 0


def pool_root() -> Path:
    """Where the pool's HTCondor is installed: "/" on Debian 13, the chroot on Debian 12."""
    if debian_major() >= 13:
        return Path("/")
    return Path(os.environ.get("JOBTOKEN_CI_ROOT", CHROOT_DEFAULT))


def missing_prerequisite() -> Optional[str]:
    """Why no pool can start here, or None."""
    if not sys.platform.startswith("linux"):
        return "real HTCondor pool tests need Linux"
    if os.geteuid() != 0:
        return "real HTCondor pool tests need root (they start condor_master)"
    root = pool_root()
    if root != Path("/") and not (root / STAMP).is_file():
        return f"no complete Debian 13 chroot at {root}: run {INSTALLER} as root"
    if not (root / "usr/sbin/condor_master").exists():
        return f"HTCondor is not installed in {root}: run {INSTALLER} as root"
    try:
        env = PoolEnv(root)
        env.run(["getent", "passwd", TEST_USER], timeout=20)
    except (subprocess.SubprocessError, OSError):
        return f"no test user {TEST_USER} in {root}: run {INSTALLER} as root"
    return None


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int


class PoolEnv:
    """Runs commands in the pool environment (a chroot on Debian 12, the host on 13)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def chrooted(self) -> bool:
        return self.root != Path("/")

    def host_path(self, inner: str) -> Path:
        return self.root / inner.lstrip("/")

    def inner_path(self, host: Path) -> str:
        return "/" + str(host.relative_to(self.root)) if self.chrooted else str(host)

    def argv(
        self,
        argv: Sequence[str],
        *,
        env: Optional[Mapping[str, str]] = None,
        user: Optional[str] = None,
    ) -> List[str]:
        out: List[str] = ["chroot", str(self.root)] if self.chrooted else []
        if user is not None:
            out += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        variables = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root" if user is None else
                     f"/home/{user}"}
        variables.update(env or {})
        out += ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in variables.items())]
        return out + list(argv)

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Optional[Mapping[str, str]] = None,
        user: Optional[str] = None,
        timeout: float = 60.0,
        check: bool = True,
        cwd: Optional[str] = None,
    ) -> subprocess.CompletedProcess[str]:
        full = self.argv(argv, env=env, user=user)
        if cwd is not None:
            # chroot starts in "/"; the directory is entered inside the pool environment
            full = self.argv(["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *argv],
                             env=env, user=user)
        proc = subprocess.run(full, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def account(self, name: str) -> Account:
        line = self.run(["getent", "passwd", name], timeout=20).stdout.strip()
        fields = line.split(":")
        return Account(int(fields[2]), int(fields[3]))

    def group_id(self, name: str) -> int:
        return int(self.run(["getent", "group", name], timeout=20).stdout.split(":")[2])


# --- the chroot's kernel mounts, shared by every pool in it -----------------------------------


def _mount_points() -> List[str]:
    with open("/proc/mounts") as fh:
        return [line.split()[1] for line in fh]



class ChrootMounts:
    """/proc, /sys and /dev in the chroot, mounted while at least one pool holds them.

    Holders are files named after their process id; a holder whose process is gone (a
    killed test run) no longer counts, so its mounts are taken down by the next release.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock_path = root.parent / f".{root.name}.mounts.lock"
        self.holders = root.parent / f".{root.name}.holders"
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _mounted(self) -> List[str]:
        prefix = str(self.root).rstrip("/") + "/"
        return [p for p in _mount_points() if p.startswith(prefix)]

    def _live_holders(self) -> List[Path]:
        live = []
        for holder in self.holders.glob("*"):
            pid = int(holder.name.split("-")[0]) if holder.name.split("-")[0].isdigit() else 0
            try:
                os.kill(pid, 0) if pid > 0 else None
                alive = pid > 0
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
            if alive:
                live.append(holder)
            else:
                holder.unlink(missing_ok=True)
        return live

    def _locked(self) -> Any:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def acquire(self) -> None:
        fd = self._locked()
        try:
            self.holders.mkdir(exist_ok=True)
            live = self._live_holders()
            mounted = self._mounted()
            if not live and mounted:
                self._unmount()  # left by a run that was killed
                mounted = self._mounted()
            proc = str(self.root / "proc")
            if proc not in mounted:
                subprocess.run(["mount", "-t", "proc", "proc", proc], check=True)
            for name in ("sys", "dev"):
                point = str(self.root / name)
                if point not in mounted:
                    subprocess.run(["mount", "--rbind", f"/{name}", point], check=True)
                    subprocess.run(["mount", "--make-rslave", point], check=True)
            (self.holders / self.token).write_text("")
        finally:
            os.close(fd)

    def release(self) -> None:
        fd = self._locked()
        try:
            (self.holders / self.token).unlink(missing_ok=True)
            if not self._live_holders():
                self._unmount()
        finally:
            os.close(fd)

    def _unmount(self) -> None:
        for name in ("dev", "sys", "proc"):
            point = str(self.root / name)
            if any(p == point or p.startswith(point + "/") for p in self._mounted()):
                if subprocess.run(["umount", "-R", point], capture_output=True).returncode:
                    subprocess.run(["umount", "-R", "-l", point], capture_output=True)
        left = self._mounted()
        if left:
            raise RuntimeError(f"could not unmount {left}")


# --- the pool ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pool_config(local_dir: str, port: int, jobtoken_conf: str, libexec: str,
                 jobtoken_toml: str) -> str:
    return f"""\
# A personal HTCondor pool for jobtoken's real-system tests (tests/real/condor/_pool.py).
RELEASE_DIR = /usr
BIN = $(RELEASE_DIR)/bin
SBIN = $(RELEASE_DIR)/sbin
LIB = $(RELEASE_DIR)/lib/condor
LIBEXEC = $(RELEASE_DIR)/libexec/condor
SHARE = $(RELEASE_DIR)/share/condor
ETC = /etc/condor
LOCAL_DIR = {local_dir}
LOG = $(LOCAL_DIR)/log
SPOOL = $(LOCAL_DIR)/spool
EXECUTE = $(LOCAL_DIR)/execute
LOCK = $(LOCAL_DIR)/lock
RUN = $(LOCAL_DIR)/run
CRED_STORE_DIR = $(LOCAL_DIR)/cred_dir
SEC_PASSWORD_DIRECTORY = $(LOCAL_DIR)/passwords.d
SEC_TOKEN_SYSTEM_DIRECTORY = $(LOCAL_DIR)/tokens.d
LOCAL_CONFIG_FILE =
LOCAL_CONFIG_DIR =

use ROLE : Personal
CONDOR_HOST = 127.0.0.1
COLLECTOR_HOST = 127.0.0.1:{port}
NETWORK_INTERFACE = 127.0.0.1
BIND_ALL_INTERFACES = False
ENABLE_IPV6 = False
USE_SHARED_PORT = False
UID_DOMAIN = jobtoken-ci
FILESYSTEM_DOMAIN = jobtoken-ci
TRUST_UID_DOMAIN = True

# FS authentication on loopback: the schedd knows each submitter's account
SEC_DEFAULT_AUTHENTICATION_METHODS = FS
SEC_CLIENT_AUTHENTICATION_METHODS = FS
ALLOW_READ = *
ALLOW_WRITE = *
ALLOW_DAEMON = *
ALLOW_NEGOTIATOR = *
ALLOW_ADMINISTRATOR = root@*, condor@*
ALLOW_OWNER = root@*, condor@*
ALLOW_CONFIG = root@*

# inside a chroot (and harmless on a host)
MOUNT_UNDER_SCRATCH =
USE_PID_NAMESPACES = False

# jobs start and report within seconds
NUM_CPUS = 4
MEMORY = 2048
START = True
SUSPEND = False
PREEMPT = False
KILL = False
WANT_SUSPEND = False
WANT_VACATE = False
UPDATE_INTERVAL = 2
NEGOTIATOR_INTERVAL = 2
NEGOTIATOR_MIN_INTERVAL = 1
NEGOTIATOR_CYCLE_DELAY = 1
SCHEDD_INTERVAL = 2
SCHEDD_MIN_INTERVAL = 1
JOB_START_DELAY = 0
JOB_START_COUNT = 10
STARTER_INITIAL_UPDATE_INTERVAL = 2
STARTER_UPDATE_INTERVAL = 5
SHADOW_QUEUE_UPDATE_INTERVAL = 5
STARTD_CRON_JOBLIST =
MAX_JOB_RETIREMENT_TIME = 0
SCHEDD_JOB_QUEUE_LOG_FLUSH_DELAY = 0
SYSTEM_PERIODIC_REMOVE = False

# jobtoken, installed as a site admin would: the package's EP snippet, this site's config
include : {jobtoken_conf}
JOBTOKEN_LIBEXEC = {libexec}
JOBTOKEN_CONFIG = {jobtoken_toml}
JOBTOKEN_AUDIT_LOG = $(LOG)/jobtoken
"""


class Pool:
    """One running personal pool; ``start()``/``stop()`` or use it as a context manager."""

    def __init__(self, env: PoolEnv, *, deb: Path, jobtoken_toml: str, extra_config: str = "",
                 before_master: Optional[Callable[[Pool], None]] = None,
                 master_env: Optional[Mapping[str, str]] = None) -> None:
        """``deb``: jobtoken's Debian package, installed into the pool environment while the
        pool runs; ``extra_config``: HTCondor config lines appended last (e.g. an access
        point's credd and credmon for the credd-path tests); ``before_master``: called once
        jobtoken is installed, before condor_master starts (e.g. the site files a daemon
        in DAEMON_LIST reads when it starts); ``master_env``: variables condor_master and
        its daemons start with besides CONDOR_CONFIG (e.g. DOCKER_HOST)."""
        self.env = env
        self.package = SharedInstall(env.root, deb)
        self._installed = False
        self.jobtoken_toml_text = jobtoken_toml
        self.extra_config = extra_config
        self.before_master = before_master
        self.master_env = dict(master_env or {})
        base = env.host_path("/var/tmp")
        base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="jobtoken-pool-", dir=base))
        self.inner = env.inner_path(self.dir)
        self.port = free_port()
        self.config = f"{self.inner}/condor_config"
        self.master: Optional[subprocess.Popen[bytes]] = None
        self.mounts = ChrootMounts(env.root) if env.chrooted else None
        self.user = TEST_USER
        self._started = False

    # paths ----------------------------------------------------------------------------------

    def host(self, inner: str) -> Path:
        return self.env.host_path(inner)

    @property
    def etc(self) -> str:
        return f"{self.inner}/etc"

    # where the package puts them (docs/packaging.md)
    jobtoken_bin = "/usr/bin/jobtoken"
    libexec = "/usr/libexec/jobtoken"
    snippets = "/usr/share/jobtoken/condor/config.d"

    @property
    def audit_log(self) -> Path:
        """The test user's audit log file (JOBTOKEN_AUDIT_LOG/<user>.log)."""
        return self.dir / "log" / "jobtoken" / f"{self.user}.log"

    # set-up ---------------------------------------------------------------------------------

    def _site_files(self) -> None:
        """The site's own files: its jobtoken.toml (the package's example stays untouched)."""
        etc = self.dir / "etc"
        etc.mkdir()
        (etc / "jobtoken.toml").write_text(self.jobtoken_toml_text)

    def write_site_secret(self, name: str, value: str) -> str:
        """A site file only root and the jobs group read (0640 root:jobtoken-jobs)."""
        path = self.dir / "etc" / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
        os.chown(path, 0, self.env.group_id(JOBS_GROUP))
        os.chmod(path, 0o640)
        return f"{self.etc}/{name}"

    def set_jobtoken_toml(self, text: str) -> None:
        """Replace the site's jobtoken.toml (read by each hook run, no reconfig needed)."""
        path = self.dir / "etc" / "jobtoken.toml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, path)

    def start(self, timeout: float = 90.0) -> Pool:
        condor = self.env.account("condor")
        self.dir.chmod(0o755)
        for name in ("log", "spool", "execute", "lock", "run", "cred_dir"):
            (self.dir / name).mkdir()
            os.chown(self.dir / name, condor.uid, condor.gid)
        (self.dir / "log" / "jobtoken").mkdir()
        (self.dir / "log" / "jobtoken").chmod(0o1733)  # as the package makes /var/log/jobtoken
        for name in ("passwords.d", "tokens.d"):
            (self.dir / name).mkdir(mode=0o700)
        self.host("/run/condor").mkdir(parents=True, exist_ok=True)
        self._site_files()
        (self.dir / "condor_config").write_text(_pool_config(
            self.inner, self.port, f"{self.snippets}/50-jobtoken.conf", self.libexec,
            f"{self.etc}/jobtoken.toml") + self.extra_config)
        subprocess.run(["chmod", "-R", "go+rX", str(self.dir / "etc")], check=True)
        if self.before_master is not None:
            self.before_master(self)
        if self.mounts is not None:
            self.mounts.acquire()
        self._started = True
        self.package.acquire()  # with /proc mounted for the maintainer scripts
        self._installed = True
        out = open(self.dir / "master.out", "wb")
        try:
            self.master = subprocess.Popen(
                self.env.argv(["condor_master", "-f", "-t"],
                              env={**self.master_env, "CONDOR_CONFIG": self.config}),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        self.wait_for(self._ready, timeout, "the pool's schedd and startd to come up")
        return self

    def _ready(self) -> bool:
        if self.master is not None and self.master.poll() is not None:
            raise RuntimeError(f"condor_master exited early:\n{self.tail('MasterLog')}")
        slots = self.condor(["condor_status", "-af", "Name"], check=False)
        schedd = self.condor(["condor_status", "-schedd", "-af", "Name"], check=False)
        return bool(slots.stdout.strip()) and bool(schedd.stdout.strip())

    # tear-down ------------------------------------------------------------------------------

    def _leftovers(self) -> List[int]:
        """Processes of this pool (daemons, starters, jobs, sidecars) still alive."""
        marker = f"CONDOR_CONFIG={self.config}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if marker in environ.split(b"\0") or cwd.startswith(str(self.dir)):
                found.append(int(entry.name))
        return found

    def stop(self, timeout: float = 60.0) -> None:
        """Stop condor_master by its pid and wait; kill what is left; unmount; delete."""
        try:
            if self.master is not None and self.master.poll() is None:
                self.master.send_signal(signal.SIGQUIT)  # fast shutdown of all daemons
                try:
                    self.master.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.master.kill()
                    self.master.wait(10)
            deadline = time.monotonic() + 20
            while True:
                left = self._leftovers()
                if not left:
                    break
                if time.monotonic() > deadline:
                    for pid in left:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    if time.monotonic() > deadline + 10:
                        raise RuntimeError(f"pool processes survive SIGKILL: {left}")
                time.sleep(0.2)
        finally:
            try:
                if self._installed:
                    self.package.release()
            finally:
                if self.mounts is not None and self._started:
                    self.mounts.release()
            # the chroot's mounts (ours or another pool's) are never below this directory
            below = [p for p in _mount_points() if p.startswith(str(self.dir) + "/")]
            if below:
                raise RuntimeError(f"not deleting {self.dir}: mounts below it {below}")
            shutil.rmtree(self.dir)

    def __enter__(self) -> Pool:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # driving it -----------------------------------------------------------------------------

    def condor(
        self, argv: Sequence[str], *, user: Optional[str] = None, check: bool = True,
        timeout: float = 60.0, cwd: Optional[str] = None,
    ) -> subprocess.CompletedProcess[str]:
        """A condor_* tool in the pool environment, as root or as ``user``."""
        return self.env.run(argv, env={"CONDOR_CONFIG": self.config}, user=user, check=check,
                            timeout=timeout, cwd=cwd)

    def job_dir(self, name: str) -> Path:
        """A fresh submit directory owned by the test user (host path)."""
        account = self.env.account(self.user)
        path = self.dir / "submit" / name
        path.mkdir(parents=True)
        os.chown(path.parent, 0, 0)
        os.chown(path, account.uid, account.gid)
        return path

    def submit(self, directory: Path, text: str, files: Optional[Mapping[str, str]] = None,
               *, user: Optional[str] = None) -> int:
        """Write the submit file and executables into ``directory``, submit; the cluster id."""
        owner = self.env.account(user or self.user)
        for name, content in (files or {}).items():
            path = directory / name
            path.write_text(content)
            path.chmod(0o755)
            os.chown(path, owner.uid, owner.gid)
        sub = directory / "job.sub"
        sub.write_text(text)
        os.chown(sub, owner.uid, owner.gid)
        proc = self.condor(["condor_submit", "-terse", "job.sub"], user=user or self.user,
                           cwd=self.env.inner_path(directory))
        return int(proc.stdout.strip().split(".")[0])

    def job_ad(self, cluster: int) -> Optional[Dict[str, Any]]:
        """The job's ad: from the queue, else from the history, else None."""
        for argv in (["condor_q", "-json", str(cluster)],
                     ["condor_history", "-json", "-limit", "1", str(cluster)]):
            out = self.condor(argv, check=False).stdout.strip()
            if out:
                ads = json.loads(out)
                if ads:
                    return dict(ads[0])
        return None

    def wait_job(self, cluster: int, until: Callable[[Dict[str, Any]], bool], timeout: float,
                 what: str) -> Dict[str, Any]:
        holder: Dict[str, Any] = {}

        def check() -> bool:
            ad = self.job_ad(cluster)
            if ad is not None:
                holder["ad"] = ad
            return ad is not None and until(ad)

        self.wait_for(check, timeout, f"job {cluster} {what}",
                      detail=lambda: _summary(holder.get("ad")))
        return holder["ad"]

    def wait_done(self, cluster: int, timeout: float = 180.0) -> Dict[str, Any]:
        """Wait until the job left the queue (completed or removed); its history ad."""
        return self.wait_job(cluster, lambda ad: ad.get("JobStatus") in (COMPLETED, REMOVED),
                             timeout, "to finish")

    def wait_for(self, check: Callable[[], bool], timeout: float, what: str,
                 detail: Optional[Callable[[], str]] = None) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.2
        while not check():
            if time.monotonic() > deadline:
                extra = detail() if detail else ""
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}. {extra}\n"
                    f"{self.tail('StarterLog.slot1', 30)}\n{self.tail('SchedLog', 15)}")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def tail(self, log: str, lines: int = 40) -> str:
        path = self.dir / "log" / log
        try:
            text = path.read_text(errors="replace").splitlines()
        except OSError:
            return f"({log}: none)"
        return f"--- {log}:\n" + "\n".join(text[-lines:])

    def starter_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted((self.dir / "log").glob("StarterLog*")))


def _summary(ad: Optional[Dict[str, Any]]) -> str:
    if ad is None:
        return "(no job ad)"
    keys = ("JobStatus", "ExitCode", "HoldReason", "HoldReasonCode", "HoldReasonSubCode",
            "NumJobStarts", "LastVacateReason", "VacateReason")
    return " ".join(f"{k}={ad[k]!r}" for k in keys if k in ad)
