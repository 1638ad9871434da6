"""Test driver: ``supervise.py [--ignore SIG]... [--allow-core] [-v] -- CMD ARGS`` runs CMD
under jobtoken's supervisor and ends exactly like it (``exit_like``), the way ``jobtoken run``
does. ``--allow-core`` raises the core-size limit so that a core dump of ours would show.
"""

from __future__ import annotations

import logging
import resource
import signal
import sys

from jobtoken._errors import PayloadStartError
from jobtoken._supervisor import exit_like, run_payload


def main(argv: list[str]) -> int:
    split = argv.index("--")
    options, payload = argv[:split], argv[split + 1 :]
    if "-v" in options:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    if "--allow-core" in options:
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    for i, option in enumerate(options):
        if option == "--ignore":
            signal.signal(getattr(signal, options[i + 1]), signal.SIG_IGN)
    print("supervisor ready", file=sys.stderr, flush=True)
    try:
        result = run_payload(payload)
    except PayloadStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    return exit_like(result)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
