"""postqueue and mailq: list the queue, or ask the daemon to flush it (postqueue(1)).

    postqueue [-v] [-c config_dir] -p         the sendmail-style listing (= mailq)
    postqueue [-v] [-c config_dir] -j         one JSON object per message
    postqueue [-v] [-c config_dir] -f         retry all deferred mail now
    postqueue [-v] [-c config_dir] -i queue_id   retry one message now
    postqueue [-v] [-c config_dir] -s site    retry mail for one destination now
    mailq [-v] [-c config_dir]                same as postqueue -p

The listings read the spool directly through :mod:`relay.cli.showq`, whether or not the
daemon runs (like Postfix's postqueue run by root with the mail system down, minus the
warning: reading the spool is our normal path, not a fallback).  The flush requests
only send one line to the daemon's control socket (``flush``, ``flush-id``,
``flush-site``), as Postfix's postqueue only writes a trigger to qmgr: this command
never moves or rewrites a queue file, so a crash leaves nothing behind.

Messages go to stderr as ``postqueue: fatal: ...``; exit status is sysexits: 0, 64 for
a usage error or a bad argument, 69 when the mail system is down, 1 for other fatal
errors (a bad main.cf, a missing queue directory), as Postfix's msg_fatal().
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from relay import config
from relay.cli import showq
from spool.store import valid_queue_id

EX_OK = 0
EX_FATAL = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69

USAGE = ("usage: postqueue -f | postqueue -i queueid | postqueue -j | postqueue -p"
         " | postqueue -s site")
MAILQ_USAGE = "usage: mailq [-v] [-c config_dir]"

# valid_hostname(): letters, digits, '-' and '_' in labels of at most 63, 255 in all.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


class _Fatal(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that reports like Postfix's getopt loop: one usage line, exit 64."""

    usage_line = USAGE

    def error(self, message: str) -> NoReturn:
        raise _Fatal(self.usage_line, EX_USAGE)


def _postqueue_parser() -> _Parser:
    p = _Parser(prog="postqueue", add_help=False)
    p.add_argument("-c", dest="config_dir", metavar="config_dir")
    p.add_argument("-f", dest="flush", action="count", default=0)
    p.add_argument("-i", dest="queue_ids", action="append", default=[], metavar="queue_id")
    p.add_argument("-j", dest="json", action="count", default=0)
    p.add_argument("-p", dest="listing", action="count", default=0)
    p.add_argument("-s", dest="sites", action="append", default=[], metavar="site")
    p.add_argument("-v", dest="verbose", action="count", default=0)
    return p


def _mailq_parser() -> _Parser:
    p = _Parser(prog="mailq", add_help=False)
    p.usage_line = MAILQ_USAGE
    p.add_argument("-c", dest="config_dir", metavar="config_dir")
    # Postfix's mailq is sendmail -bp, whose -C names the configuration (file or directory).
    p.add_argument("-C", dest="config_file", metavar="config_file")
    p.add_argument("-v", dest="verbose", action="count", default=0)
    return p


def _quoted(arg: str) -> str:
    """Postfix's ``"%.100s%s"`` of a rejected argument."""
    return f'"{arg[:100]}{"..." if len(arg) > 100 else ""}"'


def valid_site(site: str) -> bool:
    """postqueue -s syntax: a host name (not all numeric) or an address in brackets."""
    if site.startswith("["):
        if not site.endswith("]"):
            return False
        literal = site[1:-1]
        if literal[:5].lower() == "ipv6:":
            literal = literal[5:]
            version = 6
        else:
            version = 4
        try:
            return ipaddress.ip_address(literal).version == version
        except ValueError:
            return False
    if not site or len(site) > 255 or not site.isascii():
        return False
    labels = site.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return False
    # "numeric site must be [1.2.3.4]": a name needs at least one non-digit.
    return any(not label.isdigit() for label in labels)


def _load(config_dir: str | None) -> config.Config:
    try:
        return config.load(config.config_dir_from(config_dir, os.environ),
                           warn=lambda message: None)
    except config.ConfigError as exc:
        raise _Fatal(str(exc), EX_FATAL) from None


def _list(cfg: config.Config, json_format: bool, out: TextIO) -> int:
    try:
        spool = showq.open_spool(cfg)
        items = showq.records(spool)
        if json_format:
            showq.write(showq.json_records(items), out)
        else:
            showq.write(showq.sendmail_records(items, long_ids=spool.long_ids), out)
    except showq.NoQueueDirectory as exc:
        raise _Fatal(str(exc), EX_FATAL) from None
    except OSError as exc:
        raise _Fatal(f"scan {cfg.str('queue_directory')}: {exc.strerror or exc}",
                     EX_FATAL) from None
    return EX_OK


def _flush(cfg: config.Config, verb: str, *args: str) -> int:
    """Send one flush request; the daemon answers ``ok`` or ``error TEXT``."""
    # Imported here: asyncio, which the control client needs, would double the start-up
    # time of the listings.
    from relay.control import MailSystemDown, request

    try:
        reply = request(cfg.str("queue_directory"), verb, *args)
    except MailSystemDown:
        raise _Fatal("Cannot flush mail queue - mail system is down", EX_UNAVAILABLE) from None
    if reply == "ok":
        return EX_OK
    if args:  # the server refused this queue ID or site
        raise _Fatal(f"Invalid request: {_quoted(args[0])}", EX_USAGE)
    text = reply.removeprefix("error").strip() or "mail system is down"
    raise _Fatal(f"Cannot flush mail queue - {text}", EX_UNAVAILABLE)


def _run_postqueue(argv: list[str], out: TextIO) -> int:
    ns = _postqueue_parser().parse_args(argv)
    modes = sum(1 for given in (ns.flush, ns.json, ns.listing, ns.queue_ids, ns.sites) if given)
    # Postfix's getopt loop: each mode once (-i may repeat), exactly one mode.
    if modes != 1 or ns.flush > 1 or ns.json > 1 or ns.listing > 1 or len(ns.sites) > 1:
        raise _Fatal(USAGE, EX_USAGE)
    for queue_id in ns.queue_ids:
        if not valid_queue_id(queue_id):
            raise _Fatal(f"Cannot flush queue ID - invalid name: {_quoted(queue_id)}", EX_USAGE)
    for site in ns.sites:
        if not valid_site(site):
            raise _Fatal(f"Cannot flush mail queue - invalid destination: {_quoted(site)}",
                         EX_USAGE)
    cfg = _load(ns.config_dir)
    if ns.listing or ns.json:
        return _list(cfg, bool(ns.json), out)
    if ns.flush:
        return _flush(cfg, "flush")
    if ns.sites:
        return _flush(cfg, "flush-site", ns.sites[0])
    for queue_id in ns.queue_ids:
        _flush(cfg, "flush-id", queue_id)
    return EX_OK


def _run_mailq(argv: list[str], out: TextIO) -> int:
    ns, rest = _mailq_parser().parse_known_args(argv)
    if rest:
        if rest[0].startswith("-"):
            raise _Fatal(MAILQ_USAGE, EX_USAGE)
        raise _Fatal("display queue mode requires no recipient", EX_USAGE)
    config_dir = ns.config_dir
    if ns.config_file and not config_dir:
        path = ns.config_file
        config_dir = path if os.path.isdir(path) else os.path.dirname(path) or "."
    return _list(_load(config_dir), False, out)


def _main(prog: str, argv: Sequence[str] | None, stdout: TextIO | None,
          stderr: TextIO | None, runner: str) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out = showq.utf8_stdout() if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    try:
        if runner == "mailq":
            return _run_mailq(args, out)
        return _run_postqueue(args, out)
    except _Fatal as exc:
        out.flush()
        print(f"{prog}: fatal: {exc}", file=err)
        return exc.status


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """The ``postqueue`` command."""
    return _main("postqueue", argv, stdout, stderr, "postqueue")


def mailq_main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
               stderr: TextIO | None = None) -> int:
    """The ``mailq`` command: ``postqueue -p`` under sendmail's name."""
    return _main("mailq", argv, stdout, stderr, "mailq")


if __name__ == "__main__":
    sys.exit(main())
