"""A model of what the listener stores for DATA content, for tests to predict it.

``stored_content`` reads the bytes a client sent after DATA as Postfix 3.7's smtpd does
(receive_data_message): lines end at LF, with or without a CR before it; a leading dot is
removed; a lone dot ends the data, except that under ``normalize`` and ``reject`` a lone
dot on a line ending in a bare LF, or following one, is dropped (neither content nor the
end); every stored line ends in CR LF, and so does a bare CR (relay's own rule against
SMTP smuggling); content that starts with white space gets an empty line first.  It is written apart from relay.smtpd.content on purpose: the tests compare
the two.
"""

from __future__ import annotations

import re


def stored_content(wire: bytes, mode: str = "normalize") -> bytes | None:
    """What is stored for DATA content ``wire`` (its final dot line not included) under
    smtpd_forbid_bare_newline ``mode``; None when the data would end inside ``wire``."""
    out = []
    prev_bare = False
    for piece in re.findall(rb"[^\n]*\n|[^\n]+$", wire):
        complete = piece.endswith(b"\n")
        bare = complete and not piece.endswith(b"\r\n")
        text = piece[:-1] if bare else piece[:-2] if complete else piece
        if text.startswith(b"."):
            if complete and text == b".":
                if mode != "no" and (bare or prev_bare):
                    prev_bare = bare
                    continue
                return None
            text = text[1:]
        out.append(text + (b"\r\n" if complete else b""))
        if complete:
            prev_bare = bare
    if out and out[0][:1] in (b" ", b"\t"):
        out.insert(0, b"\r\n")
    return re.sub(rb"\r(?!\n)", b"\r\n", b"".join(out))
