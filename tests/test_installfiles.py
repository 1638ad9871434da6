"""``jobtoken install-files``: a pip installation carries the hooks, snippets, wrappers and
RTE of the tree and installs them with the distribution packages' layout, without
activating anything or replacing a site's config."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jobtoken import _installfiles
from jobtoken._errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def _tree_files() -> dict:
    """What the tree has, by the destination the docs and config snippets name."""
    files = {f"usr/libexec/jobtoken/{p.name}": p for p in (ROOT / "condor").glob("jobtoken-*")}
    files.update({f"usr/share/jobtoken/condor/config.d/{p.name}": p
                  for p in (ROOT / "condor" / "config.d").glob("*.conf")})
    files.update({f"usr/share/jobtoken/condor/examples/{p.name}": p
                  for p in (ROOT / "condor" / "examples").iterdir()})
    files["usr/bin/jobtoken-wrap"] = ROOT / "wrappers" / "jobtoken-wrap"
    files["usr/share/arc/rte/ENV/JOBTOKEN"] = ROOT / "wrappers" / "arc" / "ENV" / "JOBTOKEN"
    files["etc/jobtoken/jobtoken.toml"] = ROOT / "packaging" / "jobtoken.toml"
    files["etc/logrotate.d/jobtoken"] = ROOT / "packaging" / "jobtoken.logrotate"
    return files


def test_every_file_of_the_tree_is_carried() -> None:
    carried = {f.destination for f in _installfiles.data_files()}
    assert carried == set(_tree_files())


def test_install_lays_out_the_files_with_their_modes(tmp_path: Path) -> None:
    lines = _installfiles.install(str(tmp_path))
    assert len(lines) == len(_tree_files())
    for dest, source in _tree_files().items():
        target = tmp_path / dest
        assert target.read_bytes() == source.read_bytes(), dest
        executable = dest.startswith(("usr/libexec/", "usr/bin/"))
        assert stat.S_IMODE(target.stat().st_mode) == (0o755 if executable else 0o644), dest
    assert not (tmp_path / "etc" / "condor").exists()  # nothing is activated


def test_a_site_config_is_kept_and_a_planted_link_is_replaced(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "jobtoken" / "jobtoken.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[site]\nvo = 'mine'\n")
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    hook = tmp_path / "usr" / "libexec" / "jobtoken" / "jobtoken-prepare-hook"
    hook.parent.mkdir(parents=True)
    hook.symlink_to(victim)
    lines = _installfiles.install(str(tmp_path))
    assert f"kept {config}" in lines
    assert config.read_text() == "[site]\nvo = 'mine'\n"
    assert victim.read_text() == "untouched"
    assert not hook.is_symlink()
    assert hook.read_bytes() == (ROOT / "condor" / "jobtoken-prepare-hook").read_bytes()


def test_an_installation_without_data_says_where_the_files_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_installfiles, "data_files", list)
    with pytest.raises(UsageError, match="distribution package"):
        _installfiles.install("/nonexistent")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobtoken", "install-files", *args],
                          capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"})


def test_the_command_lists_and_prints() -> None:
    listed = _cli()
    assert listed.returncode == 0
    assert {line.split(b"\t")[0].decode() for line in listed.stdout.splitlines()} == \
        set(_tree_files())
    printed = _cli("--print", "50-jobtoken.conf")
    assert printed.returncode == 0
    assert printed.stdout == (ROOT / "condor" / "config.d" / "50-jobtoken.conf").read_bytes()
    unknown = _cli("--print", "nothing-like-this")
    assert unknown.returncode == 2 and b"list them" in unknown.stderr
