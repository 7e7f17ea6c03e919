"""What the listener's sessions share: settings, per-client counts, the login throttle, the
free-space reading, the cleanup that commits their mail, and the list of open sessions.

relay.daemon makes one ``Listener`` per process and gives ``factory`` to the event loop's
servers; each connection becomes an engine (relay.smtpd.engine) around a session
(relay.smtpd.session).  Nothing here reads the network or decides a reply.  It holds no
state that outlives the process: a crash loses counts and throttles, nothing else.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Protocol

from relay.anvil import Anvil, Event
from relay.auth import LoginThrottle
from relay.clock import Clock, SystemClock
from relay.smtpd.cleanup import Cleanup
from relay.smtpd.engine import Engine
from relay.smtpd.policy import Client, SmtpdSettings, client_for
from relay.smtpd.session import Session
from spool import Spool
from spool.envelope import Envelope

STATVFS_MAX_AGE = 0.2  # a statvfs() per MAIL costs; 0.2 s old is fresh enough
CLIENTS_KEPT = 4096  # client records kept (see Listener.client); then made afresh


class SharedCounts(Protocol):
    """Where a listener worker counts its clients that limits apply to: the master
    process's Listener, asked over the worker's control socket (relay.smtpd.worker), so
    that a client's connections, rates and failed logins add up over every process that
    accepts mail, as Postfix's smtpd processes all ask one anvil."""

    async def connected(self, address: str) -> tuple[int, int]:
        """Count a connection: the client's connections now, and its connection rate if
        over the limit (else 0)."""

    def disconnected(self, address: str) -> None: ...

    async def over_rate(self, event: Event, address: str) -> int: ...

    async def login_blocked(self, address: str) -> bool: ...

    def login_failed(self, address: str) -> None: ...


class SmtpdObserver(Protocol):
    """What the listener tells its metrics (relay.metrics): never blocks, never raises."""

    def connected(self) -> None: ...

    def refused(self, reply: str) -> None:
        """A 4xx or 5xx reply was sent."""

    def queued(self, commit_seconds: float) -> None:
        """A message was committed; ``commit_seconds`` from the end of DATA to durable."""


class _Unobserved:
    def connected(self) -> None:
        pass

    def refused(self, reply: str) -> None:
        pass

    def queued(self, commit_seconds: float) -> None:
        pass


class Listener:
    """The shared state of all sessions of one listener process."""

    def __init__(self, spool: Spool, settings: SmtpdSettings,
                 on_queued: Callable[[Envelope], None] = lambda env: None,
                 clock: Clock | None = None,
                 flush_site: Callable[[str], bool] = lambda site: False) -> None:
        self.clock: Clock = clock or SystemClock()
        self.spool = spool
        self.settings = settings
        self.cleanup = Cleanup(spool, settings, self.clock, on_queued)
        # ETRN: ask the queue manager to flush a site's mail; False if it cannot be asked.
        self.flush_site = flush_site
        self.sessions: set[Session] = set()
        self.per_client: dict[str, int] = {}
        # A worker's clients that limits apply to are counted by the master (None: here).
        self.shared: SharedCounts | None = None
        self.shutting_down = False
        self.anvil = Anvil(settings.anvil_rate_time_unit)
        self.logins = LoginThrottle(self.anvil, settings.auth_failure_limit,
                                    settings.auth_failure_delay)
        # scrypt costs 16 MiB and tens of milliseconds a try: a flood of AUTH attempts
        # must not take every worker thread (or the memory) from the spool.
        self.password_checks = asyncio.Semaphore(4)
        self._statvfs_at = -1.0
        self._free = -1
        self.observer: SmtpdObserver = _Unobserved()
        # Made once per settings, not per connection: each client address's record and
        # each EHLO reply (by what it offers).
        self._clients: dict[str, Client] = {}
        self.ehlo_replies: dict[tuple[bool, bool, bool], str] = {}

    def observe(self, observer: SmtpdObserver) -> None:
        """Tell ``observer`` (the metrics) of connections, refusals and commits."""
        self.observer = observer
        self.cleanup.observer = observer

    def reconfigure(self, settings: SmtpdSettings) -> None:
        self.settings = settings
        self._clients = {}
        self.ehlo_replies = {}
        self.cleanup.settings = settings
        self.anvil.reconfigure(settings.anvil_rate_time_unit)
        self.logins.limit = settings.auth_failure_limit
        self.logins.delay = settings.auth_failure_delay

    def factory(self, implicit_tls: bool = False) -> Engine:
        """A connection's protocol object; ``implicit_tls`` for a ``host:port/tls``
        listener, whose server socket does the TLS handshake before the session starts."""
        return Engine(lambda conn: Session(self, conn, implicit_tls=implicit_tls),
                      self.settings.timeout)

    def client(self, address: str) -> Client:
        """The policy record for a peer address (relay.smtpd.policy.client_for), made
        once per address while the settings last."""
        found = self._clients.get(address)
        if found is None:
            if len(self._clients) >= CLIENTS_KEPT:
                self._clients = {}
            found = self._clients[address] = client_for(self.settings, address)
        return found

    # ---- per-client accounting (Postfix's anvil) --------------------------------------
    #
    # A session asks through the async methods; a worker's non-exempt clients are
    # counted by the master (``shared``), whose listener answers with the plain ones.

    async def admit(self, client: Client) -> tuple[int, int]:
        """Count a connection: the client's connections now, and its connection rate if
        over smtpd_client_connection_rate_limit (else 0)."""
        if self.shared is not None and not client.exempt:
            return await self.shared.connected(client.address)
        return self.connected(client.address), self.connection_rate(client)

    def left(self, client: Client) -> None:
        if self.shared is not None and not client.exempt:
            self.shared.disconnected(client.address)
        else:
            self.disconnected(client.address)

    async def rate_over(self, client: Client, event: Event, limit: int) -> int:
        """Count an event for the client; the rate if it is now over ``limit``, else 0."""
        if not limit or client.exempt:
            return 0
        if self.shared is not None:
            return await self.shared.over_rate(event, client.address)
        return self.over_rate(client, event, limit)

    async def login_blocked(self, client: Client) -> bool:
        if client.exempt:
            return False
        if self.shared is not None:
            return await self.shared.login_blocked(client.address)
        return self.logins.blocked(client.address)

    async def login_failed(self, client: Client) -> None:
        """Count a failed login and wait out smtpd's delay for it."""
        if self.shared is not None and not client.exempt:
            self.shared.login_failed(client.address)
            if self.logins.delay > 0:
                await asyncio.sleep(self.logins.delay)
            return
        await self.logins.failed(client.address)

    def connected(self, client: str) -> int:
        """Count a connection; the client's connections now."""
        n = self.per_client.get(client, 0) + 1
        self.per_client[client] = n
        return n

    def disconnected(self, client: str) -> None:
        n = self.per_client.get(client, 1) - 1
        if n <= 0:
            self.per_client.pop(client, None)
        else:
            self.per_client[client] = n

    def connection_rate(self, client: Client) -> int:
        return self.over_rate(client, Event.CONNECT, self.settings.connection_rate_limit)

    def over_rate(self, client: Client, event: Event, limit: int) -> int:
        """Count an event for the client; the rate if it is now over ``limit``, else 0."""
        if not limit or client.exempt:
            return 0
        rate = self.anvil.record(event, client.address)
        return rate if rate > limit else 0

    def event_limit(self, event: Event) -> int:
        """The main.cf limit on ``event`` per client and time unit (0: none)."""
        s = self.settings
        return {Event.CONNECT: s.connection_rate_limit, Event.MESSAGE: s.message_rate_limit,
                Event.RECIPIENT: s.recipient_rate_limit}.get(event, 0)

    # ---- the spool's free space --------------------------------------------------------

    def free_space(self) -> int:
        """Bytes available to us in the spool's file system; -1 if unknown."""
        now = time.monotonic()
        if now - self._statvfs_at > STATVFS_MAX_AGE:
            try:
                st = os.statvfs(self.spool.root)
                self._free = st.f_bavail * st.f_frsize
            except OSError:
                self._free = -1
            self._statvfs_at = now
        return self._free

    def space_changed(self) -> None:
        """A write failed for want of space: look again at the next MAIL."""
        self._statvfs_at = -1.0

    # ---- shutdown ----------------------------------------------------------------------

    @property
    def committing(self) -> int:
        return self.cleanup.committing

    def shutdown_sessions(self) -> None:
        """Tell every open session we are going away (421) and close it."""
        for session in list(self.sessions):
            session.shutdown()
