"""The node broker: one service per worker node that holds every mytoken and renews every job.

Why: a renewer per job costs a Python interpreter with httpx per job, and it has to hand
the job mytoken (and, on HTCondor, the site's parent) to the job's uid. The broker keeps
both in its own state directory, talks to jobs over a Unix socket, and writes only the
short-lived access token into each job's directory (docs/broker.md).

Shape: one thread runs a selector loop (the listening socket, the connections, one
pidfd per job anchor, a wake-up socket) and a timer heap of renewals; the HTTP calls
run on a small thread pool that shares one kept ``MytokenClient`` (one TLS context).
Work done on the pool hands its outcome back to the loop (``_post``), which alone
changes the job table, so the table needs no lock. Every change of a job's phase is
written to its state directory before it is acted on; a restarted broker reloads every
job, revokes those whose anchor ended, and reschedules the rest.

Per job, in ``<state_dir>/jobs/<safe id>/`` (a ``TokenDir``, 0700, the broker's own):
``mytoken`` (the job mytoken), ``bt`` (the current access token), ``job.json``,
``state.json`` and ``broker.json`` (the identity, the anchor, the phase, the job's
token directory and the device/inode it had at ``prepare``).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import heapq
import importlib
import json
import logging
import os
import queue
import random
import re
import selectors
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _policy as policy
from ._brokeridentity import (
    IdentityResolver,
    JobIdentity,
    PeerCred,
    RegisteredJobs,
    anchor_alive,
    caller_anchor,
    is_trusted,
    peer_cred,
)
from ._brokerproto import (
    MAX_REQUEST_BYTES,
    BrokerReply,
    BrokerRequest,
    reply_for_error,
)
from ._config import Config
from ._errors import (
    ConfigError,
    ExitCode,
    IdentityError,
    JobtokenError,
    MytokenError,
    MytokenRejectedError,
    ServerUnavailableError,
    TokenCheckError,
    TokenFileError,
    UsageError,
)
from ._scopes import scopes_within
from ._tokendir import JobRecord, RenewalState, TokenDir
from ._tokenfile import (
    ensure_private_dir,
    open_job_directory,
    read_secret_file,
    write_file_atomically,
    write_secret_file,
)

__all__ = ["Broker", "make_resolver", "serve"]

logger = logging.getLogger(__name__)

#: how long a client may take to send its request line
REQUEST_TIMEOUT_S = 5.0
#: connections open at once; more are answered with an error and closed at once
MAX_CONNECTIONS = 512
#: ... and per uid (root and the broker's own excepted): one user cannot crowd out the rest
MAX_CONNECTIONS_PER_UID = 64
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
TOKEN_NAME = "bt"
BROKER_FILE = "broker.json"

# phases of a job in its broker.json
REGISTERED, PREPARING, ACTIVE, ENDING = "registered", "preparing", "active", "ending"


def make_resolver(config: Config) -> IdentityResolver:
    """The identity resolver ``broker.identity`` names.

    ``"registered"`` is built in; ``"condor"`` is ``make_resolver(config)`` of
    ``jobtoken.integrations.condor_broker``, imported only when chosen (the core never
    imports an integration at module level).

    Raises:
        ConfigError: via the integration (e.g. HTCondor bindings missing).
    """
    if config.broker.identity == "registered":
        return RegisteredJobs()
    module = importlib.import_module("jobtoken.integrations.condor_broker")
    return module.make_resolver(config)  # type: ignore[no-any-return]


def _job_key(job_id: str) -> str:
    """A directory name for ``job_id``: readable, and unique (a hash of the exact id)."""
    digest = hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:16]
    return f"{_SAFE.sub('_', job_id)[:60].lstrip('.') or 'job'}-{digest}"


@dataclass
class _Job:
    """One job as the loop sees it (changed only on the loop's thread)."""

    identity: JobIdentity
    store: TokenDir
    phase: str
    tokendir: Optional[str] = None
    dir_identity: Optional[Tuple[int, int]] = None
    spec: Optional[JobRecord] = None
    state: RenewalState = field(default_factory=RenewalState)
    busy: bool = False
    end_wanted: bool = False
    generation: int = 0
    pidfd: Optional[int] = None
    waiters: List[Tuple[Any, Callable[[], BrokerReply]]] = field(default_factory=list)
    revoke_attempts: int = 0
    requeue: bool = False  # after revoking a cut-short prepare, the job may prepare again
    adopted: bool = False  # its mytoken came from the job (adopt): revoked by itself

    @property
    def job_id(self) -> str:
        return self.identity.job_id

    def record(self) -> Dict[str, Any]:
        return {
            "v": 1, "phase": self.phase, "identity": self.identity.to_dict(),
            "tokendir": self.tokendir,
            "dir_identity": list(self.dir_identity) if self.dir_identity else None,
            "adopted": self.adopted,
        }


@dataclass
class _Conn:
    sock: socket.socket
    peer: PeerCred
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    out: bytes = b""
    waiting: bool = False  # a worker answers it


class Broker:
    """The service; ``serve_forever`` runs it until ``stop()`` (or SIGTERM via ``serve``)."""

    def __init__(self, config: Config, *, resolver: Optional[IdentityResolver] = None) -> None:
        self.config = config
        self.resolver = resolver if resolver is not None else make_resolver(config)
        self.state_dir = Path(config.broker.state_dir)
        self.socket_path = config.broker.socket
        self.jobs: Dict[str, _Job] = {}
        self.paused_until = 0.0  # a Retry-After pauses every renewal of the node until then
        self._timers: List[Tuple[float, float, int, str, int]] = []
        self._seq = 0
        self._conns: Dict[int, _Conn] = {}
        self._posted: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._parent_lock = threading.Lock()  # one use of the (rotating) parent at a time
        self._job_locks: Dict[str, threading.Lock] = {}
        self._rnd = random.Random()
        self._stopping = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._listener: Optional[socket.socket] = None
        self._lock_fd: Optional[int] = None
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._client: Any = None
        self._verifier: Any = None
        self._next_reconcile = 0.0

    # --- start and stop -----------------------------------------------------------------------

    def start(self) -> None:
        """Take the state directory, reload every job, listen.

        Raises:
            ConfigError: no parent mytoken or server; TokenFileError: the state
                directory or the socket cannot be set up; JobtokenError: another broker
                holds the state directory.
        """
        from ._mytokenfile import load_mytoken
        from ._oneshot import build_verifier, client_for, server_url_for
        from ._prepare import parent_source_of

        self._check_socket_dir()
        ensure_private_dir(self.state_dir)
        ensure_private_dir(self.state_dir / "jobs")
        self._lock_fd = os.open(self.state_dir / "broker.lock",
                                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise JobtokenError(f"another broker runs on {self.state_dir}") from None
        parent = None
        if self.config.site.parent_mytoken_file or self.config.token.mytoken_file \
                or not self.config.broker.adopt:  # an adopting node may have no parent
            parent = load_mytoken(parent_source_of(self.config), allow_other_owner=True)
        url = server_url_for(self.config, parent)
        # kept for the broker's life: a per-request timeout, no overall deadline
        self._client = client_for(replace(self.config.server, deadline_s=0.0), url)
        self._verifier = build_verifier(self.config)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.broker.workers, thread_name_prefix="jobtoken-broker")
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._reload()
        self._listen()
        logger.info("broker listening socket=%s state_dir=%s jobs=%d", self.socket_path,
                    self.state_dir, len(self.jobs))

    def _check_socket_dir(self) -> None:
        """Make (0755) or check the socket's directory before anything else starts.

        Raises:
            ConfigError: someone else may write there, and so could put their own socket
                in the broker's place (clients would believe its answers).
        """
        parent = Path(self.socket_path).parent
        if not parent.exists():
            parent.mkdir(mode=0o755, parents=True)
        st = os.stat(parent)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid not in (0, os.geteuid()):
            raise ConfigError(f"socket directory {parent} must be the broker's (or root's) "
                              "and not writable by others (0755)")

    def _listen(self) -> None:
        path = Path(self.socket_path)
        try:
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode):
                os.unlink(path)  # a dead broker's socket (we hold the state lock)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o666)  # who may do what is decided by SO_PEERCRED, not the mode
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise TokenFileError(f"cannot listen on {path}: {exc.strerror}") from exc
        sock.setblocking(False)
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, ("listen", None))

    def stop(self) -> None:
        """Ask the loop to end (from any thread or a signal handler); jobs stay on disk."""
        self._stopping.set()
        self._wake()

    def close(self) -> None:
        if self._listener is not None:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for job in self.jobs.values():
            self._unwatch(job)
        if self._client is not None:
            self._client.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # --- the loop -----------------------------------------------------------------------------

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            self._run_timers()
            timeout = self._timeout()
            for key, events in self._sel.select(timeout):
                kind, obj = key.data
                if kind == "listen":
                    self._accept()
                elif kind == "wake":
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except OSError:
                        pass
                elif kind == "conn":
                    self._on_conn(obj, events)
                elif kind == "anchor":
                    self._anchor_ended(obj)
            while True:
                try:
                    posted = self._posted.get_nowait()
                except queue.Empty:
                    break
                try:
                    posted()
                except Exception:  # a bug must not take every job's renewals down with it
                    logger.exception("internal error in the broker loop")
            self._expire_conns()
            now = time.time()
            if now >= self._next_reconcile:
                self._reconcile()
                self._next_reconcile = now + self.config.broker.reconcile_s

    def _timeout(self) -> float:
        now = time.time()
        limit = min(self._next_reconcile, now + 1.0)
        if self._timers:
            limit = min(limit, max(self._timers[0][0], self.paused_until))
        if self._conns:
            limit = min(limit, now + 0.5)
        return max(0.0, limit - now)

    def _post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread (from a worker)."""
        self._posted.put(fn)
        self._wake()

    def _submit(self, job: _Job, work: Callable[[], Any],
                done: Callable[[Optional[Any], Optional[BaseException]], None]) -> None:
        """Run ``work`` on the pool with the job's lock; ``done(result, error)`` on the loop."""
        job.busy = True
        lock = self._job_locks.setdefault(job.job_id, threading.Lock())

        def run() -> None:
            try:
                with lock:
                    result = work()
            except BaseException as exc:  # handed to the loop, logged there
                error = exc
                self._post(lambda: self._finish(job, done, None, error))
                return
            self._post(lambda: self._finish(job, done, result, None))

        assert self._pool is not None
        self._pool.submit(run)

    def _finish(self, job: _Job, done: Callable[[Optional[Any], Optional[BaseException]], None],
                result: Any, error: Optional[BaseException]) -> None:
        job.busy = False
        if error is not None and not isinstance(error, JobtokenError):
            logger.error("job %s: internal error %s: %s", job.job_id, type(error).__name__,
                         error)
        done(result, error)
        if job.end_wanted and not job.busy and job.phase != ENDING:
            self._end(job, "ended while busy")
        elif not job.busy and job.waiters:
            waiters, job.waiters = job.waiters, []
            for conn, answer in waiters:
                self._handle_waiter(conn, answer)

    def _handle_waiter(self, conn: _Conn, answer: Callable[[], BrokerReply]) -> None:
        try:
            reply = answer()
        except _Answered:
            return
        except Exception as exc:  # an answer that failed is one line too
            reply = reply_for_error(exc)
        self._reply(conn, reply)

    # --- timers -------------------------------------------------------------------------------

    def _schedule(self, job: _Job, at: float) -> None:
        job.generation += 1
        self._seq += 1
        heapq.heappush(self._timers, (at, at, self._seq, job.job_id, job.generation))

    def _run_timers(self) -> None:
        now = time.time()
        while self._timers and self._timers[0][0] <= now:
            at, due, seq, job_id, generation = heapq.heappop(self._timers)
            job = self.jobs.get(job_id)
            if job is None or job.generation != generation:
                continue
            if now < self.paused_until:
                # the node waits for the server's Retry-After; jobs keep their order
                heapq.heappush(self._timers, (self.paused_until, due, seq, job_id, generation))
                continue
            if job.busy:
                heapq.heappush(self._timers, (now + 0.5, due, seq, job_id, generation))
                continue
            if job.phase == ACTIVE:
                self._start_renewal(job)
            elif job.phase == ENDING:
                self._start_revocation(job)

    # --- connections --------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("accept failed: %s", exc.strerror)
                return
            sock.setblocking(False)
            try:
                peer = peer_cred(sock)
            except OSError:
                sock.close()
                continue
            conn = _Conn(sock=sock, peer=peer, deadline=time.monotonic() + REQUEST_TIMEOUT_S)
            same_uid = sum(1 for c in self._conns.values() if c.peer.uid == peer.uid)
            if len(self._conns) >= MAX_CONNECTIONS or (
                    same_uid >= MAX_CONNECTIONS_PER_UID and not self._trusted(peer)):
                self._conns[sock.fileno()] = conn
                self._sel.register(sock, selectors.EVENT_READ, ("conn", conn))
                self._reply(conn, BrokerReply(False, int(ExitCode.SERVER_UNAVAILABLE),
                                              "broker busy: too many connections",
                                              retryable=True))
                continue
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, ("conn", conn))

    def _on_conn(self, conn: _Conn, events: int) -> None:
        if events & selectors.EVENT_WRITE and conn.out:
            self._flush(conn)
            return
        if conn.out or conn.waiting:
            return
        try:
            chunk = conn.sock.recv(MAX_REQUEST_BYTES + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not chunk:
            if conn.buf:
                self._reply(conn, reply_for_error(UsageError("incomplete request (no newline)")))
            else:
                self._drop(conn)
            return
        conn.buf += chunk
        line, newline, _ = bytes(conn.buf).partition(b"\n")
        if not newline:
            if len(conn.buf) > MAX_REQUEST_BYTES:
                self._reply(conn, reply_for_error(
                    UsageError(f"request larger than {MAX_REQUEST_BYTES} bytes")))
            return
        try:
            request = BrokerRequest.from_json(line)
            self._dispatch(conn, request)
        except Exception as exc:
            if not isinstance(exc, JobtokenError):
                logger.exception("internal error answering uid %d", conn.peer.uid)
            self._reply(conn, reply_for_error(exc))

    def _expire_conns(self) -> None:
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if conn.waiting or now < conn.deadline:
                continue
            if conn.out:
                self._drop(conn)  # a client that does not read its reply
            else:
                self._reply(conn, reply_for_error(UsageError(
                    f"no complete request within {REQUEST_TIMEOUT_S:.0f} s")))

    def _park(self, conn: _Conn) -> None:
        """A worker (or a busy job) answers ``conn`` later: stop watching it meanwhile, so a
        client that hangs up early cannot make the loop spin on its EOF."""
        conn.waiting = True
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _reply(self, conn: _Conn, reply: BrokerReply) -> None:
        if conn.sock.fileno() < 0:
            return
        conn.waiting = False
        conn.out = (reply.to_json() + "\n").encode("utf-8")
        conn.deadline = time.monotonic() + REQUEST_TIMEOUT_S
        try:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, ("conn", conn))
        except KeyError:
            self._sel.register(conn.sock, selectors.EVENT_WRITE, ("conn", conn))
        except ValueError:
            return
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            self._conns.pop(fd, None)
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()

    # --- requests -----------------------------------------------------------------------------

    def _dispatch(self, conn: _Conn, request: BrokerRequest) -> None:
        """Answer now, or mark ``conn`` waiting for a worker (or for a busy job)."""
        op = request.op
        if op == "ping":
            self._reply(conn, BrokerReply(True, 0, "pong", detail={"jobs": len(self.jobs)}))
        elif op == "register":
            self._reply(conn, self._register(conn.peer, request))
        elif op == "adopt":
            self._adopt(conn, request)
        elif op == "status" and request.job is None and self._trusted(conn.peer) \
                and not self._known_peer(conn.peer):
            self._reply(conn, self._node_status())
        else:
            job = self._job_for(conn.peer, request)
            if op == "prepare":
                self._prepare(conn, job, request)
            elif op == "ensure":
                self._ensure(conn, job, request)
            elif op == "status":
                self._reply(conn, self._status(job))
            elif op == "release":
                self._release(conn, job)

    def _trusted(self, peer: PeerCred) -> bool:
        return is_trusted(peer, os.geteuid())

    def _known_peer(self, peer: PeerCred) -> bool:
        try:
            self.resolver.resolve(peer)
        except JobtokenError:
            return False
        return True

    def _job_for(self, peer: PeerCred, request: BrokerRequest) -> _Job:
        """The job the caller is (or, for a trusted caller, names in ``job.job_id``).

        Raises:
            IdentityError: the caller is no job, or a job of another uid.
        """
        if request.job is not None:
            if not self._trusted(peer):
                raise IdentityError("only root or the broker's uid may name a job")
            job_id = request.job.get("job_id")
            job = self.jobs.get(job_id) if isinstance(job_id, str) else None
            if job is None:
                raise IdentityError(f"no job {str(job_id)[:80]!r} on this broker")
            return job
        identity = self.resolver.resolve(peer)
        if identity.uid != peer.uid:
            raise IdentityError(f"process {peer.pid} runs as uid {peer.uid}, the job as "
                                f"uid {identity.uid}")
        job = self.jobs.get(identity.job_id)
        if job is None:
            job = self._new_job(identity, REGISTERED)
        elif job.identity.anchor != identity.anchor or job.identity.uid != identity.uid:
            raise IdentityError(f"job {identity.job_id} is known with another anchor or uid")
        return job

    def _register(self, peer: PeerCred, request: BrokerRequest) -> BrokerReply:
        register = getattr(self.resolver, "register", None)
        if register is None:
            raise IdentityError("this broker learns jobs from the batch system; "
                                "it takes no registrations")
        if request.job is None:
            raise UsageError("register needs a job object")
        identity: JobIdentity = register(peer, request.job)
        job = self.jobs.get(identity.job_id)
        if job is None:
            job = self._new_job(identity, REGISTERED)
        logger.info("job registered job=%s uid=%d anchor=%d", identity.job_id, identity.uid,
                    identity.anchor.pid)
        return BrokerReply(True, 0, f"job {identity.job_id} registered", job_id=identity.job_id)

    def _new_job(self, identity: JobIdentity, phase: str, *, adopted: bool = False) -> _Job:
        store = TokenDir.create(self.state_dir / "jobs" / _job_key(identity.job_id))
        job = _Job(identity=identity, store=store, phase=phase, adopted=adopted)
        job.state.job_id = identity.job_id
        self._persist(job)
        self.jobs[identity.job_id] = job
        self._watch(job)
        if not anchor_alive(identity.anchor):
            self._end(job, "anchor gone at registration")
            raise IdentityError(f"job {identity.job_id}'s anchor process has ended")
        return job

    def _persist(self, job: _Job) -> None:
        """Write the job's phase and binding before acting on it (crash safety)."""
        write_file_atomically(job.store.path / BROKER_FILE,
                              json.dumps(job.record(), sort_keys=True).encode(), mode=0o600)

    def _prepare(self, conn: _Conn, job: _Job, request: BrokerRequest) -> None:
        if not request.tokendir:
            raise UsageError("prepare needs the token directory (tokendir)")
        if job.busy or job.phase in (ACTIVE, ENDING):
            self._again(conn, job, request)
            return
        path = os.path.normpath(request.tokendir)
        with open_job_directory(path, job.identity.uid) as directory:
            for other in self.jobs.values():
                if other is not job and other.dir_identity == directory.identity:
                    raise IdentityError(f"token directory {path} belongs to another job")
            dir_identity = directory.identity
        scopes = self._scopes_for(job.identity, request.scopes)
        audiences = self._audiences_for(job.identity, request.audiences)
        job.phase, job.tokendir, job.dir_identity = PREPARING, path, dir_identity
        self._persist(job)
        self._park(conn)
        self._submit(job, lambda: self._prepare_work(job, path, dir_identity, scopes, audiences),
                     lambda result, error: self._prepared(conn, job, result, error))

    def _scopes_for(self, identity: JobIdentity, asked: Tuple[str, ...]) -> Tuple[str, ...]:
        """The job's wish, if any, within what its trusted description allows."""
        if asked and identity.scopes:
            wider = scopes_within(asked, identity.scopes)
            if wider:
                raise MytokenRejectedError(f"job {identity.job_id} asks for "
                                           f"{' '.join(wider)}, wider than its job allows")
        return asked or identity.scopes

    def _audiences_for(self, identity: JobIdentity, asked: Tuple[str, ...]) -> Tuple[str, ...]:
        if asked and identity.audiences:
            extra = [a for a in asked if a not in identity.audiences]
            if extra:
                raise MytokenRejectedError(f"job {identity.job_id} asks for audience "
                                           f"{' '.join(extra)}, not its job's")
        return asked or identity.audiences

    def _prepare_work(self, job: _Job, path: str, dir_identity: Tuple[int, int],
                      scopes: Tuple[str, ...], audiences: Tuple[str, ...]) -> Any:
        from ._prepare import JobFacts, prepare_job

        identity = job.identity
        info = JobFacts(job_id=identity.job_id, walltime_s=identity.walltime_s,
                       owner=identity.owner, vo=identity.vo, scopes=scopes,
                       audiences=audiences)

        def write_token(raw: str) -> None:
            write_secret_file(job.store.bearer_token, raw)
            self._write_job_token(path, identity.uid, dir_identity, raw)

        with self._parent_lock:
            return prepare_job(self.config, info, directory=str(job.store.path),
                               client=self._client, write_token=write_token)

    def _write_job_token(self, path: str, uid: int, dir_identity: Tuple[int, int],
                         raw: str) -> None:
        """Put the token in the job's directory through a dirfd, never through a link.

        Raises:
            TokenFileError: the directory is gone, unsafe, or not the one bound at prepare.
        """
        with open_job_directory(path, uid) as directory:
            if directory.identity != dir_identity:
                raise TokenFileError(f"token directory {path} was replaced since prepare")
            directory.write_secret(TOKEN_NAME, raw)

    def _prepared(self, conn: _Conn, job: _Job, result: Any, error: Optional[BaseException]
                  ) -> None:
        if error is not None:
            job.phase, job.tokendir, job.dir_identity = REGISTERED, None, None
            self._persist(job)
            self._reply(conn, reply_for_error(error, job.job_id))
            return
        token = result.token
        job.spec = result.spec
        job.phase = ACTIVE
        self._persist(job)
        self._record_token(job, token.expires_at, token.issued_at, token.jti, renewed=False)
        logger.info("job prepared job=%s uid=%d dir=%s mom_id=%s", job.job_id,
                    job.identity.uid, job.tokendir, result.mom_id)
        self._reply(conn, self._prepared_reply(job, None))

    def _prepared_reply(self, job: _Job, request: Optional[BrokerRequest]) -> BrokerReply:
        if job.phase != ACTIVE or job.tokendir is None:
            raise JobtokenError(f"job {job.job_id} is not prepared ({job.phase})")
        if request is not None and request.tokendir \
                and os.path.normpath(request.tokendir) != job.tokendir:
            raise IdentityError(f"job {job.job_id} is prepared with another token directory")
        return BrokerReply(True, 0, "prepared", expires_at=job.state.expires_at,
                           bearer_token_file=os.path.join(job.tokendir, TOKEN_NAME),
                           job_id=job.job_id)

    def _settings(self, job: _Job) -> policy.RenewalSettings:
        spec = job.spec
        assert spec is not None
        return policy.renewal_settings(spec.fraction, spec.margin_s, spec.max_backoff_s)

    def _record_token(self, job: _Job, expires_at: float, issued_at: Optional[float],
                      jti: Optional[str], *, renewed: bool) -> None:
        now = time.time()
        st = job.state
        st.expires_at, st.issued_at, st.jti = expires_at, issued_at, jti
        st.consecutive_failures = 0
        st.last_success_at = now
        st.last_error = None
        if renewed:
            st.renewals += 1
        self._plan(job, policy.next_renewal_at(
            issued_at, expires_at, settings=self._settings(job),
            jitter=policy.job_jitter(job.job_id, self._settings(job).jitter_fraction),
            obtained_at=now))

    def _plan(self, job: _Job, at: float) -> None:
        spec = job.spec
        job.state.next_attempt_at = at if policy.within_horizon(
            at, spec.job_end_at if spec else None) else None
        self._write_state(job)
        if job.state.next_attempt_at is not None:
            self._schedule(job, at)

    def _write_state(self, job: _Job) -> None:
        job.state.updated_at = time.time()
        try:
            job.store.write_state(job.state)
        except JobtokenError as exc:
            logger.warning("job %s: cannot write its state: %s", job.job_id, exc.message)

    # --- renewal ------------------------------------------------------------------------------

    def _start_renewal(self, job: _Job, conn: Optional[_Conn] = None,
                       min_valid_s: Optional[float] = None) -> None:
        job.state.last_attempt_at = time.time()
        self._submit(job, lambda: self._renew_work(job),
                     lambda result, error: self._renewed(job, result, error, conn, min_valid_s))

    def _renew_work(self, job: _Job) -> Any:
        from ._exchange import TokenRequest, fetch_access_token
        from ._mytokenfile import MytokenSource
        from ._tokens import decode_access_token

        spec = job.spec
        assert spec is not None and job.tokendir is not None and job.dir_identity is not None
        now = time.time()
        previous = None
        try:
            previous = decode_access_token(read_secret_file(job.store.bearer_token))
        except JobtokenError:
            pass
        token = fetch_access_token(
            self._client, MytokenSource(path=job.store.mytoken),
            TokenRequest(scopes=spec.scopes, audiences=spec.audiences,
                         comment=f"jobtoken {spec.job_id}"),
            now=now, previous=previous, verifier=self._verifier)
        write_secret_file(job.store.bearer_token, token.raw)
        try:
            self._write_job_token(job.tokendir, job.identity.uid, job.dir_identity, token.raw)
        except TokenFileError as exc:  # the job's loss; the broker's copy is renewed
            logger.warning("job %s: %s", job.job_id, exc.message)
            return token, exc
        return token, None

    def _renewed(self, job: _Job, result: Any, error: Optional[BaseException],
                 conn: Optional[_Conn], min_valid_s: Optional[float]) -> None:
        if job.phase != ACTIVE:
            if conn is not None:
                self._reply(conn, reply_for_error(JobtokenError(
                    f"job {job.job_id} ended"), job.job_id))
            return
        if error is None:
            token, unwritten = result
            logger.info("token renewed job=%s exp=%d", job.job_id, int(token.expires_at))
            self._record_token(job, token.expires_at, token.issued_at, token.jti, renewed=True)
            if conn is not None:
                self._reply(conn, self._token_reply(job, renewed=True) if unwritten is None
                            else reply_for_error(unwritten, job.job_id))
            return
        self._renewal_failed(job, error)
        if conn is not None:
            left = (job.state.expires_at or 0.0) - time.time()
            if min_valid_s is not None and left >= min_valid_s:
                self._reply(conn, self._token_reply(job, renewed=False))
            else:
                self._reply(conn, reply_for_error(error, job.job_id))

    def _renewal_failed(self, job: _Job, error: BaseException) -> None:
        now = time.time()
        st = job.state
        message = error.message if isinstance(error, JobtokenError) else type(error).__name__
        st.failures_total += 1
        st.consecutive_failures += 1
        st.last_error = message
        retry_after = error.retry_after_s if isinstance(error, MytokenError) else None
        if isinstance(error, MytokenError) and error.status == 429 and retry_after \
                and now >= self.paused_until:
            self.paused_until = now + retry_after
            logger.warning("server asked to wait %.0f s (429): every renewal of the node "
                           "pauses until then", retry_after)
        # a refused token (the next may pass) or an unwritable file (a disk may drain) is
        # retried although not ``retryable`` (RenewalReport.permanent's rule)
        permanent = isinstance(error, JobtokenError) and not error.retryable \
            and not isinstance(error, (TokenFileError, TokenCheckError))
        st.last_error_permanent = permanent
        logger.warning("renewal failed job=%s attempt=%d%s: %s", job.job_id,
                       st.consecutive_failures, " (permanent)" if permanent else "", message)
        if permanent:  # not retried; the job's status says why
            st.next_attempt_at = None
            self._write_state(job)
            return
        settings = self._settings(job)
        expires = st.expires_at or now
        lifetime = expires - (st.issued_at or expires - policy.ASSUMED_LIFETIME_S)
        self._plan(job, policy.next_attempt_at(
            now, attempt=st.consecutive_failures, retry_after_s=retry_after,
            expires_at=expires, settings=settings, rnd=self._rnd,
            margin_s=policy.margin_for(lifetime, settings)))

    def _token_reply(self, job: _Job, *, renewed: bool) -> BrokerReply:
        assert job.tokendir is not None
        return BrokerReply(True, 0, "renewed" if renewed else "valid",
                           expires_at=job.state.expires_at,
                           bearer_token_file=os.path.join(job.tokendir, TOKEN_NAME),
                           job_id=job.job_id, detail={"renewed": renewed})

    def _ensure(self, conn: _Conn, job: _Job, request: BrokerRequest) -> None:
        if job.phase != ACTIVE:
            raise JobtokenError(f"job {job.job_id} is not prepared ({job.phase})")
        min_valid = request.min_valid_s or 0.0
        if job.busy:
            self._park(conn)
            job.waiters.append((conn, lambda: self._ensure_again(conn, job, min_valid)))
            return
        left = (job.state.expires_at or 0.0) - time.time()
        if left >= min_valid and left > 0:
            problem = self._restore_job_token(job)
            self._reply(conn, self._token_reply(job, renewed=False) if problem is None
                        else reply_for_error(problem, job.job_id))
            return
        if time.time() < self.paused_until:
            raise ServerUnavailableError(
                f"the server asked this node to wait {self.paused_until - time.time():.0f} s "
                "more (Retry-After)", retry_after_s=self.paused_until - time.time())
        self._park(conn)
        self._start_renewal(job, conn, min_valid)

    def _ensure_again(self, conn: _Conn, job: _Job, min_valid: float) -> BrokerReply:
        """A waiter's answer once the job's running operation is done."""
        self._ensure(conn, job, BrokerRequest("ensure", min_valid_s=min_valid))
        # _ensure replied or started a renewal that will; nothing more to say now
        raise _Answered()

    def _restore_job_token(self, job: _Job) -> Optional[JobtokenError]:
        """Make the job's token file hold the broker's copy again (the job may have lost
        or replaced it); the error, if that failed."""
        try:
            raw = read_secret_file(job.store.bearer_token)
            assert job.tokendir is not None and job.dir_identity is not None
            self._write_job_token(job.tokendir, job.identity.uid, job.dir_identity, raw)
        except JobtokenError as exc:
            logger.warning("job %s: cannot restore its token file: %s", job.job_id, exc.message)
            return exc
        return None

    def _status(self, job: _Job) -> BrokerReply:
        st = job.state
        detail = {
            "phase": job.phase, "uid": job.identity.uid, "renewals": st.renewals,
            "failures_total": st.failures_total,
            "consecutive_failures": st.consecutive_failures, "last_error": st.last_error,
            "last_error_permanent": st.last_error_permanent,
            "next_attempt_at": st.next_attempt_at, "tokendir": job.tokendir,
            "paused_until": self.paused_until or None,
        }
        return BrokerReply(True, 0, job.phase, expires_at=st.expires_at, job_id=job.job_id,
                           bearer_token_file=os.path.join(job.tokendir, TOKEN_NAME)
                           if job.tokendir else None, detail=detail)

    def _node_status(self) -> BrokerReply:
        phases: Dict[str, int] = {}
        for job in self.jobs.values():
            phases[job.phase] = phases.get(job.phase, 0) + 1
        return BrokerReply(True, 0, f"{len(self.jobs)} job(s)", detail={
            "jobs": len(self.jobs), "phases": phases, "paused_until": self.paused_until or None})

    # --- adopt: a job hands in the mytoken it brought (ARC) ---------------------------------------

    def _adopt(self, conn: _Conn, request: BrokerRequest) -> None:
        """Take the job mytoken out of the caller's directory and serve the job as prepared.

        Whatever goes wrong once the mytoken was read, it is revoked and removed from the
        job's directory: a job mytoken the broker cannot use is not left to the payload.
        """
        from . import _brokeradopt as adopt

        if not self.config.broker.adopt:
            raise IdentityError("this broker does not adopt jobs (broker.adopt is false)")
        add = getattr(self.resolver, "add", None)
        if add is None:
            raise IdentityError("adopt needs broker.identity = \"registered\"")
        if not request.tokendir:
            raise UsageError("adopt needs the token directory (tokendir)")
        anchor = caller_anchor(conn.peer, request.anchor_pid)
        path = os.path.normpath(request.tokendir)
        with open_job_directory(path, conn.peer.uid) as directory:
            asked = adopt.read_record(directory)
            job_id = adopt.adopted_job_id(asked)
            known = self.jobs.get(job_id)
            if known is not None:
                if (known.identity.uid, known.identity.anchor) != (conn.peer.uid, anchor):
                    raise IdentityError(f"job {job_id} is adopted already by another uid or "
                                        "anchor")
                self._again(conn, known, request)
                return
            for other in self.jobs.values():
                if other.dir_identity == directory.identity:
                    raise IdentityError(f"token directory {path} belongs to another job")
            try:
                mytoken = adopt.read_mytoken(directory)
            except JobtokenError as exc:
                self._revoke_quietly(adopt.hardlinked(exc), directory)
                raise
            job: Optional[_Job] = None
            try:
                spec = adopt.adopted_record(self.config, asked, self._client.server_url)
                identity = JobIdentity(job_id=job_id, uid=conn.peer.uid, owner=None,
                                       anchor=anchor, scopes=spec.scopes,
                                       audiences=spec.audiences)
                add(identity)
                job = self._new_job(identity, PREPARING, adopted=True)
                job.spec, job.tokendir, job.dir_identity = spec, path, directory.identity
                write_secret_file(job.store.mytoken, mytoken, newline=False)
                job.store.write_spec(spec)
                self._persist(job)
                removed = adopt.clear_mytokens(directory)  # now: the broker's copy is on disk
            except JobtokenError:
                self._revoke_quietly(mytoken, directory)
                if job is not None:
                    self._end(job, "adopt failed")
                raise
        logger.info("job adopted job=%s uid=%d anchor=%d dir=%s removed=%s", job_id,
                    conn.peer.uid, anchor.pid, path, ",".join(removed))
        self._park(conn)
        adopted: _Job = job
        self._submit(adopted, lambda: self._renew_work(adopted),
                     lambda result, error: self._adopted(conn, adopted, result, error))

    def _again(self, conn: _Conn, job: _Job, request: BrokerRequest) -> None:
        """A second ``prepare``/``adopt`` of a known job: its current state."""
        if job.busy:
            job.waiters.append((conn, lambda: self._prepared_reply(job, request)))
            self._park(conn)
            return
        self._reply(conn, self._prepared_reply(job, request))

    def _revoke_quietly(self, mytoken: Optional[str], directory: Any) -> None:
        """A handed-in mytoken the broker will not use: revoke it (on the pool; a failure
        is logged) and take it out of the job's directory."""
        from . import _brokeradopt as adopt
        from ._submytoken import revoke_quietly

        try:
            adopt.clear_mytokens(directory)
        except JobtokenError as exc:
            logger.warning("%s", exc.message)
        if mytoken is not None and self._pool is not None:
            self._pool.submit(revoke_quietly, self._client, mytoken, "job mytoken handed in")

    def _adopted(self, conn: _Conn, job: _Job, result: Any,
                 error: Optional[BaseException]) -> None:
        if error is None and result[1] is not None:
            error = result[1]  # a token the job's directory did not get
        if error is not None:
            logger.warning("job %s: cannot use the mytoken it handed in: %s", job.job_id,
                           error.message if isinstance(error, JobtokenError) else error)
            self._reply(conn, reply_for_error(error, job.job_id))
            self._end(job, "adopt failed")
            return
        token = result[0]
        job.phase = ACTIVE
        self._persist(job)
        self._record_token(job, token.expires_at, token.issued_at, token.jti, renewed=False)
        self._reply(conn, self._prepared_reply(job, None))

    def _revoke_adopted(self, job: _Job) -> None:
        """Revoke an adopted job's mytoken by itself (recursively): the broker has no
        parent to name it by, and the payload never had it to copy."""
        from ._mytokenfile import MytokenSource, load_mytoken

        try:
            mytoken = load_mytoken(MytokenSource(path=job.store.mytoken))
        except JobtokenError:
            return  # never stored (refused before), or already revoked and removed
        self._client.revoke(mytoken, recursive=True)

    # --- end of a job -------------------------------------------------------------------------

    def _release(self, conn: _Conn, job: _Job) -> None:
        logger.info("release job=%s", job.job_id)
        self._end(job, "released")
        self._reply(conn, BrokerReply(True, 0, "released: the job mytoken is being revoked",
                                      job_id=job.job_id))

    def _end(self, job: _Job, reason: str) -> None:
        """The job is over: revoke what it had (persisted first), then forget it."""
        if job.busy:
            job.end_wanted = True
            return
        for conn, _ in job.waiters:
            self._reply(conn, reply_for_error(JobtokenError(f"job {job.job_id} ended"),
                                              job.job_id))
        job.waiters = []
        if job.phase == REGISTERED:
            self._forget(job)
            logger.info("job forgotten job=%s (%s)", job.job_id, reason)
            return
        if job.phase != ENDING:
            logger.info("job ended job=%s (%s): revoking its mytoken", job.job_id, reason)
            job.phase = ENDING
            self._persist(job)
        job.generation += 1  # no renewal from now on
        self._start_revocation(job)

    def _start_revocation(self, job: _Job) -> None:
        if job.busy:
            return
        self._submit(job, lambda: self._revoke_work(job),
                     lambda result, error: self._revoked(job, error))

    def _revoke_work(self, job: _Job) -> None:
        from ._prepare import parent_source_of, revoke_job_mytokens
        from ._renewal import revoke_by_mom_id

        if job.adopted:
            self._revoke_adopted(job)
            return
        spec = job.spec
        if spec is None:
            try:
                spec = job.store.read_spec()
            except JobtokenError:
                spec = None
        with self._parent_lock:
            if spec is not None and spec.mom_id:
                revoke_by_mom_id(self.config, str(parent_source_of(self.config).path),
                                 spec.mom_id, client=self._client)
            else:  # a prepare cut short: whatever was minted under the job's name
                revoke_job_mytokens(self.config, job.job_id, client=self._client)

    def _revoked(self, job: _Job, error: Optional[BaseException]) -> None:
        if error is not None and not isinstance(error, MytokenRejectedError):
            job.revoke_attempts += 1
            retry_after = error.retry_after_s if isinstance(error, MytokenError) else None
            delay = min(300.0, max(retry_after or 0.0, 2.0 ** min(job.revoke_attempts, 8)))
            logger.warning("job %s: revocation failed (attempt %d, retry in %.0f s): %s",
                           job.job_id, job.revoke_attempts, delay,
                           error.message if isinstance(error, JobtokenError) else error)
            self._schedule(job, time.time() + delay)
            return
        if error is not None:
            logger.warning("job %s: the server refused the revocation for good (%s); "
                           "nothing is left to revoke", job.job_id, error)
        else:
            logger.info("job mytoken revoked job=%s", job.job_id)
        if job.requeue and anchor_alive(job.identity.anchor):
            job.store.remove(secrets_only=True)
            job.phase, job.tokendir, job.dir_identity, job.spec = REGISTERED, None, None, None
            job.requeue = False
            self._persist(job)
            self._watch(job)
            return
        if job.tokendir and job.dir_identity:
            try:
                with open_job_directory(job.tokendir, job.identity.uid) as directory:
                    if directory.identity == job.dir_identity:
                        directory.remove(TOKEN_NAME)
            except JobtokenError:
                pass  # the directory went with the job
        self._forget(job)

    def _forget(self, job: _Job) -> None:
        self._unwatch(job)
        job.generation += 1
        problems = job.store.remove()
        try:
            os.unlink(job.store.path / BROKER_FILE)
            os.rmdir(job.store.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot remove {job.store.path}: {exc.strerror}")
        for problem in problems:
            if "No such file" not in problem:
                logger.warning("job %s: %s", job.job_id, problem)
        self.jobs.pop(job.job_id, None)
        self._job_locks.pop(job.job_id, None)
        forget = getattr(self.resolver, "forget", None)
        if forget is not None:
            forget(job.job_id)

    # --- anchors ------------------------------------------------------------------------------

    def _watch(self, job: _Job) -> None:
        """A pidfd for the anchor where the kernel has them (else ``_reconcile`` finds out)."""
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is None:
            return
        try:
            fd = pidfd_open(job.identity.anchor.pid)
        except OSError:
            return
        if not anchor_alive(job.identity.anchor):  # the pid was already another process
            os.close(fd)
            return
        job.pidfd = fd
        self._sel.register(fd, selectors.EVENT_READ, ("anchor", job.job_id))

    def _unwatch(self, job: _Job) -> None:
        if job.pidfd is not None:
            try:
                self._sel.unregister(job.pidfd)
            except (KeyError, ValueError):
                pass
            os.close(job.pidfd)
            job.pidfd = None

    def _anchor_ended(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        self._unwatch(job)
        if not anchor_alive(job.identity.anchor) and job.phase != ENDING:
            self._end(job, "anchor process ended")

    def _reconcile(self) -> None:
        for job in list(self.jobs.values()):
            if job.phase != ENDING and not anchor_alive(job.identity.anchor):
                self._end(job, "anchor process ended")

    # --- restart ------------------------------------------------------------------------------

    def _reload(self) -> None:
        """Load every job from the state directory: end the ended, reschedule the rest."""
        for entry in sorted(os.scandir(self.state_dir / "jobs"), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                job = self._load(Path(entry.path))
            except (JobtokenError, OSError, ValueError, KeyError, TypeError) as exc:
                logger.error("cannot reload %s (kept for an operator): %s", entry.path, exc)
                continue
            self.jobs[job.job_id] = job
            add = getattr(self.resolver, "add", None)
            if add is not None:
                try:
                    add(job.identity)
                except JobtokenError as exc:
                    logger.warning("job %s: %s", job.job_id, exc.message)
            if job.phase == PREPARING:  # cut short: what it minted may be live
                job.phase, job.requeue = ENDING, not job.adopted
                self._persist(job)
            if job.phase == ENDING or not anchor_alive(job.identity.anchor):
                self._end(job, "ended while the broker was down")
                continue
            self._watch(job)
            if job.phase == ACTIVE:
                self._resume(job)
        logger.info("reloaded %d job(s)", len(self.jobs))

    def _load(self, path: Path) -> _Job:
        data = json.loads((path / BROKER_FILE).read_text(encoding="utf-8"))
        identity = JobIdentity.from_dict(data["identity"])
        store = TokenDir(path)
        job = _Job(identity=identity, store=store, phase=str(data["phase"]),
                   tokendir=data.get("tokendir"), adopted=data.get("adopted") is True,
                   dir_identity=tuple(data["dir_identity"]) if data.get("dir_identity")
                   else None)  # type: ignore[arg-type]
        if job.phase in (ACTIVE, ENDING):
            try:
                job.spec = store.read_spec()
            except JobtokenError:
                if job.phase == ACTIVE:
                    job.phase = ENDING
        job.state = store.read_state() or RenewalState(job_id=identity.job_id)
        return job

    def _resume(self, job: _Job) -> None:
        now = time.time()
        st = job.state
        if st.expires_at is None or st.expires_at - now <= 0:
            self._schedule(job, now)
            return
        self._restore_job_token(job)
        at = st.next_attempt_at if st.next_attempt_at is not None else now
        self._schedule(job, min(at, st.expires_at))


class _Answered(Exception):
    """A waiter whose answer was already sent (or will be, by a renewal it started)."""


def serve(config: Config) -> int:
    """Run the broker until SIGTERM, SIGINT or SIGQUIT; jobs stay on disk for the next start.

    SIGQUIT too because ``condor_master`` sends it for a fast shutdown of a daemon in its
    ``DAEMON_LIST``: the broker then stops as cleanly as on SIGTERM instead of dying.
    """
    broker = Broker(config)
    broker.start()

    def on_signal(signum: int, frame: object) -> None:
        broker.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT,
                                                           signal.SIGQUIT)}
    try:
        broker.serve_forever()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        broker.close()
        logger.info("broker stopped")
    return 0

