"""Delivery status notifications (RFC 3464), built as bytes the way Postfix's bounce(8) does.

This module owns the text of every notice relay sends about a message: the non-delivery
report ("Undelivered Mail Returned to Sender", for recipients that bounced or expired), the
delay warning ("Delayed Mail (still being retried)") and the success notice ("Successful
Mail Delivery Report", for recipients whose sender asked NOTIFY=SUCCESS, RFC 3461).  A
notice is a multipart/report (RFC 6522) with three parts: Postfix's human-readable text, a
message/delivery-status part (RFC 3464) with one field group per recipient, and the
returned message (message/rfc822) or only its headers (text/rfc822-headers: for delay
warnings and success notices, when the sender asked RET=HDRS, and for messages larger than
``MAX_RETURNED_BYTES``, Postfix's bounce_size_limit default).  The sender's ENVID is reported as
Original-Envelope-Id and each recipient's ORCPT as Original-Recipient.  A notice about an
internationalized message uses RFC 6533's message/global-delivery-status and
message/global (or message/global-headers) instead.

It never does I/O and never imports the rest of relay: the caller (the queue manager) passes
plain values, gets bytes with CRLF line endings, and enqueues them as a new message with the
null sender, so that a notice can never trigger another notice (RFC 5321 section 4.5.5).
A message whose own sender is null never produces a notice: the caller must not ask, and
``make_notice`` raises ValueError if it does.  With no I/O there is nothing for a crash to
leave behind; a notice that was built but not yet enqueued is simply built again.

Every value that lands in a header or a DSN field has its CR, LF and other control characters
replaced by spaces, so a remote reply cannot add header fields or MIME boundaries.
Follows RFC 3464, RFC 3461, RFC 3462/6522, RFC 6533, RFC 3834 (Auto-Submitted), RFC 5322,
RFC 2045/2046.
"""

from __future__ import annotations

import email.utils
import enum
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_RETURNED_BYTES",
    "FailedRecipient",
    "NoticeKind",
    "is_null_sender",
    "make_notice",
    "needs_global",
]

# Postfix's bounce_size_limit default: a bigger message goes back as its headers only.
MAX_RETURNED_BYTES = 50000
# Postfix's maximal_queue_lifetime default, used when a delay warning is asked for without it.
_DEFAULT_LIFETIME_DAYS = 5.0

# bounce_notify_util.c wraps the human-readable recipient lines at 79 columns, indent 4.
_TEXT_WIDTH = 79
_TEXT_INDENT = 4
# RFC 5322 section 2.1.1: lines SHOULD be no longer than 78 characters.
_HEADER_WIDTH = 78

_ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_SMTP_REPLY_RE = re.compile(r"[2-5]\d\d(?:[ -]|$)")
# Everything a header value must not carry: CR and LF (header injection), and the other C0
# controls and DEL, which some parsers also treat as line ends.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
# RFC 2046 bcharsnospace, minus characters that need care inside a quoted string.
_BOUNDARY_UNSAFE_RE = re.compile(r"[^0-9A-Za-z'()+_,\-./:=?]")
_HEADER_FIELD_RE = re.compile(rb"[!-9;-~]+:")
_BARE_LINE_END_RE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_HEAD_END_RE = re.compile(rb"\r?\n\r?\n|\r\r")
# RFC 5322 dot-atom-text, the left side of a Message-Id.
_MSGID_UNSAFE_RE = re.compile(r"[^0-9A-Za-z!#$%&'*+\-/=?^_`{|}~.]")
# RFC 5322 atom characters; anything else in mail_name would break an X-token.
_ATOM_UNSAFE_RE = re.compile(r"[^0-9A-Za-z!#$%&'*+\-/=?^_`{|}~]")

_FAILURE_SUBJECT = "Undelivered Mail Returned to Sender"
_DELAY_SUBJECT = "Delayed Mail (still being retried)"
_SUCCESS_SUBJECT = "Successful Mail Delivery Report"


class NoticeKind(enum.Enum):
    """Which notice to build."""

    FAILURE = "failure"  # recipients bounced, or the message expired in the queue
    DELAY = "delay"  # delay_warning_time passed; the message is still being retried
    SUCCESS = "success"  # delivered or relayed, and the sender asked NOTIFY=SUCCESS


_SUBJECTS = {
    NoticeKind.FAILURE: _FAILURE_SUBJECT,
    NoticeKind.DELAY: _DELAY_SUBJECT,
    NoticeKind.SUCCESS: _SUCCESS_SUBJECT,
}


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient reported in a notice.

    ``diagnostic`` is the remote reply exactly as received (``550 5.1.1 <bob@example.com>:
    Recipient address rejected: User unknown``) or a local reason (``connect to
    mx.example.com[192.0.2.1]:25: Connection refused``).  ``remote_mta`` is the host that
    gave the reply, "" when there was none.  ``dsn`` is the RFC 3463 status (``5.1.1``).
    ``last_attempt`` is a Unix time.  ``dsn_orcpt`` is the recipient's ORCPT as
    ``addr-type;address`` (RFC 3461), reported verbatim as Original-Recipient, as Postfix
    does; without it ``original_address`` is reported as ``rfc822; ADDRESS``.  ``text``,
    when given, is the human-readable line's reason instead of one made from
    ``diagnostic`` (a success notice says ``delivery via HOST[IP]:PORT: REPLY``).
    """

    address: str
    dsn: str
    diagnostic: str
    remote_mta: str = ""
    action: str = "failed"
    original_address: str = ""
    last_attempt: float | None = None
    dsn_orcpt: str = ""
    text: str = ""


def needs_global(original: bytes, smtputf8: bool, addresses: Sequence[str] = ()) -> bool:
    """Whether a notice about this message must use RFC 6533's message/global types: the
    client asked SMTPUTF8, or the message's header or an address is not ASCII (raw UTF-8
    would break a message/delivery-status or message/rfc822 part)."""
    return (smtputf8 or not _head_region(original).isascii()
            or not all(address.isascii() for address in addresses))


def is_null_sender(sender: str) -> bool:
    """True for the null reverse-path (``MAIL FROM:<>``), the sender of every notice.

    Mail from the null sender is never answered with a notice: that is what stops two
    mail systems from bouncing bounces at each other forever.
    """
    return sender.strip() in ("", "<>")


def make_notice(
    *,
    kind: NoticeKind,
    queue_id: str,
    sender: str,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    arrival_time: float,
    now: float,
    myhostname: str,
    mail_name: str = "relay",
    delay_warning_hours: float | None = None,
    max_lifetime_days: float | None = None,
    envid: str = "",
    headers_only: bool = False,
    smtputf8: bool = False,
) -> bytes:
    """Build a complete RFC 5322 notice to ``sender`` about ``recipients`` of ``queue_id``.

    ``original`` is the queued message (headers and body).  A FAILURE notice returns it as
    message/rfc822 when it is at most ``MAX_RETURNED_BYTES`` long, and only its headers as
    text/rfc822-headers otherwise; a DELAY notice always returns only the headers.
    ``delay_warning_hours`` and ``max_lifetime_days`` fill the delay text and
    Will-Retry-Until; when not given they default to the time the message has waited and
    to Postfix's 5 days.  In a DELAY notice every recipient's Action is ``delayed``; in a
    SUCCESS notice it is each recipient's own (``delivered`` or ``relayed``), and only the
    headers are returned, as Postfix does.  ``headers_only`` (the sender asked RET=HDRS)
    returns only the headers of a FAILURE notice too.  ``envid`` is the sender's ENVID
    (Original-Envelope-Id).  ``smtputf8`` (see ``needs_global``) makes it an RFC 6533
    notice: message/global-delivery-status, message/global or message/global-headers, and
    ``utf-8`` address types for non-ASCII addresses.

    Raises ValueError for the null sender, for an empty recipient list, and for an Action
    that RFC 3464 does not define.
    """
    if is_null_sender(sender):
        raise ValueError("a message from the null sender never gets a delivery status notice")
    if not recipients:
        raise ValueError("a delivery status notice needs at least one recipient")
    for rcpt in recipients:
        if kind is not NoticeKind.DELAY and rcpt.action not in _ACTIONS:
            raise ValueError(f"not an RFC 3464 action: {rcpt.action!r}")

    queue_id = _clean(queue_id)
    sender = _clean(sender)
    myhostname = _clean(myhostname) or "localhost"
    x_name = _x_name(mail_name)

    if max_lifetime_days is None:
        max_lifetime_days = _DEFAULT_LIFETIME_DAYS
    if delay_warning_hours is None:
        delay_warning_hours = round(max(0.0, now - arrival_time) / 3600, 1)
    retry_until = arrival_time + max_lifetime_days * 86400

    full = kind is NoticeKind.FAILURE and not headers_only and (
        len(original) <= MAX_RETURNED_BYTES
    )
    if full:
        returned = _crlf(original)
    else:
        returned = _header_block(_crlf(_head_region(original)))

    boundary = _boundary(queue_id, now, myhostname, returned)
    notice_id = _MSGID_UNSAFE_RE.sub("", f"{queue_id}.{kind.value}").strip(".")
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))

    text_lines = _notification_text(
        kind, recipients, myhostname, delay_warning_hours, max_lifetime_days
    )
    dsn_lines = _delivery_status(
        kind, recipients, queue_id, sender, arrival_time, retry_until, myhostname, x_name,
        _clean(envid), smtputf8,
    )
    text = "\r\n".join(text_lines)
    text_charset = "us-ascii" if text.isascii() else "utf-8"

    head = [
        f"Date: {_date(now)}",
        f"From: MAILER-DAEMON@{myhostname} (Mail Delivery System)",
        f"Subject: {_SUBJECTS[kind]}",
        f"To: {sender}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
        f"Message-Id: <{stamp}.{notice_id}@{myhostname}>",
    ]
    head = [line if line.startswith("Content-Type:") else _fold(line) for line in head]

    report_type = "message/global-delivery-status" if smtputf8 else "message/delivery-status"
    if smtputf8:
        returned_type = "message/global" if full else "message/global-headers"
    else:
        returned_type = "message/rfc822" if full else "text/rfc822-headers"
    undelivered = "" if kind is NoticeKind.SUCCESS else "Undelivered "
    out: list[str] = [
        *head,
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        f"Content-Type: text/plain; charset={text_charset}",
        "",
        text,
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: {report_type}",
    ]
    if not all(line.isascii() for line in dsn_lines):
        out.append("Content-Transfer-Encoding: 8bit")
    out += [
        "",
        *dsn_lines,
        "",
        f"--{boundary}",
        f"Content-Description: {undelivered}Message{'' if full else ' Headers'}",
        f"Content-Type: {returned_type}",
    ]
    if not returned.isascii():
        out.append("Content-Transfer-Encoding: 8bit")
    out.append("")
    prologue = ("\r\n".join(out) + "\r\n").encode("utf-8")
    if returned and not returned.endswith(b"\r\n"):
        returned += b"\r\n"
    epilogue = f"\r\n--{boundary}--\r\n".encode("ascii")
    return prologue + returned + epilogue


def _notification_text(
    kind: NoticeKind,
    recipients: Sequence[FailedRecipient],
    myhostname: str,
    delay_warning_hours: float,
    max_lifetime_days: float,
) -> list[str]:
    lines = [f"This is the mail system at host {myhostname}.", ""]
    if kind is NoticeKind.SUCCESS:
        # Postfix's success template (bounce_templates.c): no postmaster paragraph.
        lines += [
            "Your message was successfully delivered to the destination(s)",
            "listed below. If the message was delivered to mailbox you will",
            "receive no further notifications. Otherwise you may still receive",
            "notifications of mail delivery errors from other systems.",
            "",
            "                   The mail system",
        ]
    elif kind is NoticeKind.DELAY:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            f"Your message could not be delivered for {_number(delay_warning_hours)} hour(s).",
            f"It will be retried until it is {_number(max_lifetime_days)} day(s) old.",
        ]
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
        ]
    if kind is not NoticeKind.SUCCESS:
        lines += [
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "If you do so, please include this problem report. You can",
            "delete your own text from the attached returned message.",
            "",
            "                   The mail system",
        ]
    for rcpt in recipients:
        address = _clean(rcpt.address)
        original = _clean(rcpt.original_address)
        reason = _clean(rcpt.text) or _clean(rcpt.diagnostic) or "no diagnostic available"
        remote_mta = _clean(rcpt.remote_mta)
        if not rcpt.text and remote_mta and _is_smtp_reply(reason):
            reason = f"host {remote_mta} said: {reason}"
        if original and original.lower() != address.lower():
            who = f"<{address}> (expanded from <{original}>)"
        else:
            who = f"<{address}>"
        lines.append("")
        lines += _wrap(f"{who}: {reason}")
    return lines


def _delivery_status(
    kind: NoticeKind,
    recipients: Sequence[FailedRecipient],
    queue_id: str,
    sender: str,
    arrival_time: float,
    retry_until: float,
    myhostname: str,
    x_name: str,
    envid: str,
    smtputf8: bool,
) -> list[str]:
    def kind_of(address: str) -> str:
        # RFC 6533 section 3: a non-ASCII address is of type utf-8 (Postfix's "Fix
        # 20140708": only in a notice about an SMTPUTF8 message).
        return "utf-8" if smtputf8 and not address.isascii() else "rfc822"

    fields = [f"Reporting-MTA: dns; {myhostname}"]
    if envid:
        fields.append(f"Original-Envelope-Id: {envid}")
    fields += [
        f"X-{x_name}-Queue-ID: {queue_id}",
        f"X-{x_name}-Sender: {kind_of(sender)}; {sender}",
        f"Arrival-Date: {_date(arrival_time)}",
    ]
    for rcpt in recipients:
        remote_mta = _clean(rcpt.remote_mta)
        diagnostic = _clean(rcpt.diagnostic)
        address = _clean(rcpt.address)
        fields.append("")
        fields.append(f"Final-Recipient: {kind_of(address)}; {address}")
        if rcpt.dsn_orcpt:
            # Verbatim, as Postfix reports it: "rfc822;bob@example.net".
            fields.append(f"Original-Recipient: {_clean(rcpt.dsn_orcpt)}")
        elif rcpt.original_address:
            original = _clean(rcpt.original_address)
            fields.append(f"Original-Recipient: {kind_of(original)}; {original}")
        action = "delayed" if kind is NoticeKind.DELAY else rcpt.action
        fields.append(f"Action: {action}")
        fields.append(f"Status: {_status(rcpt.dsn, kind)}")
        if remote_mta:
            fields.append(f"Remote-MTA: dns; {remote_mta}")
        if diagnostic:
            # Postfix labels a remote reply "smtp" and its own reasons "X-<mail_name>".
            dtype = "smtp" if remote_mta and _is_smtp_reply(diagnostic) else f"X-{x_name}"
            fields.append(f"Diagnostic-Code: {dtype}; {diagnostic}")
        if rcpt.last_attempt is not None:
            fields.append(f"Last-Attempt-Date: {_date(rcpt.last_attempt)}")
        if kind is NoticeKind.DELAY:
            fields.append(f"Will-Retry-Until: {_date(retry_until)}")
    return [_fold(field) if field else field for field in fields]


def _clean(value: str) -> str:
    """The value with every run of control characters (CR and LF above all) made one space."""
    return _CONTROL_RE.sub(" ", value).strip()


def _is_smtp_reply(text: str) -> bool:
    return _SMTP_REPLY_RE.match(text) is not None


def _status(dsn: str, kind: NoticeKind) -> str:
    dsn = dsn.strip()
    if _STATUS_RE.fullmatch(dsn):
        return dsn
    # A notice must carry a valid Status (RFC 3464 section 2.3.4); fall back to "other".
    return {NoticeKind.DELAY: "4.0.0", NoticeKind.SUCCESS: "2.0.0"}.get(kind, "5.0.0")


def _x_name(mail_name: str) -> str:
    """mail_name as an X-token part: Postfix writes X-Postfix-Queue-ID, we X-Relay-Queue-ID."""
    name = _ATOM_UNSAFE_RE.sub("-", mail_name.strip()) or "Relay"
    return name[:1].upper() + name[1:]


def _number(value: float) -> str:
    return f"{value:g}"


def _date(when: float) -> str:
    return email.utils.formatdate(when, localtime=True)


def _crlf(data: bytes) -> bytes:
    """Every line end made CRLF, as SMTP needs; the spool should already hold CRLF."""
    if _BARE_LINE_END_RE.search(data) is None:
        return data
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def _head_region(message: bytes) -> bytes:
    """The message up to its first empty line, so a large body is never copied."""
    end = _HEAD_END_RE.search(message)
    return message if end is None else message[: end.start()]


def _header_block(message: bytes) -> bytes:
    """The message's header section: whole header fields, at most MAX_RETURNED_BYTES.

    Like Postfix's bounce_original(), it stops at the first line that is neither a header
    field nor a continuation, so a message without a blank line after its headers still
    returns only headers.
    """
    fields: list[bytes] = []
    for line in message.split(b"\r\n"):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        elif _HEADER_FIELD_RE.match(line):
            fields.append(line)
        else:
            break
    kept: list[bytes] = []
    size = 0
    for field in fields:
        size += len(field) + 2
        if size > MAX_RETURNED_BYTES:
            break
        kept.append(field + b"\r\n")
    return b"".join(kept)


def _boundary(queue_id: str, now: float, myhostname: str, returned: bytes) -> str:
    """Postfix's boundary, QUEUEID.TIME/HOSTNAME, made unique against the returned text."""
    base = _BOUNDARY_UNSAFE_RE.sub("", f"{queue_id}.{int(now)}/{myhostname}")[:64] or "boundary"
    boundary = base
    serial = 0
    # The returned message is the only part we do not write ourselves, so only it can
    # contain a line that would close the report early.
    while b"--" + boundary.encode("ascii") in returned:
        serial += 1
        boundary = f"{base}.{serial}"
    return boundary


def _wrap(text: str) -> list[str]:
    """Postfix's line_wrap(): break at spaces within 79 columns, indent continuations by 4."""
    lines: list[str] = []
    prefix = ""
    rest = text
    while True:
        room = _TEXT_WIDTH - len(prefix)
        if len(rest) <= room:
            lines.append(prefix + rest)
            return lines
        cut = rest.rfind(" ", 0, room + 1)
        if cut <= 0:
            cut = rest.find(" ", room)
            if cut < 0:
                lines.append(prefix + rest)
                return lines
        lines.append(prefix + rest[:cut].rstrip(" "))
        rest = rest[cut:].lstrip(" ")
        if not rest:
            return lines
        prefix = " " * _TEXT_INDENT


def _fold(line: str) -> str:
    """Fold a header or DSN field before existing spaces (RFC 5322 section 2.2.3).

    Folding only inserts CRLF in front of whitespace that is already there, so unfolding
    gives back the exact value: a remote reply stays verbatim.  A word longer than the
    line is left whole rather than broken.
    """
    pieces: list[str] = []
    # Never fold between the field name and the first word of its value.
    start = line.find(": ") + 2 if ": " in line else 1
    while len(line) > _HEADER_WIDTH:
        cut = line.rfind(" ", start, _HEADER_WIDTH)
        if cut <= 0 or not line[:cut].strip():
            cut = line.find(" ", max(start, _HEADER_WIDTH))
            if cut < 0 or not line[:cut].strip():
                break
        pieces.append(line[:cut])
        line = line[cut:]
        start = 1
    pieces.append(line)
    return "\r\n".join(pieces)
