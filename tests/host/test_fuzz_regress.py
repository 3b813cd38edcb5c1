"""Inputs that crashed a fuzz target (tools/torture fuzz) stay fixed: each C
target is built with gcc, AddressSanitizer and UBSan as a plain program
(tests/torture/fuzz/standalone.c) and fed every file of
tests/torture/regress/TARGET/ and of its seed corpus."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "tests" / "torture" / "fuzz"
TARGETS = {
    "journal": [FUZZ / "journal_fuzz.c", ROOT / "csrc" / "journal.c", ROOT / "csrc" / "crc32c.c"],
    "tcmu": [FUZZ / "tcmu_fuzz.c", ROOT / "csrc" / "journal.c", ROOT / "csrc" / "crc32c.c"],
}

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def _build(target: str, out: Path) -> Path:
    exe = out / f"{target}_regress"
    cmd = [
        "gcc", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer", "-pthread", f"-I{ROOT / 'csrc'}",
        *map(str, TARGETS[target]), str(FUZZ / "standalone.c"), "-o", str(exe),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"building {target} failed:\n{r.stderr[-4000:]}"
    return exe


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_inputs_that_crashed_stay_fixed(target: str, tmp_path: Path) -> None:
    files = sorted(
        p
        for d in ("regress", "corpus")
        for p in (ROOT / "tests" / "torture" / d / target).glob("*")
        if p.is_file()
    )
    assert files, f"no inputs for {target}"
    exe = _build(target, tmp_path)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0")
    r = subprocess.run(
        [str(exe), *map(str, files)], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, f"{target} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert r.stdout.count("ok ") == len(files)


def test_scsi_fuzz_inputs_stay_answered_well() -> None:
    """The Python target's seeds and every input it ever failed on replay
    through the same checks in this process (no atheris needed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scsi_fuzz", FUZZ / "scsi_fuzz.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    files = sorted(
        p
        for d in ("regress", "corpus")
        for p in (ROOT / "tests" / "torture" / d / "scsi").glob("*")
        if p.is_file()
    )
    assert len(files) >= 100, "the scsi seed corpus is missing"
    for f in files:
        mod.one_input(f.read_bytes())
