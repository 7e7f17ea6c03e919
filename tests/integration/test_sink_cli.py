"""``relay sink`` as a real subprocess: every scripted fault over real sockets, the Maildir it
fills, the presets' exact texts, SIGHUP, and a bad script.

The clients are the standard library's smtplib (and raw sockets where a fault is below
what smtplib shows: a drop in mid-DATA, silence after the final dot).
"""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.maildir import Captured

pytestmark = pytest.mark.timeout(60)

RELAY = [sys.executable, "-m", "relay.cli.main"]
SCRIPT = """
hostname = "sink.test"

[[rule]]
stage = "mail"
sender = "mailfail@*"
reply = "451 4.3.0 <{sender}>: temporary failure at MAIL"

[[rule]]
stage = "rcpt"
rcpt = "*@unknown.test"
reply = "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"

[[rule]]
stage = "data"
sender = "datafail@*"
reply = "554 5.5.1 Error: no DATA today"

[[rule]]
stage = "data-end"
sender = "enddefer@*"
reply = "452 4.3.1 Insufficient system storage"

[[rule]]
stage = "data"
sender = "drop@*"
action = "drop"
after_bytes = 20

[[rule]]
stage = "data-end"
sender = "silent@*"
action = "silence"

[[rule]]
stage = "rcpt"
sender = "slow@*"
action = "accept"
delay = 0.6

[[rule]]
action = "greylist"
rcpt = "*@grey.test"

[[rule]]
action = "rate-limit"
sender = "bulk@*"
limit = 2

[[rule]]
sender = "ms@*"
preset = "outlook-rate-limit"
"""


class SinkProcess:
    def __init__(self, tmp: Path, script: str, name: str = "sink") -> None:
        self.dir = tmp / name
        self.dir.mkdir()
        self.script = self.dir / "faults.toml"
        self.script.write_text(script)
        self.maildir = self.dir / "mail"
        ready = self.dir / "ready.json"
        self.stderr = open(self.dir / "stderr", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*RELAY, "sink", "--listen", "127.0.0.1:0", "--maildir", str(self.maildir),
             "--script", str(self.script), "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL, stderr=self.stderr)
        end = time.monotonic() + 15
        while not ready.exists():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < end, "relay sink did not start"
            time.sleep(0.02)
        address = json.loads(ready.read_text())["smtpd"][0]
        self.port = int(address.rsplit(":", 1)[1])

    def log(self) -> str:
        return (self.dir / "stderr").read_text()

    def smtp(self, timeout: float = 10) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.stderr.close()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    s = SinkProcess(tmp_path, SCRIPT)
    yield s
    s.stop()
    assert s.proc.returncode == 0


BODY = b"Subject: test\r\n\r\nhello\r\n"


def test_default_is_a_plain_accepting_mx_that_fills_the_maildir(sink: SinkProcess) -> None:
    with sink.smtp() as s:
        code, text = s.ehlo("client.test")
        assert code == 250 and b"PIPELINING" in text and b"SIZE 52428800" in text
        s.sendmail("a@example.org", ["b@example.net", "c@example.net"], BODY)
    entries = Captured([str(sink.maildir)]).entries()
    assert len(entries) == 2  # one file per recipient
    raw = Path(entries[0].path).read_bytes()
    assert raw.startswith(b"Return-Path: <a@example.org>\nX-Original-To: b@example.net\n"
                          b"Delivered-To: b@example.net\nSubject: test\n")


def test_replies_at_mail_rcpt_data_and_end_of_data(sink: SinkProcess) -> None:
    with sink.smtp() as s:
        s.ehlo("client.test")
        assert s.mail("mailfail@example.org") == (
            451, b"4.3.0 <mailfail@example.org>: temporary failure at MAIL")
        s.rset()
        s.mail("a@example.org")
        assert s.rcpt("x@unknown.test") == (
            550, b"5.1.1 <x@unknown.test>: Recipient address rejected: User unknown")
        assert s.rcpt("y@example.net")[0] == 250
        s.rset()
        s.mail("datafail@example.org")
        s.rcpt("y@example.net")
        assert s.docmd("DATA") == (554, b"5.5.1 Error: no DATA today")
        s.rset()
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("enddefer@example.org", ["y@example.net"], BODY)
        assert (e.value.smtp_code, e.value.smtp_error) == (
            452, b"4.3.1 Insufficient system storage")
    assert Captured([str(sink.maildir)]).entries() == []  # nothing was accepted


def test_drop_in_mid_data(sink: SinkProcess) -> None:
    with socket.create_connection(("127.0.0.1", sink.port), timeout=10) as c:
        f = c.makefile("rb")
        f.readline()
        for command in (b"HELO c\r\n", b"MAIL FROM:<drop@example.org>\r\n",
                        b"RCPT TO:<y@example.net>\r\n", b"DATA\r\n"):
            c.sendall(command)
            assert f.readline()[:1] in (b"2", b"3")
        c.sendall(b"Subject: x\r\n\r\n" + b"y" * 10)  # 24 bytes: past after_bytes = 20
        assert f.readline() == b""  # the sink hung up without a word
    assert "drop in mid-DATA after 20 bytes" in sink.log()


def test_silence_after_the_final_dot(sink: SinkProcess) -> None:
    with sink.smtp(timeout=1.0) as s:
        s.ehlo("c")
        s.mail("silent@example.org")
        s.rcpt("y@example.net")
        s.putcmd("DATA")
        assert s.getreply()[0] == 354
        s.send(BODY + b".\r\n")
        with pytest.raises((TimeoutError, smtplib.SMTPServerDisconnected)):
            s.getreply()
    assert "silence after the final dot" in sink.log()


def test_slow_link(sink: SinkProcess) -> None:
    with sink.smtp() as s:
        s.ehlo("c")
        s.mail("slow@example.org")
        started = time.monotonic()
        assert s.rcpt("y@example.net")[0] == 250
        assert time.monotonic() - started >= 0.6


def test_greylisting_defers_the_first_attempt_only(sink: SinkProcess) -> None:
    for expected in (451, 250):
        with sink.smtp() as s:
            s.ehlo("c")
            s.mail("a@example.org")
            code, text = s.rcpt("u@grey.test")
            assert code == expected
    assert text == b"2.1.5 Ok"
    with sink.smtp() as s:
        s.ehlo("c")
        s.mail("a@example.org")
        code, text = s.rcpt("v@grey.test")  # another triple: greylisted afresh
    assert (code, text) == (451, (b"4.7.1 <v@grey.test>: Recipient address rejected: "
                                 b"Greylisted, see http://postgrey.schweikert.ch/help/grey.test.html"))


def test_rate_limit_and_a_provider_preset(sink: SinkProcess) -> None:
    with sink.smtp() as s:
        for _ in range(2):
            s.sendmail("bulk@example.org", ["y@example.net"], BODY)
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail("bulk@example.org", ["y@example.net"], BODY)
    assert e.value.smtp_code == 421
    assert e.value.smtp_error == b"4.7.0 sink.test Error: too many messages, slow down"
    with sink.smtp() as s, pytest.raises(smtplib.SMTPSenderRefused) as e:
        s.sendmail("ms@example.org", ["y@example.net"], BODY)
    assert e.value.smtp_code == 421
    assert e.value.smtp_error == (
        b"RP-001 (SNT0-MC2-F19) Unfortunately, some messages from 127.0.0.1 weren't sent. "
        b"Please try again. We have limits for how many messages can be sent per hour and per "
        b"day. You can also refer to http://mail.live.com/mail/troubleshooting.aspx#errors.")


def test_connect_faults_by_connection_number_and_sighup(tmp_path: Path) -> None:
    s = SinkProcess(tmp_path, '[[rule]]\nstage = "connect"\nconnection = 1\n'
                    'reply = "554 5.3.2 {hostname} not ready"\n')
    try:
        with pytest.raises(smtplib.SMTPConnectError) as e:
            s.smtp()
        assert (e.value.smtp_code, e.value.smtp_error) == (554, b"5.3.2 sink.test not ready")
        with s.smtp() as c:  # connection 2
            assert c.noop()[0] == 250
        s.script.write_text('[[rule]]\nstage = "connect"\nreply = "421 4.3.2 closed for the day"\n')
        s.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 10
        while "reloaded" not in s.log() and time.monotonic() < end:
            time.sleep(0.02)
        with pytest.raises(smtplib.SMTPConnectError) as e:
            s.smtp()
        assert e.value.smtp_code == 421
        s.script.write_text("[[rule]]\nstage = 'nowhere'\n")
        s.proc.send_signal(signal.SIGHUP)
        while "keeping the old script" not in s.log() and time.monotonic() < end:
            time.sleep(0.02)
        assert "rule 1: stage 'nowhere' is not one of" in s.log()
    finally:
        s.stop()


def test_bad_script_or_argument_is_a_usage_error(tmp_path: Path) -> None:
    script = tmp_path / "faults.toml"
    script.write_text('[[rule]]\nstage = "rcpt"\nreply = "five fifty"\n')
    r = subprocess.run([*RELAY, "sink", "--script", str(script)], capture_output=True,
                       timeout=30, check=False)
    assert r.returncode == 64
    assert r.stderr.decode() == ("relay sink: fatal: faults.toml: rule 1: bad reply "
                                 "'five fifty': it must start with a code such as 550\n")
    r = subprocess.run([*RELAY, "sink", "--listen", "nowhere"], capture_output=True,
                       timeout=30, check=False)
    assert r.returncode == 64
    assert b"--listen 'nowhere': HOST:PORT or [IPV6]:PORT expected" in r.stderr
