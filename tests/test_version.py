"""The version comes from git tags, with the tree's fallback when there is no tag or no git."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import jobtoken
from jobtoken._version import version as fallback
from tests.prerequisites import need

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(autouse=True)
def _needs_git() -> None:
    need(shutil.which("git"), "needs git")


def _tree(tmp_path: Path) -> Path:
    top = tmp_path / "tree"
    (top / "packaging").mkdir(parents=True)
    (top / "src" / "jobtoken").mkdir(parents=True)
    shutil.copy2(ROOT / "packaging" / "version.sh", top / "packaging" / "version.sh")
    shutil.copy2(ROOT / "src" / "jobtoken" / "_version.py", top / "src" / "jobtoken")
    return top


def _git(top: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
           "PATH": "/usr/bin:/bin", "HOME": str(top), "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "-C", str(top), *args], check=True, env=env,
                          capture_output=True, text=True).stdout.strip()


def _version(top: Path) -> str:
    return subprocess.run(["sh", str(top / "packaging" / "version.sh")], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_no_git_gives_the_fallback(tmp_path: Path) -> None:
    assert _version(_tree(tmp_path)) == fallback


def test_tags_give_the_version(tmp_path: Path) -> None:
    top = _tree(tmp_path)
    _git(top, "init", "-q")
    _git(top, "add", ".")
    _git(top, "commit", "-qm", "one")
    head = _git(top, "rev-parse", "--short", "HEAD")
    assert _version(top) == f"{fallback}.dev0+g{head}"  # git but no tag
    _git(top, "tag", "v2.3.4")
    assert _version(top) == "2.3.4"
    (top / "x").write_text("x")
    _git(top, "add", "x")
    _git(top, "commit", "-qm", "two")
    head = _git(top, "rev-parse", "--short", "HEAD")
    assert _version(top) == f"2.3.4.post1+g{head}"


def test_cli_prints_the_version() -> None:
    out = subprocess.run([sys.executable, "-m", "jobtoken", "--version"], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == f"jobtoken {jobtoken.__version__}"
    assert jobtoken.__version__ == fallback
