"""relay against a private Postfix 3.7 given the very same bytes.

Where issue 10 names a difference, or is silent, relay should do what Postfix does.  Each
test here sends one dialogue, byte for byte, to relay and to a private Postfix set up
alike (both relay everything to the same sink; Postfix's smtpd_forbid_bare_newline is
``normalize``, relay's default, without exclusions) and compares what each answered and
what reached the sink.  Postfix's answer is measured in the same test, never written down.

Where relay differs on purpose (it is stricter about control characters in addresses, and
offers no CHUNKING), the test says relay's own answer beside Postfix's.
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
                "smtpd_forbid_bare_newline_exclusions": "",
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


def test_half_close_after_final_dot(pair: Pair) -> None:
    """The client sends the final dot and QUIT, then shuts down its sending side (as Exim
    4.96 does on its first delivery of a message over plaintext): Postfix answers 250 and
    221 all the same, and the message arrives once."""
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


def test_long_lines_accepted_and_folded_like_postfix(pair: Pair) -> None:
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
def test_bare_lf_dot(pair: Pair, case: str) -> None:
    """A dot line next to a bare LF: one message either way (no smuggling), and the same
    content at the sink as Postfix stores."""
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

# Address forms with control characters, white space and bad UTF-8: (id, bytes, relay's
# own answer or None for "the same as Postfix").  Issue 10's bar is stricter than Postfix
# 3.7.11 for control characters: any of 0x00-0x1F or 0x7F inside an address gets 501 5.1.7
# (sender) or 501 5.1.3, where Postfix lets some through (0x01, a CR at the end of the
# domain, in quotes, ...) and answers others otherwise (555 for a CR it takes for a space).
STRICTER = "501"
ADDRESS_FORMS = [
    ("cr-inside", b"<bad\rname@x.test>", STRICTER),
    ("cr-first", b"<\rbad@x.test>", STRICTER),
    ("cr-end", b"<badname@x.test\r>", STRICTER),
    ("cr-domain", b"<bad@x\r.test>", STRICTER),
    ("cr-no-brackets", b"bad\rname@x.test", STRICTER),
    ("cr-after", b"<bad@x.test>\r", None),  # the CR belongs to the line end
    ("cr-quoted-pair", b"<bad\\\rname@x.test>", STRICTER),
    ("cr-quoted", b'<"bad\rname"@x.test>', STRICTER),
    ("cr-route", b"<@r\rx:bad@x.test>", None),  # the route is dropped, as in Postfix
    ("soh", b"<bad\x01name@x.test>", STRICTER),
    ("vt", b"<bad\x0bname@x.test>", STRICTER),
    ("ff", b"<bad\x0cname@x.test>", STRICTER),
    ("esc", b"<bad\x1bname@x.test>", STRICTER),
    ("del", b"<bad\x7fname@x.test>", STRICTER),
    ("nul", b"<bad\x00name@x.test>", None),
    ("tab", b"<bad\tname@x.test>", None),
    ("space", b"<bad name@x.test>", None),
    ("bad-utf8", b"<bad\x80name@x.test>", None),
    ("utf8", "<bäd@x.test>".encode(), None),
]


@pytest.mark.parametrize("verb,form,stricter", [
    pytest.param(verb, address, stricter, id=f"{verb.split()[0]}-{name}")
    for name, address, stricter in ADDRESS_FORMS for verb in ("MAIL FROM:", "RCPT TO:")])
def test_envelope_address_syntax(pair: Pair, verb: str, form: bytes, stricter: str | None
                                 ) -> None:
    answers = {}
    for name, port in pair.ports().items():
        d = Dialogue(port)
        d.send(b"EHLO client.test\r\n")
        if verb.startswith("RCPT"):
            d.send(b"MAIL FROM:<a@client.test>\r\n")
        answers[name] = code(d.send(verb.encode() + form + b"\r\n")[0])
        d.close()
    if stricter:
        assert answers["relay"] == ("501 5.1.7" if verb.startswith("MAIL") else "501 5.1.3")
    else:
        assert answers["relay"] == answers["postfix"]


# -- reply codes --------------------------------------------------------------------------

# (id, commands sent first, the command, relay's own answer or None for Postfix's).  relay
# does not offer CHUNKING (RFC 3030), so BDAT is an unknown command to it; Postfix offers it.
REPLIES = [
    ("rcpt-before-mail", b"", b"RCPT TO:<a@sink.test>", None),
    ("data-before-mail", b"", b"DATA", None),
    ("unknown-command", b"", b"FOO", None),
    ("data-without-valid-rcpt", b"MAIL FROM:<a@client.test>\r\n", b"DATA", None),
    ("nested-mail", b"MAIL FROM:<a@client.test>\r\n", b"MAIL FROM:<b@client.test>", None),
    ("mail-syntax", b"", b"MAIL FROM:", None),
    ("rcpt-null", b"MAIL FROM:<a@client.test>\r\n", b"RCPT TO:<>", None),
    ("mail-param-unknown", b"", b"MAIL FROM:<a@client.test> BOGUS=1", None),
    ("vrfy", b"", b"VRFY postmaster", None),
    ("expn", b"", b"EXPN postmaster", None),
    ("help", b"", b"HELP", None),
    ("noop", b"", b"NOOP", None),
    ("rset", b"", b"RSET", None),
    ("etrn", b"", b"ETRN sink.test", None),
    ("bdat", b"", b"BDAT 0 LAST", "500 5.5.2"),
    ("helo-no-arg", b"", b"HELO", None),
    ("quit", b"", b"QUIT", None),
]


@pytest.mark.parametrize("before,command,ours", [
    pytest.param(before, command, ours, id=name) for name, before, command, ours in REPLIES])
def test_reply_codes(pair: Pair, before: bytes, command: bytes, ours: str | None) -> None:
    answers = {}
    for name, port in pair.ports().items():
        d = Dialogue(port)
        d.send(b"EHLO client.test\r\n")
        if before:
            d.send(before, before.count(b"\r\n"))
        answers[name] = code(d.send(command + b"\r\n")[0])
        d.close()
    assert answers["relay"] == (ours or answers["postfix"])


# -- extensions ---------------------------------------------------------------------------


def test_dsn_parameters_accepted(pair: Pair) -> None:
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


def test_auth_parameter_after_authentication(pair: Pair) -> None:
    """What relay's own client (and Postfix's with smtp_send_dummy_mail_auth) sends to a
    smart host it authenticated to: MAIL FROM:<sender> AUTH=<>."""
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


def test_smtputf8_bounce_types(pair: Pair) -> None:
    """A message that needs SMTPUTF8 (UTF-8 sender and recipient) is refused by the next
    hop: the notice has the MIME types Postfix gives it (RFC 6533's message/global-* for
    SMTPUTF8 mail)."""
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


def test_ipv4_mapped_client_logged_as_ipv4() -> None:
    """A client that HAProxy reports with an IPv4-mapped IPv6 address (PROXY TCP6
    ::ffff:192.0.2.7) is logged as Postfix logs it: unknown[192.0.2.7]."""
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
