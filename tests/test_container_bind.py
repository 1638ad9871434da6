"""Why docs/admin/containers.md says: bind the token directory into a container, never the file.

jobtoken replaces ``bt`` at each renewal by writing a new file and renaming it over the old
one. A bind mount of the *file* (``apptainer --bind DIR/bt``, ``docker --volume DIR/bt:...``)
pins the old inode, so the container would read the first token until it expired; a bind
mount of the *directory* resolves ``bt`` afresh at each open. This checks both with real bind
mounts in a private mount namespace and jobtoken's own writer, so the advice changes if the
writer ever does.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from jobtoken._tokenfile import write_secret_file
from tests.prerequisites import need


def test_a_bound_directory_sees_each_renewal_and_a_bound_file_keeps_the_first_token(tmp_path):
    need(os.geteuid() == 0, "bind mounts need root")
    need(bool(shutil.which("unshare") and shutil.which("mount")), "unshare and mount (util-linux)")
    tokendir = tmp_path / "jt"
    tokendir.mkdir(mode=0o700)
    write_secret_file(tokendir / "bt", "first-token")
    dir_view = tmp_path / "container-dir"
    dir_view.mkdir()
    file_view = tmp_path / "container-bt"
    file_view.touch()
    renew = (f"from jobtoken._tokenfile import write_secret_file; "
             f"write_secret_file({str(tokendir / 'bt')!r}, 'second-token')")
    q = shlex.quote
    script = "\n".join([
        "set -e",
        f"mount --bind {q(str(tokendir))} {q(str(dir_view))}",
        f"mount --bind {q(str(tokendir / 'bt'))} {q(str(file_view))}",
        f"{q(sys.executable)} -c {q(renew)}",
        f"cat {q(str(dir_view / 'bt'))}",
        f"cat {q(str(file_view))}",
    ])
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    if "Operation not permitted" in result.stderr:
        need(False, f"no mount namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    seen_in_dir, seen_in_file = result.stdout.split()
    assert seen_in_dir == "second-token"  # the renewal reaches a bound directory
    assert seen_in_file == "first-token"  # a bound file still shows the replaced token
    assert (tokendir / "bt").read_text() == "second-token\n"
