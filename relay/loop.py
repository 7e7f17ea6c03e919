"""Running a daemon process's main coroutine: on uvloop where it is installed; and a
child process's tie to its parent.

Every daemon process (relay.daemon, relay.qmgrd, relay.smtpd.worker) starts here.
Nothing else: no state, no I/O of its own, so a crash leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
from collections.abc import Coroutine
from typing import Any

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (PR_SET_PDEATHSIG): a
    supervisor's SIGKILL of the daemon stops every process of it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run a daemon process's main coroutine on uvloop where installed; its exit status."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return int(runner(main))
    except KeyboardInterrupt:
        return 0

