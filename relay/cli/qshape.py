"""qshape: the queue's domains by age, as Postfix's qshape(1) (auxiliary/qshape/qshape.pl).

    qshape [-s] [-p] [-m min_subdomains] [-b bucket_count] [-t bucket_time] [-l]
           [-w terminal_width] [-N batch_msg_count] [-n batch_top_domains]
           [-c config_dir] [queue ...]

Counts the recipients still to be delivered (with ``-s``: the senders, one per
message) per domain and per age bucket, and prints::

                                             T  5 10 20 40 80 160 320 640 1280 1280+
                                      TOTAL  3  3  0  0  0  0   0   0   0    0     0
                                example.net  2  2  0  0  0  0   0   0   0    0     0

Age is now minus arrival time; bucket limits are ``bucket_time`` minutes (default 5)
doubling ``bucket_count`` times (default 10; ``-l`` makes them linear), the last one
open ended.  Domains are lower-cased, the null sender counts as ``MAILER-DAEMON``;
``-p`` adds ``.parent.domain`` rows for parents with at least ``min_subdomains`` (5)
subdomains.  Column widths, the 80-column right justification, ``+`` truncation of
long names and the order (total descending, then shorter names first) are qshape.pl's.
The TOTAL row is always the first (qshape.pl would let a single domain with a name
shorter than "TOTAL" and the same count jump ahead of it).  As in qshape.pl, ``-n``
limits the rows only when stdout is a terminal (default 20 there); ``-N`` (redraw
every N messages) is accepted and ignored.  Default queues: incoming active.

Envelopes are read one at a time; memory grows with the number of distinct domains,
never with the number of messages.  Read only, no lock, nothing left by a crash.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

from relay import config
from relay.cli import showq
from relay.cli.command import EX_OK, EX_USAGE, Fatal, Parser, UsageError, run
from spool import Envelope
from spool import envelope as envfmt
from spool.envelope import Fields

USAGE = ("usage: qshape [ -s ] [ -p ] [ -m <min_subdomains> ] [ -l ]"
         " [ -b <bucket_count> ] [ -t <bucket_time> ] [ -w <terminal_width> ]"
         " [ -N <batch_msg_count> ] [ -n <batch_top_domains> ]"
         " [ -c <config_directory> ] [ <queue_name> ... ]")
DEFAULT_QUEUES = ("incoming", "active")
# maildrop exists in Postfix, not here: it is accepted and always empty.
KNOWN_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")

WIDTH = 80  # screen width
DOMAIN_MIN_WIDTH = 18  # $dwidth
_TRIM = re.compile(r"\.?(.+?)\.?$")
_PARENT = re.compile(r"^(?:\.)?[^.]+\.(.*\.)")


def _parser() -> Parser:
    p = Parser(prog="qshape", add_help=False)
    p.add_argument("-s", dest="senders", action="store_true")
    p.add_argument("-p", dest="parents", action="store_true")
    p.add_argument("-m", dest="min_subdomains", type=int, default=5)
    p.add_argument("-b", dest="buckets", type=int, default=10)
    p.add_argument("-t", dest="bucket_time", type=int, default=5)
    p.add_argument("-l", dest="linear", action="store_true")
    p.add_argument("-w", dest="width", type=int, default=WIDTH)
    p.add_argument("-N", dest="batch_messages", type=int)
    p.add_argument("-n", dest="top_domains", type=int)
    p.add_argument("-c", dest="config_dir", metavar="config_dir")
    p.add_argument("queues", nargs="*")
    return p


@dataclass(frozen=True, slots=True)
class Shape:
    """What to count and how to bucket it."""

    buckets: int = 10
    bucket_time: int = 5  # minutes
    linear: bool = False
    senders: bool = False
    parents: bool = False
    min_subdomains: int = 5

    def bucket(self, age: float) -> int:
        """1..buckets (0 is the total column), as qshape.pl's bucket()."""
        m = age / (60 * self.bucket_time)
        if m < 1:
            return 1
        # The same floating-point expression as the Perl, so boundaries agree.
        b = int(m + 1) if self.linear else 2 + int(math.log(m) / math.log(2))
        return min(b, self.buckets)

    def headings(self) -> list[str]:
        """``T 5 10 20 ... 1280 1280+``: each limit doubles (or grows by bucket_time)."""
        heads = ["T"]
        t: int = 0
        label = ""
        for i in range(1, self.buckets + 1):
            if i < self.buckets:
                t += t if (t and not self.linear) else self.bucket_time
                label = str(t)
            else:
                label = f"{t}+"
            heads.append(label)
        return heads


def domain_of(address: str) -> str:
    """qshape.pl's address to domain: after the last @, '..' squeezed, one dot trimmed."""
    if address == "":
        return "MAILER-DAEMON"
    domain = address.lower().rpartition("@")[2].replace("..", ".")
    m = _TRIM.match(domain)
    return m.group(1) if m else domain


class Counts:
    """Per-domain rows of per-bucket counts; row[0] is the domain's total."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.total = [0] * (shape.buckets + 1)
        self.rows: dict[str, list[int]] = {}
        self.subdomains: dict[str, int] = {}

    def add(self, env: Envelope, now: float) -> None:
        self.add_fields(envfmt.as_fields(env), now)

    def add_fields(self, rec: Fields, now: float) -> None:
        """Count one message, given as its plain fields (spool.envelope.loads_fields)."""
        b = self.shape.bucket(now - int(rec["arrival_time"]))
        if self.shape.senders:
            addresses: Iterable[str] = (rec["sender"],)
        else:
            addresses = (r["address"] for r in rec["recipients"] if r["state"] == "pending")
        for address in addresses:
            self.total[0] += 1
            self.total[b] += 1
            self._count(domain_of(address), b)

    def _count(self, domain: str, b: int) -> None:
        new = False
        while True:
            row = self.rows.get(domain)
            if row is None:
                row = self.rows[domain] = [0] * (self.shape.buckets + 1)
            old = row[0] > 0
            row[0] += 1
            row[b] += 1
            if new:
                self.subdomains[domain] = self.subdomains.get(domain, 0) + 1
            new = not old
            if not self.shape.parents:
                return
            domain, n = _PARENT.subn(r".\1", domain, count=1)
            if not n:
                return

    def ordered(self) -> list[tuple[str, list[int]]]:
        """Rows by total descending, shorter names first; small parent rows left out."""
        rows = [
            (name, row) for name, row in self.rows.items()
            if not (name.startswith(".")
                    and self.subdomains.get(name, 0) < self.shape.min_subdomains)
        ]
        rows.sort(key=lambda item: (-item[1][0], len(item[0]), item[0]))
        return rows


def render(counts: Counts, width: int = WIDTH, top: int = 0) -> str:
    """The table, as qshape.pl's results()."""
    heads = counts.shape.headings()
    widths = []
    dw = width
    for i, head in enumerate(heads):
        n = max(len(str(counts.total[i])), len(head))
        n = n + 1 if n > 2 else 3
        widths.append(n)
        dw -= n
    dw = max(dw, DOMAIN_MIN_WIDTH)

    def line(name: str, cells: Sequence[object]) -> str:
        if len(name) > dw:
            if name.startswith("."):
                name = ".+" + name[len(name) - dw + 2:]
            else:
                name = "+" + name[len(name) - dw + 1:]
        return name.rjust(dw) + "".join(f"{c!s:>{w}}" for c, w in zip(cells, widths)) + "\n"

    out = [line("", heads), line("TOTAL", counts.total)]
    for n, (name, row) in enumerate(counts.ordered(), 1):
        if top > 0 and n > top - 1:
            break  # TOTAL took one of the top rows, as in qshape.pl
        out.append(line(name, row))
    return "".join(out)


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None, now: float | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out = showq.utf8_stdout() if stdout is None else stdout

    def body() -> int:
        try:
            ns = _parser().parse_args(args)
        except UsageError as exc:
            raise Fatal(f"{exc}\n{USAGE}", EX_USAGE) from None
        # qshape.pl ignores values out of range and keeps its defaults.
        shape = Shape(
            buckets=ns.buckets if ns.buckets > 0 else 10,
            bucket_time=ns.bucket_time if ns.bucket_time > 0 else 5,
            linear=ns.linear,
            senders=ns.senders,
            parents=ns.parents,
            min_subdomains=ns.min_subdomains if ns.min_subdomains > 0 else 5,
        )
        width = max(WIDTH, ns.width)
        queues = ns.queues or list(DEFAULT_QUEUES)
        for queue in queues:
            if queue not in KNOWN_QUEUES:
                raise Fatal(f"unknown queue name: {queue}", EX_USAGE)
        try:
            cfg = config.load(config.config_dir_from(ns.config_dir, os.environ),
                              warn=lambda message: None)
            spool = showq.open_spool(cfg)
        except (config.ConfigError, showq.NoQueueDirectory) as exc:
            raise Fatal(str(exc)) from None
        top = 0
        if out.isatty():
            top = ns.top_domains if ns.top_domains is not None else 20
        counts = Counts(shape)
        when = int(time.time() if now is None else now)
        for _queue, rec in showq.records(spool, [q for q in queues if q != "maildrop"]):
            counts.add_fields(rec, when)
        showq.write([render(counts, width, top)], out)
        return EX_OK

    def body_or_fatal() -> int:
        try:
            return body()
        except OSError as exc:
            raise Fatal(exc.strerror or str(exc)) from None

    return run("qshape", body_or_fatal, stderr=stderr)


if __name__ == "__main__":
    sys.exit(main())
