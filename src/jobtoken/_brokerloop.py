"""The node broker's event loop: the socket, its connections, wake-ups, timers, watched fds.

Why: the broker serves every job of a node from one thread, so nothing here may block
on a client. A connection sends one request line (at most ``MAX_REQUEST_BYTES``, within
``REQUEST_TIMEOUT_S``) and gets one reply line; a slow, huge or garbled request gets one
error line and is closed. Work done on other threads hands its outcome back through
``post``, so only the loop's thread ever changes the broker's state.

What the requests mean is the ``LoopHandler``'s (``_broker.Broker``); this module knows
connections, timers and file descriptors, not jobs.

Must NOT call the Mytoken server, touch a job's files, or block: every socket is
non-blocking, and a handler that has to wait ``park``s the connection.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Protocol

from ._brokeridentity import PeerCred, peer_cred
from ._brokerproto import MAX_REQUEST_BYTES, BrokerReply, BrokerRequest, reply_for_error
from ._brokertimers import TimerHeap
from ._errors import ConfigError, ExitCode, JobtokenError, TokenFileError, UsageError

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_CONNECTIONS_PER_UID",
    "REQUEST_TIMEOUT_S",
    "Conn",
    "EventLoop",
    "LoopHandler",
    "check_socket_dir",
]

logger = logging.getLogger(__name__)

#: how long a client may take to send its request line
REQUEST_TIMEOUT_S = 5.0
#: connections open at once; more are answered with an error and closed at once
MAX_CONNECTIONS = 512
#: ... and per uid (root and the broker's own excepted): one user cannot crowd out the rest
MAX_CONNECTIONS_PER_UID = 64


@dataclass
class Conn:
    """One client connection: its kernel credentials, what it sent, what it is sent."""

    sock: socket.socket
    peer: PeerCred
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    out: bytes = b""
    waiting: bool = False  # a worker answers it


class LoopHandler(Protocol):
    """What the loop asks of the service it runs (all on the loop's thread)."""

    def dispatch(self, conn: Conn, request: BrokerRequest) -> None:
        """Answer ``request`` (``EventLoop.reply``) now, or park ``conn`` and answer later.

        Raises:
            JobtokenError: answered as one error line.
        """

    def trusted(self, peer: PeerCred) -> bool:
        """Whether ``peer`` is exempt from the per-uid connection limit."""

    def fire_timer(self, key: str, generation: int) -> Optional[float]:
        """A timer is due: None when done with it, else when to try it again."""

    def fd_ready(self, key: str) -> None:
        """A watched fd (``EventLoop.watch``) became readable."""

    def reconcile(self) -> None:
        """Every ``reconcile_s``: look for what no event told."""


def check_socket_dir(socket_path: str) -> None:
    """Make (0755) or check the socket's directory before anything else starts.

    Raises:
        ConfigError: someone else may write there, and so could put their own socket
            in the broker's place (clients would believe its answers).
    """
    parent = Path(socket_path).parent
    if not parent.exists():
        parent.mkdir(mode=0o755, parents=True)
    st = os.stat(parent)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"socket directory {parent} must be the broker's (or root's) "
                          "and not writable by others (0755)")


class EventLoop:
    """One selector over the listening socket, the connections, watched fds and a wake-up."""

    def __init__(self, socket_path: str, *, reconcile_s: float) -> None:
        self.socket_path = socket_path
        self.reconcile_s = reconcile_s
        self.timers = TimerHeap()
        self._conns: Dict[int, Conn] = {}
        self._posted: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._listener: Optional[socket.socket] = None
        self._next_reconcile = 0.0

    # --- start and stop -----------------------------------------------------------------------

    def listen(self) -> None:
        """Listen on ``socket_path``, replacing a dead broker's socket.

        Raises:
            TokenFileError: the socket cannot be bound.
        """
        path = Path(self.socket_path)
        try:
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode):
                os.unlink(path)  # a dead broker's socket (the caller holds the state lock)
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
        """Ask ``run`` to return (from any thread or a signal handler)."""
        self._stopping.set()
        self.wake()

    def stop_listening(self) -> None:
        """Remove the socket and drop every connection (workers may still ``post``)."""
        if self._listener is not None:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        for conn in list(self._conns.values()):
            self._drop(conn)

    def close(self) -> None:
        """Release the selector and the wake-up pair (after every worker is done)."""
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread (from a worker)."""
        self._posted.put(fn)
        self.wake()

    # --- watched fds --------------------------------------------------------------------------

    def watch(self, fd: int, key: str) -> None:
        """Call ``handler.fd_ready(key)`` when ``fd`` becomes readable (e.g. a pidfd)."""
        self._sel.register(fd, selectors.EVENT_READ, ("fd", key))

    def unwatch(self, fd: int) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    # --- the loop -----------------------------------------------------------------------------

    def run(self, handler: LoopHandler) -> None:
        """Serve until ``stop``; a bug in a posted callback is logged, never fatal."""
        while not self._stopping.is_set():
            self.timers.run_due(time.time(), handler.fire_timer)
            for key, events in self._sel.select(self._timeout()):
                kind, obj = key.data
                if kind == "listen":
                    self._accept(handler)
                elif kind == "wake":
                    self._drain_wake()
                elif kind == "conn":
                    self._on_conn(handler, obj, events)
                elif kind == "fd":
                    handler.fd_ready(obj)
            self._run_posted()
            self._expire_conns()
            now = time.time()
            if now >= self._next_reconcile:
                handler.reconcile()
                self._next_reconcile = now + self.reconcile_s

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _run_posted(self) -> None:
        while True:
            try:
                posted = self._posted.get_nowait()
            except queue.Empty:
                return
            try:
                posted()
            except Exception:  # a bug must not take every job's renewals down with it
                logger.exception("internal error in the broker loop")

    def _timeout(self) -> float:
        now = time.time()
        limit = min(self._next_reconcile, now + 1.0)
        next_timer = self.timers.next_at()
        if next_timer is not None:
            limit = min(limit, next_timer)
        if self._conns:
            limit = min(limit, now + 0.5)
        return max(0.0, limit - now)

    # --- connections --------------------------------------------------------------------------

    def _accept(self, handler: LoopHandler) -> None:
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
            conn = Conn(sock=sock, peer=peer, deadline=time.monotonic() + REQUEST_TIMEOUT_S)
            crowded = self._crowded(peer, handler)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, ("conn", conn))
            if crowded:
                self.reply(conn, BrokerReply(False, int(ExitCode.SERVER_UNAVAILABLE),
                                             "broker busy: too many connections",
                                             retryable=True))

    def _crowded(self, peer: PeerCred, handler: LoopHandler) -> bool:
        if len(self._conns) >= MAX_CONNECTIONS:
            return True
        same_uid = sum(1 for c in self._conns.values() if c.peer.uid == peer.uid)
        return same_uid >= MAX_CONNECTIONS_PER_UID and not handler.trusted(peer)

    def _on_conn(self, handler: LoopHandler, conn: Conn, events: int) -> None:
        if events & selectors.EVENT_WRITE and conn.out:
            self._flush(conn)
            return
        if conn.out or conn.waiting:
            return
        line = self._read_line(conn)
        if line is None:
            return
        try:
            handler.dispatch(conn, BrokerRequest.from_json(line))
        except Exception as exc:
            if not isinstance(exc, JobtokenError):
                logger.exception("internal error answering uid %d", conn.peer.uid)
            self.reply(conn, reply_for_error(exc))

    def _read_line(self, conn: Conn) -> Optional[bytes]:
        """The request line once complete; None meanwhile (or answered, or dropped)."""
        try:
            chunk = conn.sock.recv(MAX_REQUEST_BYTES + 1)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self._drop(conn)
            return None
        if not chunk:
            if conn.buf:
                self.reply(conn, reply_for_error(UsageError("incomplete request (no newline)")))
            else:
                self._drop(conn)
            return None
        conn.buf += chunk
        line, newline, _ = bytes(conn.buf).partition(b"\n")
        if newline:
            return line
        if len(conn.buf) > MAX_REQUEST_BYTES:
            self.reply(conn, reply_for_error(
                UsageError(f"request larger than {MAX_REQUEST_BYTES} bytes")))
        return None

    def _expire_conns(self) -> None:
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if conn.waiting or now < conn.deadline:
                continue
            if conn.out:
                self._drop(conn)  # a client that does not read its reply
            else:
                self.reply(conn, reply_for_error(UsageError(
                    f"no complete request within {REQUEST_TIMEOUT_S:.0f} s")))

    def park(self, conn: Conn) -> None:
        """A worker (or a busy job) answers ``conn`` later: stop watching it meanwhile, so a
        client that hangs up early cannot make the loop spin on its EOF."""
        conn.waiting = True
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def reply(self, conn: Conn, reply: BrokerReply) -> None:
        """Send ``reply`` (the rest when the client can take it), then close."""
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

    def _flush(self, conn: Conn) -> None:
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

    def _drop(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            self._conns.pop(fd, None)
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()
