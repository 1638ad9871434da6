"""jobtoken's Debian packages for the tests: built once per session from this checkout
(``packaging/build-deb.sh``), and installed for real with dpkg into a Debian system, the host
or a chroot, by the tests that run jobtoken as a site would (the real HTCondor pool, the real
ARC CE; tests/test_packages.py installs with apt itself).

dpkg, not apt-get: the dependencies are there already (.ci/install-*.sh installs them), dpkg
refuses to configure the package if one is missing (then ``apt-get -f install`` fetches it,
as a site admin would), and it takes half apt's time (no package cache to load).

Several users may need the package in one system at once (the HTCondor pools of one run,
two runs on a shared machine): ``SharedInstall`` counts them with holder files named after
their process, like the chroot mounts in tests/real/condor/_pool.py. The first installs, the
last purges, a holder whose process is gone does not count. A jobtoken package that some
other party installed is never replaced or purged: the install waits for it to go, then
fails naming it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=900", "-q", "-y"]
STATE = Path("/var/lib/jobtoken-ci/debs")  # holders and locks, per target system


def clean_env() -> Dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}


def run(cmd: List[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=900, **kw)


def build_debs(out: Path) -> Dict[str, Path]:
    """Build the binary packages into ``out``; {package name: .deb}."""
    result = run([str(PACKAGING / "build-deb.sh"), str(out)])
    if result.returncode != 0:
        raise RuntimeError(f"packaging/build-deb.sh failed:\n{result.stderr[-3000:]}")
    return {deb.name.split("_")[0]: deb for deb in sorted(out.glob("*.deb"))}


def deb_version(deb: Path) -> str:
    return run(["dpkg-deb", "-f", str(deb), "Version"], check=True).stdout.strip()


class SharedInstall:
    """One jobtoken .deb installed into the Debian system at ``root`` ("/" is the host)
    while at least one holder needs it; ``acquire()``/``release()``."""

    def __init__(self, root: Path, deb: Path, *, wait_s: float = 900.0) -> None:
        self.root = root
        self.deb = deb
        self.package = deb.name.split("_")[0]
        self.version = deb_version(deb)
        self.wait_s = wait_s
        key = "host" if root == Path("/") else str(root).strip("/").replace("/", "+")
        self.state = STATE / key
        self.holders = self.state / "holders"
        self.ours = self.state / f"installed-{self.package}"  # we installed what is there
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _in_root(self, argv: List[str]) -> List[str]:
        return argv if self.root == Path("/") else ["chroot", str(self.root), *argv]

    def installed_version(self) -> Optional[str]:
        out = run(self._in_root(["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}",
                                 self.package]))
        status, _, version = out.stdout.strip().partition(" ")
        return version if out.returncode == 0 and status == "installed" else None

    def _live_holders(self) -> List[Path]:
        live = []
        for holder in self.holders.glob("*"):
            pid = holder.name.split("-")[0]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                live.append(holder)
            else:
                holder.unlink(missing_ok=True)
        return live

    def _locked(self) -> int:
        self.holders.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            fd = self._locked()
            try:
                why_not = self._try_acquire()
                if why_not is None:
                    return
            finally:
                os.close(fd)
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot install {self.deb.name} into {self.root}: {why_not}")
            time.sleep(2.0)

    def _try_acquire(self) -> Optional[str]:
        """Install or join under the lock; None on success, else why we have to wait."""
        installed = self.installed_version()
        live = self._live_holders()
        if live:
            if installed != self.version:
                return f"version {installed} is in use by {len(live)} other test run(s)"
        elif installed is not None and not self.ours.exists():
            return f"{self.package} {installed} is installed there, not by the tests"
        else:
            self._install()
        (self.holders / self.token).write_text("")
        return None

    def _install(self) -> None:
        inside = self.root / "var" / "tmp" / f"jobtoken-deb-{self.token}"
        inside.mkdir(parents=True)
        try:
            shutil.copy(self.deb, inside / self.deb.name)
            target = "/" + str((inside / self.deb.name).relative_to(self.root))
            # dpkg -i installs again what is there (the same version string built from a
            # changed tree included)
            self.ours.write_text(self.version)
            result = run(self._in_root(["dpkg", "-i", target]))
            if result.returncode != 0:
                result = run(self._in_root([*APT, "install", "-f", "--no-install-recommends"]))
            if result.returncode != 0 or self.installed_version() != self.version:
                raise RuntimeError(f"installing {self.deb.name} into {self.root} failed:\n"
                                   f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        finally:
            shutil.rmtree(inside, ignore_errors=True)

    def release(self) -> None:
        fd = self._locked()
        try:
            (self.holders / self.token).unlink(missing_ok=True)
            if not self._live_holders() and self.ours.exists():
                result = run(self._in_root(["dpkg", "--purge", self.package]))
                if result.returncode != 0:
                    raise RuntimeError(f"dpkg --purge {self.package} in {self.root} failed:\n"
                                       f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
                self.ours.unlink()
        finally:
            os.close(fd)
