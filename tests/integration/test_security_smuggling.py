"""SMTP smuggling: one DATA is one message, here and at the next hop.

Every end-of-data look-alike (any mix of bare CR, bare LF and the dot other than
CR LF . CR LF) is sent between an innocent body and a smuggled transaction, in one
packet and split at every point across two packets, under each smtpd_forbid_bare_newline
mode.  It must never end DATA: the spool gets exactly one message whose content is,
byte for byte, what RFC 5321 §4.5.2 makes of the bytes sent (modelled by ``server_view``),
or, with ``reject`` and a bare LF, nothing and a 521.  Then the stored message is relayed
to a recording next hop, which must see one MAIL transaction and a body in which no
line-ending convention (CR LF, LF, CR) yields a lone dot.
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


def server_view(wire: bytes, mode: str) -> bytes:
    """What the listener must store for DATA content ``wire`` (CR LF terminated, final
    dot line not included): lines end at CR LF only (RFC 5321 §2.3.8), a leading dot is
    removed (§4.5.2), then bare LF becomes CR LF under ``normalize`` and bare CR always."""
    lines = wire.split(b"\r\n")
    content = b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)
    if mode == "normalize":
        content = re.sub(rb"(?<!\r)\n", b"\r\n", content)
    return re.sub(rb"\r(?!\n)", b"\r\n", content)


@pytest.fixture(scope="module")
def relay_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], RelayDaemon]]:
    started: dict[str, RelayDaemon] = {}

    def get(mode: str) -> RelayDaemon:
        if mode not in started:
            started[mode] = RelayDaemon(tmp_path_factory.mktemp("relay"), {
                **HOLD_DELIVERY, "smtpd_forbid_bare_newline": mode}).start()
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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seq", list(SEQUENCES.values()), ids=list(SEQUENCES))
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
            assert reply == "521 5.5.2 Error: bare <LF> received"
            assert c.closed()
            c.sock.close()
            c = greeted(d)
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

EVERY_LOOKALIKE = PREFIX + b"".join(seq + b"line %d\r\n" % n
                                    for n, seq in enumerate(SEQUENCES.values())) + SMUGGLED


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
            "relayhost": f"[127.0.0.1]:{peer.port}", "smtpd_forbid_bare_newline": mode}).start()
        try:
            with greeted(d) as c:
                transaction(c)
                c.send(EVERY_LOOKALIKE + b".\r\n")
                queue_id = queue_id_of(c.reply())
                assert c.quiet(0.05)
            (message,) = peer.wait_for(1)
            time.sleep(0.2)  # anything smuggled would arrive right behind it
            assert len(peer.all_messages) == 1 and peer.transaction_count == 1
            assert message.sender == "alice@example.org"
            assert message.recipients == ("bob@example.net",)
            assert split_received(message.data)[1] == server_view(EVERY_LOOKALIKE, mode)
            assert f"queued as {queue_id}" not in message.raw_data.decode("latin-1")
            body = message.raw_data[: -len(b".\r\n")]
            assert lone_dot_lines(body) == [], lone_dot_lines(body)
            d.wait_log(f"{queue_id}: removed")
        finally:
            d.stop()
