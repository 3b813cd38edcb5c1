"""docs/cli.md and the CLI agree: every command and option the reference
shows exists, and every command and option the CLI has is shown there
(issue 21: the reference had drifted from the code)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from dmsnap import cli

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])")


def documented() -> dict[tuple[str, ...], set[str]]:
    """Synopsis lines of the reference's code blocks: `dmsnap CMD... ARGS`,
    continued on indented lines."""
    out: dict[tuple[str, ...], set[str]] = {}
    in_code, current = False, None
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            in_code, current = not in_code, None
            continue
        if not in_code:
            continue
        if line.startswith("dmsnap "):
            words = line.split()[1:]
            path: list[str] = []
            alternatives = [""]
            for w in words:
                if re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", w):
                    *head, last = w.split("|") if "|" in w else [w]
                    if head:  # `dm list|status`: one synopsis, two commands
                        alternatives = [*head, last]
                        break
                    path.append(w)
                else:
                    break
            paths = [tuple([*path, a] if a else path) for a in alternatives]
            current = paths[0]
            for p in paths:
                out.setdefault(p, set()).update(OPTION.findall(line.split(" -- ")[0]))
        elif current is not None and line.startswith((" ", "\t")) and "#" not in line[:4]:
            out[current].update(OPTION.findall(line))
        else:
            current = None
    return out


def implemented() -> dict[tuple[str, ...], list[set[str]]]:
    """Each command's options, each as the set of its spellings."""
    out: dict[tuple[str, ...], list[set[str]]] = {}

    def walk(cmd: Any, path: tuple[str, ...]) -> None:
        if hasattr(cmd, "commands"):  # a group (typer vendors click)
            default = getattr(cmd, "DEFAULT", None)  # reached by the group's own name
            for name, sub in cmd.commands.items():
                walk(sub, path if name == default else (*path, name))
            return
        out[path] = [
            {*p.opts, *p.secondary_opts}
            for p in cmd.params
            if p.param_type_name == "option" and p.name != "help" and not p.hidden
        ]

    root = typer.main.get_command(cli.app)
    walk(root, ())
    # the global options (`dmsnap [--socket PATH] ... COMMAND`)
    out[()] = [
        {*p.opts, *p.secondary_opts}
        for p in root.params
        if p.param_type_name == "option" and p.name != "help" and not p.hidden
    ]
    return out


def test_every_documented_command_and_option_exists() -> None:
    code = implemented()
    missing = []
    for path, opts in documented().items():
        if path not in code:
            missing.append(" ".join(path))
            continue
        spellings = set().union(*code[path]) if code[path] else set()
        missing += [f"{' '.join(path)} {o}" for o in sorted(opts - spellings)]
    assert missing == []


def test_every_command_and_option_is_documented() -> None:
    doc = documented()
    missing = []
    for path, options in implemented().items():
        if path not in doc:
            missing.append(" ".join(path))
            continue
        missing += [f"{' '.join(path)} {'/'.join(sorted(o))}" for o in options if not o & doc[path]]
    assert missing == []


def test_dmsnapd_options_match_its_reference() -> None:
    """docs/cli.md's `dmsnapd` synopsis names every option dmsnapd has, and
    no other."""
    from dmsnap.daemon.main import build_parser

    have = {o for a in build_parser()._actions for o in a.option_strings} - {"-h", "--help"}
    shown: set[str] = set()
    in_code = in_synopsis = False
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            in_code, in_synopsis = not in_code, False
        elif in_code and line.startswith("dmsnapd "):
            in_synopsis = True
            shown |= set(OPTION.findall(line))
        elif in_code and in_synopsis and line.startswith(" "):
            shown |= set(OPTION.findall(line))
        else:
            in_synopsis = False
    assert shown == have
