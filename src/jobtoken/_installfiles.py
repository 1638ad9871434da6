"""``jobtoken install-files``: the HTCondor hooks, job wrapper, credmon, config.d snippets,
pilot wrapper, ARC RTE and example config that the wheel carries as package data, printed or
installed under a prefix with the layout the distribution packages use.

So a ``pip install`` user gets the whole product, and the layout is written in one place:
``packaging/install-tree.sh`` calls this for the Debian package and the RPM as well.
Installing never activates anything: snippets go to /usr/share/jobtoken, not to
/etc/condor/config.d, and an existing config file or logrotate rule is kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, List, Tuple

from ._errors import TokenFileError, UsageError

if TYPE_CHECKING:
    from importlib.abc import Traversable

__all__ = ["DataFile", "data_files", "register"]


@dataclass(frozen=True)
class DataFile:
    """One file of the package data and where it belongs under a prefix."""

    source: str  # path inside jobtoken/_data
    destination: str  # path under the prefix, e.g. usr/libexec/jobtoken/jobtoken-credmon
    mode: int
    keep_existing: bool = False  # site-edited files (config) are never replaced


# (directory in _data, file name prefix or suffix rule, destination directory, mode, keep)
_RULES: Tuple[Tuple[str, str, str, int, bool], ...] = (
    ("condor", "jobtoken-*", "usr/libexec/jobtoken", 0o755, False),
    ("condor/config.d", "*.conf", "usr/share/jobtoken/condor/config.d", 0o644, False),
    ("condor/examples", "*", "usr/share/jobtoken/condor/examples", 0o644, False),
    ("wrappers", "jobtoken-wrap", "usr/bin", 0o755, False),
    ("wrappers/arc/ENV", "JOBTOKEN", "usr/share/arc/rte/ENV", 0o644, False),
    ("", "jobtoken.toml", "etc/jobtoken", 0o644, True),
)
# files renamed on the way: (source, destination, mode, keep)
_RENAMED = (("jobtoken.logrotate", "etc/logrotate.d/jobtoken", 0o644, True),)


def _data() -> Traversable:
    return resources.files("jobtoken").joinpath("_data")


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("*"):
        return name.endswith(pattern[1:])
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return name == pattern


def data_files() -> List[DataFile]:
    """Every carried file with its destination; empty when this installation has none
    (a distribution package installs them itself and ships no ``_data``)."""
    root = _data()
    if not root.is_dir():
        return []
    found = []
    for directory, pattern, dest, mode, keep in _RULES:
        folder = root.joinpath(directory) if directory else root
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_file() and _matches(entry.name, pattern):
                source = f"{directory}/{entry.name}" if directory else entry.name
                found.append(DataFile(source, f"{dest}/{entry.name}", mode, keep))
    for source, dest, mode, keep in _RENAMED:
        if root.joinpath(source).is_file():
            found.append(DataFile(source, dest, mode, keep))
    return found


def _read(item: DataFile) -> bytes:
    data: bytes = _data().joinpath(item.source).read_bytes()
    return data


def _install_one(item: DataFile, prefix: str) -> str:
    """Write one file atomically (temp file in the target directory, then rename, so a
    symlink planted at the target is replaced, never followed); returns what happened."""
    target = os.path.join(prefix, item.destination)
    if item.keep_existing and os.path.lexists(target):
        return f"kept {target}"
    directory = os.path.dirname(target)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".jobtoken-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(_read(item))
            os.fchmod(out.fileno(), item.mode)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return f"installed {target}"


def install(prefix: str) -> List[str]:
    """Install every carried file under ``prefix``; one line per file."""
    items = data_files()
    if not items:
        raise UsageError(
            "this installation carries no data files: a distribution package installs them "
            "itself (/usr/libexec/jobtoken, /usr/share/jobtoken)"
        )
    try:
        return [_install_one(item, prefix) for item in items]
    except OSError as exc:
        raise TokenFileError(f"cannot install into {prefix}: {exc.strerror}") from None


def _cmd(args: argparse.Namespace) -> int:
    if args.print_file:
        chosen = [f for f in data_files() if args.print_file in (f.source, f.destination)
                  or os.path.basename(f.destination) == args.print_file]
        if len(chosen) != 1:
            raise UsageError(f"no single data file named {args.print_file!r} "
                             "(run without options to list them)")
        sys.stdout.buffer.write(_read(chosen[0]))
        return 0
    if args.prefix:
        for line in install(args.prefix):
            print(line)
        return 0
    for item in data_files():
        print(f"{item.destination}\t{oct(item.mode)[2:]}\t{item.source}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(
        name,
        help="list, print or install the HTCondor hooks, snippets, wrappers and ARC RTE",
        description="The files a pip installation carries besides the Python package: "
        "HTCondor hooks, job wrapper and credmon (usr/libexec/jobtoken), config.d snippets "
        "(usr/share/jobtoken/condor/config.d, to copy into /etc/condor/config.d yourself), "
        "the pilot wrapper, the ARC RTE and an example config. Without options: list them.",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prefix", metavar="DIR",
                       help="install under DIR (/ for the system; keeps an existing config)")
    group.add_argument("--print", dest="print_file", metavar="NAME",
                       help="write one file to stdout (e.g. 50-jobtoken.conf)")
    p.set_defaults(func=_cmd)
