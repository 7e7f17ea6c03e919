"""What one listener process counts for ``GET /metrics``: plain numbers, no prometheus_client.

The listener's observer (relay.smtpd.listener's SmtpdObserver) in each process that
accepts mail: connections, refusals by reason, messages accepted and the time from the
end of DATA to the durable commit, in COMMIT_BUCKETS.  The master process (relay.metrics)
serves its own counts plus each worker's (relay.smtpd.worker sends them as JSON when the
master asks, at a scrape), so that a scrape sees every process that accepts mail; each
worker's counts start from zero with it, as the master's do.

Here too is what names a refusal's ``reason`` label (``reject_reason``), so that a worker
never sends a reply's text, only its reason.  No I/O; a crash forgets the counts, which
Prometheus's rate() expects of a restarted process.
"""

from __future__ import annotations

import bisect
import json
import re
from typing import Any

COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Which rejection a reply is, by its code and enhanced code, then its words: the listener's
# replies (relay.smtpd.replies) as an operator groups them.  First match wins.
_REASONS: tuple[tuple[str, str], ...] = (
    (r"Relay access denied|Recipient address rejected", "relay_denied"),
    (r"too many (connections|messages|recipients) from", "rate_limit"),
    (r"[Aa]uthenticat|AUTH|failed logins", "auth"),
    (r"Must issue a STARTTLS", "tls_required"),
    (r"protocol synchronization", "pipelining"),
    (r"bare <LF>", "bare_newline"),
    (r"Message size exceeds|Bad message size", "size"),
    (r"too many recipients$", "recipient_limit"),
    (r"Insufficient system storage|queue file write error", "storage"),
    (r"too many errors", "error_limit"),
    (r"timeout exceeded", "timeout"),
    (r"Service shutting down", "shutdown"),
    (r"NUL character in message|Too many hops", "content"),
    (r"service unavailable|Unable to queue messages", "etrn"),
    (r"^503 |^554 5\.5\.1 ", "sequence"),  # RFC 3463 X.5.1 after a good command
    (r"^50[012] |^555 ", "syntax"),
)
_REASON_RES = tuple((re.compile(pattern), reason) for pattern, reason in _REASONS)
REJECT_REASONS = (*dict.fromkeys(reason for _, reason in _REASONS), "other")


def reject_reason(reply: str) -> str:
    """The ``reason`` label of a refusal (a 4xx or 5xx reply the listener sent)."""
    for pattern, reason in _REASON_RES:
        if pattern.search(reply):
            return reason
    return "other"


class SmtpdCounts:
    """One process's counts; also its SmtpdObserver (never blocks, never raises)."""

    __slots__ = ("accepted", "commit_buckets", "commit_sum", "connections", "rejects")

    def __init__(self) -> None:
        self.connections = 0
        self.rejects: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.accepted = 0
        # Per bucket, not cumulative: the last one counts what took longer than them all.
        self.commit_buckets = [0] * (len(COMMIT_BUCKETS) + 1)
        self.commit_sum = 0.0

    # SmtpdObserver
    def connected(self) -> None:
        self.connections += 1

    def refused(self, reply: str) -> None:
        reason = reject_reason(reply)
        self.rejects[reason] = self.rejects.get(reason, 0) + 1

    def queued(self, commit_seconds: float) -> None:
        self.accepted += 1
        self.commit_buckets[bisect.bisect_left(COMMIT_BUCKETS, commit_seconds)] += 1
        self.commit_sum += commit_seconds

    def add(self, other: SmtpdCounts) -> None:
        self.connections += other.connections
        for reason, n in other.rejects.items():
            self.rejects[reason] = self.rejects.get(reason, 0) + n
        self.accepted += other.accepted
        self.commit_buckets = [a + b for a, b in zip(self.commit_buckets,
                                                     other.commit_buckets, strict=True)]
        self.commit_sum += other.commit_sum

    def to_json(self) -> bytes:
        return json.dumps({"connections": self.connections, "rejects": self.rejects,
                           "accepted": self.accepted, "commit_buckets": self.commit_buckets,
                           "commit_sum": self.commit_sum}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SmtpdCounts:
        """ValueError for anything but what to_json() writes."""
        try:
            raw: Any = json.loads(data)
            counts = cls()
            counts.connections = int(raw["connections"])
            counts.rejects = {str(k): int(v) for k, v in dict(raw["rejects"]).items()
                              if k in counts.rejects}
            counts.accepted = int(raw["accepted"])
            buckets = [int(n) for n in raw["commit_buckets"]]
            if len(buckets) != len(counts.commit_buckets):
                raise ValueError("wrong number of buckets")
            counts.commit_buckets = buckets
            counts.commit_sum = float(raw["commit_sum"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"bad counts: {exc}") from None
        return counts
