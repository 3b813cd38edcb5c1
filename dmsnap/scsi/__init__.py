"""SCSI target side: TCMU ring, SPC/SBC emulation, the vendor snapshot command."""
