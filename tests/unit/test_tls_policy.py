"""relay.tls.policy: Postfix's policy-table syntax and lookup, name checks, protocols,
ciphers and the TLS-Required header, as TLS_README and postconf(5) describe them."""

from __future__ import annotations

import ssl

import pytest

from relay.routing import open_table
from relay.tls.policy import (
    CertNames,
    Defaults,
    Entry,
    Level,
    PolicyError,
    PolicyMaps,
    cipher_list,
    host_policy,
    match_certificate,
    parse_entry,
    policy_keys,
    protocol_range,
    reference_names,
    tls_not_required,
)


@pytest.mark.parametrize("text,entry", [
    ("none", Entry(Level.NONE)),
    ("may", Entry(Level.MAY)),
    ("encrypt protocols=>=TLSv1.3", Entry(Level.ENCRYPT, protocols=">=TLSv1.3")),
    ("verify match=hostname:nexthop", Entry(Level.VERIFY, ("hostname", "nexthop"))),
    ("secure match=.example.com match=mx.example.net ciphers=high exclude=CHACHA20",
     Entry(Level.SECURE, (".example.com", "mx.example.net"), ciphers="high",
           exclude="CHACHA20")),
    ("dane-only", Entry(Level.DANE_ONLY)),
    ("verify { match = a.test:b.test }", Entry(Level.VERIFY, ("a.test", "b.test"))),
    ("none match=x", Entry(Level.NONE)),  # attributes are ignored without TLS, as Postfix
])
def test_entries(text: str, entry: Entry) -> None:
    assert parse_entry(text) == entry


@pytest.mark.parametrize("text,message", [
    ("", "invalid empty policy"),
    ("fingerprint", 'invalid security level "fingerprint"'),
    ("encrypt match=x.test", 'attribute "match" invalid at security level "encrypt"'),
    ("verify match=", 'attribute "match" has empty value'),
    ("may ciphers=high ciphers=medium", 'attribute "ciphers" is specified multiple times'),
    ("may ciphers=export", 'invalid cipher grade "export"'),
    ("may protocols=TLSv9", 'unknown protocol "TLSv9"'),
    ("may tafile=/x", 'invalid attribute name: "tafile"'),
    ("may garbage", 'malformed attribute/value pair "garbage"'),
])
def test_bad_entries_say_what_postfix_says(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_entry(text)


def test_keys_are_the_destination_then_each_parent() -> None:
    assert policy_keys("mx.Example.com") == ["mx.example.com", ".example.com", ".com"]
    assert policy_keys("[mail.example.com]:587") == ["[mail.example.com]:587"]
    assert policy_keys("example.com:587") == ["example.com:587"]


def test_maps_first_table_and_most_specific_key_win() -> None:
    maps = PolicyMaps([open_table("inline:{ .example.com = encrypt, a.example.com = verify }"),
                       open_table("inline:{ b.example.com = secure }")])
    found = maps.lookup("a.example.com")
    assert found is not None and (found.level, found.key) == (Level.VERIFY, "a.example.com")
    found = maps.lookup("b.example.com")
    # Postfix: every key in order, each key through every table.
    assert found is not None and found.level == Level.SECURE
    found = maps.lookup("c.example.com")
    assert found is not None and (found.level, found.key) == (Level.ENCRYPT, ".example.com")
    assert maps.lookup("example.org") is None


def test_a_bad_entry_stops_the_maps_naming_table_and_key() -> None:
    with pytest.raises(PolicyError, match=r'smtp_tls_policy_maps: inline:\{ x.test = bogus \}: '
                                          r'entry "x.test": invalid security level "bogus"'):
        PolicyMaps([open_table("inline:{ x.test = bogus }")])


def test_reference_names() -> None:
    assert reference_names(["hostname", "nexthop", "dot-nexthop", "Other.Test."],
                           "mx.example.com", "example.com") == (
        "mx.example.com", "example.com", ".example.com", "other.test")


@pytest.mark.parametrize("names,references,matched", [
    (CertNames(("mx.example.com",)), ["mx.example.com"], "mx.example.com"),
    (CertNames(("MX.Example.COM.",)), ["mx.example.com"], "mx.example.com"),
    (CertNames(("*.example.com",)), ["mx.example.com"], "mx.example.com"),
    (CertNames(("*.example.com",)), ["a.mx.example.com"], None),
    (CertNames(("*.example.com",)), ["example.com"], None),
    (CertNames(("m*.example.com",)), ["mx.example.com"], None),  # no partial wildcards
    (CertNames(("mx.example.com",)), [".example.com"], ".example.com"),
    (CertNames(("example.com",)), [".example.com"], None),
    (CertNames(("*.example.com",)), [".example.com"], ".example.com"),
    (CertNames((), (), "mx.example.com"), ["mx.example.com"], "mx.example.com"),  # CN
    (CertNames(("other.test",), (), "mx.example.com"), ["mx.example.com"], None),  # SAN wins
    (CertNames((), ("127.0.0.1",)), ["127.0.0.1"], "127.0.0.1"),
    (CertNames(("127.0.0.1",)), ["127.0.0.1"], None),  # an address needs an IP SAN
])
def test_certificate_names(names: CertNames, references: list[str], matched: str | None) -> None:
    assert match_certificate(names, references) == matched


@pytest.mark.parametrize("text,low,high", [
    ("!SSLv2, !SSLv3", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
    (">=TLSv1.3", ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3),
    ("!TLSv1.3", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2),
    ("TLSv1.2:TLSv1.3", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
    ("<=TLSv1.2", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2),
])
def test_protocols(text: str, low: ssl.TLSVersion, high: ssl.TLSVersion) -> None:
    assert protocol_range(text) == (low, high)


def test_protocols_below_tls_1_2_are_never_offered() -> None:
    with pytest.raises(PolicyError, match="no protocol left"):
        protocol_range("<=TLSv1.1")


def test_cipher_list_appends_exclusions() -> None:
    lists = {"high": "HIGH", "medium": "MEDIUM"}
    assert cipher_list("high", lists, ["aNULL, CHACHA20", "!MD5"]) == \
        "HIGH:!aNULL:!CHACHA20:!MD5"


def test_host_policy_uses_mandatory_settings_above_may() -> None:
    defaults = Defaults(protocols="!SSLv3", mandatory_protocols=">=TLSv1.3",
                        exclude_ciphers="RC4", mandatory_exclude_ciphers="3DES")
    may = host_policy(Level.MAY, defaults, hostname="mx.test", nexthop="test")
    verify = host_policy(Level.VERIFY, defaults, hostname="mx.test", nexthop="test")
    assert may.minimum == ssl.TLSVersion.TLSv1_2 and may.references == ()
    assert verify.minimum == ssl.TLSVersion.TLSv1_3 and verify.references == ("mx.test",)
    assert may.ciphers.endswith(":!RC4")
    assert verify.ciphers.endswith(":!RC4:!3DES:!aNULL")  # a certificate is a must there
    secure = host_policy(Level.SECURE, defaults, hostname="mx.test", nexthop="test",
                         entry=Entry(Level.SECURE, ("nexthop",), exclude="SHA1"))
    assert secure.references == ("test",) and secure.ciphers.endswith(":!SHA1:!aNULL")


@pytest.mark.parametrize("message,expected", [
    (b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n", True),
    (b"tls-required:no\r\n\r\n", True),
    (b"TLS-Required: Yes\r\n\r\n", False),
    (b"Subject: x\r\n\r\nTLS-Required: No\r\n", False),  # in the body it means nothing
])
def test_tls_required_header(message: bytes, expected: bool) -> None:
    assert tls_not_required(message) is expected
