"""The fsync helper process that spool.fsync starts: it fsyncs what it is sent.

Each request is file and directory names separated by NUL; each is opened, fsync'ed
and closed, in order, and the request is answered once: ``ok``, or ``E`` followed by
the failures (``errno:name``, NUL-separated).  A request of many names on one file
system, while the machine has little dirty data, is made durable by one syncfs(2)
instead: one disk cache flush instead of one per name (see SYNCFS_MIN).  It is run by path, isolated and without
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
# From this many names in one request, one syncfs(2) of the spool's file system beats
# an fsync(2) each: every fsync ends in its own disk cache flush, a syncfs in one.
SYNCFS_MIN = 6
# ... but syncfs also writes what others left dirty on that file system: only when the
# whole machine has little (Dirty + Writeback in /proc/meminfo), so a busy neighbour
# never makes a commit wait for its gigabytes.
DIRTY_MAX_KIB = 32 * 1024


def fsync_path(path: str | bytes) -> None:
    """fsync one file or directory by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> object | None:
    try:
        import ctypes

        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError, ImportError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    return syncfs


def _dirty_kib() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            info = f.read()
    except OSError:
        return None
    total = 0
    for key in (b"\nDirty:", b"\nWriteback:"):
        at = info.find(key)
        if at < 0:
            return None
        total += int(info[at + len(key):].split(None, 1)[0])
    return total


def sync_all(names: list[bytes], syncfs: object | None) -> list[bytes]:
    """Make every name durable; the failures as ``errno:name``."""
    if syncfs is not None and len(names) >= SYNCFS_MIN:
        try:
            same_fs = len({os.stat(n).st_dev for n in names}) == 1
        except OSError:
            same_fs = False  # a name is missing: the fsyncs below say which
        dirty = _dirty_kib() if same_fs else None
        if dirty is not None and dirty <= DIRTY_MAX_KIB:
            try:
                fd = os.open(names[0], os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass  # gone meanwhile: the fsyncs below say so
            else:
                try:
                    if syncfs(fd) == 0:  # type: ignore[operator]
                        return []
                finally:
                    os.close(fd)
            # It failed (a writeback error, say): the fsyncs name the file.
    failed: list[bytes] = []
    for name in names:
        try:
            fsync_path(name)
        except OSError as exc:
            failed.append(b"%d:%s" % (exc.errno or errno.EIO, name))
    return failed


def main(fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    syncfs = _load_syncfs()
    while True:
        try:
            request = sock.recv(BUFFER)
        except InterruptedError:
            continue
        except OSError:
            return 0
        if not request:
            return 0
        names = request.split(b"\0")
        try:
            failed = sync_all(names, syncfs)
        except Exception:  # noqa: BLE001 - whatever it was, nothing is known durable
            failed = [b"%d:%s" % (errno.EIO, name) for name in names]
        try:
            sock.send(b"E" + b"\0".join(failed) if failed else OK)
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
