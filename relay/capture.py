"""Captured mail as Mailpit shows it: each Maildir message's summary and full view (Mailpit's
API v1 ``MessageSummary`` and ``Message``, same JSON field names) and Mailpit's search syntax.

It owns the reading of one message into a ``View`` (parsed once, with the standard
library's ``email`` package and its default policy) and ``matches(query, view)``.  The
read API (relay.http.api), ``relay capture`` and the pytest plugin use it, so a query means
the same everywhere.  It never writes anything and keeps nothing between calls except a
small cache of parsed views, keyed by file and size.

Search (Mailpit's, minus tags and dates): words separated by spaces, ``"quoted phrases"``,
each a substring that must appear (case-insensitive) in the subject, the addresses or the
text; ``from:``, ``to:``, ``cc:``, ``bcc:``, ``reply-to:``, ``addressed:`` (any of those),
``subject:``, ``message-id:``, ``is:read``, ``is:unread``, ``has:attachment``,
``larger:10k``, ``smaller:1m``, ``after:``/``before:`` an ISO date or time; a leading ``-``
or ``!`` negates a term.  Every term must hold.  RFC 5322, RFC 2045-2047 as the ``email``
package reads them.
"""

from __future__ import annotations

import collections
import datetime
import email.policy
import hashlib
import html as html_mod
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses
from typing import Any

from relay.maildir import Entry

SNIPPET_LIMIT = 200  # Mailpit's CreateSnippet()
_SPACE = re.compile(r"\s+")
_TAG = re.compile(r"<[^>]*>")
_DROP_BLOCKS = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TERM = re.compile(r'[-!]?[A-Za-z-]+:"[^"]*"|[-!]?"[^"]*"|\S+')
_SIZE = re.compile(r"(\d+)(?:\.(\d+))?\s?([km]b?)?\Z", re.IGNORECASE)

JSON = dict[str, Any]


def parse(raw: bytes) -> EmailMessage:
    """The message as an EmailMessage (the default policy: decoded headers, get_content())."""
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def _addresses(message: EmailMessage, name: str) -> list[JSON]:
    values = [str(v) for v in message.get_all(name, [])]
    found = []
    for display, address in getaddresses(values):
        if address or display:
            found.append({"Name": display, "Address": address})
    return found


def _text_of_html(text: str) -> str:
    text = _DROP_BLOCKS.sub(" ", text)
    return html_mod.unescape(_TAG.sub(" ", text))


def snippet(text: str, html: str) -> str:
    """Mailpit's snippet: the HTML's text (else the text), spaces collapsed, 200 characters."""
    source = _text_of_html(html) if html.strip() else text
    source = _SPACE.sub(" ", source.replace("\ufeff", " ")).strip()
    return source if len(source) <= SNIPPET_LIMIT else source[:SNIPPET_LIMIT] + "..."


@dataclass(frozen=True, slots=True)
class Part:
    """An attachment or inline part: what Mailpit says of it, not its bytes."""

    part_id: str  # Mailpit's PartID: the MIME path, "2" or "1.2"
    filename: str
    content_type: str
    content_id: str
    size: int
    md5: str
    sha1: str
    sha256: str
    inline: bool

    @classmethod
    def of(cls, part_id: str, filename: str, content_type: str, content_id: str,
           data: bytes, inline: bool) -> Part:
        return cls(part_id, filename, content_type, content_id, len(data),
                   hashlib.md5(data).hexdigest(), hashlib.sha1(data).hexdigest(),
                   hashlib.sha256(data).hexdigest(), inline)

    def json(self) -> JSON:
        return {
            "PartID": self.part_id, "FileName": self.filename, "ContentType": self.content_type,
            "ContentID": self.content_id, "Size": self.size,
            "Checksums": {"MD5": self.md5, "SHA1": self.sha1, "SHA256": self.sha256},
        }


@dataclass(frozen=True, slots=True)
class View:
    """One captured message, read once: what the summary, the full view and search need."""

    id: str
    delivered: float
    size: int
    seen: bool
    message_id: str
    subject: str
    sender: list[JSON]  # From, as Mailpit's From (at most one used)
    to: list[JSON]
    cc: list[JSON]
    bcc: list[JSON]
    reply_to: list[JSON]
    return_path: str
    delivered_to: tuple[str, ...]  # the envelope recipient (Delivered-To)
    date: float | None
    text: str
    html: str
    parts: tuple[Part, ...]
    list_unsubscribe: str
    list_unsubscribe_post: str

    def summary(self) -> JSON:
        """Mailpit's MessageSummary."""
        return {
            "ID": self.id, "MessageID": self.message_id, "Read": self.seen,
            "From": self.sender[0] if self.sender else None, "To": self.to, "Cc": self.cc,
            "Bcc": self.bcc, "ReplyTo": self.reply_to, "Subject": self.subject,
            "Created": timestamp(self.delivered), "Username": "", "Tags": [],
            "Size": self.size, "Attachments": len(self.attachments),
            "Snippet": snippet(self.text, self.html),
        }

    def full(self) -> JSON:
        """Mailpit's Message."""
        links = re.findall(r"<([^>]+)>", self.list_unsubscribe)
        return {
            "ID": self.id, "MessageID": self.message_id,
            "From": self.sender[0] if self.sender else None, "To": self.to, "Cc": self.cc,
            "Bcc": self.bcc, "ReplyTo": self.reply_to, "ReturnPath": self.return_path,
            "Subject": self.subject,
            "ListUnsubscribe": {"Header": self.list_unsubscribe, "Links": links, "Errors": "",
                                "HeaderPost": self.list_unsubscribe_post},
            "Date": timestamp(self.date if self.date is not None else self.delivered),
            "Tags": [], "Username": "", "Text": self.text, "HTML": self.html,
            "Size": self.size, "Inline": [p.json() for p in self.parts if p.inline],
            "Attachments": [p.json() for p in self.attachments],
        }

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self.parts if not p.inline]

    def search_text(self) -> str:
        people = " ".join(_address_text(x) for x in
                          (self.sender, self.to, self.cc, self.bcc, self.reply_to))
        return " ".join((self.subject, people, self.text, _text_of_html(self.html),
                         " ".join(p.filename for p in self.parts))).lower()


def timestamp(seconds: float) -> str:
    """RFC 3339 with milliseconds and the local offset, as Mailpit's JSON times."""
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC).astimezone()
    return when.isoformat(timespec="milliseconds")


def _address_text(addresses: list[JSON]) -> str:
    return " ".join(f"{a['Name']} <{a['Address']}>" for a in addresses)


def _walk(part: EmailMessage, path: str, out: list[tuple[str, EmailMessage]]) -> None:
    if part.is_multipart():
        for i, child in enumerate(part.iter_parts(), 1):
            assert isinstance(child, EmailMessage)
            _walk(child, f"{path}.{i}" if path else str(i), out)
    else:
        out.append((path or "1", part))


def _decoded(part: EmailMessage) -> bytes:
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _text(part: EmailMessage) -> str:
    try:
        content = part.get_content()
    except (LookupError, ValueError, AssertionError):
        content = _decoded(part).decode("utf-8", "replace")
    return content if isinstance(content, str) else ""


_cache: collections.OrderedDict[tuple[str, int], View] = collections.OrderedDict()
_cache_lock = threading.Lock()
CACHE_SIZE = 256


def load(entry: Entry) -> View | None:
    """The message's View, read from its file (None if it is gone meanwhile).

    A Maildir file is never rewritten, so a view is kept by path and size (the last
    CACHE_SIZE of them): a page that refreshes every few seconds parses nothing again.
    """
    key = (entry.path, entry.size)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
    try:
        with open(entry.path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    result = view(entry, raw)
    with _cache_lock:
        _cache[key] = result
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return result


def view(entry: Entry, raw: bytes) -> View:
    """The View of a message whose bytes the caller has read."""
    message = parse(raw)
    message_id, delivered, size, seen = entry.id, entry.delivered, entry.size, entry.seen
    leaves: list[tuple[str, EmailMessage]] = []
    _walk(message, "", leaves)
    text = html = ""
    parts: list[Part] = []
    for part_id, part in leaves:
        disposition = part.get_content_disposition()
        filename = part.get_filename() or ""
        ctype = part.get_content_type()
        if disposition != "attachment" and not filename and ctype in ("text/plain", "text/html"):
            if ctype == "text/plain" and not text:
                text = _text(part)
                continue
            if ctype == "text/html" and not html:
                html = _text(part)
                continue
        if ctype.startswith("multipart/"):
            continue
        content_id = str(part.get("Content-ID", "")).strip().strip("<>")
        parts.append(Part.of(part_id, filename, ctype, content_id, _decoded(part),
                             inline=disposition == "inline" and bool(content_id)))
    to, cc = _addresses(message, "To"), _addresses(message, "Cc")
    shown = {a["Address"].lower() for a in to + cc}
    delivered_to = tuple(str(r).strip() for r in message.get_all("Delivered-To", []))
    bcc = [{"Name": "", "Address": rcpt} for rcpt in delivered_to
           if rcpt.lower() not in shown]
    date = None
    if message.get("Date"):
        try:
            date_value = message["Date"].datetime
            date = date_value.timestamp() if date_value is not None else None
        except (AttributeError, ValueError, TypeError):
            date = None
    return View(
        id=message_id, delivered=delivered, size=size, seen=seen,
        message_id=str(message.get("Message-ID", "")).strip().strip("<>"),
        subject=str(message.get("Subject", "")), sender=_addresses(message, "From"),
        to=to, cc=cc, bcc=bcc, reply_to=_addresses(message, "Reply-To"),
        return_path=str(message.get("Return-Path", "")).strip().strip("<>"),
        delivered_to=delivered_to, date=date,
        text=text, html=html, parts=tuple(parts),
        list_unsubscribe=str(message.get("List-Unsubscribe", "")),
        list_unsubscribe_post=str(message.get("List-Unsubscribe-Post", "")),
    )


def address(value: JSON | None) -> str:
    """``Name <address>`` or the bare address, for one line of text."""
    if not value:
        return ""
    return str(Address(display_name=value["Name"], addr_spec=value["Address"])) \
        if value["Name"] else str(value["Address"])


# ---- search ------------------------------------------------------------------------------


class BadQuery(ValueError):
    """A search query that cannot be understood (a bad size or date)."""


def terms(query: str) -> list[str]:
    return _TERM.findall(query.strip())


def _size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if m is None:
        raise BadQuery(f"bad size {text!r}")
    value = float(f"{m.group(1)}.{m.group(2) or 0}")
    unit = (m.group(3) or "").lower()[:1]
    return int(value * {"": 1, "k": 1024, "m": 1024 * 1024}[unit])


def _date(text: str) -> float:
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise BadQuery(f"bad date {text!r}") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def _term_holds(term: str, v: View) -> bool:
    lowered = term.lower()
    key, colon, arg = lowered.partition(":")
    arg = arg.strip('"')
    fields = {
        "from": v.sender, "to": v.to, "cc": v.cc, "bcc": v.bcc, "reply-to": v.reply_to,
        "addressed": v.sender + v.to + v.cc + v.bcc + v.reply_to,
    }
    if colon and key in fields:
        return arg in _address_text(fields[key]).lower()
    if colon and key == "subject":
        return arg in v.subject.lower()
    if colon and key == "message-id":
        return arg in v.message_id.lower()
    if lowered == "is:read":
        return v.seen
    if lowered == "is:unread":
        return not v.seen
    if lowered in ("has:attachment", "has:attachments"):
        return bool(v.attachments)
    if lowered in ("has:inline", "has:inlines"):
        return any(p.inline for p in v.parts)
    if colon and key == "larger":
        return v.size > _size(arg)
    if colon and key == "smaller":
        return v.size < _size(arg)
    if colon and key == "after":
        return v.delivered >= _date(arg)
    if colon and key == "before":
        return v.delivered <= _date(arg)
    return lowered.strip('"') in v.search_text()


def matches(query: str, v: View) -> bool:
    """Whether the message satisfies every term of a Mailpit search query."""
    for term in terms(query):
        negate = len(term) > 1 and term[0] in "-!"
        if negate:
            term = term[1:]
        if not term.strip('"'):
            continue
        if _term_holds(term, v) == negate:
            return False
    return True


def check_query(query: str) -> None:
    """BadQuery if a term of ``query`` has a size or date that cannot be read."""
    for term in terms(query):
        key, colon, arg = term.lstrip("-!").lower().partition(":")
        if colon and key in ("larger", "smaller"):
            _size(arg.strip('"'))
        elif colon and key in ("after", "before"):
            _date(arg.strip('"'))


def load_all(entries: Iterable[Entry]) -> list[View]:
    """The Views of entries, those removed meanwhile left out."""
    return [v for v in map(load, entries) if v is not None]
