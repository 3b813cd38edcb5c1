"""Target-side schedules and retention (issue 21, docs/schedules.md).

What lives here: when a schedule runs (``spec``: ``--every`` and
``--calendar``, catch-up, DST), which of its snapshots it keeps
(``retention``), both pure logic without I/O; where schedules are kept
(``store``: the catalog's ``schedules`` and ``schedule_snapshots`` tables);
and the runner dmsnapd starts (``runner``), which makes and deletes
snapshots only through the storage core's public operations
(``snapshot_create``, ``snapshot_list``, ``snapshot_delete``,
``pool_show``), each of which takes the one control lock itself. The
storage core never imports this package.
"""
