from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from jobtoken._errors import TokenFileError
from jobtoken._tokenfile import (
    ensure_private_dir,
    open_job_directory,
    read_secret_file,
    remove_secret_file,
    remove_stale_temps,
    write_secret_file,
)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_write_creates_0600_file_with_trailing_newline(tmp_path: Path) -> None:
    target = tmp_path / "bt"
    os.umask(0o022)
    assert write_secret_file(target, "abc.def.ghi") is True
    assert target.read_text() == "abc.def.ghi\n"
    assert mode(target) == 0o600


def test_write_even_with_permissive_umask_is_0600(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_secret_file(tmp_path / "bt", "tok")
    finally:
        os.umask(old)
    assert mode(tmp_path / "bt") == 0o600


def test_identical_content_is_not_rewritten(tmp_path: Path) -> None:
    target = tmp_path / "bt"
    write_secret_file(target, "tok1")
    inode = os.stat(target).st_ino
    assert write_secret_file(target, "tok1") is False
    assert os.stat(target).st_ino == inode
    assert write_secret_file(target, "tok2") is True
    assert os.stat(target).st_ino != inode  # replaced by rename, not rewritten in place


def test_replacement_is_atomic_for_concurrent_readers(tmp_path: Path) -> None:
    target = tmp_path / "bt"
    tokens = ["A" * 500, "B" * 900]
    write_secret_file(target, tokens[0])
    seen: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            with open(target) as fh:
                seen.add(fh.read())

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        write_secret_file(target, tokens[i % 2])
    stop.set()
    t.join(timeout=10)
    assert seen <= {tokens[0] + "\n", tokens[1] + "\n"}  # never empty, never torn


def test_empty_secret_is_refused_and_old_file_kept(tmp_path: Path) -> None:
    target = tmp_path / "bt"
    write_secret_file(target, "old")
    with pytest.raises(TokenFileError, match="empty"):
        write_secret_file(target, "  \n")
    assert target.read_text() == "old\n"


def test_symlink_target_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "bt"
    link.symlink_to(victim)
    with pytest.raises(TokenFileError, match="symlink"):
        write_secret_file(link, "tok")
    assert victim.read_text() == "precious"
    assert link.is_symlink()


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot write .*No such file"):
        write_secret_file(tmp_path / "nope" / "bt", "tok")


def test_disk_full_keeps_old_file_and_leaves_no_temp(tmp_path: Path, mocker) -> None:
    target = tmp_path / "bt"
    write_secret_file(target, "old")
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mocker.patch("jobtoken._tokenfile.os.write", side_effect=full)
    with pytest.raises(TokenFileError, match="No space left"):
        write_secret_file(target, "new")
    mocker.stopall()
    assert real_write is os.write
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bt"]


def test_permission_denied_is_a_clear_error(tmp_path: Path, mocker) -> None:
    # root ignores directory modes, so simulate what a read-only sandbox returns
    denied = PermissionError(errno.EACCES, "Permission denied")
    mocker.patch("jobtoken._tokenfile.os.open", side_effect=denied)
    with pytest.raises(TokenFileError, match="cannot write .*Permission denied"):
        write_secret_file(tmp_path / "bt", "tok")


def test_read_strips_whitespace(tmp_path: Path) -> None:
    p = tmp_path / "t"
    p.write_text("\v\f tok \r\n\t")
    assert read_secret_file(p) == "tok"


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="no such file"):
        read_secret_file(tmp_path / "missing")


def test_read_require_private_refuses_group_readable(tmp_path: Path) -> None:
    p = tmp_path / "t"
    p.write_text("tok")
    p.chmod(0o640)
    with pytest.raises(TokenFileError, match="chmod 600"):
        read_secret_file(p, require_private=True)
    assert read_secret_file(p) == "tok"


def test_read_refuses_world_writable(tmp_path: Path) -> None:
    p = tmp_path / "t"
    p.write_text("tok")
    p.chmod(0o666)
    with pytest.raises(TokenFileError, match="writable by anyone"):
        read_secret_file(p)


def test_read_refuses_foreign_owned_symlink(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.write_text("tok")
    link = tmp_path / "link"
    link.symlink_to(target)
    if os.geteuid() == 0:
        os.lchown(link, 4242, 4242)
        with pytest.raises(TokenFileError, match="symlink owned by uid 4242"):
            read_secret_file(link)
    else:  # pragma: no cover - cannot chown without root
        assert read_secret_file(link) == "tok"


def test_read_refuses_file_owned_by_another_user(tmp_path: Path) -> None:
    p = tmp_path / "t"
    p.write_text("tok")
    if os.geteuid() != 0:  # pragma: no cover
        pytest.skip("needs root to chown")
    os.chown(p, 4242, 4242)
    # root reading a file owned by another user: refused unless allowed explicitly
    with pytest.raises(TokenFileError, match="owned by uid 4242"):
        read_secret_file(p)
    assert read_secret_file(p, allow_other_owner=True) == "tok"


def test_read_refuses_directory_and_fifo(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="not a regular file"):
        read_secret_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(TokenFileError, match="not a regular file"):
        read_secret_file(fifo)


def test_ensure_private_dir_creates_0700(tmp_path: Path) -> None:
    d = ensure_private_dir(tmp_path / "a" / "tokens")
    assert mode(d) == 0o700


def test_ensure_private_dir_refuses_group_writable_and_symlink(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(TokenFileError, match="writable by group or others"):
        ensure_private_dir(d)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "a").mkdir()
    with pytest.raises(TokenFileError, match="symlink"):
        ensure_private_dir(link)


def test_remove_secret_file(tmp_path: Path) -> None:
    p = tmp_path / "bt"
    write_secret_file(p, "tok")
    assert remove_secret_file(p) is True
    assert remove_secret_file(p) is False
    with pytest.raises(TokenFileError, match="directory"):
        remove_secret_file(tmp_path)


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    write_secret_file(tmp_path / "bt", "tok")
    (tmp_path / ".bt.0123abcd.tmp").write_text("half a tok")
    (tmp_path / ".keep").write_text("not ours to judge")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "bt"]


# --- the node broker's writer: a dirfd reached without following links ---------------------


def _job_dir(tmp_path: Path) -> Path:
    d = tmp_path / "scratch" / "tokens"
    d.mkdir(parents=True, mode=0o700)
    return d


def test_job_directory_write_is_atomic_0600_and_owned_by_the_job(tmp_path: Path) -> None:
    d = _job_dir(tmp_path)
    with open_job_directory(str(d), os.geteuid()) as jd:
        jd.write_secret("bt", "tok1")
        first = os.stat(d / "bt").st_ino
        jd.write_secret("bt", "tok1")  # identical: left alone
        assert os.stat(d / "bt").st_ino == first
        jd.write_secret("bt", "tok2")
    st = os.stat(d / "bt")
    assert (d / "bt").read_text() == "tok2\n" and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid() and sorted(os.listdir(d)) == ["bt"]


@pytest.mark.parametrize("planted", ["symlink", "hardlink", "fifo"])
def test_job_directory_write_replaces_what_the_job_planted(tmp_path: Path, planted: str
                                                           ) -> None:
    d = _job_dir(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    if planted == "symlink":
        os.symlink(victim, d / "bt")
    elif planted == "hardlink":
        os.link(victim, d / "bt")
    else:
        os.mkfifo(d / "bt", 0o600)
    with open_job_directory(str(d), os.geteuid()) as jd:
        jd.write_secret("bt", "tok")
    assert victim.read_text() == "precious\n" and os.stat(victim).st_nlink == 1
    assert stat.S_ISREG(os.lstat(d / "bt").st_mode) and (d / "bt").read_text() == "tok\n"


def test_job_directory_refuses_links_on_the_way_and_unsafe_directories(tmp_path: Path) -> None:
    d = _job_dir(tmp_path)
    link = tmp_path / "link"
    os.symlink(d.parent, link)
    uid = os.geteuid()
    for path, words in ((str(link / "tokens"), "symlink"), (str(tmp_path / "nope"),
                                                             "No such file"),
                        ("relative/dir", "not an absolute path"),
                        (str(d) + "/../tokens", "'..'"),
                        (str(d / "bt"), "No such file")):
        with pytest.raises(TokenFileError, match=words):
            open_job_directory(path, uid)
    with pytest.raises(TokenFileError, match="not the job's uid"):
        open_job_directory(str(d), uid + 1)
    d.chmod(0o770)
    with pytest.raises(TokenFileError, match="writable by group or others"):
        open_job_directory(str(d), uid)
    d.chmod(0o700)
    with open_job_directory(str(d), uid) as jd:
        for name in ("", "a/b", "..", "."):
            with pytest.raises(TokenFileError, match="not a plain name"):
                jd.write_secret(name, "tok")
        with pytest.raises(TokenFileError, match="empty"):
            jd.write_secret("bt", "  ")
        assert jd.remove("bt") is False
    assert os.listdir(d) == []
