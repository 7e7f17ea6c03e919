"""The fsync helper process that spool.fsync starts: it fsyncs what it is sent.

Each request is file and directory names separated by NUL; each is opened, fsync'ed
and closed, in order, and the request is answered once: ``ok``, or ``E`` followed by
the failures (``errno:name``, NUL-separated).  It is run by path, isolated and without
site (``python -I -S fsyncd.py FD``) and imports only what it needs from the standard
library, so it costs little memory.  It ignores SIGINT and SIGTERM (its parent
decides when it ends) and exits when its socket closes.  It keeps no state: a crash
leaves nothing behind, and its parent sends the lost request to its successor.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys

BUFFER = 1 << 20  # socket buffers; a request is at most spool.fsync.MAX_REQUEST
OK = b"ok"


def fsync_path(path: str | bytes) -> None:
    """fsync one file or directory by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    while True:
        try:
            request = sock.recv(BUFFER)
        except InterruptedError:
            continue
        except OSError:
            return 0
        if not request:
            return 0
        failed: list[bytes] = []
        for name in request.split(b"\0"):
            try:
                fsync_path(name)
            except OSError as exc:
                failed.append(b"%d:%s" % (exc.errno or errno.EIO, name))
        try:
            sock.send(b"E" + b"\0".join(failed) if failed else OK)
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
