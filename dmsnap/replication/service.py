"""``dmsnap send`` and ``dmsnap receive`` in dmsnapd: the ``replication.*``
ops of the control protocol (a service the server is given, like the
schedules).

The stream's bytes never cross the control socket: the CLI passes its
stdout (send) or stdin (receive) to dmsnapd with the request (SCM_RIGHTS),
and dmsnapd writes or reads the stream there itself, so ``dmsnap send |
ssh host dmsnap receive`` is a plain pipe and a stream moves at the speed
of the devices, not of a JSON protocol. The storage work goes through
``Manager.replicas`` (:mod:`dmsnap.storage.replica`), the core's narrow
interface, which takes the control lock for each step and never while the
stream moves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

from dmsnap import errors as E
from dmsnap.replication import stream as S
from dmsnap.replication import transfer
from dmsnap.replication.delta import Change, Delta, DeltaError, Extent, thin_delta, thin_map
from dmsnap.rules import SECTOR
from dmsnap.storage.replica import Incoming, Replicas, Staging

log = logging.getLogger("dmsnap.replication")

Json = dict[str, Any]

FULL_BLOCK = 64 << 10  # a full stream without a thin map: the volume in these blocks
BUFFER = 1 << 20


@dataclass(frozen=True)
class Token:
    """Where an interrupted receive stands, as its sender needs it:
    ``1-TARGET-BASE-CURSOR`` (uuids in hex, BASE ``0`` for a full stream).
    The sender resumes only the stream these uuids name, so a token made up
    or meant for another snapshot sends nothing."""

    target_uuid: str
    base_uuid: str | None
    cursor: int

    def text(self) -> str:
        return f"1-{self.target_uuid}-{self.base_uuid or '0'}-{self.cursor}"

    @classmethod
    def parse(cls, text: str) -> Token:
        parts = text.strip().split("-")
        try:
            if len(parts) != 4 or parts[0] != "1":
                raise ValueError
            target = uuid.UUID(hex=parts[1]).hex
            base = None if parts[2] == "0" else uuid.UUID(hex=parts[2]).hex
            cursor = int(parts[3])
            if cursor < 0 or cursor % SECTOR:
                raise ValueError
        except ValueError:
            raise E.InvalidArgument(
                f"resume token {text!r} is not one `dmsnap receive POOL/VOL --token` printed"
            ) from None
        return cls(target, base, cursor)


def changed(meta: str, a: int, b: int) -> bool:
    """Whether thin devices A and B differ anywhere (from the kernel's
    metadata: a written block is remapped, however few bytes changed)."""
    try:
        return bool(thin_delta(meta, a, b).extents)
    except DeltaError as e:
        raise E.Unavailable(f"cannot compare with the base: {e}") from None


def _full_delta(size: int) -> Delta:
    """A backend whose metadata we cannot read sends every block."""
    blocks = -(-size // FULL_BLOCK)
    return Delta(FULL_BLOCK, (Extent(0, blocks, Change.DATA),) if blocks else ())


class _Into:
    """The receiver's Target, opened only once the header passed the
    receiver's rules (transfer.receive calls ``check`` first)."""

    staging: Staging | None = None

    def _s(self) -> Staging:
        assert self.staging is not None
        return self.staging

    def write(self, offset: int, data: bytes) -> None:
        self._s().write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        self._s().zero(offset, length)

    def sync(self) -> None:
        self._s().sync()


class Replication:
    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas

    # -- sender ------------------------------------------------------------------------

    def send(
        self,
        pool: str,
        vol: str,
        snap: str,
        *,
        base: str | None = None,
        resume: str | None = None,
        fd: int,
    ) -> Json:
        """Write the stream of POOL/VOL@SNAP (from BASE: an incremental) to
        ``fd``; with ``resume`` only what the receiver's token says it lacks."""
        token = Token.parse(resume) if resume is not None else None
        src = self.replicas.open_source(pool, vol, snap, base)
        try:
            ref = f"{pool}/{vol}@{snap}"
            if token is not None:
                want_base = src.base.uuid if src.base else None
                if token.target_uuid != src.snap.uuid or token.base_uuid != want_base:
                    raise E.InvalidArgument(
                        f"the resume token is for another stream than {ref}"
                        + (f" from {base}" if base else " (full)")
                        + "; nothing sent"
                    )
                if token.cursor > src.volume.size:
                    raise E.InvalidArgument("the resume token's cursor is past the volume")
            start = token.cursor if token else 0
            if src.incremental:
                try:
                    with self.replicas.metadata(pool) as meta:
                        assert src.snap.dev_id is not None
                        if src.base is not None:
                            assert src.base.dev_id is not None
                            delta = thin_delta(meta, src.base.dev_id, src.snap.dev_id)
                        else:
                            delta = thin_map(meta, src.snap.dev_id)
                except DeltaError as e:
                    raise E.Unavailable(f"cannot read the changed blocks of {ref}: {e}") from None
            elif src.base is not None:
                raise E.InvalidArgument(
                    f"pool {pool} cannot tell which blocks changed between snapshots "
                    "(docs/replication.md): send a full stream, without --from"
                )
            else:
                delta = _full_delta(src.volume.size)
            header = S.Header(
                volume_size=src.volume.size,
                block_size=delta.block_size,
                data_bytes=transfer.data_bytes(delta, src.volume.size, start),
                pool_uuid=uuid.UUID(hex=src.pool.uuid),
                volume_uuid=uuid.UUID(hex=src.volume.uuid),
                base_uuid=uuid.UUID(hex=src.base.uuid) if src.base else None,
                target_uuid=uuid.UUID(hex=src.snap.uuid),
                base_name=src.base.name if src.base else None,
                target_name=src.snap.name,
                start=start,
            )
            dev = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # (closing the buffer flushes again: a pipe gone raises there too)
                with open(fd, "wb", buffering=BUFFER, closefd=False) as out:
                    sent = transfer.send(out, header, delta, transfer.FdSource(dev))
            except BrokenPipeError:
                raise E.Unavailable(
                    f"the reader of the stream of {ref} went away; nothing more sent"
                ) from None
            finally:
                os.close(dev)
        finally:
            self.replicas.close_source(src)
        log.info("sent %s: %d stream bytes from %d", ref, sent.stream_bytes, start)
        return {
            "snapshot": ref,
            "base": base,
            "start": start,
            "stream_bytes": sent.stream_bytes,
            "data_bytes": sent.end.data_bytes,
            "zero_bytes": sent.end.zero_bytes,
        }

    # -- receiver ----------------------------------------------------------------------

    def _token(self, pool: str, vol: str) -> Json:
        rec = self.replicas.interrupted(pool, vol)
        if rec is None:
            return {"pool": pool, "volume": vol, "receiving": False, "token": None}
        return {
            "pool": pool,
            "volume": vol,
            "receiving": True,
            "snapshot": rec.target_name,
            "cursor": rec.cursor,
            "size": rec.size,
            "token": Token(rec.target_uuid, rec.base_uuid, rec.cursor).text(),
        }

    def state(self, pool: str, vol: str) -> Json:
        """An interrupted receive into POOL/VOL and its resume token."""
        return self._token(pool, vol)

    def abort(self, pool: str, vol: str) -> Json:
        return self.replicas.abort_receive(pool, vol)

    def receive(self, pool: str, vol: str, *, force: bool = False, fd: int) -> Json:
        """Read a stream from ``fd`` into POOL/VOL (docs/replication.md,
        "The receiver's rules")."""
        into = _Into()
        base_uuid: str | None = None

        def check(h: S.Header) -> None:
            nonlocal base_uuid
            base_uuid = h.base_uuid.hex if h.base_uuid else None
            inc = Incoming(
                volume_uuid=h.volume_uuid.hex,
                base_uuid=base_uuid,
                target_uuid=h.target_uuid.hex,
                target_name=h.target_name,
                base_name=h.base_name,
                size=h.volume_size,
                start=h.start,
            )
            into.staging = self.replicas.begin_receive(pool, vol, inc, force=force, changed=changed)

        def on_cursor(offset: int) -> None:
            assert into.staging is not None
            self.replicas.record_cursor(into.staging, offset)

        ref = f"{pool}/{vol}"
        try:
            with open(fd, "rb", buffering=BUFFER, closefd=False) as inp:
                end = transfer.receive(inp, into, check=check, on_cursor=on_cursor)
        except S.StreamError as e:
            cut = isinstance(e, S.Truncated)
            what = "the stream was cut short" if cut else "the stream is damaged"
            where = ""
            if into.staging is not None:
                st = self._token(pool, vol)
                where = (
                    f"; {ref}@{st['snapshot']} not made, applied and synced up to "
                    f"{st['cursor']}: resume with `dmsnap send ... --resume {st['token']}`"
                )
            else:
                where = "; nothing applied"
            raise E.InvalidArgument(f"{what}: {e}{where}") from None
        finally:
            if into.staging is not None:
                with contextlib.suppress(Exception):
                    self.replicas.end_staging(into.staging, base_uuid)
        result = self.replicas.finish_receive(pool, vol, force=force, changed=changed)
        log.info("received %s: %s", ref, end)
        return {**result, "data_bytes": end.data_bytes, "zero_bytes": end.zero_bytes}

    # -- holds -------------------------------------------------------------------------

    def hold(self, pool: str, vol: str, snap: str, target: str) -> Json:
        return self.replicas.hold(pool, vol, snap, target)

    def release(self, pool: str, vol: str, target: str) -> Json:
        return self.replicas.release(pool, vol, target)

    def holds(self, pool: str, vol: str) -> list[Json]:
        return self.replicas.holds(pool, vol)
