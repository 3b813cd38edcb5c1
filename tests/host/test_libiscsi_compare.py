"""The libiscsi conformance suite's judgement (tests/kernel/test_libiscsi.py),
without the kernel: iscsi-test-cu's CUnit output parsed per test, and each
test on dmsnap compared with the same test on the reference target (LIO's
iblock)."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "kernel")]

from scsi_util import CuTest, compare_to_reference, parse_cunit  # noqa: E402

# iscsi-test-cu 1.19's verbose output, shortened
OUTPUT = """
     CUnit - A unit testing framework for C - Version 2.1-3

Suite: WriteSame10
  Test: Simple ...passed
  Test: ZeroBlocks ...    [SKIPPED] WRITESAME10 does not support 0-blocks.
passed
  Test: Unmap ...FAILED
    1. test_writesame10_unmap.c:80  - CU_ASSERT_EQUAL(ret,0)
  Test: UnmapVPD ...passed

Run Summary:    Type  Total    Ran Passed Failed Inactive
              suites      1      1    n/a      0        0
               tests      5      4      3      1        0
"""


def test_cunit_output_parsed_per_test():
    tests, summary = parse_cunit(OUTPUT)
    got = {name: (t.outcome, t.why) for (_, name), t in tests.items()}
    assert got == {
        "Simple": ("passed", ""),
        "ZeroBlocks": ("skipped", "WRITESAME10 does not support 0-blocks."),
        "Unmap": ("failed", "1. test_writesame10_unmap.c:80  - CU_ASSERT_EQUAL(ret,0)"),
        "UnmapVPD": ("passed", ""),
    }
    assert summary == (5, 4, 3, 1, 0)


def _pairs(*rows: tuple[str, str, str]) -> dict[tuple[str, str], tuple[CuTest, CuTest]]:
    return {("S", n): (CuTest("S", n, d), CuTest("S", n, r)) for n, d, r in rows}


def test_worse_than_the_reference_is_a_defect():
    defects, stale = compare_to_reference(
        _pairs(
            ("failsWherePasses", "failed", "passed"),
            ("failsWhereSkipped", "failed", "skipped"),
            ("missingWherePasses", "missing", "passed"),
            ("timeoutWherePasses", "timeout", "passed"),
            ("skipsWherePasses", "skipped", "passed"),
        ),
        known=set(),
    )
    assert [d.split(":")[0] for d in defects] == [
        "S.failsWherePasses",
        "S.failsWhereSkipped",
        "S.missingWherePasses",
        "S.skipsWherePasses",
        "S.timeoutWherePasses",
    ]
    assert stale == []


def test_alike_or_better_is_not_a_defect():
    defects, stale = compare_to_reference(
        _pairs(
            ("bothFail", "failed", "failed"),
            ("bothSkip", "skipped", "skipped"),
            ("skipsWhereFails", "skipped", "failed"),
            ("passesWhereSkipped", "passed", "skipped"),
            ("passesWhereFails", "passed", "failed"),
        ),
        known=set(),
    )
    assert defects == [] and stale == []


def test_known_entries_excuse_and_go_stale_when_fixed():
    pairs = _pairs(("known", "failed", "passed"), ("fixed", "passed", "passed"))
    defects, stale = compare_to_reference(pairs, known={("S", "known"), ("S", "fixed")})
    assert defects == []
    assert stale == ["S.fixed: listed as known, but it passes now"]
