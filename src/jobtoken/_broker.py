"""The node broker: one service per worker node that holds every mytoken and renews every job.

Why: a renewer per job costs a Python interpreter with httpx per job, and it has to hand
the job mytoken (and, on HTCondor, the site's parent) to the job's uid. The broker keeps
both in its own state directory, talks to jobs over a Unix socket, and writes only the
short-lived access token into each job's directory (docs/broker.md).

This module wires the parts and answers who a caller is and what it asked for:

* ``_brokerloop``: the selector loop over the socket, connections, pidfds and a
  wake-up, and the timer heap (``_brokertimers``) with the node-wide Retry-After pause;
* ``_brokerstore``: the crash-safe state directory (one directory per job, its phase
  persisted before it is acted on);
* ``_brokerops``: the job table and the operations (prepare, adopt, ensure, renew,
  release, revoke, reload after a restart), on the loop's thread (``_brokeradopt``
  holds what ``adopt`` reads from a job's directory and what it keeps of it);
* ``_brokerwork``: the Mytoken calls on a small thread pool that shares one kept
  ``MytokenClient`` (one TLS context), and the writes into the jobs' directories;
* here: start and stop, the caller's identity (``SO_PEERCRED`` through the resolver) and
  the request's dispatch to an operation; ``serve`` for the CLI.

Must NOT hold policy (``_policy``, ``_prepare``) or block the loop's thread.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Tuple

from ._brokeridentity import (
    IdentityResolver,
    JobIdentity,
    PeerCred,
    RegisteredJobs,
    caller_anchor,
    is_trusted,
)
from ._brokerloop import Conn, EventLoop, check_socket_dir
from ._brokerops import JobOperations, NodeCounters
from ._brokerproto import BrokerReply, BrokerRequest, reply_for_error
from ._brokerstore import BrokerJob, JobStore
from ._config import Config
from ._errors import IdentityError, JobtokenError, TokenFileError, UsageError
from ._metrics import REFRESH_S, BrokerValues, read_broker_metrics, write_broker_metrics

__all__ = ["Broker", "make_resolver", "serve"]

logger = logging.getLogger(__name__)


def make_resolver(config: Config) -> IdentityResolver:
    """The identity resolver ``broker.identity`` names.

    ``"registered"`` is built in; ``"condor"`` is ``make_resolver(config)`` of
    ``jobtoken.integrations.condor_broker``, imported only when chosen (the core never
    imports an integration at module level).

    Raises:
        ConfigError: via the integration (e.g. HTCondor bindings missing).
    """
    if config.broker.identity == "registered":
        return RegisteredJobs()
    module = importlib.import_module("jobtoken.integrations.condor_broker")
    return module.make_resolver(config)  # type: ignore[no-any-return]


class Broker:
    """The service; ``serve_forever`` runs it until ``stop()`` (or SIGTERM via ``serve``)."""

    def __init__(self, config: Config, *, resolver: Optional[IdentityResolver] = None) -> None:
        self.config = config
        self.resolver = resolver if resolver is not None else make_resolver(config)
        self.state_dir = Path(config.broker.state_dir)
        self.socket_path = config.broker.socket
        self.store = JobStore(self.state_dir)
        self.loop = EventLoop(self.socket_path, reconcile_s=config.broker.reconcile_s)
        self.ops = JobOperations(config, self.store, self.loop, self.resolver)
        self._metrics_written: Optional[Tuple[BrokerValues, float]] = None
        self._metrics_problem: Optional[str] = None

    @property
    def jobs(self) -> Dict[str, BrokerJob]:
        return self.ops.jobs

    # --- start and stop -----------------------------------------------------------------------

    def start(self) -> None:
        """Take the state directory, reload every job, listen.

        Raises:
            ConfigError: no parent mytoken or server; TokenFileError: the state
                directory or the socket cannot be set up; JobtokenError: another broker
                holds the state directory.
        """
        from ._mytokenfile import load_mytoken
        from ._oneshot import build_verifier, client_for, server_url_for
        from ._prepare import parent_source_of

        check_socket_dir(self.socket_path)
        self.store.lock()
        parent = None
        if self.config.site.parent_mytoken_file or self.config.token.mytoken_file \
                or not self.config.broker.adopt:  # an adopting node may have no parent
            parent = load_mytoken(parent_source_of(self.config), allow_other_owner=True)
        url = server_url_for(self.config, parent)
        # kept for the broker's life: a per-request timeout, no overall deadline
        client = client_for(replace(self.config.server, deadline_s=0.0), url)
        self.ops.start(client, build_verifier(self.config))
        if self.config.renewal.metrics_dir:
            self.ops.counters = NodeCounters.carried_on(read_broker_metrics(
                self.config.renewal.metrics_dir, str(self.state_dir)))
        self.ops.reload()
        self._export_metrics()
        self.loop.listen()
        logger.info("broker listening socket=%s state_dir=%s jobs=%d", self.socket_path,
                    self.state_dir, len(self.jobs))

    def stop(self) -> None:
        """Ask the loop to end (from any thread or a signal handler); jobs stay on disk."""
        self.loop.stop()

    def close(self) -> None:
        self.loop.stop_listening()
        self.ops.shutdown()
        self._export_metrics()
        self.store.unlock()
        self.loop.close()

    def serve_forever(self) -> None:
        self.loop.run(self)

    # --- what the loop asks (LoopHandler) -----------------------------------------------------

    def fire_timer(self, key: str, generation: int) -> Optional[float]:
        return self.ops.fire_timer(key, generation)

    def fd_ready(self, key: str) -> None:
        self.ops.anchor_ended(key)

    def reconcile(self) -> None:
        self.ops.reconcile()
        self._export_metrics()

    # --- metrics ------------------------------------------------------------------------------

    def _export_metrics(self) -> None:
        """The node's totals in ``[renewal] metrics_dir`` when they changed, and at least
        every ``REFRESH_S`` (the file's time shows the broker lives); never fatal."""
        directory = self.config.renewal.metrics_dir
        if not directory:
            return
        now = time.time()
        values = self.ops.node_values(now)
        unchanged = replace(values, updated_at=0.0)
        if self._metrics_written is not None and self._metrics_written[0] == unchanged \
                and now - self._metrics_written[1] < REFRESH_S:
            return
        try:
            write_broker_metrics(directory, str(self.state_dir), values)
        except TokenFileError as exc:
            if exc.message != self._metrics_problem:  # once, not every reconcile
                logger.warning("cannot write the broker's metrics: %s", exc.message)
            self._metrics_problem = exc.message
            return
        self._metrics_written, self._metrics_problem = (unchanged, now), None

    def trusted(self, peer: PeerCred) -> bool:
        """Root or the broker's own uid: may register, and name any job."""
        return is_trusted(peer, os.geteuid())

    def dispatch(self, conn: Conn, request: BrokerRequest) -> None:
        """Answer now, or mark ``conn`` waiting for a worker (or for a busy job)."""
        answer = self._node_answer(conn.peer, request)
        if answer is not None:
            self.loop.reply(conn, answer)
            return
        if request.op == "adopt":
            self.ops.adopt(conn, self._adopter(conn.peer, request), request)
            return
        job_id, job = self._job_for(conn.peer, request)
        if job is None:  # only prepare (and register) make a job known
            self.loop.reply(conn, _unknown_job_answer(job_id, request))
            return
        if request.op == "prepare":
            self.ops.prepare(conn, job, request)
        elif request.op == "ensure":
            self.ops.ensure(conn, job, request)
        elif request.op == "status":
            self.loop.reply(conn, self.ops.status(job))
        elif request.op == "release":
            self.ops.release(conn, job)

    def _node_answer(self, peer: PeerCred, request: BrokerRequest) -> Optional[BrokerReply]:
        """The answer to an op about the node rather than one job; None for a job's op."""
        if request.op == "ping":
            return BrokerReply(True, 0, "pong", detail={"jobs": len(self.jobs)})
        if request.op == "register":
            return self._register(peer, request)
        if request.op == "status" and request.job is None and self.trusted(peer) \
                and not self._known_peer(peer):
            return self.ops.node_status()
        return None

    # --- who the caller is --------------------------------------------------------------------

    def _known_peer(self, peer: PeerCred) -> bool:
        try:
            self.resolver.resolve(peer)
        except JobtokenError:
            return False
        return True

    def _job_for(self, peer: PeerCred, request: BrokerRequest
                 ) -> Tuple[str, Optional[BrokerJob]]:
        """The job the caller is (or, for a trusted caller, names in ``job.job_id``): its id,
        and None for the job when the broker does not know it and the op is not ``prepare``.

        Raises:
            IdentityError: the caller is no job, or a job of another uid.
        """
        if request.job is not None:
            if not self.trusted(peer):
                raise IdentityError("only root or the broker's uid may name a job")
            job_id = request.job.get("job_id")
            job = self.jobs.get(job_id) if isinstance(job_id, str) else None
            if job is None:
                raise IdentityError(f"no job {str(job_id)[:80]!r} on this broker")
            return job.job_id, job
        identity = self.resolver.resolve(peer)
        if identity.uid != peer.uid:
            raise IdentityError(f"process {peer.pid} runs as uid {peer.uid}, the job as "
                                f"uid {identity.uid}")
        job = self.jobs.get(identity.job_id)
        if job is None:
            return identity.job_id, (self.ops.new_job(identity) if request.op == "prepare"
                                     else None)
        if job.identity.anchor != identity.anchor or job.identity.uid != identity.uid:
            raise IdentityError(f"job {identity.job_id} is known with another anchor or uid")
        return job.job_id, job

    def _adopter(self, peer: PeerCred, request: BrokerRequest) -> JobIdentity:
        """The caller of ``adopt`` as a job's identity (its job id comes from its
        directory later): its uid, and the anchor it names, checked in ``/proc``.

        Raises:
            IdentityError: this broker does not adopt (``broker.adopt``, or a resolver
                that takes no jobs from callers), or the anchor is not the caller or an
                ancestor of the caller's uid.
        """
        if not self.config.broker.adopt:
            raise IdentityError("this broker does not adopt jobs (broker.adopt is false)")
        if getattr(self.resolver, "add", None) is None:
            raise IdentityError('adopt needs broker.identity = "registered"')
        anchor = caller_anchor(peer, request.anchor_pid)
        return JobIdentity(job_id="", uid=peer.uid, owner=None, anchor=anchor)

    def _register(self, peer: PeerCred, request: BrokerRequest) -> BrokerReply:
        register = getattr(self.resolver, "register", None)
        if register is None:
            raise IdentityError("this broker learns jobs from the batch system; "
                                "it takes no registrations")
        if request.job is None:
            raise UsageError("register needs a job object")
        identity: JobIdentity = register(peer, request.job)
        if identity.job_id not in self.jobs:
            self.ops.new_job(identity)
        logger.info("job registered job=%s uid=%d anchor=%d", identity.job_id, identity.uid,
                    identity.anchor.pid)
        return BrokerReply(True, 0, f"job {identity.job_id} registered", job_id=identity.job_id)


def _unknown_job_answer(job_id: str, request: BrokerRequest) -> BrokerReply:
    """A job op from a job the broker holds nothing for (never prepared, or released and
    forgotten): no record is made for it. ``release`` has nothing left to do; ``status``
    and ``ensure`` have no token to speak of. (A record made here used to answer a late
    HTCondor update hook with "0 renewals" after the exit hook's release, overwriting
    the job's real count in its ad.)"""
    if request.op == "release":
        return BrokerReply(True, 0, f"job {job_id}: nothing to release", job_id=job_id)
    return reply_for_error(TokenFileError(
        f"job {job_id} has no token on this broker (not prepared, or already ended)"),
        job_id)


def serve(config: Config) -> int:
    """Run the broker until SIGTERM, SIGINT or SIGQUIT; jobs stay on disk for the next start.

    SIGQUIT too because ``condor_master`` sends it for a fast shutdown of a daemon in its
    ``DAEMON_LIST``: the broker then stops as cleanly as on SIGTERM instead of dying. SIGHUP
    is ignored: ``condor_master`` sends a daemon outside DaemonCore a plain SIGHUP at every
    ``condor_reconfig`` (masterDaemon.cpp ``daemon::Reconfig``), whose default action would
    end the broker each time; nothing needs reloading (the log file follows logrotate).
    Every disposition is put back at the end (``serve`` also runs inside other programs).
    """
    broker = Broker(config)
    broker.start()

    def on_signal(signum: int, frame: object) -> None:
        broker.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT,
                                                           signal.SIGQUIT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        broker.serve_forever()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        broker.close()
        logger.info("broker stopped")
    return 0
