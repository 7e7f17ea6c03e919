"""relay.smtp_data against a line-by-line port of Postfix's smtp_text_out(), on any input.

The oracle below is the C loop of src/smtp/smtp_proto.c (Postfix 3.7) transcribed
statement by statement, fed one line (one REC_TYPE_NORM record) at a time, so that the
fast paths and the piecewise work of relay.smtp_data are checked against the rule itself.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp_data import Payload, fold_line, payload


def smtp_text_out(line: bytes, limit: int) -> bytes:
    """One queue file record as Postfix's SMTP client writes it (smtp_fputs adds CRLF)."""
    out = bytearray()
    space_left = limit
    data_left = len(line)
    start = 0
    while True:
        if space_left == limit and data_left > 0 and line[start:start + 1] == b".":
            out += b"."
        if limit > 0 and data_left >= space_left:
            out += line[start:start + space_left] + b"\r\n"
            start += space_left
            data_left -= space_left
            space_left = limit
            if data_left > 0:
                out += b" "
                space_left -= 1
        else:
            out += line[start:start + data_left] + b"\r\n"
            break
        if data_left <= 0:
            break
    return bytes(out)


# Lines made of what matters: dots, spaces, CRs, a multi-byte character, plain letters.
lines = st.lists(st.sampled_from([b".", b" ", b"\r", b"a", b"\xc3\xa9", b"z" * 37]),
                 max_size=120).map(b"".join).filter(lambda line: b"\n" not in line)
limits = st.one_of(st.integers(2, 80), st.sampled_from([0, 998]))


@settings(max_examples=1000, deadline=None)
@given(st.lists(lines, max_size=12), limits, st.integers(1, 300))
def test_payload_is_postfix_smtp_text_out_line_by_line(
        body: list[bytes], limit: int, chunk: int) -> None:
    message = b"".join(line + b"\r\n" for line in body)
    expected = b"".join(smtp_text_out(line, limit) for line in body)
    pieces = list(Payload(message, limit).chunks(chunk))
    assert b"".join(pieces) == expected
    assert payload(message, limit) == expected


@settings(max_examples=1000, deadline=None)
@given(lines, st.integers(2, 60))
def test_no_line_is_longer_than_the_limit_and_unbreaking_gives_the_line(
        line: bytes, limit: int) -> None:
    pieces = fold_line(line, limit).split(b"\r\n")
    stuffed = line.startswith(b".")
    # The added dot is the only octet beyond the limit, and only on the first piece.
    assert len(pieces[0]) <= limit + stuffed
    assert all(len(p) <= limit and p.startswith(b" ") for p in pieces[1:])
    assert all(len(p) > 1 for p in pieces[1:])  # never an empty continuation
    first = pieces[0][1:] if stuffed else pieces[0]
    assert first + b"".join(p[1:] for p in pieces[1:]) == line


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), limits, st.integers(1, 500))
def test_any_bytes_chunked_equal_whole_and_end_with_crlf(
        message: bytes, limit: int, chunk: int) -> None:
    whole = payload(message, limit)
    piecewise = Payload(message, limit)
    assert b"".join(piecewise.chunks(chunk)) == whole
    assert whole == b"" if not message else whole.endswith(b"\r\n")
    # No line of the payload starts with a lone dot that a receiver would take for the end.
    assert b"\n.\r\n" not in b"\n" + whole


def line_by_line(message: bytes, limit: int) -> bytes:
    """The module's rule applied to one line at a time, with no fast path: a line ends at
    LF, a CR before it is its line end, and every line is dot-stuffed and broken."""
    if not message:
        return b""
    out = []
    for line in message.split(b"\n"):
        end = b"\r" if line.endswith(b"\r") else b""
        out.append(fold_line(line[:-1] if end else line, limit) + end)
    whole = b"\n".join(out)
    return whole if whole.endswith(b"\r\n") else whole + b"\r\n"


# Lines of every length around the limits below, dots and bare LFs among them.
mixed = st.lists(st.sampled_from([b".", b"\n", b"\r\n", b"\r", b"a", b"x" * 9, b"\n."]),
                 max_size=200).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(mixed, st.one_of(st.integers(2, 40), st.sampled_from([0, 998])), st.integers(1, 300))
def test_fast_path_is_the_line_by_line_rule_with_bare_lfs_and_dots(
        message: bytes, limit: int, chunk: int) -> None:
    assert b"".join(Payload(message, limit).chunks(chunk)) == line_by_line(message, limit)
