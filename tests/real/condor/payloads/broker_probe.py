#!/usr/bin/python3
"""Test payload for the node broker: what a job of the job's uid can reach.

``scan ROOT...``: read every regular file it may under each ROOT (no symlink followed)
and print the sha256 prefixes of every JWT-shaped string found, with one path each,
never a token. ``lie JOBTOKEN SOCKET DIR...``: ask the broker, as this job, for a token
written into each DIR (another job's directory) and print each command's exit code.
Runs in the pool's own Python, with the standard library only.
"""
import hashlib
import json
import os
import re
import stat
import subprocess
import sys

JWT = re.compile(rb"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


def scan(roots):
    found, files, denied = {}, 0, 0
    for root in roots:
        for top, _dirs, names in os.walk(root, onerror=lambda e: None):
            for name in names:
                path = os.path.join(top, name)
                try:
                    info = os.lstat(path)
                    if not stat.S_ISREG(info.st_mode) or info.st_size > 4 << 20:
                        continue
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError:
                    denied += 1
                    continue
                try:
                    data = os.read(fd, 4 << 20)
                except OSError:
                    denied += 1
                    continue
                finally:
                    os.close(fd)
                files += 1
                for match in JWT.findall(data):
                    found.setdefault(hashlib.sha256(match).hexdigest()[:16], path)
    return {"files": files, "denied": denied, "found": found}


def lie(jobtoken, socket, dirs):
    codes = {}
    for directory in dirs:
        proc = subprocess.run([jobtoken, "broker", "prepare", "--socket", socket, "--dir",
                               directory], capture_output=True, text=True, timeout=120)
        codes[directory] = [proc.returncode, proc.stderr.strip()[-300:]]
    return {"codes": codes}


if __name__ == "__main__":
    if sys.argv[1] == "scan":
        out = scan(sys.argv[2:])
    else:
        out = lie(sys.argv[2], sys.argv[3], sys.argv[4:])
    print(json.dumps(out))
