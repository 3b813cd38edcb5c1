"""Crash states checked on the host, where the bytes decide the answer.

The VM check (crashlib.check) starts the real daemon on a state. This one
reads the same state's images on the host, without a kernel, for the parts
whose answer is decided by userspace code or by on-disk formats:

* the catalog as the daemon would open it: the state's ext4 image replayed
  by e2fsck (as a mount would), the catalog file taken out with debugfs and
  opened with dmsnap's own Catalog (SQLite replays its WAL);
* each volume as the kernel would show it before the journal's replay:
  thin, the mapping of the metadata's last commit (thin_dump, from
  thin-provisioning-tools) read from the data area; classic, the volume's
  extent;
* the journal's recovery and replay: dmsnap's own C journal (the hot path
  extension) opens a copy of the journal image and replays its records
  onto files holding those volumes, and each marker it stops at is served
  as the daemon does (its snapshot is what the volumes hold there);
* every volume acknowledged before the cut is in the catalog and reads,
  after the replay, as the model of the writes acknowledged before the cut
  (with a RAM journal: flushed); a deletion acknowledged stays deleted;
* every marker acknowledged before the cut is either a snapshot in the
  catalog that reads as the model at the marker (thin: its device is in
  the committed metadata; classic: dm-snapshot's persistent store on the
  data image over the volume's extent as it was before the replay, which
  copies into the loaded snapshot what it overwrites), or, not in the catalog, a marker the
  journal's replay stops at, where the volumes read as the model at the
  marker (what the daemon's snapshot then holds).

Not here (the VM sample covers it): the kernel itself (dm-thin reading its
metadata and dm-snapshot its store: read here by their formats), the
daemon's start and the recovery of pending catalog
operations (a state with one is counted as skipped for what it touches),
writecache pools (the data device alone is not the volume).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field

import crashlib as cl

from dmsnap.journal.journal import Journal
from dmsnap.storage.catalog import Catalog

SECTOR = 512
COW_MAGIC = 0x70416E53  # dm-snap-persistent.c SNAP_MAGIC


@dataclass
class Outcome:
    checked: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def catalog_of(state_img: str, work: str) -> Catalog | None:
    """The catalog in a state's ext4 image (None: no catalog file yet)."""
    r = _run("e2fsck", "-fy", state_img)
    if r.returncode >= 4:  # 1, 2: errors corrected (a crash's free counts)
        raise cl.Violation(f"the catalog's file system is damaged: {r.stdout.strip()[-300:]}")
    for f in ("catalog.db", "catalog.db-wal"):
        dest = os.path.join(work, f)
        if os.path.exists(dest):
            os.unlink(dest)
        _run("debugfs", "-R", f"dump /state/{f} {dest}", state_img)
    db = os.path.join(work, "catalog.db")
    if not os.path.exists(db) or not os.path.getsize(db):
        return None
    return Catalog(db)


_MAP = re.compile(
    r'<(?:single_mapping origin_block="(\d+)" data_block="(\d+)"'
    r'|range_mapping origin_begin="(\d+)" data_begin="(\d+)" length="(\d+)")'
)
_DEV = re.compile(r'<device dev_id="(\d+)"')


def thin_mappings(data_img: str, meta_sectors: int, work: str) -> dict[int, dict[int, int]]:
    """dev id -> {virtual block: data block} at the metadata's last commit."""
    meta = os.path.join(work, "meta.img")
    with open(data_img, "rb") as src, open(meta, "wb") as dst:
        dst.write(src.read(meta_sectors * SECTOR))
    r = _run("thin_dump", meta)
    if r.returncode:
        raise cl.Violation(f"thin metadata unreadable: {r.stderr.strip()[-300:]}")
    return parse_thin_dump(r.stdout)


def parse_thin_dump(xml: str) -> dict[int, dict[int, int]]:
    """thin_dump's XML: dev id -> {virtual block: data block}."""
    out: dict[int, dict[int, int]] = {}
    cur: dict[int, int] | None = None
    for line in xml.splitlines():
        if m := _DEV.search(line):
            cur = out.setdefault(int(m.group(1)), {})
        elif cur is not None and (m := _MAP.search(line)):
            if m.group(1):
                cur[int(m.group(1))] = int(m.group(2))
            else:
                o, d, n = int(m.group(3)), int(m.group(4)), int(m.group(5))
                for i in range(n):
                    cur[o + i] = d + i
    return out


class Volumes:
    """Volume contents as the kernel would show them, from the data image."""

    def __init__(self, cat: Catalog, data_img: str, work: str) -> None:
        self.pool = cat.pool(cl.POOL)
        self.data_img = data_img
        self.thin = self.pool.backend == "thin"
        self.maps: dict[int, dict[int, int]] = {}
        if self.thin:
            self.meta = int(self.pool.config["meta_sectors"])
            self.bs = int(self.pool.config["block_sectors"]) * SECTOR
            self.maps = thin_mappings(data_img, self.meta, work)

    def read_thin(self, dev_id: int, size: int) -> bytearray:
        if dev_id not in self.maps:
            raise KeyError(dev_id)
        img = bytearray(size)
        with open(self.data_img, "rb") as f:
            for vb, db in self.maps[dev_id].items():
                off = vb * self.bs
                if off >= size:
                    continue
                f.seek(self.meta * SECTOR + db * self.bs)
                img[off : off + self.bs] = f.read(min(self.bs, size - off))
        return img

    def read_classic_snap(self, snap, origin: bytes, extra: list) -> bytes:
        """A classic snapshot as dm-snapshot's persistent store shows it
        (drivers/md/dm-snap-persistent.c): a header chunk, then metadata
        areas of (old chunk, new chunk) pairs, each followed by its data
        chunks; the chunks not copied read from the origin."""
        if extra:
            raise KeyError("grown COW area")
        with open(self.data_img, "rb") as f:
            f.seek(snap.cow_start * SECTOR)
            cow = f.read(snap.cow_size)
        magic, valid, _version, chunk = struct.unpack_from("<IIII", cow, 0)
        if magic == 0:
            return origin  # never initialised: dm-snapshot starts it empty
        if magic != COW_MAGIC:
            raise cl.Violation(f"COW header of {snap.volume}@{snap.name}: magic {magic:#x}")
        if not valid:
            raise cl.Violation(f"{snap.volume}@{snap.name}: the kernel marked it invalid")
        cs = chunk * SECTOR
        per_area = cs // 16
        img = bytearray(origin)
        area = 0
        while True:
            at = (1 + (per_area + 1) * area) * cs
            if at + cs > len(cow):
                break
            ended = False
            for i in range(per_area):
                old, new = struct.unpack_from("<QQ", cow, at + 16 * i)
                if new == 0:
                    ended = True
                    break
                if old * cs < len(img):
                    img[old * cs : old * cs + cs] = cow[new * cs : new * cs + cs]
            if ended:
                break
            area += 1
        return bytes(img)

    def read(self, vol) -> bytearray:
        if self.thin:
            return self.read_thin(vol.dev_id, vol.size)
        with open(self.data_img, "rb") as f:
            f.seek(vol.extent_start * SECTOR)
            return bytearray(f.read(vol.size))


def check(imgs: cl.Images, st: cl.State, ex: cl.Expect, work: str) -> Outcome:
    """Check state ``st`` on the host; raises cl.Violation."""
    out = Outcome()
    paths = imgs.materialize(st)
    cat = catalog_of(paths["state"], work)
    if cat is None:
        raise cl.Violation("no catalog (the pool was acknowledged)")
    try:
        return _check(cat, paths, ex, work, out)
    finally:
        cat.close()


def _check(cat: Catalog, paths: dict[str, str], ex: cl.Expect, work: str, out: Outcome):
    if cl.POOL not in {p.name for p in cat.pools()}:
        raise cl.Violation(f"pool {cl.POOL} (acknowledged) is not in the catalog")
    pending = cat.pending()
    have = {v.id: v for v in cat.volumes(cl.POOL)}
    pend_vols = {p.payload.get("name") for p in pending if p.kind.startswith("volume.")}
    for vid, name in ex.volumes.items():
        v = have.get(vid)
        if v is None or v.name != name:
            raise cl.Violation(f"volume {name} (id {vid}, acknowledged) not in the catalog")
    for vid in ex.gone:
        if vid in have:
            raise cl.Violation(f"volume id {vid} deleted (acknowledged) but in the catalog")
    vols = Volumes(cat, paths["data"], work)
    # each volume's device as a file, then the journal's replay onto them
    files: dict[int, str] = {}
    origins: dict[int, bytes] = {}  # before the replay: what a classic snapshot shares
    cows = cat.cow_extents(cl.POOL)
    for vid, v in have.items():
        try:
            content = vols.read(v)
        except KeyError:
            if v.name in pend_vols:
                out.skipped.append(f"volume {v.name}: a pending catalog operation")
                continue
            raise cl.Violation(
                f"volume {v.name} (id {vid}) in the catalog, thin device {v.dev_id} not in "
                "the committed metadata"
            ) from None
        p = os.path.join(work, f"vol-{vid}.img")
        with open(p, "wb") as f:
            f.write(content)
        origins[vid] = bytes(content)
        files[vid] = p
    replayed: dict[int, dict[int, bytes]] = {}  # marker -> vid -> content there
    jcfg = vols.pool.config.get("journal", {})
    if jcfg.get("mode") == "nv":
        replayed = _replay(paths["journal"], files, have, work)
    for vid, v in have.items():
        if vid not in files or (vid not in ex.volumes and vid not in ex.maybe):
            continue
        with open(files[vid], "rb") as f:
            got = f.read()
        cl._same(ex, vid, got, ex.model.state(vid), f"volume {v.name} (id {vid})", ex.vmask)
        out.checked.append(f"volume {v.name}")
    snaps = {(s.name, s.volume): s for s in cat.snapshots(cl.POOL)}
    deleted = ex.snap_maybe
    pend_snaps = {p.payload.get("name") for p in pending if p.kind.startswith("snapshot.")}
    for mk, seq, name, members in ex.markers:
        for vname, vid in members:
            what = f"{vname}@{name} (marker {mk})"
            if (name, vname) in ex.snap_gone:
                if (name, vname) in snaps:
                    raise cl.Violation(f"{what} deleted (acknowledged) but in the catalog")
                continue
            if name in pend_snaps:
                out.skipped.append(f"{what}: a pending catalog operation")
                continue
            if (name, vname) in deleted and (name, vname) not in snaps:
                continue  # its deletion asked, not acknowledged: gone is right
            if (name, vname) in snaps:  # made before the crash: the daemon keeps it
                s = snaps[(name, vname)]
                if not vols.thin:
                    try:
                        got = vols.read_classic_snap(s, origins[vid], cows.get(s.id, []))
                    except KeyError:
                        out.skipped.append(f"{what}: a grown COW area")
                        continue
                else:
                    try:
                        got = bytes(vols.read_thin(s.dev_id, ex.sizes[vid]))
                    except KeyError:
                        raise cl.Violation(
                            f"{what} in the catalog, thin device {s.dev_id} not in the metadata"
                        ) from None
            elif mk in replayed and vid in replayed[mk]:  # made by the replay
                got = replayed[mk][vid]
            else:
                raise cl.Violation(f"{what} acknowledged: neither a snapshot nor replayed")
            cl._same(ex, vid, got, ex.model.state(vid, seq), what)
            out.checked.append(what)
    return out


def _replay(
    journal_img: str, files: dict[int, str], have: dict, work: str
) -> dict[int, dict[int, bytes]]:
    """Open (recover) the journal and replay it onto the volume files;
    returns what the volumes held at each marker the replay stopped at."""
    try:
        j = Journal.open(journal_img)
    except OSError as e:
        raise cl.Violation(f"the journal does not open: {e}") from e
    seen: dict[int, dict[int, bytes]] = {}
    try:
        for vid in sorted(j.pending_volumes()):
            if vid in files:
                j.attach(vid, files[vid], os.path.getsize(files[vid]))
            else:  # a deleted volume's records (FORGET follows): a scratch file
                p = os.path.join(work, f"gone-{vid}.img")
                with open(p, "wb") as f:
                    f.truncate(16 << 20)
                j.attach(vid, p, 16 << 20)
        for vid, p in files.items():
            if vid not in j.pending_volumes():
                j.attach(vid, p, os.path.getsize(p))
        j.start()
        while True:
            mk = j.next_marker(timeout=0.2)
            if mk is None:
                if j.stats().unflushed_records == 0:
                    break
                continue
            snap: dict[int, bytes] = {}
            for vid, p in files.items():
                with open(p, "rb") as f:
                    snap[vid] = f.read()
            seen[mk.id] = snap
            j.marker_done(mk.id)
        j.sync(60.0)
    finally:
        j.close(drain=True)
    return seen


class Checker:
    """Checks the states of one recording on the host, in cut order."""

    def __init__(self, lg: cl.Logs) -> None:
        self.work = tempfile.mkdtemp(prefix="torture-host-")
        self.imgs = cl.Images(lg, self.work)

    def close(self) -> None:
        self.imgs.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def check(self, st: cl.State, ex: cl.Expect) -> Outcome:
        return check(self.imgs, st, ex, self.work)
