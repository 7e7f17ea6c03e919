"""``relay status``, ``relay reload``, ``relay stop``: the running daemon, as ``postfix
status``, ``postfix reload`` and ``postfix stop`` see it; and ``relay drain``, which takes
a node out of a fleet.

Whether ``relay serve`` runs on a spool is its master.lock (relay.pidfile), its PID
is master.pid; ``reload`` sends it SIGHUP (main.cf again, the maillog reopened) and
``stop`` SIGTERM, then waits until the lock is free: the daemon's own graceful stop
takes at most ten seconds, and after ``--timeout`` (15 s) it is killed, as postfix
stop does after five.  A SIGKILL loses no mail: the spool is crash-safe.  Messages
and statuses are postfix-script's: ``the mail system is running: PID: N`` (0), ``the
mail system is not running`` (1).

``relay drain [--to HOST:PORT]`` asks the queue manager (control socket) to make the
listener stop accepting, so that a load balancer's health check takes the node out, and
to try everything queued now; it waits until the queue manager is idle and says what is
left.  With ``--to``, it then has every queued message sent to that peer relay instead of
its own route, each kept until the peer said 250 (a refusal defers it, never bounces
it), and waits again: exit 0 once nothing is left but mail on hold, 75 if some is.  The
node stays out of rotation until it is restarted.  Nothing here writes a queue file; it
only counts them, through spool.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence

from relay import config as config_mod
from relay import control, pidfile
from relay.cli.command import (
    EX_FATAL,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    Fatal,
    Parser,
    UsageError,
    run,
)
from relay.config import ConfigError
from spool import Spool

STOP_TIMEOUT = 15.0
DRAIN_TIMEOUT = 600.0


def _say(text: str) -> None:
    print(f"relay: {text}", file=sys.stderr, flush=True)


def _queue_directory(config_dir: str | None) -> str:
    try:
        cfg = config_mod.load(config_mod.config_dir_from(config_dir),
                              warn=lambda m: _say(f"warning: {m}"))
    except ConfigError as exc:
        raise Fatal(str(exc)) from None
    return cfg.str("queue_directory")


def _running(queue_directory: str) -> int:
    pid = pidfile.running(queue_directory)
    if pid is None:
        raise Fatal("the mail system is not running")
    if pid <= 0:
        raise Fatal(f"the mail system is running on {queue_directory}, but its "
                    f"{pidfile.PID_NAME} cannot be read")
    return pid


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise Fatal("the mail system is not running") from None
    except PermissionError:
        raise Fatal(f"cannot send {sig.name} to PID {pid}: Operation not permitted") from None


def _alive(pid: int) -> bool:
    """Whether the process still runs (a zombie its parent has not reaped has ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[-1].split()
        return fields[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def status(ns: argparse.Namespace) -> int:
    pid = pidfile.running(_queue_directory(ns.config_dir))
    if pid is None:
        _say("the mail system is not running")
        return EX_FATAL
    _say(f"the mail system is running: PID: {pid or 'unknown'}")
    return EX_OK


def reload(ns: argparse.Namespace) -> int:
    pid = _running(_queue_directory(ns.config_dir))
    _say("refreshing the mail system")
    _signal(pid, signal.SIGHUP)
    return EX_OK


def stop(ns: argparse.Namespace) -> int:
    root = _queue_directory(ns.config_dir)
    pid = _running(root)
    _say("stopping the mail system")
    _signal(pid, signal.SIGTERM)
    end = time.monotonic() + ns.timeout
    next_word = time.monotonic() + 1.0
    while pidfile.running(root) is not None or _alive(pid):
        now = time.monotonic()
        if now >= end:
            _say("warning: stopping the mail system with force")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return EX_OK
            while _alive(pid) and time.monotonic() < end + 5:
                time.sleep(0.05)
            return EX_OK
        if now >= next_word:
            _say("waiting for the mail system to terminate")
            next_word = now + 1.0
        time.sleep(0.05)
    return EX_OK


def _ask(root: str, verb: str, *args: str) -> str:
    try:
        reply = control.request(root, verb, *args)
    except control.MailSystemDown as exc:
        raise Fatal(f"the mail system is not running: {exc}") from None
    if not reply.startswith("ok"):
        raise Fatal(reply.removeprefix("error ") or f"no answer to {verb}")
    return reply


def _wait_idle(root: str, end: float) -> bool:
    """Until the queue manager has nothing in hand (True) or time is up (False)."""
    while time.monotonic() < end:
        if _ask(root, "idle") == "ok yes":
            return True
        time.sleep(0.2)
    return False


def _count(spool: Spool, *queues: str) -> int:
    return sum(1 for queue in queues for _ in spool.queue_ids(queue))


_PEER = re.compile(r"(?:\[[^\[\]]+\]|[^\[\]:\s]+)(?::\d{1,5})?\Z")


def drain(ns: argparse.Namespace) -> int:
    if ns.to is not None and not _PEER.match(ns.to):
        raise Fatal(f"--to {ns.to}: expected HOST:PORT, [HOST]:PORT or HOST")
    root = _queue_directory(ns.config_dir)
    _running(root)
    spool = Spool(root, create=False)
    end = time.monotonic() + ns.timeout
    _ask(root, "drain")
    _say("draining: no longer accepting mail; delivering what the queue holds")
    if not _wait_idle(root, end):
        _say(f"warning: draining: still delivering after {ns.timeout:g}s")
        return EX_TEMPFAIL
    if ns.to:
        waiting = _count(spool, "incoming", "active", "deferred")
        _say(f"draining: handing {waiting} queued messages to {ns.to}")
        _ask(root, "handoff", ns.to)
        if not _wait_idle(root, end):
            _say(f"warning: draining: still handing mail to {ns.to} after {ns.timeout:g}s")
            return EX_TEMPFAIL
    left = _count(spool, "incoming", "active", "deferred")
    held = _count(spool, "hold")
    if held:
        _say(f"warning: draining: {held} messages on hold stay here (postsuper -H releases)")
    if not left:
        _say("drained: no mail left in the queue" + (" but on hold" if held else ""))
        return EX_OK
    if ns.to:
        _say(f"warning: draining: {left} messages are still queued: {ns.to} did not take "
             f"them yet (mailq says why); they go on being offered to it")
        return EX_TEMPFAIL
    _say(f"draining: {left} messages deferred; relay drain --to HOST:PORT hands them to a "
         f"peer")
    return EX_OK


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "status": ("whether the mail system is running, and its PID", status),
    "reload": ("re-read main.cf and reopen the maillog (SIGHUP)", reload),
    "stop": ("stop the mail system gracefully, and wait", stop),
    "drain": ("stop accepting mail, deliver what is queued, or hand it to a peer (--to)",
              drain),
}


def main(command: str, argv: Sequence[str]) -> int:
    """``relay COMMAND [-c DIR] ...``; the exit status (a Fatal as ``relay: fatal: ...``)."""
    return run("relay", lambda: _main(command, list(argv)))


def _main(command: str, args: list[str]) -> int:
    help_text, body = COMMANDS[command]
    parser = Parser(prog=f"relay {command}", description=help_text)
    parser.add_argument("-c", dest="config_dir", metavar="CONFIG_DIR")
    if command == "stop":
        parser.add_argument("--timeout", type=float, default=STOP_TIMEOUT, metavar="SECONDS",
                            help="then kill it (default %(default)s)")
    if command == "drain":
        parser.add_argument("--to", metavar="HOST:PORT",
                            help="hand queued mail to this peer relay over SMTP")
        parser.add_argument("--timeout", type=float, default=DRAIN_TIMEOUT, metavar="SECONDS",
                            help="stop waiting after this long (default %(default)s)")
    try:
        ns = parser.parse_args(args)
    except UsageError as exc:
        usage = parser.format_usage().strip().removeprefix("usage: ")
        raise Fatal(f"{exc}; usage: {usage}", EX_USAGE) from None
    return body(ns)
