"""Routing to Maildirs: the ``maildir:`` next hop, ``default_transport`` as Postfix reads it
(its next hop wins over relayhost), and capture (every recipient into one Maildir)."""

from __future__ import annotations

import pytest

from relay.routing import NextHop, RouteError, Router, Transport, parse_next_hop


def test_maildir_next_hop() -> None:
    hop = parse_next_hop("maildir:/var/mail/dev/", "example.com")
    assert hop == NextHop(Transport.MAILDIR, "", 0, False, "/var/mail/dev")
    assert hop.label == "maildir"
    assert hop.destination == "maildir:/var/mail/dev"


@pytest.mark.parametrize(("value", "message"), [
    ("maildir:", "maildir: needs a directory"),
    ("maildir:relative/dir", "the Maildir must be an absolute path"),
])
def test_bad_maildir_next_hop(value: str, message: str) -> None:
    with pytest.raises(RouteError, match=message):
        parse_next_hop(value, "example.com")


def test_transport_maps_entry_to_a_maildir() -> None:
    router = Router(["inline:{ example.test = maildir:/tmp/m }"])
    assert router.next_hop("a@example.test").transport is Transport.MAILDIR
    assert router.next_hop("a@example.org").host == "example.org"
    assert router.maildirs() == ["/tmp/m"]


def test_default_transport() -> None:
    assert Router(default_transport="maildir:/tmp/m").next_hop("a@x.org").text == "/tmp/m"
    assert Router(default_transport="discard:").next_hop("a@x.org").transport is Transport.DISCARD
    error = Router(default_transport="error:5.7.1 outbound mail disabled").next_hop("a@x.org")
    assert (error.transport, error.dsn, error.reason) == (
        Transport.ERROR, "5.7.1", "outbound mail disabled")
    # smtp without a next hop: relayhost, else the domain; with one: it wins over relayhost.
    assert Router(relayhost="[10.0.0.5]", default_transport="smtp").next_hop("a@x.org").host \
        == "10.0.0.5"
    assert Router(default_transport="smtp").next_hop("a@x.org").host == "x.org"
    hop = Router(relayhost="[10.0.0.5]", default_transport="smtp:[10.0.0.6]:2525") \
        .next_hop("a@x.org")
    assert (hop.host, hop.port) == ("10.0.0.6", 2525)
    # A transport_maps entry still wins.
    router = Router(["inline:{ x.org = discard: }"], default_transport="maildir:/tmp/m")
    assert router.next_hop("a@x.org").transport is Transport.DISCARD
    with pytest.raises(RouteError, match="default_transport: unsupported transport 'lmtp'"):
        Router(default_transport="lmtp:unix:/run/lmtp")


def test_capture_routes_everything_into_one_maildir() -> None:
    router = Router(["inline:{ x.org = smtp:[10.0.0.5] }"], "[smtp.example.com]:587",
                    default_transport="smtp", capture="/tmp/capture")
    for rcpt in ("a@x.org", "b@example.com", "c@[192.0.2.1]"):
        hop = router.next_hop(rcpt)
        assert (hop.transport, hop.text) == (Transport.MAILDIR, "/tmp/capture")
    assert router.maildirs() == ["/tmp/capture"]
    with pytest.raises(RouteError, match="capture_maildir: .* absolute"):
        Router(capture="relative")
