"""dmsnapd: the daemon that owns the stack.

``server`` (the unix socket, one thread per client, no lock of its own),
``protocol`` (the wire format, argument checks, ops mapped 1:1 onto the
Manager's public methods), ``main`` (start-up, sd_notify, the dm event
health watcher), ``lock`` (one daemon per state directory), ``events``,
``notify``. May import ``storage``, ``dm``, ``scsi``, ``rules``, ``errors``;
nothing below imports it (the SCSI codec takes its rules from ``rules``).
"""
