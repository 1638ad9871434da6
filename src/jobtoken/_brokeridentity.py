"""Who is calling the node broker: the kernel's word for the caller, and the job it belongs to.

The broker never believes what a caller says about itself. It has two facts the caller
cannot forge: ``SO_PEERCRED`` (pid, uid, gid of the connecting process, set by the
kernel at ``connect``) and the process tree in ``/proc`` (a process cannot choose its
parent). A job is anchored to one process whose life is the job's life (the HTCondor
starter, the pilot's payload wrapper, ARC's job script); a caller belongs to the job
when its uid is the job's and that anchor is among its ancestors. An anchor is a pid
*and* its start time (``/proc/PID/stat`` field 22), so a recycled pid is never
mistaken for the anchor.

Where the job's facts come from is a resolver's business: ``RegisteredJobs`` takes
them from a trusted caller (the broker's own uid, or root) that registered the job;
``integrations/condor_broker.py`` reads them from the startd's slot ad. Neither looks
at files in the sandbox or the job's environment.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple

from ._errors import IdentityError, printable

__all__ = [
    "IdentityResolver",
    "JobIdentity",
    "PeerCred",
    "ProcessAnchor",
    "RegisteredJobs",
    "anchor_alive",
    "anchor_of",
    "ancestors",
    "caller_anchor",
    "is_trusted",
    "peer_cred",
    "split_stat",
]

_MAX_DEPTH = 512  # a process tree deeper than this is not a job's (and ends the walk)


@dataclass(frozen=True)
class PeerCred:
    """The connecting process as the kernel saw it at ``connect`` (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class ProcessAnchor:
    """One process, for good: its pid and its start time in clock ticks since boot."""

    pid: int
    start_ticks: int


@dataclass(frozen=True)
class JobIdentity:
    """A job as a trusted source describes it; the fields of ``_prepare.JobFacts`` plus
    whose it is (``uid``, ``owner``) and the process whose life is the job's life."""

    job_id: str
    uid: int
    owner: Optional[str]
    anchor: ProcessAnchor
    walltime_s: Optional[float] = None
    vo: Optional[str] = None
    scopes: Tuple[str, ...] = ()
    audiences: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        return {
            "job_id": self.job_id, "uid": self.uid, "owner": self.owner,
            "anchor_pid": self.anchor.pid, "anchor_start_ticks": self.anchor.start_ticks,
            "walltime_s": self.walltime_s, "vo": self.vo, "scopes": list(self.scopes),
            "audiences": list(self.audiences),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], anchor: Optional[ProcessAnchor] = None
                  ) -> JobIdentity:
        """A job from its JSON object (a ``register`` request, or the broker's own record).

        ``anchor``: the anchor the broker read from ``/proc`` itself (a register request
        names only the pid); else the recorded one.

        Raises:
            IdentityError: a missing or mistyped field.
        """
        try:
            job_id, uid = _job_id(data["job_id"]), _uid(data["uid"])
            if anchor is None:
                anchor = ProcessAnchor(int(data["anchor_pid"]), int(data["anchor_start_ticks"]))
            walltime = _walltime(data.get("walltime_s"))
            owner, vo = _text("owner", data.get("owner")), _text("vo", data.get("vo"))
            return cls(job_id=job_id, uid=uid, owner=owner, anchor=anchor, walltime_s=walltime,
                       vo=vo, scopes=_texts("scopes", data.get("scopes")),
                       audiences=_texts("audiences", data.get("audiences")))
        except (KeyError, TypeError, ValueError) as exc:
            raise IdentityError(f"not a job description: {printable(str(exc))}") from None


def _job_id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 200 or not value.isprintable():
        raise ValueError("job_id must be a printable string of 1-200 characters")
    return value


def _uid(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("uid must be a whole number >= 0")
    return value


def _walltime(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
        raise ValueError("walltime_s must be a positive number of seconds")
    return float(value)


def _text(name: str, value: Any) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _texts(name: str, value: Any) -> Tuple[str, ...]:
    value = value or ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return tuple(value)


class IdentityResolver(Protocol):
    def resolve(self, peer: PeerCred) -> JobIdentity:
        """The job ``peer`` belongs to.

        Raises:
            IdentityError: the peer is no job this resolver knows.
        """


def is_trusted(peer: PeerCred, broker_uid: int) -> bool:
    """Whether ``peer`` may speak for jobs (register, name one): root or the broker's uid.

    A pilot that runs the broker under its own uid shares that uid with its payloads, so
    there every payload is trusted: the cost gain without the trust gain (docs/broker.md).
    """
    return peer.uid in (0, broker_uid)


def peer_cred(sock: socket.socket) -> PeerCred:
    """The kernel's credentials of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


def split_stat(text: str) -> Optional[Tuple[str, List[str]]]:
    """The text of ``/proc/PID/stat`` as (command name, the fields after it), None when
    it is not one. The name may hold spaces and parentheses: the last ``)`` ends it.
    In the fields, index 0 is field 3 (state), 1 the ppid, 19 the start time.

    The one parser of that file: the broker's anchors and the HTCondor resolver's
    process walk both read it.
    """
    left, right = text.find("("), text.rfind(")")
    fields = text[right + 1 :].split()
    if left < 0 or right < left or len(fields) < 20:
        return None
    return text[left + 1 : right], fields


def _stat_fields(pid: int) -> Optional[List[str]]:
    """``/proc/PID/stat`` fields after the command name (None: gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    split = split_stat(text)
    return None if split is None else split[1]


def anchor_of(pid: int) -> Optional[ProcessAnchor]:
    """The anchor for a live process (None: no such process, or already a zombie)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return ProcessAnchor(pid, int(fields[19]))


def anchor_alive(anchor: ProcessAnchor) -> bool:
    """Whether the anchor process still runs (a zombie has ended; a reused pid is another)."""
    return anchor_of(anchor.pid) == anchor


def ancestors(pid: int) -> List[ProcessAnchor]:
    """``pid`` itself and its ancestors up to pid 1, nearest first (empty: ``pid`` is gone)."""
    chain: List[ProcessAnchor] = []
    current = pid
    while current > 0 and len(chain) < _MAX_DEPTH:
        fields = _stat_fields(current)
        if fields is None:
            break
        chain.append(ProcessAnchor(current, int(fields[19])))
        if current == 1:
            break
        current = int(fields[1])
    return chain


def _process_uids(pid: int) -> Optional[Tuple[int, int]]:
    """The real and effective uid of ``pid`` (``/proc/PID/status``), None when gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f.read().decode("ascii", "replace").splitlines():
                if line.startswith("Uid:"):
                    values = line.split()[1:3]
                    return int(values[0]), int(values[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def caller_anchor(peer: PeerCred, anchor_pid: Optional[int] = None) -> ProcessAnchor:
    """The anchor a job names for itself (``adopt``): the caller or one of its ancestors,
    running as the caller's uid; by default the caller's parent (ARC's job script, whose
    shell runs the RTE's stage 1 as a function).

    Why this and no more: the caller cannot pick a process it does not descend from (a
    stranger's process, whose life would then decide its job's), nor one of another
    uid (a starter or a daemon of root, which would outlive the job and so keep its
    mytoken alive). The start time comes from ``/proc``, as for ``register``.

    Raises:
        IdentityError: the caller is gone, ``anchor_pid`` is not it or an ancestor, or
            that process runs as another uid (or has no parent to default to).
    """
    chain = ancestors(peer.pid)
    if not chain:
        raise IdentityError(f"process {peer.pid} ended before its request was read")
    if anchor_pid is None:
        if len(chain) < 2:
            raise IdentityError(f"process {peer.pid} has no parent to anchor its job to")
        anchor = chain[1]
    else:
        found = [a for a in chain if a.pid == anchor_pid]
        if not found:
            raise IdentityError(f"process {anchor_pid} is not process {peer.pid} or one of "
                                "its ancestors")
        anchor = found[0]
    if anchor.pid <= 1 or _process_uids(anchor.pid) != (peer.uid, peer.uid):
        raise IdentityError(f"anchor process {anchor.pid} does not run as uid {peer.uid}")
    if not anchor_alive(anchor):  # the uid read above may be a recycled pid's
        raise IdentityError(f"anchor process {anchor.pid} has ended")
    return anchor


class RegisteredJobs:
    """The built-in resolver: jobs a trusted caller registered, matched by uid and ancestry.

    Trusted: a peer whose uid is the broker's own (a pilot running the broker for its
    payloads) or root (a site's hook). Anyone else who registers gets ``IdentityError``.
    """

    def __init__(self, broker_uid: Optional[int] = None) -> None:
        self.broker_uid = os.geteuid() if broker_uid is None else broker_uid
        self._jobs: Dict[str, JobIdentity] = {}
        self._lock = threading.Lock()

    def register(self, peer: PeerCred, job: Mapping[str, Any]) -> JobIdentity:
        """Register ``job`` (a ``register`` request's object) on a trusted peer's word.

        The anchor's start time is read here, from ``/proc``: the caller names a pid,
        the kernel says which process that is.

        Raises:
            IdentityError: an untrusted peer, a malformed job, an anchor that is not
                running, or a job id already registered with another anchor or uid.
        """
        if not is_trusted(peer, self.broker_uid):
            raise IdentityError(f"uid {peer.uid} may not register jobs (only root or the "
                                f"broker's uid {self.broker_uid})")
        pid = job.get("anchor_pid")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
            raise IdentityError("not a job description: anchor_pid must be a pid > 1")
        anchor = anchor_of(pid)
        if anchor is None:
            raise IdentityError(f"anchor process {pid} is not running")
        identity = JobIdentity.from_dict(job, anchor)
        self.add(identity)
        return identity

    def add(self, identity: JobIdentity) -> None:
        """Know ``identity`` (a registration, or one the broker reloads after a restart).

        Raises:
            IdentityError: the job id is registered already for another anchor or uid.
        """
        with self._lock:
            known = self._jobs.get(identity.job_id)
            if known is not None and (known.anchor, known.uid) != (identity.anchor,
                                                                   identity.uid):
                raise IdentityError(f"job {identity.job_id} is registered already with "
                                    "another anchor or uid")
            self._jobs[identity.job_id] = identity

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def known(self, job_id: str) -> Optional[JobIdentity]:
        with self._lock:
            return self._jobs.get(job_id)

    def resolve(self, peer: PeerCred) -> JobIdentity:
        """The registered job whose anchor is the nearest ancestor of ``peer`` (its uid).

        Raises:
            IdentityError: no registered job of the peer's uid has an anchor among the
                peer's ancestors.
        """
        with self._lock:
            mine = {j.anchor: j for j in self._jobs.values() if j.uid == peer.uid}
        if mine:
            for anchor in ancestors(peer.pid):
                if anchor in mine:
                    return mine[anchor]
        raise IdentityError(f"process {peer.pid} (uid {peer.uid}) belongs to no job "
                            "registered with this broker")
