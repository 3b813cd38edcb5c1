"""SCSI target side: SPC/SBC emulation and the vendor snapshot command.

* ``emulation``: :class:`~dmsnap.scsi.emulation.Emulator`, one per exported LUN;
  the TCMU ring loop hands it every command that is not a fast-path READ/WRITE
  (``execute(cdb, data_out, initiator=..., data_in_len=...) -> Response``).
* ``snapcmd``: the in-band snapshot command (opcode 0xC0), encode/decode for
  both the target and the initiator (``docs/scsi-snapshot-command.md``).
* ``sense``: status codes and sense data (fixed and descriptor format).
* ``cdb``: operation codes and CDB field decoding.
* ``target``: an export at run time (backstores, rings, emulators);
  ``lio``: LIO configfs through rtslib-fb; ``tcmu``: the C ring handler's face;
  ``initiator``/``sgio``: the client side.

Below the storage core: imports ``errors`` and ``rules`` only (the codec
runs on initiator hosts too); the in-band command's target side is the
storage core's (``dmsnap.storage.inband``).
"""

# How much nicer than dmsnapd the fast-path workers run (dmsnapd
# --worker-nice). Over iSCSI, LIO binds each connection's receive and
# transmit threads to one CPU; when that CPU is short, workers at the same
# weight delay the transmit thread, and answered commands queue there.
# +5 measured 0.92-0.94x iblock for QD32 iSCSI writes against 0.65-0.83x
# at 0 (bench/README, "Fast-path workers at nice +5").
DEFAULT_WORKER_NICE = 5
