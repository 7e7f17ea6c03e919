"""The queue manager (relay.scheduler) in-process, against real SMTP peers and real DNS.

Each test runs a Scheduler over a spool in a temporary directory, delivering to scripted
SMTP peers on loopback (tests.support.peers) and, where MX records matter, resolving
through a DNS server on loopback (tests.support.dnsserver).  Time passes only on a
ManualClock: a test moves it to the next-attempt time of a deferred message (the mtime of
deferred/ID, Postfix's trick) and asks for a scan; nothing sleeps to make time pass.
Real waiting is bounded polling for the outcome of work already under way.

To show that a scan did *not* pick a message up, a test plants a "canary": a message for
a discard: route, already due, in deferred/.  Once the canary is gone the scan that found
it has listed all of deferred/, so anything due would have been activated with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from relay.clock import ManualClock
from relay.delivery import Attempt, DeliverySettings, SMTPDelivery, TargetLike
from relay.outcome import Policy
from relay.routing import Resolver, Router
from relay.scheduler import DeliveryAgent, QmgrSettings, Scheduler
from spool import EntryGone, Envelope, RcptState, Recipient, Spool
from tests.support import dnsserver
from tests.support.dnsserver import LoopbackDNS
from tests.support.peers import Peer, PeerScript, ReceivedMessage, Reply

T = TypeVar("T")

dns_server = dnsserver.dns_server  # the fixture

T0 = 1_700_000_000.0
SENDER = "alice@sender.test"
CONTENT = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Subject: scheduler test\r\n"
    b"Message-ID: <scheduler-test@sender.test>\r\n"
    b"\r\n"
    b"Hello.\r\n"
)
CANARY_DOMAIN = "canary.test"
DELIVERY = DeliverySettings(
    helo_name="relay.test",
    connect_timeout=3.0,
    helo_timeout=3.0,
    mail_timeout=3.0,
    rcpt_timeout=3.0,
    data_init_timeout=3.0,
    data_xfer_timeout=3.0,
    data_done_timeout=3.0,
    quit_timeout=3.0,
    starttls_timeout=3.0,
)
TRY_LATER = Reply(451, "4.3.0 Try again later")
SHUTTING_DOWN = Reply(421, "4.3.2 Service shutting down")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 40))


def via(peer: Peer) -> str:
    return f"smtp:[{peer.host}]:{peer.port}"


def transport_maps(routes: Mapping[str, str]) -> list[str]:
    # Braces around every pair, so that a value may contain spaces (error:5.1.1 text).
    pairs = ", ".join(f"{{ {key} = {value} }}" for key, value in routes.items())
    return [f"inline:{{ {pairs} }}"]


class CountingDelivery:
    """A DeliveryAgent that counts the deliveries in flight, per next hop and in total,
    and hands each one to the real SMTP client."""

    def __init__(self) -> None:
        self.client = SMTPDelivery()
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.total = 0
        self.peak_total = 0

    async def deliver(
        self,
        targets: Sequence[TargetLike],
        nexthop_label: str,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        settings: DeliverySettings,
        **options: Any,
    ) -> Attempt:
        self.in_flight[nexthop_label] += 1
        self.total += 1
        self.peak[nexthop_label] = max(self.peak[nexthop_label], self.in_flight[nexthop_label])
        self.peak_total = max(self.peak_total, self.total)
        try:
            return await self.client.deliver(
                targets, nexthop_label, sender, recipients, message, settings, **options
            )
        finally:
            self.in_flight[nexthop_label] -= 1
            self.total -= 1

    async def close(self) -> None:
        await self.client.close()


@dataclass
class Relay:
    """A running Scheduler with its spool and clock, and the waits the tests need."""

    spool: Spool
    clock: ManualClock
    sched: Scheduler
    delivery: DeliveryAgent

    def submit(
        self,
        recipients: Iterable[str],
        *,
        sender: str = SENDER,
        content: bytes = CONTENT,
        arrival: float | None = None,
    ) -> str:
        """Queue a message as the listener does (commit to incoming/, then wake the qmgr)."""
        env = self.spool.enqueue(
            Envelope(
                queue_id="",
                sender=sender,
                recipients=tuple(Recipient(address) for address in recipients),
                arrival_time=self.clock.time() if arrival is None else arrival,
            ),
            content,
        )
        self.sched.wakeup(env)
        return env.queue_id

    def where(self, queue_id: str) -> str | None:
        return self.spool.locate(queue_id)

    def envelope(self, queue_id: str) -> Envelope:
        for _ in range(100):  # a message may move between locate() and read()
            queue = self.spool.locate(queue_id)
            if queue is None:
                raise EntryGone(queue_id)
            try:
                return self.spool.read(queue, queue_id)
            except EntryGone:
                continue
        raise EntryGone(queue_id)

    def due(self, queue_id: str) -> float:
        """The next-attempt time of a deferred message: the mtime of deferred/ID."""
        return self.spool.mtime("deferred", queue_id)

    def recipient(self, queue_id: str, address: str) -> Recipient:
        return next(r for r in self.envelope(queue_id).recipients if r.address == address)

    def queued(self, *queues: str) -> list[str]:
        queues = queues or ("incoming", "active", "deferred", "hold")
        return sorted(e.queue_id for q in queues for e in self.spool.scan(q))

    def settled(self, queue_id: str) -> bool:
        """Not being worked on: gone, or in deferred/ and no longer in the active queue."""
        if queue_id in self.sched.messages:
            return False
        return self.where(queue_id) in (None, "deferred", "hold")

    def attempts(self, queue_id: str) -> int:
        try:
            return self.envelope(queue_id).attempts
        except EntryGone:
            return -1

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)

    async def deferred(self, *queue_ids: str, attempts: int = 1) -> None:
        """Wait until each message has been tried and put back in deferred/."""
        for queue_id in queue_ids:
            await self.until(
                lambda q=queue_id: (
                    self.settled(q)  # type: ignore[misc]
                    and self.where(q) == "deferred"
                    and self.attempts(q) >= attempts
                ),
                f"{queue_id} deferred after {attempts} attempt(s)",
            )

    async def gone(self, *queue_ids: str) -> None:
        for queue_id in queue_ids:
            await self.until(
                lambda q=queue_id: (
                    self.where(q) is None  # type: ignore[misc]
                    and q not in self.sched.messages
                ),
                f"{queue_id} removed",
            )

    async def attempt_when_due(self, queue_id: str) -> float:
        """Move the clock to the message's next-attempt time, scan, wait for the attempt.

        Returns the time of the attempt.  Afterwards the message is back in deferred/
        with one more attempt counted, or gone (delivered, bounced or expired).
        """
        due = self.due(queue_id)
        before = self.attempts(queue_id)
        self.clock.now = max(self.clock.now, due)
        self.sched.scan()
        await self.until(
            lambda: (
                self.settled(queue_id)
                and (self.where(queue_id) is None or self.attempts(queue_id) > before)
            ),
            f"an attempt of {queue_id} at {due - T0:+.0f}",
        )
        return due

    async def scan_finds_nothing(self, *watched: str) -> None:
        """Scan now and return once that scan has listed deferred/ (see the canary above).

        Each ``watched`` message must have been left alone: still settled, with the same
        attempt count and next-attempt time.
        """
        before = {q: (self.where(q), self.attempts(q), self._mtime(q)) for q in watched}
        canary = self.spool.enqueue(
            Envelope(
                queue_id="",
                sender=f"canary@{CANARY_DOMAIN}",
                recipients=(Recipient(f"canary@{CANARY_DOMAIN}"),),
                arrival_time=self.clock.time(),
            ),
            b"Subject: canary\r\n\r\n.\r\n",
        )
        with self.spool.locked(canary.queue_id) as entry:
            entry.move("deferred", mtime=self.clock.time() - 10)
        self.sched.scan()
        await self.gone(canary.queue_id)
        # The canary may finish before a message listed in the same scan is activated
        # (threads): give such a mistake a moment to show.
        await asyncio.sleep(0.05)
        for queue_id, state in before.items():
            assert self.settled(queue_id), f"{queue_id} was picked up by the scan"
            assert (self.where(queue_id), self.attempts(queue_id), self._mtime(queue_id)) == state

    def _mtime(self, queue_id: str) -> float | None:
        queue = self.where(queue_id)
        try:
            return self.spool.mtime(queue, queue_id) if queue else None
        except EntryGone:
            return None


@contextlib.asynccontextmanager
async def running(
    queue_dir: Path,
    routes: Mapping[str, str] | None = None,
    *,
    policy: Policy | None = None,
    dns: LoopbackDNS | None = None,
    rng: random.Random | None = None,
    delivery: DeliveryAgent | None = None,
    start: float = T0,
    **settings: Any,
) -> AsyncIterator[Relay]:
    spool = Spool(str(queue_dir))
    clock = ManualClock(start)
    router = Router(transport_maps({CANARY_DOMAIN: "discard:", **(routes or {})}))
    # Without a DNS server of the test's own, point the resolver at a port where nothing
    # answers: a route that needed DNS would then fail instead of leaving loopback.
    resolver = Resolver(
        [dns.nameserver] if dns is not None else ["127.0.0.1:9"],
        timeout=2.0,
        myhostname="relay.test",
        rng=rng or random.Random(0),
    )
    smtp = delivery or SMTPDelivery()
    qmgr = Scheduler(
        spool,
        QmgrSettings(
            myhostname="relay.test",
            policy=policy or Policy(),
            delivery=DELIVERY,
            **settings,
        ),
        router,
        resolver,
        smtp,
        clock=clock,
    )
    task = asyncio.create_task(qmgr.run())
    try:
        yield Relay(spool, clock, qmgr, smtp)
    finally:
        await qmgr.stop(grace=2.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ---- reading notices and peer records ------------------------------------------------------


def unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


@dataclass(frozen=True)
class Report:
    """A delivery status notice, parsed: its headers, human text and DSN field groups."""

    message: email.message.Message
    text: str
    per_message: Mapping[str, str]
    per_recipient: list[Mapping[str, str]]

    def recipient(self, address: str) -> Mapping[str, str]:
        return next(
            group
            for group in self.per_recipient
            if group["Final-Recipient"].lower() == f"rfc822; {address}".lower()
        )


def report(received: ReceivedMessage) -> Report:
    """Parse a notice as RFC 3464 (multipart/report; report-type=delivery-status)."""
    assert received.sender == "", "a notice goes out with the null sender"
    message = email.message_from_bytes(received.data)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    parts = message.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    text_part, status_part, _returned = parts
    assert isinstance(text_part, email.message.Message)
    assert isinstance(status_part, email.message.Message)
    assert text_part.get_content_type() == "text/plain"
    assert status_part.get_content_type() == "message/delivery-status"
    groups = status_part.get_payload()
    assert isinstance(groups, list) and len(groups) >= 2
    fields: list[Mapping[str, str]] = []
    for group in groups:
        assert isinstance(group, email.message.Message)
        fields.append({name: unfold(str(value)) for name, value in group.items()})
    text = text_part.get_payload(decode=True)
    assert isinstance(text, bytes)
    return Report(message, text.decode(), fields[0], fields[1:])


def rcpt_commands(peer: Peer) -> Counter[str]:
    """How many RCPT TO commands the peer received for each address."""
    seen: Counter[str] = Counter()
    for session in peer.sessions:
        for command in session.commands:
            match = re.match(r"RCPT TO:<([^>]*)>", command.line, re.IGNORECASE)
            if match:
                seen[match.group(1)] += 1
    return seen


def log_lines(caplog: pytest.LogCaptureFixture, *needles: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if all(needle in record.getMessage() for needle in needles)
    ]


# ---- backoff --------------------------------------------------------------------------------


def test_backoff_follows_postfix_schedule_and_attempts_only_when_due(tmp_path: Path) -> None:
    """Next attempt = now + time in queue clamped to [300, 4000] s, as Postfix's qmgr."""

    async def scenario() -> None:
        async with (
            Peer(PeerScript(rcpt=TRY_LATER)) as peer,
            running(tmp_path / "q", {"dest.test": via(peer)}) as relay,
        ):
            queue_id = relay.submit(["bob@dest.test"])
            await relay.deferred(queue_id)
            assert peer.transaction_count == 1
            attempt_times = [0.0]
            due_times = []
            for attempt in range(2, 9):
                due = relay.due(queue_id)
                due_times.append(due - T0)
                env = relay.envelope(queue_id)
                assert env.next_attempt == pytest.approx(due)
                assert env.attempts == attempt - 1
                # Just before it is due, a scan leaves it alone: the peer sees nothing.
                relay.clock.now = due - 5
                await relay.scan_finds_nothing(queue_id)
                assert relay.where(queue_id) == "deferred"
                assert peer.transaction_count == attempt - 1
                # When it is due, exactly one more attempt.
                attempt_times.append(await relay.attempt_when_due(queue_id) - T0)
                assert relay.where(queue_id) == "deferred"
                assert peer.transaction_count == attempt
            due_times.append(relay.due(queue_id) - T0)

            assert attempt_times == pytest.approx([0, 300, 600, 1200, 2400, 4800, 8800, 12800])
            assert due_times == pytest.approx([300, 600, 1200, 2400, 4800, 8800, 12800, 16800])
            bob = relay.recipient(queue_id, "bob@dest.test")
            assert bob.state is RcptState.PENDING
            assert bob.dsn == "4.3.0"
            assert "451 4.3.0 Try again later" in bob.reason
            assert rcpt_commands(peer) == {"bob@dest.test": 8}

    run(scenario())


def test_connection_refused_backs_off_the_same_way(tmp_path: Path) -> None:
    """A closed port: each attempt is deferred with Postfix's connect reason, same schedule."""
    closed = Peer()  # bound and released: nothing listens on the port any more

    async def scenario() -> None:
        await closed.start()
        await closed.stop()
        async with running(
            tmp_path / "q", {"dest.test": via(closed)}, failed_cohort_limit=0
        ) as relay:
            queue_id = relay.submit(["bob@dest.test"])
            await relay.deferred(queue_id)
            times = [await relay.attempt_when_due(queue_id) - T0 for _ in range(5)]
            assert times == pytest.approx([300, 600, 1200, 2400, 4800])
            assert relay.due(queue_id) - T0 == pytest.approx(8800)
            bob = relay.recipient(queue_id, "bob@dest.test")
            assert bob.dsn == "4.4.1"
            assert bob.reason == (
                f"connect to {closed.host}[{closed.host}]:{closed.port}: Connection refused"
            )

    run(scenario())


# ---- expiry ---------------------------------------------------------------------------------


def test_expiry_returns_the_message_with_the_last_remote_reply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    policy = Policy(
        minimal_backoff_time=600.0, maximal_backoff_time=600.0, maximal_queue_lifetime=3600.0
    )

    async def scenario() -> None:
        async with (
            Peer(PeerScript(rcpt=TRY_LATER)) as peer,
            Peer() as home,
            running(
                tmp_path / "q", {"dest.test": via(peer), "sender.test": via(home)}, policy=policy
            ) as relay,
        ):
            queue_id = relay.submit(["bob@dest.test"])
            await relay.deferred(queue_id)
            times = []
            while relay.where(queue_id) == "deferred":
                times.append(await relay.attempt_when_due(queue_id) - T0)
                if relay.where(queue_id) == "deferred":
                    assert not home.messages, "no notice before the lifetime is over"
            # Deferred at 600..3000 s; at 3600 s (the lifetime) the next deferral expires it.
            assert times == pytest.approx([600, 1200, 1800, 2400, 3000, 3600])
            assert peer.transaction_count == 7
            notices = await home.wait_for(1)
            await relay.until(lambda: not relay.queued(), "the notice to leave the queue")

            assert len(notices) == 1
            notice = notices[0]
            assert notice.recipients == (SENDER,)
            dsn = report(notice)
            assert dsn.message["To"] == SENDER
            assert dsn.message["Subject"] == "Undelivered Mail Returned to Sender"
            assert dsn.message["Auto-Submitted"] == "auto-replied"
            assert dsn.per_message["Reporting-MTA"] == "dns; relay.test"
            bob = dsn.recipient("bob@dest.test")
            assert bob["Action"] == "failed"
            assert bob["Status"] == "4.3.0"
            assert bob["Remote-MTA"] == "dns; 127.0.0.1"  # a [literal] next hop has no name
            assert bob["Diagnostic-Code"] == "smtp; 451 4.3.0 Try again later"
            assert "451 4.3.0 Try again later" in dsn.text
            assert b"Message-ID: <scheduler-test@sender.test>" in notice.data  # returned

            assert log_lines(
                caplog, queue_id, f"from=<{SENDER}>, status=expired, returned to sender"
            )
            assert log_lines(caplog, queue_id, "sender non-delivery notification")
            assert log_lines(caplog, queue_id, "removed")

    run(scenario())


def test_null_sender_expires_after_bounce_queue_lifetime_without_a_notice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    policy = Policy(
        minimal_backoff_time=600.0,
        maximal_backoff_time=600.0,
        maximal_queue_lifetime=5 * 86400.0,
        bounce_queue_lifetime=1200.0,
    )

    async def scenario() -> None:
        async with (
            Peer(PeerScript(rcpt=TRY_LATER)) as peer,
            Peer() as home,
            running(
                tmp_path / "q", {"dest.test": via(peer), "sender.test": via(home)}, policy=policy
            ) as relay,
        ):
            bounce = relay.submit(["bob@dest.test"], sender="")
            mail = relay.submit(["carol@dest.test"])
            await relay.deferred(bounce, mail)
            # Both are due at the same times; each scan tries both.
            await relay.attempt_when_due(bounce)  # 600 s
            await relay.deferred(mail, attempts=2)
            assert relay.where(bounce) == "deferred"
            await relay.attempt_when_due(bounce)  # 1200 s: bounce_queue_lifetime reached
            await relay.gone(bounce)
            # The same age does not expire mail with a sender (maximal_queue_lifetime).
            await relay.deferred(mail, attempts=3)
            await relay.scan_finds_nothing(mail)
            assert relay.queued() == [mail]
            assert not home.all_messages
            assert log_lines(caplog, bounce, "from=<>", "status=expired")
            assert not log_lines(caplog, bounce, "notification")

    run(scenario())


def test_time_on_hold_does_not_count_towards_expiry(tmp_path: Path) -> None:
    """Two messages held for two hours under a one-hour lifetime; only the one whose
    envelope accounts for the hold (held_seconds, as postsuper -H writes it) survives."""
    policy = Policy(
        minimal_backoff_time=600.0, maximal_backoff_time=600.0, maximal_queue_lifetime=3600.0
    )

    async def scenario() -> None:
        async with (
            Peer(PeerScript(rcpt=TRY_LATER)) as peer,
            Peer() as home,
            running(
                tmp_path / "q", {"dest.test": via(peer), "sender.test": via(home)}, policy=policy
            ) as relay,
        ):
            accounted = relay.submit(["bob@dest.test"])
            control = relay.submit(["carol@dest.test"])
            await relay.deferred(accounted, control)
            relay.clock.now = T0 + 100
            for queue_id in (accounted, control):
                with relay.spool.locked(queue_id) as entry:
                    entry.move("hold", mtime=relay.clock.now)
            # Two hours pass: the qmgr never looks at hold/.
            relay.clock.now = T0 + 7300
            await relay.scan_finds_nothing(accounted, control)
            assert relay.where(accounted) == relay.where(control) == "hold"
            assert peer.transaction_count == 2
            # Released: one with the hold time recorded in its envelope, one without.
            for queue_id, held in ((accounted, 7200.0), (control, 0.0)):
                with relay.spool.locked(queue_id) as entry:
                    env = entry.read()
                    entry.write_and_move(
                        replace(env, held_seconds=held, next_attempt=relay.clock.now),
                        "deferred",
                        mtime=relay.clock.now,
                    )
            relay.sched.scan()
            await relay.gone(control)
            await relay.deferred(accounted, attempts=2)
            assert peer.transaction_count == 4
            # 100 s old for expiry: deferred for another minimal_backoff_time.
            assert relay.due(accounted) == pytest.approx(T0 + 7300 + 600)
            notices = await home.wait_for(1)
            assert len(notices) == 1
            dsn = report(notices[0])
            assert [g["Final-Recipient"] for g in dsn.per_recipient] == ["rfc822; carol@dest.test"]
            assert dsn.recipient("carol@dest.test")["Action"] == "failed"

    run(scenario())


# ---- delay warnings -------------------------------------------------------------------------


def test_one_delay_warning_after_delay_warning_time_never_for_null_sender(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    policy = Policy(
        minimal_backoff_time=600.0, maximal_backoff_time=600.0, delay_warning_time=1000.0
    )

    async def scenario() -> None:
        async with (
            Peer(PeerScript(rcpt=TRY_LATER)) as peer,
            Peer() as home,
            running(
                tmp_path / "q", {"dest.test": via(peer), "sender.test": via(home)}, policy=policy
            ) as relay,
        ):
            mail = relay.submit(["bob@dest.test"])
            bounce = relay.submit(["carol@dest.test"], sender="")
            await relay.deferred(mail, bounce)
            await relay.attempt_when_due(mail)  # 600 s: too early
            await relay.deferred(bounce, attempts=2)
            assert not relay.envelope(mail).warned
            await relay.scan_finds_nothing(mail, bounce)
            assert not home.all_messages
            await relay.attempt_when_due(mail)  # 1200 s: past delay_warning_time
            await relay.deferred(bounce, attempts=3)
            warnings = await home.wait_for(1)
            assert relay.envelope(mail).warned
            for _ in range(3):  # 1800, 2400, 3000 s
                await relay.attempt_when_due(mail)
                await relay.deferred(bounce, attempts=relay.attempts(mail))
            await relay.scan_finds_nothing(mail, bounce)
            assert len(home.all_messages) == 1, "one delay warning, never a second"
            assert not relay.envelope(bounce).warned

            warning = report(warnings[0])
            assert warning.message["Subject"] == "Delayed Mail (still being retried)"
            assert warning.message["To"] == SENDER
            bob = warning.recipient("bob@dest.test")
            assert bob["Action"] == "delayed"
            assert bob["Status"] == "4.3.0"
            assert "Will-Retry-Until" in bob
            assert "THIS IS A WARNING ONLY" in warning.text
            assert len(log_lines(caplog, "sender delay notification")) == 1
            assert log_lines(caplog, mail, "sender delay notification")

    run(scenario())


# ---- per-recipient fate ---------------------------------------------------------------------


def test_each_recipient_has_its_own_fate(tmp_path: Path) -> None:
    """250, 450 and 550 to three recipients of one message: sent once and never again,
    deferred with the remote reply, bounced with one notice."""
    script = PeerScript(
        rcpt_by_address={
            "later@dest.test": Reply(450, "4.2.0 Mailbox busy"),
            "gone@dest.test": Reply(550, "5.1.1 <gone@dest.test>: Recipient address rejected"),
        }
    )

    async def scenario() -> None:
        async with (
            Peer(script) as peer,
            Peer() as home,
            running(tmp_path / "q", {"dest.test": via(peer), "sender.test": via(home)}) as relay,
        ):
            queue_id = relay.submit(["ok@dest.test", "later@dest.test", "gone@dest.test"])
            await relay.deferred(queue_id)
            delivered = await peer.wait_for(1)
            assert delivered[0].recipients == ("ok@dest.test",)
            assert delivered[0].data == CONTENT

            env = relay.envelope(queue_id)
            states = {r.address: r for r in env.recipients}
            assert states["ok@dest.test"].state is RcptState.SENT
            later = states["later@dest.test"]
            assert later.state is RcptState.PENDING
            assert later.dsn == "4.2.0"
            assert later.reason == (
                "host 127.0.0.1[127.0.0.1] said: 450 4.2.0 Mailbox busy "
                "(in reply to RCPT TO command)"
            )
            assert later.remote_mta == "127.0.0.1"
            gone = states["gone@dest.test"]
            assert gone.state is RcptState.BOUNCED and gone.notified
            assert gone.dsn == "5.1.1"

            notices = await home.wait_for(1)
            dsn = report(notices[0])
            assert [g["Final-Recipient"] for g in dsn.per_recipient] == ["rfc822; gone@dest.test"]
            assert dsn.recipient("gone@dest.test")["Status"] == "5.1.1"
            assert dsn.recipient("gone@dest.test")["Diagnostic-Code"] == (
                "smtp; 550 5.1.1 <gone@dest.test>: Recipient address rejected"
            )
            assert dsn.recipient("gone@dest.test")["Remote-MTA"] == "dns; 127.0.0.1"

            # The next attempts are for the deferred recipient only.
            await relay.attempt_when_due(queue_id)
            await relay.attempt_when_due(queue_id)
            assert rcpt_commands(peer) == {
                "ok@dest.test": 1,
                "gone@dest.test": 1,
                "later@dest.test": 3,
            }
            assert len(peer.messages) == 1
            await relay.scan_finds_nothing(queue_id)
            assert len(home.all_messages) == 1, "the bounce was reported once"

    run(scenario())


def test_recipients_that_bounce_together_share_one_notice(tmp_path: Path) -> None:
    """Two 550s, in separate transactions (recipient limit 1), and one notice for both."""
    script = PeerScript(
        rcpt_by_address={
            "gone1@dest.test": Reply(550, "5.1.1 No such user gone1"),
            "gone2@dest.test": Reply(550, "5.1.1 No such user gone2"),
        }
    )

    async def scenario() -> None:
        async with (
            Peer(script) as peer,
            Peer() as home,
            running(
                tmp_path / "q",
                {"dest.test": via(peer), "sender.test": via(home)},
                recipient_limit=1,
            ) as relay,
        ):
            queue_id = relay.submit(["gone1@dest.test", "ok@dest.test", "gone2@dest.test"])
            await relay.gone(queue_id)
            assert peer.transaction_count == 3
            assert [m.recipients for m in peer.messages] == [("ok@dest.test",)]
            notices = await home.wait_for(1)
            await relay.until(lambda: not relay.queued(), "the notice to leave the queue")
            assert len(home.all_messages) == 1
            dsn = report(notices[0])
            assert sorted(g["Final-Recipient"] for g in dsn.per_recipient) == [
                "rfc822; gone1@dest.test",
                "rfc822; gone2@dest.test",
            ]
            assert "No such user gone1" in dsn.recipient("gone1@dest.test")["Diagnostic-Code"]
            assert "No such user gone2" in dsn.recipient("gone2@dest.test")["Diagnostic-Code"]

    run(scenario())


def test_null_sender_bounce_gets_no_notice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    script = PeerScript(rcpt=Reply(550, "5.1.1 No such user"))

    async def scenario() -> None:
        async with (
            Peer(script) as peer,
            Peer() as home,
            running(tmp_path / "q", {"dest.test": via(peer), "sender.test": via(home)}) as relay,
        ):
            # A notice of our own, bouncing: it must not produce another notice.
            queue_id = relay.submit(["bob@dest.test"], sender="")
            await relay.gone(queue_id)
            assert peer.transaction_count == 1
            assert relay.queued() == [], "no notice was queued"
            await relay.scan_finds_nothing()
            assert not home.all_messages
            assert log_lines(caplog, queue_id, "to=<bob@dest.test>", "status=bounced")
            assert not log_lines(caplog, queue_id, "notification")

    run(scenario())


# ---- dead destinations ----------------------------------------------------------------------


def test_dead_destination_is_suspended_until_minimal_backoff_time_or_flush(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with (
            Peer(PeerScript(greeting=SHUTTING_DOWN)) as peer,
            running(
                tmp_path / "q",
                {"dest.test": via(peer)},
                initial_concurrency=1,
                failed_cohort_limit=1.0,
            ) as relay,
        ):
            first = [relay.submit([f"u{i}@dest.test"]) for i in range(5)]
            await relay.deferred(*first)
            # One cohort (window 1: one session) failed: the destination is dead.
            assert peer.connection_count == 1
            reasons = sorted(
                relay.recipient(q, f"u{i}@dest.test").reason for i, q in enumerate(first)
            )
            refused = (
                "host 127.0.0.1[127.0.0.1] refused to talk to me: 421 4.3.2 Service shutting down"
            )
            assert reasons == sorted([refused] + [f"delivery temporarily suspended: {refused}"] * 4)

            # New mail for it within minimal_backoff_time: deferred without connecting.
            relay.clock.now = T0 + 200
            late = relay.submit(["late@dest.test"])
            await relay.deferred(late)
            assert peer.connection_count == 1
            assert relay.recipient(late, "late@dest.test").reason.startswith(
                "delivery temporarily suspended: "
            )

            # minimal_backoff_time later the destination is tried again (and dies again).
            relay.clock.now = T0 + 300
            relay.sched.scan()
            await relay.deferred(*first, attempts=2)
            assert peer.connection_count == 2

            # flush (postqueue -f) forgets the dead destination: one new cohort at once.
            relay.sched.flush()
            await relay.deferred(*first, attempts=3)
            await relay.deferred(late, attempts=2)
            assert peer.connection_count == 3

    run(scenario())


def test_rcpt_refusals_do_not_kill_a_destination(tmp_path: Path) -> None:
    """Only connection and handshake failures count towards a dead destination."""

    async def scenario() -> None:
        async with (
            Peer(PeerScript(rcpt=TRY_LATER)) as peer,
            running(
                tmp_path / "q",
                {"dest.test": via(peer)},
                initial_concurrency=1,
                concurrency_limit=1,
                failed_cohort_limit=1.0,
            ) as relay,
        ):
            queue_ids = [relay.submit([f"u{i}@dest.test"]) for i in range(4)]
            await relay.deferred(*queue_ids)
            assert peer.transaction_count == 4
            for i, queue_id in enumerate(queue_ids):
                reason = relay.recipient(queue_id, f"u{i}@dest.test").reason
                assert "suspended" not in reason

    run(scenario())


# ---- concurrency ----------------------------------------------------------------------------


def in_transaction(peer: Peer) -> int:
    """Sessions the peer is in the middle of a transaction with (MAIL answered, no final
    reply yet): always within a delivery of the client, so never more than it runs."""
    done = Counter(message.session for message in peer.all_messages)
    busy = 0
    for session in peer.sessions:
        if session.closed:
            continue
        mails = sum(1 for verb in session.verbs() if verb == "MAIL")
        busy += mails > done[session.number]
    return busy


async def sample(probe: Callable[[], int], done: Callable[[], bool], timeout: float = 10.0) -> int:
    """The largest value of probe() seen until done() (polled every few milliseconds)."""
    peak = 0
    deadline = time.monotonic() + timeout
    while not done():
        peak = max(peak, probe())
        if time.monotonic() > deadline:
            raise AssertionError("timed out while sampling")
        await asyncio.sleep(0.002)
    return max(peak, probe())


def test_destination_concurrency_limit(tmp_path: Path) -> None:
    slow = PeerScript(mail_reply_delay=0.15)

    async def scenario() -> None:
        counting = CountingDelivery()
        async with (
            Peer(slow) as peer,
            running(
                tmp_path / "q", {"dest.test": via(peer)}, concurrency_limit=2, delivery=counting
            ) as relay,
        ):
            for i in range(10):
                relay.submit([f"u{i}@dest.test"])
            peak_at_peer = await sample(
                lambda: in_transaction(peer), lambda: len(peer.messages) >= 10
            )
            await relay.until(lambda: not relay.queued(), "all ten delivered")
            assert counting.peak[f"[{peer.host}]:{peer.port}"] == 2
            assert 1 <= peak_at_peer <= 2
            assert len(peer.messages) == 10

    run(scenario())


def test_process_limit_caps_deliveries_across_destinations(tmp_path: Path) -> None:
    slow = PeerScript(mail_reply_delay=0.15)

    async def scenario() -> None:
        counting = CountingDelivery()
        async with (
            Peer(slow) as one,
            Peer(slow) as two,
            running(
                tmp_path / "q",
                {"one.test": via(one), "two.test": via(two)},
                concurrency_limit=5,
                process_limit=3,
                delivery=counting,
            ) as relay,
        ):
            for i in range(6):
                relay.submit([f"u{i}@one.test"])
                relay.submit([f"u{i}@two.test"])
            peak_at_peers = await sample(
                lambda: in_transaction(one) + in_transaction(two),
                lambda: len(one.messages) + len(two.messages) >= 12,
            )
            await relay.until(lambda: not relay.queued(), "all twelve delivered")
            assert counting.peak_total == 3
            assert 1 <= peak_at_peers <= 3

    run(scenario())


def test_recipient_limit_splits_transactions(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            Peer() as peer,
            running(tmp_path / "q", {"dest.test": via(peer)}, recipient_limit=2) as relay,
        ):
            recipients = [f"u{i}@dest.test" for i in range(5)]
            queue_id = relay.submit(recipients)
            await relay.gone(queue_id)
            assert peer.transaction_count == 3
            sizes = sorted(len(m.recipients) for m in peer.messages)
            assert sizes == [1, 2, 2]
            assert sorted(r for m in peer.messages for r in m.recipients) == recipients

    run(scenario())


def test_active_queue_limit(tmp_path: Path) -> None:
    queue_dir = tmp_path / "q"
    active_dir = queue_dir / "active"

    async def scenario() -> None:
        spool = Spool(str(queue_dir))
        for i in range(10):
            spool.enqueue(
                Envelope("", SENDER, (Recipient(f"u{i}@dest.test"),), arrival_time=T0), CONTENT
            )
        async with (
            Peer(PeerScript(mail_reply_delay=0.05)) as peer,
            running(queue_dir, {"dest.test": via(peer)}, active_limit=3) as relay,
        ):
            # Both the files in active/ and the qmgr's own count of active messages.
            peak = await sample(
                lambda: max(len(os.listdir(active_dir)), len(relay.sched.messages)),
                lambda: len(peer.messages) >= 10,
            )
            await relay.until(lambda: not relay.queued(), "all ten delivered")
            assert peak == 3
            assert len(peer.messages) == 10

    run(scenario())


# ---- recovery -------------------------------------------------------------------------------


def test_messages_left_in_active_are_recovered_with_their_recipient_states(
    tmp_path: Path,
) -> None:
    queue_dir = tmp_path / "q"

    def leave_in_active(spool: Spool, recipients: Sequence[Recipient], sender: str = SENDER) -> str:
        env = spool.enqueue(
            Envelope("", sender, tuple(Recipient(r.address) for r in recipients), T0), CONTENT
        )
        with spool.locked(env.queue_id) as entry:
            entry.write(entry.read().with_recipients(tuple(recipients)))
            entry.move("active")
        return env.queue_id

    async def scenario() -> None:
        spool = Spool(str(queue_dir))
        half = leave_in_active(
            spool,
            [
                Recipient("done@dest.test", RcptState.SENT, "250 2.0.0 Ok", "2.0.0", "peer.test"),
                Recipient("todo@dest.test"),
            ],
        )
        # Killed after marking a bounce but before its notice was queued.
        unreported = leave_in_active(
            spool,
            [
                Recipient("done2@dest.test", RcptState.SENT, "250 2.0.0 Ok", "2.0.0"),
                Recipient(
                    "gone@dest.test",
                    RcptState.BOUNCED,
                    "host peer.test[127.0.0.1] "
                    "said: 550 5.1.1 No such user (in reply to RCPT TO command)",
                    "5.1.1",
                    "peer.test",
                ),
            ],
        )
        assert sorted(e.queue_id for e in spool.scan("active")) == sorted([half, unreported])
        async with (
            Peer() as peer,
            Peer() as home,
            running(queue_dir, {"dest.test": via(peer), "sender.test": via(home)}) as relay,
        ):
            await relay.gone(half, unreported)
            delivered = await peer.wait_for(1)
            notices = await home.wait_for(1)
            await relay.until(lambda: not relay.queued(), "the notice to leave the queue")
            assert peer.transaction_count == 1
            assert delivered[0].recipients == ("todo@dest.test",)
            assert rcpt_commands(peer) == {"todo@dest.test": 1}
            assert len(notices) == 1
            dsn = report(notices[0])
            assert [g["Final-Recipient"] for g in dsn.per_recipient] == ["rfc822; gone@dest.test"]

    run(scenario())


# ---- discard: and error: ----------------------------------------------------------------------


def test_discard_and_error_transports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        async with (
            Peer() as home,
            running(
                tmp_path / "q",
                {
                    "discard.test": "discard:",
                    "err.test": "error:5.1.1 no such user here",
                    "sender.test": via(home),
                },
            ) as relay,
        ):
            queue_id = relay.submit(["x@discard.test", "y@err.test"])
            await relay.gone(queue_id)
            notices = await home.wait_for(1)

            sent = log_lines(caplog, queue_id, "to=<x@discard.test>", "status=sent")
            assert len(sent) == 1, "one log line per delivery"
            assert sent[0].name == "relay.discard"
            assert "relay=none" in sent[0].getMessage()
            assert "dsn=2.0.0" in sent[0].getMessage()

            bounced = log_lines(caplog, queue_id, "to=<y@err.test>", "status=bounced")
            assert len(bounced) == 1
            assert bounced[0].name == "relay.error"
            assert bounced[0].getMessage().endswith("dsn=5.1.1, status=bounced (no such user here)")
            assert log_lines(caplog, queue_id, "removed")

            dsn = report(notices[0])
            y = dsn.recipient("y@err.test")
            assert y["Status"] == "5.1.1"
            assert y["Diagnostic-Code"] == "X-Relay; no such user here"
            assert [g["Final-Recipient"] for g in dsn.per_recipient] == ["rfc822; y@err.test"]

    run(scenario())


# ---- MX resolution --------------------------------------------------------------------------


class DownHostFirst(random.Random):
    """Orders MX hosts of equal preference with the one named first (instead of at random)."""

    def __init__(self, first: str) -> None:
        super().__init__(0)
        self.first = first

    def shuffle(self, x: Any, *args: Any) -> None:
        x.sort(key=lambda name: name != self.first)


async def peer_pair(good: PeerScript, bad: PeerScript) -> tuple[Peer, Peer]:
    """A peer on 127.0.0.2 and one on 127.0.0.3 with the same port (MX hosts share it)."""
    for _ in range(10):
        first = await Peer(good, host="127.0.0.2").start()
        try:
            second = await Peer(bad, host="127.0.0.3", port=first.port).start()
        except OSError:
            await first.stop()
            continue
        return first, second
    raise RuntimeError("no port free on both 127.0.0.2 and 127.0.0.3")


def test_equal_preference_mx_next_host_after_a_refusal(
    tmp_path: Path, dns_server: LoopbackDNS
) -> None:
    dns_server.zone.add_mx("example.test", 10, "mx-a.example.test")
    dns_server.zone.add_mx("example.test", 10, "mx-b.example.test")
    dns_server.zone.add_a("mx-a.example.test", "127.0.0.2")
    dns_server.zone.add_a("mx-b.example.test", "127.0.0.3")

    async def scenario() -> None:
        good, refusing = await peer_pair(PeerScript(), PeerScript(greeting=SHUTTING_DOWN))
        try:
            async with (
                Peer() as home,
                running(
                    tmp_path / "q",
                    {"example.test": f"smtp:example.test:{good.port}", "sender.test": via(home)},
                    dns=dns_server,
                    rng=DownHostFirst("mx-b.example.test"),
                ) as relay,
            ):
                queue_id = relay.submit(["bob@example.test"])
                await relay.gone(queue_id)
                assert refusing.connection_count == 1  # tried first, refused
                assert [m.recipients for m in good.messages] == [("bob@example.test",)]
                assert not home.all_messages
        finally:
            await good.stop()
            await refusing.stop()

    run(scenario())


def test_equal_preference_mx_either_order_delivers(tmp_path: Path, dns_server: LoopbackDNS) -> None:
    """With the real random order: whichever host comes first, the mail gets through."""
    dns_server.zone.add_mx("example.test", 10, "mx-a.example.test")
    dns_server.zone.add_mx("example.test", 10, "mx-b.example.test")
    dns_server.zone.add_a("mx-a.example.test", "127.0.0.2")
    dns_server.zone.add_a("mx-b.example.test", "127.0.0.3")

    async def scenario() -> None:
        good, refusing = await peer_pair(PeerScript(), PeerScript(greeting=SHUTTING_DOWN))
        try:
            async with running(
                tmp_path / "q",
                {"example.test": f"smtp:example.test:{good.port}"},
                dns=dns_server,
                rng=random.Random(1),
                failed_cohort_limit=0,
            ) as relay:
                queue_ids = [relay.submit([f"u{i}@example.test"]) for i in range(6)]
                await relay.gone(*queue_ids)
                assert len(good.messages) == 6
                assert refusing.connection_count >= 1, "six shuffles never put mx-b first"
        finally:
            await good.stop()
            await refusing.stop()

    run(scenario())


def test_null_mx_bounces_at_once(tmp_path: Path, dns_server: LoopbackDNS) -> None:
    dns_server.zone.add_null_mx("nullmx.test")

    async def scenario() -> None:
        async with (
            Peer() as home,
            running(tmp_path / "q", {"sender.test": via(home)}, dns=dns_server) as relay,
        ):
            queue_id = relay.submit(["bob@nullmx.test"])
            await relay.gone(queue_id)
            notices = await home.wait_for(1)
            bob = report(notices[0]).recipient("bob@nullmx.test")
            assert bob["Status"] == "5.1.10"
            assert bob["Diagnostic-Code"] == (
                "X-Relay; Domain nullmx.test does not accept mail (nullMX)"
            )
            assert not [q for q in dns_server.queries if q.qtype in ("A", "AAAA")]

    run(scenario())


def test_nxdomain_bounces(tmp_path: Path, dns_server: LoopbackDNS) -> None:
    async def scenario() -> None:
        async with (
            Peer() as home,
            running(tmp_path / "q", {"sender.test": via(home)}, dns=dns_server) as relay,
        ):
            queue_id = relay.submit(["bob@nxdomain.test"])
            await relay.gone(queue_id)
            notices = await home.wait_for(1)
            bob = report(notices[0]).recipient("bob@nxdomain.test")
            assert bob["Status"] == "5.4.4"
            assert "name=nxdomain.test type=MX: Host not found" in bob["Diagnostic-Code"]

    run(scenario())


def test_servfail_defers(tmp_path: Path, dns_server: LoopbackDNS) -> None:
    dns_server.zone.fault("servfail.test", dnsserver.Fault.SERVFAIL)

    async def scenario() -> None:
        async with (
            Peer() as home,
            running(tmp_path / "q", {"sender.test": via(home)}, dns=dns_server) as relay,
        ):
            queue_id = relay.submit(["bob@servfail.test"])
            await relay.deferred(queue_id)
            bob = relay.recipient(queue_id, "bob@servfail.test")
            assert bob.state is RcptState.PENDING
            assert bob.dsn == "4.4.3"
            assert bob.reason == (
                "Host or domain name not found. Name service error for "
                "name=servfail.test type=MX: Host not found, try again"
            )
            await relay.scan_finds_nothing(queue_id)
            assert not home.all_messages

    run(scenario())


def test_backup_mx_defers_never_bounces(tmp_path: Path, dns_server: LoopbackDNS) -> None:
    """relay.test (myhostname) is a worse MX: mail goes only to the better MX, and when
    that fails (down, or without an address) it is deferred, never bounced."""
    zone = dns_server.zone
    zone.add_mx("down.test", 10, "primary.down.test").add_mx("down.test", 20, "relay.test")
    zone.add_a("primary.down.test", "127.0.0.2")
    zone.add_mx("noaddr.test", 10, "primary.noaddr.test").add_mx("noaddr.test", 20, "relay.test")
    # Without the backup MX role the same missing address is a bounce.
    zone.add_mx("plain.test", 10, "primary.plain.test")

    async def scenario() -> None:
        async with (
            Peer(PeerScript(greeting=SHUTTING_DOWN), host="127.0.0.2") as primary,
            Peer() as home,
            running(
                tmp_path / "q",
                {
                    "down.test": f"smtp:down.test:{primary.port}",
                    "sender.test": via(home),
                },
                dns=dns_server,
            ) as relay,
        ):
            down = relay.submit(["bob@down.test"])
            noaddr = relay.submit(["bob@noaddr.test"])
            plain = relay.submit(["bob@plain.test"])
            await relay.deferred(down, noaddr)
            await relay.gone(plain)
            assert primary.connection_count == 1
            assert relay.recipient(down, "bob@down.test").reason == (
                "host primary.down.test[127.0.0.2] refused to talk to me: "
                "421 4.3.2 Service shutting down"
            )
            assert relay.recipient(noaddr, "bob@noaddr.test").dsn == "4.4.4"
            assert relay.recipient(noaddr, "bob@noaddr.test").reason == (
                "unable to find primary relay for noaddr.test"
            )
            # Later attempts: still deferred.
            await relay.attempt_when_due(down)
            await relay.deferred(noaddr, attempts=2)
            assert relay.where(down) == relay.where(noaddr) == "deferred"
            notices = await home.wait_for(1)
            await relay.scan_finds_nothing(down, noaddr)
            assert len(home.all_messages) == 1
            dsn = report(notices[0])
            assert [g["Final-Recipient"] for g in dsn.per_recipient] == ["rfc822; bob@plain.test"]
            assert dsn.recipient("bob@plain.test")["Status"] == "5.4.4"

    run(scenario())
