"""Running a daemon process's main coroutine: on uvloop where it is installed.

Both daemon processes (relay.daemon and relay.qmgrd) start here.  Nothing else: no
state, no I/O of its own, so a crash leaves nothing behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


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

