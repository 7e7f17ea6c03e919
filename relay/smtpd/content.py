"""The DATA phase's content: where it ends, and what is stored (RFC 5321 §4.1.4, §4.5.2).

It owns the rules Postfix 3.7's smtpd applies to message content, line by line, as
``receive_data_message`` does:

- A line ends at LF, with or without a CR before it; every stored line ends in CR LF.
  A CR not followed by LF is stored as CR LF too, so that a next hop that takes a bare CR
  for a line end can never see an end of data we did not see (SMTP smuggling).
- A leading dot is removed (transparency); a line that is then empty ends the data.
- ``smtpd_forbid_bare_newline`` (``Client.bare_newline``): with ``normalize`` or
  ``reject`` only the standard CR LF . CR LF ends the data, and a lone dot on a line that
  ends in a bare LF, or follows one, is dropped (neither stored nor an end); ``reject``
  also refuses the message at the end when any line ended in a bare LF; ``no`` ends the
  data at any lone dot.
- Lines of any length are accepted, as Postfix accepts them (the reader hands over long
  lines in pieces, so memory per piece stays bounded); the SMTP client breaks them at
  smtp_line_length_limit on the way out.
- Content that starts with white space gets an empty line first, so it is body, never a
  continuation of the Received: header put on top (Postfix does the same).
- Content beyond message_size_limit is read and thrown away; a NUL is noted.

No I/O: the engine hands over each line as read; a crash here leaves nothing behind.
"""

from __future__ import annotations

import re

_BARE_CR = re.compile(rb"\r(?!\n)")


class Content:
    """Collects one message's content from the lines of the DATA phase."""

    __slots__ = (
        "_carry",
        "_continued",
        "_first",
        "_limit",
        "_mode",
        "_parts",
        "_prev_bare",
        "bare_lf",
        "nul",
        "size",
        "too_big",
    )

    def __init__(self, bare_newline: str, size_limit: int) -> None:
        self._mode = bare_newline
        self._limit = size_limit  # 0: no limit
        self._parts: list[bytes] = []
        self._carry = b""  # a CR that ended a piece of a long line: its LF may follow
        self._continued = False  # the last piece was not a whole line
        self._prev_bare = False
        self._first = True
        self.size = 0
        self.too_big = False
        self.bare_lf = False
        self.nul = False

    def feed(self, piece: bytes) -> bool:
        """Take the next line (ending in LF) or piece of a long line; True at the end
        of the data."""
        if self._carry:
            piece, self._carry = self._carry + piece, b""
        complete = piece.endswith(b"\n")
        if complete:
            bare = not piece.endswith(b"\r\n")
            text = piece[:-1] if bare else piece[:-2]
        else:
            bare = False
            text = piece
            if text.endswith(b"\r"):
                text, self._carry = text[:-1], b"\r"
        if not self._continued and text[:1] == b".":
            if complete and text == b".":
                if self._mode != "no" and (bare or self._prev_bare):
                    self._prev_bare = bare
                    self.bare_lf = True
                    return False  # not the standard end of data: dropped, as Postfix does
                return True
            text = text[1:]
        if complete and bare:
            self.bare_lf = True
        self._continued = not complete
        if complete:
            self._prev_bare = bare
        if b"\x00" in text:
            self.nul = True
        if b"\r" in text:
            text = _BARE_CR.sub(b"\r\n", text)
        if self._first:
            self._first = False
            if text[:1] in (b" ", b"\t"):
                self._store(b"\r\n")
        self._store(text + b"\r\n" if complete else text)
        return False

    def _store(self, data: bytes) -> None:
        if self.too_big:
            return
        self.size += len(data)
        if self._limit and self.size > self._limit:
            self.too_big = True
            self._parts.clear()
            return
        self._parts.append(data)

    @property
    def rejected_bare_lf(self) -> bool:
        """``reject`` mode, and a line ended in a bare LF."""
        return self._mode == "reject" and self.bare_lf

    def data(self) -> bytes:
        return b"".join(self._parts)
