"""Pure decisions of the queue manager: backoff, expiry, delay warnings, log numbers; and
the ``Report`` of each recipient outcome that the queue manager logs, which the
accounting log and the metrics take from the same place.

No I/O, no state and no clock of its own (every function takes ``now``), so it never
changes the spool and a crash leaves nothing behind.  The rules are
Postfix's qmgr (qmgr_active.c): after a failed attempt the next one is due after
the message's time in the queue so far, clamped between minimal_backoff_time and
maximal_backoff_time; expiry is checked after every recipient has been tried.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from spool.envelope import Envelope


@dataclass(frozen=True, slots=True)
class Policy:
    minimal_backoff_time: float = 300.0
    maximal_backoff_time: float = 4000.0
    maximal_queue_lifetime: float = 5 * 86400.0
    bounce_queue_lifetime: float = 5 * 86400.0
    delay_warning_time: float = 0.0
    soft_bounce: bool = False  # expired mail stays queued instead of going back


class Status(enum.Enum):
    """A recipient outcome as the maillog says it (``status=``): sent, deferred and
    bounced from an attempt, expired when the message outlived its queue lifetime."""

    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self is not Status.DEFERRED


@dataclass(frozen=True, slots=True)
class Report:
    """One recipient outcome, as logged: what the accounting log and the metrics see."""

    status: Status
    time: float
    queue_id: str
    sender: str
    recipient: str
    relay: str  # Postfix's relay= field: host[address]:port, or "none"
    dsn: str
    reason: str  # the text in parentheses: the reply, or why
    arrival_time: float

    @property
    def domain(self) -> str:
        return self.recipient.rpartition("@")[2].lower()


class Fate(enum.Enum):
    DONE = "done"  # every recipient sent or bounced: remove
    DEFER = "defer"  # some pending: deferred until next_attempt
    EXPIRE = "expire"  # some pending and too old: bounce the rest (or drop a bounce)


@dataclass(frozen=True, slots=True)
class Decision:
    fate: Fate
    next_attempt: float = 0.0
    warn: bool = False  # send the one delay warning now


def backoff(env: Envelope, now: float, policy: Policy) -> float:
    """Seconds until the next attempt: the time in queue, clamped (qmgr_active.c)."""
    delay = now - env.arrival_time - env.held_seconds
    return min(max(delay, policy.minimal_backoff_time), policy.maximal_backoff_time)


def next_attempt(env: Envelope, policy: Policy) -> float:
    """When the next attempt of a deferred message is due under ``policy``: its last
    attempt plus the backoff it had earned then (0 if it was never tried)."""
    if not env.last_attempt:
        return 0.0
    return env.last_attempt + backoff(env, env.last_attempt, policy)


def lifetime(env: Envelope, policy: Policy) -> float:
    return policy.maximal_queue_lifetime if env.sender else policy.bounce_queue_lifetime


def decide(env: Envelope, now: float, policy: Policy) -> Decision:
    """What happens to a message after all its recipients were tried once."""
    if env.finished:
        return Decision(Fate.DONE)
    if (env.forced_expire or env.age(now) >= lifetime(env, policy)) and not policy.soft_bounce:
        return Decision(Fate.EXPIRE)
    warn = (
        policy.delay_warning_time > 0
        and not env.warned
        and bool(env.sender)
        and env.age(now) >= policy.delay_warning_time
    )
    return Decision(Fate.DEFER, next_attempt=now + backoff(env, now, policy), warn=warn)


def format_delay(seconds: float) -> str:
    """Postfix's format_tv with 2 significant digits and 10 ms resolution.

    0.004 -> 0, 0.005 -> 0.01, 0.054 -> 0.05, 1.04 -> 1, 1.25 -> 1.3, 12.3 -> 12, 99.6 -> 100
    """
    if seconds < 0.005:
        return "0"
    if seconds >= 10:
        return str(math.floor(seconds + 0.5))
    digits = 1 if seconds >= 1 else 2
    # round half up in decimal, as Postfix does on integer microseconds
    scaled = math.floor(seconds * 10**digits + 0.5 + 1e-9) / 10**digits
    if seconds < 0.1:
        scaled = math.floor(seconds * 100 + 0.5 + 1e-9) / 100
    text = f"{scaled:.{2 if seconds < 1 else 1}f}".rstrip("0").rstrip(".")
    return text or "0"
