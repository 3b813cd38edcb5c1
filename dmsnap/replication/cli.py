"""``dmsnap send``, ``dmsnap receive`` and ``dmsnap replication ...``: the
CLI of replication (docs/cli.md, docs/replication.md). :func:`register`
adds them to the app; :mod:`dmsnap.cli` calls it with itself (its request
and rendering helpers), so this module never imports the CLI back.

The stream is not carried in the control protocol: the CLI hands its own
stdout (send) or stdin (receive) to dmsnapd with the request (SCM_RIGHTS)
and dmsnapd writes or reads it there, so these compose with any pipe
(``dmsnap send ... | ssh host dmsnap receive ...``)."""

import os
import stat
import sys
from types import ModuleType
from typing import Annotated

import typer

from dmsnap.errors import InvalidArgument


def _stream_fd(fd: int, writing: bool) -> int:
    """A file or pipe, never a terminal: a stream is binary."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise InvalidArgument(f"{'stdout' if writing else 'stdin'} is closed") from None
    if os.isatty(fd):
        if writing:
            raise InvalidArgument(
                "not writing a binary stream to a terminal: redirect stdout to a file or a pipe"
            )
        raise InvalidArgument("receive reads a stream from stdin: redirect a file or a pipe")
    if stat.S_ISDIR(mode):
        raise InvalidArgument("a stream cannot be a directory")
    return fd


def register(app: typer.Typer, ui: ModuleType) -> None:
    """``send`` and ``receive`` on ``app``, and the ``replication`` sub-app,
    built on ``ui`` (:mod:`dmsnap.cli`): ``_call``, ``_call_fds``, ``_ref``,
    ``_name``, ``print_json``, ``print_table``, ``JsonOpt``, completions."""

    @app.command("send")
    def send(
        ref: Annotated[
            str,
            typer.Argument(
                metavar="POOL/VOL@SNAP",
                help="The snapshot to send.",
                autocompletion=ui.complete_snapshot,
            ),
        ],
        base: Annotated[
            str | None,
            typer.Option(
                "--from",
                metavar="SNAP",
                help="Send only what changed since this older snapshot of the volume "
                "(an incremental; the receiver must have it as its newest snapshot).",
            ),
        ] = None,
        resume: Annotated[
            str | None,
            typer.Option(
                "--resume",
                metavar="TOKEN",
                help="Send only what an interrupted receive lacks (the token "
                "`dmsnap receive POOL/VOL --token` prints on the receiver).",
            ),
        ] = None,
    ) -> None:
        """Write a replication stream of a snapshot to stdout (a file or a pipe)."""
        pool, vol, snap = ui._ref(ref, snapshot=True)
        if snap is None:
            raise InvalidArgument(f"{ref}: name the snapshot to send (POOL/VOL@SNAP)")
        if base is not None:
            base = ui._name("snapshot", base)
        sys.stdout.flush()
        fd = _stream_fd(sys.stdout.fileno(), writing=True)
        ui._call_fds(
            "replication.send", [fd], pool=pool, vol=vol, snap=snap, base=base, resume=resume
        )

    @app.command("receive")
    def receive(
        ref: Annotated[
            str,
            typer.Argument(
                metavar="POOL/VOL",
                help="The volume the stream goes into (a full stream creates it).",
                autocompletion=ui.complete_volume,
            ),
        ],
        force: Annotated[
            bool,
            typer.Option(
                "--force",
                help="Roll the volume back to the stream's base first if it was written "
                "since (those writes are lost).",
            ),
        ] = False,
        token: Annotated[
            bool,
            typer.Option(
                "--token",
                help="Read no stream: print the resume token of an interrupted receive "
                "into POOL/VOL (nothing if there is none).",
            ),
        ] = False,
        abort: Annotated[
            bool,
            typer.Option("--abort", help="Read no stream: discard an interrupted receive."),
        ] = False,
        json_out: ui.JsonOpt = False,
    ) -> None:
        """Apply a replication stream from stdin to a volume; the received
        snapshot appears only once the whole stream is in and checked."""
        pool, vol, _ = ui._ref(ref, snapshot=False)
        if token and abort:
            raise InvalidArgument("--token and --abort exclude each other")
        if token:
            result = ui._call("replication.state", pool=pool, vol=vol)
            if json_out:
                ui.print_json(result)
            elif result.get("token"):
                typer.echo(result["token"])
            return
        if abort:
            result = ui._call("replication.abort", pool=pool, vol=vol)
            if json_out:
                ui.print_json(result)
            else:
                typer.echo(f"discarded the interrupted receive of {result['aborted']} into {ref}")
            return
        fd = _stream_fd(sys.stdin.fileno(), writing=False)
        result = ui._call_fds("replication.receive", [fd], pool=pool, vol=vol, force=force or None)
        if json_out:
            ui.print_json(result)
        else:
            typer.echo(f"received {result['pool']}/{result['volume']}@{result['snapshot']}")

    repl = typer.Typer(
        help="Replication between dmsnap hosts: the snapshots targets hold.",
        no_args_is_help=True,
    )
    app.add_typer(repl, name="replication")

    TargetOpt = Annotated[
        str,
        typer.Option(
            "--target", metavar="NAME", help="The replication target (e.g. its host name)."
        ),
    ]

    @repl.command("hold")
    def hold(
        ref: Annotated[
            str,
            typer.Argument(metavar="POOL/VOL@SNAP", autocompletion=ui.complete_snapshot),
        ],
        target: TargetOpt,
        json_out: ui.JsonOpt = False,
    ) -> None:
        """Record that TARGET received this snapshot completely: it is kept
        (delete and retention refuse it) as TARGET's next base, and TARGET's
        previous hold on the volume goes."""
        pool, vol, snap = ui._ref(ref, snapshot=True)
        if snap is None:
            raise InvalidArgument(f"{ref}: name the snapshot (POOL/VOL@SNAP)")
        result = ui._call("replication.hold", pool=pool, vol=vol, snap=snap, target=target)
        if json_out:
            ui.print_json(result)
        else:
            typer.echo(f"{ref} held for {target}")

    @repl.command("release")
    def release(
        ref: Annotated[str, typer.Argument(metavar="POOL/VOL", autocompletion=ui.complete_volume)],
        target: TargetOpt,
        json_out: ui.JsonOpt = False,
    ) -> None:
        """Drop TARGET's hold on the volume (a target no longer replicated to)."""
        pool, vol, _ = ui._ref(ref, snapshot=False)
        result = ui._call("replication.release", pool=pool, vol=vol, target=target)
        if json_out:
            ui.print_json(result)
        else:
            typer.echo(f"released {target}'s hold on {ref}")

    @repl.command("holds")
    def holds(
        ref: Annotated[str, typer.Argument(metavar="POOL/VOL", autocompletion=ui.complete_volume)],
        json_out: ui.JsonOpt = False,
    ) -> None:
        """The snapshots of a volume that replication targets hold."""
        pool, vol, _ = ui._ref(ref, snapshot=False)
        result = ui._call("replication.holds", pool=pool, vol=vol)
        if json_out:
            ui.print_json(result)
            return
        ui.print_table(
            ["SNAPSHOT", "TARGET", "UUID"],
            [[h["snapshot"], h["target"], h["uuid"]] for h in result],
        )
