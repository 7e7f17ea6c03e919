"""Parameters that postconf accepts do what they say, each as Postfix's does, over real
sockets (none is accepted and ignored): smtpd_soft_error_limit with smtpd_error_sleep_time,
smtp_mx_session_limit, and the SMTP client's timeout of each stage (smtp_mail_timeout,
smtp_rcpt_timeout, smtp_data_init_timeout) through main.cf of the running daemon."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from relay.sink import ThreadedSink
from relay.testing import SmtpRelay
from tests.support.daemon import RelayDaemon, smtp_send, wait_until
from tests.support.dnsserver import LoopbackDNS
from tests.support.peers import Fault, PeerScript, ThreadedPeer

pytestmark = pytest.mark.timeout(90)
Factory = Callable[..., SmtpRelay]
MakeDaemon = Callable[..., RelayDaemon]


def timed(fn: Callable[[], object]) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def test_soft_error_limit_slows_every_reply_until_a_message_is_delivered(
        smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory({"smtpd_soft_error_limit": "2",
                                "smtpd_error_sleep_time": "1s"})
    with relay.smtp() as s:
        s.ehlo("client.test")
        assert timed(lambda: s.docmd("FROB")) < 0.7  # error 1
        assert timed(lambda: s.docmd("FROB")) < 0.7  # error 2: the limit is reached
        assert timed(s.noop) >= 1.0  # now every reply waits
        assert timed(lambda: s.sendmail("a@example.org", ["b@example.net"],
                                        b"Subject: x\r\n\r\nx\r\n")) >= 1.0
        assert timed(s.noop) < 0.7  # a delivered message forgives the errors (Postfix)


@pytest.fixture
def three_mx() -> Iterator[tuple[LoopbackDNS, list[ThreadedSink]]]:
    first = ThreadedSink(host="127.0.0.2").start()
    sinks = [first] + [ThreadedSink(host=f"127.0.0.{n}", port=first.port).start()
                       for n in (3, 4)]
    with LoopbackDNS() as dns:
        for n, sink in enumerate(sinks, 1):
            dns.zone.add_mx("example.test", 10 * n, f"mx{n}.example.test")
            dns.zone.add_a(f"mx{n}.example.test", sink.host)
        yield dns, sinks
    for sink in sinks:
        sink.stop()


@pytest.mark.parametrize(("limit", "contacted"), [("2", 2), ("0", 3)])
def test_mx_session_limit(smtp_relay_factory: Factory,
                          three_mx: tuple[LoopbackDNS, list[ThreadedSink]],
                          limit: str, contacted: int) -> None:
    dns, sinks = three_mx
    # Each MX greets and takes EHLO, then cannot do the STARTTLS we require: a session
    # that smtp_mx_session_limit counts.
    relay = smtp_relay_factory({
        "dns_nameservers": dns.nameserver,
        "transport_maps": f"inline:{{ example.test = smtp:example.test:{sinks[0].port} }}",
        "smtp_tls_security_level": "encrypt", "smtp_mx_session_limit": limit,
        "minimal_backoff_time": "1h", "maximal_backoff_time": "1h",
    }, capture=False)
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.test"], b"Subject: x\r\n\r\nx\r\n")
    relay.wait_queue(lambda q: len(q) == 1 and "delay_reason" in q[0]["recipients"][0])
    reached = [any("connection 1 from" in line for line in sink.transcript) for sink in sinks]
    assert reached == [True] * contacted + [False] * (3 - contacted)
    assert "TLS is required, but was not offered by host mx" in relay.log()


@pytest.mark.parametrize("parameter,script,where", [
    ("smtp_mail_timeout", PeerScript(mail=Fault.HANG), "MAIL FROM"),
    ("smtp_rcpt_timeout", PeerScript(rcpt=Fault.HANG), "RCPT TO"),
    ("smtp_data_init_timeout", PeerScript(data=Fault.HANG), "DATA"),
])
def test_smtp_stage_timeouts_from_main_cf(
    relay_daemon: MakeDaemon, parameter: str, script: PeerScript, where: str,
) -> None:
    """The defaults are minutes; with the parameter at 2s the stall is cut in seconds."""
    with ThreadedPeer(script) as peer:
        d = relay_daemon({
            parameter: "2s",
            "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{peer.port} }}",
            "minimal_backoff_time": "1h",
            "maximal_backoff_time": "1h",
            "queue_run_delay": "1h",
        })
        start = time.monotonic()
        qid = smtp_send(d.host, d.port, ["bob@example.net"])
        log = d.wait_log(f"{qid}: to=<bob@example.net>", timeout=20)
        elapsed = time.monotonic() - start
        line = next(x for x in log.splitlines() if f"{qid}: to=<bob@example.net>" in x)
        assert "status=deferred" in line, line
        assert "timed out while" in line and where in line, line
        assert 1.5 <= elapsed < 15, elapsed
        wait_until(lambda: qid in d.queue_files("deferred"), 10, "the deferral")
        assert peer.messages == [] or not any(m.accepted for m in peer.messages)
