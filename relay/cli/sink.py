"""``relay sink``: a capturing, fault-injecting SMTP server (relay.sink), like Postfix's
smtp-sink but scriptable from a file.

    relay sink [--listen HOST:PORT] [--maildir DIR] [--script FILE] [--ready-file FILE] [-q]

It listens on ``--listen`` (default 127.0.0.1:2526; port 0 takes a free port, which
``--ready-file`` reports as JSON once it listens), stores every message it accepts into
``--maildir`` (one file per recipient; without it, accepted mail is dropped), and meets
mail with the faults of ``--script`` (TOML, or JSON for a name ending in ``.json``; see
relay.faults for the rules).  It logs one line per event to standard error unless ``-q``.
SIGHUP reads the script again (a bad one keeps the old); SIGTERM and SIGINT stop it.

It never relays and never touches a spool; a crash loses the sessions in progress, and
what it had accepted is in the Maildir already (relay.sink).

Exit status: 0 after a signal; 1 when it cannot listen; 64 for a bad argument or script.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from relay import faults
from relay.cli.command import EX_OK, EX_USAGE, Fatal, Parser, UsageError, run
from relay.sink import Sink, write_ready_file

PROG = "relay sink"


def _listen(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {text!r}: HOST:PORT or [IPV6]:PORT expected")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    p = Parser(prog=PROG, description="a scriptable SMTP sink with faults")
    p.add_argument("--listen", default="127.0.0.1:2526", metavar="HOST:PORT")
    p.add_argument("--maildir", metavar="DIR", help="store accepted mail in this Maildir")
    p.add_argument("--script", metavar="FILE", help="the faults (TOML, or JSON: *.json)")
    p.add_argument("--ready-file", metavar="FILE",
                   help="once listening, write the address (port 0 resolved) as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="log nothing")
    try:
        ns = p.parse_args(list(sys.argv[1:] if argv is None else argv))
        host, port = _listen(ns.listen)
        script = faults.load(ns.script) if ns.script else faults.Script()
    except (UsageError, faults.ScriptError) as exc:
        raise Fatal(str(exc), EX_USAGE) from None
    if not ns.quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("relay sink: %(message)s"))
        logger = logging.getLogger("relay.sink")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    maildir = os.path.abspath(ns.maildir) if ns.maildir else None
    try:
        return asyncio.run(_serve(Sink(script, maildir, host=host, port=port), ns.script,
                                  ns.ready_file))
    except OSError as exc:
        raise Fatal(f"listen {ns.listen}: {exc.strerror or exc}") from None


async def _serve(sink: Sink, script_path: str | None, ready_file: str | None) -> int:
    await sink.start()
    if ready_file:
        write_ready_file(ready_file, sink.address)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        if not script_path:
            return
        try:
            sink.script = faults.load(script_path)
            print(f"relay sink: reloaded {script_path}", file=sys.stderr)
        except faults.ScriptError as exc:
            print(f"relay sink: warning: keeping the old script: {exc}", file=sys.stderr)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    await sink.stop()
    return EX_OK
