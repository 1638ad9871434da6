"""``jobtoken check-config``: is this node set up so that jobs will get their tokens?

One line per check, ``OK|WARN|FAIL|SKIP what - next step``, so a site admin (or a Nagios
check) sees what is wrong *before* the first job is held: the site config (parse, values,
unknown keys), the parent mytoken file (place, owner, mode, claims, capabilities, lifetime
against ``site.max_walltime_s``), the Mytoken server (its discovery document over verified
TLS), and the installed HTCondor hooks and ARC RTE.

The judgements (``judge_*``) are pure: facts in, checks out, so they are tested with
tables. The gathering (``run_checks``) does the I/O. Nothing here prints a secret: the
parent mytoken is read to look at its claims and never leaves this process; it is never
sent to the server either (a rotating parent would be rotated by a mere introspection).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Set

from ._config import DEFAULT_CONFIG_PATH, Config, SiteConfig
from ._errors import JobtokenError
from ._policy import MIN_JOB_MYTOKEN_S, Health, worst_health

if TYPE_CHECKING:  # the client (httpx) is imported only when the server is checked
    from ._mytoken import ServerMetadata

__all__ = [
    "Check",
    "CheckOptions",
    "as_json",
    "as_text",
    "NEEDED_CAPABILITIES",
    "judge_config",
    "judge_file",
    "judge_no_parent",
    "judge_parent_claims",
    "judge_server",
    "overall",
    "run_checks",
]

#: What ``prepare`` and the HTCondor/ARC integrations do with the parent mytoken:
#: mint job mytokens (``create_mytoken``) that may get access tokens (``AT``: a
#: sub-mytoken holds no capability its parent lacks).
NEEDED_CAPABILITIES = ("AT", "create_mytoken")
#: Lets the CE revoke a job's mytoken by name after ``arckill`` or a lost node.
USEFUL_CAPABILITIES = (("tokeninfo", "tokeninfo:subtokens"),)

_LABELS = {Health.OK: "OK", Health.WARNING: "WARN", Health.CRITICAL: "FAIL"}
_HOOK_KNOBS = ("JOBTOKEN_HOOK_PREPARE_JOB", "JOBTOKEN_HOOK_UPDATE_JOB_INFO",
               "JOBTOKEN_HOOK_JOB_EXIT", "USER_JOB_WRAPPER", "SEC_CREDENTIAL_STORER",
               "JOBTOKEN_CREDMON")
_EVERY_JOB_KEYWORD_KNOBS = ("STARTER_DEFAULT_JOB_HOOK_KEYWORD", "STARTER_JOB_HOOK_KEYWORD")
_ARC_RTE = Path("ENV") / "JOBTOKEN"
_PACKAGED_RTE = Path("/usr/share/arc/rte/ENV/JOBTOKEN")


@dataclass(frozen=True)
class Check:
    """The outcome of one check. ``skipped``: nothing to check here (no ARC, no HTCondor)."""

    name: str
    health: Health
    what: str
    next_step: str = ""
    skipped: bool = False

    @property
    def label(self) -> str:
        return "SKIP" if self.skipped else _LABELS.get(self.health, "UNKNOWN")

    def line(self) -> str:
        return f"{self.label} {self.name}: {self.what}" + (
            f" - {self.next_step}" if self.next_step else "")

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "status": self.label, "what": self.what,
                "next_step": self.next_step}


def _ok(name: str, what: str) -> Check:
    return Check(name, Health.OK, what)


def _warn(name: str, what: str, step: str) -> Check:
    return Check(name, Health.WARNING, what, step)


def _fail(name: str, what: str, step: str) -> Check:
    return Check(name, Health.CRITICAL, what, step)


def _skip(name: str, what: str) -> Check:
    return Check(name, Health.OK, what, skipped=True)


def overall(checks: Sequence[Check]) -> Health:
    """The verdict of all checks (exit code: 0 OK, 1 WARN, 2 FAIL)."""
    return worst_health(c.health for c in checks)


@dataclass(frozen=True)
class CheckOptions:
    """What to check; the defaults are the system's places."""

    parent_file: Optional[str] = None  # default site.parent_mytoken_file
    online: bool = True  # ask the server for its discovery document
    arc_conf: Path = Path("/etc/arc.conf")
    jobtoken_bin: Path = Path("/usr/bin/jobtoken")  # where the hooks and the RTE look


# --- pure judgements -------------------------------------------------------------------------


def judge_config(config: Config) -> List[Check]:
    """Values that parse but cannot work together (the parser checked each on its own)."""
    site, renewal, name = config.site, config.renewal, "config"
    checks: List[Check] = []
    where = config.source or "defaults and JOBTOKEN_* variables"
    if site.default_walltime_s > site.max_walltime_s:
        checks.append(_fail(name, f"site.default_walltime_s ({site.default_walltime_s:g}) is "
                            f"above site.max_walltime_s ({site.max_walltime_s:g})",
                            f"lower site.default_walltime_s in {where}"))
    if site.expected_at_lifetime_s < 60:
        checks.append(_warn(name, f"site.expected_at_lifetime_s is {site.expected_at_lifetime_s:g}"
                            " s: job mytokens get a huge usages_AT budget",
                            "set it to the OP's access-token lifetime (WLCG: 1200)"))
    if renewal.margin_s * 3 > site.expected_at_lifetime_s:
        checks.append(_warn(name, f"renewal.margin_s ({renewal.margin_s:g} s) is over a third "
                            f"of the access-token lifetime ({site.expected_at_lifetime_s:g} s): "
                            "it is cut to a third", "lower renewal.margin_s"))
    if site.max_mytoken_lifetime_s is not None and (
            site.max_mytoken_lifetime_s < site.max_walltime_s):
        checks.append(_warn(name, "site.max_mytoken_lifetime_s is below site.max_walltime_s: the "
                            "longest jobs outlive their mytoken",
                            "lower site.max_walltime_s or ask the server operator"))
    if not checks:
        checks.append(_ok(name, f"{where} parses and its values fit together"))
    return checks


def judge_file(name: str, path: str, st: os.stat_result, *, link: bool, euid: int,
               secret: bool) -> List[Check]:
    """Place, owner and mode of a file root's jobs or hooks rely on.

    ``secret``: a mytoken (0600 or 0400; group-read is allowed for a robot mytoken shared
    with the job accounts' group, and worth a warning); else an executable hook.
    """
    mode = stat.S_IMODE(st.st_mode)
    if link:
        return [_fail(name, f"{path} is a symlink", "put the file itself there (a privileged "
                      "reader must not follow a link someone else may redirect)")]
    if not stat.S_ISREG(st.st_mode):
        return [_fail(name, f"{path} is not a regular file", "put the file there")]
    if st.st_uid not in (0, euid):
        return [_fail(name, f"{path} is owned by uid {st.st_uid}",
                      f"chown root (or the account that runs jobtoken) {path}")]
    if secret:
        return [_judge_secret_mode(name, path, mode, st.st_uid)]
    return [_judge_hook_mode(name, path, mode)]


def _judge_secret_mode(name: str, path: str, mode: int, uid: int) -> Check:
    """A mytoken file: 0600 or 0400; group-read only warned about (a shared robot mytoken)."""
    if mode & 0o007:
        return _fail(name, f"{path} has mode {mode:04o}: every local user can read it",
                     f"chmod 600 {path} and create a new mytoken (this one may be copied)")
    if mode & 0o022 or mode & 0o111:
        return _fail(name, f"{path} has mode {mode:04o}", f"chmod 600 {path} (0400 also works)")
    if mode & 0o040:
        return _warn(name, f"{path} has mode {mode:04o}: group-readable",
                     "fine only if that group is just the job accounts that must read it; "
                     f"else chmod 600 {path}")
    return _ok(name, f"{path} is a regular file of uid {uid}, mode {mode:04o}")


def _judge_hook_mode(name: str, path: str, mode: int) -> Check:
    """A hook root runs: executable, and writable by its owner only."""
    if mode & 0o022:
        return _fail(name, f"{path} has mode {mode:04o}: others may change what root runs",
                     f"chmod go-w {path}")
    if not mode & 0o100:
        return _fail(name, f"{path} is not executable", f"chmod 755 {path}")
    return _ok(name, f"{path} mode {mode:04o}")


def judge_no_parent(name: str, config: Config) -> Check:
    """No parent mytoken file is set: a gap, except on an adopting worker node.

    A broker with ``broker.adopt`` takes over job mytokens minted on the CE (ARC's stage
    0) and revokes each by itself, so such a node is set up right without a parent.
    """
    if config.broker.adopt:
        return _skip(name, "site.parent_mytoken_file is not set, and none is needed with "
                     "broker.adopt = true: the broker takes over job mytokens minted on the "
                     "CE (set it only if this node also prepares jobs)")
    return _warn(name, "site.parent_mytoken_file is not set",
                 "set it (prepare, the HTCondor hooks and the ARC RTE need it) or "
                 "give --parent-mytoken-file")


def judge_parent_claims(claims: Optional[Mapping[str, Any]], now: float,
                        site: SiteConfig) -> List[Check]:
    """What the parent mytoken's own claims promise (None: a short, opaque mytoken)."""
    name = "parent mytoken"
    if claims is None:
        return [_warn(name, "a short (opaque) mytoken: its capabilities and expiry cannot be "
                      "read here", "check them with 'mytoken tokeninfo' (as its owner)")]
    checks: List[Check] = []
    caps = _capability_set(claims.get("capabilities"))
    missing = [c for c in NEEDED_CAPABILITIES if c not in caps]
    if missing:
        checks.append(_fail(name, f"lacks capabilities {', '.join(missing)} (has "
                            f"{', '.join(sorted(caps)) or 'none'})",
                            "create a new mytoken with capabilities AT, create_mytoken, tokeninfo"))
    checks.extend(
        _warn(name, f"lacks capability {capability}: a job mytoken left by arckill or a lost "
              "node cannot be found and revoked by name", "create the next parent with tokeninfo")
        for capability in _lacking_useful(caps)
    )
    checks.append(_judge_parent_expiry(name, claims.get("exp"), now, site.max_walltime_s))
    if not missing:
        checks.append(_ok(name, f"has capabilities {', '.join(sorted(caps))}"))
    return checks


def _capability_set(value: Any) -> Set[str]:
    return {c for c in value or () if isinstance(c, str)}


def _lacking_useful(caps: Set[str]) -> List[str]:
    """The first name of each useful capability none of whose spellings ``caps`` holds."""
    return [alternatives[0] for alternatives in USEFUL_CAPABILITIES
            if not caps & set(alternatives)]


def _judge_parent_expiry(name: str, exp: Any, now: float, max_walltime_s: float) -> Check:
    """Whether the parent outlives the longest job (no number: it does not expire)."""
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        return _ok(name, "does not expire")
    left = float(exp) - now
    if left <= 0:
        return _fail(name, f"expired {int(-left)} s ago", "create a new mytoken")
    if left < MIN_JOB_MYTOKEN_S:
        return _fail(name, f"expires in {int(left)} s: too soon for any job",
                     "create a new mytoken")
    if left < max_walltime_s:
        return _warn(name, f"expires in {int(left)} s, before a job of "
                     f"site.max_walltime_s ({max_walltime_s:g} s) would end: "
                     "such jobs get a shorter-lived job mytoken",
                     "create a new mytoken soon")
    return _ok(name, f"expires in {int(left // 86400)} d")


# --- gathering -------------------------------------------------------------------------------


def run_checks(config: Optional[Config], config_error: Optional[JobtokenError],
               options: CheckOptions, *, now: float, condor: Any = None) -> List[Check]:
    """Every check, in the order an admin fixes things.

    ``config`` is the loaded settings (None when loading failed with ``config_error``;
    the later checks then use the defaults). ``condor``: the HTCondor bindings module
    (None: whichever this host has, if any).
    """
    checks: List[Check] = []
    if config_error is not None:
        checks.append(_fail("config", config_error.message, "fix the file, then run again"))
        config = Config()
    else:
        assert config is not None
        if config.source is None and not DEFAULT_CONFIG_PATH.is_file():
            checks.append(_warn("config", f"no config file ({DEFAULT_CONFIG_PATH} is missing)",
                                f"create {DEFAULT_CONFIG_PATH} (jobtoken install-files --print "
                                "jobtoken.toml is an example)"))
        checks.extend(judge_config(config))
        checks.extend(_check_paths(config))
    parent = options.parent_file or config.site.parent_mytoken_file
    claims = _check_parent(parent, config, now, checks)
    if options.online:
        checks.extend(_check_server(config, claims))
    else:
        checks.append(_skip("server", "not asked (--offline)"))
    installed = _check_condor(config, condor) + _check_arc(options)
    checks.extend(installed)
    if any(not c.skipped for c in installed) and not os.access(options.jobtoken_bin, os.X_OK):
        checks.append(_warn("install", f"{options.jobtoken_bin} is missing: the hooks and the "
                            "RTE run it", "install the jobtoken package, or point the hooks "
                            "and JOBTOKEN_BIN at the jobtoken command"))
    return checks


def _check_paths(config: Config) -> List[Check]:
    """The files and directories the settings name exist as what they must be."""
    checks: List[Check] = []
    wanted = (("server.ca_file", config.server.ca_file, os.path.isfile),
              ("server.ca_dir", config.server.ca_dir, os.path.isdir),
              ("site.token_dir_base", config.site.token_dir_base, os.path.isdir),
              ("renewal.metrics_dir", config.renewal.metrics_dir, os.path.isdir))
    for key, value, exists in wanted:
        if value and not exists(value):
            checks.append(_fail("config", f"{key} = {value} does not exist",
                                f"create it or fix {key}"))
    metrics = config.renewal.metrics_dir
    if metrics and os.path.isdir(metrics):
        st = os.stat(metrics)
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o1777:
            checks.append(_warn("config", f"renewal.metrics_dir {metrics} has uid {st.st_uid}, "
                                f"mode {stat.S_IMODE(st.st_mode):04o}: every job account "
                                "writes there", f"chown root {metrics}; chmod 1777 {metrics}"))
    return checks


def _check_parent(parent: Optional[str], config: Config, now: float,
                  checks: List[Check]) -> Optional[Mapping[str, Any]]:
    """Append the parent mytoken's checks; returns its claims (None: none readable)."""
    from ._mytokenfile import MytokenSource, load_mytoken
    from ._tokens import unverified_claims

    name = "parent mytoken"
    if not parent:
        checks.append(judge_no_parent(name, config))
        return None
    try:
        st = os.lstat(parent)
    except FileNotFoundError:
        checks.append(_fail(name, f"{parent} does not exist",
                            "create a mytoken there (capabilities AT, create_mytoken, tokeninfo)"))
        return None
    except OSError as exc:
        checks.append(_fail(name, f"{parent}: {exc.strerror}", "run as root or its owner"))
        return None
    judged = judge_file(name, parent, st, link=stat.S_ISLNK(st.st_mode), euid=os.geteuid(),
                        secret=True)
    checks.extend(judged)
    if judged[0].health is Health.CRITICAL:
        return None
    if not os.access(parent, os.R_OK):
        checks.append(_warn(name, f"{parent} is not readable by uid {os.geteuid()}: its claims "
                            "were not checked", "run check-config as root or as the account "
                            "that runs prepare"))
        return None
    try:
        mytoken = load_mytoken(MytokenSource(path=Path(parent)), allow_other_owner=True)
    except JobtokenError as exc:
        checks.append(_fail(name, exc.message, "put a mytoken (not an access token) there"))
        return None
    claims = unverified_claims(mytoken) if mytoken.count(".") == 2 else None
    checks.extend(judge_parent_claims(claims, now, config.site))
    return claims


def _check_server(config: Config, claims: Optional[Mapping[str, Any]]) -> List[Check]:
    """The server's discovery document, fetched as ``prepare`` would (verified TLS)."""
    from ._oneshot import client_for

    name = "server"
    url = config.server.url or (claims or {}).get("iss")
    if not isinstance(url, str) or not url:
        return [_fail(name, "no Mytoken server: server.url is not set and the parent mytoken "
                      "does not name one", "set server.url")]
    try:
        with client_for(config.server, url) as client:
            found = client.metadata()
    except JobtokenError as exc:
        return [_fail(name, exc.message, "check the URL, the network and the CA "
                      "(server.ca_file / --ca-file)")]
    return judge_server(name, url, found, (claims or {}).get("iss"))


def judge_server(name: str, url: str, found: ServerMetadata, issuer: Any) -> List[Check]:
    """What the discovery document says: the parent's issuer, and revocation by name."""
    checks = [_ok(name, f"{url} answers its discovery document"
                  + (f" (Mytoken {found.version})" if found.version else ""))]
    if isinstance(issuer, str) and issuer.rstrip("/") != found.issuer.rstrip("/"):
        checks.append(_fail(name, f"the parent mytoken is from {issuer}, not this server "
                            f"({found.issuer})", "fix server.url or the parent mytoken"))
    if found.tokeninfo_endpoint is None:
        checks.append(_warn(name, "the server offers no tokeninfo endpoint: leftover job "
                            "mytokens cannot be found by name", "ask the server operator"))
    return checks


def _param(module: Any, knob: str) -> Optional[str]:
    from .integrations._condor_bindings import condor_param

    return condor_param(knob, module=module)


def _check_condor(config: Config, condor: Any) -> List[Check]:
    """The jobtoken knobs in the HTCondor configuration the bindings read."""
    from .integrations._condor_bindings import bindings

    name = "htcondor"
    module = condor if condor is not None else bindings()
    if module is None:
        return [_skip(name, "no HTCondor Python bindings here")]
    ours = _jobtoken_knobs({knob: _param(module, knob) for knob in _HOOK_KNOBS})
    checks = _judge_default_keywords(
        name, {knob: _param(module, knob) for knob in _EVERY_JOB_KEYWORD_KNOBS}
    )
    if not ours:
        return checks or [_skip(name, "no jobtoken hooks in the HTCondor configuration")]
    for knob, path in sorted(ours.items()):
        checks.extend(_check_hook_file(name, knob, path.split()[0]))
    checks.extend(_judge_hooks_config(name, _param(module, "JOBTOKEN_CONFIG"), config.source))
    return checks


def _judge_hooks_config(name: str, hooks_config: Optional[str],
                        checked: Optional[str]) -> List[Check]:
    """The hooks read another config file than this check did: its verdict may not hold."""
    if hooks_config and checked and Path(hooks_config) != Path(checked):
        return [_warn(name, f"the hooks read {hooks_config}, this check read {checked}",
                      f"run jobtoken check-config --config {hooks_config}")]
    return []


def _jobtoken_knobs(values: Mapping[str, Optional[str]]) -> Dict[str, str]:
    """The knobs whose value names a jobtoken program."""
    return {knob: value for knob, value in values.items() if value and "jobtoken" in value}


def _judge_default_keywords(name: str, values: Mapping[str, Optional[str]]) -> List[Check]:
    """A default hook keyword JOBTOKEN would put jobs that never asked through jobtoken."""
    return [
        _fail(name, f"{knob} = JOBTOKEN puts every job through jobtoken",
              f"remove {knob}; jobs ask with +HookKeyword = \"JOBTOKEN\"")
        for knob, value in values.items()
        if (value or "").upper() == "JOBTOKEN"
    ]


def _check_hook_file(name: str, knob: str, executable: str) -> List[Check]:
    try:
        st = os.stat(executable)  # installed by root; the starter checks links itself
    except OSError:
        return [_fail(name, f"{knob} = {executable} does not exist",
                      "install the jobtoken package (or jobtoken install-files)")]
    return judge_file(name, f"{knob} = {executable}", st, link=False, euid=os.geteuid(),
                      secret=False)


def _arc_runtimedir(text: str) -> Optional[str]:
    """``runtimedir`` of the ``[arex]`` block of an arc.conf."""
    block = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            block = line[1:-1].split(":")[0].strip()
        elif block == "arex" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            if key.strip() == "runtimedir":
                return value.strip()
    return None


def _packaged_rte() -> Optional[bytes]:
    """This jobtoken's RTE: the copy a wheel carries, else the distribution package's."""
    from importlib import resources

    carried = resources.files("jobtoken").joinpath("_data", "wrappers", "arc", "ENV", "JOBTOKEN")
    if carried.is_file():
        return carried.read_bytes()
    return _PACKAGED_RTE.read_bytes() if _PACKAGED_RTE.is_file() else None


def _check_arc(options: CheckOptions) -> List[Check]:
    """The ARC RTE in the ``runtimedir`` of arc.conf, compared with the packaged one."""
    name = "arc"
    try:
        text = options.arc_conf.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [_skip(name, f"no {options.arc_conf}")]
    except OSError as exc:
        return [_warn(name, f"{options.arc_conf}: {exc.strerror}", "run as root")]
    runtimedir = _arc_runtimedir(text)
    if not runtimedir:
        return [_warn(name, f"{options.arc_conf} sets no runtimedir in [arex]",
                      "set runtimedir = /etc/arc/rte and copy the RTE there (docs/arc.md)")]
    rte = Path(runtimedir) / _ARC_RTE
    try:
        st = os.lstat(rte)
    except OSError:
        return [_warn(name, f"{rte} is missing: ARC jobs cannot ask for a token",
                      f"cp {_PACKAGED_RTE} {rte} && arcctl rte enable ENV/JOBTOKEN")]
    if stat.S_IMODE(st.st_mode) & 0o022 or st.st_uid not in (0, os.geteuid()):
        return [_fail(name, f"{rte} may be changed by others (uid {st.st_uid}, mode "
                      f"{stat.S_IMODE(st.st_mode):04o}): every job runs it",
                      f"chown root {rte}; chmod 644 {rte}")]
    checks = [_ok(name, f"{rte} is installed")]
    packaged = _packaged_rte()
    if packaged is not None and rte.read_bytes() != packaged:
        checks.append(_warn(name, f"{rte} differs from this jobtoken's RTE",
                            f"copy the new one: cp {_PACKAGED_RTE} {rte}"))
    return checks


def as_json(checks: Sequence[Check]) -> Dict[str, Any]:
    verdict = overall(checks)
    return {"status": _LABELS.get(verdict, "UNKNOWN"), "exit_code": int(verdict),
            "checks": [c.as_dict() for c in checks]}


def as_text(checks: Sequence[Check]) -> str:
    return "\n".join(c.line() for c in checks)
