"""The per-family table of a libiscsi conformance run
(tests/kernel/test_libiscsi.py with DMSNAP_LIBISCSI_OUT=DIR): tests run /
passed / failed / skipped on dmsnap and on iblock, the seconds each took,
and every test whose outcome differs between the two.

    python tests/torture/libiscsi_report.py DIR [--expect N]

--expect N: exit 1 unless DIR holds N families (a share that did not run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cell(c: dict[str, int]) -> str:
    return f"{c['run']} / {c['passed']} / {c['failed']} / {c['skipped']}"


def report(records: list[dict]) -> str:
    lines = [
        "| family | dmsnap run / passed / failed / skipped | iblock run / passed / failed "
        "/ skipped | seconds (dmsnap, iblock) |",
        "|---|---|---|---|",
    ]
    tot = {k: {"run": 0, "passed": 0, "failed": 0, "skipped": 0} for k in ("dmsnap", "iblock")}
    secs = {"dmsnap": 0.0, "iblock": 0.0}
    diffs = []
    for r in records:
        c = r["counts"]
        for k in tot:
            for n in tot[k]:
                tot[k][n] += c[k][n]
            secs[k] += r["seconds"][k]
        lines.append(
            f"| {r['family']} | {_cell(c['dmsnap'])} | {_cell(c['iblock'])} "
            f"| {r['seconds']['dmsnap']:.0f}, {r['seconds']['iblock']:.0f} |"
        )
        suite = r["family"].split(".")[1]
        for t, o in r["tests"].items():
            if o["dmsnap"][0] != o["iblock"][0]:
                diffs.append(f"* {suite}.{t}: dmsnap {o['dmsnap'][0]}, iblock {o['iblock'][0]}")
    lines.append(
        f"| **all {len(records)}** | {_cell(tot['dmsnap'])} | {_cell(tot['iblock'])} "
        f"| {secs['dmsnap']:.0f}, {secs['iblock']:.0f} |"
    )
    return "\n".join([*lines, "", "Tests whose outcome differs:", *diffs])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--expect", type=int, default=0)
    a = ap.parse_args()
    records = [json.loads(p.read_text()) for p in sorted(a.dir.glob("*.json"))]
    print(report(records))
    if a.expect and len(records) != a.expect:
        print(f"libiscsi_report: {len(records)} families in {a.dir}, {a.expect} expected")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
