"""RFC 3461 delivery status notifications end to end through the queue manager, over real
sockets: scripted next hops that offer DSN or do not, and a "home" peer that receives the
notices sent to the sender.

What Postfix 3.7 does and these tests demand: the sender's RET/ENVID and each recipient's
NOTIFY/ORCPT go on to a next hop that offers DSN (and ORCPT=rfc822;ADDRESS is made up when
none was given); NOTIFY=NEVER suppresses the bounce and the delay warning; a delay warning
goes only to recipients whose NOTIFY has DELAY or is unset; NOTIFY=SUCCESS gets a
"delivered" notice for discard: and a "relayed" one when the next hop did not offer DSN,
none when it did; RET=HDRS returns only the headers; ENVID and ORCPT appear in every
notice; a notice about an SMTPUTF8 message uses RFC 6533's message/global types; a success
notice is crash-safe like a bounce (repeated, never lost).
"""

from __future__ import annotations

import email
import email.message
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.outcome import Policy
from spool import Envelope, RcptState, Recipient, Spool
from tests.integration.test_scheduler import (
    CONTENT,
    SENDER,
    TRY_LATER,
    Relay,
    log_lines,
    run,
    running,
    unfold,
    via,
)
from tests.support.peers import Peer, PeerScript, ReceivedMessage, Reply

NOTICE_OF_THE_HOP = "250 2.0.0 Ok: queued as"


def submit(relay: Relay, recipients: Sequence[Recipient], *, envid: str = "", ret: str = "",
           smtputf8: bool = False, content: bytes = CONTENT, sender: str = SENDER) -> str:
    """Queue a message with DSN requests, as the listener stores them."""
    env = relay.spool.enqueue(
        Envelope(queue_id="", sender=sender, recipients=tuple(recipients),
                 arrival_time=relay.clock.time(), dsn_envid=envid, dsn_ret=ret,
                 smtputf8=smtputf8),
        content,
    )
    relay.sched.wakeup(env)
    return env.queue_id


@dataclass(frozen=True)
class Notice:
    """A notice as received: its headers, text, DSN fields and the returned part."""

    message: email.message.Message
    text: str
    report_type: str
    per_message: Mapping[str, str]
    per_recipient: Sequence[Mapping[str, str]]
    returned_type: str
    returned_description: str
    returned: bytes

    def recipient(self, address: str) -> Mapping[str, str]:
        return next(g for g in self.per_recipient
                    if g["Final-Recipient"].split(";", 1)[1].strip() == address)


def notice(received: ReceivedMessage) -> Notice:
    """A multipart/report notice taken apart by hand (the email package would try to
    parse message/global as a message)."""
    assert received.sender == "", "a notice goes out with the null sender"
    message = email.message_from_bytes(received.data)
    assert message.get_content_type() == "multipart/report"
    boundary = message.get_boundary()
    assert boundary
    body = received.data.split(b"\r\n\r\n", 1)[1]
    chunks = body.split(b"--" + boundary.encode())
    assert chunks[-1].strip() == b"--"
    parts = chunks[1:-1]
    assert len(parts) == 3

    def split(part: bytes) -> tuple[dict[str, str], bytes]:
        head, _, content = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        return fields, content

    text_head, text = split(parts[0])
    status_head, status = split(parts[1])
    returned_head, returned = split(parts[2])
    groups = [{k: v for k, v in (line.split(": ", 1) for line in
                                 unfold(g).split("\r\n") if line)}
              for g in status.decode().strip("\r\n").split("\r\n\r\n")]
    assert text_head["Content-Type"].startswith("text/plain")
    # The human-readable lines unwrapped (Postfix's line_wrap(): 79 columns, indent 4).
    return Notice(message, re.sub(r"\r\n {4}", " ", text.decode()), status_head["Content-Type"], groups[0], groups[1:],
                  returned_head["Content-Type"], returned_head["Content-Description"],
                  returned.removesuffix(b"\r\n"))


def rcpt_lines(peer: Peer) -> list[str]:
    return [c.line for s in peer.sessions for c in s.commands
            if c.line.upper().startswith("RCPT")]


def mail_lines(peer: Peer) -> list[str]:
    return [c.line for s in peer.sessions for c in s.commands
            if c.line.upper().startswith("MAIL")]


def hops(routes: Mapping[str, Peer | str]) -> dict[str, str]:
    return {domain: via(hop) if isinstance(hop, Peer) else hop for domain, hop in routes.items()}


def dest(*recipients: Recipient | str) -> list[Recipient]:
    return [r if isinstance(r, Recipient) else Recipient(r) for r in recipients]


# ---- passing the requests on ---------------------------------------------------------------


def test_requests_go_on_to_a_next_hop_that_offers_dsn_and_no_notice_follows(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        async with (
            Peer(PeerScript(dsn=True)) as peer,
            Peer() as home,
            running(tmp_path / "q", hops({"dest.test": peer, "sender.test": home})) as relay,
        ):
            queue_id = submit(relay, [
                Recipient("x@dest.test", dsn_notify="SUCCESS,FAILURE",
                          dsn_orcpt="rfc822;orig+x@dest.test"),
                Recipient("w@dest.test"),
                Recipient("n@dest.test", dsn_notify="NEVER"),
                Recipient("d@dest.test", dsn_notify="DELAY,FAILURE"),
            ], envid="my+env=id", ret="HDRS")
            await relay.gone(queue_id)
            (mail,) = mail_lines(peer)
            assert re.fullmatch(r"MAIL FROM:<alice@sender\.test> SIZE=\d+ "
                                r"ENVID=my\+2Benv\+3Did RET=HDRS", mail), mail
            # Postfix's order and encoding; ORCPT made up where none was given; NOTIFY only
            # where the client gave one (RFC 3461 section 5.2.1), in Postfix's word order.
            assert rcpt_lines(peer) == [
                "RCPT TO:<x@dest.test> ORCPT=rfc822;orig+2Bx@dest.test NOTIFY=SUCCESS,FAILURE",
                "RCPT TO:<w@dest.test> ORCPT=rfc822;w@dest.test",
                "RCPT TO:<n@dest.test> ORCPT=rfc822;n@dest.test NOTIFY=NEVER",
                "RCPT TO:<d@dest.test> ORCPT=rfc822;d@dest.test NOTIFY=FAILURE,DELAY",
            ]
            # The next hop took the SUCCESS request along: no notice of ours.
            await relay.scan_finds_nothing()
            assert relay.queued() == []
            assert not home.all_messages
            assert not log_lines(caplog, queue_id, "notification")

    run(scenario())


def test_no_dsn_parameters_to_a_next_hop_that_does_not_offer_dsn(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            Peer(PeerScript(dsn=False)) as peer,
            running(tmp_path / "q", hops({"dest.test": peer,
                                            "sender.test": "discard:"})) as relay,
        ):
            queue_id = submit(relay, [Recipient("x@dest.test", dsn_notify="FAILURE",
                                                dsn_orcpt="rfc822;x@dest.test")],
                              envid="e1", ret="FULL")
            await relay.gone(queue_id)
            (mail,) = mail_lines(peer)
            assert re.fullmatch(r"MAIL FROM:<alice@sender\.test> SIZE=\d+", mail), mail
            assert rcpt_lines(peer) == ["RCPT TO:<x@dest.test>"]

    run(scenario())


# ---- success notices ---------------------------------------------------------------------


def test_relayed_notice_when_the_next_hop_does_not_offer_dsn(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Compare tests/golden/postfix-3.7/dsn-relayed-notice.txt."""
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        async with (
            Peer(PeerScript(dsn=False)) as peer,
            Peer(PeerScript(dsn=True)) as home,
            running(tmp_path / "q", hops({"nodsn.test": peer, "sender.test": home})) as relay,
        ):
            queue_id = submit(relay, [Recipient("w@nodsn.test", dsn_notify="SUCCESS"),
                                      Recipient("v@nodsn.test")], envid="bar-envid-2")
            await relay.gone(queue_id)
            (received,) = await home.wait_for(1)
            n = notice(received)
            assert n.message["Subject"] == "Successful Mail Delivery Report"
            assert n.message["To"] == SENDER
            relay_of_peer = f"127.0.0.1[127.0.0.1]:{peer.port}"
            # Postfix's words, and only the recipient that asked.
            assert "Your message was successfully delivered to the destination(s)\r\n" \
                "listed below. If the message was delivered to mailbox you will\r\n" in n.text
            assert "For further assistance" not in n.text
            assert re.search(rf"<w@nodsn\.test>: delivery via {re.escape(relay_of_peer)}: "
                             r"250 2\.0\.0 Ok: queued as \S+", n.text)
            assert "v@nodsn.test" not in n.text
            assert n.report_type == "message/delivery-status"
            assert n.per_message["Reporting-MTA"] == "dns; relay.test"
            assert n.per_message["Original-Envelope-Id"] == "bar-envid-2"
            assert list(n.per_message)[:2] == ["Reporting-MTA", "Original-Envelope-Id"]
            (w,) = n.per_recipient
            assert w["Final-Recipient"] == "rfc822; w@nodsn.test"
            assert w["Original-Recipient"] == "rfc822;w@nodsn.test"
            assert w["Action"] == "relayed"
            assert w["Status"] == "2.0.0"
            assert w["Remote-MTA"] == "dns; 127.0.0.1"
            assert re.fullmatch(r"smtp; 250 2\.0\.0 Ok: queued as \S+", w["Diagnostic-Code"])
            assert list(w)[:6] == ["Final-Recipient", "Original-Recipient", "Action", "Status",
                                   "Remote-MTA", "Diagnostic-Code"]
            # Headers only, under Postfix's description for a success notice.
            assert (n.returned_type, n.returned_description) == \
                ("text/rfc822-headers", "Message Headers")
            assert n.returned == CONTENT.split(b"\r\n\r\n")[0] + b"\r\n"
            # The notice itself goes to a hop that offers DSN with the made-up ORCPT.
            assert rcpt_lines(home) == [f"RCPT TO:<{SENDER}> ORCPT=rfc822;{SENDER}"]
            assert log_lines(caplog, queue_id, "sender delivery status notification:")
            assert not log_lines(caplog, queue_id, "non-delivery")

    run(scenario())


def test_delivered_notice_for_discard(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            Peer() as home,
            running(tmp_path / "q", hops({"gone.test": "discard:",
                                            "sender.test": home})) as relay,
        ):
            queue_id = submit(relay, [Recipient("a@gone.test", dsn_notify="SUCCESS,FAILURE",
                                                dsn_orcpt="rfc822;A@Gone.Test")])
            await relay.gone(queue_id)
            (received,) = await home.wait_for(1)
            n = notice(received)
            a = n.recipient("a@gone.test")
            assert (a["Action"], a["Status"]) == ("delivered", "2.0.0")
            assert a["Original-Recipient"] == "rfc822;A@Gone.Test"
            assert "Remote-MTA" not in a
            # discard: reports its next hop, the domain by default, as Postfix's does.
            assert a["Diagnostic-Code"] == "X-Relay; gone.test"
            assert "<a@gone.test>: gone.test" in n.text
            assert "Original-Envelope-Id" not in n.per_message

    run(scenario())


def test_success_notice_only_for_those_that_asked_and_never_repeated(tmp_path: Path) -> None:
    """Four transactions (recipient limit 1) to a hop without DSN, one deferred: the
    notice names the SUCCESS recipients that went; the next pass does not repeat it."""
    async def scenario() -> None:
        async with (
            Peer(PeerScript(rcpt_by_address={"late@nodsn.test": TRY_LATER})) as peer,
            Peer() as home,
            running(tmp_path / "q", hops({"nodsn.test": peer, "sender.test": home}),
                    recipient_limit=1) as relay,
        ):
            queue_id = submit(relay, [Recipient("s1@nodsn.test", dsn_notify="SUCCESS"),
                                      Recipient("plain@nodsn.test"),
                                      Recipient("late@nodsn.test", dsn_notify="SUCCESS"),
                                      Recipient("s2@nodsn.test", dsn_notify="SUCCESS,DELAY")])
            await relay.deferred(queue_id)
            (received,) = await home.wait_for(1)
            n = notice(received)
            assert sorted(g["Final-Recipient"] for g in n.per_recipient) == \
                ["rfc822; s1@nodsn.test", "rfc822; s2@nodsn.test"]
            env = relay.envelope(queue_id)
            owed = {r.address: (r.state, r.dsn_action, r.notified) for r in env.recipients}
            assert owed["s1@nodsn.test"] == (RcptState.SENT, "relayed", True)
            assert owed["s2@nodsn.test"] == (RcptState.SENT, "relayed", True)
            assert owed["plain@nodsn.test"] == (RcptState.SENT, "", False)
            assert owed["late@nodsn.test"] == (RcptState.PENDING, "", False)
            await relay.attempt_when_due(queue_id)
            assert relay.where(queue_id) == "deferred"
            assert rcpt_lines(peer).count("RCPT TO:<late@nodsn.test>") == 2
            await relay.scan_finds_nothing(queue_id)
            assert len(home.all_messages) == 1

    run(scenario())


# ---- NOTIFY filters bounces and delay warnings ---------------------------------------------


def test_notify_never_suppresses_the_bounce(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    script = PeerScript(rcpt=Reply(550, "5.1.1 no such user"))

    async def scenario() -> None:
        async with (
            Peer(script) as peer,
            Peer() as home,
            running(tmp_path / "q", hops({"dest.test": peer, "sender.test": home})) as relay,
        ):
            quiet = submit(relay, [Recipient("n@dest.test", dsn_notify="NEVER"),
                                   Recipient("s@dest.test", dsn_notify="SUCCESS"),
                                   Recipient("d@dest.test", dsn_notify="DELAY")])
            await relay.gone(quiet)
            await relay.scan_finds_nothing()
            assert relay.queued() == []
            assert not home.all_messages
            assert log_lines(caplog, quiet, "to=<n@dest.test>", "status=bounced")
            assert not log_lines(caplog, quiet, "notification")

            mixed = submit(relay, [Recipient("n@dest.test", dsn_notify="NEVER"),
                                   Recipient("f@dest.test", dsn_notify="FAILURE"),
                                   Recipient("u@dest.test")])
            await relay.gone(mixed)
            (received,) = await home.wait_for(1)
            n = notice(received)
            assert n.message["Subject"] == "Undelivered Mail Returned to Sender"
            assert sorted(g["Final-Recipient"] for g in n.per_recipient) == \
                ["rfc822; f@dest.test", "rfc822; u@dest.test"]
            assert "n@dest.test" not in n.text

    run(scenario())


def test_delay_warning_only_for_delay_or_unset_notify(tmp_path: Path) -> None:
    policy = Policy(minimal_backoff_time=600.0, maximal_backoff_time=600.0,
                    delay_warning_time=1000.0)

    async def scenario() -> None:
        async with (
            Peer(PeerScript(rcpt=TRY_LATER)) as peer,
            Peer() as home,
            running(tmp_path / "q", hops({"dest.test": peer, "sender.test": home}),
                    policy=policy) as relay,
        ):
            some = submit(relay, [Recipient("never@dest.test", dsn_notify="NEVER"),
                                  Recipient("delay@dest.test", dsn_notify="DELAY"),
                                  Recipient("unset@dest.test"),
                                  Recipient("failure@dest.test", dsn_notify="FAILURE,SUCCESS")],
                          envid="env-7")
            none = submit(relay, [Recipient("never@dest.test", dsn_notify="NEVER"),
                                  Recipient("failure@dest.test", dsn_notify="FAILURE")])
            await relay.deferred(some, none)
            await relay.attempt_when_due(some)  # 600 s: not yet
            await relay.deferred(none, attempts=2)
            await relay.attempt_when_due(some)  # 1200 s: warn
            await relay.deferred(none, attempts=3)
            (received,) = await home.wait_for(1)
            n = notice(received)
            assert n.message["Subject"] == "Delayed Mail (still being retried)"
            assert sorted(g["Final-Recipient"] for g in n.per_recipient) == \
                ["rfc822; delay@dest.test", "rfc822; unset@dest.test"]
            assert all(g["Action"] == "delayed" for g in n.per_recipient)
            assert n.per_message["Original-Envelope-Id"] == "env-7"
            assert n.recipient("unset@dest.test")["Original-Recipient"] == \
                "rfc822;unset@dest.test"
            # The other message owed no warning, and is marked as warned all the same.
            assert relay.envelope(none).warned and relay.envelope(some).warned
            await relay.scan_finds_nothing(some, none)
            assert len(home.all_messages) == 1

    run(scenario())


# ---- RET and the returned message ----------------------------------------------------------


@pytest.mark.parametrize("ret", ["HDRS", "FULL", ""])
def test_ret_decides_what_the_bounce_returns(tmp_path: Path, ret: str) -> None:
    """RET=HDRS: text/rfc822-headers (tests/golden/postfix-3.7/dsn-ret-hdrs-bounce.txt);
    RET=FULL or none: the whole message."""
    script = PeerScript(rcpt=Reply(550, "5.1.1 bar-hard: no such user"))

    async def scenario() -> None:
        async with (
            Peer(script) as peer,
            Peer() as home,
            running(tmp_path / "q", hops({"hard.test": peer, "sender.test": home})) as relay,
        ):
            queue_id = submit(relay, [Recipient("z@hard.test")], ret=ret)
            await relay.gone(queue_id)
            (received,) = await home.wait_for(1)
            n = notice(received)
            z = n.recipient("z@hard.test")
            assert (z["Action"], z["Status"]) == ("failed", "5.1.1")
            assert z["Original-Recipient"] == "rfc822;z@hard.test"
            assert z["Diagnostic-Code"] == "smtp; 550 5.1.1 bar-hard: no such user"
            if ret == "HDRS":
                assert (n.returned_type, n.returned_description) == \
                    ("text/rfc822-headers", "Undelivered Message Headers")
                assert n.returned == CONTENT.split(b"\r\n\r\n")[0] + b"\r\n"
                assert b"Hello." not in received.data
            else:
                assert (n.returned_type, n.returned_description) == \
                    ("message/rfc822", "Undelivered Message")
                assert n.returned == CONTENT

    run(scenario())


# ---- internationalized messages (RFC 6533) ---------------------------------------------------


UTF8_CONTENT = ("From: Jörg <jörg@sender.test>\r\nTo: zoë@dest.test\r\n"
                "Subject: Grüße\r\n\r\nHallo.\r\n").encode()


@pytest.mark.parametrize("smtputf8", [True, False])
def test_notice_about_an_smtputf8_message_uses_the_global_types(
        tmp_path: Path, smtputf8: bool) -> None:
    script = PeerScript(rcpt=Reply(550, "5.1.1 no such user"), smtputf8=True)

    async def scenario() -> None:
        async with (
            Peer(script) as peer,
            Peer(PeerScript(smtputf8=True)) as home,
            running(tmp_path / "q", hops({"dest.test": peer, "sender.test": home})) as relay,
        ):
            # Without SMTPUTF8 asked, the 8-bit header alone makes the notice global.
            rcpt = "zoë@dest.test" if smtputf8 else "zoe@dest.test"
            queue_id = submit(relay, [Recipient(rcpt)], smtputf8=smtputf8,
                              content=UTF8_CONTENT)
            await relay.gone(queue_id)
            (received,) = await home.wait_for(1)
            n = notice(received)
            assert n.report_type == "message/global-delivery-status"
            assert (n.returned_type, n.returned_description) == \
                ("message/global", "Undelivered Message")
            assert n.returned == UTF8_CONTENT
            group = n.recipient(rcpt)
            kind = "utf-8" if smtputf8 else "rfc822"
            assert group["Final-Recipient"] == f"{kind}; {rcpt}"
            assert group["Original-Recipient"] == f"rfc822;{rcpt}"  # as Postfix's smtpd
            # The notice asks for SMTPUTF8 of a next hop that offers it.
            (mail,) = mail_lines(home)
            assert mail.endswith(" SMTPUTF8")

    run(scenario())


def test_notice_about_an_ascii_message_keeps_the_classic_types(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            Peer(PeerScript(rcpt=Reply(550, "5.1.1 no"))) as peer,
            Peer(PeerScript(smtputf8=True)) as home,
            running(tmp_path / "q", hops({"dest.test": peer, "sender.test": home})) as relay,
        ):
            queue_id = submit(relay, [Recipient("z@dest.test")], ret="HDRS")
            await relay.gone(queue_id)
            (received,) = await home.wait_for(1)
            n = notice(received)
            assert n.report_type == "message/delivery-status"
            assert n.returned_type == "text/rfc822-headers"
            assert "SMTPUTF8" not in mail_lines(home)[0]

    run(scenario())


# ---- crash safety of success notices -------------------------------------------------------


def owed(queue_dir: Path, recipients: Iterable[Recipient], queue: str = "active") -> str:
    """A message as a crash leaves it: its recipients recorded as they are given."""
    spool = Spool(str(queue_dir))
    env = spool.enqueue(Envelope(queue_id="", sender=SENDER, recipients=tuple(recipients),
                                 arrival_time=0.0), CONTENT)
    with spool.locked(env.queue_id) as entry:
        entry.write_and_move(entry.read(), queue)
    return env.queue_id


def test_a_success_notice_owed_at_a_crash_is_sent_after_the_restart(tmp_path: Path) -> None:
    """Killed after the recipient was recorded as sent (with the notice it is owed) and
    before the notice was queued: at start the queue manager sends it."""
    queue_dir = tmp_path / "q"
    queue_id = owed(queue_dir, [
        Recipient("w@nodsn.test", state=RcptState.SENT, dsn="2.0.0", remote_mta="mx.nodsn.test",
                  reason="delivery via mx.nodsn.test[192.0.2.1]:25: 250 2.0.0 Ok",
                  dsn_notify="SUCCESS", dsn_action="relayed"),
        Recipient("old@nodsn.test", state=RcptState.SENT, reason="250 2.0.0 Ok",
                  dsn_notify="SUCCESS", dsn_action="relayed", notified=True),
    ])

    async def scenario() -> None:
        async with (
            Peer() as home,
            running(queue_dir, hops({"sender.test": home})) as relay,
        ):
            await relay.gone(queue_id)
            (received,) = await home.wait_for(1)
            n = notice(received)
            (w,) = n.per_recipient
            assert (w["Final-Recipient"], w["Action"]) == ("rfc822; w@nodsn.test", "relayed")
            assert w["Remote-MTA"] == "dns; mx.nodsn.test"
            assert w["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok"
            assert "<w@nodsn.test>: delivery via mx.nodsn.test[192.0.2.1]:25: 250 2.0.0 Ok" \
                in n.text

    run(scenario())
