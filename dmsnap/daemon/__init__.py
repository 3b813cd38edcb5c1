"""dmsnapd: the daemon that owns the stack."""
