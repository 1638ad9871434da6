#!/usr/bin/python3
"""Test payload: read $BEARER_TOKEN_FILE every second for SECONDS, then exit with CODE.

Prints one JSON line: reads, bad reads (missing, empty or expired token, with the first
reason), how many distinct tokens it saw (as hashes, never the token), the last good
one's exp. Runs in the pool's own Python, with the standard library only.
"""
import base64
import hashlib
import json
import os
import sys
import time

seconds, code = float(sys.argv[1]), int(sys.argv[2])
reads = bad = 0
seen = set()
first_bad = None
last_exp = None
deadline = time.time() + seconds
while True:
    reads += 1
    path = os.environ.get("BEARER_TOKEN_FILE")
    reason = None
    try:
        if not path:
            raise ValueError("no BEARER_TOKEN_FILE")
        with open(path) as fh:
            token = fh.read().strip()
        if not token:
            raise ValueError("empty token file")
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if claims["exp"] <= time.time():
            raise ValueError("expired token")
        seen.add(hashlib.sha256(token.encode()).hexdigest()[:12])
        last_exp = claims["exp"]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        bad += 1
        first_bad = first_bad or reason
    if time.time() >= deadline:
        break
    time.sleep(1)
print(json.dumps({"reads": reads, "bad": bad, "tokens": len(seen), "first_bad": first_bad,
                  "last_exp": last_exp,
                  "env_file": os.environ.get("BEARER_TOKEN_FILE")}))
sys.exit(code)
