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

The engine hands over what it has read, whole lines at a time (``feed_block``): runs of
plain lines (each ending in CR LF, none starting with a dot, no other CR, no NUL), which
the rules above leave as they are, are stored as they came, in one piece; every other
line goes through ``feed``, one line at a time.  No I/O; a crash here leaves nothing
behind.
"""

from __future__ import annotations

import re

_BARE_CR = re.compile(rb"\r(?!\n)")
# Translation tables for Content._run: 1 for a CR (an LF), 0 for every other octet.
_MARK_CR = bytes(int(octet == 0x0D) for octet in range(256))
_MARK_LF = bytes(int(octet == 0x0A) for octet in range(256))


def _line_dot(block: bytes, pos: int) -> int:
    """Where the first LF followed by "." is, at or after ``pos`` (which is not a dot);
    -1 if nowhere.  A lone "." is found by memchr at once, "\\n." by a search several
    times slower: the first few dots (a header's domains) are looked at one by one, and
    most big content (base64) has no dot at all."""
    at = pos
    for _ in range(8):
        dot = block.find(b".", at)
        if dot < 0:
            return -1
        if block[dot - 1] == 0x0A:
            return dot - 1
        at = dot + 1
    return block.find(b"\n.", at)


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

    def feed_block(self, block: bytes) -> int:
        """Take whole lines (the last may be the first piece of a long line); the offset
        just after the line that ended the data, or -1 if the data goes on.  What comes
        after that line is the client's next input, not the message's."""
        pos, size = 0, len(block)
        while pos < size:
            slow_until = pos
            if not self._carry and not self._continued:
                end, plain = self._run(block, pos)
                if plain:
                    if self._first:
                        self._first = False
                        if block[pos:pos + 1] in (b" ", b"\t"):
                            self._store(b"\r\n")
                    self._store(block[pos:end])
                    self._prev_bare = False
                    pos = end
                    continue
                slow_until = end  # a bare CR or LF, or a NUL, in there: line by line
            while True:
                newline = block.find(b"\n", pos)
                end = size if newline < 0 else newline + 1
                if self.feed(block[pos:end]):
                    return end
                pos = end
                if pos >= slow_until:
                    break
        return -1

    @staticmethod
    def _run(block: bytes, pos: int) -> tuple[int, bool]:
        """The whole lines from ``pos`` up to the next line that starts with a dot, and
        whether ``feed`` would store them unchanged (each ends in CR LF, and there is no
        other CR, no bare LF, no NUL).  (pos, False) when the line at ``pos`` starts
        with a dot or is not whole."""
        if block[pos:pos + 1] == b".":
            return pos, False
        dot = _line_dot(block, pos)
        end = dot + 1 if dot >= 0 else len(block)
        if not block.endswith(b"\n", pos, end):
            end = block.rfind(b"\n", pos, end) + 1  # whole lines only
            if end <= pos:
                return pos, False
        # Every CR is followed by an LF and every LF follows a CR: the octets marked
        # CR, and the octets one further on marked LF, are the same marks.  Two
        # translations and a compare, at C speed (counting CR LF, LF and CR took twice
        # as long).  The run starts a line, so an LF in front is a bare one.
        run = block[pos:end]
        plain = (run[:-1].translate(_MARK_CR) == run[1:].translate(_MARK_LF)
                 and run[:1] != b"\n" and b"\x00" not in run)
        return end, plain

    @property
    def rejected_bare_lf(self) -> bool:
        """``reject`` mode, and a line ended in a bare LF."""
        return self._mode == "reject" and self.bare_lf

    def data(self) -> bytes:
        return b"".join(self._parts)
