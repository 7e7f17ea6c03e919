"""relay.smtpd.content: what the listener stores is the same whether the DATA phase comes
a line at a time (``feed``, the rule itself) or in blocks of whole lines (``feed_block``,
which stores runs of plain lines in one piece), on any input, cut anywhere.

The input is made of what matters to the rules: dots at line starts and inside lines
(a header's domains, many before the first dot at a line start), bare CRs and LFs,
NULs, white space first, the end-of-data line in its every form, and what a client may
pipeline after it; the reader's cuts are any offsets, with a long line coming in pieces
as the engine hands it over (READ_LIMIT stands for the engine's)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtpd.content import Content

READ_LIMIT = 16  # the engine's longest piece, small here so that pieces happen

atoms = st.sampled_from([b".", b"..", b"\r\n", b"\n", b"\r", b"\x00", b" ", b"\t", b"a",
                         b"xyz", b"\r\n.\r\n", b"\n.\n", b"\r\n.\n", b"\n.\r\n",
                         b"line of text\r\n", b"QUIT\r\n", b"mx.a.b.example.org.\r\n"])
streams = st.lists(atoms, max_size=60).map(b"".join)
modes = st.sampled_from(["normalize", "reject", "no"])
limits = st.sampled_from([0, 10, 40])


def pieces_of(data: bytes) -> list[bytes]:
    """The engine's read_line(): a line with its LF, or a READ_LIMIT piece of a long one."""
    out, pos = [], 0
    while pos < len(data):
        newline = data.find(b"\n", pos, pos + READ_LIMIT)
        end = newline + 1 if newline >= 0 else min(pos + READ_LIMIT, len(data))
        out.append(data[pos:end])
        pos = end
    return out


def by_lines(data: bytes, mode: str, limit: int) -> tuple[Content, int]:
    content, used = Content(mode, limit), 0
    for piece in pieces_of(data):
        used += len(piece)
        if content.feed(piece):
            return content, used
    return content, -1


def by_blocks(data: bytes, mode: str, limit: int, cuts: list[int]) -> tuple[Content, int]:
    """Blocks as the engine's read_lines() makes them: whole lines (or one piece of a
    long one), cut at the given offsets as the network delivered them."""
    content, pos = Content(mode, limit), 0
    while pos < len(data):
        arrived = min(len(data), pos + max(1, cuts.pop() if cuts else len(data)))
        last = data.rfind(b"\n", pos, min(arrived, pos + READ_LIMIT * 4))
        end = last + 1 if last >= pos else pieces_of(data[pos:])[0].__len__() + pos
        done = content.feed_block(data[pos:end])
        if done >= 0:
            return content, pos + done
        pos = end
    return content, -1


def state(c: Content) -> tuple[object, ...]:
    # Past the size limit nothing is kept, and the size no longer counts for anything.
    return (c.data(), None if c.too_big else c.size, c.too_big, c.bare_lf, c.nul,
            c.rejected_bare_lf)


@settings(max_examples=3000, deadline=None)
@given(streams, modes, limits, st.lists(st.integers(1, 40), max_size=30))
def test_blocks_store_what_lines_store(data: bytes, mode: str, limit: int,
                                       cuts: list[int]) -> None:
    lines, used_lines = by_lines(data, mode, limit)
    blocks, used_blocks = by_blocks(data, mode, limit, cuts)
    assert used_blocks == used_lines
    assert state(blocks) == state(lines)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 20), st.sampled_from([b".", b"..", b".x", b"x."]), modes)
def test_a_dot_at_a_line_start_after_many_dots_inside_lines(
        dotted: int, start: bytes, mode: str) -> None:
    """One block with many dots inside its first lines (a header's domains) before a line
    that starts with a dot: the first dots are looked at one by one, the rest searched."""
    data = (b"Received: from a.b.c.example.org (d.e.f.example.net.)\r\n"
            + b"x" * dotted + b".y.z.\r\n" + start + b"\r\nafter\r\n.\r\n")
    lines, used_lines = by_lines(data, mode, 0)
    blocks = Content(mode, 0)
    assert blocks.feed_block(data) == used_lines
    assert state(blocks) == state(lines)
