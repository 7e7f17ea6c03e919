"""postqueue and mailq: list the queue, or ask the daemon to flush it (postqueue(1)).

    postqueue [-v] [-c config_dir] -p         the sendmail-style listing (= mailq)
    postqueue [-v] [-c config_dir] -j         one JSON object per message
    postqueue [-v] [-c config_dir] -f         retry all deferred mail now
    postqueue [-v] [-c config_dir] -i queue_id   retry one message now
    postqueue [-v] [-c config_dir] -s site    retry mail for one destination now
    mailq [-v] [-c config_dir]                same as postqueue -p

The listings read the spool directly through :mod:`relay.cli.showq`, whether or not the
daemon runs: reading the spool is our normal path, where Postfix's postqueue asks its
showq service and reads the spool itself only when run by root with the mail system
down.  Postfix then warns, and so do we, at the same moment: run by root, when the
daemon does not answer a ``ping`` on its control socket (``QUEUE_DIR/control``)::

    postqueue: warning: Mail system is down -- accessing queue directly (Connect to the relay control socket QUEUE_DIR/control: Connection refused)

Postfix's text in the parentheses is ``Connect to the Postfix showq service:
<strerror>``; ours names what we asked and why it did not answer (``No such file or
directory`` when the socket is absent: the daemon never ran or was stopped, ``Connection
refused`` when it died, ``timed out`` when it did not answer within 5 seconds).  The
listing follows all the same, exit 0.  Another user gets no warning (Postfix would stop
with ``Queue report unavailable``, exit 69; the spool is that user's own here).  mailq
says ``postqueue: warning: ...`` too: Postfix's mailq runs postqueue.

The flush requests only send one line to the daemon's control socket (``flush``,
``flush-id``, ``flush-site``), as Postfix's postqueue only writes a trigger to qmgr:
this command never moves or rewrites a queue file, so a crash leaves nothing behind.

Errors go to stderr as Postfix's: ``postqueue: fatal: ...``, after getopt's own
``postqueue: invalid option -- 'x'`` or ``postqueue: option requires an argument --
'i'`` for a bad option.  Every fatal error of postqueue exits 69 (EX_UNAVAILABLE), a
usage error, a bad queue ID or site and a bad main.cf included, as Postfix 3.7.11's
does (measured: FORMATS.md 1.3).  mailq is Postfix's sendmail, which turns its fatal
errors into 75 (EX_TEMPFAIL): ``mailq: fatal: usage: mailq [options]``, ``mailq:
fatal: display queue mode requires no recipient``, exit 75.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from typing import TextIO

from relay import config, control
from relay.cli import showq
from relay.cli.command import EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, Fatal, parse_options, run
from spool.store import valid_queue_id

USAGE = ("usage: postqueue -f | postqueue -i queueid | postqueue -j | postqueue -p"
         " | postqueue -s site")
MAILQ_USAGE = "usage: mailq [options]"
# How long a listing run by root waits for the daemon to answer before it warns.
PING_TIMEOUT = 5.0

# valid_hostname(): letters, digits, '-' and '_' in labels of at most 63, 255 in all.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


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


def _load(config_dir: str | None, status: int) -> config.Config:
    try:
        return config.load(config.config_dir_from(config_dir, os.environ),
                           warn=lambda message: None)
    except config.ConfigError as exc:
        raise Fatal(str(exc), status) from None


def mail_system_down(queue_dir: str) -> str | None:
    """Why the daemon of this spool does not answer (Postfix's "mail system is down"),
    or None when it does."""
    try:
        control.request(queue_dir, "ping", timeout=PING_TIMEOUT)
    except control.MailSystemDown as exc:
        return f"Connect to the relay control socket {control.socket_path(queue_dir)}: {exc}"
    return None


def _list(cfg: config.Config, json_format: bool, out: TextIO, err: TextIO, status: int) -> int:
    try:
        spool = showq.open_spool(cfg)
        if os.geteuid() == 0:
            # Postfix's postqueue, run by root, lists the spool itself when showq does
            # not answer, and says so; we always do, and say so when it would.
            why = mail_system_down(spool.root)
            if why is not None:
                err.write("postqueue: warning: Mail system is down -- accessing queue"
                          f" directly ({why})\n")
                err.flush()
        if json_format:
            showq.write(showq.json_records(showq.records(spool)), out)
        else:
            showq.write_sendmail_listing(spool, out)
    except showq.NoQueueDirectory as exc:
        raise Fatal(str(exc), status) from None
    except OSError as exc:
        raise Fatal(f"scan {cfg.str('queue_directory')}: {exc.strerror or exc}",
                    status) from None
    return EX_OK


def _flush(cfg: config.Config, verb: str, *args: str) -> int:
    """Send one flush request; the daemon answers ``ok`` or ``error TEXT``."""
    try:
        reply = control.request(cfg.str("queue_directory"), verb, *args)
    except control.MailSystemDown:
        raise Fatal("Cannot flush mail queue - mail system is down", EX_UNAVAILABLE) from None
    if reply == "ok":
        return EX_OK
    if args:  # the server refused this queue ID or site
        raise Fatal(f"Invalid request: {_quoted(args[0])}", EX_UNAVAILABLE)
    text = reply.removeprefix("error").strip() or "mail system is down"
    raise Fatal(f"Cannot flush mail queue - {text}", EX_UNAVAILABLE)


def _run_postqueue(argv: list[str], out: TextIO, err: TextIO) -> int:
    opts, operands = parse_options(argv, "c:fi:jps:v", USAGE, EX_UNAVAILABLE)
    config_dir: str | None = None
    mode = ""
    queue_ids: list[str] = []
    site = ""
    for letter, value in opts:
        if letter == "c":
            config_dir = value
        elif letter == "v":
            pass
        elif letter == "i" and mode in ("", "i"):
            # Postfix's getopt loop: one mode, once; only -i may repeat.
            mode = "i"
            queue_ids.append(value)
        elif mode:
            raise Fatal(USAGE, EX_UNAVAILABLE)
        else:
            mode = letter
            site = value
    if not mode or operands:
        raise Fatal(USAGE, EX_UNAVAILABLE)
    for queue_id in queue_ids:
        if not valid_queue_id(queue_id):
            raise Fatal(f"Cannot flush queue ID - invalid name: {_quoted(queue_id)}",
                        EX_UNAVAILABLE)
    if mode == "s" and not valid_site(site):
        raise Fatal(f"Cannot flush mail queue - invalid destination: {_quoted(site)}",
                    EX_UNAVAILABLE)
    cfg = _load(config_dir, EX_UNAVAILABLE)
    if mode in ("p", "j"):
        return _list(cfg, mode == "j", out, err, EX_UNAVAILABLE)
    if mode == "f":
        return _flush(cfg, "flush")
    if mode == "s":
        return _flush(cfg, "flush-site", site)
    for queue_id in queue_ids:
        _flush(cfg, "flush-id", queue_id)
    return EX_OK


def _run_mailq(argv: list[str], out: TextIO, err: TextIO) -> int:
    # Postfix's mailq is sendmail -bp, whose -C names the configuration (file or
    # directory); its fatal errors exit 75, as all of sendmail's.
    opts, operands = parse_options(argv, "c:C:v", MAILQ_USAGE, EX_TEMPFAIL)
    config_dir: str | None = None
    config_file = ""
    for letter, value in opts:
        if letter == "c":
            config_dir = value
        elif letter == "C":
            config_file = value
    if operands:
        raise Fatal("display queue mode requires no recipient", EX_TEMPFAIL)
    if config_file and not config_dir:
        config_dir = (config_file if os.path.isdir(config_file)
                      else os.path.dirname(config_file) or ".")
    return _list(_load(config_dir, EX_TEMPFAIL), False, out, err, EX_TEMPFAIL)


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """The ``postqueue`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = showq.utf8_stdout() if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    return run("postqueue", lambda: _run_postqueue(args, out, err), stdout=out, stderr=err)


def mailq_main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
               stderr: TextIO | None = None) -> int:
    """The ``mailq`` command: ``postqueue -p`` under sendmail's name."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = showq.utf8_stdout() if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    return run("mailq", lambda: _run_mailq(args, out, err), stdout=out, stderr=err)


if __name__ == "__main__":
    sys.exit(main())
