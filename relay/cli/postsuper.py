"""postsuper: delete, hold, release, requeue and expire queued mail, as Postfix's postsuper(1).

    postsuper [-psSv] [-c config_dir] [-d queue_id] [-e queue_id] [-f queue_id]
              [-h queue_id] [-H queue_id] [-r queue_id] [queue ...]

Each ``-d``/``-e``/``-f``/``-h``/``-H``/``-r`` takes a queue ID, ``ALL`` (upper case only,
as a safety measure) or ``-`` (queue IDs from standard input, one per line, not trimmed).
Options repeat and run in command-line order (Postfix runs every -d first, then -r,
-h and -H; the order given is easier to reason about and the same for sane uses);
trailing queue names limit the queues searched (``postsuper -d ALL deferred``).
Messages on standard error are Postfix's, byte for byte: ``postsuper: ID: removed`` per explicitly named message, then summaries
in the fixed order Requeued, Deleted, Force-expired, Placed on hold, Released from hold.

The state changes themselves are spool.transitions' rows (remove, hold, release,
requeue, expire): this module says which rows each option takes (``apply``), finds the
messages and reports as Postfix does.  Each change runs under the message's lock
(``Spool.locked``), so it excludes the daemon per message: a message being delivered
right now is moved or removed between two of the daemon's steps, and the daemon then
leaves the operator's state alone and only records which recipients it already
delivered (see relay.scheduler).  A message that vanished meanwhile is a lost race,
counted as nothing done, never an error.

It never talks SMTP and never builds a spool path; its only contact with the daemon is
a best-effort ``scan`` request after a release or requeue, so that the message is
picked up within seconds (a daemon that is down reads the queue when it starts).

Unlike Postfix, it does not require root: the spool belongs to the user running relay.

Exit status, as Postfix 3.7.11's (FORMATS.md 1.4): 0; 1 for a bad option or an option
without its queue ID (getopt's ``postsuper: invalid option -- 'x'`` or ``option
requires an argument -- 'd'``, then ``postsuper: fatal: usage: ...``), an unknown queue
name, a bad main.cf or a missing queue directory (msg_fatal()); 75 when the spool fails
under it (a full or broken disk).

What a crash leaves: each action is one rename (or a rewrite then a rename, or an
unlink of the envelope then of the content) under the lock; a crash between two steps
leaves the message in its old or its new queue, never in two (spool.transitions).

Mass operations (``ALL``, ``-`` and ``relay queue``) pass ``durable=False``: their
renames and unlinks skip the per-message directory fsync, and the queue directories
they changed are fsync'ed once at the end (``transitions.deferred_syncs``), also when
they stop on an error.  A crash before that fsync may undo some of the changes: a
deleted message may come back whole, a held one may be back in its old queue; never a
message in two queues or an envelope without its content (spool.store.Entry.remove).
Rewrites (-e, and the held time recorded by -H and -r) stay durable one by one.  They
also keep a few messages in flight at once (``transitions.in_parallel``); the results
are reported in the order of the queue walk or of standard input, and memory stays
bounded.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from relay import config as config_mod
from relay.cli import command
from relay.cli.command import EX_OK, EX_TEMPFAIL, Fatal, parse_options
from spool import CorruptEntry, Spool, SpoolError, transitions
from spool.transitions import Transition

log = logging.getLogger("relay.postsuper")

USAGE = (
    "usage: postsuper [-c config_dir] [-d queue_id (delete)] [-e queue_id (expire)] "
    "[-f queue_id (expire and/or un-hold)] [-h queue_id (hold)] [-H queue_id (un-hold)] "
    "[-p (purge temporary files)] [-r queue_id (requeue)] [-s (structure fix)] "
    "[-S (redundant structure fix)][-v (verbose)] [queue...]"  # sic: no space, as Postfix
)

# Queues in the order a mass operation walks them.  hold comes last so that
# "-r ALL" does not meet in incoming/ what it just moved there from hold/.
WALK_ORDER = ("incoming", "active", "deferred", "hold", "corrupt")
MESSAGE_QUEUES = ("hold", "incoming", "active", "deferred")
KNOWN_QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")

# Postfix's mail_queue_id_ok() also allows '_'; our IDs never contain it, so anything
# but letters and digits is reported as invalid rather than silently not found.
_ID_SHAPE = re.compile(r"[A-Za-z0-9]{1,255}\Z")


class Action(enum.StrEnum):  # StrEnum: hashed in C, per message of a mass operation
    DELETE = "d"
    EXPIRE = "e"
    EXPIRE_RELEASE = "f"
    HOLD = "h"
    RELEASE = "H"
    REQUEUE = "r"


@dataclass(frozen=True, slots=True)
class ActionInfo:
    done: str  # what postsuper prints after the queue ID
    queues: tuple[str, ...]  # searched by default
    allowed: tuple[str, ...]  # a named queue outside these is skipped for this action
    transitions: tuple[Transition, ...]  # spool.transitions' rows, in this order


ACTIONS: Mapping[Action, ActionInfo] = {
    Action.DELETE: ActionInfo("removed", MESSAGE_QUEUES, (*MESSAGE_QUEUES, "corrupt"),
                              (Transition.REMOVE,)),
    Action.EXPIRE: ActionInfo("expired", MESSAGE_QUEUES, MESSAGE_QUEUES, (Transition.EXPIRE,)),
    # -f: the daemon never looks at hold/, so an expired message there is released.
    Action.EXPIRE_RELEASE: ActionInfo("expired", MESSAGE_QUEUES, MESSAGE_QUEUES,
                                      (Transition.EXPIRE, Transition.RELEASE)),
    Action.HOLD: ActionInfo("placed on hold", ("incoming", "active", "deferred"),
                            ("incoming", "active", "deferred"), (Transition.HOLD,)),
    Action.RELEASE: ActionInfo("released from hold", ("hold",), ("hold",),
                               (Transition.RELEASE,)),
    # Postfix gives a requeued message a new queue ID; we keep it (nothing here depends
    # on a fresh one).  Recipients already delivered stay done.
    Action.REQUEUE: ActionInfo("requeued", MESSAGE_QUEUES, MESSAGE_QUEUES,
                               (Transition.REQUEUE,)),
}


class Counter(enum.StrEnum):
    """The summary lines, in the order Postfix prints them."""

    REQUEUED = "Requeued"
    DELETED = "Deleted"
    EXPIRED = "Force-expired"
    HELD = "Placed on hold"
    RELEASED = "Released from hold"


_COUNTERS: Mapping[Action, tuple[Counter, ...]] = {
    Action.DELETE: (Counter.DELETED,),
    Action.EXPIRE: (Counter.EXPIRED,),
    Action.EXPIRE_RELEASE: (Counter.EXPIRED, Counter.RELEASED),
    Action.HOLD: (Counter.HELD,),
    Action.RELEASE: (Counter.RELEASED,),
    Action.REQUEUE: (Counter.REQUEUED,),
}

# Postfix's own postsuper.c prints a summary only when its count is above zero; this
# project asks for "Deleted: 0 messages" after "-d nosuch" so a script sees that nothing
# was done.  One switch, should the lead prefer Postfix's silence.
REPORT_ZERO_COUNTS = True

Accept = transitions.Accept


# ---- the state changes: spool.transitions' rows ----------------------------------------

_COUNTER_OF: Mapping[Transition, Counter] = {
    Transition.REMOVE: Counter.DELETED,
    Transition.EXPIRE: Counter.EXPIRED,
    Transition.HOLD: Counter.HELD,
    Transition.RELEASE: Counter.RELEASED,
    Transition.REQUEUE: Counter.REQUEUED,
}


def _queues(action: Action, queues: Iterable[str] | None) -> tuple[str, ...]:
    info = ACTIONS[action]
    if queues is None:
        return info.queues
    return tuple(q for q in queues if q in info.allowed)


def apply(spool: Spool, action: Action, queue_id: str, queues: Iterable[str] | None = None,
          *, now: float | None = None, accept: Accept | None = None,
          durable: bool = True) -> tuple[Counter, ...]:
    """Do one action on one message; the counters it advanced (empty: nothing done).

    Raises CorruptEntry for a message that cannot even be locked (an envelope without
    content); a message that is not there is no error.  With ``durable=False`` the
    caller fsyncs ``synced_queues(action, queues)`` at the end.
    """
    info = ACTIONS[action]
    search = info.queues if queues is None else tuple(q for q in queues if q in info.allowed)
    done = transitions.change(spool, queue_id, info.transitions, search, now=now,
                              accept=accept, durable=durable)
    return tuple(map(_COUNTER_OF.__getitem__, done))


def synced_queues(action: Action, queues: Iterable[str] | None = None) -> tuple[str, ...]:
    """The queue directories that ``durable=False`` leaves to fsync at the end."""
    return transitions.deferred_syncs(ACTIONS[action].transitions, _queues(action, queues))


def walk(spool: Spool, queues: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(queue, queue_id) of every message in these queues, in WALK_ORDER.

    Names that are not queue IDs (strays the daemon will quarantine) are skipped.
    """
    wanted = set(queues)
    for queue in WALK_ORDER:
        if queue in wanted:
            for queue_id in spool.queue_ids(queue):
                yield queue, queue_id


# ---- the command ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    action: Action
    target: str  # a queue ID, "ALL" or "-"


@dataclass
class Report:
    counts: dict[Counter, int] = field(default_factory=dict)
    requested: set[Counter] = field(default_factory=set)

    def summary(self) -> list[str]:
        out = []
        for counter in Counter:
            n = self.counts.get(counter, 0)
            if counter in self.requested and (n > 0 or REPORT_ZERO_COUNTS):
                out.append(f"{counter.value}: {n} message{'' if n == 1 else 's'}")
        return out


@dataclass(frozen=True, slots=True)
class Options:
    config_dir: str | None
    requests: tuple[Request, ...]
    queues: tuple[str, ...] | None
    purge: bool


def parse_args(argv: Sequence[str]) -> Options:
    """Postfix's getopt("c:d:e:f:h:H:pr:sSv"), options before the queue names.

    A bad command line raises Fatal as Postfix's postsuper reports it: getopt's line,
    then the usage line, exit 1; an unknown queue name, exit 1 too."""
    opts, names = parse_options(argv, "c:d:e:f:h:H:pr:sSv", USAGE)
    config_dir: str | None = None
    requests: list[Request] = []
    purge = False
    structure = False
    with_arg = {a.value: a for a in Action}
    for letter, value in opts:
        if letter == "c":
            config_dir = value
        elif letter in with_arg:
            requests.append(Request(with_arg[letter], value))
        elif letter == "p":
            purge = True
        elif letter in "sS":
            structure = True
    queues = tuple(names) or None
    for name in queues or ():
        if name not in KNOWN_QUEUES:
            raise Fatal(f"invalid directory name: {name}")
    # Postfix's default action, with no option at all, is -s -p.
    purge = purge or (not requests and not structure)
    return Options(config_dir, tuple(requests), queues, purge)


def _ids_from(stream: TextIO) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\n")


# ---- mass operations ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Apply:
    """apply() for any thread, on ``(queue_id, queues)`` (queues None: an invalid ID):
    the counters, and a warning for the caller to print in order."""

    spool: Spool
    action: Action
    now: float | None
    durable: bool = False

    def __call__(self, item: tuple[str, tuple[str, ...] | None]
                 ) -> tuple[tuple[Counter, ...], str]:
        queue_id, queues = item
        if queues is None:
            return (), f"invalid mail queue id: {queue_id}"
        try:
            return apply(self.spool, self.action, queue_id, queues, now=self.now,
                         durable=self.durable), ""
        except CorruptEntry as exc:
            # An envelope whose content is gone cannot be locked; the daemon quarantines it.
            return (), str(exc)


def run(spool: Spool, options: Options, *, stdin: TextIO, warn: Callable[[str], None],
        info: Callable[[str], None], now: float | None = None) -> Report:
    """Carry out the requests in order; per-ID lines go to ``info`` as they happen.

    ``ALL`` and ``-`` are mass operations: their changes are made durable together at
    the end (see the module docstring); a single queue ID is durable at once.
    """
    report = Report()
    to_sync: dict[str, None] = {}  # queue directories a mass operation may have changed
    try:
        _run(spool, options, report, to_sync, stdin, warn, info, now)
    finally:
        spool.sync_queues(to_sync)
    return report


def _run(spool: Spool, options: Options, report: Report, to_sync: dict[str, None],
         stdin: TextIO, warn: Callable[[str], None], info: Callable[[str], None],
         now: float | None) -> None:
    requests = list(options.requests)
    # As Postfix: "-d ALL" makes any other "-d ID" pointless, and says so.
    for action in Action:
        mine = [r for r in requests if r.action is action]
        if any(r.target == "ALL" for r in mine) and any(r.target != "ALL" for r in mine):
            warn(f'option "-{action.value} ALL" will ignore other command line queue IDs')
            requests = [r for r in requests if r.action is not action or r.target == "ALL"]
    seen_all: set[Action] = set()
    for request in requests:
        action = request.action
        report.requested.update(_COUNTERS[action])
        queues = _queues(action, options.queues)
        if request.target == "ALL":
            if action in seen_all:
                continue
            seen_all.add(action)
            to_sync.update(dict.fromkeys(synced_queues(action, queues)))
            for _, (counters, warning) in transitions.in_parallel(_Apply(spool, action, now),
                                                      _walk_once(spool, queues)):
                if warning:
                    warn(warning)
                for counter in counters:
                    report.counts[counter] = report.counts.get(counter, 0) + 1
            continue
        if request.target == "-":
            to_sync.update(dict.fromkeys(synced_queues(action, queues)))
            results = transitions.in_parallel(_Apply(spool, action, now),
                                  ((queue_id, queues if _ID_SHAPE.match(queue_id) else None)
                                   for queue_id in _ids_from(stdin)))
        else:
            item = (request.target, queues if _ID_SHAPE.match(request.target) else None)
            results = iter([(item, _Apply(spool, action, now, durable=True)(item))])
        for (queue_id, _), (counters, warning) in results:
            if warning:
                warn(warning)
            for counter in counters:
                report.counts[counter] = report.counts.get(counter, 0) + 1
            if counters:
                info(f"{queue_id}: {ACTIONS[action].done}")
                if action is Action.EXPIRE_RELEASE and Counter.RELEASED in counters:
                    info(f"{queue_id}: {ACTIONS[Action.RELEASE].done}")


def _walk_once(spool: Spool, queues: Iterable[str]
               ) -> Iterator[tuple[str, tuple[str, ...] | None]]:
    """(queue_id, (queue,)) for ``ALL``: each message once, though it may move meanwhile."""
    done: set[str] = set()
    for queue, queue_id in walk(spool, queues):
        if queue_id not in done:
            done.add(queue_id)
            yield queue_id, (queue,)


def notify_daemon(queue_dir: str) -> None:
    """Best effort: a daemon that is down reads incoming/ and deferred/ when it starts."""
    from relay import control  # here: asyncio, which it needs, is slow to import

    try:
        control.request(queue_dir, "scan", timeout=5.0)
    except control.MailSystemDown:
        pass


def _maillog_handler(cfg: config_mod.Config) -> logging.Handler | None:
    """Postfix's postsuper logs what it did to syslog too; we append to maillog_file."""
    path = cfg.str("maillog_file")
    if not path:
        return None
    from relay.log import MaillogFormatter

    try:
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(MaillogFormatter(cfg.str("myhostname"), cfg.str("syslog_name")))
    return handler


def main(argv: Sequence[str] | None = None, *, stdin: TextIO | None = None,
         stderr: TextIO | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    err = sys.stderr if stderr is None else stderr
    inp = sys.stdin if stdin is None else stdin
    env = os.environ if environ is None else environ
    if stdin is None and hasattr(inp, "reconfigure"):
        inp.reconfigure(errors="surrogateescape")  # a bad byte is an invalid ID, not a crash
    return command.run("postsuper", lambda: _main(args, inp, err, env), stderr=err)


def _main(args: Sequence[str], inp: TextIO, err: TextIO, env: Mapping[str, str]) -> int:
    def say(text: str) -> None:
        err.write(f"postsuper: {text}\n")
        err.flush()

    options = parse_args(args)
    try:
        cfg = config_mod.load(config_mod.config_dir_from(options.config_dir, env), environ=env,
                              warn=lambda m: say(f"warning: {m}"))
    except config_mod.ConfigError as exc:
        raise Fatal(str(exc)) from None
    queue_dir = cfg.str("queue_directory")
    spool = Spool(queue_dir, long_ids=cfg.bool("enable_long_queue_ids"), create=False)
    if not spool.exists():
        # Postfix's commands chdir(queue_directory) first; msg_fatal() exits 1.
        raise Fatal(f"chdir {queue_dir}: No such file or directory")

    handler = _maillog_handler(cfg)
    if handler is not None:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False

    def info(text: str) -> None:
        say(text)
        if handler is not None:
            log.info("%s", text)

    def warn(text: str) -> None:
        say(f"warning: {text}")
        if handler is not None:
            log.warning("%s", text)

    try:
        if options.purge:
            spool.cleanup()
        report = run(spool, options, stdin=inp, warn=warn, info=info)
        for line in report.summary():
            info(line)
    except SpoolError as exc:
        if handler is not None:
            log.critical("%s", exc)
        raise Fatal(str(exc), EX_TEMPFAIL) from None
    finally:
        if handler is not None:
            log.removeHandler(handler)
            log.propagate = True
            handler.close()
    if report.counts.get(Counter.RELEASED) or report.counts.get(Counter.REQUEUED):
        notify_daemon(spool.root)
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
