"""The structure docs/design.md describes, held against the code: no import
circle in the package, no backend-name branch outside the backends, the
SCSI codec free of the daemon, one place for the rules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "dmsnap"


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the dmsnap modules it imports (at run time: imports under
    ``if TYPE_CHECKING`` are left out)."""
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip |= {id(n) for b in node.body for n in ast.walk(b)}
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative
                    base = ".".join([*mod.split(".")[: -node.level], node.module])
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            deps |= {n for n in names if n in mods and n != mod}
        if path.name == "__init__.py":  # a package's face re-exports its own modules
            deps = {d for d in deps if not d.startswith(mod + ".")}
        out[mod] = deps
    return out


def test_no_module_imports_itself_back() -> None:
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d) :], d]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_backend_name_branch_outside_the_backends() -> None:
    backends = {"backend.py", "thin.py", "classic.py", "stack.py"}  # stack: the registry
    branch = re.compile(
        r"backend\s*[!=]=\s*[\"'](thin|classic)[\"']|isinstance\([^)]*(Thin|Classic)Backend"
    )
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in PKG.rglob("*.py")
        if p.name not in backends
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert found == []


def test_the_scsi_side_takes_its_rules_from_the_rules_module() -> None:
    graph = _imports()
    for mod in ("dmsnap.scsi.snapcmd", "dmsnap.scsi.initiator", "dmsnap.rules"):
        assert not {d for d in graph[mod] if d.startswith("dmsnap.daemon")}, mod
    assert graph["dmsnap.rules"] == set()  # import-light: initiator hosts load it


# What each layer may import (docs/design.md, "Layers"): package -> packages.
LAYERS = {
    "errors": set(),
    "rules": set(),
    "progress": set(),  # the reporting interface every layer may use
    "sizes": {"errors"},
    "units": {"rules"},
    "dm": {"errors"},
    "journal": {"errors", "progress"},
    "scsi": {"errors", "rules"},
    "storage": {"dm", "journal", "scsi", "rules", "units", "errors", "progress"},
    "schedule": {"storage", "rules", "errors"},
    "replication": {"storage", "journal", "rules", "units", "errors", "progress"},
    # the CLI's view of it: no storage, no daemon (a client host has neither)
    "cli_progress": {"sizes", "errors"},
    # the storage core only through a duck-typed read-only view the daemon hands in
    "metrics": {"errors"},
}


def test_each_layer_imports_only_the_layers_below_it() -> None:
    def top(mod: str) -> str:
        return mod.split(".")[1] if mod.count(".") else mod

    wrong = sorted(
        f"{m} -> {d}"
        for m, deps in _imports().items()
        if top(m) in LAYERS
        for d in deps
        if d != "dmsnap" and top(d) != top(m) and top(d) not in LAYERS[top(m)]
    )
    assert wrong == []


def test_the_progress_interface_is_a_leaf_and_the_daemon_stays_out_of_storage() -> None:
    """The storage core reports progress through dmsnap.progress only; the
    registry behind it (dmsnap.daemon.progress) is the daemon's."""
    graph = _imports()
    assert graph["dmsnap.progress"] == set()
    for mod, deps in graph.items():
        if mod.startswith(("dmsnap.storage", "dmsnap.journal", "dmsnap.replication")):
            assert not {d for d in deps if d.startswith("dmsnap.daemon")}, mod


def test_the_catalog_checks_the_rules_lists() -> None:
    """The catalog's CHECK constraints (SQL, kept as written for existing
    catalogs) name the same choices as dmsnap.rules."""
    from dmsnap import rules
    from dmsnap.storage import catalog

    sql = catalog.SCHEMA

    def choices(column: str) -> tuple[str, ...]:
        m = re.search(rf"{column} IN \(([^)]*)\)", sql)
        assert m, column
        return tuple(x.strip().strip("'") for x in m.group(1).split(","))

    assert choices("backend") == rules.BACKENDS
    assert choices("kind") == rules.EXPORT_KINDS
    assert choices("state") == tuple(catalog.MarkerState)


# The storage core's parts (docs/design.md, "The storage core"): what each
# may import of the others besides the ground every part stands on. The
# Manager composes them; none imports it back, and a new module must say
# here what it may use before the test lets it in.
STORAGE_GROUND = {
    "_common", "names", "catalog", "layers", "label", "loop", "devices", "identity", "backend",
}  # fmt: skip
STORAGE_PARTS: dict[str, set[str]] = {
    "thin": set(),
    "classic": set(),
    "stack": {"thin", "classic"},  # the backends' registry
    "pending": {"stack"},
    "journals": set(),
    "volume_io": set(),
    "inband": set(),  # the core's public methods only, handed in
    "exports": {"inband", "volume_io"},  # the core through its StorageCore protocol
    "views": {"stack", "journals", "inband"},
    "assembly": {"stack", "pending", "journals"},
    "policy": {"stack", "journals"},
    "snapshots": {"stack", "journals", "pending", "views"},
    "replica": {"stack", "pending", "journals"},  # replication's side of the core
}


def test_the_storage_parts_never_reach_back_into_the_manager() -> None:
    prefix = "dmsnap.storage."
    storage = {
        m.removeprefix(prefix): {d.removeprefix(prefix) for d in deps if d.startswith(prefix)}
        for m, deps in _imports().items()
        if m.startswith(prefix)
    }
    unlisted = set(storage) - STORAGE_GROUND - set(STORAGE_PARTS) - {"manager", "_loop_build"}
    assert unlisted == set(), "say in STORAGE_PARTS what these may import"
    allowed = {**{m: set() for m in STORAGE_GROUND}, **STORAGE_PARTS}
    wrong = sorted(
        f"{m} -> {d}" for m, ok in allowed.items() for d in storage[m] - ok - STORAGE_GROUND
    )
    assert wrong == []


def test_replication_reaches_the_storage_core_only_through_its_interface() -> None:
    """dmsnap.replication uses storage.replica (Manager.replicas), nothing
    else of the core: the Manager stays small and the core never learns
    about streams."""
    graph = _imports()
    wrong = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.startswith("dmsnap.replication")
        for d in deps
        if d.startswith("dmsnap.storage") and d != "dmsnap.storage.replica"
    )
    assert wrong == []
    assert not {
        d
        for m, deps in graph.items()
        if m.startswith("dmsnap.storage")
        for d in deps
        if d.startswith("dmsnap.replication")
    }
