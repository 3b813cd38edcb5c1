"""Replication: keeping a volume in sync with a second storage system from
its snapshots (issue 20).

What lives here: the changed blocks between two snapshots, read from the
kernel's own metadata (``delta``), and, as it grows, the stream format,
send/receive and the holds. It talks to the storage core only through its
public interface; the storage core never imports it.
"""
