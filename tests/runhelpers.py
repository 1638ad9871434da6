"""Helpers for tests that run `jobtoken` as a real process against an in-process dev server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence

from jobtoken._config import Config, RenewalConfig, ServerConfig, SiteConfig
from jobtoken._prepare import JobFacts, PreparedJob, prepare_job
from jobtoken._tokenfile import write_secret_file

AUD = "https://se.example.org"
ROOT = Path(__file__).resolve().parent.parent
PAYLOADS = ROOT / "tests" / "payloads"
PARENT_CAPS = ("AT", "create_mytoken", "tokeninfo")
LINE_TIMEOUT_S = 60.0  # a handshake line on a loaded machine; a hang fails, not stalls


def readline_within(stream: Optional[IO[str]], timeout_s: float = LINE_TIMEOUT_S) -> str:
    """``stream.readline()`` that fails the test instead of hanging when no line comes.

    A child that never answers (a signal it ignores, a crash before its handshake) must
    end the test with a message, not block the suite until an outer timeout.
    """
    assert stream is not None
    line: List[str] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not line:
        raise AssertionError(f"no line from the child within {timeout_s:.0f} s")
    return line[0]


def job_config(srv: Any, parent: Path, *, lifetime_s: float, margin_s: float = 1.5,
               timeout_s: float = 2.0, **renewal: Any) -> Config:
    return Config(
        server=ServerConfig(url=srv.url, allow_http=True, timeout_s=timeout_s),
        site=SiteConfig(
            parent_mytoken_file=str(parent),
            vo="vo",
            allowed_scopes=("storage.create:/vo",),
            allowed_audiences=(AUD,),
            expected_at_lifetime_s=lifetime_s,
        ),
        renewal=RenewalConfig(margin_s=margin_s, **renewal),
    )


def prepare(srv: Any, tmp_path: Path, *, lifetime_s: float, job_id: str = "job-1",
            walltime_s: float = 600, **kw: Any) -> PreparedJob:
    tmp_path.mkdir(parents=True, exist_ok=True)
    parent = tmp_path / "parent.mt"
    write_secret_file(parent, srv.issue_mytoken(capabilities=list(PARENT_CAPS)), newline=False)
    cfg = job_config(srv, parent, lifetime_s=lifetime_s, **kw)
    return prepare_job(cfg, JobFacts(job_id=job_id, walltime_s=walltime_s),
                       directory=str(tmp_path / "job"))


def jobtoken_argv(*args: str) -> List[str]:
    return [sys.executable, "-m", "jobtoken", *args]


def checker(seconds: float, interval: float = 0.02, *, until_tokens: int = 0,
            min_seconds: float = 0.0) -> List[str]:
    """The token-reading payload for ``seconds``; with ``until_tokens``, until it has read
    that many distinct tokens (``seconds`` then only bounds a run that never gets them),
    but at least ``min_seconds``."""
    argv = [sys.executable, str(PAYLOADS / "check_token.py"), "--seconds", str(seconds),
            "--interval", str(interval)]
    if until_tokens:
        argv += ["--until-tokens", str(until_tokens), "--min-seconds", str(min_seconds)]
    return argv


def run(args: Sequence[str], *, env: Optional[Dict[str, str]] = None, timeout: float = 120,
        **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else dict(os.environ), **kw)


def summary(stdout: str) -> Dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no summary in payload output: {stdout!r}")


def state(job_dir: Path) -> Dict[str, Any]:
    return json.loads((job_dir / "state.json").read_text())
