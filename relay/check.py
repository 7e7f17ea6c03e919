"""What ``relay check`` and the daemon's start-up look at before mail is taken (Postfix's
``postfix check``): the configuration, the spool's directories and permissions, the
free space, the maillog and the accounting log, the listening ports.

Each check returns the problems it found as ``Problem`` records, one sentence each;
nothing here creates or repairs anything, and nothing needs the daemon, so ``relay
check`` can run before the first start (a queue directory that does not exist yet is
fine when relay may create it).  ``relay serve`` stops at the first error of
``spool_problems`` after creating the spool, with that sentence as its fatal line.
``main()`` is ``relay check``: one ``relay: error: ...`` or ``relay: warning: ...``
line per problem, exit 1 if there was an error.  It lives beside the daemon, not among
the commands in relay/cli/, because it asks relay.settings what ``relay serve`` would
refuse (TLS files, tables, relay restrictions) and so imports what the daemon imports.
Nothing is written, so a crash leaves nothing behind.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from relay import config as config_mod
from relay import log as maillog
from relay import pidfile
from relay.cli.command import EX_FATAL, EX_OK, EX_USAGE, Fatal, Parser, UsageError, run
from relay.config import Config, ConfigError

# Every directory a spool has (spool.store's layout), the queue manager's and the
# listener's files in it.
SPOOL_DIRS = ("tmp", "data", "free", "incoming", "active", "deferred", "hold", "corrupt")
SPOOL_FILES = (pidfile.LOCK_NAME, pidfile.PID_NAME, "qmgr.lock", "paused")


class Severity(enum.Enum):
    ERROR = "error"  # relay serve would fail, or lose mail
    WARNING = "warning"  # it runs, but not as the operator meant


@dataclass(frozen=True, slots=True)
class Problem:
    severity: Severity
    text: str


def _error(text: str) -> Problem:
    return Problem(Severity.ERROR, text)


def _warning(text: str) -> Problem:
    return Problem(Severity.WARNING, text)


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _writable_dir(path: str) -> str | None:
    """Why ``path`` cannot be a directory we create files in, or None."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {_strerror(exc)}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return f"{path}: permission denied (mode {stat.S_IMODE(st.st_mode):04o}, " \
               f"owner uid {st.st_uid}; relay runs as uid {os.geteuid()})"
    return None


def spool_problems(root: str) -> list[Problem]:
    """The queue directory and its subdirectories: each a directory this process can
    use, owned like the queue directory, writable by nobody else.  A queue directory
    that does not exist yet is fine if relay may create it."""
    root = os.path.abspath(root)
    if not os.path.lexists(root):
        base = _existing_ancestor(root)
        why = _writable_dir(base)
        if why is not None:
            return [_error(f"queue_directory {root} cannot be created: {why}")]
        return []
    why = _writable_dir(root)
    if why is not None:
        return [_error(f"queue_directory {why}")]
    owner = os.stat(root).st_uid
    problems: list[Problem] = []
    for name in ("", *SPOOL_DIRS):
        path = os.path.join(root, name) if name else root
        if name:
            if not os.path.lexists(path):
                continue  # created at start
            why = _writable_dir(path)
            if why is not None:
                problems.append(_error(f"queue_directory {why}"))
                continue
        st = os.stat(path)
        if st.st_uid != owner:
            problems.append(_warning(f"{path} is owned by uid {st.st_uid}, "
                                     f"the queue directory by uid {owner}"))
        if stat.S_IMODE(st.st_mode) & 0o022:
            problems.append(_warning(f"{path} is group or world writable "
                                     f"(mode {stat.S_IMODE(st.st_mode):04o})"))
    for name in SPOOL_FILES:
        path = os.path.join(root, name)
        if os.path.lexists(path) and not os.access(path, os.R_OK | os.W_OK):
            problems.append(_error(f"{path}: permission denied"))
    return problems


def space_problems(cfg: Config) -> list[Problem]:
    """Free space and inodes where the spool is (or will be): Postfix's smtpd wants
    queue_minfree and 1.5 times message_size_limit free before it takes a message."""
    root = _existing_ancestor(cfg.str("queue_directory"))
    try:
        st = os.statvfs(root)
    except OSError as exc:
        return [_error(f"statvfs {root}: {_strerror(exc)}")]
    free = st.f_bavail * st.f_frsize
    need = max(cfg.int("queue_minfree"), cfg.int("message_size_limit") * 3 // 2)
    problems: list[Problem] = []
    if free < need:
        problems.append(_error(
            f"queue_directory {cfg.str('queue_directory')}: {free} bytes free, less than "
            f"{need} (queue_minfree, 1.5 x message_size_limit): mail would be refused"))
    if st.f_files and st.f_favail == 0:
        problems.append(_error(f"queue_directory {cfg.str('queue_directory')}: no free inodes"))
    return problems


def maillog_problems(cfg: Config) -> list[Problem]:
    """Whether maillog_file can be opened as relay serve opens it (syslog: its socket)."""
    path = cfg.str("maillog_file")
    if path == maillog.SYSLOG:
        try:
            handler = maillog.handler_for("localhost", "relay", path, cfg.str("syslog_facility"))
        except maillog.LogError as exc:
            return [_error(f"maillog_file = syslog: {exc}")]
        handler.close()
        return []
    return _appendable("maillog_file", path)


def accounting_problems(cfg: Config) -> list[Problem]:
    """Whether accounting_log can be opened for appending, in an existing directory."""
    path = cfg.str("accounting_log")
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return [_error(f"accounting_log {path}: {os.path.dirname(os.path.abspath(path))} "
                       f"is not a directory")]
    return _appendable("accounting_log", path)


def _appendable(name: str, path: str) -> list[Problem]:
    if not path:
        return []
    if os.path.isdir(path):
        return [_error(f"{name} {path} is a directory")]
    if os.path.lexists(path):
        if not os.access(path, os.W_OK):
            return [_error(f"{name} {path}: permission denied")]
        return []
    why = _writable_dir(_existing_ancestor(os.path.dirname(os.path.abspath(path))))
    if why is not None:
        return [_error(f"{name} {path} cannot be created: {why}")]
    return []


def port_problems(cfg: Config) -> list[Problem]:
    """Each smtpd_listen and http_listen address bindable now (skipped while the daemon runs: its own
    ports are in use then)."""
    if pidfile.running(cfg.str("queue_directory")) is not None:
        return []
    problems: list[Problem] = []
    for name, addr in [*(("smtpd_listen", a) for a in cfg.listen_addresses()),
                       *(("http_listen", a) for a in cfg.listen_addresses("http_listen"))]:
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((addr.host, addr.port))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                why = "no such local address"
            else:
                why = _strerror(exc)
            problems.append(_error(f"{name}: bind {addr.host} port {addr.port}: {why}"))
        except UnicodeError:
            problems.append(_error(f"{name}: bad host name {addr.host}"))
    return problems


def settings_problems(cfg: Config) -> list[Problem]:
    """What relay serve would refuse before it listens: TLS files, password files,
    tables, relay restrictions (relay.settings raises ValueError for each)."""
    from relay.routing import router_for
    from relay.settings import (
        qmgr_settings,
        resolver_for,
        sasl_credentials,
        smtpd_settings,
    )

    problems: list[Problem] = []
    for build in (router_for, resolver_for, sasl_credentials, smtpd_settings, qmgr_settings):
        try:
            build(cfg)
        except (ValueError, OSError) as exc:
            problems.append(_error(str(exc)))
    return problems


def problems(config_dir: str | None, overrides: Sequence[str] = ()) -> Iterator[Problem]:
    """Every problem ``relay check`` reports, in the order an operator fixes them."""
    warnings: list[str] = []
    try:
        cfg = config_mod.load(config_dir, warn=warnings.append, overrides=overrides)
    except ConfigError as exc:
        yield _error(str(exc))
        return
    for text in warnings:
        yield _warning(text)
    yield from settings_problems(cfg)
    yield from spool_problems(cfg.str("queue_directory"))
    yield from space_problems(cfg)
    yield from maillog_problems(cfg)
    yield from accounting_problems(cfg)
    yield from port_problems(cfg)


def main(argv: Sequence[str]) -> int:
    """``relay check [-c DIR] [-o name=value ...]``: 0 if nothing is wrong (warnings
    allowed), else 1."""
    return run("relay", lambda: _main(list(argv)))


def _main(args: list[str]) -> int:
    parser = Parser(
        prog="relay check",
        description="check main.cf, the spool, its free space, the maillog and the ports")
    parser.add_argument("-c", dest="config_dir", metavar="CONFIG_DIR")
    parser.add_argument("-o", dest="overrides", metavar="NAME=VALUE", action="append",
                        default=[], help="override a main.cf parameter, as relay serve -o")
    try:
        ns = parser.parse_args(args)
    except UsageError as exc:
        usage = parser.format_usage().strip().removeprefix("usage: ")
        raise Fatal(f"{exc}; usage: {usage}", EX_USAGE) from None
    status = EX_OK
    for problem in problems(config_mod.config_dir_from(ns.config_dir), ns.overrides):
        print(f"relay: {problem.severity.value}: {problem.text}", file=sys.stderr)
        if problem.severity is Severity.ERROR:
            status = EX_FATAL
    return status
