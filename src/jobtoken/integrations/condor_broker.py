"""HTCondor side of the node broker: who a caller is, from HTCondor's own records.

The broker (``jobtoken broker serve``, root, started by ``condor_master``) is asked over
its socket by a job's hook or payload. Nothing the job wrote counts for who it is. The
caller's pid (``SO_PEERCRED``) leads up its process ancestry to the ``condor_starter``
that runs it; that starter's command line names its slot (``-a slotN_M`` by default,
``-slot-name slotN_M`` when ``STARTER_LOG_NAME_APPEND`` is set; HTCondor 23.9
``Starter::execDCStarter``); the slot's ad is read **from the startd directly** (its
address file, not the collector, which others may advertise to). The job cannot write
that ad's identity: ``GlobalJobId``, ``JobId`` and ``RemoteOwner`` come from the claim,
and the job attributes listed in ``STARTD_JOB_ATTRS`` are the startd's copy of the ad the
schedd sent at activation, updated only by the starter's reports: its usage figures and
the job's delayed Chirp attributes (``CHIRP_DELAYED_UPDATE_PREFIX``, default ``Chirp*``,
which none of ours may match; 23.9 ``Claim::receiveJobClassAdUpdate``). The anchor, whose end is
the job's end, is the starter process (pid and start time): it lives exactly as long as
the job's sandbox ``$(EXECUTE)/dir_<starter pid>``.

A caller is refused unless: the first process up its ancestry that does not run as the
caller's uid is a ``condor_starter`` with real uid 0 (a job cannot make a root process),
whose parent is a ``condor_startd``; the slot's ad says Claimed, with that job's
``HookKeyword = "JOBTOKEN"`` (jobs that did not ask are never served); and the caller is
not root.

Must NOT: import htcondor at module level; trust a file in the sandbox, the job's
environment or the job ad on a hook's stdin for identity; hold policy of its own (the
scopes, wall time and VO rules are ``condor.job_request_from_ad``'s and ``_prepare``'s).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

from .._brokeridentity import JobIdentity, PeerCred, ProcessAnchor, split_stat
from .._config import Config
from .._errors import ConfigError, IdentityError
from ._condor_bindings import bindings, condor_param
from .condor import HOOK_KEYWORD, job_request_from_ad

__all__ = [
    "STARTD_JOB_ATTRIBUTES",
    "CondorJobs",
    "NotAJob",
    "ProcessInfo",
    "SlotJob",
    "find_starter",
    "make_resolver",
    "process_chain",
    "read_process",
    "slot_from_starter_argv",
    "slot_job_from_ad",
]

STARTER_NAME = "condor_starter"
STARTD_NAME = "condor_startd"
# The job attributes the resolver reads from the slot ad; the shipped broker snippet puts
# them into STARTD_JOB_ATTRS (the startd copies them from its job ad into the slot ad).
STARTD_JOB_ATTRIBUTES: Tuple[str, ...] = (
    "HookKeyword",
    "AllowedExecuteDuration",
    "AllowedJobDuration",
    "MaxWallTimeMins",
    "x509UserProxyVOName",
    "AcctGroup",
    "JobtokenScope",
    "JobtokenPath",
    "JobtokenAudience",
)
_SLOT_NAME = re.compile(r"slot[0-9]+(_[0-9]+)?")
_MAX_DEPTH = 256


class NotAJob(Exception):
    """The caller is not (or no longer) an HTCondor job that asked for a token: why."""


@dataclass(frozen=True)
class ProcessInfo:
    """One process as /proc shows it: enough to tell a starter from a job's process."""

    pid: int
    ppid: int
    start_ticks: int  # /proc/PID/stat field 22: a reused pid never has the same one
    name: str  # comm
    real_uid: int
    argv: Tuple[str, ...]


@dataclass(frozen=True)
class SlotJob:
    """What the startd's slot ad says about the job running in it."""

    slot: str
    job_id: str  # GlobalJobId
    owner: Optional[str]  # RemoteOwner without @domain
    walltime_s: Optional[float]
    vo: Optional[str]
    scopes: Tuple[str, ...]
    audiences: Tuple[str, ...]


# --- /proc ----------------------------------------------------------------------------------


def read_process(pid: int, proc: str = "/proc") -> ProcessInfo:
    """The process's parent, start time, name, real uid and argv.

    Raises:
        NotAJob: the process is gone (or /proc unreadable).
    """
    base = f"{proc}/{pid}"
    try:
        with open(f"{base}/stat", "rb") as fh:
            stat = fh.read().decode("utf-8", "replace")
        with open(f"{base}/status", "rb") as fh:
            status = fh.read().decode("utf-8", "replace")
        with open(f"{base}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        raise NotAJob(f"process {pid} is gone") from None
    split = split_stat(stat)
    if split is None:
        raise NotAJob(f"process {pid}: unreadable /proc stat")
    name, fields = split
    real_uid = -1
    for line in status.splitlines():
        if line.startswith("Uid:"):
            real_uid = int(line.split()[1])
            break
    argv = tuple(a.decode("utf-8", "replace") for a in cmdline.split(b"\0")[:-1])
    return ProcessInfo(
        pid=pid,
        ppid=int(fields[1]),
        start_ticks=int(fields[19]),
        name=name,
        real_uid=real_uid,
        argv=argv,
    )


def process_chain(pid: int, read: Callable[[int], ProcessInfo] = read_process) -> List[ProcessInfo]:
    """The process and its ancestors, nearest first, up to (not including) pid 1.

    A parent that started after its child is a reused pid (the real parent ended): the
    walk stops there, so a dead starter's pid taken by another process is never found.
    """
    chain: List[ProcessInfo] = []
    current = read(pid)
    while True:
        chain.append(current)
        if current.ppid <= 1 or len(chain) >= _MAX_DEPTH:
            return chain
        try:
            parent = read(current.ppid)
        except NotAJob:
            return chain
        if parent.start_ticks > current.start_ticks:
            return chain
        current = parent


# --- pure rules -----------------------------------------------------------------------------


def slot_from_starter_argv(argv: Sequence[str]) -> Optional[str]:
    """The slot a starter serves, from the command line the startd gave it.

    ``-slot-name X`` when present (``STARTER_LOG_NAME_APPEND`` set), else ``-a X`` when X
    is a slot name (the default). None when neither names a slot.
    """
    found: Optional[str] = None
    for i, arg in enumerate(argv[:-1]):
        value = argv[i + 1]
        if arg == "-slot-name" and _SLOT_NAME.fullmatch(value):
            return value
        if arg == "-a" and found is None and _SLOT_NAME.fullmatch(value):
            found = value
    return found


def find_starter(chain: Sequence[ProcessInfo], caller_uid: int) -> Tuple[ProcessInfo, str]:
    """The caller's starter and its slot.

    The first process up the chain that does not run as the caller's uid must be a
    root ``condor_starter`` whose parent is a ``condor_startd``: anything else (a
    process outside a job, a docker job's payload under containerd, a fake starter of
    the job's own uid) is refused.

    Raises:
        NotAJob: with the reason.
    """
    if caller_uid == 0:
        raise NotAJob("root is never a job")
    for index, process in enumerate(chain):
        if process.real_uid == caller_uid:
            continue
        if process.name != STARTER_NAME or process.real_uid != 0:
            raise NotAJob(
                f"process {chain[0].pid} does not run under a condor_starter (first other "
                f"owner up its ancestry: pid {process.pid} {process.name!r})"
            )
        parent = chain[index + 1] if index + 1 < len(chain) else None
        if parent is None or parent.name != STARTD_NAME:
            raise NotAJob(f"condor_starter {process.pid} was not started by a condor_startd")
        slot = slot_from_starter_argv(process.argv)
        if slot is None:
            raise NotAJob(f"condor_starter {process.pid} names no slot on its command line")
        return process, slot
    raise NotAJob(f"process {chain[0].pid if chain else '?'} does not run under a condor_starter")


def _attr(ad: Any, name: str) -> Any:
    if name not in ad:
        return None
    try:
        return ad.eval(name)
    except Exception:
        return None


def slot_job_from_ad(ad: Any, slot: str) -> SlotJob:
    """The job the slot ad describes, under the same rules as the prepare hook's job ad.

    Raises:
        NotAJob: the slot is not running a job that asked (``HookKeyword``).
        ConfigError: the job's wishes break the rules (``job_request_from_ad``).
    """
    name = _attr(ad, "Name")
    if not isinstance(name, str) or name.split("@", 1)[0] != slot:
        raise NotAJob(f"the startd's ad is not {slot}'s")
    if _attr(ad, "State") != "Claimed":
        raise NotAJob(f"{slot} runs no job")
    keyword = _attr(ad, "HookKeyword")
    if not isinstance(keyword, str) or keyword.upper() != HOOK_KEYWORD:
        raise NotAJob(
            f"the job in {slot} did not ask for a token (HookKeyword {HOOK_KEYWORD}; is "
            "HookKeyword in STARTD_JOB_ATTRS?)"
        )
    request = job_request_from_ad(ad)
    owner = _attr(ad, "RemoteOwner")
    return SlotJob(
        slot=slot,
        job_id=request.job.job_id,
        owner=owner.split("@", 1)[0] if isinstance(owner, str) and owner else None,
        walltime_s=request.job.walltime_s,
        vo=request.job.vo,
        scopes=request.job.scopes,
        audiences=request.job.audiences,
    )


def pick_slot_ad(ads: Iterable[Any], slot: str) -> Any:
    """The one ad among a startd's slot ads whose ``Name`` is ``slot@...``.

    Raises:
        NotAJob: none.
    """
    for ad in ads:
        name = _attr(ad, "Name")
        if isinstance(name, str) and name.split("@", 1)[0] == slot:
            return ad
    raise NotAJob(f"the startd has no slot {slot}")


# --- the startd -----------------------------------------------------------------------------

_PROJECTION = ("Name", "State", "JobId", "GlobalJobId", "RemoteOwner", "RemoteUser",
               *STARTD_JOB_ATTRIBUTES)


def startd_address(param: Optional[Callable[[str], Optional[str]]] = None) -> str:
    """The local startd's address, from the file it writes (``STARTD_ADDRESS_FILE``).

    Raises:
        ConfigError: no such file.
    """
    param = param or condor_param
    path = param("STARTD_ADDRESS_FILE")
    if not path:
        log = param("LOG")
        path = f"{log}/.startd_address" if log else None
    if not path:
        raise ConfigError("no STARTD_ADDRESS_FILE in the HTCondor configuration")
    try:
        with open(path, encoding="utf-8") as fh:
            address = fh.readline().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the startd's address {path}: {exc.strerror}") from None
    if not address.startswith("<"):
        raise ConfigError(f"{path} holds no startd address")
    return address


def query_startd_slots(slot: str) -> List[Any]:
    """The local startd's slot ads, asked of the startd itself (not the collector).

    Raises:
        ConfigError: no bindings, no address; NotAJob: the startd does not answer.
    """
    module = bindings()
    if module is None:
        raise ConfigError("the HTCondor Python bindings are needed for identity=condor")
    ad_types = getattr(module, "AdType", None) or module.AdTypes
    collector = module.Collector(startd_address())
    try:
        return list(collector.query(ad_types.Startd, "true", list(_PROJECTION)))
    except Exception as exc:  # the bindings raise their own types for a refused query
        raise NotAJob(f"the startd does not answer about {slot}: {exc}") from None


# --- the resolver ---------------------------------------------------------------------------


class CondorJobs:
    """``broker.identity = "condor"``: a caller is the job its ``condor_starter`` runs.

    Every request is resolved afresh (a few /proc reads and one query to the local
    startd), so nothing a job did before, and nothing the broker remembered, can make it
    another job.
    """

    def __init__(
        self,
        *,
        query: Callable[[str], List[Any]] = query_startd_slots,
        read: Callable[[int], ProcessInfo] = read_process,
    ) -> None:
        self._query = query
        self._read = read

    def resolve(self, peer: PeerCred) -> JobIdentity:
        """The job ``peer`` belongs to.

        Raises:
            IdentityError: not a process of a job that asked for a token.
            ConfigError: the job's wishes in its ad break the rules.
        """
        try:
            chain = process_chain(peer.pid, read=self._read)
            starter, slot = find_starter(chain, peer.uid)
            job = slot_job_from_ad(pick_slot_ad(self._query(slot), slot), slot)
            # the starter must still be the same process after the query: a job that
            # ended meanwhile (and a slot that took the next one) is never mixed up
            if self._read(starter.pid).start_ticks != starter.start_ticks:
                raise NotAJob(f"condor_starter {starter.pid} ended")
        except NotAJob as exc:
            raise IdentityError(f"not an HTCondor job that asked for a token: {exc}") from None
        return JobIdentity(
            job_id=job.job_id,
            uid=peer.uid,
            owner=job.owner,
            anchor=ProcessAnchor(starter.pid, starter.start_ticks),
            walltime_s=job.walltime_s,
            vo=job.vo,
            scopes=job.scopes,
            audiences=job.audiences,
        )


def make_resolver(config: Config) -> CondorJobs:
    """The resolver ``_broker.make_resolver`` loads by name.

    Raises:
        ConfigError: no HTCondor bindings, or no local startd to ask.
    """
    if bindings() is None:
        raise ConfigError("broker.identity = condor needs the HTCondor Python bindings")
    startd_address()  # fail at start, not at the first job
    return CondorJobs()
