"""Run the real grid clients (curl, xrdcp, davix-put, gfal-copy) against the test storage.

Each client gets its token the way a batch job would hand it over, and the way that keeps it
out of ``/proc/<pid>/cmdline`` wherever the client allows (see docs/clients.md):
curl reads its header from a 0600 file (``-H @file``), xrdcp finds ``BEARER_TOKEN_FILE``,
gfal-copy reads ``BEARER_TOKEN`` from its environment. davix-put offers no such channel; it is
the one client here that gets the header in argv.

Must NOT: log or print a token, leave token files readable by others, or wait without a timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

CLIENT_BINARIES = ("curl", "xrdcp", "davix-put", "gfal-copy")
TIMEOUT_S = 60.0
# A WebDAV PUT that made a new file: Debian 12's XRootD answers 200, Debian 13's
# 201 Created (RFC 9110). Either is the success the job relies on.
CREATED = frozenset({200, 201})


@dataclass(frozen=True)
class ClientResult:
    """Outcome of one client run; ``output`` is stdout+stderr (never contains the token)."""

    returncode: int
    output: str = field(repr=False)
    http_status: int | None = None


def missing_clients() -> list[str]:
    """Client binaries not on PATH."""
    return [name for name in CLIENT_BINARIES if shutil.which(name) is None]


def write_secret(path: Path, text: str) -> Path:
    """Create ``path`` 0600 without following symlinks and write ``text`` to it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


class StorageClients:
    """Client runner bound to one storage (its CA) and one private scratch directory."""

    def __init__(self, scratch: Path, ca_file: Path, cert_dir: Path) -> None:
        self.scratch = scratch
        self.ca_file = ca_file
        self.cert_dir = cert_dir
        self._counter = 0
        scratch.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C",
            "HOME": str(self.scratch),
            "X509_CERT_DIR": str(self.cert_dir),
            # gfal-* run the first python on PATH that imports gfal2; pin the system one
            "GFAL_PYTHONBIN": "/usr/bin/python3",
        }
        env.update(extra)
        return env

    def _unique(self, stem: str) -> Path:
        self._counter += 1
        return self.scratch / f"{stem}.{self._counter}"

    def token_file(self, token: str) -> Path:
        """A fresh 0600 file holding ``token`` plus newline, as in ``BEARER_TOKEN_FILE``."""
        return write_secret(self._unique("bt"), token + "\n")

    def _run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )

    def curl(
        self,
        method: str,
        url: str,
        *,
        token: str | None = None,
        upload: Path | None = None,
        output: Path | None = None,
    ) -> ClientResult:
        """One HTTPS request; the bearer header comes from a 0600 file (``-H @file``)."""
        argv = ["curl", "-sS", "--cacert", str(self.ca_file), "-X", method]
        argv += ["-o", str(output) if output is not None else "/dev/null", "-w", "%{http_code}"]
        if token is not None:
            header = write_secret(self._unique("hdr"), f"Authorization: Bearer {token}\n")
            argv += ["-H", f"@{header}"]
        if upload is not None:
            argv += ["-T", str(upload)]
        argv.append(url)
        proc = self._run(argv, self._env())
        status = int(proc.stdout[-3:]) if proc.stdout[-3:].isdigit() else None
        return ClientResult(proc.returncode, proc.stdout + proc.stderr, http_status=status)

    def xrdcp(self, src: Path, url: str, *, token_file: Path) -> ClientResult:
        """``xrdcp`` over root:// finding the token through ``BEARER_TOKEN_FILE``."""
        proc = self._run(
            ["xrdcp", "--nopbar", str(src), url],
            self._env(BEARER_TOKEN_FILE=str(token_file)),
        )
        return ClientResult(proc.returncode, proc.stdout + proc.stderr)

    def davix_put(self, src: Path, url: str, *, token_file: Path) -> ClientResult:
        """``davix-put``: it honours no discovery variable, so the header goes in argv."""
        token = token_file.read_text().strip()
        proc = self._run(
            [
                "davix-put",
                "--capath",
                str(self.cert_dir),
                "-H",
                f"Authorization: Bearer {token}",
                str(src),
                url,
            ],
            self._env(),
        )
        return ClientResult(proc.returncode, proc.stdout + proc.stderr)

    def gfal_copy(self, src: Path, url: str, *, token_file: Path) -> ClientResult:
        """``gfal-copy``: reads ``BEARER_TOKEN`` (the value) but not ``BEARER_TOKEN_FILE``."""
        token = token_file.read_text().strip()
        proc = self._run(
            ["gfal-copy", f"file://{src}", url],
            self._env(BEARER_TOKEN=token),
        )
        return ClientResult(proc.returncode, proc.stdout + proc.stderr)
