"""systemd's readiness protocol (sd_notify(3)), for ``Type=notify`` units.

``notify("READY=1")`` sends one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET
(a path, or ``@name`` in the abstract namespace), as systemd documents the protocol
for daemons that do not link libsystemd.  Without $NOTIFY_SOCKET (not started by
systemd) it does nothing.  A failure to send is ignored: a service manager that went
away must not stop mail.  Nothing is kept, so a crash leaves nothing behind.
"""

from __future__ import annotations

import os
import socket
import time

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(*fields: str) -> bool:
    """Send ``fields`` (``READY=1``, ``STATUS=...``) as one message; True if sent."""
    path = os.environ.get(NOTIFY_SOCKET, "")
    if not path.startswith(("/", "@")):
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode("utf-8"))
    except OSError:
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def reloading() -> bool:
    # systemd 253 and later want the time of the reload request with RELOADING=1.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping")
