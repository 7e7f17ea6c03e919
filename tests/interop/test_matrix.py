"""The interoperability matrix: every scenario of issue 10 with each real MTA, both ways.

For each peer (Postfix 3.7, Exim 4.96, OpenSMTPD 6.8; see conftest.py for the world) and
each direction (``up``: the peer upstream of relay, the test -> peer -> relay -> sink;
``down``: relay delivering to the peer, the test -> relay -> peer's store), a message goes
in and the test checks at the far end that every recipient got it exactly once (after both
queues are empty) and that its bytes are those sent but for added Received: header fields
and long lines folded as Postfix folds them (`message_difference`).

Cells a peer cannot play (OpenSMTPD's server-side STARTTLS) are skipped with the reason.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop.conftest import DOWN, UP, World, default_variant, reported_by
from tests.support.mta import message_difference

pytestmark = pytest.mark.timeout(180)

DATE = "Wed, 02 Dec 2026 10:00:00 +0000"
PROTOCOL = re.compile(rb"\bwith (e?smtp[a-z]*)", re.IGNORECASE)
EXPECTED_PROTOCOL = {"plain": "ESMTP", "tls": "ESMTPS", "auth-plain": "ESMTPSA",
                     "auth-login": "ESMTPSA"}


def message(tag: str, sender: str, rcpts: list[str], body: bytes = b"",
            headers: bytes = b"", subject: str | None = None) -> bytes:
    """A complete message (From, To, Date, Message-ID: no MTA adds any), CRLF line ends."""
    head = (f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in rcpts[:3])}\r\n"
            f"Subject: {subject or tag}\r\nDate: {DATE}\r\n"
            f"Message-ID: <{tag}@client.test>\r\n").encode()
    return head + headers + b"\r\n" + (body or f"Hello from {tag}.\r\n".encode())


def check_once_and_intact(world: World, direction: str, rcpts: list[str],
                          sent: bytes, sender: str | None = None) -> dict[str, bytes]:
    """Wait for every recipient's copy (failing early if a notice reaches ``sender``),
    let the queues drain, then: exactly one copy each, equal to ``sent`` but for added
    Received: fields and folding."""
    world.wait_delivered(direction, rcpts, sender=sender)
    world.settle()
    copies = {}
    for rcpt in rcpts:
        got = world.delivered(direction, rcpt)
        assert len(got) == 1, f"{rcpt} got {len(got)} copies"
        difference = message_difference(sent, got[0])
        assert difference is None, f"{rcpt}: {difference}"
        copies[rcpt] = got[0]
    return copies


def hop_protocol(copy: bytes) -> str:
    """The protocol named by the newest Received: field (the last hop's)."""
    found = PROTOCOL.search(copy.split(b"\r\n\r\n", 1)[0])
    assert found, copy[:500]
    return found.group(1).decode().upper()


# -- plain, STARTTLS, STARTTLS + AUTH -----------------------------------------------------


@pytest.mark.parametrize("direction", [UP, DOWN])
@pytest.mark.parametrize("variant", ["plain", "tls", "auth-plain", "auth-login"])
def test_transport(world: World, direction: str,
                   variant: str) -> None:
    if variant not in world.variants(direction):
        role = "server" if direction == DOWN else "client"
        pytest.skip(f"{world.peer.name} cannot play {variant} as a {role} here "
                    "(see tests/support/mta.py)")
    tag = world.tag(f"tr-{variant}")
    sender, rcpts = world.sender(tag), world.rcpts(direction, tag, 2, variant)
    sent = message(tag, sender, rcpts)
    world.submit(direction, sender, rcpts, sent)
    copies = check_once_and_intact(world, direction, rcpts, sent, sender=sender)
    # The hop between relay and the peer used what the variant says.
    assert hop_protocol(copies[rcpts[0]]) == EXPECTED_PROTOCOL[variant]
    if variant.startswith("auth-"):
        mechanism = variant.split("-")[1].upper()
        if direction == UP:
            world.relay.wait_log(f"sasl_method={mechanism}, sasl_username=")
        else:
            world.peer.wait_log(world.peer.auth_log_pattern(mechanism))


# -- one message, 100 recipients, some refused and some deferred at the far end ---------


def notice_recipients(notice: bytes) -> dict[str, set[str]]:
    """{action: {final recipient}} from a notice's delivery-status part (RFC 3464, or
    RFC 6533's message/global-delivery-status with UTF-8 in it), fields in any order."""
    found: dict[str, set[str]] = {}
    text = notice.decode("utf-8", "replace").replace("\r\n", "\n")
    for group in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"(?im)^(final-recipient|action):[ \t]*(.*)$", group))
        fields = {k.lower(): v for k, v in fields.items()}
        if "final-recipient" in fields and "action" in fields:
            recipient = fields["final-recipient"].split(";", 1)[-1].strip()
            found.setdefault(fields["action"].strip().lower(), set()).add(recipient)
    return found


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_hundred_recipients_some_refused_some_deferred(world: World, direction: str) -> None:
    tag = world.tag("hundred")
    sender = world.sender(tag)
    rcpts = world.rcpts(direction, tag, 100)
    refused, deferred = rcpts[10:20], rcpts[20:30]
    accepted = [r for r in rcpts if r not in refused and r not in deferred]
    far_side = world.peer.set_recipient_access if direction == DOWN else world.sink_policy.set
    far_side(refuse=set(refused), defer=set(deferred))
    try:
        sent = message(tag, sender, rcpts)
        world.submit(direction, sender, rcpts, sent)
        world.wait_delivered(direction, accepted)
        # Only the refused ones bounce, in one notice from relay.
        notices = world.wait_notices(sender)
        assert notice_recipients(notices[0]) == {"failed": set(refused)}
        for rcpt in deferred:
            world.relay.wait_log(f"to=<{rcpt}>, relay=")
        assert "status=deferred" in world.relay.log()
        assert not any(world.delivered(direction, r) for r in refused + deferred)
    finally:
        far_side(refuse=set(refused), defer=set())
    # Now the far side takes the deferred ones: relay's retry delivers them.
    world.wait_delivered(direction, deferred)
    world.settle()
    for rcpt in accepted + deferred:
        got = world.delivered(direction, rcpt)
        assert len(got) == 1, f"{rcpt} got {len(got)} copies"
        assert message_difference(sent, got[0]) is None, message_difference(sent, got[0])
    assert not any(world.delivered(direction, r) for r in refused)
    assert len(world.peer.store.messages(sender)) == 1, "one notice, no delay warning"
    far_side(refuse=set(), defer=set())


# -- size, 8-bit, SMTPUTF8 ----------------------------------------------------------------


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_ten_megabytes(world: World, direction: str) -> None:
    tag = world.tag("big")
    sender, rcpts = world.sender(tag), world.rcpts(direction, tag)
    line = (base64.b64encode(bytes(range(256)) * 3)[:76] + b"\r\n")
    body = line * (10_000_000 // len(line))
    sent = message(tag, sender, rcpts, body=body,
                   headers=b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
                           b"Content-Transfer-Encoding: base64\r\n")
    assert len(sent) >= 10_000_000
    world.submit(direction, sender, rcpts, sent)
    check_once_and_intact(world, direction, rcpts, sent, sender=sender)


EIGHT_BIT_BODY = ("Grüße aus Köln, ½ € — ça marche.\r\n".encode()
                  + bytes(range(0x80, 0x100)).replace(b"\r", b"").replace(b"\n", b"") + b"\r\n")


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_eight_bit_body(world: World, direction: str) -> None:
    tag = world.tag("eightbit")
    sender, rcpts = world.sender(tag), world.rcpts(direction, tag)
    sent = message(tag, sender, rcpts, body=EIGHT_BIT_BODY,
                   headers=b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                           b"Content-Transfer-Encoding: 8bit\r\n")
    world.submit(direction, sender, rcpts, sent, mail_options=("BODY=8BITMIME",))
    check_once_and_intact(world, direction, rcpts, sent, sender=sender)
    if direction == UP:
        received = world.sink_messages(rcpts[0])[0]
        assert "BODY=8BITMIME" in [p.upper() for p in received.mail_params]


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_smtputf8_sender_and_recipient(world: World, direction: str) -> None:
    if not world.peer.smtputf8:
        pytest.skip(f"{world.peer.name} does not offer SMTPUTF8: see "
                    "test_smtputf8_to_a_peer_without_it")
    tag = world.tag("utf8")
    sender = f"jøsé-{tag}@sender.test"
    rcpts = [f"ünïcødé-{tag}@{default_variant(direction)}.{direction}.test"]
    sent = message(tag, sender, rcpts, body=EIGHT_BIT_BODY, subject=f"{tag} ✓ Grüße",
                   headers=b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                           b"Content-Transfer-Encoding: 8bit\r\n")
    world.submit(direction, sender, rcpts, sent, mail_options=("SMTPUTF8", "BODY=8BITMIME"))
    check_once_and_intact(world, direction, rcpts, sent, sender=sender)
    if direction == UP:
        received = world.sink_messages(rcpts[0])[0]
        assert received.sender == sender
        assert "SMTPUTF8" in [p.upper() for p in received.mail_params]


def test_smtputf8_to_a_peer_without_it(world: World) -> None:
    """Postfix bounces mail that needs SMTPUTF8 (a UTF-8 recipient) when the next hop does
    not offer it: 5.6.7 "SMTPUTF8 is required, but was not offered by host"."""
    if world.peer.smtputf8:
        pytest.skip(f"{world.peer.name} offers SMTPUTF8")
    tag = world.tag("noutf8")
    sender = world.sender(tag)
    rcpts = [f"ünïcødé-{tag}@plain.{DOWN}.test"]
    sent = message(tag, sender, rcpts)
    world.submit(DOWN, sender, rcpts, sent, mail_options=("SMTPUTF8",))
    notices = world.wait_notices(sender)
    assert notice_recipients(notices[0]) == {"failed": set(rcpts)}
    assert b"5.6.7" in notices[0]
    world.settle()
    assert world.delivered(DOWN, rcpts[0]) == []


# -- long lines, dot-stuffing -----------------------------------------------------------


def long_lines_message(tag: str, sender: str, rcpts: list[str]) -> bytes:
    header = b"X-Long: " + b"h" * (1200 - len(b"X-Long: ")) + b"\r\n"
    body = b"short line\r\n" + (b"0123456789" * 500) + b"\r\nlast line\r\n"
    return message(tag, sender, rcpts, body=body, headers=header)


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_long_body_line_and_header(world: World,
                                   direction: str) -> None:
    """Postfix folds such lines when it sends them (CRLF SPACE at 998 octets): from Postfix
    relay gets them folded; from OpenSMTPD and from a client as they are."""
    tag = world.tag("long")
    sender, rcpts = world.sender(tag), world.rcpts(direction, tag)
    sent = long_lines_message(tag, sender, rcpts)
    if direction == UP and world.peer.name == "exim":
        # Exim's smtp transport refuses to send lines over message_linelength_limit (998)
        # and bounces the message itself: relay never sees it.
        world.submit(direction, sender, rcpts, sent)
        notice = world.wait_notices(sender)[0]
        assert b"message has lines too long for transport" in notice
        world.settle()
        assert world.delivered(direction, rcpts[0]) == []
        return
    world.submit(direction, sender, rcpts, sent)
    check_once_and_intact(world, direction, rcpts, sent, sender=sender)


DOT_BODY = (b".\r\n..\r\n...\r\n.x\r\n..x\r\n x\r\n.\r\n.\r\n \r\n.\t\r\nend\r\n.")


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_dot_stuffing_over_smtp(world: World, direction: str) -> None:
    tag = world.tag("dots")
    sender, rcpts = world.sender(tag), world.rcpts(direction, tag)
    sent = message(tag, sender, rcpts, body=DOT_BODY + b"\r\n")
    world.submit(direction, sender, rcpts, sent)
    check_once_and_intact(world, direction, rcpts, sent, sender=sender)


def sendmail_content(raw: bytes, dot_ends_input: bool) -> bytes:
    """What Postfix's sendmail(1) makes of ``raw`` (LF line ends; the last line may lack
    its LF): CRLF line ends, and without -i a line of a lone dot ends the input.  Measured
    with a private Postfix 3.7 (see test_against_postfix.py)."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if dot_ends_input and b"." in lines:
        lines = lines[:lines.index(b".")]
    return b"".join(line + b"\r\n" for line in lines)


@pytest.mark.parametrize("direction", [UP, DOWN])
@pytest.mark.parametrize("options", [("-i",), ()], ids=["-i", "no-i"])
def test_dots_from_sendmail(world: World, direction: str, options: tuple[str, ...]) -> None:
    """A lone dot, two dots, and a dot as the last line without its LF, given to
    sendmail(1): relay's own sendmail on the way down, the peer's on the way up."""
    tag = world.tag("smdots")
    sender = world.sender(tag)
    head = message(tag, sender, [f"{tag}@x.test"], body=b"-").split(b"\r\n\r\n")[0]
    raw = head.replace(b"\r\n", b"\n") + b"\n\nline\n.\n..\n.x\nend\n."
    if direction == DOWN:
        rcpts = world.rcpts(DOWN, tag)
        sendmail = Path(sys.executable).parent / "sendmail"
        done = subprocess.run([str(sendmail), "-C", str(world.relay.config_dir), *options,
                               "-f", sender, "--", *rcpts], input=raw, capture_output=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        expected = sendmail_content(raw, "-i" not in options)
        check_once_and_intact(world, DOWN, rcpts, expected, sender=sender)
        return
    # Up: the peer's own sendmail, one copy kept by the peer, one sent through relay; the
    # two must be the same but for relay's Received: field.
    local, remote = f"{tag}-local@plain.{DOWN}.test", world.rcpts(UP, tag)[0]
    done = world.peer.sendmail(sender, [local, remote], raw, options)
    assert done.returncode == 0, done.stderr
    kept = world.peer.store.wait([local], mta=world.peer)[local][0]
    check_once_and_intact(world, UP, [remote], kept, sender=sender)


# -- DSN ----------------------------------------------------------------------------------

def dsn_submission(world: World, direction: str, tag: str, ret: str = "HDRS"
                   ) -> tuple[str, list[str], dict[str, tuple[str, ...]], tuple[str, ...]]:
    sender = world.sender(tag)
    rcpts = world.rcpts(direction, tag, 3)
    options = {
        rcpts[0]: ("NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;orig-{tag}@example.test"),
        rcpts[1]: ("NOTIFY=NEVER",),
        rcpts[2]: ("NOTIFY=FAILURE,DELAY",),
    }
    return sender, rcpts, options, (f"RET={ret}", f"ENVID=env-{tag}")


def submit_dsn(world: World, direction: str, sender: str, rcpts: list[str], content: bytes,
               mail_options: tuple[str, ...],
               rcpt_options: dict[str, tuple[str, ...]]) -> list[list[str]]:
    """One transaction, or one per recipient when OpenSMTPD is on either side: 6.8 carries
    NOTIFY flags from one RCPT to the next, as a client and as a server ("553 NOTIFY option
    NEVER cannot be combined with other options"), whoever sends them.  Returns each
    transaction's recipients."""
    transactions = [[rcpt] for rcpt in rcpts] if world.peer.name == "opensmtpd" else [rcpts]
    for group in transactions:
        world.submit(direction, sender, group, content, mail_options=mail_options,
                     rcpt_options=rcpt_options)
    return transactions


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_dsn_passed_on(world: World, direction: str) -> None:
    """RET, ENVID, NOTIFY and ORCPT reach the next hop, which offers DSN: the sink records
    them (up); the peer honours NOTIFY=SUCCESS with its own "delivered" notice that names
    the ENVID and the ORCPT (down).  Nobody sends another notice."""
    tag = world.tag("dsnpass")
    sender, rcpts, rcpt_options, mail_options = dsn_submission(world, direction, tag)
    sent = message(tag, sender, rcpts)
    submit_dsn(world, direction, sender, rcpts, sent, mail_options, rcpt_options)
    check_once_and_intact(world, direction, rcpts, sent)
    if direction == UP:
        for rcpt in rcpts:
            received = world.sink_messages(rcpt)[0]
            params = {p.upper() for p in received.mail_params}
            assert {"RET=HDRS", f"ENVID=ENV-{tag.upper()}"} <= params, params
        commands = [c.line for s in world.sink.sessions for c in s.commands]
        for rcpt, options in rcpt_options.items():
            line = next(c for c in commands if c.upper().startswith("RCPT TO:")
                        and f"<{rcpt}>" in c)
            for option in options:
                assert option.upper() in line.upper(), (option, line)
        assert world.notices(sender) == [], "the sink takes DSN: nobody owes a notice"
    else:
        notice = world.wait_notices(sender)[0]
        assert reported_by(notice) == world.peer.hostname
        assert notice_recipients(notice) == {"delivered": {rcpts[0]}}
        # OpenSMTPD 6.8 writes neither field into its notices (only Final-Recipient); the
        # Postfix and Exim cells show that relay passes both on.
        if world.peer.name != "opensmtpd":
            assert f"Original-Envelope-Id: env-{tag}".lower().encode() in notice.lower()
            assert f"Original-Recipient: rfc822;orig-{tag}@example.test".encode() in notice
        world.settle()
        assert len(world.notices(sender)) == 1


@pytest.mark.parametrize("ret", ["HDRS", "FULL"])
@pytest.mark.parametrize("direction", [UP, DOWN])
def test_dsn_honoured_in_relays_bounce(world: World,
                                       direction: str, ret: str) -> None:
    """The far end refuses all three recipients: relay's bounce names only those whose
    NOTIFY asks for failures, carries the ENVID and ORCPT, and returns the headers only
    (RET=HDRS, a text/rfc822-headers part) or the whole message (RET=FULL)."""
    tag = world.tag(f"dsnbounce{ret.lower()}")
    sender, rcpts, rcpt_options, mail_options = dsn_submission(world, direction, tag, ret)
    far_side = world.peer.set_recipient_access if direction == DOWN else world.sink_policy.set
    far_side(refuse=set(rcpts))
    try:
        body = f"The body of {tag}, which RET=HDRS leaves out.\r\n".encode()
        transactions = submit_dsn(world, direction, sender, rcpts,
                                  message(tag, sender, rcpts, body=body),
                                  mail_options, rcpt_options)
        # A bounce for each transaction with a recipient that asks for one.  Waiting for
        # the first and then for both queues to look empty once missed the second with
        # OpenSMTPD's one transaction a recipient (in a clean-clone CI run).
        owed = sum(any(o.startswith("NOTIFY=") and "FAILURE" in o
                       for r in group for o in rcpt_options[r]) for group in transactions)
        world.wait_notices(sender, count=owed, reporter="relay.test")
        world.settle()
    finally:
        far_side()
    notices = world.notices(sender)
    assert {reported_by(n) for n in notices} == {"relay.test"}, "only relay's bounce"
    failed: dict[str, set[str]] = {}
    for notice in notices:
        for action, who in notice_recipients(notice).items():
            failed.setdefault(action, set()).update(who)
        assert f"Original-Envelope-Id: env-{tag}".encode() in notice
        if ret == "HDRS":
            assert b"Content-Type: text/rfc822-headers" in notice
            assert body not in notice
        else:
            assert b"Content-Type: message/rfc822" in notice
            assert body in notice
    assert failed == {"failed": {rcpts[0], rcpts[2]}}
    assert any(f"Original-Recipient: rfc822;orig-{tag}@example.test".encode() in n
               for n in notices)


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_dsn_delay_notice(world: World,
                          direction: str) -> None:
    """With delay_warning_time reached, relay warns only the recipients whose NOTIFY
    includes DELAY (NOTIFY=FAILURE,DELAY), never NOTIFY=NEVER or SUCCESS,FAILURE ones."""
    tag = world.tag("dsndelay")
    sender, rcpts, rcpt_options, mail_options = dsn_submission(world, direction, tag)
    far_side = world.peer.set_recipient_access if direction == DOWN else world.sink_policy.set
    world.relay.write_config(delay_warning_time="1s")
    world.relay.hup()
    far_side(defer=set(rcpts))
    try:
        sent = message(tag, sender, rcpts)
        submit_dsn(world, direction, sender, rcpts, sent, mail_options, rcpt_options)
        notice = world.wait_notices(sender, reporter="relay.test")[0]
    finally:
        far_side()
        world.relay.write_config(delay_warning_time="0h")
        world.relay.hup()
    check_once_and_intact(world, direction, rcpts, sent)
    notices = [n for n in world.notices(sender) if reported_by(n) == "relay.test"]
    assert len(notices) == 1, "relay warns once"
    # The far end took NOTIFY=SUCCESS for rcpts[0] from relay (DSN passed on): once it
    # delivers, it may say so itself; it says nothing else.
    theirs = [n for n in world.notices(sender) if reported_by(n) != "relay.test"]
    assert direction == DOWN or theirs == []
    assert all(notice_recipients(n) == {"delivered": {rcpts[0]}} for n in theirs), theirs
    assert notice_recipients(notice) == {"delayed": {rcpts[2]}}
    assert f"Original-Envelope-Id: env-{tag}".encode() in notice
