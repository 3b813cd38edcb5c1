"""dmsnapd's Prometheus metrics (docs/metrics.md).

``collector``: what a scrape reports, read from the storage core through a
narrow read-only view (:class:`~dmsnap.metrics.collector.StorageView`: the
core's public ``status``, ``snapshot_list`` and ``export_list`` answers and
its journals' counters) plus what the daemon hands in (schedules, in-band
request counts, its own start and error counts). ``server``: the HTTP
endpoint (``prometheus_client``), ``--metrics ADDR:PORT``.

Layer: imports ``errors`` only; the daemon wires it to the core. Nothing
here runs per I/O: the I/O counters are the C hot path's own (relaxed
atomic adds in ``csrc/tcmu.c``), read at scrape time.
"""
