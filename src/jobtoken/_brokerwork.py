"""The node broker's slow work, run on its thread pool: the Mytoken calls and the writes.

Why apart from ``_brokerops``: this is the thread-safety boundary. Everything here runs
on a worker thread, may block on the network, and changes no job table entry: it reads
what the loop gave it and returns a result the loop applies (``JobOperations._submit``).
One use of the site's parent (mint, revoke) at a time, because it may rotate.

Must NOT change a ``BrokerJob`` or the broker's loop state, and never write into a job's
directory except through ``_tokenfile.open_job_directory`` (a dirfd walked without
following links, bound to the device and inode seen at ``prepare``).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, List, Optional, Tuple

from ._brokerstore import TOKEN_NAME, BrokerJob
from ._config import Config
from ._errors import JobtokenError, TokenFileError
from ._tokenfile import open_job_directory, read_secret_file, write_secret_file

if TYPE_CHECKING:
    from ._exchange import Verifier
    from ._mytoken import MytokenClient
    from ._prepare import PreparedJob
    from ._tokens import AccessToken

__all__ = ["PoolWork", "write_job_token"]

logger = logging.getLogger(__name__)


def write_job_token(path: str, uid: int, dir_identity: Tuple[int, int], raw: str) -> None:
    """Put the token in the job's directory through a dirfd, never through a link.

    Raises:
        TokenFileError: the directory is gone, unsafe, or not the one bound at prepare.
    """
    with open_job_directory(path, uid) as directory:
        if directory.identity != dir_identity:
            raise TokenFileError(f"token directory {path} was replaced since prepare")
        directory.write_secret(TOKEN_NAME, raw)


def restore_job_token(job: BrokerJob) -> None:
    """Write the broker's copy of the job's token into the job's directory again.

    Raises:
        JobtokenError: no copy, or the job's directory cannot be written.
    """
    raw = read_secret_file(job.store.bearer_token)
    assert job.tokendir is not None and job.dir_identity is not None
    write_job_token(job.tokendir, job.identity.uid, job.dir_identity, raw)


class PoolWork:
    """The Mytoken calls of the broker, with its one kept client (and TLS context)."""

    def __init__(self, config: Config, client: MytokenClient,
                 verifier: Optional[Verifier]) -> None:
        self.config = config
        self.client = client
        self.verifier = verifier
        self._parent_lock = threading.Lock()  # one use of the (rotating) parent at a time

    def prepare(self, job: BrokerJob, path: str, dir_identity: Tuple[int, int],
                scopes: Tuple[str, ...], audiences: Tuple[str, ...]) -> PreparedJob:
        """Mint the job mytoken (site policy, ``_prepare``) and write its first token.

        Raises:
            JobtokenError: as ``prepare_job``; nothing usable is left minted.
        """
        from ._prepare import JobFacts, prepare_job

        identity = job.identity
        info = JobFacts(job_id=identity.job_id, walltime_s=identity.walltime_s,
                        owner=identity.owner, vo=identity.vo, scopes=scopes,
                        audiences=audiences)

        def write_token(raw: str) -> None:
            write_secret_file(job.store.bearer_token, raw)
            write_job_token(path, identity.uid, dir_identity, raw)

        with self._parent_lock:
            return prepare_job(self.config, info, directory=str(job.store.path),
                               client=self.client, write_token=write_token)

    def renew(self, job: BrokerJob, now: float
              ) -> Tuple[AccessToken, Optional[TokenFileError]]:
        """A fresh, checked token in the broker's copy and, if it can be, the job's file
        (``_renewal.renew_token``: the sidecar's routine, with the broker's writer).

        Returns the token and why the job's file could not be written (the job's loss:
        the broker's copy is renewed all the same, and ``ensure`` restores the file).

        Raises:
            JobtokenError: the renewal failed; both files are untouched.
        """
        from ._renewal import renew_token

        spec = job.spec
        assert spec is not None and job.tokendir is not None and job.dir_identity is not None
        tokendir, uid, dir_identity = job.tokendir, job.identity.uid, job.dir_identity
        unwritten: List[TokenFileError] = []

        def write_token(raw: str) -> None:
            write_secret_file(job.store.bearer_token, raw)
            try:
                write_job_token(tokendir, uid, dir_identity, raw)
            except TokenFileError as exc:  # the job's loss; the broker's copy is renewed
                logger.warning("job %s: %s", job.job_id, exc.message)
                unwritten.append(exc)

        token = renew_token(job.store, spec, self.client, mytoken=job.store.mytoken, now=now,
                            verifier=self.verifier, write_token=write_token)
        return token, unwritten[0] if unwritten else None

    def revoke(self, job: BrokerJob) -> None:
        """Revoke the job mytoken through the parent, by ``mom_id`` (or, for a prepare
        cut short, whatever the parent minted under the job's name); an adopted job's
        by itself.

        Raises:
            JobtokenError: the parent cannot be read, or the server refused or failed.
        """
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
                                 spec.mom_id, client=self.client)
            else:  # a prepare cut short: whatever was minted under the job's name
                revoke_job_mytokens(self.config, job.job_id, client=self.client)

    def _revoke_adopted(self, job: BrokerJob) -> None:
        """Revoke an adopted job's mytoken by itself, recursively: the broker may have no
        parent to name it by (a worker node behind an ARC-CE), and needs none: the
        payload never had this mytoken, so it has no copy, and a revoked mytoken is
        revoked under every copy.

        Raises:
            JobtokenError: the server refused or failed (the caller retries).
        """
        from ._mytokenfile import MytokenSource, load_mytoken

        try:
            mytoken = load_mytoken(MytokenSource(path=job.store.mytoken))
        except JobtokenError:
            return  # never stored (refused before), or revoked and removed already
        self.client.revoke(mytoken, recursive=True)

    def revoke_handed_in(self, mytoken: str) -> None:
        """Revoke a mytoken a job handed in that the broker does not keep (a failure is
        logged: the CE's ``arc end`` or the mytoken's own ``exp`` still end it)."""
        from ._submytoken import revoke_quietly

        revoke_quietly(self.client, mytoken, "job mytoken handed in")
