"""One pool's journal at work: the C journal, its volumes, and the marker
thread that turns each MARKER the flusher reaches into a snapshot.

The flusher (C) stops at a marker with every earlier write completed and
synced on the dm devices; the controller here then has the snapshot made
(``materialize``, supplied by the Manager, which runs it under the Manager's
lock because it uses the catalog and device-mapper) and lets the flusher go
on. Whoever holds the Manager's lock and has to wait for the flusher (a
volume delete draining its records, ``snapshot create --wait``) serves
markers itself instead of waiting for the marker thread, which would need
that same lock: :meth:`PoolJournal.serve_markers`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from dmsnap import progress
from dmsnap.journal.journal import Journal, JournalError, JournalStats, Marker, crc32c_impl

log = logging.getLogger("dmsnap.journal")

Json = dict[str, Any]
# materialize(marker_id, request) -> result (JSON-able); raises on failure.
Materialize = Callable[[int, Json], Json]
# space_probe() -> (why the pool below cannot take new blocks (a thin pool out
# of metadata space) or None when it can, whether it was seen healthy: what
# was synced onto it before the look is durable); called without the
# Manager's lock.
SpaceProbe = Callable[[], tuple[str | None, bool]]

# TEST ONLY: while the file this names exists, the journal does not look at
# the pool below (no no-space transition, no confirmation), so a test can
# hold open the window between dm-thin's switch to read-only and that look
# (tests/kernel/test_thin_metadata_full.py). Never set it in production.
HOLD_PROBE_ENV = "DMSNAP_TEST_HOLD_SPACE_PROBE"


class Holds(Protocol):
    """Exclusive opens of block devices by key (the storage core's
    ``dmsnap.storage.devices.Holds``, handed in: the journal sits below the
    storage core and imports nothing of it)."""

    def hold(self, key: object, path: str, what: str) -> int | None: ...

    def release(self, key: object) -> None: ...

    def release_all(self) -> None: ...


class PoolJournal:
    def __init__(
        self,
        pool: str,
        journal: Journal,
        mode: str,
        materialize: Materialize,
        lock: threading.RLock,
        holds: Holds,
        space_probe: SpaceProbe | None = None,
        confirm: bool = False,
    ) -> None:
        self.pool = pool
        self.journal = journal
        self.mode = mode
        self._materialize = materialize
        self._lock = lock  # the Manager's (re-entrant) lock
        self._cond = threading.Condition()
        self._results: dict[int, Json | Exception] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.volumes: dict[int, int] = {}  # attached volume id -> size
        # O_EXCL on each attached volume's private dm device: only the
        # journal writes it (no mkfs, mount or other claim meanwhile).
        self._holds = holds
        self.last_error: str | None = None
        # The gate in front of the C journal: close() shuts it, waits for the
        # calls already inside, and only then frees the journal.
        self._gate = threading.Condition()
        self._inside = 0
        self._closing = False
        self._full_checked = 0.0
        self._pool_full = False
        self._space_probe = space_probe
        self._probe_lock = threading.Lock()  # the marker thread and waiters under the lock
        # the checkpoint passes only what a look at the pool confirmed
        self._confirm = confirm and space_probe is not None
        self.no_space_reason: str | None = None
        self._replayed: tuple[int, Callable[[], None]] | None = None

    # -- life cycle -----------------------------------------------------------------

    def start(self, volumes: dict[int, tuple[str, int]]) -> None:
        """Attach the pool's volumes (id -> dm path, size) and start the
        flusher and the marker thread. Records of volumes that no longer
        exist (deleted while records were in flight, then a crash) are
        dropped, loudly, as are records found after a torn tail."""
        rec = self.journal.recovery
        if rec.dropped:
            log.warning(
                "pool %s: journal recovery: the log ends before record %d (a torn tail); "
                "%d record(s) after it, up to %d, were never acknowledged and are dropped",
                self.pool,
                rec.end_seq,
                rec.dropped,
                rec.last_seq,
            )
        for vid in sorted(self.journal.pending_volumes() - volumes.keys()):
            log.warning("pool %s: dropping journal records of deleted volume id %d", self.pool, vid)
            self.forget(vid)
        for vid, (path, size) in volumes.items():
            self.attach(vid, path, size)
        if self._confirm:
            self.journal.set_confirm(True)
        self.check_space()  # before the first write is taken
        self.journal.start()
        self._thread = threading.Thread(
            target=self._marker_loop, name=f"markers-{self.pool}", daemon=True
        )
        self._thread.start()
        try:
            self._replay_backlog()
        except BaseException:
            self._stop.set()
            self._thread.join()
            raise

    def _replay_backlog(self, stall: float = 120.0) -> None:
        """A recovered log longer than the journal's memory limit is replayed
        by the flusher in pieces of that size; until it is all in memory,
        reads would wait for it and writes for room. Finish it before the
        pool serves (serving the markers in it here: the caller may hold the
        Manager's lock). Gives up, the records staying in the journal, once
        the flusher has made no progress for ``stall`` seconds."""
        st = self.journal.stats()
        if not st.backlog_bytes:
            return
        log.warning(
            "pool %s: the journal's log is %d MiB longer than its memory limit (%d MiB): "
            "replaying it before serving",
            self.pool,
            st.backlog_bytes >> 20,
            st.mem_limit >> 20,
        )
        last, since = st.flushed_seq, time.monotonic()
        while st.backlog_bytes:
            if st.journal_error:
                raise JournalError(
                    -st.journal_error,
                    f"pool {self.pool}: journal replay: {_errname(st.journal_error)}",
                )
            self.serve_markers(0.05)
            self.check_space()  # confirms what was replayed: room behind the checkpoint
            st = self.journal.stats()
            if st.flushed_seq != last:
                last, since = st.flushed_seq, time.monotonic()
            elif time.monotonic() - since > stall:
                why = _errname(st.flush_error) or "no progress"
                raise TimeoutError(
                    f"pool {self.pool}: journal replay stalled for {stall:.0f} s ({why}); "
                    "its records stay in the journal"
                )
        log.info("pool %s: journal replayed", self.pool)

    def close(
        self, *, drain: bool = True, timeout: float = 60.0, stall: float | None = None
    ) -> None:
        """Stop taking writes, let the ones inside finish, (with drain) put
        every record onto its dm device, stop the threads, free the journal.
        Without drain an NV journal keeps its records for the next start; a
        RAM journal loses them, so the Manager always drains those. With
        ``stall``, the drain gives up once the flusher has made no progress
        for that long (a failing disk), however much of ``timeout`` is left."""
        with self._gate:
            self._closing = True
        deadline = time.monotonic() + timeout
        while True:  # writers waiting for space need the flusher, which may need a marker
            with self._gate:
                if self._inside == 0:
                    break
                self._gate.wait(0.05)
            self.serve_markers()
        err: JournalError | TimeoutError | None = None
        if drain:
            try:
                self._drain(deadline, stall)
            except (JournalError, TimeoutError) as e:
                err = e
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.journal.close(drain=drain and err is None, timeout=timeout)
        finally:
            self.release_all()
        with self._cond:
            self._cond.notify_all()
        if err is not None:
            raise err

    def _drain(self, deadline: float, stall: float | None) -> None:
        if stall is None:
            self.sync(max(1.0, deadline - time.monotonic()))
            return
        last, since = self.journal.stats().flushed_seq, time.monotonic()
        while True:
            try:
                self.sync(max(0.1, min(1.0, deadline - time.monotonic())))
                return
            except TimeoutError:
                now, seen = time.monotonic(), self.journal.stats().flushed_seq
                if seen != last:
                    last, since = seen, now
                elif now - since >= stall:
                    raise TimeoutError(
                        f"pool {self.pool}: the flusher made no progress for {stall:.0f} s"
                    ) from None
                if now >= deadline:
                    raise

    @contextmanager
    def _entry(self) -> Iterator[None]:
        with self._gate:
            if self._closing:
                raise JournalError(errno.ESHUTDOWN, f"pool {self.pool}: journal is stopping")
            self._inside += 1
        try:
            yield
        finally:
            with self._gate:
                self._inside -= 1
                if self._inside == 0:
                    self._gate.notify_all()

    # -- volumes ----------------------------------------------------------------------

    def attach(self, vol: int, path: str, size: int) -> None:
        self._holds.hold(vol, path, f"pool {self.pool}: volume id {vol}")
        try:
            self.journal.attach(vol, path, size)
        except BaseException:
            self._holds.release(vol)
            raise
        self.volumes[vol] = size

    def detach(self, vol: int, timeout: float = 120.0) -> None:
        """Every record of ``vol`` on its dm device, then no more writes to it
        (called with the Manager's lock held: serves markers meanwhile)."""
        self._until(lambda t: self.journal.detach(vol, t), timeout)
        self.volumes.pop(vol, None)
        self._holds.release(vol)

    def release_all(self) -> None:
        """Let every volume's dm device go (the journal is closed)."""
        self._holds.release_all()

    def forget(self, vol: int) -> None:
        """Drop a deleted volume's unflushed records, its end recorded in the
        journal. If that record cannot be written (journal full behind a
        stuck flusher, journal device error), the records are still dropped
        now; a replay after a crash brings them back and :meth:`start` drops
        them again (their volume is no longer in the catalog, and ids are
        never reused), so say so rather than fail the delete."""
        try:
            self.journal.forget(vol)
        except JournalError as e:
            log.warning("pool %s: volume id %d: %s", self.pool, vol, e)
        self.volumes.pop(vol, None)

    def sync(self, timeout: float = 120.0) -> None:
        """Every record so far on the dm devices and synced, every marker so
        far made (lock held). Converges under load: a later short sync that
        times out still counts once the checkpoint passes our target."""
        st = self.journal.stats()
        target = st.head_seq
        # what may take long (a restore, a delete): the backlog written back
        task = (
            progress.task("journal write-back", total=target - st.checkpoint_seq, unit="records")
            if progress.listening() and target > st.checkpoint_seq
            else None
        )

        def step(t: float) -> None:
            try:
                self.journal.sync(t)
            except JournalError as e:
                if e.errno != errno.ETIMEDOUT or self.journal.stats().checkpoint_seq < target:
                    if task is not None and e.errno == errno.ETIMEDOUT:
                        left = max(0, target - self.journal.stats().checkpoint_seq)
                        task.update((task.total or 0) - left)
                    raise
            if self.journal.stats().checkpoint_seq < target:
                # synced, not confirmed yet (or the flusher was rewound):
                # _until looks at the pool and tries again
                raise JournalError(errno.ETIMEDOUT, "records synced, not yet confirmed")
            if task is not None:
                task.update(task.total or 0)

        self._until(step, timeout)

    def _until(self, step: Callable[[float], None], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                step(0.05)
                return
            except JournalError as e:
                if e.errno != errno.ETIMEDOUT:
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pool {self.pool}: journal: {e}") from None
            self.serve_markers()
            self.check_space()  # the confirmation a wait for the checkpoint needs

    # -- markers ----------------------------------------------------------------------

    def request(self, marker_id: int, request: Json, timeout: float = 30.0) -> int:
        """Append the marker; returns once it is durable (NV) / queued (RAM)."""
        payload = json.dumps(request, sort_keys=True, separators=(",", ":")).encode()
        if len(payload) > Journal.MAX_PAYLOAD:
            raise ValueError(f"snapshot request of {len(payload)} bytes is too large")
        with self._entry():
            return self.journal.marker(marker_id, payload, timeout=timeout)

    def wait(
        self, marker_id: int, timeout: float, *, cancel: threading.Event | None = None
    ) -> Json:
        """The result of a marker's materialisation. InterruptedError once
        ``cancel`` is set or the journal stops, TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if marker_id in self._results:
                    res = self._results[marker_id]
                    if isinstance(res, Exception):
                        raise res
                    return res
            if (cancel is not None and cancel.is_set()) or self._stop.is_set():
                raise InterruptedError(f"marker {marker_id}: waiting interrupted")
            if time.monotonic() > deadline:
                raise TimeoutError(f"marker {marker_id} not reached within {timeout:.0f} s")
            if not self.serve_markers(0.05):
                with self._cond:
                    if marker_id not in self._results:
                        self._cond.wait(0.05)

    def serve_markers(self, timeout: float = 0.0) -> bool:
        """Handle the marker the flusher stands at, if any (lock held or
        taken here). True if one was handled."""
        try:
            m = self.journal.next_marker(timeout)
        except JournalError as e:
            if e.errno == errno.ESHUTDOWN:
                return False
            raise
        if m is None:
            return False
        self._handle(m)
        return True

    def _handle(self, m: Marker) -> None:
        result: Json | Exception
        while not self._lock.acquire(timeout=0.1):
            if self._stop.is_set():  # close() holds the lock and serves it
                return
        try:
            try:
                request = json.loads(m.payload)
                result = self._materialize(m.id, request)
            except Exception as e:  # the snapshot failed; writes must go on
                log.error("pool %s: snapshot of marker %d failed: %s", self.pool, m.id, e)
                self.last_error = f"marker {m.id}: {e}"
                result = e
            try:
                self.journal.marker_done(m.id)
            except JournalError as e:
                if e.errno != errno.EINVAL:  # EINVAL: another thread passed it already
                    raise
        finally:
            self._lock.release()
        with self._cond:
            self._results[m.id] = result
            if len(self._results) > 4096:  # results are for waiters; keep the recent ones
                for k in sorted(self._results)[:1024]:
                    del self._results[k]
            self._cond.notify_all()

    def when_replayed(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (under the Manager's lock, on the marker thread)
        once every record recovered at open is on the dm devices and every
        recovered marker has been served."""
        self._replayed = (self.journal.stats().head_seq, callback)

    def _check_replayed(self) -> None:
        if self._replayed is None:
            return
        target, callback = self._replayed
        if self.journal.stats().synced_seq < target:
            return
        self._replayed = None
        with self._lock:
            try:
                callback()
            except Exception:
                log.exception("pool %s: after-replay check failed", self.pool)

    def _marker_loop(self) -> None:
        while not self._stop.is_set():
            self._check_replayed()
            self.check_space()
            try:
                m = self.journal.next_marker(0.25)
            except JournalError as e:
                if e.errno == errno.ESHUTDOWN:
                    return
                log.error("pool %s: marker thread: %s", self.pool, e)
                time.sleep(0.5)
                continue
            if m is not None:
                self._handle(m)

    def check_space(self) -> None:
        """Ask the pool whether it can take new blocks and tell the C
        journal (the SCSI fast path refuses writes while it cannot; the
        flusher keeps discards). A thin pool out of metadata space fails the
        flusher's writes with EIO, which alone says nothing about space;
        the marker thread asks about every 0.25 s, and so does start(),
        and so does whoever waits for the flusher (_until).

        The same look confirms (with ``confirm``) what the flusher had
        synced before it: a thin pool seen writable then kept it. Going
        read-only rewinds the journal to the last confirmed record: what
        was applied since is written again once the pool has room."""
        if self._space_probe is None:
            return
        hold = os.environ.get(HOLD_PROBE_ENV)
        if hold and os.path.exists(hold):
            return  # test only: the window held open
        with self._probe_lock:
            try:
                token = self.journal.confirm_mark() if self._confirm else 0
                reason, healthy = self._space_probe()
            except JournalError:
                return  # closing
            except Exception as e:  # never let monitoring kill the marker thread
                log.error("pool %s: space check failed: %s", self.pool, e)
                return
            if reason != self.no_space_reason:
                try:
                    self.journal.set_no_space(-errno.ENOSPC if reason else 0)
                except JournalError:
                    return  # closing
                if reason:
                    log.warning("pool %s: new writes refused: %s", self.pool, reason)
                else:
                    log.info("pool %s: writable again; new writes accepted", self.pool)
                self.no_space_reason = reason
            if self._confirm and healthy and not reason:
                try:
                    self.journal.confirm(token)
                except JournalError:
                    return  # closing

    # -- data path (no Manager lock) ------------------------------------------------

    def write(
        self, vol: int, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> int:
        self._refuse_if_pool_full()
        with self._entry():
            return self.journal.write(vol, offset, data, fua=fua)

    def compare_and_write(
        self,
        vol: int,
        offset: int,
        compare: bytes | bytearray | memoryview,
        data: bytes | bytearray | memoryview,
        *,
        fua: bool = False,
    ) -> int:
        """Journal.compare_and_write; refused like a write while the pool is full."""
        self._refuse_if_pool_full()
        with self._entry():
            return self.journal.compare_and_write(vol, offset, compare, data, fua=fua)

    def _refuse_if_pool_full(self) -> None:
        """While the flusher's writes fail with ENOSPC (a full thin pool), or
        the pool cannot take new blocks (out of thin metadata: check_space),
        a new write could only fill the journal and then time out: refuse it
        now, as the dm device itself would. Writes already acknowledged stay
        in the journal and land once there is room (the flusher retries)."""
        now = time.monotonic()
        if now - self._full_checked > 0.05:  # stats take the journal's lock: not per write
            self._pool_full = self.journal.stats().flush_error == -errno.ENOSPC
            self._full_checked = now
        if self.no_space_reason:
            raise JournalError(errno.ENOSPC, self.no_space_reason)
        if self._pool_full:
            raise JournalError(
                errno.ENOSPC,
                f"pool {self.pool} is out of data space: its journal cannot drain; "
                "delete snapshots or volumes to free space",
            )

    def discard(self, vol: int, offset: int, length: int) -> int:
        """Ordered like a write; the range reads zeros at once and its space
        goes back to the pool when the flusher gets there. Not refused while
        the pool is full (unlike a write): it takes one header in the
        journal, and lands, freeing space, once the writes before it do."""
        with self._entry():
            return self.journal.discard(vol, offset, length)

    def read(self, vol: int, offset: int, length: int) -> bytes:
        with self._entry():
            return self.journal.read(vol, offset, length)

    def flush(self) -> None:
        """A writer's FLUSH: NV records are durable already; RAM records must
        reach the dm devices (markers on the way are served by the thread)."""
        if self.mode == "nv":
            return
        with self._entry():
            self.journal.sync(120.0)

    def stats(self) -> JournalStats:
        return self.journal.stats()


def status_json(pj: PoolJournal) -> Json:
    st = pj.stats()
    return {
        "mode": pj.mode,
        "capacity": st.capacity,
        # RAM the live window may take (the pool's journal memory, or the
        # ring if smaller), and recovered log still on disk only
        "memory_limit": st.mem_limit,
        "backlog_bytes": st.backlog_bytes,
        "used": st.used,
        "fill": round(st.used / st.capacity, 4) if st.capacity else 0.0,
        "lag_records": st.unflushed_records,
        "lag_bytes": st.unflushed_bytes,
        "markers_pending": st.markers_pending,
        "direct_io": bool(getattr(st, "direct_io", True)),
        "crc32c": crc32c_impl(),
        "journal_error": _errname(st.journal_error),
        "flush_error": _errname(st.flush_error),
        "flush_error_volume": st.flush_error_volume or None,
        # why new writes are refused (the pool below cannot take new blocks)
        "no_space": pj.no_space_reason,
        # failed fdatasyncs whose records were written again from the journal
        "sync_rewinds": st.sync_rewinds,
        # thin: records synced but not yet confirmed by a look at the pool
        # (the checkpoint waits for it), and no-space rewinds to that point
        "unconfirmed_records": st.synced_seq - st.confirmed_seq,
        "confirm_rewinds": st.confirm_rewinds,
        "flusher_waiting_volume": st.waiting_volume or None,
        "last_marker_error": pj.last_error,
        # cumulative since the journal opened: appends/commits is the group
        # commit's batching; full_waits counts appends that waited for room
        "appends": st.appends,
        "commits": st.commits,
        "full_waits": st.full_waits,
        "dm_writes": st.dm_writes,
        # what the last open found: the log's end and the torn-tail records
        # after it that were dropped (never acknowledged)
        "recovery_end_seq": st.recovery_end_seq,
        "recovery_dropped": st.recovery_dropped,
    }


def _errname(code: int) -> str | None:
    if not code:
        return None
    return f"{errno.errorcode.get(-code, str(-code))}: {os.strerror(-code)}"
