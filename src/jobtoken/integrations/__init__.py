"""Batch-system integrations: HTCondor hooks, job wrapper, storer and credmon; ARC-CE RTE stages.

Library code only: the ``jobtoken condor``, ``jobtoken credmon`` and ``jobtoken arc``
subcommands that call it live in ``jobtoken._batchcommands``; nothing here imports the CLI.

Must NOT: import htcondor (or anything heavy) at import time: ``jobtoken`` without the
HTCondor bindings installed must keep working, and ``jobtoken run``'s process stays small.
"""

from __future__ import annotations
