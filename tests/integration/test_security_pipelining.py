"""Clients that do not wait: pregreet (talking before the banner) and unauthorised
pipelining (RFC 2920), as postscreen's pregreet test and Postfix's
smtpd_forbid_unauth_pipelining refuse them; and legitimate pipelining, which must keep
working, from raw sockets and from a real client library.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator

import pytest

from tests.integration.test_accept import (
    HOLD_DELIVERY,
    Client,
    assert_consistent,
    find_envelope,
    queue_id_of,
    wait_idle,
)
from tests.support.daemon import RelayDaemon

pytestmark = pytest.mark.timeout(60)

TRANSACTION = (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
               b"Subject: pipelined\r\n\r\nbody\r\n.\r\n")
SYNC = "554 5.5.0 Error: SMTP protocol synchronization"


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayDaemon]:
    """smtpd_forbid_unauth_pipelining at its default (yes)."""
    d = RelayDaemon(tmp_path_factory.mktemp("relay"), HOLD_DELIVERY).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def greet_wait(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayDaemon]:
    d = RelayDaemon(tmp_path_factory.mktemp("relay"),
                    {**HOLD_DELIVERY, "postscreen_greet_wait": "1s"}).start(wait=False)
    end = time.monotonic() + 15
    while True:  # the fixture's own wait gives up before a 1 s banner
        try:
            with socket.create_connection(("127.0.0.1", d.port), timeout=3) as s:
                assert s.recv(100).startswith(b"220")
                break
        except OSError:
            assert time.monotonic() < end, d.stderr()
            time.sleep(0.1)
    yield d
    d.stop()


def serves_next_client(d: RelayDaemon) -> None:
    with Client(d.port) as c:
        assert c.banner.startswith("220 relay.test"), c.banner
        assert c.cmd("EHLO client.example").startswith("250")
        queue_id_of(c.mail("next@example.org", ["b@example.net"], b"Subject: next\r\n\r\nok\r\n"))


# ---- pregreet ----------------------------------------------------------------------------------


def test_talking_before_the_banner(greet_wait: RelayDaemon) -> None:
    d = greet_wait
    before = assert_consistent(d)
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        s.sendall(b"EHLO spambot.example\r\n" + TRANSACTION)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    # No banner at all: the refusal is the first and only thing the client hears.
    assert data == b"554 5.5.1 Error: SMTP protocol synchronization\r\n", data
    d.wait_log("PREGREET ")
    assert re.search(r"relay/smtpd\[\d+\]: PREGREET \d+ after 1\.0 from localhost\[127\.0\.0\.1\]: "
                     r"EHLO spambot\.example\\x0d\\x0aMAIL FROM:", d.log()), d.log()
    assert assert_consistent(d) == before


def test_a_client_that_waits_gets_the_banner(greet_wait: RelayDaemon) -> None:
    d = greet_wait
    start = time.monotonic()
    with Client(d.port) as c:
        assert time.monotonic() - start >= 0.9
        assert c.banner.startswith("220 relay.test")
        c.cmd("EHLO patient.example")
        queue_id_of(c.mail("a@example.org", ["b@example.net"], b"Subject: ok\r\n\r\nok\r\n"))


# ---- unauthorised pipelining ------------------------------------------------------------------


@pytest.mark.parametrize("prologue,burst,after", [
    ([], b"EHLO client.example\r\n" + TRANSACTION, "EHLO"),
    (["EHLO client.example"], b"NOOP\r\nMAIL FROM:<a@example.org>\r\n", "NOOP"),
    (["EHLO client.example", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"],
     b"DATA\r\nSubject: early\r\n\r\ntoo soon\r\n.\r\n", "DATA"),
    (["EHLO client.example"], b"HELO client.example\r\nRSET\r\n", "HELO"),
    (["EHLO client.example"], b"VRFY postmaster\r\nQUIT\r\n", "VRFY"),
    (["EHLO client.example"], b"AUTH LOGIN\r\ndXNlcg==\r\n", "AUTH"),
], ids=["ehlo", "noop", "data", "helo", "vrfy", "auth"])
def test_unauthorised_pipelining_ends_the_session(
    strict: RelayDaemon, prologue: list[str], burst: bytes, after: str,
) -> None:
    d = strict
    before = assert_consistent(d)
    with Client(d.port) as c:
        for line in prologue:
            assert c.cmd(line).startswith("250")
        c.send(burst)
        assert c.reply() == SYNC
        assert c.closed() and c.buf == b"", c.buf  # nothing after it was executed
    d.wait_log(f"improper command pipelining after {after} from localhost[127.0.0.1]")
    assert assert_consistent(d) == before
    serves_next_client(d)


def test_rfc2920_pipelining_still_works(strict: RelayDaemon) -> None:
    d = strict
    before = assert_consistent(d)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        # MAIL, RCPT... and DATA may go in one group; DATA ends it.
        c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
               b"RCPT TO:<c@example.net>\r\nDATA\r\n")
        assert [c.reply() for _ in range(4)] == [
            "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>"]
        # The content, its end and the next group (RSET, MAIL...) may follow each other.
        c.send(b"Subject: one\r\n\r\nfirst\r\n.\r\nRSET\r\nMAIL FROM:<>\r\n"
               b"RCPT TO:<d@example.net>\r\nDATA\r\n")
        first = queue_id_of(c.reply())
        assert [c.reply() for _ in range(4)] == [
            "250 2.0.0 Ok", "250 2.1.0 Ok", "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>"]
        c.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        second = queue_id_of(c.reply())
        assert c.reply().startswith("221")
    assert assert_consistent(d) - before == {first, second}
    assert [r.address for r in find_envelope(d, first).recipients] == \
        ["b@example.net", "c@example.net"]
    assert find_envelope(d, second).sender == ""


def test_a_pipelining_client_library(strict: RelayDaemon) -> None:
    import aiosmtplib

    d = strict
    before = assert_consistent(d)
    message = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: lib\r\n\r\nvia aiosmtplib\r\n"
    errors, reply = asyncio.run(aiosmtplib.send(
        message, sender="a@example.org", recipients=["b@example.net", "c@example.net"],
        hostname="127.0.0.1", port=d.port, start_tls=False, timeout=10))
    assert errors == {} and reply.startswith("2.0.0 Ok: queued as"), (errors, reply)
    assert len(assert_consistent(d) - before) == 1


def test_pipelining_allowed_when_not_forbidden(tmp_path_factory: pytest.TempPathFactory) -> None:
    d = RelayDaemon(tmp_path_factory.mktemp("relay"),
                    {**HOLD_DELIVERY, "smtpd_forbid_unauth_pipelining": "no"}).start()
    try:
        wait_idle(d)
        with Client(d.port) as c:
            c.send(b"EHLO client.example\r\n" + TRANSACTION)
            assert c.reply().startswith("250-relay.test")
            assert [c.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
            queue_id_of(c.reply())
    finally:
        d.stop()
