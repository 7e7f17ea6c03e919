"""The queue manager's scheduler (Postfix's qmgr at work): what is delivered when, and
what follows.  The process it runs in, with its control socket and triggers, is
relay.qmgrd's.

It owns the in-memory view of the active queue: which messages are being worked on,
per-destination concurrency and dead destinations, and the deferred-queue scan.
It never talks SMTP and never routes by itself: it asks a ``DeliveryAgent`` (the SMTP
client, relay.delivery), a ``NextHopLookup`` and a ``HostLookup`` (relay.routing's Router
and Resolver), the narrow interfaces defined below, and gets values back.  It never
builds a spool path (spool.store does).  Every state change goes through the
spool under the message's lock, so an admin command that moved or removed a
message meanwhile wins: we then only record which recipients were delivered.
Each recipient outcome it logs (a ``to=`` line, or an expiry) also goes, as a
relay.outcome.Report, to its ``observers``: the accounting log and the metrics.
``relay drain --to`` makes it send every message to one peer relay (``hand_off``),
where a refusal defers instead of bouncing.

What a crash leaves: messages in active/ whose recipients are marked as far as
the last completed transaction; at start they are scheduled again and only their
pending recipients are tried (at most the one transaction in flight at the kill
is repeated: RFC 1047's window).  A bounced recipient is marked ``notified`` only
after its notice is queued, so a crash repeats a notice rather than losing it; the same
holds for a delivered recipient whose sender asked for a success notice (RFC 3461
NOTIFY=SUCCESS): it is recorded as sent together with the notice it is owed
(``dsn_action``), and marked ``notified`` only once that notice is queued.

Which notices go out follows each recipient's NOTIFY, as Postfix's bounce daemon filters
them: NEVER suppresses every notice, a list names the ones wanted, none at all means
failure and delay notices.  A success notice is owed for a discarded ("delivered") or an
SMTP delivery to a next hop that did not offer DSN ("relayed"); a next hop that offered
DSN took the request along with the recipient.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from relay import bounce, maildir, outcome
from relay import dsn as dsn_mod
from relay.clock import Clock, SystemClock
from relay.delivery import (
    Attempt,
    DeliverySettings,
    MailOptions,
    RcptOptions,
    RcptResult,
    RcptStatus,
    TargetLike,
    TlsPlan,
)
from relay.outcome import Fate, Policy, Report, Status
from relay.routing import NextHop, Resolution, RouteError
from relay.tls.destination import Planner
from relay.tls.policy import TlsEvent, tls_not_required
from spool import (
    CorruptEntry,
    EntryGone,
    Envelope,
    RcptState,
    Recipient,
    Spool,
    SpoolError,
    transitions,
)
from spool.fsync import Syncer
from spool.store import Steps, run_steps, run_steps_async
from spool.transitions import Transition

# Messages up to this size keep their content in memory while active (at most
# qmgr_message_active_limit of them); bigger ones are read from disk per attempt.
CONTENT_CACHE_MAX = 16 * 1024
# Content up to this size is read on the event loop at each attempt (from the page cache,
# tens of microseconds); a thread hop costs more than that.  Bigger content is read in a
# thread.
CONTENT_READ_INLINE_MAX = 256 * 1024
# Messages moved to active/ in one thread hop.
ACTIVATE_BATCH = 64
# What the scans of active/ (at start), incoming/ and deferred/ find waits in a backlog (one
# for incoming/, one for deferred/, taken in turn) and is brought in a few at a time, each
# few between two turns of the event loop, while at most BACKLOG_IN_MEMORY messages are in
# memory: mail the listener triggers (and a flush of one message) comes in first, up to
# qmgr_message_active_limit, so new mail never waits behind a flushed queue, and memory
# stays bounded however deep the queue.
BACKLOG_BATCH = 16
BACKLOG_IN_MEMORY = 1000

log = logging.getLogger("relay.qmgr")
smtp_log = logging.getLogger("relay.smtp")
bounce_log = logging.getLogger("relay.bounce")
agent_log = {name: logging.getLogger(f"relay.{name}")
             for name in ("smtp", "discard", "error", "local")}
# Delivery agents that deliver finally, not to another MTA: a success notice for their
# recipients says "delivered" (Postfix's discard and local), not "relayed".
FINAL_DELIVERY_AGENTS = frozenset({"discard", "local"})


class DeliveryAgent(Protocol):
    """What the queue manager asks of a delivery agent (Postfix's qmgr of smtp(8)): one
    transaction with the servers of one next hop, its outcome returned as a value, never
    raised.  relay.delivery.SMTPDelivery is the one the daemon runs."""

    async def deliver(
        self,
        targets: Sequence[TargetLike],
        nexthop_label: str,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        settings: DeliverySettings,
        *,
        options: MailOptions = ...,
        rcpt_options: Sequence[RcptOptions] = ...,
        tls: TlsPlan | None = ...,
    ) -> Attempt: ...

    async def close(self) -> None:
        """The queue manager stops: let go of every connection kept for reuse."""


class NextHopLookup(Protocol):
    """What the queue manager asks of the address resolver (Postfix's trivial-rewrite
    ``resolve``): the transport and next hop of a recipient.  relay.routing.Router."""

    def next_hop(self, recipient: str) -> NextHop: ...


class HostLookup(Protocol):
    """What the queue manager asks before an SMTP delivery (Postfix's smtp_addr.c): the
    servers of a next hop, in the order to try them, or why there are none.
    relay.routing.Resolver."""

    async def resolve(self, hop: NextHop, domain: str) -> Resolution: ...


@dataclass(frozen=True, slots=True)
class QmgrSettings:
    myhostname: str
    mail_name: str = "relay"
    queue_run_delay: float = 300.0
    active_limit: int = 20000
    recipient_limit: int = 50
    concurrency_limit: int = 20
    initial_concurrency: int = 5
    process_limit: int = 100
    failed_cohort_limit: float = 1.0
    # soft_bounce: what would bounce is deferred (the policy keeps expired mail too).
    soft_bounce: bool = False
    # defer_transports: transports that deliver only when flushed (postqueue -f, -i, -s).
    defer_transports: frozenset[str] = frozenset()
    policy: Policy = field(default_factory=Policy)
    delivery: DeliverySettings = field(default_factory=lambda: DeliverySettings(helo_name="localhost"))


@dataclass
class Destination:
    """Per-destination state: Postfix's qmgr_queue (window, failed cohorts, dead)."""

    name: str
    window: int
    busy: int = 0
    fail_cohorts: float = 0.0
    dead_until: float = 0.0
    dead_reason: str = ""
    waiting: deque[Job] = field(default_factory=deque)


@dataclass
class Message:
    queue_id: str
    envelope: Envelope
    active_since: float
    jobs_left: int = 0
    # Requeued or released by postsuper while we delivered it: take it again as soon
    # as it is out of self.messages (a scan meanwhile skipped it as ours).
    again: bool = False
    # Fates of finished jobs being written while other jobs still run.
    recording: list[asyncio.Future[None]] = field(default_factory=list)
    # The content of a small message, read when it was activated.
    content: bytes | None = None
    # Activated by a flush (postqueue -f, -i, -s): defer_transports do not hold it back.
    flushed: bool = False

    def mail_options(self) -> MailOptions:
        env = self.envelope
        return MailOptions(env.dsn_envid, env.dsn_ret, env.smtputf8)

    def rcpt_options(self, addresses: list[str]) -> list[RcptOptions]:
        """Each recipient's NOTIFY and ORCPT, to go on to a next hop that offers DSN."""
        env = self.envelope
        by_address = {r.address: r for r in env.recipients}
        options = []
        for address in addresses:
            rcpt = by_address.get(address)
            if rcpt is None:
                options.append(RcptOptions())
                continue
            orcpt = dsn_mod.original_recipient(rcpt.dsn_orcpt, address)
            options.append(RcptOptions(rcpt.dsn_notify, orcpt))
        return options


@dataclass
class Job:
    message: Message
    hop: NextHop
    domain: str
    recipients: list[str]


@dataclass(frozen=True, slots=True)
class Result:
    """One recipient's outcome with what the log line needs."""

    rcpt: RcptResult
    relay: str
    delays: tuple[float, float, float, float]
    program: str = "smtp"  # the Postfix delivery agent that would log it
    softened: bool = False  # a bounce that soft_bounce turned into a deferral


def soften(results: list[Result]) -> list[Result]:
    """soft_bounce = yes, as Postfix's bounce_append(): a recipient that would bounce is
    deferred instead, its status class 5 made 4; logged as ``status=SOFTBOUNCE``."""
    return [replace(r, rcpt=replace(r.rcpt, status=RcptStatus.DEFER,
                                    dsn="4" + r.rcpt.dsn[1:] if r.rcpt.dsn else "4.0.0"),
                    softened=True)
            if r.rcpt.status is RcptStatus.BOUNCE else r for r in results]


_SAID = re.compile(r"^host \S+ said: (?P<reply>[2-5]\d\d[ -].*?)(?: \(in reply to [^)]*\))?$")
_DELIVERY_VIA = re.compile(r"^delivery via \S+: (?P<reply>[2-5]\d\d[ -].*|[2-5]\d\d)$")


def _diagnostic(reason: str) -> str:
    """The remote reply as received, from Postfix's ``host X said: REPLY (in reply to
    ...)`` or ``delivery via X: REPLY`` reason text; a local reason stays as it is
    (RFC 3464 Diagnostic-Code)."""
    m = _SAID.match(reason) or _DELIVERY_VIA.match(reason)
    return m.group("reply") if m else reason


def _kept(result: Result) -> Result:
    """A handed-off recipient the peer refused stays queued here: deferred, not bounced
    (the peer's refusal says nothing of the recipient; it may just not relay for us)."""
    r = result.rcpt
    if r.status is not RcptStatus.BOUNCE:
        return result
    dsn = "4" + r.dsn[1:] if r.dsn[:1] == "5" else r.dsn
    return replace(result, rcpt=replace(r, status=RcptStatus.DEFER, dsn=dsn,
                                        reason=f"handoff refused: {r.reason}"))


def success_action(result: Result) -> str:
    """The Action of the success notice a NOTIFY=SUCCESS recipient is owed after this
    delivery: "delivered" by a final delivery agent, "relayed" to a next hop that did not
    offer DSN, "" when the next hop offered DSN and the request went on with the
    recipient (Postfix's smtp_rcpt_done(): no notice of ours then)."""
    if result.program in FINAL_DELIVERY_AGENTS:
        return "delivered"
    return "" if result.rcpt.dsn_passed_on else "relayed"


def _trace_reason(result: Result) -> str:
    """Postfix's trace text for a success notice: ``delivery via RELAY: REASON`` (the
    relay left out when there was none, as for discard)."""
    if result.relay == "none":
        return result.rcpt.reason
    return f"delivery via {result.relay}: {result.rcpt.reason}"


_STATUS = {RcptStatus.SENT: Status.SENT, RcptStatus.BOUNCE: Status.BOUNCED,
           RcptStatus.DEFER: Status.DEFERRED}


def maildir_dsn(err: int | None) -> str:
    """Postfix's mbox_dsn(): the status of a mailbox write that failed with ``err``."""
    if err == errno.ENOSPC:
        return "4.3.0"
    if err in (errno.EAGAIN, errno.ESTALE):
        return "4.2.0"
    if err in (errno.EDQUOT, errno.EFBIG):
        return "5.2.2"
    return "5.2.0"


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class Scheduler:
    """The scheduling of one queue manager process: activation, jobs per next hop,
    concurrency windows, dead destinations, outcomes written through the spool, notices."""

    def __init__(
        self,
        spool: Spool,
        settings: QmgrSettings,
        router: NextHopLookup,
        resolver: HostLookup,
        delivery: DeliveryAgent,
        clock: Clock | None = None,
        tls: Planner | None = None,
    ) -> None:
        self.spool = spool
        # Which TLS each server must give (policy maps, MTA-STS, DANE, REQUIRETLS); None:
        # smtp_tls_security_level alone.  tls_events receives what TLS reports count.
        self.tls = tls
        self.tls_events: Callable[[tuple[TlsEvent, ...]], None] | None = None
        self.settings = settings
        self.router = router
        self.resolver = resolver
        self.delivery = delivery
        self.clock: Clock = clock or SystemClock()
        self.paused = spool.pauses()
        self.messages: dict[str, Message] = {}
        self.destinations: dict[str, Destination] = {}
        self._incoming: deque[str] = deque()
        # (queue, queue_id, flushed) found by the scans, brought in as room allows: one
        # backlog for incoming/ (and active/ at start), one for deferred/, taken in turn.
        self._backlogs: dict[str, deque[tuple[str, str, bool]]] = {
            "incoming": deque(), "deferred": deque()}
        self._turn = 0
        self._wake = asyncio.Event()
        self._scan_incoming = True  # at start, and whenever the active queue was full
        self._scan_deferred = True
        self._ignore_times = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._global = asyncio.Semaphore(settings.process_limit)
        self._stopping = False
        self.syncer: Syncer | None = None  # the qmgr's fsync helper, when it has one
        self._lock_waits: set[str] = set()  # being activated in a thread: locked elsewhere
        self._next_deferred_scan = 0.0
        self._next_scan_mono = 0.0
        # The backoff times changed at a reload: the next deferred scan dates each
        # message's next attempt again (Policy, not the file's mtime, decides).
        self._redate_deferred = False
        # relay drain --to: every message goes to this peer relay instead of its route,
        # and stays queued until the peer says 250 (its refusals defer, never bounce).
        self.handoff: NextHop | None = None
        self._filling = False
        self._recovering = False
        # Each recipient outcome the maillog logs goes to these too (accounting_log,
        # metrics); they may be called from a thread and must not raise.
        self.observers: list[Callable[[Report], None]] = []
        self._flushed: set[str] = set()  # to be activated by a flush (defer_transports)

    # ---- triggers (in-process and from the control socket) ------------------------

    def wakeup(self, env: Envelope) -> None:
        """A message (a notice of ours) was committed to incoming/: pick it up now."""
        self.wakeup_id(env.queue_id)

    def wakeup_id(self, queue_id: str) -> None:
        """The listener (another process) committed this message to incoming/: pick it
        up now (no directory poll)."""
        self._incoming.append(queue_id)
        self._wake.set()

    def _forget_dead(self) -> None:
        for dest in self.destinations.values():
            dest.dead_until = 0.0
            dest.fail_cohorts = 0.0

    def flush(self) -> None:
        """postqueue -f: forget dead destinations, try every deferred message now (and
        let defer_transports deliver what that scan finds)."""
        self._forget_dead()
        self._scan_deferred = True
        self._scan_incoming = True
        self._ignore_times = True
        self._wake.set()

    def scan(self) -> None:
        """Look at incoming/ and the due part of deferred/ now (released or requeued mail)."""
        self._scan_incoming = True
        self._scan_deferred = True
        self._wake.set()

    def flush_ids(self, queue_ids: Iterable[str]) -> None:
        """postqueue -i, postqueue -s, relay queue retry: these deferred messages now,
        with their destinations no longer held dead (else "now" would be a deferral)."""
        self._forget_dead()
        for queue_id in queue_ids:
            self._incoming.append(queue_id)
            self._flushed.add(queue_id)
        self._wake.set()

    def reload_pauses(self) -> None:
        """relay queue pause/resume changed the pause file: mail of a resumed
        destination is tried now."""
        before = self.paused
        self.paused = self.spool.pauses()
        if before - self.paused:
            self.flush()

    @property
    def idle(self) -> bool:
        """Nothing in memory, nothing waiting to come in, no scan pending (relay drain
        waits for this after a flush)."""
        return not (self.messages or self._incoming or self._backlogged or self._scan_incoming
                    or self._scan_deferred or self._lock_waits or self._filling
                    or self._recovering)

    def hand_off(self, hop: NextHop) -> None:
        """relay drain --to: from now on every message goes to ``hop``; try all now."""
        self.handoff = hop
        log.info("handing queued mail to %s", hop.label)
        self.flush()

    def is_paused(self, domain: str, hop: NextHop) -> bool:
        if not self.paused:
            return False
        return domain in self.paused or f"nexthop:{hop.host.lower()}" in self.paused

    def reconfigure(self, settings: QmgrSettings, router: NextHopLookup, resolver: HostLookup,
                    tls: Planner | None = None) -> None:
        """A reload: new settings from now on; the queue-run timer re-armed as if the
        last scan had set it with the new queue_run_delay; new backoff times applied to
        every deferred message at the next scan; dead destinations forgotten (a
        reload restarts Postfix's qmgr, which forgets them too)."""
        old = self.settings
        self.settings = settings
        self.router = router
        self.resolver = resolver
        if tls is not None:
            self.tls = tls
        if settings.queue_run_delay != old.queue_run_delay:
            change = settings.queue_run_delay - old.queue_run_delay
            self._next_scan_mono += change
            self._next_deferred_scan += change
        if (settings.policy.minimal_backoff_time, settings.policy.maximal_backoff_time) != (
                old.policy.minimal_backoff_time, old.policy.maximal_backoff_time):
            self._redate_deferred = True
        self._forget_dead()
        self._wake.set()

    # ---- main loop ----------------------------------------------------------------

    async def run(self) -> None:
        # What a crash left in active/ joins the backlog while new mail already flows.
        self._recovering = True
        self._spawn(self._recover())
        while not self._stopping:
            await self._fill()
            timeout = max(0.0, self._next_scan_mono - time.monotonic())
            if not self._work_in_hand():
                self._wake.clear()
                try:
                    # Sleep at most a second so an injected clock's jumps are noticed.
                    await asyncio.wait_for(self._wake.wait(),
                                           timeout=min(max(timeout, 0.01), 1.0))
                except TimeoutError:
                    pass
            # Scan deferred/ every queue_run_delay of real (monotonic) time, or
            # sooner when the wall clock jumped forward past the next scan: a
            # backwards jump must not stop the scans.
            if (time.monotonic() >= self._next_scan_mono
                    or self.clock.time() >= self._next_deferred_scan):
                self._scan_deferred = True

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking work; let transactions in flight finish for up to ``grace``."""
        self._stopping = True
        self._wake.set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        await self.delivery.close()

    def _work_in_hand(self) -> bool:
        """Whether _fill has something to bring in now (else the loop waits for a wake)."""
        in_memory = len(self.messages)
        if in_memory >= self.settings.active_limit:
            return False
        if self._incoming:
            return True
        if self._backlogged and in_memory < self._backlog_limit():
            return True
        return ((self._scan_incoming and not self._backlogs["incoming"])
                or (self._scan_deferred and not self._backlogs["deferred"]))

    @property
    def _backlogged(self) -> bool:
        return any(self._backlogs.values())

    def _backlog_limit(self) -> int:
        return min(self.settings.active_limit, BACKLOG_IN_MEMORY)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until no message is in memory (tests and benchmarks)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.messages or self._incoming or self._backlogged:
            if loop.time() > end:
                raise TimeoutError("scheduler did not drain")
            await asyncio.sleep(0.01)

    async def _recover(self) -> None:
        """Messages left in active/ by a crash or kill are scheduled again (through the
        backlog); strays are quarantined and stale files removed."""
        try:
            names = await asyncio.to_thread(lambda: list(self.spool.queue_ids("active")))
            self._backlogs["incoming"].extendleft(("active", n, False) for n in reversed(names))
            self._wake.set()
            await asyncio.to_thread(self._quarantine_strays)
            removed = await asyncio.to_thread(self.spool.cleanup, self.clock.time())
            for path in removed:
                log.info("removed stale file %s", path)
        finally:
            self._recovering = False

    def _quarantine_strays(self) -> None:
        from spool.store import valid_queue_id

        for queue in ("incoming", "active", "deferred", "hold"):
            for entry in self.spool.scan(queue):
                if not valid_queue_id(entry.queue_id):
                    self._quarantine(queue, entry.queue_id, "not a queue ID")

    def _quarantine(self, queue: str, name: str, why: str) -> None:
        try:
            saved = transitions.quarantine(self.spool, queue, name)
        except (EntryGone, OSError):
            return
        log.warning('saving corrupt file "%s" from queue "%s" to queue "corrupt" (%s)',
                    saved, queue, why)

    async def _fill(self) -> None:
        """Bring messages into the active queue while there is room."""
        self._filling = True  # a scan in a thread is work in hand (see idle)
        try:
            await self._fill_now()
        finally:
            self._filling = False

    async def _fill_now(self) -> None:
        """Triggered mail first (the listener's, notices, flushes of one message), then
        the backlog a few at a time while it has its room; the scans refill the backlog
        once it is empty (Postfix's qmgr takes one from incoming and one from deferred
        at a time, so new mail never waits behind a flush either)."""
        limit = self.settings.active_limit
        while not self._stopping:
            room = limit - len(self.messages)
            if room <= 0:
                return
            if self._incoming:
                batch: list[str] = []
                while self._incoming and len(batch) < min(room, ACTIVATE_BATCH):
                    queue_id = self._incoming.popleft()
                    if queue_id not in self.messages and queue_id not in batch:
                        batch.append(queue_id)
                await self._activate(batch, None)
                continue
            if await self._scan():
                continue
            if not self._backlogged or len(self.messages) >= self._backlog_limit():
                return  # finished messages wake the loop for more
            # incoming/ and deferred/ in turn, as Postfix's qmgr takes one from each.
            order = ("incoming", "deferred") if self._turn == 0 else ("deferred", "incoming")
            self._turn ^= 1
            backlog = next(self._backlogs[name] for name in order if self._backlogs[name])
            queue, first, flushed = backlog.popleft()
            names = [first]
            while (backlog and len(names) < min(room, BACKLOG_BATCH)
                   and backlog[0][0] == queue and backlog[0][2] == flushed):
                names.append(backlog.popleft()[1])
            if flushed:  # a flush's scan: defer_transports lifted for these (Postfix: DFXP)
                self._flushed.update(names)
            await self._activate(names, queue)

    async def _scan(self) -> bool:
        """List incoming/ or deferred/ into its backlog, if a scan of it is due and its
        backlog is empty (a scan is one pass); False if none was."""
        if self._scan_incoming and not self._backlogs["incoming"]:
            self._scan_incoming = False
            names = await asyncio.to_thread(self._list_queue, "incoming", False)
            self._backlogs["incoming"].extend(("incoming", n, False) for n in names)
            return True
        if self._scan_deferred and not self._backlogs["deferred"]:
            ignore = self._ignore_times
            self._scan_deferred = self._ignore_times = False
            self._next_deferred_scan = self.clock.time() + self.settings.queue_run_delay
            self._next_scan_mono = time.monotonic() + self.settings.queue_run_delay
            names = await asyncio.to_thread(self._list_queue, "deferred", ignore)
            self._backlogs["deferred"].extend(("deferred", n, ignore) for n in names)
            return True
        return False

    def _list_queue(self, queue: str, ignore_times: bool) -> list[str]:
        """The names in a queue (in one pass, as Postfix's scan); for deferred/ only those
        due (mtime) unless ``ignore_times`` (a flush)."""
        if queue != "deferred" or ignore_times:
            # No stat needed: a directory listing, little Python work a name (this runs
            # in a thread, and holds the GIL the event loop needs while it works).
            active = self.messages
            return [n for n in self.spool.queue_ids(queue) if n not in active]
        now = self.clock.time()
        redate = queue == "deferred" and self._redate_deferred and not ignore_times
        out: list[str] = []
        redated = 0
        for entry in self.spool.scan(queue):
            if entry.queue_id in self.messages:
                continue
            if queue == "deferred" and not ignore_times and not transitions.is_due(entry, now):
                due = self._redate(entry.queue_id, entry.mtime) if redate else entry.mtime
                redated += due != entry.mtime
                if due > now + 1:
                    continue
            out.append(entry.queue_id)
        if redate:
            self._redate_deferred = False
            log.info("new backoff times applied to %d deferred messages", redated)
        return out

    def _redate(self, queue_id: str, mtime: float) -> float:
        """The next attempt of a deferred message under the current backoff times, written
        to its envelope and set as its mtime (spool.transitions' redate, under its lock:
        an admin command may be moving it).  One rewrite per message whose date moves,
        once per reload that changed the backoff times."""
        try:
            with self.spool.locked(queue_id, ("deferred",)) as entry:
                env = entry.read()
                due = outcome.next_attempt(env, self.settings.policy)
                if not due or abs(due - mtime) < 1:
                    return mtime
                transitions.apply(entry, Transition.REDATE, env=replace(env, next_attempt=due))
                return due
        except (SpoolError, OSError):
            return mtime  # gone, or unreadable: the next scan sees it as it is

    # ---- one message ------------------------------------------------------------------

    async def _activate(self, names: list[str], from_queue: str | None) -> int:
        """Move these messages to active/ and plan their deliveries; returns how many
        were activated.

        Renames and small reads, as Postfix's qmgr does them: on the event loop,
        which costs less than a thread hop.  A message that another process holds
        locked (postsuper at work) is waited for in a thread, off the scheduler's
        path: the others go on meanwhile."""
        names = [n for n in names if n not in self.messages and n not in self._lock_waits]
        if not names:
            return 0
        busy: list[str] = []
        moved = self._move_batch(names, from_queue, busy)
        if busy:
            self._lock_waits.update(busy)
            self._spawn(self._activate_when_unlocked(busy, from_queue))
        await asyncio.sleep(0)  # a long scan lets other work run between batches
        fed = self._feed(moved)
        self._flushed.difference_update(n for n in names if n not in busy)
        return fed

    async def _activate_when_unlocked(self, names: list[str], from_queue: str | None) -> None:
        try:
            moved = await asyncio.to_thread(self._move_batch, names, from_queue)
        finally:
            self._lock_waits.difference_update(names)
        self._feed(moved)
        self._flushed.difference_update(names)

    def _feed(self, moved: list[tuple[str, Envelope, bytes | None]]) -> int:
        """Messages now in active/ come into memory and get their jobs (Postfix's
        qmgr_active_feed() and qmgr_message_alloc())."""
        now = self.clock.time()
        for queue_id, env, content in moved:
            if queue_id in self.messages:
                continue
            message = Message(queue_id, env, active_since=now, content=content,
                              flushed=queue_id in self._flushed)
            self.messages[queue_id] = message
            log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)",
                     queue_id, env.sender, env.size, len(env.recipients))
            self._plan(message)
        return len(moved)

    def _move_batch(self, names: list[str], from_queue: str | None,
                    busy: list[str] | None = None) -> list[tuple[str, Envelope, bytes | None]]:
        """Move these to active/; with ``busy``, a message locked by another process
        is not waited for but put there."""
        moved: list[tuple[str, Envelope, bytes | None]] = []
        for queue_id in names:
            try:
                env, content = self._move_to_active(queue_id, from_queue, wait=busy is None)
            except BlockingIOError:
                if busy is not None:
                    busy.append(queue_id)
                continue
            except EntryGone:
                continue  # lost a race with postsuper or another scan
            except CorruptEntry as exc:
                queue = from_queue or self.spool.locate(queue_id) or "incoming"
                self._quarantine(queue, queue_id, str(exc))
                continue
            except SpoolError as exc:
                log.warning("%s: cannot activate: %s", queue_id, exc)
                continue
            moved.append((queue_id, env, content))
        return moved

    def _move_to_active(self, queue_id: str, from_queue: str | None,
                        wait: bool = True) -> tuple[Envelope, bytes | None]:
        """Move to active/; also read a small message's content now (one thread hop
        fewer per delivery); a big one is read at each attempt."""
        queues = (from_queue,) if from_queue else ("incoming", "deferred", "active")
        with self.spool.locked(queue_id, queues, wait=wait) as entry:
            env = entry.read()
            content = None
            if env.size <= CONTENT_CACHE_MAX:
                content = self.spool.read_content(queue_id, env.size)
            else:
                self.spool.read_content_check(queue_id, env.size)
            transitions.apply(entry, Transition.ACTIVATE)
            return env, content

    def _plan(self, message: Message) -> None:
        """Split the pending recipients into jobs per next hop (up to the recipient limit)."""
        groups: dict[NextHop, list[str]] = {}
        failures: list[RcptResult] = []
        for rcpt in message.envelope.pending:
            try:
                hop = self.router.next_hop(rcpt.address)
                if self.handoff is not None and hop.transport == "smtp":
                    hop = self.handoff
            except RouteError as exc:
                failures.append(RcptResult(rcpt.address, RcptStatus.DEFER, "4.3.0",
                                           f"mail transport unavailable: {exc}"))
                continue
            groups.setdefault(hop, []).append(rcpt.address)
        jobs: list[Job] = []
        limit = max(1, self.settings.recipient_limit)
        for hop, addresses in groups.items():
            for i in range(0, len(addresses), limit):
                chunk = addresses[i:i + limit]
                jobs.append(Job(message, hop, _domain(chunk[0]), chunk))
        message.jobs_left = len(jobs) + (1 if failures else 0)
        if failures:
            self._spawn(self._finish_job(message, [Result(f, "none", (0, 0, 0, 0))
                                                   for f in failures]))
        if not jobs and not failures:
            message.jobs_left = 1
            self._spawn(self._finish_job(message, []))
        for job in jobs:
            key = job.hop.destination
            dest = self.destinations.get(key)
            if dest is None:
                dest = Destination(key, window=max(1, min(self.settings.initial_concurrency,
                                                          self.settings.concurrency_limit)))
                self.destinations[key] = dest
            dest.waiting.append(job)
            self._pump(dest)

    def _pump(self, dest: Destination) -> None:
        limit = max(1, min(dest.window, self.settings.concurrency_limit))
        while dest.waiting and dest.busy < limit:
            job = dest.waiting.popleft()
            dest.busy += 1
            self._spawn(self._run_job(dest, job))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, dest: Destination, job: Job) -> None:
        message = job.message
        results: list[Result] = []
        try:
            async with self._global:
                results = await self._attempt(dest, job)
            if job.hop == self.handoff:
                results = [_kept(r) for r in results]
            if self.settings.soft_bounce:
                results = soften(results)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose the message: defer it
            log.exception("%s: delivery job failed: %s", message.queue_id, exc)  # noqa: TRY401 - the maillog line names it
            results = [Result(RcptResult(a, RcptStatus.DEFER, "4.3.0", f"internal error: {exc}"),
                              "none", (0, 0, 0, 0)) for a in job.recipients]
        finally:
            dest.busy -= 1
            self._pump(dest)
            if (not dest.busy and not dest.waiting and not dest.fail_cohorts
                    and dest.dead_until <= self.clock.time()):
                # Forget idle destinations so memory stays bounded by what is queued.
                self.destinations.pop(dest.name, None)
        await self._finish_job(message, results)

    async def _attempt(self, dest: Destination, job: Job) -> list[Result]:
        message, hop = job.message, job.hop
        env = message.envelope
        start = self.clock.time()
        a = max(0.0, message.active_since - env.arrival_time)
        b = max(0.0, start - message.active_since)

        def all_(status: RcptStatus, dsn: str, reason: str, relay: str = "none",
                 c: float = 0.0, d: float = 0.0) -> list[Result]:
            return [Result(RcptResult(addr, status, dsn, reason), relay, (a, b, c, d))
                    for addr in job.recipients]

        if self.is_paused(job.domain, hop):
            return all_(RcptStatus.DEFER, "4.0.0", "destination paused")
        if hop.transport in self.settings.defer_transports and not message.flushed:
            # Postfix's qmgr_message.c: held until someone flushes the queue.
            return all_(RcptStatus.DEFER, "4.3.2", "deferred transport")
        if dest.dead_until > start:
            return all_(RcptStatus.DEFER, "4.4.1",
                        f"delivery temporarily suspended: {dest.dead_reason}")
        if hop.transport == "discard":
            return [Result(RcptResult(addr, RcptStatus.SENT, "2.0.0", hop.text or "discarded"),
                           "none", (a, b, 0, 0), "discard") for addr in job.recipients]
        if hop.transport == "error":
            return [Result(RcptResult(addr, RcptStatus.BOUNCE, hop.dsn or "5.0.0",
                                      hop.reason or hop.text or "unknown mail transport error"),
                           "none", (a, b, 0, 0), "error") for addr in job.recipients]
        if hop.transport == "maildir":
            return await self._deliver_maildir(message, job, hop, (a, b))
        resolution = await self.resolver.resolve(hop, job.domain)
        if resolution.failure is not None:
            f = resolution.failure
            status = RcptStatus.BOUNCE if f.permanent else RcptStatus.DEFER
            return all_(status, f.dsn, f.reason, c=self.clock.time() - start)
        content = message.content
        if content is None:
            content = await self._read_content(message.queue_id, env.size)
        plan = None
        if self.tls is not None:
            plan = await self.tls.plan(hop, resolution, requiretls=env.requiretls,
                                       tls_not_required=tls_not_required(content))
        elif env.requiretls:
            return all_(RcptStatus.BOUNCE, "5.7.30", "Sender requested REQUIRETLS, but "
                        "this SMTP client has no TLS policy to enforce it")
        attempt: Attempt = await self.delivery.deliver(
            resolution.targets, hop.label, env.sender, job.recipients, content,
            self.settings.delivery, options=message.mail_options(),
            rcpt_options=message.rcpt_options(job.recipients), tls=plan,
        )
        if attempt.tls_events and self.tls_events is not None:
            self.tls_events(attempt.tls_events)
        if attempt.lines_broken:
            smtp_log.info("%s: breaking line > %d bytes with <CR><LF>SPACE",
                          message.queue_id, self.settings.delivery.line_length_limit)
        self._feedback(dest, attempt)
        return [Result(r, attempt.relay, (a, b, attempt.conn_setup_seconds, attempt.xfer_seconds))
                for r in attempt.results]

    async def _read_content(self, queue_id: str, size: int) -> bytes:
        """The content of an active message that is not kept in memory."""
        if size <= CONTENT_READ_INLINE_MAX:
            return self.spool.read_content(queue_id, size)
        return await asyncio.to_thread(self.spool.read_content, queue_id, size)

    async def _deliver_maildir(self, message: Message, job: Job, hop: NextHop,
                               ab: tuple[float, float]) -> list[Result]:
        """Postfix's local(8) into a Maildir: each recipient its own file, durable before
        it counts as sent; a write that fails bounces or defers as Postfix's mbox_dsn()
        decides (a full disk, EAGAIN: defer; anything else: 5.2.0)."""
        env = message.envelope
        content = message.content
        if content is None:
            content = await self._read_content(message.queue_id, env.size)
        results: list[Result] = []
        for address in job.recipients:
            start = self.clock.time()
            try:
                await asyncio.to_thread(maildir.deliver, hop.text, content, sender=env.sender,
                                        recipient=address)
                rcpt = RcptResult(address, RcptStatus.SENT, "2.0.0", "delivered to maildir")
            except maildir.MaildirError as exc:
                dsn = maildir_dsn(exc.errno)
                status = RcptStatus.DEFER if dsn.startswith("4") else RcptStatus.BOUNCE
                rcpt = RcptResult(address, status, dsn,
                                  f"maildir delivery failed: {exc.strerror}")
            results.append(Result(rcpt, "maildir", (*ab, 0.0, self.clock.time() - start),
                                  "local"))
        return results

    def _feedback(self, dest: Destination, attempt: Attempt) -> None:
        """Postfix's qmgr_queue_throttle/unthrottle: only connection failures count."""
        if attempt.connection_failed:
            dest.fail_cohorts += 1.0 / max(1, dest.window)
            dest.window = max(1, dest.window - 1)
            limit = self.settings.failed_cohort_limit
            if limit > 0 and dest.fail_cohorts >= limit:
                reason = attempt.results[0].reason if attempt.results else "connection failed"
                dest.dead_until = self.clock.time() + self.settings.policy.minimal_backoff_time
                dest.dead_reason = reason
                dest.fail_cohorts = 0.0
        else:
            dest.fail_cohorts = 0.0
            dest.dead_until = 0.0
            dest.window = min(dest.window + 1, self.settings.concurrency_limit)

    async def _finish_job(self, message: Message, results: list[Result]) -> None:
        message.jobs_left -= 1
        if message.jobs_left > 0:
            # More jobs of this message are running: record this one's fates now.
            if results:
                recording = asyncio.ensure_future(
                    asyncio.to_thread(self._record, message, results))
                message.recording.append(recording)
                try:
                    await recording
                except Exception:
                    log.exception("%s: cannot record delivery results", message.queue_id)
            return
        # The last job: the other jobs' fates must be on disk before the message is judged.
        await asyncio.gather(*message.recording, return_exceptions=True)
        try:
            notices = await self._complete(message, results)
        except Exception:
            # The message stays in active/ as far as it was recorded; a restart
            # schedules it again.
            log.exception("%s: cannot finish message; it stays in the active queue",
                          message.queue_id)
            notices = []
        self.messages.pop(message.queue_id, None)
        if message.again:
            self._incoming.append(message.queue_id)
        for env in notices:
            self.wakeup(env)
        self._wake.set()

    @staticmethod
    def _merge(env: Envelope, results: list[Result]) -> Envelope:
        """The envelope with each recipient's new fate (final ones never change)."""
        by_addr = {r.rcpt.address: r for r in results}
        rcpts: list[Recipient] = []
        for rcpt in env.recipients:
            res = by_addr.get(rcpt.address)
            if res is None or rcpt.done:
                rcpts.append(rcpt)
                continue
            r = res.rcpt
            final = res.relay == "none" or res.program in FINAL_DELIVERY_AGENTS
            remote = "" if final else res.relay.split("[")[0]
            if r.status is RcptStatus.SENT:
                # The success notice owed, if any, is written with the SENT state itself,
                # so that no crash can separate the two.
                action = (success_action(res)
                          if dsn_mod.wants(rcpt.dsn_notify, dsn_mod.SUCCESS) else "")
                reason = _trace_reason(res) if action else r.reason
                rcpts.append(replace(rcpt, state=RcptState.SENT, reason=reason,
                                     dsn=r.dsn, remote_mta=remote, dsn_action=action,
                                     notified=False))
            elif r.status is RcptStatus.BOUNCE:
                rcpts.append(replace(rcpt, state=RcptState.BOUNCED, reason=r.reason,
                                     dsn=r.dsn, remote_mta=remote, notified=False))
            else:
                rcpts.append(replace(rcpt, reason=r.reason, dsn=r.dsn, remote_mta=remote))
        return env.with_recipients(tuple(rcpts))

    def _log_results(self, message: Message, results: list[Result]) -> None:
        now = self.clock.time()
        env = message.envelope
        for res in results:
            r = res.rcpt
            status = _STATUS[r.status]
            # Postfix's word for a bounce that soft_bounce kept in the queue.
            word = "SOFTBOUNCE" if res.softened else status.value
            a, b, c, d = res.delays
            agent_log.get(res.program, smtp_log).info(
                "%s: to=<%s>, relay=%s, delay=%s, delays=%s/%s/%s/%s, dsn=%s, status=%s (%s)",
                message.queue_id, r.address, res.relay,
                outcome.format_delay(now - env.arrival_time),
                *(outcome.format_delay(x) for x in (a, b, c, d)), r.dsn, word, r.reason,
            )
            self._observe(Report(status, now, message.queue_id, env.sender, r.address,
                                 res.relay, r.dsn, r.reason, env.arrival_time))

    def _observe(self, report: Report) -> None:
        for observer in self.observers:
            try:
                observer(report)
            except Exception:
                log.exception("%s: cannot record the outcome for %s", report.queue_id,
                              report.recipient)

    def _record(self, message: Message, results: list[Result]) -> None:
        """Mark each recipient's fate durably, whatever queue the message is in now."""
        try:
            with self.spool.locked(message.queue_id) as entry:
                transitions.apply(entry, Transition.RECORD,
                                  env=self._merge(entry.read(), results))
        except EntryGone:
            log.info("%s: message was removed during delivery", message.queue_id)
        self._log_results(message, results)

    async def _complete(self, message: Message, results: list[Result]) -> list[Envelope]:
        """Judge a message whose last job is done (see _complete_steps).

        On the event loop, its fsyncs done by the fsync helper, as Postfix's qmgr
        does its file work in its one thread; in a thread if there is no helper, or
        if another process holds the message locked (postsuper at work)."""
        if self.syncer is not None:
            try:
                return await run_steps_async(
                    self._complete_steps(message, results, wait=False), self.syncer.sync)
            except BlockingIOError:
                pass  # nothing done yet: wait for the lock in a thread
        return await asyncio.to_thread(
            lambda: run_steps(self._complete_steps(message, results), self.spool.fsync_paths))

    def _complete_steps(self, message: Message, results: list[Result],
                        wait: bool = True) -> Steps[list[Envelope]]:
        """The last job of a message: record its fates and remove, bounce, warn or defer
        it, in as few durable writes as the promise allows (the removal of a finished
        message is itself the durable mark that its recipients were delivered).
        Returns the notices queued.  ``wait=False``: BlockingIOError, before any
        change, if another process holds the message locked."""
        now = self.clock.time()
        notices: list[Envelope] = []
        try:
            with self.spool.locked(message.queue_id, wait=wait) as entry:
                env = self._merge(entry.read(), results)
                if entry.queue != "active":
                    # postsuper moved it meanwhile: the operator's state wins, and
                    # what was delivered stays delivered.
                    if results:
                        yield from transitions.steps(entry, Transition.RECORD, env=env)
                    message.again = entry.queue in ("incoming", "deferred")
                    self._log_results(message, results)
                    return notices
                decision = outcome.decide(env, now, self.settings.policy)
                if decision.fate is Fate.EXPIRE:
                    self._log_results(message, results)
                    results = []
                    expiring = {r.address for r in env.recipients if r.state is RcptState.PENDING}
                    if env.sender:
                        log.info("%s: from=<%s>, status=expired, returned to sender",
                                 env.queue_id, env.sender)
                    else:
                        log.info("%s: from=<>, status=expired, dropped", env.queue_id)
                    env = env.with_recipients(tuple(
                        replace(r, state=RcptState.BOUNCED, notified=False,
                                reason=r.reason or "message is administratively expired",
                                dsn=r.dsn or "4.0.0")
                        if r.state is RcptState.PENDING else r for r in env.recipients))
                    for r in env.recipients:
                        if r.address in expiring:
                            self._observe(Report(Status.EXPIRED, now, env.queue_id, env.sender,
                                                 r.address, r.remote_mta or "none", r.dsn,
                                                 r.reason, env.arrival_time))
                env = yield from self._notices(env, now, notices)
                if decision.fate in (Fate.DONE, Fate.EXPIRE):
                    yield from transitions.steps(entry, Transition.REMOVE)
                    self._log_results(message, results)
                    log.info("%s: removed", env.queue_id)
                    return notices
                if decision.warn:
                    warning = yield from self._delay_warning(env, now)
                    if warning is not None:
                        notices.append(warning)
                    env = replace(env, warned=True)
                env = replace(env, attempts=env.attempts + 1, last_attempt=now,
                              next_attempt=decision.next_attempt)
                yield from transitions.steps(entry, Transition.DEFER, env=env)
                self._log_results(message, results)
        except EntryGone:
            log.info("%s: message was removed during delivery", message.queue_id)
            self._log_results(message, results)
        return notices

    def _notices(self, env: Envelope, now: float, queued: list[Envelope]) -> Steps[Envelope]:
        """Queue the non-delivery notice and the success notice this message owes its
        sender, each for the recipients that asked for it (NOTIFY), and return the
        envelope with every recipient whose notice is settled marked ``notified``.

        The notices are committed first: the caller writes or removes the envelope only
        after them, so a crash in between repeats a notice and never loses one.  The null
        sender never gets a notice: no loops, no backscatter."""
        bounced = [r for r in env.recipients if r.state is RcptState.BOUNCED and not r.notified]
        succeeded = [r for r in env.recipients
                     if r.state is RcptState.SENT and r.dsn_action and not r.notified]
        if not bounced and not succeeded:
            return env
        if env.sender:
            failed = [r for r in bounced if dsn_mod.wants(r.dsn_notify, dsn_mod.FAILURE)]
            if failed:
                notice = yield from self._notice(bounce.NoticeKind.FAILURE, env, failed, now)
                queued.append(notice)
                bounce_log.info("%s: sender non-delivery notification: %s", env.queue_id,
                                notice.queue_id)
            if succeeded:
                notice = yield from self._notice(bounce.NoticeKind.SUCCESS, env, succeeded,
                                                 now)
                queued.append(notice)
                bounce_log.info("%s: sender delivery status notification: %s",
                                env.queue_id, notice.queue_id)
        settled = {id(r) for r in bounced} | {id(r) for r in succeeded}
        return env.with_recipients(tuple(replace(r, notified=True) if id(r) in settled else r
                                         for r in env.recipients))

    def _delay_warning(self, env: Envelope, now: float) -> Steps[Envelope | None]:
        """Queue the one delay warning for the pending recipients that want it."""
        pending = [r for r in env.pending if dsn_mod.wants(r.dsn_notify, dsn_mod.DELAY)]
        if not pending or not env.sender:
            return None
        notice = yield from self._notice(bounce.NoticeKind.DELAY, env, pending, now)
        bounce_log.info("%s: sender delay notification: %s", env.queue_id, notice.queue_id)
        return notice

    def _notice(self, kind: bounce.NoticeKind, env: Envelope, rcpts: list[Recipient],
                now: float) -> Steps[Envelope]:
        """Build a notice of this kind about these recipients and commit it to incoming/."""
        content = self.spool.read_content(env.queue_id)
        smtputf8 = bounce.needs_global(content, env.smtputf8,
                                       [env.sender, *(r.address for r in rcpts)])
        fallback = {bounce.NoticeKind.FAILURE: "5.0.0", bounce.NoticeKind.DELAY: "4.0.0",
                    bounce.NoticeKind.SUCCESS: "2.0.0"}[kind]
        reported = []
        for r in rcpts:
            if kind is bounce.NoticeKind.SUCCESS:
                action = r.dsn_action
            else:
                action = "delayed" if kind is bounce.NoticeKind.DELAY else "failed"
            orcpt = dsn_mod.original_recipient(r.dsn_orcpt, r.address)
            reported.append(bounce.FailedRecipient(
                r.address, r.dsn or fallback, _diagnostic(r.reason), r.remote_mta,
                # The human-readable line is the reason as logged, as Postfix's is:
                # "host X[IP] said: REPLY (in reply to RCPT TO command)".
                action=action, last_attempt=now, dsn_orcpt=orcpt, text=r.reason))
        p = self.settings.policy
        body = bounce.make_notice(
            kind=kind, queue_id=env.queue_id, sender=env.sender, recipients=reported,
            original=content, arrival_time=env.arrival_time, now=now,
            myhostname=self.settings.myhostname, mail_name=self.settings.mail_name,
            delay_warning_hours=(p.delay_warning_time / 3600
                                 if kind is bounce.NoticeKind.DELAY else None),
            max_lifetime_days=p.maximal_queue_lifetime / 86400,
            envid=env.dsn_envid, headers_only=env.dsn_ret.upper() == "HDRS",
            smtputf8=smtputf8,
        )
        return (yield from self._queue_notice(env, body, now, smtputf8))

    def _queue_notice(self, env: Envelope, body: bytes, now: float,
                      smtputf8: bool = False) -> Steps[Envelope]:
        notice = Envelope(
            queue_id="", sender="", recipients=(Recipient(env.sender),), arrival_time=now,
            size=len(body), client_name="localhost", client_address="127.0.0.1",
            protocol="local", message_id="", smtputf8=smtputf8,
        )
        res = self.spool.reserve()
        return (yield from self.spool.commit_steps(res, notice, [body]))

