"""postsuper while the daemon is delivering the very message it acts on.

The next hop is a slow SMTP peer: it takes the whole message, then waits before its
final 250, so the message sits in active/ with its content already sent when the
operator acts.  Whatever the operator asked for must be the end state (hold stays
held, a deleted message stays gone, a requeued one is tried again), the recipients
the peer accepted must be marked done and never sent twice, and the daemon must keep
running without logging a crash.  One recipient, busy@example.net, is refused with
450 at RCPT so that some mail is left to deliver after the race.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from aiosmtpd.controller import Controller

from spool import RcptState, Spool
from tests.support.daemon import RelayDaemon, free_port

pytestmark = pytest.mark.timeout(60)

MakeDaemon = Callable[..., RelayDaemon]
QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")
QUEUED = re.compile(r"Ok: queued as (\S+)")
SLOW = {"minimal_backoff_time": "1h", "maximal_backoff_time": "1h", "queue_run_delay": "1h"}
DELAY = 2.0  # seconds the peer waits before its final reply
GOOD, BUSY = "good@example.net", "busy@example.net"


class SlowPeer:
    """aiosmtpd handler: 450 for BUSY at RCPT, 250 for the rest after DELAY seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.rcpt_attempts: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()  # recipient -> times the peer said 250
        self.transactions = 0
        self.in_data = threading.Event()
        self.port = 0

    async def handle_RCPT(self, server: object, session: object, envelope: object,
                          address: str, rcpt_options: list[str]) -> str:
        with self.lock:
            self.rcpt_attempts[address] += 1
        if address == BUSY:
            return "450 4.2.0 mailbox busy"
        envelope.rcpt_tos.append(address)  # type: ignore[attr-defined]
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        with self.lock:
            self.transactions += 1
        self.in_data.set()  # the content is here; the daemon now waits for our reply
        await asyncio.sleep(self.delay)
        with self.lock:
            for rcpt in envelope.rcpt_tos:  # type: ignore[attr-defined]
                self.accepted[rcpt] += 1
        return "250 2.0.0 Ok: queued"


@pytest.fixture
def peer() -> Iterator[SlowPeer]:
    handler = SlowPeer(DELAY)
    handler.port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=handler.port)
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()


@pytest.fixture
def daemon(relay_daemon: MakeDaemon, peer: SlowPeer) -> Iterator[RelayDaemon]:
    d = relay_daemon({**SLOW, "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{peer.port} }}"})
    yield d
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    log = d.log()
    for bad in ("Traceback", "error:", "fatal:", "panic", "cannot record", "cannot finish"):
        assert bad not in log, log


def submit(d: RelayDaemon, *rcpts: str) -> str:
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("alice@example.org")
        for rcpt in rcpts:
            s.rcpt(rcpt)
        code, text = s.data(b"Subject: race\r\n\r\nhello\r\n")
        assert code == 250, text
    m = QUEUED.search(text.decode())
    assert m is not None
    return m.group(1)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def where(d: RelayDaemon, queue_id: str) -> list[str]:
    return [q for q in QUEUES if queue_id in d.queue_files(q)]


def postsuper(d: RelayDaemon, *args: str) -> str:
    r = d.run_cmd("postsuper", *args)
    assert r.returncode == 0, r.stderr
    return r.stderr.decode()


def in_flight(d: RelayDaemon, peer: SlowPeer, *rcpts: str) -> str:
    """Submit a message and return once the peer holds its content, reply pending."""
    qid = submit(d, *rcpts)
    assert peer.in_data.wait(10), "the daemon never reached DATA"
    assert where(d, qid) == ["active"]
    return qid


def states(d: RelayDaemon, queue: str, queue_id: str) -> dict[str, RcptState]:
    env = Spool(str(d.queue_directory), create=False).read(queue, queue_id)
    return {r.address: r.state for r in env.recipients}


def test_hold_during_delivery(daemon: RelayDaemon, peer: SlowPeer) -> None:
    qid = in_flight(daemon, peer, GOOD, BUSY)
    assert postsuper(daemon, "-h", qid) == (
        f"postsuper: {qid}: placed on hold\npostsuper: Placed on hold: 1 message\n")
    daemon.wait_log(f"{qid}: to=<{GOOD}>", timeout=DELAY + 5)
    # The delivery finished after the hold: recorded in hold/, left in hold/.
    wait_until(lambda: states(daemon, "hold", qid)[GOOD] is RcptState.SENT, what="recording")
    time.sleep(0.5)
    assert where(daemon, qid) == ["hold"]
    assert states(daemon, "hold", qid)[BUSY] is RcptState.PENDING
    assert daemon.log().count(f"{qid}: from=<") == 1

    postsuper(daemon, "-H", qid)
    wait_until(lambda: peer.rcpt_attempts[BUSY] == 2, what="the pending recipient retried")
    wait_until(lambda: where(daemon, qid) == ["deferred"], what="deferral")
    assert states(daemon, "deferred", qid) == {GOOD: RcptState.SENT, BUSY: RcptState.PENDING}
    assert peer.rcpt_attempts[GOOD] == 1
    assert peer.accepted == {GOOD: 1}


def test_delete_during_delivery(daemon: RelayDaemon, peer: SlowPeer) -> None:
    qid = in_flight(daemon, peer, GOOD)
    assert postsuper(daemon, "-d", qid) == (
        f"postsuper: {qid}: removed\npostsuper: Deleted: 1 message\n")
    assert where(daemon, qid) == []
    daemon.wait_log(f"{qid}: message was removed during delivery", timeout=DELAY + 5)
    assert peer.accepted == {GOOD: 1}  # too late to stop that one: it was on the wire
    # Not resurrected: not by the end of the delivery, not by a flush.
    assert daemon.run_cmd("postqueue", "-f").returncode == 0
    time.sleep(0.5)
    assert where(daemon, qid) == []
    assert not (daemon.queue_directory / "data" / qid).exists()
    assert daemon.log().count(f"{qid}: from=<") == 1


def test_requeue_during_delivery(daemon: RelayDaemon, peer: SlowPeer) -> None:
    qid = in_flight(daemon, peer, GOOD, BUSY)
    assert postsuper(daemon, "-r", qid) == (
        f"postsuper: {qid}: requeued\npostsuper: Requeued: 1 message\n")
    # After the delivery the requeued message is tried again at once, without GOOD.
    wait_until(lambda: daemon.log().count(f"{qid}: from=<") == 2, timeout=DELAY + 5,
               what="the requeued message taken again")
    wait_until(lambda: peer.rcpt_attempts[BUSY] == 2, what="the pending recipient retried")
    wait_until(lambda: where(daemon, qid) == ["deferred"], what="deferral")
    assert states(daemon, "deferred", qid) == {GOOD: RcptState.SENT, BUSY: RcptState.PENDING}
    assert peer.rcpt_attempts[GOOD] == 1
    assert peer.accepted == {GOOD: 1}


def test_requeue_of_a_fully_delivered_message_removes_it(daemon: RelayDaemon,
                                                         peer: SlowPeer) -> None:
    qid = in_flight(daemon, peer, GOOD)
    postsuper(daemon, "-r", qid)
    daemon.wait_log(f"{qid}: removed", timeout=DELAY + 5)
    wait_until(lambda: where(daemon, qid) == [], what="removal")
    assert peer.accepted == {GOOD: 1}
    assert peer.transactions == 1


def test_hold_and_release_before_the_delivery_ends(daemon: RelayDaemon,
                                                   peer: SlowPeer) -> None:
    """Released while the daemon still works on it: it must not wait for the next
    deferred-queue scan (an hour here) to be tried again."""
    qid = in_flight(daemon, peer, GOOD, BUSY)
    postsuper(daemon, "-h", qid)
    postsuper(daemon, "-H", qid)
    assert where(daemon, qid) == ["deferred"]
    daemon.wait_log(f"{qid}: to=<{GOOD}>", timeout=DELAY + 5)
    wait_until(lambda: peer.rcpt_attempts[BUSY] == 2, timeout=5,
               what="the released message tried again")
    wait_until(lambda: where(daemon, qid) == ["deferred"]
               and states(daemon, "deferred", qid)[GOOD] is RcptState.SENT, what="deferral")
    assert peer.accepted == {GOOD: 1}


def test_many_messages_and_mixed_actions(daemon: RelayDaemon, peer: SlowPeer) -> None:
    ids = [submit(daemon, f"u{n}@example.net") for n in range(6)]
    assert peer.in_data.wait(10)
    wait_until(lambda: sum(1 for i in ids if where(daemon, i) == ["active"]) == 6,
               what="all in flight")
    hold, delete, requeue = ids[0:2], ids[2:4], ids[4:6]
    args = [a for i in hold for a in ("-h", i)] + [a for i in delete for a in ("-d", i)] \
        + [a for i in requeue for a in ("-r", i)]
    err = postsuper(daemon, *args)
    assert err.endswith("postsuper: Requeued: 2 messages\npostsuper: Deleted: 2 messages\n"
                        "postsuper: Placed on hold: 2 messages\n")
    wait_until(lambda: all(where(daemon, i) == [] for i in delete + requeue),
               timeout=DELAY + 8, what="deliveries finished")
    for i in hold:
        assert where(daemon, i) == ["hold"]
        assert states(daemon, "hold", i) == {f"u{ids.index(i)}@example.net": RcptState.SENT}
    assert peer.accepted == {f"u{n}@example.net": 1 for n in range(6)}
