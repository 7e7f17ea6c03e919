"""The time source of the listener and the queue manager.

Production uses the system clock.  Tests of backoff, expiry and clock jumps inject
another one: in-process a ``ManualClock`` whose time they set by hand, and for a daemon
running as a subprocess an ``OffsetClock`` that adds the number of seconds written
in the file named by the RELAY_CLOCK_OFFSET_FILE environment variable (so a test
can jump the daemon's clock forwards or backwards without sleeping).  Nothing here
writes or keeps anything beyond the offset last read: a crash leaves nothing behind.
"""

from __future__ import annotations

import os
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def time(self) -> float:
        return self.now


class OffsetClock:
    """System time plus an offset read from a file (re-read when the file changes)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._offset = 0.0

    def time(self) -> float:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                with open(self.path) as f:
                    self._offset = float(f.read().strip() or 0)
                self._stamp = stamp
        except (OSError, ValueError):
            pass
        return time.time() + self._offset


def from_environ(environ: dict[str, str] | None = None) -> Clock:
    env = os.environ if environ is None else environ
    path = env.get("RELAY_CLOCK_OFFSET_FILE", "")
    return OffsetClock(path) if path else SystemClock()
