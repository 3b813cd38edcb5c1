"""SCSI target side: SPC/SBC emulation and the vendor snapshot command.

* ``emulation``: :class:`~dmsnap.scsi.emulation.Emulator`, one per exported LUN;
  the TCMU ring loop hands it every command that is not a fast-path READ/WRITE
  (``execute(cdb, data_out, initiator=..., data_in_len=...) -> Response``).
* ``snapcmd``: the in-band snapshot command (opcode 0xC0), encode/decode for
  both the target and the initiator (``docs/scsi-snapshot-command.md``).
* ``sense``: status codes and sense data (fixed and descriptor format).
* ``cdb``: operation codes and CDB field decoding.
"""
