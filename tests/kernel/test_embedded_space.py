"""An embedded pool's files on the host file system (the state directory).

The journal file is reserved: a write it acknowledged can never meet a full
host file system. The loop files are sparse: a pool the file system cannot
hold is refused unless `--sparse` asks for it, and `pool show` reports the
host file system's free space (and warns when the sparse files could
outgrow it). The host file system here is a small tmpfs mounted for the test.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from dmsnap import errors as E
from dmsnap.storage.manager import Manager

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192M", "tmpfs", str(mnt)], check=True)
    m = Manager(str(mnt / "state"))
    try:
        yield m, str(mnt)
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
        subprocess.run(["umount", str(mnt)], check=True)


def test_journal_file_is_reserved_and_host_space_is_checked(small_fs):
    m, mnt = small_fs
    pool = m.pool_create("r", size=64 * MiB, journal_size=32 * MiB)
    jpath = pool["journal"]["path"]
    st = os.stat(jpath)
    assert st.st_size == 32 * MiB
    assert st.st_blocks * 512 >= 32 * MiB, f"journal file sparse: {st.st_blocks * 512} bytes"
    host = m.pool_show("r")["host_fs"]
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    assert host["path"].startswith(mnt) and abs(host["free"] - free) < 4 * MiB, host
    assert host["unallocated"] > 32 * MiB  # the data file is sparse
    assert not any("host file system" in h for h in m.pool_show("r")["health"])

    # 256 MiB does not fit in what is left of 192 MiB: refused, nothing made
    before = (m.catalog.counts(), sorted(os.listdir(os.path.join(mnt, "state", "pools"))))
    with pytest.raises(E.NoSpace) as exc:
        m.pool_create("big", size=256 * MiB, journal_size=16 * MiB)
    assert "--sparse" in exc.value.message and "does not fit" in exc.value.message
    assert (m.catalog.counts(), sorted(os.listdir(os.path.join(mnt, "state", "pools")))) == before
    # ... unless asked for; then pool show warns that it may outgrow the host
    m.pool_create("big", size=256 * MiB, journal_size=16 * MiB, sparse=True)
    shown = m.pool_show("big")
    assert any("host file system" in h and "fail once it fills" in h for h in shown["health"])
    # a journal that cannot be reserved is refused even with --sparse
    with pytest.raises(E.NoSpace):
        m.pool_create("j", size=64 * MiB, journal_size=512 * MiB, sparse=True)
