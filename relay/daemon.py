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
import ssl
import sys
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from relay import clock as clock_mod
from relay import config as config_mod
from relay import log as maillog
from relay.auth import PasswordFile, PasswordFileError, password_file_path
from relay.config import Config, ConfigError
from relay.delivery import DeliverySettings
from relay.listener import Listener, SmtpdSettings, check_relay_restrictions
from relay.outcome import Policy
from relay.routing import Resolver, Router, open_table
from relay.scheduler import QmgrSettings
from spool import Envelope, Spool
from spool.fsync import Syncer
from spool.store import fault_hook_from

log = logging.getLogger("relay.master")

SHUTDOWN_GRACE = 5.0
SPOOL_THREADS = 16


def smtpd_settings(cfg: Config) -> SmtpdSettings:
    return SmtpdSettings(
        myhostname=cfg.str("myhostname"),
        banner=cfg.str("smtpd_banner"),
        mynetworks=cfg.network_matcher("mynetworks"),
        relay_domains=cfg.list("relay_domains"),
        message_size_limit=cfg.int("message_size_limit"),
        queue_minfree=cfg.int("queue_minfree"),
        recipient_limit=cfg.int("smtpd_recipient_limit"),
        timeout=cfg.time("smtpd_timeout"),
        connection_count_limit=cfg.int("smtpd_client_connection_count_limit"),
        bare_newline=_bare_newline(cfg.str("smtpd_forbid_bare_newline")),
        mail_name=cfg.str("mail_name"),
        **_smtpd_security(cfg),
    )


def _smtpd_security(cfg: Config) -> dict[str, Any]:
    """The listener's TLS, AUTH, relay-control and abuse-limit settings.  ValueError for
    a configuration that must not run: an unloadable certificate, TLS required without
    one, AUTH without a readable password file, relay restrictions that cannot refuse."""
    restrictions = cfg.list("smtpd_relay_restrictions")
    check_relay_restrictions(restrictions)
    level = cfg.str("smtpd_tls_security_level") or "none"
    tls = smtpd_tls_context(cfg)
    if tls is None and (level != "none" or any(a.tls for a in cfg.listen_addresses())):
        raise ValueError("TLS is required (smtpd_tls_security_level or a /tls listener) "
                         "but smtpd_tls_cert_file is not set")
    passwords = None
    if cfg.bool("smtpd_sasl_auth_enable"):
        path = password_file_path(cfg.str("smtpd_sasl_password_file"), cfg.path)
        if not path:
            raise ValueError("smtpd_sasl_auth_enable = yes needs smtpd_sasl_password_file")
        passwords = PasswordFile(path)
        try:
            passwords.load()
        except PasswordFileError as exc:
            raise ValueError(f"smtpd_sasl_password_file: {exc}") from None
    return {
        "tls_context": tls,
        "tls_security_level": level,
        "tls_auth_only": cfg.bool("smtpd_tls_auth_only"),
        "sasl_auth_enable": passwords is not None,
        "passwords": passwords,
        "auth_failure_delay": cfg.time("smtpd_auth_failure_delay"),
        "relay_restrictions": restrictions,
        "allow_untrusted_routing": cfg.bool("allow_untrusted_routing"),
        "connection_rate_limit": cfg.int("smtpd_client_connection_rate_limit"),
        "message_rate_limit": cfg.int("smtpd_client_message_rate_limit"),
        "recipient_rate_limit": cfg.int("smtpd_client_recipient_rate_limit"),
        "anvil_rate_time_unit": cfg.time("anvil_rate_time_unit"),
        "event_limit_exceptions": cfg.network_matcher("smtpd_client_event_limit_exceptions"),
        "hard_error_limit": cfg.int("smtpd_hard_error_limit"),
        "hopcount_limit": cfg.int("hopcount_limit"),
        "session_time_limit": cfg.time("smtpd_session_time_limit"),
        "greet_wait": cfg.time("postscreen_greet_wait"),
        "forbid_unauth_pipelining": cfg.bool("smtpd_forbid_unauth_pipelining"),
        "proxy_protocol": cfg.str("smtpd_upstream_proxy_protocol"),
        "proxy_timeout": cfg.time("smtpd_upstream_proxy_timeout"),
    }


def smtpd_tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The server TLS context from smtpd_tls_cert_file and smtpd_tls_key_file (the key
    may be in the certificate file, as Postfix allows); None if no certificate is set."""
    cert = cfg.str("smtpd_tls_cert_file")
    if not cert:
        return None
    key = cfg.str("smtpd_tls_key_file") or cert
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load certificate {cert} and key {key}: {exc}") from None
    return context


def _bare_newline(value: str) -> str:
    return {"yes": "normalize", "normalize": "normalize", "reject": "reject"}.get(value, "no")


def sasl_credentials(cfg: Config) -> object:
    maps = cfg.list("smtp_sasl_password_maps")
    tables = [open_table(spec) for spec in maps]

    def lookup(label: str, target: object) -> tuple[str, str] | None:
        host = getattr(target, "hostname", "")
        port = getattr(target, "port", 25)
        address = getattr(target, "address", "")
        keys = [label, f"[{host}]:{port}", f"{host}:{port}", f"[{host}]", host,
                f"[{address}]:{port}", f"[{address}]"]
        for table in tables:
            for key in keys:
                value = table.get(key) if key else None
                if value:
                    user, _, password = value.partition(":")
                    return user, password
        return None

    return lookup


def qmgr_settings(cfg: Config) -> QmgrSettings:
    tls = cfg.str("smtp_tls_security_level") or "none"
    delivery = DeliverySettings(
        helo_name=cfg.str("myhostname"),
        connect_timeout=cfg.time("smtp_connect_timeout"),
        helo_timeout=cfg.time("smtp_helo_timeout"),
        mail_timeout=cfg.time("smtp_mail_timeout"),
        rcpt_timeout=cfg.time("smtp_rcpt_timeout"),
        data_init_timeout=cfg.time("smtp_data_init_timeout"),
        data_xfer_timeout=cfg.time("smtp_data_xfer_timeout"),
        data_done_timeout=cfg.time("smtp_data_done_timeout"),
        quit_timeout=cfg.time("smtp_quit_timeout"),
        starttls_timeout=cfg.time("smtp_starttls_timeout"),
        tls_level=tls,
        tls_ca_file=cfg.str("smtp_tls_CAfile"),
        sasl_enable=cfg.bool("smtp_sasl_auth_enable"),
        sasl_credentials=sasl_credentials(cfg),  # type: ignore[arg-type]
        send_dummy_mail_auth=cfg.bool("smtp_send_dummy_mail_auth"),
        line_length_limit=cfg.int("smtp_line_length_limit"),
        connection_reuse_time_limit=cfg.time("smtp_connection_reuse_time_limit"),
        connection_cache_time_limit=cfg.time("smtp_connection_cache_time_limit"),
    )
    return QmgrSettings(
        myhostname=cfg.str("myhostname"),
        mail_name=cfg.str("mail_name"),
        queue_run_delay=cfg.time("queue_run_delay"),
        active_limit=cfg.int("qmgr_message_active_limit"),
        recipient_limit=cfg.int("default_destination_recipient_limit"),
        concurrency_limit=cfg.int("default_destination_concurrency_limit"),
        initial_concurrency=cfg.int("initial_destination_concurrency"),
        process_limit=cfg.int("default_process_limit"),
        failed_cohort_limit=float(cfg.int("default_destination_concurrency_failed_cohort_limit")),
        policy=Policy(
            minimal_backoff_time=cfg.time("minimal_backoff_time"),
            maximal_backoff_time=cfg.time("maximal_backoff_time"),
            maximal_queue_lifetime=cfg.time("maximal_queue_lifetime"),
            bounce_queue_lifetime=cfg.time("bounce_queue_lifetime"),
            delay_warning_time=cfg.time("delay_warning_time"),
        ),
        delivery=delivery,
    )


def self_addresses(cfg: Config) -> list[tuple[str, int]]:
    return [(a.host, a.port) for a in cfg.listen_addresses()]


def router_for(cfg: Config) -> Router:
    return Router(cfg.list("transport_maps"), cfg.str("relayhost"))


def resolver_for(cfg: Config) -> Resolver:
    return Resolver(
        nameservers=cfg.list("dns_nameservers"),
        myhostname=cfg.str("myhostname"),
        self_addresses=self_addresses(cfg),
        mx_address_limit=cfg.int("smtp_mx_address_limit"),
    )


class QmgrLink:
    """The listener's end of the trigger socket to the queue manager process."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lost = False  # a trigger did not fit: send "scan" when there is room
        self.retrying = False

    def queued(self, env: Envelope) -> None:
        self.send(env.queue_id.encode("ascii"))

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

    def reload(self) -> None:
        try:
            cfg = config_mod.load(self.config_dir)
            router_for(cfg)
            resolver_for(cfg)
            qmgr_settings(cfg)
            smtpd = smtpd_settings(cfg)
        except (ConfigError, ValueError) as exc:
            log.warning("reload failed, keeping the old configuration: %s", exc)
            return
        self.cfg = cfg
        self.listener.reconfigure(smtpd)
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
    listener = Listener(spool, smtpd_settings(cfg), on_queued=link.queued, clock=clock)
    listener.syncer = Syncer()
    listener.syncer.start()
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
    await _shutdown(listener, servers, qmgr)
    listener.syncer.close()
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
    for session in list(listener.sessions):
        await session.shutdown()
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
        smtpd_settings(cfg)
    except ValueError as exc:
        print(f"relay: fatal: {exc}", file=sys.stderr)
        return 1
    return run_loop(run(config_dir, cfg))


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run a daemon process's main coroutine on uvloop where installed; its exit status."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return int(runner(main))
    except KeyboardInterrupt:
        return 0

