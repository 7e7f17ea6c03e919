"""A relay.smtpd Listener on a loopback port, in this process: its event loop (uvloop where
installed) runs in a thread of its own, and it commits to a real Spool through the daemon's
fsync helper.  For tests that drive the listener over real sockets and then look inside it
(the fuzzer; what a closed connection leaves in memory)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from relay.config import NetworkMatcher
from relay.smtpd.listener import Listener
from relay.smtpd.policy import SmtpdSettings
from spool import Envelope, Spool
from spool.fsync import Syncer

SIZE_LIMIT = 200_000


class LiveListener:
    """A Listener on a loopback port, served by an event loop in a thread of its own."""

    def __init__(self, root: Path, **settings: object) -> None:
        self.spool = Spool(str(root))
        self.acknowledged: list[Envelope] = []
        self.listener = Listener(
            self.spool,
            # The bare-LF rule for every client, loopback included (Postfix would exempt
            # mynetworks).
            SmtpdSettings(**{"myhostname": "relay.test", "message_size_limit": SIZE_LIMIT,
                             "timeout": 10.0, "bare_newline_exclusions": NetworkMatcher(()),
                             **settings}),  # type: ignore[arg-type]
            on_queued=self.acknowledged.append)
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-listener",
                                       daemon=True)
        self.thread.start()
        # The daemon's commit path: files written on the loop, fsync'ed by a helper.
        self.syncer = Syncer()
        self.listener.cleanup.syncer = self.syncer

        async def start() -> None:
            self.syncer.start()
        self.call(start())
        self.server = self.call(self.loop.create_server(self.listener.factory, "127.0.0.1", 0))
        self.port: int = self.server.sockets[0].getsockname()[1]

    def call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    def busy(self) -> bool:
        async def probe() -> bool:
            return bool(self.listener.sessions or self.listener.committing)
        return bool(self.call(probe()))

    def wait_idle(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while self.busy():
            assert time.monotonic() < end, "the listener never finished its sessions"
            time.sleep(0.002)

    def close(self) -> None:
        self.wait_idle()
        self.server.close()
        self.loop.call_soon_threadsafe(self.syncer.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
