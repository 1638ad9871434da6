"""Test payload: read $BEARER_TOKEN_FILE many times a second and judge every read.

Counts reads that were missing, empty, torn (not a decodable JWT) or expired
(``exp <= now``), prints one JSON summary line and exits 0 when every read was good,
else 3. Runs for ``--seconds S``; prints ``ready`` after its first read. With
``--until-tokens N`` it ends as soon as it has read the N-th distinct token, and
``--seconds`` only bounds a run whose renewals never come: a test then waits for the
renewals it needs, however slow the machine, instead of hoping they fit a fixed time;
``--min-seconds S`` keeps it reading at least S seconds even when the tokens came sooner.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jwt


def main(argv: list[str]) -> int:
    seconds = float(argv[argv.index("--seconds") + 1])
    interval = float(argv[argv.index("--interval") + 1]) if "--interval" in argv else 0.02
    until = int(argv[argv.index("--until-tokens") + 1]) if "--until-tokens" in argv else 0
    least = float(argv[argv.index("--min-seconds") + 1]) if "--min-seconds" in argv else 0.0
    path = os.environ["BEARER_TOKEN_FILE"]
    counts = {"reads": 0, "missing": 0, "empty": 0, "torn": 0, "expired": 0}
    jtis: list[str] = []
    min_left = float("inf")
    start = time.time()
    end = start + seconds
    first = True
    while time.time() < end:
        counts["reads"] += 1
        try:
            with open(path) as fh:
                raw = fh.read().strip()
        except FileNotFoundError:
            counts["missing"] += 1
            raw = None
        if raw is not None:
            if not raw:
                counts["empty"] += 1
            else:
                try:
                    claims = jwt.decode(raw, options={"verify_signature": False})
                    left = float(claims["exp"]) - time.time()
                    min_left = min(min_left, left)
                    if left <= 0:
                        counts["expired"] += 1
                    if not jtis or jtis[-1] != claims["jti"]:
                        jtis.append(claims["jti"])
                except (jwt.PyJWTError, KeyError, ValueError):
                    counts["torn"] += 1
        if first:
            first = False
            sys.stdout.write("ready\n")
            sys.stdout.flush()
        if until and len(jtis) >= until and time.time() - start >= least:
            break
        time.sleep(interval)
    bad = counts["missing"] + counts["empty"] + counts["torn"] + counts["expired"]
    summary = dict(counts, tokens=len(jtis), min_left_s=round(min_left, 3), bad=bad,
                   has_bearer_token="BEARER_TOKEN" in os.environ,
                   env_mytoken=[k for k, v in os.environ.items() if "MYTOKEN" in k.upper()])
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0 if bad == 0 else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
