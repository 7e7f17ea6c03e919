"""relay.maildir (delivery: tmp/ then new/, Postfix local(8)'s three headers, LF lines; the
reading side) and relay.capture (Mailpit's summary, full view and search over a message)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from relay import capture, maildir
from relay.maildir import Captured, Maildir

MESSAGE = (b"From: Ann Example <ann@example.org>\r\nTo: bob@example.net, Cat <cat@example.net>\r\n"
           b"Cc: dan@example.net\r\nSubject: =?utf-8?q?R=C3=A9sum=C3=A9?=\r\n"
           b"Message-ID: <m1@example.org>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
           b"List-Unsubscribe: <mailto:u@example.org>, <https://example.org/u>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
           b"--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\n"
           b"--b2\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello   Bob,\r\n"
           b"see the   report.\r\n"
           b"--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<html><head><style>p{}</style></head><body><p>Hello <b>Bob</b>,</p>"
           b"<p>see the report &amp; more.</p></body></html>\r\n--b2--\r\n"
           b"--b1\r\nContent-Type: application/pdf\r\n"
           b"Content-Disposition: attachment; filename=report.pdf\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n")


def test_deliver_writes_atomically_with_local_headers(tmp_path: Path) -> None:
    box = tmp_path / "mail"
    name = maildir.deliver(str(box), b"Subject: x\r\n\r\nbody\r\n", sender="a@x.test",
                           recipient="b@y.test")
    assert sorted(os.listdir(box)) == ["cur", "new", "tmp"]
    assert os.listdir(box / "tmp") == []
    assert os.listdir(box / "new") == [name]
    assert (box / "new" / name).read_bytes() == (
        b"Return-Path: <a@x.test>\nX-Original-To: b@y.test\nDelivered-To: b@y.test\n"
        b"Subject: x\n\nbody\n")
    null = maildir.deliver(str(box), b"\r\n", sender="", recipient="b@y.test")
    assert (box / "new" / null).read_bytes().startswith(b"Return-Path: <>\n")
    assert maildir.valid_id(name) and not maildir.valid_id("../x") and not maildir.valid_id(".x")


def test_deliver_into_an_unusable_directory_names_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(maildir.MaildirError, match=f"create maildir {tmp_path}/file/m"):
        maildir.deliver(str(tmp_path / "file" / "m"), b"x\r\n", sender="", recipient="b@y")


def test_reading_side(tmp_path: Path) -> None:
    box = str(tmp_path / "mail")
    assert Maildir(box).entries() == []  # not there yet: empty
    ids = [maildir.deliver(box, f"Subject: {n}\r\n\r\n".encode(), sender="a@x",
                           recipient="b@y") for n in range(3)]
    # A reader moved the second one to cur/ and marked it seen: same ID, flag S.
    os.rename(f"{box}/new/{ids[1]}", f"{box}/cur/{ids[1]}:2,S")
    entries = Maildir(box).entries()
    assert [e.id for e in entries] == ids
    assert [e.seen for e in entries] == [False, True, False]
    other = str(tmp_path / "other")
    later = maildir.deliver(other, b"Subject: 3\r\n\r\n", sender="a@x", recipient="c@y")
    both = Captured([box, other])
    assert [e.id for e in both.entries()] == [*ids, later]
    assert both.find("latest").id == later  # type: ignore[union-attr]
    assert both.read(ids[1]).endswith(b"Subject: 1\n\n")  # type: ignore[union-attr]
    assert both.read("nope") is None
    assert both.remove(ids[0]) and not both.remove(ids[0])
    assert both.clear() == 3
    assert both.entries() == []


def test_view_is_mailpits_message(tmp_path: Path) -> None:
    box = str(tmp_path / "mail")
    maildir.deliver(box, MESSAGE, sender="bounces@example.org", recipient="eve@example.net")
    entry = Captured([box]).entries()[0]
    v = capture.load(entry)
    assert v is not None
    summary = v.summary()
    assert summary["ID"] == entry.id
    assert summary["MessageID"] == "m1@example.org"
    assert summary["From"] == {"Name": "Ann Example", "Address": "ann@example.org"}
    assert summary["To"] == [{"Name": "", "Address": "bob@example.net"},
                             {"Name": "Cat", "Address": "cat@example.net"}]
    assert summary["Cc"] == [{"Name": "", "Address": "dan@example.net"}]
    # The envelope recipient that no header names is Mailpit's Bcc.
    assert summary["Bcc"] == [{"Name": "", "Address": "eve@example.net"}]
    assert summary["Subject"] == "Résumé"
    assert summary["Size"] == entry.size
    assert summary["Attachments"] == 1
    assert summary["Snippet"] == "Hello Bob , see the report & more."
    assert summary["Read"] is False
    full = v.full()
    assert full["Text"] == "Hello   Bob,\nsee the   report."
    assert full["HTML"].startswith("<html>")
    assert full["ReturnPath"] == "bounces@example.org"
    assert full["ListUnsubscribe"]["Links"] == ["mailto:u@example.org", "https://example.org/u"]
    (attachment,) = full["Attachments"]
    assert attachment["FileName"] == "report.pdf"
    assert attachment["ContentType"] == "application/pdf"
    assert attachment["PartID"] == "2"
    assert attachment["Size"] == 9
    assert attachment["Checksums"]["SHA256"] == hashlib.sha256(b"%PDF-1.4\n").hexdigest()
    assert full["Date"].startswith("2026-12-01T")


@pytest.mark.parametrize(("query", "hit"), [
    ("report", True), ("REPORT", True), ("absent", False), ('"see the report"', True),
    ("from:ann@example.org", True), ("from:bob", False), ("to:cat", True), ("cc:dan", True),
    ("bcc:eve", True), ("addressed:eve", True), ("subject:résumé", True),
    ('subject:"Résumé"', True), ("message-id:m1@", True), ("has:attachment", True),
    ("-has:attachment", False), ("!from:ann", False), ("is:unread", True), ("is:read", False),
    ("larger:100", True), ("smaller:100", False), ("smaller:1k", True), ("report.pdf", True),
    ("from:ann to:bob report", True), ("from:ann to:zed", False),
    ("after:2000-01-01", True), ("before:2000-01-01", False),
])
def test_search(tmp_path: Path, query: str, hit: bool) -> None:
    box = str(tmp_path / "mail")
    maildir.deliver(box, MESSAGE, sender="bounces@example.org", recipient="eve@example.net")
    v = capture.load(Captured([box]).entries()[0])
    assert v is not None
    assert capture.matches(query, v) is hit


def test_bad_query() -> None:
    with pytest.raises(capture.BadQuery, match="bad size"):
        capture.check_query("larger:huge")
    with pytest.raises(capture.BadQuery, match="bad date"):
        capture.check_query("after:yesterday")
