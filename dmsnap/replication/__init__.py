"""Replication: keeping a volume in sync with a second storage system from
its snapshots (issue 20).

What lives here: the changed blocks between two snapshots, read from the
kernel's own metadata (``delta``), the stream format (``stream``), the
transfer engine (``transfer``), dmsnapd's ``replication.*`` ops
(``service``) and the CLI (``cli``). It reaches the storage core only
through ``dmsnap.storage.replica`` (``Manager.replicas``); the storage core
never imports it.
"""
