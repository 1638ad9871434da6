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
    ├── CredentialLostError            exit 69  the job's token expired and could not
    │                                           be renewed; jobtoken stopped the payload
    └── PayloadStartError              exit 126 (cannot execute) / 127 (not found)

Codes 64-78 follow BSD ``sysexits.h`` so that they do not collide with the small
codes payloads commonly use; ``retryable`` tells batch adapters whether a
retry (HTCondor: requeue) can help.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Optional

__all__ = [
    "ConfigError",
    "CredentialLostError",
    "ExitCode",
    "JobtokenError",
    "MytokenError",
    "MytokenRejectedError",
    "PayloadStartError",
    "PrintableFilter",
    "ProtocolError",
    "ServerUnavailableError",
    "TokenCheckError",
    "TokenFileError",
    "UsageError",
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
    CREDENTIAL_LOST = 69
    SERVER_UNAVAILABLE = 75
    PROTOCOL = 76
    MYTOKEN_REJECTED = 77
    FILE = 74
    CONFIG = 78
    CANNOT_EXECUTE = 126
    NOT_FOUND = 127


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


class PrintableFilter(logging.Filter):
    """A handler filter that applies :func:`printable` to each record's message.

    Every handler jobtoken installs carries it, so a server value logged anywhere (a
    ``sub`` with a CR/LF that would forge a "job mytoken revoked" line) stays one line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = printable(message), None
        return True


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
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.status = status
        self.error = error
        self.error_description = error_description
        self.url = url
        self.retry_after_s = retry_after_s


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
    return int(ExitCode.ERROR)
