"""Who may log in to an iSCSI export, decided before LIO is asked: closed
by default (an ACL per initiator, as targetcli does), open to every
initiator only when asked with --allow-any, and an export written before
that rule (no ACL, no flag) restored as --allow-any with a warning. The
LIO side (a login refused to an initiator not listed) is tested in the VM
(tests/kernel/test_scsi_iscsi.py::test_chap_logins)."""

from __future__ import annotations

import logging

import pytest

from dmsnap import errors as E
from dmsnap.storage.manager import Manager

A = "iqn.2026-11.org.example:a"


def test_iscsi_export_without_allow_is_refused_and_changes_nothing(manager: Manager) -> None:
    with pytest.raises(E.InvalidArgument) as ei:
        manager.export_create("p", "v", kind="iscsi")
    msg = ei.value.message
    assert "--allow" in msg and "--allow-any" in msg and "\n" not in msg
    assert manager.catalog.exports() == []


def test_allow_any_and_allow_together_are_refused(manager: Manager) -> None:
    with pytest.raises(E.InvalidArgument, match="--allow-any or --allow"):
        manager.export_create("p", "v", kind="iscsi", allow=[A], allow_any=True)
    with pytest.raises(E.InvalidArgument, match="for --iscsi"):
        manager.export_create("p", "v", kind="local", allow_any=True)
    assert manager.catalog.exports() == []


def test_an_open_export_of_an_older_catalog_is_restored_as_allow_any(
    manager: Manager, caplog: pytest.LogCaptureFixture
) -> None:
    """Before ACLs were required, no --allow meant every initiator; such a
    row keeps serving its initiators after the upgrade, but as an explicit
    --allow-any that export list shows, with a warning in the log."""
    p = manager.catalog.pool("p")
    v = manager.catalog.volume("p", "v")
    old = manager.catalog.add_export(
        p.id,
        v.id,
        None,
        "iscsi",
        "ser",
        {"iqn": "iqn.2026-11.x:t", "portal": "0.0.0.0:3260", "allow": []},
    )
    closed = manager.catalog.add_export(
        p.id,
        v.id,
        None,
        "iscsi",
        "ser2",
        {"iqn": "iqn.2026-11.x:u", "portal": "0.0.0.0:3260", "allow": [A]},
    )
    with caplog.at_level(logging.WARNING, logger="dmsnap.storage"):
        restored = manager.exports._restore_legacy_open(old)
        assert manager.exports._restore_legacy_open(closed) is closed
    assert restored.config["allow_any"] is True
    rows = {r["serial"]: r for r in manager.export_list()}
    assert rows["ser"]["allow_any"] is True and not rows["ser2"].get("allow_any")
    assert any("every initiator" in r.getMessage() for r in caplog.records)


def test_a_second_export_reusing_an_iqn_is_refused_and_changes_nothing(manager: Manager) -> None:
    """An iSCSI target serves one export's LUN: a second export naming the
    same --iqn used to be accepted and listed as running with no LUN, and
    unexporting the first then deleted the target under it. Refused now,
    with one line naming the export that has it, before LIO is asked."""
    p = manager.catalog.pool("p")
    v = manager.catalog.volume("p", "v")
    w = manager.catalog.add_volume(p, "w", 1 << 20, dev_id=2)
    assert w is not None
    iqn = "iqn.2026-11.org.example:shared"
    manager.catalog.add_export(
        p.id, v.id, None, "iscsi", "ser", {"iqn": iqn, "portal": "0.0.0.0:3260", "allow": [A]}
    )
    before = manager.catalog.exports()
    with pytest.raises(E.AlreadyExists) as ei:
        manager.export_create("p", "w", kind="iscsi", iqn=iqn, allow=[A])
    msg = ei.value.message
    assert iqn in msg and "p/v" in msg and "\n" not in msg, msg
    assert manager.catalog.exports() == before
