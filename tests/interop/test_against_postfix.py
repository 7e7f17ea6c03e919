"""relay against a private Postfix 3.7 given the very same bytes.

Where issue 10 names a difference, or is silent, relay should do what Postfix does.  Each
test here sends one dialogue, byte for byte, to relay and to a private Postfix set up
alike (both relay everything to the same sink; Postfix's smtpd_forbid_bare_newline is
``normalize``, relay's default, without exclusions) and compares what each answered and
what reached the sink.  Postfix's answer is measured in the same test, never written down.

Cells that differ today are marked xfail(strict=True) with the difference named.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import shutil
import smtplib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.interop.conftest import RELAY_ACCOUNT, relay_passwd, unverified_tls
from tests.support.daemon import RelayDaemon
from tests.support.mta import (
    RECEIVED_FIELD,
    PostfixPeer,
    Route,
    instance_root,
    make_tls,
    message_difference,
)
from tests.support.peers import PeerScript, ReceivedMessage, Reply, ThreadedPeer

pytestmark = pytest.mark.timeout(120)

HALF_CLOSE = ("new bug (not in issue 10): a client that half-closes after the final dot "
              "(and QUIT) gets no reply; relay keeps the message and drops the session, so "
              "the client sends it again")
LONG_LINES = "issue 10: a body line over 998 octets gets 500 5.5.2 (Postfix accepts it)"
BARE_LF = "issue 10: bare-LF dot handling differs from Postfix"
ENVELOPE = "issue 10: envelope syntax: this address gets another answer than from Postfix"
CODES = "issue 10: reply code or enhanced status code differs from Postfix"
DSN = "issue 10: DSN parameters (RET, ENVID, NOTIFY, ORCPT) refused with 555"
AUTH_PARAM = ("issue 10: MAIL FROM:<...> AUTH=<> gets 555 (relay -> relay as a smart host "
              "with AUTH bounces every message)")
UTF8_BOUNCE = "issue 10: SMTPUTF8 bounce types differ from Postfix"
MAPPED = ("issue 10: an IPv4 client given as IPv4-mapped IPv6 (::ffff:192.0.2.7) is logged "
          "so, as unknown[::ffff:c000:207]; Postfix logs unknown[192.0.2.7]")


@dataclass
class Pair:
    relay: RelayDaemon
    postfix: PostfixPeer
    sink: ThreadedPeer

    def ports(self) -> dict[str, int]:
        return {"relay": self.relay.port, "postfix": self.postfix.ports["tls"]}


REFUSED = "refused.test"


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    PostfixPeer.require()
    base = instance_root("relay-vs-postfix-")
    refuse_all = PeerScript(hostname="refuser.test",
                            rcpt=Reply(550, "5.1.1 Recipient address rejected: refused"))
    try:
        with ThreadedPeer(PeerScript(hostname="sink.test", smtputf8=True)) as sink, \
                ThreadedPeer(refuse_all) as refuser:
            tls = make_tls(base / "relay-tls", "relay.test")
            d = RelayDaemon(base / "relay", {
                "mynetworks": "127.0.0.0/8",
                "transport_maps": (f"inline:{{ {REFUSED} = smtp:[127.0.0.1]:{refuser.port}, "
                                   f"* = smtp:[127.0.0.1]:{sink.port} }}"),
                "smtpd_tls_cert_file": str(tls.cert), "smtpd_tls_key_file": str(tls.key),
                "smtpd_tls_security_level": "may", "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_password_file": "sasl_passwd",
                "smtpd_forbid_unauth_pipelining": "no",
            })
            relay_passwd(d, RELAY_ACCOUNT)
            postfix = PostfixPeer(base / "postfix", routes={
                REFUSED: Route("127.0.0.1", refuser.port), "*": Route("127.0.0.1", sink.port)})
            postfix.main.update(smtpd_forbid_bare_newline="normalize",
                                smtpd_forbid_bare_newline_exclusions="",
                                smtpd_error_sleep_time="0", smtpd_soft_error_limit="100",
                                smtpd_hard_error_limit="100")
            try:
                d.start()
                with postfix:
                    yield Pair(d, postfix, sink)
            finally:
                d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- a raw SMTP dialogue ------------------------------------------------------------------


class Dialogue:
    """A socket that sends exactly the bytes given and reads whole replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.greeting = self.replies(1)[0]

    def replies(self, count: int) -> list[bytes]:
        """``count`` complete replies (a multi-line reply is one)."""
        got: list[bytes] = []
        reply = b""
        while len(got) < count:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {got + [reply]!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            reply += line + b"\r\n"
            if line[3:4] != b"-":
                got.append(reply)
                reply = b""
        return got

    def send(self, data: bytes, replies: int = 1) -> list[bytes]:
        self.sock.sendall(data)
        return self.replies(replies)

    def rest(self) -> bytes:
        """Everything until the server closes (or 10 s)."""
        data, self.buffer = self.buffer, b""
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def code(reply: bytes) -> str:
    """'250 2.1.0' style: the reply code and its enhanced status code, if any."""
    words = reply.split(b"\r\n")[-2].decode("utf-8", "replace").split(" ")
    esc = words[1] if len(words) > 1 and words[1][:1].isdigit() and "." in words[1] else "-"
    return f"{words[0][:3]} {esc}"


def sink_copies(sink: ThreadedPeer, rcpt: str) -> list[ReceivedMessage]:
    return [m for m in sink.messages if rcpt in m.recipients]


def without_received(data: bytes) -> bytes:
    while match := RECEIVED_FIELD.match(data):
        data = data[match.end():]
    return data


def wait_copies(sink: ThreadedPeer, rcpt: str, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(sink_copies(sink, rcpt)) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def both(pair: Pair, tag: str) -> Iterator[tuple[str, int, str]]:
    """(server name, port, a recipient address of its own) for relay, then Postfix."""
    for name, port in pair.ports().items():
        yield name, port, f"{tag}-{name}@sink.test"


# -- the message path ---------------------------------------------------------------------


def test_half_close_after_final_dot(request: pytest.FixtureRequest, pair: Pair) -> None:
    """The client sends the final dot and QUIT, then shuts down its sending side (as Exim
    4.96 does on its first delivery of a message over plaintext): Postfix answers 250 and
    221 all the same, and the message arrives once."""
    request.applymarker(pytest.mark.xfail(strict=True, reason=HALF_CLOSE))
    answers = {}
    for name, port, rcpt in both(pair, "halfclose"):
        d = Dialogue(port)
        d.send(b"EHLO client.test\r\n")
        d.send(f"MAIL FROM:<a@client.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode(), 3)
        d.sock.sendall(b"Subject: half-close\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        d.sock.shutdown(socket.SHUT_WR)
        answers[name] = [code(r + b"\r\n") for r in d.rest().split(b"\r\n") if r]
        d.close()
    assert answers["postfix"] == ["250 2.0.0", "221 2.0.0"]
    assert answers["relay"] == answers["postfix"]


def test_long_lines_accepted_and_folded_like_postfix(request: pytest.FixtureRequest,
                                                     pair: Pair) -> None:
    request.applymarker(pytest.mark.xfail(strict=True, reason=LONG_LINES))
    content = (b"Subject: long\r\nX-Long: " + b"h" * 1192 + b"\r\n\r\nshort\r\n"
               + b"0123456789" * 500 + b"\r\nend\r\n")
    finals = {}
    for name, port, rcpt in both(pair, "longline"):
        d = Dialogue(port)
        d.send(b"EHLO client.test\r\n")
        d.send(f"MAIL FROM:<a@client.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode(), 3)
        finals[name] = code(d.send(content + b".\r\n")[0])
        d.close()
    assert finals["postfix"] == "250 2.0.0"
    assert finals["relay"] == finals["postfix"]
    for _, _, rcpt in both(pair, "longline"):
        wait_copies(pair.sink, rcpt, 1)
    relay_copy = sink_copies(pair.sink, "longline-relay@sink.test")[0].data
    postfix_copy = sink_copies(pair.sink, "longline-postfix@sink.test")[0].data
    assert without_received(relay_copy) == without_received(postfix_copy)
    assert message_difference(content, relay_copy) is None


BARE_LF_DOTS = {
    "LF.LF": b"line\n.\nafter\r\n",
    "CRLF.LF": b"line\r\n.\nafter\r\n",
    "LF.CRLF": b"line\n.\r\nafter\r\n",
}


@pytest.mark.parametrize("case", list(BARE_LF_DOTS))
def test_bare_lf_dot(request: pytest.FixtureRequest, pair: Pair, case: str) -> None:
    """A dot line next to a bare LF: one message either way (no smuggling), and the same
    content at the sink as Postfix stores."""
    request.applymarker(pytest.mark.xfail(strict=True, reason=BARE_LF))
    body = b"Subject: bare-lf\r\n\r\n" + BARE_LF_DOTS[case]
    finals = {}
    tag = f"barelf{case.replace('.', '').lower()}"
    for name, port, rcpt in both(pair, tag):
        d = Dialogue(port)
        d.send(b"EHLO client.test\r\n")
        d.send(f"MAIL FROM:<a@client.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode(), 3)
        finals[name] = code(d.send(body + b".\r\n")[0])
        d.close()
    assert finals["relay"] == finals["postfix"] == "250 2.0.0"
    for _, _, rcpt in both(pair, tag):
        wait_copies(pair.sink, rcpt, 1)
    copies = {name: [without_received(m.data) for m in sink_copies(pair.sink, rcpt)]
              for name, _, rcpt in both(pair, tag)}
    assert len(copies["postfix"]) == 1
    assert copies["relay"] == copies["postfix"]


# -- envelope syntax ----------------------------------------------------------------------

# Address forms with control characters, white space and bad UTF-8: (id, bytes, differs
# today after MAIL FROM:, after RCPT TO:); a cell that differs is a strict xfail.  Postfix
# says 5.1.7 for a bad sender, relay 5.1.3, so every refused MAIL FROM: differs.
ADDRESS_FORMS = [
    ("cr-inside", b"<bad\rname@x.test>", True, False),
    ("cr-first", b"<\rbad@x.test>", True, True),
    ("cr-end", b"<badname@x.test\r>", False, False),
    ("cr-domain", b"<bad@x\r.test>", False, False),
    ("cr-no-brackets", b"bad\rname@x.test", True, True),
    ("cr-after", b"<bad@x.test>\r", False, False),
    ("cr-quoted-pair", b"<bad\\\rname@x.test>", True, True),
    ("cr-quoted", b'<"bad\rname"@x.test>', True, True),
    ("cr-route", b"<@r\rx:bad@x.test>", False, False),
    ("soh", b"<bad\x01name@x.test>", True, True),
    ("vt", b"<bad\x0bname@x.test>", True, True),
    ("ff", b"<bad\x0cname@x.test>", True, True),
    ("esc", b"<bad\x1bname@x.test>", True, True),
    ("del", b"<bad\x7fname@x.test>", True, True),
    ("nul", b"<bad\x00name@x.test>", True, True),
    ("tab", b"<bad\tname@x.test>", True, True),
    ("space", b"<bad name@x.test>", True, True),
    ("bad-utf8", b"<bad\x80name@x.test>", True, True),
    ("utf8", "<bäd@x.test>".encode(), False, False),
]


def _address_cells() -> list[Any]:
    cells = []
    for name, address, differs_mail, differs_rcpt in ADDRESS_FORMS:
        for verb, differs in (("MAIL FROM:", differs_mail), ("RCPT TO:", differs_rcpt)):
            marks = [pytest.mark.xfail(strict=True, reason=ENVELOPE)] if differs else []
            cells.append(pytest.param(verb, address, id=f"{verb.split()[0]}-{name}",
                                      marks=marks))
    return cells


@pytest.mark.parametrize("verb,form", _address_cells())
def test_envelope_address_syntax(pair: Pair, verb: str, form: bytes) -> None:
    answers = {}
    for name, port in pair.ports().items():
        d = Dialogue(port)
        d.send(b"EHLO client.test\r\n")
        if verb.startswith("RCPT"):
            d.send(b"MAIL FROM:<a@client.test>\r\n")
        answers[name] = code(d.send(verb.encode() + form + b"\r\n")[0])
        d.close()
    assert answers["relay"] == answers["postfix"]


# -- reply codes --------------------------------------------------------------------------

# (id, commands sent first, the command, differs today)
REPLIES = [
    ("rcpt-before-mail", b"", b"RCPT TO:<a@sink.test>", False),
    ("data-before-mail", b"", b"DATA", False),
    ("unknown-command", b"", b"FOO", True),
    ("data-without-valid-rcpt", b"MAIL FROM:<a@client.test>\r\n", b"DATA", True),
    ("nested-mail", b"MAIL FROM:<a@client.test>\r\n", b"MAIL FROM:<b@client.test>", False),
    ("mail-syntax", b"", b"MAIL FROM:", True),
    ("rcpt-null", b"MAIL FROM:<a@client.test>\r\n", b"RCPT TO:<>", False),
    ("mail-param-unknown", b"", b"MAIL FROM:<a@client.test> BOGUS=1", True),
    ("vrfy", b"", b"VRFY postmaster", True),
    ("expn", b"", b"EXPN postmaster", True),
    ("help", b"", b"HELP", True),
    ("noop", b"", b"NOOP", False),
    ("rset", b"", b"RSET", False),
    ("etrn", b"", b"ETRN sink.test", True),
    ("bdat", b"", b"BDAT 0 LAST", True),
    ("helo-no-arg", b"", b"HELO", True),
    ("quit", b"", b"QUIT", False),
]


@pytest.mark.parametrize("before,command", [pytest.param(
    before, command, id=name,
    marks=[pytest.mark.xfail(strict=True, reason=CODES)] if differs else [])
    for name, before, command, differs in REPLIES])
def test_reply_codes(pair: Pair, before: bytes, command: bytes) -> None:
    answers = {}
    for name, port in pair.ports().items():
        d = Dialogue(port)
        d.send(b"EHLO client.test\r\n")
        if before:
            d.send(before, before.count(b"\r\n"))
        answers[name] = code(d.send(command + b"\r\n")[0])
        d.close()
    assert answers["relay"] == answers["postfix"]


# -- extensions ---------------------------------------------------------------------------


def test_dsn_parameters_accepted(request: pytest.FixtureRequest, pair: Pair) -> None:
    request.applymarker(pytest.mark.xfail(strict=True, reason=DSN))
    answers = {}
    for name, port, rcpt in both(pair, "dsnparams"):
        d = Dialogue(port)
        ehlo = d.send(b"EHLO client.test\r\n")[0]
        mail = d.send(b"MAIL FROM:<a@client.test> RET=HDRS ENVID=QQ314159\r\n")[0]
        rcpt_reply = d.send(f"RCPT TO:<{rcpt}> NOTIFY=SUCCESS,FAILURE "
                            f"ORCPT=rfc822;orig@client.test\r\n".encode())[0]
        answers[name] = (b"\r\n250-DSN\r\n" in ehlo or b"\r\n250 DSN\r\n" in ehlo,
                         code(mail), code(rcpt_reply))
        d.close()
    assert answers["postfix"] == (True, "250 2.1.0", "250 2.1.5")
    assert answers["relay"] == answers["postfix"]


def test_auth_parameter_after_authentication(request: pytest.FixtureRequest,
                                             pair: Pair) -> None:
    """What relay's own client (and Postfix's with smtp_send_dummy_mail_auth) sends to a
    smart host it authenticated to: MAIL FROM:<sender> AUTH=<>."""
    request.applymarker(pytest.mark.xfail(strict=True, reason=AUTH_PARAM))
    answers = {}
    servers = {"relay": (pair.relay.port, RELAY_ACCOUNT.user, RELAY_ACCOUNT.password),
               "postfix": (pair.postfix.ports["auth"], pair.postfix.account.user,
                           pair.postfix.account.password)}
    for name, (port, user, password) in servers.items():
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
            s.starttls(context=unverified_tls())
            s.login(user, password)
            answers[name] = s.mail("a@client.test", ["AUTH=<>"])[0]
    assert answers["postfix"] == 250
    assert answers["relay"] == answers["postfix"]


def content_types(notice: bytes) -> list[str]:
    parsed = email.message_from_bytes(notice, policy=email.policy.SMTPUTF8)
    return [part.get_content_type() for part in parsed.walk()]


def test_smtputf8_bounce_types(request: pytest.FixtureRequest, pair: Pair) -> None:
    """A message that needs SMTPUTF8 (UTF-8 sender and recipient) is refused by the next
    hop: the notice has the MIME types Postfix gives it (RFC 6533's message/global-* for
    SMTPUTF8 mail)."""
    request.applymarker(pytest.mark.xfail(strict=True, reason=UTF8_BOUNCE))
    types = {}
    for name, port in pair.ports().items():
        sender = f"jøsé-{name}@back.test"
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
            s.ehlo()
            s.command_encoding = "utf-8"
            s.mail(sender, ["SMTPUTF8", "BODY=8BITMIME"])
            assert s.rcpt(f"ünï-{name}@{REFUSED}")[0] == 250
            assert s.data(f"Subject: ✓ {name}\r\n\r\nGrüße\r\n".encode())[0] == 250
        wait_copies(pair.sink, sender, 1)
        notices = sink_copies(pair.sink, sender)
        assert notices, f"{name} sent no notice"
        types[name] = content_types(notices[0].data)
    assert types["relay"] == types["postfix"]


def test_ipv4_mapped_client_logged_as_ipv4(request: pytest.FixtureRequest) -> None:
    """A client that HAProxy reports with an IPv4-mapped IPv6 address (PROXY TCP6
    ::ffff:192.0.2.7) is logged as Postfix logs it: unknown[192.0.2.7]."""
    request.applymarker(pytest.mark.xfail(strict=True, reason=MAPPED))
    base = instance_root("relay-mapped-")
    try:
        d = RelayDaemon(base, {"mynetworks": "127.0.0.0/8",
                               "smtpd_upstream_proxy_protocol": "haproxy"})
        d.start(wait=False)
        try:
            deadline = time.monotonic() + 15
            while "listening on" not in d.log() and time.monotonic() < deadline:
                time.sleep(0.05)
            d_ = socket.create_connection((d.host, d.port), timeout=10)
            d_.sendall(b"PROXY TCP6 ::ffff:192.0.2.7 ::1 12345 25\r\n")
            assert d_.recv(1000).startswith(b"220")
            d_.sendall(b"QUIT\r\n")
            d_.recv(1000)
            d_.close()
            d.wait_log("disconnect from")
            assert "connect from unknown[192.0.2.7]" in d.log(), d.log()
        finally:
            d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
