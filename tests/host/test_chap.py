"""CHAP secrets: per initiator, one-way or mutual; read from a root-only
file or standard input, never argv; never logged by the daemon; kept by
dmsnapd in a file of mode 0600, not in the catalog (an older catalog's
secret is moved out). Logins with open-iscsi (right secret, wrong secret,
mutual) are tested in the VM: tests/kernel/test_scsi_iscsi.py::test_chap_logins."""

from __future__ import annotations

import io
import logging
import os
import stat
from pathlib import Path

import pytest
import test_cli
import test_daemon_protocol
from test_cli import run
from test_daemon_protocol import start_daemon, stop_daemon

from dmsnap import errors as E
from dmsnap.scsi import chap
from dmsnap.storage.manager import Manager

A = "iqn.2026-11.org.example:a"
B = "iqn.2026-11.org.example:b"
SECRET_A = "a-secret-0123"
SECRET_B = "b-secret-4567"
MUTUAL_B = "target-secret-89"
FILE = f"# who user secret [mutual]\n{A} ua {SECRET_A}\n\n{B} ub {SECRET_B} tb {MUTUAL_B}\n"


# the fixtures of the CLI and protocol harnesses
daemon = test_cli.daemon
nosock = test_cli.nosock
short_dir = test_daemon_protocol.short_dir


# -- the file ------------------------------------------------------------------------------


def test_parse_per_initiator_one_way_and_mutual() -> None:
    a, b = chap.parse(FILE, "f")
    assert (a.initiator, a.userid, a.secret, a.mutual) == (A, "ua", SECRET_A, False)
    assert (b.initiator, b.mutual_userid, b.mutual_secret, b.mode) == (B, "tb", MUTUAL_B, "mutual")
    assert SECRET_A not in repr(a) and MUTUAL_B not in repr(b)  # a stray log shows no secret


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (f"{A} ua short\n", "12 to 255 characters"),
        (f"{A} ua {SECRET_A} tb\n", "got 4 fields"),
        (f"{A} ua {SECRET_A} tb {SECRET_A}\n", "must differ"),
        ("# nothing\n", "no CHAP entry"),
        (f"{A} ua {SECRET_A}é\n", "printable ASCII"),
    ],
)
def test_bad_files_are_one_line_without_the_secret(text: str, fragment: str) -> None:
    with pytest.raises(chap.ChapError) as ei:
        chap.parse(text, "f")
    msg = str(ei.value)
    assert fragment in msg and "\n" not in msg and SECRET_A not in msg


def test_the_file_must_be_readable_by_its_owner_only(tmp_path: Path) -> None:
    f = tmp_path / "chap"
    f.write_text(FILE)
    f.chmod(0o644)
    with pytest.raises(chap.ChapError, match="chmod 600"):
        chap.read_file(str(f))
    f.chmod(0o600)
    assert chap.read_file(str(f)) == FILE
    link = tmp_path / "link"
    link.symlink_to(f)
    with pytest.raises(chap.ChapError):
        chap.read_file(str(link))


# -- the CLI: never argv -------------------------------------------------------------------


def test_cli_refuses_a_secret_on_the_command_line(capsys, nosock) -> None:
    rc, _, err = run(capsys, "export", "p/v", "--iscsi", "--allow", A, "--chap", "u:longsecret123")
    assert rc == 2 and "--chap-file" in err and "longsecret123" not in err


def test_cli_reads_the_chap_file_and_stdin(capsys, daemon, tmp_path, monkeypatch) -> None:
    _, fake = daemon
    f = tmp_path / "chap"
    f.write_text(FILE)
    f.chmod(0o600)
    rc, _, err = run(capsys, "export", "p/v", "--iscsi", "--chap-file", str(f))
    assert rc == 0, err
    kw = fake.calls[-1][2]
    assert kw["chap"] == [[A, "ua", SECRET_A], [B, "ub", SECRET_B, "tb", MUTUAL_B]]
    monkeypatch.setattr("sys.stdin", io.StringIO(FILE))
    rc, _, err = run(capsys, "export", "p/v", "--iscsi", "--allow", A, "--allow", B,
                     "--chap-file", "-")  # fmt: skip
    assert rc == 0, err
    assert fake.calls[-1][2]["chap"][1][4] == MUTUAL_B
    f.chmod(0o640)
    n = len(fake.calls)
    rc, _, err = run(capsys, "export", "p/v", "--iscsi", "--chap-file", str(f))
    assert rc == 2 and "chmod 600" in err and len(fake.calls) == n


# -- the daemon never logs a secret ---------------------------------------------------------


def test_daemon_does_not_log_chap_secrets(short_dir: Path, caplog) -> None:
    d = start_daemon(short_dir / "d.sock")
    try:
        with caplog.at_level(logging.DEBUG), d.client() as c:
            entries = [e.to_wire() for e in chap.parse(FILE, "f")]
            c.call("export.create", pool="p", vol="v", kind="iscsi", chap=entries)
            with pytest.raises(E.UserError):  # a refused one is logged too
                c.call("export.create", pool="p", vol="v", kind="iscsi",
                       chap=[[A, "ua", SECRET_A, "tb"]])  # fmt: skip
    finally:
        stop_daemon(d)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "export.create" in logged
    for secret in (SECRET_A, SECRET_B, MUTUAL_B):
        assert secret not in logged


# -- where dmsnapd keeps them ------------------------------------------------------------


def _catalog_bytes(m: Manager) -> bytes:
    out = b""
    for name in os.listdir(m.state_dir):
        if name.startswith("catalog.db"):
            out += (Path(m.state_dir) / name).read_bytes()
    return out


def test_secrets_are_kept_in_a_0600_file_not_the_catalog(manager: Manager) -> None:
    creds = chap.parse(FILE, "f")
    path = manager.exports._save_chap("ser1", creds)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert manager.exports._load_chap("ser1") == {c.initiator: c for c in creds}
    assert SECRET_A.encode() not in _catalog_bytes(manager)
    manager.exports.drop_chap("ser1")
    assert not os.path.exists(path)


def test_chap_names_the_initiators_that_may_log_in(manager: Manager) -> None:
    wire = [e.to_wire() for e in chap.parse(FILE, "f")]
    with pytest.raises(E.InvalidArgument, match=f"{B} has a CHAP line but is not in --allow"):
        manager.export_create("p", "v", kind="iscsi", allow=[A], chap=wire)
    with pytest.raises(E.InvalidArgument, match=f"{B} is in --allow but has no CHAP line"):
        manager.export_create("p", "v", kind="iscsi", allow=[A, B], chap=wire[:1])
    with pytest.raises(E.InvalidArgument, match="'\\*'"):
        manager.export_create("p", "v", kind="iscsi", allow_any=True, chap=wire)
    assert manager.catalog.exports() == []


def test_an_older_catalog_secret_moves_to_the_file(manager: Manager, caplog) -> None:
    p = manager.catalog.pool("p")
    v = manager.catalog.volume("p", "v")
    cfg = {"iqn": "iqn.2026-11.x:t", "portal": "0.0.0.0:3260", "allow": [A, B],
           "chap": ["olduser", "old-secret-123"]}  # fmt: skip
    ex = manager.catalog.add_export(p.id, v.id, None, "iscsi", "ser9", cfg)
    with caplog.at_level(logging.WARNING, logger="dmsnap.storage"):
        ex, creds = manager.exports._chap_of(ex)
    assert set(creds) == {A, B} and creds[A].secret == "old-secret-123"
    assert ex.config["chap"] == {A: "one-way", B: "one-way"}
    (row,) = manager.catalog.exports()
    assert "old-secret-123" not in repr(row.config)
    assert manager.exports._load_chap("ser9")[B].userid == "olduser"
    assert not any("old-secret-123" in r.getMessage() for r in caplog.records)
    assert any("moved" in r.getMessage() for r in caplog.records)
    # shown as who has CHAP, never the secret
    (j,) = manager.export_list()
    assert j["chap"] == {A: "one-way", B: "one-way"}
