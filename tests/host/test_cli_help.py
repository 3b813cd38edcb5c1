"""Help reads well in a terminal: a paragraph of a command's help is one
flowing text, wrapped to the terminal, not broken where the source
wrapped its docstring."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _help(*cmd: str, columns: int = 200) -> str:
    env = dict(os.environ, COLUMNS=str(columns), TERM="dumb", NO_COLOR="1")
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from dmsnap.cli import run; sys.exit(run())",
            *cmd,
            "--help",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize(
    ("cmd", "sentence"),
    [
        (
            ("snapshot", "create"),
            "the command returns once that point is durable and the snapshot follows",
        ),
        (("export",), "An iSCSI export admits only the --allow initiators"),
    ],
)
def test_help_paragraphs_flow_as_one_line_in_a_wide_terminal(cmd, sentence) -> None:
    lines = [ln.strip(" │") for ln in _help(*cmd).splitlines()]
    assert any(sentence in ln for ln in lines), "\n".join(lines)
