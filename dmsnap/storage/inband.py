"""The in-band snapshot command's target side (docs/scsi-snapshot-command.md):
what an export's initiators ask of the storage core through the vendor SCSI
command, answered with the core's public operations only.

The SCSI target (:mod:`dmsnap.scsi.target`) decodes the command and calls
:class:`InbandSnapshots`; this module turns that into
``snapshot_create``/``snapshot_delete`` and one consistent read of the
pool's requests (:class:`RequestView`), and never touches the core's lock
or catalog itself.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

from dmsnap import errors as E
from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.emulation import Lun
from dmsnap.storage.catalog import Marker, MarkerState, Snapshot


@dataclass(frozen=True)
class RequestView:
    """One consistent read (under the core's lock) of what the command's
    answers are made of, as seen from one export's volume."""

    volume_id: int  # the export's own volume
    markers: list[Marker]  # the pool's requests, oldest first (with a token: that one)
    groups: dict[int | None, list[Snapshot]]  # the pool's snapshots by group
    visible: dict[int, str]  # volume id -> name the senders may snapshot


class SnapshotCore(Protocol):
    """What the in-band side uses of the storage core (its public API)."""

    def snapshot_create(self, refs: Any, name: str, **kw: Any) -> dict[str, Any]: ...

    def snapshot_delete(self, pool: str, vol: str, name: str) -> None: ...

    def snapshot_state(self, s: Snapshot) -> str: ...

    def request_view(self, pool: str, vol: str, *, token: str | None = None) -> RequestView: ...


# In-band CREATE requests since the daemon started, by (pool, result):
# "accepted" (made, or durable and pending), "repeated" (a retry of one
# made already), or the refusal's kind (snapcmd.ErrorKind values). Read by
# the metrics (dmsnap_inband_requests_total); counted on the control path
# only, never per I/O.
_requests: Counter[tuple[str, str]] = Counter()
_requests_lock = threading.Lock()


def request_counts() -> dict[tuple[str, str], int]:
    with _requests_lock:
        return dict(_requests)


def _count(pool: str, result: str) -> None:
    with _requests_lock:
        _requests[(pool, result)] += 1


_KIND = {
    E.InvalidArgument: SC.ErrorKind.INVALID_NAME,
    E.AlreadyExists: SC.ErrorKind.INVALID_NAME,
    E.NoSpace: SC.ErrorKind.NO_SPACE,
    E.Unavailable: SC.ErrorKind.NOT_READY,
    E.NotFound: SC.ErrorKind.FAILED,
}


class InbandSnapshots:
    """A request token is the core's request token (hex). What one export's
    initiators reach is its pool's volumes *visible* to them
    (:attr:`RequestView.visible`): GROUP cuts those, LIST and STATUS show
    the requests that cut one of them (and of a group's snapshots, those)."""

    def __init__(self, core: SnapshotCore, pool: str, vol: str, wait_timeout: float = 30.0) -> None:
        self.m, self.pool, self.vol, self.wait_timeout = core, pool, vol, wait_timeout

    def create(self, lun: Lun, request: SC.CreateRequest) -> None:
        try:
            result = self._create(request)
        except SC.SnapshotError as e:
            _count(self.pool, e.kind.value)
            raise
        _count(self.pool, result)

    def _create(self, request: SC.CreateRequest) -> str:
        view = self.m.request_view(self.pool, self.vol, token=request.token.hex())
        earlier = view.markers[-1] if view.markers else None
        if earlier is not None and earlier.state == MarkerState.FAILED:
            # a retry is not a new request
            why = earlier.error or "failed"
            raise SC.SnapshotError(SC.ErrorKind.FAILED, why, marker=earlier.id)
        if earlier is not None and earlier.state == MarkerState.DONE:
            return "repeated"  # made already (and maybe deleted since): a retry makes nothing new
        if request.group:
            refs = [[self.pool, n] for n in sorted(view.visible.values())]
        else:
            refs = [[self.pool, self.vol]]
        try:
            r = self.m.snapshot_create(
                refs,
                request.name,
                labels=request.labels or None,
                token=request.token.hex(),
                wait=request.wait,
                timeout=self.wait_timeout,
            )
        except E.UserError as e:
            if isinstance(e, E.Unavailable) and "not made within" in e.message:
                raise SC.SnapshotError(SC.ErrorKind.IN_PROGRESS, e.message) from None
            kind = next((k for t, k in _KIND.items() if isinstance(e, t)), SC.ErrorKind.FAILED)
            raise SC.SnapshotError(kind, e.message) from None
        if r.get("state") == MarkerState.FAILED:
            raise SC.SnapshotError(SC.ErrorKind.FAILED, r.get("error") or "snapshot failed")
        return "accepted"

    def _entry(self, mk: Marker, view: RequestView) -> SC.SnapEntry:
        state = {MarkerState.PENDING: SC.State.PENDING, MarkerState.DONE: SC.State.DONE}.get(
            mk.state, SC.State.FAILED
        )
        members = view.groups.get(mk.group_id, []) if mk.group_id is not None else []
        members = [s for s in members if s.volume_id in view.visible]
        snaps = tuple(f"{s.pool}/{s.volume}@{s.name}" for s in members)
        error = mk.error or ""
        if state is SC.State.DONE and not members:  # every snapshot it made is gone
            state = SC.State.DELETED
        elif state is SC.State.DONE:
            # made, but a classic COW area overflowed since: its content is lost
            bad = [s for s in members if self.m.snapshot_state(s) == "invalid"]
            if bad:
                state = SC.State.FAILED
                error = f"snapshot {bad[0].pool}/{bad[0].volume}@{bad[0].name} is invalid"
        try:
            token = bytes.fromhex(mk.token or "")
        except ValueError:
            token = b""
        return SC.SnapEntry(
            token=token if len(token) == SC.TOKEN_LEN else bytes(SC.TOKEN_LEN),
            name=mk.name,
            state=state,
            group=len(mk.request.get("volumes", [])) > 1,
            marker=mk.id,
            requested=int(mk.created),
            snapshots=snaps,
            labels=mk.request.get("labels") or {},
            error=error,
        )

    @staticmethod
    def _visible_markers(view: RequestView) -> list[Marker]:
        """The pool's requests, newest first, that cut a visible volume."""
        return [
            mk
            for mk in reversed(view.markers)
            if any(v in view.visible for v in mk.request.get("volumes", []))
        ]

    def status(self, lun: Lun, handle: bytes) -> Sequence[SC.SnapEntry]:
        suffix = handle.hex()
        view = self.m.request_view(self.pool, self.vol)
        return [
            self._entry(mk, view)
            for mk in self._visible_markers(view)
            if (mk.token or "").endswith(suffix)
        ]

    def list(self, lun: Lun, skip: int = 0) -> Sequence[SC.SnapEntry]:
        # Deleted requests are left out (STATUS still reports them), so the
        # window holds what exists: a long-running `schedule --keep` stays in it.
        view = self.m.request_view(self.pool, self.vol)
        live = (self._entry(mk, view) for mk in self._visible_markers(view))
        kept = (e for e in live if e.state is not SC.State.DELETED)
        return list(islice(kept, skip, skip + SC.LIST_MAX))

    def delete(self, lun: Lun, token: bytes) -> None:
        view = self.m.request_view(self.pool, self.vol, token=token.hex())
        mk = view.markers[-1] if view.markers else None
        if mk is None or mk.state == MarkerState.FAILED:
            raise SC.SnapshotError(SC.ErrorKind.UNKNOWN, f"no snapshot made by {token.hex()}")
        if mk.state == MarkerState.PENDING:
            raise SC.SnapshotError(SC.ErrorKind.IN_PROGRESS, marker=mk.id)
        if view.volume_id not in mk.request.get("volumes", []):  # another volume's request
            raise SC.SnapshotError(SC.ErrorKind.UNKNOWN, f"{token.hex()}: not {self.vol}")
        group = view.groups.get(mk.group_id, []) if mk.group_id is not None else []
        mine = [s for s in group if s.volume_id == view.volume_id]
        if not mine:
            return  # deleted already: a retry changes nothing
        try:
            self.m.snapshot_delete(self.pool, self.vol, mine[0].name)
        except E.NotFound:
            return  # deleted meanwhile
        except E.UserError as e:
            kind = {E.Busy: SC.ErrorKind.IN_USE, E.Unavailable: SC.ErrorKind.NOT_READY}.get(
                type(e), SC.ErrorKind.FAILED
            )
            raise SC.SnapshotError(kind, e.message, marker=mk.id) from None
