"""The listener's dialogue as real MTAs and scanners see it, held against Postfix 3.7.11.

Over real sockets to ``relay serve``: the MAIL and RCPT parameters clients send (RFC 3461
DSN with xtext, RFC 4954 AUTH=, RFC 1870 SIZE, RFC 6152 BODY) and where they end up in the
queue file; every control character inside an envelope address; each reply written in one
piece (nmap's smtp-open-relay and similar scanners read one segment per reply); the enhanced
status codes on the replies that lacked them; the client address a PROXY header gives as
an IPv4-mapped IPv6 address.  The expected replies are Postfix's, measured on Debian 12's
Postfix 3.7.11.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from tests.integration.test_accept import (
    HOLD_DELIVERY,
    Client,
    content_of,
    find_envelope,
    queue_id_of,
    split_received,
)
from tests.support.daemon import RelayDaemon

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def relay_for(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RelayDaemon]]:
    started: dict[tuple[tuple[str, str], ...], RelayDaemon] = {}

    def get(**params: str) -> RelayDaemon:
        key = tuple(sorted(params.items()))
        if key not in started:
            started[key] = RelayDaemon(tmp_path_factory.mktemp("relay"),
                                       {**HOLD_DELIVERY, **params}).start()
        return started[key]

    yield get
    for d in started.values():
        d.stop()


@pytest.fixture
def relay(relay_for: Callable[..., RelayDaemon]) -> RelayDaemon:
    return relay_for()


def greeted(d: RelayDaemon) -> Client:
    c = Client(d.port)
    assert c.cmd("EHLO client.example").startswith("250-")
    return c


# ---- DSN (RFC 3461) --------------------------------------------------------------------


def test_ehlo_offers_dsn(relay: RelayDaemon) -> None:
    with Client(relay.port) as c:
        assert "250-DSN" in c.cmd("EHLO client.example").split("\n")


def test_dsn_parameters_are_kept_in_the_queue_file(relay: RelayDaemon) -> None:
    with greeted(relay) as c:
        assert c.cmd("MAIL FROM:<a@example.org> RET=HDRS ENVID=abc+2Bdef+3D1") == \
            "250 2.1.0 Ok"
        assert c.cmd("RCPT TO:<b@example.net> NOTIFY=success,FAILURE "
                     "ORCPT=rfc822;orig+2Bb@example.net") == "250 2.1.5 Ok"
        assert c.cmd("RCPT TO:<c@example.net> NOTIFY=NEVER") == "250 2.1.5 Ok"
        assert c.cmd("RCPT TO:<d@example.net>") == "250 2.1.5 Ok"
        queue_id = queue_id_of(c.data(b"Subject: dsn\r\n\r\nx\r\n"))
    env = find_envelope(relay, queue_id)
    assert (env.dsn_ret, env.dsn_envid) == ("HDRS", "abc+def=1")
    assert [(r.address, r.dsn_notify, r.dsn_orcpt) for r in env.recipients] == [
        ("b@example.net", "SUCCESS,FAILURE", "rfc822;orig+b@example.net"),
        ("c@example.net", "NEVER", ""),
        ("d@example.net", "", ""),
    ]


@pytest.mark.parametrize("command,reply", [
    ("MAIL FROM:<a@example.org> RET=BODY", "501 5.5.4 Bad RET parameter syntax"),
    ("MAIL FROM:<a@example.org> RET=FULL RET=HDRS", "501 5.5.4 Bad RET parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=a+zz", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=a ENVID=b", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> BODY=FOO", "555 5.5.4 Unsupported option: BODY=FOO"),
    ("MAIL FROM:<a@example.org> FOO=1", "555 5.5.4 Unsupported option: FOO=1"),
    ("MAIL FROM:<a@example.org> SIZE=ten", "501 5.5.4 Bad message size syntax"),
    ("MAIL FROM:<a@example.org> AUTH=<> AUTH=<>", "503 5.5.4 Error: multiple AUTH= options"),
], ids=["ret", "ret-twice", "envid-xtext", "envid-twice", "body", "unknown", "size",
        "auth-twice"])
def test_bad_mail_parameters(relay: RelayDaemon, command: str, reply: str) -> None:
    with greeted(relay) as c:
        assert c.cmd(command) == reply
        assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"


@pytest.mark.parametrize("parameters,reply", [
    ("NOTIFY=NEVER,SUCCESS", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    ("NOTIFY=BOGUS", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    ("NOTIFY=DELAY NOTIFY=DELAY", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    ("ORCPT=b@example.net", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    ("ORCPT=;b@example.net", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    ("ORCPT=rfc822;b+0Dx@example.net", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    ("FOO", "555 5.5.4 Unsupported option: FOO"),
], ids=["never-and", "bogus", "twice", "no-type", "empty-type", "control", "unknown"])
def test_bad_rcpt_parameters(relay: RelayDaemon, parameters: str, reply: str) -> None:
    with greeted(relay) as c:
        assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
        assert c.cmd(f"RCPT TO:<b@example.net> {parameters}") == reply
        assert c.cmd("RCPT TO:<b@example.net>") == "250 2.1.5 Ok"


# ---- AUTH= on MAIL (RFC 4954 §5) --------------------------------------------------------


@pytest.mark.parametrize("value", ["<>", "alice+40example.org"])
def test_auth_parameter_is_accepted_and_logged(relay: RelayDaemon, value: str) -> None:
    """Postfix's client sends AUTH=<> with smtp_send_dummy_mail_auth, relay's own before
    it learned better: a relay must take it, offered AUTH or not, and log a real one."""
    with greeted(relay) as c:
        assert c.cmd(f"MAIL FROM:<a@example.org> AUTH={value}") == "250 2.1.0 Ok"
        assert c.cmd("RCPT TO:<b@example.net>") == "250 2.1.5 Ok"
        queue_id = queue_id_of(c.data(b"Subject: auth\r\n\r\nx\r\n"))
    line = relay.wait_log(f"{queue_id}: client=")
    line = next(ln for ln in line.splitlines() if f"{queue_id}: client=" in ln)
    if value == "<>":
        assert "sasl_sender" not in line
    else:
        assert line.endswith(f"client=localhost[127.0.0.1], sasl_sender={value}")


# ---- envelope syntax -------------------------------------------------------------------


@pytest.mark.parametrize("char", [*range(0x20), 0x7F], ids=lambda c: f"0x{c:02x}")
def test_a_control_character_inside_an_address_is_a_syntax_error(
        relay: RelayDaemon, char: int) -> None:
    control = bytes([char])
    with greeted(relay) as c:
        for command, reply in ((b"MAIL FROM", "501 5.1.7 Bad sender address syntax"),
                               (b"RCPT TO", "501 5.1.3 Bad recipient address syntax")):
            if command == b"RCPT TO":
                assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
            c.send(command + b":<x" + control + b"y@example.net>\r\n")
            got = c.reply()
            if char == 0x0A:
                # A LF ends the command line: "<x" is unbalanced, the rest is no command.
                assert got == reply
                assert c.reply() == "500 5.5.2 Error: command not recognized"
            else:
                assert got == reply, (command, got)
        assert c.cmd("RCPT TO:<good@example.net>") == "250 2.1.5 Ok"
        assert c.cmd("RSET") == "250 2.0.0 Ok"


@pytest.mark.parametrize("path", ["<a<b@example.net>", "<a@example.net", "<a>b@example.net>",
                                  "<<a@example.net>>", "<a@example.net>>"])
def test_unbalanced_angle_brackets(relay: RelayDaemon, path: str) -> None:
    with greeted(relay) as c:
        assert c.cmd(f"MAIL FROM:{path}") == "501 5.1.7 Bad sender address syntax"
        assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
        assert c.cmd(f"RCPT TO:{path}").startswith("501 5.")


# ---- one write per reply ----------------------------------------------------------------


def test_every_reply_is_one_write(relay: RelayDaemon) -> None:
    """A client that reads one segment per reply must find the whole reply in it: the
    multi-line EHLO reply is one write, as Postfix, Exim and OpenSMTPD send it."""
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            banner = s.recv(65536)
            assert banner.startswith(b"220 ") and banner.endswith(b"\r\n")
            s.sendall(b"EHLO scanner.example\r\n")
            first = s.recv(65536)  # returns with the first segment that arrives
            assert first.startswith(b"250-") and first.endswith(b"\r\n"), first
            assert b"\r\n250 " in first, f"EHLO reply cut after {first!r}"
            s.sendall(b"QUIT\r\n")


def test_pipelined_replies_go_out_together(relay: RelayDaemon) -> None:
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.recv(65536)
        s.sendall(b"EHLO scanner.example\r\n")
        s.recv(65536)
        s.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                  b"RCPT TO:<c@example.net>\r\nRSET\r\n")
        replies = b""
        while replies.count(b"\r\n") < 4:
            replies += s.recv(65536)
    assert replies == (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n")


# ---- replies with enhanced status codes -------------------------------------------------


@pytest.mark.parametrize("command,reply", [
    ("VRFY bob@example.com", "252 2.0.0 bob@example.com"),
    ("VRFY", "501 5.5.4 Syntax: VRFY address [SMTPUTF8]"),
    ("HELP", "500 5.5.2 Error: command not recognized"),
    ("EXPN staff", "500 5.5.2 Error: command not recognized"),
    ("NOOP", "250 2.0.0 Ok"),
    ("RSET", "250 2.0.0 Ok"),
    ("RSET now", "501 5.5.4 Syntax: RSET"),
    ("MAIL TO:<a@example.org>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    ("RCPT TO:<a@example.org>", "503 5.5.1 Error: need MAIL command"),
    ("DATA", "503 5.5.1 Error: need RCPT command"),
])
def test_replies_carry_enhanced_status_codes(relay: RelayDaemon, command: str,
                                              reply: str) -> None:
    with greeted(relay) as c:
        assert c.cmd(command) == reply


# ---- content ---------------------------------------------------------------------------


def test_content_that_starts_with_white_space_is_body(relay: RelayDaemon) -> None:
    """Otherwise it would continue the Received: header put on top (Postfix does this)."""
    with greeted(relay) as c:
        queue_id = queue_id_of(c.mail("a@example.org", ["b@example.net"],
                                      b" indented\r\nSubject: x\r\n\r\nbody\r\n"))
    assert split_received(content_of(relay, queue_id))[1] == \
        b"\r\n indented\r\nSubject: x\r\n\r\nbody\r\n"


# ---- the client address ----------------------------------------------------------------


def test_an_ipv4_mapped_client_is_logged_as_ipv4(tmp_path_factory: pytest.TempPathFactory,
                                                 ) -> None:
    d = RelayDaemon(tmp_path_factory.mktemp("relay"), {
        **HOLD_DELIVERY, "smtpd_upstream_proxy_protocol": "haproxy"}).start(wait=False)
    d.wait_log("daemon started")
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.9.9.5")
    loopback = socket.inet_pton(socket.AF_INET6, "::1")
    header = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x21])
              + struct.pack("!H", 36) + mapped + loopback + struct.pack("!HH", 4321, 25))
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        s.sendall(header)
        assert s.recv(1024).startswith(b"220 ")
        s.sendall(b"QUIT\r\n")
        s.recv(1024)
    try:
        log = d.wait_log("connect from unknown[10.9.9.5]")
        assert "a09:905" not in log
    finally:
        d.stop()


# ---- half-close, ETRN -------------------------------------------------------------------


def test_a_client_that_half_closes_after_quit_gets_its_replies(relay: RelayDaemon) -> None:
    """Exim sends the final dot and QUIT, then shuts down its sending side: it must still
    read 250 and 221, or it sends the message again (found by the interop suite)."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.recv(1024)
        s.sendall(b"EHLO exim.example\r\n")
        s.recv(65536)
        s.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        got = b""
        while got.count(b"\r\n") < 3:
            got += s.recv(65536)
        s.sendall(b"Subject: half-close\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        s.shutdown(socket.SHUT_WR)
        replies = b""
        while chunk := s.recv(65536):
            replies += chunk
    first, second, rest = replies.split(b"\r\n", 2)
    assert first.startswith(b"250 2.0.0 Ok: queued as ") and second == b"221 2.0.0 Bye", replies
    assert rest == b""
    find_envelope(relay, first.decode().rsplit(" ", 1)[1])


def test_etrn_flushes_a_site_in_fast_flush_domains(
        relay_for: Callable[..., RelayDaemon]) -> None:
    """RFC 1985, for a backup MX: the primary asks for its mail now."""
    d = relay_for(relay_domains="example.net")
    with greeted(d) as c:
        queue_id = queue_id_of(c.mail("a@example.org", ["b@example.net"], b"Subject: e\r\n\r\n"))
    d.wait_log(f"{queue_id}: to=<b@example.net>")
    attempts = d.log().count(f"{queue_id}: to=<b@example.net>")
    with greeted(d) as c:
        assert c.cmd("ETRN") == "500 Syntax: ETRN domain"
        assert c.cmd("ETRN no..site") == "501 Error: invalid parameter syntax"
        assert c.cmd("ETRN other.org") == "459 <other.org>: service unavailable"
        assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
        assert c.cmd("ETRN example.net") == "503 Error: MAIL transaction in progress"
        assert c.cmd("RSET") == "250 2.0.0 Ok"
        assert c.cmd("ETRN @example.net") == "250 Queuing started"
    d.wait_log(f"{queue_id}: to=<b@example.net>", count=attempts + 1)
