"""jobtoken: keep WLCG bearer tokens alive inside grid batch jobs, from a Mytoken.

The public surface is this list; everything else lives in private modules. Heavy
dependencies are not imported here, so ``import jobtoken`` stays cheap.
"""

from __future__ import annotations

import logging

from ._errors import (
    ConfigError,
    CredentialLostError,
    ExitCode,
    JobtokenError,
    MytokenError,
    MytokenRejectedError,
    PayloadStartError,
    ProtocolError,
    ServerUnavailableError,
    TokenCheckError,
    TokenFileError,
    UsageError,
)
from ._version import version as __version__

__all__ = [
    "ConfigError",
    "CredentialLostError",
    "ExitCode",
    "JobtokenError",
    "MytokenError",
    "MytokenRejectedError",
    "PayloadStartError",
    "ProtocolError",
    "ServerUnavailableError",
    "TokenCheckError",
    "TokenFileError",
    "UsageError",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
