"""Demo: first the device-mapper layer alone, then the product end to end.

Part 1: writecache (fast cache file over a slow data file) → thin-pool carved
from it → a thin volume → a snapshot; write, snapshot, overwrite, and show
that the snapshot kept the old data, with dmsnap's own status view.

Part 2: a journaled pool, a volume exported as a local SCSI disk (LIO +
TCMU served by dmsnap), a writer that never stops, and snapshots requested
in-band with the vendor SCSI command while it writes: each snapshot holds
exactly the writes completed before the request, and the writer's worst
latency is shown. Everything is torn down at the end (``--keep`` leaves
part 1's devices for inspection).

Run it with ``make demo`` (it boots the test VM where the host has no
device-mapper).
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
from contextlib import ExitStack

from dmsnap import cli
from dmsnap.dm import DeviceMapper, Role, make_uuid
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table
from dmsnap.storage import loop
from dmsnap.units import Bytes, Sectors

MiB = 1024 * 1024
POOL = "demo"


def _io(path: str, offset: int, data: bytes | None = None, length: int = 4096) -> bytes:
    """Direct I/O, so what we read back is on the device, not in page cache."""
    buf = mmap.mmap(-1, length if data is None else len(data))
    fd = os.open(path, (os.O_RDONLY if data is None else os.O_WRONLY) | os.O_DIRECT)
    try:
        if data is None:
            os.preadv(fd, [buf], offset)
            return bytes(buf)
        buf.write(data)
        os.pwritev(fd, [buf], offset)
        os.fsync(fd)
        return data
    finally:
        os.close(fd)


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def run(keep: bool = False, workdir: str | None = None) -> int:
    dm = DeviceMapper()
    made: list[str] = []  # dm devices, in creation order
    with ExitStack() as cleanup:
        tmp = workdir or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="dmsnap-demo-"))
        data_file, cache_file = os.path.join(tmp, "data.img"), os.path.join(tmp, "cache.img")
        loop.make_sparse(data_file, 512 * MiB)
        loop.make_sparse(cache_file, 64 * MiB)
        data = loop.attach(data_file)
        cache = loop.attach(cache_file)
        if not keep:
            cleanup.callback(loop.detach, data)
            cleanup.callback(loop.detach, cache)
            cleanup.callback(lambda: dm.remove_tree(list(reversed(made))))
        _say(f"backing devices: data {data.path} (512 MiB), cache {cache.path} (64 MiB)")

        def create(name: str, role: Role, table: Table, read_only: bool = False) -> str:
            info = dm.create(name, make_uuid(role, name), table, read_only=read_only)
            made.append(name)
            _say(f"created {info.path} ({Bytes.of(table.size) // MiB} MiB, {role.value})")
            return info.devno

        wc = create(
            f"dmsnap-{POOL}-wc",
            Role.INTERNAL,
            Table.single(Sectors.of(data.size), t.Writecache("s", data.devno, cache.devno, 4096)),
        )
        meta_sectors = Sectors.of(16 * MiB)
        data_sectors = Sectors.of(data.size) - meta_sectors
        tmeta = create(
            f"dmsnap-{POOL}-tmeta", Role.INTERNAL, Table.single(meta_sectors, t.Linear(wc, 0))
        )
        tdata = create(
            f"dmsnap-{POOL}-tdata",
            Role.INTERNAL,
            Table.single(data_sectors, t.Linear(wc, meta_sectors)),
        )
        pool_name = f"dmsnap-{POOL}-tpool"
        tpool = create(
            pool_name,
            Role.INTERNAL,
            Table.single(
                data_sectors,
                t.ThinPool(tmeta, tdata, 128, 1024, error_if_no_space=True),
            ),
        )
        vol_sectors = Sectors.of(256 * MiB)
        dm.message(pool_name, "create_thin 0")
        vol = f"dmsnap-{POOL}-vol"
        create(vol, Role.VOLUME, Table.single(vol_sectors, t.Thin(tpool, 0)))
        vol_path = f"/dev/mapper/{vol}"

        before, after = b"B" * 4096, b"A" * 4096
        _io(vol_path, 1 * MiB, before)
        _say("wrote 'B' block at 1 MiB of the volume")

        # The classic way (what the journal will replace): suspend the
        # origin so the pool sees no I/O racing the snapshot.
        dm.suspend(vol)
        dm.message(pool_name, "create_snap 1 0")
        dm.resume(vol)
        _say("snapshot 'before' taken (thin create_snap 1 0)")

        _io(vol_path, 1 * MiB, after)
        _say("overwrote it with 'A'")
        snap = f"dmsnap-{POOL}-vol@before"
        create(snap, Role.SNAPSHOT, Table.single(vol_sectors, t.Thin(tpool, 1)), read_only=True)

        now, then = _io(vol_path, 1 * MiB), _io(f"/dev/mapper/{snap}", 1 * MiB)
        ok = now == after and then == before
        _say(f"volume reads {now[:1]!r}, snapshot reads {then[:1]!r}: {'OK' if ok else 'WRONG'}")

        reply = dm.message(f"dmsnap-{POOL}-wc", "flush")
        _say(f"writecache flushed{'' if reply is None else ': ' + reply}")
        print(flush=True)
        cli.run(["dm", "list"])
        print(flush=True)
        cli.run(["dm", "status"])
        if keep:
            _say(f"kept: devices {', '.join(made)}; files in {tmp}")
        return 0 if ok else 1


def run_product(workdir: str | None = None) -> int:
    import threading
    import time

    from dmsnap.scsi import initiator, lio
    from dmsnap.storage.manager import Manager

    if (why := lio.available()) is not None:
        _say(f"part 2 skipped: {why}")
        return 0
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        m = Manager(os.path.join(tmp, "state"))
        try:
            m.pool_create("demo", size=256 * MiB, journal_size=16 * MiB)
            m.volume_create("demo", "db", 32 * MiB)
            m.export_create("demo", "db", kind="local")
            disk = os.path.realpath("/dev/dmsnap/demo/db")
            _say(f"journaled pool 'demo', volume db exported as {disk} (/dev/dmsnap/demo/db)")
            done = threading.Event()
            written: list[int] = []  # block numbers, in completion order
            worst = [0.0]

            def writer() -> None:
                n = 0
                while not done.is_set():
                    t0 = time.monotonic()
                    _io(disk, (n % 4096) * 4096, n.to_bytes(8, "little") * 512)
                    worst[0] = max(worst[0], time.monotonic() - t0)
                    written.append(n)
                    n += 1

            th = threading.Thread(target=writer)
            th.start()
            cuts = []
            for i in range(5):
                time.sleep(0.3)
                before = len(written)
                c = initiator.snapshot(disk, f"s{i}", wait=True)
                cuts.append((f"s{i}", before, len(written)))
                _say(
                    f"in-band snapshot s{i}: {c.entry.state.name.lower() if c.entry else '?'}"
                    f" after {before} writes; {len(written) - before} more completed meanwhile"
                )
            done.set()
            th.join()
            ok = True
            for name, before, after in cuts:
                path = m.snapshot_activate("demo", "db", name)["path"]
                last = written[before - 1]  # completed before the request: in
                ok &= int.from_bytes(_io(path, (last % 4096) * 4096)[:8], "little") == last
                if after < len(written):  # completed after the answer: out
                    late = written[after]
                    got = int.from_bytes(_io(path, (late % 4096) * 4096)[:8], "little")
                    ok &= got != late
                m.snapshot_deactivate("demo", "db", name)
            j = m.pool_show("demo")["journal"]
            _say(
                f"{len(written)} writes, worst write latency {worst[0] * 1000:.0f} ms while "
                f"snapshotting; journal {j['mode']}, {j['fill']:.0%} full, lag "
                f"{j['lag_records']} records; snapshots hold their cut: {'OK' if ok else 'WRONG'}"
            )
            return 0 if ok else 1
        finally:
            for p in m.catalog.pools():
                m.pool_destroy(p.name, force=True)
            m.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="leave the devices for inspection")
    ap.add_argument("--workdir", help="where the loop files go (default: a temp dir)")
    args = ap.parse_args()
    rc = run(keep=args.keep, workdir=args.workdir)
    print(flush=True)
    rc = rc or run_product(workdir=args.workdir)
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
