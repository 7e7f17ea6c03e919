"""Commit a received message to the spool (Postfix's cleanup): the envelope, the Received:
header, the durable write, and the hand-off to the queue manager.

It owns the queue file a session's message becomes: it reserves the queue ID, builds the
envelope (sender, recipients with their RFC 3461 NOTIFY and ORCPT, ENVID, RET, SMTPUTF8,
the client) and the Received: header that names the ID, writes both through spool.store's
steps and waits until they are durable; only then does the session answer 250.  The files
are written on the event loop (to the page cache: no waiting) and made durable by the
daemon's fsync helper, which many sessions share (group commit); a big message, or a
listener without a helper, is stored in a thread.  After the commit it hands the envelope
to ``on_queued`` (the trigger to the queue manager) before the session sees the 250.

It never talks SMTP and never decides whether a message is acceptable (the session and
relay.smtpd.policy do).  What a crash leaves is spool.store's rule: before the rename into
incoming/ nothing a client was told about; after it, a complete message.  A commit runs to
its end even when the client hangs up meanwhile, so a commit cut off half-way can never
race with its own abort.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.clock import Clock
from spool import Spool
from spool.envelope import Envelope, Recipient
from spool.fsync import Syncer
from spool.store import Steps, run_steps, run_steps_async

if TYPE_CHECKING:
    from relay.smtpd.listener import SmtpdObserver
    from relay.smtpd.policy import SmtpdSettings
    from relay.smtpd.session import Session, Transaction

log = logging.getLogger("relay.smtpd")
cleanup_log = logging.getLogger("relay.cleanup")

INLINE_WRITE_MAX = 1 << 20  # bigger messages are written to the spool in a thread
_CTRL = re.compile(r"[\x00-\x1f\x7f]")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)


class Cleanup:
    """Turns a finished transaction into a committed queue file."""

    def __init__(self, spool: Spool, settings: SmtpdSettings, clock: Clock,
                 on_queued: Callable[[Envelope], None]) -> None:
        self.spool = spool
        self.settings = settings
        self.clock = clock
        self.on_queued = on_queued
        self.syncer: Syncer | None = None  # the daemon's fsync helper, when it has one
        self.committing = 0  # commits in progress, which a shutdown waits for
        self.observer: SmtpdObserver | None = None  # the metrics, told of each commit

    async def enqueue(self, session: Session, mail: Transaction, content: bytes) -> str:
        """Commit the message; its queue ID once it is durable."""
        self.committing += 1
        start = time.monotonic()
        task = asyncio.ensure_future(self._commit(session, mail, content))
        task.add_done_callback(self._committed)
        env = await asyncio.shield(task)
        if self.observer is not None:
            self.observer.queued(time.monotonic() - start)
        return env.queue_id

    def _committed(self, task: asyncio.Future[Envelope]) -> None:
        # Runs before the session resumes (registered before shield's own callback), so
        # the queue manager learns of the message before the client sees 250.
        self.committing -= 1
        if not task.cancelled() and task.exception() is None:
            self.on_queued(task.result())

    async def _commit(self, session: Session, mail: Transaction, content: bytes) -> Envelope:
        spool, syncer = self.spool, self.syncer
        if syncer is None or len(content) > INLINE_WRITE_MAX:
            return await asyncio.to_thread(
                lambda: run_steps(self._store_steps(session, mail, content),
                                  spool.fsync_paths))
        return await run_steps_async(self._store_steps(session, mail, content), syncer.sync)

    def _store_steps(self, session: Session, mail: Transaction,
                     content: bytes) -> Steps[Envelope]:
        """The store as steps (spool.store.run_steps): reserve, envelope, commit."""
        res = self.spool.reserve()
        try:
            received = self.received_header(session, res.queue_id)
            env = self._envelope(session, mail, res.queue_id, content,
                                 len(received) + len(content))
        except BaseException:
            self.spool.abort(res)
            raise
        env = yield from self.spool.commit_steps(res, env, (received, content))
        cleanup_log.info("%s: message-id=%s", env.queue_id, env.message_id or "<>")
        return env

    def _envelope(self, session: Session, mail: Transaction, queue_id: str,
                  content: bytes, size: int) -> Envelope:
        """The new message's envelope (``size``: of what is stored, the Received: header
        included); logs the smtpd ``client=`` line that names the queue ID."""
        params = mail.parameters
        env = Envelope(
            queue_id=queue_id,
            sender=mail.sender,
            recipients=tuple(Recipient(address, dsn_notify=p.dsn_notify, dsn_orcpt=p.dsn_orcpt)
                             for address, p in mail.recipients.items()),
            arrival_time=self.clock.time(),
            size=size,
            client_name=session.client.name,
            client_address=session.client.address,
            helo_name=session.helo,
            protocol=session.protocol_name(),
            auth_user=session.sasl_user,
            message_id=_message_id(content),
            dsn_envid=params.dsn_envid,
            dsn_ret=params.dsn_ret,
            smtputf8=params.smtputf8,
            requiretls=params.requiretls,
        )
        line = f"{queue_id}: client={session.namaddr()}"
        if session.sasl_user:
            line += f", sasl_method={session.sasl_method}, sasl_username={session.sasl_user}"
        if params.auth:
            line += f", sasl_sender={params.auth}"
        log.info("%s", line)
        return env

    def received_header(self, session: Session, queue_id: str) -> bytes:
        s = self.settings
        client = session.client
        helo = session.helo or client.name
        lines = [f"Received: from {helo} ({client.name} [{client.address}])"]
        if session.sasl_user:
            lines.append(f"(Authenticated sender: {session.sasl_user})")
        lines.append(f"by {s.myhostname} ({s.mail_name}) with {session.protocol_name()} "
                     f"id {queue_id};")
        lines.append(_date())
        text = "".join(_CTRL.sub("", ln).join(("\t" if i else "", "\r\n"))
                       for i, ln in enumerate(lines))
        return text.encode("utf-8", "surrogateescape")


_date_cache: tuple[int, str] = (-1, "")  # (second, its RFC 5322 date): replaced whole


def _date() -> str:
    """Now as an RFC 5322 date in local time, made once a second."""
    global _date_cache
    now = int(time.time())
    second, text = _date_cache
    if second != now:
        text = email.utils.formatdate(now, localtime=True)
        _date_cache = (now, text)
    return text


def _message_id(content: bytes) -> str:
    end = content.find(b"\r\n\r\n")  # the header section only (no copy of the body)
    m = _MESSAGE_ID.search(content, 0, len(content) if end < 0 else end)
    if not m:
        return ""
    return _CTRL.sub("", m.group(1).decode("utf-8", "replace"))[:256]
