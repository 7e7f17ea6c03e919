"""relay.smtpd.policy and relay.smtpd.content without a socket: the listener's decisions as
pure functions, and the DATA framing against an independent model of Postfix's."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import NetworkMatcher
from relay.smtpd import policy, replies
from relay.smtpd.content import Content
from relay.smtpd.policy import MailParameters, Path, RcptParameters, SmtpdSettings
from tests.support.smtp_model import stored_content


def nets(*cidrs: str) -> NetworkMatcher:
    return NetworkMatcher(tuple((False, ipaddress.ip_network(c)) for c in cidrs))


SETTINGS = SmtpdSettings(myhostname="relay.test", mynetworks=nets("192.0.2.0/24"),
                         relay_domains=("example.com",))


# ---- paths and addresses -------------------------------------------------------------------


@pytest.mark.parametrize("arg,path", [
    ("FROM:<a@b.example>", Path("a@b.example", (), False)),
    ("from: <a@b.example> SIZE=10 BODY=8BITMIME", Path("a@b.example", ("SIZE=10", "BODY=8BITMIME"),
                                                      False)),
    ("FROM:<>", Path("", (), False)),
    ("FROM:a@b.example", Path("a@b.example", (), False)),
    ('FROM:<"a> b"@c.example>', Path('"a> b"@c.example', (), False)),
    ("FROM:<@x.example,@y.example:a@b.example>", Path("a@b.example", (), True)),
])
def test_parse_path(arg: str, path: Path) -> None:
    assert policy.parse_path(arg, "FROM:") == path


@pytest.mark.parametrize("arg", ["TO:<a@b>", "FROM", "FROM:", "FROM:  "])
def test_parse_path_refuses_other_shapes(arg: str) -> None:
    assert policy.parse_path(arg, "FROM:") is None


@pytest.mark.parametrize("address", ["a@b.example", "first.last@b.example", '"a b"@c.example',
                                     "üser@exämple.de", "a+tag@[192.0.2.1]", "postmaster"])
def test_good_addresses(address: str) -> None:
    assert policy.address_error(address, sender=False) is None


@pytest.mark.parametrize("address", ["a@@b.example", "a@b..example", "a b@c.example",
                                     "@b.example", "a<b@c.example", "a@b.example>",
                                     "a\rb@c.example", "a@b\x7f.example", "l" * 65 + "@b.example"])
def test_bad_addresses(address: str) -> None:
    assert policy.address_error(address, sender=True).startswith(replies.BAD_SENDER)
    assert policy.address_error(address, sender=False).startswith(replies.BAD_RECIPIENT)


def test_ipv4_mapped_addresses_are_ipv4() -> None:
    assert policy.normal_address("::ffff:a09:905") == "10.9.9.5"
    assert policy.normal_address("::ffff:10.9.9.5") == "10.9.9.5"
    assert policy.normal_address("2001:db8::1") == "2001:db8::1"
    client = policy.client_for(SETTINGS, "::ffff:192.0.2.7")
    assert (client.address, client.trusted, client.namaddr) == (
        "192.0.2.7", True, "unknown[192.0.2.7]")


def test_bare_newline_exclusions() -> None:
    assert policy.client_for(SETTINGS, "192.0.2.7").bare_newline == "no"  # mynetworks
    assert policy.client_for(SETTINGS, "198.51.100.1").bare_newline == "normalize"
    strict = SmtpdSettings(myhostname="relay.test", mynetworks=nets("192.0.2.0/24"),
                           bare_newline="reject", bare_newline_exclusions=NetworkMatcher(()))
    assert policy.client_for(strict, "192.0.2.7").bare_newline == "reject"


# ---- parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("text,decoded", [("abc", "abc"), ("a+2Bb+3Dc", "a+b=c"),
                                          ("+C3+A9", "é"), ("", "")])
def test_xtext(text: str, decoded: str) -> None:
    assert policy.xtext_decode(text) == decoded


@pytest.mark.parametrize("text", ["a+", "a+2", "a+zz", "a=b", "a b", "caf\u00e9", "+FF"])
def test_not_xtext(text: str) -> None:
    assert policy.xtext_decode(text) is None


def test_mail_parameters() -> None:
    assert policy.parse_mail_parameters(
        ["size=123", "body=8bitmime", "SMTPUTF8", "RET=hdrs", "ENVID=x+2By", "AUTH=a+40b"]) == \
        MailParameters(123, "8BITMIME", True, "HDRS", "x+y", "a+40b")
    assert policy.parse_mail_parameters(["AUTH=<>"]) == MailParameters()
    assert policy.parse_mail_parameters(["XYZ"]) == "555 5.5.4 Unsupported option: XYZ"


def test_rcpt_parameters() -> None:
    assert policy.parse_rcpt_parameters(["NOTIFY=delay,success", "ORCPT=rfc822;a+40b@c"]) == \
        RcptParameters("SUCCESS,DELAY", "rfc822;a@b@c")
    assert policy.parse_rcpt_parameters([r"ORCPT=utf-8;us\x{E9}r@c"]) == \
        RcptParameters("", "utf-8;usér@c")
    assert policy.parse_rcpt_parameters(["NOTIFY=NEVER,DELAY"]) == replies.BAD_NOTIFY


# ---- relay control -------------------------------------------------------------------------


@pytest.mark.parametrize("client,user,recipient,route,reply", [
    ("192.0.2.7", "", "a@other.org", False, None),  # mynetworks
    ("198.51.100.1", "alice", "a@other.org", False, None),  # authenticated
    ("198.51.100.1", "", "a@example.com", False, None),  # relay_domains
    ("198.51.100.1", "", "a@sub.example.com", False, None),
    ("198.51.100.1", "", "a@other.org", False, "554 5.7.1 <a@other.org>: Relay access denied"),
    ("198.51.100.1", "", "a%other.org@example.com", False, "554 5.7.1"),
    ("198.51.100.1", "", "a@example.com", True, "554 5.7.1"),  # source route
])
def test_relay_check(client: str, user: str, recipient: str, route: bool,
                     reply: str | None) -> None:
    got = policy.relay_check(SETTINGS, policy.client_for(SETTINGS, client), user, recipient,
                             route)
    if reply is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reply)


def test_space_and_size() -> None:
    s = SmtpdSettings(myhostname="relay.test", message_size_limit=1000, queue_minfree=500)
    assert policy.enough_space(s, 2250, None)  # 1.5 x (1000 + 500)
    assert not policy.enough_space(s, 2249, None)
    assert policy.enough_space(s, 1000, 100)
    assert policy.enough_space(s, -1, None)  # unknown: no refusal
    assert policy.too_big(s, 1001) and not policy.too_big(s, 1000)


def test_pipelining() -> None:
    assert policy.unauthorised_pipelining("EHLO", "x", True)
    assert not policy.unauthorised_pipelining("EHLO", "x", False)
    assert not policy.unauthorised_pipelining("MAIL", "FROM:<a@b>", True)
    assert not policy.unauthorised_pipelining("AUTH", "PLAIN AGEAYg==", True)
    assert policy.unauthorised_pipelining("AUTH", "LOGIN", True)


# ---- DATA framing against the model -------------------------------------------------------

PIECES = st.sampled_from([b"x", b"yy", b".", b"..", b"\r", b"\n", b"\r\n", b"\x00", b" ", b"z" * 70])


def framed(wire: bytes, mode: str, chunk: int) -> bytes | None:
    """Feed ``wire`` to Content the way the engine does: lines up to LF, long ones in
    pieces of at most ``chunk`` octets (the engine's pieces are 64 KiB: a lone dot line,
    three octets, is never cut)."""
    content = Content(mode, 0)
    rest = wire
    while rest:
        end = rest.find(b"\n")
        size = end + 1 if 0 <= end < chunk else min(chunk, len(rest))
        piece, rest = rest[:size], rest[size:]
        if content.feed(piece):
            return None
    return content.data()


@given(st.lists(PIECES, max_size=30).map(b"".join), st.sampled_from(["normalize", "no"]),
       st.integers(min_value=3, max_value=80))
def test_content_is_the_model(wire: bytes, mode: str, chunk: int) -> None:
    wire += b"\r\n"
    assert framed(wire, mode, chunk) == stored_content(wire, mode)


def test_content_limits_and_flags() -> None:
    content = Content("reject", 10)
    for line in (b"12345\r\n", b"\x00\r\n", b"x\n"):
        assert not content.feed(line)
    assert content.feed(b".\r\n") is False  # a lone dot after a bare LF is dropped
    assert content.feed(b"a\r\n") is False
    assert content.feed(b".\r\n")
    assert content.too_big and content.rejected_bare_lf and content.nul
