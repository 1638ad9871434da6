"""Errors: one exception tree, and the one table that maps it to exit codes.

The library raises these and never exits; only ``cli.main`` (and the batch-system
adapters, which speak their own status language) turn them into exit codes. Every
message is one line and never contains a token or a mytoken.

Tree::

    JobtokenError                      exit 1 (only when no subclass fits)
    ├── UsageError                     exit 2   bad command line
    ├── ConfigError                    exit 78  bad config file, variable, mytoken file
    ├── MytokenError                            talking to the Mytoken server failed
    │   ├── MytokenRejectedError       exit 77  permanent: revoked, expired, restricted,
    │   │                                       missing capability, OP refused
    │   └── ServerUnavailableError     exit 75  transient: 5xx, 429, timeout, refused,
    │       └── ProtocolError          exit 76  garbage or incomplete response body
    ├── TokenCheckError                exit 65  access token refused by our checks
    ├── TokenFileError                 exit 74  reading or writing a token file failed
    ├── IdentityError                  exit 67  the node broker cannot tell which job the
    │                                           caller is, or the caller may not do this
    ├── CredentialLostError            exit 69  the job's token expired and could not
    │                                           be renewed; jobtoken stopped the payload
    └── PayloadStartError              exit 126 (cannot execute) / 127 (not found)
    (KeyboardInterrupt)                exit 130

Codes 64-78 follow BSD ``sysexits.h`` so that they do not collide with the small
codes payloads commonly use; ``retryable`` tells batch adapters whether a
retry (HTCondor: requeue) can help.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

_T = TypeVar("_T")

__all__ = [
    "ConfigError",
    "CredentialLostError",
    "ExitCode",
    "IdentityError",
    "JobtokenError",
    "MytokenError",
    "MytokenRejectedError",
    "PayloadStartError",
    "ProtocolError",
    "RenewalReport",
    "ServerUnavailableError",
    "TokenCheckError",
    "TokenFileError",
    "UsageError",
    "error_summary",
    "exit_code_for",
    "printable",
    "printable_values",
]


class ExitCode(enum.IntEnum):
    """Documented exit codes of every jobtoken command (README, "Exit codes")."""

    OK = 0
    ERROR = 1
    USAGE = 2
    TOKEN_CHECK = 65
    IDENTITY = 67
    CREDENTIAL_LOST = 69
    SERVER_UNAVAILABLE = 75
    PROTOCOL = 76
    MYTOKEN_REJECTED = 77
    FILE = 74
    CONFIG = 78
    CANNOT_EXECUTE = 126
    NOT_FOUND = 127
    INTERRUPTED = 130  # SIGINT (Ctrl-C), as a shell reports it


def printable(text: str) -> str:
    """Escape what would break the one-line promise or fool a terminal.

    The one escaping rule for anything a server, a token or a user chose and we
    print or log (error messages, ``sub``/``jti``/``mom_id`` in log lines, ``inspect``
    and ``status`` output): a carriage return, line feed or escape sequence must reach
    the log or terminal as text (``\\r``, ``\\n``, ``\\x1b``), not as an effect, so
    it can neither forge a line (HTCondor copies hook stderr into the StarterLog) nor
    drive the terminal.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_one_line = printable


def printable_values(data: Any) -> Any:
    """``data`` with :func:`printable` applied to every string in it, keys included."""
    if isinstance(data, str):
        return printable(data)
    if isinstance(data, dict):
        return {printable_values(k): printable_values(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(printable_values(v) for v in data)
    return data


class JobtokenError(Exception):
    """Root of every error jobtoken raises on purpose."""

    exit_code: ExitCode = ExitCode.ERROR
    retryable: bool = False

    def __init__(self, message: str, *, retryable: Optional[bool] = None) -> None:
        super().__init__(_one_line(message))
        if retryable is not None:
            self.retryable = retryable

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class UsageError(JobtokenError):
    exit_code = ExitCode.USAGE


class ConfigError(JobtokenError):
    exit_code = ExitCode.CONFIG


class MytokenError(JobtokenError):
    """A Mytoken server call failed; carries what the server said, if anything."""

    exit_code = ExitCode.MYTOKEN_REJECTED

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        error: Optional[str] = None,
        error_description: Optional[str] = None,
        url: Optional[str] = None,
        retry_after_s: Optional[float] = None,
        retryable: Optional[bool] = None,
        reached_server: Optional[bool] = None,
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.status = status
        self.error = error
        self.error_description = error_description
        self.url = url
        self.retry_after_s = retry_after_s
        # False: the request never left (connection refused or timed out while
        # connecting), so the server cannot have acted on it; None: not known.
        self.reached_server = reached_server


class MytokenRejectedError(MytokenError):
    """The server refused the mytoken or the request; retrying will not help."""

    exit_code = ExitCode.MYTOKEN_REJECTED
    retryable = False


class ServerUnavailableError(MytokenError):
    """The server could not answer now (5xx, 429, network, timeout)."""

    exit_code = ExitCode.SERVER_UNAVAILABLE
    retryable = True


class ProtocolError(ServerUnavailableError):
    """The server answered, but not with what the Mytoken API promises."""

    exit_code = ExitCode.PROTOCOL


class TokenCheckError(JobtokenError):
    """An access token failed our checks (expired, wrong scope or audience, unsigned)."""

    exit_code = ExitCode.TOKEN_CHECK


class TokenFileError(JobtokenError):
    """A token or mytoken file could not be read or written safely."""

    exit_code = ExitCode.FILE


class IdentityError(JobtokenError):
    """The node broker cannot tell which job the caller is, or that job may not do this.

    Raised from what the kernel says about the caller (``SO_PEERCRED``, ``/proc``) and
    from what a trusted source registered, never from anything the caller claims.
    Exit 67 (``EX_NOUSER``): "no such job here", which retrying will not mend.
    """

    exit_code = ExitCode.IDENTITY


class CredentialLostError(JobtokenError):
    """The job's access token ran out and renewal kept failing."""

    exit_code = ExitCode.CREDENTIAL_LOST


class PayloadStartError(JobtokenError):
    """The payload could not be started (126: not executable, 127: not found)."""

    exit_code = ExitCode.CANNOT_EXECUTE

    def __init__(self, message: str, *, not_found: bool = False) -> None:
        super().__init__(message)
        if not_found:
            self.exit_code = ExitCode.NOT_FOUND


def exit_code_for(error: BaseException) -> int:
    """The documented exit code for an error; 1 for anything we did not foresee."""
    if isinstance(error, JobtokenError):
        return int(error.exit_code)
    if isinstance(error, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.ERROR)


def error_summary(error: BaseException) -> Dict[str, Any]:
    """What anyone may see of a failure, as JSON-ready data (never a secret).

    The one shape for a failure crossing a boundary: the object ``--json`` commands
    print instead of their result, and the report line of a failed renewal child
    (``RenewalReport.failure``). ``error`` is the one-line message; for an exception we
    did not foresee only its class name (its text may hold anything).
    """
    if isinstance(error, JobtokenError):
        message = error.message
    elif isinstance(error, KeyboardInterrupt):
        message = "interrupted"
    else:
        message = type(error).__name__
    data: Dict[str, Any] = {
        "ok": False,
        "error": message,
        "error_type": type(error).__name__,
        "retryable": bool(getattr(error, "retryable", False)),
        "exit_code": exit_code_for(error),
    }
    if isinstance(error, MytokenError):
        data.update(status=error.status, oauth_error=error.error,
                    retry_after_s=error.retry_after_s)
    return data


@dataclass(frozen=True)
class RenewalReport:
    """The outcome of one renewal (or revocation) child, as the waiting process sees it.

    The child (``_renewal``) prints it as one JSON line and exits with ``exit_code``;
    the sidecar, ``run`` and ``ensure`` read it back with ``from_child``. It never holds
    a secret: only what may be logged (expiry, ``jti``, subject, scopes) or the error.
    It lives next to the error tree because a failed report *is* an error carried
    across a process boundary: ``failure`` flattens one, ``raise_for_failure`` rebuilds it.
    """

    ok: bool
    reused: bool = False
    revoked: bool = False
    expires_at: Optional[float] = None
    issued_at: Optional[float] = None
    jti: Optional[str] = None
    subject: Optional[str] = None
    scopes: Tuple[str, ...] = ()
    audiences: Tuple[str, ...] = ()
    error: Optional[str] = None
    error_type: Optional[str] = None
    retryable: bool = False
    exit_code: int = int(ExitCode.OK)
    status: Optional[int] = None
    oauth_error: Optional[str] = None
    retry_after_s: Optional[float] = None

    @classmethod
    def failure(cls, exc: BaseException) -> RenewalReport:
        """The report of a child that failed with ``exc`` (anything, not only ours)."""
        return cls._from_dict(error_summary(exc))

    @classmethod
    def from_child(cls, stdout: bytes, returncode: int) -> RenewalReport:
        """Read the child's last output line; a crash or garbage is a retryable failure."""
        lines = stdout.decode("utf-8", "replace").strip().splitlines()
        try:
            data = json.loads(lines[-1]) if lines else None
            if isinstance(data, dict):
                report = cls._from_dict(data)
                if (report.expires_at is not None or not report.ok
                        or "revoked" in data or report.reused):
                    # not a success that forgot to say until when; a revocation says
                    # whether it revoked (False: nothing was left to revoke)
                    return report
        except (ValueError, TypeError):
            pass
        return cls.failure(
            JobtokenError(
                f"renewal process ended with status {returncode} and no report", retryable=True
            )
        )

    @classmethod
    def _from_dict(cls, data: Dict[str, Any]) -> RenewalReport:
        ok = data.get("ok") is True
        status = data.get("status")
        report = cls(
            ok=ok,
            reused=bool(data.get("reused")),
            revoked=bool(data.get("revoked")),
            expires_at=_optional(float, data.get("expires_at")),
            issued_at=_optional(float, data.get("issued_at")),
            jti=_optional(str, data.get("jti")),
            subject=_optional(str, data.get("sub")),
            scopes=tuple(str(s) for s in data.get("scopes") or ()),
            audiences=tuple(str(a) for a in data.get("audiences") or ()),
            error=_optional(str, data.get("error")),
            error_type=_optional(str, data.get("error_type")),
            retryable=bool(data.get("retryable")),
            exit_code=int(data.get("exit_code", ExitCode.OK if ok else ExitCode.ERROR)),
            status=None if status is None else int(status),
            oauth_error=_optional(str, data.get("oauth_error")),
            retry_after_s=_optional(float, data.get("retry_after_s")),
        )
        return report

    def to_json(self) -> str:
        """The one line the child prints (the wire names ``sub``/``oauth_error`` kept)."""
        if self.ok:
            data: Dict[str, Any] = {"ok": True}
            if self.expires_at is not None:
                data.update(
                    reused=self.reused, expires_at=self.expires_at, issued_at=self.issued_at,
                    jti=self.jti, sub=self.subject, scopes=list(self.scopes),
                    audiences=list(self.audiences),
                )
            else:
                data["revoked"] = self.revoked
            return json.dumps(data)
        data = {
            "ok": False, "error": self.error, "error_type": self.error_type,
            "retryable": self.retryable, "exit_code": self.exit_code,
        }
        if self.status is not None or self.oauth_error is not None or self.retry_after_s:
            data.update(
                status=self.status, oauth_error=self.oauth_error, retry_after_s=self.retry_after_s
            )
        return json.dumps(data)

    @property
    def permanent(self) -> bool:
        """A failure no retry can mend: a refused mytoken, bad config, a missing file.

        A refused access token (the next one may pass our checks) and a token file that
        could not be written (a full disk may drain) are retried although not
        ``retryable`` in the exit-code sense.
        """
        return (
            not self.ok
            and not self.retryable
            and self.error_type not in ("TokenCheckError", "TokenFileError")
        )

    def raise_for_failure(self) -> None:
        """Re-raise the child's error here, same class and documented exit code.

        Raises:
            JobtokenError: (or the subclass the child raised) when not ``ok``.
        """
        if self.ok:
            return
        cls = globals().get(str(self.error_type))
        if not (isinstance(cls, type) and issubclass(cls, JobtokenError)):
            cls = JobtokenError
        error = cls(self.error or "renewal failed")
        try:
            error.exit_code = ExitCode(self.exit_code)
        except ValueError:
            error.exit_code = ExitCode.ERROR
        error.retryable = self.retryable
        raise error


def _optional(kind: Callable[[Any], _T], value: Any) -> Optional[_T]:
    return None if value is None else kind(value)
