"""Robustness tests (fault matrix, crash consistency, fuzzing, secret hygiene).

More trials: ``JOBTOKEN_LONG_TESTS=1 .venv/bin/pytest tests/robustness``. The variable
is read once, by ``tests/suiteoptions.py`` when the root conftest loads, before the
suite strips ``JOBTOKEN_*`` from its environment (a ``--long`` option cannot be added
from a non-root conftest). See docs/robustness.md.
"""

from __future__ import annotations

from tests.robustness._support import LONG

__all__ = ["LONG"]
