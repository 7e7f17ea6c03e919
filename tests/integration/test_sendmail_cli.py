"""sendmail: local submission as Postfix's sendmail(1) does it, run as the installed script.

Most tests submit with the daemon stopped and read what landed in incoming/ (the
message waits there for the daemon); the delivery tests run a real daemon that relays
to a scripted SMTP peer on loopback and check what the peer received.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spool import Envelope, Spool
from tests.support.daemon import RelayDaemon
from tests.support.peers import ThreadedPeer

pytestmark = pytest.mark.timeout(60)

MakeDaemon = Callable[..., RelayDaemon]
PeerFactory = Callable[..., ThreadedPeer]
LOGIN = pwd.getpwuid(os.getuid()).pw_name
UID = os.getuid()
HOLD_DELIVERY = {
    "transport_maps": "inline:{ * = smtp:[127.0.0.1]:1 }",
    "minimal_backoff_time": "1h",
    "maximal_backoff_time": "1h",
    "queue_run_delay": "1h",
}


def sendmail(d: RelayDaemon, *args: str, input: bytes = b"",
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    if env is None:
        return d.run_cmd("sendmail", *args, input=input)
    script = Path(sys.executable).parent / "sendmail"
    return subprocess.run([str(script), *args], input=input, capture_output=True,
                          env={**d.env, **env}, timeout=60, check=False)


def queued(d: RelayDaemon) -> list[tuple[Envelope, bytes]]:
    spool = Spool(str(d.queue_directory), create=False)
    out = []
    for _, env in spool.envelopes(("incoming",)):
        out.append((env, spool.read_content(env.queue_id, env.size)))
    return out


def only(d: RelayDaemon) -> tuple[Envelope, bytes]:
    items = queued(d)
    assert len(items) == 1, items
    return items[0]


def headers(content: bytes) -> list[str]:
    head = content.split(b"\r\n\r\n", 1)[0].decode()
    return re.split(r"\r\n(?![ \t])", head)


def body(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[1]


@pytest.fixture
def stopped(relay_daemon: MakeDaemon) -> RelayDaemon:
    return relay_daemon(HOLD_DELIVERY, start=False)


def test_lf_input_is_stored_with_crlf_and_local_headers(stopped: RelayDaemon) -> None:
    r = sendmail(stopped, "-F", "Test User", "bob@example.net",
                 input=b"Subject: hello\nTo: bob@example.net\n\nline one\nline two\n")
    assert (r.returncode, r.stderr) == (0, b"")
    env, content = only(stopped)
    assert b"\n" not in content.replace(b"\r\n", b"")
    h = headers(content)
    assert re.fullmatch(rf"Received: by relay\.test \(relay, from userid {UID}\)\r\n"
                        rf"\tid {env.queue_id}; \w{{3}}, .+", h[0])
    assert h[1:3] == ["Subject: hello", "To: bob@example.net"]
    assert re.fullmatch(rf"Message-Id: <\d{{14}}\.{env.queue_id}@relay\.test>", h[3])
    assert h[4].startswith("Date: ")
    assert h[5:] == [f"From: Test User <{LOGIN}@relay.test>"]
    assert body(content) == b"line one\r\nline two\r\n"
    assert env.sender == f"{LOGIN}@relay.test"
    assert env.sender_fullname == "Test User"
    assert [r.address for r in env.recipients] == ["bob@example.net"]
    assert env.protocol == "local" and env.client_name == "localhost"
    assert env.size == len(content)
    assert env.message_id == h[3].split(" ", 1)[1]


def test_crlf_input_and_last_line_without_newline(stopped: RelayDaemon) -> None:
    sendmail(stopped, "bob@example.net", input=b"Subject: x\r\n\r\na\r\nb")
    _, content = only(stopped)
    assert body(content) == b"a\r\nb\r\n"


def test_a_lone_dot_ends_input_unless_i(stopped: RelayDaemon) -> None:
    text = b"Subject: dots\n\nbefore\n..twice\n.\nafter\n"
    sendmail(stopped, "a@example.net", input=text)
    sendmail(stopped, "-i", "b@example.net", input=text)
    sendmail(stopped, "-oi", "c@example.net", input=text)
    bodies = {env.recipients[0].address[0]: body(c) for env, c in queued(stopped)}
    # No unstuffing: "..twice" is content, as in Postfix's sendmail.
    assert bodies["a"] == b"before\r\n..twice\r\n"
    assert bodies["b"] == bodies["c"] == b"before\r\n..twice\r\n.\r\nafter\r\n"


def test_t_takes_to_cc_bcc_and_removes_bcc(stopped: RelayDaemon) -> None:
    text = (b"From: Alice <alice@example.org>\n"
            b"To: Bob <bob@example.net>,\n  carol\n"
            b"Cc: undisclosed-recipients:;, dave@example.com\n"
            b"Bcc: eve@example.org\n"
            b"Subject: team\n\nhi\n")
    r = sendmail(stopped, "-t", "frank@example.net", input=text)
    assert r.returncode == 0, r.stderr
    env, content = only(stopped)
    assert [x.address for x in env.recipients] == [
        "frank@example.net", "bob@example.net", "carol@relay.test", "dave@example.com",
        "eve@example.org"]
    h = headers(content)
    assert not any(line.lower().startswith("bcc:") for line in h)
    assert "To: Bob <bob@example.net>,\r\n  carol" in h
    assert "From: Alice <alice@example.org>" in h
    assert sum(line.startswith("From:") for line in h) == 1


def test_t_with_resent_headers_takes_only_those(stopped: RelayDaemon) -> None:
    text = (b"To: bob@example.net\nResent-To: carol@example.net\n"
            b"Resent-Bcc: dave@example.net\n\nforwarded\n")
    sendmail(stopped, "-t", input=text)
    env, content = only(stopped)
    assert [x.address for x in env.recipients] == ["carol@example.net", "dave@example.net"]
    assert b"Resent-Bcc" not in content


def test_t_without_recipients_is_refused(stopped: RelayDaemon) -> None:
    r = sendmail(stopped, "-t", input=b"Subject: nobody\n\nhi\n")
    assert r.returncode == 64
    assert r.stderr.decode() == (
        f"sendmail: fatal: {LOGIN}({UID}): No recipient addresses found in message header\n")
    # Refused before the spool was even opened: nothing reserved, nothing to clean up.
    assert not (stopped.queue_directory / "data").exists()


def test_no_recipient_arguments_is_refused(stopped: RelayDaemon) -> None:
    r = sendmail(stopped, input=b"Subject: x\n\nhi\n")
    assert r.returncode == 64
    assert r.stderr.decode() == (
        f"sendmail: fatal: {LOGIN}({UID}): Recipient addresses must be specified on the "
        "command line or via the -t option\n")


def test_sender_options(stopped: RelayDaemon) -> None:
    sendmail(stopped, "-f", "list-owner@example.org", "-F", "Mailing List", "a@example.net",
             input=b"Subject: 1\n\n1\n")
    sendmail(stopped, "-f<>", "b@example.net", input=b"Subject: 2\n\n2\n")
    sendmail(stopped, "-r", "Robot <robot>", "c@example.net", input=b"Subject: 3\n\n3\n")
    got = {env.recipients[0].address[0]: (env, c) for env, c in queued(stopped)}
    env, content = got["a"]
    assert env.sender == "list-owner@example.org"
    assert "From: Mailing List <list-owner@example.org>" in headers(content)
    env, content = got["b"]
    assert env.sender == ""
    assert "From: MAILER-DAEMON" in headers(content)
    assert got["c"][0].sender == "robot@relay.test"


def test_existing_headers_are_not_duplicated(stopped: RelayDaemon) -> None:
    text = (b"From leading-mbox-line Mon Jan  1 00:00:00 2024\n"
            b"Message-ID: <abc@example.org>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
            b"From: a@example.org\n\nbody\n")
    sendmail(stopped, "bob@example.net", input=text)
    env, content = only(stopped)
    h = headers(content)
    assert h[0].startswith("Received: by relay.test")
    assert h[1:] == ["Message-ID: <abc@example.org>", "Date: Mon, 1 Jan 2024 00:00:00 +0000",
                     "From: a@example.org"]
    assert env.message_id == "<abc@example.org>"


def test_myorigin_qualifies_addresses_and_C_names_the_config(stopped: RelayDaemon) -> None:
    stopped.write_config(myorigin="example.com")
    script = Path(sys.executable).parent / "sendmail"
    r = subprocess.run([str(script), "-C", str(stopped.config_dir / "main.cf"), "-odi", "-v",
                        "--", "bob, carol@example.net"], input=b"Subject: x\n\nx\n",
                       capture_output=True, env=stopped.env, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    env, _ = only(stopped)
    assert env.sender == f"{LOGIN}@example.com"
    assert [x.address for x in env.recipients] == ["bob@example.com", "carol@example.net"]


def test_mail_config_environment(stopped: RelayDaemon) -> None:
    r = sendmail(stopped, "bob@example.net", input=b"Subject: x\n\nx\n",
                 env={"MAIL_CONFIG": str(stopped.config_dir)})
    assert r.returncode == 0, r.stderr
    assert len(queued(stopped)) == 1


def test_disk_full_is_a_temporary_failure_and_leaves_nothing(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY, start=False)
    Spool(str(d.queue_directory))  # as after a first start
    r = sendmail(d, "bob@example.net", input=b"Subject: x\n\nx\n",
                 env={"RELAY_FAULT": "enqueue.data_written:enospc"})
    assert r.returncode == 75
    err = r.stderr.decode()
    assert err.startswith(f"sendmail: fatal: {LOGIN}({UID}): error writing queue file: ")
    assert "No space left on device" in err and err.endswith("-- message not queued\n")
    assert queued(d) == []
    assert not os.listdir(d.queue_directory / "data")


def test_unwritable_spool_is_a_temporary_failure(relay_daemon: MakeDaemon,
                                                 tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    d = relay_daemon({**HOLD_DELIVERY, "queue_directory": str(blocker / "spool")}, start=False)
    r = sendmail(d, "bob@example.net", input=b"Subject: x\n\nx\n")
    assert r.returncode == 75
    assert r.stderr.decode().startswith(f"sendmail: fatal: {LOGIN}({UID}): error writing "
                                        "queue file: Not a directory")
    assert "message not queued" in r.stderr.decode()


def test_message_over_the_size_limit(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon({**HOLD_DELIVERY, "message_size_limit": "1000"}, start=False)
    r = sendmail(d, "bob@example.net", input=b"Subject: big\n\n" + b"x" * 2000 + b"\n")
    assert r.returncode == 69
    assert r.stderr.decode() == f"sendmail: fatal: {LOGIN}({UID}): message file too big\n"
    assert queued(d) == []


def test_usage_errors(stopped: RelayDaemon) -> None:
    r = sendmail(stopped, "-bs")
    assert (r.returncode, r.stderr) == (64, b"sendmail: fatal: unsupported: -bs\n")
    r = sendmail(stopped, "-k", "bob@example.net")
    assert (r.returncode, r.stderr) == (64, b"sendmail: fatal: usage: sendmail [options]\n")
    r = sendmail(stopped, "-bp", "bob@example.net")
    assert r.returncode == 64


def test_q_with_the_mail_system_down(stopped: RelayDaemon) -> None:
    r = sendmail(stopped, "-q")
    assert r.returncode == 69
    assert r.stderr == b"postqueue: fatal: Cannot flush mail queue - mail system is down\n"


def test_bp_lists_the_queue(stopped: RelayDaemon) -> None:
    sendmail(stopped, "-f", "alice@example.org", "bob@example.net", input=b"Subject: x\n\nx\n")
    env, _ = only(stopped)
    r = sendmail(stopped, "-bp")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].startswith("-Queue ID-")
    assert lines[1].startswith(env.queue_id + " ") and lines[1].endswith(" alice@example.org")
    assert lines[2] == " " * 41 + "bob@example.net"
    assert lines[-1] == "-- 0 Kbytes in 1 Request."


def test_delivered_by_the_running_daemon_at_once(relay_daemon: MakeDaemon,
                                                 threaded_peer: PeerFactory,
                                                 ) -> None:
    peer = threaded_peer()
    d = relay_daemon({**HOLD_DELIVERY,
                      "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{peer.port} }}"})
    start = time.monotonic()
    r = sendmail(d, "-f", "alice@example.org", "bob@example.net",
                 input=b"Subject: via sendmail\n\nhello\n.\nnot sent\n")
    assert r.returncode == 0, r.stderr
    (msg,) = peer.wait_for(1, timeout=10)
    assert time.monotonic() - start < 5
    assert msg.sender == "alice@example.org" and msg.recipients == ("bob@example.net",)
    assert msg.data.startswith(b"Received: by relay.test (relay, from userid ")
    assert b"\r\nSubject: via sendmail\r\n" in msg.data
    assert msg.data.endswith(b"\r\n\r\nhello\r\n")
    d.wait_log("status=sent")
    assert "(queue active)" in d.log()


def test_queued_while_down_is_delivered_at_start(relay_daemon: MakeDaemon,
                                                 threaded_peer: PeerFactory,
                                                 ) -> None:
    peer = threaded_peer()
    d = relay_daemon({**HOLD_DELIVERY,
                      "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{peer.port} }}"},
                     start=False)
    r = sendmail(d, "bob@example.net", input=b"Subject: later\n\nlater\n")
    assert r.returncode == 0, r.stderr
    assert len(queued(d)) == 1
    d.start()
    peer.wait_for(1, timeout=10)
    r = sendmail(d, "-q")
    assert (r.returncode, r.stderr) == (0, b"")
