"""Test payload: end in a chosen way.

``exit_with.py code N``        exit with status N
``exit_with.py signal N``      die by signal N (handler reset to default first, no core)
``exit_with.py echo TEXT...``  print TEXT on stdout and exit 0
``exit_with.py ignored``       print which signals were ignored at start, exit 0
``exit_with.py wait``          print ``ready pid=N pgrp=M``, then wait with default handlers
"""

from __future__ import annotations

import os
import resource
import signal
import sys


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode == "code":
        return int(args[0])
    if mode == "signal":
        signum = int(args[0])
        sys.stdout.flush()
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        signal.pause()  # the signal is on its way
        return 99
    if mode == "echo":
        print(" ".join(args), flush=True)
        return 0
    if mode == "wait":
        print(f"ready pid={os.getpid()} pgrp={os.getpgrp()}", flush=True)
        while True:
            signal.pause()
    if mode == "ignored":
        names = [
            s.name
            for s in signal.valid_signals()
            if isinstance(s, signal.Signals)
            and s not in (signal.SIGKILL, signal.SIGSTOP)
            and signal.getsignal(s) == signal.SIG_IGN
        ]
        print("ignored " + " ".join(sorted(names)), flush=True)
        return 0
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
