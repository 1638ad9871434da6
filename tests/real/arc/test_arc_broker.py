"""A real ARC job with a node broker: stage 1 hands the job mytoken over, stage 2 releases.

Where the jobs run (the fork LRMS: the CE's own machine, or its Debian 12 chroot) a root
``jobtoken broker serve`` from the installed package runs with ``broker.adopt = true`` and
no parent mytoken, as on a worker node behind a CE. The RTE gets ``JOBTOKEN_BROKER_SOCKET``
for this test only. The payload reads its token over more than one access-token lifetime
and looks for every mytoken it can read; afterwards the job mytoken is revoked, and the
broker's log says it was the broker that revoked it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Iterator

import pytest

from ._ce import JOBTOKEN_BIN, ArcCE, wait_for
from .conftest import AT_LIFETIME_S, AUDIENCE, VO, ArcSite
from .test_arc_ce import JOB_END_S, READ_TOKEN_LOOP, staged_out, xrsl

pytestmark = pytest.mark.slow

BROKER_AT_LIFETIME_S = 45  # long enough for a loaded machine; the job reads over two

# stdlib only, as the pool account: read the token every second; then look for mytokens
# in every file it can read below the CE's directory (session dirs, the broker's state
# dir, the configuration) and in its environment
CHECKER = READ_TOKEN_LOOP + r"""
readable = []
for top in sys.argv[2:]:
    for root, dirs, files in os.walk(top):
        for name in files:
            full = os.path.join(root, name)
            try:
                with open(full, "rb") as fh:
                    data = fh.read(65536).decode("ascii", "replace")
            except OSError:
                continue
            claims = claims_of(data)
            if "mytoken" in name or (claims and claims.get("token_type") == "mytoken"):
                readable.append(full)
in_env = [k for k, v in os.environ.items() if (claims_of(v) or {}).get("token_type") == "mytoken"]
print(json.dumps({"reads": reads, "bad": bad, "tokens": len(tokens), "readable": readable,
                  "in_env": in_env, "session": sorted(os.listdir(os.environ["JOBTOKEN_DIR"]))}))
"""


class NodeBroker:
    """``jobtoken broker serve`` as root where the CE's jobs run, stopped by its pid."""

    def __init__(self, ce: ArcCE, server_url: str) -> None:
        self.ce = ce
        self.dir = ce.base / "broker"
        ce.host(self.dir).mkdir(mode=0o755)
        os.chmod(ce.host(self.dir), 0o755)
        self.socket = str(self.dir / "broker.sock")
        self.state_dir = self.dir / "state"
        self.config = self.dir / "broker.toml"
        ce.host(self.config).write_text(f"""[server]
url = "{server_url}"
ca_file = "{ce.base / 'mytoken-tls' / 'ca.pem'}"
timeout_s = 5.0

[site]
allowed_scopes = ["storage.create:/{VO}"]
allowed_audiences = ["{AUDIENCE}"]

[broker]
socket = "{self.socket}"
state_dir = "{self.state_dir}"
adopt = true
reconcile_s = 2
""", encoding="utf-8")
        self.log = ce.host(self.dir / "broker.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.ce.argv([JOBTOKEN_BIN, "broker", "serve", "--config", str(self.config)]),
                env=self.ce.admin_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_for("the node broker to answer", self._pong, 60, 0.5)

    def _pong(self) -> bool | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the broker exited {self.proc.returncode}: {self.log_text()}")
        ping = self.ce.run([JOBTOKEN_BIN, "broker", "ping", "--socket", self.socket],
                           check=False)
        return True if ping.returncode == 0 else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


@pytest.fixture
def broker_site(arc_site: ArcSite) -> Iterator[tuple[ArcSite, NodeBroker]]:
    arc_site.server.faults.clear()
    arc_site.wait_no_live_job_mytoken()
    broker = NodeBroker(arc_site.ce, arc_site.server.url)
    broker.start()
    arc_site.ce.set_param("JOBTOKEN_BROKER_SOCKET", broker.socket)
    arc_site.server.set_at_lifetime(BROKER_AT_LIFETIME_S)
    try:
        yield arc_site, broker
    finally:
        arc_site.server.set_at_lifetime(AT_LIFETIME_S)
        arc_site.ce.set_param("JOBTOKEN_BROKER_SOCKET", "")
        broker.stop()
    log = broker.log_text()
    assert "internal error" not in log and "Traceback" not in log, log


def test_broker_holds_the_job_mytoken_and_revokes_it_after_the_job(
        broker_site: tuple[ArcSite, NodeBroker]) -> None:
    site, broker = broker_site
    ce = site.ce
    checker = ce.base / "jobs" / "check_broker.py"
    ce.host(checker).write_text(CHECKER, encoding="utf-8")
    seconds = 2 * BROKER_AT_LIFETIME_S + 10
    job, _ = ce.submit(xrsl(site, "/usr/bin/python3", "check_broker.py", str(seconds),
                            str(ce.base), inputs=f'("check_broker.py" "{checker}")'))
    assert job is not None
    state = ce.wait_final(job, seconds + JOB_END_S)
    log = ce.log(job)
    assert state == "Finished", (log, broker.log_text()[-3000:])
    files = ce.get(job)
    summary = json.loads((files / "out.txt").read_text().strip().splitlines()[-1])
    assert summary["bad"] == 0, (summary, log)
    assert summary["tokens"] >= 2, summary  # renewed by the broker while the payload ran
    assert summary["reads"] >= seconds - 5, summary
    # no job mytoken anywhere the payload could read: not in its session dir, not in the
    # broker's state dir; only the CE's robot mytoken, which stage 0 reads as the mapped
    # account and which a real worker node does not have (fork runs jobs on the CE)
    robot = str(ce.base / "etc" / "robot.mytoken")
    assert [p for p in summary["readable"] if p != robot] == [], summary
    assert "mytoken" not in " ".join(summary["session"]) and summary["in_env"] == [], summary
    assert staged_out(files) == []
    site.wait_no_live_job_mytoken()
    grid_id = job.rstrip("/").rsplit("/", 1)[-1]
    text = broker.log_text()
    assert f"job adopted job=arc:{grid_id}" in text, text[-3000:]
    assert f"job mytoken revoked job=arc:{grid_id}" in text, text[-3000:]
    assert not list(ce.host(broker.state_dir / "jobs").iterdir())  # nothing kept after
