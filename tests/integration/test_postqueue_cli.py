"""postqueue, mailq, postcat and qshape as subprocesses against a running daemon; and
MAIL_CONFIG naming the configuration for every queue command, postsuper and ``relay queue``
included, when ``-c`` is not given.

The daemon relays everything to 127.0.0.1:1, where nothing listens, with backoff and
queue run delay of an hour: a message is tried once, deferred with Postfix's
``connect to 127.0.0.1[127.0.0.1]:1: Connection refused``, and then stays put until a
flush asks for another attempt, which shows as one more ``status=deferred`` line in
the maillog.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay import control
from spool import Spool
from tests.support.daemon import RelayDaemon, smtp_send, wait_until

REASON = "connect to 127.0.0.1[127.0.0.1]:1: Connection refused"
PARAMS = {
    "transport_maps": "inline:{ * = smtp:[127.0.0.1]:1 }",
    "minimal_backoff_time": "1h",
    "maximal_backoff_time": "1h",
    "queue_run_delay": "1h",
}
DOWN = "postqueue: fatal: Cannot flush mail queue - mail system is down\n"

MakeDaemon = Callable[..., RelayDaemon]


def send(d: RelayDaemon, sender: str, recipients: list[str], body: bytes) -> str:
    """One SMTP transaction; returns the queue ID from the 250 reply."""
    with smtplib.SMTP(d.host, d.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        code, reply = smtp.mail(sender)
        assert code == 250, reply
        for rcpt in recipients:
            assert smtp.rcpt(rcpt)[0] == 250
        code, reply = smtp.data(body)
    assert code == 250, reply
    m = re.search(rb"queued as (\S+)", reply)
    assert m is not None, reply
    return m.group(1).decode()


def deferred(d: RelayDaemon, queue_id: str, recipients: list[str], count: int = 1) -> None:
    """Wait until every recipient was deferred ``count`` times and the file is in deferred/."""
    for rcpt in recipients:
        d.wait_log(f"{queue_id}: to=<{rcpt}>, relay=none", count=count)
    d.wait_log(f"status=deferred ({REASON})", count=count)
    end = time.monotonic() + 10
    while queue_id not in d.queue_files("deferred"):
        assert time.monotonic() < end, d.log()[-2000:]
        time.sleep(0.05)


def deferral_count(d: RelayDaemon, queue_id: str) -> int:
    return sum(1 for line in d.log().splitlines()
               if f"{queue_id}: to=<" in line and "status=deferred" in line)


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode()


@pytest.fixture
def queued(relay_daemon: MakeDaemon) -> tuple[RelayDaemon, str]:
    d = relay_daemon(PARAMS)
    qid = send(d, "alice@example.org", ["bob@example.net", "carol@example.com"],
               b"Subject: hello\r\nFrom: alice@example.org\r\n\r\nHi there\r\n")
    deferred(d, qid, ["bob@example.net", "carol@example.com"])
    return d, qid


def test_listings_show_the_deferred_message(queued: tuple[RelayDaemon, str]) -> None:
    d, qid = queued
    env = Spool(str(d.queue_directory), create=False).read("deferred", qid)
    when = time.asctime(time.localtime(env.arrival_time))[:20]
    expected = (
        "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
        f"{qid:<11} {env.size:>7} {when} alice@example.org\n"
        + " " * (76 - len(REASON)) + f"({REASON})\n"
        + " " * 41 + "bob@example.net\n"
        + " " * 41 + "carol@example.com\n"
        "\n"
        f"-- {env.size // 1024} Kbytes in 1 Request.\n"
    )

    for argv in (["mailq"], ["postqueue", "-p"]):
        result = d.run_cmd(*argv)
        assert (result.returncode, result.stderr) == (0, b"")
        assert out(result) == expected

    result = d.run_cmd("postqueue", "-j")
    assert result.returncode == 0
    assert out(result).count("\n") == 1
    record = json.loads(out(result))
    assert list(record) == ["queue_name", "queue_id", "arrival_time", "message_size",
                            "forced_expire", "sender", "recipients"]
    assert record == {
        "queue_name": "deferred", "queue_id": qid, "arrival_time": int(env.arrival_time),
        "message_size": env.size, "forced_expire": False, "sender": "alice@example.org",
        "recipients": [{"address": "bob@example.net", "delay_reason": REASON},
                       {"address": "carol@example.com", "delay_reason": REASON}],
    }


def test_postcat_shows_envelope_and_content(queued: tuple[RelayDaemon, str]) -> None:
    d, qid = queued

    result = d.run_cmd("postcat", "-q", qid)

    assert (result.returncode, result.stderr) == (0, b"")
    lines = out(result).split("\n")
    label = f"deferred/{qid}"
    markers = [line for line in lines if line.startswith("*** ")]
    assert markers == [f"*** ENVELOPE RECORDS {label} ***", f"*** MESSAGE CONTENTS {label} ***",
                       f"*** HEADER EXTRACTED {label} ***", f"*** MESSAGE FILE END {label} ***"]
    assert re.fullmatch(r"message_size: +\d+ +0 +2 +0 +\d+ +0", lines[1])
    assert "sender: alice@example.org" in lines
    assert "recipient: bob@example.net" in lines and "recipient: carol@example.com" in lines
    assert "named_attribute: helo_name=client.test" in lines
    content = lines[lines.index(f"*** MESSAGE CONTENTS {label} ***") + 1:
                    lines.index(f"*** HEADER EXTRACTED {label} ***")]
    assert content[0].startswith("Received: from client.test (localhost [127.0.0.1])")
    assert content[-4:] == ["Subject: hello", "From: alice@example.org", "", "Hi there"]
    assert "\r" not in out(result)

    body = d.run_cmd("postcat", "-b", "-q", qid)
    assert out(body) == "\nHi there\n"
    missing = d.run_cmd("postcat", "-q", "ABCDEF12345")
    assert missing.returncode == 1
    assert missing.stderr == (b"postcat: fatal: open queue file ABCDEF12345: "
                              b"No such file or directory\n")


def test_qshape_deferred(queued: tuple[RelayDaemon, str]) -> None:
    d, _ = queued

    result = d.run_cmd("qshape", "deferred")
    senders = d.run_cmd("qshape", "-s", "deferred")
    default = d.run_cmd("qshape")

    assert out(result) == (
        "                                         T  5 10 20 40 80 160 320 640 1280 1280+\n"
        "                                  TOTAL  2  2  0  0  0  0   0   0   0    0     0\n"
        "                            example.com  1  1  0  0  0  0   0   0   0    0     0\n"
        "                            example.net  1  1  0  0  0  0   0   0   0    0     0\n"
    )
    assert out(senders).splitlines()[2] == " " * 28 + "example.org  1  1" + (
        "  0" * 4 + "   0" * 3 + "    0" + "     0")
    # incoming and active are empty by now.
    assert out(default).splitlines()[1].split() == ["TOTAL"] + ["0"] * 11


def test_flush_tries_deferred_mail_again(queued: tuple[RelayDaemon, str]) -> None:
    d, qid = queued
    rcpts = ["bob@example.net", "carol@example.com"]
    assert deferral_count(d, qid) == 2

    result = d.run_cmd("postqueue", "-f")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    deferred(d, qid, rcpts, count=2)

    result = d.run_cmd("postqueue", "-i", qid)
    assert (result.returncode, result.stderr) == (0, b"")
    deferred(d, qid, rcpts, count=3)

    result = d.run_cmd("postqueue", "-s", "example.net")
    assert (result.returncode, result.stderr) == (0, b"")
    deferred(d, qid, rcpts, count=4)

    # Nothing else asked for an attempt: the backoff is an hour.
    time.sleep(0.5)
    assert deferral_count(d, qid) == 8


def test_flush_site_leaves_other_destinations_alone(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(PARAMS)
    net = send(d, "alice@example.org", ["bob@example.net"], b"Subject: 1\r\n\r\nx\r\n")
    com = send(d, "alice@example.org", ["carol@example.com"], b"Subject: 2\r\n\r\nx\r\n")
    deferred(d, net, ["bob@example.net"])
    deferred(d, com, ["carol@example.com"])

    assert d.run_cmd("postqueue", "-s", "example.com").returncode == 0
    deferred(d, com, ["carol@example.com"], count=2)

    time.sleep(0.5)
    assert deferral_count(d, net) == 1


def wait_until_down(queue_dir: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            control.request(queue_dir, "ping", timeout=1.0)
        except control.MailSystemDown:
            return
        assert time.monotonic() < end, "the queue manager still answers"
        time.sleep(0.05)


def test_mail_system_down(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(PARAMS)
    qid = send(d, "erin@example.org", ["bob@example.net"], b"Subject: x\r\n\r\nx\r\n")
    deferred(d, qid, ["bob@example.net"])
    assert d.stop() == 0

    for argv in (["-f"], ["-i", qid], ["-s", "example.net"]):
        result = d.run_cmd("postqueue", *argv)
        assert (result.returncode, result.stdout, result.stderr) == (69, b"", DOWN.encode())

    # The listings read the spool directly, daemon or not; run by root, they say so with
    # Postfix's warning (FORMATS.md 1.3), naming what did not answer.  A stopped daemon
    # removed its socket.
    warning = ("postqueue: warning: Mail system is down -- accessing queue directly (Connect"
               f" to the relay control socket {d.queue_directory}/control: No such file or"
               " directory)\n").encode() if os.geteuid() == 0 else b""
    listing = d.run_cmd("mailq")
    assert (listing.returncode, listing.stderr) == (0, warning)
    assert out(listing).splitlines()[1].startswith(qid)
    assert out(listing).splitlines()[1].endswith("  erin@example.org")
    listing = d.run_cmd("postqueue", "-j")
    assert (listing.returncode, listing.stderr) == (0, warning)
    assert json.loads(out(listing))["queue_id"] == qid

    usage = d.run_cmd("postqueue")
    assert usage.returncode == 69
    assert usage.stderr.startswith(b"postqueue: fatal: usage: postqueue -f | ")
    bad = d.run_cmd("postqueue", "-i", "no/such")
    assert (bad.returncode, bad.stderr) == (
        69, b'postqueue: fatal: Cannot flush queue ID - invalid name: "no/such"\n')


@pytest.mark.skipif(os.geteuid() != 0, reason="Postfix warns only when run by root")
def test_listing_warns_when_the_daemon_died(relay_daemon: MakeDaemon) -> None:
    """A daemon killed with SIGKILL leaves its socket behind: nobody answers on it."""
    d = relay_daemon(PARAMS)
    d.kill()
    wait_until_down(str(d.queue_directory))  # the queue manager dies with its parent
    listing = d.run_cmd("postqueue", "-p")
    assert (listing.returncode, out(listing)) == (0, "Mail queue is empty\n")
    assert listing.stderr == (
        "postqueue: warning: Mail system is down -- accessing queue directly (Connect to the"
        f" relay control socket {d.queue_directory}/control: Connection refused)\n").encode()


def test_queue_commands_honour_mail_config(relay_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = relay_daemon(PARAMS)
    qid = smtp_send(d.host, d.port, ["bob@example.net"])
    d.wait_log(f"{qid}: to=<bob@example.net>")
    wait_until(lambda: qid in d.queue_files("deferred"), 10, "the deferral")

    # Nothing but MAIL_CONFIG leads to this spool: the per-user default spool is empty.
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, MAIL_CONFIG=str(d.config_dir), HOME=str(home),
               XDG_STATE_HOME=str(home / "state"))
    bindir = Path(sys.executable).parent

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bindir / argv[0]), *argv[1:]], capture_output=True,
                              text=True, env=env, timeout=60, check=False)

    for argv in (["mailq"], ["postqueue", "-p"], ["relay", "queue", "ls"]):
        result = run(*argv)
        assert result.returncode == 0 and qid in result.stdout, (argv, result)
    result = run("postqueue", "-j")
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["queue_id"] == qid
    result = run("postcat", "-q", qid)
    assert result.returncode == 0 and "*** ENVELOPE RECORDS" in result.stdout, result
    assert "recipient: bob@example.net" in result.stdout, result.stdout
    result = run("qshape", "deferred")
    assert result.returncode == 0, result
    assert re.search(r"^\s*TOTAL\s+1\b", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^\s*example\.net\s+1\b", result.stdout, re.MULTILINE), result.stdout
    result = run("postsuper", "-h", qid)
    assert (result.returncode, result.stderr) == (
        0, f"postsuper: {qid}: placed on hold\npostsuper: Placed on hold: 1 message\n"), result
    wait_until(lambda: qid in d.queue_files("hold"), 10, "the hold")
    result = run("postsuper", "-d", qid)
    assert (result.returncode, result.stderr) == (
        0, f"postsuper: {qid}: removed\npostsuper: Deleted: 1 message\n"), result
    assert all(qid not in d.queue_files(q) for q in ("incoming", "active", "deferred", "hold"))
