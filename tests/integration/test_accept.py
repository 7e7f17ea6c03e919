"""Accepting mail durably: ``relay serve`` as a subprocess, spoken to over real sockets.

Covers the promises of the listener (relay.smtpd) as a client sees them: the EHLO
keywords, ``250 ... queued as ID`` only with the message in the spool byte for byte,
relay control, limits and bad addresses (with nothing partial left behind and the
session still usable), the end-of-DATA rule and SMTP smuggling in every
smtpd_forbid_bare_newline mode, disk-full and write errors, smtpd_timeout, the
connection count limit and the maillog lines.

Delivery is held off in every daemon here: the next hop refuses connections and the
backoff is an hour, so an accepted message stays in incoming/, active/ or deferred/
where the test can read it.  Daemons are shared per configuration within this module
(see ``relay_for``) to keep the run short; each test compares the spool before and
after itself rather than assuming it is empty.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Self

import pytest

from spool import Spool
from spool.envelope import Envelope, RcptState
from spool.errors import CorruptEntry, EntryGone
from tests.support.daemon import RelayDaemon

pytestmark = pytest.mark.timeout(60)

# The next hop refuses connections and nothing retries for an hour: accepted mail stays.
HOLD_DELIVERY = {
    "transport_maps": "inline:{ * = smtp:[127.0.0.1]:1 }",
    "minimal_backoff_time": "1h",
    "maximal_backoff_time": "1h",
    "queue_run_delay": "1h",
}
BASE = {**HOLD_DELIVERY, "message_size_limit": "2000", "smtpd_recipient_limit": "3"}
ENVELOPE_QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")

SHORT_ID = re.compile(r"^[0-9A-F]{11}$")
# Postfix's long queue ID: 6 + 4 base-52 digits (no vowels), "z", then base-51 digits.
_B52 = "0-9BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"
_B51 = "0-9BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxy"
LONG_ID = re.compile(rf"^[{_B52}]{{10}}z[{_B51}]+$")
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\S+)$")
STAMP = r"[A-Z][a-z]{2} [ 1-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-6][0-9] \S+"


# ---- a raw SMTP client ------------------------------------------------------------


class Client:
    """A blocking SMTP client on a raw socket, so tests control every byte sent."""

    def __init__(self, port: int, source: str | None = None, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout,
            source_address=(source, 0) if source else None,
        )
        self.buf = b""
        self.banner = self.reply()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> str:
        """One (possibly multi-line) reply, lines joined with \\n."""
        lines = [self.line()]
        while len(lines[-1]) > 3 and lines[-1][3:4] == b"-":
            lines.append(self.line())
        return "\n".join(x.decode("utf-8", "replace") for x in lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, text: str | bytes) -> str:
        raw = text.encode() if isinstance(text, str) else text
        self.send(raw + b"\r\n")
        return self.reply()

    def quiet(self, wait: float = 0.3) -> bool:
        """True if the server sends nothing more within ``wait`` seconds."""
        if self.buf:
            return False
        self.sock.settimeout(wait)
        try:
            return not self.sock.recv(65536, socket.MSG_PEEK)  # b"" = closed, also quiet
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(5.0)

    def closed(self, wait: float = 3.0) -> bool:
        """True once the server has closed the connection (EOF or reset)."""
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def data(self, content: bytes) -> str:
        """DATA with ``content`` dot-stuffed and terminated; returns the final reply."""
        reply = self.cmd("DATA")
        assert reply.startswith("354"), reply
        self.send(stuff(content) + b".\r\n")
        return self.reply()

    def mail(self, sender: str, recipients: list[str], content: bytes) -> str:
        assert self.cmd(f"MAIL FROM:<{sender}>").startswith("250")
        for rcpt in recipients:
            reply = self.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.startswith("250"), reply
        return self.data(content)


def stuff(content: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency for CRLF-terminated content."""
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return b"".join(b"." + ln if ln.startswith(b".") else ln
                    for ln in content.splitlines(keepends=True))


def queue_id_of(reply: str) -> str:
    m = QUEUED.match(reply)
    assert m, reply
    return m.group(1)


# ---- the spool as the test sees it ---------------------------------------------------


def spool_snapshot(d: RelayDaemon) -> tuple[set[str], set[str], list[str]]:
    """(queue IDs with an envelope, data files, tmp files)."""
    envelopes = {name for q in ENVELOPE_QUEUES for name in d.queue_files(q)}
    return envelopes, set(d.queue_files("data")), d.queue_files("tmp")


def assert_consistent(d: RelayDaemon, timeout: float = 5.0) -> set[str]:
    """No partial message: every data file has an envelope and vice versa, tmp/ is empty.

    The qmgr rewrites envelopes through tmp/ while it defers a message, so a tmp file
    may be seen for a moment; only one that stays is a leftover.
    """
    end = time.monotonic() + timeout
    while True:
        envelopes, data, tmp = spool_snapshot(d)
        if (envelopes == data and not tmp) or time.monotonic() > end:
            break
        time.sleep(0.02)
    assert envelopes == data, f"envelopes {envelopes} vs data {data}"
    assert tmp == [], tmp
    return envelopes


def find_envelope(d: RelayDaemon, queue_id: str, timeout: float = 5.0) -> Envelope:
    """The envelope in whichever queue it is now (the qmgr may be moving it)."""
    spool = Spool(str(d.queue_directory), create=False)
    end = time.monotonic() + timeout
    while True:
        for queue in ENVELOPE_QUEUES:
            try:
                return spool.read(queue, queue_id)
            except (EntryGone, CorruptEntry):
                continue
        if time.monotonic() > end:
            raise AssertionError(f"{queue_id} not in any queue: {spool_snapshot(d)}")
        time.sleep(0.02)


def content_of(d: RelayDaemon, queue_id: str) -> bytes:
    return Spool(str(d.queue_directory), create=False).read_content(queue_id)


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """(the Received: header we added, with its continuation lines; the rest)."""
    assert stored.startswith(b"Received: "), stored[:80]
    lines = stored.splitlines(keepends=True)
    n = 1
    while n < len(lines) and lines[n][:1] in (b" ", b"\t"):
        n += 1
    return b"".join(lines[:n]), b"".join(lines[n:])


def listener_pids(d: RelayDaemon) -> list[int]:
    return d.listener_pids()


def wait_idle(d: RelayDaemon, address: str = "127.0.0.1", timeout: float = 5.0) -> None:
    """Wait until the daemon has logged a disconnect for every connect from ``address``."""
    conn = re.compile(rf"(?<!dis)connect from \S+\[{re.escape(address)}\]")
    disc = re.compile(rf"disconnect from \S+\[{re.escape(address)}\]")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        log = d.log()
        if len(conn.findall(log)) == len(disc.findall(log)):
            return
        time.sleep(0.02)
    raise AssertionError(f"sessions from {address} still open:\n{d.log()[-2000:]}")


# ---- daemons, shared per configuration -------------------------------------------------


@pytest.fixture(scope="module")
def relay_for(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RelayDaemon]]:
    """``relay_for(env=None, **params)``: a running daemon with BASE + params, started once
    per distinct configuration and stopped at the end of the module."""
    started: dict[tuple[tuple[str, str], ...], RelayDaemon] = {}

    def get(env: dict[str, str] | None = None, **params: str) -> RelayDaemon:
        key = tuple(sorted({**params, **{f"ENV:{k}": v for k, v in (env or {}).items()}}.items()))
        if key not in started:
            base = tmp_path_factory.mktemp("relay")
            started[key] = RelayDaemon(base, {**BASE, **params}, env).start()
        d = started[key]
        assert d.proc is not None and d.proc.poll() is None, d.stderr()
        return d

    yield get
    for d in started.values():
        d.stop()


# ---- EHLO and a message queued -------------------------------------------------------


def test_ehlo_advertises_the_extensions(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for()
    with Client(d.port) as c:
        assert c.banner.startswith("220 relay.test ESMTP")
        reply = c.cmd("EHLO client.example")
        lines = reply.split("\n")
        assert all(ln.startswith("250-") for ln in lines[:-1]) and lines[-1].startswith("250 ")
        keywords = {ln[4:] for ln in lines[1:]}
        assert {"SIZE 2000", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES",
                "SMTPUTF8"} <= keywords, keywords
        assert c.cmd("QUIT").startswith("221")


CONTENT = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"Message-ID: <accept-1@example.org>\r\n"
    b"\r\n"
    b"plain line with trailing space \r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"  # a lone dot inside the body, stuffed on the wire
    b"..two dots\r\n"
    b"\r\n"
    + "eight bit: caf\u00e9 \u00fcber \u2603\r\n".encode()
    + b"\tTab-led line\r\n"
    + b"x" * 900 + b"\r\n"
    + b"last line\r\n"
)


def test_message_is_in_the_spool_byte_for_byte(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for()
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        t0 = time.time()
        assert c.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME").startswith("250 2.1.0")
        assert c.cmd("RCPT TO:<bob@example.net>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<carol@example.com>").startswith("250 2.1.5")
        reply = c.data(CONTENT)
        t1 = time.time()
        c.cmd("QUIT")
    queue_id = queue_id_of(reply)
    assert SHORT_ID.match(queue_id), queue_id

    env = find_envelope(d, queue_id)
    stored = content_of(d, queue_id)
    received, rest = split_received(stored)
    assert rest == CONTENT
    assert stored.count(b"Received:") == 1
    assert b"(localhost [127.0.0.1])" in received and queue_id.encode() in received
    assert env.queue_id == queue_id
    assert env.sender == "alice@example.org"
    assert [r.address for r in env.recipients] == ["bob@example.net", "carol@example.com"]
    assert all(r.state is RcptState.PENDING for r in env.recipients)
    assert t0 - 1 <= env.arrival_time <= t1 + 1
    assert (env.client_name, env.client_address) == ("localhost", "127.0.0.1")
    assert env.helo_name == "client.example"
    assert env.size == len(stored)
    assert env.message_id == "<accept-1@example.org>"
    assert queue_id in assert_consistent(d)


def test_content_without_final_crlf_gets_one(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for()
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send(b"Subject: x\r\n\r\nno newline at the end")  # the client's problem, not ours
        c.send(b"\r\n.\r\n")
        queue_id = queue_id_of(c.reply())
    assert split_received(content_of(d, queue_id))[1] == b"Subject: x\r\n\r\nno newline at the end\r\n"


def test_null_sender_is_accepted(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for()
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<>").startswith("250 2.1.0")
        assert c.cmd("RCPT TO:<bob@example.net>").startswith("250 2.1.5")
        queue_id = queue_id_of(c.data(b"Subject: bounce\r\n\r\nbody\r\n"))
    env = find_envelope(d, queue_id)
    assert env.sender == ""
    assert [r.address for r in env.recipients] == ["bob@example.net"]


def test_long_queue_ids_and_log_to_stderr_with_syslog_name(
    relay_for: Callable[..., RelayDaemon],
) -> None:
    d = relay_for(enable_long_queue_ids="yes", syslog_name="postfix", maillog_file="")
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        queue_id = queue_id_of(c.mail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n"))
        c.cmd("QUIT")
    assert LONG_ID.match(queue_id), queue_id
    assert find_envelope(d, queue_id).queue_id == queue_id
    assert content_of(d, queue_id).endswith(b"\r\n\r\nx\r\n")
    assert not d.maillog.exists()
    end = time.monotonic() + 5
    # The queue manager is a process of its own (as Postfix's qmgr): another PID.
    while not re.search(rf"postfix/qmgr\[\d+\]: {queue_id}: from=<a@example.org>", d.stderr()):
        assert time.monotonic() < end, d.stderr()
        time.sleep(0.05)
    err = d.stderr()
    found = re.search(rf"^{STAMP} postfix/smtpd\[(\d+)\]: {queue_id}: client=localhost", err,
                      re.MULTILINE)
    assert found and int(found.group(1)) in listener_pids(d), err
    pid = found.group(1)
    assert re.search(rf"^{STAMP} postfix/smtpd\[{pid}\]: connect from localhost\[127\.0\.0\.1\]$",
                     err, re.MULTILINE), err
    assert "relay/" not in err


# ---- the maillog -----------------------------------------------------------------------


def test_maillog_lines(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for()
    wait_idle(d)
    offset = len(d.log())
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        queue_id = queue_id_of(c.mail("alice@example.org", ["bob@example.net"], CONTENT))
        assert c.cmd("QUIT").startswith("221")
    env = find_envelope(d, queue_id)
    d.wait_log(f"{queue_id}: from=<alice@example.org>")
    wait_idle(d)
    lines = d.log()[offset:].splitlines()
    # The session's lines carry the PID of the process that accepted it (the daemon's
    # own or a listener worker's, as Postfix's smtpd processes are not its master).
    pid = next(m.group(1) for ln in lines
               if (m := re.search(rf"relay/smtpd\[(\d+)\]: {queue_id}: client=", ln)))
    assert int(pid) in listener_pids(d)
    expected = [
        rf"{STAMP} relay/smtpd\[{pid}\]: connect from localhost\[127\.0\.0\.1\]",
        rf"{STAMP} relay/smtpd\[{pid}\]: {queue_id}: client=localhost\[127\.0\.0\.1\]",
        rf"{STAMP} relay/cleanup\[{pid}\]: {queue_id}: message-id=<accept-1@example\.org>",
        (rf"{STAMP} relay/qmgr\[(?!{pid}\])\d+\]: {queue_id}: from=<alice@example\.org>, "
         rf"size={env.size}, nrcpt=1 \(queue active\)"),
        (rf"{STAMP} relay/smtpd\[{pid}\]: disconnect from localhost\[127\.0\.0\.1\] "
         r"ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"),
    ]
    found = []
    for pattern in expected:
        hits = [i for i, ln in enumerate(lines) if re.fullmatch(pattern, ln)]
        assert hits, f"no line matches {pattern!r} in:\n" + "\n".join(lines)
        found.append(hits[0])
    # connect, client= and message-id= come in the order the session makes them.
    assert found[0] < found[1] < found[2]


# ---- relay control -------------------------------------------------------------------------


def test_relay_control_for_a_client_outside_mynetworks(
    relay_for: Callable[..., RelayDaemon],
) -> None:
    d = relay_for(mynetworks="127.0.0.2/32", relay_domains="example.com")
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<x@sender.example>").startswith("250")
        assert c.cmd("RCPT TO:<a@example.com>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<a@sub.example.com>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<a@other.org>") == "554 5.7.1 <a@other.org>: Relay access denied"
        # Routing tricks through a relay domain are not relayed for strangers.
        assert c.cmd("RCPT TO:<a%other.org@example.com>").startswith("554 5.7.1")
        assert c.cmd("RCPT TO:<a@notexample.com>").startswith("554 5.7.1")
        queue_id = queue_id_of(c.data(b"Subject: relay\r\n\r\nbody\r\n"))
    env = find_envelope(d, queue_id)
    assert [r.address for r in env.recipients] == ["a@example.com", "a@sub.example.com"]
    log = d.wait_log("to=<a@other.org>")
    assert re.search(
        r"relay/smtpd\[\d+\]: NOQUEUE: reject: RCPT from localhost\[127\.0\.0\.1\]: "
        r"554 5\.7\.1 <a@other\.org>: Relay access denied; from=<x@sender\.example> "
        r"to=<a@other\.org> proto=ESMTP helo=<client\.example>$", log, re.MULTILINE), log


def test_relay_from_mynetworks_to_any_domain(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for()  # default mynetworks: 127.0.0.0/8
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<x@sender.example>")
        assert c.cmd("RCPT TO:<a@other.org>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<b@yet.another.example>").startswith("250 2.1.5")
        queue_id_of(c.data(b"Subject: relay\r\n\r\nbody\r\n"))


def test_relay_control_by_client_address(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for(mynetworks="127.0.0.1/32")
    try:
        outsider = Client(d.port, source="127.0.0.3")
    except OSError as exc:
        pytest.skip(f"cannot bind a client socket to 127.0.0.3: {exc}")
    with outsider as c:
        c.cmd("EHLO outsider.example")
        c.cmd("MAIL FROM:<x@sender.example>")
        assert c.cmd("RCPT TO:<a@other.org>") == "554 5.7.1 <a@other.org>: Relay access denied"
        assert c.cmd("RCPT TO:<b@other.org>").startswith("554 5.7.1")
    d.wait_log("NOQUEUE: reject: RCPT from localhost[127.0.0.3]: 554 5.7.1 <a@other.org>")
    with Client(d.port) as c:  # 127.0.0.1 is in mynetworks
        c.cmd("EHLO insider.example")
        c.cmd("MAIL FROM:<x@sender.example>")
        assert c.cmd("RCPT TO:<a@other.org>").startswith("250 2.1.5")


# ---- bad input: refused, nothing partial, session still usable -----------------------------


def still_usable(c: Client, d: RelayDaemon) -> str:
    """After a refusal: RSET, then a whole transaction in the same session must succeed."""
    assert c.cmd("RSET").startswith("250")
    queue_id = queue_id_of(c.mail("after@example.org", ["ok@example.net"],
                                  b"Subject: after\r\n\r\nstill usable\r\n"))
    assert find_envelope(d, queue_id).sender == "after@example.org"
    return queue_id


def test_declared_size_over_the_limit(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for()
    before = assert_consistent(d)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<a@b.example> SIZE=2001") == \
            "552 5.3.4 Message size exceeds fixed limit"
        assert c.cmd("MAIL FROM:<a@b.example> SIZE=1500").startswith("250 2.1.0")
        queue_id = still_usable(c, d)
    assert assert_consistent(d) - before == {queue_id}


def test_body_over_the_limit(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for()
    before = assert_consistent(d)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@b.example>")
        c.cmd("RCPT TO:<c@d.example>")
        big = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 30  # 2416 bytes
        assert c.data(big) == "552 5.3.4 Message size exceeds fixed limit"
        assert assert_consistent(d) == before
        queue_id = still_usable(c, d)
    assert assert_consistent(d) - before == {queue_id}


def test_too_many_recipients(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for()
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@b.example>")
        for n in range(3):
            assert c.cmd(f"RCPT TO:<r{n}@d.example>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<r3@d.example>") == "452 4.5.3 Error: too many recipients"
        # The transaction goes on with the recipients that were accepted.
        queue_id = queue_id_of(c.data(b"Subject: many\r\n\r\nbody\r\n"))
        still_usable(c, d)
    env = find_envelope(d, queue_id)
    assert [r.address for r in env.recipients] == ["r0@d.example", "r1@d.example", "r2@d.example"]


BAD_ADDRESSES = [
    b"<a@@b.example>",
    b"<a@b..example>",
    b"<" + b"l" * 65 + b"@b.example>",
    b"<a\x01b@c.example>",
    b"<a<b@c.example>",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES, ids=["double-at", "double-dot", "long-local",
                                                       "control-char", "nested-angle"])
def test_bad_address_syntax(relay_for: Callable[..., RelayDaemon], address: bytes) -> None:
    d = relay_for()
    before = assert_consistent(d)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        reply = c.cmd(b"MAIL FROM:" + address)
        assert reply.startswith("501 5.1.7 Bad sender address syntax"), reply
        assert c.cmd("MAIL FROM:<a@b.example>").startswith("250 2.1.0")
        reply = c.cmd(b"RCPT TO:" + address)
        assert reply.startswith("501 5.1.3"), reply
        assert c.cmd("RCPT TO:<good@d.example>").startswith("250 2.1.5")
        queue_id = queue_id_of(c.data(b"Subject: x\r\n\r\nx\r\n"))
        assert [r.address for r in find_envelope(d, queue_id).recipients] == ["good@d.example"]
        still_usable(c, d)
    assert len(assert_consistent(d) - before) == 2


# ---- end of DATA, bare newlines and SMTP smuggling -------------------------------------------

SMUGGLED = (b"MAIL FROM:<evil@evil.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
            b"From: evil@evil.example\r\nSubject: smuggled\r\n\r\nevil\r\n")
SEQUENCES = {"lf-dot-lf": b"\n.\n", "cr-dot-cr": b"\r.\r", "lf-dot-crlf": b"\n.\r\n",
             "crlf-dot-lf": b"\r\n.\n"}


# Postfix exempts the clients in mynetworks (smtpd_forbid_bare_newline_exclusions); these
# tests talk from loopback, so they clear the exclusions to see the rule at work.
ENFORCED = {"smtpd_forbid_bare_newline_exclusions": ""}


@pytest.mark.parametrize("mode", ["normalize", "yes", "reject"])
@pytest.mark.parametrize("seq", list(SEQUENCES.values()), ids=list(SEQUENCES))
def test_smuggling_never_makes_two_messages(
    relay_for: Callable[..., RelayDaemon], mode: str, seq: bytes,
) -> None:
    d = relay_for(smtpd_forbid_bare_newline=mode, **ENFORCED)
    before = assert_consistent(d)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<alice@example.org>")
        c.cmd("RCPT TO:<bob@example.net>")
        assert c.cmd("DATA").startswith("354")
        c.send(b"Subject: innocent\r\n\r\nbody" + seq + SMUGGLED + b".\r\n")
        reply = c.reply()
        if mode == "reject" and b"\n" in seq.replace(b"\r\n", b""):
            assert reply == "550 5.5.2 Error: bare <LF> received"
            assert c.quiet(), "the server answered the smuggled commands"
            assert c.cmd("QUIT").startswith("221")
            assert assert_consistent(d) == before
            return
        queue_id = queue_id_of(reply)
        assert c.quiet(), "the server answered the smuggled commands"
        assert c.cmd("QUIT").startswith("221")
    new = assert_consistent(d) - before
    assert new == {queue_id}
    stored = split_received(content_of(d, queue_id))[1]
    assert stored.startswith(b"Subject: innocent\r\n\r\nbody")
    assert b"Subject: smuggled" in stored  # the would-be second message stayed body text
    assert find_envelope(d, queue_id).sender == "alice@example.org"


@pytest.mark.parametrize("exclusions", ["", "$mynetworks"], ids=["no", "excluded-client"])
def test_lone_dot_after_bare_lf_ends_data_without_the_rule(
    relay_for: Callable[..., RelayDaemon], exclusions: str,
) -> None:
    """With smtpd_forbid_bare_newline = no, or for a client it excludes (by default the
    ones in mynetworks), any lone dot ends the data, as in Postfix 3.7: what follows is
    commands.  The stored lines end in CR LF all the same."""
    mode = "no" if not exclusions else "normalize"
    d = relay_for(smtpd_forbid_bare_newline=mode,
                  smtpd_forbid_bare_newline_exclusions=exclusions)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<alice@example.org>")
        c.cmd("RCPT TO:<bob@example.net>")
        assert c.cmd("DATA").startswith("354")
        c.send(b"Subject: one\r\n\r\nbody\n.\nNOOP\r\n")
        first = queue_id_of(c.reply())
        assert c.reply() == "250 2.0.0 Ok"
    assert split_received(content_of(d, first))[1] == b"Subject: one\r\n\r\nbody\r\n"


@pytest.mark.parametrize("body,stored", [
    (b"x\n..y\r\n.\r\n", b"x\r\n.y\r\n"),  # the stuffing dot goes after a bare LF too
    (b"x\n.\r\nafter\r\n.\r\n", b"x\r\nafter\r\n"),  # a lone dot after a bare LF: dropped
    (b"x\r\n.\nafter\r\n.\r\n", b"x\r\nafter\r\n"),  # a lone dot ending in a bare LF: dropped
    (b"x\n.\nafter\r\n.\r\n", b"x\r\nafter\r\n"),
], ids=["stuffed", "dot-after-lf", "dot-lf", "lf-dot-lf"])
def test_dots_and_bare_lf_as_postfix(relay_for: Callable[..., RelayDaemon], body: bytes,
                                     stored: bytes) -> None:
    """smtpd_forbid_bare_newline = normalize, measured against Postfix 3.7.11: only CR LF .
    CR LF ends the data, and a lone dot on or after a bare-LF line is neither an end nor
    content."""
    d = relay_for(**ENFORCED)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send(b"Subject: dots\r\n\r\n" + body)
        queue_id = queue_id_of(c.reply())
    assert split_received(content_of(d, queue_id))[1] == b"Subject: dots\r\n\r\n" + stored


@pytest.mark.parametrize("mode", ["normalize", "yes", "no"])
def test_bare_lf_in_content(relay_for: Callable[..., RelayDaemon], mode: str) -> None:
    d = relay_for(smtpd_forbid_bare_newline=mode, **ENFORCED)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send(b"Subject: lf\r\n\r\none\ntwo\r\nthree\r\n.\r\n")
        queue_id = queue_id_of(c.reply())
    assert split_received(content_of(d, queue_id))[1] == \
        b"Subject: lf\r\n\r\none\r\ntwo\r\nthree\r\n"


@pytest.mark.parametrize("code", [550, 521])
def test_bare_lf_rejected(relay_for: Callable[..., RelayDaemon], code: int) -> None:
    d = relay_for(smtpd_forbid_bare_newline="reject",
                  smtpd_forbid_bare_newline_reject_code=str(code), **ENFORCED)
    before = assert_consistent(d)
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send(b"Subject: lf\r\n\r\none\ntwo\r\n.\r\n")
        assert c.reply() == f"{code} 5.5.2 Error: bare <LF> received"
        if code == 521:
            assert c.closed()
        else:
            c.send(b"NOOP\n")
            assert c.reply() == "550 5.5.2 Error: bare <LF> received"  # commands too
            assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert assert_consistent(d) == before
    d.wait_log("reject: bare <LF> received from localhost[127.0.0.1]")


def test_data_ends_only_at_crlf_dot_crlf(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for()
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        # ". " and ".x" are not the end; neither is a dot at the end of a line.
        c.send(b"Subject: dots\r\n\r\n. \r\nend.\r\n")
        assert c.quiet()
        c.send(b".\r")
        assert c.quiet()
        c.send(b"\n")
        queue_id = queue_id_of(c.reply())
    assert split_received(content_of(d, queue_id))[1] == b"Subject: dots\r\n\r\n \r\nend.\r\n"


# ---- disk full and write errors ---------------------------------------------------------------


@pytest.mark.parametrize("fault,expected", [
    ("enospc", "452 4.3.1 Insufficient system storage"),
    ("eio", "451 4.3.0"),
])
def test_write_failure_is_a_temporary_error(
    relay_for: Callable[..., RelayDaemon], fault: str, expected: str,
) -> None:
    d = relay_for(env={"RELAY_FAULT": f"enqueue.data_written:{fault}:1"})
    assert assert_consistent(d) == set()
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        reply = c.mail("first@example.org", ["b@example.net"], b"Subject: 1\r\n\r\none\r\n")
        assert reply.startswith(expected), reply
        assert not reply.startswith("5")
        assert assert_consistent(d) == set()
        # Space is back: the same session goes on.
        queue_id = queue_id_of(c.mail("second@example.org", ["b@example.net"],
                                      b"Subject: 2\r\n\r\ntwo\r\n"))
        assert c.cmd("QUIT").startswith("221")
    assert assert_consistent(d) == {queue_id}
    assert find_envelope(d, queue_id).sender == "second@example.org"


# ---- smtpd_timeout -------------------------------------------------------------------------------


def test_smtpd_timeout_cuts_silence_not_slowness(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for(smtpd_timeout="2s")
    slow: dict[str, object] = {}

    def slow_upload() -> None:
        try:
            with Client(d.port) as c:
                c.cmd("EHLO slow.example")
                c.cmd("MAIL FROM:<slow@example.org>")
                c.cmd("RCPT TO:<b@example.net>")
                c.cmd("DATA")
                c.send(b"Subject: slow\r\n\r\n")
                for n in range(10):  # 5 s in all, longer than smtpd_timeout
                    time.sleep(0.5)
                    c.send(b"line %d\r\n" % n)
                c.send(b".\r\n")
                slow["reply"] = c.reply()
        except (OSError, ConnectionError, AssertionError) as exc:  # reported by the main thread
            slow["reply"] = repr(exc)

    uploader = threading.Thread(target=slow_upload)
    uploader.start()
    with Client(d.port) as silent:
        start = time.monotonic()
        closed = silent.closed(wait=8.0)
        elapsed = time.monotonic() - start
        assert closed, "a silent client was never disconnected"
        assert silent.buf == b"" or silent.buf.startswith(b"421"), silent.buf
    assert 1.5 <= elapsed <= 4.5, elapsed
    uploader.join(15)
    reply = str(slow.get("reply"))
    queue_id = queue_id_of(reply)
    assert split_received(content_of(d, queue_id))[1].endswith(b"line 9\r\n")


# ---- smtpd_client_connection_count_limit ---------------------------------------------------------


def test_connection_count_limit(relay_for: Callable[..., RelayDaemon]) -> None:
    d = relay_for(mynetworks="127.0.0.2/32", relay_domains="example.com",
                  smtpd_client_connection_count_limit="2")
    wait_idle(d)
    first, second = Client(d.port), Client(d.port)
    try:
        assert first.banner.startswith("220") and second.banner.startswith("220")
        with Client(d.port) as third:
            assert third.banner.startswith("421 4.7.0"), third.banner
            assert third.closed()
        d.wait_log("Connection concurrency limit exceeded: 3 from localhost[127.0.0.1]")
        assert first.cmd("EHLO still.example").startswith("250")
    finally:
        first.sock.close()
        second.sock.close()
    wait_idle(d)
    with Client(d.port) as again:  # slots are given back
        assert again.banner.startswith("220")

    try:
        exempt = [Client(d.port, source="127.0.0.2") for _ in range(4)]
    except OSError as exc:
        pytest.skip(f"cannot bind a client socket to 127.0.0.2: {exc}")
    try:
        assert all(c.banner.startswith("220") for c in exempt)
        assert all(c.cmd("NOOP").startswith("250") for c in exempt)
    finally:
        for c in exempt:
            c.sock.close()
