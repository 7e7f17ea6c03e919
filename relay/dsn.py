"""RFC 3461 delivery status notification requests: what they mean and how they are written.

Owns the meaning of the DSN values an envelope keeps as text (spool/envelope.py:
``Recipient.dsn_notify`` such as ``"SUCCESS,FAILURE"``, ``"NEVER"`` or ``""``, and
``Envelope.dsn_ret``, ``"FULL"``, ``"HDRS"`` or ``""``): which notices a recipient asked for,
Postfix's numeric flags for them (what postcat shows), the parsing of sendmail's ``-N``
and ``-R`` arguments, and the encodings the SMTP client writes them in: xtext (RFC 3461
section 4) and, for a ``utf-8`` ORCPT, unitext (RFC 6533 section 3).

Never does I/O and never decides what to deliver: the queue manager asks ``wants`` and
the SMTP client asks for the wire forms.  Nothing here can be left half done by a crash.
The rules are Postfix's (global/dsn_mask.c, xtext.c, uxtext.c, smtp/smtp_proto.c).
"""

from __future__ import annotations

import re

__all__ = [
    "DELAY",
    "FAILURE",
    "NEVER",
    "SUCCESS",
    "canonical_notify",
    "notify_flags",
    "orcpt_value",
    "original_recipient",
    "parse_notify",
    "parse_ret",
    "ret_flags",
    "unknown_notify_word",
    "uxtext_encode",
    "wants",
    "xtext_encode",
]

NEVER = "NEVER"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
DELAY = "DELAY"

# Postfix's dsn_notify_table order, which is also the order NOTIFY= is written in.
_NOTIFY_BITS = {NEVER: 1, SUCCESS: 2, FAILURE: 4, DELAY: 8}
_RET_BITS = {"FULL": 1, "HDRS": 2}
# name_mask()'s default delimiters.
_NOTIFY_SPLIT = re.compile(r"[, \t\r\n]+")


def _words(notify: str) -> list[str]:
    return [w for w in _NOTIFY_SPLIT.split(notify.upper()) if w]


def wants(notify: str, condition: str) -> bool:
    """Whether a recipient whose NOTIFY is ``notify`` gets a notice for ``condition``
    (FAILURE, DELAY or SUCCESS).

    No NOTIFY at all means FAILURE and DELAY (RFC 3461 section 4.1 leaves the default to
    the MTA; Postfix's bounce filter lets a recipient without NOTIFY through for failure
    and delay notices, and never sends it a success notice).  NEVER means none.
    """
    words = _words(notify)
    if not words:
        return condition != SUCCESS
    return condition in words and NEVER not in words


def notify_flags(notify: str) -> int:
    """Postfix's DSN_NOTIFY_* bit mask (NEVER 1, SUCCESS 2, FAILURE 4, DELAY 8); 0 = none."""
    flags = 0
    for word in _words(notify):
        flags |= _NOTIFY_BITS.get(word, 0)
    return flags


def ret_flags(ret: str) -> int:
    """Postfix's DSN_RET_* code (FULL 1, HDRS 2); 0 = not given."""
    return _RET_BITS.get(ret.strip().upper(), 0)


def canonical_notify(notify: str) -> str:
    """The NOTIFY list in Postfix's order (NEVER, SUCCESS, FAILURE, DELAY), upper case."""
    words = set(_words(notify))
    return ",".join(w for w in _NOTIFY_BITS if w in words)


def parse_notify(text: str) -> str | None:
    """sendmail -N: ``never`` or a list of ``success``, ``failure``, ``delay`` in any
    case, separated by commas or white space; the canonical upper-case list, or None
    when the value is not valid (an unknown word, NEVER with another, nothing)."""
    words = _words(text)
    if not words or any(w not in _NOTIFY_BITS for w in words):
        return None
    if NEVER in words and any(w != NEVER for w in words):
        return None
    return canonical_notify(text)


def unknown_notify_word(text: str) -> str | None:
    """The first word of a -N value that is no NOTIFY keyword (Postfix warns about it)."""
    for word in _NOTIFY_SPLIT.split(text):
        if word and word.upper() not in _NOTIFY_BITS:
            return word
    return None


def parse_ret(text: str) -> str | None:
    """sendmail -R: ``full`` or ``hdrs`` in any case; FULL, HDRS, or None if neither."""
    value = text.strip().upper()
    return value if value in _RET_BITS else None


def xtext_encode(text: str, special: str = "") -> str:
    """RFC 3461 xtext as Postfix's xtext_quote(): every byte that is not printable
    US-ASCII, '+', and every character in ``special`` becomes ``+XX``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")  # bytes the listener could not decode
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")  # never an exception on the way out
    out: list[str] = []
    for byte in raw:
        ch = chr(byte)
        if 32 < byte < 127 and ch != "+" and ch not in special:
            out.append(ch)
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def uxtext_encode(text: str, special: str = "") -> str:
    r"""RFC 6533 unitext as Postfix's uxtext_quote(): every character that is not
    printable US-ASCII, '\', and every character in ``special`` becomes ``\x{HEX}``."""
    out: list[str] = []
    for ch in text:
        if 32 < ord(ch) < 127 and ch != "\\" and ch not in special:
            out.append(ch)
        else:
            out.append(f"\\x{{{ord(ch):02X}}}")
    return "".join(out)


def original_recipient(dsn_orcpt: str, address: str) -> str:
    """The ORCPT a recipient goes on with, ``addr-type;address`` decoded.

    The client's own when it gave one; else ``rfc822;`` and the address it gave in RCPT
    TO, which RFC 3461 section 5.2.1 allows a relaying MTA to add and Postfix always adds:
    its smtpd records that for every recipient without ORCPT, of type rfc822 even for a
    UTF-8 address (checked against Postfix 3.7.11).
    """
    if dsn_orcpt:
        return dsn_orcpt
    # Our addresses are kept as the client wrote them (quoted where they need it), as
    # Postfix's smtpd takes the RCPT TO argument itself for its made-up ORCPT.
    return f"rfc822;{address}"


def orcpt_value(orcpt: str) -> str | None:
    """The ORCPT parameter value for RCPT TO: the type and address encoded as Postfix
    encodes them (unitext for ``utf-8``, else xtext); None when it cannot be encoded."""
    if not orcpt or ";" not in orcpt:
        return None
    if orcpt[:6].lower() == "utf-8;":
        try:
            orcpt.encode("utf-8")
        except UnicodeEncodeError:
            return None  # a lone surrogate: Postfix's uxtext_quote() fails the same way
        return uxtext_encode(orcpt, "+=")
    return xtext_encode(orcpt, "=")
