"""The job's private token directory: its layout, its settings file, its state file.

Layout (one directory per job, 0700)::

    mytoken      the job mytoken (0600); never exported to the payload
    bt           the access token; $BEARER_TOKEN_FILE points here
    job.json     non-secret settings the renewal needs (server, scopes, audience, ...)
    state.json   non-secret status: exp, renewals, failures, next attempt
    sidecar.lock held (flock) by the one sidecar of this directory
    sidecar.log  the sidecar's log (never a token)
    renew.lock   serialises renewals (sidecar and ``jobtoken ensure``)
    discovery.json  the server's discovery document, cached for the renewal child
    parent.mytoken  HTCondor's copy of the parent mytoken (integrations/condor.py)

Every name lives here (``TokenDir.NAMES``) so that cleanup cannot miss one: a file left
over keeps the directory, and ARC stages the session directory out with it.

A directory rather than a single file, so it can be bind-mounted into containers:
a bind-mounted file keeps its old inode after the atomic rename.

This module stays light (stdlib only): the waiting sidecar imports it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ._config import Config
from ._errors import ConfigError, JobtokenError, TokenFileError
from ._formats import known_part, merged, stamp
from ._tokenfile import ensure_private_dir, write_secret_file

if TYPE_CHECKING:  # imported when used: jwt stays out of the waiting sidecar
    from ._tokens import AccessToken

__all__ = ["JobRecord", "RenewalState", "TokenDir", "acquire_lock"]


@dataclass(frozen=True)
class JobRecord:
    """What the renewal of one job needs to know; stored as ``job.json``."""

    job_id: str
    server_url: str
    mytoken_path: str
    scopes: Tuple[str, ...] = ()
    audiences: Tuple[str, ...] = ()
    ca_file: Optional[str] = None
    ca_dir: Optional[str] = None
    allow_http: bool = False
    timeout_s: float = 10.0
    trusted_issuers: Tuple[str, ...] = ()
    job_end_at: Optional[float] = None
    mytoken_owned: bool = False  # minted for this job: revoke and delete at the end
    revoke_at_end: bool = True
    remove_dir_at_end: bool = False
    fraction: float = 2.0 / 3.0
    margin_s: float = 300.0
    max_backoff_s: float = 300.0
    on_failure: str = "keep"
    warn_signal: Optional[str] = None
    warn_before_s: float = 120.0
    stop_grace_s: float = 30.0
    metrics_dir: Optional[str] = None
    log_json: bool = False
    mom_id: Optional[str] = None

    def to_json(self) -> str:
        return json.dumps(stamp("job.json", dataclasses.asdict(self)), sort_keys=True)

    @classmethod
    def from_config(cls, config: Config, **job: Any) -> JobRecord:
        """A spec with the server and renewal settings of ``config`` and the job's own
        fields (``job_id``, ``server_url``, ``mytoken_path``, scopes, ...) as given."""
        server, renewal = config.server, config.renewal
        settings: Dict[str, Any] = dict(
            ca_file=server.ca_file,
            ca_dir=server.ca_dir,
            allow_http=server.allow_http,
            timeout_s=server.timeout_s,
            trusted_issuers=config.token.trusted_issuers,
            fraction=renewal.fraction,
            margin_s=renewal.margin_s,
            max_backoff_s=renewal.max_backoff_s,
            on_failure=renewal.on_failure,
            warn_signal=renewal.warn_signal,
            warn_before_s=renewal.warn_before_s,
            stop_grace_s=renewal.stop_grace_s,
            metrics_dir=renewal.metrics_dir,
            log_json=renewal.log_json,
            revoke_at_end=renewal.revoke_at_end,
        )
        settings.update(job)
        return cls(**settings)

    @classmethod
    def from_json(cls, text: str, where: str) -> JobRecord:
        """Read a ``job.json`` of this or an older format, or a newer minor (``_formats``).

        Raises:
            ConfigError: not a job file, or one of a newer major format.
        """
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            data = known_part("job.json", data, {f.name for f in dataclasses.fields(cls)}, where)
            for key in ("scopes", "audiences", "trusted_issuers"):
                if key in data:
                    data[key] = tuple(data[key])
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where} is not a valid jobtoken job file: {exc}") from exc


@dataclass
class RenewalState:
    """The sidecar's view of the token; stored as ``state.json`` (no secrets)."""

    job_id: str = ""
    expires_at: Optional[float] = None
    issued_at: Optional[float] = None
    jti: Optional[str] = None
    subject: Optional[str] = None
    scopes: Tuple[str, ...] = ()
    audiences: Tuple[str, ...] = ()
    renewals: int = 0
    failures_total: int = 0
    consecutive_failures: int = 0
    last_success_at: Optional[float] = None
    last_attempt_at: Optional[float] = None
    last_error: Optional[str] = None
    last_error_permanent: bool = False
    next_attempt_at: Optional[float] = None
    warned: bool = False
    credential_lost: bool = False
    sidecar_pid: Optional[int] = None
    payload_pid: Optional[int] = None
    finished: bool = False
    updated_at: Optional[float] = None

    def to_json(self) -> str:
        return json.dumps(stamp("state.json", dataclasses.asdict(self)), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], where: str = "state.json") -> RenewalState:
        """The state from a ``state.json`` of this, an older or a newer-minor format
        (the files before formats said ``"version": 1``).

        Raises:
            ConfigError: a newer major format; TypeError: a value of the wrong kind.
        """
        clean = known_part("state.json", data, {f.name for f in dataclasses.fields(cls)},
                           where, legacy_keys={"version"})
        for key in ("scopes", "audiences"):
            if key in clean:
                clean[key] = tuple(clean[key])
        return cls(**clean)


@dataclass(frozen=True)
class TokenDir:
    path: Path

    #: every file jobtoken may create in a token directory; secrets first
    SECRETS = ("mytoken", "bt", "parent.mytoken")
    NAMES = SECRETS + ("job.json", "state.json", "sidecar.lock", "sidecar.log", "renew.lock",
                       "discovery.json", "revoke.pending")

    @property
    def mytoken(self) -> Path:
        return self.path / "mytoken"

    @property
    def bearer_token(self) -> Path:
        return self.path / "bt"

    @property
    def job_file(self) -> Path:
        return self.path / "job.json"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.path / "sidecar.lock"

    @property
    def log_file(self) -> Path:
        return self.path / "sidecar.log"

    @property
    def renew_lock(self) -> Path:
        return self.path / "renew.lock"

    @property
    def metadata_file(self) -> Path:
        return self.path / "discovery.json"

    @property
    def parent_copy(self) -> Path:
        return self.path / "parent.mytoken"

    @property
    def pending_revocation(self) -> Path:
        """The record of a job mytoken still live after the job ended (``_revocation``)."""
        return self.path / "revoke.pending"

    def remove(self, *, secrets_only: bool = False) -> List[str]:
        """Delete the token files (all of them and the directory, or only the secrets).

        Unlink never follows a link, so a link planted here is removed, not its target.
        Files of a killed writer (``.<name>.<hex>.tmp``) go too.

        Returns:
            One line per thing that could not be removed (empty when all went), for the
            caller's log: a leftover directory is staged out with an ARC session dir.
        """
        from ._tokenfile import remove_stale_temps

        problems: List[str] = []
        for name in self.SECRETS if secrets_only else self.NAMES:
            try:
                os.unlink(self.path / name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"cannot remove {self.path / name}: {exc.strerror}")
        remove_stale_temps(self.path)
        if secrets_only:
            return problems
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            try:
                left = sorted(os.listdir(self.path))
            except OSError:
                left = []
            problems.append(f"cannot remove {self.path}: {exc.strerror}"
                            + (f" (left: {', '.join(left[:10])})" if left else ""))
        return problems

    @classmethod
    def create(cls, path: os.PathLike[str] | str) -> TokenDir:
        return cls(ensure_private_dir(path))

    @classmethod
    def existing(cls, path: os.PathLike[str] | str) -> TokenDir:
        p = Path(path)
        if not p.is_dir():
            raise ConfigError(
                f"token directory {p} does not exist (check --dir or $JOBTOKEN_DIR; "
                "'jobtoken prepare --dir DIR' makes one)"
            )
        return cls(ensure_private_dir(p, create=False))

    def mytoken_of(self, spec: JobRecord) -> Path:
        """The spec's mytoken file; a relative path is inside this directory (so a
        session directory can move, as ARC's does, without rewriting ``job.json``)."""
        path = Path(spec.mytoken_path)
        return path if path.is_absolute() else self.path / path

    def write_spec(self, spec: JobRecord) -> None:
        write_secret_file(self.job_file, spec.to_json())

    def update_spec(self, **changes: Any) -> JobRecord:
        """Change fields of an existing ``job.json``, keeping what a newer version wrote
        there (``_formats.merged``); returns the changed spec.

        Raises:
            ConfigError: no readable job file, one of a newer major, or a bad change.
        """
        text = self._read_job_text()
        spec = JobRecord.from_json(text, str(self.job_file))
        try:
            changed = dataclasses.replace(spec, **changes)
        except TypeError as exc:
            raise ConfigError(f"{self.job_file}: {exc}") from None
        data = merged("job.json", json.loads(text), dataclasses.asdict(changed))
        write_secret_file(self.job_file, json.dumps(data, sort_keys=True))
        return changed

    def read_spec(self) -> JobRecord:
        return JobRecord.from_json(self._read_job_text(), str(self.job_file))

    def _read_job_text(self) -> str:
        try:
            return self.job_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read {self.job_file}: {exc.strerror} (run 'jobtoken prepare' again)"
            ) from exc

    def current_token(self) -> Optional[AccessToken]:
        """The access token in ``bt`` as the payload sees it, or None (absent, unreadable,
        not a token). Decoded, never checked: the caller decides what it must satisfy."""
        from ._tokenfile import read_secret_file
        from ._tokens import decode_access_token

        if not self.bearer_token.exists():
            return None
        try:
            return decode_access_token(read_secret_file(self.bearer_token))
        except JobtokenError:
            return None

    def write_state(self, state: RenewalState) -> None:
        write_secret_file(self.state_file, state.to_json())

    def read_state(self) -> Optional[RenewalState]:
        """The state, or None when there is none or it is unreadable (the sidecar
        rewrites it).

        Raises:
            ConfigError: it is of a newer major format (``_formats``).
        """
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        try:
            return RenewalState.from_dict(data, str(self.state_file))
        except (TypeError, ValueError):
            return None


def acquire_lock(tokendir: TokenDir) -> int:
    """Take the directory's sidecar lock for the life of this process; returns the fd.

    Raises:
        JobtokenError: another sidecar already holds it (two renewers of one mytoken
            would race, and with rotation one of them would kill the chain).
    """
    try:
        fd = os.open(tokendir.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        raise TokenFileError(f"cannot open {tokendir.lock_file}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise JobtokenError(
            f"another jobtoken sidecar is already running for {tokendir.path}"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
