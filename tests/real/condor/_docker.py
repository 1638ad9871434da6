"""A real Docker engine beside the real HTCondor pool, for docker-universe jobs.

Debian 13's ``docker.io`` (dockerd, containerd, runc) and ``docker-cli`` are installed into
the pool environment by ``.ci/install-htcondor.sh``, so the engine sees the same files as
the pool's starter: the starter hands docker its sandbox path (``--volume S:S``) and that
path must name the same directory for both. On Debian 12 the engine therefore runs in the
chroot too, in a mount namespace of its own where the chroot is a bind mount of itself:
docker remounts "/" private, which fails where "/" is no mount point (a plain chroot).

Each engine has its own socket, data root and exec root under the pool environment's
/var/tmp, no bridge and no iptables rules, so it never touches the host's network nor a
Docker the machine may run itself. The pool reaches it through ``DOCKER_HOST``: HTCondor
passes its own environment to the docker command line tool and reads the socket from it.
The image is made here from the pool environment's static busybox (``docker import``): no
image registry is needed.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

from ._pool import PATH, ChrootMounts, PoolEnv

IMAGE = "jobtoken-ci/busybox:1"
MARKER = "/jobtoken-ci-image"  # a file only the image has: the payload ran inside it
# busybox applets the test payloads use
APPLETS = ("sh", "cat", "sleep", "ls", "id", "date", "env", "sha256sum", "cut", "printf")


class DockerEngine:
    """dockerd in the pool environment; ``start()``/``stop()`` or a context manager."""

    def __init__(self, env: PoolEnv) -> None:
        self.env = env
        base = env.host_path("/var/tmp")
        base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="jtd-", dir=base))  # short: socket paths
        self.dir.chmod(0o755)  # the condor account reaches the socket (root:docker 0660)
        self.inner = env.inner_path(self.dir)
        self.socket = f"{self.inner}/docker.sock"
        self.mounts = ChrootMounts(env.root) if env.chrooted else None
        self.process: Optional[subprocess.Popen[bytes]] = None

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def _dockerd_argv(self) -> list[str]:
        dockerd = ["/usr/bin/env", "-i", f"PATH={PATH}", "dockerd",
                   "--data-root", f"{self.inner}/data", "--exec-root", f"{self.inner}/exec",
                   "--pidfile", f"{self.inner}/dockerd.pid", "--host", self.docker_host,
                   "--group", "docker", "--bridge", "none", "--iptables=false",
                   "--ip6tables=false", "--containerd-namespace", "jobtoken-ci",
                   "--containerd-plugins-namespace", "jobtoken-ci-plugins"]
        if not self.env.chrooted:
            return dockerd
        root = str(self.env.root)
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --rbind "$1" "$1" && root=$1 && shift && exec chroot "$root" "$@"',
                "sh", root, *dockerd]

    def start(self, timeout: float = 90.0) -> DockerEngine:
        if self.mounts is not None:
            self.mounts.acquire()
        log = open(self.dir / "dockerd.log", "wb")
        try:
            self.process = subprocess.Popen(self._dockerd_argv(), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while self.docker(["version"], check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not come up:\n{self.log()}")
            time.sleep(0.5)
        self._import_image()
        return self

    def docker(self, args: list[str], *, check: bool = True,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.env.run(["docker", *args], env={"DOCKER_HOST": self.docker_host},
                            check=check, timeout=timeout)

    def _import_image(self) -> None:
        """The test image: static busybox, a few applet links, /tmp, and the marker file."""
        busybox = self.env.host_path("/usr/bin/busybox").read_bytes()
        archive = self.dir / "image.tar"
        with tarfile.open(archive, "w") as tar:
            def add(name: str, data: bytes = b"", mode: int = 0o644,
                    kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
                info = tarfile.TarInfo(name)
                info.type, info.mode, info.linkname = kind, mode, link
                info.size = len(data) if kind == tarfile.REGTYPE else 0
                tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

            add("bin", mode=0o755, kind=tarfile.DIRTYPE)
            add("tmp", mode=0o1777, kind=tarfile.DIRTYPE)
            add("bin/busybox", busybox, mode=0o755)
            for applet in APPLETS:
                add(f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox")
            add(MARKER.lstrip("/"), b"jobtoken CI image\n")
        self.docker(["import", f"{self.inner}/image.tar", IMAGE], timeout=120)

    def containers(self) -> list[str]:
        """Names of every container the engine has, running or not."""
        out = self.docker(["ps", "--all", "--format", "{{.Names}}"])
        return out.stdout.split()

    def log(self) -> str:
        try:
            return (self.dir / "dockerd.log").read_text(errors="replace")[-3000:]
        except OSError:
            return "(no dockerd.log)"

    def stop(self, timeout: float = 60.0) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout)
        finally:
            if self.mounts is not None:
                self.mounts.release()
            # its mounts lived in its own namespace, gone with it: plain files are left
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DockerEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
