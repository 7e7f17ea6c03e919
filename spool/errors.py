"""Errors raised by the spool.

    SpoolError            anything the spool could not do
     +-- SpoolFull        ENOSPC/EDQUOT while writing: the client gets 452 4.3.1
     +-- CorruptEntry     an envelope that cannot be read or parsed: goes to corrupt/
     +-- EntryGone        the entry moved or vanished under us: a lost race, not a bug
"""


class SpoolError(Exception):
    """A spool operation failed; nothing half-written is visible in a queue."""


class SpoolFull(SpoolError):
    """The file system is full (or over quota) while writing a new entry."""


class CorruptEntry(SpoolError):
    """An envelope file exists but cannot be parsed, or lacks its end marker."""


class EntryGone(SpoolError):
    """The entry is not where we looked: another process moved or removed it."""
