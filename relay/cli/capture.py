"""``relay capture``: the captured mail (Maildirs that next hops name), for shell scripts and CI.

    relay capture [-c CONFIG_DIR] [--maildir DIR] ls [--json] [--match QUERY]
    relay capture [-c CONFIG_DIR] [--maildir DIR] show ID        (ID may be "latest")
    relay capture [-c CONFIG_DIR] [--maildir DIR] rm ID ...
    relay capture [-c CONFIG_DIR] [--maildir DIR] clear
    relay capture [-c CONFIG_DIR] [--maildir DIR] wait [--count N] [--timeout S] [--match QUERY]

The Maildirs are ``--maildir`` (repeatable), else those main.cf names: capture_maildir
(what ``relay serve --capture DIR`` sets), else every ``maildir:`` next hop of
default_transport, relayhost and transport_maps.  Messages are listed oldest first.
QUERY is Mailpit's search syntax (relay.capture): ``to:bob@example.com subject:"Reset"``.

``ls`` prints one line per message: ID, delivery time, envelope sender and recipient
(Return-Path and Delivered-To), subject
(``--json``: one Mailpit MessageSummary per line).  ``show`` prints the message as stored.
``wait`` returns as soon as COUNT messages match (printing their IDs), and exits 75 with a
message after TIMEOUT seconds otherwise.  It reads and removes files only, never talks to
the daemon; a crash leaves nothing half done (each removal is one unlink).

Exit status: 0; 1 for a message that is not there or a bad configuration; 64 for a usage
error; 75 when ``wait`` times out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from relay import capture
from relay import config as config_mod
from relay.cli.command import (
    EX_FATAL,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    Fatal,
    Parser,
    UsageError,
    run,
    write_bytes,
)
from relay.maildir import Captured

PROG = "relay capture"
POLL_SECONDS = 0.1


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="the captured mail, oldest first")
    p.add_argument("-c", dest="config_dir", metavar="CONFIG_DIR")
    p.add_argument("--maildir", action="append", default=[], metavar="DIR",
                   help="read this Maildir instead of the ones main.cf names")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND", parser_class=Parser)
    ls = sub.add_parser("ls", help="list the messages")
    ls.add_argument("--json", action="store_true", help="one Mailpit summary per line")
    ls.add_argument("--match", default="", metavar="QUERY")
    show = sub.add_parser("show", help="print a message as stored")
    show.add_argument("id", metavar="ID")
    rm = sub.add_parser("rm", help="remove messages")
    rm.add_argument("ids", nargs="+", metavar="ID")
    sub.add_parser("clear", help="remove every message")
    wait = sub.add_parser("wait", help="wait until messages are there")
    wait.add_argument("--count", type=int, default=1, metavar="N")
    wait.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    wait.add_argument("--match", default="", metavar="QUERY")
    return p


def maildirs_from_config(config_dir: str | None) -> list[str]:
    """The Maildirs main.cf's next hops name (capture_maildir first); ValueError if bad."""
    from relay.routing import router_for

    cfg = config_mod.load(config_mod.config_dir_from(config_dir), warn=lambda m: None)
    return router_for(cfg).maildirs()


def _matching(box: Captured, query: str) -> list[capture.View]:
    found = capture.load_all(box.entries())
    return [v for v in found if capture.matches(query, v)] if query else found


def _line(v: capture.View) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.delivered))
    # The envelope, as the delivery saw it (Return-Path and Delivered-To), else the header.
    rcpts = ", ".join(v.delivered_to) or ", ".join(a["Address"] for a in v.to + v.cc) or "-"
    sender = v.return_path if v.delivered_to else (v.sender[0]["Address"] if v.sender else "")
    return f"{v.id}  {when}  <{sender}> -> {rcpts}  {v.subject}"


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr

    def body() -> int:
        try:
            ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        except UsageError as exc:
            raise Fatal(str(exc), EX_USAGE) from None
        if ns.verb is None:
            raise Fatal("a command is needed: ls, show, rm, clear or wait", EX_USAGE)
        paths = [os.path.abspath(p) for p in ns.maildir]
        if not paths:
            try:
                paths = maildirs_from_config(ns.config_dir)
            except (config_mod.ConfigError, ValueError) as exc:
                raise Fatal(str(exc)) from None
        if not paths:
            raise Fatal("no Maildir: main.cf names none (capture_maildir, or a maildir: next "
                        "hop); give --maildir DIR")
        try:
            if ns.verb in ("ls", "wait"):
                capture.check_query(ns.match)
        except capture.BadQuery as exc:
            raise Fatal(f"--match: {exc}", EX_USAGE) from None
        try:
            return _run(ns, Captured(paths), out, err)
        except OSError as exc:
            raise Fatal(str(exc)) from None

    return run(PROG, body, stdout=out, stderr=err)


def _run(ns: argparse.Namespace, box: Captured, out: TextIO, err: TextIO) -> int:
    if ns.verb == "ls":
        out.writelines((json.dumps(v.summary()) if ns.json else _line(v)) + "\n"
                       for v in _matching(box, ns.match))
        return EX_OK
    if ns.verb == "show":
        raw = box.read(ns.id)
        if raw is None:
            raise Fatal(f"{ns.id}: no such message")
        write_bytes(raw, out)
        return EX_OK
    if ns.verb == "rm":
        status = EX_OK
        for message_id in ns.ids:
            if box.remove(message_id):
                out.write(f"{message_id}: removed\n")
            else:
                print(f"relay capture: {message_id}: no such message", file=err)
                status = EX_FATAL
        return status
    if ns.verb == "clear":
        removed = box.clear()
        out.write(f"{removed} message{'' if removed == 1 else 's'} removed\n")
        return EX_OK
    # wait
    end = time.monotonic() + ns.timeout
    while True:
        found = _matching(box, ns.match)
        if len(found) >= ns.count:
            out.writelines(v.id + "\n" for v in found)
            return EX_OK
        if time.monotonic() >= end:
            what = f" matching {ns.match!r}" if ns.match else ""
            print(f"relay capture: timeout: {len(found)} of {ns.count} message"
                  f"{'' if ns.count == 1 else 's'}{what} after {ns.timeout:g}s", file=err)
            return EX_TEMPFAIL
        time.sleep(POLL_SECONDS)
