"""TLS on the listener: STARTTLS, smtpd_tls_security_level, implicit TLS, and the
plaintext-injection attack (CVE-2011-0411 class).

Driven over real sockets against ``relay serve`` with a certificate made here by trustme
(never checked in).  Each test asserts the reply codes, what reached the spool, and that
the daemon still serves the next client.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.auth import hash_password, update_password_file
from tests.integration.test_accept import (
    HOLD_DELIVERY,
    Client,
    assert_consistent,
    content_of,
    queue_id_of,
    split_received,
    wait_idle,
)
from tests.support.daemon import RelayDaemon, free_port

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"Subject: tls\r\n\r\nover TLS\r\n"


@dataclass(frozen=True)
class Certs:
    cert_file: Path
    key_file: Path
    client: ssl.SSLContext  # trusts the test CA, checks the name relay.test


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("relay.test", "127.0.0.1")
    base = tmp_path_factory.mktemp("tls")
    cert_file, key_file = base / "cert.pem", base / "key.pem"
    for pem in issued.cert_chain_pems:
        with open(cert_file, "ab") as f:
            f.write(pem.bytes())
    issued.private_key_pem.write_to_path(str(key_file))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Certs(cert_file, key_file, client)


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RelayDaemon]]:
    """``daemons(start=True, **params)``: a daemon per call, all stopped at module end."""
    started: list[RelayDaemon] = []

    def make(start: bool = True, **params: str) -> RelayDaemon:
        d = RelayDaemon(tmp_path_factory.mktemp("relay"), {**HOLD_DELIVERY, **params})
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop()


@pytest.fixture(scope="module")
def may(daemons: Callable[..., RelayDaemon], certs: Certs) -> tuple[RelayDaemon, int]:
    """STARTTLS offered (level may), AUTH inside TLS only, pipelining not policed, and an
    implicit-TLS listener; returns the daemon and the /tls port."""
    d = daemons(start=False, smtpd_tls_security_level="may",
                smtpd_tls_cert_file=str(certs.cert_file), smtpd_tls_key_file=str(certs.key_file),
                smtpd_sasl_auth_enable="yes", smtpd_sasl_password_file="passwords",
                smtpd_forbid_unauth_pipelining="no")
    update_password_file(str(d.config_dir / "passwords"), "alice", hash_password("secret"))
    tls_port = free_port()
    d.write_config(smtpd_listen=f"127.0.0.1:{d.port}, 127.0.0.1:{tls_port}/tls")
    return d.start(), tls_port


@pytest.fixture(scope="module")
def encrypt(daemons: Callable[..., RelayDaemon], certs: Certs) -> RelayDaemon:
    """TLS required (level encrypt); smtpd_forbid_unauth_pipelining at its default, yes."""
    return daemons(smtpd_tls_security_level="encrypt", smtpd_tls_cert_file=str(certs.cert_file),
                   smtpd_tls_key_file=str(certs.key_file))


class TLSClient(Client):
    """A Client whose connection is TLS from the first byte (implicit TLS)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.sock = context.wrap_socket(raw, server_hostname="relay.test")
        self.buf = b""
        self.banner = self.reply()


def starttls(c: Client, certs: Certs) -> None:
    assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    assert c.buf == b"", c.buf
    c.sock = certs.client.wrap_socket(c.sock, server_hostname="relay.test")


def silent(c: Client, wait: float = 0.4) -> bool:
    """True if nothing arrives within ``wait`` (works on TLS sockets, unlike MSG_PEEK)."""
    if c.buf:
        return False
    c.sock.settimeout(wait)
    try:
        data = c.sock.recv(65536)
    except TimeoutError:
        return True
    finally:
        c.sock.settimeout(5.0)
    c.buf += data
    return not data


def ended(c: Client, wait: float = 3.0) -> bool:
    """True once the server has closed the connection (EOF, reset or TLS EOF)."""
    c.sock.settimeout(wait)
    try:
        while True:
            chunk = c.sock.recv(65536)
            if not chunk:
                return True
            c.buf += chunk
    except TimeoutError:
        return False
    except OSError:
        return True


def ehlo_keywords(c: Client) -> set[str]:
    reply = c.cmd("EHLO client.example")
    assert reply.startswith("250-"), reply
    return {line[4:].split(" ")[0] for line in reply.split("\n")[1:]}


def serves_next_client(d: RelayDaemon) -> None:
    with Client(d.port) as c:
        assert c.banner.startswith("220 relay.test"), c.banner
        assert c.cmd("NOOP").startswith("250")


def disconnect_line(d: RelayDaemon, offset: int) -> str:
    log = d.wait_log("disconnect from", count=d.log().count("disconnect from") or 1)
    lines = [ln for ln in log[offset:].splitlines() if "disconnect from" in ln]
    assert lines, log[offset:]
    return lines[-1]


# ---- STARTTLS ------------------------------------------------------------------------


def test_starttls_then_auth_offered_and_mail_marked_esmtps(
    may: tuple[RelayDaemon, int], certs: Certs,
) -> None:
    d, _ = may
    before = assert_consistent(d)
    with Client(d.port) as c:
        words = ehlo_keywords(c)
        assert "STARTTLS" in words and "AUTH" not in words, words  # smtpd_tls_auth_only
        assert c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==") == \
            "503 5.5.1 Error: authentication not enabled"
        starttls(c, certs)
        words = ehlo_keywords(c)
        assert "STARTTLS" not in words and "AUTH" in words, words
        assert c.cmd("STARTTLS") == "554 5.5.1 Error: TLS already active"
        queue_id = queue_id_of(c.mail("alice@example.org", ["bob@example.net"], MESSAGE))
        assert c.cmd("QUIT").startswith("221")
    received, rest = split_received(content_of(d, queue_id))
    assert b"with ESMTPS id " + queue_id.encode() in received, received
    assert rest == MESSAGE
    assert assert_consistent(d) - before == {queue_id}
    serves_next_client(d)


def test_encrypt_refuses_mail_before_starttls(encrypt: RelayDaemon, certs: Certs) -> None:
    d = encrypt
    before = assert_consistent(d)
    with Client(d.port) as c:
        assert "STARTTLS" in ehlo_keywords(c)
        for command in ("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>", "DATA",
                        "AUTH PLAIN AGEAYg==", "VRFY b@example.net"):
            assert c.cmd(command) == "530 5.7.0 Must issue a STARTTLS command first", command
        assert assert_consistent(d) == before
        starttls(c, certs)
        c.cmd("EHLO client.example")
        queue_id = queue_id_of(c.mail("a@example.org", ["b@example.net"], MESSAGE))
    assert assert_consistent(d) - before == {queue_id}
    serves_next_client(d)


# ---- plaintext injection (CVE-2011-0411) ----------------------------------------------------


def test_commands_sent_with_starttls_are_discarded(
    may: tuple[RelayDaemon, int], certs: Certs,
) -> None:
    d, _ = may
    wait_idle(d)
    offset = len(d.log())
    before = assert_consistent(d)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        # One write: what follows STARTTLS arrives in the same packet, in plaintext.
        c.send(b"STARTTLS\r\nXINJECTED\r\nMAIL FROM:<evil@evil.example>\r\n")
        assert c.reply() == "220 2.0.0 Ready to start TLS"
        assert c.buf == b"", "the server answered the injected commands in plaintext"
        c.sock = certs.client.wrap_socket(c.sock, server_hostname="relay.test")
        # Had the injection run inside TLS, its replies (502, 503) would come first.
        assert c.cmd("NOOP") == "250 2.0.0 Ok"
        assert silent(c)
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<good@example.org>") == "250 2.1.0 Ok"  # not "nested MAIL"
        assert c.cmd("QUIT").startswith("221")
    wait_idle(d)
    line = disconnect_line(d, offset)
    assert "unknown" not in line and " mail=1 " in line, line
    assert assert_consistent(d) == before
    serves_next_client(d)


def test_pipelined_starttls_ends_the_session(encrypt: RelayDaemon) -> None:
    d = encrypt
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.send(b"STARTTLS\r\nMAIL FROM:<evil@evil.example>\r\n")
        assert c.reply() == "554 5.5.0 Error: SMTP protocol synchronization"
        assert c.closed()
        assert c.buf == b""
    d.wait_log("improper command pipelining after STARTTLS from localhost[127.0.0.1]")
    serves_next_client(d)


def test_broken_handshake_leaves_the_daemon_serving(
    may: tuple[RelayDaemon, int], certs: Certs,
) -> None:
    d, _ = may
    before = assert_consistent(d)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        assert c.cmd("STARTTLS").startswith("220")
        c.send(b"MAIL FROM:<not-a-client-hello@example.org>\r\n" * 4)
        assert c.closed()
    d.wait_log("SSL_accept error from localhost[127.0.0.1]")
    # The connection is over for the listener too: Postfix's lines, the slot freed.
    d.wait_log("lost connection after STARTTLS from localhost[127.0.0.1]")
    d.wait_log("disconnect from localhost[127.0.0.1] ehlo=1 starttls=0/1 commands=1/2")
    assert assert_consistent(d) == before
    serves_next_client(d)


def test_a_client_silent_in_the_handshake_is_timed_out_as_postfix_does(
    daemons: Callable[..., RelayDaemon], certs: Certs,
) -> None:
    d = daemons(smtpd_tls_security_level="may", smtpd_tls_cert_file=str(certs.cert_file),
                smtpd_tls_key_file=str(certs.key_file), smtpd_timeout="1s")
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        assert c.cmd("STARTTLS").startswith("220")
        # No ClientHello: smtpd_timeout ends it, and no plaintext 421 goes into the handshake.
        assert c.closed(wait=4)
        assert c.buf == b"", c.buf
    d.wait_log("timeout after STARTTLS from localhost[127.0.0.1]")
    log = d.wait_log("disconnect from localhost[127.0.0.1] ehlo=1 starttls=0/1 commands=1/2")
    assert "SSL_accept error" not in log
    serves_next_client(d)


# ---- implicit TLS (smtpd_listen host:port/tls) ----------------------------------------------


def test_implicit_tls_listener(may: tuple[RelayDaemon, int], certs: Certs) -> None:
    d, tls_port = may
    before = assert_consistent(d)
    with TLSClient(tls_port, certs.client) as c:
        assert c.banner.startswith("220 relay.test"), c.banner
        words = ehlo_keywords(c)
        assert "STARTTLS" not in words and "AUTH" in words, words
        assert c.cmd("STARTTLS") == "554 5.5.1 Error: TLS already active"
        queue_id = queue_id_of(c.mail("alice@example.org", ["bob@example.net"], MESSAGE))
        assert c.cmd("QUIT").startswith("221")
    received, rest = split_received(content_of(d, queue_id))
    assert re.search(rb"with ESMTPS id ", received), received
    assert rest == MESSAGE
    assert assert_consistent(d) - before == {queue_id}


def test_plaintext_on_the_implicit_tls_port(may: tuple[RelayDaemon, int]) -> None:
    d, tls_port = may
    with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as s:
        s.sendall(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n")
        s.settimeout(5)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except OSError:
            pass
        assert b"250" not in data and not data.startswith(b"220"), data
    serves_next_client(d)


# ---- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("params,message", [
    ({"smtpd_tls_security_level": "encrypt"}, "smtpd_tls_cert_file is not set"),
    ({"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": "/nonexistent/cert.pem"},
     "cannot load certificate /nonexistent/cert.pem"),
], ids=["encrypt-without-cert", "unreadable-cert"])
def test_tls_misconfiguration_is_fatal(
    daemons: Callable[..., RelayDaemon], params: dict[str, str], message: str,
) -> None:
    d = daemons(start=False, **params)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(15) == 1
    assert "relay: fatal: " in d.stderr() and message in d.stderr(), d.stderr()


def test_level_none_offers_no_starttls_even_with_a_certificate(
        daemons: Callable[..., RelayDaemon], certs: Certs) -> None:
    d = daemons(smtpd_tls_security_level="none", smtpd_tls_cert_file=str(certs.cert_file),
                smtpd_tls_key_file=str(certs.key_file))
    with Client(d.port) as c:
        words = ehlo_keywords(c)
        assert "STARTTLS" not in words, words
        assert c.cmd("STARTTLS").startswith("5"), "STARTTLS must not be accepted at level none"
        queue_id_of(c.mail("alice@example.org", ["bob@example.net"], MESSAGE))
    serves_next_client(d)
