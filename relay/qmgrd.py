"""The queue manager process (Postfix's qmgr with its smtp clients), started by
``relay serve``: the scheduler, the control socket, and the trigger from the listener.

``relay serve`` runs the listener in one process and this in a second one, so that
accepting and delivering use two CPUs, as Postfix's smtpd and qmgr do.  The
listener writes each committed queue ID to a datagram socket (Postfix's qmgr
trigger fifo); a lost trigger costs nothing but latency, because a ``scan`` trigger
follows and the scheduler scans incoming/ at start and on every scan.  The other way,
this process writes ``ready`` once it serves, and ``drain`` when ``relay drain`` asks
the listener to stop accepting.

The process dies with its parent (PR_SET_PDEATHSIG): a supervisor's SIGKILL of the
daemon stops deliveries too.  SIGHUP reloads main.cf, SIGTERM stops gracefully.
A crash leaves the spool as relay.scheduler describes; the parent exits with the
same status, and the next start schedules what was in active/ again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from relay import accounting, control
from relay import clock as clock_mod
from relay import config as config_mod
from relay import log as maillog
from relay.config import Config, ConfigError
from relay.delivery import SMTPDelivery
from relay.loop import die_with_parent, run_loop
from relay.routing import router_for
from relay.scheduler import Scheduler
from relay.settings import qmgr_settings, report_settings, resolver_for, tls_planner
from relay.tls.report import TlsReports
from spool import Spool
from spool.fsync import Syncer
from spool.store import fault_hook_from

if TYPE_CHECKING:
    from relay.metrics import QmgrMetrics

log = logging.getLogger("relay.qmgr")

SHUTDOWN_GRACE = 5.0
THREADS = 8


class QmgrProcess:
    """What the queue manager process does around its Scheduler: it answers the control
    socket's requests and the listener's triggers by calling the scheduler, and reloads
    main.cf at SIGHUP (the scheduler's settings, routes and TLS, the maillog, the
    accounting log, the metrics).  The scheduling itself is relay.scheduler's."""

    def __init__(self, config_dir: str | None, cfg: Config, spool: Spool,
                 scheduler: Scheduler, overrides: tuple[str, ...] = (),
                 reports: TlsReports | None = None) -> None:
        self.config_dir = config_dir
        self.overrides = overrides
        self.cfg = cfg
        self.spool = spool
        self.scheduler = scheduler
        self.trigger: socket.socket | None = None  # to and from the listener
        self.accounting: accounting.AccountingLog | None = None
        self.metrics: QmgrMetrics | None = None
        self.reports = reports
        self._etrn: set[asyncio.Task[str]] = set()  # ETRN flushes under way (in threads)

    def reload(self) -> None:
        """SIGHUP: main.cf again, and the maillog and accounting log reopened (logrotate
        moved them)."""
        maillog.reopen()
        try:
            cfg = config_mod.load(self.config_dir, strict=True, overrides=self.overrides)
            router, resolver, settings = router_for(cfg), resolver_for(cfg), qmgr_settings(cfg)
            tls = tls_planner(cfg, resolver, self.spool)
        except (ConfigError, ValueError) as exc:
            log.warning("reload failed, keeping the old configuration: %s", exc)
            if self.accounting is not None:
                self.accounting.reopen()
            return
        old, self.cfg = self.cfg, cfg
        maillog.reconfigure(cfg, old)
        if self.metrics is not None:
            self.metrics.deliveries.set_limit(cfg.int("relay_metrics_domain_limit"))
        self._reopen_accounting(cfg.str("accounting_log"), old.str("accounting_log"))
        self.scheduler.reconfigure(settings, router, resolver, tls)
        if self.reports is not None:
            self.reports.dns = resolver
            self.reports.settings = report_settings(cfg)

    def _reopen_accounting(self, path: str, old_path: str) -> None:
        if path == old_path:
            if self.accounting is not None:
                self.accounting.reopen()
            return
        try:
            new = accounting.open_log(path)
        except accounting.AccountingError as exc:
            log.warning("cannot use the new accounting_log, keeping the old one: %s", exc)
            if self.accounting is not None:
                self.accounting.reopen()
            return
        observers = self.scheduler.observers
        if self.accounting is not None:
            observers.remove(self.accounting)
            self.accounting.close()
        self.accounting = new
        if new is not None:
            observers.append(new)

    async def on_control(self, verb: str, args: list[str]) -> str:
        sched = self.scheduler
        if verb == "flush":
            sched.flush()
        elif verb == "scan":
            sched.scan()
        elif verb == "flush-id":
            sched.flush_ids(args)
        elif verb == "flush-site":
            return await asyncio.to_thread(self.flush_site, args[0] if args else "")
        elif verb == "pauses":
            sched.reload_pauses()
        elif verb == "drain":
            self.drain()
        elif verb == "handoff":
            return self.handoff(args[0] if args else "")
        elif verb == "idle":
            return "ok yes" if sched.idle else "ok no"
        elif verb == "metrics":
            if self.metrics is None:
                return "error no metrics: http_listen is not set"
            # On the loop: the scheduler's state is read as it stands, and it is small.
            return "ok\n" + self.metrics.exposition()
        elif verb == "ping":
            pass
        else:
            return f"error unknown request: {verb}"
        return "ok"

    def drain(self) -> None:
        """relay drain: the listener stops accepting (told over the trigger socket, the
        one way this process speaks to it) and everything queued is tried now."""
        if self.trigger is not None:
            with contextlib.suppress(OSError):
                self.trigger.send(b"drain")
        log.info("draining: delivering what the queue holds")
        self.scheduler.flush()

    def handoff(self, target: str) -> str:
        """relay drain --to HOST:PORT: all queued mail to that peer relay from now on."""
        from relay.routing import RouteError, Transport, parse_next_hop

        # A peer is a host, never a domain to look up MX records for: always [host].
        if target.startswith("[") or not target:
            text = target
        elif target.count(":") == 1:
            host, _, port = target.partition(":")
            text = f"[{host}]:{port}"
        else:
            text = f"[{target}]"
        try:
            hop = parse_next_hop(text, "")
        except RouteError as exc:
            return f"error bad peer {target}: {exc}"
        if hop.transport is not Transport.SMTP:
            return f"error bad peer {target}"
        self.scheduler.hand_off(hop)
        return "ok"

    def flush_site(self, site: str) -> str:
        site = site.lower().strip("[]")
        if not site:
            return "error empty site"
        ids = [env.queue_id for _, env in self.spool.envelopes(("deferred",))
               if any(r.address.rpartition("@")[2].lower() == site for r in env.pending)]
        self.scheduler.flush_ids(ids)
        return "ok"

    def on_trigger(self, sock: socket.socket) -> None:
        """Queue IDs from the listener, one datagram per message; ``scan`` after a
        trigger was lost; ``etrn=SITE`` for a client's ETRN."""
        while True:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            for word in data.decode("ascii", "replace").split():
                if word == "scan":
                    self.scheduler.scan()
                elif word.startswith("etrn="):
                    task = asyncio.get_running_loop().create_task(
                        asyncio.to_thread(self.flush_site, word[len("etrn="):]))
                    self._etrn.add(task)
                    task.add_done_callback(self._etrn.discard)
                else:
                    self.scheduler.wakeup_id(word)


async def run(config_dir: str | None, cfg: Config, trigger_fd: int,
              overrides: tuple[str, ...] = ()) -> int:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=THREADS,
                                                 thread_name_prefix="qmgr"))
    fault = fault_hook_from(os.environ.get("RELAY_FAULT", ""))
    try:
        spool = Spool(cfg.str("queue_directory"), long_ids=cfg.bool("enable_long_queue_ids"),
                      fault=fault, retire_to_free=True)
        # One queue manager per spool, even for the moment an old one takes to die.
        lock_fd = os.open(os.path.join(spool.root, "qmgr.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        await asyncio.to_thread(fcntl.flock, lock_fd, fcntl.LOCK_EX)
        await asyncio.to_thread(spool.forget_kept_spares)
    except OSError as exc:
        # The listener checked the spool a moment ago; say what changed since.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"relay: fatal: queue manager: {where}{exc.strerror or exc}", file=sys.stderr,
              flush=True)
        return 1
    clock = clock_mod.from_environ()
    resolver = resolver_for(cfg)
    scheduler = Scheduler(spool, qmgr_settings(cfg), router_for(cfg), resolver,
                          SMTPDelivery(), clock=clock, tls=tls_planner(cfg, resolver, spool))
    scheduler.syncer = Syncer()
    scheduler.syncer.start()
    reports = TlsReports(spool, report_settings(cfg), resolver, clock=clock.time)
    scheduler.tls_events = reports.record
    qmgr = QmgrProcess(config_dir, cfg, spool, scheduler, overrides, reports)
    try:
        qmgr.accounting = accounting.open_log(cfg.str("accounting_log"))
    except accounting.AccountingError as exc:
        print(f"relay: fatal: accounting_log: {exc}", file=sys.stderr, flush=True)
        scheduler.syncer.close()
        return 1
    if qmgr.accounting is not None:
        scheduler.observers.append(qmgr.accounting)
    if cfg.listen_addresses("http_listen"):  # /metrics is served: count
        from relay.metrics import QmgrMetrics

        qmgr.metrics = QmgrMetrics(scheduler, cfg.int("relay_metrics_domain_limit"))
        scheduler.observers.append(qmgr.metrics)
    try:
        ctl = await control.serve(spool.root, qmgr.on_control)
    except OSError as exc:
        print(f"relay: fatal: queue manager: control socket in {spool.root}: "
              f"{exc.strerror or exc}", file=sys.stderr, flush=True)
        scheduler.syncer.close()
        return 1
    trigger = socket.socket(fileno=trigger_fd)
    trigger.setblocking(False)
    qmgr.trigger = trigger
    loop.add_reader(trigger.fileno(), qmgr.on_trigger, trigger)

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the parent decides
    loop.add_signal_handler(signal.SIGHUP, qmgr.reload)
    sched_task = loop.create_task(scheduler.run())
    report_task = loop.create_task(reports.run(
        lambda: qmgr.cfg.bool("smtp_tlsrpt_enable"), scheduler.wakeup))
    with contextlib.suppress(OSError):
        trigger.send(b"ready")
    stop_task = loop.create_task(stop.wait())
    done, _ = await asyncio.wait({sched_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if sched_task in done and sched_task.exception():
        log.critical("scheduler failed: %r", sched_task.exception())
        status = 1
    loop.remove_reader(trigger.fileno())
    ctl.close()
    await scheduler.stop(grace=SHUTDOWN_GRACE)
    report_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await report_task  # its counts are written on the way out
    sched_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await sched_task
    scheduler.syncer.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(spool.root, control.SOCKET_NAME))
    os.close(lock_fd)
    return status


def main(argv: list[str]) -> int:
    """``relay qmgr --trigger-fd N --parent PID [-c DIR] [-o NAME=VALUE]...``: internal,
    run by relay serve (``-o``: its command-line settings, such as --capture's)."""
    import argparse

    parser = argparse.ArgumentParser(prog="relay qmgr")
    parser.add_argument("-c", dest="config_dir")
    parser.add_argument("-o", dest="overrides", action="append", default=[])
    parser.add_argument("--trigger-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
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
    return run_loop(run(ns.config_dir, cfg, ns.trigger_fd, tuple(ns.overrides)))
