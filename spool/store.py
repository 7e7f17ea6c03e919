"""The only code that touches spool files.

Layout under the queue directory (Postfix's queue names, qmail's commit rule):

    tmp/                      files being written; never acknowledged
    data/ID                   message content, written once, never rewritten
    incoming/ID active/ID deferred/ID hold/ID corrupt/ID
                              the envelope; its directory is the message's state

A message is accepted in five steps (qmail's table, one commit moment):

    1. data/ID created with O_EXCL (this reserves the queue ID), written, fsync'ed
    2. the envelope is written to tmp/ID and fsync'ed
    3. data/ is fsync'ed (group commit: many sessions share one fsync)
    4. tmp/ID is renamed to incoming/ID           <- the commit moment
    5. incoming/ is fsync'ed (group commit); only now may the client see 250

A crash before step 4 leaves a data file without an envelope and maybe a tmp file:
never acknowledged, removed after a day by :meth:`Spool.cleanup`.  A crash after
step 4 leaves a complete message that is delivered after restart (if the client
never saw the 250 it may send it again: the protocol's unavoidable duplicate).

Every other state change happens under an exclusive flock(2) on data/ID, which
never moves, so the daemon and the admin commands exclude each other per message.
This module gives the three ways a change touches files:

    rewrite  tmp/ID -> QUEUE/ID (rename over), dir fsync
    move     QUEUE/ID -> OTHER/ID (rename), dir fsync
    remove   unlink QUEUE/ID, then data/ID

and spool.transitions the table of which change leads from which queue to which, what
each does to the envelope and the mtime (deferred/: the next attempt; hold/: held
since), and what must be durable.  A crash between two renames leaves the envelope in
its old queue with its new content, never two envelopes.

The daemon recycles inodes: its qmgr renames the files of a finished message into
free/ instead of unlinking them (``retire_to_free``), and its listener processes link
them back as a new message's data/ID or tmp file (``reuse_free``; link(2) keeps
O_EXCL's "fails if it exists"), each process its own share of the names
(``reuse_share``).  File creation is the costliest step of the accept path on
ext4, whose allocator skips every inode freed in the last minutes; a reused inode
skips the allocator.  Each free/ name is used once.  A crash between link and
unlink leaves a free/ name sharing an inode with a live file: the daemon's start
drops such names (``forget_linked_spares``), and it never takes a name with two links.
The queue manager also keeps the inode of each envelope it replaces (a deferral's
rewrite) under a name of its own, ``free/q...``, linked just before the rename, and
uses those for its next rewrites; only it takes q-names, only those it made since it
started, and its start drops the rest (``forget_kept_spares``).  A finished message's
content up to SPARE_CONTENT_MAX_SIZE keeps its bytes in its spare until a new message's
file is written over it (from the start, then cut to its length: nothing of the old one
is left): emptying every file at once freed its blocks, which waits for the disk on a
``discard`` mount, only for the next message to allocate them again.  The queue
manager's sweeper thread unlinks a spare left unused SPARE_CONTENT_MAX_AGE seconds with
content in it, and every such spare at its start (``sweep_spares``): so free/ holds a
finished message for about a minute at most.  The sweep only ever unlinks a name, which
cannot touch a file that shares the inode: link(2) looks its source up before it links,
so a listener may link a spare that was renamed, or checked for a second link, a moment
before; emptying a spare in place once wiped a new message's envelope that way.  Bigger
content is emptied before its inode is given up: the queue manager renames it to a name
of its own (``free/e...``, never taken by anyone) on its event loop and a thread of its
own empties it and gives it a takeable name; its start drops the e-names a crash left.
With free/ full, a finished file is unlinked instead, in the same way: renamed to an
e-name on the event loop (which takes it out of the queue at once), unlinked by the thread.

Readers (mailq, postcat) take no lock: an envelope file is always complete because
it only ever appears by rename; a file that vanishes under a reader is a lost race.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import itertools
import os
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar, cast

from spool import envelope as envfmt
from spool.envelope import Envelope
from spool.errors import CorruptEntry, EntryGone, SpoolError, SpoolFull
from spool.fsyncd import fsync_path

QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")
# The order in which a queue ID is looked for, and in which showq lists queues.
SEARCH_ORDER = ("active", "incoming", "deferred", "hold", "corrupt")
TMP_MAX_AGE = 86400.0
FREE_POOL_MAX = 4096  # spare inodes kept for reuse
KEPT_POOL_MAX = 256  # the queue manager's own spares (replaced envelopes), for rewrites
EMPTY_BATCH_WAIT = 0.05  # seconds the emptier gathers retired content before it empties
SPARE_CONTENT_MAX_SIZE = 64 * 1024  # content kept in its spare (free/ holds 256 MiB at most)
SPARE_CONTENT_MAX_AGE = 60.0  # seconds a spare may keep a finished message's content
SPARE_SWEEP_INTERVAL = 10.0  # how often the queue manager's sweeper looks for such spares

_QUEUE_ID = re.compile(r"^[A-Za-z0-9]{6,24}$")
_RECORD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
_BASE52 = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"
_BASE51 = _BASE52[:-1]

FaultHook = Callable[[str], None]
T = TypeVar("T")
# A state change as steps: each yield names the files and directories that must be
# durable before the next step; run_steps() (blocking) or run_steps_async() (the
# daemon's fsync helper) drives it.  One order of steps, two ways to wait for disks.
Steps = Generator[list[str], None, T]


_own_pid = os.getpid()


def _pid() -> int:
    """This process's ID, without a system call each time (it changes only at a fork)."""
    return _own_pid


def _forked() -> None:
    global _own_pid
    _own_pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def valid_queue_id(name: str) -> bool:
    """True for a name of Postfix's queue ID shape: letters and digits only."""
    return bool(_QUEUE_ID.match(name))


def _encode(n: int, alphabet: str, width: int = 0) -> str:
    out = ""
    base = len(alphabet)
    while n:
        n, d = divmod(n, base)
        out = alphabet[d] + out
    return out.rjust(width, alphabet[0]) if width else (out or alphabet[0])


def make_queue_id(long_ids: bool, now: float | None = None) -> str:
    """A candidate queue ID; uniqueness is enforced by O_EXCL on data/ID.

    Short: 5 hex digits of microseconds + 6 random hex digits (Postfix uses the
    inode number where we use randomness).  Long: base-52 seconds, 4 base-52
    digits of microseconds, ``z``, then base-51 randomness, as enable_long_queue_ids.
    """
    t = time.time() if now is None else now
    sec, usec = int(t), int((t % 1) * 1_000_000)
    if not long_ids:
        return f"{usec:05X}{secrets.randbelow(1 << 24):06X}"
    return (
        _encode(sec, _BASE52, 6)
        + _encode(usec, _BASE52, 4)
        + "z"
        + _encode(secrets.randbelow(51**4), _BASE51, 4)
    )


class _DirSync:
    """Group commit for one directory: callers that arrive while an fsync runs
    share the next one, and nobody returns before an fsync that started after
    their own rename has finished."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            mine = self._requested
            while self._done < mine:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                target = self._requested
                self._cond.release()
                try:
                    fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._done = max(self._done, target)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A queue ID reserved by creating data/ID; nothing is visible in a queue yet."""

    queue_id: str
    data_path: str


@dataclass(frozen=True, slots=True)
class ScanEntry:
    queue_id: str
    queue: str
    mtime: float


def fault_hook_from(spec: str) -> FaultHook | None:
    """Build a fault-injection hook from ``step:action[:count][,step:action...]``.

    Actions: ``exit`` (os._exit(99), which leaves files as a SIGKILL would),
    ``enospc`` and ``eio`` (raise that OSError).  With a count the fault fires
    that many times and then never again ("space is back").  Used by crash and
    disk-full tests only, which set the RELAY_FAULT environment variable that ``relay
    serve``, its queue manager and ``sendmail`` read (a test hook, so not a main.cf
    parameter); production runs have no hook.
    """
    plan: dict[str, list[str | int]] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        step, _, rest = item.partition(":")
        action, _, count = rest.partition(":")
        plan[step] = [action or "exit", int(count) if count else -1]
    if not plan:
        return None
    lock = threading.Lock()

    def hook(step: str) -> None:
        entry = plan.get(step)
        if entry is None:
            return
        with lock:
            if entry[1] == 0:
                return
            if isinstance(entry[1], int) and entry[1] > 0:
                entry[1] -= 1
        action = entry[0]
        if action == "exit":
            os._exit(99)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if action == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    return hook


class Spool:
    """A queue directory.

    Every method may block on the disk.  Each change also exists as steps
    (``commit_steps``, ``Entry.*_steps``): file work that does not wait, with the fsyncs
    it needs named between the steps, so that an event loop can run the steps itself and
    leave the waiting to the fsync helper (spool.fsync, ``run_steps_async``).  The
    daemon's processes do that on their busy paths and call the blocking methods from
    threads elsewhere; the commands call them directly."""

    def __init__(
        self,
        root: str,
        *,
        long_ids: bool = False,
        fault: FaultHook | None = None,
        create: bool = True,
        retire_to_free: bool = False,
        reuse_free: bool = False,
        reuse_share: tuple[int, int] = (0, 1),
    ) -> None:
        self.root = os.path.abspath(root)
        self.long_ids = long_ids
        self._fault = fault or (lambda step: None)
        self._dirsync: dict[str, _DirSync] = {}
        self._retire_to_free = retire_to_free
        self._reuse_free = reuse_free
        # With several processes accepting mail, each takes its own share of free/
        # (index, count): a name whose serial modulo count is its index.
        self._reuse_share = reuse_share
        self._free: collections.deque[str] = collections.deque()
        self._kept: collections.deque[str] = collections.deque()  # our own q-spares
        self._free_serial = itertools.count()
        self._free_lock = threading.Lock()
        self._free_listed = 0.0
        self._free_estimate = 0
        self._retired = 0
        # Retired files waiting to be emptied or unlinked (see _empty_retired), and the
        # thread that does it: the queue manager's, started at the first one.
        self._to_empty: collections.deque[tuple[str, bool]] = collections.deque()
        self._empty_wake = threading.Event()
        self._emptying = False
        self._emptier: threading.Thread | None = None
        # The queue manager's thread that unlinks spares left with content (sweep_spares).
        self._sweeper: threading.Thread | None = None
        if create:
            self.create_dirs()
        for name in ("tmp", "data", *QUEUES):
            self._dirsync[name] = _DirSync(os.path.join(self.root, name))
        self._dirsync_at = {group.path: group for group in self._dirsync.values()}

    # ---- layout -------------------------------------------------------------

    def create_dirs(self) -> None:
        for name in ("tmp", "data", "free", *QUEUES):
            os.makedirs(os.path.join(self.root, name), mode=0o700, exist_ok=True)

    def exists(self) -> bool:
        return os.path.isdir(os.path.join(self.root, "incoming"))

    def _env_path(self, queue: str, queue_id: str) -> str:
        return os.path.join(self.root, queue, queue_id)

    def _data_path(self, queue_id: str) -> str:
        return os.path.join(self.root, "data", queue_id)

    def _tmp_path(self, queue_id: str) -> str:
        return os.path.join(self.root, "tmp", f"{queue_id}.{_pid()}.{threading.get_ident()}")

    def relative_path(self, queue: str, queue_id: str) -> str:
        return f"{queue}/{queue_id}"

    # ---- spare inodes (see the module docstring) ----------------------------------

    def _retire(self, path: str, content: bool = False) -> bool:
        """Remove a file we own (under the message lock): keep its inode for reuse.
        False if it was not there.

        A message's ``content`` up to SPARE_CONTENT_MAX_SIZE stays in its spare until a
        new message is written over it or the sweeper unlinks it; bigger content is
        emptied first, under a name no listener takes (free/e..., then a takeable
        name): once takeable, the listener may link it at any moment.  With free/ full,
        the file goes to an e-name too and is unlinked there."""
        if self._retire_to_free:
            # Now and then (the first time too), count what is there: every 256th
            # retirement, whether it went to free/ or not.
            self._retired += 1
            if self._retired % 256 == 1:
                try:
                    self._free_estimate = len(os.listdir(os.path.join(self.root, "free")))
                except OSError:
                    self._free_estimate = FREE_POOL_MAX
            # With free/ full the file is unlinked all the same, but by the thread
            # (a backlog's drain went from ~880 to ~1,200 msg/s), as big content is
            # emptied there: both go to an e-name first.
            keep = self._free_estimate < FREE_POOL_MAX
            empty = False
            if keep:
                self._free_estimate += 1
                if content:
                    try:
                        empty = os.lstat(path).st_size > SPARE_CONTENT_MAX_SIZE
                    except FileNotFoundError:
                        return False
                    except OSError:
                        empty = True
            staged = empty or not keep
            spare = os.path.join(self.root, "free",
                                 f"{'e' if staged else ''}{_pid()}.{next(self._free_serial)}")
            try:
                os.rename(path, spare)
            except FileNotFoundError:
                return False
            except OSError:
                pass  # no free/ (an old spool): unlink as usual
            else:
                if staged:
                    self._empty_later(spare, keep=keep)
                elif content:
                    self.start_sweeper()
                return True
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def _empty_later(self, staged: str, keep: bool) -> None:
        """Have ``staged`` (a free/e... name) emptied and made a spare (``keep``) or
        unlinked, in a thread: either frees its blocks, which may wait for the disk (a
        synchronous discard takes milliseconds), and the caller is an event loop."""
        self._to_empty.append((staged, keep))
        if not self._empty_wake.is_set():
            self._empty_wake.set()
        if self._emptier is None:
            self._emptier = threading.Thread(target=self._empty_retired, daemon=True,
                                             name="spool-empty")
            self._emptier.start()

    def _empty_retired(self) -> None:
        while True:
            self._empty_wake.wait()
            # One wake-up (and one wait for the GIL) per batch, not per message.
            time.sleep(EMPTY_BATCH_WAIT)
            self._emptying = True
            self._empty_wake.clear()
            while self._to_empty:
                staged, keep = self._to_empty.popleft()
                if not keep:
                    with contextlib.suppress(OSError):
                        os.unlink(staged)
                    continue
                try:
                    os.truncate(staged, 0)
                    os.rename(staged, os.path.join(
                        self.root, "free", f"{_pid()}.{next(self._free_serial)}"))
                except OSError:
                    with contextlib.suppress(OSError):
                        os.unlink(staged)  # an e-name is nobody's: never leave mail in free/
            self._emptying = False

    def settle(self) -> None:
        """Wait until every retired content file is emptied and a spare (tests)."""
        while self._to_empty or self._emptying:
            time.sleep(0.005)

    def start_sweeper(self, first_max_age: float | None = None) -> None:
        """Start the queue manager's thread that runs sweep_spares every
        SPARE_SWEEP_INTERVAL; with ``first_max_age``, a first sweep at once."""
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep_forever, args=(first_max_age,),
                                             daemon=True, name="spool-sweep")
            self._sweeper.start()

    def _sweep_forever(self, first_max_age: float | None) -> None:
        if first_max_age is not None:
            with contextlib.suppress(OSError):
                self.sweep_spares(time.time(), first_max_age)
        while True:
            time.sleep(SPARE_SWEEP_INTERVAL)
            with contextlib.suppress(OSError):
                self.sweep_spares(time.time())

    def sweep_spares(self, now: float, max_age: float = SPARE_CONTENT_MAX_AGE) -> int:
        """Unlink the spares that still hold a finished message's content and were
        not taken for ``max_age`` seconds (since they came to free/); how many.

        Unlinked, never emptied in place: a listener may have looked the name up
        already, and link(2) then gives it the inode even after our checks; its new
        file is written over the old bytes from the start.  (Unlinking frees the
        blocks, which may wait for the disk: this is a thread.)"""
        free = os.path.join(self.root, "free")
        stale = [name for name, st in self._spares()
                 if name[:1].isdigit() and _holds_content(st, now, max_age)]
        swept = 0
        for name in stale:
            with contextlib.suppress(FileNotFoundError):  # taken meanwhile
                os.unlink(os.path.join(free, name))
                swept += 1
        return swept

    def _spares(self) -> Iterator[tuple[str, os.stat_result]]:
        """(name, lstat) of each file in free/."""
        with contextlib.suppress(OSError), os.scandir(os.path.join(self.root, "free")) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    yield entry.name, entry.stat(follow_symlinks=False)

    def forget_linked_spares(self) -> None:
        """At the start of the one process that reuses spares: drop the free/ names
        that still share an inode with a live file (a crash between link and unlink)."""
        for name, st in list(self._spares()):
            if st.st_nlink > 1:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.root, "free", name))

    def _refill(self) -> None:
        """List free/ again (at most every 0.2 s; called under _free_lock)."""
        now = time.monotonic()
        if now - self._free_listed < 0.2:
            return
        self._free_listed = now
        index, count = self._reuse_share
        self._free.extend(name for name, st in self._spares()
                          if st.st_nlink == 1 and name[:1].isdigit()
                          and (count == 1 or _serial(name) % count == index))

    def _reuse(self, path: str) -> bool:
        """Give ``path`` a spare inode; False if none (or ``path`` exists).

        Only the processes that accept mail reuse spares, each its own share of
        them (``reuse_share``: no two take the same name), one thread at a time (link
        then unlink under a lock); a free/ name is never made twice, so a stale one
        fails to link instead of sharing an inode.
        """
        if self._kept:
            return self._link_spare(self._kept, path)
        if not self._reuse_free:
            return False
        with self._free_lock:
            if not self._free:
                self._refill()
            return self._link_spare(self._free, path)

    def _link_spare(self, pool: collections.deque[str], path: str) -> bool:
        """Link the first free/ name of ``pool`` that is still there to ``path``,
        then drop the name."""
        while pool:
            name = pool.popleft()
            spare = os.path.join(self.root, "free", name)
            try:
                # A spare's mtime is when it was last written, maybe days ago: made now
                # before its new name appears, so that the start's cleanup() never takes
                # a fresh reservation for a stale one.
                os.utime(spare)
                os.link(spare, path)
            except FileNotFoundError:
                continue  # taken already, or removed by postsuper -p
            except OSError:
                pool.appendleft(name)  # path exists (or worse): keep the spare
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spare)
            return True
        return False

    def _keep_replaced(self, path: str) -> str | None:
        """Before an envelope is replaced by rename: give its inode a free/ name of
        the queue manager's own (``q...``, never taken by the listener), so the
        rename frees no inode and the next rewrite's file needs none.  The caller
        must drop the name (_forget_kept) if the rename fails: until then it shares
        the live envelope's inode."""
        if not self._retire_to_free or len(self._kept) >= KEPT_POOL_MAX:
            return None
        name = f"q{_pid()}.{next(self._free_serial)}"
        try:
            os.link(path, os.path.join(self.root, "free", name))
        except OSError:
            return None
        return name

    def _forget_kept(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root, "free", name))

    def forget_kept_spares(self) -> None:
        """At the queue manager's start (under qmgr.lock): the q-names an earlier one
        left in free/ are nobody's now; a crash may have left one sharing an inode
        with a live envelope, so none is ever reused.  Its e-names (content not yet
        emptied) go too; and the sweeper starts with every spare that still holds
        content (the queue manager that retired it is gone), in its thread."""
        for name, _ in list(self._spares()):
            if name.startswith(("q", "e")):
                self._forget_kept(name)
        self.start_sweeper(first_max_age=0.0)

    # ---- accepting a message ---------------------------------------------------

    def reserve(self) -> Reservation:
        """Reserve a fresh queue ID by creating an empty data/ID (O_EXCL)."""
        for _ in range(100):
            queue_id = make_queue_id(self.long_ids)
            path = self._data_path(queue_id)
            if self._reuse(path):  # False when path exists: O_EXCL below says so
                return Reservation(queue_id, path)  # commit() truncates it
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise spool_error(exc, "reserve queue ID") from exc
            os.close(fd)
            return Reservation(queue_id, path)
        raise SpoolError("cannot find an unused queue ID")

    def commit(self, res: Reservation, env: Envelope, content: Iterable[bytes]) -> Envelope:
        """Write content and envelope durably into incoming/; see the module table.

        On any error the reservation is released and nothing is visible in a queue.
        """
        return run_steps(self.commit_steps(res, env, content), self.fsync_paths)

    def commit_steps(self, res: Reservation, env: Envelope, content: Iterable[bytes]
                     ) -> Steps[Envelope]:
        """commit() as steps (see run_steps): the files are written here, and each
        yield names what must be durable before the next step."""
        if env.queue_id != res.queue_id:
            env = replace(env, queue_id=res.queue_id)
        tmp = self._tmp_path(res.queue_id)
        try:
            size = 0
            fd = os.open(res.data_path, os.O_WRONLY)
            try:
                for chunk in content:
                    _write_all(fd, chunk)
                    size += len(chunk)
                _cut(fd, size)
                self._fault("enqueue.data_written")
            finally:
                os.close(fd)
            if env.size != size:
                env = replace(env, size=size)
            self._write_file(tmp, envfmt.dumps(env), "enqueue.envelope_written", sync=False)
            yield [res.data_path, tmp, self.dir_path("data")]
            self._fault("enqueue.before_rename")
            os.rename(tmp, self._env_path("incoming", res.queue_id))
            self._fault("enqueue.renamed")
            yield [self.dir_path("incoming")]
            self._fault("enqueue.committed")
        except BaseException as exc:  # an abandoned commit (GeneratorExit) included
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not os.path.exists(self._env_path("incoming", res.queue_id)):
                with contextlib.suppress(OSError):
                    os.unlink(res.data_path)  # never visible: release the reservation
            # else: renamed but not known durable; it stays whole (its client, told
            # 4xx, may send it again: the protocol's duplicate, never a loss).
            if isinstance(exc, OSError):
                raise spool_error(exc, "write queue file") from exc
            raise
        return env

    def dir_path(self, name: str) -> str:
        """A spool directory (``data``, ``incoming``, ...), for fsync."""
        return os.path.join(self.root, name)

    def fsync_paths(self, paths: Iterable[str]) -> None:
        """The blocking driver's fsync: directories through their group commit."""
        for path in paths:
            group = self._dirsync_at.get(path)
            if group is not None:
                group.sync()
            else:
                fsync_path(path)

    def abort(self, res: Reservation) -> None:
        """Release a reservation that was never staged."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(res.data_path)

    def enqueue(self, env: Envelope, content: bytes) -> Envelope:
        """Reserve and commit in one call (bounces, sendmail, tests)."""
        res = self.reserve()
        return self.commit(res, env, [content])

    def _write_file(self, path: str, payload: bytes, step: str, mtime: float | None = None,
                    sync: bool = True) -> None:
        self._reuse(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            _write_all(fd, payload)
            _cut(fd, len(payload))
            self._fault(step)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if mtime is not None:
            os.utime(path, (mtime, mtime))

    # ---- reading --------------------------------------------------------------

    def locate(self, queue_id: str, queues: Iterable[str] = SEARCH_ORDER) -> str | None:
        """The queue that holds this ID's envelope, or None."""
        if not valid_queue_id(queue_id):
            return None
        for queue in queues:
            if os.path.exists(self._env_path(queue, queue_id)):
                return queue
        return None

    def read(self, queue: str, queue_id: str) -> Envelope:
        """Read an envelope; EntryGone if it is not there, CorruptEntry if unreadable."""
        if not valid_queue_id(queue_id) or queue not in QUEUES:
            raise EntryGone(f"{queue}/{queue_id}")
        try:
            raw = _read_at(None, self._env_path(queue, queue_id))
        except FileNotFoundError as exc:
            raise EntryGone(f"{queue}/{queue_id}") from exc
        except OSError as exc:
            raise CorruptEntry(f"{queue}/{queue_id}: {exc.strerror}") from exc
        env = envfmt.loads(raw)
        if env.queue_id != queue_id:
            raise CorruptEntry(f"{queue}/{queue_id}: envelope names queue ID {env.queue_id}")
        return env

    def read_content(self, queue_id: str, expected_size: int | None = None) -> bytes:
        """The message content; CorruptEntry if missing or not of the recorded size."""
        try:
            data = _read_at(None, self._data_path(queue_id), expected_size)
        except FileNotFoundError as exc:
            raise CorruptEntry(f"data/{queue_id}: message content is missing") from exc
        except OSError as exc:
            raise CorruptEntry(f"data/{queue_id}: {exc.strerror}") from exc
        if expected_size is not None and len(data) != expected_size:
            raise CorruptEntry(
                f"data/{queue_id}: content is {len(data)} bytes, envelope says {expected_size}"
            )
        return data

    def read_content_check(self, queue_id: str, expected_size: int) -> None:
        """A cheap stat: CorruptEntry unless data/ID exists with the recorded size."""
        try:
            size = os.stat(self._data_path(queue_id)).st_size
        except FileNotFoundError as exc:
            raise CorruptEntry(f"data/{queue_id}: message content is missing") from exc
        if size != expected_size:
            raise CorruptEntry(
                f"data/{queue_id}: content is {size} bytes, envelope says {expected_size}"
            )

    def content_path(self, queue_id: str) -> str:
        return self._data_path(queue_id)

    def mtime(self, queue: str, queue_id: str) -> float:
        try:
            return os.stat(self._env_path(queue, queue_id)).st_mtime
        except FileNotFoundError as exc:
            raise EntryGone(f"{queue}/{queue_id}") from exc

    def scan(self, queue: str) -> Iterator[ScanEntry]:
        """Stream the entries of one queue (directory order), with their mtime.

        Names that are not queue IDs are yielded too (queue_id = the name) so the
        daemon can quarantine them; commands should skip them with valid_queue_id().
        """
        path = os.path.join(self.root, queue)
        try:
            it = os.scandir(path)
        except FileNotFoundError:
            return
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # lost a race with a move or delete
                yield ScanEntry(entry.name, queue, st.st_mtime)

    def queue_age(self, queue: str) -> tuple[int, float | None]:
        """How many entries a queue holds, and when the oldest arrived (None if empty).

        Arrival is the mtime of data/ID, written once when the message came (an
        envelope's mtime is its next attempt in deferred/); an entry without content
        (in corrupt/) counts with its envelope's mtime.  One listing and one stat per
        entry; no lock, no read: for metrics."""
        count, oldest = 0, None
        data = os.path.join(self.root, "data")
        try:
            it = os.scandir(os.path.join(self.root, queue))
        except FileNotFoundError:
            return 0, None
        with it:
            for entry in it:
                try:
                    mtime = os.stat(os.path.join(data, entry.name)).st_mtime
                except OSError:
                    try:
                        mtime = entry.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue  # lost a race with a move or delete
                count += 1
                oldest = mtime if oldest is None else min(oldest, mtime)
        return count, oldest

    def envelopes(self, queues: Iterable[str]) -> Iterator[tuple[str, Envelope]]:
        """Stream (queue, envelope) for every readable entry; skips lost races and junk."""
        for queue in queues:
            for entry in self.scan(queue):
                if not valid_queue_id(entry.queue_id):
                    continue
                try:
                    yield queue, self.read(queue, entry.queue_id)
                except (EntryGone, CorruptEntry):
                    continue

    def queue_ids(self, queue: str) -> Iterator[str]:
        """Stream the queue IDs of one queue in directory order, without a stat.

        For commands that act on every message (``postsuper -d ALL``): names that
        are not queue IDs are skipped, a missing queue directory is an empty queue.
        """
        try:
            it = os.scandir(os.path.join(self.root, queue))
        except FileNotFoundError:
            return
        with it:
            for entry in it:
                if valid_queue_id(entry.name):
                    yield entry.name

    def envelope_fields(self, queues: Iterable[str]) -> Iterator[tuple[str, envfmt.Fields]]:
        """envelopes() for listings: (queue, envelope.loads_fields()) per readable entry.

        The same entries in the same order, skipping the same lost races and corrupt
        files, at a fraction of the cost: no stat, one os.open/os.read/os.close per
        file (relative to the open queue directory) and no records built.
        """
        for queue in queues:
            if queue not in QUEUES:
                continue
            try:
                dir_fd = os.open(os.path.join(self.root, queue), os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue
            try:
                with os.scandir(dir_fd) as it:
                    for entry in it:
                        name = entry.name
                        if not valid_queue_id(name):
                            continue
                        data = _fields_at(dir_fd, name)
                        if data is not None:
                            yield queue, data
            finally:
                os.close(dir_fd)

    def envelope_fields_of(self, names: Iterable[tuple[str, str]]
                           ) -> Iterator[tuple[str, envfmt.Fields]]:
        """envelope_fields() for (queue, queue ID) pairs listed before (queue_ids()), in
        their order: a listing made by several processes, each a part of the names."""
        dir_fds: dict[str, int] = {}
        try:
            for queue, name in names:
                dir_fd = dir_fds.get(queue)
                if dir_fd is None:
                    if queue not in QUEUES:
                        continue
                    try:
                        dir_fd = dir_fds[queue] = os.open(os.path.join(self.root, queue),
                                                          os.O_RDONLY | os.O_DIRECTORY)
                    except FileNotFoundError:
                        continue
                data = _fields_at(dir_fd, name)
                if data is not None:
                    yield queue, data
        finally:
            for fd in dir_fds.values():
                os.close(fd)

    def sync_queues(self, queues: Iterable[str]) -> None:
        """fsync these queue directories, once each: the end of a mass operation
        whose moves and removals were made with ``durable=False``."""
        for queue in dict.fromkeys(queues):
            self._dirsync[queue].sync()

    # ---- changing state -----------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, queue_id: str, queues: Iterable[str] = SEARCH_ORDER,
               wait: bool = True) -> Iterator[Entry]:
        """Lock one message against every other process and yield its Entry.

        Raises EntryGone when the message does not exist (or vanished while we
        waited for the lock): callers treat that as a lost race.  ``wait=False``
        raises BlockingIOError instead of waiting for another holder (an event
        loop then waits in a thread).
        """
        if not valid_queue_id(queue_id):
            raise EntryGone(queue_id)
        path = self._data_path(queue_id)
        queues = tuple(queues)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            queue = self.locate(queue_id, queues)
            if queue is not None and not os.path.exists(path):
                # An envelope without content: only damage does this (a delete
                # unlinks the envelope first).  Let the caller quarantine it.
                raise CorruptEntry(f"{queue}/{queue_id}: message content is missing") from exc
            raise EntryGone(queue_id) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    raise EntryGone(queue_id)
            except FileNotFoundError as exc:
                raise EntryGone(queue_id) from exc
            queue = self.locate(queue_id, queues)
            if queue is None:
                raise EntryGone(queue_id)
            yield Entry(self, queue_id, queue)
        finally:
            os.close(fd)  # releases the flock

    def quarantine(self, queue: str, name: str) -> str:
        """Move an unreadable envelope (or a stray file) to corrupt/; never delete it."""
        src = self._env_path(queue, name)
        target = self._env_path("corrupt", name)
        n = 0
        while os.path.exists(target):
            n += 1
            target = self._env_path("corrupt", f"{name}.{n}")
        try:
            os.rename(src, target)
        except FileNotFoundError as exc:
            raise EntryGone(f"{queue}/{name}") from exc
        self._dirsync["corrupt"].sync()
        return os.path.basename(target)

    def cleanup(self, now: float | None = None, max_age: float = TMP_MAX_AGE) -> list[str]:
        """Remove tmp files and envelope-less data files older than max_age.

        Both were never acknowledged to any client (the commit is the rename into
        incoming/), so removing them loses nothing.  Returns what was removed.
        """
        now = time.time() if now is None else now
        removed: list[str] = []
        for entry in self.scan("tmp"):
            if now - entry.mtime > max_age:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.root, "tmp", entry.queue_id))
                    removed.append(f"tmp/{entry.queue_id}")
        for entry in self.scan("data"):
            if now - entry.mtime > max_age and self.locate(entry.queue_id, QUEUES) is None:
                path = self._data_path(entry.queue_id)
                with contextlib.suppress(OSError, EntryGone), self.locked_data(entry.queue_id):
                    # Looked at again under the lock: a listener may have just reserved
                    # this name from a spare (its mtime made now as it did).
                    if (now - os.stat(path).st_mtime > max_age
                            and self.locate(entry.queue_id, QUEUES) is None):
                        os.unlink(path)
                        removed.append(f"data/{entry.queue_id}")
        return removed

    @contextlib.contextmanager
    def locked_data(self, queue_id: str) -> Iterator[None]:
        fd = os.open(self._data_path(queue_id), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- paused destinations (relay queue pause) ---------------------------------

    def pauses(self) -> frozenset[str]:
        """Paused destinations: recipient domains, or ``nexthop:HOST`` entries."""
        try:
            with open(os.path.join(self.root, "paused"), encoding="utf-8") as f:
                return frozenset(line.strip() for line in f if line.strip())
        except FileNotFoundError:
            return frozenset()

    def set_paused(self, name: str, paused: bool) -> bool:
        """Add or remove one pause, atomically; True if anything changed."""
        lock = os.open(os.path.join(self.root, "paused.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = set(self.pauses())
            if (name in current) == paused:
                return False
            current = current | {name} if paused else current - {name}
            tmp = os.path.join(self.root, "tmp", f"paused.{os.getpid()}")
            self._write_file(tmp, "".join(f"{n}\n" for n in sorted(current)).encode(), "pause")
            os.rename(tmp, os.path.join(self.root, "paused"))
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        finally:
            os.close(lock)

    # ---- state records (the MTA-STS policy cache, TLS report counts) --------------
    #
    # Small files of the queue manager's own under state/KIND/NAME, kept across
    # restarts; never a message.  Each is replaced whole by rename, so a reader sees
    # the old or the new one; a crash loses at most the write in progress.

    def _record_path(self, kind: str, name: str) -> str:
        for part in (kind, name):
            if not _RECORD_NAME.fullmatch(part):
                raise ValueError(f"bad state record name: {part!r}")
        return os.path.join(self.root, "state", kind, name)

    def read_record(self, kind: str, name: str) -> bytes | None:
        try:
            with open(self._record_path(kind, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_record(self, kind: str, name: str, data: bytes) -> None:
        path = self._record_path(kind, name)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = os.path.join(self.root, "tmp", f"{kind}.{name}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)

    def record_names(self, kind: str) -> list[str]:
        try:
            names = os.listdir(os.path.dirname(self._record_path(kind, "x")))
        except FileNotFoundError:
            return []
        return sorted(name for name in names if _RECORD_NAME.fullmatch(name))

    def remove_record(self, kind: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record_path(kind, name))

    # ---- used by Entry ------------------------------------------------------------

    def _rewrite_steps(self, queue: str, env: Envelope, mtime: float | None) -> Steps[None]:
        tmp = self._tmp_path(env.queue_id)
        try:
            self._write_file(tmp, envfmt.dumps(env), "update.tmp_written", mtime, sync=False)
            yield [tmp]  # complete on disk before it replaces the old envelope
            self._fault("update.before_rename")
            dst = self._env_path(queue, env.queue_id)
            kept = self._keep_replaced(dst)
            try:
                os.rename(tmp, dst)
            except BaseException:
                if kept is not None:
                    self._forget_kept(kept)
                raise
            if kept is not None:
                self._kept.append(kept)
            self._fault("update.renamed")
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise spool_error(exc, "update queue file") from exc
            raise
        yield [self.dir_path(queue)]

    def _move(self, queue_id: str, src: str, dst: str, mtime: float | None,
              durable: bool = True) -> None:
        path = self._env_path(src, queue_id)
        try:
            if mtime is not None:
                os.utime(path, (mtime, mtime))
            self._fault("move.before_rename")
            os.rename(path, self._env_path(dst, queue_id))
            self._fault("move.renamed")
        except FileNotFoundError as exc:
            raise EntryGone(f"{src}/{queue_id}") from exc
        except OSError as exc:
            raise spool_error(exc, "move queue file") from exc
        if durable:
            self._dirsync[dst].sync()

    def _remove_steps(self, queue_id: str, queue: str, durable: bool = True) -> Steps[None]:
        if not self._retire(self._env_path(queue, queue_id)):
            raise EntryGone(f"{queue}/{queue_id}")
        self._fault("remove.envelope_gone")
        if durable:
            yield [self.dir_path(queue)]  # the envelope is gone for good before its content
        self._retire(self._data_path(queue_id), content=True)


class Entry:
    """A locked message: read it, rewrite it, move it or remove it.

    Valid only inside ``with spool.locked(queue_id) as entry``.  ``queue`` follows
    the moves made through this object.
    """

    __slots__ = ("_spool", "queue", "queue_id")

    def __init__(self, spool: Spool, queue_id: str, queue: str) -> None:
        self._spool = spool
        self.queue_id = queue_id
        self.queue = queue

    @property
    def spool(self) -> Spool:
        return self._spool

    def read(self) -> Envelope:
        return self._spool.read(self.queue, self.queue_id)

    def mtime(self) -> float:
        return self._spool.mtime(self.queue, self.queue_id)

    def write(self, env: Envelope, mtime: float | None = None) -> None:
        """Replace the envelope in its current queue (atomic rename)."""
        run_steps(self.write_steps(env, mtime), self._spool.fsync_paths)

    def write_steps(self, env: Envelope, mtime: float | None = None) -> Steps[None]:
        """write() as steps, for run_steps_async()."""
        if env.queue_id != self.queue_id:
            raise ValueError("envelope belongs to another queue ID")
        return self._spool._rewrite_steps(self.queue, env, mtime)

    def move(self, queue: str, mtime: float | None = None, durable: bool = True) -> None:
        """Move to another queue; ``mtime`` is set first (spool.transitions says what).

        ``durable=False`` skips the directory fsync, for moves that a crash may undo
        harmlessly, or whose directory the caller fsyncs later (spool.transitions).
        """
        if queue not in QUEUES:
            raise ValueError(f"unknown queue: {queue}")
        if queue != self.queue:
            self._spool._move(self.queue_id, self.queue, queue, mtime, durable)
            self.queue = queue
        elif mtime is not None:
            os.utime(self._spool._env_path(queue, self.queue_id), (mtime, mtime))

    def write_and_move(self, env: Envelope, queue: str, mtime: float | None = None,
                       durable_move: bool = True) -> None:
        """Rewrite in place (always durable), then move: a crash in between leaves the
        new envelope in the old queue, never two envelopes."""
        run_steps(self.write_and_move_steps(env, queue, mtime, durable_move),
                  self._spool.fsync_paths)

    def write_and_move_steps(self, env: Envelope, queue: str, mtime: float | None = None,
                             durable_move: bool = True) -> Steps[None]:
        yield from self.write_steps(env, mtime)
        self.move(queue, mtime, durable=False)
        if durable_move:
            yield [self._spool.dir_path(queue)]

    def remove(self, durable: bool = True) -> None:
        """Unlink the envelope, then the content.

        ``durable=False`` skips the fsync of the queue directory between the two, for
        mass removals (``postsuper -d ALL``) that call ``Spool.sync_queues()`` once at
        the end.  A crash before that sync may bring deleted messages back, whole: the
        envelope is unlinked before the content, and journaling file systems (ext4,
        XFS) commit the two unlinks in that order, so it never leaves an envelope
        without content; were one to appear, ``Spool.locked()`` reports it as
        CorruptEntry and it is quarantined to corrupt/, never delivered half.
        """
        run_steps(self.remove_steps(durable), self._spool.fsync_paths)

    def remove_steps(self, durable: bool = True) -> Steps[None]:
        """remove() as steps, for run_steps_async()."""
        return self._spool._remove_steps(self.queue_id, self.queue, durable)


def _serial(spare: str) -> int:
    """The serial of a spare's name (``PID.SERIAL``); 0 for any other name."""
    tail = spare.rpartition(".")[2]
    return int(tail) if tail.isdigit() else 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _holds_content(st: os.stat_result, now: float, max_age: float) -> bool:
    """A free/ spare with content, alone on its inode, in free/ for max_age or more."""
    return st.st_size > 0 and st.st_nlink == 1 and now - st.st_ctime >= max_age


def _cut(fd: int, size: int) -> None:
    """End a file at ``size`` after writing it from the start.

    Files are written over in place, never opened with O_TRUNC: a reused spare keeps
    its blocks, and ext4 frees no block (and, for a file truncated to nothing, does
    not flush it on close: auto_da_alloc) only for a writer to allocate it again.
    Only an older, longer content is cut off."""
    if os.fstat(fd).st_size > size:
        os.ftruncate(fd, size)


def run_steps(steps: Steps[T], sync: Callable[[list[str]], None]) -> T:
    """Drive a change made of steps: between two steps, ``sync`` makes durable what the
    first named.  A failed fsync is thrown into the steps, which clean up and raise."""
    try:
        paths = next(steps)
        while True:
            try:
                sync(paths)
            except OSError as exc:
                paths = steps.throw(exc)
            else:
                paths = next(steps)
    except StopIteration as stop:
        return cast(T, stop.value)


async def run_steps_async(steps: Steps[T],
                          sync: Callable[[list[str]], Awaitable[None]]) -> T:
    """run_steps() for an event loop: ``sync`` is the fsync helper's (spool.fsync)."""
    try:
        paths = next(steps)
        while True:
            try:
                await sync(paths)
            except OSError as exc:
                paths = steps.throw(exc)
            else:
                paths = next(steps)
    except StopIteration as stop:
        return cast(T, stop.value)
    finally:
        steps.close()  # cancelled between steps: the steps clean up


def _fields_at(dir_fd: int, name: str) -> envfmt.Fields | None:
    """The envelope ``name`` in the queue directory ``dir_fd`` as plain fields; None if
    it is gone (a lost race), unreadable, or names another queue ID (as read() says)."""
    try:
        data = envfmt.loads_fields(_read_at(dir_fd, name))
    except (OSError, CorruptEntry):
        return None
    return data if data["queue_id"] == name else None


def _read_at(dir_fd: int | None, name: str, size: int | None = None) -> bytes:
    """The whole file ``name`` (in the directory ``dir_fd``, or a path); an envelope
    takes one read, and so does a file of the ``size`` expected.  No buffered file
    object: its lseek, fstat and isatty calls cost more than the read."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        first = max(8192, size + 1) if size is not None else 8192
        raw = os.read(fd, first)
        if len(raw) < first:
            return raw
        chunks = [raw]
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def spool_error(exc: OSError, what: str) -> SpoolError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(f"{what}: {exc.strerror}")
    return SpoolError(f"{what}: {exc.strerror or exc}")
