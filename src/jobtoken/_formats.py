"""Format versions of the files jobtoken leaves in a token directory, and the reading rule.

``job.json``, ``state.json`` and ``revoke.pending`` outlive the process that wrote them:
``prepare`` on an ARC CE or an HTCondor starter writes ``job.json`` with one jobtoken
version, and the sidecar, ``revoke`` or ``status`` of another version reads it (rolling
upgrades, CEs and worker nodes upgraded on different days). So each file carries
``"format": "MAJOR.MINOR"`` and a reader follows one rule (docs/architecture.md,
"File formats and upgrades"):

- no ``format`` key: 1.0 (the files of the releases before formats were written);
- same major, any minor: read it; keys this version does not know are ignored (logged
  once per process at debug), because a minor change only ever *adds* keys that an
  older reader may safely skip;
- a higher major: refuse with one line naming the file and both versions. A major bump
  is for a change an older reader would get wrong (a key that changes the meaning of
  another, a narrowing the older one would not apply), and must be listed in the
  changelog's "Upgrade" notes.

Writers stamp the current version with :func:`stamp`. Stdlib only: the waiting
sidecar imports this.
"""

from __future__ import annotations

import logging
from typing import AbstractSet, Any, Dict, Mapping, Set, Tuple

from ._errors import ConfigError

__all__ = ["CURRENT", "FORMAT_KEY", "known_part", "merged", "parse_version", "readable", "stamp"]

logger = logging.getLogger(__name__)

FORMAT_KEY = "format"

#: The format this version writes, per file. Bump the minor for a new optional key,
#: the major only for a change an older reader would misread (see the module docstring).
CURRENT: Dict[str, Tuple[int, int]] = {
    "job.json": (1, 0),
    "state.json": (1, 0),
    "revoke.pending": (1, 0),
}

_LOGGED: Set[Tuple[str, Tuple[str, ...]]] = set()


def parse_version(value: Any) -> Tuple[int, int]:
    """``"MAJOR.MINOR"`` (or a bare major, as ``state.json``'s old ``version: 1``) as a pair.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a format version: {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"not a format version: {value!r}")
        return value, 0
    if isinstance(value, str):
        major, dot, minor = value.partition(".")
        if major.isdigit() and (not dot or minor.isdigit()) and int(major) >= 1:
            return int(major), int(minor) if dot else 0
    raise ValueError(f"not a format version: {value!r}")


def readable(written: Tuple[int, int], reads: Tuple[int, int]) -> bool:
    """Whether a reader of format ``reads`` may read a file of format ``written``.

    Pure: the whole compatibility rule. Any older or equal major is read (older files
    are read by the defaults of the keys they lack); a newer major is not.
    """
    return written[0] <= reads[0]


def stamp(name: str, data: Dict[str, Any]) -> Dict[str, Any]:
    """``data`` with the current format of file ``name`` (a key of :data:`CURRENT`)."""
    major, minor = CURRENT[name]
    return {**data, FORMAT_KEY: f"{major}.{minor}"}


def known_part(
    name: str, data: Mapping[str, Any], known: AbstractSet[str], where: str,
    *, legacy_keys: AbstractSet[str] = frozenset(),
) -> Dict[str, Any]:
    """The keys of ``data`` this version understands, after the version check.

    ``legacy_keys`` are keys older versions wrote and this one drops silently (the
    version itself among them).

    Raises:
        ConfigError: the file's format is newer in its major.
        ValueError: its format is not a version at all (the caller's "not a valid file").
    """
    raw = data.get(FORMAT_KEY, data.get("version", 1) if "version" in legacy_keys else 1)
    written = parse_version(raw)
    reads = CURRENT[name]
    if not readable(written, reads):
        raise ConfigError(
            f"{where} has format {written[0]}.{written[1]}, newer than this jobtoken reads "
            f"({reads[0]}.x): a newer jobtoken wrote it; upgrade jobtoken on this node"
        )
    unknown = tuple(sorted(set(data) - set(known) - set(legacy_keys) - {FORMAT_KEY}))
    if unknown and (name, unknown) not in _LOGGED:
        _LOGGED.add((name, unknown))
        logger.debug("%s: ignoring keys this version does not know: %s (format %d.%d)",
                     where, ", ".join(unknown), *written)
    return {k: v for k, v in data.items() if k in known}


def merged(name: str, original: Mapping[str, Any], known: Mapping[str, Any]) -> Dict[str, Any]:
    """What to write back when changing a file another version may have written.

    ``known`` (this version's keys, as it would write them) replaces the keys it names;
    keys only a newer minor knows are kept, and so is that newer format: within one major
    a key keeps its meaning, so the file stays a valid file of the newer format. Without
    this, a worker node of an older version that touches ``job.json`` (ARC's relocation)
    would silently drop what the CE's newer ``prepare`` wrote.
    """
    try:
        written = parse_version(original.get(FORMAT_KEY, 1))
    except ValueError:
        written = (0, 0)
    data = {**original, **stamp(name, dict(known))}
    if written > CURRENT[name]:
        data[FORMAT_KEY] = original[FORMAT_KEY]
    return data
