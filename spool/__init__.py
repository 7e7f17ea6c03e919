"""The on-disk mail queue: envelopes, message content, queue IDs and locking.

This package never imports ``relay``: the daemon and every admin command use it
through :class:`spool.store.Spool`, and nothing else builds a spool path.
"""

from spool.envelope import Envelope, RcptState, Recipient
from spool.errors import CorruptEntry, EntryGone, SpoolError, SpoolFull
from spool.store import QUEUES, Spool

__all__ = [
    "QUEUES",
    "CorruptEntry",
    "EntryGone",
    "Envelope",
    "RcptState",
    "Recipient",
    "Spool",
    "SpoolError",
    "SpoolFull",
]
