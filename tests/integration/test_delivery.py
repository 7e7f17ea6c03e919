"""relay.delivery against scripted SMTP peers over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import pytest

from relay.delivery import (
    BODY_CHUNK,
    Attempt,
    DeliverySettings,
    MailOptions,
    RcptOptions,
    RcptStatus,
    SMTPDelivery,
    TargetLike,
)
from relay.routing import Target
from tests.support.peers import (
    Fault,
    Peer,
    PeerScript,
    PeerTLS,
    Reply,
    ThreadedPeer,
    make_peer_tls,
)

T = TypeVar("T")

SETTINGS = DeliverySettings(
    helo_name="relay.test",
    connect_timeout=3.0,
    helo_timeout=3.0,
    mail_timeout=3.0,
    rcpt_timeout=3.0,
    data_init_timeout=3.0,
    data_xfer_timeout=3.0,
    data_done_timeout=3.0,
    quit_timeout=3.0,
    starttls_timeout=3.0,
    connection_cache_time_limit=5.0,
)
MESSAGE = b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"
SENDER = "alice@example.org"
GREETING_STAGE = "receiving the initial server greeting"
DOT_STAGE = "sending end of data -- message may be sent more than once"  # Postfix's words
BIG = 8 * 1024 * 1024  # larger than every socket buffer between client and a stalled peer


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def target(peer: Peer, hostname: str = "mx.test") -> Target:
    return Target(hostname, peer.host, peer.port, 0)


async def deliver(
    targets: Peer | Sequence[TargetLike],
    recipients: Sequence[str] = ("bob@example.com",),
    *,
    message: bytes = MESSAGE,
    sender: str = SENDER,
    settings: DeliverySettings = SETTINGS,
    delivery: SMTPDelivery | None = None,
    label: str = "example.com",
) -> Attempt:
    if isinstance(targets, Peer):
        targets = [target(targets)]
    own = delivery is None
    client = SMTPDelivery() if delivery is None else delivery
    try:
        return await client.deliver(targets, label, sender, recipients, message, settings)
    finally:
        if own:
            await client.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tls() -> PeerTLS:
    return make_peer_tls("mx.test", "127.0.0.1")


# --- per-recipient fates --------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_each_recipient_fate_is_decided_on_its_own(pipelining: bool) -> None:
    script = PeerScript(
        pipelining=pipelining,
        rcpt_by_address={
            "grey@example.com": Reply(
                450, "4.2.0 <grey@example.com>: Recipient address rejected: Greylisted"
            ),
            "gone@example.com": Reply(
                550, "5.1.1 <gone@example.com>: Recipient address rejected: User unknown"
            ),
            "full@example.com": Reply(452, "4.5.3 Error: too many recipients"),
        },
    )

    async def scenario() -> None:
        async with Peer(script) as peer:
            rcpts = [
                "a@example.com",
                "grey@example.com",
                "gone@example.com",
                "b@example.com",
                "full@example.com",
            ]
            attempt = await deliver(peer, rcpts)
            (message,) = peer.messages
            assert message.recipients == ("a@example.com", "b@example.com")
            namaddr = "mx.test[127.0.0.1]"
            by_address = {r.address: r for r in attempt.results}
            assert [r.address for r in attempt.results] == rcpts
            for ok in ("a@example.com", "b@example.com"):
                assert by_address[ok].status is RcptStatus.SENT
                assert by_address[ok].dsn == "2.0.0"
                assert by_address[ok].reason == f"250 2.0.0 Ok: queued as {message.queue_id}"
            grey = by_address["grey@example.com"]
            assert (grey.status, grey.dsn) == (RcptStatus.DEFER, "4.2.0")
            assert grey.reason == (
                f"host {namaddr} said: 450 4.2.0 <grey@example.com>: Recipient address rejected: "
                "Greylisted (in reply to RCPT TO command)"
            )
            gone = by_address["gone@example.com"]
            assert (gone.status, gone.dsn) == (RcptStatus.BOUNCE, "5.1.1")
            assert gone.reason == (
                f"host {namaddr} said: 550 5.1.1 <gone@example.com>: Recipient address rejected: "
                "User unknown (in reply to RCPT TO command)"
            )
            full = by_address["full@example.com"]
            assert (full.status, full.dsn) == (RcptStatus.DEFER, "4.5.3")
            assert attempt.relay == f"mx.test[127.0.0.1]:{peer.port}"
            assert not attempt.connection_failed
            assert not attempt.reused
            assert attempt.conn_setup_seconds >= 0 and attempt.xfer_seconds >= 0

    run(scenario())


def test_recipient_replies_by_position_and_multiline_reason() -> None:
    script = PeerScript(
        rcpt_by_position={
            1: Reply(
                550,
                "5.1.1 The email account that you tried to reach does not exist.\n5.1.1 Learn more",
            ),
        }
    )

    async def scenario() -> None:
        async with Peer(script) as peer:
            attempt = await deliver(peer, ["x@example.com", "y@example.com"])
            assert attempt.results[0].status is RcptStatus.SENT
            assert attempt.results[1].status is RcptStatus.BOUNCE
            assert attempt.results[1].dsn == "5.1.1"
            assert attempt.results[1].reason == (
                "host mx.test[127.0.0.1] said: 550-5.1.1 The email account that you tried to "
                "reach does not exist. 550 5.1.1 Learn more (in reply to RCPT TO command)"
            )

    run(scenario())


def test_reply_without_enhanced_code_gets_a_dsn_from_the_reply_code() -> None:
    script = PeerScript(enhancedstatuscodes=False, rcpt_by_position={0: Reply(554, "no thanks")})

    async def scenario() -> None:
        async with Peer(script) as peer:
            attempt = await deliver(peer, ["x@example.com"])
            assert (attempt.results[0].status, attempt.results[0].dsn) == (
                RcptStatus.BOUNCE,
                "5.0.0",
            )

    run(scenario())


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(
    ("reply", "status", "dsn"),
    [
        (
            Reply(553, "5.7.1 <alice@example.org>: Sender address rejected: Access denied"),
            RcptStatus.BOUNCE,
            "5.7.1",
        ),
        (Reply(451, "4.3.0 Error: queue file write error"), RcptStatus.DEFER, "4.3.0"),
    ],
)
def test_refused_sender_decides_every_recipient(
    pipelining: bool, reply: Reply, status: RcptStatus, dsn: str
) -> None:
    async def scenario() -> None:
        async with Peer(PeerScript(pipelining=pipelining, mail=reply)) as peer:
            attempt = await deliver(peer, ["x@example.com", "y@example.com"])
            for result in attempt.results:
                assert (result.status, result.dsn) == (status, dsn)
                assert result.reason == (
                    f"host mx.test[127.0.0.1] said: {reply.code} {reply.text} "
                    "(in reply to MAIL FROM command)"
                )
            assert not attempt.connection_failed
            assert peer.all_messages == []
            (session,) = peer.sessions
            assert "RSET" in session.verbs()
            if not pipelining:
                assert "RCPT" not in session.verbs()

    run(scenario())


def test_null_sender() -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            attempt = await deliver(peer, sender="")
            assert attempt.results[0].status is RcptStatus.SENT
            (message,) = peer.messages
            assert message.sender == ""
            (session,) = peer.sessions
            mail = next(c.line for c in session.commands if c.line.startswith("MAIL"))
            assert mail == f"MAIL FROM:<> SIZE={len(MESSAGE)}"

    run(scenario())


# --- next MX, connection failures ----------------------------------------------------------


def test_421_greeting_moves_on_to_the_next_mx() -> None:
    async def scenario() -> None:
        async with (
            Peer(PeerScript(greeting=Reply(421, "4.3.2 Service shutting down"))) as busy,
            Peer() as good,
        ):
            attempt = await deliver([target(busy, "mx1.test"), target(good, "mx2.test")])
            assert attempt.results[0].status is RcptStatus.SENT
            assert attempt.relay == f"mx2.test[127.0.0.1]:{good.port}"
            assert not attempt.connection_failed
            assert busy.connection_count == 1 and busy.transaction_count == 0
            assert len(good.messages) == 1

    run(scenario())


def test_every_server_refusing_to_talk_defers_with_the_last_reason() -> None:
    async def scenario() -> None:
        async with (
            Peer(PeerScript(greeting=Reply(421, "4.3.2 Service shutting down"))) as one,
            Peer(PeerScript(greeting=Reply(554, "5.7.1 go away"))) as two,
        ):
            attempt = await deliver(
                [target(one, "mx1.test"), target(two, "mx2.test")],
                ["x@example.com", "y@example.com"],
            )
            for result in attempt.results:
                assert result.status is RcptStatus.DEFER
                # A 5xx greeting is retried later, so its DSN becomes 4.x.x (as in Postfix).
                assert result.dsn == "4.7.1"
                assert (
                    result.reason
                    == "host mx2.test[127.0.0.1] refused to talk to me: 554 5.7.1 go away"
                )
            assert attempt.connection_failed
            assert attempt.relay == f"mx2.test[127.0.0.1]:{two.port}"

    run(scenario())


def test_connection_refused_on_every_target() -> None:
    async def scenario() -> None:
        first, second = closed_port(), closed_port()
        targets = [Target("mx1.test", "127.0.0.1", first, 10),
                   Target("mx2.test", "127.0.0.1", second, 20)]
        attempt = await deliver(targets, ["x@example.com", "y@example.com"])
        for result in attempt.results:
            assert result.status is RcptStatus.DEFER
            assert result.dsn == "4.4.1"
            assert result.reason == f"connect to mx2.test[127.0.0.1]:{second}: Connection refused"
        assert attempt.connection_failed
        assert attempt.relay == "none"
        assert not attempt.reused

    run(scenario())


def test_no_targets_is_not_a_connection_failure() -> None:
    attempt = run(deliver([]))
    assert attempt.results[0].status is RcptStatus.DEFER
    assert not attempt.connection_failed


@pytest.mark.parametrize(
    ("greeting", "reason"),
    [
        (
            Fault.HANG,
            "conversation with mx.test[127.0.0.1] timed out while " + GREETING_STAGE,
        ),
        (
            Fault.DROP,
            "lost connection with mx.test[127.0.0.1] while " + GREETING_STAGE,
        ),
    ],
)
def test_greeting_failures(greeting: Fault, reason: str) -> None:
    async def scenario() -> None:
        async with Peer(PeerScript(greeting=greeting)) as peer:
            attempt = await deliver(peer, settings=replace(SETTINGS, helo_timeout=0.3))
            assert (attempt.results[0].status, attempt.results[0].dsn) == (
                RcptStatus.DEFER,
                "4.4.2",
            )
            assert attempt.results[0].reason == reason
            assert attempt.connection_failed

    run(scenario())


def test_ehlo_rejected_falls_back_to_helo_without_extensions() -> None:
    script = PeerScript(
        ehlo=Reply(502, "5.5.2 Error: command not recognized"), mail_reply_delay=0.1
    )

    async def scenario() -> None:
        async with Peer(script) as peer:
            attempt = await deliver(peer, ["x@example.com", "y@example.com"])
            assert all(r.status is RcptStatus.SENT for r in attempt.results)
            (session,) = peer.sessions
            assert session.verbs()[:3] == ["EHLO", "HELO", "MAIL"]
            assert session.helo == "relay.test"
            mail = next(c for c in session.commands if c.line.startswith("MAIL"))
            assert mail.line == f"MAIL FROM:<{SENDER}>"  # no SIZE: HELO offers nothing
            assert mail.queued_behind == 0  # and no pipelining either

    run(scenario())


def test_ehlo_421_is_a_refusal() -> None:
    async def scenario() -> None:
        async with Peer(PeerScript(ehlo=Reply(421, "4.7.0 too busy"))) as peer:
            attempt = await deliver(peer)
            assert (
                attempt.results[0].reason
                == "host mx.test[127.0.0.1] refused to talk to me: 421 4.7.0 too busy"
            )
            assert attempt.connection_failed

    run(scenario())


# --- DATA and the end of data ---------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_552_at_data_bounces_the_accepted_recipients(pipelining: bool) -> None:
    script = PeerScript(
        pipelining=pipelining,
        data=Reply(552, "5.3.4 Message too big"),
        rcpt_by_address={"grey@example.com": Reply(450, "4.2.0 Greylisted")},
    )

    async def scenario() -> None:
        async with Peer(script) as peer:
            attempt = await deliver(peer, ["x@example.com", "grey@example.com"])
            x, grey = attempt.results
            assert (x.status, x.dsn) == (RcptStatus.BOUNCE, "5.3.4")
            assert x.reason == (
                "host mx.test[127.0.0.1] said: 552 5.3.4 Message too big (in reply to DATA command)"
            )
            assert (grey.status, grey.dsn) == (RcptStatus.DEFER, "4.2.0")
            (session,) = peer.sessions
            assert session.verbs()[-2:] == ["RSET", "QUIT"]

    run(scenario())


@pytest.mark.parametrize(
    ("reply", "status", "dsn"),
    [
        (Reply(451, "4.3.0 Error: queue file write error"), RcptStatus.DEFER, "4.3.0"),
        (Reply(554, "5.7.1 Message rejected as spam"), RcptStatus.BOUNCE, "5.7.1"),
    ],
)
def test_final_reply_decides_the_accepted_recipients(
    reply: Reply, status: RcptStatus, dsn: str
) -> None:
    script = PeerScript(
        final=reply, rcpt_by_address={"gone@example.com": Reply(550, "5.1.1 User unknown")}
    )

    async def scenario() -> None:
        async with Peer(script) as peer:
            attempt = await deliver(peer, ["x@example.com", "gone@example.com", "y@example.com"])
            x, gone, y = attempt.results
            for result in (x, y):
                assert (result.status, result.dsn) == (status, dsn)
                assert result.reason == (
                    f"host mx.test[127.0.0.1] said: {reply.code} {reply.text} "
                    "(in reply to end of DATA command)"
                )
            assert gone.status is RcptStatus.BOUNCE
            assert gone.reason.endswith("(in reply to RCPT TO command)")

    run(scenario())


def test_no_recipient_accepted_resets_and_keeps_the_connection() -> None:
    script = PeerScript(rcpt=Reply(550, "5.1.1 User unknown"))

    async def scenario() -> None:
        async with Peer(script) as peer:
            client = SMTPDelivery()
            attempt = await deliver(peer, ["x@example.com", "y@example.com"], delivery=client)
            assert [r.status for r in attempt.results] == [RcptStatus.BOUNCE] * 2
            (session,) = peer.sessions
            assert session.verbs()[-1] == "RSET"
            assert "DATA" in session.verbs()  # pipelined with the RCPTs, answered 554
            again = await deliver(peer, ["z@example.com"], delivery=client)
            assert again.reused
            assert peer.connection_count == 1
            await client.close()

    run(scenario())


def test_drop_in_the_middle_of_the_body() -> None:
    script = PeerScript(drop_in_body_after=64 * 1024)

    async def scenario() -> None:
        async with Peer(script, receive_buffer=64 * 1024) as peer:
            message = (
                b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + (b"y" * 78 + b"\r\n") * (BIG // 80)
            )
            attempt = await deliver(peer, ["x@example.com", "y@example.com"], message=message)
            for result in attempt.results:
                assert (result.status, result.dsn) == (RcptStatus.DEFER, "4.4.2")
                assert (
                    result.reason
                    == "lost connection with mx.test[127.0.0.1] while sending message body"
                )
            assert not attempt.connection_failed
            assert peer.all_messages == []

    run(scenario())


def test_server_refusing_the_body_while_it_comes_is_heard() -> None:
    # Postfix reads a reply the server sent before hanging up in the middle of the body.
    script = PeerScript(
        drop_in_body_after=64 * 1024,
        early_reply_in_body=Reply(552, "5.3.4 Message size exceeds fixed limit"),
    )

    async def scenario() -> None:
        async with Peer(script, receive_buffer=64 * 1024) as peer:
            message = b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * (BIG // 80)
            attempt = await deliver(peer, message=message)
            (result,) = attempt.results
            assert (result.status, result.dsn) == (RcptStatus.BOUNCE, "5.3.4")
            assert result.reason == (
                "host mx.test[127.0.0.1] said: 552 5.3.4 Message size exceeds fixed limit "
                "(in reply to end of DATA command)"
            )

    run(scenario())


def test_stall_in_the_middle_of_the_body_times_out() -> None:
    script = PeerScript(hang_in_body_after=64 * 1024)

    async def scenario() -> None:
        async with Peer(script, receive_buffer=64 * 1024) as peer:
            message = b"Subject: big\r\n\r\n" + (b"s" * 78 + b"\r\n") * (BIG // 80)
            attempt = await deliver(
                peer, message=message, settings=replace(SETTINGS, data_xfer_timeout=0.5)
            )
            (result,) = attempt.results
            assert (result.status, result.dsn) == (RcptStatus.DEFER, "4.4.2")
            assert (
                result.reason
                == "conversation with mx.test[127.0.0.1] timed out while sending message body"
            )

    run(scenario())


@pytest.mark.parametrize(
    ("final", "reason"),
    [
        (
            Fault.HANG,
            "conversation with mx.test[127.0.0.1] timed out while " + DOT_STAGE,
        ),
        (
            Fault.DROP,
            "lost connection with mx.test[127.0.0.1] while " + DOT_STAGE,
        ),
    ],
)
def test_silence_after_the_final_dot_defers_in_the_duplicate_window(
    final: Fault, reason: str
) -> None:
    async def scenario() -> None:
        async with Peer(PeerScript(final=final)) as peer:
            client = SMTPDelivery()
            settings = replace(SETTINGS, data_done_timeout=0.5)
            attempt = await deliver(peer, delivery=client, settings=settings)
            (result,) = attempt.results
            assert (result.status, result.dsn) == (RcptStatus.DEFER, "4.4.2")
            assert result.reason == reason
            assert not attempt.connection_failed
            # The peer has the whole message: a retry will deliver it a second time (RFC 1047).
            (message,) = peer.all_messages
            assert message.data == MESSAGE
            # The broken connection must not be cached.
            await deliver(peer, delivery=client, settings=settings)
            assert peer.connection_count == 2
            await client.close()

    run(scenario())


def test_timeout_at_rcpt_keeps_the_fates_already_decided() -> None:
    script = PeerScript(
        pipelining=False, rcpt_by_position={0: Reply(550, "5.1.1 User unknown"), 1: Fault.HANG}
    )

    async def scenario() -> None:
        async with Peer(script) as peer:
            attempt = await deliver(
                peer,
                ["gone@example.com", "slow@example.com"],
                settings=replace(SETTINGS, rcpt_timeout=0.3),
            )
            gone, slow = attempt.results
            assert gone.status is RcptStatus.BOUNCE
            assert (slow.status, slow.dsn) == (RcptStatus.DEFER, "4.4.2")
            assert (
                slow.reason
                == "conversation with mx.test[127.0.0.1] timed out while sending RCPT TO"
            )
            assert not attempt.connection_failed

    run(scenario())


# --- content --------------------------------------------------------------------------------


def test_dot_stuffing_and_exact_bytes() -> None:
    message = (
        b".starts the message with a dot\r\n"
        b"Subject: dots\r\n"
        b"\r\n"
        b".leading dot\r\n"
        b"..\r\n"
        b".\r\n"
        b"a line with . inside and a lone CR \r in it\r\n"
        b"\xc3\xa9t\xc3\xa9 is 8-bit\r\n"
        b"\r\n"
        b"last line without CRLF"
    )

    async def scenario() -> None:
        async with Peer() as peer:
            attempt = await deliver(peer, message=message)
            assert attempt.results[0].status is RcptStatus.SENT
            (received,) = peer.messages
            assert received.data == message + b"\r\n"
            assert received.raw_data == (
                b"..starts the message with a dot\r\n"
                b"Subject: dots\r\n"
                b"\r\n"
                b"..leading dot\r\n"
                b"...\r\n"
                b"..\r\n"
                b"a line with . inside and a lone CR \r in it\r\n"
                b"\xc3\xa9t\xc3\xa9 is 8-bit\r\n"
                b"\r\n"
                b"last line without CRLF\r\n"
                b".\r\n"
            )
            assert received.mail_params == (f"SIZE={len(message)}", "BODY=8BITMIME")

    run(scenario())


@pytest.mark.parametrize("size", [4000, 3 * BODY_CHUNK])
def test_long_lines_go_out_broken_with_crlf_space(size: int) -> None:
    """smtp_line_length_limit (998): header and body lines broken as Postfix does, in a
    message that goes in one write and in one that goes piece by piece."""
    subject = b"Subject: " + b"h" * 1205
    body_line = b".x" + b"0123456789" * 150  # 1502 octets, and dot-stuffed
    message = subject + b"\r\n\r\n" + body_line + b"\r\n"
    message += (b"y" * 998 + b"\r\n") * (size // 1000)

    async def scenario() -> None:
        async with Peer() as peer:
            attempt = await deliver(peer, message=message)
            assert attempt.results[0].status is RcptStatus.SENT
            assert attempt.lines_broken
            (received,) = peer.messages
            lines = received.raw_data.split(b"\r\n")
            assert lines[0] == subject[:998]
            assert lines[1] == b" " + subject[998:]
            assert lines[3] == b"." + body_line[:998]  # the stuffed dot is not counted
            assert lines[4] == b" " + body_line[998:]
            assert all(len(line) <= 998 for i, line in enumerate(lines) if i != 3)
            # What the peer keeps is Postfix's: the continuations are part of the message.
            assert received.data.replace(b"\r\n ", b"") == message
            assert received.mail_params[0] == f"SIZE={len(message)}"

    run(scenario())


def test_line_length_limit_zero_sends_lines_as_they_are() -> None:
    message = b"Subject: x\r\n\r\n" + b"z" * 5000 + b"\r\n"

    async def scenario() -> None:
        async with Peer() as peer:
            attempt = await deliver(peer, message=message,
                                    settings=replace(SETTINGS, line_length_limit=0))
            assert not attempt.lines_broken
            assert peer.messages[0].data == message

    run(scenario())


def test_dsn_parameters_only_to_a_server_that_offers_dsn() -> None:
    options = MailOptions(envid="id+1 x", ret="HDRS")
    per_rcpt = [RcptOptions("SUCCESS,FAILURE", "rfc822;b=b@example.com"),
                RcptOptions("", "rfc822;c@example.com"), RcptOptions("NEVER", "")]
    recipients = ["b@example.com", "c@example.com", "d@example.com"]

    async def scenario() -> None:
        for offered in (True, False):
            async with Peer(PeerScript(dsn=offered)) as peer:
                client = SMTPDelivery()
                try:
                    attempt = await client.deliver([target(peer)], "example.com", SENDER,
                                                   recipients, MESSAGE, SETTINGS,
                                                   options=options, rcpt_options=per_rcpt)
                finally:
                    await client.close()
                assert [r.status for r in attempt.results] == [RcptStatus.SENT] * 3
                assert [r.dsn_passed_on for r in attempt.results] == [offered] * 3
                lines = [c.line for c in peer.sessions[0].commands]
                mail = next(line for line in lines if line.startswith("MAIL"))
                rcpts = [line for line in lines if line.startswith("RCPT")]
                if offered:
                    assert mail.endswith(" ENVID=id+2B1+20x RET=HDRS")
                    assert rcpts == [
                        ("RCPT TO:<b@example.com> ORCPT=rfc822;b+3Db@example.com"
                         " NOTIFY=SUCCESS,FAILURE"),
                        "RCPT TO:<c@example.com> ORCPT=rfc822;c@example.com",
                        "RCPT TO:<d@example.com> NOTIFY=NEVER",
                    ]
                else:
                    assert "ENVID" not in mail and "RET" not in mail
                    assert rcpts == [f"RCPT TO:<{r}>" for r in recipients]

    run(scenario())


def test_smtputf8_requested_goes_on_where_offered() -> None:
    """As Postfix: the client's SMTPUTF8 request goes on to a server that offers it, even
    with ASCII addresses; a server without it gets the message all the same."""
    async def scenario() -> None:
        for offered in (True, False):
            async with Peer(PeerScript(smtputf8=offered)) as peer:
                client = SMTPDelivery()
                try:
                    attempt = await client.deliver([target(peer)], "example.com", SENDER,
                                                   ["b@example.com"], MESSAGE, SETTINGS,
                                                   options=MailOptions(smtputf8=True))
                finally:
                    await client.close()
                assert attempt.results[0].status is RcptStatus.SENT
                assert ("SMTPUTF8" in peer.messages[0].mail_params) is offered

    run(scenario())


def test_no_body_parameter_without_8bitmime_or_8bit_content() -> None:
    async def scenario() -> None:
        async with Peer(PeerScript(eightbitmime=False)) as peer:
            await deliver(peer, message=b"Subject: x\r\n\r\n\xff\r\n")
            assert peer.messages[0].mail_params == ("SIZE=17",)
        async with Peer() as peer:
            await deliver(peer)
            assert peer.messages[0].mail_params == (f"SIZE={len(MESSAGE)}",)

    run(scenario())


def test_message_larger_than_the_server_limit_bounces_without_trying() -> None:
    async def scenario() -> None:
        async with Peer(PeerScript(size=100)) as peer:
            message = b"Subject: x\r\n\r\n" + b"a" * 200 + b"\r\n"
            attempt = await deliver(peer, message=message)
            (result,) = attempt.results
            assert (result.status, result.dsn) == (RcptStatus.BOUNCE, "5.3.4")
            assert result.reason == (
                f"message size {len(message)} exceeds size limit 100 of server mx.test[127.0.0.1]"
            )
            assert peer.transaction_count == 0

    run(scenario())


def test_smtputf8_envelope() -> None:
    async def scenario() -> None:
        async with Peer(PeerScript(smtputf8=True)) as peer:
            attempt = await deliver(peer, ["josé@example.com"])
            assert attempt.results[0].status is RcptStatus.SENT
            (message,) = peer.messages
            assert message.recipients == ("josé@example.com",)
            assert "SMTPUTF8" in message.mail_params
        async with Peer() as peer:
            attempt = await deliver(peer, ["josé@example.com"])
            (result,) = attempt.results
            assert (result.status, result.dsn) == (RcptStatus.BOUNCE, "5.6.7")
            assert (
                result.reason
                == "SMTPUTF8 is required, but was not offered by host mx.test[127.0.0.1]"
            )

    run(scenario())


# --- pipelining -----------------------------------------------------------------------------


def test_pipelining_sends_mail_rcpt_and_data_before_reading_replies() -> None:
    # The peer holds its MAIL reply a moment: whatever the client sent without waiting
    # for it is then already queued behind MAIL.
    async def scenario() -> None:
        async with Peer(PeerScript(mail_reply_delay=0.2)) as peer:
            attempt = await deliver(peer, ["a@example.com", "b@example.com", "c@example.com"])
            assert all(r.status is RcptStatus.SENT for r in attempt.results)
            (session,) = peer.sessions
            mail = next(c for c in session.commands if c.line.startswith("MAIL"))
            assert mail.queued_behind == 4  # three RCPT and DATA

    run(scenario())


def test_no_pipelining_when_not_offered() -> None:
    async def scenario() -> None:
        async with Peer(PeerScript(pipelining=False, mail_reply_delay=0.2)) as peer:
            await deliver(peer, ["a@example.com", "b@example.com"])
            (session,) = peer.sessions
            assert all(command.queued_behind == 0 for command in session.commands)
            assert session.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", ".", "QUIT"]

    run(scenario())


# --- STARTTLS -------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["may", "encrypt"])
def test_starttls_when_offered(tls: PeerTLS, level: str) -> None:
    async def scenario() -> None:
        async with Peer(PeerScript(starttls=True), tls_context=tls.server_context) as peer:
            attempt = await deliver(peer, settings=replace(SETTINGS, tls_level=level))
            assert attempt.results[0].status is RcptStatus.SENT
            (message,) = peer.messages
            assert message.tls
            (session,) = peer.sessions
            assert session.verbs()[:3] == ["EHLO", "STARTTLS", "EHLO"]

    run(scenario())


def test_no_starttls_at_level_none(tls: PeerTLS) -> None:
    async def scenario() -> None:
        async with Peer(PeerScript(starttls=True), tls_context=tls.server_context) as peer:
            await deliver(peer)
            assert not peer.messages[0].tls
            assert "STARTTLS" not in peer.sessions[0].verbs()

    run(scenario())


def test_may_without_starttls_offered_goes_plaintext() -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            attempt = await deliver(peer, settings=replace(SETTINGS, tls_level="may"))
            assert attempt.results[0].status is RcptStatus.SENT
            assert not peer.messages[0].tls

    run(scenario())


def test_encrypt_without_starttls_offered_defers() -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            attempt = await deliver(peer, settings=replace(SETTINGS, tls_level="encrypt"))
            (result,) = attempt.results
            assert (result.status, result.dsn) == (RcptStatus.DEFER, "4.7.4")
            assert (
                result.reason == "TLS is required, but was not offered by host mx.test[127.0.0.1]"
            )
            assert attempt.connection_failed
            assert peer.transaction_count == 0

    run(scenario())


def test_encrypt_with_starttls_refused_defers(tls: PeerTLS) -> None:
    script = PeerScript(
        starttls=True, starttls_reply=Reply(454, "4.7.0 TLS not available due to local problem")
    )

    async def scenario() -> None:
        async with Peer(script, tls_context=tls.server_context) as peer:
            attempt = await deliver(peer, settings=replace(SETTINGS, tls_level="encrypt"))
            (result,) = attempt.results
            assert (result.status, result.dsn) == (RcptStatus.DEFER, "4.7.0")
            assert result.reason == (
                "TLS is required, but host mx.test[127.0.0.1] refused to start TLS: "
                "454 4.7.0 TLS not available due to local problem"
            )

    run(scenario())


def test_encrypt_with_handshake_failure_tries_the_next_mx_then_defers(tls: PeerTLS) -> None:
    broken = PeerScript(starttls=True, tls_handshake_fault=True)

    async def scenario() -> None:
        async with (
            Peer(broken, tls_context=tls.server_context) as bad,
            Peer(PeerScript(starttls=True), tls_context=tls.server_context) as good,
        ):
            settings = replace(SETTINGS, tls_level="encrypt")
            attempt = await deliver(
                [target(bad, "mx1.test"), target(good, "mx2.test")], settings=settings
            )
            assert attempt.results[0].status is RcptStatus.SENT
            assert good.messages[0].tls
            assert bad.connection_count == 1  # no plaintext retry at level encrypt

            attempt = await deliver([target(bad, "mx1.test")], settings=settings)
            (result,) = attempt.results
            assert (result.status, result.dsn) == (RcptStatus.DEFER, "4.7.5")
            assert result.reason == "Cannot start TLS: handshake failure"
            assert attempt.connection_failed
            assert bad.transaction_count == 0

    run(scenario())


def test_may_with_handshake_failure_retries_the_same_host_in_plaintext(tls: PeerTLS) -> None:
    async def scenario() -> None:
        async with Peer(
            PeerScript(starttls=True, tls_handshake_fault=True), tls_context=tls.server_context
        ) as peer:
            attempt = await deliver(peer, settings=replace(SETTINGS, tls_level="may"))
            assert attempt.results[0].status is RcptStatus.SENT
            assert peer.connection_count == 2
            first, second = peer.sessions
            assert "STARTTLS" in first.verbs() and "STARTTLS" not in second.verbs()
            assert not peer.messages[0].tls

    run(scenario())


def test_may_does_not_fall_back_to_plaintext_when_it_would_authenticate(tls: PeerTLS) -> None:
    # Postfix: the server may offer AUTH only under TLS; plaintext would end in "relay denied".
    script = PeerScript(starttls=True, tls_handshake_fault=True, auth_mechanisms=("PLAIN",))

    async def scenario() -> None:
        async with Peer(script, tls_context=tls.server_context) as peer:
            settings = replace(
                SETTINGS,
                tls_level="may",
                sasl_enable=True,
                sasl_credentials=lambda lbl, t: ("u", "p"),
            )
            attempt = await deliver(peer, settings=settings)
            (result,) = attempt.results
            assert (result.status, result.dsn) == (RcptStatus.DEFER, "4.7.5")
            assert result.reason == "Cannot start TLS: handshake failure"
            assert peer.connection_count == 1

    run(scenario())


# --- AUTH -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanisms", [("PLAIN", "LOGIN"), ("LOGIN",)])
def test_auth_with_credentials(mechanisms: tuple[str, ...]) -> None:
    script = PeerScript(auth_mechanisms=mechanisms, credentials=("relayuser", "s3cret"))
    asked: list[tuple[str, str, int]] = []

    def credentials(label: str, where: TargetLike) -> tuple[str, str] | None:
        asked.append((label, where.address, where.port))
        return ("relayuser", "s3cret")

    async def scenario() -> None:
        async with Peer(script) as peer:
            settings = replace(SETTINGS, sasl_enable=True, sasl_credentials=credentials)
            attempt = await deliver(peer, settings=settings, label="[smarthost.test]:587")
            assert attempt.results[0].status is RcptStatus.SENT
            (message,) = peer.messages
            assert message.auth_user == "relayuser"
            # smtp_send_dummy_mail_auth = no (the default): no AUTH=<> on MAIL FROM.
            assert "AUTH=<>" not in message.mail_params
            assert asked == [("[smarthost.test]:587", "127.0.0.1", peer.port)]
            verb = peer.sessions[0].commands[1].line
            assert verb.startswith(f"AUTH {mechanisms[0]}")

    run(scenario())


@pytest.mark.parametrize("dummy", [False, True])
def test_dummy_mail_auth_only_when_configured(dummy: bool) -> None:
    """Postfix sends MAIL FROM:<...> AUTH=<> only with smtp_send_dummy_mail_auth = yes."""
    script = PeerScript(auth_mechanisms=("PLAIN",), credentials=("relayuser", "s3cret"))

    async def scenario() -> None:
        async with Peer(script) as peer:
            settings = replace(SETTINGS, sasl_enable=True, send_dummy_mail_auth=dummy,
                               sasl_credentials=lambda label, t: ("relayuser", "s3cret"))
            attempt = await deliver(peer, settings=settings)
            assert attempt.results[0].status is RcptStatus.SENT
            mail = next(c.line for c in peer.sessions[0].commands if c.line.startswith("MAIL"))
            assert mail.endswith(" AUTH=<>") is dummy

    run(scenario())


def test_auth_failure_defers_and_is_not_a_connection_failure() -> None:
    script = PeerScript(auth_mechanisms=("PLAIN",), credentials=("relayuser", "s3cret"))

    async def scenario() -> None:
        async with Peer(script) as peer:
            settings = replace(
                SETTINGS, sasl_enable=True, sasl_credentials=lambda label, t: ("relayuser", "wrong")
            )
            attempt = await deliver(peer, settings=settings)
            (result,) = attempt.results
            assert (result.status, result.dsn) == (RcptStatus.DEFER, "4.7.8")
            assert result.reason == (
                "SASL authentication failed; server mx.test[127.0.0.1] said: "
                "535 5.7.8 Error: authentication failed: authentication failure"
            )
            assert not attempt.connection_failed
            assert peer.transaction_count == 0

    run(scenario())


def test_no_auth_without_credentials_for_the_hop() -> None:
    script = PeerScript(auth_mechanisms=("PLAIN",), credentials=("relayuser", "s3cret"))

    async def scenario() -> None:
        async with Peer(script) as peer:
            settings = replace(SETTINGS, sasl_enable=True, sasl_credentials=lambda label, t: None)
            attempt = await deliver(peer, settings=settings)
            assert attempt.results[0].status is RcptStatus.SENT
            assert "AUTH" not in peer.sessions[0].verbs()
            assert peer.messages[0].auth_user is None

    run(scenario())


def test_auth_offered_only_after_starttls(tls: PeerTLS) -> None:
    script = PeerScript(
        starttls=True, auth_mechanisms=("PLAIN",), auth_requires_tls=True, credentials=("u", "p")
    )

    async def scenario() -> None:
        async with Peer(script, tls_context=tls.server_context) as peer:
            settings = replace(
                SETTINGS,
                tls_level="may",
                sasl_enable=True,
                sasl_credentials=lambda label, t: ("u", "p"),
            )
            attempt = await deliver(peer, settings=settings)
            assert attempt.results[0].status is RcptStatus.SENT
            (message,) = peer.messages
            assert message.tls and message.auth_user == "u"

    run(scenario())


# --- connection cache -----------------------------------------------------------------------


def test_connection_reuse_and_close() -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            client = SMTPDelivery()
            first = await deliver(peer, ["a@example.com"], delivery=client)
            second = await deliver(peer, ["b@example.com"], delivery=client)
            assert not first.reused and second.reused
            assert second.results[0].status is RcptStatus.SENT
            assert peer.connection_count == 1 and peer.transaction_count == 2
            (session,) = peer.sessions
            assert session.verbs() == [
                "EHLO",
                "MAIL",
                "RCPT",
                "DATA",
                ".",
                "RSET",
                "MAIL",
                "RCPT",
                "DATA",
                ".",
            ]
            await client.close()
            await peer.wait_until(lambda: peer.sessions[0].closed)
            assert peer.sessions[0].quit

    run(scenario())


def test_idle_connection_is_closed_after_the_cache_time_limit() -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            client = SMTPDelivery()
            settings = replace(SETTINGS, connection_cache_time_limit=0.2)
            await deliver(peer, delivery=client, settings=settings)
            await peer.wait_until(lambda: peer.sessions[0].closed, timeout=3)
            assert peer.sessions[0].quit
            again = await deliver(peer, delivery=client, settings=settings)
            assert not again.reused
            assert peer.connection_count == 2
            await client.close()

    run(scenario())


def test_no_reuse_past_the_reuse_time_limit() -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            client = SMTPDelivery()
            settings = replace(SETTINGS, connection_reuse_time_limit=0.0)
            await deliver(peer, delivery=client, settings=settings)
            again = await deliver(peer, delivery=client, settings=settings)
            assert not again.reused
            assert peer.connection_count == 2
            assert peer.sessions[0].quit
            await client.close()

    run(scenario())


@pytest.mark.parametrize(
    "script",
    [PeerScript(close_after_final=True), PeerScript(rset=Fault.DROP)],
    ids=["closed-while-idle", "dies-at-rset-probe"],
)
def test_dead_cached_connection_is_replaced_transparently(script: PeerScript) -> None:
    async def scenario() -> None:
        async with Peer(script) as peer:
            client = SMTPDelivery()
            await deliver(peer, delivery=client)
            await asyncio.sleep(0.05)
            again = await deliver(peer, delivery=client)
            assert again.results[0].status is RcptStatus.SENT
            assert not again.reused
            assert peer.connection_count == 2
            assert len(peer.messages) == 2
            await client.close()

    run(scenario())


def test_cached_connections_serve_one_delivery_at_a_time() -> None:
    async def scenario() -> None:
        async with Peer(PeerScript(mail_reply_delay=0.05)) as peer:
            client = SMTPDelivery()
            rounds = []
            for _ in range(3):
                rounds.append(
                    await asyncio.gather(
                        *(deliver(peer, [f"r{i}@example.com"], delivery=client) for i in range(4))
                    )
                )
            assert all(
                a.results[0].status is RcptStatus.SENT for attempts in rounds for a in attempts
            )
            assert peer.connection_count == 4
            assert sum(a.reused for a in rounds[1] + rounds[2]) == 8
            assert len(peer.messages) == 12
            for session in peer.sessions:
                # One transaction at a time per connection: MAIL RCPT DATA ., then RSET.
                verbs = session.verbs()[1:]
                for start in range(0, len(verbs), 5):
                    assert verbs[start : start + 4] == ["MAIL", "RCPT", "DATA", "."], verbs
                    assert verbs[start + 4 : start + 5] in ([], ["RSET"]), verbs
            await client.close()

    run(scenario())


def test_label_is_part_of_the_cache_key() -> None:
    async def scenario() -> None:
        async with Peer() as peer:
            client = SMTPDelivery()
            await deliver(peer, delivery=client, label="example.com")
            other = await deliver(peer, delivery=client, label="example.net")
            assert not other.reused
            assert peer.connection_count == 2
            await client.close()

    run(scenario())


# --- the threaded sink ----------------------------------------------------------------------


def test_threaded_peer_records_from_its_own_thread() -> None:
    with ThreadedPeer(PeerScript(rcpt_by_position={1: Reply(550, "5.1.1 User unknown")})) as sink:
        attempt = run(
            deliver([Target("sink.test", sink.host, sink.port, 0)], ["a@x.test", "b@x.test"])
        )
        assert [r.status for r in attempt.results] == [RcptStatus.SENT, RcptStatus.BOUNCE]
        (message,) = sink.wait_for(1, timeout=5)
        assert message.recipients == ("a@x.test",)
        assert message.data == MESSAGE
        assert sink.connection_count == 1 and sink.transaction_count == 1
        with pytest.raises(TimeoutError):
            sink.wait_for(2, timeout=0.1)
