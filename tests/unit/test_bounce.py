"""relay.bounce: RFC 3464 notices, checked by parsing them back with the email package."""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import re
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.bounce import (
    MAX_RETURNED_BYTES,
    FailedRecipient,
    NoticeKind,
    is_null_sender,
    make_notice,
)

ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 UTC
NOW = ARRIVAL + 5 * 86400 + 40
HOST = "mx1.example.org"
QUEUE_ID = "4F2A31C0D2"
SENDER = "alice@example.org"

BOB_REPLY = (
    "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual "
    "mailbox table; please check the spelling of the address and try again"
)
DAVE_REPLY = "552 5.2.2 <dave@example.com>: Mailbox full"
CAROL_REASON = "connect to mx.example.net[203.0.113.5]:25: Connection refused"

BOB = FailedRecipient(
    "bob@example.com",
    "5.1.1",
    BOB_REPLY,
    "mx.example.com[198.51.100.7]",
    last_attempt=NOW - 60,
)
DAVE = FailedRecipient(
    "dave@example.com",
    "5.2.2",
    DAVE_REPLY,
    "mx.example.com[198.51.100.7]",
    original_address="David@alias.example.org",
)
CAROL = FailedRecipient("carol@example.net", "4.4.1", CAROL_REASON)

ORIGINAL = (
    b"Received: from client.example (client.example [192.0.2.10])\r\n"
    b"\tby mx1.example.org (relay) with ESMTP id 4F2A31C0D2\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com, carol@example.net, dave@example.com\r\n"
    b"Subject: quarterly figures\r\n"
    b"Message-ID: <abc@example.org>\r\n"
    b"\r\n"
    b"The body of the original message.\r\n"
    b"BODY-MARKER\r\n"
)


def notice(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "kind": NoticeKind.FAILURE,
        "queue_id": QUEUE_ID,
        "sender": SENDER,
        "recipients": [BOB, CAROL, DAVE],
        "original": ORIGINAL,
        "arrival_time": ARRIVAL,
        "now": NOW,
        "myhostname": HOST,
    }
    args.update(overrides)
    return make_notice(**args)  # type: ignore[arg-type]


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def parts(msg: email.message.EmailMessage) -> list[email.message.EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return cast(list[email.message.EmailMessage], payload)


def enclosed(part: email.message.EmailMessage) -> email.message.EmailMessage:
    """The message inside a message/rfc822 part."""
    payload = part.get_payload()
    assert isinstance(payload, list) and len(payload) == 1
    return cast(email.message.EmailMessage, payload[0])


def field_groups(msg: email.message.EmailMessage) -> list[email.message.Message]:
    report = parts(msg)[1]
    assert report.get_content_type() == "message/delivery-status"
    groups = report.get_payload()
    assert isinstance(groups, list)
    return cast(list[email.message.Message], groups)


def text_of(msg: email.message.EmailMessage) -> str:
    content = parts(msg)[0].get_content()
    assert isinstance(content, str)
    return content


def timestamp(value: str) -> float:
    return email.utils.parsedate_to_datetime(value).timestamp()


def assert_crlf_only(raw: bytes) -> None:
    assert re.search(rb"(?<!\r)\n", raw) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", raw) is None, "bare CR"


# --- the failure notice -------------------------------------------------------------------


def test_failure_headers() -> None:
    raw = notice()
    assert f"\r\nFrom: MAILER-DAEMON@{HOST} (Mail Delivery System)\r\n".encode() in raw
    msg = parse(raw)
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOST}"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert timestamp(msg["Date"]) == NOW
    assert msg["Message-Id"].startswith("<") and msg["Message-Id"].endswith(f"@{HOST}>")
    assert f"{QUEUE_ID}.failure" in msg["Message-Id"]
    assert not msg.defects


def test_multipart_report_structure() -> None:
    msg = parse(notice())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg.get_boundary() == f"{QUEUE_ID}.{int(NOW)}/{HOST}"
    text, report, returned = parts(msg)
    assert text.get_content_type() == "text/plain"
    assert text.get_content_charset() == "us-ascii"
    assert text["Content-Description"] == "Notification"
    assert report.get_content_type() == "message/delivery-status"
    assert report["Content-Description"] == "Delivery report"
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Description"] == "Undelivered Message"
    assert all(not part.defects for part in msg.walk())


def test_notification_text_is_postfix_text() -> None:
    text = text_of(parse(notice()))
    for line in (
        f"This is the mail system at host {HOST}.",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "For further assistance, please send mail to postmaster.",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "                   The mail system",
    ):
        assert line in text.splitlines()
    assert "THIS IS A WARNING ONLY" not in text
    # Per-recipient lines: wrapped like Postfix, continuation lines indented by 4.
    lines = text.splitlines()
    assert all(len(line) <= 79 for line in lines)
    joined = re.sub(r"\r?\n {4}", " ", text)
    assert f"<bob@example.com>: host mx.example.com[198.51.100.7] said: {BOB_REPLY}" in joined
    assert f"<carol@example.net>: {CAROL_REASON}" in joined
    assert (
        "<dave@example.com> (expanded from <David@alias.example.org>): "
        f"host mx.example.com[198.51.100.7] said: {DAVE_REPLY}"
    ) in joined


def test_postmaster_paragraph() -> None:
    text = text_of(parse(notice()))
    assert "For further assistance, please send mail to postmaster." in text


def test_per_message_fields() -> None:
    per_message = field_groups(parse(notice()))[0]
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["X-Relay-Queue-ID"] == QUEUE_ID
    assert per_message["X-Relay-Sender"] == f"rfc822; {SENDER}"
    assert timestamp(per_message["Arrival-Date"]) == ARRIVAL
    assert per_message["Final-Recipient"] is None


def test_postfix_field_names_follow_mail_name() -> None:
    groups = field_groups(parse(notice(mail_name="Postfix")))
    assert groups[0]["X-Postfix-Queue-ID"] == QUEUE_ID
    assert groups[0]["X-Postfix-Sender"] == f"rfc822; {SENDER}"
    assert groups[0]["X-Relay-Queue-ID"] is None
    assert groups[2]["Diagnostic-Code"] == f"X-Postfix; {CAROL_REASON}"


def test_per_recipient_fields_for_several_recipients() -> None:
    groups = field_groups(parse(notice()))
    assert len(groups) == 4  # per-message group + one per recipient, in the order given
    bob, carol, dave = groups[1:]

    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    assert bob["Original-Recipient"] is None
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.com[198.51.100.7]"
    # Longer than a line, so it was folded; unfolding must give the reply verbatim.
    assert bob["Diagnostic-Code"] == f"smtp; {BOB_REPLY}"
    assert timestamp(bob["Last-Attempt-Date"]) == NOW - 60
    assert bob["Will-Retry-Until"] is None

    assert carol["Final-Recipient"] == "rfc822; carol@example.net"
    assert carol["Action"] == "failed"
    assert carol["Status"] == "4.4.1"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == f"X-Relay; {CAROL_REASON}"
    assert carol["Last-Attempt-Date"] is None

    assert dave["Final-Recipient"] == "rfc822; dave@example.com"
    assert dave["Original-Recipient"] == "rfc822; David@alias.example.org"
    assert dave["Status"] == "5.2.2"
    assert dave["Diagnostic-Code"] == f"smtp; {DAVE_REPLY}"


def test_original_message_returned_in_full() -> None:
    raw = notice()
    returned = enclosed(parts(parse(raw))[2])
    assert returned["Subject"] == "quarterly figures"
    assert returned["Message-ID"] == "<abc@example.org>"
    assert "BODY-MARKER" in returned.get_content()
    # Byte for byte, between the part's blank line and the closing boundary.
    assert b"\r\n\r\n" + ORIGINAL + b"\r\n--" + f"{QUEUE_ID}.{int(NOW)}/{HOST}--".encode() in raw


def test_crlf_line_endings_everywhere() -> None:
    assert_crlf_only(notice())
    assert_crlf_only(notice(kind=NoticeKind.DELAY))
    # An original spooled with bare LF or bare CR comes back with CRLF too.
    raw = notice(original=b"Subject: lf only\nX-A: 1\r\n\nbody line\nlast\r")
    assert_crlf_only(raw)
    assert b"Subject: lf only\r\nX-A: 1\r\n\r\nbody line\r\nlast\r\n" in raw


def test_header_lines_are_folded() -> None:
    long_host = "a-rather-long-host-name-for-testing-folding.mail-cluster.example.org"
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(120))
    raw = notice(recipients=[FailedRecipient("bob@example.com", "5.7.1", reply, long_host)])
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    report = raw.split(b"Content-Type: message/delivery-status\r\n\r\n")[1].split(b"\r\n--")[0]
    assert all(len(line) <= 78 for line in report.split(b"\r\n"))
    assert field_groups(parse(raw))[1]["Diagnostic-Code"] == f"smtp; {reply}"


# --- injection ----------------------------------------------------------------------------


def test_header_injection_through_diagnostic_is_neutralised() -> None:
    boundary = f"{QUEUE_ID}.{int(NOW)}/{HOST}"
    evil = (
        "550 5.1.1 no such user\r\nX-Injected: yes\r\n\r\n"
        f"--{boundary}\r\nContent-Type: text/html\r\n\r\n<b>phish</b>\n\rX-Also: 1"
    )
    raw = notice(
        recipients=[
            FailedRecipient(
                "bob@example.com\r\nX-Rcpt-Injected: 1",
                "5.1.1",
                evil,
                "mx.example.com\r\nX-Mta-Injected: 1",
            )
        ],
    )
    assert_crlf_only(raw)
    msg = parse(raw)
    assert len(parts(msg)) == 3
    groups = field_groups(msg)
    assert len(groups) == 2
    rcpt = groups[1]
    for name in ("X-Injected", "X-Also", "X-Rcpt-Injected", "X-Mta-Injected", "Content-Type"):
        assert rcpt[name] is None
    assert rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1 no such user X-Injected: yes ")
    assert "\n" not in rcpt["Diagnostic-Code"] and "\r" not in rcpt["Diagnostic-Code"]
    assert not re.search(rb"^X-(Injected|Also|Rcpt-Injected|Mta-Injected):", raw, re.MULTILINE)
    # The fake boundary never starts a line, so it cannot open a fourth part.
    assert raw.count(b"\r\n--" + boundary.encode() + b"\r\n") == 3


def test_header_injection_through_sender_and_hostname_is_neutralised() -> None:
    msg = parse(
        notice(
            sender="alice@example.org\r\nBcc: victim@example.com",
            myhostname="mx1.example.org\nX-Host-Injected: 1",
            queue_id="4F2A31C0D2\r\nX-Id-Injected: 1",
        )
    )
    assert msg["Bcc"] is None
    assert msg["X-Host-Injected"] is None
    assert "\n" not in str(msg["To"])
    per_message = field_groups(msg)[0]
    assert per_message["X-Id-Injected"] is None
    assert per_message["X-Host-Injected"] is None
    assert len(parts(msg)) == 3


def test_boundary_in_original_does_not_end_the_report_early() -> None:
    boundary = f"{QUEUE_ID}.{int(NOW)}/{HOST}"
    original = b"Subject: tricky\r\n\r\nbefore\r\n--" + boundary.encode() + b"--\r\nafter\r\n"
    msg = parse(notice(original=original))
    assert msg.get_boundary() != boundary
    returned = parts(msg)[2]
    body = enclosed(returned).get_content()
    assert "before" in body and "after" in body


@settings(max_examples=150, deadline=None)
@given(
    diagnostic=st.text(alphabet=st.sampled_from("ab 5:<>-\r\n\t\x00\x7fé"), max_size=300),
    address=st.text(alphabet=st.sampled_from("bob@x.\r\n:-"), min_size=1, max_size=40),
)
def test_any_diagnostic_keeps_the_structure(diagnostic: str, address: str) -> None:
    raw = notice(
        recipients=[FailedRecipient(address, "5.0.0", diagnostic, "mx.example.com"), CAROL]
    )
    assert_crlf_only(raw)
    msg = parse(raw)
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    groups = field_groups(msg)
    assert len(groups) == 3
    assert groups[2]["Final-Recipient"] == "rfc822; carol@example.net"
    assert set(groups[1].keys()) <= {
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
    }


# --- the delay warning --------------------------------------------------------------------


def delay_notice(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "kind": NoticeKind.DELAY,
        "recipients": [CAROL],
        "now": ARRIVAL + 4 * 3600,
        "delay_warning_hours": 4,
        "max_lifetime_days": 5,
    }
    args.update(overrides)
    return notice(**args)


def test_delay_notice_text_and_headers() -> None:
    msg = parse(delay_notice())
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert msg["Auto-Submitted"] == "auto-replied"
    lines = text_of(msg).splitlines()
    for line in (
        f"This is the mail system at host {HOST}.",
        "####################################################################",
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
        "Your message could not be delivered for 4 hour(s).",
        "It will be retried until it is 5 day(s) old.",
        "For further assistance, please send mail to postmaster.",
        "                   The mail system",
    ):
        assert line in lines
    assert not any(line.startswith("I'm sorry") for line in lines)
    assert "<carol@example.net>: connect to" in text_of(msg)


def test_delay_notice_fields() -> None:
    groups = field_groups(parse(delay_notice()))
    rcpt = groups[1]
    assert rcpt["Action"] == "delayed"
    assert rcpt["Status"] == "4.4.1"
    assert rcpt["Diagnostic-Code"] == f"X-Relay; {CAROL_REASON}"
    assert timestamp(rcpt["Will-Retry-Until"]) == ARRIVAL + 5 * 86400


def test_delay_notice_returns_headers_only() -> None:
    raw = delay_notice()
    returned = parts(parse(raw))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Description"] == "Undelivered Message Headers"
    content = returned.get_content()
    assert "Subject: quarterly figures" in content
    assert "Message-ID: <abc@example.org>" in content
    assert "\tby mx1.example.org (relay) with ESMTP id 4F2A31C0D2" in content
    assert b"BODY-MARKER" not in raw
    assert b"The body of the original message" not in raw


def test_delay_defaults_from_elapsed_time_and_postfix_lifetime() -> None:
    msg = parse(delay_notice(delay_warning_hours=None, max_lifetime_days=None))
    text = text_of(msg)
    assert "Your message could not be delivered for 4 hour(s)." in text
    assert "It will be retried until it is 5 day(s) old." in text
    rcpt = field_groups(msg)[1]
    assert timestamp(rcpt["Will-Retry-Until"]) == ARRIVAL + 5 * 86400


# --- size limit ---------------------------------------------------------------------------


def big_original(body_bytes: int) -> bytes:
    head = b"From: alice@example.org\r\nSubject: big\r\n\r\n"
    line = b"x" * 98 + b"\r\n"
    return head + line * (body_bytes // len(line)) + b"BIG-BODY-END\r\n"


def test_size_cap_falls_back_to_headers() -> None:
    original = big_original(MAX_RETURNED_BYTES)
    assert len(original) > MAX_RETURNED_BYTES
    raw = notice(original=original)
    returned = parts(parse(raw))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Description"] == "Undelivered Message Headers"
    assert "Subject: big" in returned.get_content()
    assert b"BIG-BODY-END" not in raw
    assert len(raw) < 10_000


def test_size_cap_is_inclusive() -> None:
    original = big_original(MAX_RETURNED_BYTES - 200)
    original = original[:-2] + b"y" * (MAX_RETURNED_BYTES - len(original)) + b"\r\n"
    assert len(original) == MAX_RETURNED_BYTES
    at_limit = parse(notice(original=original))
    assert parts(at_limit)[2].get_content_type() == "message/rfc822"
    over = parse(notice(original=original[:-2] + b"y\r\n"))
    assert parts(over)[2].get_content_type() == "text/rfc822-headers"


def test_eight_bit_original_is_labelled() -> None:
    original = "Subject: café\r\n\r\nnaïve body\r\n".encode()
    raw = notice(original=original)
    assert original in raw
    returned = parts(parse(raw))[2]
    assert returned["Content-Transfer-Encoding"] == "8bit"
    plain = parts(parse(notice()))[2]
    assert plain["Content-Transfer-Encoding"] is None


# --- refusals -----------------------------------------------------------------------------


def test_null_sender_never_gets_a_notice() -> None:
    assert is_null_sender("")
    assert is_null_sender("<>")
    assert not is_null_sender("MAILER-DAEMON@example.org")
    assert not is_null_sender(SENDER)
    with pytest.raises(ValueError, match="null sender"):
        notice(sender="")
    with pytest.raises(ValueError, match="null sender"):
        notice(kind=NoticeKind.DELAY, sender="<>")


def test_other_refusals() -> None:
    with pytest.raises(ValueError):
        notice(recipients=[])
    with pytest.raises(ValueError):
        notice(recipients=[FailedRecipient("bob@example.com", "5.1.1", "550 no", action="lost")])


def test_invalid_status_falls_back_to_other() -> None:
    bad = FailedRecipient("bob@example.com", "", "550 no")
    assert field_groups(parse(notice(recipients=[bad])))[1]["Status"] == "5.0.0"
    groups = field_groups(parse(delay_notice(recipients=[bad])))
    assert groups[1]["Status"] == "4.0.0"


def test_same_inputs_same_bytes() -> None:
    assert notice() == notice()


def test_headers_only_stops_at_the_first_non_header_line() -> None:
    # No empty line after the headers: the body must still stay out.
    original = b"Subject: no blank line\r\nX-Long: a\r\n folded\r\nBODY-MARKER here\r\n"
    returned = parts(parse(delay_notice(original=original)))[2]
    assert returned.get_content() == "Subject: no blank line\r\nX-Long: a\r\n folded\r\n"


def test_queue_id_cannot_break_the_message_id() -> None:
    msg = parse(notice(queue_id="7E6D> <x@evil\r\nX-Evil: 1"))
    assert msg["X-Evil"] is None
    assert re.fullmatch(r"<\d{14}\.[^<>\s]+@mx1\.example\.org>", msg["Message-Id"])


# --- RFC 3461 and RFC 6533 ------------------------------------------------------------------

RELAYED = FailedRecipient(
    "w@nodsn.test", "2.0.0", "250 2.0.0 Ok", "127.0.0.1", action="relayed",
    dsn_orcpt="rfc822;w@nodsn.test",
    text="delivery via 127.0.0.1[127.0.0.1]:36265: 250 2.0.0 Ok",
)


def test_success_notice_is_postfix_success_report() -> None:
    """Compare tests/golden/postfix-3.7/dsn-relayed-notice.txt."""
    raw = notice(kind=NoticeKind.SUCCESS, recipients=[RELAYED], envid="bar-envid-2")
    assert_crlf_only(raw)
    msg = parse(raw)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    text = text_of(msg)
    assert text.replace("\r\n", "\n").endswith(
        "Your message was successfully delivered to the destination(s)\n"
        "listed below. If the message was delivered to mailbox you will\n"
        "receive no further notifications. Otherwise you may still receive\n"
        "notifications of mail delivery errors from other systems.\n\n"
        "                   The mail system\n\n"
        "<w@nodsn.test>: delivery via 127.0.0.1[127.0.0.1]:36265: 250 2.0.0 Ok\n")
    per_message, w = field_groups(msg)
    assert list(per_message.keys())[:2] == ["Reporting-MTA", "Original-Envelope-Id"]
    assert per_message["Original-Envelope-Id"] == "bar-envid-2"
    assert [(k, w[k]) for k in list(w.keys())[:6]] == [
        ("Final-Recipient", "rfc822; w@nodsn.test"),
        ("Original-Recipient", "rfc822;w@nodsn.test"),
        ("Action", "relayed"),
        ("Status", "2.0.0"),
        ("Remote-MTA", "dns; 127.0.0.1"),
        ("Diagnostic-Code", "smtp; 250 2.0.0 Ok"),
    ]
    returned = parts(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Description"] == "Message Headers"
    assert b"BODY-MARKER" not in raw


def test_ret_hdrs_returns_only_the_headers_of_a_bounce() -> None:
    raw = notice(headers_only=True)
    returned = parts(parse(raw))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Description"] == "Undelivered Message Headers"
    assert b"BODY-MARKER" not in raw
    assert b"Subject: quarterly figures\r\n" in raw


def test_original_recipient_is_the_orcpt_verbatim() -> None:
    dave = FailedRecipient("dave@example.com", "5.2.2", DAVE_REPLY,
                           original_address="David@alias.example.org",
                           dsn_orcpt="rfc822;Dave+2B@Example.COM")
    (_, group) = field_groups(parse(notice(recipients=[dave])))
    assert group["Original-Recipient"] == "rfc822;Dave+2B@Example.COM"


def test_envid_cannot_add_fields() -> None:
    raw = notice(envid="x\r\nAction: delivered")
    per_message = field_groups(parse(raw))[0]
    assert per_message["Original-Envelope-Id"] == "x Action: delivered"
    assert per_message["Action"] is None


UTF8_ORIGINAL = "Subject: Grüße\r\nFrom: jörg@example.org\r\n\r\nHallo.\r\n".encode()


@pytest.mark.parametrize("kind", [NoticeKind.FAILURE, NoticeKind.DELAY, NoticeKind.SUCCESS])
def test_global_notice_for_an_smtputf8_message(kind: NoticeKind) -> None:
    zoe = FailedRecipient("zoë@example.com", "5.1.1", "550 5.1.1 no", "mx.example.com",
                          action="relayed" if kind is NoticeKind.SUCCESS else "failed",
                          dsn_orcpt="utf-8;zoë@example.com")
    raw = notice(kind=kind, recipients=[zoe], original=UTF8_ORIGINAL, smtputf8=True,
                 sender="jörg@example.org")
    full = kind is NoticeKind.FAILURE
    assert "\r\nTo: jörg@example.org\r\n".encode() in raw  # RFC 6532: UTF-8 in headers
    assert b"Content-Type: message/global-delivery-status\r\n" \
        b"Content-Transfer-Encoding: 8bit\r\n" in raw
    assert ("Final-Recipient: utf-8; zoë@example.com\r\n"
            "Original-Recipient: utf-8;zoë@example.com\r\n").encode() in raw
    assert "X-Relay-Sender: utf-8; jörg@example.org\r\n".encode() in raw
    if full:
        assert b"Content-Type: message/global\r\n" in raw
        assert UTF8_ORIGINAL in raw
    else:
        assert b"Content-Type: message/global-headers\r\n" in raw
        assert b"Hallo." not in raw
    assert b"message/delivery-status" not in raw and b"rfc822-headers" not in raw


def test_needs_global() -> None:
    from relay.bounce import needs_global

    assert needs_global(ORIGINAL, True)
    assert not needs_global(ORIGINAL, False)
    assert needs_global(UTF8_ORIGINAL, False)
    assert needs_global(ORIGINAL, False, ["zoë@example.com"])
    # 8-bit text in the body alone does not need it: message/rfc822 may carry 8bit.
    assert not needs_global(ORIGINAL + "é\r\n".encode(), False)
