"""postconf: print relay's main.cf parameters, the way Postfix's postconf(1) does.

    postconf [-dhnx] [-c config_dir] [name ...]

With no name, every parameter is printed, sorted by name, as ``name = value``
(``name =`` when the value is empty); with names, those, in the order given.  Values are
printed as written in main.cf, ``$name`` and all; ``-x`` expands them.  ``-n`` limits the
output to parameters set in main.cf, ``-d`` prints built-in defaults instead (main.cf is
not read), ``-h`` prints values without ``name = ``.  The configuration directory is
``-c``, else $MAIL_CONFIG, else there is none and only defaults apply.

This command only reads: it never edits main.cf (Postfix's ``-e`` is not implemented),
never touches the spool or the daemon, so a crash leaves nothing behind.

Exit status: 0, also after ``warning: NAME: unknown parameter`` (as Postfix); 1 after
``postconf: fatal: <message>`` for a configuration error; 64 for a usage error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from relay import config
from relay.cli.command import EX_FATAL, EX_OK, EX_USAGE, Fatal, Parser, UsageError, run

USAGE = "usage: postconf [-dhnx] [-c config_dir] [name ...]"


def _parser() -> Parser:
    # add_help=False: -h is Postfix's "value only", not help.
    p = Parser(prog="postconf", add_help=False)
    p.add_argument("-c", dest="config_dir", metavar="config_dir")
    p.add_argument("-d", dest="defaults", action="store_true")
    p.add_argument("-h", dest="value_only", action="store_true")
    p.add_argument("-n", dest="explicit_only", action="store_true")
    p.add_argument("-x", dest="expand", action="store_true")
    p.add_argument("names", nargs="*")
    return p


def format_line(name: str, value: str, *, value_only: bool = False) -> str:
    """One output line: ``name = value``, ``name =`` when empty, or the value alone."""
    if value_only:
        return value
    return f"{name} = {value}" if value else f"{name} ="


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    env = os.environ if environ is None else environ
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr

    def warn(message: str) -> None:
        print(f"postconf: warning: {message}", file=err)

    def body() -> int:
        try:
            args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
            if args.defaults and args.explicit_only:
                raise UsageError("-d and -n cannot be used together")
        except UsageError as e:
            raise Fatal(USAGE, EX_USAGE, before=[f"fatal: {e}"]) from None
        try:
            if args.defaults:
                cfg = config.defaults(environ=env)
            else:
                cfg = config.load(config.config_dir_from(args.config_dir, env), environ=env,
                                  warn=warn)
        except config.ConfigError as e:
            raise Fatal(str(e), EX_FATAL) from None

        names: list[str] = list(args.names) or list(cfg.names())
        lines: list[str] = []
        for name in names:
            if name not in cfg.values:
                warn(f"{name}: unknown parameter")
                continue
            if args.explicit_only and name not in cfg.settings:
                continue
            value = cfg.raw(name) if args.expand else cfg.unexpanded(name)
            lines.append(format_line(name, value, value_only=args.value_only))
        # "postconf | head": the reader is gone, which is not an error (run()).
        out.write("".join(line + "\n" for line in lines))
        out.flush()
        return EX_OK

    return run("postconf", body, stdout=out, stderr=err)


if __name__ == "__main__":
    sys.exit(main())
