"""The open-relay proof: no envelope trick makes the relay forward mail for a stranger.

The daemon's mynetworks is 127.0.0.2/32 and the test connects from 127.0.0.1, so the
client is a stranger unless it logs in; relay_domains is example.com.  Every routing
trick (percent hack, bang path, quoted local parts holding @ or %, source routes,
look-alike and literal domains, control characters) is tried in a session of its own,
with and without AUTH; each session then sends a message and the test checks that
exactly that message, with exactly the recipients that were accepted, reached the spool.
Then smtpd_relay_restrictions: each of Postfix's words, reloaded with SIGHUP, and the
configurations that would make an open relay, which the daemon refuses.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.auth import hash_password, update_password_file
from tests.integration.test_accept import (
    HOLD_DELIVERY,
    Client,
    assert_consistent,
    find_envelope,
    queue_id_of,
)
from tests.support.daemon import RelayDaemon

pytestmark = pytest.mark.timeout(60)

OUTSIDE = {"mynetworks": "127.0.0.2/32", "relay_domains": "example.com"}
DENIED = "554 5.7.1"
BAD = "501 5.1.3"
LOGIN = "AUTH PLAIN " + base64.b64encode(b"\0alice\0secret").decode()

# (RCPT TO argument, the reply a stranger gets, whether an authenticated client may use it)
TRICKS = [
    ("<a@other.org>", DENIED, True),
    ("a@other.org", DENIED, True),
    ("<a%other.org@example.com>", DENIED, True),
    ("<A%OTHER.ORG@EXAMPLE.COM>", DENIED, True),
    ("<a%other.org%example.com@example.com>", DENIED, True),
    ("<other.org!a@example.com>", DENIED, True),
    ("<other.org!a%example.com@example.com>", DENIED, True),
    ('<"a@other.org"@example.com>', DENIED, True),
    ('<"a%other.org"@example.com>', DENIED, True),
    ('<"a!other.org"@example.com>', DENIED, True),
    ("<@example.com:a@other.org>", DENIED, True),
    ("<@other.org:a@example.com>", DENIED, True),
    ("<@mx.example.com,@example.com:a@other.org>", DENIED, True),
    ("<a@example.com.other.org>", DENIED, True),
    ("<a@notexample.com>", DENIED, True),
    ("<a@example.com%other.org>", DENIED, True),
    ("<a@[192.0.2.1]>", DENIED, True),
    ("<a@[127.0.0.1]>", DENIED, True),
    ("<a@ex\u0430mple.com>", DENIED, True),  # a Cyrillic a
    ("<a@other.org@example.com>", BAD, False),
    ("<a%other.org>", BAD, False),
    ("<a@other.org\rb@example.com>", BAD, False),
    ("<a@other.org\x00@example.com>", BAD, False),
    ("<a@example.com> <b@other.org>", "5", False),
    ("<a@example.com><b@other.org>", BAD, False),
    ("<a<b@other.org>@example.com>", BAD, False),
    ("<a@example.com>\tORCPT=rfc822;b@other.org", "5", False),
]
IDS = [f"{n:02d}-{t[0].encode('ascii', 'backslashreplace').decode()}"
       for n, t in enumerate(TRICKS)]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayDaemon, ssl.SSLContext]]:
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("relay.test")
    d = RelayDaemon(tmp_path_factory.mktemp("relay"), {**HOLD_DELIVERY, **OUTSIDE})
    cert, key = d.base / "cert.pem", d.base / "key.pem"
    cert.write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    update_password_file(str(d.base / "passwd"), "alice", hash_password("secret"))
    d.write_config(smtpd_tls_security_level="may", smtpd_tls_cert_file=str(cert),
                   smtpd_tls_key_file=str(key), smtpd_sasl_auth_enable="yes",
                   smtpd_sasl_password_file=str(d.base / "passwd"))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    d.start()
    yield d, context
    d.stop()


def session(d: RelayDaemon, context: ssl.SSLContext | None = None,
            source: str | None = None) -> Client:
    """EHLO done; with a context also STARTTLS and AUTH as alice."""
    c = Client(d.port, source=source)
    c.cmd("EHLO client.example")
    if context is not None:
        assert c.cmd("STARTTLS").startswith("220")
        c.sock = context.wrap_socket(c.sock, server_hostname="relay.test")
        c.cmd("EHLO client.example")
        assert c.cmd(LOGIN).startswith("235")
    return c


def send_trick(c: Client, rcpt: str) -> tuple[str, str]:
    """MAIL, the trick, a plain recipient in example.com, DATA: (trick reply, queue ID)."""
    assert c.cmd("MAIL FROM:<x@sender.example>").startswith("250")
    reply = c.cmd(b"RCPT TO:" + rcpt.encode("utf-8"))
    assert c.cmd("RCPT TO:<ok@example.com>").startswith("250 2.1.5")
    return reply, queue_id_of(c.data(b"Subject: relay test\r\n\r\nbody\r\n"))


@pytest.mark.parametrize("rcpt,refusal,_", TRICKS, ids=IDS)
def test_a_stranger_cannot_relay(
    relay: tuple[RelayDaemon, ssl.SSLContext], rcpt: str, refusal: str, _: bool,
) -> None:
    d, _context = relay
    before = assert_consistent(d)
    with session(d) as c:
        reply, queue_id = send_trick(c, rcpt)
        assert reply.startswith(refusal), reply
        if refusal == DENIED:
            assert reply.endswith(": Relay access denied"), reply
        assert c.cmd("QUIT").startswith("221")
    # Exactly one message, for the one recipient that is ours to relay to.
    assert assert_consistent(d) - before == {queue_id}
    assert [r.address for r in find_envelope(d, queue_id).recipients] == ["ok@example.com"]


@pytest.mark.parametrize("rcpt,refusal,relayable", TRICKS, ids=IDS)
def test_an_authenticated_client_may_relay(
    relay: tuple[RelayDaemon, ssl.SSLContext], rcpt: str, refusal: str, relayable: bool,
) -> None:
    d, context = relay
    before = assert_consistent(d)
    with session(d, context) as c:
        reply, queue_id = send_trick(c, rcpt)
        if relayable:
            assert reply == "250 2.1.5 Ok", reply
        else:  # malformed is malformed, logged in or not
            assert reply.startswith(refusal), reply
    assert assert_consistent(d) - before == {queue_id}
    recipients = [r.address for r in find_envelope(d, queue_id).recipients]
    assert recipients[-1] == "ok@example.com" and len(recipients) == 1 + relayable
    assert find_envelope(d, queue_id).auth_user == "alice"


@pytest.mark.parametrize("command", [b"MAIL FROM", b"RCPT TO"])
def test_a_line_feed_cannot_inject_a_command_or_header(
    relay: tuple[RelayDaemon, ssl.SSLContext], command: bytes,
) -> None:
    d, _ = relay
    before = assert_consistent(d)
    with session(d) as c:
        if command == b"RCPT TO":
            assert c.cmd("MAIL FROM:<x@sender.example>").startswith("250")
        # A bare LF ends a command line: what follows it is a line of its own.
        bad = "501 5.1.7" if command == b"MAIL FROM" else "501 5.1.3"
        c.send(command + b":<a@example.com\nRCPT TO:<b@other.org>>\r\n")
        assert c.reply().startswith(bad)
        assert c.reply().startswith("5")  # "RCPT TO:<b@other.org>>": refused as well
        c.send(command + b":<a@example.com\rX-Injected: yes>\r\n")
        assert c.reply().startswith(bad)
        assert c.quiet()
    assert assert_consistent(d) == before


def test_a_client_in_mynetworks_may_relay(relay: tuple[RelayDaemon, ssl.SSLContext]) -> None:
    d, _ = relay
    try:
        c = session(d, source="127.0.0.2")
    except OSError as exc:
        pytest.skip(f"cannot bind 127.0.0.2: {exc}")
    with c:
        c.cmd("MAIL FROM:<x@sender.example>")
        assert c.cmd("RCPT TO:<a@other.org>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<a%other.org@example.com>").startswith("250 2.1.5")


# ---- smtpd_relay_restrictions ----------------------------------------------------------------


def reload(d: RelayDaemon, **params: str) -> None:
    """Change main.cf, SIGHUP, and wait for the daemon to say it reloaded (or failed to)."""
    def reloads() -> int:
        log = d.log()
        return log.count("reload -- configuration") + log.count("reload failed")

    done = reloads()
    d.write_config(**params)
    d.hup()
    d.wait_log("reload", count=done + 1)
    assert reloads() == done + 1


def rcpt_replies(d: RelayDaemon, source: str | None = None, *rcpts: str) -> list[str]:
    with Client(d.port, source=source) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<x@sender.example>")
        return [c.cmd(f"RCPT TO:<{r}>") for r in rcpts]


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayDaemon]:
    d = RelayDaemon(tmp_path_factory.mktemp("relay"), {**HOLD_DELIVERY, **OUTSIDE}).start()
    yield d
    d.stop()


@pytest.mark.parametrize("restrictions,stranger,insider", [
    ("permit_mynetworks, defer_unauth_destination",
     ["454 4.7.1 <a@other.org>: Relay access denied", "250 2.1.5 Ok",
      "454 4.7.1 <a%other.org@example.com>: Relay access denied"],
     ["250 2.1.5 Ok"] * 3),
    ("permit_mynetworks, reject",
     ["554 5.7.1 <a@other.org>: Recipient address rejected: Access denied",
      "554 5.7.1 <b@example.com>: Recipient address rejected: Access denied",
      "554 5.7.1 <a%other.org@example.com>: Recipient address rejected: Access denied"],
     ["250 2.1.5 Ok"] * 3),
    ("permit_auth_destination, defer",  # a backup MX that relays for nobody else
     ["450 4.7.1 <a@other.org>: Recipient address rejected: Access denied", "250 2.1.5 Ok",
      "450 4.7.1 <a%other.org@example.com>: Recipient address rejected: Access denied"],
     ["450 4.7.1 <a@other.org>: Recipient address rejected: Access denied", "250 2.1.5 Ok",
      "450 4.7.1 <a%other.org@example.com>: Recipient address rejected: Access denied"]),
    ("permit_mynetworks permit_sasl_authenticated reject_unauth_destination",
     ["554 5.7.1 <a@other.org>: Relay access denied", "250 2.1.5 Ok",
      "554 5.7.1 <a%other.org@example.com>: Relay access denied"],
     ["250 2.1.5 Ok"] * 3),
])
def test_relay_restrictions(restricted: RelayDaemon, restrictions: str, stranger: list[str],
                            insider: list[str]) -> None:
    d = restricted
    reload(d, smtpd_relay_restrictions=restrictions, allow_untrusted_routing="no")
    rcpts = ("a@other.org", "b@example.com", "a%other.org@example.com")
    assert rcpt_replies(d, None, *rcpts) == stranger
    try:
        assert rcpt_replies(d, "127.0.0.2", *rcpts) == insider
    except OSError as exc:
        pytest.skip(f"cannot bind 127.0.0.2: {exc}")


def test_allow_untrusted_routing(restricted: RelayDaemon) -> None:
    d = restricted
    reload(d, smtpd_relay_restrictions="permit_mynetworks, reject_unauth_destination",
           allow_untrusted_routing="yes")
    assert rcpt_replies(d, None, "a%other.org@example.com", "a@other.org") == \
        ["250 2.1.5 Ok", "554 5.7.1 <a@other.org>: Relay access denied"]


@pytest.mark.parametrize("restrictions,message", [
    ("permit_mynetworks, permit_sasl_authenticated", "specify at least one working instance"),
    ("", "specify at least one working instance"),
    ("permit_mynetworks, reject_unknown_sender_domain, reject",
     'unknown smtpd_relay_restrictions entry: "reject_unknown_sender_domain"'),
], ids=["no-gate", "empty", "unknown-word"])
def test_open_relay_configurations_are_refused(
    restricted: RelayDaemon, tmp_path: Path, restrictions: str, message: str,
) -> None:
    d = RelayDaemon(tmp_path, {**OUTSIDE, "smtpd_relay_restrictions": restrictions})
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(15) == 1
    assert "relay: fatal: " in d.stderr() and message in d.stderr(), d.stderr()
    # A running daemon keeps its old restrictions when a reload would open it.
    reload(restricted, smtpd_relay_restrictions="permit_mynetworks, reject_unauth_destination",
           allow_untrusted_routing="no")
    reload(restricted, smtpd_relay_restrictions=restrictions)
    restricted.wait_log(message)
    assert rcpt_replies(restricted, None, "a@other.org") == \
        ["554 5.7.1 <a@other.org>: Relay access denied"]
