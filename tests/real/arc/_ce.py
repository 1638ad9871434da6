"""A real ARC 6 CE for the tests: A-REX with the fork LRMS and the REST interface on loopback.

Set up as docs/arc.md tells a site admin (arc.conf, ``arcctl test-ca``, a mapped local
account, jobtoken's Debian package installed with apt and its system RTE
``/usr/share/arc/rte/ENV/JOBTOKEN`` enabled with ``arcctl rte``), but inside one directory of
its own (``/var/tmp/jobtoken-arc-*``) so that runs on one machine do not clash.
The two daemons are started the way the packages' units do it (``/usr/share/arc/arc-arex-start``
and ``arc-arex-ws-start``, in the foreground, so their pids are ours); the WS start script is
run from a copy whose TCP listener is bound to ``localhost`` (the packaged one listens on every
address). On a Debian without ARC 6 (Debian 13 ships ARC 7) everything CE-side runs in the
Debian 12 chroot that ``.ci/install-arc.sh`` builds.

Must NOT: touch /etc/arc.conf or other system paths (except the one pool account and the
jobtoken package, purged again at the end), leave a daemon or a mount behind, or listen on a
non-loopback address.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

JOBTOKEN_BIN = "/usr/bin/jobtoken"  # where the package installs it (docs/packaging.md)
SYSTEM_RTE = "/usr/share/arc/rte/ENV/JOBTOKEN"
INSTALL_HINT = "run .ci/install-arc.sh as root (scripts/test does)"
ARC_CHROOT = Path(os.environ.get("ARC_CHROOT", "/var/lib/jobtoken-ci/arc-bookworm"))
POOL_USER = "jtarcpool"
CLIENT_TIMEOUT_S = 60

T = TypeVar("T")


class CEError(RuntimeError):
    """The CE could not be set up or did not do what was asked in time."""


def wait_for(what: str, probe: Callable[[], Optional[T]], timeout_s: float,
             interval_s: float = 2.0) -> T:
    """Poll ``probe`` until it returns something other than None, or fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise CEError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def use_chroot() -> bool:
    """Whether the CE lives in the Debian 12 chroot (the rule of install-arc.sh: Debian 12
    runs ARC 6 itself; elsewhere install-arc.sh built the chroot)."""
    forced = os.environ.get("JOBTOKEN_ARC_CHROOT")
    if forced:
        return forced == "1"
    version = Path("/etc/debian_version").read_text(encoding="ascii").strip()
    return version.split(".")[0] != "12" and ARC_CHROOT.exists()


def missing_prerequisites(root: Optional[Path]) -> List[str]:
    base = root or Path("/")
    need = ["usr/share/arc/arc-arex-start", "usr/share/arc/arc-arex-ws-start", "usr/sbin/arched",
            "usr/sbin/arcctl", "usr/bin/arcsub", "usr/bin/arcget", "usr/bin/arckill",
            "usr/bin/arcproxy", "usr/bin/python3"]
    missing = [p for p in need if not (base / p).exists()]
    if not list((base / "usr/lib").glob("*/arc/libaccARCREST.so")) and not list(
            (base / "usr/lib").glob("arc/libaccARCREST.so")):
        missing.append("nordugrid-arc-plugins-arcrest")
    return missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Job:
    job_id: str
    downloads: Path


@dataclass
class ArcCE:
    """One configured CE; ``start()`` brings it up, ``stop()`` takes everything down."""

    chroot: Optional[Path]
    base: Path  # the CE's own directory, as the CE sees it
    port: int = field(default_factory=free_port)
    daemons: Dict[str, subprocess.Popen] = field(default_factory=dict)
    mounts: List[Path] = field(default_factory=list)

    # --- paths and commands ----------------------------------------------------------------

    def host(self, path: Path | str) -> Path:
        """Where a CE-side path is from the test's side."""
        return Path(str(self.chroot) + str(path)) if self.chroot else Path(path)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/arex"

    @property
    def conf(self) -> Path:
        return self.base / "arc.conf"

    def argv(self, argv: Sequence[str]) -> List[str]:
        return (["chroot", str(self.chroot)] if self.chroot else []) + [str(a) for a in argv]

    def run(self, argv: Sequence[str], *, env: Optional[Dict[str, str]] = None,
            timeout_s: float = 120, check: bool = True, cwd: Optional[Path] = None
            ) -> subprocess.CompletedProcess:
        full = self.argv(argv)
        if cwd is not None and self.chroot:
            full = self.argv(["sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *map(str, argv)])
            cwd = None
        proc = subprocess.run(full, env=env or self.admin_env(), cwd=cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout_s)
        if check and proc.returncode != 0:
            raise CEError(f"{' '.join(map(str, argv[:4]))} exited {proc.returncode}: "
                          f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        return proc

    def admin_env(self) -> Dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                "HOME": str(self.base / "admin"), "TMPDIR": str(self.base / "tmp")}

    def client_env(self) -> Dict[str, str]:
        env = self.admin_env()
        env.update(HOME=str(self.base / "client"),
                   X509_USER_CERT=str(self.base / "client" / "usercert.pem"),
                   X509_USER_KEY=str(self.base / "client" / "userkey.pem"),
                   X509_USER_PROXY=str(self.base / "client" / "proxy.pem"),
                   X509_CERT_DIR=str(self.base / "grid-security" / "certificates"))
        return env

    def arc(self, *argv: str, check: bool = True, timeout_s: float = 120
            ) -> subprocess.CompletedProcess:
        """An ARC client command as the test user, with this CE's job list."""
        cmd = [argv[0], "-t", str(CLIENT_TIMEOUT_S), "-j", str(self.base / "client" / "jobs.dat"),
               *argv[1:]]
        return self.run(cmd, env=self.client_env(), timeout_s=timeout_s, check=check)

    # --- set up ----------------------------------------------------------------------------

    def configure(self) -> None:
        """Directories, test CA, pool account, arc.conf and the RTE; nothing runs yet."""
        for sub in ("admin", "tmp", "client", "control", "session", "run", "log", "rte/ENV",
                    "grid-security/certificates", "jobs"):
            self.host(self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.host(self.base / "session"), 0o755)
        os.chmod(self.host(self.base / "tmp"), 0o1777)
        self._mount_system()
        self._pool_account()
        self.host(self.conf).write_text(self._arc_conf(dn=""), encoding="utf-8")
        self._test_ca()
        self.host(self.conf).write_text(self._arc_conf(dn=self.user_dn), encoding="utf-8")

    def _mount_system(self) -> None:
        if not self.chroot:
            return
        for name, argv in (("proc", ["mount", "-t", "proc", "proc"]),
                           ("dev", ["mount", "--rbind", "/dev"]),
                           ("sys", ["mount", "--rbind", "/sys"])):
            target = self.chroot / name
            if subprocess.run(["mountpoint", "-q", str(target)]).returncode == 0:
                continue
            subprocess.run([*argv, str(target)], check=True)
            if name != "proc":
                subprocess.run(["mount", "--make-rslave", str(target)], check=True)
            self.mounts.append(target)
        shutil.copy("/etc/resolv.conf", self.chroot / "etc" / "resolv.conf")

    def _pool_account(self) -> None:
        if self.run(["getent", "passwd", POOL_USER], check=False).returncode != 0:
            self.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                      "/nonexistent", "--shell", "/usr/sbin/nologin", POOL_USER])

    def _test_ca(self) -> None:
        ca = ["arcctl", "-c", self.conf, "test-ca", "--ca-dir",
              self.base / "grid-security" / "certificates", "--ca-id", self.base.name]
        self.run([*ca, "init"])
        hostdir = self.base / "grid-security"
        self.run([*ca, "hostcert", "-n", "localhost", "-f"], cwd=hostdir)
        cert = next(self.host(hostdir).glob("*localhost-cert.pem"))
        key = next(self.host(hostdir).glob("*localhost-key.pem"))
        cert.rename(self.host(hostdir / "hostcert.pem"))
        key.rename(self.host(hostdir / "hostkey.pem"))
        client = self.base / "client"
        out = self.run([*ca, "usercert", "-n", "jobtoken arc tester", "--no-auth", "-f"],
                       cwd=client).stdout
        names = re.findall(r"saved to (\S+) and (\S+) respectively", out)
        if not names:
            raise CEError(f"arcctl test-ca usercert said: {out.strip()}")
        self.host(client / names[0][0]).rename(self.host(client / "usercert.pem"))
        self.host(client / names[0][1]).rename(self.host(client / "userkey.pem"))
        subject = self.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "compat", "-in",
                            client / "usercert.pem"]).stdout
        self.user_dn = subject.split("=", 1)[1].strip()

    def _arc_conf(self, dn: str) -> str:
        b = self.base
        return f"""[common]
hostname = localhost
x509_host_key = {b}/grid-security/hostkey.pem
x509_host_cert = {b}/grid-security/hostcert.pem
x509_cert_dir = {b}/grid-security/certificates

[authgroup:testers]
subject = {dn or "/CN=nobody"}

[mapping]
map_to_user = testers {POOL_USER}:{POOL_USER}
policy_on_nomap = stop

[lrms]
lrms = fork

[arex]
controldir = {b}/control
sessiondir = {b}/session
runtimedir = {b}/rte
pidfile = {b}/run/arex.pid
logfile = {b}/log/arex.log
joblog = {b}/log/arex-jobs.log
helperlog = {b}/log/job.helper.errors
tmpdir = {b}/tmp
wakeupperiod = 5
loglevel = 3
statecallout = FINISHED timeout=60,onfailure=log {JOBTOKEN_BIN} arc end \
--config {b}/etc/jobtoken.toml --parent-mytoken-file {b}/etc/robot.mytoken --job-id %I

[arex/ws]
wsurl = {self.url}
logfile = {b}/log/ws-interface.log
pidfile = {b}/run/arex-ws.pid

[arex/ws/jobs]
allowaccess = testers

[infosys]
logfile = {b}/log/infoprovider.log

[infosys/glue2]

[infosys/cluster]

[queue:fork]
"""

    def enable_rte(self, params: Dict[str, str]) -> None:
        """Enable the package's system RTE (not a copy in ``runtimedir``) with its params."""
        arcctl = ["arcctl", "-c", self.conf, "rte"]
        listed = self.run([*arcctl, "list", "--system", "--long"]).stdout
        if SYSTEM_RTE not in listed:
            raise CEError(f"arcctl does not list the package's {SYSTEM_RTE}: {listed.strip()}")
        self.run([*arcctl, "enable", "ENV/JOBTOKEN"])
        for name, value in params.items():
            self.run([*arcctl, "params-set", "ENV/JOBTOKEN", name, value])

    def set_param(self, name: str, value: str) -> None:
        self.run(["arcctl", "-c", self.conf, "rte", "params-set", "ENV/JOBTOKEN", name, value])

    # --- daemons ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 180) -> None:
        env = self.admin_env()
        env["ARC_CONFIG"] = str(self.conf)
        ws_start = self.base / "arc-arex-ws-start"
        packaged = self.host("/usr/share/arc/arc-arex-ws-start").read_text(encoding="utf-8")
        listen = "<tcp:Listen><tcp:Port>$arex_port</tcp:Port></tcp:Listen>"
        if packaged.count(listen) != 2:
            raise CEError("arc-arex-ws-start has no TCP listener line to bind to loopback")
        local = listen.replace("<tcp:Port>", "<tcp:Interface>localhost</tcp:Interface><tcp:Port>")
        self.host(ws_start).write_text(packaged.replace(listen, local), encoding="utf-8")
        os.chmod(self.host(ws_start), 0o755)
        for name, script in (("arex", "/usr/share/arc/arc-arex-start"), ("ws", str(ws_start))):
            log = open(self.host(self.base / "log" / f"{name}.start.log"), "ab")
            self.daemons[name] = subprocess.Popen(
                self.argv([script, "-f"]), env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
        wait_for("A-REX's REST interface", self._listening, timeout_s, 1.0)
        self.assert_loopback_only()
        self.run(["arcproxy"], env=self.client_env())

    def _listening(self) -> Optional[bool]:
        for name, proc in self.daemons.items():
            if proc.poll() is not None:
                raise CEError(f"A-REX {name} daemon exited {proc.returncode}: {self.logs_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return None

    def assert_loopback_only(self) -> None:
        """Every listening TCP socket of our daemons is on a loopback address."""
        import psutil

        for proc in self.daemons.values():
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]
            except psutil.NoSuchProcess:
                continue
            for p in tree:
                for conn in p.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        ip = conn.laddr.ip
                        if not (ip.startswith(("127.", "::ffff:127.")) or ip == "::1"):
                            raise CEError(f"A-REX pid {p.pid} listens on {ip}:{conn.laddr.port}")

    def stop(self) -> None:
        """TERM each daemon's process group we started, KILL after a grace; unmount."""
        for proc in self.daemons.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for proc in self.daemons.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        self.daemons.clear()
        self._kill_pool_processes()
        for target in reversed(self.mounts):
            subprocess.run(["umount", "-R", "-l", str(target)], check=False)
        self.mounts.clear()

    def _kill_pool_processes(self) -> None:
        """Jobs of this CE still running as the pool account (a fork job is its own session)."""
        import psutil

        session = str(self.host(self.base / "session"))
        uid = int(self.run(["id", "-u", POOL_USER]).stdout)
        for p in psutil.process_iter(["uids", "cwd", "cmdline"]):
            try:
                info = p.info
                inside = (info.get("cwd") or "").startswith(session) or any(
                    str(self.base) in part for part in info.get("cmdline") or ())
                if info["uids"] and info["uids"].real == uid and inside:
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue

    def logs_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("arex.start.log", "ws.start.log", "arex.log", "ws-interface.log"):
            path = self.host(self.base / "log" / name)
            if path.exists():
                text = path.read_text(encoding="utf-8", errors="replace").splitlines()
                out.append(f"--- {name}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    # --- jobs ------------------------------------------------------------------------------

    def submit(self, xrsl: str, *, check: bool = True) -> Tuple[Optional[str], str]:
        """``arcsub`` a job description; returns (job id or None, arcsub's output)."""
        proc = self.arc("arcsub", "-C", self.url, "-T", "arcrest", "-Q", "arcrest", "-e", xrsl,
                        check=False, timeout_s=180)
        text = proc.stdout + proc.stderr
        m = re.search(r"Job submitted with jobid:\s*(\S+)", text)
        if check and not m:
            raise CEError(f"arcsub failed ({proc.returncode}): {text.strip()[-1500:]}")
        return (m.group(1) if m else None), text

    def state(self, job_id: str) -> str:
        out = self.arc("arcstat", job_id, check=False).stdout
        m = re.search(r"State:\s*(\S+)", out)
        return m.group(1) if m else ""

    def wait_final(self, job_id: str, timeout_s: float) -> str:
        final = ("Finished", "Failed", "Killed", "Deleted")
        return wait_for(f"job {job_id} to end",
                        lambda: (lambda s: s if s in final else None)(self.state(job_id)),
                        timeout_s, 3.0)

    def get(self, job_id: str) -> Path:
        """``arcget`` the job's files into a fresh directory (host side) and return it."""
        dest = self.base / "jobs" / f"dl-{int(time.time() * 1000)}"
        self.host(dest).mkdir()
        self.arc("arcget", "-D", str(dest), "-k", job_id, timeout_s=180)
        found = [p for p in self.host(dest).iterdir() if p.is_dir()]
        return found[0] if found else self.host(dest)

    def log(self, job_id: str) -> str:
        """``arccat -l``: the job's A-REX error log (where stage 0 and the RTE report)."""
        proc = self.arc("arccat", "-l", job_id, check=False)
        return proc.stdout + proc.stderr


def make_base(chroot: Optional[Path]) -> Path:
    """A fresh CE directory under /var/tmp (traversable by the pool account)."""
    parent = Path(str(chroot) + "/var/tmp") if chroot else Path("/var/tmp")
    host_dir = Path(tempfile.mkdtemp(prefix="jobtoken-arc-", dir=parent))
    os.chmod(host_dir, 0o755)
    return Path("/var/tmp") / host_dir.name
