"""Which HTCondor python bindings this host has, and its configuration through them.

HTCondor 23.x ships ``htcondor2`` beside the older ``htcondor``; 24 and 25 ship both;
hosts with older packages have only ``htcondor``. The access-point pieces (storer,
credmon) take whichever is there and test for the API they need, never the version.

Must NOT: import the bindings at module level (jobtoken installs without them).
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["bindings", "condor_param", "condor_param_as_set"]


def bindings() -> Any:
    """The ``htcondor2`` module, else ``htcondor``, else None."""
    for name in ("htcondor2", "htcondor"):
        try:
            return __import__(name)
        except ImportError:
            continue
    return None


def condor_param_as_set(name: str, module: Any = None) -> Optional[str]:
    """An HTCondor configuration value as the site set it, empty included (``KNOB =``
    can mean "off"); None when unset, unreadable, or there are no bindings."""
    module = module if module is not None else bindings()
    if module is None:
        return None
    try:
        value = module.param.get(name)
    except Exception:  # the bindings raise their own types for a broken configuration
        return None
    return None if value is None else str(value)


def condor_param(name: str, default: Optional[str] = None, module: Any = None) -> Optional[str]:
    """An HTCondor configuration value (unset or empty: ``default``; also without bindings)."""
    value = condor_param_as_set(name, module)
    return value if value else default
