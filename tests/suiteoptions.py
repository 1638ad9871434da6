"""The suite's own knobs, read from the environment once, when the root conftest loads.

Why here: the root conftest strips every ``JOBTOKEN_*`` variable from the process before
the first test (a host's settings must not leak into the product under test), so a test
module that read ``JOBTOKEN_LONG_TESTS`` itself would never see it.

Must NOT: read anything the product reads, or import the product.
"""

from __future__ import annotations

import os

__all__ = ["LONG"]

#: ``JOBTOKEN_LONG_TESTS=1``: more trials, fresh random cases (docs/robustness.md).
LONG = os.environ.get("JOBTOKEN_LONG_TESTS", "") == "1"
