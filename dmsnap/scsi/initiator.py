"""The initiator side of the in-band snapshot command: what runs on a client
server that has a dmsnap LUN as /dev/sdX (or /dev/sgN). Every command goes
through :func:`dmsnap.scsi.sgio.sg_io`; the wire format is
:mod:`dmsnap.scsi.snapcmd` (docs/scsi-snapshot-command.md)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from dmsnap.errors import UserError
from dmsnap.scsi import sense as S
from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.sgio import SgError, SgResult, sg_io


class InitiatorError(UserError):
    """The target refused or failed the request (one clear line)."""

    code = "scsi"
    exit_code = 8

    def __init__(self, message: str, sense: S.Sense | None = None) -> None:
        super().__init__(message)
        self.sense = sense  # the target's answer, when it gave one

    @property
    def unknown(self) -> bool:
        """The target does not know that snapshot (DELETE: field pointer at the token)."""
        f = self.sense.field if self.sense else None
        return (
            self.sense is not None
            and self.sense.code == S.INVALID_FIELD_IN_PARAMETER_LIST
            and f is not None
            and not f.cdb
            and f.byte == SC.OFF_TOKEN
        )


@dataclass(frozen=True)
class Created:
    token: bytes
    entry: SC.SnapEntry | None  # the request's state, if the target reported it


def _check(device: str, r: SgResult, sa: int) -> None:
    if r.good:
        return
    if r.status == 0x02 and r.sense:
        try:
            sense = S.decode(r.sense)
        except Exception:
            raise InitiatorError(f"{device}: sense {r.sense.hex()}") from None
        raise InitiatorError(f"{device}: {SC.explain(sense, sa)}", sense)
    if r.status == 0x08:
        raise InitiatorError(f"{device}: the target is busy; try again")
    raise InitiatorError(
        f"{device}: command failed (status {r.status:#x}, host {r.host_status:#x}, "
        f"driver {r.driver_status:#x})"
    )


RATE_RETRIES = 20  # resends of a command the target refused for its rate


def _rate_wait(r: SgResult) -> float | None:
    """Seconds the target asks to wait when it refused the command for the
    rate of in-band requests (nothing was done), else None."""
    if r.status != 0x02 or not r.sense:
        return None
    try:
        sense = S.decode(r.sense)
    except Exception:
        return None
    if sense.key != S.Key.ABORTED_COMMAND or sense.code != SC.INBAND_RATE_EXCEEDED:
        return None
    return min(5.0, (sense.information or 200) / 1000)


def _send(device: str, cdb: bytes, **kw: object) -> SgResult:
    """One command; resent after the wait the target asks for when it
    refused it for the rate of requests (safe: it did nothing)."""
    for attempt in range(RATE_RETRIES + 1):
        try:
            r = sg_io(device, cdb, **kw)  # type: ignore[arg-type]
        except SgError as e:
            raise InitiatorError(str(e)) from None
        wait = _rate_wait(r)
        if wait is None or attempt == RATE_RETRIES:
            return r
        time.sleep(wait)
    raise AssertionError("unreachable")


def status(device: str, token: bytes) -> list[SC.SnapEntry]:
    r = _send(device, SC.status_cdb(token), data_in_len=SC.MAX_RESPONSE)
    _check(device, r, SC.SA_STATUS)
    return [e for e in SC.decode_entries(r.data).entries if e.token == token]


LIST_PAGES = 4096  # a bound on LIST round trips (4096 * 64 requests)


def list_requests(device: str) -> list[SC.SnapEntry]:
    """Every request of the LUN's pool that is not deleted, newest first:
    LIST pages (SKIP) until a page comes back short. Requests made or
    deleted meanwhile shift the pages; a request seen twice is kept once."""
    out: list[SC.SnapEntry] = []
    seen: set[bytes] = set()
    skip = 0
    for _ in range(LIST_PAGES):
        r = _send(device, SC.list_cdb(skip=skip), data_in_len=SC.MAX_RESPONSE)
        _check(device, r, SC.SA_LIST)
        page = SC.decode_entries(r.data)
        for e in page.entries:
            if e.token not in seen or not any(e.token):
                seen.add(e.token)
                out.append(e)
        skip += len(page.entries)
        if page.entry_count < SC.LIST_MAX or not page.entries:
            break
    return out


def snapshot(
    device: str,
    name: str,
    *,
    labels: dict[str, str] | None = None,
    wait: bool = False,
    group: bool = False,
    token: bytes | None = None,
    retries: int = 3,
) -> Created:
    """Request a snapshot; GOOD means its marker is durable (``wait``: the
    snapshot exists). A retry after a lost answer reuses the token, so the
    target never makes a second snapshot for one request."""
    req = SC.CreateRequest(
        token=token or SC.new_token(), name=name, labels=labels or {}, wait=wait, group=group
    )
    try:
        cdb, params = SC.create_command(req)
    except ValueError as e:
        raise InitiatorError(str(e)) from None
    _send_idempotent(device, cdb, params, SC.SA_CREATE, retries)
    try:
        found = status(device, req.token)
    except InitiatorError:
        found = []
    return Created(req.token, found[0] if found else None)


def _send_idempotent(device: str, cdb: bytes, params: bytes, sa: int, retries: int) -> None:
    """Send a token-carrying request, again on a transport error or BUSY (the
    token makes a repeat harmless); raise on the final failure or bad sense."""
    attempt = rated = 0
    while True:
        try:
            r = sg_io(device, cdb, data_out=params)
        except SgError as e:
            if attempt == retries:
                raise InitiatorError(str(e)) from None
            attempt += 1
            continue
        if (wait := _rate_wait(r)) is not None and rated < RATE_RETRIES:
            rated += 1  # refused for the rate, nothing done: after the wait asked for
            time.sleep(wait)
            continue
        if r.status == 0x08 and attempt < retries:  # BUSY: the same request again
            attempt += 1
            continue
        _check(device, r, sa)
        return


def delete(device: str, token: bytes, *, retries: int = 3) -> None:
    """Delete the snapshot that the request ``token`` made on this LUN's
    volume. Idempotent: deleting it again (a retry after a lost answer) is GOOD."""
    try:
        cdb, params = SC.delete_command(token)
    except ValueError as e:
        raise InitiatorError(str(e)) from None
    _send_idempotent(device, cdb, params, SC.SA_DELETE, retries)


def delete_named(device: str, name: str) -> SC.SnapEntry:
    """Delete this volume's snapshot NAME, found by LIST (pool-wide: another
    volume's request may carry the same name, and the target refuses those as
    unknown, so the next candidate is tried). Returns the request deleted."""
    candidates = [e for e in list_requests(device) if e.name == name and any(e.token)]
    if not candidates:
        raise InitiatorError(f"{device}: no snapshot {name!r} among the LUN's recent requests")
    for e in candidates:
        if e.state is SC.State.PENDING:
            raise InitiatorError(f"{device}: snapshot {name!r} is not made yet; delete it later")
        try:
            delete(device, e.token)
            return e
        except InitiatorError as err:
            if not err.unknown or e is candidates[-1]:
                raise
    raise AssertionError("unreachable")


def unit_serial(device: str) -> str:
    """The LUN's unit serial number (VPD page 80h): stable for a volume."""
    r = _send(device, bytes((0x12, 0x01, 0x80, 0x00, 0xFF, 0x00)), data_in_len=0xFF)
    _check(device, r, SC.SA_LIST)
    if len(r.data) < 4 or r.data[1] != 0x80:
        raise InitiatorError(f"{device}: no unit serial number (VPD page 80h)")
    return r.data[4 : 4 + r.data[3]].decode("ascii", "replace").strip()


SCHEDULE_LABEL = "dmsnap.schedule"


def schedule_id(device: str, prefix: str) -> str:
    """The label value that marks a schedule's requests: its prefix and the
    LUN's serial (LIST is pool-wide; another LUN's schedule is not ours)."""
    return f"{prefix}@{unit_serial(device)}"


def prune(device: str, label: str, keep: int) -> tuple[list[SC.SnapEntry], list[str]]:
    """Delete the oldest of the snapshots labelled ``dmsnap.schedule=label``
    beyond the newest ``keep``. Returns (deleted, why each other one failed);
    a failure is left for the next round."""
    ours = [
        e
        for e in list_requests(device)
        if e.labels.get(SCHEDULE_LABEL) == label and e.state in (SC.State.PENDING, SC.State.DONE)
    ]
    ours.sort(key=lambda e: e.marker, reverse=True)  # marker ids grow with each request
    deleted: list[SC.SnapEntry] = []
    errors: list[str] = []
    for e in ours[keep:]:
        try:
            delete(device, e.token)
            deleted.append(e)
        except InitiatorError as err:
            errors.append(f"{e.name}: {err.message}")
    return deleted, errors
