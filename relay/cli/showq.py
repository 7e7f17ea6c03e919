"""The queue listing: what postqueue -p/-j, mailq, sendmail -bp and relay queue ls print.

This module owns Postfix's two listing formats, byte for byte (FORMATS.md 1.1, 1.2):

* the sendmail-style listing of ``src/postqueue/showq_compat.c`` -- header, one block
  per message (ID with ``*`` for active, ``!`` for hold, ``#`` when force-expired; size;
  arrival time; sender), the delay reason right-aligned to column 78 whenever it changes,
  the recipients still to be delivered, a blank line between messages, and the
  ``-- N Kbytes in M Requests.`` trailer or ``Mail queue is empty``;
* the JSON listing of ``src/postqueue/showq_json.c`` -- one object per message per line,
  members in Postfix's order, ``": "`` and ``", "`` separators, non-printable characters
  replaced by ``?``.

Everything streams: envelopes are read one at a time in directory order (Postfix's
showq order: active, incoming, deferred, hold) and each message's text is yielded as
soon as it is formatted, so 100,000 queued messages cost the memory of one.  Only
recipients in the pending state are listed, each address once per message.

The commands format from the plain field dicts of ``Spool.envelope_fields()``: no stat
and no records, which a listing of a deep queue would pay for once per message.

It never writes the spool, never takes a lock and never talks to the daemon: a listing
is a snapshot that may show a message twice or miss one that moves while we read
(postqueue(1) says the same of Postfix).  A crash leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TextIO

from relay.cli.command import silence_stdout, write_bytes
from relay.config import Config
from spool import Spool
from spool.envelope import Fields

# showq.c scans maildrop, active, incoming, deferred, hold; we have no maildrop, and
# corrupt/ is for inspection, not delivery, so Postfix's showq never lists it either.
LISTED_QUEUES = ("active", "incoming", "deferred", "hold")

EMPTY_SENDER = "MAILER-DAEMON"  # Postfix's empty_address_recipient
REASON_UNAVAILABLE = "reason unavailable"
_MARKERS = {"active": "*", "hold": "!"}


@dataclass(frozen=True, slots=True)
class Layout:
    """Column widths of the sendmail-style listing (showq_compat.c S_* / L_* formats)."""

    id_width: int
    size_width: int
    time_width: int
    headings: tuple[str, str, str, str]

    @property
    def indent(self) -> str:
        """A recipient line's three empty fields: ``"%-11s %7s %-20s "`` of nothing."""
        return " " * (self.id_width + self.size_width + self.time_width + 3)

    def heading(self) -> str:
        q, s, t, r = self.headings
        return f"{q:<{self.id_width}} {s:>{self.size_width}} {t:<{self.time_width}} {r}\n"

    @property
    def first_line(self) -> str:
        """A message's first line as a str.format() template: status, size, time, sender."""
        tw = self.time_width
        return f"{{:<{self.id_width}}} {{:>{self.size_width}}} {{:>{tw}.{tw}}} {{}}\n"


SHORT = Layout(11, 7, 20, ("-Queue ID-", "--Size--", "----Arrival Time----",
                           "-Sender/Recipient-------"))
LONG = Layout(17, 8, 19, ("----Queue ID-----", "--Size--", "---Arrival Time----",
                          "--Sender/Recipient------"))


def layout_for(long_ids: bool) -> Layout:
    """The layout for ``enable_long_queue_ids``: the field count is the same in both."""
    return LONG if long_ids else SHORT


def printable(text: str) -> str:
    """Postfix's printable(text, '?'): keeps a listing one line per field on a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


class NoQueueDirectory(Exception):
    """queue_directory does not exist: the mail system was never started there."""


def open_spool(cfg: Config) -> Spool:
    """The spool named by main.cf, for reading; never creates a directory."""
    spool = Spool(cfg.str("queue_directory"), long_ids=cfg.bool("enable_long_queue_ids"),
                  create=False)
    if not os.path.isdir(spool.root):
        # Postfix's commands chdir(queue_directory) first and say so when they cannot.
        raise NoQueueDirectory(f"chdir {spool.root}: No such file or directory")
    return spool


def records(spool: Spool, queues: Iterable[str] = LISTED_QUEUES) -> Iterator[tuple[str, Fields]]:
    """Stream (queue, envelope fields) in showq order, as plain dicts
    (spool.envelope.loads_fields); lost races and corrupt files are skipped."""
    return spool.envelope_fields(queues)


def pending(rec: Fields) -> list[tuple[str, str]]:
    """(address, reason) of each recipient still to be delivered, duplicates dropped."""
    rcpts = rec["recipients"]
    if len(rcpts) == 1:  # the common case, without the set
        r = rcpts[0]
        return [(r["address"], r["reason"])] if r["state"] == "pending" else []
    seen: set[str] = set()
    out = []
    for r in rcpts:
        address = r["address"]
        if r["state"] != "pending" or address in seen:
            continue
        seen.add(address)
        out.append((address, r["reason"]))
    return out


def _c_len(text: str) -> int:
    # C's strlen() counts bytes; the reason is aligned as Postfix aligns it.
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


def _reason_line(reason: str) -> str:
    shown = printable(reason) if reason else REASON_UNAVAILABLE
    return " " * max(0, 76 - _c_len(shown)) + f"({shown})\n"


def record_formatter(layout: Layout = SHORT) -> Callable[[str, Fields], str]:
    """The function that formats one message's block of the sendmail-style listing
    (without the separating blank line) in this layout, with the layout's strings computed
    once: a listing calls it for each of its (maybe 100,000) messages."""
    first_line = layout.first_line.format
    indent = layout.indent
    markers = _MARKERS
    asctime, localtime = time.asctime, time.localtime

    def format_one(queue: str, rec: Fields) -> str:
        status = rec["queue_id"] + markers.get(queue, "")
        if rec["forced_expire"]:
            status += "#"
        sender = rec["sender"]
        if not sender:
            sender = EMPTY_SENDER
        elif not sender.isprintable():
            sender = printable(sender)
        # asctime() is 24 characters; "%20.20s" keeps "Mon Nov 23 18:08:53 " and
        # "%19.19s" drops the trailing space; the year is never shown.
        text = first_line(status, rec["size"], asctime(localtime(rec["arrival_time"])), sender)
        last_reason = ""
        for address, reason in pending(rec):
            if reason != last_reason:
                text += _reason_line(reason)
                last_reason = reason
            if not address.isprintable():
                address = printable(address)
            text += indent + address + "\n"
        return text

    return format_one


def sendmail_records(items: Iterable[tuple[str, Fields]], *, long_ids: bool = False
                     ) -> Iterator[str]:
    """The whole ``mailq`` text, yielded a message at a time."""
    layout = layout_for(long_ids)
    totals = [0, 0]
    yield from _blocks(items, record_formatter(layout), layout, totals)
    yield _trailer(*totals)


def _blocks(items: Iterable[tuple[str, Fields]], format_one: Callable[[str, Fields], str],
            layout: Layout, totals: list[int]) -> Iterator[str]:
    """Each message's block, after the heading (before the first message of the listing)
    or a blank line; ``totals`` ([messages, octets] so far) counts them."""
    for queue, rec in items:
        yield layout.heading() if totals[0] == 0 else "\n"
        totals[0] += 1
        totals[1] += rec["size"]
        yield format_one(queue, rec)


def _trailer(count: int, size: int) -> str:
    """The listing's last line."""
    if count == 0:
        return "Mail queue is empty\n"
    return f"\n-- {size // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}.\n"


PARALLEL_MIN = 2000  # queued messages from which a listing is made by two processes
WRITE_BATCH = 256  # messages per write(): few calls, and still a streamed listing


def write_sendmail_listing(spool: Spool, out: TextIO, *,
                           queues: Iterable[str] = LISTED_QUEUES) -> None:
    """``postqueue -p`` and ``mailq``: sendmail_records() of the spool, written to ``out``.

    A queue of PARALLEL_MIN messages or more, on a machine with two CPUs or more, is read
    and formatted by two processes at once: the names are listed first (no file read),
    a forked child takes the second half of them in their order and hands its text and
    totals back through a pipe, the parent writes its own half meanwhile, then the
    child's, then the trailer of both; the text is byte for byte the one process's.
    Reading envelopes is most of a listing's time, so a deep queue is listed in little
    more than half of it.  Should the child fail, the parent lists its half itself."""
    names = [(queue, name) for queue in queues for name in spool.queue_ids(queue)]
    if (len(names) < PARALLEL_MIN or not hasattr(os, "fork")
            or len(os.sched_getaffinity(0)) < 2):
        write(sendmail_records(spool.envelope_fields_of(names), long_ids=spool.long_ids), out)
        return
    layout = layout_for(spool.long_ids)
    format_one = record_formatter(layout)
    half = len(names) // 2
    out.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the second half, all at once into the pipe
        status = 1
        try:
            os.close(read_end)
            blocks, count, size = [], 0, 0
            for queue, rec in spool.envelope_fields_of(names[half:]):
                blocks.append(format_one(queue, rec))
                count += 1
                size += rec["size"]
            payload = b"%d %d\n" % (count, size) + "\n".join(blocks).encode("utf-8", "replace")
            view = memoryview(payload)
            while view:
                view = view[os.write(write_end, view):]
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    totals = [0, 0]
    try:
        with os.fdopen(read_end, "rb") as child:
            _write_batched(_blocks(spool.envelope_fields_of(names[:half]), format_one, layout,
                                   totals), out)
            theirs = child.readline().split()
            rest = child.read()
        _, status = os.waitpid(pid, 0)
        pid = 0
        if status == 0 and len(theirs) == 2:
            if int(theirs[0]):
                out.write(layout.heading() if totals[0] == 0 else "\n")
                write_bytes(rest, out)
            totals[0] += int(theirs[0])
            totals[1] += int(theirs[1])
        else:  # the child failed: its half, here
            _write_batched(_blocks(spool.envelope_fields_of(names[half:]), format_one, layout,
                                   totals), out)
        out.write(_trailer(*totals))
        out.flush()
    except BrokenPipeError:
        silence_stdout(out)
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def json_string(text: str) -> str:
    """showq_json.c's quoting: non-printables become ``?``, then ``"`` and ``\\`` are escaped."""
    if not text.isprintable():
        text = printable(text)
    if "\\" in text or '"' in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def format_json_record(queue: str, rec: Fields) -> str:
    """One message as Postfix 3.5-3.10's ``postqueue -j`` prints it, newline included."""
    rcpts = []
    for address, reason in pending(rec):
        item = '{"address": ' + json_string(address)
        if reason:
            item += ', "delay_reason": ' + json_string(reason)
        rcpts.append(item + "}")
    return (
        f'{{"queue_name": {json_string(queue)}, "queue_id": {json_string(rec["queue_id"])}, '
        f'"arrival_time": {int(rec["arrival_time"])}, "message_size": {rec["size"]}, '
        f'"forced_expire": {"true" if rec["forced_expire"] else "false"}, '
        f'"sender": {json_string(rec["sender"] or EMPTY_SENDER)}, '
        f'"recipients": [{", ".join(rcpts)}]}}\n'
    )


def json_records(items: Iterable[tuple[str, Fields]]) -> Iterator[str]:
    """The whole ``postqueue -j`` text, a line per message; nothing for an empty queue."""
    for queue, rec in items:
        yield format_json_record(queue, rec)


def utf8_stdout() -> TextIO:
    """sys.stdout writing UTF-8 whatever the locale says (Postfix writes the bytes it has)."""
    out = sys.stdout
    if isinstance(out, io.TextIOWrapper):
        out.reconfigure(encoding="utf-8", errors="replace")
    return out


def write(chunks: Iterable[str], out: TextIO) -> None:
    """Write a listing as it is produced; a reader that went away (``mailq | head``)
    ends the listing quietly, as SIGPIPE ends Postfix's."""
    try:
        _write_batched(chunks, out)
        out.flush()
    except BrokenPipeError:
        silence_stdout(out)


def _write_batched(chunks: Iterable[str], out: TextIO) -> None:
    """``chunks`` written WRITE_BATCH at a time: few calls, and still a streamed listing."""
    batch: list[str] = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) >= WRITE_BATCH:
            out.write("".join(batch))
            batch.clear()
    out.write("".join(batch))
