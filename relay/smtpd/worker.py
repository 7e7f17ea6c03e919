"""A listener worker process: one more process accepting mail on the master's sockets.

``relay serve`` accepts mail in its own process and in ``relay_smtpd_processes - 1``
workers (relay.workers starts them), as Postfix runs many smtpd processes on one port:
every process waits on the same listening sockets and the kernel hands each connection
to one of them, so sessions, TLS handshakes and commits spread over the CPUs.  A worker
is what the master's listener is, nothing more: the same sessions (relay.smtpd), its own
fsync helper, commits to the same spool (which takes concurrent writers: O_EXCL queue
IDs, renames, a lock per message; each process takes its own share of the spare inodes),
and the same trigger socket to the queue manager, which stays the only scheduler.

It speaks with the master over a control socket (``Channel``: SOCK_SEQPACKET, one message
a packet): the master first sends the TLS session ticket keys every process shares
(relay.smtpd.tickets), then ``drain`` (stop accepting) or ``metrics`` (this process's
counts, relay.smtpd.counts); the worker asks the master's listener to count the clients
that limits apply to (``RemoteCounts``: connections, rates, failed logins add up over all
processes, as Postfix's smtpd processes all ask one anvil).  SIGHUP reloads main.cf and
reopens the maillog; SIGTERM stops gracefully (commits in progress finish, other sessions
get 421).  It dies with the master (PR_SET_PDEATHSIG) and stops when its control socket
closes; the master stops the whole daemon when a worker dies, as when the queue manager
does.  A crash leaves the spool as spool.store says: nothing a client was told 250 about
is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from relay import clock as clock_mod
from relay import config as config_mod
from relay import log as maillog
from relay.anvil import Event
from relay.config import Config, ConfigError, ListenAddress
from relay.loop import die_with_parent, run_loop
from relay.smtpd import process, tickets
from relay.smtpd.counts import SmtpdCounts
from relay.smtpd.listener import Listener
from relay.smtpd.settings import smtpd_settings
from spool import Spool
from spool.fsync import Syncer
from spool.store import fault_hook_from

log = logging.getLogger("relay.smtpd")

SPOOL_THREADS = 16
ASK_TIMEOUT = 10.0  # seconds a worker waits for the master's count before giving up
KEYS = b"keys "
READY = b"ready"


class ChannelClosed(ConnectionError):
    """The other end of the control socket went away."""


class Channel:
    """One end of a control socket: questions (answered by the other end's handler),
    answers, and notices, each one packet.

    ``?ID TEXT`` asks, ``=ID TEXT`` answers, ``!TEXT`` tells.  ``handler(text)`` gets
    the other end's questions and notices and returns the answer to a question (it is
    ignored for a notice).  Packets that do not fit are kept in order and sent when
    the socket takes them."""

    def __init__(self, sock: socket.socket, handler: Callable[[bytes], bytes],
                 on_closed: Callable[[], None] = lambda: None) -> None:
        self.sock = sock
        self.handler = handler
        self.on_closed = on_closed
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._asked: dict[bytes, asyncio.Future[bytes]] = {}
        self._unsent: deque[bytes] = deque()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable)

    async def ask(self, text: bytes, timeout: float = ASK_TIMEOUT) -> bytes:
        """The other end's answer; ChannelClosed if it went away, TimeoutError."""
        if self.closed:
            raise ChannelClosed("control socket closed")
        key = str(next(self._ids)).encode()
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._asked[key] = future
        self._send(b"?" + key + b" " + text)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._asked.pop(key, None)

    def tell(self, text: bytes) -> None:
        self._send(b"!" + text)

    def _send(self, packet: bytes) -> None:
        if self.closed:
            return
        if self._unsent:
            self._unsent.append(packet)
            return
        try:
            self.sock.send(packet)
        except (BlockingIOError, InterruptedError):
            self._unsent.append(packet)
            self._loop.add_writer(self.sock.fileno(), self._writable)
        except OSError:
            self.close()

    def _writable(self) -> None:
        while self._unsent:
            try:
                self.sock.send(self._unsent[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            self._unsent.popleft()
        self._loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        while not self.closed:
            try:
                packet = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                packet = b""
            if not packet:
                self.close()
                return
            kind, rest = packet[:1], packet[1:]
            if kind == b"=":
                key, _, answer = rest.partition(b" ")
                future = self._asked.get(key)
                if future is not None and not future.done():
                    future.set_result(answer)
            elif kind == b"?":
                key, _, question = rest.partition(b" ")
                self._send(b"=" + key + b" " + self._answer(question))
            elif kind == b"!":
                self._answer(rest)

    def _answer(self, text: bytes) -> bytes:
        try:
            return self.handler(text)
        except Exception:
            log.exception("control socket: cannot answer %r", text[:40])
            return b"error"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
            self._loop.remove_writer(self.sock.fileno())
        self.sock.close()
        for future in self._asked.values():
            if not future.done():
                future.set_exception(ChannelClosed("control socket closed"))
        self.on_closed()


class RemoteCounts:
    """relay.smtpd.listener's SharedCounts in a worker: the master's listener counts."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def connected(self, address: str) -> tuple[int, int]:
        count, _, rate = (await self.channel.ask(b"connected " + _word(address))).partition(b" ")
        return int(count), int(rate)

    def disconnected(self, address: str) -> None:
        self.channel.tell(b"disconnected " + _word(address))

    async def over_rate(self, event: Event, address: str) -> int:
        answer = await self.channel.ask(b"rate " + event.value.encode() + b" " + _word(address))
        return int(answer)

    async def login_blocked(self, address: str) -> bool:
        return await self.channel.ask(b"blocked " + _word(address)) == b"1"

    def login_failed(self, address: str) -> None:
        self.channel.tell(b"failed " + _word(address))


def _word(address: str) -> bytes:
    """A client address as one word of a message (addresses have no white space; a
    scoped IPv6 address's zone might, in theory: it is cut there)."""
    return address.encode("ascii", "replace").split()[0] if address.strip() else b"-"


def answer_for(listener: Listener, text: bytes) -> bytes:
    """The master's answer to a worker's question or notice about its clients (the
    master's listener counts for every process)."""
    verb, _, rest = text.partition(b" ")
    if verb == b"connected":
        client = listener.client(rest.decode("ascii", "replace"))
        return b"%d %d" % (listener.connected(client.address), listener.connection_rate(client))
    if verb == b"disconnected":
        listener.disconnected(rest.decode("ascii", "replace"))
        return b""
    if verb == b"rate":
        name, _, address = rest.partition(b" ")
        event = Event(name.decode("ascii", "replace"))
        client = listener.client(address.decode("ascii", "replace"))
        return b"%d" % listener.over_rate(client, event, listener.event_limit(event))
    if verb == b"blocked":
        return b"1" if listener.logins.blocked(rest.decode("ascii", "replace")) else b"0"
    if verb == b"failed":
        listener.logins.anvil.record(Event.AUTH_FAILURE, rest.decode("ascii", "replace"))
        return b""
    raise ValueError(f"unknown question {verb!r}")


# ---- the worker process -----------------------------------------------------------------


class Worker:
    """The worker's own state, for its signal handlers and its control socket."""

    def __init__(self, config_dir: str | None, overrides: tuple[str, ...], cfg: Config,
                 listener: Listener, keys: bytes) -> None:
        self.config_dir = config_dir
        self.overrides = overrides
        self.cfg = cfg
        self.listener = listener
        self.keys = keys
        self.counts = SmtpdCounts()
        self.servers: list[asyncio.AbstractServer] = []
        self.stop = asyncio.Event()

    def on_master(self, text: bytes) -> bytes:
        if text == b"drain":
            for server in self.servers:
                server.close()
            return b"ok"
        if text == b"metrics":
            return self.counts.to_json()
        if text == b"reload":
            self.reload()
            return b"ok"
        raise ValueError(f"unknown request {text[:20]!r}")

    def reload(self) -> None:
        """SIGHUP: the maillog reopened, main.cf again (the master checked it too)."""
        maillog.reopen()
        try:
            cfg = config_mod.load(self.config_dir, strict=True, overrides=self.overrides)
            settings = smtpd_settings(cfg)
        except (ConfigError, ValueError) as exc:
            log.warning("reload failed, keeping the old configuration: %s", exc)
            return
        tickets.share(settings.tls_context, self.keys)
        old, self.cfg = self.cfg, cfg
        maillog.reconfigure(cfg, old)
        self.listener.reconfigure(settings)


async def _first_packet(sock: socket.socket, timeout: float = 30.0) -> bytes:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    return await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)


async def run(config_dir: str | None, cfg: Config, overrides: tuple[str, ...],
              control_fd: int, trigger_fd: int, listen: list[tuple[int, bool]],
              share: tuple[int, int]) -> int:
    loop = asyncio.get_running_loop()
    # Spool calls block in fsync(); enough threads let many sessions share one
    # directory fsync (group commit) instead of queueing behind each other.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=SPOOL_THREADS,
                                                 thread_name_prefix="spool"))
    control = socket.socket(fileno=control_fd)
    first = await _first_packet(control)
    if not first.startswith(KEYS):
        print("relay: fatal: listener worker: no keys from the master", file=sys.stderr)
        return 1
    keys = first[len(KEYS):]
    fault = fault_hook_from(os.environ.get("RELAY_FAULT", ""))
    try:
        spool = Spool(cfg.str("queue_directory"), long_ids=cfg.bool("enable_long_queue_ids"),
                      fault=fault, create=False, reuse_free=True, reuse_share=share)
        settings = smtpd_settings(cfg)
    except (OSError, ValueError) as exc:
        print(f"relay: fatal: listener worker: {exc}", file=sys.stderr, flush=True)
        return 1
    tickets.share(settings.tls_context, keys)
    trigger = socket.socket(fileno=trigger_fd)
    trigger.setblocking(False)
    link = process.QmgrLink(trigger)
    listener = Listener(spool, settings, on_queued=link.queued,
                        clock=clock_mod.from_environ(), flush_site=link.flush_site)
    worker = Worker(config_dir, overrides, cfg, listener, keys)
    listener.observe(worker.counts)
    syncer = listener.cleanup.syncer = Syncer()
    syncer.start()
    channel = Channel(control, worker.on_master, on_closed=worker.stop.set)
    listener.shared = RemoteCounts(channel)
    socks = []
    for fd, tls in listen:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        host, port = sock.getsockname()[:2]
        socks.append((ListenAddress(host, port, tls), sock))
    worker.servers = await process.serve(listener, socks)
    channel.tell(READY)
    loop.add_signal_handler(signal.SIGTERM, worker.stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the master decides
    loop.add_signal_handler(signal.SIGHUP, worker.reload)
    await worker.stop.wait()
    await process.shutdown(listener, worker.servers)
    syncer.close()
    channel.close()
    return 0


def main(argv: list[str]) -> int:
    """``relay smtpd-worker --parent PID --control-fd N --trigger-fd N --listen FD[/tls]...
    --share I/N [-c DIR] [-o NAME=VALUE]...``: internal, run by relay serve."""
    import argparse

    parser = argparse.ArgumentParser(prog="relay smtpd-worker")
    parser.add_argument("-c", dest="config_dir")
    parser.add_argument("-o", dest="overrides", action="append", default=[])
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--trigger-fd", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[], metavar="FD[/tls]")
    parser.add_argument("--share", required=True, metavar="I/N")
    ns = parser.parse_args(argv)
    die_with_parent(ns.parent)
    try:
        cfg = config_mod.load(ns.config_dir, strict=True, overrides=ns.overrides)
    except ConfigError as exc:
        print(f"relay: fatal: {exc}", file=sys.stderr)
        return 1
    try:
        maillog.setup(cfg.str("myhostname"), cfg.str("syslog_name"), cfg.str("maillog_file"),
                      facility=cfg.str("syslog_facility"))
    except maillog.LogError as exc:
        print(f"relay: fatal: maillog_file: {exc}", file=sys.stderr)
        return 1
    listen = [(int(item.partition("/")[0]), item.endswith("/tls")) for item in ns.listen]
    index, _, count = ns.share.partition("/")
    return run_loop(run(ns.config_dir, cfg, tuple(ns.overrides), ns.control_fd,
                        ns.trigger_fd, listen, (int(index), int(count))))
