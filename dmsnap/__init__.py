"""dmsnap: exact, in-band point-in-time snapshots for Linux block storage.

Layers, bottom-up (docs/design.md): ``errors``, ``rules`` and ``sizes``
(import nothing of dmsnap's); ``dm`` (device-mapper); ``journal`` and
``scsi`` (with the C hot path in ``csrc/``); ``storage`` (the storage core);
``daemon`` (dmsnapd); ``client`` and ``cli``. A layer imports only layers
below it (tests/host/test_structure.py).
"""

__version__ = "0.1.0"
