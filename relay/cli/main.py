"""The ``relay`` command: ``relay serve`` runs the daemon; other subcommands administer it.

Every subcommand takes ``-c CONFIG_DIR`` and honours MAIL_CONFIG, as Postfix's
commands do.  Exit codes are sysexits: 0, 64 usage, 69 unavailable, 75 temporary.

It only dispatches: each subcommand's module is imported when it is asked for (so that,
say, ``relay status`` never loads the daemon), and nothing here reads or writes a file,
so a crash leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from relay import __version__
from relay.cli import service
from relay.cli.command import EX_USAGE
from relay.config import config_dir_from


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    serve = sub.add_parser("serve", help="run the relay in the foreground")
    serve.add_argument("-c", dest="config_dir", metavar="CONFIG_DIR")
    serve.add_argument("-o", dest="overrides", metavar="NAME=VALUE", action="append",
                       default=[], help="override a main.cf parameter (repeatable)")
    serve.add_argument("--capture", metavar="MAILDIR",
                       help="deliver every message to this Maildir; none leaves the machine")
    serve.add_argument("--ready-file", metavar="FILE",
                       help="once listening, write the addresses (ports 0 resolved) as JSON")
    for name, (text, _) in service.COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    sub.add_parser("check", help="check main.cf, the spool, free space, the maillog, the ports",
                   add_help=False)
    sub.add_parser("queue", help="inspect and act on the queue (relay queue --help)",
                   add_help=False)
    sub.add_parser("passwd", help="add or change an SMTP AUTH user", add_help=False)
    sub.add_parser("capture", help="the captured mail (relay capture --help)", add_help=False)
    sub.add_parser("sink", help="a scriptable SMTP sink with faults (relay sink --help)",
                   add_help=False)
    sub.add_parser("tls", help="TLS policy of a domain, TLS reports (relay tls --help)",
                   add_help=False)
    if args and args[0] == "queue":
        from relay.cli import queue

        return queue.main(args[1:])
    if args and args[0] == "qmgr":  # internal: the queue manager process of relay serve
        from relay import qmgrd

        return qmgrd.main(args[1:])
    if args and args[0] == "smtpd-worker":  # internal: a listener worker of relay serve
        from relay import workers

        return workers.worker_main(args[1:])
    if args and args[0] in service.COMMANDS:
        return service.main(args[0], args[1:])
    if args and args[0] == "check":  # the daemon's own start-up checks, run now
        from relay import check

        return check.main(args[1:])
    if args and args[0] == "capture":
        from relay.cli import capture

        return capture.main(args[1:])
    if args and args[0] == "sink":
        from relay.cli import sink

        return sink.main(args[1:])
    if args and args[0] == "tls":
        from relay.cli import tls

        return tls.main(args[1:])
    if args and args[0] == "passwd":
        from relay.cli import passwd

        return passwd.main(args[1:])
    ns = parser.parse_args(args)
    if ns.command == "serve":
        from relay import daemon

        return daemon.serve(config_dir_from(ns.config_dir), ns.overrides,
                            capture=ns.capture, ready_file=ns.ready_file)
    parser.print_usage(sys.stderr)
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
