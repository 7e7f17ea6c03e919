"""The relay end to end: ``relay serve`` as a subprocess, real SMTP sinks, a real DNS server.

Mail goes in through the daemon's SMTP port from a raw-socket client, comes out at
ThreadedPeer sinks on loopback, and every claim is checked from outside: what the sinks
received (byte for byte, exactly once), the maillog lines, the spool directories.
Covered: content transparency (dot-stuffing, 8-bit, long lines, empty bodies, MIME),
the pickup latency of an idle relay, MX routing through a loopback DNS server (backup
MX, null MX, NXDOMAIN, SERVFAIL), relayhost against transport_maps, SIGHUP reloading
routes for mail already deferred, recovery after SIGKILL without re-delivering a
recipient that was already sent, backoff and expiry on the daemon's injected clock, and
Postfix's delivery line in full (``relay=host[ip]:port, delay=, delays=a/b/c/d, dsn=,
status=sent (reply)`` from the ``smtp`` program) with EHLO to the next hop as myhostname.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Self

import pytest

from tests.support.daemon import RelayDaemon, free_port, smtp_send, wait_until
from tests.support.dnsserver import Fault as DNSFault
from tests.support.dnsserver import LoopbackDNS
from tests.support.peers import Fault, PeerScript, ReceivedMessage, ThreadedPeer

pytestmark = pytest.mark.timeout(60)

MakeDaemon = Callable[..., RelayDaemon]
QUEUES = ("incoming", "active", "deferred", "hold")
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\S+)$")
# The header the relay adds: "Received: ..." and its continuation lines.
RECEIVED = re.compile(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


# ---- a raw SMTP client: the test decides every byte --------------------------------


class Client:
    """A blocking SMTP client on a raw socket that does its own dot-stuffing."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        assert self.reply().startswith("220")
        assert self.cmd("EHLO client.test").startswith("250")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.cmd("QUIT")
        except OSError:
            pass
        self.sock.close()

    def reply(self) -> str:
        lines: list[bytes] = []
        while not lines or lines[-1][3:4] == b"-":
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; unread: {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
        return "\n".join(x.decode("utf-8", "replace") for x in lines)

    def cmd(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def send(self, sender: str, recipients: Iterable[str], content: bytes) -> tuple[str, float]:
        """One transaction; returns the queue ID and time.monotonic() when the 250 arrived."""
        assert self.cmd(f"MAIL FROM:<{sender}>").startswith("250")
        for rcpt in recipients:
            reply = self.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.startswith("250"), reply
        assert self.cmd("DATA").startswith("354")
        self.sock.sendall(stuff(content) + b".\r\n")
        reply = self.reply()
        at = time.monotonic()
        match = QUEUED.match(reply)
        assert match, reply
        return match.group(1), at


def stuff(content: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency: a line starting with '.' gets one more."""
    assert not content or content.endswith(b"\r\n")
    return re.sub(rb"(?m)^\.", b"..", content)


def strip_received(data: bytes, queue_id: str | None = None) -> bytes:
    """The content as the client sent it: the sink's copy without the relay's header."""
    match = RECEIVED.match(data)
    assert match, data[:200]
    header = match.group(0)
    assert b"by relay.test" in header, header
    if queue_id is not None:
        assert f"id {queue_id};".encode() in header, header
    return data[match.end():]


def route(**hops: str) -> str:
    """transport_maps as an inline table: route(**{"a.test": "smtp:[127.0.0.1]:25"})."""
    return "inline:{ " + ", ".join(f"{k} = {v}" for k, v in hops.items()) + " }"


def spool_empty(d: RelayDaemon) -> bool:
    return not any(d.queue_files(q) for q in QUEUES)


def for_rcpt(messages: list[ReceivedMessage], rcpt: str) -> list[ReceivedMessage]:
    return [m for m in messages if rcpt in m.recipients]


def closed_port() -> int:
    """A loopback port where nothing listens (connections are refused)."""
    return free_port()


# ---- contents that exercise transparency -------------------------------------------


def contents(n: int) -> list[bytes]:
    special = [
        b"Subject: leading dots\r\n\r\n.one dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n.\r\n",
        b"Subject: lone double dot\r\n\r\nbefore\r\n..\r\nafter\r\n",
        b"Subject: 8bit caf\xc3\xa9\r\nContent-Type: text/plain; charset=latin-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + bytes(range(0x80, 0x100)) + b"\r\n"
        b"\xff\xfe high bytes, \x7f DEL and \x01 control\r\n",
        b"Subject: long lines\r\n\r\n" + (b"x" * 998 + b"\r\n") * 3 + b"." + b"y" * 997 + b"\r\n",
        b"Subject: empty body\r\nX-Empty: yes\r\n\r\n",
        b"",  # no header, no body: only the relay's Received: reaches the sink
        b"Subject: headers only, no separator\r\n",
        (
            b"MIME-Version: 1.0\r\nSubject: mime\r\n"
            b'Content-Type: multipart/mixed; boundary="=-=b=-="\r\n\r\n'
            b"preamble\r\n--=-=b=-=\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"caf=C3=A9 =\r\n.dot after soft break\r\n"
            b"--=-=b=-=\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n"
            b'Content-Disposition: attachment; filename="x.bin"\r\n\r\n'
            + b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4v\r\n" * 40
            + b"--=-=b=-=--\r\nepilogue\r\n"
        ),
        # Bigger than one delivery write chunk, with dots at the start of many lines.
        b"Subject: big\r\n\r\n" + b"".join(
            (b"." if i % 7 == 0 else b"") + b"%06d " % i + b"z" * 900 + b"\r\n"
            for i in range(250)),
    ]
    out = list(special)
    i = 0
    while len(out) < n:
        out.append(b"Subject: filler %d\r\nMessage-ID: <f%d@client.test>\r\n\r\n" % (i, i)
                   + b"line %d\r\n" % i * (i % 5 + 1))
        i += 1
    return out[:n]


def test_every_message_arrives_once_byte_for_byte(relay_daemon: MakeDaemon) -> None:
    n = 50
    with ThreadedPeer() as sink:
        d = relay_daemon({"transport_maps": route(**{"*": f"smtp:[127.0.0.1]:{sink.port}"})})
        sent: dict[str, tuple[str, bytes]] = {}  # recipient -> (queue ID, content)
        expected_sets: list[tuple[str, ...]] = []
        with Client(d.port) as c:
            for i, content in enumerate(contents(n)):
                # Every 10th message has two recipients in two domains, one transaction.
                rcpts = [f"m{i}@dest.test"] + ([f"m{i}b@other.test"] if i % 10 == 3 else [])
                queue_id, _ = c.send(f"sender{i}@client.test", rcpts, content)
                for r in rcpts:
                    sent[r] = (queue_id, content)
                expected_sets.append(tuple(rcpts))
        sink.wait_for(n, timeout=30)
        d.wait_log(": removed", count=n, timeout=15)
        time.sleep(0.3)  # a late duplicate would show up now
        messages = sink.messages
        assert len(messages) == n
        assert sorted(m.recipients for m in messages) == sorted(expected_sets)
        for m in messages:
            queue_id, content = sent[m.recipients[0]]
            i = int(m.recipients[0][1:].split("@")[0])
            assert m.sender == f"sender{i}@client.test"
            assert strip_received(m.data, queue_id) == content, m.recipients
        assert len(sink.all_messages) == n
        log = d.log()
        assert log.count("status=sent") == len(sent)
        assert "status=deferred" not in log and "status=bounced" not in log
        assert spool_empty(d)


# ---- pickup latency ----------------------------------------------------------------


def test_idle_relay_starts_delivery_at_once(relay_daemon: MakeDaemon) -> None:
    accepted: list[float] = []
    lock = threading.Lock()

    def script(number: int) -> PeerScript:
        with lock:
            accepted.append(time.monotonic())
        return PeerScript()

    with ThreadedPeer(script) as sink:
        d = relay_daemon({
            "transport_maps": route(**{"*": f"smtp:[127.0.0.1]:{sink.port}"}),
            # A new connection per message, so that the sink sees every attempt start.
            "smtp_connection_cache_time_limit": "0",
        })
        latencies: list[float] = []
        with Client(d.port) as c:
            for i in range(9):
                _, queued_at = c.send("a@client.test", [f"r{i}@dest.test"],
                                      b"Subject: latency %d\r\n\r\nhi\r\n" % i)
                sink.wait_for(i + 1, timeout=10)
                d.wait_log(": removed", count=i + 1)
                with lock:
                    assert len(accepted) == i + 1
                    latencies.append(max(0.0, accepted[i] - queued_at))
                time.sleep(0.05)  # let the relay go idle again
        median = statistics.median(latencies)
        print(f"\npickup latency (client's 250 -> sink's accept): median {median * 1000:.1f} ms, "
              f"min {min(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms "
              f"over {len(latencies)} messages")
        # Idle means no directory poll in the way: the listener hands the queue ID over.
        # The target is 50 ms; measured medians are a few ms, even with every core busy,
        # so twice the target is robust on a loaded CI machine.
        assert median < 0.1, latencies


# ---- MX routing through a loopback DNS server ------------------------------------


def test_mx_routing_and_dns_failures(relay_daemon: MakeDaemon) -> None:
    port = free_port("127.0.0.3")  # the same port on every MX address
    with LoopbackDNS() as dns, \
            ThreadedPeer(host="127.0.0.3", port=port) as mx2, \
            ThreadedPeer() as sender_sink:
        z = dns.zone
        z.add_mx("example.test", 10, "mx1.example.test").add_mx("example.test", 20, "mx2.example.test")
        z.add_a("mx1.example.test", "127.0.0.2")  # nothing listens there: mx1 is down
        z.add_a("mx2.example.test", "127.0.0.3")
        # Preference order with both MX hosts up: the better one gets the mail.
        z.add_mx("ok.test", 20, "backup.ok.test").add_mx("ok.test", 10, "primary.ok.test")
        z.add_a("primary.ok.test", "127.0.0.3")
        z.add_a("backup.ok.test", "127.0.0.2")
        z.add_null_mx("nullmx.test")
        z.fault("servfail.test", DNSFault.SERVFAIL)
        # nx.test has no node at all: NXDOMAIN
        hops = {dom: f"smtp:{dom}:{port}"
                for dom in ("example.test", "ok.test", "nullmx.test", "nx.test", "servfail.test")}
        hops["sender.test"] = f"smtp:[127.0.0.1]:{sender_sink.port}"
        d = relay_daemon({
            "dns_nameservers": dns.nameserver,
            "transport_maps": route(**hops),
            "minimal_backoff_time": "1h", "maximal_backoff_time": "1h", "queue_run_delay": "1h",
        })
        with Client(d.port) as c:
            mx_id, _ = c.send("alice@sender.test", ["u@example.test"], b"Subject: mx\r\n\r\nhi\r\n")
            ok_id, _ = c.send("alice@sender.test", ["u@ok.test"], b"Subject: ok\r\n\r\nhi\r\n")
            null_id, _ = c.send("nullmx@sender.test", ["u@nullmx.test"],
                                b"Subject: null\r\n\r\nhi\r\n")
            nx_id, _ = c.send("nx@sender.test", ["u@nx.test"], b"Subject: nx\r\n\r\nhi\r\n")
            sf_id, _ = c.send("sf@sender.test", ["u@servfail.test"], b"Subject: sf\r\n\r\nhi\r\n")

        mx2.wait_for(2, timeout=15)
        got = {m.recipients: m for m in mx2.messages}
        assert set(got) == {("u@example.test",), ("u@ok.test",)}
        # The log line comes after the spool records the result, so after the sink has it.
        d.wait_log(f"{mx_id}: to=<u@example.test>, relay=mx2.example.test[127.0.0.3]:{port}")
        d.wait_log(f"{ok_id}: to=<u@ok.test>, relay=primary.ok.test[127.0.0.3]:{port}")
        queried = {(q.name, q.qtype) for q in dns.queries}
        assert ("example.test", "MX") in queried and ("mx1.example.test", "A") in queried

        # Null MX and NXDOMAIN bounce, each with a notice to its sender.
        notices = sender_sink.wait_for(2, timeout=15)
        by_rcpt = {m.recipients: m for m in notices}
        assert set(by_rcpt) == {("nullmx@sender.test",), ("nx@sender.test",)}
        for rcpt, status, failed in (("nullmx@sender.test", "5.1.10", "u@nullmx.test"),
                                     ("nx@sender.test", "5.4.4", "u@nx.test")):
            notice = by_rcpt[(rcpt,)]
            assert notice.sender == ""
            text = notice.data.decode("utf-8", "replace")
            assert f"Final-Recipient: rfc822; {failed}" in text
            assert f"Status: {status}" in text
            assert "Action: failed" in text
        log = d.wait_log(f"{sf_id}: to=<u@servfail.test>")

        def line(queue_id: str) -> str:
            return next(x for x in log.splitlines() if f"{queue_id}: to=<" in x)

        assert "dsn=5.1.10, status=bounced" in line(null_id)
        assert "does not accept mail (nullMX)" in line(null_id)
        assert "dsn=5.4.4, status=bounced" in line(nx_id)
        assert "dsn=4.4.3, status=deferred" in line(sf_id)
        assert re.search(rf"{null_id}: sender non-delivery notification: \w+", log)
        assert re.search(rf"{nx_id}: sender non-delivery notification: \w+", log)
        wait_until(lambda: d.queue_files("deferred") == [sf_id], 5, "only the SERVFAIL in deferred")


# ---- relayhost ---------------------------------------------------------------------


def test_relayhost_and_transport_maps_override(relay_daemon: MakeDaemon) -> None:
    with ThreadedPeer() as smarthost, ThreadedPeer() as special:
        d = relay_daemon({
            "relayhost": f"[127.0.0.1]:{smarthost.port}",
            "transport_maps": route(**{"special.test": f"smtp:[127.0.0.1]:{special.port}"}),
        })
        with Client(d.port) as c:
            c.send("a@client.test", ["x@any.test", "y@elsewhere.example"],
                   b"Subject: via relayhost\r\n\r\nhi\r\n")
            c.send("a@client.test", ["z@special.test"], b"Subject: via transport\r\n\r\nhi\r\n")
            c.send("a@client.test", ["w@sub.special.test", "v@special.test"],
                   b"Subject: split\r\n\r\nhi\r\n")
        smarthost.wait_for(2)
        special.wait_for(2)
        d.wait_log(": removed", count=3)
        time.sleep(0.2)
        smart_rcpts = sorted(r for m in smarthost.messages for r in m.recipients)
        special_rcpts = sorted(r for m in special.messages for r in m.recipients)
        # transport(5): "special.test" matches that domain only, not its subdomains
        # (that would take ".special.test"), so sub.special.test goes to the relayhost.
        assert smart_rcpts == ["w@sub.special.test", "x@any.test", "y@elsewhere.example"]
        assert special_rcpts == ["v@special.test", "z@special.test"]


# ---- SIGHUP: routes are looked up again at each attempt ---------------------------


def test_sighup_reroutes_deferred_mail(relay_daemon: MakeDaemon) -> None:
    # relay.cli.postqueue may not exist yet: then let short backoffs do the retry.
    have_postqueue = importlib.util.find_spec("relay.cli.postqueue") is not None
    backoff = "1h" if have_postqueue else "1s"
    dead = closed_port()
    with ThreadedPeer() as sink:
        d = relay_daemon({
            "transport_maps": route(**{"dest.test": f"smtp:[127.0.0.1]:{dead}"}),
            "queue_run_delay": "1s",
            "minimal_backoff_time": backoff,
            "maximal_backoff_time": backoff,
        })
        with Client(d.port) as c:
            queue_id, _ = c.send("a@client.test", ["r@dest.test"], b"Subject: hup\r\n\r\nhi\r\n")
        d.wait_log(f"{queue_id}: to=<r@dest.test>, relay=none")
        assert "status=deferred" in d.log()
        wait_until(lambda: queue_id in d.queue_files("deferred"), 5, "the message in deferred/")
        d.write_config(transport_maps=route(**{"dest.test": f"smtp:[127.0.0.1]:{sink.port}"}))
        d.hup()
        d.wait_log("reload -- configuration")
        if have_postqueue:
            result = d.run_cmd("postqueue", "-f")
            assert result.returncode == 0, result.stderr
        (m,) = sink.wait_for(1, timeout=10)
        assert m.recipients == ("r@dest.test",)
        log = d.wait_log(f"{queue_id}: removed")
        assert f"relay=127.0.0.1[127.0.0.1]:{sink.port}" in log
        assert spool_empty(d)


# ---- crash recovery -----------------------------------------------------------------


def test_kill_with_mail_in_active_then_restart(relay_daemon: MakeDaemon) -> None:
    hang = PeerScript(final=Fault.HANG)  # takes the content, never answers the dot
    with ThreadedPeer() as fast, ThreadedPeer(hang) as slow, ThreadedPeer() as rescue:
        d = relay_daemon({
            "transport_maps": route(**{
                "fast.test": f"smtp:[127.0.0.1]:{fast.port}",
                "slow.test": f"smtp:[127.0.0.1]:{slow.port}",
            }),
        })
        ids: list[str] = []
        with Client(d.port) as c:
            two_id, _ = c.send("a@client.test", ["one@fast.test", "two@slow.test"],
                               b"Subject: two hops\r\n\r\nhi\r\n")
            ids.append(two_id)
            for i in range(3):
                queue_id, _ = c.send("a@client.test", [f"s{i}@slow.test"],
                                     b"Subject: slow %d\r\n\r\nhi\r\n" % i)
                ids.append(queue_id)
        fast.wait_for(1)
        d.wait_log(f"{two_id}: to=<one@fast.test>, relay=127.0.0.1")
        wait_until(lambda: len(slow.all_messages) == 4, 10, "the slow sink to hold 4 messages")
        assert sorted(d.queue_files("active")) == sorted(ids)
        d.kill()
        assert sorted(d.queue_files("active")) == sorted(ids)

        d.write_config(transport_maps=route(**{
            "fast.test": f"smtp:[127.0.0.1]:{fast.port}",
            "slow.test": f"smtp:[127.0.0.1]:{rescue.port}",
        }))
        d.start()
        rescue.wait_for(4, timeout=15)
        d.wait_log(": removed", count=4)
        time.sleep(0.3)
        assert sorted(r for m in rescue.messages for r in m.recipients) == \
            ["s0@slow.test", "s1@slow.test", "s2@slow.test", "two@slow.test"]
        # one@fast.test was sent before the kill and is not sent again.
        assert len(fast.all_messages) == 1
        assert [m.recipients for m in fast.messages] == [("one@fast.test",)]
        assert spool_empty(d)


# ---- backoff and expiry on the daemon's injected clock --------------------------


def test_backoff_and_expiry_on_an_injected_clock(relay_daemon: MakeDaemon, tmp_path: Path) -> None:
    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    dead = closed_port()
    with ThreadedPeer() as sender_sink:
        d = relay_daemon({
            "transport_maps": route(**{
                "dest.test": f"smtp:[127.0.0.1]:{dead}",
                "client.test": f"smtp:[127.0.0.1]:{sender_sink.port}",
            }),
            "queue_run_delay": "1s",
            "minimal_backoff_time": "300s",
            "maximal_backoff_time": "4000s",
            "maximal_queue_lifetime": "1h",
        }, env={"RELAY_CLOCK_OFFSET_FILE": str(offset)})
        with Client(d.port) as c:
            queue_id, _ = c.send("alice@client.test", ["r@dest.test"],
                                 b"Subject: expire me\r\n\r\nhi\r\n")
        deferred = f"{queue_id}: to=<r@dest.test>, relay=none"
        d.wait_log(deferred)
        wait_until(lambda: queue_id in d.queue_files("deferred"), 5, "the message in deferred/")
        time.sleep(1.5)  # several queue runs: nothing is due before 300 s
        assert d.log().count(deferred) == 1

        offset.write_text("301")
        log = d.wait_log(deferred, count=2, timeout=4)
        assert log.count("status=deferred") == 2
        assert "status=expired" not in log
        wait_until(lambda: queue_id in d.queue_files("deferred"), 5, "the message back in deferred/")

        offset.write_text("3700")
        log = d.wait_log(f"{queue_id}: from=<alice@client.test>, status=expired, "
                         "returned to sender", timeout=4)
        d.wait_log(f"{queue_id}: sender non-delivery notification:")
        match = re.search(rf"{queue_id}: sender non-delivery notification: (\w+)", d.log())
        assert match
        notice_id = match.group(1)
        (notice,) = sender_sink.wait_for(1)
        assert notice.recipients == ("alice@client.test",) and notice.sender == ""
        text = notice.data.decode("utf-8", "replace")
        assert "Final-Recipient: rfc822; r@dest.test" in text
        assert "Action: failed" in text
        log = d.wait_log(f"{notice_id}: removed")
        assert f"{queue_id}: removed" in log
        assert log.count(deferred) == 3  # the attempt at +3700 s, then the expiry
        assert spool_empty(d)


# ---- the maillog's delivery line, and EHLO with myhostname ------------------------------

NUMBER = r"\d+(?:\.\d+)?"


def test_delivery_line_has_every_postfix_field_and_ehlo_uses_myhostname(
    relay_daemon: MakeDaemon,
) -> None:
    with ThreadedPeer() as sink:
        d = relay_daemon({
            "myhostname": "mx.relay.test",
            "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}",
        })
        qid = smtp_send(d.host, d.port, ["bob@example.net"])
        sink.wait_for(1)
        log = d.wait_log(f"{qid}: removed")
        assert sink.sessions[0].helo == "mx.relay.test"
    pattern = (
        rf"^\w{{3}} [ \d]\d \d\d:\d\d:\d\d \S+ relay/smtp\[\d+\]: {qid}: to=<bob@example\.net>, "
        rf"relay=\S+\[127\.0\.0\.1\]:{sink.port}, delay={NUMBER}, "
        rf"delays={NUMBER}/{NUMBER}/{NUMBER}/{NUMBER}, dsn=2\.0\.0, "
        rf"status=sent \(250 2\.0\.0 Ok: queued as \S+\)$"
    )
    assert re.search(pattern, log, re.MULTILINE), log[-3000:]
    assert re.search(rf"relay/qmgr\[\d+\]: {qid}: removed$", log, re.MULTILINE), log[-3000:]
