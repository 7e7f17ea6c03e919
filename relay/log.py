"""Logging in Postfix's maillog format.

    Mmm dd hh:mm:ss HOST SYSLOG_NAME/PROGRAM[PID]: text

PROGRAM is the part of Postfix that would have written the line (smtpd, cleanup,
qmgr, smtp, bounce, postsuper, ...): it is the last component of the logger name,
so ``logging.getLogger("relay.qmgr")`` logs as ``relay/qmgr``.  Warnings and errors
get Postfix's ``warning:``/``error:``/``fatal:`` prefix.  Lines go to maillog_file
when it is set, else to standard error.  Nothing here buffers: a crash loses no line
that was already written.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_PREFIX = {
    logging.WARNING: "warning: ",
    logging.ERROR: "error: ",
    logging.CRITICAL: "fatal: ",
}


class MaillogFormatter(logging.Formatter):
    def __init__(self, hostname: str, syslog_name: str) -> None:
        super().__init__()
        self.hostname = hostname.split(".")[0] or "localhost"
        self.syslog_name = syslog_name

    _cache: tuple[int, str] = (-1, "")  # (second, its stamp): swapped whole, thread-safe

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached_second, stamp = self._cache
        if second != cached_second:  # one strftime per second, not per line
            stamp = time.strftime("%b %d %H:%M:%S", time.localtime(second))
            if stamp[4] == "0":  # syslog pads the day with a space: "Nov  4"
                stamp = stamp[:4] + " " + stamp[5:]
            self._cache = (second, stamp)
        program = record.name.rsplit(".", 1)[-1]
        text = _PREFIX.get(record.levelno, "") + record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            text += " " + self.formatException(record.exc_info).replace("\n", " | ")
        return f"{stamp} {self.hostname} {self.syslog_name}/{program}[{record.process}]: {text}"


def setup(hostname: str, syslog_name: str, maillog_file: str = "", debug: bool = False) -> None:
    """Route the ``relay`` logger tree to the maillog (or stderr), replacing any old handler."""
    root = logging.getLogger("relay")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler: logging.Handler
    if maillog_file:
        os.makedirs(os.path.dirname(os.path.abspath(maillog_file)), exist_ok=True)
        handler = logging.FileHandler(maillog_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(MaillogFormatter(hostname, syslog_name))
    root.addHandler(handler)
    # The maillog names no source file, thread or multiprocessing name: skip the
    # stack walk and lookups that logging makes for every record otherwise.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
