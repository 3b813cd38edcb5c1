"""Crash states from a dm-log-writes recording (issue 18 §1).

Recording: the pool's data device, its journal device and the file system
holding the state directory (the catalog) each sit on a dm-log-writes
device. A *cut* suspends all three (in-flight I/O completes, new I/O
queues), puts the same mark ``cN`` in each log, notes how many workload
events (intents, acknowledgements) had happened, and resumes them. Whatever
was acknowledged before the cut is, on every device, in the log before
mark ``cN``; whatever was issued after it is after it. So the three log
prefixes at one mark are one consistent crash state. dm-log-writes logs a
plain write only when a flush covers it (the group of writes completed
before the flush, right before the FLUSH entry) and a FUA write when it
completes, so a prefix holds exactly what was durable.

States derived from the cut at mark k (all but one device at k):
  mark     every device at mark k;
  jext     the journal device also takes its next r ring writes after k
           (records durable but not yet acknowledged); never a superblock
           write, whose checkpoint may rest on a data-device sync after k;
  jtorn    the same, the r-th write torn to a sector-sized prefix;
  dvol     the data device also takes a random subset of the plain writes
           logged after k before its next flush/FUA (the volatile cache
           reordered and lost the rest), one of them maybe torn, when the
           catalog's device wrote nothing from k to that flush (else the
           state is kind "dvol*": not real, never checked);
  dext     the data device at a flush/FUA boundary before the next mark,
           when the catalog's device wrote nothing in between (a thin
           commit never outruns the catalog intent it rests on);
  sext     the catalog's device at a flush/FUA boundary before the next
           mark, when the data device wrote nothing in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

from faultdev import remove_unheld
from jmodel import (
    LOG_DISCARD,
    LOG_FLUSH,
    LOG_FUA,
    LogEntry,
    LogWritesLog,
    Mask,
    Model,
    first_difference,
    pattern,
    read_direct,
)

from dmsnap.dm import DeviceMapper, Role, make_uuid
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table
from dmsnap.dm.udev import UdevSync
from dmsnap.storage import loop
from dmsnap.storage.manager import Manager

MiB = 1 << 20
SECTOR = 512
POOL = "tc"
DEVS = ("data", "journal", "state", "cache")
SIZES = {"data": 128 * MiB, "journal": 16 * MiB, "state": 64 * MiB, "cache": 16 * MiB}
RAM_JOURNAL = 16 * MiB
LOG_SIZE = 1024 * MiB
JOURNAL_RING = 8192  # records start here; below are the two superblock slots


# Role INTERNAL: the udev rules skip blkid and systemd for them, as for a
# pool's own layers; every cut's resume is a uevent, and under emulation a
# backlog of probes delays the pool's own device changes by minutes.


# Whether device changes wait for udev. The crash checker runs with udev
# stopped in the throwaway guest (tests/torture/crash.py): what a state shows
# is decided by the bytes on its disks, and under emulation udev's processing
# of each device change (one lost remove event: a 5 s wait) was most of a
# state's cost. Without udev, dmsnap.dm makes the /dev/mapper nodes itself,
# as it does in a container.
USE_UDEV = True


def new_dm(timeout: float = 60.0) -> DeviceMapper:
    return DeviceMapper(udev=UdevSync(timeout=timeout, use_udev=USE_UDEV))


def dm_name(dev: str) -> str:
    return f"tcrash-{dev}"


def dm_path(dev: str) -> str:
    return f"/dev/mapper/{dm_name(dev)}"


def _sectors(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END) // SECTOR
    finally:
        os.close(fd)


def run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")


_libc = ctypes.CDLL(None, use_errno=True)


def mount_state(dev: str, mnt: str) -> None:
    """mount -o nodiscard DEV MNT (ext4), as the system call: under
    emulation mount(8) costs half a second a state (exec, libmount, blkid)."""
    if _libc.mount(dev.encode(), mnt.encode(), b"ext4", 0, b"nodiscard") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {dev} on {mnt}: {os.strerror(err)}")


def umount_state(mnt: str) -> None:
    if _libc.umount2(mnt.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {mnt}: {os.strerror(err)}")


def cleanup_devices(dm: DeviceMapper, mnt: str) -> None:
    """Remove what a run (ours) left: the pool's stack top-down, our devices,
    the mount, our loop devices."""
    if os.path.ismount(mnt):
        umount_state(mnt)
    remove_unheld(dm, ("dmsnap-", "tcrash-"))


# -- recording -----------------------------------------------------------------------


class Recorder:
    def __init__(self, dm: DeviceMapper, devs: tuple[str, ...] = DEVS) -> None:
        self.dm = dm
        self.devs = devs
        self.lock = threading.Lock()
        self.events: list[list] = []
        self.cuts: list[int] = []  # cut n -> number of events before it

    def event(self, *ev: object) -> None:
        with self.lock:
            self.events.append(list(ev))

    def cut(self) -> None:
        with self.lock:
            for d in self.devs:
                self.dm.suspend(dm_name(d), lockfs=False)
            n = len(self.cuts)
            # every acknowledgement noted so far completed before the suspend
            self.cuts.append(len(self.events))
            for d in self.devs:
                self.dm.message(dm_name(d), f"mark c{n}")
            for d in self.devs:
                self.dm.resume(dm_name(d))


@dataclass
class Workload:
    backend: str
    seed: int
    writers: int = 3
    writes: int = 40  # per writer
    vol_size: int = 2 * MiB
    span: int = 2 * MiB
    snaps: int = 6
    journal: str = "nv"  # or "ram": only a FLUSH makes writes durable
    cache: bool = False  # a writecache (on its own logged device) under the pool

    def variant(self) -> str:
        return f"{self.journal} journal, writecache {'on' if self.cache else 'off'}"


def workload(m: Manager, rec: Recorder, w: Workload) -> None:
    """Several volumes of one pool: concurrent writers (writes and discards)
    through the local writer, snapshots and group snapshots, a volume deleted
    and created again, all acknowledged into the recorder's event list."""
    rng = random.Random(w.seed)
    if w.journal == "nv":
        jargs: dict = {"journal": dm_path("journal")}
    else:
        jargs = {"journal_mode": "ram", "journal_size": RAM_JOURNAL}
    r = m.pool_create(
        POOL,
        backend=w.backend,
        data=dm_path("data"),
        cache=dm_path("cache") if w.cache else None,
        **jargs,
    )
    rec.event("pool", r["name"], w.journal, w.cache)
    rec.cut()
    vids: dict[str, int] = {}

    def create(name: str) -> None:
        m.volume_create(POOL, name, w.vol_size)
        vid = m.catalog.volume(POOL, name).id
        vids[name] = vid
        rec.event("vol+", name, vid, w.vol_size)
        rec.cut()

    for name in ("a", "b", "c"):
        create(name)
    ios = {n: m.open_volume(POOL, n) for n in ("a", "b", "c")}
    wid_lock = threading.Lock()
    next_wid = [w.seed * 10**6]
    errors: list[str] = []

    def one_write(rng: random.Random, name: str, io) -> None:
        with wid_lock:
            wid = next_wid[0]
            next_wid[0] += 1
        vid = vids[name]
        if w.journal == "ram" and rng.random() < 0.15:
            # a FLUSH: every write acknowledged before it is durable once it
            # returns (the pool's whole journal is synced)
            rec.event("flush", wid)
            io.flush()
            rec.event("flushed", wid)
            rec.cut()
            return
        if rng.random() < 0.1:
            length = rng.choice([4096, 65536, 131072])
            off = rng.randrange(0, (w.span - length) // 4096 + 1) * 4096
            rec.event("intent", wid, vid, off, length, "discard")
            seq = io.discard(off, length)
        else:
            length = rng.choice([512, 1536, 4096, 4096, 8192, 65536])
            off = rng.randrange(0, (w.span - length) // SECTOR + 1) * SECTOR
            rec.event("intent", wid, vid, off, length, "write")
            seq = io.write(off, pattern(wid, length))
        rec.event("ack", wid, seq)
        rec.cut()

    def writer(n: int) -> None:
        wr = random.Random(w.seed * 100 + n)
        try:
            for _ in range(w.writes):
                name = wr.choice(("a", "b", "c"))
                one_write(wr, name, ios[name])
        except BaseException as e:
            errors.append(f"writer {n}: {e!r}")

    stop = threading.Event()

    def cutter() -> None:  # more cuts: more quiet intervals between them
        while not stop.wait(0.05):
            rec.cut()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(w.writers)]
    threads.append(threading.Thread(target=cutter))
    for th in threads:
        th.start()
    made: list[tuple[int, str, list[str]]] = []
    try:
        for k in range(w.snaps):
            time.sleep(rng.uniform(0.05, 0.3))
            group = rng.choice([["a", "b", "c"], ["a", "b"], ["c"], ["b"]])
            name = f"s{k}"
            r = m.snapshot_create([[POOL, v] for v in group], name)
            rec.event("marker", r["marker"], r["seq"], name, [[v, vids[v]] for v in group])
            rec.cut()
            made.append((r["marker"], name, group))
            if k == 4:  # a snapshot deleted (its group's first one)
                mk, sname, members = made[0]
                deadline = time.monotonic() + 120
                while m.snapshot_request(POOL, marker=mk)["state"] == "pending":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"marker {mk} never made")
                    time.sleep(0.05)
                for v in members:
                    rec.event("snap-intent", sname, v)
                    m.snapshot_delete(POOL, v, sname)
                    rec.event("snap-", sname, v)
                    rec.cut()
            if k == 1:  # a volume with its own records, then deleted (FORGET)
                create("t")
                tio = m.open_volume(POOL, "t")
                for _ in range(3):
                    one_write(rng, "t", tio)
                rec.event("vol-intent", "t", vids["t"])
                m.volume_delete(POOL, "t")
                rec.event("vol-", "t", vids["t"])
                rec.cut()
            if k == 3:  # and created again: a new id, its own writes
                create("t")
                tio = m.open_volume(POOL, "t")
                for _ in range(3):
                    one_write(rng, "t", tio)
    finally:
        for th in threads[:-1]:
            th.join()
        stop.set()
        threads[-1].join()
    if errors:
        raise RuntimeError("; ".join(errors))
    rec.cut()


@dataclass
class Recording:
    dir: str
    backend: str
    seed: int
    events: list[list]
    cuts: list[int]
    logs: dict[str, str] = field(default_factory=dict)  # dev -> log file

    def save(self) -> None:
        with open(os.path.join(self.dir, "recording.json"), "w") as f:
            json.dump(
                {
                    "backend": self.backend,
                    "seed": self.seed,
                    "events": self.events,
                    "cuts": self.cuts,
                    "logs": {d: os.path.basename(p) for d, p in self.logs.items()},
                },
                f,
            )

    @classmethod
    def load(cls, d: str) -> Recording:
        with open(os.path.join(d, "recording.json")) as f:
            j = json.load(f)
        return cls(
            d,
            j["backend"],
            j["seed"],
            j["events"],
            j["cuts"],
            {k: os.path.join(d, v) for k, v in j["logs"].items()},
        )


def record(dm: DeviceMapper, workdir: str, mnt: str, w: Workload) -> Recording:
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    loops: list[loop.LoopDevice] = []
    logs = {}
    # a device the pool does not use is not logged: no states come from it
    devs = tuple(
        d for d in DEVS if (d != "journal" or w.journal == "nv") and (d != "cache" or w.cache)
    )
    rec = Recorder(dm, devs)
    try:
        for d in devs:
            img, lg = os.path.join(workdir, f"{d}.img"), os.path.join(workdir, f"{d}.log")
            for p in (img, lg):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            loop.make_sparse(img, SIZES[d])
            loop.make_sparse(lg, LOG_SIZE)
            dev, lgdev = loop.attach(img), loop.attach(lg)
            loops += [dev, lgdev]
            logs[d] = lg
            dm.create(
                dm_name(d),
                make_uuid(Role.INTERNAL, dm_name(d)),
                Table.single(SIZES[d] // SECTOR, t.LogWrites(dev.devno, lgdev.devno)),
            )
        run(
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            dm_path("state"),
        )
        mount_state(dm_path("state"), mnt)
        m = Manager(os.path.join(mnt, "state"), dm=new_dm())
        try:
            rec.cut()
            workload(m, rec, w)
        finally:
            m.close(drain=False)
        rec.cut()
    finally:
        # the destructors log the writes no flush covered, then the end mark
        cleanup_devices(dm, mnt)
        for lo in reversed(loops):
            loop.detach(lo)
    for d in devs:
        os.unlink(os.path.join(workdir, f"{d}.img"))
    r = Recording(workdir, w.backend, w.seed, rec.events, rec.cuts, logs)
    r.save()
    return r


# -- crash states --------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    index: int
    kind: str
    cut: int
    # per device: entries to apply after the mark, as (entry index, sectors
    # or None for all of it)
    extra: tuple[tuple[str, tuple[tuple[int, int | None], ...]], ...] = ()
    # the first cut after every extra entry: writes issued before it but not
    # acknowledged before ``cut`` may be in the state (masked by the oracle)
    horizon: int = 0

    @property
    def real(self) -> bool:
        """False: a state the devices cannot be in (kind ending in "*")."""
        return not self.kind.endswith("*")

    def describe(self) -> str:
        ex = ", ".join(
            f"{d}+[{' '.join(str(i) if n is None else f'{i}:{n}s' for i, n in es)}]"
            for d, es in self.extra
        )
        return f"state {self.index}: {self.kind} at cut c{self.cut}" + (f" ({ex})" if ex else "")


class Logs:
    def __init__(self, r: Recording) -> None:
        self.r = r
        self.logs = {d: LogWritesLog(p) for d, p in r.logs.items()}
        self.entries = {d: list(lg.entries()) for d, lg in self.logs.items()}
        self.mark_at: dict[str, dict[int, int]] = {}
        for d, es in self.entries.items():
            self.mark_at[d] = {
                int(e.mark[1:]): e.index for e in es if e.mark and e.mark.startswith("c")
            }
        self.ncuts = min(len(v) for v in self.mark_at.values())
        self.devs = tuple(d for d in DEVS if d in r.logs)
        for d in self.devs:
            assert len(self.mark_at[d]) == len(r.cuts), (d, len(self.mark_at[d]), len(r.cuts))

    def next_cut(self, d: str, i: int) -> int:
        """The first cut whose mark follows device d's entry i."""
        return min((k for k, at in self.mark_at[d].items() if at > i), default=self.ncuts - 1)

    def between(self, d: str, k: int) -> list[LogEntry]:
        """Device d's entries after mark k, before mark k+1 (no marks)."""
        es = self.entries[d]
        lo = self.mark_at[d][k] + 1
        hi = self.mark_at[d].get(k + 1, len(es))
        return [e for e in es[lo:hi] if e.mark is None]

    def after(self, d: str, k: int) -> list[LogEntry]:
        es = self.entries[d]
        return [e for e in es[self.mark_at[d][k] + 1 :] if e.mark is None]


def _flagged(e: LogEntry) -> bool:
    return bool(e.flags & (LOG_FLUSH | LOG_FUA))


def generate(lg: Logs, rng_seed: int) -> list[State]:
    """Every crash state this recording gives (deterministic in the log and
    the seed)."""
    rng = random.Random(rng_seed)
    events = lg.r.events
    pool_at = next(i for i, ev in enumerate(events) if ev[0] == "pool")
    out: list[State] = []

    def add(kind: str, k: int, extra: dict[str, list[tuple[int, int | None]]] | None = None):
        ex = tuple((d, tuple(v)) for d, v in (extra or {}).items())
        h = max([k] + [lg.next_cut(d, i) for d, v in ex for i, _ in v])
        out.append(State(len(out), kind, k, ex, min(h, lg.ncuts - 1)))

    for k in range(lg.ncuts):
        if lg.r.cuts[k] <= pool_at:
            continue  # before the pool existed: nothing to check
        add("mark", k)
        # journal: the next ring writes, whole or the last one torn
        ring: list[LogEntry] = []
        for e in lg.after("journal", k) if "journal" in lg.devs else []:
            if e.flags & LOG_DISCARD or e.offset < JOURNAL_RING or not e.length:
                break
            ring.append(e)
            if len(ring) == 3:
                break
        for r in range(1, len(ring) + 1):
            add("jext", k, {"journal": [(e.index, None) for e in ring[:r]]})
            n = ring[r - 1].length // SECTOR
            if n > 1:
                n_ = rng.randrange(1, n)
                add(
                    "jtorn",
                    k,
                    {
                        "journal": [(e.index, None) for e in ring[: r - 1]]
                        + [(ring[r - 1].index, n_)]
                    },
                )
        # data (and cache): a subset of the plain writes before its next
        # flush/FUA
        for d in ("data", "cache"):
            if d not in lg.devs:
                continue
            plain: list[LogEntry] = []
            for e in lg.after(d, k):
                if _flagged(e):
                    break
                plain.append(e)
            for _ in range(min(2, len(plain))):
                sub = sorted(
                    rng.sample(plain, rng.randrange(1, len(plain) + 1)), key=lambda e: e.index
                )
                ex: list[tuple[int, int | None]] = [(e.index, None) for e in sub]
                multi = [
                    i for i, e in enumerate(sub) if e.length > SECTOR and not e.flags & LOG_DISCARD
                ]
                if multi and rng.random() < 0.5:
                    i = rng.choice(multi)
                    ex[i] = (sub[i].index, rng.randrange(1, sub[i].length // SECTOR))
                # A plain write after the cut may rest on a catalog write
                # after it (a COW header zeroed in the extent of a snapshot
                # whose deletion the catalog committed after the cut): such
                # a state is not a real one unless the catalog's device
                # wrote nothing from the cut until the writes' flush. It
                # keeps its number (replay commands stay valid) as kind
                # "Xvol*", never checked.
                h = min(max(lg.next_cut(d, i) for i, _ in ex), lg.ncuts - 1)
                real = "state" not in lg.devs or not any(
                    lg.between("state", c) for c in range(k, h)
                )
                add(d[0] + "vol" + ("" if real else "*"), k, {d: ex})
        # one device at a flush/FUA boundary while the others are quiet
        for d in ("data", "state", "cache"):
            others = [o for o in ("data", "state", "cache") if o != d and o in lg.devs]
            if d not in lg.devs or any(lg.between(o, k) for o in others):
                continue
            seg = lg.between(d, k)
            bounds = [i for i, e in enumerate(seg) if _flagged(e)]
            for b in bounds:
                add(d[0] + "ext", k, {d: [(e.index, None) for e in seg[: b + 1]]})
    return out


class Images:
    """Each device's image at mark k, advanced incrementally."""

    def __init__(self, lg: Logs, workdir: str) -> None:
        self.lg = lg
        self.dir = workdir
        self.pos = dict.fromkeys(lg.devs, 0)
        self.fds = {}
        self.logf = {d: open(lg.r.logs[d], "rb") for d in lg.devs}  # noqa: SIM115
        for d in lg.devs:
            p = os.path.join(workdir, f"base-{d}.img")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            loop.make_sparse(p, SIZES[d])
            self.fds[d] = os.open(p, os.O_RDWR)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        for f in self.logf.values():
            f.close()

    def apply(self, d: str, fd: int, e: LogEntry, sectors: int | None = None) -> None:
        if e.flags & LOG_DISCARD:
            os.pwrite(fd, bytes(e.length), e.offset)
        elif e.length:
            n = e.length if sectors is None else sectors * SECTOR
            f = self.logf[d]
            f.seek(e.data_at)
            data = f.read(n)
            assert len(data) == n
            os.pwrite(fd, data, e.offset)

    def advance(self, k: int) -> None:
        for d in self.lg.devs:
            es = self.lg.entries[d]
            end = self.lg.mark_at[d][k]
            assert end >= self.pos[d], "states must come in cut order"
            for e in es[self.pos[d] : end]:
                self.apply(d, self.fds[d], e)
            self.pos[d] = end

    def materialize(self, st: State) -> dict[str, str]:
        """Copies of the images at st's cut plus st's extra entries (for a
        state kept for study: ``--dump``)."""
        self.advance(st.cut)
        extra = dict(st.extra)
        out = {}
        for d in self.lg.devs:
            base = os.path.join(self.dir, f"base-{d}.img")
            p = os.path.join(self.dir, f"state-{d}.img")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            run("cp", "--sparse=always", base, p)
            if d in extra:
                fd = os.open(p, os.O_RDWR)
                try:
                    for i, n in extra[d]:
                        self.apply(d, fd, self.lg.entries[d][i], n)
                finally:
                    os.close(fd)
            out[d] = p
        return out


class Overlay:
    """A crash state's devices without copying images: each device is a
    transient dm-snapshot ("N") of its image at the state's cut (a file
    advanced incrementally, on a loop device attached once). The state's
    extra entries, and everything the daemon writes while it is checked, go
    to the snapshot's exception store; removing the snapshot drops them, so
    the next state starts from the base again and a state costs only the
    log entries between two cuts plus its own extra ones."""

    def __init__(self, images: Images, dm: DeviceMapper) -> None:
        self.images = images
        self.dm = dm
        self.loops: list[loop.LoopDevice] = []
        self.base: dict[str, loop.LoopDevice] = {}
        self.cow: dict[str, loop.LoopDevice] = {}
        try:
            for d in images.lg.devs:
                b = loop.attach(os.path.join(images.dir, f"base-{d}.img"))
                self.loops.append(b)
                self.base[d] = b
                # As large as the device: a transient store keeps its
                # exception table in RAM, so it can never overflow.
                p = os.path.join(images.dir, f"cow-{d}.img")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                loop.make_sparse(p, SIZES[d])
                c = loop.attach(p)
                self.loops.append(c)
                self.cow[d] = c
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for lo in reversed(self.loops):
            with contextlib.suppress(Exception):
                loop.detach(lo)
        self.loops.clear()

    def attach(self, st: State) -> None:
        """Our devices (tcrash-data, -journal, -state) as state ``st``."""
        self.images.advance(st.cut)
        extra = dict(st.extra)
        for d in self.images.lg.devs:
            self.dm.create(
                dm_name(d),
                make_uuid(Role.INTERNAL, dm_name(d)),
                Table.single(
                    SIZES[d] // SECTOR,
                    t.Snapshot(self.base[d].devno, self.cow[d].devno, "N", 8),
                ),
            )
            if d in extra:
                fd = os.open(dm_path(d), os.O_RDWR | os.O_DIRECT)
                try:
                    for i, n in extra[d]:
                        self._write(d, fd, self.images.lg.entries[d][i], n)
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def _write(self, d: str, fd: int, e: LogEntry, sectors: int | None) -> None:
        n = e.length if sectors is None else sectors * SECTOR
        if not n:
            return
        buf = mmap.mmap(-1, n)
        if not e.flags & LOG_DISCARD:
            f = self.images.logf[d]
            f.seek(e.data_at)
            data = f.read(n)
            assert len(data) == n
            buf.write(data)
        os.pwritev(fd, [buf], e.offset)


# -- the oracle ----------------------------------------------------------------------


class Violation(Exception):
    pass


@dataclass
class Expect:
    """What was acknowledged before a cut."""

    model: Model
    mask: Mask
    volumes: dict[int, str]  # must exist: id -> name
    maybe: dict[int, str]  # may exist (creation or deletion not acknowledged)
    gone: set[int]  # deleted, acknowledged
    markers: list[tuple[int, int, str, list[tuple[str, int]]]]
    sizes: dict[int, int]
    # volumes only: the mask plus, with a RAM journal, the writes that no
    # completed FLUSH covers (acknowledged, not durable)
    vmask: Mask | None = None
    snap_gone: set[tuple[str, str]] = field(default_factory=set)  # (snapshot, volume)
    snap_maybe: set[tuple[str, str]] = field(default_factory=set)


def expect(events: list[list], n: int, issued: int | None = None) -> Expect:
    """What a state must show: writes acknowledged in ``events[:n]``; those
    issued in ``events[:issued]`` (default n) but not acknowledged before n
    are unknown."""
    sizes: dict[int, int] = {}
    for ev in events:
        if ev[0] == "vol+":
            sizes[ev[2]] = ev[3]
    before = events[:n]
    intents = {ev[1]: ev for ev in events[: max(n, issued or n)] if ev[0] == "intent"}
    acks = {ev[1]: ev[2] for ev in before if ev[0] == "ack"}
    model, mask, vmask = Model(dict(sizes)), Mask(dict(sizes)), Mask(dict(sizes))
    ram = any(ev[0] == "pool" and len(ev) > 2 and ev[2] == "ram" for ev in events)
    # RAM journal: durable are the writes acknowledged before the call of a
    # FLUSH that returned before the cut
    ack_at = {ev[1]: i for i, ev in enumerate(before) if ev[0] == "ack"}
    called = {ev[1]: i for i, ev in enumerate(events) if ev[0] == "flush"}
    synced = max((called[ev[1]] for ev in before if ev[0] == "flushed"), default=-1)
    for wid, (_, _, vid, off, length, kind) in intents.items():
        if wid in acks:
            data = pattern(wid, length) if kind == "write" else bytes(length)
            model.record(acks[wid], vid, off, data)
            if ram and ack_at[wid] > synced:
                vmask.add(vid, off, length)
        else:
            mask.add(vid, off, length)
            vmask.add(vid, off, length)
    volumes: dict[int, str] = {}
    maybe: dict[int, str] = {}
    gone: set[int] = set()
    for ev in before:
        if ev[0] == "vol+":
            volumes[ev[2]] = ev[1]
        elif ev[0] == "vol-intent":
            maybe[ev[2]] = volumes.pop(ev[2])
        elif ev[0] == "vol-":
            maybe.pop(ev[2], None)
            gone.add(ev[2])
    # a creation issued but not acknowledged: the "vol+" event comes after
    # the call returns, so any volume id in the catalog that we do not know
    # is allowed (and empty or masked); see check()
    markers = [
        (ev[1], ev[2], ev[3], [tuple(x) for x in ev[4]]) for ev in before if ev[0] == "marker"
    ]
    snap_gone: set[tuple[str, str]] = set()
    snap_maybe: set[tuple[str, str]] = set()
    for ev in before:
        if ev[0] == "snap-intent":
            snap_maybe.add((ev[1], ev[2]))
        elif ev[0] == "snap-":
            snap_maybe.discard((ev[1], ev[2]))
            snap_gone.add((ev[1], ev[2]))
    return Expect(model, mask, volumes, maybe, gone, markers, sizes, vmask, snap_gone, snap_maybe)


def _same(
    ex: Expect, vid: int, got: bytes, want: bytes | bytearray, what: str, mask: Mask | None = None
) -> None:
    mask = mask or ex.mask
    g, w = mask.apply(vid, got), mask.apply(vid, want)
    if g != w:
        raise Violation(f"{what}: " + first_difference(g, w))


def check(dm: DeviceMapper, ov: Overlay, st: State, mnt: str, ex: Expect) -> str:
    """Bring the crash state up as dmsnapd would and compare it with what
    was acknowledged. Returns a short outcome; raises Violation."""
    m: Manager | None = None
    t0 = time.monotonic()
    lap: dict[str, float] = {}
    try:
        ov.attach(st)
        mount_state(dm_path("state"), mnt)
        lap["attach"] = time.monotonic() - t0
        try:
            m = Manager(os.path.join(mnt, "state"), dm=new_dm())
            report = m.assemble()
            lap["start"] = time.monotonic() - t0
        except Exception as e:
            raise Violation(f"the daemon's start failed: {e!r}") from e
        pools = {p.name for p in m.catalog.pools()}
        if POOL not in pools:
            raise Violation(f"pool {POOL} (acknowledged) is not in the catalog: {report}")
        if report["pools"].get(POOL) != "ok":
            raise Violation(f"pool refused at start: {report['pools'].get(POOL)}")
        have = {v.id: v for v in m.catalog.volumes(POOL)}
        for vid, name in ex.volumes.items():
            v = have.get(vid)
            if v is None or v.name != name:
                raise Violation(f"volume {name} (id {vid}, acknowledged) missing: {sorted(have)}")
        for vid in ex.gone:
            if vid in have:
                raise Violation(f"volume id {vid} deleted (acknowledged) but back")
        for vid, v in have.items():
            if vid not in ex.volumes and vid not in ex.maybe:
                continue  # its creation was not acknowledged before the cut
            got = m.open_volume(POOL, v.name).read(0, v.size)
            _same(ex, vid, got, ex.model.state(vid), f"volume {v.name} (id {vid})", ex.vmask)
        lap["volumes"] = time.monotonic() - t0
        deadline = time.monotonic() + 120

        def snap_reads(vname: str, vid: int, name: str, mk: int, seq: int) -> None:
            act = m.snapshot_activate(POOL, vname, name)
            try:
                got = read_direct(act["path"], 0, ex.sizes[vid])
            finally:
                m.snapshot_deactivate(POOL, vname, name)
            _same(ex, vid, got, ex.model.state(vid, seq), f"{vname}@{name} (marker {mk})")

        deleted = ex.snap_gone | ex.snap_maybe
        for mk, seq, name, vols in ex.markers:
            if any((name, v) in deleted for v, _ in vols):
                # a deletion was asked after the marker was done: each member
                # is gone (acknowledged), or there and exact, or (not
                # acknowledged) either
                snaps = {(s.name, s.volume) for s in m.catalog.snapshots(POOL)}
                for vname, vid in vols:
                    if (name, vname) in ex.snap_gone:
                        if (name, vname) in snaps:
                            raise Violation(f"{vname}@{name} deleted (acknowledged) but back")
                    elif (name, vname) in snaps:
                        snap_reads(vname, vid, name, mk, seq)
                    elif (name, vname) not in ex.snap_maybe:
                        raise Violation(f"{vname}@{name} (marker {mk}) missing")
                continue
            while (r := m.snapshot_request(POOL, marker=mk))["state"] == "pending":
                if time.monotonic() > deadline:
                    raise Violation(f"marker {mk} ({name}) never made: {r}")
                time.sleep(0.05)
            if r["state"] != "done":
                raise Violation(f"marker {mk} ({name}, acknowledged): {r}")
            if sorted(s["volume"] for s in r["snapshots"]) != sorted(v for v, _ in vols):
                raise Violation(f"marker {mk} ({name}) made {r['snapshots']}, asked {vols}")
            for vname, vid in vols:
                snap_reads(vname, vid, name, mk, seq)
        groups = dict(
            m.catalog.db.execute(
                "SELECT marker, COUNT(*) FROM snap_groups WHERE marker IS NOT NULL GROUP BY marker"
            ).fetchall()
        )
        if any(c != 1 for c in groups.values()):
            raise Violation(f"a marker made more than one snapshot group: {groups}")
        lap["markers"] = time.monotonic() - t0
        laps = " ".join(f"{k} {v:.1f}" for k, v in lap.items())
        return f"ok ({len(have)} volumes, {len(ex.markers)} markers; {laps})"
    finally:
        if m is not None:
            with contextlib.suppress(Exception):
                m.close(drain=False)
        cleanup_devices(dm, mnt)


def keep_failure(r: Recording, dest: str) -> str:
    """Copy a failing trial's logs where the replay command finds them."""
    os.makedirs(dest, exist_ok=True)
    for p in r.logs.values():
        run("cp", "--sparse=always", p, dest)
    shutil.copy(os.path.join(r.dir, "recording.json"), dest)
    return dest
