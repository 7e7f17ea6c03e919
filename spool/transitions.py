"""Every move of a message between queues, as one table, and the one function that applies it.

A message's queue is its state (spool.store).  Each row of :data:`ROWS` is one change of
state: the queue it leaves, the queue it enters (None: the message is gone), what changes
in its envelope, what its file's mtime becomes, and what must be durable before the next
step.  The queue manager (relay.scheduler), the commands (postsuper, ``relay queue``) and
the tests all change a message's queue through :func:`steps`, :func:`apply` or
:func:`change`, never by moving files themselves:

    transition  from                        to        envelope          mtime         durable
    activate    incoming deferred active    active    -                 -             -
    record      each queue                  the same  the qmgr's        kept*         envelope
    defer       active                      deferred  the qmgr's        next attempt  envelope
    remove      each queue, corrupt         (gone)    -                 -             source
    hold        incoming active deferred    hold      -                 now           target
    release     hold                        deferred  time on hold      now           envelope, target
    requeue     hold                        incoming  time on hold      now           envelope, target
    requeue     incoming active deferred    incoming  -                 now           target
    retry       deferred                    deferred  -                 now           -
    redate      deferred                    deferred  the qmgr's        next attempt  envelope
    expire      each queue                  the same  forced_expire     kept          envelope
    quarantine  each queue                  corrupt   -                 -             target
                                                       (* in deferred and hold; elsewhere it has no meaning)

What a file's mtime means is decided here and nowhere else:

* ``deferred/ID``: the next attempt (Postfix's trick: a scan of deferred/ needs only
  stat(), :func:`is_due`);
* ``hold/ID``: when the message was put on hold; release and requeue add the time
  since then to ``held_seconds``, which does not count towards the message's lifetime;
* in incoming/, active/ and corrupt/ it means nothing.

"durable": ``envelope`` is the rewritten envelope (its tmp file before the rename that
replaces the old one, the directory after it); ``target`` the directory renamed into,
``source`` the directory an envelope was unlinked from (before its content goes).  A
mass operation (``postsuper -d ALL``, ``relay queue``) passes ``durable=False``: it leaves
the target and source fsyncs to one per directory at its end (:func:`deferred_syncs`,
``Spool.sync_queues``), so a crash before that may undo some of its moves, never tear a
message; envelopes stay durable one by one.  The activation and the deferral's move need
no fsync at all: a crash leaves the message in its old queue, and the queue manager takes
it again.

Each change runs under the message's lock (``Spool.locked``), which the queue manager
and the commands both take, so they exclude each other per message; quarantine is the
one row applied without it, by ``Spool.quarantine`` (a stray name has no lock to take).
A crash between two steps leaves the message in its old or its new queue with its old
or its new envelope, never in two queues (spool.store).  This module never imports
relay and builds no path; spool.store does the file work.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

from spool.envelope import Envelope
from spool.errors import CorruptEntry, EntryGone
from spool.store import Entry, ScanEntry, Spool, Steps, run_steps

MESSAGE_QUEUES = ("incoming", "active", "deferred", "hold")

# The closed sets below are StrEnums: their members hash as strings do, in C, and a
# mass operation looks rows up twenty thousand times.


class Transition(enum.StrEnum):
    ACTIVATE = "activate"  # the queue manager takes a message (active again after a restart)
    RECORD = "record"  # ... records recipients' fates, wherever the message is by then
    DEFER = "defer"  # ... puts it aside until its next attempt
    REMOVE = "remove"  # ... when every recipient is done; postsuper -d
    HOLD = "hold"  # postsuper -h
    RELEASE = "release"  # postsuper -H, -f
    REQUEUE = "requeue"  # postsuper -r
    RETRY = "retry"  # relay queue retry: due now
    REDATE = "redate"  # a reload with new backoff times: the next attempt dated again
    EXPIRE = "expire"  # postsuper -e, -f: returned to the sender at the next attempt
    QUARANTINE = "quarantine"  # an unreadable envelope or a stray name, kept aside


class Edit(enum.StrEnum):
    """What changes in the envelope."""

    NONE = "none"
    GIVEN = "given"  # the caller's envelope (the queue manager's fates and next attempt)
    UNHOLD = "unhold"  # held_seconds += time on hold, next_attempt = now
    FORCE_EXPIRE = "force_expire"  # forced_expire = True


class Mtime(enum.StrEnum):
    """What the file's mtime becomes."""

    ANY = "any"  # whatever the file system gives: it means nothing there
    KEEP = "keep"  # the meaning stays (next attempt, held since)
    NOW = "now"  # deferred: due now; hold: held since now
    NEXT_ATTEMPT = "next_attempt"  # the envelope's next_attempt


class Sync(enum.StrEnum):
    """What must be durable before the next step."""

    ENVELOPE = "envelope"  # the rewritten envelope, before and after it replaces the old
    TARGET = "target"  # the queue directory renamed into
    SOURCE = "source"  # the queue directory unlinked from, before the content goes


@dataclass(frozen=True, slots=True)
class Row:
    transition: Transition
    source: str
    target: str | None  # None: the message is gone
    edit: Edit
    mtime: Mtime
    sync: frozenset[Sync]


def _table() -> dict[tuple[Transition, str], Row]:
    T, E, M, S = Transition, Edit, Mtime, Sync
    rows = [
        *(Row(T.ACTIVATE, q, "active", E.NONE, M.ANY, frozenset())
          for q in ("incoming", "deferred", "active")),
        *(Row(T.RECORD, q, q, E.GIVEN, M.KEEP if q in ("deferred", "hold") else M.ANY,
              frozenset({S.ENVELOPE})) for q in MESSAGE_QUEUES),
        Row(T.DEFER, "active", "deferred", E.GIVEN, M.NEXT_ATTEMPT, frozenset({S.ENVELOPE})),
        *(Row(T.REMOVE, q, None, E.NONE, M.ANY, frozenset({S.SOURCE}))
          for q in (*MESSAGE_QUEUES, "corrupt")),
        *(Row(T.HOLD, q, "hold", E.NONE, M.NOW, frozenset({S.TARGET}))
          for q in ("incoming", "active", "deferred")),
        Row(T.RELEASE, "hold", "deferred", E.UNHOLD, M.NOW, frozenset({S.ENVELOPE, S.TARGET})),
        Row(T.REQUEUE, "hold", "incoming", E.UNHOLD, M.NOW, frozenset({S.ENVELOPE, S.TARGET})),
        *(Row(T.REQUEUE, q, "incoming", E.NONE, M.NOW, frozenset({S.TARGET}))
          for q in ("incoming", "active", "deferred")),
        Row(T.RETRY, "deferred", "deferred", E.NONE, M.NOW, frozenset()),
        Row(T.REDATE, "deferred", "deferred", E.GIVEN, M.NEXT_ATTEMPT,
            frozenset({S.ENVELOPE})),
        *(Row(T.EXPIRE, q, q, E.FORCE_EXPIRE, M.KEEP, frozenset({S.ENVELOPE}))
          for q in MESSAGE_QUEUES),
        *(Row(T.QUARANTINE, q, "corrupt", E.NONE, M.ANY, frozenset({S.TARGET}))
          for q in MESSAGE_QUEUES),
    ]
    return {(row.transition, row.source): row for row in rows}


ROWS: Mapping[tuple[Transition, str], Row] = _table()


def row(transition: Transition, queue: str) -> Row | None:
    """The row that takes a message of ``queue`` through ``transition``, if any."""
    return ROWS.get((transition, queue))


def sources(transition: Transition) -> tuple[str, ...]:
    """The queues ``transition`` leads from, in the table's order."""
    return tuple(r.source for r in ROWS.values() if r.transition is transition)


def is_due(entry: ScanEntry, now: float) -> bool:
    """Whether a deferred message is due: its mtime is its next attempt (with a second's
    grace for the file system's clock)."""
    return entry.mtime <= now + 1


# ---- applying a row -----------------------------------------------------------------


def steps(entry: Entry, transition: Transition, *, now: float | None = None,
          env: Envelope | None = None, durable: bool = True) -> Steps[bool]:
    """Take the locked message ``entry`` through ``transition``, as steps (run_steps,
    run_steps_async): each yield names what must be durable before the next step.

    ``env`` is the new envelope for the rows that take one (record, defer).  Returns
    False, having changed nothing, when no row leads from the message's queue or when
    its envelope cannot be read for an edit that needs it (expire); release and requeue
    move an unreadable envelope as it is, with its time on hold unaccounted (the queue
    manager quarantines it when it reads it).  ``durable=False``: the target and source
    fsyncs are the caller's, at its end (see the module docstring).
    """
    r = ROWS.get((transition, entry.queue))
    if r is None:
        return False
    if r.target is None:
        yield from entry.remove_steps(durable=durable and Sync.SOURCE in r.sync)
        return True
    now = time.time() if now is None else now
    try:
        new = _edited(r, entry, env, now)
    except _Unreadable:
        return False
    if new is None:
        if _rename(entry, r, _mtime(r, entry, env, now)) and durable and Sync.TARGET in r.sync:
            yield [entry.spool.dir_path(r.target)]
        return True
    # The rewritten file carries the mtime through the rename.
    yield from entry.write_steps(new, _mtime(r, entry, new, now))
    if _rename(entry, r, None) and durable and Sync.TARGET in r.sync:
        yield [entry.spool.dir_path(r.target)]
    return True


def apply(entry: Entry, transition: Transition, *, now: float | None = None,
          env: Envelope | None = None, durable: bool = True) -> bool:
    """steps(), run here: each fsync waited for in this thread."""
    r = ROWS.get((transition, entry.queue))
    if (r is not None and r.edit is Edit.NONE and r.target is not None
            and not (durable and Sync.TARGET in r.sync)):
        # Nothing to make durable (a mass operation's move, a re-dating, an
        # activation): no steps to drive.
        _rename(entry, r, _mtime(r, entry, env, time.time() if now is None else now))
        return True
    return run_steps(steps(entry, transition, now=now, env=env, durable=durable),
                     entry.spool.fsync_paths)


def _rename(entry: Entry, r: Row, mtime: float | None) -> bool:
    """Into the row's target (mtime set first); True if the message changed directories."""
    assert r.target is not None
    if r.target != entry.queue:
        entry.move(r.target, mtime, durable=False)
        return True
    if mtime is not None:
        entry.move(r.target, mtime)  # the same queue: only the time changes
    return False


class _Unreadable(Exception):
    """The edit needs the envelope, which cannot be read."""


def _edited(r: Row, entry: Entry, env: Envelope | None, now: float) -> Envelope | None:
    """The envelope to write (None: none to write)."""
    if r.edit is Edit.NONE:
        return None
    if r.edit is Edit.GIVEN:
        if env is None:
            raise ValueError(f"{r.transition.value} needs the new envelope")
        return env
    try:
        current = entry.read()
    except CorruptEntry:
        if r.edit is Edit.UNHOLD:
            return None
        raise _Unreadable from None
    if r.edit is Edit.UNHOLD:
        held = max(0.0, now - entry.mtime())  # hold/ID's mtime: when it was put on hold
        return replace(current, held_seconds=current.held_seconds + held, next_attempt=now)
    return replace(current, forced_expire=True)


def _mtime(r: Row, entry: Entry, env: Envelope | None, now: float) -> float | None:
    if r.mtime is Mtime.NOW:
        return now
    if r.mtime is Mtime.KEEP:
        return entry.mtime()
    if r.mtime is Mtime.NEXT_ATTEMPT:
        assert env is not None  # a GIVEN row
        return env.next_attempt
    return None


# ---- one message, several messages ----------------------------------------------------

Accept = Callable[[Envelope], bool]


def change(spool: Spool, queue_id: str, transitions: Transition | Sequence[Transition],
           queues: Iterable[str] | None = None, *, now: float | None = None,
           accept: Accept | None = None, durable: bool = True) -> tuple[Transition, ...]:
    """Lock one message and take it through ``transitions`` in order, each from the queue
    it is in by then, stopping at the first that does not apply; the ones applied (none:
    not there, not accepted, or no row from its queue).

    ``queues`` are where to look (default: the first transition's sources).  ``accept``
    is a filter that must still hold once the message is locked (an unreadable envelope
    never passes).  A message that vanished meanwhile is a lost race: nothing applied,
    no error.  CorruptEntry, from ``Spool.locked``, for an envelope without content.
    """
    todo = (transitions,) if isinstance(transitions, Transition) else tuple(transitions)
    search = sources(todo[0]) if queues is None else tuple(queues)
    now = time.time() if now is None else now
    done: list[Transition] = []
    try:
        with spool.locked(queue_id, search) as entry:
            if accept is not None:
                try:
                    if not accept(entry.read()):
                        return ()
                except CorruptEntry:
                    return ()
            for transition in todo:
                if not apply(entry, transition, now=now, durable=durable):
                    break
                done.append(transition)
    except EntryGone:
        pass
    return tuple(done)


def quarantine(spool: Spool, queue: str, name: str) -> str:
    """Move an unreadable envelope (or a stray name) of ``queue`` to corrupt/, under a
    name of its own there; the name it got.  Never deletes.  EntryGone if it is gone."""
    if (Transition.QUARANTINE, queue) not in ROWS:
        raise ValueError(f"nothing is quarantined from {queue}/")
    return spool.quarantine(queue, name)


def deferred_syncs(transitions: Transition | Sequence[Transition],
                   queues: Iterable[str]) -> tuple[str, ...]:
    """The queue directories a mass operation (``durable=False``) over ``queues`` must
    fsync at its end: those its rows unlink from or rename into."""
    todo = (transitions,) if isinstance(transitions, Transition) else tuple(transitions)
    wanted = set(queues)
    out: dict[str, None] = {}
    for r in ROWS.values():
        if r.transition in todo and r.source in wanted:
            if Sync.SOURCE in r.sync:
                out[r.source] = None
            if Sync.TARGET in r.sync and r.target is not None:
                out[r.target] = None
    return tuple(out)


# Mass operations keep a few messages in flight at once: most of their time is the
# kernel's (on ext4, unlinking a file frees its blocks, a fraction of a millisecond
# spent mostly waiting), and a few threads overlap those waits.  Each message is still
# handled whole under its own lock, by one thread.
MASS_THREADS = 8
MASS_CHUNK = 16  # messages per task: a thread hand-off costs about as much as a rename
MASS_WINDOW = 4 * MASS_THREADS  # tasks submitted ahead of the one being reported

T = TypeVar("T")
R = TypeVar("R")


def in_parallel(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) for each item, in the order of ``items``, a few at a time.

    ``items`` is consumed as the work goes (at most MASS_WINDOW * MASS_CHUNK ahead), so
    memory does not grow with the queue.  When fn raises, the items already handed out
    are finished and yielded, those not yet handed out are not, and the first exception
    is raised after them: what was done is reported, as when one thread does it all.
    """
    def run_chunk(chunk: list[T]) -> tuple[list[tuple[T, R]], BaseException | None]:
        done: list[tuple[T, R]] = []
        for item in chunk:
            try:
                done.append((item, fn(item)))
            except Exception as exc:  # noqa: BLE001 -- re-raised in order, below
                return done, exc
        return done, None

    failure: BaseException | None = None
    with ThreadPoolExecutor(MASS_THREADS, thread_name_prefix="spool-mass") as pool:
        window: deque[Future[tuple[list[tuple[T, R]], BaseException | None]]] = deque()
        try:
            for chunk in _chunks(items, MASS_CHUNK):
                window.append(pool.submit(run_chunk, chunk))
                while len(window) >= MASS_WINDOW or (window and window[0].done()):
                    done, exc = window.popleft().result()
                    yield from done
                    if exc is not None:
                        failure = exc
                        break
                if failure is not None:
                    break
            while window:
                done, exc = window.popleft().result()
                yield from done
                failure = failure or exc
        finally:
            for future in window:  # only when our consumer stops early
                future.cancel()
    if failure is not None:
        raise failure


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
