"""Moving a snapshot's changed blocks: the sender turns a Delta and the
target snapshot's bytes into a stream; the receiver applies a stream to a
device, syncing and recording its cursor as it goes, so that an interrupted
transfer resumes from the last cursor instead of starting over.

Neither knows about pools or the catalog: the sender reads through a
``Source``, the receiver writes through a ``Target``, and the caller (send,
receive and replicate, with the storage core) decides which snapshot and
device those are, checks the header against what it expects, and keeps the
cursor where it survives a crash.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Protocol

from dmsnap.replication import stream as S
from dmsnap.replication.delta import Change, Delta

CHUNK = 1 << 20  # bytes read and sent per DATA record (rate-limited: smaller)
CURSOR_EVERY = 64 << 20  # volume bytes between cursors


class Source(Protocol):
    def read(self, offset: int, length: int) -> bytes: ...


class Target(Protocol):
    def write(self, offset: int, data: bytes) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def sync(self) -> None: ...


Progress = Callable[[int, int], None]  # (data bytes done, data bytes in all)


class RateLimiter:
    """At most ``rate`` bytes a second, smoothly: a token bucket holding at
    most a tenth of a second's worth (so a pause is never followed by a
    burst that floods the link)."""

    def __init__(
        self,
        rate: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = rate
        self.burst = max(rate / 10, 4096)
        self.clock, self.sleep = clock, sleep
        self.tokens = self.burst
        self.last = clock()

    def chunk(self) -> int:
        """A record size that keeps the output smooth at this rate."""
        return max(4096, min(CHUNK, int(self.burst)) // 512 * 512)

    def take(self, n: int) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            self.sleep(-self.tokens / self.rate)


def _ranges(delta: Delta, volume_size: int, start: int) -> Iterator[tuple[Change, int, int]]:
    """The delta's extents in bytes, in order, clipped to [start, volume end)."""
    for e in delta.extents:
        lo = max(e.begin * delta.block_size, start)
        hi = min(e.end * delta.block_size, volume_size)
        if lo < hi:
            yield e.change, lo, hi - lo


def data_bytes(delta: Delta, volume_size: int, start: int = 0) -> int:
    """What a stream of this delta from cursor ``start`` carries as data:
    its header says so before anything is sent (exact progress)."""
    return sum(n for c, _, n in _ranges(delta, volume_size, start) if c is Change.DATA)


class _Counting:
    """Counts and rate-limits what goes to the output."""

    def __init__(self, out: IO[bytes], limiter: RateLimiter | None) -> None:
        self.out, self.limiter, self.bytes = out, limiter, 0

    def write(self, b: bytes) -> int:
        if self.limiter:
            self.limiter.take(len(b))
        self.out.write(b)
        self.bytes += len(b)
        return len(b)


@dataclass(frozen=True)
class Sent:
    end: S.End
    stream_bytes: int


def send(
    out: IO[bytes],
    header: S.Header,
    delta: Delta,
    source: Source,
    *,
    limiter: RateLimiter | None = None,
    progress: Progress | None = None,
    cursor_every: int = CURSOR_EVERY,
) -> Sent:
    """Write the stream turning the base into the target. ``header.start``
    resumes after a cursor the receiver reported; ``header.data_bytes`` must
    be ``data_bytes(delta, header.volume_size, header.start)``."""
    if header.block_size != delta.block_size:
        raise ValueError("the header's block size is not the delta's")
    want = data_bytes(delta, header.volume_size, header.start)
    if header.data_bytes != want:
        raise ValueError(f"the header promises {header.data_bytes} data bytes, the delta {want}")
    sink = _Counting(out, limiter)
    w = S.Writer(sink, header)  # type: ignore[arg-type]
    chunk = limiter.chunk() if limiter else CHUNK
    done = 0
    last_cursor = header.start
    for change, off, n in _ranges(delta, header.volume_size, header.start):
        if change is Change.DISCARD:
            w.zero(off, n)
        else:
            for pos in range(off, off + n, chunk):
                length = min(chunk, off + n - pos)
                data = source.read(pos, length)
                if len(data) != length:
                    raise OSError(f"short read of the snapshot at {pos}: {len(data)} of {length}")
                w.data(pos, data)
                done += length
                if progress:
                    progress(done, want)
                if pos + length - last_cursor >= cursor_every:
                    w.cursor(pos + length)
                    last_cursor = pos + length
    if w.pos > last_cursor:
        w.cursor(w.pos)
    end = w.end()
    out.flush()
    return Sent(end, sink.bytes)


def receive(
    src: IO[bytes],
    target: Target,
    *,
    check: Callable[[S.Header], None],
    on_cursor: Callable[[int], None],
    progress: Progress | None = None,
) -> S.End:
    """Apply one stream to ``target``. ``check`` sees the header before
    anything is written and raises to refuse it (wrong volume, wrong base,
    a start that is not this receiver's cursor). At each cursor the target
    is synced before ``on_cursor`` records it, so a recorded cursor never
    runs ahead of what is durable. A damaged or cut stream raises
    StreamError after applying only records that were whole and checked."""
    r = S.Reader(src)
    check(r.header)
    done = 0
    for rec in r:
        if isinstance(rec, S.Data):
            target.write(rec.offset, rec.data)
            done += len(rec.data)
            if progress:
                progress(done, r.header.data_bytes)
        elif isinstance(rec, S.Zero):
            target.zero(rec.offset, rec.length)
        else:
            target.sync()
            on_cursor(rec.offset)
    target.sync()
    assert r.end is not None
    return r.end


class FdSource:
    """A snapshot device (or an image file) read with pread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray()
        while len(buf) < length:
            b = os.pread(self.fd, length - len(buf), offset + len(buf))
            if not b:
                break
            buf += b
        return bytes(buf)


class FileTarget:
    """A regular file as the receiving device (tests, receive into an image):
    zeros are written, since punching holes needs fallocate flags Python's
    os module does not offer."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._zeros = bytes(CHUNK)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, offset: int, length: int) -> None:
        for pos in range(offset, offset + length, CHUNK):
            self.write(pos, self._zeros[: min(CHUNK, offset + length - pos)])

    def sync(self) -> None:
        os.fdatasync(self.fd)
