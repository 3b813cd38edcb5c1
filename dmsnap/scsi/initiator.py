"""The initiator side of the in-band snapshot command: what runs on a client
server that has a dmsnap LUN as /dev/sdX (or /dev/sgN). Every command goes
through :func:`dmsnap.scsi.sgio.sg_io`; the wire format is
:mod:`dmsnap.scsi.snapcmd` (docs/scsi-snapshot-command.md)."""

from __future__ import annotations

from dataclasses import dataclass

from dmsnap.errors import UserError
from dmsnap.scsi import sense as S
from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.sgio import SgError, SgResult, sg_io


class InitiatorError(UserError):
    """The target refused or failed the request (one clear line)."""

    code = "scsi"
    exit_code = 8


@dataclass(frozen=True)
class Created:
    token: bytes
    entry: SC.SnapEntry | None  # the request's state, if the target reported it


def _check(device: str, r: SgResult, sa: int) -> None:
    if r.good:
        return
    if r.status == 0x02 and r.sense:
        try:
            why = SC.explain(S.decode(r.sense), sa)
        except Exception:
            why = f"sense {r.sense.hex()}"
        raise InitiatorError(f"{device}: {why}")
    if r.status == 0x08:
        raise InitiatorError(f"{device}: the target is busy; try again")
    raise InitiatorError(
        f"{device}: command failed (status {r.status:#x}, host {r.host_status:#x}, "
        f"driver {r.driver_status:#x})"
    )


def _send(device: str, cdb: bytes, **kw: object) -> SgResult:
    try:
        return sg_io(device, cdb, **kw)  # type: ignore[arg-type]
    except SgError as e:
        raise InitiatorError(str(e)) from None


def status(device: str, token: bytes) -> list[SC.SnapEntry]:
    r = _send(device, SC.status_cdb(token), data_in_len=SC.MAX_RESPONSE)
    _check(device, r, SC.SA_STATUS)
    return [e for e in SC.decode_entries(r.data).entries if e.token == token]


def list_requests(device: str) -> list[SC.SnapEntry]:
    r = _send(device, SC.list_cdb(), data_in_len=SC.MAX_RESPONSE)
    _check(device, r, SC.SA_LIST)
    return SC.decode_entries(r.data).entries


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
    for attempt in range(retries + 1):
        try:
            r = sg_io(device, cdb, data_out=params)
        except SgError as e:
            if attempt == retries:
                raise InitiatorError(str(e)) from None
            continue
        if r.status == 0x08 and attempt < retries:  # BUSY: the same request again
            continue
        _check(device, r, SC.SA_CREATE)
        break
    try:
        found = status(device, req.token)
    except InitiatorError:
        found = []
    return Created(req.token, found[0] if found else None)
