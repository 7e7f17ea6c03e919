"""A session fuzzer: byte streams, split at arbitrary points, into a running listener.

The listener (relay.smtpd with a real Spool) runs on its own event loop in a thread,
listening on loopback; hypothesis writes to it over a real socket, one ``send`` per
piece with TCP_NODELAY and a short pause, so the server reads the stream cut where
hypothesis chose.  Two kinds of stream:

* structured sessions: EHLO, transactions with arbitrary message bodies (bare CR and
  LF, dots, NUL, overlong lines, 8-bit bytes, look-alikes of the end of data), junk
  command lines between the commands, QUIT.  The replies are predicted exactly (by
  ``expected_reply``), and every message that is accepted must be stored byte for byte
  as ``server_view`` says RFC 5321 makes of it;
* raw streams: anything at all, built from SMTP fragments and random bytes, against a
  lenient listener and one with smtpd_forbid_unauth_pipelining.

After every example: the listener thread is alive and serves a fresh session, it
logged no internal error, no reply was malformed, the spool holds no partial file
(tmp/ empty, data/ and the queue hold the same IDs), every acknowledged message is
there and every stored message is intact and complete.

``RELAY_FUZZ_EXAMPLES`` sets the number of examples per test (``make test``: 300, ``make
test-fast``: 50, ``make fuzz``: 20000).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from spool import Envelope
from tests.support.live_listener import LiveListener
from tests.support.smtp_model import stored_content

BOUNDED = 300
EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", str(BOUNDED)))
# A bounded run (make test, make test-fast) is the same every time; a long one explores.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= BOUNDED,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = pytest.mark.timeout(600)

REPLY = re.compile(rb"^[2-5][0-9]{2}[ -][^\r\n]*$")


class ErrorLog(logging.Handler):
    """Collects what the listener logs at ERROR: an internal error is a bug found."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logger = logging.getLogger("relay")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveListener]:
    live = LiveListener(tmp_path_factory.mktemp("fuzz"), forbid_unauth_pipelining=False,
                        hard_error_limit=0)
    yield live
    live.close()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveListener]:
    live = LiveListener(tmp_path_factory.mktemp("fuzz"), mynetworks=_networks("192.0.2.0/24"),
                        relay_domains=("example.com",), recipient_limit=3)
    yield live
    live.close()


def _networks(cidr: str) -> object:
    import ipaddress

    from relay.config import NetworkMatcher

    return NetworkMatcher(((False, ipaddress.ip_network(cidr)),))


# ---- talking to it -----------------------------------------------------------------------------


def converse(live: LiveListener, pieces: list[bytes], await_banner: bool = True,
             half_close: bool = True) -> bytes:
    """Send each piece as its own write, then (``half_close``) signal the end of input,
    and return all the server said until it closed the connection.  The listener takes
    the end of input as a lost connection (as aiosmtpd does): whatever it had not yet
    answered is dropped, so a test that wants every reply ends with QUIT instead."""
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        received = b""
        while await_banner and not received.endswith(b"\r\n"):
            chunk = s.recv(1024)
            if not chunk:
                break
            received += chunk
        try:
            for piece in pieces:
                s.sendall(piece)
                time.sleep(0.0005)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close first (421, 554): what it said is still readable
        try:
            while chunk := s.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(stream), *(p % (len(stream) + 1) for p in points)})
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


def check_after(live: LiveListener, errors: ErrorLog, received: bytes) -> list[Envelope]:
    """The invariants that hold after any session; returns the messages it stored."""
    assert live.thread.is_alive()
    for code in sorted(set(re.findall(rb"^([2-5][0-9][0-9]) ", received, re.MULTILINE))):
        event(f"reply {code.decode()}")
    lines = received.split(b"\r\n")
    assert lines[-1] == b"", f"a reply without CR LF: {lines[-1]!r}"
    for line in lines[:-1]:
        assert REPLY.match(line), f"malformed reply {line!r}"
    assert b"internal error" not in received and errors.records == [], errors.records
    live.wait_idle()
    root = Path(live.spool.root)
    assert os.listdir(root / "tmp") == []
    stored = sorted(os.listdir(root / "incoming"))
    assert sorted(os.listdir(root / "data")) == stored
    acked = set(re.findall(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n", received))
    assert {q.decode() for q in acked} <= set(stored)
    envelopes = []
    for queue_id in stored:
        env = live.spool.read("incoming", queue_id)
        content = live.spool.read_content(queue_id, env.size)
        assert len(content) == env.size and content.endswith(b"\r\n")
        assert content.startswith(b"Received: from ")
        body = content.split(b";\r\n\t", 1)[1].split(b"\r\n", 1)[1]
        assert b"\x00" not in body
        assert not re.search(rb"\r(?!\n)", body)
        assert env.recipients and all(_CLEAN.fullmatch(r.address) for r in env.recipients)
        assert _CLEAN.fullmatch(env.sender) or env.sender == ""
        envelopes.append(env)
    # Clear the spool for the next example.
    for queue_id in stored:
        with live.spool.locked(queue_id) as entry:
            entry.remove()
    live.acknowledged.clear()
    # And the listener still serves a fresh client.
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        banner = s.recv(1024)
        assert banner.startswith(b"220 relay.test"), banner
        s.sendall(b"QUIT\r\n")
        assert s.recv(1024).startswith(b"221")
    live.wait_idle()
    return envelopes


_CLEAN = re.compile(r"[^\x00-\x20<>\x7f]+")


# ---- structured sessions: the replies and the stored bytes are predicted -----------------------

BODY_PIECES = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n", b"\r\n.", b".\r\n",
                     b"\n.\n", b"\r.\r", b"\x00", b"\xff\xfe", b"Received: by x\r\n",
                     b"x" * 998, b"y" * 999, b"z" * 1500, "caf\u00e9".encode()]),
)
JUNK = st.builds(lambda s: b"X" + s, st.binary(max_size=20).map(
    lambda b: bytes(c for c in b if c not in b"\r\n" and (c < 0x80))))


@st.composite
def transactions(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """(the message body, junk command lines sent before MAIL)."""
    body = b"".join(draw(st.lists(BODY_PIECES, max_size=12)))
    junk = draw(st.lists(JUNK, max_size=2))
    return body, junk


def stuffed(body: bytes) -> bytes:
    """What a client sends after DATA for ``body``: CR LF lines, dots doubled, the end."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    lines = body.split(b"\r\n")[:-1]
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) \
        + b".\r\n"


def server_view(wire: bytes) -> bytes:
    """What the listener stores (smtpd_forbid_bare_newline = normalize): ``wire`` is the
    DATA content without its final dot line."""
    content = stored_content(wire)
    assert content is not None, "the test client never sends a lone dot line"
    return content


def expected_reply(wire: bytes) -> bytes:
    """The reply after the dot for DATA content ``wire`` (final dot line excluded)."""
    content = server_view(wire)
    if b"\x00" in content:
        return b"554 5.6.0 Error: NUL character in message content"
    head = b"" if content.startswith(b"\r\n") else content.split(b"\r\n\r\n", 1)[0]
    if len(re.findall(rb"^received:", head, re.IGNORECASE | re.MULTILINE)) > 50:
        return b"554 5.4.6 Too many hops"
    return b"250"


@settings(FUZZ)
@given(sessions=st.lists(transactions(), min_size=1, max_size=4), data=st.data())
def test_structured_sessions(lenient: LiveListener, errors: ErrorLog,
                             sessions: list[tuple[bytes, list[bytes]]], data: st.DataObject,
                             ) -> None:
    stream = b"EHLO fuzz.example\r\n"
    expected: list[bytes] = [b"220 relay.test", b"250"]
    predicted: list[bytes] = []
    for body, junk in sessions:
        for line in junk:
            stream += line + b"\r\n"
            expected.append(b"500 5.5.2 Error: NUL character in command" if b"\x00" in line
                            else b"500 5.5.2 Error: command not recognized")
        wire = stuffed(body)
        stream += b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n" + wire
        expected += [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 "]
        outcome = expected_reply(wire[: -len(b".\r\n")])
        expected.append(outcome)
        if outcome == b"250":
            predicted.append(server_view(wire[: -len(b".\r\n")]))
    stream += b"QUIT\r\n"
    expected.append(b"221 2.0.0 Bye")
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts")
    received = converse(lenient, cut(stream, points), half_close=False)
    replies = [r for r in received.split(b"\r\n")[:-1] if r[3:4] != b"-"]
    assert len(replies) == len(expected), (replies, expected)
    for got, want in zip(replies, expected, strict=True):
        assert got.startswith(want), (got, want)
    queue_ids = [r[len(b"250 2.0.0 Ok: queued as "):].decode() for r in replies
                 if r.startswith(b"250 2.0.0 Ok: queued as ")]
    contents = [lenient.spool.read_content(q) for q in queue_ids]
    for content, want in zip(contents, predicted, strict=True):
        _, _, rest = content.partition(b";\r\n\t")
        assert rest.split(b"\r\n", 1)[1] == want
    stored = check_after(lenient, errors, received)
    assert sorted(e.queue_id for e in stored) == sorted(queue_ids)


# ---- raw streams -------------------------------------------------------------------------------

FRAGMENTS = [
    b"EHLO x\r\n", b"HELO x\r\n", b"MAIL FROM:<a@example.org>\r\n", b"MAIL FROM:<>\r\n",
    b"RCPT TO:<b@example.com>\r\n", b"RCPT TO:<c@other.org>\r\n",
    b"RCPT TO:<c%other.org@example.com>\r\n", b"DATA\r\n", b".\r\n", b"\r\n.\r\n", b"\r\n",
    b"\n", b"\r", b".", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"STARTTLS\r\n",
    b"AUTH PLAIN AGEAYg==\r\n", b"AUTH LOGIN\r\n", b"*\r\n", b"VRFY a\r\n", b"HELP\r\n",
    b"\x00", b"\xff", b"BDAT 10\r\n", b"MAIL FROM:<a@b> SIZE=99999999\r\n",
    b"MAIL FROM:<a@b> BODY=8BITMIME SMTPUTF8\r\n", b"RCPT TO:<\xc3\xa9@example.com>\r\n",
    b"x" * 600 + b"\r\n", b"Subject: x\r\n\r\nbody\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
]
STREAMS = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=32)), max_size=30)
# How a raw stream ends: with the end of any DATA and a QUIT (every command gets its
# reply), or with a half-close, which the listener takes for a lost connection at once,
# whatever it is doing (a commit then finishes on its own).
ENDINGS = st.sampled_from([b"\r\n.\r\nQUIT\r\n", None])


def raw_session(live: LiveListener, errors: ErrorLog, pieces: list[bytes],
                data: st.DataObject, ending: bytes | None, await_banner: bool) -> None:
    stream = b"".join(pieces) + (ending or b"")
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts")
    received = converse(live, cut(stream, points), await_banner, half_close=ending is None)
    event("ends with QUIT" if ending else "ends with EOF")
    check_after(live, errors, received)


# Often start inside a transaction, so that what follows is message content.
PREFIXES = st.sampled_from([b"", (b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n"
                                  b"RCPT TO:<b@example.com>\r\nDATA\r\n")])


@settings(FUZZ)
@given(prefix=PREFIXES, pieces=STREAMS, data=st.data(), ending=ENDINGS)
def test_raw_streams_lenient(lenient: LiveListener, errors: ErrorLog, prefix: bytes,
                             pieces: list[bytes], data: st.DataObject, ending: bytes | None,
                             ) -> None:
    raw_session(lenient, errors, [prefix, *pieces], data, ending, await_banner=True)


@settings(FUZZ)
@given(pieces=STREAMS, data=st.data(), ending=ENDINGS, await_banner=st.booleans())
def test_raw_streams_strict(strict: LiveListener, errors: ErrorLog, pieces: list[bytes],
                            data: st.DataObject, ending: bytes | None, await_banner: bool,
                            ) -> None:
    # Without waiting for the banner, the pregreet check meets most of these streams.
    raw_session(strict, errors, pieces, data, ending, await_banner)
