"""DSN, long lines and sendmail's -N/-R/-V end to end: the daemon as a subprocess,
Postfix's smtp-sink as the next hop, and a private Postfix 3.7 fed the same input in the
same test, so that what relay does is compared with what Postfix does, not with what we
believe it does.  Also: a success notice survives the daemon being killed at every step
of recording it (the spool's fault hook exits the process there, as SIGKILL would).
"""

from __future__ import annotations

import email
import email.message
import re
import smtplib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from spool import Envelope, Recipient, Spool
from tests.support.daemon import RelayDaemon
from tests.support.peers import PeerScript, Reply, ThreadedPeer
from tests.support.postfix import PrivatePostfix, SinkDump, SmtpSink, free_port, shared_tmp

SENDER = "sender@bar.test"


@pytest.fixture
def shared() -> Iterator[Path]:
    with shared_tmp() as path:
        yield path


@pytest.fixture
def stack(shared: Path) -> Iterator[Callable[..., Stack]]:
    """A factory for (relay, Postfix, sinks), all stopped at the end."""
    stop: list[Callable[[], object]] = []

    def make(*, dsn: bool = True, refuse_rcpt: str | None = None,
             relay_params: Mapping[str, str] | None = None) -> Stack:
        n = len(stop)
        sink = SmtpSink(shared / f"sink{n}", dsn=dsn, refuse_rcpt=refuse_rcpt)
        stop.append(sink.stop)
        home = None
        if refuse_rcpt is not None:
            # Notices to bar.test go to a sink of their own, which takes them.
            home = SmtpSink(shared / f"home{n}")
            stop.append(home.stop)
        routes = f"{{bar.test=smtp:[127.0.0.1]:{home.port}}}" if home else ""
        params = {"relayhost": f"[127.0.0.1]:{sink.port}", "myhostname": "relay-bar.test",
                  "queue_run_delay": "1s", "minimal_backoff_time": "1s",
                  "maximal_backoff_time": "2s"}
        if routes:
            params["transport_maps"] = f"inline:{routes}"
        params.update(relay_params or {})
        relay = RelayDaemon(shared / f"relay{n}", params)
        relay.start()
        stop.append(relay.stop)
        postfix = PrivatePostfix(shared / f"postfix{n}", f"[127.0.0.1]:{sink.port}",
                                 {"myhostname": "relay-bar.test",
                                  **({"transport_maps": f"inline:{routes}"} if routes else {})})
        stop.append(postfix.stop)
        return Stack(relay, postfix, sink, home)

    yield make
    for fn in reversed(stop):
        fn()


@dataclass
class Stack:
    relay: RelayDaemon
    postfix: PrivatePostfix
    sink: SmtpSink
    home: SmtpSink | None

    def send_both(self, *args: str, message: bytes) -> None:
        """The same submission through relay's sendmail and Postfix's."""
        ours = self.relay.run_cmd("sendmail", *args, input=message)
        assert ours.returncode == 0, ours.stderr
        theirs = self.postfix.sendmail(*args, message=message)
        assert theirs.returncode == 0, theirs.stderr

    @staticmethod
    def by_mta(dumps: list[SinkDump]) -> tuple[SinkDump, SinkDump]:
        """(relay's, Postfix's) from two dumps of the same message."""
        assert len(dumps) == 2, dumps
        ours = [d for d in dumps if d.path.read_bytes().count(b"Postfix") == 0]
        theirs = [d for d in dumps if d not in ours]
        assert len(ours) == len(theirs) == 1, [d.message[:400] for d in dumps]
        return ours[0], theirs[0]


def dsn_params(args: str) -> list[str]:
    return [p for p in args.split()[1:] if p.split("=")[0] in ("ENVID", "RET", "ORCPT",
                                                                  "NOTIFY")]


@dataclass(frozen=True)
class Notice:
    headers: email.message.Message
    text: str
    report_type: str
    per_message: dict[str, str]
    per_recipient: list[dict[str, str]]
    returned_head: dict[str, str]
    returned: str


def parse_notice(data: bytes) -> Notice:
    """A multipart/report notice from a dump (LF line ends), taken apart by hand."""
    text = data.decode("utf-8").replace("\r\n", "\n")
    headers = email.message_from_string(text)
    boundary = headers.get_boundary()
    assert boundary, text[:500]
    chunks = text.split(f"--{boundary}")
    assert chunks[-1].strip() == "--"
    human, report, returned = chunks[1:4]

    def split(part: str) -> tuple[dict[str, str], str]:
        head, _, content = part.lstrip("\n").partition("\n\n")
        head = re.sub(r"\n[ \t]+", " ", head)
        return dict(line.split(": ", 1) for line in head.split("\n")), content

    _, human_text = split(human)
    report_head, report_body = split(report)
    returned_head, returned_body = split(returned)
    groups = []
    for group in report_body.strip("\n").split("\n\n"):
        group = re.sub(r"\n[ \t]+", " ", group)
        groups.append(dict(line.split(": ", 1) for line in group.split("\n")))
    human_text = re.sub(r"\n {4}", " ", human_text)
    return Notice(headers, human_text, report_head["Content-Type"], groups[0], groups[1:],
                  returned_head, returned_body)


def header_block(message: bytes) -> list[bytes]:
    return message.split(b"\n\n", 1)[0].split(b"\n")


# ---- the requests at the next hop ------------------------------------------------------------


def test_dsn_requests_reach_the_next_hop_as_postfix_sends_them(
        stack: Callable[..., Stack]) -> None:
    s = stack(dsn=True)
    message = b"Subject: dsn-pass\nMessage-ID: <dsn-pass@bar.test>\n\nbar-tag: dsn-pass\n"
    s.send_both("-N", "success,failure", "-R", "hdrs", "-V", "bar+envid=1", "-f", SENDER,
                "x@far.test", "y@far.test", message=message)
    ours, theirs = s.by_mta(s.sink.wait_for(2, marker=b"bar-tag: dsn-pass"))
    assert dsn_params(ours.mail_args) == dsn_params(theirs.mail_args) == \
        ["ENVID=bar+2Benvid+3D1", "RET=HDRS"]
    assert [dsn_params(r) for r in ours.rcpt_args] == [dsn_params(r) for r in theirs.rcpt_args]
    assert ours.rcpt_args == ("<x@far.test> ORCPT=rfc822;x@far.test NOTIFY=SUCCESS,FAILURE",
                              "<y@far.test> ORCPT=rfc822;y@far.test NOTIFY=SUCCESS,FAILURE")
    # The sink offered DSN and took the request along: neither sends a notice of its own.
    s.relay.wait_log("removed")
    time.sleep(1.5)
    assert len(s.sink.dumps()) == 2
    assert "notification" not in s.relay.log()


def smtp_submit(port: int, sender: str, rcpts: list[tuple[str, list[str]]], message: bytes,
                mail_options: list[str] | None = None) -> None:
    """One SMTP transaction with the given MAIL and RCPT parameters."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.bar.test")
        code, reply = s.mail(sender, mail_options or [])
        assert code == 250, reply
        for rcpt, options in rcpts:
            code, reply = s.rcpt(rcpt, options)
            assert code == 250, reply
        code, reply = s.data(message)
        assert code == 250, reply


def test_dsn_over_smtp_passes_on_as_postfix_passes_it(stack: Callable[..., Stack]) -> None:
    """MAIL ... RET=HDRS ENVID=..., RCPT ... NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;...: the
    listener keeps them, the client passes them on (tests/golden/postfix-3.7/
    dsn-params-at-next-hop.txt)."""
    s = stack(dsn=True)
    message = b"Subject: bar dsn-pass\r\n\r\nbar-tag: dsn-pass\r\n"
    rcpts = [("x@far.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig+2Bx@far.test"]),
             ("y@far.test", ["NOTIFY=delay"]), ("z@far.test", [])]
    for port in (s.relay.port, s.postfix.port):
        smtp_submit(port, SENDER, rcpts, message, ["RET=HDRS", "ENVID=bar-envid+2B1"])
    ours, theirs = s.by_mta(s.sink.wait_for(2, marker=b"bar-tag: dsn-pass"))
    assert dsn_params(ours.mail_args) == dsn_params(theirs.mail_args) == \
        ["ENVID=bar-envid+2B1", "RET=HDRS"]
    assert [dsn_params(r) for r in ours.rcpt_args] == \
        [dsn_params(r) for r in theirs.rcpt_args] == [
            ["ORCPT=rfc822;orig+2Bx@far.test", "NOTIFY=SUCCESS,FAILURE"],
            ["ORCPT=rfc822;y@far.test", "NOTIFY=DELAY"],
            ["ORCPT=rfc822;z@far.test"]]


def test_relayed_notice_over_smtp_as_postfix(stack: Callable[..., Stack]) -> None:
    s = stack(dsn=False)
    message = (b"From: sender@bar.test\r\nSubject: smtp dsn-relayed\r\n\r\n"
               b"bar-tag: smtp-relayed\r\n")
    rcpts = [("w@nodsn.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;W+2Bw@NoDSN.test"]),
             ("v@nodsn.test", ["NOTIFY=FAILURE"])]
    for port in (s.relay.port, s.postfix.port):
        smtp_submit(port, SENDER, rcpts, message, ["ENVID=e+3D1"])
    notices = s.sink.wait_for(2, marker=b"Successful Mail Delivery Report")
    ours, theirs = (parse_notice(d.message) for d in s.by_mta(notices))
    assert ours.text == theirs.text
    assert ours.per_message["Original-Envelope-Id"] == \
        theirs.per_message["Original-Envelope-Id"] == "e=1"
    (w_ours,), (w_theirs,) = ours.per_recipient, theirs.per_recipient
    fields = ["Final-Recipient", "Original-Recipient", "Action", "Status", "Remote-MTA",
              "Diagnostic-Code"]
    assert [w_ours[f] for f in fields] == [w_theirs[f] for f in fields]
    assert w_ours["Original-Recipient"] == "rfc822;W+w@NoDSN.test"


UTF8_MESSAGE = ("From: Jörg <sender@bar.test>\r\nTo: zoë@hard.test\r\n"
                "Subject: Grüße\r\n\r\nbar-tag: utf8\r\n").encode()


def test_smtputf8_bounce_uses_the_global_types_as_postfix(
        shared: Path, relay_daemon: Callable[..., RelayDaemon]) -> None:
    """RFC 6533: a bounce of an SMTPUTF8 message carries message/global-delivery-status
    and message/global, from relay as from Postfix."""
    with (ThreadedPeer(PeerScript(smtputf8=True, rcpt=Reply(550, "5.1.1 no such user"))
                       ) as hard,
          ThreadedPeer(PeerScript(smtputf8=True)) as home):
        routes = f"inline:{{bar.test=smtp:[127.0.0.1]:{home.port}}}"
        relay = relay_daemon({"relayhost": f"[127.0.0.1]:{hard.port}",
                              "transport_maps": routes, "myhostname": "relay-bar.test"})
        postfix = PrivatePostfix(shared / "postfix", f"[127.0.0.1]:{hard.port}",
                                 {"myhostname": "relay-bar.test", "transport_maps": routes})
        try:
            for port in (relay.port, postfix.port):
                smtp_submit(port, SENDER, [("zoë@hard.test", [])], UTF8_MESSAGE,
                            ["SMTPUTF8", "BODY=8BITMIME"])
            end = time.monotonic() + 30
            while len(home.messages) < 2 and time.monotonic() < end:
                time.sleep(0.1)
        finally:
            postfix.stop()
        notices = {(b"X-Postfix-Queue-ID" in m.data): m for m in home.messages}
        assert set(notices) == {True, False}, [m.data[:300] for m in home.messages]
        ours, theirs = (parse_notice(notices[k].data) for k in (False, True))
        for n, received in ((ours, notices[False]), (theirs, notices[True])):
            assert n.report_type == "message/global-delivery-status"
            assert n.returned_head["Content-Type"] == "message/global"
            assert "SMTPUTF8" in received.mail_params
        fields = ["Final-Recipient", "Original-Recipient", "Action", "Status",
                  "Diagnostic-Code"]
        (z_ours,), (z_theirs,) = ours.per_recipient, theirs.per_recipient
        assert [z_ours[f] for f in fields] == [z_theirs[f] for f in fields]
        assert z_ours["Final-Recipient"] == "utf-8; zoë@hard.test"


# ---- the notices ---------------------------------------------------------------------------


def test_relayed_notice_as_postfix_sends_it(stack: Callable[..., Stack]) -> None:
    """NOTIFY=SUCCESS and a next hop without DSN: an "Action: relayed" notice from both
    (tests/golden/postfix-3.7/dsn-relayed-notice.txt is one of Postfix's)."""
    s = stack(dsn=False)
    message = (b"From: sender@bar.test\nTo: w@nodsn.test\nSubject: bar dsn-relayed\n"
               b"Message-ID: <dsn-relayed@bar.test>\n\nbar-tag: dsn-relayed\n")
    s.send_both("-N", "success", "-V", "bar-envid-2", "-f", SENDER, "w@nodsn.test",
                message=message)
    notices = s.sink.wait_for(2, marker=b"Successful Mail Delivery Report")
    ours, theirs = (parse_notice(d.message) for d in s.by_mta(notices))
    for n in (ours, theirs):
        assert n.headers["Subject"] == "Successful Mail Delivery Report"
        assert n.headers["To"] == SENDER
        assert n.report_type == "message/delivery-status"
        assert n.returned_head["Content-Type"] == "text/rfc822-headers"
        assert n.returned_head["Content-Description"] == "Message Headers"
        assert "bar-tag" not in n.returned
        assert re.search(r"<w@nodsn\.test>: delivery via 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: "
                         r"250 2\.0\.0 Ok", n.text), n.text
    # The human-readable part word for word: both spoke to the same sink.
    assert ours.text == theirs.text
    assert ours.per_message["Original-Envelope-Id"] == \
        theirs.per_message["Original-Envelope-Id"] == "bar-envid-2"
    assert list(ours.per_message)[:2] == list(theirs.per_message)[:2] == \
        ["Reporting-MTA", "Original-Envelope-Id"]
    (w_ours,), (w_theirs,) = ours.per_recipient, theirs.per_recipient
    fields = ["Final-Recipient", "Original-Recipient", "Action", "Status", "Remote-MTA",
              "Diagnostic-Code"]
    assert [w_ours[f] for f in fields] == [w_theirs[f] for f in fields]
    assert list(w_ours)[:6] == list(w_theirs)[:6] == fields
    assert w_ours["Action"] == "relayed"
    # The notice itself goes out as Postfix's does, to the same sink.
    assert "sender delivery status notification" in s.relay.log()


def test_delivered_notice_for_discard_as_postfix(
        shared: Path, relay_daemon: Callable[..., RelayDaemon]) -> None:
    sink = SmtpSink(shared / "sink")
    routes = "inline:{gone.test=discard:}"
    relay = relay_daemon({"relayhost": f"[127.0.0.1]:{sink.port}", "transport_maps": routes,
                          "myhostname": "relay-bar.test"})
    postfix = PrivatePostfix(shared / "postfix", f"[127.0.0.1]:{sink.port}",
                             {"myhostname": "relay-bar.test", "transport_maps": routes})
    try:
        message = b"Subject: discard\r\n\r\nbar-tag: discard\r\n"
        for port in (relay.port, postfix.port):
            smtp_submit(port, SENDER, [("a@gone.test", ["NOTIFY=SUCCESS"])], message)
        dumps = sink.wait_for(2, marker=b"Successful Mail Delivery Report")
    finally:
        postfix.stop()
        sink.stop()
    ours, theirs = (parse_notice(d.message) for d in Stack.by_mta(dumps))
    assert ours.text == theirs.text
    (a_ours,), (a_theirs,) = ours.per_recipient, theirs.per_recipient
    fields = ["Final-Recipient", "Original-Recipient", "Action", "Status"]
    assert [a_ours[f] for f in fields] == [a_theirs[f] for f in fields]
    assert a_ours["Action"] == "delivered"
    assert "Remote-MTA" not in a_ours and "Remote-MTA" not in a_theirs
    assert a_ours["Diagnostic-Code"] == \
        a_theirs["Diagnostic-Code"].replace("X-Postfix;", "X-Relay;")


def test_ret_hdrs_bounce_as_postfix_sends_it(stack: Callable[..., Stack]) -> None:
    """RET=HDRS and a 550: headers only (compare tests/golden/postfix-3.7/
    dsn-ret-hdrs-bounce.txt)."""
    s = stack(refuse_rcpt="550 5.1.1 bar-hard: no such user")
    assert s.home is not None
    message = (b"From: sender@bar.test\nTo: z@hard.test\nSubject: bar dsn-hdrs\n"
               b"Message-ID: <dsn-hdrs@bar.test>\n\nbar-tag: dsn-hdrs\n")
    s.send_both("-R", "hdrs", "-V", "hdrs-env", "-f", SENDER, "z@hard.test", message=message)
    notices = s.home.wait_for(2, marker=b"Undelivered Mail Returned to Sender")
    ours, theirs = (parse_notice(d.message) for d in s.by_mta(notices))
    for n in (ours, theirs):
        assert n.returned_head["Content-Type"] == "text/rfc822-headers"
        assert n.returned_head["Content-Description"] == "Undelivered Message Headers"
        assert "Subject: bar dsn-hdrs" in n.returned
        assert "bar-tag" not in n.returned
        assert n.per_message["Original-Envelope-Id"] == "hdrs-env"
    assert ours.text == theirs.text
    (z_ours,), (z_theirs,) = ours.per_recipient, theirs.per_recipient
    fields = ["Final-Recipient", "Original-Recipient", "Action", "Status", "Remote-MTA",
              "Diagnostic-Code"]
    assert [z_ours[f] for f in fields] == [z_theirs[f] for f in fields]
    assert z_ours["Diagnostic-Code"] == "smtp; 550 5.1.1 bar-hard: no such user"


def test_notify_never_and_delay_as_postfix(stack: Callable[..., Stack]) -> None:
    """NOTIFY=NEVER: no bounce from either; NOTIFY=DELAY only: none either."""
    s = stack(refuse_rcpt="550 5.1.1 no such user")
    assert s.home is not None
    message = b"Subject: quiet\n\nbar-tag: quiet\n"
    s.send_both("-N", "never", "-f", SENDER, "n@hard.test", message=message)
    s.send_both("-N", "delay", "-f", SENDER, "d@hard.test", message=message)
    s.send_both("-f", SENDER, "u@hard.test", message=message)  # the control: bounces
    notices = s.home.wait_for(2, marker=b"Undelivered Mail")
    time.sleep(1.5)
    notices = s.home.dumps()
    assert len(notices) == 2, [d.message[:300] for d in notices]
    for n in (parse_notice(d.message) for d in notices):
        assert [g["Final-Recipient"] for g in n.per_recipient] == ["rfc822; u@hard.test"]


# ---- long lines ------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["sendmail", "smtp"])
def test_long_lines_leave_as_postfix_sends_them(stack: Callable[..., Stack], via: str) -> None:
    """A 1,214-octet header, body lines of 1,500 and 5,000 octets and a dotted one, given
    to sendmail or over SMTP: sent by both broken with CRLF SPACE at 998
    (tests/golden/postfix-3.7/long-lines-at-next-hop.txt is Postfix's own), byte for byte
    the same."""
    s = stack()
    message = (b"From: a@bar.test\nTo: b@far.test\nSubject: long " + b"h" * 1200 + b"\n"
               b"Message-ID: <long-smtp@bar.test>\nDate: Wed,  2 Dec 2026 15:21:16 +0000\n\n"
               b"bar-tag: long-smtp\n" + b"A" * 1500 + b"\n"
               + b"0123456789" * 500 + b"\n." + b"d" * 1200 + b"\nEND-OF-MESSAGE\n")
    if via == "sendmail":
        s.send_both("-f", "a@bar.test", "b@far.test", message=message)
    else:
        for port in (s.relay.port, s.postfix.port):
            smtp_submit(port, "a@bar.test", [("b@far.test", [])],
                        message.replace(b"\n", b"\r\n"))
    ours, theirs = s.by_mta(s.sink.wait_for(2, marker=b"END-OF-MESSAGE"))

    def without_received(m: bytes) -> bytes:
        return re.sub(rb"^Received: .*\n(?:[ \t].*\n)*", b"", m, flags=re.MULTILINE)

    assert without_received(ours.message) == without_received(theirs.message)
    lines = ours.message.split(b"\n")
    assert max(len(line) for line in lines) == 998
    assert b" " + b"h" * 216 in lines  # the Subject's continuation
    assert "breaking line > 998 bytes with <CR><LF>SPACE" in s.relay.log()


# ---- postcat and sendmail ------------------------------------------------------------------


POSTCAT_DSN = ("named_attribute: envelope_id=", "named_attribute: ret_flags=", "sender: ",
               "named_attribute: notify_flags=", "named_attribute: dsn_orig_rcpt=",
               "original_recipient: ", "recipient: ")


def test_postcat_shows_the_dsn_records_as_postfix(shared: Path,
                                                  relay_daemon: Callable[..., RelayDaemon]
                                                  ) -> None:
    closed = free_port()
    postfix = PrivatePostfix(shared / "postfix", f"[127.0.0.1]:{closed}")
    try:
        relay = relay_daemon({"relayhost": f"[127.0.0.1]:{closed}"}, start=False)
        message = b"Subject: postcat\n\nbody\n"
        args = ("-N", "success,delay", "-R", "full", "-V", "env+2", "-f", SENDER,
                "v@far.test", "w@far.test")
        ours = relay.run_cmd("sendmail", *args, input=message)
        assert ours.returncode == 0, ours.stderr
        theirs = postfix.sendmail(*args, message=message)
        assert theirs.returncode == 0, theirs.stderr
        (queue_id,) = relay.queue_files("incoming")
        out = relay.run_cmd("postcat", "-q", queue_id).stdout.decode()
        end = time.monotonic() + 20
        while not postfix.queue_ids() and time.monotonic() < end:
            time.sleep(0.1)
        (their_id,) = postfix.queue_ids()
        reference = postfix.postcat(their_id)
    finally:
        postfix.stop()

    def dsn_lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith(POSTCAT_DSN)]

    assert dsn_lines(out) == dsn_lines(reference)
    assert dsn_lines(out) == [
        "named_attribute: envelope_id=env+2",
        "named_attribute: ret_flags=1",
        f"sender: {SENDER}",
        "named_attribute: notify_flags=10",
        "named_attribute: dsn_orig_rcpt=rfc822;v@far.test",
        "original_recipient: v@far.test",
        "recipient: v@far.test",
        "named_attribute: notify_flags=10",
        "named_attribute: dsn_orig_rcpt=rfc822;w@far.test",
        "original_recipient: w@far.test",
        "recipient: w@far.test",
    ]


@pytest.mark.parametrize("args", [
    ("-N", "bogus"),
    ("-N", "success,bogus"),
    ("-N", "never,success"),
    ("-R", "bogus"),
    ("-V", "x" * 101),
    ("-V", "ab"),
    ("-N", "Success Delay", "-R", "HDRS", "-V", "a b"),
])
def test_sendmail_dsn_options_warn_as_postfix(shared: Path,
                                              relay_daemon: Callable[..., RelayDaemon],
                                              args: tuple[str, ...]) -> None:
    postfix = PrivatePostfix(shared / "postfix", f"[127.0.0.1]:{free_port()}")
    try:
        relay = relay_daemon(start=False)
        message = b"Subject: s\n\nb\n"
        ours = relay.run_cmd("sendmail", *args, "-f", SENDER, "u@far.test", input=message)
        theirs = postfix.sendmail(*args, "-f", SENDER, "u@far.test", message=message)
    finally:
        postfix.stop()
    assert (ours.returncode, ours.stderr.decode()) == (theirs.returncode, theirs.stderr.decode())
    (queue_id,) = relay.queue_files("incoming")
    env = Spool(str(relay.queue_directory)).read("incoming", queue_id)
    if args[-1] == "a b":
        assert (env.dsn_envid, env.dsn_ret, env.recipients[0].dsn_notify) == \
            ("a b", "HDRS", "SUCCESS,DELAY")
    else:
        assert (env.dsn_envid, env.dsn_ret, env.recipients[0].dsn_notify) == ("", "", "")


# ---- crash safety --------------------------------------------------------------------------


# Recording the first recipient as sent (with the notice it is owed) while the second is
# pending, committing the success notice, and removing the finished message.
CRASH_STEPS = ["update.tmp_written", "update.before_rename", "update.renamed",
               "enqueue.before_rename", "enqueue.renamed", "enqueue.committed",
               "remove.envelope_gone"]


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_success_notice_survives_a_kill_at_every_step(
        relay_daemon: Callable[..., RelayDaemon], step: str) -> None:
    rcpts = ("bob@nodsn.test", "carol@nodsn.test")
    with ThreadedPeer(PeerScript(dsn=False)) as sink:
        d = relay_daemon({"transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}",
                          "default_destination_recipient_limit": "1",
                          "default_destination_concurrency_limit": "1",
                          "queue_run_delay": "1s", "minimal_backoff_time": "1s",
                          "maximal_backoff_time": "2s"}, start=False)
        # Queued before the daemon runs, so that the spool's first enqueue in the daemon
        # is the notice's own commit.
        spool = Spool(str(d.queue_directory))
        env = spool.enqueue(Envelope(
            queue_id="", sender=SENDER, arrival_time=time.time(),
            recipients=tuple(Recipient(r, dsn_notify="SUCCESS") for r in rcpts)),
            b"Subject: crash\r\n\r\nbody\r\n")
        d.env["RELAY_FAULT"] = f"{step}:exit"
        d.start(wait=False)  # it may well die before it listens
        assert d.proc is not None
        assert d.proc.wait(20) == 99, "the fault hook should have killed the daemon"
        d.env.pop("RELAY_FAULT")
        d.start()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            queued = [q for q in ("incoming", "active", "deferred") if d.queue_files(q)]
            if not queued:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        notices = [m for m in sink.messages if m.sender == ""]
        delivered = [r for m in sink.messages if m.sender for r in m.recipients]
        assert sorted(set(delivered)) == sorted(rcpts), d.log()
        # Every recipient is in a notice: none is lost; a kill may repeat one.
        reported = [r for m in notices
                    for r in re.findall(rb"Final-Recipient: rfc822; (\S+)", m.data)]
        assert sorted(set(reported)) == sorted(r.encode() for r in rcpts), d.log()
        assert all(reported.count(r) <= 2 for r in reported), reported
        assert env.queue_id in d.log()
