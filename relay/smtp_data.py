"""The message as the SMTP client writes it after DATA: dot-stuffed, long lines broken.

Owns the transformation of a queued message (CRLF lines) into the DATA payload, as
Postfix's SMTP client does it in smtp_text_out() (src/smtp/smtp_proto.c):

- A line that starts with "." gets another "." in front (RFC 5321 section 4.5.2).  The
  added dot does not count towards the line length limit, as in Postfix.
- A line longer than ``limit`` octets (``smtp_line_length_limit``, 998 by default, so that
  a line with its CRLF fits RFC 5321's 1000; the CRLF is not counted) is broken: after
  the first ``limit`` octets comes CRLF SPACE, and every further piece holds at most
  ``limit - 1`` octets after its leading space, so that no line sent is longer than the
  limit.  A line of exactly ``limit`` octets goes out whole, and a break never leaves an
  empty continuation.  The continuation lines start with a space, so they never need
  dot-stuffing, and in a header they are folded header lines (RFC 5322 section 2.2.3).
  Headers and body are treated alike.  ``limit`` 0 turns breaking off.
- The payload ends with CRLF; the final "." is the caller's.

A line is what ends at LF; a CR before that LF is part of the line end, a CR elsewhere is
an octet of the line.  Bytes are never decoded: a break may fall inside a multi-byte
character, as Postfix warns in its source.

Pure: no I/O.  ``Payload.chunks`` works through the message a piece at a time, so a big
message is never copied whole; only the piece being written exists twice.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["CHUNK", "Payload", "fold_line", "payload"]

# About this many bytes of the message are worked on, and handed out, at a time.
CHUNK = 64 * 1024



def fold_line(line: bytes, limit: int) -> bytes:
    """One line, without its line end, as it goes out: dot-stuffed, and broken with CRLF
    SPACE where it is longer than ``limit`` octets (0: never broken).

    A ``limit`` of 1 would leave no room after the inserted space (Postfix's loop never
    ends then); it works as 2.
    """
    stuffed = b"." if line[:1] == b"." else b""
    if limit <= 0 or len(line) <= limit:
        return stuffed + line
    limit = max(limit, 2)
    step = limit - 1
    pieces = [stuffed + line[:limit]]
    pieces += [b" " + line[start:start + step] for start in range(limit, len(line), step)]
    return b"\r\n".join(pieces)


class Payload:
    """The DATA payload of one message, made a piece at a time as it is written.

    ``broken`` becomes True once a piece had a line to break (Postfix logs that once per
    message); it is final after the last piece was taken.
    """

    __slots__ = ("broken", "limit", "message")

    def __init__(self, message: bytes, limit: int) -> None:
        self.message = message
        self.limit = limit
        self.broken = False

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        """The payload in pieces of about ``chunk`` bytes (longer where a line is), each
        cut after an LF; together they end with CRLF (the final dot is the caller's)."""
        message = self.message
        start = 0
        size = len(message)
        while start < size:
            cut = message.find(b"\n", min(start + chunk, size) - 1)
            end = size if cut < 0 else cut + 1
            out = self._piece_out(message[start:end])
            if end == size and not out.endswith(b"\r\n"):
                out += b"\r\n"  # also after a bare LF: the final dot needs CRLF before it
            yield out
            start = end

    def whole(self) -> bytes:
        """The payload at once (for a small message)."""
        return b"".join(self.chunks())

    def _piece_out(self, piece: bytes) -> bytes:
        """A run of whole lines (the last may lack its LF) as they go out."""
        limit = self.limit
        if limit > 0 and _has_long_line(piece, limit):
            # A line's length here includes the CR of its CRLF, so a line of exactly
            # ``limit`` octets takes this path too; it comes out unchanged.
            out = []
            for line in piece.split(b"\n"):
                end = b"\r" if line.endswith(b"\r") else b""
                text = line[:-1] if end else line
                if len(text) > limit:
                    self.broken = True
                out.append(fold_line(text, limit) + end)
            return b"\n".join(out)
        # A piece starts a line (chunks are cut after an LF): its first octet, and every
        # octet after an LF, starts one.  After every LF, not only CRLF: should a bare LF
        # ever reach us, a receiver that ends lines at LF must not see "\n.\r\n" as the
        # end of the data (SMTP smuggling).  bytes.replace scans at C speed (a multi-line
        # regex tried every position: a quarter of the queue manager's time on 100 KiB
        # messages).
        stuffed = piece.replace(b"\n.", b"\n..")
        return b"." + stuffed if stuffed[:1] == b"." else stuffed


def _has_long_line(piece: bytes, limit: int) -> bool:
    """True if a line of ``piece`` (what lies between LFs, a CR included) is longer than
    ``limit`` octets.  Looks for the last LF within each ``limit + 1`` octets, so it
    takes about ``len(piece) / limit`` searches, and builds nothing."""
    pos, size = 0, len(piece)
    while size - pos > limit:
        newline = piece.rfind(b"\n", pos, pos + limit + 1)
        if newline < 0:
            return True
        pos = newline + 1
    return False


def payload(message: bytes, limit: int) -> bytes:
    """The whole DATA payload of ``message`` (without the final dot)."""
    return Payload(message, limit).whole()
