"""Unit tests for relay.routing without sockets: next-hop syntax, lookup tables, Router order."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from relay.routing import (
    NextHop,
    RouteError,
    Router,
    Transport,
    open_table,
    parse_nameserver,
    parse_next_hop,
)

SMTP = Transport.SMTP


# --- next-hop syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("smtp:[mail.example.net]:2525", NextHop(SMTP, "mail.example.net", 2525, False)),
        ("smtp:[mail.example.net]", NextHop(SMTP, "mail.example.net", 25, False)),
        ("smtp:mail.example.net", NextHop(SMTP, "mail.example.net", 25, True)),
        ("smtp:mail.example.net:587", NextHop(SMTP, "mail.example.net", 587, True)),
        ("smtp:[10.0.0.5]:2525", NextHop(SMTP, "10.0.0.5", 2525, False)),
        ("[1.2.3.4]:2525", NextHop(SMTP, "1.2.3.4", 2525, False)),
        ("[1.2.3.4]", NextHop(SMTP, "1.2.3.4", 25, False)),
        ("[::1]:2525", NextHop(SMTP, "::1", 2525, False)),
        ("[IPv6:2001:db8::5]", NextHop(SMTP, "2001:db8::5", 25, False)),
        ("smtp:[::1]:2525", NextHop(SMTP, "::1", 2525, False)),
        ("relay.example.net", NextHop(SMTP, "relay.example.net", 25, True)),
        ("relay.example.net:2525", NextHop(SMTP, "relay.example.net", 2525, True)),
        ("[relay.example.net]:submission", NextHop(SMTP, "relay.example.net", 587, False)),
        ("Mail.Example.NET.", NextHop(SMTP, "mail.example.net", 25, True)),
        ("  smtp:[gw.example]  ", NextHop(SMTP, "gw.example", 25, False)),
        ("smtp:", NextHop(SMTP, "rcpt.example", 25, True)),
        (":[gw.example]:26", NextHop(SMTP, "gw.example", 26, False)),
        ("SMTP:gw.example", NextHop(SMTP, "gw.example", 25, True)),
        ("discard:", NextHop(Transport.DISCARD, "", 0, False, "rcpt.example")),
        ("discard:silently dropped", NextHop(Transport.DISCARD, "", 0, False, "silently dropped")),
        ("error:5.1.1 no such user", NextHop(Transport.ERROR, "", 0, False, "5.1.1 no such user")),
        ("error:go away: really", NextHop(Transport.ERROR, "", 0, False, "go away: really")),
    ],
)
def test_parse_next_hop(value: str, expected: NextHop) -> None:
    assert parse_next_hop(value, "rcpt.example") == expected


def test_transport_compares_as_plain_string() -> None:
    hop = parse_next_hop("discard:", "x.example")
    assert hop.transport == "discard"
    assert parse_next_hop("smtp:x", "").transport == "smtp"


def test_error_transport_splits_dsn_and_text() -> None:
    hop = parse_next_hop("error:5.1.1 no such user", "rcpt.example")
    assert (hop.dsn, hop.reason) == ("5.1.1", "no such user")
    plain = parse_next_hop("error:mailbox closed", "rcpt.example")
    assert (plain.dsn, plain.reason) == ("5.0.0", "mailbox closed")


def test_error_transport_alone_has_default_5_0_0_text() -> None:
    hop = parse_next_hop("error:", "rcpt.example")
    assert hop.transport is Transport.ERROR
    assert hop.dsn == "5.0.0"
    assert "rcpt.example" in hop.reason


def test_discard_reports_success_code() -> None:
    assert parse_next_hop("discard:", "rcpt.example").dsn == "2.0.0"
    assert parse_next_hop("discard:2.7.0 spam trap", "d").reason == "spam trap"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "smtp:[mail.example.net",  # unclosed bracket
        "[]",
        "[1.2.3.4]x",
        "[1.2.3.4]:",
        "smtp:[host]:",
        "host:0",
        "host:65536",
        "host:99999",
        "host:-1",
        "host:nosuchservice-xyz",
        "smtp:host:25:26",
        "2001:db8::1",  # IPv6 literal without brackets
        "smtp:bad_host!.example",
        "smtp:a..b",
        "lmtp:unix:/var/run/lmtp",  # a transport relay does not implement
        "relay1.example, relay2.example",  # Postfix 3.5 lists
        "smtp:",  # with no recipient domain to fall back to (relayhost context)
    ],
)
def test_parse_next_hop_rejects_bad_syntax(value: str) -> None:
    with pytest.raises(RouteError):
        parse_next_hop(value, "")


def test_route_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="bad port"):
        parse_next_hop("[127.0.0.1]:port", "")


@pytest.mark.parametrize(
    ("value", "label"),
    [
        ("[127.0.0.1]:2526", "[127.0.0.1]:2526"),
        ("[127.0.0.1]", "[127.0.0.1]"),
        ("[127.0.0.1]:25", "[127.0.0.1]"),
        ("[::1]:2525", "[::1]:2525"),
        ("relay.example.net", "relay.example.net"),
        ("relay.example.net:2525", "relay.example.net:2525"),
        ("discard:", "discard"),
        ("error:5.1.1 nope", "error"),
    ],
)
def test_label_is_the_next_hop_as_written(value: str, label: str) -> None:
    assert parse_next_hop(value, "rcpt.example").label == label


# --- lookup tables -----------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "transport"
    path.write_text(text)
    return str(path)


def test_texthash_comments_blank_lines_and_case(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# a comment\n"
        "\n"
        "Example.COM   smtp:[10.0.0.5]:2525\n"
        "   # an indented comment is still a comment\n"
        "other.example\terror:5.7.1 Go Away\n"
        "hash#tag.example   discard:\n",
    )
    table = open_table(f"texthash:{path}")
    assert table.get("example.com") == "smtp:[10.0.0.5]:2525"
    assert table.get("EXAMPLE.com") == "smtp:[10.0.0.5]:2525"
    assert table.get("other.example") == "error:5.7.1 Go Away"  # values keep their case
    assert table.get("hash#tag.example") == "discard:"  # '#' only starts a comment line
    assert table.get("# a comment") is None
    assert len(table) == 3


def test_texthash_continuation_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "bounce.example error:5.7.1\n"
        "    this domain\n"
        "\tdoes not take mail\n"
        "next.example smtp:[h]\n",
    )
    table = open_table(f"texthash:{path}")
    assert table.get("bounce.example") == "error:5.7.1 this domain does not take mail"
    assert table.get("next.example") == "smtp:[h]"


def test_texthash_key_on_its_own_line_takes_value_from_continuation(tmp_path: Path) -> None:
    path = write(tmp_path, "example.com\n  smtp:[h]:26\n")
    table = open_table(f"texthash:{path}")
    assert table.get("example.com") == "smtp:[h]:26"


def test_texthash_warns_like_postfix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(
        tmp_path,
        "  leading.example smtp:\n"  # a logical line cannot start with white space
        "novalue.example\n"
        "dup.example smtp:[first]\n"
        "DUP.example smtp:[second]\n",
    )
    with caplog.at_level(logging.WARNING):
        table = open_table(f"texthash:{path}")
    assert table.get("dup.example") == "smtp:[first]"  # Postfix keeps the first entry
    assert table.get("novalue.example") is None
    assert table.get("leading.example") is None
    messages = [r.getMessage() for r in caplog.records]
    assert f'{path}, line 4: duplicate entry: "dup.example"' in messages
    assert any("line 2: expected format: key whitespace value" in m for m in messages)
    assert any("line 1: logical line must not start with white space" in m for m in messages)


def test_unreadable_texthash_names_the_table(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(RouteError, match=f"texthash:{missing}: open {missing}: No such file"):
        open_table(f"texthash:{missing}")


@pytest.mark.parametrize("spec", ["hash:/etc/postfix/transport", "nocolon", "texthash:", "pcre:/x"])
def test_bad_table_spec_names_the_table(spec: str) -> None:
    with pytest.raises(RouteError, match=spec.split(":")[0]):
        open_table(spec)


@pytest.mark.parametrize(
    ("spec", "entries"),
    [
        ("inline:{ key = value, key2 = value2 }", {"key": "value", "key2": "value2"}),
        ("inline:{key=value}", {"key": "value"}),
        ("inline:{a=1 b=2,c=3}", {"a": "1", "b": "2", "c": "3"}),
        ("inline:{ {key = value with space}, k2=v2 }", {"key": "value with space", "k2": "v2"}),
        ("inline:{ { k = a, b } }", {"k": "a, b"}),
        ("inline:{ key= value, key2 =value2 }", {"key": "value", "key2": "value2"}),
        ("inline:{ Example.COM = smtp:[h]:2525 }", {"example.com": "smtp:[h]:2525"}),
        ("inline:{}", {}),
    ],
)
def test_inline_tables(spec: str, entries: dict[str, str]) -> None:
    table = open_table(spec)
    assert dict(table.items()) == entries
    for key, value in entries.items():
        assert table.get(key.upper()) == value


@pytest.mark.parametrize(
    "spec",
    [
        "inline:key=value",
        "inline:{ key=value",
        "inline:{ {key=value }",
        "inline:{ key }",
        "inline:{ key value }",
        "inline:{ key=, k2=v2 }",
        "inline:{ =value }",
    ],
)
def test_bad_inline_tables(spec: str) -> None:
    with pytest.raises(RouteError, match="inline:"):
        open_table(spec)


# --- dns_nameservers entries -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
    ],
)
def test_parse_nameserver(entry: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(entry) == expected


@pytest.mark.parametrize("entry", ["ns.example", "127.0.0.1:x", "127.0.0.1:0", "[::1]x", "[::1"])
def test_parse_nameserver_rejects(entry: str) -> None:
    with pytest.raises(RouteError):
        parse_nameserver(entry)


# --- Router ------------------------------------------------------------------------------------


def test_lookup_order_full_address_domain_parent_wildcard() -> None:
    router = Router(
        [
            ("inline:{ user@a.example.com=smtp:[full]"
            ", a.example.com=smtp:[exact], .example.com=smtp:[parent], *=smtp:[star] }")
        ]
    )
    assert router.next_hop("user@a.example.com").host == "full"
    assert router.next_hop("other@a.example.com").host == "exact"
    assert router.next_hop("x@b.a.example.com").host == "parent"  # "a.example.com" is no parent
    assert router.next_hop("x@deep.b.example.com").host == "parent"
    assert router.next_hop("x@example.com").host == "star"  # ".example.com" is subdomains only
    assert router.next_hop("x@elsewhere.test").host == "star"


def test_closest_parent_wins() -> None:
    router = Router(["inline:{ .example.com=smtp:[far], .b.example.com=smtp:[near] }"])
    assert router.next_hop("x@a.b.example.com").host == "near"
    assert router.next_hop("x@c.example.com").host == "far"


def test_key_order_beats_table_order() -> None:
    # transport(5): each key is tried in every table before the next, less specific key.
    router = Router(["inline:{ *=smtp:[star] }", "inline:{ example.com=smtp:[domain] }"])
    assert router.next_hop("x@example.com").host == "domain"


def test_table_order_for_the_same_key() -> None:
    router = Router(["inline:{ example.com=smtp:[one] }", "inline:{ example.com=smtp:[two] }"])
    assert router.next_hop("x@example.com").host == "one"


def test_lookup_is_case_insensitive() -> None:
    router = Router(["inline:{ User@Example.COM=smtp:[full], .Sub.Example=smtp:[parent] }"])
    assert router.next_hop("USER@example.com").host == "full"
    assert router.next_hop("x@A.SUB.example").host == "parent"
    assert router.next_hop("x@EXAMPLE.NET.").destination == "example.net"


def test_recipient_delimiter_tries_address_without_extension() -> None:
    router = Router(["inline:{ user@example.com=smtp:[base] }"], recipient_delimiter="+")
    assert router.next_hop("user+tag@example.com").host == "base"
    plain = Router(["inline:{ user@example.com=smtp:[base] }"])
    assert plain.next_hop("user+tag@example.com").mx_lookup  # no delimiter: no match


def test_first_of_several_recipient_delimiters_wins() -> None:
    table = "inline:{ a@example.com=smtp:[a], a-b@example.com=smtp:[a-b] }"
    router = Router([table], recipient_delimiter="+-")
    assert router.next_hop("a-b+c@example.com").host == "a"
    assert router.next_hop("a+b-c@example.com").host == "a"
    assert router.next_hop("+x@example.com").mx_lookup  # an empty base is no address


def test_default_route_is_mx_lookup_of_the_recipient_domain() -> None:
    hop = Router().next_hop("someone@Example.ORG")
    assert hop == NextHop(SMTP, "example.org", 25, True)
    assert hop.destination == "example.org"


def test_relayhost_when_no_transport_entry() -> None:
    router = Router(["inline:{ special.example=discard: }"], "[127.0.0.1]:2526")
    hop = router.next_hop("a@example.com")
    assert hop == NextHop(SMTP, "127.0.0.1", 2526, False)
    assert hop.destination == "[127.0.0.1]:2526"
    assert router.next_hop("b@other.example").destination == "[127.0.0.1]:2526"


def test_relayhost_with_mx_lookup() -> None:
    hop = Router([], "relay.example.net:2525").next_hop("a@example.com")
    assert hop == NextHop(SMTP, "relay.example.net", 2525, True)
    assert hop.destination == "relay.example.net:2525"


def test_transport_entry_wins_over_relayhost() -> None:
    router = Router(["inline:{ example.com=smtp:[10.0.0.5]:2525 }"], "[relay.example.net]")
    assert router.next_hop("a@example.com") == NextHop(SMTP, "10.0.0.5", 2525, False)
    assert router.next_hop("a@example.org").host == "relay.example.net"


def test_empty_nexthop_in_entry_means_recipient_domain() -> None:
    # transport(5): "smtp:" resets the nexthop to the recipient domain, even with a relayhost.
    router = Router(["inline:{ .example.com=smtp: }"], "[relay.example.net]")
    assert router.next_hop("a@mail.example.com") == NextHop(SMTP, "mail.example.com", 25, True)


def test_null_transport_and_nexthop_keep_the_default() -> None:
    router = Router(["inline:{ keep.example=:, *=smtp:[star] }"], "[relay.example.net]:587")
    assert router.next_hop("a@keep.example") == NextHop(SMTP, "relay.example.net", 587, False)
    assert Router(["inline:{ keep.example=: }"]).next_hop("a@keep.example").host == "keep.example"


def test_null_transport_changes_only_the_nexthop() -> None:
    router = Router(["inline:{ example.com=:[gw.example] }"])
    assert router.next_hop("a@example.com") == NextHop(SMTP, "gw.example", 25, False)


def test_transport_name_alone_is_transport_with_empty_nexthop() -> None:
    router = Router(["inline:{ drop.example=discard, mx.example=smtp }"])
    assert router.next_hop("a@drop.example") == NextHop(
        Transport.DISCARD, "", 0, False, "drop.example"
    )
    assert router.next_hop("a@mx.example") == NextHop(SMTP, "mx.example", 25, True)


def test_error_and_discard_entries() -> None:
    router = Router(["inline:{ {bad.example = error:5.7.1 we do not relay}, .trap=discard: }"])
    hop = router.next_hop("a@bad.example")
    assert (hop.transport, hop.dsn, hop.reason) == (Transport.ERROR, "5.7.1", "we do not relay")
    assert router.next_hop("a@x.trap").transport is Transport.DISCARD


def test_destination_keys() -> None:
    router = Router(["inline:{ a.example=smtp:[127.0.0.1]:2526, b.example=smtp:relay.test }"])
    assert router.next_hop("x@a.example").destination == "[127.0.0.1]:2526"
    assert router.next_hop("x@b.example").destination == "relay.test"
    assert router.next_hop("x@c.example").destination == "c.example"
    assert router.next_hop("x@C.Example").destination == "c.example"
    assert router.next_hop("x@[192.0.2.7]").destination == "[192.0.2.7]"


def test_address_literal_recipient_goes_to_the_literal_without_mx() -> None:
    assert Router().next_hop("postmaster@[192.0.2.7]") == NextHop(SMTP, "192.0.2.7", 25, False)


def test_texthash_transport_map(tmp_path: Path) -> None:
    path = write(tmp_path, "# routes\nexample.com  smtp:[10.0.0.5]:2525\n*  smtp:outbound.test\n")
    router = Router([f"texthash:{path}"])
    assert router.next_hop("a@EXAMPLE.com").port == 2525
    assert router.next_hop("a@else.test") == NextHop(SMTP, "outbound.test", 25, True)


def test_bad_entry_is_a_startup_error() -> None:
    with pytest.raises(RouteError, match=r"inline:\{ example.com=smtp:\[oops \}: entry"):
        Router(["inline:{ example.com=smtp:[oops }"])
    with pytest.raises(RouteError, match="unsupported transport 'lmtp'"):
        Router(["inline:{ example.com=lmtp:unix:/x }"])


def test_bad_relayhost_is_a_startup_error() -> None:
    with pytest.raises(RouteError, match="relayhost"):
        Router([], "[127.0.0.1]:notaport")


@pytest.mark.parametrize("recipient", ["postmaster", "user@", ""])
def test_recipient_without_domain(recipient: str) -> None:
    with pytest.raises(RouteError, match="has no domain"):
        Router().next_hop(recipient)
