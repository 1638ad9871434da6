"""The node broker's ``adopt``: take over a job mytoken that was minted elsewhere.

On an ARC-CE the job mytoken is minted on the CE (stage 0) and travels to the worker
node inside the session directory. Stage 1 then hands it to the node broker, which
takes it out of the directory before the payload starts: from then on the payload can
read its access token but no mytoken, as on a node where the broker minted the job's.

What the job hands in is the job's own data, so nothing in it widens what the job
gets: the broker reads ``mytoken`` and ``job.json`` through the directory's dirfd
(never by path, never through a link), keeps only the job id, scopes, audiences and
end from ``job.json`` (the server, the renewal settings and the wall-time cap are the
broker's own), checks the scopes and audiences against the site's limits, and names the
job ``arc:<job id>`` so an adopted id never meets one a trusted caller registered.

Pure policy and dirfd I/O; the broker's loop calls these.
"""

from __future__ import annotations

import time
from typing import List, Optional

from ._config import Config
from ._errors import ConfigError, MytokenRejectedError, TokenFileError
from ._mytokenfile import check_mytoken_value
from ._scopes import scopes_within
from ._tokendir import JobRecord, TokenDir
from ._tokenfile import JobDirectory

__all__ = ["ADOPTED_PREFIX", "adopted_job_id", "adopted_record", "clear_mytokens",
           "hardlinked", "read_mytoken", "read_record"]

#: an adopted job's id at the broker: the job names itself, so it gets a namespace of its own
ADOPTED_PREFIX = "arc:"
#: a job.json or a mytoken larger than this is not one (and is not read further)
MAX_FILE_BYTES = 64 * 1024
MYTOKEN = "mytoken"
JOB_FILE = "job.json"


def read_record(directory: JobDirectory) -> JobRecord:
    """The job's ``job.json``, read through ``directory``'s dirfd.

    Raises:
        TokenFileError: missing, a link, not the job's, too large;
        ConfigError: not a job file.
    """
    raw, _ = directory.read_own(JOB_FILE, MAX_FILE_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{directory.path}/{JOB_FILE} is not UTF-8 text") from None
    return JobRecord.from_json(text, f"{directory.path}/{JOB_FILE}")


def read_mytoken(directory: JobDirectory) -> str:
    """The job mytoken, read through ``directory``'s dirfd.

    The file must have one link: a hardlink elsewhere would be a copy of the mytoken
    outside the broker's reach, so such a job is refused (and ``hardlinked(error)``
    gives the mytoken, for the caller to revoke).

    Raises:
        TokenFileError: missing, a symlink, not the job's, too large, hardlinked;
        MytokenRejectedError: the file holds no mytoken.
    """
    raw, links = directory.read_own(MYTOKEN, MAX_FILE_BYTES)
    try:
        mytoken = check_mytoken_value(raw.decode("ascii"), f"{directory.path}/{MYTOKEN}")
    except (UnicodeDecodeError, ConfigError) as exc:
        reason = exc.message if isinstance(exc, ConfigError) else "not ASCII text"
        raise MytokenRejectedError(f"the job's mytoken is unusable: {reason}") from None
    if links != 1:
        raise _Hardlinked(f"{directory.path}/{MYTOKEN} has {links} links (a copy lives "
                          "elsewhere): refused, and the job mytoken revoked", mytoken)
    return mytoken


class _Hardlinked(TokenFileError):
    """A mytoken the broker read but must not keep (the caller revokes it)."""

    def __init__(self, message: str, mytoken: str) -> None:
        super().__init__(message)
        self.mytoken = mytoken


def hardlinked(error: BaseException) -> Optional[str]:
    """The mytoken a refused ``read_mytoken`` read (to revoke it), if it read one."""
    return error.mytoken if isinstance(error, _Hardlinked) else None


def adopted_job_id(record: JobRecord) -> str:
    """The broker's id for an adopted job (``arc:<the job id in job.json>``)."""
    return f"{ADOPTED_PREFIX}{record.job_id}"[:200]


def adopted_record(config: Config, asked: JobRecord, server_url: str,
                   now: Optional[float] = None) -> JobRecord:
    """The broker's ``job.json`` for an adopted job: the job's scopes, audiences and end,
    the broker's server and renewal settings.

    Raises:
        ConfigError: the job mytoken is for another server than the broker's (the CE's
            and the node's configurations disagree);
        MytokenRejectedError: the job asks for scopes or audiences the site does not
            allow (``site.allowed_scopes`` / ``allowed_audiences``, when set).
    """
    if asked.server_url.rstrip("/") != server_url.rstrip("/"):
        raise ConfigError(f"the job mytoken is for {asked.server_url}; this broker serves "
                          f"{server_url}")
    site = config.site
    wider = scopes_within(asked.scopes, site.allowed_scopes) if site.allowed_scopes else ()
    if wider:
        raise MytokenRejectedError(f"job {asked.job_id} asks for {' '.join(wider)}, more "
                                   "than the site allows")
    extra = [a for a in asked.audiences if site.allowed_audiences
             and a not in site.allowed_audiences]
    if extra:
        raise MytokenRejectedError(f"job {asked.job_id} asks for audience {' '.join(extra)}, "
                                   "not one the site allows")
    start = time.time() if now is None else now
    end = start + site.max_walltime_s + site.walltime_slack_s
    if asked.job_end_at is not None:
        end = min(end, asked.job_end_at)
    return JobRecord.from_config(
        config, job_id=asked.job_id, server_url=server_url, mytoken_path=MYTOKEN,
        scopes=asked.scopes, audiences=asked.audiences, job_end_at=end, mytoken_owned=True,
        remove_dir_at_end=False, mom_id=None)


def clear_mytokens(directory: JobDirectory) -> List[str]:
    """Unlink every mytoken jobtoken may have left in the job's directory (the job
    mytoken, a parent copy, a writer's temporary files); returns what was removed."""
    secrets = tuple(n for n in TokenDir.SECRETS if n != "bt")
    removed = []
    for name in directory.names():
        temp = name.startswith(".") and name.endswith(".tmp") and any(
            name.startswith(f".{s}.") for s in secrets)
        if (name in secrets or temp) and directory.remove(name):
            removed.append(name)
    return removed
