"""The ``relay`` command: ``relay serve`` runs the daemon; other subcommands administer it.

Every subcommand takes ``-c CONFIG_DIR`` and honours MAIL_CONFIG, as Postfix's
commands do.  Exit codes are sysexits: 0, 64 usage, 69 unavailable, 75 temporary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from relay.cli.command import EX_USAGE
from relay.config import config_dir_from


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the relay in the foreground")
    serve.add_argument("-c", dest="config_dir", metavar="CONFIG_DIR")
    sub.add_parser("queue", help="inspect and act on the queue (relay queue --help)",
                   add_help=False)
    sub.add_parser("passwd", help="add or change an SMTP AUTH user", add_help=False)
    sub.add_parser("tls", help="TLS policy of a domain, TLS reports (relay tls --help)",
                   add_help=False)
    if args and args[0] == "queue":
        from relay.cli import queue

        return queue.main(args[1:])
    if args and args[0] == "qmgr":  # internal: the queue manager process of relay serve
        from relay import qmgrd

        return qmgrd.main(args[1:])
    if args and args[0] == "tls":
        from relay.cli import tls

        return tls.main(args[1:])
    if args and args[0] == "passwd":
        from relay.cli import passwd

        return passwd.main(args[1:])
    ns = parser.parse_args(args)
    if ns.command == "serve":
        from relay import daemon

        return daemon.serve(config_dir_from(ns.config_dir))
    parser.print_usage(sys.stderr)
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
