"""``relay serve``: the listener in this process, the queue manager in a second one.

It owns start-up (configuration, logging, the spool and its lock, the ports), signals
(SIGTERM and SIGINT stop gracefully within 10 seconds, SIGHUP reloads main.cf and
reopens the maillog, both passed on to the queue manager), systemd's readiness
protocol (relay.sdnotify: READY=1 once it listens, RELOADING=1 and STOPPING=1) and
wiring: the listener hands each committed queue ID to
the queue manager process (relay.qmgrd) over a datagram socket at once, as
Postfix's cleanup triggers qmgr; two processes use two CPUs.  Both stay in one
process group; the queue manager dies with this process, and this process exits
with the queue manager's status when it dies.  It holds an exclusive lock on
``QUEUE_DIR/master.lock`` for its lifetime so two daemons never share a spool.  A
crash leaves the spool as spool.store describes and a stale pid file and control
socket, both replaced at the next start.

Every start-up failure an operator can cause (main.cf, the maillog, the queue
directory, a full disk, a port in use) is one ``relay: fatal: ...`` line on standard
error (and in the maillog when that is a file or syslog) and exit status 1, never a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relay import clock as clock_mod
from relay import config as config_mod
from relay import log as maillog
from relay import pidfile, sdnotify
from relay.check import Severity, spool_problems
from relay.config import Config, ConfigError
from relay.loop import run_loop
from relay.routing import router_for
from relay.settings import (
    client_tls,
    qmgr_settings,
    resolver_for,
    sasl_credentials,
    smtpd_settings,
)
from relay.smtpd import process, tickets
from relay.smtpd.listener import Listener
from relay.workers import Workers, WorkerStartError
from spool import Spool, SpoolError
from spool.fsync import Syncer
from spool.store import fault_hook_from

if TYPE_CHECKING:
    from relay.http.server import HttpServer

log = logging.getLogger("relay.master")

SHUTDOWN_GRACE = 5.0
SPOOL_THREADS = 16
AUTO_PROCESSES_MAX = 4  # relay_smtpd_processes = 0: one per CPU less one, at most this many


class StartupError(Exception):
    """relay serve cannot start; ``str()`` is the text of its one fatal line."""


def fatal_line(text: str) -> None:
    """``relay: fatal: TEXT`` on standard error, and in the maillog unless the maillog
    is standard error itself (one line, not two)."""
    root = logging.getLogger("relay")
    if any(getattr(h, "stream", None) is not sys.stderr for h in root.handlers):
        log.critical("%s", text)
    print(f"relay: fatal: {text}", file=sys.stderr, flush=True)


@dataclass
class Daemon:
    config_dir: str | None
    cfg: Config
    spool: Spool
    listener: Listener
    servers: list[asyncio.AbstractServer]
    qmgr: asyncio.subprocess.Process | None = None
    overrides: tuple[str, ...] = ()  # -o name=value, kept across reloads
    http: HttpServer | None = None
    draining: bool = False
    workers: Workers | None = None  # the other processes accepting mail
    _reloads: set[asyncio.Task[None]] = field(default_factory=set)

    def drain(self) -> None:
        """relay drain (through the queue manager): stop listening, so that a load
        balancer's health check sees the node go; sessions in progress finish."""
        if self.draining:
            return
        self.draining = True
        for server in self.servers:
            server.close()
        if self.workers is not None:
            self.workers.drain()
        if self.http is not None:
            self.http.ctx.accepting = False
        log.info("draining: no longer accepting mail on %s", _listening(self.cfg))
        sdnotify.notify("STATUS=draining: no longer accepting mail")

    def on_qmgr(self, sock: socket.socket) -> None:
        """What the queue manager says after "ready": ``drain``."""
        while True:
            try:
                data = sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if data == b"drain":
                self.drain()
            elif not data:
                return

    def reload(self) -> None:
        """SIGHUP: main.cf again, the maillog reopened (logrotate), the listener workers
        and the queue manager told; systemd hears RELOADING=1 and then READY=1.  The
        "reload" line is logged once every process that accepts mail runs on the new
        settings."""
        sdnotify.reloading()
        maillog.reopen()  # first, so that the lines about this reload are in the new file
        old = self.cfg
        try:
            reloaded = self._reload()
        except BaseException:
            self._reloaded(old, False)
            raise
        if reloaded and self.workers is not None and self.workers.workers:
            task = asyncio.get_running_loop().create_task(self._reload_workers(old))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)
        else:
            self._reloaded(old, reloaded)

    async def _reload_workers(self, old: Config) -> None:
        assert self.workers is not None
        try:
            await self.workers.reload()
        finally:
            self._reloaded(old, True)

    def _reloaded(self, old: Config, reloaded: bool) -> None:
        try:
            if reloaded:
                log.info("reload -- configuration %s", self.cfg.path or "(built-in defaults)")
                maillog.reconfigure(self.cfg, old)
        finally:
            if self.qmgr is not None and self.qmgr.returncode is None:
                self.qmgr.send_signal(signal.SIGHUP)
            sdnotify.ready(f"accepting mail on {_listening(self.cfg)}")

    def _reload(self) -> bool:
        try:
            cfg = config_mod.load(self.config_dir, strict=True, overrides=self.overrides)
            router_for(cfg)
            resolver_for(cfg)
            qmgr_settings(cfg)
            client_tls(cfg)
            smtpd = smtpd_settings(cfg)
        except (ConfigError, ValueError) as exc:
            log.warning("reload failed, keeping the old configuration: %s", exc)
            return False
        self.cfg = cfg
        if self.workers is not None:
            tickets.share(smtpd.tls_context, self.workers.keys)
        self.listener.reconfigure(smtpd)
        if self.http is not None:
            self.http.ctx.config = cfg
        return True


async def _start_qmgr(config_dir: str | None, overrides: tuple[str, ...],
                      sock: socket.socket) -> asyncio.subprocess.Process:
    """Start the queue manager process and wait until it serves its control socket."""
    # Not "-m": that would put the working directory first on sys.path, where a
    # directory named spool/ (a queue directory, say) would shadow the package.
    bootstrap = ("import sys; del sys.path[0]; from relay.cli.main import main; "
                 "sys.exit(main(sys.argv[1:]))")
    args = [sys.executable, "-c", bootstrap, "qmgr",
            "--trigger-fd", str(sock.fileno()), "--parent", str(os.getpid())]
    if config_dir is not None:
        args += ["-c", config_dir]
    for item in overrides:
        args += ["-o", item]
    # Only the main process speaks to systemd (NotifyAccess=main).
    env = {k: v for k, v in os.environ.items() if k != sdnotify.NOTIFY_SOCKET}
    return await asyncio.create_subprocess_exec(*args, pass_fds=(sock.fileno(),), env=env)


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


def _open_spool(cfg: Config) -> Spool:
    """The spool, created where missing; StartupError for one this process cannot use."""
    fault = fault_hook_from(os.environ.get("RELAY_FAULT", ""))
    root = cfg.str("queue_directory")
    # Looked at before creating anything, for a sentence better than makedirs' own ...
    errors = [p for p in spool_problems(root) if p.severity is Severity.ERROR]
    if errors:
        raise StartupError(errors[0].text)
    try:
        # Each process accepting mail takes its own share of the spare inodes.
        spool = Spool(root, long_ids=cfg.bool("enable_long_queue_ids"),
                      fault=fault, reuse_free=True, reuse_share=(0, smtpd_processes(cfg)))
    except OSError as exc:
        raise StartupError(f"queue_directory {os.path.abspath(root)}: cannot create "
                           f"{exc.filename or root}: {exc.strerror or exc}") from None
    # ... and after, for what creating left as it was (a file where a directory should be).
    errors = [p for p in spool_problems(spool.root) if p.severity is Severity.ERROR]
    if errors:
        raise StartupError(errors[0].text)
    return spool


async def run(config_dir: str | None, cfg: Config, overrides: tuple[str, ...] = (),
              ready_file: str | None = None) -> int:
    loop = asyncio.get_running_loop()
    # Spool calls block in fsync(); enough threads let many sessions share one
    # directory fsync (group commit) instead of queueing behind each other.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=SPOOL_THREADS,
                                                 thread_name_prefix="spool"))
    socks: list[tuple[Any, socket.socket]] = []
    try:
        spool = _open_spool(cfg)
        lock_fd = _lock_spool(spool.root)
        try:
            pidfile.write(spool.root)
            await asyncio.to_thread(spool.forget_linked_spares)
        except (OSError, SpoolError) as exc:
            os.close(lock_fd)
            raise StartupError(f"queue_directory {spool.root}: {_why(exc)}") from None
        try:
            for addr in cfg.listen_addresses():
                try:
                    socks.append((addr, _bind(addr.host, addr.port)))
                except OSError as exc:
                    if not _no_ipv6_loopback(addr.host, exc):
                        raise
                    # The default listens on [::1] beside 127.0.0.1 for clients that try
                    # ::1 first; a machine without IPv6 still gets its IPv4 listener.
                    log.warning("skipping [%s]:%d: %s (no IPv6 on this machine?)",
                                addr.host, addr.port, exc.strerror)
        except OSError as exc:
            os.close(lock_fd)
            for _, sock in socks:
                sock.close()
            raise StartupError(f"bind {addr.host} port {addr.port}: {_why(exc)}") from None
    except StartupError as exc:
        fatal_line(str(exc))
        return 1
    http_socks: list[socket.socket] = []
    if cfg.listen_addresses("http_listen"):
        from relay.http import server as http_server

        try:
            http_socks = http_server.bind(cfg.listen_addresses("http_listen"))
        except OSError as exc:
            fatal_line(f"bind http_listen {cfg.str('http_listen')}: {_why(exc)}")
            for _, sock in socks:
                sock.close()
            os.close(lock_fd)
            return 1

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    mine.setblocking(False)
    qmgr = await _start_qmgr(config_dir, overrides, theirs)
    theirs.close()
    if not await _wait_ready(mine, qmgr):
        # The queue manager said why on standard error, as one fatal line.
        log.critical("the queue manager did not start")
        with contextlib.suppress(ProcessLookupError):
            qmgr.kill()
        await qmgr.wait()
        for sock in [s for _, s in socks] + http_socks:
            sock.close()
        os.close(lock_fd)
        return 1
    link = process.QmgrLink(mine)

    clock = clock_mod.from_environ()
    count = smtpd_processes(cfg)
    keys = tickets.new_keys()
    settings = smtpd_settings(cfg)
    if count > 1:  # a client resumes its TLS session in whichever process it meets
        tickets.share(settings.tls_context, keys)
    listener = Listener(spool, settings, on_queued=link.queued, clock=clock,
                        flush_site=link.flush_site)
    syncer = listener.cleanup.syncer = Syncer()
    syncer.start()
    workers = Workers(count, config_dir, overrides, listener, keys)
    if http_socks:  # GET /metrics is served: count from the first connection on
        from relay import metrics

        listener_metrics = metrics.ListenerMetrics(
            spool, lambda: daemon.cfg.int("relay_metrics_domain_limit"))
        listener_metrics.workers = workers.metrics
        listener.observe(listener_metrics)
        metrics.install(listener_metrics)
    for _, sock in socks:
        sock.listen(process.LISTEN_BACKLOG)
    servers = await process.serve(listener, socks)
    for _, sock in socks:
        log.info("listening on %s", _sockname(sock))
    try:
        await workers.start(socks, mine)
    except WorkerStartError as exc:
        fatal_line(str(exc))
        workers.terminate()
        await process.shutdown(listener, servers)
        await workers.wait()
        await _stop_qmgr(qmgr)
        syncer.close()
        os.close(lock_fd)
        return 1
    daemon = Daemon(config_dir, cfg, spool, listener, servers, qmgr, overrides,
                    workers=workers)
    if http_socks:
        from relay.http.server import HttpContext, HttpServer

        daemon.http = HttpServer(HttpContext(spool, cfg), http_socks)
        await daemon.http.start()
    loop.add_reader(mine.fileno(), daemon.on_qmgr, mine)

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    capture = os.path.normpath(cfg.str("capture_maildir")) if cfg.str("capture_maildir") else ""
    started = (f"daemon started -- version {_version()}, configuration "
               f"{cfg.path or '(built-in defaults)'}, queue_directory {spool.root}, "
               f"maillog_file {_log_target(cfg)}, listening on "
               f"{_listening(cfg)}")
    if capture:
        started += f", capture mode: all mail to the Maildir {capture}, none leaves this machine"
    log.info("%s", started)
    if cfg.str("maillog_file"):  # a foreground operator (or the journal) sees it too
        print(f"relay: {started}", file=sys.stderr, flush=True)
    if ready_file:
        _write_ready_file(ready_file, [sock for _, sock in socks],
                          daemon.http.socks if daemon.http is not None else [])
    sdnotify.ready(f"accepting mail on {_listening(cfg)}")
    qmgr_task = loop.create_task(qmgr.wait())
    stop_task = loop.create_task(stop.wait())
    worker_task = loop.create_task(workers.exited())
    done, _ = await asyncio.wait({qmgr_task, stop_task, worker_task},
                                 return_when=asyncio.FIRST_COMPLETED)
    sdnotify.stopping()
    loop.remove_reader(mine.fileno())
    status = 0
    if qmgr_task in done:
        # The queue manager died: stop taking mail that nobody would deliver.  A
        # supervisor restarts the daemon; what was in active/ is scheduled again.
        status = _exit_status(qmgr.returncode)
        log.critical("the queue manager exited with status %s", qmgr.returncode)
    elif worker_task in done and worker_task.result()[1] != 0:
        # A listener worker died: the daemon stops as a whole, as Postfix's master
        # would not, but as relay does when its queue manager dies: a supervisor
        # restarts it (nothing a client was told 250 about is lost).
        index, code = worker_task.result()
        status = _exit_status(code)
        log.critical("listener worker %d exited with status %s", index, code)
    else:
        # SIGTERM, or a worker that stopped for one (a supervisor signals the whole
        # process group: each process stops gracefully).
        log.info("terminating on signal")
    worker_task.cancel()
    if daemon.http is not None:
        await daemon.http.stop()
    workers.terminate()
    await process.shutdown(listener, servers)
    await workers.wait()
    await _stop_qmgr(qmgr)
    syncer.close()
    stop_task.cancel()
    os.close(lock_fd)
    return status


def _exit_status(code: int | None) -> int:
    """A child's status as the daemon's: killed by a signal (a negative returncode), as
    a shell reports it."""
    code = code if code is not None else 1
    return code if code > 0 else (128 - code if code < 0 else 1)


def smtpd_processes(cfg: Config) -> int:
    """relay_smtpd_processes: processes accepting mail, the master's own included; 0 is
    one per CPU but the one the queue manager needs (a single process that delivers
    everything: with the listeners taking both CPUs of a 2-CPU machine it fell behind
    them, and 250 -> delivery went from 20 ms to seconds), at least one, at most
    AUTO_PROCESSES_MAX."""
    count = cfg.int("relay_smtpd_processes")
    if count <= 0:
        count = max(1, min(len(os.sched_getaffinity(0)) - 1, AUTO_PROCESSES_MAX))
    return count


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return str(exc)


def _address(addr: Any) -> str:
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    return f"{host}:{addr.port}{'/tls' if addr.tls else ''}"


def _listening(cfg: Config) -> str:
    smtp = " ".join(_address(a) for a in cfg.listen_addresses()) or "(no listener)"
    http = " ".join(_address(a) for a in cfg.listen_addresses("http_listen"))
    return f"{smtp}, http {http}" if http else smtp


def _log_target(cfg: Config) -> str:
    path = cfg.str("maillog_file")
    if path == maillog.SYSLOG:
        return f"syslog (facility {cfg.str('syslog_facility')})"
    return os.path.abspath(path) if path else "(standard error)"


async def _stop_qmgr(qmgr: asyncio.subprocess.Process) -> None:
    """Stop the queue manager (once every process accepting mail has stopped)."""
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


def _no_ipv6_loopback(host: str, exc: OSError) -> bool:
    """Whether binding ``host`` failed because this machine has no IPv6 loopback."""
    return host == "::1" and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_ready_file(path: str, smtpd: Sequence[socket.socket],
                      http: Sequence[socket.socket]) -> None:
    """``relay serve --ready-file``: where it listens (ports 0 resolved), once it does.

    Written to a temporary name and renamed, so whoever waits for it reads it whole.
    """
    data = {"pid": os.getpid(), "smtpd": [_sockname(s) for s in smtpd],
            "http": [_sockname(s) for s in http]}
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.write("\n")
    os.replace(tmp, path)


def _lock_spool(root: str) -> int:
    """master.lock, held for the daemon's life; StartupError if another daemon holds it."""
    try:
        return pidfile.lock(root)
    except pidfile.AlreadyRunning:
        raise StartupError(f"the mail system is already running on {root}") from None
    except OSError as exc:
        raise StartupError(f"queue_directory {root}: {_why(exc)}") from None


def _version() -> str:
    from relay import __version__

    return __version__


def setup_log(cfg: Config) -> None:
    """The maillog main.cf names; StartupError if it cannot be opened."""
    try:
        maillog.setup(cfg.str("myhostname"), cfg.str("syslog_name"), cfg.str("maillog_file"),
                      facility=cfg.str("syslog_facility"))
    except maillog.LogError as exc:
        raise StartupError(f"maillog_file: {exc}") from None


def serve(config_dir: str | None, overrides: Sequence[str] = (), *,
          capture: str | None = None, ready_file: str | None = None) -> int:
    """Load the configuration (fatal before listening on any error) and run.

    ``overrides`` are ``-o name=value`` settings that win over main.cf, as for Postfix's
    daemons.  ``capture``: ``relay serve --capture DIR``, every message to that Maildir
    whatever main.cf says (the setting capture_maildir, given on the command line).
    ``ready_file``: written once the daemon listens, with the addresses it listens on (see
    _write_ready_file), for a test fixture that asked for port 0.
    """
    if capture:
        overrides = (*overrides, f"capture_maildir={os.path.abspath(capture)}")
    try:
        cfg = config_mod.load(config_dir, strict=True, overrides=overrides)
    except ConfigError as exc:
        print(f"relay: fatal: {exc}", file=sys.stderr)
        return 1
    try:
        setup_log(cfg)
    except StartupError as exc:
        print(f"relay: fatal: {exc}", file=sys.stderr)
        return 1
    try:
        router_for(cfg)
        resolver_for(cfg)
        sasl_credentials(cfg)
        client_tls(cfg)
        smtpd_settings(cfg)
    except ValueError as exc:
        fatal_line(str(exc))
        return 1
    return run_loop(run(config_dir, cfg, tuple(overrides), ready_file))
