"""The storage fixture itself: loopback only, refuses without a token, cleans up after itself.

These run without a token issuer (xrootd trusts an issuer that does not exist), so they guard
the fixture even when the dev server is broken.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.runhelpers import readline_within

from . import _xrootd
from ._clients import StorageClients
from ._pki import TestCA
from ._xrootd import XrootdConfig, XrootdError, XrootdServer, remove_stale_rundirs
from .conftest import require_software

pytestmark = pytest.mark.e2e

_SHIM = Path(__file__).with_name("_bindshim.c")


@pytest.fixture(scope="module")
def bare_xrootd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XrootdServer]:
    require_software()
    ca = TestCA(tmp_path_factory.mktemp("nobody-issuer"), name="unused issuer CA")
    server = XrootdServer(
        XrootdConfig(issuer_url="https://127.0.0.1:9/op", issuer_ca_file=ca.ca_file)
    )
    with server:
        yield server


def _bind_under_shim(shim: Path, family: str, host: str) -> dict[str, object]:
    """Bind a socket in a child process with the shim preloaded; report address or errno."""
    code = (
        "import json, socket, sys\n"
        "fam = socket.AF_INET6 if sys.argv[1] == '6' else socket.AF_INET\n"
        "s = socket.socket(fam, socket.SOCK_STREAM)\n"
        "if fam == socket.AF_INET6:\n"
        "    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
        "try:\n"
        "    s.bind((sys.argv[2], 0))\n"
        "    print(json.dumps({'ip': s.getsockname()[0]}))\n"
        "except OSError as exc:\n"
        "    print(json.dumps({'errno': exc.errno}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, family, host],
        env={**os.environ, "LD_PRELOAD": str(shim)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(json.loads(proc.stdout))


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_software()
    out = tmp_path_factory.mktemp("shim") / "bindshim.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(_SHIM), "-ldl"],
        check=True,
        timeout=60,
    )
    return out


@pytest.mark.parametrize(
    ("family", "host", "expected_ip"),
    [
        ("4", "0.0.0.0", "127.0.0.1"),
        ("6", "::", "::ffff:127.0.0.1"),
        ("4", "127.0.0.1", "127.0.0.1"),
        ("6", "::1", "::1"),
    ],
)
def test_shim_turns_wildcard_binds_into_loopback(
    shim: Path, family: str, host: str, expected_ip: str
) -> None:
    assert _bind_under_shim(shim, family, host) == {"ip": expected_ip}


@pytest.mark.parametrize(("family", "host"), [("4", "192.0.2.1"), ("6", "2001:db8::1")])
def test_shim_refuses_non_loopback_addresses(shim: Path, family: str, host: str) -> None:
    # EACCES is the shim's answer; the kernel alone would say EADDRNOTAVAIL
    assert _bind_under_shim(shim, family, host) == {"errno": errno.EACCES}


def test_xrootd_listens_on_loopback_only(bare_xrootd: XrootdServer) -> None:
    listening = {
        conn.laddr.ip
        for conn in psutil.Process(bare_xrootd.pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }
    assert listening
    assert listening <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_xrootd_runs_unprivileged(bare_xrootd: XrootdServer) -> None:
    # real, effective and saved: a saved uid 0 would let it take root back
    assert 0 not in psutil.Process(bare_xrootd.pid).uids()
    assert 0 not in psutil.Process(bare_xrootd.pid).gids()


def test_request_without_token_is_refused_and_logged(
    bare_xrootd: XrootdServer, tmp_path: Path
) -> None:
    clients = StorageClients(tmp_path / "c", bare_xrootd.ca_file, bare_xrootd.cert_dir)
    src = tmp_path / "payload"
    src.write_text("x\n")
    result = clients.curl("PUT", bare_xrootd.url_https + "anon/file", upload=src)
    assert result.http_status == 403, result.output
    assert not (bare_xrootd.datadir / "anon" / "file").exists()
    assert "/anon/file" in bare_xrootd.log_text()


def test_stop_leaves_nothing_behind(tmp_path: Path) -> None:
    require_software()
    ca = TestCA(tmp_path / "ca", name="unused issuer CA")
    server = XrootdServer(
        XrootdConfig(issuer_url="https://127.0.0.1:9/op", issuer_ca_file=ca.ca_file)
    )
    server.start()
    pid, port, datadir = server.pid, server.port, server.datadir
    rundir = datadir.parent
    assert rundir.is_dir()
    server.stop()

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not rundir.exists()
    with socket.socket() as sock:
        sock.settimeout(2)
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(rundir) not in mounts
    server.stop()  # idempotent


_ORPHAN_CHILD = """
import sys, tempfile
from pathlib import Path
from tests.e2e._pki import TestCA
from tests.e2e._xrootd import XrootdConfig, XrootdServer
ca = TestCA(Path(sys.argv[1]), name="unused issuer CA")
server = XrootdServer(XrootdConfig(issuer_url="https://127.0.0.1:9/op", issuer_ca_file=ca.ca_file))
server.start()
print(server.pid, server.datadir.parent, flush=True)
sys.stdin.read()
"""


def test_killed_test_process_takes_xrootd_with_it(tmp_path: Path) -> None:
    require_software()
    repo = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_CHILD, str(tmp_path / "ca")],
        cwd=repo,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid_text, rundir_text = readline_within(child.stdout).split()
        server = psutil.Process(int(pid_text))
        child.kill()
        child.wait(timeout=10)
        server.wait(timeout=15)  # raises TimeoutExpired if xrootd outlives its parent
    finally:
        child.kill()
        child.wait(timeout=10)
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.stdout.close()
    # nobody ran stop(): the next start removes the directory (possibly another concurrent
    # test run's start already did)
    rundir = Path(rundir_text)
    remove_stale_rundirs(rundir.parent)
    assert not rundir.exists()


def test_stale_rundirs_of_dead_owners_are_removed_others_kept(tmp_path: Path) -> None:
    dead_pid = _reaped_pid()
    dead = tmp_path / "jobtoken-xrootd-dead"
    alive = tmp_path / "jobtoken-xrootd-alive"
    unowned = tmp_path / "jobtoken-xrootd-starting"
    unrelated = tmp_path / "something-else"
    for directory in (dead, alive, unowned, unrelated):
        directory.mkdir()
    (dead / "owner.pid").write_text(f"{dead_pid}\n")
    (alive / "owner.pid").write_text(f"{os.getpid()}\n")
    (unrelated / "owner.pid").write_text(f"{dead_pid}\n")

    assert remove_stale_rundirs(tmp_path) == [dead]
    assert not dead.exists()
    assert alive.exists() and unowned.exists() and unrelated.exists()


def _reaped_pid() -> int:
    """The pid of a child that has exited and been reaped (so no process has it now)."""
    child = subprocess.Popen(["true"])
    child.wait(timeout=10)
    assert not psutil.pid_exists(child.pid)
    return child.pid


def _unused_issuer(tmp_path: Path, **overrides: object) -> XrootdConfig:
    ca = TestCA(tmp_path / "ca", name="unused issuer CA")
    return XrootdConfig(
        issuer_url="https://127.0.0.1:9/op",
        issuer_ca_file=ca.ca_file,
        **overrides,  # type: ignore[arg-type]
    )


def test_fixed_port_in_use_fails_with_the_reason(tmp_path: Path) -> None:
    require_software()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = XrootdServer(_unused_issuer(tmp_path, port=port, startup_timeout_s=15.0))
        with pytest.raises(XrootdError, match="address already in use"):
            server.start()
    assert not server.datadir.parent.exists()


def test_free_port_taken_by_someone_else_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_software()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real_pick = _xrootd._free_loopback_port
        picks = iter([taken])
        monkeypatch.setattr(
            _xrootd, "_free_loopback_port", lambda: next(picks, None) or real_pick()
        )
        with XrootdServer(_unused_issuer(tmp_path)) as server:
            assert server.port != taken
            assert server.pid > 0
