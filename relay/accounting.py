"""The accounting log (``accounting_log``): one CSV row per recipient outcome.

    type,time,queue_id,sender,recipient,domain,remote_host,dsn,reply
    d,2026-12-02T17:25:25.431Z,991048F41EA,a@example.org,b@example.net,example.net,mx.example.net[192.0.2.7]:25,2.0.0,250 2.0.0 Ok: queued as 4F2A31C0D2

``type`` is ``d`` delivered, ``b`` bounced, ``t`` deferred (a temporary failure), ``f``
expired (returned to the sender, or dropped for the null sender, after the queue
lifetime); ``time`` is UTC, RFC 3339 with milliseconds; ``remote_host`` is the maillog's
``relay=`` field (empty where it says ``none``); ``reply`` the text the maillog puts in
parentheses.  The queue manager writes a row wherever it logs a ``to=<...>`` line (and
one ``f`` row per recipient of an expired message), through relay.scheduler's observers,
so the two never disagree.

Rows are written by the ``csv`` module (RFC 4180 quoting); a carriage return or line
feed inside a field becomes a space, so every row is one line for ``grep`` and ``wc -l``.
The header is written whenever the file is empty (a new file, or one logrotate just
replaced).  ``reopen()`` (SIGHUP, ``relay reload``) opens the path again, as for the
maillog.  Each row is flushed at once, not fsynced: a crash loses no row already
written, a power cut may lose the last ones (accounting is not the mail's promise).
It never reads the spool.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
import time
from typing import TextIO

from relay.outcome import Report, Status

HEADER = ("type", "time", "queue_id", "sender", "recipient", "domain", "remote_host", "dsn",
          "reply")
TYPE = {Status.SENT: "d", Status.BOUNCED: "b", Status.DEFERRED: "t", Status.EXPIRED: "f"}
_LINE_BREAKS = str.maketrans({"\r": " ", "\n": " "})

log = logging.getLogger("relay.qmgr")


class AccountingError(Exception):
    """accounting_log cannot be opened; ``str()`` says which and why."""


def timestamp(seconds: float) -> str:
    whole = int(seconds)
    millis = int((seconds - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def row(report: Report) -> list[str]:
    relay = "" if report.relay == "none" else report.relay
    fields = [TYPE[report.status], timestamp(report.time), report.queue_id, report.sender,
              report.recipient, report.domain, relay, report.dsn, report.reason]
    return [f.translate(_LINE_BREAKS) for f in fields]


class AccountingLog:
    """The open accounting log; call it with each Report.  Thread-safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = self._open()
        self._writer = csv.writer(self._file, lineterminator="\n")

    def _open(self) -> TextIO:
        try:
            f = open(self.path, "a", newline="", encoding="utf-8",  # noqa: SIM115 - kept open
                     errors="surrogateescape")
        except OSError as exc:
            raise AccountingError(f"open {self.path}: {exc.strerror or exc}") from None
        if f.tell() == 0:
            csv.writer(f, lineterminator="\n").writerow(HEADER)
            f.flush()
        return f

    def __call__(self, report: Report) -> None:
        with self._lock:
            self._writer.writerow(row(report))
            self._file.flush()

    def reopen(self) -> None:
        """Open the path again (logrotate moved the file); keep the old one if it fails."""
        try:
            new = self._open()
        except AccountingError as exc:
            log.warning("cannot reopen the accounting log: %s", exc)
            return
        with self._lock:
            old, self._file = self._file, new
            self._writer = csv.writer(self._file, lineterminator="\n")
        old.close()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def open_log(path: str) -> AccountingLog | None:
    """The accounting log main.cf names, or None for an empty ``accounting_log``."""
    if not path:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise AccountingError(f"open {path}: {directory} is not a directory")
    return AccountingLog(path)
