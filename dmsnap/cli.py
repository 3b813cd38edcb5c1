"""The ``dmsnap`` command line.

Storage commands (pool, volume, snapshot, status, daemon) talk to dmsnapd
over its control socket (:mod:`dmsnap.client`); names and sizes are checked
here first, so a typo never reaches the daemon (which checks them again).
``dm`` is a local, read-only view of the device-mapper devices.

Errors are one line on stderr (``dmsnap: ...``) and a non-zero exit code from
the error's kind (see docs/cli.md), never a traceback. Every listing, show,
status and create has ``--json``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import enum
import errno
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from dmsnap import __version__, cli_progress, rules
from dmsnap.client import Client, default_socket
from dmsnap.daemon.protocol import DEFAULT_SOCKET, to_jsonable
from dmsnap.errors import InvalidArgument, UserError
from dmsnap.errors import NotFound as E_NotFound
from dmsnap.replication import cli as replication_cli
from dmsnap.schedule import cli as schedule_cli
from dmsnap.sizes import format_size, parse_size
from dmsnap.storage.names import BadName, check_name, parse_ref

app = typer.Typer(
    help="dmsnap: exact point-in-time snapshots for Linux block storage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
dm_app = typer.Typer(help="Low-level view of dmsnap's device-mapper devices.", no_args_is_help=True)
app.add_typer(dm_app, name="dm")
pool_app = typer.Typer(
    help="Storage pools: where volumes and snapshots live.", no_args_is_help=True
)
volume_app = typer.Typer(help="Volumes: the block devices of a pool.", no_args_is_help=True)
snapshot_app = typer.Typer(help="Point-in-time snapshots of volumes.", no_args_is_help=True)
daemon_app = typer.Typer(help="The dmsnapd daemon.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")
app.add_typer(volume_app, name="volume")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(daemon_app, name="daemon")
initiator_app = typer.Typer(
    help="On a client server: ask a dmsnap LUN for snapshots in-band (SCSI).",
    no_args_is_help=True,
)
app.add_typer(initiator_app, name="initiator")


class _ServeContext(typer.Context):
    """The default command's context: its path is its group's (``dmsnap
    export [OPTIONS] POOL/VOL[@SNAP]`` in its help and its errors)."""

    @property
    def command_path(self) -> str:
        return self.parent.command_path if self.parent else super().command_path


class _ServeCommand(TyperCommand):
    context_class = _ServeContext


class _DefaultGroup(TyperGroup):
    """A group with a default command (``DEFAULT``): a first word that names
    none of its commands is the default command's (``dmsnap export
    POOL/VOL`` is ``dmsnap export serve POOL/VOL``, a reference always has a
    '/'), and so is ``--help``; ``dmsnap export list`` is a command of its
    own."""

    DEFAULT = "serve"

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if (args or not ctx.resilient_parsing) and (not args or args[0] not in self.commands):
            args = [self.DEFAULT, *args]  # (completing the first word: shell_complete)
        return super().parse_args(ctx, args)

    def shell_complete(self, ctx: typer.Context, incomplete: str) -> list[Any]:
        """The first word: a command's name, or the default command's own."""
        default = self.commands[self.DEFAULT]
        sub = default.make_context(self.DEFAULT, [], parent=ctx, resilient_parsing=True)
        first = next(p for p in default.params if p.param_type_name == "argument")
        return [*super().shell_complete(ctx, incomplete), *first.shell_complete(sub, incomplete)]


export_app = typer.Typer(
    cls=_DefaultGroup, help="Serve a volume or snapshot over SCSI; list the exports."
)
app.add_typer(export_app, name="export")


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class CliError(Exception):
    """An error to print as one line; exit code 1 (2 for usage)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _done(json_out: bool, result: dict[str, Any], line: str) -> None:
    """What a mutating command without a result of its own says: ``line``,
    or with --json ``result`` (what it did, naming what it did it to)."""
    if json_out:
        print_json(result)
    else:
        typer.echo(line)


def _snap_json(what: str, pool: str, vol: str, snap: str) -> dict[str, Any]:
    return {what: "snapshot", "pool": pool, "volume": vol, "snapshot": snap}


def print_json(obj: Any) -> None:
    # typed dm status (dataclasses) say which type they are
    json.dump(to_jsonable(obj, tagged=True), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Aligned columns, as administrators expect from storage tools."""
    rows = [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    typer.echo(fmt.format(*headers).rstrip())
    for r in rows:
        typer.echo(fmt.format(*r).rstrip())


def describe_status(status: object) -> str:
    """One human line for a parsed target status."""
    if not dataclasses.is_dataclass(status):
        return str(status)
    parts = []
    for f in dataclasses.fields(status):
        v = getattr(status, f.name)
        if v is None or v == () or f.name in ("target_type", "params"):
            continue
        parts.append(f"{f.name}={to_jsonable(v, tagged=True)}")
    for prop in ("data_used_fraction", "metadata_used_fraction"):
        if hasattr(status, prop):
            parts.append(f"{prop.removesuffix('_fraction')}={getattr(status, prop):.1%}")
    return f"{type(status).__name__}: " + " ".join(parts)


# ----------------------------------------------------------------- session


class _Session:
    """What the global options chose, for the commands of this invocation."""

    socket_path: str = DEFAULT_SOCKET
    progress: bool | None = None  # --progress/--no-progress; None: on a terminal


_session = _Session()


@app.callback()
def _global_options(
    socket_path: Annotated[
        str,
        typer.Option(
            "--socket",
            envvar="DMSNAP_SOCKET",
            metavar="PATH",
            help="dmsnapd's control socket.",
        ),
    ] = DEFAULT_SOCKET,
    show_progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Show the progress of long work on stderr (default: when stderr is a "
            "terminal and not --json; env DMSNAP_PROGRESS=1/0).",
            show_default=False,
        ),
    ] = None,
) -> None:
    _session.socket_path = socket_path
    _session.progress = show_progress


def _call(op: str, **args: Any) -> Any:
    """One request to dmsnapd (connecting only now: after every local check)."""
    with Client(_session.socket_path) as c:
        return c.call(op, **args)


def _call_fds(op: str, fds: list[int], **args: Any) -> Any:
    """A request that passes file descriptors to dmsnapd (a stream's stdin
    or stdout: replication.send/receive)."""
    with Client(_session.socket_path) as c:
        return c.call(op, fds=fds, **args)


def _call_long(op: str, what: str, json_out: bool = False, **args: Any) -> Any:
    """A request whose work may take long: its progress shown on stderr
    where :func:`dmsnap.cli_progress.choose` says so."""
    with cli_progress.choose(what, _session.progress, json_out) as view:
        if type(view) is cli_progress.View:  # shows nothing: no second connection
            return _call(op, **args)
        with Client(_session.socket_path) as c:
            return c.call_watched(op, view.update, **args)


def _confirm(question: str, yes: bool, refusal: str) -> None:
    """Ask on a terminal unless --yes; without a terminal (a script) refuse,
    so nothing destructive happens by accident."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliError(f"{refusal} without --yes (no terminal to ask)")
    if not typer.confirm(question, default=False):
        raise CliError(refusal)


# ------------------------------------------------------------ local checks


def _name(kind: str, text: str) -> str:
    try:
        return check_name(kind, text)
    except BadName as e:
        raise InvalidArgument(str(e)) from None


def _ref(text: str, *, snapshot: bool) -> tuple[str, str, str | None]:
    try:
        return parse_ref(text, snapshot=snapshot)
    except BadName as e:
        raise InvalidArgument(str(e)) from None


def _pool_or_volume(text: str) -> tuple[str, str | None]:
    """``POOL`` or ``POOL/VOL``."""
    if "/" in text:
        pool, vol, _ = _ref(text, snapshot=False)
        return pool, vol
    return _name("pool", text), None


def _device(text: str | None) -> str | None:
    # dmsnapd does not share our working directory.
    if text is None:
        return None
    if not text:
        raise InvalidArgument("device path must not be empty")
    return os.path.abspath(text)


def _labels(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidArgument(f"label {item!r}: expected KEY=VALUE")
        if (why := rules.label_problem(key, value)) is not None:
            raise InvalidArgument(why)
        if key in out:
            raise InvalidArgument(f"label {key!r} given twice")
        out[key] = value
    return out


# --------------------------------------------------------------- rendering


def _get(d: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` that ``d`` has (results may name a field either way)."""
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def _size(v: Any) -> str:
    return format_size(v) if isinstance(v, int) and not isinstance(v, bool) else "-"


def _pct(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v * 100:.1f}%"
    return "-"


def _count(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-"
    if isinstance(v, (list, tuple, dict)):
        return str(len(v))
    return str(v)


def _yesno(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "no")


def _when(v: Any) -> str:
    """Timestamps as local time to the second (epoch seconds or ISO 8601)."""
    if v is None:
        return "-"
    try:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            t = _dt.datetime.fromtimestamp(v)
        else:
            t = _dt.datetime.fromisoformat(str(v))
            if t.tzinfo is not None:
                t = t.astimezone()
    except (ValueError, OverflowError, OSError):
        return str(v)
    return t.strftime("%Y-%m-%d %H:%M:%S")


def _health(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return "; ".join(str(x) for x in v) if v else "ok"
    return str(v) or "ok"


def _writecache(v: Any) -> str:
    if v is None or v is False:
        return "-"
    if isinstance(v, dict):
        return str(v.get("state") or "?")
    return str(v)


def _labels_text(v: Any) -> str:
    if not v:
        return "-"
    if isinstance(v, dict):
        return ",".join(f"{k}={val}" for k, val in sorted(v.items()))
    return str(v)


def _device_text(d: Any) -> str:
    """``role: /dev/x key=value ...`` for a device entry of a pool."""
    if not isinstance(d, dict):
        return str(d)
    named = ("role", "path", "device", "name")
    path = _get(d, "path", "device", "name")
    rest = [
        f"{k}={_size(v) if k.endswith('size') else v}"
        for k, v in d.items()
        if k not in named and v is not None
    ]
    role = f"{d['role']}: " if d.get("role") else ""
    return role + " ".join([str(path or "-"), *rest])


def print_kv(rows: Sequence[tuple[str, object]]) -> None:
    """``key:  value`` lines, values aligned."""
    width = max((len(k) for k, _ in rows), default=0) + 1
    for k, v in rows:
        typer.echo(f"{k + ':':<{width}}  {'-' if v is None else v}".rstrip())


def _value(key: str, v: Any) -> object:
    """A field we have no column for, formatted by what its name says it is."""
    if isinstance(v, bool):
        return _yesno(v)
    if isinstance(v, int) and (key.endswith("size") or key in ("used", "free", "mapped")):
        return _size(v)
    if isinstance(v, float) and key.endswith("fraction"):
        return _pct(v)
    if key == "created":
        return _when(v)
    return v


def _extra(d: dict[str, Any], shown: Iterable[str]) -> list[tuple[str, object]]:
    # Fields we do not know (a newer daemon) still show, as plain values.
    skip = set(shown)
    return [
        (k.replace("_", " "), _value(k, v))
        for k, v in d.items()
        if k not in skip and (v is None or isinstance(v, (str, int, float, bool)))
    ]


POOL_HEADERS = ["NAME", "BACKEND", "SIZE", "USED", "FREE", "DATA", "META", "CACHE", "JOURNAL"]


def _pool_row(p: dict[str, Any]) -> list[object]:
    return [
        p.get("name"),
        p.get("backend"),
        _size(p.get("size")),
        _size(p.get("used")),
        _size(p.get("free")),
        _pct(p.get("data_used_fraction")),
        _pct(p.get("metadata_used_fraction")),
        _writecache(p.get("writecache")),
        _journal_short(p.get("journal")),
        _count(p.get("volumes")),
        _count(p.get("snapshots")),
        _health(p.get("health")),
    ]


def _journal_short(j: Any) -> str:
    if not isinstance(j, dict) or j.get("mode") in (None, "none"):
        return "-"
    if not j.get("running"):
        return f"{j.get('mode')} (stopped)"
    return f"{j.get('mode')} {_pct(j.get('fill'))}"


def _journal_text(j: Any) -> str:
    """mode, fill, flusher lag, markers waiting: what an operator watches."""
    if not isinstance(j, dict) or j.get("mode") in (None, "none"):
        return "none (snapshots suspend I/O)"
    where = j.get("path") or "RAM"
    if not j.get("running"):
        return f"{j.get('mode')} on {where}, not running"
    text = (
        f"{j.get('mode')} on {where}, {_size(j.get('capacity'))}, {_pct(j.get('fill'))} full, "
        f"lag {_count(j.get('lag_records'))} records ({_size(j.get('lag_bytes'))}), "
        f"{_count(j.get('markers_pending'))} marker(s) pending"
    )
    if j.get("memory"):  # NV: the setting, and what it allows in this ring
        text += f", memory {_size(j.get('memory'))} (window {_size(j.get('memory_limit'))})"
    if j.get("backlog_bytes"):
        text += f", replaying {_size(j.get('backlog_bytes'))} recovered"
    return text


def _print_pools(pools: list[dict[str, Any]]) -> None:
    print_table([*POOL_HEADERS, "VOLS", "SNAPS", "HEALTH"], [_pool_row(p) for p in pools])


def _volume_row(v: dict[str, Any]) -> list[object]:
    return [
        v.get("pool"),
        v.get("name"),
        _size(v.get("size")),
        _count(v.get("snapshots")),
        _when(v.get("created")),
        v.get("path"),
    ]


def _snapshot_row(s: dict[str, Any]) -> list[object]:
    return [
        s.get("pool"),
        s.get("volume"),
        s.get("name"),
        s.get("state", "valid"),
        s.get("group"),
        _when(s.get("created")),
        _yesno(s.get("active")),
        s.get("path"),
        _labels_text(s.get("labels")),
    ]


VOLUME_HEADERS = ["POOL", "NAME", "SIZE", "SNAPS", "CREATED", "PATH"]
SNAPSHOT_HEADERS = [
    "POOL",
    "VOLUME",
    "NAME",
    "STATE",
    "GROUP",
    "CREATED",
    "ACTIVE",
    "PATH",
    "LABELS",
]


# -------------------------------------------------------------- completion
# Shell completion asks the daemon; whatever goes wrong (not running, no
# permission, slow) just yields no candidates, never an error in the shell.


def _completion_items(ctx: typer.Context, op: str, **args: Any) -> list[dict[str, Any]]:
    try:
        path = ctx.find_root().params.get("socket_path") or default_socket()
        with Client(path, timeout=2.0) as c:
            items = c.call(op, **args)
        return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
    except Exception:
        return []


def _pool_names(ctx: typer.Context) -> list[str]:
    return [str(p.get("name")) for p in _completion_items(ctx, "pool.list")]


def _volume_refs(ctx: typer.Context) -> list[str]:
    return [f"{v.get('pool')}/{v.get('name')}" for v in _completion_items(ctx, "volume.list")]


def complete_pool(ctx: typer.Context, incomplete: str) -> list[str]:
    return [n for n in _pool_names(ctx) if n.startswith(incomplete)]


def complete_volume(ctx: typer.Context, incomplete: str) -> list[str]:
    return [r for r in _volume_refs(ctx) if r.startswith(incomplete)]


def complete_volumes(ctx: typer.Context, incomplete: str) -> list[str]:
    """``POOL/VOL[,POOL/VOL...]``: complete the last element of the list."""
    done, comma, last = incomplete.rpartition(",")
    prefix = done + comma
    taken = set(done.split(",")) if done else set()
    return [prefix + r for r in _volume_refs(ctx) if r.startswith(last) and r not in taken]


def complete_pool_or_volume(ctx: typer.Context, incomplete: str) -> list[str]:
    if "/" in incomplete:
        return complete_volume(ctx, incomplete)
    return complete_pool(ctx, incomplete)


def complete_snapshot(ctx: typer.Context, incomplete: str) -> list[str]:
    refs = [
        f"{s.get('pool')}/{s.get('volume')}@{s.get('name')}"
        for s in _completion_items(ctx, "snapshot.list")
    ]
    return [r for r in refs if r.startswith(incomplete)]


PoolArg = Annotated[str, typer.Argument(metavar="POOL", autocompletion=complete_pool)]
VolumeArg = Annotated[str, typer.Argument(metavar="POOL/VOL", autocompletion=complete_volume)]
SnapshotArg = Annotated[
    str, typer.Argument(metavar="POOL/VOL@SNAP", autocompletion=complete_snapshot)
]


# -------------------------------------------------------------------- pool


# typer's choices, from the rules' lists
Backend = enum.StrEnum("Backend", {b: b for b in rules.BACKENDS})  # type: ignore[misc]
JournalMode = enum.StrEnum("JournalMode", {m: m for m in rules.JOURNAL_MODES})  # type: ignore[misc]
DEFAULT_BACKEND = Backend(rules.DEFAULT_BACKEND)
DEFAULT_JOURNAL_MODE = JournalMode(rules.DEFAULT_JOURNAL_MODE)


@pool_app.command("create")
def pool_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="New pool's name.")],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            metavar="DEV",
            help="Data device (default: a loop file in the state directory).",
        ),
    ] = None,
    cache: Annotated[
        str | None,
        typer.Option("--cache", metavar="DEV", help="Fast device for a writecache in front."),
    ] = None,
    backend: Annotated[
        Backend, typer.Option("--backend", help="Snapshot backend.", case_sensitive=False)
    ] = DEFAULT_BACKEND,
    size: Annotated[
        str | None,
        typer.Option("--size", metavar="SIZE", help="Size of the embedded pool, e.g. 10G."),
    ] = None,
    cache_size: Annotated[
        str | None,
        typer.Option("--cache-size", metavar="SIZE", help="Size of the writecache, e.g. 1G."),
    ] = None,
    journal: Annotated[
        str | None,
        typer.Option(
            "--journal",
            metavar="DEV",
            help="Journal device, fast and durable (default: a file in the state directory).",
        ),
    ] = None,
    journal_size: Annotated[
        str | None,
        typer.Option(
            "--journal-size", metavar="SIZE", help="Size of a file or RAM journal (default 64M)."
        ),
    ] = None,
    journal_mode: Annotated[
        JournalMode,
        typer.Option(
            "--journal-mode",
            help="nv: a write is acknowledged once durable in the journal; ram: once in "
            "memory (FLUSH waits for the volume); none: no journal, snapshots suspend I/O.",
            case_sensitive=False,
        ),
    ] = DEFAULT_JOURNAL_MODE,
    metadata_size: Annotated[
        str | None,
        typer.Option(
            "--metadata-size",
            metavar="SIZE",
            help="Thin pools: size of the metadata device, 2M to 15G (default: ~64 bytes "
            "per 64 KiB of data, at least 8M); like lvcreate's --poolmetadatasize.",
        ),
    ] = None,
    journal_memory: Annotated[
        str | None,
        typer.Option(
            "--journal-memory",
            metavar="SIZE",
            help="NV journal: RAM its unflushed writes may take (default 256M, at least 16M); "
            "writers wait for the flusher beyond it, and recovery uses no more.",
        ),
    ] = None,
    sparse: Annotated[
        bool,
        typer.Option(
            "--sparse",
            help="Embedded pool: create it even if the host file system cannot hold its "
            "files (their writes fail once it fills).",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a pool (with no --data: an embedded pool on loop files)."""
    args = {
        "journal": _device(journal),
        "journal_size": parse_size(journal_size, what="--journal-size") if journal_size else None,
        "journal_mode": journal_mode.value,
        "journal_memory": _journal_memory(journal_memory),
        "name": _name("pool", name),
        "data": _device(data),
        "cache": _device(cache),
        "backend": backend.value,
        "size": parse_size(size, what="--size") if size is not None else None,
        "cache_size": parse_size(cache_size, what="--cache-size") if cache_size else None,
        "sparse": sparse or None,
        "metadata_size": parse_size(metadata_size, what="--metadata-size")
        if metadata_size
        else None,
    }
    pool = _call_long("pool.create", f"pool create {name}", json_out, **args)
    if json_out:
        print_json(pool)
        return
    p = pool if isinstance(pool, dict) else {}
    jmode = (p.get("journal") or {}).get("mode", journal_mode.value)
    typer.echo(
        f"created pool {name} ({p.get('backend', backend.value)}, "
        f"{_size(p.get('size'))}{', writecache' if p.get('writecache') else ''}, "
        f"journal {jmode})"
    )


@pool_app.command("list")
def pool_list(json_out: JsonOpt = False) -> None:
    """List pools with their space use and health."""
    pools = _call("pool.list")
    if json_out:
        print_json(pools)
    elif not pools:
        typer.echo("no pools")
    else:
        _print_pools(pools)


@pool_app.command("show")
def pool_show(name: PoolArg, json_out: JsonOpt = False) -> None:
    """Show one pool in detail."""
    p = _call("pool.show", name=_name("pool", name))
    if json_out:
        print_json(p)
        return
    used = p.get("used")
    free = p.get("free")
    rows: list[tuple[str, object]] = [
        ("name", p.get("name")),
        ("backend", p.get("backend")),
        ("embedded", _yesno(p.get("embedded"))),
        ("size", _size(p.get("size"))),
        ("used", _size(used)),
        ("free", _size(free)),
        ("data used", _pct(p.get("data_used_fraction"))),
        ("metadata used", _pct(p.get("metadata_used_fraction"))),
        ("metadata size", _size(p.get("metadata_size"))),
        ("writecache", _writecache(p.get("writecache"))),
        ("journal", _journal_text(p.get("journal"))),
        ("host fs", _host_fs_text(p.get("host_fs"))),
        ("volumes", _count(p.get("volumes"))),
        ("snapshots", _count(p.get("snapshots"))),
        ("health", _health(p.get("health"))),
    ]
    shown = {
        "name", "backend", "embedded", "size", "used", "free",
        "data_used_fraction", "metadata_used_fraction", "metadata_size", "writecache", "volumes",
        "snapshots", "health", "devices", "journal", "host_fs",
    }  # fmt: skip
    rows += _extra(p, shown)
    print_kv(rows)
    devices = p.get("devices")
    if devices:
        typer.echo("devices:")
        items = devices.items() if isinstance(devices, dict) else enumerate(devices)
        for role, d in items:
            label = f"{role}: " if isinstance(role, str) else ""
            typer.echo(f"  {label}{_device_text(d)}")


@pool_app.command("repair")
def pool_repair(
    name: PoolArg,
    discard_after: Annotated[
        int,
        typer.Option(
            "--discard-after",
            metavar="SEQ",
            min=1,
            help="Drop journal record SEQ and every later one (the record the refused "
            "assembly named).",
        ),
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Bring up a pool whose journal is damaged in the middle: the records
    from SEQ on are dropped (acknowledged writes and snapshot requests among
    them are lost), then the pool is assembled."""
    _name("pool", name)
    _confirm(
        f"Drop journal record {discard_after} and every later one of pool {name}?",
        yes,
        f"not repairing pool {name}",
    )
    r = _call("pool.repair", name=name, discard_after=discard_after)
    if json_out:
        print_json(r)
        return
    typer.echo(
        f"pool {name}: dropped {r['dropped']} journal record(s) from {discard_after} on; "
        f"assembly: {r['state']}"
    )


@pool_app.command("set")
def pool_set(
    name: PoolArg,
    threshold: Annotated[
        int | None,
        typer.Option(
            "--cow-autoextend-threshold",
            metavar="PERCENT",
            help="Classic: grow a snapshot's COW area once it is this full (50-100; 100: never).",
        ),
    ] = None,
    percent: Annotated[
        int | None,
        typer.Option(
            "--cow-autoextend-percent",
            metavar="PERCENT",
            help="Classic: grow it by this share of its size, from the pool's free space.",
        ),
    ] = None,
    journal_memory: Annotated[
        str | None,
        typer.Option(
            "--journal-memory",
            metavar="SIZE",
            help="NV journal: RAM its unflushed writes may take (at least 16M), at once; "
            "lower, writers wait until the flusher is under it.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Change a pool's policy (classic COW autoextend, journal memory)."""
    p = _call(
        "pool.set",
        name=_name("pool", name),
        cow_autoextend_threshold=threshold,
        cow_autoextend_percent=percent,
        journal_memory=_journal_memory(journal_memory),
    )
    if json_out:
        print_json(p)
        return
    p = p if isinstance(p, dict) else {}
    if threshold is not None or percent is not None:
        pol = p.get("cow_autoextend") or {}
        typer.echo(
            f"pool {name}: COW autoextend at {pol.get('threshold')}% full by {pol.get('percent')}%"
        )
    if journal_memory is not None:
        typer.echo(f"pool {name}: journal memory {_size((p.get('journal') or {}).get('memory'))}")


def _journal_memory(text: str | None) -> int | None:
    return parse_size(text, what="--journal-memory") if text else None


@pool_app.command("extend-metadata")
def pool_extend_metadata(
    name: PoolArg,
    size: Annotated[
        str,
        typer.Option("--size", metavar="SIZE", help="How much metadata to add, e.g. 64M."),
    ],
    json_out: JsonOpt = False,
) -> None:
    """Give a thin pool more metadata (a reserved file in the state
    directory); a pool out of metadata space takes writes again."""
    p = _call(
        "pool.extend_metadata",
        name=_name("pool", name),
        size=parse_size(size, what="--size"),
    )
    if json_out:
        print_json(p)
        return
    typer.echo(f"pool {name}: thin metadata now {_size(p.get('metadata_size'))}")


def _host_fs_text(h: Any) -> str | None:
    if not isinstance(h, dict):
        return None
    return (
        f"{_size(h.get('free'))} free on {h.get('path')} "
        f"(sparse files may still take {_size(h.get('unallocated'))})"
    )


@pool_app.command("destroy")
def pool_destroy(
    name: PoolArg,
    force: Annotated[
        bool, typer.Option("--force", help="Also delete its volumes and snapshots.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Destroy a pool (refused while it has volumes, unless --force)."""
    _name("pool", name)
    what = " and every volume and snapshot in it" if force else ""
    _confirm(f"Destroy pool {name}{what}?", yes, f"not destroying pool {name}")
    _call_long("pool.destroy", f"pool destroy {name}", json_out, name=name, force=force or None)
    _done(json_out, {"destroyed": "pool", "pool": name}, f"destroyed pool {name}")


# ------------------------------------------------------------------ volume


@volume_app.command("create")
def volume_create(
    ref: Annotated[str, typer.Argument(metavar="POOL/VOL", help="Pool and new volume's name.")],
    size: Annotated[str, typer.Option("--size", metavar="SIZE", help="Volume size, e.g. 10G.")],
    json_out: JsonOpt = False,
) -> None:
    """Create a volume: a block device at /dev/dmsnap/POOL/VOL."""
    pool, vol, _ = _ref(ref, snapshot=False)
    nbytes = parse_size(size, what="--size")
    v = _call_long(
        "volume.create", f"volume create {pool}/{vol}", json_out, pool=pool, vol=vol, size=nbytes
    )
    if json_out:
        print_json(v)
        return
    v = v if isinstance(v, dict) else {}
    path = v.get("path")
    typer.echo(
        f"created volume {pool}/{vol} ({_size(v.get('size', nbytes))})"
        + (f" at {path}" if path else "")
    )


@volume_app.command("list")
def volume_list(
    pool: Annotated[
        str | None, typer.Argument(metavar="[POOL]", autocompletion=complete_pool)
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """List volumes (of one pool, or all)."""
    vols = _call("volume.list", pool=_name("pool", pool) if pool is not None else None)
    if json_out:
        print_json(vols)
    elif not vols:
        typer.echo("no volumes")
    else:
        print_table(VOLUME_HEADERS, [_volume_row(v) for v in vols])


@volume_app.command("show")
def volume_show(ref: VolumeArg, json_out: JsonOpt = False) -> None:
    """Show one volume."""
    pool, vol, _ = _ref(ref, snapshot=False)
    v = _call("volume.show", pool=pool, vol=vol)
    if json_out:
        print_json(v)
        return
    rows: list[tuple[str, object]] = [
        ("pool", v.get("pool")),
        ("name", v.get("name")),
        ("size", _size(v.get("size"))),
        ("path", v.get("path")),
        ("snapshots", _count(v.get("snapshots"))),
        ("created", _when(v.get("created"))),
    ]
    rows += _extra(v, ("pool", "name", "size", "path", "snapshots", "created"))
    print_kv(rows)


@volume_app.command("delete")
def volume_delete(
    ref: VolumeArg,
    force: Annotated[bool, typer.Option("--force", help="Also delete its snapshots.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete a volume (refused while it has snapshots, unless --force)."""
    pool, vol, _ = _ref(ref, snapshot=False)
    _call("volume.delete", pool=pool, vol=vol, force=force or None)
    _done(
        json_out,
        {"deleted": "volume", "pool": pool, "volume": vol},
        f"deleted volume {pool}/{vol}",
    )


IO_CHUNK = 256 << 10  # the protocol's MAX_IO


@volume_app.command("write")
def volume_write(
    ref: VolumeArg,
    source: Annotated[
        str, typer.Argument(metavar="FILE", help="What to write ('-' for stdin).")
    ] = "-",
    offset: Annotated[
        str, typer.Option("--offset", metavar="SIZE", help="Where, e.g. 1M (512-aligned).")
    ] = "0",
    sync: Annotated[
        bool, typer.Option("--sync", help="FLUSH at the end (a RAM journal: onto the volume).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write into a journaled volume through dmsnapd (the local writer's path;
    a whole number of 512-byte sectors)."""
    pool, vol, _ = _ref(ref, snapshot=False)
    at = parse_size(offset, what="--offset", allow_zero=True)
    stream = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115
    total = 0
    with stream, Client(_session.socket_path) as c:
        while chunk := stream.read(IO_CHUNK):
            while len(chunk) < IO_CHUNK and (more := stream.read(IO_CHUNK - len(chunk))):
                chunk += more  # pipes deliver short reads
            if len(chunk) % 512:
                raise InvalidArgument(
                    f"{len(chunk) % 512} bytes past the last whole 512-byte sector; "
                    "volumes take whole sectors"
                )
            c.call(
                "volume.write",
                pool=pool,
                vol=vol,
                offset=at + total,
                content=base64.b64encode(chunk).decode("ascii"),
            )
            total += len(chunk)
        if sync:
            c.call("volume.flush", pool=pool, vol=vol)
    if json_out:
        print_json({"pool": pool, "volume": vol, "offset": at, "written": total, "synced": sync})
        return
    typer.echo(f"wrote {total} bytes to {pool}/{vol} at {at}", err=True)


@volume_app.command("read")
def volume_read(
    ref: VolumeArg,
    length: Annotated[str, typer.Option("--length", metavar="SIZE", help="How much, e.g. 4M.")],
    offset: Annotated[
        str, typer.Option("--offset", metavar="SIZE", help="From where (512-aligned).")
    ] = "0",
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="FILE", help="Where to ('-': stdout).")
    ] = "-",
) -> None:
    """Read a journaled volume through dmsnapd: the newest data, journal
    records not yet on the volume included."""
    pool, vol, _ = _ref(ref, snapshot=False)
    at = parse_size(offset, what="--offset", allow_zero=True)
    n = parse_size(length, what="--length")
    sink = sys.stdout.buffer if output == "-" else open(output, "wb")  # noqa: SIM115
    with sink, Client(_session.socket_path) as c:
        done = 0
        while done < n:
            step = min(IO_CHUNK, n - done)
            r = c.call("volume.read", pool=pool, vol=vol, offset=at + done, length=step)
            sink.write(base64.b64decode(r["content"]))
            done += step


@volume_app.command("discard")
def volume_discard(
    ref: VolumeArg,
    offset: Annotated[
        str, typer.Option("--offset", metavar="SIZE", help="From where (512-aligned).")
    ] = "0",
    length: Annotated[
        str | None,
        typer.Option("--length", metavar="SIZE", help="How much (default: to the end)."),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Discard (zero) a range of a journaled volume through dmsnapd: it reads
    zeros from now on, ordered with the writes and snapshots around it, and
    a thin pool gets the space back. Snapshots keep their data."""
    pool, vol, _ = _ref(ref, snapshot=False)
    at = parse_size(offset, what="--offset", allow_zero=True)
    n = parse_size(length, what="--length") if length is not None else None
    what = f"{n} bytes" if n is not None else "everything"
    _confirm(f"Discard {what} of {pool}/{vol} from {at}?", yes, f"not discarding {pool}/{vol}")
    r = _call("volume.discard", pool=pool, vol=vol, offset=at, size=n)
    if json_out:
        print_json({"pool": pool, "volume": vol, "offset": at, **r})
        return
    typer.echo(f"discarded {r['discarded']} bytes of {pool}/{vol} at {at}")


# ---------------------------------------------------------------- snapshot


@snapshot_app.command("create")
def snapshot_create(
    refs: Annotated[
        str,
        typer.Argument(
            metavar="POOL/VOL[,POOL/VOL...]",
            help="Volumes to snapshot together (one point in time for all).",
            autocompletion=complete_volumes,
        ),
    ],
    name: Annotated[str, typer.Argument(metavar="NAME", help="Snapshot name.")],
    label: Annotated[
        list[str] | None,
        typer.Option("--label", "-l", metavar="KEY=VALUE", help="Attach a label (repeatable)."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Return once the snapshot exists, not once its marker is durable.",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", metavar="SECONDS", help="How long --wait waits.")
    ] = 60.0,
    cow_size: Annotated[
        str | None,
        typer.Option(
            "--cow-size",
            metavar="SIZE",
            help="Classic pools: each snapshot's COW area (default 25%% of the volume; "
            "it grows by the pool's autoextend policy).",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Snapshot one volume, or several at one point in time (a group).

    On a journaled pool the point in time is when the request arrives; the
    command returns once that point is durable and the snapshot follows as
    the journal drains (--wait to wait for it)."""
    pairs: list[list[str]] = []
    for text in refs.split(","):
        pool, vol, _ = _ref(text.strip(), snapshot=False)
        if [pool, vol] in pairs:
            raise InvalidArgument(f"volume {pool}/{vol} is named twice")
        pairs.append([pool, vol])
    _name("snapshot", name)
    result = _call(
        "snapshot.create",
        refs=pairs,
        name=name,
        labels=_labels(label),
        wait=wait or None,
        timeout=timeout if wait else None,
        cow_size=parse_size(cow_size, what="--cow-size") if cow_size is not None else None,
    )
    if json_out:
        print_json(result)
        return
    what = ", ".join("/".join(p) for p in pairs)
    if isinstance(result, dict) and result.get("state") == "pending":
        typer.echo(f"requested snapshot {name} of {what} (marker {result.get('marker')}, durable)")
    else:
        typer.echo(f"created snapshot {name} of {what}")


@snapshot_app.command("list")
def snapshot_list(
    where: Annotated[
        str | None,
        typer.Argument(metavar="[POOL[/VOL]]", autocompletion=complete_pool_or_volume),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """List snapshots (of a pool, of a volume, or all)."""
    pool, vol = _pool_or_volume(where) if where is not None else (None, None)
    snaps = _call("snapshot.list", pool=pool, vol=vol)
    if json_out:
        print_json(snaps)
    elif not snaps:
        typer.echo("no snapshots")
    else:
        print_table(SNAPSHOT_HEADERS, [_snapshot_row(s) for s in snaps])


def _snap(ref: str) -> tuple[str, str, str]:
    pool, vol, snap = _ref(ref, snapshot=True)
    assert snap is not None
    return pool, vol, snap


@snapshot_app.command("delete")
def snapshot_delete(
    ref: SnapshotArg,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Also a snapshot a replication target holds (its next sync is then a full one).",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete a snapshot."""
    pool, vol, snap = _snap(ref)
    _call("snapshot.delete", pool=pool, vol=vol, name=snap, force=force or None)
    _done(json_out, _snap_json("deleted", pool, vol, snap), f"deleted snapshot {ref}")


@snapshot_app.command("activate")
def snapshot_activate(ref: SnapshotArg, json_out: JsonOpt = False) -> None:
    """Make a snapshot readable at /dev/dmsnap/POOL/VOL@SNAP (read-only)."""
    pool, vol, snap = _snap(ref)
    result = _call("snapshot.activate", pool=pool, vol=vol, name=snap)
    if json_out:
        print_json(result)
        return
    path = result.get("path") if isinstance(result, dict) else None
    typer.echo(path or f"activated snapshot {ref}")


@snapshot_app.command("deactivate")
def snapshot_deactivate(ref: SnapshotArg, json_out: JsonOpt = False) -> None:
    """Remove a snapshot's read-only device (the snapshot stays)."""
    pool, vol, snap = _snap(ref)
    _call("snapshot.deactivate", pool=pool, vol=vol, name=snap)
    _done(json_out, _snap_json("deactivated", pool, vol, snap), f"deactivated snapshot {ref}")


@snapshot_app.command("restore")
def snapshot_restore(ref: SnapshotArg, json_out: JsonOpt = False) -> None:
    """Roll the volume back to the snapshot (its newer data is lost)."""
    pool, vol, snap = _snap(ref)
    _call_long("snapshot.restore", f"restore {ref}", json_out, pool=pool, vol=vol, name=snap)
    _done(
        json_out,
        _snap_json("restored", pool, vol, snap),
        f"restored {pool}/{vol} to snapshot {snap}",
    )


# ---------------------------------------------------------------- exports

EXPORT_HEADERS = ["REF", "KIND", "SERIAL", "TARGET", "ALLOW", "SNAPSHOT-ALLOW", "RUNNING"]


def _allow_text(row: dict[str, Any]) -> str:
    """Who may log in to an export, in a table cell: a local disk has no
    login; an iSCSI target admits its --allow list, or (--allow-any, demo
    mode) every initiator, shown loud."""
    if row.get("kind") != "iscsi":
        return "-"
    if row.get("allow_any"):
        return "ANY(demo)"
    return ",".join(row.get("allow") or []) or "none"


def _rights_text(value: Any) -> str:
    """An export's snapshot rights in a table cell."""
    if value == "all" or value is None:
        return "all"
    return ",".join(value) if value else "none"


def _chap_entries(source: str) -> list[list[str]]:
    """The CHAP file (only its owner may read it) or standard input, as
    the daemon takes it; errors name the line, never a secret."""
    from dmsnap.scsi import chap

    try:
        if source == "-":
            text, where = sys.stdin.read(1 << 20), "standard input"
        else:
            text, where = chap.read_file(source), source
        return [c.to_wire() for c in chap.from_wire(e.to_wire() for e in chap.parse(text, where))]
    except chap.ChapError as e:
        raise InvalidArgument(str(e)) from None


def _export_list(json_out: bool) -> None:
    rows = _call("export.list")
    if json_out:
        print_json(rows)
    elif not rows:
        typer.echo("no exports")
    else:
        print_table(
            EXPORT_HEADERS,
            [
                [
                    r.get("ref"),
                    r.get("kind"),
                    r.get("serial"),
                    r.get("iqn") or r.get("disk") or "-",
                    _allow_text(r),
                    _rights_text(r.get("snapshot_allow")),
                    _yesno(r.get("running")),
                ]
                for r in rows
            ],
        )


@export_app.command("list")
def export_list(json_out: JsonOpt = False) -> None:
    """The exports: what each serves, its target, who may log in and who
    may snapshot, whether it runs."""
    _export_list(json_out)


@export_app.command(_DefaultGroup.DEFAULT, cls=_ServeCommand, hidden=True)
def export(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="POOL/VOL[@SNAP]",
            help="What to serve (a snapshot: read-only).",
            autocompletion=complete_volume,
        ),
    ],
    local: Annotated[
        bool, typer.Option("--local", help="A SCSI disk on this host (tcm_loop).")
    ] = False,
    iscsi: Annotated[bool, typer.Option("--iscsi", help="An iSCSI target.")] = False,
    iqn: Annotated[str | None, typer.Option("--iqn", metavar="IQN", help="Target name.")] = None,
    portal: Annotated[
        str | None, typer.Option("--portal", metavar="ADDR:PORT", help="Default 0.0.0.0:3260.")
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            metavar="INITIATOR_IQN",
            help="The initiators that may log in (repeat; iSCSI needs it or --allow-any).",
        ),
    ] = None,
    allow_any: Annotated[
        bool,
        typer.Option(
            "--allow-any",
            help="Demo mode: every initiator may log in, read-write, without ACLs.",
        ),
    ] = False,
    chap_file: Annotated[
        str | None,
        typer.Option(
            "--chap-file",
            metavar="FILE|-",
            help="CHAP per initiator, from a file only you can read (or - for stdin): "
            "lines IQN USER SECRET [MUTUAL_USER MUTUAL_SECRET].",
        ),
    ] = None,
    chap: Annotated[str | None, typer.Option("--chap", hidden=True)] = None,
    snapshot_allow: Annotated[
        list[str] | None,
        typer.Option(
            "--snapshot-allow",
            metavar="INITIATOR_IQN|all",
            help="Who may send the in-band snapshot command (repeat; default all).",
        ),
    ] = None,
    no_snapshot: Annotated[
        bool, typer.Option("--no-snapshot", help="No initiator may send the snapshot command.")
    ] = False,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Change a running export live: --allow (the new list) and/or the snapshot rights.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Serve a journaled volume over SCSI: --local (a disk here, linked as
    /dev/dmsnap/POOL/VOL) or --iscsi; `dmsnap export list` lists exports.
    An iSCSI export admits only the --allow initiators (an ACL each);
    --allow-any opens it to every initiator (demo mode, with a warning).
    By default every initiator that reaches the LUN may request snapshots
    in-band; --snapshot-allow IQN (iSCSI with --allow) names the ones that
    may, --no-snapshot lets none. --update changes a running export's
    --allow list and snapshot rights without dropping other sessions."""
    if "/" not in ref:  # a mistyped command, most likely
        raise InvalidArgument(
            f"export: {ref!r} is not POOL/VOL[@SNAP] ('dmsnap export list' lists the exports)"
        )
    if chap is not None:
        # argv is in ps, /proc and shell history: no secret there
        raise InvalidArgument(
            "CHAP secrets are not taken on the command line: --chap-file FILE "
            "(mode 600) or --chap-file - (standard input)"
        )
    if no_snapshot and snapshot_allow:
        raise InvalidArgument("--no-snapshot or --snapshot-allow, not both")
    if update and (local or iscsi or iqn or portal or chap_file or allow_any):
        raise InvalidArgument(
            "--update changes --allow and the snapshot rights only "
            "(the kind, IQN, portal and CHAP stay: unexport and export again)"
        )
    if not update and local == iscsi:
        raise InvalidArgument("say --local or --iscsi")
    pool, vol, snap = _ref(ref, snapshot=None)
    args: dict[str, Any] = {
        "pool": pool,
        "vol": vol,
        "snap": snap,
        "allow": allow or None,
        "snapshot_allow": [] if no_snapshot else snapshot_allow or None,
    }
    if update:
        r = _call("export.update", **args)
        if json_out:
            print_json(r)
            return
        typer.echo(
            f"updated {ref}: snapshot command from {_rights_text(r.get('snapshot_allow'))}"
            + (f"; initiators {', '.join(r['allow'])}" if r.get("allow") else "")
        )
        return
    kind = "local" if local else "iscsi"
    if allow_any:
        args["allow_any"] = True
    if chap_file is not None:
        args["chap"] = _chap_entries(chap_file)
    r = _call("export.create", **args, kind=kind, iqn=iqn, portal=portal)
    if allow_any:
        typer.echo(
            f"warning: {ref} is open to every initiator that reaches "
            f"{r.get('portal') or 'its portal'}, read-write, without ACLs (--allow-any, "
            "demo mode); export it with --allow INITIATOR_IQN to close it",
            err=True,
        )
    if json_out:
        print_json(r)
        return
    where = r.get("iqn") if iscsi else f"/dev/dmsnap/{pool}/{vol}" if not snap else "a local disk"
    typer.echo(f"exported {ref} ({'iscsi' if iscsi else 'local'}): {where}")


@app.command("unexport")
def unexport(
    ref: Annotated[str, typer.Argument(metavar="POOL/VOL[@SNAP]", autocompletion=complete_volume)],
    json_out: JsonOpt = False,
) -> None:
    """Stop serving a volume or snapshot over SCSI."""
    pool, vol, snap = _ref(ref, snapshot=None)
    _call("export.delete", pool=pool, vol=vol, snap=snap)
    _done(
        json_out,
        {"unexported": ref, "pool": pool, "volume": vol, "snapshot": snap},
        f"unexported {ref}",
    )


# ---------------------------------------------------------------- initiator

DeviceArg = Annotated[
    str, typer.Argument(metavar="DEVICE", help="The dmsnap LUN: /dev/sdX or /dev/sgN.")
]


def _entry_json(e: Any) -> dict[str, Any]:
    return {
        "token": e.token.hex(),
        "name": e.name,
        "state": e.state.name.lower(),
        "group": e.group,
        "marker": e.marker,
        "requested": e.requested,
        "snapshots": list(e.snapshots),
        "labels": e.labels,
        "error": e.error or None,
    }


@initiator_app.command("snapshot")
def initiator_snapshot(
    device: DeviceArg,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    wait: Annotated[bool, typer.Option("--wait", help="Until the snapshot exists.")] = False,
    group: Annotated[
        bool,
        typer.Option(
            "--group", help="Every volume of the LUN's pool this initiator may snapshot, one cut."
        ),
    ] = False,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", metavar="KEY=VALUE")] = None,
    token: Annotated[
        str | None, typer.Option("--token", metavar="HEX", help="Reuse a request token (retry).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Request a snapshot in-band: it holds every write completed before."""
    from dmsnap.scsi import initiator, snapcmd

    tok = None
    if token is not None:
        try:
            tok = snapcmd.parse_token(token)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
    c = initiator.snapshot(device, name, labels=_labels(label), wait=wait, group=group, token=tok)
    if json_out:
        print_json({"token": c.token.hex(), **(_entry_json(c.entry) if c.entry else {})})
        return
    state = c.entry.state.name.lower() if c.entry else "requested"
    typer.echo(f"snapshot {name}: {state} (token {c.token.hex()})")


@initiator_app.command("status")
def initiator_status(
    device: DeviceArg,
    token: Annotated[str, typer.Argument(metavar="TOKEN")],
    json_out: JsonOpt = False,
) -> None:
    """Where a request stands (pending: durable, not made yet; done; failed)."""
    from dmsnap.scsi import initiator, snapcmd

    try:
        tok = snapcmd.parse_token(token)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    found = initiator.status(device, tok)
    if not found:
        raise E_NotFound(f"{device}: no request with token {token}")
    if json_out:
        print_json(_entry_json(found[0]))
        return
    e = found[0]
    typer.echo(f"{e.name}: {e.state.name.lower()}" + (f" ({e.error})" if e.error else ""))
    for snap in e.snapshots:
        typer.echo(f"  {snap}")


@initiator_app.command("list")
def initiator_list(device: DeviceArg, json_out: JsonOpt = False) -> None:
    """Snapshot requests of the LUN's pool that are not deleted, newest first."""
    from dmsnap.scsi import initiator

    entries = initiator.list_requests(device)
    if json_out:
        print_json([_entry_json(e) for e in entries])
        return
    print_table(
        ["NAME", "STATE", "MARKER", "TOKEN", "SNAPSHOTS"],
        [
            [e.name, e.state.name.lower(), e.marker, e.token.hex(), ",".join(e.snapshots) or "-"]
            for e in entries
        ],
    )


@initiator_app.command("delete")
def initiator_delete(
    device: DeviceArg,
    name: Annotated[str | None, typer.Argument(metavar="[NAME]")] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", metavar="HEX", help="The request token that made it (exact)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Delete a snapshot of the LUN's volume in-band (by NAME or --token)."""
    from dmsnap.scsi import initiator, snapcmd

    if (name is None) == (token is None):
        raise InvalidArgument("name the snapshot: NAME or --token HEX (one of them)")
    if token is not None:
        try:
            tok = snapcmd.parse_token(token)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        initiator.delete(device, tok)
        _done(
            json_out,
            {"deleted": "snapshot", "device": device, "token": tok.hex()},
            f"deleted the snapshot of request {tok.hex()}",
        )
        return
    assert name is not None
    why = snapcmd.check_name(name)
    if why:
        raise InvalidArgument(why)
    e = initiator.delete_named(device, name)
    _done(
        json_out,
        {"deleted": "snapshot", "device": device, "name": name, "token": e.token.hex()},
        f"deleted snapshot {name} (token {e.token.hex()})",
    )


@initiator_app.command(
    "run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def initiator_run(
    ctx: typer.Context,
    device: DeviceArg,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    wait: Annotated[bool, typer.Option("--wait")] = False,
) -> None:
    """Snapshot, then run the operation: dmsnap initiator run DEV NAME -- CMD..."""
    import subprocess

    from dmsnap.scsi import initiator

    cmd = list(ctx.args)
    if not cmd:
        raise InvalidArgument("name the command to run after --")
    c = initiator.snapshot(device, name, wait=wait, labels={"op": " ".join(cmd)[:256]})
    typer.echo(f"snapshot {name} requested (token {c.token.hex()}); running {cmd[0]}", err=True)
    raise typer.Exit(subprocess.call(cmd))


@initiator_app.command("schedule")
def initiator_schedule(
    device: DeviceArg,
    every: Annotated[str, typer.Option("--every", metavar="INTERVAL", help="e.g. 5m, 1h, 30s")],
    prefix: Annotated[str, typer.Option("--prefix", help="Snapshot name prefix.")] = "auto",
    count: Annotated[int, typer.Option("--count", help="Stop after N (0: forever).")] = 0,
    keep: Annotated[
        int,
        typer.Option(
            "--keep",
            metavar="N",
            help="Keep the newest N snapshots this schedule made, delete older ones (0: all).",
        ),
    ] = 0,
) -> None:
    """Request a snapshot periodically (names PREFIX-YYYYmmdd-HHMMSS)."""
    import time as _time

    from dmsnap.scsi import initiator, snapcmd

    m = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        period = float(every[:-1]) * m[every[-1]] if every[-1] in m else float(every)
    except (ValueError, IndexError):
        raise InvalidArgument(f"--every {every!r}: expected e.g. 30s, 5m, 1h") from None
    if period < 1:
        raise InvalidArgument("--every must be at least 1s")
    if count < 0:
        raise InvalidArgument("--count must be 0 (forever) or more")
    if keep < 0:
        raise InvalidArgument("--keep must be 0 (keep all) or more")
    why = snapcmd.check_name(f"{prefix}-20000101-000000")
    if why:
        raise InvalidArgument(f"--prefix {prefix!r}: {why}")
    # The schedule labels its requests, so pruning never touches a snapshot
    # it did not make (a user's own "auto-..." one, another LUN's schedule).
    # (always labelled: a later run with --keep prunes this run's snapshots too)
    labels = {initiator.SCHEDULE_LABEL: initiator.schedule_id(device, prefix)}
    done = 0
    while count == 0 or done < count:
        name = f"{prefix}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
        try:
            c = initiator.snapshot(device, name, labels=labels)
            typer.echo(f"{name}: requested (token {c.token.hex()})")
            if keep:
                deleted, errors = initiator.prune(device, labels[initiator.SCHEDULE_LABEL], keep)
                for e in deleted:
                    typer.echo(f"{e.name}: deleted (keeping the newest {keep})")
                for why in errors:  # left for the next round
                    typer.echo(f"dmsnap: not deleted: {why}", err=True)
        except UserError as e:
            typer.echo(f"dmsnap: {e.message}", err=True)
        done += 1
        if count == 0 or done < count:
            _time.sleep(period)


# ------------------------------------------------------------ status, daemon


@app.command()
def status(json_out: JsonOpt = False) -> None:
    """Summarise health (what is degraded and why), pools (space, journal,
    writecache), volumes, snapshots, exports and schedules."""
    st = _call("status")
    st = st if isinstance(st, dict) else {}
    problems = _status_problems(st)
    if json_out:
        # the daemon's status, with every problem found (exports, schedules too)
        print_json({**st, "degraded": bool(problems), "problems": problems})
        return
    n = len(problems)
    typer.echo(f"health: DEGRADED, {n} problem{'s' if n != 1 else ''}" if n else "health: ok")
    pools = [p for p in st.get("pools") or [] if isinstance(p, dict)]
    if pools:
        _print_pools(pools)
    else:
        typer.echo("no pools")
    snaps = st.get("snapshots")
    active = st.get("active_snapshots")
    typer.echo("")
    summary = (
        f"{len(pools)} pool{'s' if len(pools) != 1 else ''}, "
        f"{_count(st.get('volumes'))} volumes, {_count(snaps)} snapshots"
    )
    if active is not None:
        summary += f" ({active} active)"
    typer.echo(summary)
    pending = st.get("pending")
    if isinstance(pending, int) and pending:
        typer.echo(f"{pending} operation(s) pending recovery")
    for line in problems:
        typer.echo(f"warning: {line}")


def _status_problems(st: dict[str, Any]) -> list[str]:
    """Every problem an operator must see: the pools' (the daemon's health
    lines, else each pool's), exports not serving, schedules whose last
    attempt failed. A daemon that cannot list exports or schedules (an
    older one) leaves them out."""
    pools = [p for p in st.get("pools") or [] if isinstance(p, dict)]
    problems = st.get("health")
    if not isinstance(problems, list):
        problems = [f"{p.get('name')}: {h}" for p in pools for h in (p.get("health") or [])]
    problems = [str(x) for x in problems]
    try:
        exports = _call("export.list")
    except UserError:
        exports = []
    for ex in exports if isinstance(exports, list) else []:
        if isinstance(ex, dict) and (ex.get("error") or not ex.get("running", True)):
            why = ex.get("error") or "not running"
            problems.append(f"export {ex.get('ref')}: not serving: {why}")
    try:
        schedules = _call("schedule.list")
    except UserError:
        schedules = []
    for sch in schedules if isinstance(schedules, list) else []:
        if isinstance(sch, dict) and sch.get("last_error"):
            problems.append(f"schedule {sch.get('name')}: {sch.get('last_error')}")
    return problems


@daemon_app.command("ping")
def daemon_ping(json_out: JsonOpt = False) -> None:
    """Check that dmsnapd answers."""
    r = _call("daemon.ping")
    if json_out:
        print_json(r)
        return
    r = r if isinstance(r, dict) else {}
    typer.echo(
        f"dmsnapd {r.get('version', '?')} (pid {r.get('pid', '?')}, protocol "
        f"{r.get('protocol', '?')}) is running on {_session.socket_path}"
    )


@daemon_app.command("stop")
def daemon_stop(
    teardown: Annotated[
        bool,
        typer.Option("--teardown", help="Also deactivate every pool, volume and snapshot."),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Stop dmsnapd (devices stay up unless --teardown)."""
    _call("daemon.stop", teardown=teardown)
    if json_out:
        print_json({"stopping": True, "teardown": teardown})
        return
    typer.echo(
        "dmsnapd is stopping"
        + (" and tearing down every device" if teardown else " (devices stay up)")
    )


# ---------------------------------------------------------------------- dm


def _dm():
    from dmsnap.dm import DeviceMapper

    return DeviceMapper()


def _our_devices(dm: Any, include_all: bool) -> list[Any]:
    from dmsnap.dm import UUID_PREFIX

    entries = sorted(dm.list_devices(), key=lambda e: e.name)
    if include_all:
        return entries
    return [e for e in entries if (e.uuid or "").startswith(UUID_PREFIX)]


@dm_app.command("list")
def dm_list(
    json_out: JsonOpt = False,
    all_devices: Annotated[
        bool, typer.Option("--all", help="Include devices not made by dmsnap.")
    ] = False,
) -> None:
    """List device-mapper devices made by dmsnap."""
    with _dm() as dm:
        rows = []
        for e in _our_devices(dm, all_devices):
            info = dm.info(e.name)
            rows.append(
                {
                    "name": e.name,
                    "uuid": info.uuid,
                    "devno": info.devno,
                    "open_count": info.open_count,
                    "suspended": info.suspended,
                    "read_only": info.read_only,
                    "targets": [ln.target_type for ln in dm.status(e.name, noflush=True)],
                }
            )
    if json_out:
        print_json(rows)
        return
    print_table(
        ["NAME", "DEVNO", "OPEN", "STATE", "TARGETS", "UUID"],
        [
            [
                r["name"],
                r["devno"],
                r["open_count"],
                ("suspended" if r["suspended"] else "active") + (",ro" if r["read_only"] else ""),
                ",".join(r["targets"]),
                r["uuid"],
            ]
            for r in rows
        ],
    )


@dm_app.command("status")
def dm_status(
    names: Annotated[
        list[str] | None, typer.Argument(help="Devices (default: all of dmsnap's).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show table and parsed status of dmsnap's device-mapper devices."""
    with _dm() as dm:
        wanted = names or [e.name for e in _our_devices(dm, False)]
        out = []
        for name in wanted:
            table = dm.table(name)
            lines = dm.status(name, noflush=True)
            out.append(
                {
                    "name": name,
                    "table": table.render(),
                    "status": [ln.status for ln in lines],
                    "status_lines": [
                        f"{ln.start} {ln.length} {ln.target_type} {ln.params}".rstrip()
                        for ln in lines
                    ],
                }
            )
    if json_out:
        print_json(out)
        return
    for d in out:
        typer.echo(d["name"])
        for tl in d["table"].splitlines():
            typer.echo(f"  table   {tl}")
        for s in d["status"]:
            typer.echo(f"  status  {describe_status(s)}")


@app.command()
def version() -> None:
    """Print dmsnap's version (and the kernel's dm interface version if present)."""
    line = f"dmsnap {__version__}"
    if os.path.exists("/dev/mapper/control"):
        try:
            with _dm() as dm:
                line += " (device-mapper ioctl {}.{}.{})".format(*dm.version())
        except Exception as e:  # version must never fail because dm is odd
            line += f" (device-mapper: {e})"
    typer.echo(line)


def _usage_line(e: typer.TyperException) -> str:
    """A click usage error as one line, with where to find help."""
    msg = e.format_message().strip().replace("\n", " ")
    ctx = getattr(e, "ctx", None)
    if ctx is not None and getattr(e, "exit_code", 1) == 2:
        msg += f" (see '{ctx.command_path} --help')"
    return msg


def run(argv: list[str] | None = None, entry: Callable[..., Any] | None = None) -> int:
    """Run the CLI, mapping every expected failure to one line + exit code."""
    from dmsnap.dm import DmError
    from dmsnap.dm.targets import TableError

    try:
        rv = (entry or app)(args=argv, prog_name="dmsnap", standalone_mode=False)
    except CliError as e:
        typer.echo(f"dmsnap: {e}", err=True)
        return e.code
    except UserError as e:
        typer.echo(f"dmsnap: {e.message}", err=True)
        return e.exit_code
    except BadName as e:
        typer.echo(f"dmsnap: {e}", err=True)
        return InvalidArgument.exit_code
    except (DmError, TableError) as e:
        typer.echo(f"dmsnap: {e}", err=True)
        return 1
    except OSError as e:
        if e.errno == errno.EPIPE:  # `dmsnap snapshot list | head`: not an error to report
            return 1
        typer.echo(f"dmsnap: {e}", err=True)
        return 1
    except typer.Abort:
        typer.echo("dmsnap: aborted", err=True)
        return 130
    except SystemExit as e:  # shell completion and --install-completion exit this way
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except typer.TyperException as e:  # click's usage errors
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # type: ignore[attr-defined]  # the help text, as asked for
            return 2
        typer.echo(f"dmsnap: {_usage_line(e)}", err=True)
        return e.exit_code
    except Exception as e:
        typer.echo(f"dmsnap: internal error: {type(e).__name__}: {e}", err=True)
        return 70
    # Non-standalone click returns a typer.Exit's code, or the command's value.
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def main() -> None:
    sys.exit(run())


# `dmsnap schedule` lives in its own package (dmsnap.schedule); it is built
# on the helpers above, handed over rather than imported back.
app.add_typer(schedule_cli.build(sys.modules[__name__]), name="schedule")
# `dmsnap send`, `receive` and `replication` likewise (dmsnap.replication).
replication_cli.register(app, sys.modules[__name__])


def _reflow(doc: str) -> str:
    """A docstring as help: paragraphs stay, the line breaks that wrap them
    for the source go (typer's formatter keeps them after the first
    paragraph, which broke help mid-sentence at any terminal width)."""
    paras = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paras)


def _reflow_help(t: typer.Typer) -> None:
    for c in t.registered_commands:
        doc = c.help or (c.callback.__doc__ if c.callback else None)
        if doc:
            c.help = _reflow(doc)
    for g in t.registered_groups:
        if g.typer_instance is not None:
            _reflow_help(g.typer_instance)


_reflow_help(app)
