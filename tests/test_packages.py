"""The Debian packages and the EL9 RPMs build from a copy of the checkout, the RPMs pass
rpmlint, and the .debs install for real: the command, hooks, snippets, RTE, man page,
completion, config and the broker's (not enabled) systemd unit land where the docs name them,
nothing touches HTCondor's active configuration, and purging leaves the machine as it was.
Each comes as two packages: ``jobtoken`` for every node, ``jobtoken-devserver`` (the fake
Mytoken server, a fifth of the Python code) for development and test machines only.

Slow (two package builds, a real apt-get install and purge); root for the install. Under
CI a missing tool or privilege fails; elsewhere it skips with the reason.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from jobtoken.cli import build_parser
from tests.debpackages import APT, PACKAGING, ROOT
from tests.debpackages import run as _run
from tests.prerequisites import need

LIBEXEC_SCRIPTS = sorted(p.name for p in (ROOT / "condor").glob("jobtoken-*"))
SNIPPETS = sorted(p.name for p in (ROOT / "condor" / "config.d").glob("*.conf"))

UNIT = "jobtoken-broker.service"
# /lib/systemd/system on Debian 12 (debhelper's choice there), /usr/lib/... on Debian 13 and
# EL9: one directory on a merged-/usr system
UNIT_PATH = f"/usr/lib/systemd/system/{UNIT}"
DEVSERVER = "/usr/lib/python3/dist-packages/jobtoken/devserver"
PACKAGE_PATHS = ("/usr/bin/jobtoken", "/usr/bin/jobtoken-wrap", "/usr/libexec/jobtoken",
                 "/etc/jobtoken", "/usr/share/jobtoken", "/usr/share/arc/rte/ENV/JOBTOKEN",
                 "/etc/logrotate.d/jobtoken", UNIT_PATH, DEVSERVER)
# shared with the HTCondor hooks, which create it when missing: the package owns it while
# installed, and purge removes it only if it did not exist before and is empty
AUDIT_DIR = "/var/log/jobtoken"

pytestmark = pytest.mark.slow


def _need(condition: bool, reason: str) -> None:
    need(condition, f"{reason} (.ci/install-packaging.sh)")


def _version() -> str:
    return _run([str(PACKAGING / "version.sh")], check=True).stdout.strip()


def _deb_status(name: str) -> str:
    out = _run(["dpkg-query", "-W", "-f=${db:Status-Status}", name])
    return out.stdout.strip() if out.returncode == 0 else "not-installed"


@pytest.fixture(scope="module")
def built(jobtoken_debs: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> Dict[str, Path]:
    """{"deb"|"rpm": jobtoken, "deb-devserver"|"rpm-devserver": jobtoken-devserver}"""
    for tool in ("rpmbuild", "rpmlint"):
        _need(shutil.which(tool) is not None, f"needs {tool}")
    out = tmp_path_factory.mktemp("rpms")
    result = _run([str(PACKAGING / "build-rpm.sh"), str(out), "--nodeps"])
    assert result.returncode == 0, f"build-rpm.sh failed:\n{result.stderr}"
    rpms = sorted(out.glob("*.rpm"))
    assert sorted(jobtoken_debs) == ["jobtoken", "jobtoken-devserver"], jobtoken_debs
    assert len(rpms) == 2, rpms
    devserver_rpm, = (r for r in rpms if r.name.startswith("jobtoken-devserver-"))
    main_rpm, = (r for r in rpms if r != devserver_rpm)
    return {"deb": jobtoken_debs["jobtoken"], "deb-devserver": jobtoken_debs["jobtoken-devserver"],
            "rpm": main_rpm, "rpm-devserver": devserver_rpm}


def test_packages_carry_the_version_from_git(built: Dict[str, Path]) -> None:
    version = _version()
    assert built["deb"].name == f"jobtoken_{version}_all.deb"
    assert built["deb-devserver"].name == f"jobtoken-devserver_{version}_all.deb"
    assert built["rpm"].name == f"jobtoken-{version}-1.noarch.rpm"
    assert built["rpm-devserver"].name == f"jobtoken-devserver-{version}-1.noarch.rpm"


def _devserver_modules() -> List[str]:
    source = ROOT / "src" / "jobtoken" / "devserver"
    return sorted(p.name for p in source.glob("*.py"))


def test_rpms_have_the_layout_and_rpmlint_finds_no_errors(built: Dict[str, Path]) -> None:
    files = set(_run(["rpm", "-qlp", str(built["rpm"])], check=True).stdout.split())
    expected = {"/usr/bin/jobtoken", "/usr/bin/jobtoken-wrap", "/etc/jobtoken/jobtoken.toml",
                "/etc/logrotate.d/jobtoken", "/usr/share/arc/rte/ENV/JOBTOKEN",
                "/usr/share/bash-completion/completions/jobtoken", "/var/log/jobtoken",
                UNIT_PATH}
    expected |= {f"/usr/libexec/jobtoken/{s}" for s in LIBEXEC_SCRIPTS}
    expected |= {f"/usr/share/jobtoken/condor/config.d/{s}" for s in SNIPPETS}
    assert expected <= files, sorted(expected - files)
    assert not [f for f in files if f.startswith("/etc/condor")]
    # the worker-node package has no dev server; the devserver package has all of it, only
    assert not [f for f in files if "/jobtoken/devserver" in f]
    assert [f for f in files if f.endswith("/jobtoken/cli.py")]
    dev_files = set(_run(["rpm", "-qlp", str(built["rpm-devserver"])], check=True).stdout.split())
    dev_python = {f for f in dev_files if "/site-packages/" in f}
    assert dev_python and all("/jobtoken/devserver" in f for f in dev_python), sorted(dev_files)
    assert {f.rsplit("/", 1)[1] for f in dev_python if f.endswith(".py")} == \
        set(_devserver_modules())
    requires = _run(["rpm", "-qRp", str(built["rpm-devserver"])], check=True).stdout
    assert f"jobtoken = {_version()}-1" in requires, requires
    configs = set(_run(["rpm", "-qcp", str(built["rpm"])], check=True).stdout.split())
    assert configs == {"/etc/jobtoken/jobtoken.toml", "/etc/logrotate.d/jobtoken"}
    lint = _run(["rpmlint", "-r", str(PACKAGING / "rpm" / "jobtoken.rpmlintrc"),
                 str(built["rpm"]), str(built["rpm-devserver"]),
                 str(PACKAGING / "rpm" / "jobtoken.spec")])
    print("rpmlint warnings:\n" + "\n".join(
        line for line in lint.stdout.splitlines() if ": W: " in line))
    assert lint.returncode == 0 and " 0 errors" in lint.stdout, lint.stdout + lint.stderr


@pytest.fixture
def installed_deb(built: Dict[str, Path]) -> Iterator[Path]:
    _need(os.geteuid() == 0, "installing the .deb needs root")
    _need(_deb_status("jobtoken") == "not-installed"
          and _deb_status("jobtoken-devserver") == "not-installed",
          "a jobtoken package is installed already; not replacing it")
    # dpkg would take over (and purge would delete) unowned files at the package's paths
    present = [p for p in PACKAGE_PATHS if os.path.lexists(p)]
    _need(not present, f"files at the package's paths already: {present}; not replacing them")
    audit_dir_before = os.path.lexists(AUDIT_DIR)
    condor_before = sorted(os.listdir("/etc/condor/config.d")) \
        if os.path.isdir("/etc/condor/config.d") else None
    try:
        result = _run([*APT, "install", "--no-install-recommends", str(built["deb"])])
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr
        assert _deb_status("jobtoken") == "installed"
        yield built["deb"]
        after = sorted(os.listdir("/etc/condor/config.d")) \
            if os.path.isdir("/etc/condor/config.d") else None
        assert after == condor_before, "installing jobtoken changed /etc/condor/config.d"
    finally:
        purge = _run([*APT, "purge", "jobtoken", "jobtoken-devserver"])
        assert purge.returncode == 0, purge.stdout[-3000:] + purge.stderr
    assert _deb_status("jobtoken") == "not-installed"
    assert _deb_status("jobtoken-devserver") == "not-installed"
    for path in PACKAGE_PATHS:
        assert not os.path.lexists(path), f"{path} left after purge"
    if not audit_dir_before:
        assert not os.path.lexists(AUDIT_DIR), f"{AUDIT_DIR} left after purge"


def test_the_deb_installs_works_and_purges(installed_deb: Path) -> None:
    version = _version()
    out = _run(["/usr/bin/jobtoken", "--version"])
    assert out.returncode == 0 and out.stdout.strip() == f"jobtoken {version}", out
    helped = _run(["/usr/bin/jobtoken", "--help"])
    assert helped.returncode == 0, helped.stderr
    subcommands = _subcommand_names()
    assert all(name in helped.stdout for name in subcommands), helped.stdout

    for script in LIBEXEC_SCRIPTS:
        st = os.stat(f"/usr/libexec/jobtoken/{script}")
        # the starter refuses hooks that are not root-owned or are writable by others
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755, script
    assert stat.S_IMODE(os.stat("/usr/libexec/jobtoken").st_mode) == 0o755
    for snippet in SNIPPETS:
        shipped = Path(f"/usr/share/jobtoken/condor/config.d/{snippet}").read_bytes()
        assert shipped == (ROOT / "condor" / "config.d" / snippet).read_bytes()
    assert Path("/usr/share/arc/rte/ENV/JOBTOKEN").read_bytes() == \
        (ROOT / "wrappers" / "arc" / "ENV" / "JOBTOKEN").read_bytes()
    assert os.access("/usr/bin/jobtoken-wrap", os.X_OK)
    assert stat.S_IMODE(os.stat("/var/log/jobtoken").st_mode) == 0o1733

    conffiles = _run(["dpkg-query", "-W", "-f=${Conffiles}", "jobtoken"]).stdout
    assert "/etc/jobtoken/jobtoken.toml" in conffiles
    assert "/etc/logrotate.d/jobtoken" in conffiles
    # the example config changes nothing: the installed command reads it without error
    status = _run(["/usr/bin/jobtoken", "inspect", "/nonexistent-token"])
    assert "config" not in status.stderr.lower(), status.stderr

    with gzip.open("/usr/share/man/man1/jobtoken.1.gz", "rt") as man:
        page = man.read()
    assert all(f".B {name.replace('-', chr(92) + '-')}" in page for name in subcommands)
    with gzip.open("/usr/share/man/man1/jobtoken-wrap.1.gz", "rt") as man:
        assert "JOBTOKEN_WRAP_MODE" in man.read()
    completion = _run(["bash", "-c", "source /usr/share/bash-completion/completions/jobtoken"
                       " && complete -p jobtoken"])
    assert "_jobtoken" in completion.stdout, completion.stderr
    # the package installs the data files itself and carries no second copy of them
    files = _run(["/usr/bin/jobtoken", "install-files", "--prefix", "/nonexistent"])
    assert files.returncode == 2 and "distribution package" in files.stderr, files
    assert Path("/usr/share/doc/jobtoken/copyright").is_file()
    assert Path("/usr/share/doc/jobtoken/changelog.gz").is_file()
    # byte-compiled by dh_python3 at install time and importable by the system python
    imported = _run(["python3", "-c", "import jobtoken, sys; sys.stdout.write(jobtoken.__file__)"])
    assert imported.stdout.startswith("/usr/lib/python3/dist-packages/jobtoken/"), imported

    # the broker's unit: installed, valid, neither enabled nor started by the package
    assert Path(UNIT_PATH).read_bytes() == \
        (PACKAGING / "systemd" / UNIT).read_bytes()
    _need(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (systemd)")
    verified = _run(["systemd-analyze", "verify", UNIT_PATH])
    assert verified.returncode == 0 and not verified.stderr.strip(), verified
    enabled = _run(["systemctl", "is-enabled", UNIT])
    assert enabled.stdout.strip() in ("disabled", ""), enabled  # "" without a running systemd
    assert not list(Path("/etc/systemd/system").glob(f"*.wants/{UNIT}"))

    # the dev server is its own package: without it one line names it; with it, it runs
    missing = _run(["/usr/bin/jobtoken", "devserver", "--help"])
    assert missing.returncode == 2 and missing.stderr == (
        "jobtoken: error: the dev server is not installed here: install the jobtoken-devserver "
        "package\n"), missing
    result = _run([*APT, "install", "--no-install-recommends", str(built_devserver(installed_deb))])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    served = _run(["/usr/bin/jobtoken", "devserver", "--help"])
    assert served.returncode == 0 and "usage:" in served.stdout, served
    assert Path(DEVSERVER, "_server.py").is_file()


def built_devserver(deb: Path) -> Path:
    """The jobtoken-devserver .deb built beside ``deb``."""
    (found,) = deb.parent.glob("jobtoken-devserver_*.deb")
    return found


def test_the_debs_split_the_dev_server_off(built: Dict[str, Path]) -> None:
    def contents(deb: Path) -> List[str]:
        listing = _run(["dpkg-deb", "-c", str(deb)], check=True).stdout.splitlines()
        return [line.split()[5].lstrip(".") for line in listing]

    main = contents(built["deb"])
    dev = contents(built["deb-devserver"])
    assert not [f for f in main if "/jobtoken/devserver" in f]
    assert "/usr/lib/python3/dist-packages/jobtoken/cli.py" in main
    assert [f for f in main if f.endswith(f"/systemd/system/{UNIT}")], main
    assert {f.rsplit("/", 1)[1] for f in dev if f.startswith(DEVSERVER + "/")
            and f.endswith(".py")} == set(_devserver_modules())
    assert not [f for f in dev if f.startswith("/usr/") and not f.endswith("/")
                and not f.startswith((DEVSERVER + "/", "/usr/share/doc/jobtoken-devserver/"))]
    depends = _run(["dpkg-deb", "-f", str(built["deb-devserver"]), "Depends"]).stdout
    assert f"jobtoken (= {_version()})" in depends, depends


def _subcommand_names() -> List[str]:
    import argparse

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    raise AssertionError("no subcommands")


def test_the_wheel_carries_the_files_install_files_installs(tmp_path: Path) -> None:
    import sys
    import zipfile

    from jobtoken._installfiles import data_files

    copy = tmp_path / "tree"
    _run([str(PACKAGING / "copy-tree.sh"), str(copy)], check=True)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(copy)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("jobtoken-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    carried = {f"jobtoken/_data/{f.source}" for f in data_files()}
    assert carried and carried <= names, sorted(carried - names)
    assert not [n for n in names if n.startswith("jobtoken/_data/") and n not in carried]
