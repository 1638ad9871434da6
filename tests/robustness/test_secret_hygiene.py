"""Secret hygiene: run the whole chain and look for the tokens everywhere they must not be.

``jobtoken prepare`` then ``jobtoken run -vv --log-json -- payload`` against the dev server
with short tokens, so that the run renews several times. While the job runs, a sampler
thread collects every access token that appears in ``bt``, the job mytoken, and the
argv and environment of every process of the job (``jobtoken run``, its renewal
children, the payload). Afterwards every log (stderr, ``sidecar.log``, the dev server's
log records), ``state.json``, ``job.json``, the metrics file, ``jobtoken status`` output,
every other file under the test directory, and the sampled argv/environments must hold
none of them. Only the parent mytoken file, the job's ``mytoken`` and ``bt`` may (and
the last two are gone once the job ended).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, Set

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobtoken.devserver import DevServer, DevServerConfig
from tests.robustness._support import AUD, OP_SCOPES, make_site, run_cli
from tests.runhelpers import checker, jobtoken_argv, summary

pytestmark = pytest.mark.process

# Renewing early (fraction 0.25: 4.5-7.5 s after issue) leaves 22 s before each token
# expires for a renewal child a loaded machine slows by seconds. The payload reads until
# it has seen two tokens (however late it started), and for at least PAYLOAD_S so the
# sampler watches a while. 3 s tokens with a 1 s margin once handed the payload an
# expired one; 12 s tokens and a 2 s request timeout were still a bet on the machine.
LIFETIME_S = 30
PAYLOAD_S = 10.0


class JobSampler(threading.Thread):
    """Polls the job's processes and token files until stopped."""

    def __init__(self, root_pid: int, job_dir: Path, metrics_dir: Path) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.job_dir = job_dir
        self.metrics_dir = metrics_dir
        self.metrics: Set[str] = set()  # removed at the job's end: read while it runs
        self.stop = threading.Event()
        self.tokens: Set[str] = set()
        # every value seen, per pid: a process changes its argv when it execs, and a
        # zombie reads as empty, so a later sample must not replace an earlier one
        self.argv: Dict[int, Set[str]] = {}
        self.environ: Dict[int, Set[str]] = {}
        self.samples = 0

    def _read_secrets(self) -> None:
        for name in ("bt", "mytoken"):
            try:
                value = (self.job_dir / name).read_text().strip()
            except OSError:
                continue
            if value:
                self.tokens.add(value)
        for path in self.metrics_dir.glob("*"):
            try:
                self.metrics.add(path.read_text())
            except OSError:
                continue

    def _read_processes(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            try:
                self.argv.setdefault(proc.pid, set()).add("\0".join(proc.cmdline()))
                self.environ.setdefault(proc.pid, set()).add(
                    "\0".join(f"{k}={v}" for k, v in sorted(proc.environ().items()))
                )
            except psutil.Error:
                continue

    def run(self) -> None:
        while not self.stop.is_set():
            self._read_secrets()
            self._read_processes()
            self.samples += 1
            self.stop.wait(0.01)


def _leaks(where: str, text: str, secrets: List[str]) -> List[str]:
    found = []
    for secret in secrets:
        # the whole value, and its signature part alone (a JWT's most secret piece)
        pieces = [secret] + [p for p in secret.split(".")[2:] if len(p) >= 20]
        if any(piece in text for piece in pieces):
            found.append(f"{where} holds {secret[:12]}...")
    return found


def test_tokens_appear_only_in_the_token_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="jobtoken")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    with DevServer(
        DevServerConfig(at_lifetime_s=LIFETIME_S, op_scopes=OP_SCOPES, default_audience=AUD)
    ) as srv:
        site = make_site(
            srv,
            tmp_path,
            timeout_s=15.0,
            lifetime_s=LIFETIME_S,
            margin_s=4.0,
            fraction=0.25,
            # a prepared dir's job.json decides these, not run's flags
            log_json=True,
            metrics_dir=str(metrics),
        )
        prepared = run_cli(site.prepare_argv("job-7", "-vv"))
        assert prepared.returncode == 0, prepared.stderr
        env_file = tmp_path / "payload.env"
        payload = [
            sys.executable,
            "-c",
            "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'));"
            "os.execv(sys.argv[2], sys.argv[2:])",
            str(env_file),
            *checker(180, until_tokens=2, min_seconds=PAYLOAD_S),
        ]
        proc = subprocess.Popen(
            jobtoken_argv("run", "-vv", "--dir", str(site.job_dir), "--", *payload),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        sampler = JobSampler(proc.pid, site.job_dir, metrics)
        sampler.start()
        try:
            out, err = proc.communicate(timeout=240)
        finally:
            sampler.stop.set()
            sampler.join(5)
        status = run_cli(jobtoken_argv("status", "--json", str(site.job_dir)))
    assert proc.returncode == 0, err
    s = summary(out)
    assert s["bad"] == 0 and s["tokens"] >= 2, s  # renewed while we watched
    access_tokens = [t for t in sampler.tokens if t.count(".") == 2 and "wlcg" in _claims(t)]
    assert len(access_tokens) >= 2 and sampler.samples > 50
    # the job's processes were seen: jobtoken run, renewal children, the payload
    argvs = [a for seen in sampler.argv.values() for a in seen]
    assert any("jobtoken._renewal" in a for a in argvs), argvs
    assert any("check_token.py" in a for a in argvs), argvs
    secrets = sorted(sampler.tokens | {site.parent_mytoken})
    assert len(secrets) >= 4  # parent, job mytoken, two access tokens at least

    leaks: List[str] = []
    for where, text in (
        ("prepare stdout", prepared.stdout),
        ("prepare stderr", prepared.stderr),
        ("run stdout", out),
        ("run stderr", err),
        ("status output", status.stdout),
        ("dev server log", caplog.text),
        ("metrics", "\n".join(sampler.metrics)),
    ):
        leaks += _leaks(where, text, secrets)
    for pid, seen in sampler.argv.items():
        leaks += _leaks(f"argv of {pid}", "\n".join(seen), secrets)
    for pid, seen in sampler.environ.items():
        leaks += _leaks(f"environment of {pid}", "\n".join(seen), secrets)
    allowed = {site.parent}
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file() and path not in allowed:
            leaks += _leaks(
                str(path.relative_to(tmp_path)), path.read_text(errors="replace"), secrets
            )
    assert leaks == []
    # what was checked is really there (the run's logs are not empty, JSON lines included)
    log_lines = (site.job_dir / "sidecar.log").read_text().splitlines()
    assert any(json.loads(line)["message"].startswith("renewed") for line in log_lines)
    assert "secret written" in err  # -vv: debug lines on stderr too
    assert "access token issued" in caplog.text  # the dev server's own records were seen
    assert json.loads(env_file.read_text())["BEARER_TOKEN_FILE"] == str(site.job_dir / "bt")
    assert sampler.metrics and "job-7" in "".join(sampler.metrics)
    for text in sampler.metrics:  # every version the collector could have read parses
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        assert "jobtoken_token_expiry_timestamp_seconds" in names
    assert not (site.job_dir / "bt").exists() and not (site.job_dir / "mytoken").exists()


def _claims(token: str) -> str:
    import jwt

    try:
        return json.dumps(jwt.decode(token, options={"verify_signature": False}))
    except jwt.PyJWTError:
        return ""
