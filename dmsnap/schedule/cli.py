"""``dmsnap schedule ...``: the CLI of target-side schedules (docs/cli.md,
docs/schedules.md). :func:`build` makes the sub-app; :mod:`dmsnap.cli`
calls it with itself (its request and rendering helpers), so this module
never imports the CLI back. The requests go to dmsnapd like every storage
command's."""

import datetime as dt
from types import ModuleType
from typing import Annotated, Any

import typer

from dmsnap.errors import InvalidArgument
from dmsnap.schedule import spec

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The schedule's name.")]


def _count_opt(flag: str, what: str) -> Any:
    return typer.Option(
        flag, metavar="N", help=f"Keep the first snapshot of each of the {what} that have one."
    )


def _utc(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _state(s: dict[str, Any]) -> str:
    if s.get("paused"):
        return "paused"
    return "error" if s.get("last_error") else "active"


HEADERS = ("NAME", "VOLUMES", "WHEN", "KEEPS", "STATE", "LAST RUN", "NEXT RUN (UTC)", "SNAPS")


def _row(s: dict[str, Any]) -> list[object]:
    return [
        s["name"],
        ",".join(s["volumes"]),
        s["when"],
        s["keeps"],
        _state(s),
        _utc(s.get("last_run")),
        _utc(s.get("next_run")),
        s.get("snapshot_count", len(s.get("snapshots", []))),
    ]


def build(ui: ModuleType) -> typer.Typer:
    """The ``schedule`` sub-app, on ``ui`` (:mod:`dmsnap.cli`): its ``_call``,
    ``_ref``, ``_name``, ``print_*``, ``JsonOpt`` and completions."""
    schedule_app = typer.Typer(
        help="Snapshots taken by dmsnapd on a schedule, thinned by a retention policy.",
        no_args_is_help=True,
    )

    @schedule_app.command("create")
    def schedule_create(
        name: NameArg,
        volumes: Annotated[
            str,
            typer.Option(
                "--volumes",
                metavar="POOL/VOL[,POOL/VOL...]",
                help="Volumes of one pool, snapshotted together (one cut) at each run.",
                autocompletion=ui.complete_volumes,
            ),
        ],
        every: Annotated[
            str | None,
            typer.Option("--every", metavar="DURATION", help="e.g. 30s, 15m, 1h, 1d, 1w, 1h30m."),
        ] = None,
        calendar: Annotated[
            str | None,
            typer.Option(
                "--calendar",
                metavar="SPEC",
                help="hourly, daily, weekly, monthly, yearly, '*-*-* 02:00', "
                "'Mon..Fri 08..18:00', '*:0/15' (docs/schedules.md).",
            ),
        ] = None,
        tz: Annotated[
            str,
            typer.Option(
                "--tz", metavar="ZONE", help="IANA time zone of --calendar and of the periods."
            ),
        ] = "UTC",
        keep_hourly: Annotated[int | None, _count_opt("--keep-hourly", "newest N hours")] = None,
        keep_daily: Annotated[int | None, _count_opt("--keep-daily", "newest N days")] = None,
        keep_weekly: Annotated[int | None, _count_opt("--keep-weekly", "newest N weeks")] = None,
        keep_monthly: Annotated[int | None, _count_opt("--keep-monthly", "newest N months")] = None,
        keep_yearly: Annotated[int | None, _count_opt("--keep-yearly", "newest N years")] = None,
        keep: Annotated[
            int | None,
            typer.Option("--keep", metavar="N", help="Keep the newest N snapshots."),
        ] = None,
        min_free: Annotated[
            int | None,
            typer.Option(
                "--min-free",
                metavar="PCT",
                help="Below PCT percent free pool data or metadata, delete this schedule's "
                "oldest first.",
            ),
        ] = None,
        json_out: ui.JsonOpt = False,
    ) -> None:
        """Create a schedule. Without any --keep* it keeps every snapshot it makes."""
        refs: list[list[str]] = []
        for text in volumes.split(","):
            pool, vol, _ = ui._ref(text.strip(), snapshot=False)
            if [pool, vol] in refs:
                raise InvalidArgument(f"volume {pool}/{vol} is named twice")
            refs.append([pool, vol])
        ui._name("schedule", name)
        try:  # the same checks dmsnapd makes, before connecting
            when = spec.Schedule.make(every=every, calendar=calendar, tz=tz)
        except spec.SpecError as e:
            raise InvalidArgument(str(e)) from None
        counts = {
            "--keep-hourly": keep_hourly,
            "--keep-daily": keep_daily,
            "--keep-weekly": keep_weekly,
            "--keep-monthly": keep_monthly,
            "--keep-yearly": keep_yearly,
            "--keep": keep,
        }
        for flag, v in counts.items():
            if v is not None and v < 1:
                raise InvalidArgument(f"{flag} {v}: expected a count >= 1 (omit it for none)")
        if min_free is not None and not 1 <= min_free <= 99:
            raise InvalidArgument(f"--min-free {min_free}: expected a percent from 1 to 99")
        result = ui._call(
            "schedule.create",
            name=name,
            refs=refs,
            every=when.every,
            calendar=calendar,
            tz=tz,
            keep_hourly=keep_hourly,
            keep_daily=keep_daily,
            keep_weekly=keep_weekly,
            keep_monthly=keep_monthly,
            keep_yearly=keep_yearly,
            keep=keep,
            min_free=min_free,
        )
        if json_out:
            ui.print_json(result)
            return
        typer.echo(
            f"created schedule {name}: {result['when']} of {', '.join(result['volumes'])}; "
            f"keeps {result['keeps']}; next run {_utc(result.get('next_run'))}"
        )

    @schedule_app.command("list")
    def schedule_list(json_out: ui.JsonOpt = False) -> None:
        """List the schedules."""
        rows = ui._call("schedule.list")
        if json_out:
            ui.print_json(rows)
        elif not rows:
            typer.echo("no schedules")
        else:
            ui.print_table(HEADERS, [_row(s) for s in rows])

    @schedule_app.command("show")
    def schedule_show(name: NameArg, json_out: ui.JsonOpt = False) -> None:
        """A schedule, its state and the snapshots it made (and why each is kept)."""
        s = ui._call("schedule.show", name=ui._name("schedule", name))
        if json_out:
            ui.print_json(s)
            return
        ui.print_kv(
            [
                ("name", s["name"]),
                ("volumes", ", ".join(s["volumes"])),
                ("when", s["when"]),
                ("keeps", s["keeps"]),
                ("state", _state(s)),
                ("runs", f"{s['runs']} ({s['failures']} failed)"),
                ("last run", _utc(s.get("last_run"))),
                ("next run", _utc(s.get("next_run"))),
                ("last error", s.get("last_error") or "-"),
            ]
        )
        snaps = s.get("snapshots") or []
        if snaps:
            typer.echo("")
            ui.print_table(
                ("SNAPSHOT", "CREATED (UTC)", "KEPT BY"),
                [
                    [x["name"], _utc(x["created"]), ",".join(x["kept_by"] + ["held"] * x["held"])]
                    for x in snaps
                ],
            )

    def _simple(op: str, verb: str) -> Any:
        def command(name: NameArg, json_out: ui.JsonOpt = False) -> None:
            result = ui._call(op, name=ui._name("schedule", name))
            if json_out:
                ui.print_json(result)
            elif op == "schedule.delete":
                typer.echo(
                    f"deleted schedule {name} (its {result['snapshots_kept']} snapshot(s) stay, "
                    "no longer pruned)"
                )
            else:
                typer.echo(f"{verb} schedule {name}")

        return command

    schedule_app.command("pause", help="Stop taking and pruning snapshots until resumed.")(
        _simple("schedule.pause", "paused")
    )
    schedule_app.command(
        "resume", help="Take snapshots again from the next slot (missed slots are not caught up)."
    )(_simple("schedule.resume", "resumed"))
    schedule_app.command("delete", help="Delete a schedule; the snapshots it made stay.")(
        _simple("schedule.delete", "deleted")
    )

    return schedule_app
