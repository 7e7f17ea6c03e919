"""What every process that accepts mail does the same: the master (relay.daemon) and each
listener worker (relay.smtpd.worker).

It owns the listener's end of the trigger socket to the queue manager (``QmgrLink``: each
committed queue ID is one datagram, as Postfix's cleanup triggers qmgr; the socket is
shared by every process that accepts mail, and the queue manager reads them all), the
servers on the listening sockets the master bound (``serve``), and the graceful end of a
process's sessions (``shutdown``: stop accepting, let commits in progress finish, 421 the
rest).  It decides nothing about a session and never touches the spool itself.  A crash
leaves the spool as spool.store says; a lost trigger costs latency only (the queue
manager's next scan of incoming/ finds the message).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Sequence

from relay.config import ListenAddress
from relay.smtpd.listener import Listener
from spool import Envelope

COMMIT_GRACE = 3.0  # seconds a stopping process waits for commits in progress
LISTEN_BACKLOG = 4096  # connections the kernel queues for the processes to accept (at most somaxconn)


class QmgrLink:
    """The listener's end of the trigger socket to the queue manager process."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lost = False  # a trigger did not fit: send "scan" when there is room
        self.retrying = False

    def queued(self, env: Envelope) -> None:
        self.send(env.queue_id.encode("ascii"))

    def flush_site(self, site: str) -> bool:
        """ETRN: the queue manager retries the deferred mail for ``site`` now (Postfix's
        flush service); a trigger that does not fit is lost, as a flush may be."""
        try:
            self.sock.send(b"etrn=" + site.encode("ascii", "replace"))
        except OSError:
            return False
        return True

    def send(self, data: bytes) -> None:
        try:
            if self.lost:
                self.sock.send(b"scan")
                self.lost = False
            if data:
                self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            self.lost = True
            if not self.retrying:  # one timer, however many triggers did not fit
                self.retrying = True
                asyncio.get_running_loop().call_later(0.1, self.retry)
        except OSError:
            pass  # the qmgr is gone; the daemon is stopping

    def retry(self) -> None:
        self.retrying = False
        if self.lost:
            self.send(b"")


async def serve(listener: Listener, socks: Sequence[tuple[ListenAddress, socket.socket]]
                ) -> list[asyncio.AbstractServer]:
    """Sessions on each listening socket (the master listens once the queue manager is
    up, and every process accepts on the same sockets).  The event loop listens again
    with its backlog: LISTEN_BACKLOG, not its own default of 100, which a burst of
    connections outruns."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    for addr, sock in socks:
        if addr.tls:  # implicit TLS (port 465 style): the handshake comes first
            server = await loop.create_server(
                functools.partial(listener.factory, implicit_tls=True), sock=sock,
                ssl=listener.settings.tls_context, backlog=LISTEN_BACKLOG,
                ssl_handshake_timeout=listener.settings.timeout)
        else:
            server = await loop.create_server(listener.factory, sock=sock,
                                              backlog=LISTEN_BACKLOG)
        servers.append(server)
    return servers


async def shutdown(listener: Listener, servers: Sequence[asyncio.AbstractServer]) -> None:
    """Stop accepting, let commits in progress finish (a few seconds at most), and tell
    every other session we are going away (421)."""
    listener.shutting_down = True
    for server in servers:
        server.close()
    loop = asyncio.get_running_loop()
    end = loop.time() + COMMIT_GRACE
    while listener.committing and loop.time() < end:
        await asyncio.sleep(0.02)
    listener.shutdown_sessions()
