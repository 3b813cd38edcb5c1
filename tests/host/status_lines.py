"""The real dm table and status lines recorded in the 6.1 VM
(data/status_lines.txt: label, target type, "table" or "status", the line),
shared by the table and status tests (no tests in here)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

DATA = Path(__file__).parent / "data" / "status_lines.txt"


class Row(NamedTuple):
    label: str
    target_type: str
    kind: str
    line: str

    @property
    def params(self) -> str:
        parts = self.line.split(" ", 3)
        return parts[3] if len(parts) > 3 else ""


def rows(kind: str) -> list[Row]:
    """Every recorded row of ``kind`` ("table" or "status")."""
    out = []
    for raw in DATA.read_text().splitlines():
        if raw and not raw.startswith("#"):
            r = Row(*raw.split("\t"))
            if r.kind == kind:
                out.append(r)
    return out
