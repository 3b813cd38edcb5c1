"""The cffi view of the kernel structs must equal what the C compiler sees
in the installed UAPI headers. The witness is a separately compiled C
program, so a wrong cdef (a missing field, a wrong type) fails here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dmsnap.dm._dmffi import ffi as dmffi
from dmsnap.dm._dmffi import lib as dmlib
from dmsnap.storage._loopffi import ffi as loopffi
from dmsnap.storage._loopffi import lib as looplib

DM_FIELDS = {
    "struct dm_ioctl": [
        "version",
        "data_size",
        "data_start",
        "target_count",
        "open_count",
        "flags",
        "event_nr",
        "dev",
        "name",
        "uuid",
        "data",
    ],
    "struct dm_target_spec": ["sector_start", "length", "status", "next", "target_type"],
    "struct dm_target_deps": ["count", "dev"],
    "struct dm_name_list": ["dev", "next", "name"],
    "struct dm_target_versions": ["next", "version", "name"],
    "struct dm_target_msg": ["sector", "message"],
}
LOOP_FIELDS = {
    "struct loop_info64": [
        "lo_device",
        "lo_inode",
        "lo_rdevice",
        "lo_offset",
        "lo_sizelimit",
        "lo_number",
        "lo_flags",
        "lo_file_name",
    ],
    "struct loop_config": ["fd", "block_size", "info"],
}
DM_CONSTANTS = [
    "DM_LIST_DEVICES",
    "DM_DEV_SUSPEND",
    "DM_TABLE_STATUS",
    "DM_TARGET_MSG",
    "DM_BUFFER_FULL_FLAG",
    "DM_DEFERRED_REMOVE",
    "DM_UEVENT_GENERATED_FLAG",
]


def _c_layout(
    tmp_path: Path, header: str, fields: dict[str, list[str]], constants: list[str]
) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is required (it also builds the cffi modules)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <sys/ioctl.h>"]
    lines += [f"#include <{header}>", "int main(void){"]
    for struct, names in fields.items():
        key = struct.split()[1]
        lines.append(f'printf("sizeof {key} %zu\\n", sizeof({struct}));')
        for f in names:
            lines.append(f'printf("{key}.{f} %zu\\n", offsetof({struct}, {f}));')
    for c in constants:
        lines.append(f'printf("{c} %lu\\n", (unsigned long)({c}));')
    lines.append("return 0;}")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (ln.rsplit(" ", 1) for ln in out.splitlines())}


@pytest.mark.parametrize(
    ("ffi", "lib", "header", "fields", "constants"),
    [
        (dmffi, dmlib, "linux/dm-ioctl.h", DM_FIELDS, DM_CONSTANTS),
        (loopffi, looplib, "linux/loop.h", LOOP_FIELDS, ["LOOP_CONFIGURE", "LOOP_CTL_GET_FREE"]),
    ],
    ids=["dm-ioctl", "loop"],
)
def test_struct_layout_matches_header(tmp_path, ffi, lib, header, fields, constants):
    c = _c_layout(tmp_path, header, fields, constants)
    for struct, names in fields.items():
        key = struct.split()[1]
        assert ffi.sizeof(struct) == c[f"sizeof {key}"], struct
        for f in names:
            assert ffi.offsetof(struct, f) == c[f"{key}.{f}"], f"{struct}.{f}"
    for const in constants:
        assert getattr(lib, const) == c[const], const


def test_dm_ioctl_header_has_room_for_names():
    # Names and UUIDs are validated against these before any ioctl.
    assert dmlib.DM_NAME_LEN == 128
    assert dmlib.DM_UUID_LEN == 129
