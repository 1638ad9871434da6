"""HTCondor job environment strings: read ``Environment``/``Env``, write ``Environment``.

HTCondor keeps a job's environment in the ClassAd either as ``Environment`` (the "V2"
syntax: entries separated by whitespace, single quotes group, a doubled quote inside
quotes is a literal quote) or, for old submit files, as ``Env`` (the "V1" syntax:
entries separated by ``;`` or by the ad's ``EnvDelim``, no quoting). When both are
present the starter uses ``Environment`` only. A hook's stdout *replaces* attributes
of the job ad, so adding variables means: read whichever form the starter would use,
merge, and write the whole ``Environment`` back. The htcondor bindings do not expose
this (it lives in the C++ ``Env`` class), hence this small module.

Must NOT: read files, touch ``os.environ`` or import htcondor; pure string work.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

__all__ = [
    "EnvironmentSyntaxError",
    "format_environment_v2",
    "job_environment",
    "merge_environment",
    "parse_environment_v1",
    "parse_environment_v2",
]


class EnvironmentSyntaxError(ValueError):
    """The job's environment string cannot be parsed (the starter would refuse it too)."""


def parse_environment_v2(text: str) -> List[Tuple[str, str]]:
    """Split a V2 ``Environment`` string into ``(name, value)`` pairs, in order.

    Raises:
        EnvironmentSyntaxError: an unterminated quote, or an entry without ``=``.
    """
    entries: List[str] = []
    current: List[str] = []
    in_entry = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "'":
            in_entry = True
            i += 1
            while True:
                if i >= len(text):
                    raise EnvironmentSyntaxError("unterminated single quote in Environment")
                if text[i] == "'":
                    if i + 1 < len(text) and text[i + 1] == "'":
                        current.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                current.append(text[i])
                i += 1
            continue
        if ch in " \t\r\n":
            if in_entry:
                entries.append("".join(current))
                current, in_entry = [], False
            i += 1
            continue
        current.append(ch)
        in_entry = True
        i += 1
    if in_entry:
        entries.append("".join(current))
    return [_split_entry(e) for e in entries]


def parse_environment_v1(text: str, delimiter: str = ";") -> List[Tuple[str, str]]:
    """Split a V1 ``Env`` string (``;``-separated, newlines also separate).

    Raises:
        EnvironmentSyntaxError: an entry without ``=``.
    """
    pairs = []
    for line in text.split("\n"):
        for entry in line.split(delimiter):
            entry = entry.lstrip(" \t\r")
            if entry:
                pairs.append(_split_entry(entry))
    return pairs


def _split_entry(entry: str) -> Tuple[str, str]:
    name, sep, value = entry.partition("=")
    if not sep or not name:
        raise EnvironmentSyntaxError(f"environment entry {name[:40]!r} has no NAME=value form")
    return name, value


def _quote_v2(entry: str) -> str:
    if entry and not any(c in entry for c in " \t\r\n'"):
        return entry
    return "'" + entry.replace("'", "''") + "'"


def format_environment_v2(pairs: Mapping[str, str]) -> str:
    """Join variables into a V2 ``Environment`` string the starter parses back exactly.

    Raises:
        EnvironmentSyntaxError: a value holds a newline (the schedd cannot store it).
    """
    out = []
    for name, value in pairs.items():
        if "\n" in name or "\n" in value or "=" in name or not name:
            raise EnvironmentSyntaxError(f"environment variable {name[:40]!r} cannot be expressed")
        out.append(_quote_v2(f"{name}={value}"))
    return " ".join(out)


def job_environment(
    environment: Optional[str], env_v1: Optional[str], delimiter: Optional[str] = None
) -> Dict[str, str]:
    """The environment the starter would give the job, from the ad's attribute values.

    Raises:
        EnvironmentSyntaxError: the string the starter would use is malformed.
    """
    if environment is not None:
        pairs = parse_environment_v2(environment)
    elif env_v1 is not None:
        pairs = parse_environment_v1(env_v1, (delimiter or ";")[:1] or ";")
    else:
        pairs = []
    return dict(pairs)  # later entries win, as in the starter


def merge_environment(
    current: Mapping[str, str], add: Mapping[str, str], remove: Tuple[str, ...] = ()
) -> Dict[str, str]:
    """The job's variables plus ours (ours win), minus the names in ``remove``."""
    merged = {k: v for k, v in current.items() if k not in remove}
    merged.update(add)
    return merged
