"""Test payload: tamper with $BEARER_TOKEN_FILE, then report what jobtoken did about it.

``tamper.py delete|garbage``: remove the token file, or overwrite it in place; then
wait (up to ``--timeout`` s) for a valid JWT to be back and exit 0 ("restored"), 4 if
anything other than our own garbage or a valid JWT shows up, 5 if nothing came back.
``tamper.py symlink VICTIM``: replace the token file by a symlink to VICTIM, wait until
``state.json`` records a failed renewal, and exit 0 (the test checks VICTIM).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jwt

GARBAGE = "garbage-written-by-the-payload"


def main(argv: list[str]) -> int:
    mode = argv[0]
    timeout = float(argv[argv.index("--timeout") + 1]) if "--timeout" in argv else 30.0
    path = os.environ["BEARER_TOKEN_FILE"]
    state = os.path.join(os.environ["JOBTOKEN_DIR"], "state.json")
    with open(path) as fh:
        jwt.decode(fh.read().strip(), options={"verify_signature": False})
    if mode == "delete":
        os.unlink(path)
    elif mode == "garbage":
        with open(path, "w") as fh:
            fh.write(GARBAGE + "\n")
    else:
        os.unlink(path)
        os.symlink(argv[1], path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if mode == "symlink":
            try:
                with open(state) as fh:
                    if json.load(fh).get("consecutive_failures", 0) >= 1:
                        print("renewal refused the symlink")
                        return 0
            except (OSError, ValueError):
                pass
        else:
            try:
                with open(path) as fh:
                    raw = fh.read().strip()
            except FileNotFoundError:
                raw = ""
            if raw and raw != GARBAGE:
                try:
                    jwt.decode(raw, options={"verify_signature": False})
                except jwt.PyJWTError:
                    print("jobtoken wrote something that is not a token")
                    return 4
                print("restored")
                return 0
        time.sleep(0.02)
    print("nothing happened")
    return 5


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
