"""Docker-universe jobs on a real HTCondor pool with the node broker and a real Docker engine.

HTCondor runs no job wrapper in the docker universe, so without a broker the prepare hook
holds such jobs. With the broker nothing has to run in the job: the starter bind-mounts the
sandbox at the same path and runs the container as the job's uid, and the broker's renamed
``.jobtoken/bt`` shows through the mount. These tests run a busybox container (no Python,
no jobtoken inside) that reads ``$BEARER_TOKEN_FILE`` for two token lifetimes.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from jobtoken.devserver import DevServer
from tests.prerequisites import need

from ._docker import IMAGE, MARKER, DockerEngine
from ._pool import COMPLETED, HELD, Pool, PoolEnv, pool_root
from .conftest import AT_LIFETIME_S, require_pool, site_toml
from .test_broker import (
    ASK,
    BROKER_CONFIG,
    _site_files,
    broker_cli,
    broker_log,
    wait_revoked,
)
from .test_site_robot import child_ids, new_children

pytestmark = pytest.mark.slow

DOCKER_CONFIG = """
# --- docker universe: the tests' own engine (DOCKER_HOST in condor_master's environment) ---
DOCKER = /usr/bin/docker
DOCKER_PERFORM_TEST = False
"""

# busybox sh inside the container: every second, the time and a hash of what
# $BEARER_TOKEN_FILE holds ("-" for a missing or empty file); each distinct token once
READER = """#!/bin/sh
[ -f {marker} ] && echo image > where.txt
id -u > uid.txt
ls -A "$JOBTOKEN_DIR" > tokendir.txt
env > env.txt
end=$(( $(date +%s) + {seconds} ))
while [ "$(date +%s)" -lt "$end" ]; do
    now=$(date +%s)
    token=$(cat "$BEARER_TOKEN_FILE" 2>/dev/null)
    if [ -z "$token" ]; then
        echo "$now -" >> reads.txt
    else
        hash=$(printf %s "$token" | sha256sum | cut -c1-16)
        [ -f "tok.$hash" ] || printf %s "$token" > "tok.$hash"
        echo "$now $hash" >> reads.txt
    fi
    sleep 1
done
"""


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    require_pool()
    env = PoolEnv(pool_root())
    need(env.host_path("/usr/sbin/dockerd").exists() and env.host_path("/usr/bin/docker").exists()
         and env.host_path("/usr/bin/busybox").exists(),
         f"no Docker engine, docker CLI or busybox in {env.root}: run .ci/install-htcondor.sh")
    with DockerEngine(env) as running:
        yield running


@pytest.fixture(scope="module")
def dpool(engine: DockerEngine, devserver: DevServer, robot: str,
          jobtoken_package: Path) -> Iterator[Pool]:
    pool = Pool(PoolEnv(pool_root()), deb=jobtoken_package, jobtoken_toml="",
                before_master=_site_files(devserver, robot),
                master_env={"DOCKER_HOST": engine.docker_host})
    pool.extra_config = BROKER_CONFIG + DOCKER_CONFIG
    pool.jobtoken_toml_text = site_toml(pool, devserver, extra='\n[broker]\nidentity = "condor"\n')
    with pool:
        pool.wait_for(lambda: broker_cli(pool, "ping").returncode == 0, 60,
                      "the node broker to answer", detail=lambda: broker_log(pool))
        pool.wait_for(lambda: "true" in pool.condor(["condor_status", "-af", "HasDocker"],
                                                    check=False).stdout.lower(), 60,
                      "the startd to find docker", detail=lambda: docker_detail(pool, engine))
        yield pool


def docker_detail(pool: Pool, engine: DockerEngine) -> str:
    """What the startd and the engine said, for a pool that found no docker."""
    ad = pool.condor(["condor_status", "-l"], check=False).stdout
    lines = [line for line in ad.splitlines() if "ocker" in line]
    probe = pool.env.run(["condor_starter", "-classad"], check=False,
                         env={"CONDOR_CONFIG": pool.config, "DOCKER_HOST": engine.docker_host})
    lines += ["starter -classad:", probe.stdout[-1500:], probe.stderr[-1500:]]
    return "\n".join([*lines, pool.tail("StartLog", 30), pool.tail("StarterLog", 30),
                      engine.log()])


def docker_submit(pool: Pool, name: str, seconds: int, *extra: str,
                  files: Optional[Dict[str, str]] = None) -> Tuple[Path, int]:
    directory = pool.job_dir(name)
    text = "\n".join(["universe = docker", f"docker_image = {IMAGE}", "executable = job.sh",
                      "output = out.txt", "error = err.txt", "log = job.log",
                      "should_transfer_files = YES", "when_to_transfer_output = ON_EXIT",
                      *extra, "queue", ""])
    script = READER.format(marker=MARKER, seconds=seconds)
    return directory, pool.submit(directory, text, {"job.sh": script, **(files or {})})


def claims_of(token: str) -> Dict[str, Any]:
    body = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


def reads_of(directory: Path) -> List[Tuple[int, str]]:
    lines = (directory / "reads.txt").read_text().split("\n")
    return [(int(t), h) for t, h in (line.split() for line in lines if line)]


def test_a_docker_job_reads_a_renewed_token_through_the_sandbox_mount(
    dpool: Pool, engine: DockerEngine, devserver: DevServer, robot: str
) -> None:
    before = child_ids(devserver, robot)
    seconds = 2 * AT_LIFETIME_S + 5
    directory, cluster = docker_submit(dpool, "docker-a", seconds, ASK)
    ad = dpool.wait_done(cluster, timeout=seconds + 180)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 0), \
        (ad, (directory / "err.txt").read_text()[-2000:], dpool.starter_logs()[-3000:])
    assert (directory / "where.txt").read_text().strip() == "image", "ran in the container"
    assert int((directory / "uid.txt").read_text()) == dpool.env.account(dpool.user).uid
    # the sandbox mount shows the token directory as the broker keeps it: the token alone
    assert (directory / "tokendir.txt").read_text().split() == ["bt"]
    env = (directory / "env.txt").read_text()
    assert "BEARER_TOKEN_FILE=" in env and "/.jobtoken/bt" in env
    reads = reads_of(directory)
    # about one read a second (fewer on a loaded machine), from start to end of the job
    assert reads[-1][0] - reads[0][0] >= 2 * AT_LIFETIME_S, reads
    bad = [(t, h) for t, h in reads if h == "-"]
    assert bad == [], f"the container read no token at {bad}"
    tokens = {h: (directory / f"tok.{h}").read_text() for _, h in reads}
    expired = [(t, h) for t, h in reads if claims_of(tokens[h])["exp"] <= t]
    assert expired == [], f"expired tokens read: {expired}"
    assert len(tokens) >= 2, "the container saw the renewed token, not only the first one"
    assert len(new_children(devserver, robot, before)) == 1, "one job mytoken"
    wait_revoked(dpool, devserver, robot, before)
    # HTCondor removed its container; the engine keeps nothing of the job
    dpool.wait_for(lambda: engine.containers() == [], 60, "the container to be removed")


def test_a_docker_job_without_the_broker_is_held_with_the_reason(
    dpool: Pool, devserver: DevServer, robot: str
) -> None:
    """A job that brings its own mytoken takes the sidecar path, which docker cannot run."""
    before = child_ids(devserver, robot)
    directory, cluster = docker_submit(
        dpool, "docker-own", 5, ASK, "transfer_input_files = own.mytoken",
        '+JobtokenMytokenFile = "own.mytoken"', files={"own.mytoken": "never read\n"})
    started = time.monotonic()
    ad = dpool.wait_job(cluster, lambda a: a["JobStatus"] == HELD, 120, "to be held")
    assert "needs the node broker" in ad.get("HoldReason", ""), ad
    assert child_ids(devserver, robot) == before, "nothing minted for a held job"
    dpool.condor(["condor_rm", str(cluster)])
    print(f"\nheld {time.monotonic() - started:.1f} s after submission")
