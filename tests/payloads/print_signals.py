"""Test payload: print ``ready pid=N``, then echo every signal it receives.

Commands on stdin: ``exit N`` exits with status N; end of input exits 0. With
``--no-stdin`` it ignores stdin and waits for signals until killed (for payloads run
from inside the test process, whose stdin is not ours to read); ``--ready-file PATH``
also creates PATH once the handlers are in place.
"""

from __future__ import annotations

import os
import signal
import sys

CAUGHT = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")


def _echo(signum: int, frame: object) -> None:
    # one write(2), not sys.stdout: a handler run while the main code (or another handler)
    # is inside sys.stdout's buffered write raises "reentrant call" and the payload dies
    os.write(1, f"signal {signum}\n".encode())


def main(argv: list[str]) -> int:
    for name in CAUGHT:
        signal.signal(getattr(signal, name), _echo)
    sys.stdout.write(f"ready pid={os.getpid()} pgrp={os.getpgrp()}\n")
    sys.stdout.flush()
    if "--ready-file" in argv:
        with open(argv[argv.index("--ready-file") + 1], "w") as ready:
            ready.write(f"{os.getpid()}\n")
    if "--no-stdin" in argv:
        while True:
            signal.pause()
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["exit"]:
            return int(words[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
