"""What every command shares: exit statuses, the fatal error, option parsing, a closed pipe.

Each of ``postqueue``, ``mailq``, ``postsuper``, ``postcat``, ``qshape``, ``postconf``,
``sendmail``, ``relay queue`` and ``relay passwd`` reports the way Postfix's commands do:

* ``PROG: fatal: TEXT`` on standard error and a non-zero exit, raised anywhere as
  :class:`Fatal` and printed once by :func:`run`; a Postfix command may print lines
  before it (getopt's own complaint, ``PROG: invalid option -- 'x'``, has no level);
* the exit statuses are sysexits(3), with 1 for Postfix's plain ``msg_fatal()``;
* options are read as Postfix reads them, by :func:`getopt`: glibc's getopt(3) with
  Postfix's ``+`` (options end at the first operand), a bad one reported by
  :func:`parse_options` as Postfix reports it; relay's own commands, qshape (a Perl
  script in Postfix) and postconf use an :class:`argparse.ArgumentParser` that raises
  instead of exiting (:class:`Parser`);
* a reader that goes away (``mailq | head``) ends the output quietly, with status 0,
  where SIGPIPE would end a Postfix command (:func:`run`, :func:`silence_stdout`).

What each command answers, and with which status, stays in its own module; this one
owns only the mechanics.  It never reads the spool or talks to the daemon, and writes
nothing but to standard output and error: a crash leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any, NoReturn, TextIO

# sysexits(3), and msg_fatal()'s plain 1.
EX_OK = 0
EX_FATAL = 1
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78


class Fatal(Exception):
    """``PROG: fatal: MESSAGE``, exit ``status``; the ``before`` lines come first, as
    ``PROG: LINE`` each (getopt's complaint before Postfix's usage line)."""

    def __init__(self, message: str, status: int = EX_FATAL, *,
                 before: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.before = tuple(before)


class UsageError(Exception):
    """A bad command line, in the words of getopt(3) or argparse; each command turns it
    into its own Fatal (the usage line, the status)."""


def getopt(args: Sequence[str], optstring: str) -> tuple[list[tuple[str, str]], list[str]]:
    """glibc's getopt(3) as Postfix calls it (``GETOPT()`` adds ``+``): the options as
    (letter, argument or ""), then the operands.

    Options end at the first operand or at ``--``; ``-`` is an operand.  Flags may be
    grouped (``-fv``); an option's argument is the rest of its word or the next word,
    whatever that looks like (``postqueue -i -f`` names the queue ID ``-f``).  A bad
    option raises UsageError with getopt's words, which Postfix prints before its usage
    line: ``invalid option -- 'x'``, ``option requires an argument -- 'i'``.
    """
    opts: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        i += 1
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            where = optstring.find(letter)
            if letter in ":+" or where < 0:
                raise UsageError(f"invalid option -- '{letter}'")
            if optstring[where + 1:where + 2] != ":":
                opts.append((letter, ""))
                continue
            if j < len(arg):
                opts.append((letter, arg[j:]))
            elif i < len(args):
                opts.append((letter, args[i]))
                i += 1
            else:
                raise UsageError(f"option requires an argument -- '{letter}'")
            break
    return opts, list(args[i:])


def parse_options(args: Sequence[str], optstring: str, usage: str, status: int = EX_FATAL
                  ) -> tuple[list[tuple[str, str]], list[str]]:
    """getopt(), a bad option reported as Postfix's commands report it: getopt's line,
    then ``PROG: fatal: USAGE``, exit ``status`` (a Fatal)."""
    try:
        return getopt(args, optstring)
    except UsageError as exc:
        raise Fatal(usage, status, before=[str(exc)]) from None


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError with its message instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def run(prog: str, body: Callable[[], int], *, stdout: IO[Any] | None = None,
        stderr: TextIO | None = None) -> int:
    """``body()``'s status; a Fatal is printed as Postfix prints msg_fatal(), after what
    ``stdout`` holds, and a closed pipe on standard output ends the command with 0."""
    err = sys.stderr if stderr is None else stderr
    try:
        return body()
    except Fatal as exc:
        if stdout is not None:
            try:
                stdout.flush()
            except BrokenPipeError:
                silence_stdout(stdout)
        for line in exc.before:
            err.write(f"{prog}: {line}\n")
        err.write(f"{prog}: fatal: {exc}\n")
        err.flush()
        return exc.status
    except BrokenPipeError:
        silence_stdout(stdout)
        return EX_OK


def write_bytes(data: bytes, out: TextIO) -> None:
    """Bytes written where the text stream ``out`` writes, after what it holds: to its
    binary buffer as they are, or, for a stream without one (a test's StringIO),
    decoded as UTF-8 with replacement."""
    out.flush()
    raw = getattr(out, "buffer", None)
    if raw is not None:
        raw.write(data)
        raw.flush()
    else:
        out.write(data.decode("utf-8", "replace"))


def silence_stdout(out: IO[Any] | None = None) -> None:
    """After a closed pipe: point standard output at /dev/null, so that the
    interpreter's last flush at exit does not complain again."""
    if out is not None and out not in (sys.stdout, getattr(sys.stdout, "buffer", None)):
        return  # a test's buffer: nothing is flushed at exit
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):
        return  # not a file (a test's capture)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
