"""Per-client event rates (Postfix's anvil(8)): connections, messages, recipients, failed logins.

The listener asks anvil "how many of these has this client address done in the current
time unit?" and compares the answer with smtpd_client_connection_rate_limit,
smtpd_client_message_rate_limit, smtpd_client_recipient_rate_limit and the failed-login
limit.  As in Postfix, a client's time unit (``anvil_rate_time_unit``) starts at its
first event and a fresh one starts with the first event after it has run out, so a
client that stays under the limit is never refused and one that goes over it is
refused until its time unit ends.  The number of connections open at once is not
kept here: the listener counts live sessions itself.

It never blocks, never does I/O and never decides anything: it counts and answers.
State lives in memory only; a crash or restart forgets every rate, as anvil's does.
Entries whose time unit has run out are dropped at most once per time unit, so a
flood from many addresses costs memory for one time unit only.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass


class Event(enum.Enum):
    """What anvil counts per client address."""

    CONNECT = "connect"
    MESSAGE = "message"
    RECIPIENT = "recipient"
    AUTH_FAILURE = "auth_failure"


@dataclass(slots=True)
class _Window:
    start: float
    count: int


class Anvil:
    """Fixed-window event counters per (event, client address)."""

    def __init__(self, time_unit: float = 60.0,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.time_unit = time_unit
        self._now = now
        self._windows: dict[tuple[Event, str], _Window] = {}
        self._next_prune = now() + time_unit

    def reconfigure(self, time_unit: float) -> None:
        self.time_unit = time_unit

    def record(self, event: Event, client: str, count: int = 1) -> int:
        """Count ``count`` events for ``client``; the rate in the current time unit after it."""
        now = self._now()
        self._prune(now)
        key = (event, client)
        window = self._windows.get(key)
        if window is None or now - window.start >= self.time_unit:
            window = _Window(now, 0)
            self._windows[key] = window
        window.count += count
        return window.count

    def rate(self, event: Event, client: str) -> int:
        """The events ``client`` had in its current time unit, without counting one."""
        window = self._windows.get((event, client))
        if window is None or self._now() - window.start >= self.time_unit:
            return 0
        return window.count

    def __len__(self) -> int:
        return len(self._windows)

    def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + self.time_unit
        expired = [k for k, w in self._windows.items() if now - w.start >= self.time_unit]
        for key in expired:
            del self._windows[key]
