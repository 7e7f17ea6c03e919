"""Durable writes for an event loop: a helper process fsyncs files by name.

An fsync(2) waits for the disk.  Done on the event loop it stalls every session;
done in a thread it costs the loop two GIL hand-offs per call, which under load is
more CPU than the rest of accepting a message.  So a daemon process writes its
files itself (to the page cache, which does not wait) and sends their names to a
helper process (spool/fsyncd.py) that does nothing but open, fsync and close them,
and answers once for the lot.  Callers that arrive while a request is out share the next one (group
commit): many sessions committing together cost one round trip per step.

fsync by name is idempotent: a request lost with a dying helper is sent again to
its successor, and a caller is answered only after every fsync it asked for has
returned.  The helper ignores SIGINT and SIGTERM (its parent decides when it ends)
and exits when its end of the socket closes, a SIGKILL of the parent included.
Neither process's crash leaves anything behind.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable

from spool import fsyncd
from spool.fsyncd import BUFFER, fsync_path

log = logging.getLogger("relay.fsync")

MAX_REQUEST = 64 * 1024  # bytes of names per request; one caller's names always fit
_RESPAWNS = 5  # in a row without an answer: then fsync in threads


class Syncer:
    """The daemon's end: ``await syncer.sync(paths)`` returns once all are durable.

    One request is out at a time; names asked for meanwhile wait and go together.
    Without a helper (it cannot be started, or it keeps exiting) the names are
    fsync'ed in threads: slower, never less durable.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: collections.deque[tuple[list[bytes], asyncio.Future[None]]] = \
            collections.deque()
        self._sent: list[tuple[list[bytes], asyncio.Future[None]]] | None = None
        self._respawns = 0
        self.requests = 0  # sent to a helper: fewer than sync() calls under load

    def start(self) -> None:
        """Start the helper (the event loop must be running)."""
        self._loop = asyncio.get_running_loop()
        self._spawn()

    def _spawn(self) -> bool:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (mine, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        try:
            # By path, isolated (-I) and without site (-S): only the standard library.
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", fsyncd.__file__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.warning("cannot start the fsync helper, fsync in threads: %s", exc)
            mine.close()
            return False
        finally:
            theirs.close()
        mine.setblocking(False)
        self._sock = mine
        assert self._loop is not None
        self._loop.add_reader(mine.fileno(), self._readable)
        return True

    async def sync(self, paths: Iterable[str | bytes]) -> None:
        """Return once every file and directory named is fsync'ed; OSError if one
        could not be (the first failure's errno and name)."""
        names = [os.fsencode(p) for p in paths]
        if not names:
            return
        if self._sock is None:
            await asyncio.to_thread(_fsync_all, names)
            return
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiting.append((names, future))
        if self._sent is None:
            self._send()
        await future

    def _send(self) -> None:
        batch: list[tuple[list[bytes], asyncio.Future[None]]] = []
        names: dict[bytes, None] = {}
        size = 0
        while self._waiting:
            item_names, future = self._waiting[0]
            cost = sum(len(n) + 1 for n in item_names if n not in names)
            if batch and size + cost > MAX_REQUEST:
                break
            self._waiting.popleft()
            if future.done():
                continue  # its caller was cancelled
            batch.append((item_names, future))
            names.update(dict.fromkeys(item_names))
            size += cost
        if not batch:
            return
        self._sent = batch
        self.requests += 1
        try:
            assert self._sock is not None
            self._sock.send(b"\0".join(names))
        except OSError:
            self._helper_lost()

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            answer = self._sock.recv(BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            answer = b""
        if not answer:
            self._helper_lost()
            return
        self._respawns = 0
        batch, self._sent = self._sent or [], None
        failed: dict[bytes, int] = {}
        if answer != fsyncd.OK:
            for item in answer[1:].split(b"\0"):
                number, _, name = item.partition(b":")
                failed[name] = int(number or errno.EIO)
        for names, future in batch:
            if future.done():
                continue
            bad = next((n for n in names if n in failed), None)
            if bad is None:
                future.set_result(None)
            else:
                code = failed[bad]
                future.set_exception(OSError(code, os.strerror(code), os.fsdecode(bad)))
        if self._waiting:
            self._send()

    def _helper_lost(self) -> None:
        """The helper died (or its socket broke): start another and send it what the
        dead one may not have done."""
        self._drop_helper()
        if self._sent:
            self._waiting.extendleft(reversed(self._sent))
        self._sent = None
        self._respawns += 1
        if self._respawns > _RESPAWNS:
            log.error("fsync helper keeps exiting; fsync in threads from now on")
        else:
            log.warning("fsync helper exited; starting another")
            if self._spawn():
                if self._waiting:
                    self._send()
                return
        waiting = list(self._waiting)
        self._waiting.clear()
        for names, future in waiting:
            asyncio.ensure_future(_in_thread(names, future))

    def _fail_all(self, exc: OSError) -> None:
        for _, future in [*(self._sent or []), *self._waiting]:
            if not future.done():
                future.set_exception(exc)
        self._sent = None
        self._waiting.clear()

    def _drop_helper(self) -> None:
        """Close our end (the helper exits at EOF) and reap it."""
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            proc, self._proc = self._proc, None
            _reap(proc)

    def close(self) -> None:
        """Stop the helper; callers still waiting get EIO (later ones fsync in
        threads)."""
        self._drop_helper()
        self._fail_all(OSError(errno.EIO, "fsync helper stopped"))

    @property
    def helper_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


def _fsync_all(names: list[bytes]) -> None:
    for name in names:
        fsync_path(name)


async def _in_thread(names: list[bytes], future: asyncio.Future[None]) -> None:
    try:
        await asyncio.to_thread(_fsync_all, names)
    except OSError as exc:
        if not future.done():
            future.set_exception(exc)
    else:
        if not future.done():
            future.set_result(None)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait briefly for a helper whose socket is closed; kill it if it lingers."""
    deadline = time.monotonic() + 2.0
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return
        time.sleep(0.002)
