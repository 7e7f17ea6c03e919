"""``relay serve``: the listener in this process, the queue manager in a second one.

It owns start-up (configuration, logging, the spool lock), signals (SIGTERM and
SIGINT stop gracefully within 10 seconds, SIGHUP reloads main.cf, both passed on
to the queue manager) and wiring: the listener hands each committed queue ID to
the queue manager process (relay.qmgrd) over a datagram socket at once, as
Postfix's cleanup triggers qmgr; two processes use two CPUs.  Both stay in one
process group; the queue manager dies with this process, and this process exits
with the queue manager's status when it dies.  It holds an exclusive lock on
``QUEUE_DIR/master.lock`` for its lifetime so two daemons never share a spool.  A
crash leaves the spool as spool.store describes and a stale pid file and control
socket, both replaced at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay import clock as clock_mod
from relay import config as config_mod
from relay import log as maillog
from relay.config import Config, ConfigError
from relay.loop import run_loop
from relay.settings import (
    client_tls,
    qmgr_settings,
    resolver_for,
    router_for,
    sasl_credentials,
    smtpd_settings,
)
from relay.smtpd.listener import Listener
from spool import Envelope, Spool
from spool.fsync import Syncer
from spool.store import fault_hook_from

if TYPE_CHECKING:
    from relay.http.server import HttpServer

log = logging.getLogger("relay.master")

SHUTDOWN_GRACE = 5.0
SPOOL_THREADS = 16


class QmgrLink:
    """The listener's end of the trigger socket to the queue manager process."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lost = False  # a trigger did not fit: send "scan" when there is room
        self.retrying = False

    def queued(self, env: Envelope) -> None:
        self.send(env.queue_id.encode("ascii"))

    def flush_site(self, site: str) -> bool:
        """ETRN: the queue manager retries the deferred mail for ``site`` now (Postfix's
        flush service); a trigger that does not fit is lost, as a flush may be."""
        try:
            self.sock.send(b"etrn=" + site.encode("ascii", "replace"))
        except OSError:
            return False
        return True

    def send(self, data: bytes) -> None:
        try:
            if self.lost:
                self.sock.send(b"scan")
                self.lost = False
            if data:
                self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            self.lost = True
            if not self.retrying:  # one timer, however many triggers did not fit
                self.retrying = True
                asyncio.get_running_loop().call_later(0.1, self.retry)
        except OSError:
            pass  # the qmgr is gone; the daemon is stopping

    def retry(self) -> None:
        self.retrying = False
        if self.lost:
            self.send(b"")


@dataclass
class Daemon:
    config_dir: str | None
    cfg: Config
    spool: Spool
    listener: Listener
    servers: list[asyncio.AbstractServer]
    qmgr: asyncio.subprocess.Process | None = None
    http: HttpServer | None = None

    def reload(self) -> None:
        try:
            cfg = config_mod.load(self.config_dir)
            router_for(cfg)
            resolver_for(cfg)
            qmgr_settings(cfg)
            client_tls(cfg)
            smtpd = smtpd_settings(cfg)
        except (ConfigError, ValueError) as exc:
            log.warning("reload failed, keeping the old configuration: %s", exc)
            return
        self.cfg = cfg
        self.listener.reconfigure(smtpd)
        if self.http is not None:
            self.http.ctx.config = cfg
        if self.qmgr is not None and self.qmgr.returncode is None:
            self.qmgr.send_signal(signal.SIGHUP)
        log.info("reload -- configuration %s", cfg.path or "(built-in defaults)")


async def _start_qmgr(config_dir: str | None, sock: socket.socket) -> asyncio.subprocess.Process:
    """Start the queue manager process and wait until it serves its control socket."""
    # Not "-m": that would put the working directory first on sys.path, where a
    # directory named spool/ (a queue directory, say) would shadow the package.
    bootstrap = ("import sys; del sys.path[0]; from relay.cli.main import main; "
                 "sys.exit(main(sys.argv[1:]))")
    args = [sys.executable, "-c", bootstrap, "qmgr",
            "--trigger-fd", str(sock.fileno()), "--parent", str(os.getpid())]
    if config_dir is not None:
        args += ["-c", config_dir]
    return await asyncio.create_subprocess_exec(*args, pass_fds=(sock.fileno(),))


async def _wait_ready(sock: socket.socket, proc: asyncio.subprocess.Process,
                      timeout: float = 60.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end and proc.returncode is None:
        try:
            if sock.recv(64) == b"ready":
                return True
        except (BlockingIOError, InterruptedError):
            await asyncio.sleep(0.01)
    return False


async def run(config_dir: str | None, cfg: Config) -> int:
    loop = asyncio.get_running_loop()
    # Spool calls block in fsync(); enough threads let many sessions share one
    # directory fsync (group commit) instead of queueing behind each other.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=SPOOL_THREADS,
                                                 thread_name_prefix="spool"))
    fault = fault_hook_from(os.environ.get("RELAY_FAULT", "") or cfg.str("fault_injection"))
    spool = Spool(cfg.str("queue_directory"), long_ids=cfg.bool("enable_long_queue_ids"),
                  fault=fault, reuse_free=True)
    lock_fd = _lock_spool(spool.root)
    if lock_fd is None:
        log.critical("the mail system is already running on %s", spool.root)
        print(f"relay: fatal: the mail system is already running on {spool.root}",
              file=sys.stderr)
        return 1
    _write_pid(spool.root)
    await asyncio.to_thread(spool.forget_linked_spares)

    socks: list[tuple[Any, socket.socket]] = []
    try:
        for addr in cfg.listen_addresses():
            socks.append((addr, _bind(addr.host, addr.port)))
    except OSError as exc:
        log.critical("bind %s port %s: %s", addr.host, addr.port, exc.strerror)
        for _, sock in socks:
            sock.close()
        return 1
    http_socks: list[socket.socket] = []
    if cfg.listen_addresses("http_listen"):
        from relay.http import server as http_server

        try:
            http_socks = http_server.bind(cfg.listen_addresses("http_listen"))
        except OSError as exc:
            log.critical("bind http_listen %s: %s", cfg.str("http_listen"), exc.strerror)
            for _, sock in socks:
                sock.close()
            return 1

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    mine.setblocking(False)
    qmgr = await _start_qmgr(config_dir, theirs)
    theirs.close()
    if not await _wait_ready(mine, qmgr):
        log.critical("the queue manager did not start")
        with contextlib.suppress(ProcessLookupError):
            qmgr.kill()
        return 1
    link = QmgrLink(mine)

    clock = clock_mod.from_environ()
    listener = Listener(spool, smtpd_settings(cfg), on_queued=link.queued, clock=clock,
                        flush_site=link.flush_site)
    syncer = listener.cleanup.syncer = Syncer()
    syncer.start()
    servers: list[asyncio.AbstractServer] = []
    for addr, sock in socks:
        sock.listen(512)
        if addr.tls:  # implicit TLS (port 465 style): the handshake comes first
            server = await loop.create_server(
                functools.partial(listener.factory, implicit_tls=True), sock=sock,
                ssl=listener.settings.tls_context,
                ssl_handshake_timeout=listener.settings.timeout)
        else:
            server = await loop.create_server(listener.factory, sock=sock)
        servers.append(server)
        log.info("listening on %s:%d", addr.host, addr.port)
    daemon = Daemon(config_dir, cfg, spool, listener, servers, qmgr)
    if http_socks:
        from relay.http.server import HttpContext, HttpServer

        daemon.http = HttpServer(HttpContext(spool, cfg), http_socks)
        await daemon.http.start()

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    log.info("daemon started -- version %s, configuration %s", _version(),
             cfg.path or "(built-in defaults)")
    qmgr_task = loop.create_task(qmgr.wait())
    stop_task = loop.create_task(stop.wait())
    done, _ = await asyncio.wait({qmgr_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if qmgr_task in done:
        # The queue manager died: stop taking mail that nobody would deliver.  A
        # supervisor restarts the daemon; what was in active/ is scheduled again.
        # Killed by a signal (a negative returncode): exit as a shell reports it.
        code = qmgr.returncode if qmgr.returncode is not None else 1
        status = code if code > 0 else (128 - code if code < 0 else 1)
        log.critical("the queue manager exited with status %s", qmgr.returncode)
    else:
        log.info("terminating on signal")
    if daemon.http is not None:
        await daemon.http.stop()
    await _shutdown(listener, servers, qmgr)
    syncer.close()
    stop_task.cancel()
    os.close(lock_fd)
    return status


async def _shutdown(listener: Listener, servers: Sequence[asyncio.AbstractServer],
                    qmgr: asyncio.subprocess.Process) -> None:
    """Stop listening, let commits in progress finish, 421 the rest, stop the qmgr."""
    listener.shutting_down = True
    for server in servers:
        server.close()
    loop = asyncio.get_running_loop()
    end = loop.time() + 3.0
    while listener.committing and loop.time() < end:
        await asyncio.sleep(0.02)
    listener.shutdown_sessions()
    if qmgr.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            qmgr.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(qmgr.wait(), timeout=SHUTDOWN_GRACE + 1.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                qmgr.kill()
            await qmgr.wait()


def _bind(host: str, port: int) -> socket.socket:
    """A bound socket; the caller listens once the queue manager is up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _lock_spool(root: str) -> int | None:
    fd = os.open(os.path.join(root, "master.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _write_pid(root: str) -> None:
    tmp = os.path.join(root, "master.pid.tmp")
    with open(tmp, "w") as f:
        f.write(f"{os.getpid():>10}\n")
    os.replace(tmp, os.path.join(root, "master.pid"))


def _version() -> str:
    from relay import __version__

    return __version__


def serve(config_dir: str | None) -> int:
    """Load the configuration (fatal before listening on any error) and run."""
    try:
        cfg = config_mod.load(config_dir)
    except ConfigError as exc:
        print(f"relay: fatal: {exc}", file=sys.stderr)
        return 1
    maillog.setup(cfg.str("myhostname"), cfg.str("syslog_name"), cfg.str("maillog_file"))
    try:
        router_for(cfg)
        resolver_for(cfg)
        sasl_credentials(cfg)
        client_tls(cfg)
        smtpd_settings(cfg)
    except ValueError as exc:
        print(f"relay: fatal: {exc}", file=sys.stderr)
        return 1
    return run_loop(run(config_dir, cfg))
