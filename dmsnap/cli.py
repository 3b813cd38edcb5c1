"""The ``dmsnap`` command line.

Errors are one line on stderr and a non-zero exit code, never a traceback.
Every listing has ``--json``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any

import typer

from dmsnap import __version__

app = typer.Typer(
    help="dmsnap: exact point-in-time snapshots for Linux block storage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
dm_app = typer.Typer(help="Low-level view of dmsnap's device-mapper devices.", no_args_is_help=True)
app.add_typer(dm_app, name="dm")


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class CliError(Exception):
    """An error to print as one line; exit code 1 (2 for usage)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        d = {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        d.setdefault("type", type(obj).__name__)
        return d
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return obj


def print_json(obj: Any) -> None:
    json.dump(_jsonable(obj), sys.stdout, indent=2, sort_keys=True)
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
        parts.append(f"{f.name}={_jsonable(v)}")
    for prop in ("data_used_fraction", "metadata_used_fraction"):
        if hasattr(status, prop):
            parts.append(f"{prop.removesuffix('_fraction')}={getattr(status, prop):.1%}")
    return f"{type(status).__name__}: " + " ".join(parts)


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


def run(argv: list[str] | None = None, entry: Callable[..., Any] | None = None) -> int:
    """Run the CLI, mapping every expected failure to one line + exit code."""
    from dmsnap.dm import DmError
    from dmsnap.dm.targets import TableError

    try:
        (entry or app)(args=argv, prog_name="dmsnap", standalone_mode=False)
    except CliError as e:
        typer.echo(f"dmsnap: {e}", err=True)
        return e.code
    except (DmError, TableError, OSError) as e:
        typer.echo(f"dmsnap: {e}", err=True)
        return 1
    except typer.Abort:
        typer.echo("dmsnap: aborted", err=True)
        return 130
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.Exit):
            return e.exit_code
        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        typer.echo(f"dmsnap: internal error: {type(e).__name__}: {e}", err=True)
        return 70
    return 0


def main() -> None:
    sys.exit(run())
