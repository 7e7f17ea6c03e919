"""postcat: show a queued message -- envelope, header, body -- as Postfix's postcat(1).

    postcat [-behv] [-c config_dir] -q queue_id ...
    postcat [-behv] [-c config_dir] QUEUE_DIRECTORY/QUEUE/queue_id ...
    postcat [-behv] [-c config_dir] < QUEUE_DIRECTORY/QUEUE/queue_id

Output, in Postfix's sections (``src/postcat/postcat.c``; FORMATS.md 1.5)::

    *** ENVELOPE RECORDS deferred/4F2A31C0D2 ***
    message_size:             332               0               1               0             332               0
    message_arrival_time: Sun Jan 21 13:32:59 2007
    create_time: Sun Jan 21 13:32:59 2007
    named_attribute: log_ident=4F2A31C0D2
    named_attribute: envelope_id=ENVID       (RFC 3461 ENVID, when given)
    named_attribute: ret_flags=2             (RET: 1 FULL, 2 HDRS, when given)
    sender: me@example.org
    named_attribute: client_name=localhost
    ...
    named_attribute: notify_flags=6          (NOTIFY: 1 NEVER, 2 SUCCESS, 4 FAILURE, 8 DELAY)
    named_attribute: dsn_orig_rcpt=rfc822;you@example.com   (ORCPT, or the one made up)
    original_recipient: you@example.com
    recipient: you@example.com               (done_recipient: once sent or bounced)
    *** MESSAGE CONTENTS deferred/4F2A31C0D2 ***
    ...header lines, the empty line, the body...
    *** HEADER EXTRACTED deferred/4F2A31C0D2 ***
    *** MESSAGE FILE END deferred/4F2A31C0D2 ***

Our queue has no hashed subdirectories, so the path is ``QUEUE/ID``.  ``-e``, ``-h``
and ``-b`` select the envelope, the primary header and the body (default: all three);
the section markers are printed only with the envelope, and the header ends at the
first line that is neither a header nor a continuation line (so ``-b`` starts with the
empty separator line), exactly as postcat's state machine does.  Message lines are
printed with LF endings.  The content is streamed from the data file in blocks, never
held whole.

``-q`` looks for the ID in incoming, active, deferred, hold, corrupt, twice (the
message may move while we look).  With neither a file nor a queue ID, postcat reads a
queue file from standard input, as Postfix's does: here the envelope (a file of one
of the queues), labelled ``stdin``, with the content of its queue ID in the spool of
main.cf (``data/ID``: our queue files are two files); an empty input shows nothing,
and one that is not an envelope gets ``postcat: warning: stdin: input is not a valid
queue file``; both exit 0, as Postfix's.  This command only reads: it takes no lock
and changes nothing, so a crash leaves nothing behind.  Errors: ``postcat: fatal: bad
mail queue ID: X``, ``postcat: fatal: open queue file X: No such file or directory``,
and a bad option (getopt's ``postcat: invalid option -- 'x'``, then ``postcat: fatal:
usage: ...``), all exit 1, as Postfix's msg_fatal().
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from relay import config, dsn
from relay.cli.command import EX_OK, Fatal, parse_options, run
from spool import CorruptEntry, EntryGone, Envelope, RcptState, Spool
from spool import envelope as envfmt
from spool.store import valid_queue_id

USAGE = ("usage: postcat [-b (body text)] [-c config_dir] [-e (envelope records)]"
         " [-h (header text)] [-q (access queue)] [-v] [file(s)...]")

# postcat -q's search order (maildrop and saved are Postfix's; corrupt is our saved).
SEARCH_QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")
BLOCK = 65536

# is_header_buf(): printable ASCII except ':' and space, optional blanks, then ':'.
_HEADER = re.compile(rb"[!-9;-~]+[ \t]*:")


@dataclass(frozen=True, slots=True)
class _Options:
    config_dir: str | None
    envelope: bool
    header: bool
    body: bool
    queue: bool
    names: tuple[str, ...]


def _options(argv: Sequence[str]) -> _Options:
    # -h is "header", as in Postfix, not help.
    opts, names = parse_options(argv, "bc:ehqv", USAGE)
    given = {letter for letter, _ in opts}
    config_dir = next((value for letter, value in reversed(opts) if letter == "c"), None)
    return _Options(config_dir, "e" in given, "h" in given, "b" in given, "q" in given,
                    tuple(names))


def _asctime(when: float) -> str:
    return time.asctime(time.localtime(when))


def envelope_records(env: Envelope) -> Iterator[str]:
    """The envelope as postcat's ``name: value`` lines, in Postfix's record order."""
    fields = (env.size, 0, len(env.recipients), 0, env.size, 0)
    # REC_TYPE_SIZE_FORMAT: content size, data offset (our content starts a file of its
    # own), recipient count, qmgr flags, content length, smtputf8 flags.
    yield "message_size: " + " ".join(f"{n:15d}" for n in fields)
    yield f"message_arrival_time: {_asctime(env.arrival_time)}"
    yield f"create_time: {_asctime(env.arrival_time)}"
    yield f"named_attribute: log_ident={env.queue_id}"
    # Where Postfix 3.7's queue file has them (checked against its postcat): the DSN
    # attributes before the sender, the recipient's before the recipient.
    if env.dsn_envid:
        yield f"named_attribute: envelope_id={env.dsn_envid}"
    if dsn.ret_flags(env.dsn_ret):
        yield f"named_attribute: ret_flags={dsn.ret_flags(env.dsn_ret)}"
    if env.sender_fullname:
        yield f"sender_fullname: {env.sender_fullname}"
    yield f"sender: {env.sender}"
    attributes = [
        ("client_name", env.client_name),
        ("client_address", env.client_address),
        ("helo_name", env.helo_name),
        ("protocol_name", env.protocol),
        ("sasl_username", env.auth_user),
    ]
    for name, value in attributes:
        if value:
            yield f"named_attribute: {name}={value}"
    for rcpt in env.recipients:
        if dsn.notify_flags(rcpt.dsn_notify):
            yield f"named_attribute: notify_flags={dsn.notify_flags(rcpt.dsn_notify)}"
        # Postfix has both for every recipient: the client's ORCPT or the one its smtpd
        # makes up, which is also what relay passes on and reports.
        orcpt = dsn.original_recipient(rcpt.dsn_orcpt, rcpt.address)
        yield f"named_attribute: dsn_orig_rcpt={orcpt}"
        yield f"original_recipient: {rcpt.address}"
        kind = "recipient" if rcpt.state is RcptState.PENDING else "done_recipient"
        yield f"{kind}: {rcpt.address}"


def content_lines(f: BinaryIO) -> Iterator[tuple[bytes, bool]]:
    """(piece, starts_line) of the content, each line ending in LF instead of CRLF.

    A line longer than BLOCK comes in several pieces (only the first starts the line);
    the first piece of a line is never shorter than a line or BLOCK, so it is enough
    to tell a header from the body.
    """
    at_start = True
    tail = b""
    while block := f.read(BLOCK):
        data = tail + block if tail else block
        start = 0
        while (nl := data.find(b"\n", start)) >= 0:
            end = nl - 1 if nl > start and data[nl - 1] == 0x0D else nl
            yield data[start:end] + b"\n", at_start
            at_start = True
            start = nl + 1
        tail = data[start:]
        if len(tail) >= BLOCK:
            # Keep a last CR back: it may be the first half of a CRLF.
            cut = len(tail) - 1 if tail.endswith(b"\r") else len(tail)
            yield tail[:cut], at_start
            at_start = False
            tail = tail[cut:]
    if tail or not at_start:
        yield tail + b"\n", at_start  # an unterminated last line is still a line


def _write_content(f: BinaryIO, out: BinaryIO, header: bool, body: bool) -> None:
    """Header and/or body, split where postcat splits them."""
    in_header = True
    printing = header
    for piece, starts_line in content_lines(f):
        if in_header and starts_line and not (_HEADER.match(piece) or piece[:1] in b" \t"):
            in_header = False
            printing = body
            if not printing:
                return
        if printing:
            out.write(piece)


class _Postcat:
    def __init__(self, out: BinaryIO, err: TextIO, envelope: bool, header: bool,
                 body: bool) -> None:
        self.out = out
        self.err = err
        self.envelope = envelope
        self.header = header
        self.body = body

    def _line(self, text: str) -> None:
        self.out.write(text.encode("utf-8", "surrogateescape") + b"\n")

    def show(self, spool: Spool, env: Envelope, label: str) -> None:
        if self.envelope:
            self._line(f"*** ENVELOPE RECORDS {label} ***")
            for record in envelope_records(env):
                self._line(record)
            self._line(f"*** MESSAGE CONTENTS {label} ***")
        if self.header or self.body:
            try:
                f = open(spool.content_path(env.queue_id), "rb")  # noqa: SIM115
            except OSError as exc:
                # An envelope without content: show what there is, as postcat shows
                # a truncated queue file up to the damage.
                self.out.flush()
                print(f"postcat: warning: {label}: open message content: {exc.strerror}",
                      file=self.err)
            else:
                with f:
                    _write_content(f, self.out, self.header, self.body)
        if self.envelope:
            self._line(f"*** HEADER EXTRACTED {label} ***")
            self._line(f"*** MESSAGE FILE END {label} ***")
        self.out.flush()


def _find(spool: Spool, queue_id: str) -> tuple[str, Envelope]:
    for _ in range(2):  # the message may move between two queues while we look
        for queue in SEARCH_QUEUES:
            try:
                return queue, spool.read(queue, queue_id)
            except EntryGone:
                continue
            except CorruptEntry as exc:
                raise Fatal(f"{queue}/{queue_id}: input is not a valid queue file: {exc}") \
                    from None
    raise Fatal(f"open queue file {queue_id}: No such file or directory")


def _load_spool(config_dir: str | None) -> Spool:
    """The spool of main.cf (``-c``, else MAIL_CONFIG, else the defaults)."""
    try:
        cfg = config.load(config.config_dir_from(config_dir, os.environ),
                          warn=lambda message: None)
    except config.ConfigError as exc:
        raise Fatal(str(exc)) from None
    return Spool(cfg.str("queue_directory"), long_ids=cfg.bool("enable_long_queue_ids"),
                 create=False)


def _by_queue_id(ns: _Options, shower: _Postcat) -> None:
    spool = _load_spool(ns.config_dir)
    if not os.path.isdir(spool.root):
        raise Fatal(f"chdir {spool.root}: No such file or directory")
    for queue_id in ns.names:
        if not valid_queue_id(queue_id):
            raise Fatal(f"bad mail queue ID: {queue_id}")
        queue, env = _find(spool, queue_id)
        shower.show(spool, env, spool.relative_path(queue, queue_id))


def _from_stdin(ns: _Options, shower: _Postcat, stdin: BinaryIO) -> None:
    """An envelope on standard input, shown with its content from main.cf's spool."""
    spool = _load_spool(ns.config_dir)
    raw = stdin.read()
    if not raw:
        return  # Postfix's postcat shows nothing of an empty queue file
    try:
        env = envfmt.loads(raw)
    except CorruptEntry:
        shower.out.flush()
        print("postcat: warning: stdin: input is not a valid queue file", file=shower.err)
        return
    shower.show(spool, env, "stdin")


def _by_path(ns: _Options, shower: _Postcat) -> None:
    for path in ns.names:
        # QUEUE_DIRECTORY/QUEUE/ID: the spool is two levels up, the content in its data/.
        full = os.path.abspath(path)
        queue_dir, queue_id = os.path.split(full)
        root, queue = os.path.split(queue_dir)
        if not os.path.isfile(full):
            raise Fatal(f"open {path}: No such file or directory")
        spool = Spool(root, create=False)
        try:
            env = spool.read(queue, queue_id)
        except (EntryGone, CorruptEntry) as exc:
            raise Fatal(f"{path}: input is not a valid queue file: {exc}") from None
        shower.show(spool, env, path)


def main(argv: Sequence[str] | None = None, *, stdin: BinaryIO | None = None,
         stdout: BinaryIO | None = None, stderr: TextIO | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    inp = sys.stdin.buffer if stdin is None else stdin
    out = sys.stdout.buffer if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr

    def body() -> int:
        ns = _options(args)
        everything = not (ns.envelope or ns.header or ns.body)
        shower = _Postcat(out, err, ns.envelope or everything, ns.header or everything,
                          ns.body or everything)
        if not ns.names:
            _from_stdin(ns, shower, inp)
        elif ns.queue:
            _by_queue_id(ns, shower)
        else:
            _by_path(ns, shower)
        return EX_OK

    return run("postcat", body, stdout=out, stderr=err)


if __name__ == "__main__":
    sys.exit(main())
