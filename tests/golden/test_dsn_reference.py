"""relay's notices against Postfix 3.7.11's own (tests/golden/postfix-3.7/), made from the
same inputs: the success notice for a next hop without DSN and the RET=HDRS bounce.

Byte for byte where the two are meant to agree: the notification text, the
per-recipient DSN fields, the per-message fields but the MTA's name (X-Postfix-* is
X-Relay-* here) and the returned part's type and description.  Where relay differs on
purpose (its own From:, no Return-Path: added to the returned headers, a
Last-Attempt-Date field) the comparison leaves it out.
"""

from __future__ import annotations

import email.utils
import re
from pathlib import Path

from relay.bounce import FailedRecipient, NoticeKind, make_notice

REFERENCE = Path(__file__).resolve().parent / "postfix-3.7"


def sections(dump: bytes) -> tuple[str, list[dict[str, str]], list[str], dict[str, str], str]:
    """(notification text, DSN field groups, field order of the first recipient group,
    returned part's MIME headers, returned content) of a notice (LF or CRLF)."""
    text = dump.decode().replace("\r\n", "\n")
    boundary = re.search(r'boundary="([^"]+)"', text)
    assert boundary
    parts = text.split(f"--{boundary.group(1)}")
    human, report, returned = parts[1:4]

    def split(part: str) -> tuple[dict[str, str], str]:
        head, _, content = part.lstrip("\n").partition("\n\n")
        return dict(line.split(": ", 1) for line in head.split("\n")), content

    _, human_text = split(human)
    _, report_text = split(report)
    returned_head, returned_text = split(returned)
    groups = [dict(line.split(": ", 1) for line in re.sub(r"\n[ \t]+", " ", g).split("\n"))
              for g in report_text.strip("\n").split("\n\n")]
    order = list(groups[1])
    return human_text.strip("\n"), groups, order, returned_head, returned_text


def original_of(dump: bytes) -> bytes:
    """The original message's header as the reference returned it, minus Return-Path."""
    _, _, _, _, returned = sections(dump)
    lines = [line for line in returned.strip("\n").split("\n")
             if not line.startswith("Return-Path:")]
    return ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode()


def reference(name: str) -> bytes:
    """The notice in a sink dump: after the sink's X- lines and its Received: header."""
    raw = (REFERENCE / name).read_bytes()
    return raw.split(b"\n", 8)[8]


def compare(ours: bytes, theirs: bytes) -> None:
    our_text, our_groups, our_order, our_head, _ = sections(ours)
    their_text, their_groups, their_order, their_head, _ = sections(theirs)
    assert our_text == their_text
    # Per message: the same fields in the same order, X-Postfix-* named after mail_name.
    ours_pm = {k.replace("X-Relay-", "X-Postfix-"): v for k, v in our_groups[0].items()}
    assert list(ours_pm) == list(their_groups[0])
    for name in ("Reporting-MTA", "Original-Envelope-Id", "X-Postfix-Queue-ID",
                 "X-Postfix-Sender"):
        assert ours_pm.get(name) == their_groups[0].get(name), name
    # Per recipient: every field of Postfix's, the same values, the same order.
    assert our_order[:len(their_order)] == their_order
    assert {k: our_groups[1][k] for k in their_order} == their_groups[1]
    assert (our_head["Content-Description"], our_head["Content-Type"]) == \
        (their_head["Content-Description"], their_head["Content-Type"])


def test_relayed_success_notice_as_postfix() -> None:
    theirs = reference("dsn-relayed-notice.txt")
    arrival = email.utils.parsedate_to_datetime("Wed,  2 Dec 2026 15:21:22 +0000").timestamp()
    ours = make_notice(
        kind=NoticeKind.SUCCESS, queue_id="7719A218941", sender="sender@bar.test",
        recipients=[FailedRecipient(
            "w@nodsn.test", "2.0.0", "250 2.0.0 Ok", "127.0.0.1", action="relayed",
            dsn_orcpt="rfc822;w@nodsn.test",
            text="delivery via 127.0.0.1[127.0.0.1]:36265: 250 2.0.0 Ok")],
        original=original_of(theirs), arrival_time=arrival, now=arrival,
        myhostname="relay-bar.test", mail_name="Relay", envid="bar-envid-2")
    compare(ours, theirs)


def test_ret_hdrs_bounce_as_postfix() -> None:
    theirs = reference("dsn-ret-hdrs-bounce.txt")
    arrival = email.utils.parsedate_to_datetime("Wed,  2 Dec 2026 15:21:22 +0000").timestamp()
    ours = make_notice(
        kind=NoticeKind.FAILURE, queue_id="45510218941", sender="sender@bar.test",
        recipients=[FailedRecipient(
            "z@hard.test", "5.1.1", "550 5.1.1 bar-hard: no such user", "127.0.0.1",
            dsn_orcpt="rfc822;z@hard.test",
            text="host 127.0.0.1[127.0.0.1] said: 550 5.1.1 bar-hard: no such user "
                 "(in reply to RCPT TO command)")],
        original=original_of(theirs), arrival_time=arrival, now=arrival,
        myhostname="relay-bar.test", mail_name="Relay", headers_only=True)
    compare(ours, theirs)
    assert b"\r\nbody\r\n" not in ours
