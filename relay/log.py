"""Logging in Postfix's maillog format, to a file, standard error or the local syslog.

    Mmm dd hh:mm:ss HOST SYSLOG_NAME/PROGRAM[PID]: text

PROGRAM is the part of Postfix that would have written the line (smtpd, cleanup,
qmgr, smtp, bounce, postsuper, ...): it is the last component of the logger name,
so ``logging.getLogger("relay.qmgr")`` logs as ``relay/qmgr``.  Warnings and errors
get Postfix's ``warning:``/``error:``/``fatal:`` prefix.

Where the lines go is ``maillog_file``: empty, standard error (a foreground service
under systemd lands in the journal); ``syslog``, the local syslog socket (/dev/log,
RFC 3164 framing without the host name, which the syslog daemon adds, as glibc's
syslog(3) writes it) with ``syslog_facility``; anything else, a file opened for
appending.  ``reopen()`` closes and opens that file again, so that logrotate can
move it away and signal the daemon (SIGHUP) instead of copying and truncating it;
while the file cannot be opened again, lines keep going to the old one.  A start-up
that cannot open its log raises ``LogError`` with the reason, for one fatal line.

RELAY_SYSLOG_SOCKET in the environment names another socket than /dev/log (tests
run a private one).  Nothing here buffers: a crash loses no line already written.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.config import Config

_PREFIX = {
    logging.WARNING: "warning: ",
    logging.ERROR: "error: ",
    logging.CRITICAL: "fatal: ",
}

SYSLOG = "syslog"  # the maillog_file value that means the local syslog daemon
SYSLOG_SOCKET = "/dev/log"
SYSLOG_SOCKET_ENV = "RELAY_SYSLOG_SOCKET"


class LogError(Exception):
    """The maillog cannot be opened; ``str()`` says which and why."""


_pid = os.getpid()  # the [PID] of every line: read once (again after a fork), not per line


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class MaillogFormatter(logging.Formatter):
    def __init__(self, hostname: str, syslog_name: str, *, with_host: bool = True) -> None:
        super().__init__()
        self.hostname = hostname.split(".")[0] or "localhost"
        self.syslog_name = syslog_name
        # The syslog daemon puts in the host name itself; a file needs it from us.
        self.host_field = f" {self.hostname}" if with_host else ""

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
        return f"{stamp}{self.host_field} {self.syslog_name}/{program}[{_pid}]: {text}"


class _Syslog(logging.handlers.SysLogHandler):
    """SysLogHandler without the NUL it appends (RFC 3164 has none), that drops a line
    quietly while the syslog daemon is away, as syslog(3) does, instead of printing a
    traceback; it connects again at the next line."""

    append_nul = False

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def handler_for(hostname: str, syslog_name: str, maillog_file: str,
                facility: str = "mail") -> logging.Handler:
    """The handler for ``maillog_file`` (see the module docstring); LogError if the file
    or the syslog socket cannot be opened."""
    handler: logging.Handler
    if maillog_file == SYSLOG:
        path = os.environ.get(SYSLOG_SOCKET_ENV) or SYSLOG_SOCKET
        code = logging.handlers.SysLogHandler.facility_names.get(facility)
        if code is None:
            raise LogError(f"unknown syslog_facility: {facility}")
        # SysLogHandler, as openlog(3), ignores a socket nobody serves; at start-up
        # the operator should hear of it instead of losing every line.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(path)
        except OSError as exc:
            raise LogError(f"cannot connect to the syslog socket {path}: "
                           f"{exc.strerror or exc}") from None
        finally:
            probe.close()
        handler = _Syslog(address=path, facility=code, socktype=socket.SOCK_DGRAM)
        handler.setFormatter(MaillogFormatter(hostname, syslog_name, with_host=False))
        return handler
    if maillog_file:
        try:
            directory = os.path.dirname(os.path.abspath(maillog_file))
            if not os.path.lexists(directory):
                os.makedirs(directory)
            handler = logging.FileHandler(maillog_file, encoding="utf-8")
        except OSError as exc:
            raise LogError(f"open {maillog_file}: {exc.strerror or exc}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(MaillogFormatter(hostname, syslog_name))
    return handler


def setup(hostname: str, syslog_name: str, maillog_file: str = "", debug: bool = False,
          facility: str = "mail") -> None:
    """Route the ``relay`` logger tree to the maillog, replacing any old handler; LogError
    (and the old handlers kept) if it cannot be opened."""
    handler = handler_for(hostname, syslog_name, maillog_file, facility)
    root = logging.getLogger("relay")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    # The maillog names no source file, thread or multiprocessing name: skip the
    # stack walk and lookups that logging makes for every record otherwise.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False  # the formatter knows its process (a getpid() per line)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def reopen() -> None:
    """Open maillog_file again (logrotate moved it away); a warning in the old file if it
    cannot be.  Standard error and syslog need nothing: the journal and the syslog daemon
    rotate their own files."""
    for handler in logging.getLogger("relay").handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        try:
            stream = handler._open()
        except OSError as exc:
            logging.getLogger("relay.master").warning(
                "cannot reopen %s: %s; logging goes on to the old file",
                handler.baseFilename, exc.strerror or exc)
            continue
        handler.acquire()
        try:
            old, handler.stream = handler.stream, stream
        finally:
            handler.release()
        if old is not None:
            old.close()


def reconfigure(new: Config, old: Config) -> None:
    """After a reload (the maillog already reopened): the maillog main.cf now names, if
    that changed; the old one kept, with a warning, if the new one cannot be opened."""
    def where(cfg: Config) -> tuple[str, str, str, str]:
        return (cfg.str("myhostname"), cfg.str("syslog_name"), cfg.str("maillog_file"),
                cfg.str("syslog_facility"))

    if where(new) == where(old):
        return
    hostname, name, path, facility = where(new)
    try:
        setup(hostname, name, path, facility=facility)
    except LogError as exc:
        logging.getLogger("relay.master").warning(
            "cannot log to the new maillog_file, keeping the old one: %s", exc)
