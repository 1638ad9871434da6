"""Write and read secret files (access tokens, mytokens) safely.

Why so careful: payload tools re-read ``$BEARER_TOKEN_FILE`` at any instant, so a
reader must see either the old complete token or the new complete token, never an
empty or half-written file; and a token file in a shared place (``/tmp``) must not be
redirected through a symlink someone else planted.

So a write is: temp file in the *same* directory created ``O_EXCL|O_NOFOLLOW`` with
mode 0600, write, ``fsync``, ``rename`` over the target (never unlink first), then
``fsync`` of the directory so the rename survives a crash. Identical content is not
rewritten (the inode and mtime stay, which bind mounts and inotify readers like).

This module does no network I/O and knows nothing about tokens' meaning.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

from ._errors import TokenFileError

__all__ = [
    "JobDirectory",
    "ensure_private_dir",
    "open_job_directory",
    "remove_stale_temps",
    "write_file_atomically",
    "read_secret_file",
    "remove_secret_file",
    "write_secret_file",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
_MAX_SECRET_BYTES = 64 * 1024


def _describe(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))


def ensure_private_dir(path: PathLike, *, create: bool = True) -> Path:
    """Make sure ``path`` is a directory owned by us that nobody else can write into.

    Created 0700 when missing. An existing directory must be owned by the effective
    uid, not be a symlink, and not be group/other-writable: otherwise another user
    could swap our files.

    Raises:
        TokenFileError: the directory is missing (and ``create`` is false), unsafe, or
            cannot be created.
    """
    p = Path(path)
    try:
        if create:
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(p)
    except OSError as exc:
        raise TokenFileError(f"cannot use token directory {p}: {_describe(exc)}") from exc
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise TokenFileError(f"token directory {p} is not a plain directory (symlink or file)")
    if st.st_uid != os.geteuid():
        raise TokenFileError(f"token directory {p} is owned by uid {st.st_uid}, not by us")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TokenFileError(f"token directory {p} is writable by group or others")
    return p


def _check_target(target: Path) -> None:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TokenFileError(f"cannot inspect {target}: {_describe(exc)}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise TokenFileError(f"refusing to write {target}: it is a symlink")
    if not stat.S_ISREG(st.st_mode):
        raise TokenFileError(f"refusing to write {target}: it is not a regular file")


def _same_content(target: Path, data: bytes) -> bool:
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if st.st_size != len(data) or (st.st_mode & 0o777) != 0o600:
            return False
        return os.read(fd, len(data) + 1) == data
    finally:
        os.close(fd)


def write_secret_file(path: PathLike, content: str, *, newline: bool = True) -> bool:
    """Atomically replace ``path`` with ``content`` (mode 0600).

    Args:
        path: the target file; its directory must exist.
        content: the secret; must not be empty (an empty token file would make WLCG
            discovery fall through to the next location).
        newline: end the file with one newline (the WLCG discovery spec lets readers
            strip it; tools that do not are rare, and `cat` output stays tidy).

    Returns:
        True when the file was written, False when it already held this content.

    Raises:
        TokenFileError: empty content, a symlink or non-regular target, or any OS
            error (missing or read-only directory, ENOSPC). The old file is then
            untouched.
    """
    target = Path(path)
    text = content.strip()
    if not text:
        raise TokenFileError(f"refusing to write an empty secret to {target}")
    try:
        data = (text + ("\n" if newline else "")).encode("ascii", errors="strict")
    except UnicodeEncodeError:
        raise TokenFileError(f"refusing to write {target}: not ASCII text") from None
    _check_target(target)
    if _same_content(target, data):
        return False
    write_file_atomically(target, data, mode=0o600)
    logger.debug("secret written path=%s", target)
    return True


def write_file_atomically(path: PathLike, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, whole.

    Temp file in the same directory (``O_EXCL|O_NOFOLLOW``, ``mode``), write, fsync,
    rename over the target (never unlink first), fsync the directory.

    Raises:
        TokenFileError: a symlink or non-regular target, or any OS error; the old
            file is then untouched and no temporary file is left.
    """
    target = Path(path)
    _check_target(target)
    directory = target.parent
    tmp: Optional[Path] = None
    try:
        fd, tmp = _create_temp(directory, target.name, mode)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
        tmp = None
        _fsync_dir(directory)
    except OSError as exc:
        raise TokenFileError(f"cannot write {target}: {_describe(exc)}") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _create_temp(directory: Path, name: str, mode: int = 0o600) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        candidate = directory / f".{name}.{os.urandom(6).hex()}.tmp"
        try:
            fd = os.open(candidate, flags, 0o600)
        except FileExistsError:
            continue
        os.fchmod(fd, mode)  # umask may have taken bits away
        return fd, candidate
    raise OSError(errno.EEXIST, "no free temporary name")


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def read_secret_file(
    path: PathLike, *, require_private: bool = False, allow_other_owner: bool = False
) -> str:
    """Read a secret file, refusing symlinks owned by others, stripping whitespace.

    A symlink is followed only when the link and its target are ours (sites do link a
    robot token into place); ``require_private`` additionally refuses files that
    group or others can read. A file owned by another user (not root) is refused
    unless ``allow_other_owner``: in a shared place it could be a planted mytoken
    that sends the job's output to someone else's storage area.

    Raises:
        TokenFileError: missing, unreadable, not a regular file, owned by someone
            else, too large, not text, or (with ``require_private``) readable by others.
    """
    p = Path(path)
    try:
        lst = os.lstat(p)
        if stat.S_ISLNK(lst.st_mode) and lst.st_uid != os.geteuid():
            raise TokenFileError(f"refusing to read {p}: symlink owned by uid {lst.st_uid}")
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise TokenFileError(f"cannot read {p}: no such file") from exc
    except OSError as exc:
        raise TokenFileError(f"cannot read {p}: {_describe(exc)}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenFileError(f"refusing to read {p}: not a regular file")
        if st.st_uid not in (os.geteuid(), 0) and not allow_other_owner:
            raise TokenFileError(f"refusing to read {p}: owned by uid {st.st_uid}, not us or root")
        if st.st_mode & stat.S_IWOTH:
            raise TokenFileError(f"refusing to read {p}: writable by anyone")
        if require_private and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenFileError(
                f"refusing to read {p}: mode {stat.S_IMODE(st.st_mode):04o} lets others read "
                "it (chmod 600)"
            )
        if st.st_size > _MAX_SECRET_BYTES:
            raise TokenFileError(f"refusing to read {p}: larger than {_MAX_SECRET_BYTES} bytes")
        data = os.read(fd, _MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise TokenFileError(f"cannot read {p}: {_describe(exc)}") from exc
    finally:
        os.close(fd)
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise TokenFileError(f"refusing to read {p}: not ASCII text") from exc


def remove_secret_file(path: PathLike) -> bool:
    """Remove a secret file we wrote; a missing file is fine. Returns whether one was removed."""
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise TokenFileError(f"cannot remove {p}: {_describe(exc)}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise TokenFileError(f"refusing to remove {p}: it is a directory")
    try:
        os.unlink(p)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise TokenFileError(f"cannot remove {p}: {_describe(exc)}") from exc
    return True


def remove_stale_temps(directory: PathLike) -> int:
    """Remove temporary files a killed writer left behind (``.<name>.<hex>.tmp``).

    Only regular files we own are removed; returns how many.
    """
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


# --- writing into a directory another user owns (the node broker) -------------------------


@dataclass(frozen=True)
class JobDirectory:
    """A job's token directory, opened by a privileged process that must not be fooled.

    ``fd`` is an ``O_DIRECTORY`` descriptor reached from ``/`` one component at a time
    with ``O_NOFOLLOW``: no symlink anywhere on the path is followed, and every later
    ``*at`` call works on this very directory, whatever the job renames or replaces
    meanwhile. ``identity`` (device, inode) tells a replaced directory from the one
    bound at ``prepare``. Close it with ``close()``.
    """

    path: str
    fd: int
    uid: int
    gid: int
    identity: Tuple[int, int]

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass

    def __enter__(self) -> JobDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_secret(self, name: str, content: str) -> None:
        """Atomically replace ``name`` in this directory with ``content`` (0600, job-owned).

        Temp file ``openat(O_CREAT|O_EXCL|O_NOFOLLOW)``, write, ``fsync``, ``fchown`` to
        the directory's owner, ``renameat`` over ``name``, ``fsync`` the directory. The
        rename replaces the directory *entry*: a symlink or a hardlink the job planted
        under ``name`` is replaced, never written through.

        Raises:
            TokenFileError: an unsafe name, empty or non-ASCII content, any OS error;
                ``name`` is then untouched and no temporary file is left.
        """
        if not name or "/" in name or name in (".", ".."):
            raise TokenFileError(f"refusing to write {name!r} in {self.path}: not a plain name")
        text = content.strip()
        if not text:
            raise TokenFileError(f"refusing to write an empty secret to {self.path}/{name}")
        try:
            data = (text + "\n").encode("ascii", errors="strict")
        except UnicodeEncodeError:
            raise TokenFileError(f"refusing to write {self.path}/{name}: not ASCII text") from None
        if self._holds(name, data):
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        tmp: Optional[str] = None
        try:
            for _ in range(100):
                candidate = f".{name}.{os.urandom(6).hex()}.tmp"
                try:
                    fd = os.open(candidate, flags, 0o600, dir_fd=self.fd)
                except FileExistsError:
                    continue
                tmp = candidate
                break
            else:
                raise OSError(errno.EEXIST, "no free temporary name")
            try:
                os.fchmod(fd, 0o600)
                if os.geteuid() != self.uid:
                    os.fchown(fd, self.uid, self.gid)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            tmp = None
            os.fsync(self.fd)
        except OSError as exc:
            raise TokenFileError(f"cannot write {self.path}/{name}: {_describe(exc)}") from exc
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp, dir_fd=self.fd)
                except OSError:
                    pass

    def _holds(self, name: str, data: bytes) -> bool:
        """Whether ``name`` is already our file with ``data`` (so it is not rewritten).

        Opened ``O_NOFOLLOW|O_NONBLOCK`` (a planted FIFO cannot block us) and accepted only
        as a regular 0600 file of the job's uid with one link: a planted hardlink is
        rewritten (that is, replaced), never kept.
        """
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self.fd)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self.uid or st.st_nlink != 1 \
                    or stat.S_IMODE(st.st_mode) != 0o600 or st.st_size != len(data):
                return False
            return os.read(fd, len(data) + 1) == data
        except OSError:
            return False
        finally:
            os.close(fd)

    def read_own(self, name: str, limit: int) -> Tuple[bytes, int]:
        """The content of ``name`` here and its link count, read through the dirfd.

        For a privileged process taking a file the job put here: opened
        ``O_NOFOLLOW|O_NONBLOCK`` (a symlink fails, a FIFO cannot block), accepted only as
        a regular file of the directory's owner of at most ``limit`` bytes. The link count
        tells the caller whether a copy lives under another name (a hardlink).

        Raises:
            TokenFileError: missing, not such a file, too large, or any OS error.
        """
        if not name or "/" in name or name in (".", ".."):
            raise TokenFileError(f"refusing to read {name!r} in {self.path}: not a plain name")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self.fd)
        except OSError as exc:
            raise TokenFileError(f"cannot read {self.path}/{name}: {_describe(exc)}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self.uid:
                raise TokenFileError(f"{self.path}/{name} is not a regular file of uid "
                                     f"{self.uid}")
            if st.st_size > limit:
                raise TokenFileError(f"{self.path}/{name} is larger than {limit} bytes")
            data = os.read(fd, limit + 1)
            if len(data) > limit:
                raise TokenFileError(f"{self.path}/{name} is larger than {limit} bytes")
            return data, st.st_nlink
        except OSError as exc:
            raise TokenFileError(f"cannot read {self.path}/{name}: {_describe(exc)}") from exc
        finally:
            os.close(fd)

    def names(self) -> List[str]:
        """The entries of this directory (through the dirfd, never the path)."""
        try:
            return os.listdir(self.fd)
        except OSError as exc:
            raise TokenFileError(f"cannot list {self.path}: {_describe(exc)}") from exc

    def remove(self, name: str) -> bool:
        """Unlink ``name`` here (never follows it); a missing one is fine."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise TokenFileError(f"cannot remove {self.path}/{name}: {_describe(exc)}") from exc
        return True


def open_job_directory(path: str, uid: int) -> JobDirectory:
    """Open a job's token directory for writing by a privileged process.

    ``path`` must be absolute and is walked from ``/`` with ``O_DIRECTORY|O_NOFOLLOW``
    at every component (a symlink anywhere fails the walk). The directory must be
    owned by ``uid`` and not writable by group or others, so that nobody but the job
    (and root) can swap what is in it.

    Raises:
        TokenFileError: a relative path, ``..``, a symlink or non-directory on the way,
            another owner, a group/other-writable directory, any OS error.
    """
    if not path.startswith("/"):
        raise TokenFileError(f"token directory {path!r} is not an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise TokenFileError(f"token directory {path!r} contains '..'")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open("/", flags)
    except OSError as exc:  # pragma: no cover - / always opens
        raise TokenFileError(f"cannot open /: {_describe(exc)}") from exc
    try:
        for part in parts:
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                reason = ("a symlink or not a directory on the way"
                          if exc.errno in (errno.ELOOP, errno.ENOTDIR) else _describe(exc))
                raise TokenFileError(f"cannot use token directory {path}: {reason}") from exc
            os.close(fd)
            fd = nxt
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise TokenFileError(
                f"token directory {path} is owned by uid {st.st_uid}, not the job's uid {uid}")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise TokenFileError(f"token directory {path} is writable by group or others")
        opened = JobDirectory(path=path, fd=fd, uid=uid, gid=st.st_gid,
                              identity=(st.st_dev, st.st_ino))
        fd = -1
        return opened
    finally:
        if fd >= 0:
            os.close(fd)
