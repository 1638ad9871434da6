#!/usr/bin/python3
"""Test payload: an HTCondor job's process tree with the job in its own PID namespace.

``startd SOCKET UID`` plays ``condor_startd`` (root), which starts ``condor_starter -f -a
slot1_1 127.0.0.1`` (root, this script again as ``starter``), which puts the job into a new
PID namespace (``unshare(CLONE_NEWPID)``, as HTCondor's USE_PID_NAMESPACES, apptainer
or a container runtime do) and starts it as UID: the job connects to SOCKET, sends the pid
it sees for itself (1) and waits for one byte before it exits. Standard library only.
"""
import ctypes
import os
import socket
import sys

CLONE_NEWPID = 0x20000000


def named(comm: str) -> None:
    """The process name /proc/PID/stat and ps show (exec set it to the interpreter's)."""
    with open("/proc/self/comm", "w") as fh:
        fh.write(comm)


def startd(sock_path: str, uid: str) -> int:
    named("condor_startd")
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, __file__, "starter", sock_path, uid,
                                  "-f", "-a", "slot1_1", "127.0.0.1"])
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def starter(sock_path: str, uid: str) -> int:
    named("condor_starter")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWPID)")
    pid = os.fork()  # the first child is pid 1 of the new namespace
    if pid == 0:
        os.setgroups([])
        os.setgid(int(uid))
        os.setuid(int(uid))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(sock_path)
            sock.sendall(f"{os.getpid()}\n".encode())
            sock.recv(1)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    role, sock_path, uid = sys.argv[1:4]
    sys.exit(startd(sock_path, uid) if role == "startd" else starter(sock_path, uid))
