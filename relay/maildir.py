"""Maildir: delivery into one (the ``maildir:`` next hop) and the reading side of it.

Delivery follows the Maildir protocol as qmail wrote it down and Postfix's local(8)
implements it: the message is written under ``tmp/`` with a unique name, fsync'ed, and
renamed into ``new/``, whose directory is then fsync'ed; only then is the recipient
reported as delivered.  ``tmp/``, ``new/`` and ``cur/`` are created when missing.  Each
recipient gets its own file, with the three header lines Postfix's local(8) prepends:
``Return-Path: <sender>``, ``X-Original-To: recipient`` and ``Delivered-To: recipient``.
Lines end in LF, as every Maildir reader expects (the spool keeps CR LF).

What a crash leaves: a file in ``tmp/`` (never seen by readers; Maildir readers remove
such files after 36 hours), or a message in ``new/`` whose recipient the queue manager
had not yet marked: delivered again at the next attempt (the one duplicate the protocol
cannot avoid, as with SMTP's RFC 1047 window).

The reading side lists ``new/`` and ``cur/`` oldest first, reads, removes and clears
messages; it never rewrites a file.  A message's ID is its unique name without the
``:2,flags`` suffix, so it stays the same when a reader moves it to ``cur/``.  Every
function blocks (the daemon calls them in threads).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

SUBDIRS = ("tmp", "new", "cur")
_counter = itertools.count(1)
_counter_lock = threading.Lock()
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")
_NAME_TIME = re.compile(r"(\d+)\.M(\d+)")
_VALID_ID = re.compile(r"[A-Za-z0-9._-]+\Z")


class MaildirError(OSError):
    """A Maildir that cannot be written: the message says which directory and why."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One message in a Maildir."""

    id: str  # the unique name, without ":2,flags"
    path: str
    delivered: float  # seconds since the epoch, from the name (else the file's mtime)
    size: int
    flags: str  # the Maildir info flags ("S" seen, "T" trashed, ...)

    @property
    def seen(self) -> bool:
        return "S" in self.flags


def unique_name(now: float | None = None) -> str:
    """``SECONDS.M<usec>P<pid>Q<n>R<random>.HOST``: unique across processes and threads."""
    now = time.time() if now is None else now
    seconds = int(now)
    usec = int((now - seconds) * 1_000_000)
    with _counter_lock:
        n = next(_counter)
    host = _UNSAFE.sub("_", socket.gethostname()) or "localhost"
    return f"{seconds}.M{usec:06d}P{os.getpid()}Q{n}R{secrets.token_hex(4)}.{host}"


def local_headers(sender: str, recipient: str) -> bytes:
    """What Postfix's local(8) prepends to a message it delivers to a mailbox (relay
    rewrites no address, so the original recipient is the recipient)."""
    return (f"Return-Path: <{sender}>\nX-Original-To: {recipient}\n"
            f"Delivered-To: {recipient}\n").encode("utf-8", "surrogateescape")


def deliver(maildir: str, content: bytes, *, sender: str, recipient: str) -> str:
    """Write one message for one recipient into ``maildir``; its ID once it is durable.

    ``content`` is the message as the spool keeps it (CR LF); MaildirError (an OSError,
    errno kept) if the directory cannot be made or written.
    """
    paths = {name: os.path.join(maildir, name) for name in SUBDIRS}
    try:
        for path in paths.values():
            os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise MaildirError(exc.errno, f"create maildir {maildir}: {exc.strerror}") from None
    name = unique_name()
    tmp = os.path.join(paths["tmp"], name)
    data = local_headers(sender, recipient) + content.replace(b"\r\n", b"\n")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() and unlink(), not rename(): link fails instead of replacing a file that
        # somehow has the same name (qmail's rule).
        os.link(tmp, os.path.join(paths["new"], name))
        os.unlink(tmp)
        _fsync_dir(paths["new"])
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise MaildirError(exc.errno, f"write to maildir {maildir}: {exc.strerror}") from None
    return name


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def valid_id(message_id: str) -> bool:
    """Whether ``message_id`` could name a message (no path separators, no dot-files)."""
    return bool(_VALID_ID.match(message_id)) and not message_id.startswith(".")


class Maildir:
    """The reading side of one Maildir; one that does not exist is empty."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _files(self) -> Iterator[tuple[str, str]]:
        for sub in ("new", "cur"):
            directory = os.path.join(self.path, sub)
            try:
                names = os.listdir(directory)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                if not name.startswith("."):
                    yield name, os.path.join(directory, name)

    def entries(self) -> list[Entry]:
        """Every message, oldest first (by delivery time, then name)."""
        found: list[Entry] = []
        for name, path in self._files():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # removed or moved to cur/ meanwhile
            unique, _, info = name.partition(":")
            m = _NAME_TIME.match(unique)
            delivered = int(m.group(1)) + int(m.group(2)) / 1_000_000 if m else st.st_mtime
            flags = info[2:] if info.startswith("2,") else ""
            found.append(Entry(unique, path, delivered, st.st_size, flags))
        found.sort(key=lambda e: (e.delivered, e.id))
        return found

    def find(self, message_id: str) -> Entry | None:
        if not valid_id(message_id):
            return None
        for entry in self.entries():
            if entry.id == message_id:
                return entry
        return None

    def remove(self, message_id: str) -> bool:
        entry = self.find(message_id)
        if entry is None:
            return False
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            return False
        return True


class Captured:
    """The messages of several Maildirs as one mailbox (what the read API and ``relay
    capture`` show): the Maildirs that next hops name."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.maildirs = [Maildir(p) for p in paths]

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.maildirs]

    def entries(self) -> list[Entry]:
        """Every message, oldest first."""
        found = [e for m in self.maildirs for e in m.entries()]
        found.sort(key=lambda e: (e.delivered, e.id))
        return found

    def find(self, message_id: str) -> Entry | None:
        """The message with this ID; ``latest`` (Mailpit's word) is the newest one."""
        if message_id == "latest":
            entries = self.entries()
            return entries[-1] if entries else None
        for maildir in self.maildirs:
            entry = maildir.find(message_id)
            if entry is not None:
                return entry
        return None

    def read(self, message_id: str) -> bytes | None:
        entry = self.find(message_id)
        if entry is None:
            return None
        try:
            with open(entry.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def remove(self, message_id: str) -> bool:
        return any(m.remove(message_id) for m in self.maildirs)

    def clear(self) -> int:
        """Remove every message; how many were removed."""
        removed = 0
        for entry in self.entries():
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return removed
