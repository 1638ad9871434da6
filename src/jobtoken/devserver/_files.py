"""Private, atomic file writes for the dev server (mytoken, TLS key, URL files).

Must NOT: follow symlinks at the target, leave partial files, or log file contents.
"""

from __future__ import annotations

import os
import tempfile

from .._errors import TokenFileError

__all__ = ["write_private_file"]


def write_private_file(path: str, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, rename.

    Raises:
        TokenFileError: the directory is missing or unwritable, or ``path`` is a symlink.
    """
    target = os.path.abspath(path)
    directory = os.path.dirname(target)
    if os.path.islink(target):
        raise TokenFileError(f"refusing to write {target}: it is a symlink")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(target) + ".")
    except OSError as exc:
        raise TokenFileError(f"cannot write {target}: {exc.strerror}") from exc
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise TokenFileError(f"cannot write {target}: {exc.strerror}") from exc
