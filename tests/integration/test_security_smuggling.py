"""SMTP smuggling: one DATA is one message, here and at the next hop.

Every end-of-data look-alike (any mix of bare CR, bare LF and the dot other than
CR LF . CR LF) is sent between an innocent body and a smuggled transaction, in one
packet and split at every point across two packets, under each smtpd_forbid_bare_newline
mode that enforces the standard end of data (``normalize``, ``reject``; the client is not
excluded).  It must never end DATA: the spool gets exactly one message whose content is,
byte for byte, what Postfix 3.7's smtpd makes of the bytes sent (modelled by
``server_view``), or, with ``reject`` and a bare LF, nothing and a 550.  Under ``no``, as in
Postfix, a lone dot ends the data however its line ends; the look-alikes that are not such
a line must still not.  Then the stored message is relayed to a recording next hop, which
must see one MAIL transaction and a body in which no line-ending convention (CR LF, LF, CR)
yields a lone dot.
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
    find_envelope,
    queue_id_of,
    split_received,
)
from tests.support.daemon import RelayDaemon
from tests.support.peers import ThreadedPeer
from tests.support.smtp_model import stored_content

pytestmark = pytest.mark.timeout(60)

PREFIX = b"Subject: innocent\r\n\r\nbody"
SMUGGLED = (b"MAIL FROM:<evil@evil.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
            b"From: evil@evil.example\r\nSubject: smuggled\r\n\r\nevil\r\n")
SEQUENCES = {
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "lf-dot-cr": b"\n.\r",
    "cr-dot-lf": b"\r.\n",
    "crlf-dot-space-crlf": b"\r\n. \r\n",
    "crlf-dot-cr-crlf": b"\r\n.\r\r\n",
    "cr-crlf-dot-lf": b"\r\r\n.\n",
    "crlf-dot-crlf-of-data-start": b"\r\n\r\n.\n\r\n",
}
MODES = ["normalize", "reject", "no"]
# Postfix exempts clients in mynetworks from the rule; these tests talk from loopback.
ENFORCED = {"smtpd_forbid_bare_newline_exclusions": ""}


def server_view(wire: bytes, mode: str) -> bytes | None:
    return stored_content(wire, mode)


def lookalikes(mode: str) -> dict[str, bytes]:
    """The look-alikes that must not end the data under ``mode``."""
    return {name: seq for name, seq in SEQUENCES.items()
            if server_view(PREFIX + seq + SMUGGLED, mode) is not None}


@pytest.fixture(scope="module")
def relay_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], RelayDaemon]]:
    started: dict[str, RelayDaemon] = {}

    def get(mode: str) -> RelayDaemon:
        if mode not in started:
            started[mode] = RelayDaemon(tmp_path_factory.mktemp("relay"), {
                **HOLD_DELIVERY, **ENFORCED, "smtpd_forbid_bare_newline": mode}).start()
        return started[mode]

    yield get
    for d in started.values():
        d.stop()


def greeted(d: RelayDaemon) -> Client:
    c = Client(d.port)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert c.cmd("EHLO client.example").startswith("250")
    return c


def transaction(c: Client) -> None:
    # Exact replies: an answer to a smuggled command would shift them.
    assert c.cmd("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@example.net>") == "250 2.1.5 Ok"
    assert c.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"


@pytest.mark.parametrize("mode,seq", [(mode, seq) for mode in MODES
                                      for seq in lookalikes(mode).values()],
                         ids=[f"{name}-{mode}" for mode in MODES for name in lookalikes(mode)])
def test_no_lookalike_ends_data(relay_in: Callable[[str], RelayDaemon], mode: str,
                                seq: bytes) -> None:
    d = relay_in(mode)
    wire = PREFIX + seq + SMUGGLED
    bare_lf = re.search(rb"(?<!\r)\n", wire) is not None
    before = assert_consistent(d)
    queued = set()
    c = greeted(d)
    # Split before, inside and after the look-alike; None: all in one packet.
    for split in [None, *range(len(PREFIX), len(PREFIX) + len(seq) + 1)]:
        transaction(c)
        if split is None:
            c.send(wire + b".\r\n")
        else:
            c.send(wire[:split])
            assert c.quiet(0.01), "the look-alike ended DATA"
            c.send(wire[split:] + b".\r\n")
        reply = c.reply()
        if mode == "reject" and bare_lf:
            assert reply == "550 5.5.2 Error: bare <LF> received"
            continue
        queue_id = queue_id_of(reply)
        stored = split_received(content_of(d, queue_id))[1]
        assert stored == server_view(wire, mode), (stored, server_view(wire, mode))
        assert b"Subject: smuggled" in stored
        assert [r.address for r in find_envelope(d, queue_id).recipients] == ["bob@example.net"]
        queued.add(queue_id)
    assert c.quiet(0.1), "the server answered the smuggled commands"
    c.sock.close()
    assert assert_consistent(d) - before == queued
    with Client(d.port) as c:
        assert c.cmd("NOOP").startswith("250")


# ---- the next hop ------------------------------------------------------------------------------

def every_lookalike(mode: str) -> bytes:
    return PREFIX + b"".join(seq + b"line %d\r\n" % n
                             for n, seq in enumerate(lookalikes(mode).values())) + SMUGGLED


def lone_dot_lines(raw: bytes) -> list[str]:
    """Line-end conventions under which some line of ``raw`` is a lone dot."""
    found = []
    for name, pattern in (("CRLF", rb"\r\n"), ("LF", rb"\r?\n"), ("CR|LF", rb"\r\n|\r|\n")):
        if b"." in re.split(pattern, raw):
            found.append(name)
    return found


@pytest.mark.parametrize("mode", ["normalize", "no"])
def test_one_message_at_the_next_hop(tmp_path_factory: pytest.TempPathFactory,
                                     mode: str) -> None:
    with ThreadedPeer() as peer:
        d = RelayDaemon(tmp_path_factory.mktemp("relay"), {
            "relayhost": f"[127.0.0.1]:{peer.port}", "smtpd_forbid_bare_newline": mode,
            **ENFORCED}).start()
        try:
            with greeted(d) as c:
                transaction(c)
                c.send(every_lookalike(mode) + b".\r\n")
                queue_id = queue_id_of(c.reply())
                assert c.quiet(0.05)
            (message,) = peer.wait_for(1)
            time.sleep(0.2)  # anything smuggled would arrive right behind it
            assert len(peer.all_messages) == 1 and peer.transaction_count == 1
            assert message.sender == "alice@example.org"
            assert message.recipients == ("bob@example.net",)
            assert split_received(message.data)[1] == server_view(every_lookalike(mode), mode)
            assert f"queued as {queue_id}" not in message.raw_data.decode("latin-1")
            body = message.raw_data[: -len(b".\r\n")]
            assert lone_dot_lines(body) == [], lone_dot_lines(body)
            d.wait_log(f"{queue_id}: removed")
        finally:
            d.stop()
