"""The master's side of the listener workers: ``relay_smtpd_processes - 1`` more processes
accepting mail on the master's sockets (relay.smtpd.worker says what one does).

It owns their lives: started once the master listens (and waited for: the daemon says it
has started once every process serves), each with the listening sockets,
the trigger socket to the queue manager, its own control socket and its share of the
spool's spare inodes; SIGHUP passed on (a reload), ``drain`` passed on, SIGTERM at the
daemon's stop, waited for (each lets its commits finish), then killed if it lingers.
It answers their questions about clients that limits apply to from the master's own
listener (one count for all processes, as Postfix's anvil), and gathers their counts
for a scrape of /metrics.  The first worker to exit on its own ends the daemon, as the
queue manager's exit does (relay.daemon): a supervisor restarts the whole, and nothing
a client was told 250 about is lost.  Nothing here touches the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from relay import sdnotify
from relay.config import ListenAddress
from relay.smtpd.counts import SmtpdCounts
from relay.smtpd.listener import Listener
from relay.smtpd.worker import KEYS, READY, Channel, ChannelClosed, answer_for

log = logging.getLogger("relay.master")

STOP_GRACE = 8.0  # seconds a stopping worker has (its commits get 3 of them)
METRICS_TIMEOUT = 2.0
RELOAD_TIMEOUT = 10.0
START_TIMEOUT = 60.0


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process
    channel: Channel
    ready: asyncio.Event


class WorkerStartError(Exception):
    """A worker did not start; ``str()`` says which and how it ended."""


def worker_main(argv: list[str]) -> int:
    """``relay smtpd-worker ...``: the worker's side (relay.smtpd.worker.main)."""
    from relay.smtpd import worker

    return worker.main(argv)


class Workers:
    def __init__(self, count: int, config_dir: str | None, overrides: tuple[str, ...],
                 listener: Listener, keys: bytes) -> None:
        self.count = count  # processes accepting mail, the master's own included
        self.config_dir = config_dir
        self.overrides = overrides
        self.listener = listener
        self.keys = keys
        self.workers: list[_Worker] = []
        self.stopping = False

    async def start(self, socks: Sequence[tuple[ListenAddress, socket.socket]],
                    trigger: socket.socket, timeout: float = START_TIMEOUT) -> None:
        """Start the workers (the sockets listen already) and wait until each serves;
        WorkerStartError if one does not."""
        for index in range(1, self.count):
            self.workers.append(await self._spawn(index, socks, trigger))
        for w in self.workers:
            ready = asyncio.ensure_future(w.ready.wait())
            gone = asyncio.ensure_future(w.proc.wait())
            await asyncio.wait({ready, gone}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            gone.cancel()
            if not w.ready.is_set():
                how = (f"exited with status {w.proc.returncode}" if w.proc.returncode
                       is not None else f"did not start within {timeout:.0f} s")
                raise WorkerStartError(f"listener worker {w.index} {how}")

    async def _spawn(self, index: int, socks: Sequence[tuple[ListenAddress, socket.socket]],
                     trigger: socket.socket) -> _Worker:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Not "-m": that would put the working directory first on sys.path, where a
        # directory named spool/ (a queue directory, say) would shadow the package.
        bootstrap = ("import sys; del sys.path[0]; from relay.cli.main import main; "
                     "sys.exit(main(sys.argv[1:]))")
        args = [sys.executable, "-c", bootstrap, "smtpd-worker", "--parent", str(os.getpid()),
                "--control-fd", str(theirs.fileno()), "--trigger-fd", str(trigger.fileno()),
                "--share", f"{index}/{self.count}"]
        for addr, sock in socks:
            args += ["--listen", f"{sock.fileno()}{'/tls' if addr.tls else ''}"]
        if self.config_dir is not None:
            args += ["-c", self.config_dir]
        for item in self.overrides:
            args += ["-o", item]
        fds = (theirs.fileno(), trigger.fileno(), *(sock.fileno() for _, sock in socks))
        # Only the main process speaks to systemd (NotifyAccess=main).
        env = {k: v for k, v in os.environ.items() if k != sdnotify.NOTIFY_SOCKET}
        try:
            proc = await asyncio.create_subprocess_exec(*args, pass_fds=fds, env=env)
        finally:
            theirs.close()
        ready = asyncio.Event()

        def answer(text: bytes) -> bytes:
            if text == READY:
                ready.set()
                return b""
            return answer_for(self.listener, text)

        channel = Channel(mine, answer)
        mine.send(KEYS + self.keys)  # first, before it builds its TLS context
        return _Worker(index, proc, channel, ready)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    async def exited(self) -> tuple[int, int | None]:
        """Wait until a worker exits: (its number, its status)."""
        if not self.workers:
            await asyncio.Event().wait()  # never
        waits = {asyncio.ensure_future(w.proc.wait()): w for w in self.workers}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        worker = waits[next(iter(done))]
        return worker.index, worker.proc.returncode

    async def reload(self) -> None:
        """Each worker reloads main.cf and reopens the maillog; returns once each has
        (or has not answered in time)."""
        async def one(w: _Worker) -> None:
            with contextlib.suppress(ChannelClosed, TimeoutError):
                await w.channel.ask(b"reload", RELOAD_TIMEOUT)

        await asyncio.gather(*(one(w) for w in self.workers))

    def drain(self) -> None:
        for w in self.workers:
            w.channel.tell(b"drain")

    async def metrics(self) -> list[SmtpdCounts]:
        """Each worker's counts (those that do not answer in time are left out)."""
        async def one(w: _Worker) -> SmtpdCounts | None:
            try:
                return SmtpdCounts.from_json(await w.channel.ask(b"metrics", METRICS_TIMEOUT))
            except (ChannelClosed, TimeoutError, ValueError):
                return None

        found = await asyncio.gather(*(one(w) for w in self.workers))
        return [c for c in found if c is not None]

    def terminate(self) -> None:
        """The daemon stops: each worker stops accepting and lets its commits finish."""
        self.stopping = True
        for w in self.workers:
            if w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)

    async def wait(self) -> None:
        """Until every worker is gone (killed after STOP_GRACE)."""
        end = asyncio.get_running_loop().time() + STOP_GRACE
        for w in self.workers:
            try:
                await asyncio.wait_for(w.proc.wait(),
                                       max(0.0, end - asyncio.get_running_loop().time()))
            except TimeoutError:
                log.warning("listener worker %d did not stop; killing it", w.index)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
            w.channel.close()
