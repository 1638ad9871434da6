"""Least privilege, as the storage enforces it: what a job's token can do, and what nothing
can do any more once the job is over.

A job prepared by ``jobtoken prepare`` gets ``storage.create`` + ``storage.read`` on its own
path. Under ``jobtoken run`` its payload creates a file there (200 or 201) and then, with
the very same token, is refused (403) when it overwrites or deletes that file, or writes outside
its path; a last create shows the token still worked after the refusals. When the payload
ends, jobtoken revokes the job mytoken. Once the job's access tokens have expired, nothing
is left: a renewal with the job mytoken is refused for good (exit 77), and an expired
token of the job that the storage never saw before (so no cached decision can let it
through) is refused by the storage.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobtoken._tokenfile import read_secret_file, remove_secret_file, write_secret_file

from ._chain import (
    Job,
    Storage,
    new_job_id,
    records,
    short_lived_storage,
    write_payload,
)
from ._clients import CREATED
from .conftest import STORAGE_AUDIENCE

pytestmark = pytest.mark.e2e

AT_LIFETIME_S = 15
MARGIN_S = 5.0
EXIT_MYTOKEN_REJECTED = 77

# $tok is a private copy of the job's token, so every request presents the same token
PAYLOAD = """\
umask 077
tok="$HOME/token.copy"
cp -- "$BEARER_TOKEN_FILE" "$tok"
facts=$("$JOBTOKEN_BIN" inspect --json "$tok")
exp=$(sed -n 's/^  "exp": \\([0-9]*\\).*$/\\1/p' <<<"$facts")
header() { printf 'Authorization: Bearer %s\\n' "$(<"$tok")"; }
request() {  # $1: label, then curl arguments
    local label=$1
    shift
    code=$(curl -sS -o /dev/null -w '%{http_code}' -H @<(header) "$@")
    echo "request op=$label status=$code"
}
printf 'first version\\n' >"$HOME/first.dat"
printf 'second version\\n' >"$HOME/second.dat"
request create -T "$HOME/first.dat" "${HTTPS_DIR}created.dat"
request overwrite -T "$HOME/second.dat" "${HTTPS_DIR}created.dat"
request delete -X DELETE "${HTTPS_DIR}created.dat"
request outside -T "$HOME/first.dat" "$OUTSIDE_URL"
request other-job -T "$HOME/first.dat" "$OTHER_JOB_URL"
BEARER_TOKEN_FILE="$tok" xrdcp --nopbar --force "$HOME/second.dat" "${ROOT_DIR}created.dat" \\
    >/dev/null 2>&1
echo "request op=xrdcp-overwrite rc=$?"
request create-after -T "$HOME/first.dat" "${HTTPS_DIR}after.dat"
echo "done at=$(date +%s) token_exp=$exp"
rm -f -- "$tok"
"""


@pytest.fixture(scope="module")
def storage() -> Iterator[Storage]:
    with short_lived_storage(AT_LIFETIME_S) as started:
        yield started


def test_job_token_only_creates_and_nothing_works_after_revocation(
    storage: Storage, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("least-privilege")
    job = Job(storage, base, margin_s=MARGIN_S)
    job.prepare()
    keep = base / "keep"
    keep.mkdir(mode=0o700)
    # stand-ins for what could be left behind: a copy of the job mytoken, and an access
    # token of the job that is never presented to the storage
    job_mytoken = keep / "job.mt"
    write_secret_file(job_mytoken, read_secret_file(job.tokendir / "mytoken"), newline=False)
    unused = keep / "unused.bt"
    minted = job.jobtoken(
        "token",
        "--mytoken-file",
        str(job_mytoken),
        "--out",
        str(unused),
        "--scope",
        f"storage.create:{job.path}",
        "--scope",
        f"storage.read:{job.path}",
        "--audience",
        STORAGE_AUDIENCE,
        "--json",
    )
    assert minted.returncode == 0, minted.tail()
    unused_exp = float(json.loads(minted.stdout)["exp"])

    outside = f"/vo/other/{job.job_id}/x.dat"  # not a string-prefix extension of the path
    other_job = f"/vo/jobs/{new_job_id()}/x.dat"
    script = write_payload(base, "payload.sh", PAYLOAD)
    job.start(
        [str(script)],
        env={
            "OUTSIDE_URL": storage.xrootd.url_https + outside.lstrip("/"),
            "OTHER_JOB_URL": storage.xrootd.url_https + other_job.lstrip("/"),
        },
    )
    result = job.finish()
    assert result.returncode == 0, result.tail()

    statuses = {r["op"]: r.get("status", r.get("rc")) for r in records(result.stdout, "request")}
    xrdcp_rc = statuses.pop("xrdcp-overwrite", None)
    created = {str(status) for status in CREATED}
    assert statuses.pop("create", None) in created, result.tail()
    assert statuses.pop("create-after", None) in created, result.tail()
    assert statuses == {
        "overwrite": "403",
        "delete": "403",
        "outside": "403",
        "other-job": "403",
    }, result.tail()
    assert xrdcp_rc not in (None, "0"), result.tail()  # root:// refuses the overwrite too
    # the refusals were about the scope, not an expired token
    done = records(result.stdout, "done")[0]
    assert int(done["at"]) < int(done["token_exp"])
    assert storage.on_disk(f"{job.path}/created.dat").read_text() == "first version\n"
    assert storage.on_disk(f"{job.path}/after.dat").read_text() == "first version\n"
    assert not storage.on_disk(outside).exists()
    assert not storage.on_disk(other_job).exists()
    assert "job mytoken revoked" in (job.tokendir / "sidecar.log").read_text()

    # the job is over: wait until all its access tokens have expired
    last_exp = max(unused_exp, float(job.state()["expires_at"]))
    time.sleep(max(0.0, last_exp + 1.0 - time.time()))

    # a renewal with the revoked job mytoken is refused for good
    write_secret_file(job.tokendir / "mytoken", read_secret_file(job_mytoken), newline=False)
    try:
        renewal = job.jobtoken("ensure", "--dir", str(job.tokendir), "--min-valid", "1")
    finally:
        remove_secret_file(job.tokendir / "mytoken")
    assert renewal.returncode == EXIT_MYTOKEN_REJECTED, renewal.tail()
    assert "invalid_token" in renewal.stderr  # the server's answer for a revoked mytoken
    assert not job.bearer_token_file.exists()

    # the storage refuses the job's expired token, which it never saw before
    src = keep / "late.dat"
    src.write_text("too late\n")
    late = job.jobtoken("inspect", "--json", str(unused))
    assert json.loads(late.stdout)["remaining_s"] < 0
    header = keep / "header"
    write_secret_file(header, "Authorization: Bearer " + read_secret_file(unused))
    assert _curl_put(storage, header, src, f"{storage.https_dir(job.path)}late.dat") == "403"
    assert not storage.on_disk(f"{job.path}/late.dat").exists()
    # for its expiry: XRootD 5.5 (Debian 12) logs "token verification failed: token
    # expired", 5.8 (Debian 13) "Failed to deserialize SciToken: token expired"
    log = storage.xrootd.log_text()
    assert ("token verification failed: token expired" in log
            or "Failed to deserialize SciToken: token expired" in log), log[-2000:]


def _curl_put(storage: Storage, header: Path, src: Path, url: str) -> str:
    """HTTP status of a PUT whose bearer header comes from a file (``-H @file``)."""
    proc = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(storage.xrootd.ca_file),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            f"@{header}",
            "-T",
            str(src),
            url,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.stdout.strip()
