"""Abuse limits: per-client rates (anvil), errors, slow clients, and input that breaks rules.

Every limit is driven over real sockets against ``relay serve`` with the exact bytes of
the attack and answered as Postfix would: 421 and a closed connection for the rate, error
and time limits; a 5xx and a session that goes on for a bad line, a NUL byte, an
overlong address or too many hops.  Each test checks what reached the spool and that
the daemon still serves the next client.  Clients use their own 127.0.0.x source
address where a per-client counter is involved, so tests do not share counts.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.test_accept import (
    HOLD_DELIVERY,
    Client,
    assert_consistent,
    content_of,
    queue_id_of,
    split_received,
    wait_idle,
)
from tests.support.daemon import RelayDaemon

pytestmark = pytest.mark.timeout(60)

OUTSIDE = {"mynetworks": "127.0.0.2/32", "relay_domains": "example.com"}


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RelayDaemon]]:
    started: dict[tuple[tuple[str, str], ...], RelayDaemon] = {}

    def get(**params: str) -> RelayDaemon:
        key = tuple(sorted(params.items()))
        if key not in started:
            started[key] = RelayDaemon(tmp_path_factory.mktemp("relay"),
                                       {**HOLD_DELIVERY, **OUTSIDE, **params}).start()
        return started[key]

    yield get
    for d in started.values():
        d.stop()


# Pipelining is not policed here, so that "nothing after the 421 runs" is the
# listener's doing and not the pipelining check's.
RATES = {"smtpd_client_connection_rate_limit": "3", "smtpd_client_message_rate_limit": "2",
         "smtpd_client_recipient_rate_limit": "4", "smtpd_hard_error_limit": "5",
         "smtpd_forbid_unauth_pipelining": "no"}


@pytest.fixture
def rated(daemons: Callable[..., RelayDaemon]) -> RelayDaemon:
    return daemons(**RATES)


@pytest.fixture
def plain(daemons: Callable[..., RelayDaemon]) -> RelayDaemon:
    return daemons()


def client(d: RelayDaemon, source: str) -> Client:
    try:
        return Client(d.port, source=source)
    except OSError as exc:
        pytest.skip(f"cannot bind a client socket to {source}: {exc}")


def serves_next_client(d: RelayDaemon, source: str = "127.0.0.2") -> None:
    with client(d, source) as c:
        assert c.banner.startswith("220 relay.test"), c.banner
        c.cmd("EHLO client.example")
        queue_id_of(c.mail("next@example.org", ["next@example.com"], b"Subject: next\r\n\r\nok\r\n"))


# ---- anvil rates ------------------------------------------------------------------------------


def test_connection_rate_limit(rated: RelayDaemon) -> None:
    d = rated
    for _ in range(3):
        with client(d, "127.0.0.11") as c:
            assert c.banner.startswith("220 "), c.banner
    with client(d, "127.0.0.11") as c:
        assert c.banner == "421 4.7.0 relay.test Error: too many connections from 127.0.0.11"
        assert c.closed()
    d.wait_log("warning: Connection rate limit exceeded: 4 from localhost[127.0.0.11] "
               "for service smtp")
    for _ in range(5):  # mynetworks is exempt (smtpd_client_event_limit_exceptions)
        with client(d, "127.0.0.2") as c:
            assert c.banner.startswith("220 "), c.banner
    serves_next_client(d)


def test_message_rate_limit(rated: RelayDaemon) -> None:
    d = rated
    before = assert_consistent(d)
    queued = set()
    with client(d, "127.0.0.12") as c:
        c.cmd("EHLO client.example")
        for n in range(2):
            queued.add(queue_id_of(c.mail("a@sender.example", ["b@example.com"],
                                          b"Subject: %d\r\n\r\nx\r\n" % n)))
        # The third MAIL, pipelined with a whole message (which must never be
        # queued), ends the session.
        c.send(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
               b"Subject: 3\r\n\r\nx\r\n.\r\n")
        assert c.reply() == "421 4.7.0 relay.test Error: too many messages from 127.0.0.12"
        assert c.closed() and c.buf == b""
    d.wait_log("warning: Message delivery request rate limit exceeded: 3 from "
               "localhost[127.0.0.12] for service smtp")
    log = d.wait_log("disconnect from localhost[127.0.0.12]")
    assert "disconnect from localhost[127.0.0.12] ehlo=1 mail=2/3 rcpt=2 data=2 " \
        "commands=7/8" in log, log[-600:]
    assert assert_consistent(d) - before == queued
    serves_next_client(d)


def test_recipient_rate_limit(rated: RelayDaemon) -> None:
    d = rated
    before = assert_consistent(d)
    with client(d, "127.0.0.13") as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@sender.example>")
        for n in range(4):
            assert c.cmd(f"RCPT TO:<r{n}@example.com>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<r4@example.com>") == \
            "421 4.7.0 relay.test Error: too many recipients from 127.0.0.13"
        assert c.closed()
    d.wait_log("warning: Recipient address rate limit exceeded: 5 from localhost[127.0.0.13]")
    assert assert_consistent(d) == before
    serves_next_client(d)


def test_hard_error_limit(rated: RelayDaemon) -> None:
    d = rated
    wait_idle(d, "127.0.0.14")
    with client(d, "127.0.0.14") as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@sender.example>")
        assert c.cmd("RCPT TO:<a@other.org>").startswith("554 5.7.1")  # 1
        assert c.cmd("XYZZY") == "500 5.5.2 Error: command not recognized"  # 2
        assert c.cmd("MAIL FROM:<a@b@c>").startswith("5")  # 3
        assert c.cmd("") == "500 5.5.2 Error: bad syntax"  # 4
        assert c.cmd("VRFY") .startswith("5")  # 5: the limit
        assert c.reply() == "421 4.7.0 relay.test Error: too many errors"
        assert c.closed()
    log = d.wait_log("too many errors after VRFY from localhost[127.0.0.14]")
    wait_idle(d, "127.0.0.14")
    # The empty line counts as an unknown command, as Postfix counts malformed ones.
    assert re.search(r"disconnect from localhost\[127\.0\.0\.14\] .*unknown=0/2",
                     d.log()), log[-500:]
    serves_next_client(d)


# ---- slow clients ---------------------------------------------------------------------------


def test_silent_client_gets_421(daemons: Callable[..., RelayDaemon]) -> None:
    d = daemons(smtpd_timeout="1s", smtpd_session_time_limit="2s")
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        assert c.closed(wait=4)
        assert c.buf == b"421 4.4.2 relay.test Error: timeout exceeded\r\n", c.buf
    d.wait_log("timeout after EHLO from localhost[127.0.0.1]")
    serves_next_client(d)


def test_session_time_limit_stops_a_slowloris(daemons: Callable[..., RelayDaemon]) -> None:
    d = daemons(smtpd_timeout="1s", smtpd_session_time_limit="2s")
    before = assert_consistent(d)
    start = time.monotonic()
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<slow@example.org>")
        c.cmd("RCPT TO:<b@example.com>")
        assert c.cmd("DATA").startswith("354")
        c.send(b"Subject: slow\r\n\r\n")
        # One byte every half second: never silent for smtpd_timeout, never done.
        while time.monotonic() - start < 6 and c.quiet(0.5):
            try:
                c.send(b"x")
            except OSError:
                break
        assert c.line() == b"421 4.4.2 relay.test Error: timeout exceeded"
        assert c.closed()
    assert 1.5 <= time.monotonic() - start <= 5
    d.wait_log("session time limit exceeded after DATA from localhost[127.0.0.1]")
    assert assert_consistent(d) == before
    serves_next_client(d)


# ---- bad input: a 5xx, nothing queued, the session goes on -------------------------------------


def still_usable(c: Client, d: RelayDaemon) -> str:
    c.cmd("RSET")
    return queue_id_of(c.mail("after@example.org", ["ok@example.com"],
                              b"Subject: after\r\n\r\nstill usable\r\n"))


def test_command_line_too_long(plain: RelayDaemon) -> None:
    d = plain
    before = assert_consistent(d)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        assert c.cmd("NOOP " + "x" * 600) == "500 5.5.2 Error: command line too long"
        assert c.cmd("NOOP " + "x" * 5000) == "500 5.5.2 Error: command line too long"
        # MAIL may be longer by what its parameters add (RFC 1870, 3461, 4954, 6152, 6531).
        assert c.cmd("MAIL FROM:<" + "a" * 1200 + "@example.org>") == \
            "500 5.5.2 Error: command line too long"
        assert c.cmd("RCPT TO:<" + "a" * 1100 + "@example.org>") == \
            "500 5.5.2 Error: command line too long"
        assert c.cmd("NOOP " + "x" * 400).startswith("250")
        queue_id = still_usable(c, d)
    assert assert_consistent(d) - before == {queue_id}
    serves_next_client(d)


@pytest.mark.parametrize("line", [
    b"x" * 998 + b"\r\n",  # 1000 octets with CR LF: the longest RFC 5321 allows
    b"." + b"y" * 997 + b"\r\n",  # 1001 on the wire once the dot is doubled
    b"x" * 999 + b"\r\n",
    b"x" * 5000 + b"\r\n",
    b"x" * 200_000 + b"\r\n",  # longer than the reader's buffer: read in pieces
    b"." * 70_000 + b"\r\n",  # only the first dot of a long line is a stuffing dot
], ids=["998", "998-stuffed", "999", "5000", "200000", "dots-70000"])
def test_long_text_lines_are_accepted(plain: RelayDaemon, line: bytes) -> None:
    """Postfix accepts lines of any length (and breaks them on the way out at
    smtp_line_length_limit); so does relay, storing them whole."""
    d = plain
    before = assert_consistent(d)
    content = b"Subject: long\r\n\r\n" + line + b"end\r\n"
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<b@example.com>")
        queue_id = queue_id_of(c.data(content))  # data() stuffs the leading dots
        assert split_received(content_of(d, queue_id))[1] == content
        assert assert_consistent(d) - before == {queue_id}
        still_usable(c, d)
    serves_next_client(d)


def test_nul_bytes(plain: RelayDaemon) -> None:
    d = plain
    before = assert_consistent(d)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        # In an address a NUL is bad syntax, as Postfix answers; elsewhere it is its own.
        assert c.cmd(b"MAIL FROM:<a\x00b@example.org>") == \
            "501 5.1.7 Bad sender address syntax"
        assert c.cmd(b"NO\x00OP") == "500 5.5.2 Error: NUL character in command"
        c.cmd("MAIL FROM:<a@example.org>")
        assert c.cmd(b"RCPT TO:<b@example.com>\x00") == \
            "501 5.1.3 Bad recipient address syntax"
        assert c.cmd("RCPT TO:<b@example.com>").startswith("250")
        assert c.data(b"Subject: nul\r\n\r\nbefore\x00after\r\n") == \
            "554 5.6.0 Error: NUL character in message content"
        assert assert_consistent(d) == before
        queue_id = still_usable(c, d)
    assert assert_consistent(d) - before == {queue_id}
    serves_next_client(d)


@pytest.mark.parametrize("address,reply", [
    ("<" + "l" * 65 + "@example.com>", "501 5.1.3 Bad recipient address syntax: local part too long"),
    ("<" + "l" * 64 + "@" + "d" * 60 + "." + "e" * 60 + "." + "f" * 60 + "." + "g" * 60 + ".com>",
     "501 5.1.3 Bad recipient address syntax: address too long"),
], ids=["local-part-65", "path-257"])
def test_overlong_addresses(plain: RelayDaemon, address: str, reply: str) -> None:
    d = plain
    before = assert_consistent(d)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@example.org>")
        assert c.cmd(f"RCPT TO:{address}") == reply
        c.cmd("RSET")
        assert c.cmd(f"MAIL FROM:{address}") == \
            reply.replace("recipient", "sender").replace("5.1.3", "5.1.7")
        queue_id = still_usable(c, d)
    assert assert_consistent(d) - before == {queue_id}


def test_8bit_body_without_8bitmime_is_accepted(plain: RelayDaemon) -> None:
    d = plain
    content = (b"Subject: 8bit\r\n\r\n" + bytes(range(0x80, 0x100)) + b"\r\n"
               + "caf\u00e9\r\n".encode("latin-1") + b"\xff\xfe not utf-8\r\n")
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        queue_id = queue_id_of(c.mail("a@example.org", ["b@example.com"], content))
    assert split_received(content_of(d, queue_id))[1] == content


@pytest.mark.parametrize("hops,accepted", [(50, True), (51, False)])
def test_hopcount_limit(plain: RelayDaemon, hops: int, accepted: bool) -> None:
    d = plain
    before = assert_consistent(d)
    header = b"".join(b"Received: from hop%d.example by hop%d.example; "
                      b"Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (n, n + 1) for n in range(hops))
    content = header + b"Subject: loop\r\n\r\nReceived: in the body does not count\r\n"
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        reply = c.mail("a@example.org", ["b@example.com"], content)
        if accepted:
            assert assert_consistent(d) - before == {queue_id_of(reply)}
        else:
            assert reply == "554 5.4.6 Too many hops"
            assert assert_consistent(d) == before
        still_usable(c, d)
    if not accepted:
        d.wait_log("NOQUEUE: reject: DATA from localhost[127.0.0.1]: 554 5.4.6 Too many hops")


def test_commands_before_the_banner_with_a_closed_door_are_harmless(plain: RelayDaemon) -> None:
    # A client that floods bytes and hangs up at once: no crash, nothing queued.
    d = plain
    before = assert_consistent(d)
    for payload in (b"\x00" * 4096, b"\xff" * 70000, b"EHLO x\r\n" * 500, b"\r\n" * 3000):
        with socket.create_connection(("127.0.0.1", d.port)) as s:
            s.sendall(payload)
    assert assert_consistent(d) == before
    serves_next_client(d)


def test_anvil_rates_start_again_after_the_time_unit() -> None:
    # The counting rule behind every rate above, with a clock the test moves.
    from relay.anvil import Anvil, Event

    now = [1000.0]
    anvil = Anvil(60.0, now=lambda: now[0])
    assert [anvil.record(Event.CONNECT, "192.0.2.1") for _ in range(3)] == [1, 2, 3]
    assert anvil.record(Event.MESSAGE, "192.0.2.1") == 1  # per event
    assert anvil.record(Event.CONNECT, "192.0.2.2") == 1  # per client
    now[0] += 59.9
    assert anvil.rate(Event.CONNECT, "192.0.2.1") == 3
    assert anvil.record(Event.CONNECT, "192.0.2.1") == 4
    now[0] += 0.1  # the client's time unit, begun at its first event, is over
    assert anvil.rate(Event.CONNECT, "192.0.2.1") == 0
    assert anvil.record(Event.CONNECT, "192.0.2.1") == 1
    now[0] += 120  # stale entries are dropped: a flood from many addresses is forgotten
    anvil.record(Event.CONNECT, "192.0.2.9")
    assert len(anvil) == 1
