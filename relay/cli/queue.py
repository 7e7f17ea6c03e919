"""``relay queue``: list, select and act on queued mail by filter, pause destinations.

    relay queue [-c DIR] ls [FILTERS] [--json]
    relay queue [-c DIR] retry|hold|release [FILTERS]
    relay queue [-c DIR] delete [FILTERS] [--all]
    relay queue [-c DIR] pause|resume DOMAIN | --nexthop HOST
    relay queue [-c DIR] paused
    relay queue [-c DIR] summary [FILTERS] [--json]

FILTERS combine (all must hold); a filter given twice matches either value:

    --queue NAME      incoming, active, deferred, hold (corrupt: ls and delete only)
    --sender ADDR     the envelope sender, any case; ``<>`` is the null sender
    --age-min T       at least this old (Postfix time units: 30s 10m 2h 1d 1w; bare = s)
    --age-max T       at most this old
    --domain DOMAIN   a pending recipient's domain; ``.example.com`` means its subdomains
    --rcpt ADDR       a pending recipient, any case
    --reason TEXT     part of a pending recipient's last delay reason, any case

--domain, --rcpt and --reason must hold for one and the same pending recipient, so
``--domain example.com --reason refused`` finds mail whose example.com recipients were
refused, not mail that has any refused recipient and any example.com recipient.

This is an extension beyond Postfix (whose closest tools are the ``mailq | awk |
postsuper -d -`` pipelines in postsuper(1)).  ``ls`` prints postqueue -p blocks (or with
``--json`` the postqueue -j objects, one per line) so the same scripts parse it.  The
actions take spool.transitions' rows (retry, remove, hold, release), as postsuper does,
under each message's lock and re-check the filters once the message is locked, so a message that changed meanwhile is left alone; they
print ``ID: removed`` (``requeued`` for retry, ``placed on hold``, ``released from
hold``) per message and a count line as postsuper does, on standard output.  ``retry``
makes deferred mail due now and asks the daemon for it (``flush-id``); held mail stays
held.  ``delete`` with no filter at all refuses unless ``--all`` is given.

``pause DOMAIN`` records a paused destination in the spool's pause file (``--nexthop
HOST`` pauses a next-hop host instead, stored as ``nexthop:HOST``); the daemon defers
mail for it with ``destination paused`` and, on ``resume``, tries it at once.  A pause
names one domain exactly: pausing example.com does not pause sub.example.com.  The
pause file outlives daemon restarts; telling the daemon (``pauses``) is best effort.

It never talks SMTP and never builds a spool path.  A crash leaves what a transition
leaves: each message is in its old or its new queue, never two.  The actions
are mass operations as postsuper's ``ALL``: the per-message directory fsyncs are left
out and each changed queue directory is fsync'ed once at the end, so a crash before
that may undo some of them (a deleted message comes back whole, a held one is back in
its old queue).  Listings and selections stream: memory does not grow with the queue.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

from relay import config as config_mod
from relay.cli import showq
from relay.cli.command import EX_OK, EX_TEMPFAIL, EX_USAGE, Fatal, Parser, UsageError, run
from spool import CorruptEntry, Envelope, Spool, SpoolError, transitions
from spool.envelope import Fields
from spool.transitions import Transition

LIST_QUEUES = showq.LISTED_QUEUES  # active, incoming, deferred, hold
_TIME = re.compile(r"([0-9]+)([smhdw]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
FLUSH_BATCH = 200  # queue IDs per flush-id request; the control line stays short


def parse_time(text: str) -> float:
    """A Postfix time value: a number with an optional unit s, m, h, d or w."""
    m = _TIME.match(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"bad time value: {text!r} (use e.g. 30s, 10m, 2h, 1d)")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def _domain(address: str) -> str:
    return address.rpartition("@")[2].rstrip(".").lower()


def _null_sender(value: str) -> str:
    return "" if value.strip() in ("", "<>") else value.strip().strip("<>").lower()


# ---- selection ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    queues: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()
    age_min: float | None = None
    age_max: float | None = None
    domains: tuple[str, ...] = ()
    rcpts: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.queues or self.senders or self.domains or self.rcpts or self.reasons
                    or self.age_min is not None or self.age_max is not None)

    def _domain_ok(self, domain: str) -> bool:
        for want in self.domains:
            if want.startswith("."):
                if domain.endswith(want) and len(domain) > len(want):
                    return True
            elif domain == want:
                return True
        return False

    def matches(self, env: Envelope, now: float) -> bool:
        """Whether a message passes every filter (the queue is checked by the caller)."""
        return self._matches(env.sender, env.arrival_time,
                             ((r.address, r.reason) for r in env.pending), now)

    def matches_fields(self, rec: Fields, now: float) -> bool:
        """matches() of a message's plain fields (spool.envelope.loads_fields)."""
        return self._matches(rec["sender"], rec["arrival_time"],
                             ((r["address"], r["reason"]) for r in rec["recipients"]
                              if r["state"] == "pending"), now)

    def _matches(self, sender: str, arrival_time: float,
                 pending: Iterable[tuple[str, str]], now: float) -> bool:
        if self.senders and sender.lower() not in self.senders:
            return False
        age = now - arrival_time
        if self.age_min is not None and age < self.age_min:
            return False
        if self.age_max is not None and age > self.age_max:
            return False
        if not (self.domains or self.rcpts or self.reasons):
            return True
        for address, reason in pending:
            if self.domains and not self._domain_ok(_domain(address)):
                continue
            if self.rcpts and address.lower() not in self.rcpts:
                continue
            if self.reasons and not any(r in reason.lower() for r in self.reasons):
                continue
            return True
        return False


def select(spool: Spool, filt: Filter, queues: Iterable[str], now: float
           ) -> Iterator[tuple[str, Envelope]]:
    """Stream (queue, envelope) of the matching messages in these queues."""
    for queue, env in spool.envelopes(queues):
        if filt.matches(env, now):
            yield queue, env


def select_records(spool: Spool, filt: Filter, queues: Iterable[str], now: float
                   ) -> Iterator[tuple[str, Fields]]:
    """select() as plain field dicts (Spool.envelope_fields): the same messages, cheaper."""
    for queue, rec in spool.envelope_fields(queues):
        if filt.matches_fields(rec, now):
            yield queue, rec


def _queues(filt: Filter, default: Sequence[str]) -> tuple[str, ...]:
    """The default queues, limited by --queue; corrupt/ only when named."""
    if not filt.queues:
        return tuple(q for q in default if q != "corrupt")
    return tuple(q for q in default if q in filt.queues)


# ---- summary ------------------------------------------------------------------------------


def format_age(seconds: float) -> str:
    """A compact age: 45s, 12m, 3h5m, 2d4h."""
    s = int(max(0.0, seconds))
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            rest = (s % size) // subsize
            return f"{s // size}{unit}{rest}{sub}" if rest else f"{s // size}{unit}"
    return f"{s // 60}m" if s >= 60 else f"{s}s"


@dataclass
class QueueStats:
    messages: int = 0
    recipients: int = 0
    oldest: float | None = None  # arrival time


def summarize(spool: Spool, filt: Filter, now: float
              ) -> tuple[dict[str, QueueStats], dict[str, list[int]]]:
    """Per queue: messages, pending recipients, oldest arrival; per destination
    (pending recipient domain, all queues but corrupt): [messages, recipients]."""
    queues = _queues(filt, (*LIST_QUEUES, "corrupt")) if filt.queues else (*LIST_QUEUES,
                                                                            "corrupt")
    stats = {q: QueueStats() for q in queues}
    dests: dict[str, list[int]] = {}
    for queue in queues:
        st = stats[queue]
        if queue == "corrupt":
            # Unreadable by definition: count files, date them by mtime.
            for entry in spool.scan("corrupt"):
                st.messages += 1
                st.oldest = entry.mtime if st.oldest is None else min(st.oldest, entry.mtime)
            continue
        for _, rec in select_records(spool, filt, (queue,), now):
            pending = showq.pending(rec)
            arrival = rec["arrival_time"]
            st.messages += 1
            st.recipients += len(pending)
            st.oldest = arrival if st.oldest is None else min(st.oldest, arrival)
            per_msg: dict[str, int] = {}
            for address, _ in pending:
                d = _domain(address)
                per_msg[d] = per_msg.get(d, 0) + 1
            for d, n in per_msg.items():
                row = dests.setdefault(d, [0, 0])
                row[0] += 1
                row[1] += n
    return stats, dests


def print_summary(stats: Mapping[str, QueueStats], dests: Mapping[str, list[int]],
                  now: float, out: TextIO, as_json: bool) -> None:
    if as_json:
        obj = {
            "queues": {q: {"messages": s.messages, "recipients": s.recipients,
                           "oldest_age": None if s.oldest is None else int(now - s.oldest)}
                       for q, s in stats.items()},
            "destinations": {d: {"messages": m, "recipients": r}
                             for d, (m, r) in sorted(dests.items())},
        }
        out.write(json.dumps(obj) + "\n")
        return
    out.write(f"{'QUEUE':<12} {'MESSAGES':>9} {'RECIPIENTS':>11}  OLDEST\n")
    for queue, s in stats.items():
        oldest = "-" if s.oldest is None else format_age(now - s.oldest)
        rcpts = "-" if queue == "corrupt" else str(s.recipients)
        out.write(f"{queue:<12} {s.messages:>9} {rcpts:>11}  {oldest}\n")
    out.write("\n")
    if not dests:
        out.write("no pending recipients\n")
        return
    width = max(11, *(len(d) for d in dests))
    out.write(f"{'DESTINATION':<{width}} {'MESSAGES':>9} {'RECIPIENTS':>11}\n")
    ranked = sorted(dests.items(), key=lambda kv: (-kv[1][1], kv[0]))
    out.writelines(f"{d:<{width}} {m:>9} {r:>11}\n" for d, (m, r) in ranked)


# ---- actions ------------------------------------------------------------------------------


def retry(spool: Spool, queue_id: str, *, now: float | None = None,
          accept: transitions.Accept | None = None) -> bool:
    """Make one deferred message due now."""
    return bool(transitions.change(spool, queue_id, Transition.RETRY, now=now, accept=accept))


@dataclass(frozen=True, slots=True)
class Verb:
    transition: Transition
    queues: tuple[str, ...]  # searched by default
    done: str  # printed after each queue ID, as postsuper prints it
    counter: str  # postsuper's summary word


VERBS: Mapping[str, Verb] = {
    "retry": Verb(Transition.RETRY, ("deferred",), "requeued", "Requeued"),
    "delete": Verb(Transition.REMOVE, ("hold", "incoming", "active", "deferred", "corrupt"),
                   "removed", "Deleted"),
    "hold": Verb(Transition.HOLD, ("incoming", "active", "deferred"), "placed on hold",
                 "Placed on hold"),
    "release": Verb(Transition.RELEASE, ("hold",), "released from hold", "Released from hold"),
}


def act(spool: Spool, verb: str, filt: Filter, out: TextIO, err: TextIO,
        now: float | None = None) -> list[str]:
    """Apply one verb to every matching message; print per-message and count lines.

    Returns the queue IDs acted upon.
    """
    v = VERBS[verb]
    queues = _queues(filt, v.queues)
    t = time.time() if now is None else now
    # A corrupt envelope cannot be read, so only a bare "--queue corrupt" selects it.
    corrupt_ok = filt == Filter(queues=filt.queues)

    def accept(env: Envelope) -> bool:
        return filt.matches(env, t)

    def one(item: tuple[str, str]) -> tuple[bool, str]:
        """Act on one message (in any thread): whether it was done, and a warning."""
        queue, queue_id = item
        try:
            if queue == "corrupt":
                return bool(transitions.change(spool, queue_id, v.transition, ("corrupt",),
                                               now=t, durable=False)), ""
            return bool(transitions.change(spool, queue_id, v.transition, queues, now=t,
                                           accept=accept, durable=False)), ""
        except CorruptEntry as exc:
            return False, str(exc)

    done: list[str] = []
    try:
        for (_, queue_id), (ok, warning) in transitions.in_parallel(
                one, _candidates(spool, filt, queues, corrupt_ok, t)):
            if warning:
                err.write(f"relay queue: warning: {warning}\n")
            if ok:
                done.append(queue_id)
                out.write(f"{queue_id}: {v.done}\n")
    finally:
        spool.sync_queues(transitions.deferred_syncs(v.transition, queues))
    n = len(done)
    out.write(f"{v.counter}: {n} message{'' if n == 1 else 's'}\n")
    return done


def _candidates(spool: Spool, filt: Filter, queues: Iterable[str], corrupt_ok: bool,
                now: float) -> Iterator[tuple[str, str]]:
    """(queue, queue_id) of the messages that match now, streamed queue by queue, each
    once; the action re-checks the filter under the message's lock."""
    seen: set[str] = set()
    for queue in queues:
        if queue == "corrupt":
            ids: Iterable[str] = spool.queue_ids(queue) if corrupt_ok else ()
        else:
            ids = (rec["queue_id"] for _, rec in select_records(spool, filt, (queue,), now))
        for queue_id in ids:
            if queue_id not in seen:
                seen.add(queue_id)
                yield queue, queue_id


def _tell_daemon(queue_dir: str, verb: str, args: Sequence[str], err: TextIO) -> bool:
    from relay import control  # here: asyncio, which it needs, is slow to import

    try:
        reply = control.request(queue_dir, verb, *args, timeout=10.0)
    except control.MailSystemDown:
        return False
    if reply.startswith("error"):
        err.write(f"relay queue: warning: daemon refused {verb}: {reply}\n")
    return True


# ---- command line -------------------------------------------------------------------------


def _add_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (combined; repeat one to allow several values)")
    g.add_argument("--queue", action="append", default=[], metavar="NAME",
                   choices=("incoming", "active", "deferred", "hold", "corrupt"))
    g.add_argument("--domain", action="append", default=[], metavar="DOMAIN")
    g.add_argument("--sender", action="append", default=[], metavar="ADDR")
    g.add_argument("--rcpt", action="append", default=[], metavar="ADDR")
    g.add_argument("--age-min", type=parse_time, metavar="TIME")
    g.add_argument("--age-max", type=parse_time, metavar="TIME")
    g.add_argument("--reason", action="append", default=[], metavar="TEXT")


def _config_arg(p: argparse.ArgumentParser, top: bool = False) -> None:
    p.add_argument("-c", dest="config_dir", metavar="CONFIG_DIR",
                   default=None if top else argparse.SUPPRESS,
                   help="directory with main.cf (default: $MAIL_CONFIG)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="relay queue", description="Inspect and act on the mail queue.")
    _config_arg(parser, top=True)
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=Parser)
    p = sub.add_parser("ls", help="list matching messages in mailq format")
    _config_arg(p)
    _add_filters(p)
    p.add_argument("--json", action="store_true", help="postqueue -j objects, one per line")
    for verb, text in (("retry", "make deferred mail due now and ask the daemon for it"),
                       ("delete", "delete matching messages"),
                       ("hold", "put matching messages on hold"),
                       ("release", "release matching messages from hold")):
        p = sub.add_parser(verb, help=text)
        _config_arg(p)
        _add_filters(p)
        if verb == "delete":
            p.add_argument("--all", action="store_true",
                           help="required to delete with no filter at all")
    for verb, text in (("pause", "stop delivering to a destination"),
                       ("resume", "deliver to a paused destination again")):
        p = sub.add_parser(verb, help=text)
        _config_arg(p)
        p.add_argument("domain", nargs="?", metavar="DOMAIN")
        p.add_argument("--nexthop", metavar="HOST", help="a next-hop host instead of a domain")
    p = sub.add_parser("paused", help="list paused destinations")
    _config_arg(p)
    p = sub.add_parser("summary", help="queue depth, destinations, oldest message")
    _config_arg(p)
    _add_filters(p)
    p.add_argument("--json", action="store_true")
    return parser


def _filter_from(ns: argparse.Namespace) -> Filter:
    return Filter(
        queues=tuple(dict.fromkeys(ns.queue)),
        senders=tuple(_null_sender(s) for s in ns.sender),
        age_min=ns.age_min,
        age_max=ns.age_max,
        domains=tuple(d.rstrip(".").lower() for d in ns.domain if d.strip(".")),
        rcpts=tuple(r.strip().strip("<>").lower() for r in ns.rcpt),
        reasons=tuple(r.lower() for r in ns.reason),
    )


_DOMAIN_OK = re.compile(r"[A-Za-z0-9._-]+\Z")


def pause_name(domain: str | None, nexthop: str | None) -> str:
    """The pause file entry: a lower-case domain, or ``nexthop:HOST``.

    A next hop may be written as Postfix writes one (``[10.0.0.5]:2525``); the daemon
    compares the bare host, so brackets and port are dropped.
    """
    if (domain is None) == (nexthop is None):
        raise UsageError("name either a DOMAIN or --nexthop HOST")
    if nexthop is not None:
        host = nexthop.strip()
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else host[1:]
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        host = host.rstrip(".").lower()
        if not host or any(c.isspace() for c in host):
            raise UsageError(f"bad next-hop host: {nexthop!r}")
        return f"nexthop:{host}"
    assert domain is not None
    name = domain.strip().rstrip(".").lower()
    if not name or not _DOMAIN_OK.match(name):
        raise UsageError(f"bad domain: {domain!r} (a domain such as example.com)")
    return name


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    env = os.environ if environ is None else environ
    return run("relay queue", lambda: _main(args, out, err, env), stdout=out, stderr=err)


def _main(args: list[str], out: TextIO, err: TextIO, env: Mapping[str, str]) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
        if ns.verb is None:
            raise UsageError("a command is required (ls, retry, delete, hold, release, "
                             "pause, resume, paused, summary)")
        filt = _filter_from(ns) if hasattr(ns, "queue") else Filter()
        if ns.verb == "delete" and filt.empty and not ns.all:
            raise UsageError("delete with no filter would remove every message; "
                             "give a filter, or --all to mean every message")
        if ns.verb in ("pause", "resume"):
            name = pause_name(ns.domain, ns.nexthop)
    except UsageError as exc:
        usage = parser.format_usage().rstrip("\n").replace("usage: ", "relay queue: usage: ", 1)
        raise Fatal(f"{exc}\n{usage}", EX_USAGE) from None
    try:
        cfg = config_mod.load(config_mod.config_dir_from(ns.config_dir, env), environ=env,
                              warn=lambda m: print(f"relay queue: warning: {m}", file=err))
    except config_mod.ConfigError as exc:
        raise Fatal(str(exc)) from None
    queue_dir = cfg.str("queue_directory")
    long_ids = cfg.bool("enable_long_queue_ids")
    now = time.time()
    try:
        if ns.verb in ("pause", "resume"):
            spool = Spool(queue_dir, long_ids=long_ids, create=True)
            paused = ns.verb == "pause"
            changed = spool.set_paused(name, paused)
            state = "paused" if paused else "resumed"
            out.write(f"{name}: {state}\n" if changed else
                      f"{name}: already {'paused' if paused else 'not paused'}\n")
            if changed and not _tell_daemon(spool.root, "pauses", (), err):
                err.write("relay queue: warning: the mail system is down; "
                          "the daemon reads the pause file when it starts\n")
            return EX_OK
        spool = Spool(queue_dir, long_ids=long_ids, create=False)
        if ns.verb == "paused":
            out.writelines(entry + "\n" for entry in sorted(spool.pauses()))
            return EX_OK
        if ns.verb == "ls":
            items = select_records(spool, filt, _queues(filt, (*LIST_QUEUES, "corrupt")), now)
            showq.write(showq.json_records(items) if ns.json else
                        showq.sendmail_records(items, long_ids=long_ids), out)
            return EX_OK
        if ns.verb == "summary":
            stats, dests = summarize(spool, filt, now)
            print_summary(stats, dests, now, out, ns.json)
            return EX_OK
        if not spool.exists():
            # As postsuper: Postfix's commands chdir(queue_directory) first.
            raise Fatal(f"chdir {queue_dir}: No such file or directory")
        done = act(spool, ns.verb, filt, out, err, now)
        if ns.verb == "retry" and done:
            told = True
            for i in range(0, len(done), FLUSH_BATCH):
                told = _tell_daemon(spool.root, "flush-id", done[i:i + FLUSH_BATCH], err)
                if not told:
                    break
            if not told:
                err.write("relay queue: warning: the mail system is down; "
                          "the messages are due and are tried when it starts\n")
        elif ns.verb == "release" and done:
            _tell_daemon(spool.root, "scan", (), err)
        return EX_OK
    except SpoolError as exc:
        raise Fatal(str(exc), EX_TEMPFAIL) from None


if __name__ == "__main__":
    sys.exit(main())
