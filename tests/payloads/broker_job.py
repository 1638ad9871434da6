"""Test payload: a job's anchor process for the node broker tests.

Started by the test (as the job's uid, or as root like a starter); its life is the job's
life. It reads one JSON command per line on stdin and answers one JSON line:

- ``{"op": "call", "request": {...}}``: send that request to the broker itself (so the
  caller *is* the anchor) and print the broker's raw reply;
- ``{"op": "spawn", "argv": [...], "uid": U, "gid": G}``: run a child (as U/G when
  given: a payload below the anchor) and print its exit code and output;
- ``{"op": "exec", "argv": [...]}``: become that program (the pid, and so the anchor,
  stays the same).

Stdlib only, plus jobtoken's light client module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jobtoken._brokerclient import BrokerClient
from jobtoken._brokerproto import BrokerRequest


def main(argv: list[str]) -> int:
    client = BrokerClient(argv[1], timeout_s=120.0)
    sys.stdout.write(json.dumps({"pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "call":
            r = cmd["request"]
            request = BrokerRequest(op=r["op"], tokendir=r.get("tokendir"),
                                    min_valid_s=r.get("min_valid_s"),
                                    scopes=tuple(r.get("scopes", ())), job=r.get("job"),
                                    anchor_pid=r.get("anchor_pid"))
            raw = client._exchange((request.to_json() + "\n").encode())
            answer = json.loads(raw)
        elif cmd["op"] == "spawn":
            extra = {}
            if cmd.get("uid") is not None and os.geteuid() == 0:
                extra = {"user": cmd["uid"], "group": cmd["gid"], "extra_groups": []}
            done = subprocess.run(cmd["argv"], capture_output=True, text=True, timeout=300,
                                  env=cmd.get("env"), cwd="/", **extra)
            answer = {"rc": done.returncode, "out": done.stdout, "err": done.stderr}
        else:
            sys.stdout.flush()
            os.execv(cmd["argv"][0], cmd["argv"])
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
