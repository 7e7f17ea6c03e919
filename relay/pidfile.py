"""``QUEUE_DIR/master.lock`` and ``QUEUE_DIR/master.pid``: whether ``relay serve`` runs on
a spool, and its process ID (Postfix's pid/master.pid, and ``master -t``).

``relay serve`` holds an exclusive flock(2) on master.lock for its whole life, so the
lock, not the pid file, says whether it runs: a kill -9 releases it with the process.
master.pid is written whole (a temporary file, fsync, rename) once the lock is held,
and stays after the daemon stops, as Postfix's does.  ``relay status``, ``reload``,
``stop`` and ``check`` read both here; nothing here signals a process or touches a
queue file.  A crash leaves a stale master.pid, which the next start replaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

LOCK_TRIES = 5
LOCK_RETRY_DELAY = 0.05
LOCK_NAME = "master.lock"
PID_NAME = "master.pid"


class AlreadyRunning(Exception):
    """Another relay serve holds the spool's master.lock."""


def lock(root: str) -> int:
    """Take master.lock for this process's life (the descriptor to keep open);
    AlreadyRunning if another daemon holds it, OSError if it cannot be opened."""
    fd = os.open(os.path.join(root, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    # running() takes the lock shared for an instant: a start at that moment tries
    # again a few times before it calls the spool taken.
    for _ in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            time.sleep(LOCK_RETRY_DELAY)
    os.close(fd)
    raise AlreadyRunning(root)


def write(root: str) -> None:
    """master.pid with this process's ID, made durable: on a full disk this is where a
    start fails, before any mail is taken.  OSError names the file."""
    path = os.path.join(root, PID_NAME)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid():>10}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OSError(exc.errno, exc.strerror, path) from None


def running(root: str) -> int | None:
    """The PID of the relay serve that holds this spool's lock (0 if its pid file
    cannot be read), or None if none does."""
    try:
        fd = os.open(os.path.join(root, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # held: running
    except OSError:
        return None
    else:
        return None
    finally:
        os.close(fd)
    try:
        with open(os.path.join(root, PID_NAME)) as f:
            return int(f.read().strip() or "0")
    except (OSError, ValueError):
        return 0
