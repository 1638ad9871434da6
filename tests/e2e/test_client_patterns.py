"""The per-client shell patterns of docs/clients.md pick up a renewed ``BEARER_TOKEN_FILE``.

Each pattern runs in bash with only ``BEARER_TOKEN_FILE`` exported, as a job payload would.
Between two calls jobtoken's own writer (``write_secret_file``) replaces the file with a token
for another job path; the second call succeeds only if the client read the new token.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest

from jobtoken._tokenfile import write_secret_file

from ._xrootd import XrootdServer
from .conftest import StorageIssuer

pytestmark = pytest.mark.e2e

# Same shape as the table in docs/clients.md, plus the test CA options. $SRC/$DST are the
# transfer's source and destination; the token only ever comes from $BEARER_TOKEN_FILE.
PATTERNS = {
    "xrdcp": 'xrdcp --nopbar "$SRC" "$DST_ROOT"',
    "gfal-copy": 'BEARER_TOKEN="$(<"$BEARER_TOKEN_FILE")" gfal-copy "file://$SRC" "$DST_HTTPS"',
    "curl": (
        'curl -sS -f --cacert "$CA_FILE" -T "$SRC" '
        '-H @<(printf \'Authorization: Bearer %s\\n\' "$(<"$BEARER_TOKEN_FILE")") '
        '"$DST_HTTPS"'
    ),
    "davix-put": (
        'davix-put --capath "$X509_CERT_DIR" '
        '-H "Authorization: Bearer $(<"$BEARER_TOKEN_FILE")" "$SRC" "$DST_HTTPS"'
    ),
}

# same number of digits, so neither path is a string prefix of the other (XRootD 5.5.3 quirk)
_job_ids = itertools.count(int.from_bytes(os.urandom(2), "big") * 1000 + 100_000_000)


def _run_pattern(
    pattern: str, xrootd: XrootdServer, token_file: Path, src: Path, dest: str, home: Path
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C",
        "HOME": str(home),
        "GFAL_PYTHONBIN": "/usr/bin/python3",
        "X509_CERT_DIR": str(xrootd.cert_dir),
        "CA_FILE": str(xrootd.ca_file),
        "BEARER_TOKEN_FILE": str(token_file),
        "SRC": str(src),
        "DST_ROOT": f"{xrootd.url_root}/{dest}",
        "DST_HTTPS": f"{xrootd.url_https}{dest}",
    }
    return subprocess.run(
        ["bash", "-c", pattern],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("client", sorted(PATTERNS))
def test_pattern_uses_the_renewed_token_file(
    client: str, xrootd: XrootdServer, storage_issuer: StorageIssuer, tmp_path: Path
) -> None:
    token_dir = tmp_path / "tokens"
    token_dir.mkdir(mode=0o700)
    token_file = token_dir / "bt"
    src = tmp_path / "payload.dat"
    src.write_bytes(b"pattern " + client.encode() + b"\n")

    for _ in range(2):  # first token, then a "renewal" for another job path
        job_id = next(_job_ids)
        scope = f"storage.create:/jobs/{job_id} storage.read:/jobs/{job_id}"
        write_secret_file(token_file, storage_issuer.access_token(scope))
        dest = f"jobs/{job_id}/{client}.dat"
        proc = _run_pattern(PATTERNS[client], xrootd, token_file, src, dest, tmp_path)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-500:]
        assert (xrootd.datadir / dest).read_bytes() == src.read_bytes()
