"""Capture and the maildir: next hop end to end: relay serve --capture, transport_maps and
default_transport into Maildirs, Postfix local(8)'s headers and log line, the success
notice a maildir delivery owes (NOTIFY=SUCCESS: Action delivered), a Maildir that cannot
be written, and conf/laptop/main.cf as make run uses it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay import config
from relay.maildir import Captured
from relay.sink import ThreadedSink
from relay.testing import SmtpRelay

pytestmark = pytest.mark.timeout(90)
Factory = Callable[..., SmtpRelay]
REPO = Path(__file__).resolve().parents[2]
BODY = b"From: app@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def sink() -> Iterator[ThreadedSink]:
    s = ThreadedSink().start()
    yield s
    s.stop()


def test_capture_delivers_everything_into_the_maildir_and_nothing_leaves(
        smtp_relay_factory: Factory, sink: ThreadedSink) -> None:
    # main.cf says to relay to a real next hop; capture wins.
    relay = smtp_relay_factory({
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "transport_maps": f"inline:{{ example.com = smtp:[127.0.0.1]:{sink.port} }}",
    })
    with relay.smtp() as s:
        s.sendmail("app@example.org", ["bob@example.net", "ann@example.com", "c@[192.0.2.1]"],
                   BODY)
    messages = relay.wait_for(3)
    assert sorted(m["Delivered-To"] for m in messages) == [
        "ann@example.com", "bob@example.net", "c@[192.0.2.1]"]
    first = messages[0]
    assert list(first.keys())[:3] == ["Return-Path", "X-Original-To", "Delivered-To"]
    assert first["Return-Path"] == "<app@example.org>"
    assert first["X-Original-To"] == first["Delivered-To"]
    assert first["Subject"] == "hi"
    assert sink.accepted == []
    log = relay.log()
    assert re.search(r"relay/master\[\d+\]: daemon started -- version \S+, configuration "
                     r"\S+, queue_directory \S+, maillog_file \S+, listening on .+, "
                     r"capture mode: all mail to the Maildir " + re.escape(str(relay.maildir))
                     + ", none leaves this machine$", log, re.MULTILINE)
    assert re.search(r"relay/local\[\d+\]: \w+: to=<bob@example.net>, relay=maildir, "
                     r"delay=[\d.]+, delays=[\d./]+, dsn=2.0.0, status=sent "
                     r"\(delivered to maildir\)", log)
    # A Maildir that was not there was made, with its three directories.
    assert sorted(os.listdir(relay.maildir)) == ["cur", "new", "tmp"]
    assert os.listdir(relay.maildir / "tmp") == []


def test_transport_maps_and_default_transport_into_maildirs(
        smtp_relay_factory: Factory, tmp_path: Path) -> None:
    shop, rest = tmp_path / "shop", tmp_path / "rest"
    relay = smtp_relay_factory({
        "transport_maps": f"inline:{{ shop.test = maildir:{shop} }}",
        "default_transport": f"maildir:{rest}",
    }, capture=False)
    with relay.smtp() as s:
        s.sendmail("<>", ["orders@shop.test", "x@elsewhere.test"], BODY)
    relay.wait_for(2)
    (in_shop,) = Captured([str(shop)]).entries()
    (in_rest,) = Captured([str(rest)]).entries()
    assert Path(in_shop.path).read_bytes().startswith(
        b"Return-Path: <>\nX-Original-To: orders@shop.test\nDelivered-To: orders@shop.test\n")
    assert b"Delivered-To: x@elsewhere.test\n" in Path(in_rest.path).read_bytes()
    relay.wait_queue()  # and the message leaves the queue


def test_notify_success_gets_a_delivered_notice(smtp_relay: SmtpRelay) -> None:
    with smtp_relay.smtp() as s:
        s.ehlo("client.test")
        s.sendmail("app@example.org", ["bob@example.net"], BODY,
                   rcpt_options=["NOTIFY=SUCCESS"])
    (notice,) = smtp_relay.wait_for(1, match="to:app@example.org")
    text = notice.as_string()
    assert notice["Subject"] == "Successful Mail Delivery Report"
    assert "Action: delivered" in text
    assert "Final-Recipient: rfc822; bob@example.net" in text
    assert "Remote-MTA" not in text  # delivered here, not by another MTA
    assert "delivery via maildir: delivered to maildir" in text


def test_a_maildir_that_cannot_be_written_bounces_as_postfix(
        smtp_relay_factory: Factory, tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    box = tmp_path / "ok"
    relay = smtp_relay_factory({
        "transport_maps": f"inline:{{ broken.test = maildir:{blocked}/m }}",
        "default_transport": f"maildir:{box}",
    }, capture=False)
    with relay.smtp() as s:
        s.sendmail("app@example.org", ["bob@broken.test"], BODY)
    (notice,) = relay.wait_for(1, match="subject:Undelivered")
    assert "maildir delivery failed: create maildir" in notice.as_string()
    assert re.search(r"to=<bob@broken.test>, relay=maildir, .*dsn=5.2.0, status=bounced "
                     r"\(maildir delivery failed: create maildir " + re.escape(str(blocked))
                     + r"/m: Not a directory\)", relay.log())


def test_relay_serve_capture_option_and_the_laptop_config(tmp_path: Path) -> None:
    # conf/laptop/main.cf as it is: strict-clean, capture beside the spool, HTTP on.
    cfg = config.load(str(REPO / "conf" / "laptop"), environ={"HOME": str(tmp_path)},
                      strict=True)
    assert os.path.normpath(cfg.str("capture_maildir")) == \
        str(tmp_path / ".local" / "state" / "relay" / "captured")
    assert cfg.str("http_listen") == "127.0.0.1:8025"
    assert [(a.host, a.port) for a in cfg.listen_addresses()] == [("127.0.0.1", 2525),
                                                                  ("::1", 2525)]
    # Started (on free ports instead of 2525/8025), it captures.
    text = (REPO / "conf" / "laptop" / "main.cf").read_text()
    text = text.replace(":2525", ":0").replace(":8025", ":0")
    relay = SmtpRelay(tmp_path / "run", capture=False, env={**os.environ, "HOME": str(tmp_path)},
                      main_cf=text + f"maillog_file = {tmp_path}/maillog\n")
    relay.maillog = tmp_path / "maillog"
    with relay:
        assert relay.http_port
        with relay.smtp() as s:
            s.sendmail("app@example.org", ["bob@example.net"], BODY)
        relay.wait_for(1)
        r = relay.command("relay", "capture", "ls")
        assert "<app@example.org> -> bob@example.net  hi" in r.stdout.decode()


def test_unknown_parameter_stops_relay_serve(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/spool\n"
                                      "relay_host = [smtp.example.com]:587\n")
    r = subprocess.run([sys.executable, "-m", "relay.cli.main", "serve", "-c", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1
    assert r.stderr == (f"relay: fatal: {tmp_path}/main.cf, line 2: unknown parameter "
                        "relay_host (did you mean relayhost?)\n")
    assert not (tmp_path / "spool").exists()
