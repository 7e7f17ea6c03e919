"""relay.dsn: RFC 3461 values, Postfix's flags and encodings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import dsn


@pytest.mark.parametrize(("notify", "failure", "delay", "success"), [
    ("", True, True, False),  # none given: FAILURE,DELAY, as Postfix
    ("NEVER", False, False, False),
    ("SUCCESS", False, False, True),
    ("FAILURE", True, False, False),
    ("DELAY", False, True, False),
    ("SUCCESS,FAILURE", True, False, True),
    ("FAILURE,DELAY,SUCCESS", True, True, True),
    ("success,delay", False, True, True),
])
def test_wants(notify: str, failure: bool, delay: bool, success: bool) -> None:
    assert dsn.wants(notify, dsn.FAILURE) is failure
    assert dsn.wants(notify, dsn.DELAY) is delay
    assert dsn.wants(notify, dsn.SUCCESS) is success


def test_postfix_flags() -> None:
    # As postcat shows them: notify_flags=6 for SUCCESS,FAILURE, ret_flags=2 for HDRS.
    assert dsn.notify_flags("SUCCESS,FAILURE") == 6
    assert dsn.notify_flags("NEVER") == 1
    assert dsn.notify_flags("DELAY") == 8
    assert dsn.notify_flags("SUCCESS,DELAY") == 10
    assert dsn.notify_flags("") == 0
    assert (dsn.ret_flags("FULL"), dsn.ret_flags("HDRS"), dsn.ret_flags("")) == (1, 2, 0)


@pytest.mark.parametrize(("text", "parsed"), [
    ("never", "NEVER"),
    ("success,failure", "SUCCESS,FAILURE"),
    ("delay, Success", "SUCCESS,DELAY"),  # Postfix's order, any case, blanks too
    ("FAILURE", "FAILURE"),
    ("never,success", None),
    ("sometimes", None),
    ("success,maybe", None),
    ("", None),
    (" , ", None),
])
def test_parse_notify_as_sendmail_minus_n(text: str, parsed: str | None) -> None:
    assert dsn.parse_notify(text) == parsed


def test_parse_ret_and_the_unknown_word() -> None:
    assert (dsn.parse_ret("hdrs"), dsn.parse_ret("Full"), dsn.parse_ret("all")) == \
        ("HDRS", "FULL", None)
    assert dsn.unknown_notify_word("success,maybe") == "maybe"
    assert dsn.unknown_notify_word("success") is None


def test_xtext_as_postfix_quotes_envid_and_orcpt() -> None:
    assert dsn.xtext_encode("my+env=id", "+=") == "my+2Benv+3Did"
    assert dsn.orcpt_value("rfc822;orig+x@far.test") == "rfc822;orig+2Bx@far.test"
    assert dsn.xtext_encode("a b\x01é") == "a+20b+01+C3+A9"
    assert dsn.orcpt_value("utf-8;ü+x@y") == "utf-8;\\x{FC}\\x{2B}x@y"
    assert dsn.orcpt_value("") is None
    assert dsn.orcpt_value("no-type") is None


def test_original_recipient_made_up_as_postfix_smtpd_does() -> None:
    assert dsn.original_recipient("", "bob@example.net") == "rfc822;bob@example.net"
    assert dsn.original_recipient("rfc822;Bob@Example.NET", "bob@example.net") == \
        "rfc822;Bob@Example.NET"
    # Of type rfc822 even when it is UTF-8, as Postfix's smtpd makes it up.
    assert dsn.original_recipient("", "jörg@example.net") == "rfc822;jörg@example.net"


@given(st.text())
def test_xtext_round_trips(text: str) -> None:
    encoded = dsn.xtext_encode(text, "+=")
    assert encoded.isascii() and all(32 < ord(c) < 127 and c != "=" for c in encoded)
    raw = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == "+":
            raw.append(int(encoded[i + 1:i + 3], 16))
            i += 3
        else:
            raw.append(ord(encoded[i]))
            i += 1
    assert bytes(raw) == text.encode("utf-8", "surrogateescape")
