"""The "revocation pending" record: a job mytoken that is still live after the job ended.

The sidecar revokes the job mytoken when the job ends, but the server may refuse to
answer just then (a rate limit that any local user can trip, an outage). Logging the
job as cleaned up would be a lie, and the job mytoken would live on unnoticed until its
``exp``. So a failed revocation leaves this record next to the kept mytoken file, for
whoever can retry later (``jobtoken revoke``, the HTCondor exit hook, ARC stage 2, the
node broker) and for ``jobtoken status``. It holds no secret: the job, the ``mom_id``
(which revokes through the parent), since when, and the last error.

This module must NOT import httpx or jwt (the sidecar imports it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Optional

from ._errors import ConfigError, JobtokenError
from ._formats import known_part, stamp
from ._tokendir import TokenDir

__all__ = ["PendingRevocation", "clear_pending", "read_pending", "write_pending"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class PendingRevocation:
    """Why and since when a job mytoken waits to be revoked (no secret)."""

    job_id: str
    mom_id: Optional[str]
    since: float
    attempts: int
    error: str


def write_pending(tokendir: TokenDir, record: PendingRevocation) -> None:
    """Write the record (0600, atomically, never through a link); a failure is logged."""
    from ._tokenfile import write_secret_file

    try:
        write_secret_file(tokendir.pending_revocation,
                          json.dumps(stamp("revoke.pending", asdict(record))))
    except JobtokenError as exc:
        logger.warning("cannot write %s: %s", tokendir.pending_revocation, exc.message)


def read_pending(tokendir: TokenDir) -> Optional[PendingRevocation]:
    """The record, if there is a readable one (of this, an older or a newer-minor format).

    Raises:
        ConfigError: a record of a newer major format: not knowing what it asks for,
            this version must not act as if there were none.
    """
    from dataclasses import fields

    from ._tokenfile import read_secret_file

    path = tokendir.pending_revocation
    if not path.exists():
        return None
    try:
        data = json.loads(read_secret_file(path))
        if not isinstance(data, dict):
            return None
        data = known_part("revoke.pending", data, {f.name for f in fields(PendingRevocation)},
                          str(path))
        return PendingRevocation(
            job_id=str(data["job_id"]),
            mom_id=None if data.get("mom_id") is None else str(data["mom_id"]),
            since=float(data["since"]),
            attempts=int(data["attempts"]),
            error=str(data["error"]),
        )
    except ConfigError:
        raise
    except (JobtokenError, ValueError, KeyError, TypeError):
        return None


def clear_pending(tokendir: TokenDir) -> None:
    """Remove the record once the server said the job mytoken is revoked."""
    from ._tokenfile import remove_secret_file

    try:
        remove_secret_file(tokendir.pending_revocation)
    except JobtokenError as exc:
        logger.warning("cannot remove %s: %s", tokendir.pending_revocation, exc.message)
