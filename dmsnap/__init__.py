"""dmsnap: exact, in-band point-in-time snapshots for Linux block storage."""

__version__ = "0.1.0"
