"""sendmail: local submission without SMTP, compatible with Postfix's sendmail(1).

    sendmail [-C config] [-f sender] [-F full_name] [-t] [-i] [-oi] [-bm] [--] [recipient ...]
    sendmail -bp                    list the queue (mailq)
    sendmail -q | -qRsite | -qIid   flush the queue, a site's mail, one message

The message is read from standard input (LF or CRLF line ends, stored as CRLF).
Without ``-i``/``-oi`` a line holding a single ``.`` ends the input, as sendmail's
does.  ``-t`` takes recipients from To:, Cc: and Bcc: (only the Resent- ones when a
message has any), in addition to the recipients named as arguments, and removes the
Bcc: header from the stored message.  An argument may list several addresses
(``"a@example.com, Bob <b@example.com>"``), as Postfix allows.  The sender is ``-f``
(``-f '<>'`` is the null sender), else the invoking user's login name; unqualified
addresses get ``@$myorigin``.  As Postfix's cleanup does for local submissions, a
``Received: by $myhostname ($mail_name, from userid UID)`` header goes on top and
Message-Id:, Date: and From: are added at the end of the headers when missing.  A
leading mbox ``From `` line is dropped.

Options with an argument (A B C F L N O R V X b e f h o p q r, and relay's ``-c`` for
the configuration directory, as every relay command takes) may be attached or
separate; flags (G I U i m t v x) may be grouped.  Options end at the first
recipient or at ``--``, as Postfix's getopt does.  The RFC 3461 requests are kept in
the envelope as the SMTP listener keeps them: ``-N never`` or a list of ``success``,
``failure``, ``delay`` (NOTIFY, for every recipient), ``-R hdrs|full`` (RET), ``-V
envid`` (ENVID, at most 100 printable characters); a bad value is ignored with
Postfix's warning (``sendmail: warning: bad -N option value -- ignored``), and ``-V``
with two characters is Postfix's old VERP spelling, ignored with its warning.
``-odi``, ``-odb``, ``-v``, ``-X`` and the like are accepted and ignored.  ``-bs`` (SMTP on stdin),
``-bd`` and ``-bv`` are not supported: submit over SMTP to smtpd_listen instead.

The message is committed to the spool as the listener commits one (reserve data/ID,
write, fsync, rename into incoming/), so either it is queued durably or ``sendmail`` exits
75 (EX_TEMPFAIL) saying it was not queued: input is never lost silently.  If the
daemon runs it is asked to ``scan`` so the message leaves at once; if it does not,
the message waits in incoming/ for the next start.  Nothing here logs to the maillog
(the daemon logs the message when it takes it).  A crash before the rename leaves
only unacknowledged files that the daemon's cleanup removes after a day.

Installed as ``sendmail`` in the virtualenv's bin/ only; relay never touches
/usr/sbin/sendmail.  Point an application's sendmail path at .venv/bin/sendmail.

Exit status (sysexits): 0 queued; 64 usage, no recipients; 69 -q with the mail system
down, message too big; 75 cannot write the queue, or a bad main.cf (Postfix's sendmail
turns every other fatal error into EX_TEMPFAIL so that the caller keeps the message).
Not done, unlike Postfix's cleanup: rewriting unqualified addresses inside headers.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import os
import pwd
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from relay import config as config_mod
from relay import control
from relay import dsn as dsn_mod
from relay.cli.command import EX_DATAERR, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE, Fatal
from spool import Envelope, Recipient, Spool, SpoolError
from spool.store import fault_hook_from

# Postfix's GETOPT_LIST "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx", except that
# relay's -c takes the configuration directory like every other relay command.
_WITH_ARG = set("ABCFLNORVXbcefhopqr")
_FLAGS = set("GIUimntvx")

_HEADER_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_RECIPIENT_HEADERS = (b"to", b"cc", b"bcc")
_RESENT_HEADERS = (b"resent-to", b"resent-cc", b"resent-bcc")


class Mode(enum.Enum):
    ENQUEUE = "enqueue"  # -bm, the default
    MAILQ = "mailq"  # -bp
    FLUSH = "flush"  # -q
    IGNORE = "ignore"  # -bi, -I, -bh, -bH, -q30m: nothing to do here


@dataclass
class Options:
    config_dir: str | None = None
    mode: Mode = Mode.ENQUEUE
    sender: str | None = None
    full_name: str | None = None
    extract: bool = False  # -t
    dot_ends_input: bool = True  # cleared by -i / -oi
    site_to_flush: str | None = None
    id_to_flush: str | None = None
    recipients: list[str] = field(default_factory=list)
    dsn_notify: str = ""  # -N, canonical (relay.dsn)
    dsn_ret: str = ""  # -R: FULL or HDRS
    dsn_envid: str = ""  # -V
    warnings: list[str] = field(default_factory=list)  # "sendmail: warning: ..." lines


def parse_args(argv: Sequence[str]) -> Options:
    opts = Options()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg == "-q":  # not getopt compatible: Postfix special-cases it too
            opts.mode = Mode.FLUSH
            i += 1
            continue
        # Postfix 2.2's VERP spelling, which Postfix rewrites to -XV (ignored here).
        if arg == "-V" and i + 1 < len(args) and len(args[i + 1]) == 2:
            opts.warnings.append("option -V is deprecated with Postfix 2.3; "
                                 "specify -XV instead")
            i += 2
            continue
        if arg.startswith("-V") and len(arg) == 4:
            opts.warnings.append(f"option {arg} is deprecated with Postfix 2.3; "
                                 f"specify -X{arg[1:]} instead")
            i += 1
            continue
        if not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            flag = arg[j]
            if flag in _WITH_ARG:
                value = arg[j + 1:]
                if not value:
                    i += 1
                    if i >= len(args):
                        raise Fatal(f"option requires an argument -- '{flag}'", EX_USAGE)
                    value = args[i]
                _option(opts, flag, value)
                break
            if flag not in _FLAGS:
                raise Fatal("usage: sendmail [options]", EX_USAGE)
            if flag == "n":
                raise Fatal("-n option not supported", EX_USAGE)
            if flag == "i":
                opts.dot_ends_input = False
            elif flag == "t":
                opts.extract = True
            elif flag == "I":
                opts.mode = Mode.IGNORE  # newaliases: relay has no aliases
            j += 1
        i += 1
    opts.recipients = args[i:]
    if opts.extract and opts.mode != Mode.ENQUEUE:
        raise Fatal("-t can be used only in delivery mode", EX_USAGE)
    return opts


def _option(opts: Options, flag: str, value: str) -> None:
    if flag in "cC":
        # Postfix's -C accepts the main.cf file or its directory.
        opts.config_dir = os.path.dirname(value) if os.path.basename(value) == "main.cf" \
            else value
    elif flag in "fr":
        opts.sender = value
    elif flag == "F":
        opts.full_name = value
    elif flag == "o":
        if value.startswith("i"):
            opts.dot_ends_input = False
    elif flag == "b":
        mode = value[:1]
        if mode == "m":
            opts.mode = Mode.ENQUEUE
        elif mode == "p":
            opts.mode = Mode.MAILQ
        elif mode in ("h", "H", "i"):
            opts.mode = Mode.IGNORE
        else:
            # -bs (SMTP on stdin), -bd/-bl (daemon), -bv (verify): submit over SMTP instead.
            raise Fatal(f"unsupported: -b{mode}", EX_USAGE)
    elif flag == "q":
        if value[:1].isdigit():
            opts.mode = Mode.IGNORE  # "-q30m": a queue-run interval, daemon mode only
        elif value.startswith("R"):
            opts.site_to_flush = value[1:]
            if not opts.site_to_flush:
                raise Fatal("specify: -qRsitename", EX_USAGE)
        elif value.startswith("I"):
            opts.id_to_flush = value[1:]
            if not opts.id_to_flush:
                raise Fatal("specify: -qIqueueid", EX_USAGE)
        else:
            raise Fatal(f"-q{value[:1]} is not implemented", EX_USAGE)
    elif flag == "N":
        notify = dsn_mod.parse_notify(value)
        if notify is None:
            word = dsn_mod.unknown_notify_word(value)
            if word is not None:
                opts.warnings.append(f'unknown DSN NOTIFY command value "{word}" in "{value}"')
            opts.warnings.append("bad -N option value -- ignored")
        else:
            opts.dsn_notify = notify
    elif flag == "R":
        ret = dsn_mod.parse_ret(value)
        if ret is None:
            opts.warnings.append("bad -R option value -- ignored")
        else:
            opts.dsn_ret = ret
    elif flag == "V":
        if len(value) > 100:
            opts.warnings.append("too long -V option value -- ignored")
        elif not value.isprintable() or not value.isascii():
            opts.warnings.append("bad syntax in -V option value -- ignored")
        else:
            opts.dsn_envid = value
    # A B L O X e h p: body type, logging and legacy options, ignored.


# ---- reading and rewriting the message ----------------------------------------------------


def read_lines(stream: BinaryIO, dot_ends_input: bool, limit: int) -> Iterator[bytes]:
    """Input lines without their line ends; stop at a lone '.' unless -i.

    Raises Fatal (message file too big) once more than ``limit`` bytes were read
    (0 means no limit), so a runaway producer cannot fill the disk.
    """
    total = 0
    for raw in stream:
        total += len(raw)
        if limit and total > limit:
            raise Fatal("message file too big", EX_UNAVAILABLE)
        line = raw[:-1] if raw.endswith(b"\n") else raw
        while line.endswith(b"\r"):
            line = line[:-1]
        if dot_ends_input and line == b".":
            return
        yield line


@dataclass
class Parsed:
    headers: list[list[bytes]]  # each header: its physical lines
    body: list[bytes]


def split_message(lines: Iterable[bytes]) -> Parsed:
    """Headers (with their continuation lines) and body.

    A leading mbox "From " line is dropped.  The headers end at an empty line or at
    the first line that is not a header; in the latter case that line starts the body.
    """
    headers: list[list[bytes]] = []
    body: list[bytes] = []
    it = iter(lines)
    in_headers = True
    first = True
    for line in it:
        if first:
            first = False
            if line.lstrip(b">").startswith(b"From "):
                continue
        if in_headers:
            if line == b"":
                in_headers = False
                body.append(line)
                continue
            if line[:1] in (b" ", b"\t") and headers:
                headers[-1].append(line)
                continue
            if _HEADER_NAME.match(line):
                headers.append([line])
                continue
            in_headers = False
        body.append(line)
    return Parsed(headers, body)


def header_name(header: list[bytes]) -> bytes:
    return header[0].split(b":", 1)[0].strip().lower()


def header_value(header: list[bytes]) -> str:
    text = b" ".join(ln.strip() for ln in [header[0].split(b":", 1)[1], *header[1:]])
    return text.decode("utf-8", "replace")


def extract_recipients(headers: Sequence[list[bytes]]) -> list[str]:
    """Addresses from To/Cc/Bcc; only from Resent-To/Cc/Bcc when any is present."""
    resent = [h for h in headers if header_name(h) in _RESENT_HEADERS]
    chosen = resent or [h for h in headers if header_name(h) in _RECIPIENT_HEADERS]
    return parse_addresses(header_value(h) for h in chosen)


def parse_addresses(texts: Iterable[str]) -> list[str]:
    """Addresses in address-list texts ("a@x, Bob <b@y>"); groups and empties dropped."""
    out = []
    for _, address in email.utils.getaddresses(list(texts)):
        address = address.strip()
        if address:
            out.append(address)
    return out


def qualify(address: str, origin: str) -> str:
    return address if "@" in address else f"{address}@{origin}"


def dedupe(addresses: Iterable[str]) -> list[str]:
    """First occurrence wins; the domain part compares without case."""
    seen: set[str] = set()
    out = []
    for address in addresses:
        local, at, domain = address.rpartition("@")
        key = f"{local}{at}{domain.lower()}" if at else address
        if key not in seen:
            seen.add(key)
            out.append(address)
    return out


def mail_date(when: float) -> str:
    """RFC 5322 date with the zone name as a comment, as Postfix's mail_date()."""
    text = email.utils.format_datetime(datetime.datetime.fromtimestamp(when).astimezone())
    zone = time.strftime("%Z", time.localtime(when))
    return f"{text} ({zone})" if zone else text


def message_id(queue_id: str, when: float, myhostname: str, long_ids: bool) -> str:
    """Postfix's cleanup: <YYYYMMDDhhmmss.QUEUEID@myhostname>, or <QUEUEID@myhostname>."""
    if long_ids:
        return f"<{queue_id}@{myhostname}>"
    return f"<{time.strftime('%Y%m%d%H%M%S', time.localtime(when))}.{queue_id}@{myhostname}>"


def from_header(sender: str, full_name: str) -> str:
    if not sender:
        return "MAILER-DAEMON"
    return email.utils.formataddr((full_name, sender)) if full_name else sender


@dataclass(frozen=True, slots=True)
class Submission:
    sender: str
    full_name: str
    recipients: tuple[str, ...]
    parsed_headers: tuple[tuple[bytes, ...], ...]
    body: tuple[bytes, ...]
    strip_bcc: bool


def build_content(sub: Submission, *, queue_id: str, now: float, myhostname: str,
                  mail_name: str, uid: int, long_ids: bool) -> tuple[bytes, str]:
    """The stored message (CRLF line ends) and its Message-Id."""
    date = mail_date(now)
    out = [f"Received: by {myhostname} ({mail_name}, from userid {uid})".encode(),
           f"\tid {queue_id}; {date}".encode()]
    seen: set[bytes] = set()
    msgid = ""
    for header in sub.parsed_headers:
        name = header_name(list(header))
        seen.add(name)
        if sub.strip_bcc and name in (b"bcc", b"resent-bcc"):
            continue
        if name == b"message-id" and not msgid:
            msgid = header_value(list(header)).strip()
        out.extend(header)
    if b"message-id" not in seen:
        msgid = message_id(queue_id, now, myhostname, long_ids)
        out.append(f"Message-Id: {msgid}".encode())
    if b"date" not in seen:
        out.append(f"Date: {date}".encode())
    if b"from" not in seen:
        out.append(f"From: {from_header(sub.sender, sub.full_name)}".encode())
    body = list(sub.body)
    if not body or body[0] != b"":
        body.insert(0, b"")  # the empty line that separates headers from body
    out.extend(body)
    return b"".join(line + b"\r\n" for line in out), msgid


# ---- the command ------------------------------------------------------------------------


def login_name(uid: int, environ: Mapping[str, str]) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        name = environ.get("LOGNAME") or environ.get("USER")
        if not name:
            raise Fatal(f"no login name found for user ID {uid}", 71) from None
        return name


def default_full_name(uid: int, environ: Mapping[str, str]) -> str:
    if environ.get("NAME"):
        return environ["NAME"]
    try:
        return pwd.getpwuid(uid).pw_gecos.split(",")[0].strip()
    except KeyError:
        return ""


def sender_address(value: str) -> str:
    """-f's argument: "<>" is the null sender; "Name <addr>" gives addr."""
    value = value.strip()
    if value in ("", "<>"):
        return ""
    _, address = email.utils.parseaddr(value)
    return address or value.strip("<>")


def enqueue(opts: Options, cfg: config_mod.Config, stdin: BinaryIO,
            environ: Mapping[str, str]) -> str:
    """Read, rewrite and queue one message; its queue ID.  Raises Fatal."""
    uid = os.getuid()
    login = login_name(uid, environ)
    origin = cfg.str("myorigin") or cfg.str("myhostname")
    given = login if opts.sender is None else sender_address(opts.sender)
    sender = qualify(given, origin) if given else ""
    who = f"{given}({uid})"  # Postfix names the sender as given in its messages
    if not opts.recipients and not opts.extract:
        raise Fatal(f"{who}: Recipient addresses must be specified on the command line "
                    "or via the -t option", EX_USAGE)
    try:
        parsed = split_message(read_lines(stdin, opts.dot_ends_input,
                                          cfg.int("message_size_limit")))
    except Fatal as exc:
        raise Fatal(f"{who}: {exc}", exc.status) from None
    except OSError as exc:
        raise Fatal(f"{who}: error reading input: {exc.strerror}", EX_DATAERR) from None
    recipients = parse_addresses(opts.recipients)
    if opts.extract:
        recipients += extract_recipients(parsed.headers)
    recipients = dedupe(qualify(r, origin) for r in recipients)
    if not recipients:
        raise Fatal(f"{who}: No recipient addresses found in message header"
                    if opts.extract else
                    f"{who}: Recipient addresses must be specified on the command line "
                    "or via the -t option", EX_USAGE)
    full_name = opts.full_name if opts.full_name is not None else default_full_name(uid,
                                                                                     environ)
    sub = Submission(sender, full_name, tuple(recipients),
                     tuple(tuple(h) for h in parsed.headers), tuple(parsed.body),
                     strip_bcc=opts.extract)
    long_ids = cfg.bool("enable_long_queue_ids")
    try:
        spool = Spool(cfg.str("queue_directory"), long_ids=long_ids,
                      fault=fault_hook_from(environ.get("RELAY_FAULT", "")))
        res = spool.reserve()
    except (OSError, SpoolError) as exc:
        raise Fatal(f"{who}: error writing queue file: {_why(exc)} -- message not queued",
                    EX_TEMPFAIL) from None
    now = time.time()
    try:
        content, msgid = build_content(
            sub, queue_id=res.queue_id, now=now, myhostname=cfg.str("myhostname"),
            mail_name=cfg.str("mail_name"), uid=uid, long_ids=long_ids)
        if cfg.int("message_size_limit") and len(content) > cfg.int("message_size_limit"):
            raise Fatal(f"{who}: message file too big", EX_UNAVAILABLE)
        env = Envelope(
            queue_id=res.queue_id, sender=sender,
            recipients=tuple(Recipient(r, dsn_notify=opts.dsn_notify) for r in recipients),
            dsn_envid=opts.dsn_envid, dsn_ret=opts.dsn_ret,
            arrival_time=now, size=len(content), client_name="localhost",
            client_address="127.0.0.1", protocol="local", message_id=msgid[:256],
            sender_fullname=full_name,
        )
        env = spool.commit(res, env, [content])
    except (OSError, SpoolError) as exc:
        spool.abort(res)
        raise Fatal(f"{who}: error writing queue file: {_why(exc)} -- message not queued",
                    EX_TEMPFAIL) from None
    except BaseException:
        spool.abort(res)
        raise
    try:
        control.request(spool.root, "scan", timeout=5.0)
    except control.MailSystemDown:
        pass  # queued durably; the daemon picks it up when it starts
    return env.queue_id


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


def delegate(opts: Options, environ: Mapping[str, str], stdout: TextIO | None,
             stderr: TextIO) -> int:
    """-bp, -q, -qRsite, -qIid: Postfix's sendmail execs postqueue; we call it.

    Its messages therefore say ``postqueue: fatal: ...``, as Postfix's do.
    """
    from relay.cli import postqueue

    config_dir = config_mod.config_dir_from(opts.config_dir, environ)
    argv = ["-c", config_dir] if config_dir else []
    if opts.mode == Mode.MAILQ:
        argv.append("-p")
    elif opts.site_to_flush:
        argv += ["-s", opts.site_to_flush]
    elif opts.id_to_flush:
        argv += ["-i", opts.id_to_flush]
    else:
        argv.append("-f")
    return postqueue.main(argv, stdout=stdout, stderr=stderr)


def main(argv: Sequence[str] | None = None, *, stdin: BinaryIO | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None,
         environ: Mapping[str, str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    inp = sys.stdin.buffer if stdin is None else stdin
    err = sys.stderr if stderr is None else stderr
    env = os.environ if environ is None else environ
    try:
        opts = parse_args(args)
        for warning in opts.warnings:
            err.write(f"sendmail: warning: {warning}\n")
        if opts.mode == Mode.IGNORE:
            return 0
        if opts.mode == Mode.MAILQ:
            if opts.recipients:
                raise Fatal("display queue mode requires no recipient", EX_USAGE)
            return delegate(opts, env, stdout, err)
        if opts.mode == Mode.FLUSH or opts.site_to_flush or opts.id_to_flush:
            if opts.recipients:
                raise Fatal("flush queue mode requires no recipient" if opts.mode == Mode.FLUSH
                            else "flush site requires no recipient" if opts.site_to_flush
                            else "flush queue_id requires no recipient", EX_USAGE)
            return delegate(opts, env, stdout, err)
        cfg = config_mod.load(config_mod.config_dir_from(opts.config_dir, env), environ=env,
                              warn=lambda m: print(f"sendmail: warning: {m}", file=err))
        enqueue(opts, cfg, inp, env)
        return 0
    except Fatal as exc:
        err.write(f"sendmail: fatal: {exc}\n")
        return exc.status
    except config_mod.ConfigError as exc:
        err.write(f"sendmail: fatal: {exc}\n")
        return EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
