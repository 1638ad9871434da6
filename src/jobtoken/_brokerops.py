"""The node broker's job operations: prepare, ensure, renew, release, revoke, restart.

Why: these are what the broker *does* for a job, each a change of the job table plus,
for the slow part (a Mytoken call), work on the thread pool. The table is changed only
on the loop's thread: work on the pool hands its outcome back (``EventLoop.post``), and
a job has at most one piece of work at a time (``busy``; requests meanwhile wait in
``waiters``). Every change of phase is persisted (``JobStore``) before it is acted on.

The rules are elsewhere and only applied here: the renewal time, jitter and backoff are
``_policy``'s, the mint and its checks ``_prepare``'s, the exchange ``_exchange``'s; the
Mytoken calls themselves are ``_brokerwork``'s.

Must NOT read requests off sockets or decide who the caller is (``_broker`` does), and
never write into a job's directory except through ``_tokenfile.open_job_directory``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from . import _policy as policy
from ._brokeridentity import IdentityResolver, JobIdentity, anchor_alive
from ._brokerloop import Conn, EventLoop
from ._brokerproto import BrokerReply, BrokerRequest, reply_for_error
from ._brokerstore import (
    ACTIVE,
    ENDING,
    PHASES,
    PREPARING,
    REGISTERED,
    TOKEN_NAME,
    BrokerJob,
    JobStore,
)
from ._brokerwork import PoolWork, restore_job_token
from ._config import Config
from ._errors import (
    IdentityError,
    JobtokenError,
    MytokenError,
    MytokenRejectedError,
    RenewalReport,
    ServerUnavailableError,
    UsageError,
)
from ._metrics import BrokerValues
from ._scopes import scopes_within
from ._tokendir import JobRecord
from ._tokenfile import JobDirectory, open_job_directory, write_secret_file

if TYPE_CHECKING:
    from ._exchange import Verifier
    from ._mytoken import MytokenClient

__all__ = ["JobOperations"]

logger = logging.getLogger(__name__)

Done = Callable[[Optional[Any], Optional[BaseException]], None]


@dataclass
class NodeCounters:
    """What the broker did since its counters began (its metrics file carries them on)."""

    renewals: int = 0
    failures_total: int = 0
    rate_limit_pauses: int = 0
    revocations: int = 0

    @classmethod
    def carried_on(cls, previous: BrokerValues) -> NodeCounters:
        """The counters of the broker's previous metrics file, to go on from."""
        return cls(renewals=previous.renewals, failures_total=previous.failures_total,
                   rate_limit_pauses=previous.rate_limit_pauses,
                   revocations=previous.revocations)


class _Answered(Exception):
    """A waiter whose answer was already sent (or will be, by a renewal it started)."""


class JobOperations:
    """The job table and everything done to a job (on the loop's thread)."""

    def __init__(self, config: Config, store: JobStore, loop: EventLoop,
                 resolver: IdentityResolver) -> None:
        self.config = config
        self.store = store
        self.loop = loop
        self.resolver = resolver
        self.jobs: Dict[str, BrokerJob] = {}
        self._job_locks: Dict[str, threading.Lock] = {}
        self._rnd = random.Random()
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pool_work: Optional[PoolWork] = None
        self.counters = NodeCounters()

    @property
    def paused_until(self) -> float:
        """Until when a Retry-After pauses every renewal of the node (0: not paused)."""
        return self.loop.timers.paused_until

    def start(self, client: MytokenClient, verifier: Optional[Verifier]) -> None:
        """Take the kept client; start the pool."""
        self._pool_work = PoolWork(self.config, client, verifier)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.broker.workers, thread_name_prefix="jobtoken-broker")

    def shutdown(self) -> None:
        """Wait for the pool's work; let go of the anchors and the client."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for job in self.jobs.values():
            self.unwatch(job)
        if self._pool_work is not None:
            self._pool_work.client.close()

    def _work(self) -> PoolWork:
        assert self._pool_work is not None, "JobOperations.start first"
        return self._pool_work

    # --- work on the pool ---------------------------------------------------------------------

    def _submit(self, job: BrokerJob, work: Callable[[], Any], done: Done) -> None:
        """Run ``work`` on the pool with the job's lock; ``done(result, error)`` on the loop."""
        job.busy = True
        lock = self._job_locks.setdefault(job.job_id, threading.Lock())

        def run() -> None:
            try:
                with lock:
                    result = work()
            except BaseException as exc:  # handed to the loop, logged there
                error = exc
                self.loop.post(lambda: self._finish(job, done, None, error))
                return
            self.loop.post(lambda: self._finish(job, done, result, None))

        assert self._pool is not None
        self._pool.submit(run)

    def _finish(self, job: BrokerJob, done: Done, result: Any,
                error: Optional[BaseException]) -> None:
        job.busy = False
        if error is not None and not isinstance(error, JobtokenError):
            logger.error("job %s: internal error %s: %s", job.job_id, type(error).__name__,
                         error)
        done(result, error)
        if job.end_wanted and not job.busy and job.phase != ENDING:
            self.end(job, "ended while busy")
        elif not job.busy and job.waiters:
            waiters, job.waiters = job.waiters, []
            for conn, answer in waiters:
                self._handle_waiter(conn, answer)

    def _handle_waiter(self, conn: Conn, answer: Callable[[], BrokerReply]) -> None:
        try:
            reply = answer()
        except _Answered:
            return
        except Exception as exc:  # an answer that failed is one line too
            reply = reply_for_error(exc)
        self.loop.reply(conn, reply)

    # --- timers -------------------------------------------------------------------------------

    def schedule(self, job: BrokerJob, at: float) -> None:
        """The job's next renewal (or revocation retry) at ``at``; earlier timers go stale."""
        job.generation += 1
        self.loop.timers.push(at, job.job_id, job.generation)

    def fire_timer(self, job_id: str, generation: int) -> Optional[float]:
        """A job's timer is due: renew or revoke; a busy job is looked at again soon."""
        job = self.jobs.get(job_id)
        if job is None or job.generation != generation:
            return None
        if job.busy:
            return time.time() + 0.5
        if job.phase == ACTIVE:
            self._start_renewal(job)
        elif job.phase == ENDING:
            self._start_revocation(job)
        return None

    # --- the job table ------------------------------------------------------------------------

    def new_job(self, identity: JobIdentity, phase: str = REGISTERED, *,
                adopted: bool = False) -> BrokerJob:
        """A job the broker did not know: persisted in ``phase``, its anchor watched.

        Raises:
            IdentityError: its anchor has already ended (the job is ended again).
        """
        job = self.store.create(identity, phase, adopted=adopted)
        self.jobs[identity.job_id] = job
        self.watch(job)
        if not anchor_alive(identity.anchor):
            self.end(job, "anchor gone at registration")
            raise IdentityError(f"job {identity.job_id}'s anchor process has ended")
        return job

    def reload(self) -> None:
        """Load every job from the state directory: end the ended, reschedule the rest."""
        for job in self.store.load_all():
            self.jobs[job.job_id] = job
            add = getattr(self.resolver, "add", None)
            if add is not None:
                try:
                    add(job.identity)
                except JobtokenError as exc:
                    logger.warning("job %s: %s", job.job_id, exc.message)
            if job.phase == PREPARING:  # cut short: what it minted may be live
                job.phase, job.requeue = ENDING, not job.adopted
                self.store.persist(job)
            if job.phase == ENDING or not anchor_alive(job.identity.anchor):
                self.end(job, "ended while the broker was down")
                continue
            self.watch(job)
            if job.phase == ACTIVE:
                self._resume(job)
        logger.info("reloaded %d job(s)", len(self.jobs))

    def _resume(self, job: BrokerJob) -> None:
        now = time.time()
        st = job.state
        if st.expires_at is None or st.expires_at - now <= 0:
            self.schedule(job, now)
            return
        self._restore_job_token(job)
        at = st.next_attempt_at if st.next_attempt_at is not None else now
        self.schedule(job, min(at, st.expires_at))

    # --- prepare ------------------------------------------------------------------------------

    def prepare(self, conn: Conn, job: BrokerJob, request: BrokerRequest) -> None:
        """Bind the job to its token directory, mint its mytoken, write its first token."""
        if not request.tokendir:
            raise UsageError("prepare needs the token directory (tokendir)")
        if job.busy or job.phase in (ACTIVE, ENDING):
            self._again(conn, job, request)
            return
        path = os.path.normpath(request.tokendir)
        with open_job_directory(path, job.identity.uid) as directory:
            for other in self.jobs.values():
                if other is not job and other.dir_identity == directory.identity:
                    raise IdentityError(f"token directory {path} belongs to another job")
            dir_identity = directory.identity
        scopes = self._scopes_for(job.identity, request.scopes)
        audiences = self._audiences_for(job.identity, request.audiences)
        job.phase, job.tokendir, job.dir_identity = PREPARING, path, dir_identity
        self.store.persist(job)
        self.loop.park(conn)
        self._submit(job, lambda: self._work().prepare(job, path, dir_identity, scopes,
                                                         audiences),
                     lambda result, error: self._prepared(conn, job, result, error))

    def _scopes_for(self, identity: JobIdentity, asked: Tuple[str, ...]) -> Tuple[str, ...]:
        """The job's wish, if any, within what its trusted description allows."""
        if asked and identity.scopes:
            wider = scopes_within(asked, identity.scopes)
            if wider:
                raise MytokenRejectedError(f"job {identity.job_id} asks for "
                                           f"{' '.join(wider)}, wider than its job allows")
        return asked or identity.scopes

    def _audiences_for(self, identity: JobIdentity, asked: Tuple[str, ...]) -> Tuple[str, ...]:
        if asked and identity.audiences:
            extra = [a for a in asked if a not in identity.audiences]
            if extra:
                raise MytokenRejectedError(f"job {identity.job_id} asks for audience "
                                           f"{' '.join(extra)}, not its job's")
        return asked or identity.audiences

    def _prepared(self, conn: Conn, job: BrokerJob, result: Any,
                  error: Optional[BaseException]) -> None:
        if error is not None:
            job.phase, job.tokendir, job.dir_identity = REGISTERED, None, None
            self.store.persist(job)
            self.loop.reply(conn, reply_for_error(error, job.job_id))
            return
        token = result.token
        job.spec = result.spec
        job.phase = ACTIVE
        self.store.persist(job)
        self._record_token(job, token.expires_at, token.issued_at, token.jti, renewed=False)
        logger.info("job prepared job=%s uid=%d dir=%s mom_id=%s", job.job_id,
                    job.identity.uid, job.tokendir, result.mom_id)
        self.loop.reply(conn, self._prepared_reply(job, None))

    def _again(self, conn: Conn, job: BrokerJob, request: BrokerRequest) -> None:
        """A second ``prepare``/``adopt`` of a known job: its current state."""
        if job.busy:
            job.waiters.append((conn, lambda: self._prepared_reply(job, request)))
            self.loop.park(conn)
            return
        self.loop.reply(conn, self._prepared_reply(job, request))

    # --- adopt: a job hands in the mytoken minted for it elsewhere (ARC) -------------------------

    def adopt(self, conn: Conn, identity: JobIdentity, request: BrokerRequest) -> None:
        """Take the job mytoken out of the caller's directory and serve the job as prepared.

        ``identity`` is the caller's uid and anchor (``_broker`` checked them); its job id
        comes from the directory's ``job.json`` here. Once the mytoken was read, whatever
        goes wrong, it is revoked and removed from the job's directory: a job mytoken the
        broker cannot use is not left to the payload.
        """
        from . import _brokeradopt as adopted

        if not request.tokendir:
            raise UsageError("adopt needs the token directory (tokendir)")
        path = os.path.normpath(request.tokendir)
        with open_job_directory(path, identity.uid) as directory:
            asked = adopted.read_record(directory)
            identity = replace(identity, job_id=adopted.adopted_job_id(asked))
            known = self.jobs.get(identity.job_id)
            if known is not None:
                if (known.identity.uid, known.identity.anchor) != (identity.uid,
                                                                    identity.anchor):
                    raise IdentityError(f"job {identity.job_id} is adopted already by "
                                        "another uid or anchor")
                self._again(conn, known, request)
                return
            if any(other.dir_identity == directory.identity for other in self.jobs.values()):
                raise IdentityError(f"token directory {path} belongs to another job")
            try:
                mytoken = adopted.read_mytoken(directory)
            except JobtokenError as exc:
                self._drop_handed_in(adopted.hardlinked(exc), directory)
                raise
            job = self._take_over(identity, asked, mytoken, path, directory)
        self.loop.park(conn)
        self._submit(job, lambda: self._work().renew(job, time.time()),
                     lambda result, error: self._adopted(conn, job, result, error))

    def _take_over(self, identity: JobIdentity, asked: JobRecord, mytoken: str, path: str,
                   directory: JobDirectory) -> BrokerJob:
        """Keep the job mytoken in the state directory, then remove it from the job's."""
        from . import _brokeradopt as adopted

        job: Optional[BrokerJob] = None
        try:
            spec = adopted.adopted_record(self.config, asked, self._work().client.server_url)
            identity = replace(identity, scopes=spec.scopes, audiences=spec.audiences)
            add = getattr(self.resolver, "add", None)
            assert add is not None, "_broker adopts only with a resolver that adds jobs"
            add(identity)
            job = self.new_job(identity, PREPARING, adopted=True)
            job.spec, job.tokendir, job.dir_identity = spec, path, directory.identity
            write_secret_file(job.store.mytoken, mytoken, newline=False)
            job.store.write_spec(spec)
            self.store.persist(job)
            removed = adopted.clear_mytokens(directory)  # now: the broker's copy is on disk
        except JobtokenError:
            self._drop_handed_in(mytoken, directory)
            if job is not None:
                self.end(job, "adopt failed")
            raise
        logger.info("job adopted job=%s uid=%d anchor=%d dir=%s removed=%s", job.job_id,
                    identity.uid, identity.anchor.pid, path, ",".join(removed))
        return job

    def _drop_handed_in(self, mytoken: Optional[str], directory: JobDirectory) -> None:
        """A handed-in mytoken the broker will not keep: out of the job's directory, and
        revoked (on the pool)."""
        from . import _brokeradopt as adopted

        try:
            adopted.clear_mytokens(directory)
        except JobtokenError as exc:
            logger.warning("%s", exc.message)
        if mytoken is not None and self._pool is not None:
            self._pool.submit(self._work().revoke_handed_in, mytoken)

    def _adopted(self, conn: Conn, job: BrokerJob, result: Any,
                 error: Optional[BaseException]) -> None:
        if error is None and result[1] is not None:
            error = result[1]  # a token the job's directory did not get
        if error is not None:
            logger.warning("job %s: cannot use the mytoken it handed in: %s", job.job_id,
                           error.message if isinstance(error, JobtokenError) else error)
            self.loop.reply(conn, reply_for_error(error, job.job_id))
            self.end(job, "adopt failed")
            return
        token = result[0]
        job.phase = ACTIVE
        self.store.persist(job)
        self._record_token(job, token.expires_at, token.issued_at, token.jti, renewed=False)
        self.loop.reply(conn, self._prepared_reply(job, None))

    def _prepared_reply(self, job: BrokerJob, request: Optional[BrokerRequest]) -> BrokerReply:
        if job.phase != ACTIVE or job.tokendir is None:
            raise JobtokenError(f"job {job.job_id} is not prepared ({job.phase})")
        if request is not None and request.tokendir \
                and os.path.normpath(request.tokendir) != job.tokendir:
            raise IdentityError(f"job {job.job_id} is prepared with another token directory")
        return BrokerReply(True, 0, "prepared", expires_at=job.state.expires_at,
                           bearer_token_file=os.path.join(job.tokendir, TOKEN_NAME),
                           job_id=job.job_id)

    # --- renewal state ------------------------------------------------------------------------

    def _settings(self, job: BrokerJob) -> policy.RenewalSettings:
        spec = job.spec
        assert spec is not None
        return policy.renewal_settings(spec.fraction, spec.margin_s, spec.max_backoff_s)

    def _record_token(self, job: BrokerJob, expires_at: float, issued_at: Optional[float],
                      jti: Optional[str], *, renewed: bool) -> None:
        now = time.time()
        st = job.state
        st.expires_at, st.issued_at, st.jti = expires_at, issued_at, jti
        st.consecutive_failures = 0
        st.last_success_at = now
        st.last_error = None
        if renewed:
            st.renewals += 1
            self.counters.renewals += 1
        self._plan(job, policy.next_renewal_at(
            issued_at, expires_at, settings=self._settings(job),
            jitter=policy.job_jitter(job.job_id, self._settings(job).jitter_fraction),
            obtained_at=now))

    def _plan(self, job: BrokerJob, at: float) -> None:
        spec = job.spec
        job.state.next_attempt_at = at if policy.within_horizon(
            at, spec.job_end_at if spec else None) else None
        self.store.write_state(job, time.time())
        if job.state.next_attempt_at is not None:
            self.schedule(job, at)

    # --- renewal ------------------------------------------------------------------------------

    def _start_renewal(self, job: BrokerJob, conn: Optional[Conn] = None,
                       min_valid_s: Optional[float] = None) -> None:
        job.state.last_attempt_at = time.time()
        self._submit(job, lambda: self._work().renew(job, time.time()),
                     lambda result, error: self._renewed(job, result, error, conn, min_valid_s))

    def _renewed(self, job: BrokerJob, result: Any, error: Optional[BaseException],
                 conn: Optional[Conn], min_valid_s: Optional[float]) -> None:
        if job.phase != ACTIVE:
            if conn is not None:
                self.loop.reply(conn, reply_for_error(JobtokenError(
                    f"job {job.job_id} ended"), job.job_id))
            return
        if error is None:
            token, unwritten = result
            logger.info("token renewed job=%s exp=%d", job.job_id, int(token.expires_at))
            self._record_token(job, token.expires_at, token.issued_at, token.jti, renewed=True)
            if conn is not None:
                self.loop.reply(conn, self._token_reply(job, renewed=True) if unwritten is None
                                else reply_for_error(unwritten, job.job_id))
            return
        self._renewal_failed(job, error)
        if conn is not None:
            left = (job.state.expires_at or 0.0) - time.time()
            if min_valid_s is not None and left >= min_valid_s:
                self.loop.reply(conn, self._token_reply(job, renewed=False))
            else:
                self.loop.reply(conn, reply_for_error(error, job.job_id))

    def _renewal_failed(self, job: BrokerJob, error: BaseException) -> None:
        now = time.time()
        st = job.state
        message = error.message if isinstance(error, JobtokenError) else type(error).__name__
        st.failures_total += 1
        st.consecutive_failures += 1
        self.counters.failures_total += 1
        st.last_error = message
        retry_after = error.retry_after_s if isinstance(error, MytokenError) else None
        self._pause_on_429(error, now)
        # RenewalReport.permanent's rule; an error of ours we did not foresee is retried
        permanent = isinstance(error, JobtokenError) and RenewalReport.failure(error).permanent
        st.last_error_permanent = permanent
        logger.warning("renewal failed job=%s attempt=%d%s: %s", job.job_id,
                       st.consecutive_failures, " (permanent)" if permanent else "", message)
        if permanent:  # not retried; the job's status says why
            st.next_attempt_at = None
            self.store.write_state(job, time.time())
            return
        settings = self._settings(job)
        expires = st.expires_at or now
        lifetime = expires - (st.issued_at or expires - policy.ASSUMED_LIFETIME_S)
        self._plan(job, policy.next_attempt_at(
            now, attempt=st.consecutive_failures, retry_after_s=retry_after,
            expires_at=expires, settings=settings, rnd=self._rnd,
            margin_s=policy.margin_for(lifetime, settings)))

    def _pause_on_429(self, error: BaseException, now: float) -> None:
        """A 429 with Retry-After pauses every renewal of the node, once (not extended by
        the 429s of renewals that were already under way)."""
        if not isinstance(error, MytokenError) or error.status != 429 \
                or not error.retry_after_s or now < self.paused_until:
            return
        self.loop.timers.paused_until = now + error.retry_after_s
        self.counters.rate_limit_pauses += 1
        logger.warning("server asked to wait %.0f s (429): every renewal of the node "
                       "pauses until then", error.retry_after_s)

    # --- ensure and status --------------------------------------------------------------------

    def _token_reply(self, job: BrokerJob, *, renewed: bool) -> BrokerReply:
        assert job.tokendir is not None
        return BrokerReply(True, 0, "renewed" if renewed else "valid",
                           expires_at=job.state.expires_at,
                           bearer_token_file=os.path.join(job.tokendir, TOKEN_NAME),
                           job_id=job.job_id, detail={"renewed": renewed})

    def ensure(self, conn: Conn, job: BrokerJob, request: BrokerRequest) -> None:
        """Answer at once from a token valid ``min_valid_s`` more, else renew and answer."""
        if job.phase != ACTIVE:
            raise JobtokenError(f"job {job.job_id} is not prepared ({job.phase})")
        min_valid = request.min_valid_s or 0.0
        if job.busy:
            self.loop.park(conn)
            job.waiters.append((conn, lambda: self._ensure_again(conn, job, min_valid)))
            return
        left = (job.state.expires_at or 0.0) - time.time()
        if left >= min_valid and left > 0:
            problem = self._restore_job_token(job)
            self.loop.reply(conn, self._token_reply(job, renewed=False) if problem is None
                            else reply_for_error(problem, job.job_id))
            return
        if time.time() < self.paused_until:
            raise ServerUnavailableError(
                f"the server asked this node to wait {self.paused_until - time.time():.0f} s "
                "more (Retry-After)", retry_after_s=self.paused_until - time.time())
        self.loop.park(conn)
        self._start_renewal(job, conn, min_valid)

    def _ensure_again(self, conn: Conn, job: BrokerJob, min_valid: float) -> BrokerReply:
        """A waiter's answer once the job's running operation is done."""
        self.ensure(conn, job, BrokerRequest("ensure", min_valid_s=min_valid))
        # ensure replied or started a renewal that will; nothing more to say now
        raise _Answered()

    def _restore_job_token(self, job: BrokerJob) -> Optional[JobtokenError]:
        """Make the job's token file hold the broker's copy again (the job may have lost
        or replaced it); the error, if that failed."""
        try:
            restore_job_token(job)
        except JobtokenError as exc:
            logger.warning("job %s: cannot restore its token file: %s", job.job_id, exc.message)
            return exc
        return None

    def status(self, job: BrokerJob) -> BrokerReply:
        st = job.state
        detail = {
            "phase": job.phase, "uid": job.identity.uid, "renewals": st.renewals,
            "failures_total": st.failures_total,
            "consecutive_failures": st.consecutive_failures, "last_error": st.last_error,
            "last_error_permanent": st.last_error_permanent,
            "next_attempt_at": st.next_attempt_at, "tokendir": job.tokendir,
            "paused_until": self.paused_until or None,
        }
        return BrokerReply(True, 0, job.phase, expires_at=st.expires_at, job_id=job.job_id,
                           bearer_token_file=os.path.join(job.tokendir, TOKEN_NAME)
                           if job.tokendir else None, detail=detail)

    def node_values(self, now: float) -> BrokerValues:
        """The node's totals for its metrics file."""
        phases = [job.phase for job in self.jobs.values()]
        return BrokerValues(
            updated_at=now, jobs_by_phase=tuple((p, phases.count(p)) for p in PHASES),
            revocations_pending=phases.count(ENDING), **asdict(self.counters))

    def node_status(self) -> BrokerReply:
        phases: Dict[str, int] = {}
        for job in self.jobs.values():
            phases[job.phase] = phases.get(job.phase, 0) + 1
        return BrokerReply(True, 0, f"{len(self.jobs)} job(s)", detail={
            "jobs": len(self.jobs), "phases": phases, "paused_until": self.paused_until or None})

    # --- end of a job -------------------------------------------------------------------------

    def release(self, conn: Conn, job: BrokerJob) -> None:
        logger.info("release job=%s", job.job_id)
        self.end(job, "released")
        self.loop.reply(conn, BrokerReply(True, 0, "released: the job mytoken is being revoked",
                                          job_id=job.job_id))

    def end(self, job: BrokerJob, reason: str) -> None:
        """The job is over: revoke what it had (persisted first), then forget it."""
        if job.busy:
            job.end_wanted = True
            return
        for conn, _ in job.waiters:
            self.loop.reply(conn, reply_for_error(JobtokenError(f"job {job.job_id} ended"),
                                                  job.job_id))
        job.waiters = []
        if job.phase == REGISTERED:
            self._forget(job)
            logger.info("job forgotten job=%s (%s)", job.job_id, reason)
            return
        if job.phase != ENDING:
            logger.info("job ended job=%s (%s): revoking its mytoken", job.job_id, reason)
            job.phase = ENDING
            self.store.persist(job)
        job.generation += 1  # no renewal from now on
        self._start_revocation(job)

    def _start_revocation(self, job: BrokerJob) -> None:
        if job.busy:
            return
        self._submit(job, lambda: self._work().revoke(job),
                     lambda result, error: self._revoked(job, error))

    def _revoked(self, job: BrokerJob, error: Optional[BaseException]) -> None:
        if error is not None and not isinstance(error, MytokenRejectedError):
            self._retry_revocation(job, error)
            return
        if error is not None:
            logger.warning("job %s: the server refused the revocation for good (%s); "
                           "nothing is left to revoke", job.job_id, error)
        else:
            logger.info("job mytoken revoked job=%s", job.job_id)
            self.counters.revocations += 1
        if job.requeue and anchor_alive(job.identity.anchor):
            job.store.remove(secrets_only=True)
            job.phase, job.tokendir, job.dir_identity, job.spec = REGISTERED, None, None, None
            job.requeue = False
            self.store.persist(job)
            self.watch(job)
            return
        self._remove_job_token(job)
        self._forget(job)

    def _retry_revocation(self, job: BrokerJob, error: BaseException) -> None:
        job.revoke_attempts += 1
        retry_after = error.retry_after_s if isinstance(error, MytokenError) else None
        delay = min(300.0, max(retry_after or 0.0, 2.0 ** min(job.revoke_attempts, 8)))
        logger.warning("job %s: revocation failed (attempt %d, retry in %.0f s): %s",
                       job.job_id, job.revoke_attempts, delay,
                       error.message if isinstance(error, JobtokenError) else error)
        self.schedule(job, time.time() + delay)

    def _remove_job_token(self, job: BrokerJob) -> None:
        """Remove ``bt`` from the job's directory if it is still the one bound at prepare."""
        if not (job.tokendir and job.dir_identity):
            return
        try:
            with open_job_directory(job.tokendir, job.identity.uid) as directory:
                if directory.identity == job.dir_identity:
                    directory.remove(TOKEN_NAME)
        except JobtokenError:
            pass  # the directory went with the job

    def _forget(self, job: BrokerJob) -> None:
        self.unwatch(job)
        job.generation += 1
        self.store.remove(job)
        self.jobs.pop(job.job_id, None)
        self._job_locks.pop(job.job_id, None)
        forget = getattr(self.resolver, "forget", None)
        if forget is not None:
            forget(job.job_id)

    # --- anchors ------------------------------------------------------------------------------

    def watch(self, job: BrokerJob) -> None:
        """A pidfd for the anchor where the kernel has them (else ``reconcile`` finds out)."""
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is None:
            return
        try:
            fd = pidfd_open(job.identity.anchor.pid)
        except OSError:
            return
        if not anchor_alive(job.identity.anchor):  # the pid was already another process
            os.close(fd)
            return
        job.pidfd = fd
        self.loop.watch(fd, job.job_id)

    def unwatch(self, job: BrokerJob) -> None:
        if job.pidfd is not None:
            self.loop.unwatch(job.pidfd)
            os.close(job.pidfd)
            job.pidfd = None

    def anchor_ended(self, job_id: str) -> None:
        """A job's pidfd became readable: its anchor ended (or is a zombie)."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        self.unwatch(job)
        if not anchor_alive(job.identity.anchor) and job.phase != ENDING:
            self.end(job, "anchor process ended")

    def reconcile(self) -> None:
        """End every job whose anchor ended without a pidfd telling."""
        for job in list(self.jobs.values()):
            if job.phase != ENDING and not anchor_alive(job.identity.anchor):
                self.end(job, "anchor process ended")
