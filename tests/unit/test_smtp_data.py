"""relay.smtp_data: the DATA payload, dot-stuffed and with long lines broken as Postfix does.

The reference is Postfix 3.7.11's own output (tests/golden/postfix-3.7/
long-lines-at-next-hop.txt: what its SMTP client sent to smtp-sink -d): a 1,214-octet
Subject: and body lines of 1,500 and 5,000 octets, every line sent at most 998 octets long.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.smtp_data import Payload, fold_line, payload

REFERENCE = (Path(__file__).resolve().parents[1] / "golden" / "postfix-3.7"
             / "long-lines-at-next-hop.txt")


def reference_lines() -> list[bytes]:
    return REFERENCE.read_bytes().split(b"\n")


def unbroken(lines: list[bytes]) -> bytes:
    """One original line from its first piece and its CRLF SPACE continuations."""
    return lines[0] + b"".join(line[1:] for line in lines[1:])


def test_reference_header_and_body_lines_are_broken_exactly_as_postfix_does() -> None:
    ref = reference_lines()
    # Lines 14-15: the Subject header; 20-21 and 22-27: the two long body lines.
    subject, a_line, digits = unbroken(ref[13:15]), unbroken(ref[19:21]), unbroken(ref[21:27])
    assert (len(subject), len(a_line), len(digits)) == (1214, 1500, 5000)
    message = (b"From: a@bar.test\r\nTo: b@far.test\r\n" + subject + b"\r\n"
               b"Message-ID: <long-smtp@bar.test>\r\n\r\nbar-tag: long-smtp\r\n"
               + a_line + b"\r\n" + digits + b"\r\nEND-OF-MESSAGE long-smtp\r\n")
    expected = b"".join(line + b"\r\n" for line in
                        [*ref[11:13], *ref[13:15], ref[15], b"", *ref[18:28]])
    assert payload(message, 998) == expected


def test_a_line_of_exactly_the_limit_goes_out_whole() -> None:
    assert payload(b"x" * 998 + b"\r\n", 998) == b"x" * 998 + b"\r\n"
    assert payload(b"x" * 999 + b"\r\n", 998) == b"x" * 998 + b"\r\n x\r\n"


def test_no_empty_continuation_when_a_piece_ends_the_line() -> None:
    # 998 + 997: the second piece fills its line exactly; nothing follows it.
    assert payload(b"y" * 1995 + b"\r\n", 998) == b"y" * 998 + b"\r\n " + b"y" * 997 + b"\r\n"
    assert payload(b"y" * 1996 + b"\r\n", 998).endswith(b"\r\n y\r\n")


def test_leading_dot_is_stuffed_and_does_not_count_towards_the_limit() -> None:
    # smtp_text_out() writes the extra dot before it counts the line: 999 octets on the wire.
    line = b"." + b"z" * 998
    out = payload(line + b"\r\n", 998).split(b"\r\n")
    assert out == [b"." + line[:998], b" " + line[998:], b""]
    assert payload(b".\r\n..\r\nx\r\n", 998) == b"..\r\n...\r\nx\r\n"


def test_continuations_are_never_dot_stuffed() -> None:
    line = b"a" * 998 + b"." * 5
    assert payload(line + b"\r\n", 998) == b"a" * 998 + b"\r\n ....." + b"\r\n"


def test_zero_turns_breaking_off_but_not_dot_stuffing() -> None:
    message = b"x" * 5000 + b"\r\n.y\r\n"
    assert payload(message, 0) == b"x" * 5000 + b"\r\n..y\r\n"


def test_payload_ends_with_crlf_even_after_a_bare_lf() -> None:
    assert payload(b"abc", 998) == b"abc\r\n"
    assert payload(b"abc\n", 998) == b"abc\n\r\n"
    assert payload(b"", 998) == b""


def test_bare_lf_ends_a_line_and_is_kept() -> None:
    # The receiver counts from LF; a bare LF line is broken and stuffed like any other.
    assert payload(b"x" * 1000 + b"\n.z\r\n", 998) == \
        b"x" * 998 + b"\r\n xx\n..z\r\n"


def test_a_cr_inside_a_line_is_an_octet_of_it() -> None:
    line = b"a\rb" * 400  # 1200 octets, no line end inside
    out = payload(line + b"\r\n", 998)
    assert out == line[:998] + b"\r\n " + line[998:] + b"\r\n"


@pytest.mark.parametrize("limit", [1, 2])
def test_tiny_limits_still_make_progress(limit: int) -> None:
    assert fold_line(b"abcd", limit) == b"ab\r\n c\r\n d"


def test_big_message_is_worked_through_in_pieces_cut_after_lf() -> None:
    line = b"0123456789" * 150  # 1500 octets
    message = (line + b"\r\n") * 200
    pieces = list(Payload(message, 998).chunks(4096))
    assert len(pieces) > 50
    assert all(piece.endswith(b"\n") for piece in pieces)
    assert b"".join(pieces) == payload(message, 998)
    assert b"".join(pieces) == (line[:998] + b"\r\n " + line[998:] + b"\r\n") * 200


def test_broken_is_reported_only_when_a_line_was_broken() -> None:
    quiet = Payload(b"x" * 998 + b"\r\n" + b"y" * 10 + b"\r\n", 998)
    quiet.whole()
    assert not quiet.broken
    loud = Payload(b"short\r\n" + b"x" * 999 + b"\r\n", 998)
    loud.whole()
    assert loud.broken
    off = Payload(b"x" * 5000 + b"\r\n", 0)
    off.whole()
    assert not off.broken
