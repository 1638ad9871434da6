"""The job's side of the node broker: one request, one reply, over the broker's Unix socket.

Light on purpose (stdlib only, no httpx, jwt or cryptography): it runs in hooks and
payloads, where start-up time and memory are the job's. It sends no secret and gets
none back; the access token arrives as a file in the job's own directory.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping, Optional, Sequence

from ._brokerproto import MAX_REPLY_BYTES, BrokerReply, BrokerRequest
from ._config import DEFAULT_BROKER_SOCKET
from ._errors import ServerUnavailableError

__all__ = ["BrokerClient", "default_socket"]


def default_socket(env: Optional[Mapping[str, str]] = None) -> str:
    """``$JOBTOKEN_BROKER_SOCKET``, else the default ``/run/jobtoken/broker.sock``."""
    environ = os.environ if env is None else env
    return environ.get("JOBTOKEN_BROKER_SOCKET") or DEFAULT_BROKER_SOCKET


class BrokerClient:
    """Ask the node broker; each call returns its ``BrokerReply`` or raises.

    Raises (every call):
        ServerUnavailableError: the broker cannot be reached or did not answer within
            ``timeout_s`` (retryable: it may be restarting).
        ProtocolError: the answer was not a broker reply.
        JobtokenError: the broker refused; the subclass and exit code it chose
            (``IdentityError`` 67, ``MytokenRejectedError`` 77, ...).
    """

    def __init__(self, socket_path: Optional[str] = None, timeout_s: float = 60.0) -> None:
        self.socket_path = socket_path or default_socket()
        self.timeout_s = timeout_s

    def prepare(self, tokendir: str, scopes: Sequence[str] = (), audiences: Sequence[str] = ()
                ) -> BrokerReply:
        return self.call(BrokerRequest("prepare", tokendir=os.path.abspath(tokendir),
                                       scopes=tuple(scopes), audiences=tuple(audiences)))

    def adopt(self, tokendir: str, anchor_pid: Optional[int] = None) -> BrokerReply:
        """Hand the job mytoken in ``tokendir`` (stage 0 put it there) to the broker."""
        return self.call(BrokerRequest("adopt", tokendir=os.path.abspath(tokendir),
                                       anchor_pid=anchor_pid))

    def ensure(self, min_valid_s: float) -> BrokerReply:
        return self.call(BrokerRequest("ensure", min_valid_s=min_valid_s))

    def status(self, job_id: Optional[str] = None) -> BrokerReply:
        return self.call(BrokerRequest("status", job=None if job_id is None
                                       else {"job_id": job_id}))

    def release(self, job_id: Optional[str] = None) -> BrokerReply:
        return self.call(BrokerRequest("release", job=None if job_id is None
                                       else {"job_id": job_id}))

    def register(self, job: Mapping[str, Any]) -> BrokerReply:
        return self.call(BrokerRequest("register", job=dict(job)))

    def ping(self) -> BrokerReply:
        return self.call(BrokerRequest("ping"))

    def call(self, request: BrokerRequest) -> BrokerReply:
        reply = BrokerReply.from_json(self._exchange((request.to_json() + "\n").encode()))
        reply.raise_for_failure()
        return reply

    def _exchange(self, data: bytes) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.socket_path)
                sock.sendall(data)
                received = bytearray()
                while b"\n" not in received and len(received) <= MAX_REPLY_BYTES:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
            except socket.timeout:
                raise ServerUnavailableError(
                    f"the node broker at {self.socket_path} did not answer within "
                    f"{self.timeout_s:.0f} s") from None
            except OSError as exc:
                raise ServerUnavailableError(
                    f"cannot reach the node broker at {self.socket_path}: "
                    f"{exc.strerror or type(exc).__name__}", reached_server=False) from None
        finally:
            sock.close()
        line, newline, _ = bytes(received).partition(b"\n")
        if not newline:
            raise ServerUnavailableError(
                f"the node broker at {self.socket_path} closed the connection without an answer")
        return line
