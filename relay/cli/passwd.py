"""``relay passwd``: add, change or remove an SMTP AUTH user in smtpd_sasl_password_file.

    relay passwd [-c config_dir] [-d] USER

The password is read from the terminal twice (not echoed), or once from standard input
when that is not a terminal (one line; the newline is not part of the password), and
stored as a salted scrypt hash (relay.auth), never as text.  ``-d`` removes the user.
The daemon notices the changed file at the next login; no reload is needed.

It never talks to the daemon and never prints a password.  The file is replaced
atomically (written aside, fsync'ed, renamed) with mode 0600, so a crash leaves the old
file or the new one.  Exit codes: 0 done, 64 usage or a bad password, 78 configuration
(no smtpd_sasl_password_file), 75 the file could not be written.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

from relay import config as config_mod
from relay.auth import (
    PasswordFileError,
    hash_password,
    password_file_path,
    update_password_file,
    valid_username,
)
from relay.cli.command import EX_CONFIG, EX_OK, EX_TEMPFAIL, EX_USAGE, Fatal, run


def read_password(stdin: TextIO, prompt: Callable[[str], str] = getpass.getpass) -> str:
    """The new password: twice from the terminal, or one line from a pipe or file.

    ValueError with the message to show when there is none or the two differ."""
    if stdin.isatty():
        first = prompt("New password: ")
        if prompt("Retype new password: ") != first:
            raise ValueError("passwords do not match")
    else:
        line = stdin.readline()
        first = line.removesuffix("\n")
        first = first.removesuffix("\r")
    if not first:
        raise ValueError("empty password")
    return first


def main(argv: Sequence[str] | None = None, *, stdin: TextIO | None = None,
         stderr: TextIO | None = None, environ: Mapping[str, str] | None = None,
         prompt: Callable[[str], str] = getpass.getpass) -> int:
    err = sys.stderr if stderr is None else stderr
    inp = sys.stdin if stdin is None else stdin
    env = os.environ if environ is None else environ

    def say(text: str) -> None:
        err.write(f"relay passwd: {text}\n")
        err.flush()

    parser = argparse.ArgumentParser(prog="relay passwd", description=__doc__.split("\n")[0])
    parser.add_argument("-c", dest="config_dir", metavar="CONFIG_DIR")
    parser.add_argument("-d", dest="delete", action="store_true", help="remove the user")
    parser.add_argument("user", metavar="USER")
    try:
        # argparse's own usage and help: relay's command, not one of Postfix's.
        ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return EX_OK if exc.code == 0 else EX_USAGE

    def body() -> int:
        user: str = ns.user
        if not valid_username(user):
            raise Fatal(f"bad user name: {user!r} (no ':', white space or control characters)",
                        EX_USAGE)
        try:
            cfg = config_mod.load(config_mod.config_dir_from(ns.config_dir, env), environ=env,
                                  warn=lambda m: say(f"warning: {m}"))
        except config_mod.ConfigError as exc:
            raise Fatal(str(exc), EX_CONFIG) from None
        path = password_file_path(cfg.str("smtpd_sasl_password_file"), cfg.path)
        if not path:
            raise Fatal("smtpd_sasl_password_file is not set", EX_CONFIG)
        try:
            if ns.delete:
                if not update_password_file(path, user, None):
                    raise Fatal(f"{user}: no such user in {path}", EX_USAGE)
                say(f"{user}: removed from {path}")
                return EX_OK
            try:
                password = read_password(inp, prompt)
            except (ValueError, EOFError) as exc:
                raise Fatal(str(exc) or "no password", EX_USAGE) from None
            update_password_file(path, user, hash_password(password))
        except PasswordFileError as exc:
            raise Fatal(str(exc), EX_TEMPFAIL) from None
        say(f"{user}: password set in {path}")
        return EX_OK

    return run("relay passwd", body, stderr=err)


if __name__ == "__main__":
    sys.exit(main())
