"""The suite's one rule for a missing prerequisite: a clear skip here, a failure under CI.

Why one place: CI installs everything a test needs (``.ci/install-*.sh``), so a skip there
would turn a broken set-up into a green run; on a developer's machine without root or
HTCondor the same test should say what is missing and step aside. Six copies of this
rule had drifted (``CI=true`` in one, any non-empty ``CI`` in another, ``1/true/yes`` in a
third); every test now calls ``need`` or ``unavailable``.

Must NOT: import the product or anything beyond pytest and the standard library (the
real-system fixtures call it before anything is built or installed).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["need", "under_ci", "unavailable"]


def under_ci() -> bool:
    """Whether this run is CI's (``CI`` set to ``true``, ``1`` or ``yes``, as CI systems do)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """End the test for a missing prerequisite: fail under CI, skip elsewhere.

    ``reason`` names what is missing and, where there is one, the script that installs it.
    """
    if under_ci():
        pytest.fail(f"CI prerequisite missing: {reason}", pytrace=False)
    pytest.skip(reason)


def need(condition: object, reason: str) -> None:
    """``unavailable(reason)`` unless ``condition`` holds."""
    if not condition:
        unavailable(reason)
