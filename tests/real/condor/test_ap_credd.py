"""The access point's credd path in a real HTCondor pool: ``use_oauth_services = jobtoken``.

condor_submit runs jobtoken's storer as the user (it mints the per-submission mytoken and
stores it in the credd), jobtoken's credmon keeps an access token in the ``.use``, and the
EP's prepare hook points ``BEARER_TOKEN_FILE`` at ``$_CONDOR_CREDS/<name>.use``, which the
starter re-copies every ``SEC_CREDENTIAL_REFRESH`` s. Two pools: jobtoken's credmon alone
(the primary: pid file, ``CREDMON_COMPLETE``), and beside HTCondor's own Vault credmon in
``CREDMON_OAUTH`` (a guest), with a stub Vault on 127.0.0.1:8200 so that both deliver.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

from jobtoken.devserver import DevServer

from ._pool import COMPLETED, Pool, PoolEnv, pool_root
from .conftest import AT_LIFETIME_S, AUDIENCE, require_pool, site_toml

pytestmark = pytest.mark.slow

PAYLOADS = Path(__file__).parent / "payloads"
SCOPE = "storage.create:/dteam"
VAULT_PORT = 8200  # HTCondor's Vault credmon accepts no other port

AP_CONFIG = """
# --- the access point: jobtoken's AP config as shipped, this pool's paths ---
include : /usr/share/jobtoken/condor/config.d/50-jobtoken-ap.conf
SEC_CREDENTIAL_DIRECTORY_OAUTH = $(LOCAL_DIR)/oauth_credentials
# the log: the shipped JOBTOKEN_CREDMON_LOG (credmon_log() reads it)
JOBTOKEN_CREDMON_ARGS = --interval 3
# the credd's default fixed port 9620 would keep a second pool on this machine from starting
CREDD_ARGS =
# the starter re-copies .use files this often (default 300 s; tokens here live 20 s)
SEC_CREDENTIAL_REFRESH = 4
"""

VAULT_CONFIG = """
# --- the site's own credmon: HTCondor's Vault credmon as CREDMON_OAUTH ---
CREDMON_OAUTH = $(SBIN)/condor_credmon_vault
CREDMON_OAUTH_LOG = $(LOG)/CredMonOAuthLog
DAEMON_LIST = $(DAEMON_LIST) CREDMON_OAUTH
CREDMON_OAUTH_TOKEN_MINIMUM = 20
CREDMON_OAUTH_TOKEN_REFRESH = 5
AUTH_SSL_CLIENT_CAFILE = $(LOCAL_DIR)/etc/ca.pem
"""

JOB_SH = """#!/bin/sh
# what the job can see: its environment, every credential HTCondor gave it, its sandbox
{ env; for f in "$_CONDOR_CREDS"/*; do echo "== $f"; cat "$f"; done
  find . -type f ! -name seen.txt -exec cat {} + ; } > seen.txt 2>&1
exec /usr/bin/python3 reader.py "$@"
"""


def start_ap_pool(devserver: DevServer, deb: Path, extra: str) -> Pool:
    require_pool()
    pool = Pool(PoolEnv(pool_root()), deb=deb, jobtoken_toml="", extra_config=AP_CONFIG + extra)
    pool.jobtoken_toml_text = site_toml(pool, devserver)  # the credmon reads it at start
    condor = pool.env.account("condor")
    creds = pool.dir / "oauth_credentials"
    creds.mkdir()
    os.chown(creds, 0, condor.gid)
    creds.chmod(0o2770)
    try:
        pool.start()
        shutil.copy(str(devserver.ca_file), pool.dir / "etc" / "ca.pem")  # before any .top
        (pool.dir / "etc" / "ca.pem").chmod(0o644)
    except BaseException:
        pool.stop()
        raise
    return pool


@pytest.fixture(scope="module")
def ap_pool(devserver: DevServer, jobtoken_package: Path) -> Iterator[Pool]:
    pool = start_ap_pool(devserver, jobtoken_package, "")
    try:
        yield pool
    finally:
        pool.stop()


class StubVault:
    """Answers the Vault credmon's GET /v1/... with ``{"data": {"access_token": ...}}``."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.served = 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                stub.served += 1
                body = json.dumps({"data": {"access_token": f"vault-at-{stub.served}"}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", VAULT_PORT), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubVault:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def vault_pool(devserver: DevServer, jobtoken_package: Path
               ) -> Iterator[Tuple[Pool, StubVault]]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls = devserver._tls  # the dev server's certificate for 127.0.0.1
    context.load_cert_chain(tls.cert_file, tls.key_file)
    try:
        vault = StubVault(context)
    except OSError as exc:
        pytest.fail(f"cannot listen on 127.0.0.1:{VAULT_PORT} for the stub Vault: {exc}")
    with vault:
        pool = start_ap_pool(devserver, jobtoken_package, VAULT_CONFIG)
        try:
            yield pool, vault
        finally:
            pool.stop()


def user_mytoken(pool: Pool, devserver: DevServer, directory: Path) -> str:
    """The user's own mytoken, in a 0600 file of theirs; its path inside the pool."""
    value = devserver.issue_mytoken(
        capabilities=["AT", "create_mytoken"],
        restrictions=[{"scope": SCOPE, "audience": [AUDIENCE]}],
        name="user",
    )
    owner = pool.env.account(pool.user)
    path = directory / "mt_user"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, value.encode())
    os.close(fd)
    os.chown(path, owner.uid, owner.gid)
    return pool.env.inner_path(path)


def submit(pool: Pool, directory: Path, credentials: str, mytoken_path: str,
           seconds: float) -> Tuple[int, float]:
    files = {"reader.py": (PAYLOADS / "reader.py").read_text(), "job.sh": JOB_SH}
    owner = pool.env.account(pool.user)
    for name, content in files.items():
        (directory / name).write_text(content)
        (directory / name).chmod(0o755)
        os.chown(directory / name, owner.uid, owner.gid)
    text = f"""\
executable = job.sh
arguments = {seconds} 0
transfer_input_files = reader.py
output = out.txt
error = err.txt
log = job.log
should_transfer_files = YES
when_to_transfer_output = ON_EXIT
+HookKeyword = "JOBTOKEN"
{credentials}
queue
"""
    (directory / "job.sub").write_text(text)
    os.chown(directory / "job.sub", owner.uid, owner.gid)
    started = time.monotonic()
    proc = pool.env.run(
        ["condor_submit", "-terse", "job.sub"],
        env={"CONDOR_CONFIG": pool.config, "JOBTOKEN_MYTOKEN_FILE": mytoken_path},
        user=pool.user, cwd=pool.env.inner_path(directory), check=False, timeout=120,
    )
    assert proc.returncode == 0, f"condor_submit failed:\n{proc.stdout}\n{proc.stderr}"
    return int(proc.stdout.strip().split(".")[0]), time.monotonic() - started


def stored_mytoken(pool: Pool, name: str) -> str:
    top = pool.dir / "oauth_credentials" / pool.user / f"{name}.top"
    return str(json.loads(top.read_text())["mytoken"])


def check_job(pool: Pool, directory: Path, cluster: int, name: str,
              secrets: Tuple[str, ...]) -> Dict[str, Any]:
    ad = pool.wait_done(cluster, timeout=180)
    assert ad["JobStatus"] == COMPLETED and ad.get("ExitCode") == 0, ad
    out = json.loads((directory / "out.txt").read_text().strip().splitlines()[-1])
    assert out["bad"] == 0, out
    assert out["tokens"] >= 2, out  # renewed on the AP, re-copied by the starter
    assert out["env_file"].endswith(f"/{name}.use"), out
    seen = (directory / "seen.txt").read_text()
    for secret in secrets:
        assert secret not in seen, "a mytoken reached the job"
    assert "MYTOKEN" not in seen.upper().replace("JOBTOKEN", "")
    return out


def credmon_log(pool: Pool) -> str:
    return pool.tail("JobtokenCredmonLog", 40)


CASES = {
    "jobtoken": f"use_oauth_services = jobtoken\njobtoken_oauth_permissions = {SCOPE}\n"
    f"jobtoken_oauth_resource = {AUDIENCE}",
    "jobtoken_out": f"use_oauth_services = jobtoken\njobtoken_oauth_permissions_out = {SCOPE}\n"
    f"jobtoken_oauth_resource_out = {AUDIENCE}",
}


def test_credd_path_jobs_get_access_tokens_only(ap_pool: Pool, devserver: DevServer) -> None:
    """Without a handle (jobtoken.use) and with one (jobtoken*out → jobtoken_out.use),
    side by side."""
    jobs = {}
    for name, credentials in CASES.items():
        directory = ap_pool.job_dir(f"credd-{name}")
        mt_path = user_mytoken(ap_pool, devserver, directory)
        cluster, submit_s = submit(ap_pool, directory, credentials, mt_path, 2 * AT_LIFETIME_S + 5)
        assert submit_s < 30  # the storer waited for the credmon's .use, not for a timeout
        use = ap_pool.dir / "oauth_credentials" / ap_pool.user / f"{name}.use"
        assert use.is_file() and use.stat().st_uid == 0 and use.stat().st_mode & 0o077 == 0
        top = use.with_suffix(".top")  # the per-submission mytoken: root-only, on the AP only
        assert top.stat().st_uid == 0 and top.stat().st_mode & 0o077 == 0
        secrets = (stored_mytoken(ap_pool, name), (directory / "mt_user").read_text())
        jobs[name] = (directory, cluster, secrets)
    for name, (directory, cluster, secrets) in jobs.items():
        try:
            check_job(ap_pool, directory, cluster, name, secrets)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}\n{credmon_log(ap_pool)}") from None
    # the primary credmon owns the credd's wake-up and the schedd's start-up marker
    creds = ap_pool.dir / "oauth_credentials"
    assert (creds / "CREDMON_COMPLETE").exists() and (creds / "pid").is_file()
    # it logged where the shipped JOBTOKEN_CREDMON_LOG says, times in UTC (no --log-file)
    logged = (ap_pool.dir / "log" / "JobtokenCredmonLog").read_text()
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO credmon starting .*role=primary",
                     logged, re.M), logged
    assert "access token written cred=" in logged


def test_beside_htcondors_vault_credmon_both_deliver(
    vault_pool: Tuple[Pool, StubVault], devserver: DevServer
) -> None:
    pool, vault = vault_pool
    directory = pool.job_dir("beside-vault")
    mt_path = user_mytoken(pool, devserver, directory)
    # the user's Vault credential, stored as condor_vault_storer would
    vault_top = directory / "vault.top"
    vault_top.write_text(json.dumps(
        {"vault_token": "hvs.test", "vault_url": f"https://127.0.0.1:{VAULT_PORT}/v1/x"}))
    owner = pool.env.account(pool.user)
    os.chown(vault_top, owner.uid, owner.gid)
    argv = ["condor_store_cred", "add-oauth", "-s", "vaultsvc", "-i",
            pool.env.inner_path(vault_top)]
    # the pool is up when its schedd and startd are; the credd may take a moment longer
    pool.wait_for(lambda: pool.condor(argv, user=pool.user, check=False).returncode == 0,
                  60, "the credd to store the user's Vault credential")
    credentials = (f"use_oauth_services = jobtoken, vaultsvc\n"
                   f"jobtoken_oauth_permissions_out = {SCOPE}\n"
                   f"jobtoken_oauth_resource_out = {AUDIENCE}")
    cluster, _ = submit(pool, directory, credentials, mt_path, 2 * AT_LIFETIME_S + 5)
    secrets = (stored_mytoken(pool, "jobtoken_out"), (directory / "mt_user").read_text())
    try:
        check_job(pool, directory, cluster, "jobtoken_out", secrets)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n{credmon_log(pool)}\n{pool.tail('CredMonOAuthLog')}"
        ) from None
    seen = (directory / "seen.txt").read_text()
    assert "vault-at-" in seen, "HTCondor's Vault credmon delivered its token too"
    assert vault.served >= 1
    creds = pool.dir / "oauth_credentials"
    # our handle credential survived the Vault credmon's scans of every .top
    assert (creds / pool.user / "jobtoken_out.top").is_file()
    # the site's credmon owns the pid file; ours is a guest
    pid = int((creds / "pid").read_text())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"condor_credmon_vault" in cmdline, cmdline
    assert (creds / "CREDMON_COMPLETE").exists()
