"""Crash consistency: SIGKILL at random moments while a token or a rotated mytoken is saved.

Each trial forks a real child from this (already imported) test process, lets it write
in a loop, kills it with SIGKILL after a random delay, and judges what is on disk:

* access-token writes (``_tokenfile.write_secret_file``, alternating two large tokens):
  the file must hold one of the two complete tokens, mode 0600. A torn, empty or
  missing file is a failure.
* rotated-mytoken persistence (``_exchange.fetch_access_token`` with a mytoken that the
  dev server rotates on every access token, ``auto_revoke`` on): the mytoken on disk
  must be the one the server accepts. If the server committed a rotation and the child
  died before the new mytoken reached the disk, the chain is lost: that is the
  documented "response lost after commit" limitation of Mytoken rotation, counted
  separately; any other dead mytoken on disk is a failure.

1,000 trials each by default; ``JOBTOKEN_LONG_TESTS=1`` runs 10,000 each.
"""

from __future__ import annotations

import os
import random
import select
import signal
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, NoReturn

import jwt
import pytest

from jobtoken._errors import UsageError
from jobtoken._exchange import TokenRequest, fetch_access_token
from jobtoken._mytoken import MytokenClient, clear_discovery_cache
from jobtoken._mytokenfile import MytokenSource
from jobtoken._tokenfile import write_secret_file
from jobtoken.devserver import DevServer, DevServerConfig
from tests.jwtmint import access_token
from tests.robustness._support import AUD, LONG, ServerActivity

pytestmark = pytest.mark.process

TRIALS = 10_000 if LONG else 1_000
MIN_ROTATED = TRIALS // 100  # kills that must land after a saved rotation
READY_TIMEOUT_S = 60.0  # liveness of a forked child on a loaded machine
SCOPE = "storage.create:/vo/out"


def _fork(work: Callable[[], None]) -> int:
    """Fork a child that runs ``work`` forever and never returns into pytest.

    Returns once the child is running: it says so through a pipe just before ``work``.
    The kill delays then count from the start of the work, not from ``fork()``, whose
    child a loaded machine may not schedule for longer than the longest delay (then
    every kill lands before the first write, and the trials prove nothing).
    """
    ready_r, ready_w = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns about fork() with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(ready_r)
            os.write(ready_w, b"r")
            os.close(ready_w)
            work()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        if not select.select([ready_r], [], [], READY_TIMEOUT_S)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked child not running within {READY_TIMEOUT_S:.0f} s")
        assert os.read(ready_r, 1) == b"r"
    finally:
        os.close(ready_r)
    return pid


def _kill_after(pid: int, delay_s: float) -> None:
    time.sleep(delay_s)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    # the child must have been killed, not died of an error of its own
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _report(title: str, counts: Counter) -> str:
    line = f"{title}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    print(line)
    return line


def test_access_token_file_survives_kill_9_during_writes(tmp_path: Path) -> None:
    # large tokens (8 and 12 KiB) take several write() calls' worth of time to land
    tokens = [access_token(pad="A" * 6000), access_token(pad="B" * 9000)]
    expected = {(t + "\n").encode(): i for i, t in enumerate(tokens)}
    path = tmp_path / "bt"
    write_secret_file(path, tokens[0])
    rnd = random.Random(20240905)

    def writer() -> NoReturn:
        i = 1
        while True:
            write_secret_file(path, tokens[i % 2])
            i += 1

    counts: Counter = Counter()
    for _ in range(TRIALS):
        before = path.read_bytes()
        _kill_after(_fork(writer), rnd.uniform(0.0, 0.008))
        data = path.read_bytes()
        mode = path.stat().st_mode & 0o777
        if data not in expected or mode != 0o600:
            counts["torn"] += 1
            continue
        jwt.decode(data.decode().strip(), options={"verify_signature": False})
        counts["changed" if data != before else "unchanged"] += 1
        left = list(tmp_path.glob(".bt.*.tmp"))
        if left:  # the kill landed between temp file and rename: evidence, and tidy up
            counts["temp_file_left"] += 1
            for p in left:
                p.unlink()
    _report(f"access-token writes, {TRIALS} kills", counts)
    assert counts["torn"] == 0
    # the kills did land at many different moments, not all before the first write
    assert counts["changed"] > TRIALS // 10 and counts["unchanged"] > TRIALS // 20
    assert counts["temp_file_left"] > 0


def test_rotated_mytoken_survives_kill_9_during_exchange(tmp_path: Path) -> None:
    path = tmp_path / "mytoken"
    source = MytokenSource(path=path)
    request = TokenRequest(scopes=(SCOPE,), audiences=(AUD,))
    rnd = random.Random(20240906)
    counts: Counter = Counter()
    with DevServer(
        DevServerConfig(at_lifetime_s=300, op_scopes=("storage.create:/",), default_audience=AUD)
    ) as srv:
        chain: Dict[str, int] = {}

        def new_chain() -> None:
            mytoken = srv.issue_mytoken(
                capabilities=["AT"],
                restrictions=[{"scope": SCOPE, "audience": [AUD]}],
                rotation={"on_AT": True, "auto_revoke": True},
            )
            write_secret_file(path, mytoken, newline=False)
            srv.clear_requests()
            chain["seq_no"] = _seq_no(mytoken)
            counts["chains"] += 1

        clear_discovery_cache()
        with MytokenClient(srv.url, allow_http=True) as warm:
            warm.metadata()  # cached in this process: every child inherits it
        # built once here (loading the CA store costs ~50 ms), used only by the children,
        # each of which opens its own connection
        client = MytokenClient(srv.url, allow_http=True, timeout_s=5.0)

        def exchanger() -> NoReturn:
            while True:
                fetch_access_token(client, source, request, now=time.time())

        activity = ServerActivity(srv)
        new_chain()
        trials = 0
        # TRIALS kills, then (bounded) more late ones while too few landed after a saved
        # rotation: on a loaded machine one exchange can outlast every planned delay
        while trials < TRIALS or (counts["rotated"] < MIN_ROTATED and trials < 3 * TRIALS):
            late = trials >= TRIALS
            trials += 1
            before = path.read_text()
            _kill_after(_fork(exchanger), _exchange_kill_delay(rnd, late=late))
            activity.wait_idle()  # the server finishes what the child started
            outcome = _judge_mytoken(srv, path, chain["seq_no"])
            counts[outcome] += 1
            if outcome == "accepted":
                counts["rotated" if path.read_text() != before else "not rotated"] += 1
            else:
                new_chain()
        client.close()
    clear_discovery_cache()
    _report(f"rotated-mytoken persistence, {trials} kills", counts)
    assert counts["torn"] == 0 and counts["lost"] == 0, counts
    # kills landed before, during and after the server's commit
    assert counts["rotated"] >= MIN_ROTATED and counts["not rotated"] >= TRIALS // 20
    assert counts["lost_after_commit"] >= TRIALS // 100


def _exchange_kill_delay(rnd: random.Random, *, late: bool = False) -> float:
    """Mostly within the first exchange (a few ms unloaded), one in ten well after it.

    The late kills make sure some exchanges complete and save their rotation even when
    a loaded machine stretches one exchange far beyond 30 ms (then few early kills do);
    ``late`` asks for one after even a slow exchange.
    """
    if late:
        return rnd.uniform(0.3, 1.5)
    return rnd.uniform(0.0, 0.03) if rnd.random() < 0.9 else rnd.uniform(0.03, 0.3)


def _seq_no(mytoken: str) -> int:
    return int(jwt.decode(mytoken, options={"verify_signature": False})["seq_no"])


def _judge_mytoken(srv: DevServer, path: Path, chain_start_seq: int) -> str:
    """accepted | lost_after_commit (documented) | lost | torn."""
    try:
        on_disk = path.read_text()
        seq_no = _seq_no(on_disk)
    except (OSError, ValueError, KeyError, jwt.PyJWTError):
        return "torn"
    if (path.stat().st_mode & 0o777) != 0o600:
        return "torn"
    # every 200 from the access endpoint since the chain began was one committed rotation
    server_seq = chain_start_seq + sum(1 for r in srv.requests("access") if r.status == 200)
    try:
        srv.introspect(on_disk)
    except UsageError:
        if seq_no == server_seq - 1:
            return "lost_after_commit"
        print(f"lost: seq_no on disk {seq_no}, server at {server_seq}")
        return "lost"
    if seq_no != server_seq:
        print(f"lost: seq_no on disk {seq_no} accepted, server log says {server_seq}")
        return "lost"
    return "accepted"
