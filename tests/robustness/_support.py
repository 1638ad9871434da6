"""Helpers shared by the robustness tests: a prepared site, CLI runs, server-side checks.

Reuses ``tests/runhelpers.py`` for the things it already does (argv, payloads, state);
adds what the fault matrix needs on top: a site config *file* for the real CLI, a
fingerprint of the parent mytoken file, and the server's view of live job mytokens.
"""

from __future__ import annotations

import os
import select
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import httpx

from jobtoken._tokenfile import write_secret_file
from tests.runhelpers import AUD, PARENT_CAPS, jobtoken_argv
from tests.siteconfig import config_text, loopback_site
from tests.suiteoptions import LONG

__all__ = [
    "AUD",
    "LONG",
    "OP_SCOPES",
    "ServerActivity",
    "Site",
    "assert_one_line_error",
    "fingerprint",
    "live_job_mytokens",
    "make_site",
]


OP_SCOPES = ("storage.read:/", "storage.create:/")


@dataclass(frozen=True)
class Site:
    """A site as ``jobtoken prepare`` sees it: config file, parent mytoken, a job dir."""

    root: Path
    config: Path
    parent: Path
    parent_mytoken: str
    job_dir: Path

    def prepare_argv(self, job_id: str = "job-1", *extra: str) -> List[str]:
        return jobtoken_argv(
            "prepare",
            "--config",
            str(self.config),
            "--dir",
            str(self.job_dir),
            "--job-id",
            job_id,
            "--walltime",
            "600",
            *extra,
        )


def make_site(
    srv: Any,
    root: Path,
    *,
    timeout_s: float = 1.0,
    lifetime_s: float = 300,
    job_dir: Optional[Path] = None,
    **renewal: Any,
) -> Site:
    """Issue a parent mytoken and write the site config file the CLI reads."""
    root.mkdir(parents=True, exist_ok=True)
    parent = root / "parent.mt"
    mytoken = srv.issue_mytoken(capabilities=list(PARENT_CAPS))
    write_secret_file(parent, mytoken, newline=False)
    config = root / "jobtoken.toml"
    sections = loopback_site(url=srv.url, parent=parent, scope="storage.create:/vo",
                             audience=AUD, lifetime_s=lifetime_s, timeout_s=timeout_s)
    config.write_text(config_text({**sections, **({"renewal": renewal} if renewal else {})}))
    return Site(root, config, parent, mytoken, job_dir or root / "job")


def fingerprint(path: Path) -> Tuple[bytes, int]:
    """A file's exact bytes and permission bits."""
    return path.read_bytes(), stat.S_IMODE(os.lstat(path).st_mode)


def live_job_mytokens(srv: Any, parent_mytoken: str) -> List[str]:
    """Names of the parent's children the server still accepts (tokeninfo ``subtokens``)."""
    with httpx.Client(timeout=5.0) as client:
        r = client.post(
            f"{srv.url}/api/v0/tokeninfo", json={"action": "subtokens", "mytoken": parent_mytoken}
        )
    r.raise_for_status()
    tree = r.json()["mytokens"]
    return [child["token"]["name"] for child in tree.get("children", [])]


def assert_one_line_error(stderr: str, *, contains: Iterable[str] = ()) -> str:
    """stderr is exactly one ``jobtoken: error: ...`` line, with no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    line = lines[0]
    assert line.startswith("jobtoken: error: "), line
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    for part in contains:
        assert part in line, (part, line)
    return line


class ServerActivity:
    """Counts the connections a running dev server accepted and has not finished serving.

    A killed client can leave a request in the listen backlog or in a handler thread,
    and the server still commits it; judge the server's state only once it is idle.
    (Test instrumentation: wraps two methods of the server's ``socketserver``.)
    """

    def __init__(self, srv: Any) -> None:
        httpd = srv._httpd
        self._listener = httpd.socket
        self._lock = threading.Lock()
        self._open = 0
        accept, finish = httpd.get_request, httpd.shutdown_request

        def get_request() -> Any:
            conn = accept()
            with self._lock:
                self._open += 1
            return conn

        def shutdown_request(request: Any) -> None:
            try:
                finish(request)
            finally:
                with self._lock:
                    self._open -= 1

        httpd.get_request = get_request
        httpd.shutdown_request = shutdown_request

    def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Return once nothing waits in the backlog and no connection is being served."""
        deadline = time.monotonic() + timeout_s
        quiet = 0
        while quiet < 2:  # twice in a row: an accept may be between accept() and the count
            pending, _, _ = select.select([self._listener], [], [], 0)
            with self._lock:
                busy = self._open
            quiet = quiet + 1 if not pending and not busy else 0
            if time.monotonic() > deadline:
                raise AssertionError("dev server still busy")
            time.sleep(0.0005)


def run_cli(
    argv: Sequence[str], *, timeout: float = 60, env: Optional[Dict[str, str]] = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else dict(os.environ),
    )
