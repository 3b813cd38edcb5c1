"""The TCMU ring handler against the real kernel: a user backstore exported
through tcm_loop, served by csrc/tcmu.c with READ/WRITE on the fast path
into a real journal, every other command answered by a tiny handler here
(the ring's mechanics are under test, not the emulation).

The kernel's sd driver probes the disk (INQUIRY, READ CAPACITY...) through
the slow path; data then flows through the fast path with many commands in
flight, completed out of order."""

from __future__ import annotations

import os
import random
import struct
import threading
import time

import pytest
from jmodel import read_direct

from dmsnap.journal.journal import Journal
from dmsnap.scsi import lio
from dmsnap.scsi.tcmu import CHECK_CONDITION, GOOD, Command, Reply, TcmuDevice, uio_for

MiB = 1 << 20
SIZE = 16 * MiB
SERIAL = "dmsnapringtest01"


def sense(key: int, asc: int, ascq: int = 0) -> bytes:
    s = bytearray(18)
    s[0], s[2], s[7], s[12], s[13] = 0x70, key, 10, asc, ascq
    return bytes(s)


def handler(cmd: Command) -> Reply:
    """Just enough SPC for the kernel to attach a disk."""
    op, cdb = cmd.cdb[0], cmd.cdb
    if op == 0x12:  # INQUIRY
        if cdb[1] & 1:
            page = cdb[2]
            if page == 0x00:
                body = bytes([0x00, 0x80, 0x83])
            elif page == 0x80:
                body = SERIAL.encode()
            elif page == 0x83:
                naa = bytes([0x60 | 0x0]) + bytes(range(1, 16))
                body = bytes([0x01, 0x03, 0x00, 16]) + naa
            else:
                return Reply(CHECK_CONDITION, sense=sense(5, 0x24))
            data = bytes([0, page]) + struct.pack(">H", len(body)) + body
        else:
            data = bytes([0, 0, 6, 2, 31, 0, 0, 0x02]) + b"DMSNAP  " + b"ring test       " + b"0001"
        return Reply(GOOD, data[: struct.unpack(">H", cdb[3:5])[0]])
    if op == 0x00:  # TEST UNIT READY
        return Reply(GOOD)
    if op == 0x25:  # READ CAPACITY(10)
        return Reply(GOOD, struct.pack(">II", SIZE // 512 - 1, 512))
    if op == 0x9E and cdb[1] & 0x1F == 0x10:  # READ CAPACITY(16)
        data = struct.pack(">QI", SIZE // 512 - 1, 512) + bytes(20)
        return Reply(GOOD, data[: struct.unpack(">I", cdb[10:14])[0]])
    if op == 0x1A:  # MODE SENSE(6): header only, no write cache
        return Reply(GOOD, bytes([3, 0, 0, 0])[: cdb[4]])
    if op == 0x35:  # SYNCHRONIZE CACHE(10)
        return Reply(GOOD)
    return Reply(CHECK_CONDITION, sense=sense(5, 0x20))  # INVALID COMMAND OPERATION CODE


@pytest.fixture
def ring(tmp_path, loopdev):
    if (why := lio.available()) is not None:
        pytest.fail(why)
    vol = loopdev(SIZE)
    jpath = str(tmp_path / "journal.img")
    Journal.format(jpath, 16 * MiB)
    j = Journal.open(jpath, mode="nv")
    j.attach(1, vol.path, SIZE)
    j.start()
    bs = lio.create_backstore("dmsnap-ringtest", "ring/test", SIZE, SERIAL)
    dev = wwn = None
    try:
        uio, size = uio_for(bs.hba, bs.name)
        dev = TcmuDevice(uio, size, handler, journal=j, vol=1, size=SIZE)
        wwn = lio.export_local(bs)
        disk = lio.scsi_disk_for(SERIAL, timeout=60)
        assert disk is not None, "the kernel did not attach the exported disk"
        yield disk, j, vol, dev
    finally:
        if wwn:
            lio.unexport_local(wwn)
        if dev is not None:
            dev.close()
        lio.delete_backstore(bs)
        j.close()


def test_disk_attaches_and_data_round_trips_through_the_journal(ring):
    disk, j, _, dev = ring
    with open(f"/sys/block/{os.path.basename(disk)}/size") as f:
        assert int(f.read()) * 512 == SIZE
    data = random.Random(1).randbytes(MiB)
    fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, MiB)
        buf.write(data)
        assert os.pwritev(fd, [buf], 4 * MiB) == MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    assert j.read(1, 4 * MiB, MiB) == data  # through the journal's overlay
    assert read_direct(disk, 4 * MiB, MiB) == data  # back through the ring
    st = dev.stats()
    assert st["fast_writes"] >= 1 and st["fast_reads"] >= 1 and st["slow"] >= 3, st


def test_many_commands_in_flight_complete_out_of_order(ring):
    """16 threads of O_DIRECT 4 KiB writes then reads of their own blocks:
    every read returns its own write (a completion given to the wrong
    command id would swap data between them)."""
    disk, _, _, dev = ring
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        import mmap

        rng = random.Random(n)
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        try:
            for i in range(60):
                block = n * 64 + i
                payload = rng.randbytes(4096)
                buf.seek(0)
                buf.write(payload)
                os.pwritev(fd, [buf], block * 4096)
                back = mmap.mmap(-1, 4096)
                os.preadv(fd, [back], block * 4096)
                assert bytes(back) == payload, (n, i)
        except BaseException as e:
            errors.append(e)
        finally:
            os.close(fd)

    ts = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:3]
    st = dev.stats()
    assert st["fast_writes"] >= 16 * 60 and st["errors"] == 0, st
    print(f"16x60 write+read pairs in {time.monotonic() - t0:.1f} s; {st}")
