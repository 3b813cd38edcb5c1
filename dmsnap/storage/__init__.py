"""The storage core: pools, volumes, snapshots, exports (docs/design.md).

``manager.Manager`` is the table of contents: the public operations, each
under the one control lock, composing the parts beside it that never call
back into it: ``stack`` (a pool's devices and dm layers, built and torn
down), ``pending`` (every kernel change recorded, rolled forward or back),
``assembly`` (every pool up at a start), ``journals``, ``policy`` (``pool
set``, COW autoextend), ``snapshots`` (request, cut, wait), ``views`` (JSON
answers), ``volume_io`` (a journaled volume's data path); ``exports`` and
``inband`` reach the core through a narrow interface and its public
methods. ``backend`` is the
snapshot-backend interface (``thin``, ``classic``); ``catalog`` the SQLite
catalog; ``names``, ``label``, ``identity``, ``devices``, ``loop``,
``layers`` the naming and device helpers. May import ``dm``, ``journal``,
``scsi``, ``rules``, ``errors``; never ``daemon`` or ``cli``.
"""
