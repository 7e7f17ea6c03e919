"""Prometheus metrics of both daemon processes, met in one scrape of ``GET /metrics``.

What each process counts (prometheus_client, one plain registry per process):

- the listener (``relay serve``: master, smtpd, cleanup) -- ``relay_smtpd_connections_total``,
  ``relay_smtpd_rejects_total{reason}``, ``relay_messages_accepted_total``,
  ``relay_spool_commit_seconds`` (from the end of DATA to the durable commit, the wait
  before 250), counted by relay.smtpd.counts in the master and in each listener worker
  (asked for its counts at each scrape, relay.workers, and summed), the spool's ``relay_queue_messages{queue}``,
  ``relay_queue_oldest_age_seconds{queue}`` and ``relay_spool_free_bytes`` (read at scrape
  time, at most every few seconds), ``relay_queue_deferred_domain_messages{domain}`` (read
  at most once a minute), and the standard ``process_*`` of its own process;
- the queue manager -- ``relay_deliveries_total{status,domain}`` (sent, deferred, bounced,
  expired, one per recipient outcome the maillog logs), ``relay_delivery_delay_seconds``
  (arrival to the final status), ``relay_destination_concurrency{destination}`` (deliveries
  in flight), ``relay_destination_concurrency_limit{destination}`` (the window) and
  ``relay_destination_dead{destination}``, and ``relay_qmgr_process_*`` for its process.

How they meet: the HTTP listener lives in the listener process (relay.http), so a scrape
is answered there; it asks the queue manager for its metrics over the control socket
(``metrics``: the text exposition of its registry), parses them and serves them with its
own, one exposition.  ``relay_up{process="qmgr"}`` says whether the queue manager answered
(within two seconds); if not, the listener's metrics are served alone.  A restart of
either process shows as a new ``process_start_time_seconds`` (listener) or
``relay_qmgr_process_start_time_seconds`` (queue manager), with its counters from zero,
as Prometheus expects of a restarted target.  prometheus_client's multiprocess mode was
not taken: it needs an environment variable before the import, mmap files per PID in a
directory that outlives the processes (cleaned by hand when one dies), and neither custom
collectors nor the process collector; asking the queue manager keeps each process's
registry ordinary and its restart plain to see.

Label bounds: ``domain`` in relay_deliveries_total is one of the
``relay_metrics_domain_limit`` busiest recipient domains (decaying counts, half-life an
hour), else ``other``: a backup MX for ten thousand domains has at most that many series
per status.  A domain that becomes one of the busiest gets a series from zero; one that
drops out loses its series (sum(rate(...)) is right through both); ``other`` only ever
grows.  Destinations are bounded the same way (dead ones first, then the busiest).

Nothing here writes a file or the spool, and nothing survives a restart: counters start
from zero with the process, which Prometheus's rate() expects.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families

from relay.outcome import Report, Status
from relay.smtpd.counts import COMMIT_BUCKETS, REJECT_REASONS, SmtpdCounts
from spool.store import QUEUES

if TYPE_CHECKING:
    from relay.scheduler import Scheduler
    from spool import Spool

# The _created series double the series count and say what process_start_time_seconds says.
disable_created_metrics()  # type: ignore[no-untyped-call]

DELAY_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400,
                 2 * 86400, 5 * 86400)
HALF_LIFE = 3600.0  # seconds: how fast "busiest" forgets
SPOOL_MAX_AGE = 5.0  # seconds a spool reading is reused for
DOMAINS_MAX_AGE = 60.0  # seconds the deferred-by-domain reading (every envelope) is reused
OTHER = "other"

# ---- the listener process -----------------------------------------------------------------


class SpoolCollector:
    """Queue depths and ages and free space, read from the spool at scrape time; and the
    deferred queue by recipient domain, which reads every deferred envelope, so at most
    once a minute (mailq reads them all too)."""

    def __init__(self, spool: Spool, limit: Callable[[], int]) -> None:
        self.spool = spool
        self.limit = limit
        self._lock = threading.Lock()
        self._at = self._domains_at = -math.inf
        self._families: list[Metric] = []
        self._domains: Metric | None = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if time.monotonic() - self._at > SPOOL_MAX_AGE:
                self._families = self._read()
                self._at = time.monotonic()
            if time.monotonic() - self._domains_at > DOMAINS_MAX_AGE:
                self._domains = self._deferred_domains()
                self._domains_at = time.monotonic()
            return iter([*self._families, *([self._domains] if self._domains else [])])

    def _deferred_domains(self) -> Metric:
        counts: dict[str, int] = {}
        for _, fields in self.spool.envelope_fields(("deferred",)):
            domains = {str(r["address"]).rpartition("@")[2].lower()
                       for r in fields["recipients"] if r["state"] == "pending"}
            for domain in domains:
                counts[domain] = counts.get(domain, 0) + 1
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        family = GaugeMetricFamily(
            "relay_queue_deferred_domain_messages",
            "Deferred messages with a pending recipient in each domain (the busiest "
            "relay_metrics_domain_limit; the rest as other); read at most once a minute.",
            labels=["domain"])
        limit = self.limit()
        for domain, n in ranked[:limit]:
            family.add_metric([domain], n)
        family.add_metric([OTHER], sum(n for _, n in ranked[limit:]))
        return family

    def _read(self) -> list[Metric]:
        now = time.time()
        messages = GaugeMetricFamily("relay_queue_messages", "Messages in each queue.",
                                     labels=["queue"])
        oldest = GaugeMetricFamily(
            "relay_queue_oldest_age_seconds",
            "Time since the oldest message in each queue arrived (0 when empty).",
            labels=["queue"])
        for queue in QUEUES:
            count, first = self.spool.queue_age(queue)
            messages.add_metric([queue], count)
            oldest.add_metric([queue], max(0.0, now - first) if first is not None else 0.0)
        free = GaugeMetricFamily("relay_spool_free_bytes",
                                 "Bytes available to relay in the spool's file system.")
        try:
            st = os.statvfs(self.spool.root)
            free.add_metric([], st.f_bavail * st.f_frsize)
        except OSError:
            pass
        return [messages, oldest, free]


class QmgrCollector:
    """The queue manager's exposition, fetched for this scrape (see ``ListenerMetrics``)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []
        self.up = False

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("relay_up", "Whether each daemon process answered this scrape.",
                               labels=["process"])
        up.add_metric(["smtpd"], 1)
        up.add_metric(["qmgr"], 1 if self.up else 0)
        yield up
        yield from self.families


class SmtpdCollector:
    """The listener's counts: this process's and, for the scrape at hand, its workers'."""

    def __init__(self, own: SmtpdCounts) -> None:
        self.own = own
        self.workers: list[SmtpdCounts] = []

    def collect(self) -> Iterator[Metric]:
        total = SmtpdCounts()
        for counts in (self.own, *self.workers):
            total.add(counts)
        yield CounterMetricFamily("relay_smtpd_connections", "SMTP connections accepted.",
                                  value=total.connections)
        rejects = CounterMetricFamily("relay_smtpd_rejects", "Refusals (4xx and 5xx replies) "
                                      "sent by the SMTP server, by reason.", labels=["reason"])
        for reason in REJECT_REASONS:  # every series from the start: rate() needs a zero
            rejects.add_metric([reason], total.rejects.get(reason, 0))
        yield rejects
        yield CounterMetricFamily("relay_messages_accepted", "Messages queued (250 after DATA).",
                                  value=total.accepted)
        cumulative, buckets = 0, []
        for bound, n in zip((*COMMIT_BUCKETS, math.inf), total.commit_buckets, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
        yield HistogramMetricFamily(
            "relay_spool_commit_seconds", "Time from the end of DATA to the durable commit "
            "of the message (the wait before 250).", buckets=buckets,
            sum_value=total.commit_sum)


class ListenerMetrics:
    """The listener's counters (relay.smtpd.listener's SmtpdObserver) and the scrape."""

    def __init__(self, spool: Spool, domain_limit: Callable[[], int] = lambda: 50) -> None:
        self.registry = CollectorRegistry()
        self.counts = SmtpdCounts()
        self.smtpd = SmtpdCollector(self.counts)
        self.registry.register(self.smtpd)
        ProcessCollector(registry=self.registry)
        self.registry.register(SpoolCollector(spool, domain_limit))
        self.qmgr = QmgrCollector()
        self.registry.register(self.qmgr)
        self._scrape = threading.Lock()  # one scrape at a time sets the qmgr's part
        # The listener workers' counts, asked for at each scrape (relay.workers); None
        # without workers.
        self.workers: Callable[[], Awaitable[list[SmtpdCounts]]] | None = None

    # SmtpdObserver
    def connected(self) -> None:
        self.counts.connected()

    def refused(self, reply: str) -> None:
        self.counts.refused(reply)

    def queued(self, commit_seconds: float) -> None:
        self.counts.queued(commit_seconds)

    def exposition(self, qmgr_text: str | None,
                   workers: Sequence[SmtpdCounts] = ()) -> bytes:
        """One exposition: this process's metrics, its workers' counts and the queue
        manager's (its text, or None when it did not answer).  Blocking (a spool
        listing): call in a thread."""
        families: list[Metric] = []
        if qmgr_text is not None:
            try:
                families = list(text_string_to_metric_families(qmgr_text))
            except ValueError:
                qmgr_text = None
        with self._scrape:
            self.qmgr.families, self.qmgr.up = families, qmgr_text is not None
            self.smtpd.workers = list(workers)
            return generate_latest(self.registry)


# ---- the queue manager process ------------------------------------------------------------


class _Score:
    """A count that halves every HALF_LIFE seconds."""

    __slots__ = ("at", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.at = time.monotonic()

    def add(self, now: float) -> None:
        self.value = self.now(now) + 1.0
        self.at = now

    def now(self, now: float) -> float:
        return float(self.value * 0.5 ** ((now - self.at) / HALF_LIFE))


class DeliveryCounts:
    """relay_deliveries_total{status,domain}, domain bounded to the busiest ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self._lock = threading.Lock()
        self.labelled: dict[str, dict[Status, int]] = {}
        self.other: dict[Status, int] = dict.fromkeys(Status, 0)
        self.scores: dict[str, _Score] = {}

    def add(self, status: Status, domain: str) -> None:
        now = time.monotonic()
        with self._lock:
            score = self.scores.get(domain)
            if score is None:
                score = self.scores[domain] = _Score()
                if len(self.scores) > max(64, 10 * self.limit):
                    self._forget(now)
            score.add(now)
            counts = self.labelled.get(domain)
            if counts is None and len(self.labelled) < self.limit:
                counts = self.labelled[domain] = dict.fromkeys(Status, 0)
            if counts is None:
                self.other[status] += 1
            else:
                counts[status] += 1

    def _forget(self, now: float) -> None:
        """Keep the candidates' scores bounded: drop the quieter half of the unlabelled."""
        quiet = sorted((s.now(now), d) for d, s in self.scores.items() if d not in self.labelled)
        for _, domain in quiet[:len(quiet) // 2 + 1]:
            del self.scores[domain]

    def rebalance(self) -> None:
        """Give the busiest domains their own series (at each scrape): a waiting domain
        takes the place of the quietest labelled one once it is twice as busy, so two
        alike do not swap at every scrape."""
        now = time.monotonic()
        with self._lock:
            score = {d: s.now(now) for d, s in self.scores.items()}
            waiting = sorted((d for d in score if d not in self.labelled), key=score.__getitem__,
                             reverse=True)
            for domain in waiting:
                if len(self.labelled) < self.limit:
                    self.labelled[domain] = dict.fromkeys(Status, 0)
                    continue
                if not self.labelled:
                    break
                weakest = min(self.labelled, key=lambda d: score.get(d, 0.0))
                if score[domain] <= 2 * score.get(weakest, 0.0):
                    break
                del self.labelled[weakest]
                self.labelled[domain] = dict.fromkeys(Status, 0)

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self.limit = max(0, limit)
            for domain in list(self.labelled)[self.limit:]:
                del self.labelled[domain]

    def collect(self) -> Iterator[Metric]:
        self.rebalance()
        family = CounterMetricFamily(
            "relay_deliveries", "Recipient outcomes as the maillog logs them (status=), by "
            "recipient domain (the busiest relay_metrics_domain_limit; the rest as other).",
            labels=["status", "domain"])
        with self._lock:
            rows = [(d, dict(c)) for d, c in self.labelled.items()] + [(OTHER, dict(self.other))]
        for domain, counts in rows:
            for status, n in counts.items():
                if n or domain == OTHER:
                    family.add_metric([status.value, domain], n)
        yield family


class DestinationCollector:
    """Per-destination concurrency and deadness, read from the scheduler at scrape time."""

    def __init__(self, scheduler: Scheduler, limit: Callable[[], int]) -> None:
        self.scheduler = scheduler
        self.limit = limit

    def collect(self) -> Iterator[Metric]:
        now = self.scheduler.clock.time()
        busy = GaugeMetricFamily("relay_destination_concurrency",
                                 "Deliveries in flight to each destination.",
                                 labels=["destination"])
        window = GaugeMetricFamily("relay_destination_concurrency_limit",
                                   "The concurrency window of each destination (grows with "
                                   "successes, shrinks with connection failures).",
                                   labels=["destination"])
        dead = GaugeMetricFamily("relay_destination_dead",
                                 "1 while a destination is dead (its mail deferred without "
                                 "a connection), else 0.", labels=["destination"])
        rows = [(d.name, d.busy, len(d.waiting), d.window, d.dead_until > now)
                for d in list(self.scheduler.destinations.values())]
        rows.sort(key=lambda r: (not r[4], -(r[1] + r[2])))
        for name, in_flight, _, limit, is_dead in rows[:self.limit()]:
            busy.add_metric([name], in_flight)
            window.add_metric([name], limit)
            dead.add_metric([name], 1 if is_dead else 0)
        yield from (busy, window, dead)


class QmgrMetrics:
    """The queue manager's metrics; call it with each Report (a scheduler observer)."""

    def __init__(self, scheduler: Scheduler, domain_limit: int) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = DeliveryCounts(domain_limit)
        self.registry.register(self.deliveries)
        self.delay = Histogram("relay_delivery_delay_seconds", "Time from a message's arrival "
                               "to each recipient's final status (sent, bounced, expired).",
                               buckets=DELAY_BUCKETS, registry=self.registry)
        self.registry.register(DestinationCollector(scheduler, lambda: self.deliveries.limit))
        ProcessCollector(namespace="relay_qmgr", registry=self.registry)

    def __call__(self, report: Report) -> None:
        self.deliveries.add(report.status, report.domain)
        if report.status.final:
            self.delay.observe(max(0.0, report.time - report.arrival_time))

    def exposition(self) -> str:
        return generate_latest(self.registry).decode("utf-8")


_installed: ListenerMetrics | None = None


def install(metrics: ListenerMetrics) -> None:
    """The listener process's metrics, for the /metrics route (relay.http.metrics)."""
    global _installed
    _installed = metrics


def installed() -> ListenerMetrics | None:
    return _installed
