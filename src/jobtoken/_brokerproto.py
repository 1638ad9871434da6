"""The node broker's wire protocol: one JSON request and one JSON reply per connection.

Over a Unix stream socket: the client sends one line (a JSON object, at most
``MAX_REQUEST_BYTES`` with its newline), the broker answers one line and closes. One
exchange per connection keeps both ends simple and lets the broker read the caller's
credentials (``SO_PEERCRED``) once per request. Every object carries ``"v": 1``; keys
a side does not know are ignored, so either side can grow fields without breaking the
other. A reply never carries a token or a mytoken: the access token reaches the job as
a file in its own directory, the mytokens never leave the broker.

Pure: values and their (de)serialisation only; no socket, no file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from ._errors import (
    ConfigError,
    ExitCode,
    IdentityError,
    JobtokenError,
    MytokenRejectedError,
    ProtocolError,
    ServerUnavailableError,
    TokenCheckError,
    TokenFileError,
    UsageError,
    printable,
)

__all__ = [
    "MAX_REQUEST_BYTES",
    "OPS",
    "PROTOCOL_VERSION",
    "BrokerReply",
    "BrokerRequest",
    "reply_for_error",
]

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 64 * 1024
OPS = ("prepare", "ensure", "status", "release", "register", "ping", "adopt")

# the fields of a ``register`` job object (what a trusted caller may say about a job)
JOB_FIELDS = ("job_id", "uid", "owner", "anchor_pid", "walltime_s", "vo", "scopes", "audiences")


def _decode(line: bytes, what: str, error: type) -> Dict[str, Any]:
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise error(f"{what} is not one line of JSON") from None
    if not isinstance(data, dict):
        raise error(f"{what} is not a JSON object")
    version = data.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise error(f"{what} has protocol version {printable(str(version))}, not "
                    f"{PROTOCOL_VERSION}")
    return data


def _strings(value: Any, what: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"request field {what} must be a list of strings")
    return tuple(value)


def _number(value: Any, what: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 <= value < 1e12):
        raise UsageError(f"request field {what} must be a number of seconds >= 0")
    return float(value)


@dataclass(frozen=True)
class BrokerRequest:
    """What a client asks; ``job`` only for ``register`` (and a trusted ``release``);
    ``anchor_pid`` only for ``adopt`` (the process whose end is the job's end: the
    caller or one of its ancestors; None: the caller's parent)."""

    op: str
    tokendir: Optional[str] = None
    min_valid_s: Optional[float] = None
    scopes: Tuple[str, ...] = ()
    audiences: Tuple[str, ...] = ()
    job: Optional[Mapping[str, Any]] = None
    anchor_pid: Optional[int] = None

    def to_json(self) -> str:
        data: Dict[str, Any] = {"v": PROTOCOL_VERSION, "op": self.op}
        if self.tokendir is not None:
            data["tokendir"] = self.tokendir
        if self.min_valid_s is not None:
            data["min_valid_s"] = self.min_valid_s
        if self.scopes:
            data["scopes"] = list(self.scopes)
        if self.audiences:
            data["audiences"] = list(self.audiences)
        if self.job is not None:
            data["job"] = dict(self.job)
        if self.anchor_pid is not None:
            data["anchor_pid"] = self.anchor_pid
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, line: bytes) -> BrokerRequest:
        """Parse one request line.

        Raises:
            UsageError: not JSON, another version, an unknown op, or a field of the
                wrong type (the broker answers it with exit 2 and closes).
        """
        if len(line) > MAX_REQUEST_BYTES:
            raise UsageError(f"request larger than {MAX_REQUEST_BYTES} bytes")
        data = _decode(line, "request", UsageError)
        op = data.get("op")
        if op not in OPS:
            raise UsageError(f"unknown op {printable(str(op))[:40]!r} (one of {', '.join(OPS)})")
        tokendir = data.get("tokendir")
        if tokendir is not None and not isinstance(tokendir, str):
            raise UsageError("request field tokendir must be a string")
        job = data.get("job")
        if job is not None and not isinstance(job, dict):
            raise UsageError("request field job must be an object")
        anchor_pid = data.get("anchor_pid")
        if anchor_pid is not None and (isinstance(anchor_pid, bool)
                                       or not isinstance(anchor_pid, int) or anchor_pid <= 1):
            raise UsageError("request field anchor_pid must be a pid > 1")
        return cls(
            op=op,
            tokendir=tokendir,
            min_valid_s=_number(data.get("min_valid_s"), "min_valid_s"),
            scopes=_strings(data.get("scopes"), "scopes"),
            audiences=_strings(data.get("audiences"), "audiences"),
            job=job,
            anchor_pid=anchor_pid,
        )


@dataclass(frozen=True)
class BrokerReply:
    """The broker's answer: an outcome and non-secret facts, never a token."""

    ok: bool
    exit_code: int
    message: str
    expires_at: Optional[float] = None
    bearer_token_file: Optional[str] = None
    job_id: Optional[str] = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    retryable: bool = False

    def to_json(self) -> str:
        data: Dict[str, Any] = {
            "v": PROTOCOL_VERSION, "ok": self.ok, "exit_code": self.exit_code,
            "message": self.message, "retryable": self.retryable,
        }
        for key in ("expires_at", "bearer_token_file", "job_id"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.detail:
            data["detail"] = dict(self.detail)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, line: bytes) -> BrokerReply:
        """Parse the broker's one reply line.

        Raises:
            ProtocolError: not a reply this client understands (retryable: a broker
                being restarted or replaced may answer properly next time).
        """
        data = _decode(line, "broker reply", ProtocolError)
        ok, code, message = data.get("ok"), data.get("exit_code"), data.get("message")
        if not isinstance(ok, bool) or isinstance(code, bool) or not isinstance(code, int) \
                or not isinstance(message, str):
            raise ProtocolError("broker reply lacks ok, exit_code or message")
        expires = data.get("expires_at")
        detail = data.get("detail")
        return cls(
            ok=ok,
            exit_code=code,
            message=message,
            expires_at=float(expires) if isinstance(expires, (int, float))
            and not isinstance(expires, bool) else None,
            bearer_token_file=_optional_text(data.get("bearer_token_file")),
            job_id=_optional_text(data.get("job_id")),
            detail=detail if isinstance(detail, dict) else {},
            retryable=data.get("retryable") is True,
        )

    def raise_for_failure(self) -> None:
        """Raise the failure as the ``JobtokenError`` with the broker's exit code.

        Raises:
            JobtokenError: when not ``ok`` (its ``exit_code`` and ``retryable`` are the
                broker's, so the client's exit status is the one the broker chose).
        """
        if self.ok:
            return
        cls = _ERROR_FOR_CODE.get(self.exit_code, JobtokenError)
        error = cls(self.message or "the broker refused", retryable=self.retryable)
        try:
            error.exit_code = ExitCode(self.exit_code)
        except ValueError:
            error.exit_code = ExitCode.ERROR
        raise error


# a failure reply's exit code -> the error class a client raises (the inverse of _errors)
_ERROR_FOR_CODE: Dict[int, Any] = {
    int(cls.exit_code): cls
    for cls in (UsageError, ConfigError, MytokenRejectedError, ServerUnavailableError,
                ProtocolError, TokenCheckError, TokenFileError, IdentityError)
}


def _optional_text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def reply_for_error(error: BaseException, job_id: Optional[str] = None) -> BrokerReply:
    """The one-line failure reply for ``error`` (an unforeseen one says only its type)."""
    if isinstance(error, JobtokenError):
        return BrokerReply(ok=False, exit_code=int(error.exit_code), message=error.message,
                           job_id=job_id, retryable=bool(error.retryable))
    return BrokerReply(ok=False, exit_code=int(ExitCode.ERROR), job_id=job_id,
                       message=f"internal error in the broker ({type(error).__name__})")
