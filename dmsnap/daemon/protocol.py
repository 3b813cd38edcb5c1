"""The control protocol between ``dmsnap`` and ``dmsnapd``.

One JSON object per line (UTF-8, ``\\n``-terminated) over a Unix stream
socket; a connection may carry any number of requests, answered in order::

    → {"v": 1, "id": 7, "op": "volume.create", "args": {"pool": "p", "vol": "v", "size": 1048576}}
    ← {"v": 1, "id": 7, "ok": true, "result": {...}}
    ← {"v": 1, "id": 7, "ok": false, "error": {"code": "not_found", "message": "..."}}

Ops map 1:1 onto :class:`dmsnap.storage.manager.Manager` methods (see
:data:`OPS`); ``daemon.*`` and ``op.progress`` are answered by the server
itself. Any request may carry ``"progress": TOKEN`` beside ``args``: while
it runs, ``op.progress`` with that token (on another connection) says how
far its work is (:mod:`dmsnap.daemon.progress`). Every
argument is checked here, before the Manager sees it, so a client that skips
the CLI's checks gets the same one-line errors. Nothing in this module does
I/O: the server and the client both use it, and the tests drive it directly.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dmsnap import rules
from dmsnap.errors import InvalidArgument, UserError
from dmsnap.sizes import parse_size
from dmsnap.storage.names import BadName, check_name

VERSION = 1
DEFAULT_SOCKET = "/run/dmsnap/dmsnapd.sock"
# A request line (including its newline) may not exceed this. Requests are
# small; the limit only stops a confused or hostile peer from making the
# daemon buffer without bound.
MAX_REQUEST = 1 << 20
# Responses can be large (a listing of thousands of snapshots); the client
# still bounds them so a wrong peer cannot exhaust its memory.
MAX_RESPONSE = 64 << 20
# The data ops (volume.write / volume.read) carry base64 in JSON, so one
# request moves at most this much; clients split larger transfers.
MAX_IO = 256 << 10

# Error codes the protocol itself produces, beyond the UserError codes of
# dmsnap.errors (invalid, not_found, exists, busy, no_space, unavailable,
# denied). The client maps unknown codes to a plain UserError.
E_BAD_REQUEST = "bad_request"  # not JSON, not an object, missing fields, too long
E_BAD_VERSION = "bad_version"  # a protocol version this daemon does not speak
E_UNKNOWN_OP = "unknown_op"
E_INTERNAL = "internal"  # a bug: the daemon logged a traceback

Json = dict[str, Any]


class ProtocolError(UserError):
    """A request the daemon cannot even interpret. Carries its own code."""

    def __init__(self, code: str, message: str, req_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.req_id = req_id


# ---------------------------------------------------------------- arguments

Check = Callable[[str, Any], Any]


def _name(kind: str) -> Check:
    def check(arg: str, value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidArgument(f"{arg}: expected a {kind} name (string)")
        try:
            return check_name(kind, value)
        except BadName as e:
            raise InvalidArgument(str(e)) from None

    return check


def _size(arg: str, value: Any) -> int:
    # Integers on the wire; strings ("10G") accepted for hand-written clients.
    if isinstance(value, bool):
        raise InvalidArgument(f"{arg}: expected a size in bytes")
    if isinstance(value, int):
        if value < 1:
            raise InvalidArgument(f"{arg} {value} must be positive")
        return value
    if isinstance(value, str):
        return parse_size(value, what=arg)
    raise InvalidArgument(f"{arg}: expected a size in bytes")


def _bool(arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{arg}: expected true or false")
    return value


def _device(arg: str, value: Any) -> str:
    # The daemon's working directory is not the caller's: only absolute paths.
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise InvalidArgument(f"{arg}: expected an absolute device path")
    return value


def _choice(choices: tuple[str, ...]) -> Check:
    def check(arg: str, value: Any) -> str:
        if value not in choices:
            raise InvalidArgument(f"{arg} {value!r}: expected one of {', '.join(choices)}")
        return str(value)

    return check


def _token(arg: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise InvalidArgument(f"{arg}: expected a string of 1 to 128 characters")
    return value


def _refs(arg: str, value: Any) -> list[list[str]]:
    if not isinstance(value, list) or not value:
        raise InvalidArgument(f"{arg}: expected a non-empty list of [pool, volume]")
    out: list[list[str]] = []
    for ref in value:
        if not (isinstance(ref, list) and len(ref) == 2):
            raise InvalidArgument(f"{arg}: expected a non-empty list of [pool, volume]")
        pair = [_name("pool")(arg, ref[0]), _name("volume")(arg, ref[1])]
        if pair in out:
            raise InvalidArgument(f"volume {pair[0]}/{pair[1]} is named twice")
        out.append(pair)
    return out


def check_label(key: str, value: str) -> None:
    """A label as :mod:`dmsnap.rules` takes it, else InvalidArgument."""
    if (why := rules.label_problem(key, value)) is not None:
        raise InvalidArgument(why)


def _labels(arg: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidArgument(f"{arg}: expected an object of string labels")
    for k, v in value.items():
        check_label(k, v)
    return dict(value)


def _offset(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{arg}: expected a byte offset (integer >= 0)")
    return value


def _length(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_IO:
        raise InvalidArgument(f"{arg}: expected 1 to {MAX_IO} bytes")
    return value


def _data(arg: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"{arg}: expected base64 data")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{arg}: not valid base64") from None
    if not 0 < len(data) <= MAX_IO:
        raise InvalidArgument(f"{arg}: expected 1 to {MAX_IO} bytes of data")
    return data


def _seconds(arg: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise InvalidArgument(f"{arg}: expected seconds (0 < t <= 86400)")
    return float(value)


def _marker(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{arg}: expected a marker id (integer >= 1)")
    return value


def _seq(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{arg}: expected a journal record number (integer >= 1)")
    return value


def _percent(arg: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"{arg} must be a non-negative integer (percent)")
    return value


def _text(arg: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 256 or "\0" in value:
        raise InvalidArgument(f"{arg}: expected a string of 1 to 256 characters")
    return value


def _texts(arg: str, value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > 64:
        raise InvalidArgument(f"{arg}: expected a list of at most 64 strings")
    return [_text(arg, v) for v in value]


def _chap(arg: str, value: Any) -> list[list[str]]:
    """CHAP entries ([IQN, USER, SECRET] or with MUTUAL_USER, MUTUAL_SECRET),
    checked; a message never holds a secret."""
    from dmsnap.scsi.chap import ChapError, from_wire

    if not isinstance(value, list) or not 0 < len(value) <= 64:
        raise InvalidArgument(f"{arg}: expected a list of 1 to 64 CHAP entries")
    if not all(isinstance(e, list) and all(isinstance(f, str) for f in e) for e in value):
        raise InvalidArgument(f"{arg}: each CHAP entry is a list of strings")
    try:
        return [c.to_wire() for c in from_wire(value)]
    except ChapError as e:
        raise InvalidArgument(f"{arg}: {e}") from None


def _every(arg: str, value: Any) -> int | str:
    # seconds on the wire; a duration text ("5m") for hand-written clients
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument(f"{arg}: expected seconds or a duration such as 5m")
    if isinstance(value, int) and value < 1:
        raise InvalidArgument(f"{arg} {value}: must be at least 1 second")
    return _text(arg, value) if isinstance(value, str) else value


def _count(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100000:
        raise InvalidArgument(f"{arg}: expected a count from 1 to 100000")
    return value


def _min_free(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 99:
        raise InvalidArgument(f"{arg}: expected a percent from 1 to 99")
    return value


# arguments whose values are never written to a log
SECRET_ARGS = frozenset({"chap"})


@dataclass(frozen=True)
class Op:
    """How one op maps onto a Manager method.

    ``positional`` are passed positionally in this order (absent optional
    ones as None, which is the Manager's default); ``keyword`` are passed by
    name, and only when the client gave them, so the Manager's defaults hold.
    """

    method: str | None  # None: answered by the server (daemon.*)
    positional: tuple[str, ...] = ()
    keyword: tuple[str, ...] = ()
    required: frozenset[str] = frozenset()
    mutating: bool = True  # logged at INFO; read-only ops at DEBUG
    # who answers: the Manager, or a capability of its own package the
    # server was given (Server.services: "schedules" -> dmsnap.schedule)
    service: str = "manager"
    # takes one file descriptor passed with the request (SCM_RIGHTS), as its
    # ``fd`` keyword: a stream read or written there, never on the socket
    fd: bool = False

    @property
    def args(self) -> tuple[str, ...]:
        return self.positional + self.keyword


def _op(
    method: str | None,
    pos: str = "",
    kw: str = "",
    req: str = "",
    *,
    ro: bool = False,
    data: bool = False,
    service: str = "manager",
    fd: bool = False,
) -> Op:
    return Op(
        method,
        tuple(pos.split()),
        tuple(kw.split()),
        frozenset(req.split()),
        mutating=not ro and not data,
        service=service,
        fd=fd,
    )


_SCHED = "schedules"  # dmsnap.schedule.runner.Scheduler
_REPL = "replication"  # dmsnap.replication.service.Replication


OPS: dict[str, Op] = {
    "pool.create": _op(
        "pool_create",
        "name",
        "data cache backend size cache_size journal journal_size journal_mode journal_memory "
        "sparse metadata_size",
        "name",
    ),
    "pool.list": _op("pool_list", ro=True),
    "pool.show": _op("pool_show", "name", req="name", ro=True),
    "pool.set": _op(
        "pool_set", "name", "cow_autoextend_threshold cow_autoextend_percent journal_memory", "name"
    ),
    "pool.extend_metadata": _op("pool_extend_metadata", "name size", req="name size"),
    "pool.destroy": _op("pool_destroy", "name", "force", "name"),
    "pool.repair": _op("pool_repair", "name discard_after", req="name discard_after"),
    "volume.create": _op("volume_create", "pool vol size", req="pool vol size"),
    "volume.list": _op("volume_list", "pool", ro=True),
    "volume.show": _op("volume_show", "pool vol", req="pool vol", ro=True),
    "volume.delete": _op("volume_delete", "pool vol", "force", "pool vol"),
    "snapshot.create": _op(
        "snapshot_create", "refs name", "labels token wait timeout cow_size", "refs name"
    ),
    "snapshot.request": _op("snapshot_request", "pool", "marker token", "pool", ro=True),
    "snapshot.list": _op("snapshot_list", "pool vol", ro=True),
    "snapshot.delete": _op("snapshot_delete", "pool vol name", "force", "pool vol name"),
    "snapshot.activate": _op("snapshot_activate", "pool vol name", req="pool vol name"),
    "snapshot.deactivate": _op("snapshot_deactivate", "pool vol name", req="pool vol name"),
    "snapshot.restore": _op("snapshot_restore", "pool vol name", req="pool vol name"),
    "volume.write": _op(
        "volume_write", "pool vol offset content", "fua", "pool vol offset content", data=True
    ),
    "volume.read": _op(
        "volume_read", "pool vol offset length", req="pool vol offset length", data=True
    ),
    "volume.flush": _op("volume_flush", "pool vol", req="pool vol", data=True),
    "volume.discard": _op("volume_discard", "pool vol offset size", req="pool vol", data=True),
    "export.create": _op(
        "export_create",
        "pool vol",
        "snap kind iqn portal allow allow_any chap snapshot_allow",
        "pool vol",
    ),
    "export.update": _op("export_update", "pool vol", "snap allow snapshot_allow", "pool vol"),
    "export.list": _op("export_list", "pool", ro=True),
    "export.delete": _op("export_delete", "pool vol", "snap", "pool vol"),
    "status": _op("status", ro=True),
    "schedule.create": _op(
        "create",
        "name refs",
        "every calendar tz keep_hourly keep_daily keep_weekly keep_monthly keep_yearly keep "
        "min_free",
        "name refs",
        service=_SCHED,
    ),
    "schedule.list": _op("list", ro=True, service=_SCHED),
    "schedule.show": _op("show", "name", req="name", ro=True, service=_SCHED),
    "schedule.pause": _op("pause", "name", req="name", service=_SCHED),
    "schedule.resume": _op("resume", "name", req="name", service=_SCHED),
    "schedule.delete": _op("delete", "name", req="name", service=_SCHED),
    "replication.send": _op(
        "send", "pool vol snap", "base resume", "pool vol snap", service=_REPL, fd=True
    ),
    "replication.receive": _op("receive", "pool vol", "force", "pool vol", service=_REPL, fd=True),
    "replication.state": _op("state", "pool vol", req="pool vol", ro=True, service=_REPL),
    "replication.abort": _op("abort", "pool vol", req="pool vol", service=_REPL),
    "replication.hold": _op(
        "hold", "pool vol snap target", req="pool vol snap target", service=_REPL
    ),
    "replication.release": _op("release", "pool vol target", req="pool vol target", service=_REPL),
    "replication.holds": _op("holds", "pool vol", req="pool vol", ro=True, service=_REPL),
    "op.progress": _op(None, "token", req="token", ro=True),
    "daemon.ping": _op(None, ro=True),
    "daemon.stop": _op(None, kw="teardown"),
}

# Per op and argument, the check; ``name`` means a different kind per op.
_CHECKS: dict[str, Check] = {
    "pool": _name("pool"),
    "vol": _name("volume"),
    "data": _device,
    "cache": _device,
    "backend": _choice(rules.BACKENDS),
    "size": _size,
    "cache_size": _size,
    "force": _bool,
    "teardown": _bool,
    "refs": _refs,
    "labels": _labels,
    "token": _token,
    "journal": _device,
    "journal_size": _size,
    "journal_memory": _size,
    "journal_mode": _choice(rules.JOURNAL_MODES),
    "wait": _bool,
    "timeout": _seconds,
    "marker": _marker,
    "discard_after": _seq,
    "offset": _offset,
    "length": _length,
    "content": _data,
    "fua": _bool,
    "snap": _name("snapshot"),
    "kind": _choice(rules.EXPORT_KINDS),
    "iqn": _text,
    "portal": _text,
    "allow": _texts,
    "allow_any": _bool,
    "snapshot_allow": _texts,
    "chap": _chap,
    "cow_size": _size,
    "sparse": _bool,
    "metadata_size": _size,
    "cow_autoextend_threshold": _percent,
    "cow_autoextend_percent": _percent,
    "every": _every,
    "calendar": _text,
    "tz": _text,
    "keep_hourly": _count,
    "keep_daily": _count,
    "keep_weekly": _count,
    "keep_monthly": _count,
    "keep_yearly": _count,
    "keep": _count,
    "min_free": _min_free,
    "base": _name("snapshot"),
    "resume": _text,
    "target": _token,
}


def _check_for(op_name: str, arg: str) -> Check:
    if arg == "name" and op_name.startswith("schedule."):
        return _name("schedule")
    if arg == "name":
        return _name("pool" if op_name.startswith("pool.") else "snapshot")
    return _CHECKS[arg]


def check_args(op_name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``args`` for ``op_name``; return them with values normalised.

    ``None`` counts as absent, so clients may send optional args as null.
    """
    op = OPS[op_name]
    unknown = sorted(set(args) - set(op.args))
    if unknown:
        raise InvalidArgument(f"{op_name}: unknown argument(s) {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for arg in op.args:
        value = args.get(arg)
        if value is None:
            if arg in op.required:
                raise InvalidArgument(f"{op_name}: missing argument {arg}")
            continue
        out[arg] = _check_for(op_name, arg)(arg, value)
    if "vol" in out and "pool" not in out:
        raise InvalidArgument(f"{op_name}: vol needs pool")
    return out


def call_manager(manager: Any, op_name: str, args: Mapping[str, Any], fd: int | None = None) -> Any:
    """Call the Manager method behind ``op_name`` with checked ``args`` (and,
    for an op that takes one, the file descriptor passed with the request)."""
    op = OPS[op_name]
    assert op.method is not None, op_name
    pos = [args.get(a) for a in op.positional]
    # Trailing absent optionals are dropped so the Manager's defaults apply
    # even if it names them differently than None.
    while pos and pos[-1] is None and op.positional[len(pos) - 1] not in op.required:
        pos.pop()
    kw = {a: args[a] for a in op.keyword if a in args}
    if op.fd:
        if fd is None:
            raise InvalidArgument(
                f"{op_name} needs a file descriptor passed with the request (SCM_RIGHTS)"
            )
        kw["fd"] = fd
    result = getattr(manager, op.method)(*pos, **kw)
    if isinstance(result, bytes):  # volume.read
        return {"content": base64.b64encode(result).decode("ascii"), "length": len(result)}
    return result


# ------------------------------------------------------------------ framing


@dataclass(frozen=True)
class Request:
    id: Any
    op: str
    args: dict[str, Any]
    progress: str | None = None  # the token op.progress reads this request's progress by


def to_jsonable(obj: Any, *, tagged: bool = False) -> Any:
    """Manager results are meant to be JSON-able already; be lenient with the
    usual Python leftovers (tuples, enums, dataclasses, paths) anyway. With
    ``tagged`` a dataclass also says its ``type`` (the CLI's typed dm status)."""
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, tagged=tagged) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(x, tagged=tagged) for x in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        d = {
            f.name: to_jsonable(getattr(obj, f.name), tagged=tagged)
            for f in dataclasses.fields(obj)
        }
        if tagged:
            d.setdefault("type", type(obj).__name__)
        return d
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def encode(obj: Json) -> bytes:
    # ensure_ascii keeps every line pure ASCII: no encoding surprises, and a
    # newline can never appear inside a message.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def request(req_id: int, op: str, args: Mapping[str, Any], *, progress: str | None = None) -> bytes:
    msg = {"v": VERSION, "id": req_id, "op": op, "args": to_jsonable(dict(args))}
    if progress is not None:
        msg["progress"] = progress
    return encode(msg)


def ok(req_id: Any, result: Any) -> bytes:
    return encode({"v": VERSION, "id": req_id, "ok": True, "result": to_jsonable(result)})


def error(req_id: Any, code: str, message: str) -> bytes:
    return encode(
        {"v": VERSION, "id": req_id, "ok": False, "error": {"code": code, "message": message}}
    )


def parse_request(line: bytes) -> Request:
    """Decode one request line; raise :class:`ProtocolError` or
    :class:`InvalidArgument` (with the request id when it is known)."""
    if len(line) > MAX_REQUEST:
        raise ProtocolError(E_BAD_REQUEST, f"request longer than {MAX_REQUEST} bytes")
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(E_BAD_REQUEST, f"malformed JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(E_BAD_REQUEST, "a request must be a JSON object")
    req_id = msg.get("id")
    if not (req_id is None or isinstance(req_id, (int, str))) or isinstance(req_id, bool):
        raise ProtocolError(E_BAD_REQUEST, "id must be an integer or a string")
    if msg.get("v") != VERSION:
        raise ProtocolError(
            E_BAD_VERSION,
            f"protocol version {msg.get('v')!r} is not supported (dmsnapd speaks {VERSION}); "
            "dmsnap and dmsnapd are from different releases",
            req_id,
        )
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError(E_BAD_REQUEST, "op must be a string", req_id)
    if op not in OPS:
        raise ProtocolError(E_UNKNOWN_OP, f"unknown operation {op!r}", req_id)
    args = msg.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError(E_BAD_REQUEST, "args must be a JSON object", req_id)
    token = msg.get("progress")
    try:
        if token is not None:
            token = _token("progress", token)
        return Request(req_id, op, check_args(op, args), token)
    except InvalidArgument as e:
        raise ProtocolError(e.code, e.message, req_id) from None


def parse_response(line: bytes) -> Json:
    """Decode one response line into a dict with ``ok`` and ``result`` or
    ``error``; raise :class:`ProtocolError` if it is not one."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(E_BAD_REQUEST, f"malformed response from dmsnapd: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("ok"), bool):
        raise ProtocolError(E_BAD_REQUEST, "malformed response from dmsnapd")
    if msg.get("v") != VERSION:
        raise ProtocolError(
            E_BAD_VERSION,
            f"dmsnapd speaks protocol version {msg.get('v')!r}, this dmsnap speaks {VERSION}",
        )
    if not msg["ok"]:
        err = msg.get("error")
        if not (isinstance(err, dict) and isinstance(err.get("message"), str)):
            raise ProtocolError(E_BAD_REQUEST, "malformed error response from dmsnapd")
    return msg
