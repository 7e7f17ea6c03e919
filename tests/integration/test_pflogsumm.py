"""The maillog as Postfix's own log analyser reads it: pflogsumm's Grand Totals.

A scenario runs through ``relay serve`` (a subprocess) with real SMTP peers: mail
delivered to a sink, mail deferred (its next hop refuses connections), mail bounced
(its next hop answers 550) together with the non-delivery notice to its sender.  Then
/usr/sbin/pflogsumm reads the maillog and its Grand Totals must be the numbers Postfix
would produce for the same traffic.  Postfix counts a message as *received* when
smtpd logs ``client=`` (a notice made by bounce(8) has no such line), *delivered* per
``status=sent`` line (the notice's delivery included), *deferred* per message with a
``status=deferred`` line and *bounced* per ``status=bounced`` line.  A mismatch here
means our log lines would break the tools Postfix administrators already use.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable

import pytest

from tests.integration.test_relay_e2e import Client, route
from tests.support.daemon import RelayDaemon, free_port
from tests.support.peers import PeerScript, Reply, ThreadedPeer
from tests.support.tools import require

PFLOGSUMM = "/usr/sbin/pflogsumm"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _pflogsumm_installed() -> None:
    require("pflogsumm", PFLOGSUMM)  # Debian package pflogsumm

MakeDaemon = Callable[..., RelayDaemon]


def pflogsumm_supports_syslog_name() -> bool:
    try:
        out = subprocess.run([PFLOGSUMM, "--help"], check=False, capture_output=True,
                             timeout=30)
    except OSError:
        return False
    return b"--syslog-name" in out.stdout + out.stderr


def grand_totals(report: str) -> dict[str, int]:
    """The 'Grand Totals' section as {label: number}; 'deferred' also gives 'deferrals'."""
    section = report.split("Grand Totals", 1)[1]
    section = re.split(r"\n(?:Per-Day|Per-Hour|Host/Domain|Senders by|message deferral)", section)[0]
    totals: dict[str, int] = {}
    units = {"": 1, "k": 1024, "m": 1024 * 1024}
    for line in section.splitlines():
        m = re.match(r"^\s*(\d+)([km]?)\s+(\S.*?)\s*$", line)
        if not m:
            continue
        number, unit, label = int(m.group(1)), m.group(2), m.group(3)
        extra = re.match(r"deferred\s+\((\d+)\s*deferrals\)", label)
        if extra:
            label = "deferred"
            totals["deferrals"] = int(extra.group(1))
        label = re.sub(r"\s*\(\d+%\)$", "", label)
        totals[label] = number * units[unit]
    return totals


def run_scenario(d: RelayDaemon, sink: ThreadedPeer) -> None:
    """5 delivered, 2 deferred, 1 bounced with its notice delivered: 8 received from SMTP."""
    with Client(d.port) as c:
        for i in range(5):
            c.send("alice@ok.test", [f"r{i}@ok.test"], b"Subject: ok %d\r\n\r\nhello\r\n" % i)
        for i in range(2):
            c.send("alice@ok.test", [f"d{i}@closed.test"], b"Subject: later %d\r\n\r\nhi\r\n" % i)
        bounced_id, _ = c.send("bob@ok.test", ["nobody@bad.test"],
                               b"Subject: bounce me\r\n\r\nhi\r\n")
    sink.wait_for(6, timeout=15)
    d.wait_log("status=deferred", count=2)
    d.wait_log(f"{bounced_id}: removed")
    d.wait_log(": removed", count=7)  # 5 delivered, the bounced one and its notice


@pytest.mark.parametrize("syslog_name", ["postfix", "relay"])
def test_pflogsumm_grand_totals(relay_daemon: MakeDaemon, syslog_name: str) -> None:
    args = [PFLOGSUMM]
    if syslog_name != "postfix":
        if not pflogsumm_supports_syslog_name():
            pytest.skip("this pflogsumm has no --syslog-name option")
        args.append(f"--syslog-name={syslog_name}")
    refuse = PeerScript(rcpt=Reply(550, "5.1.1 <nobody@bad.test>: Recipient address rejected"))
    with ThreadedPeer() as sink, ThreadedPeer(refuse) as bad:
        params = {
            "transport_maps": route(**{
                "ok.test": f"smtp:[127.0.0.1]:{sink.port}",
                "closed.test": f"smtp:[127.0.0.1]:{free_port()}",
                "bad.test": f"smtp:[127.0.0.1]:{bad.port}",
            }),
            "minimal_backoff_time": "1h", "maximal_backoff_time": "1h", "queue_run_delay": "1h",
        }
        if syslog_name != "relay":
            params["syslog_name"] = syslog_name
        d = relay_daemon(params)
        run_scenario(d, sink)
        log = d.log()
        assert f" {syslog_name}/smtpd[" in log
        bad_port = bad.port
        report = subprocess.run([*args, str(d.maillog)], capture_output=True, text=True,
                                timeout=30, check=True).stdout
    totals = grand_totals(report)
    sizes = {qid: int(size) for qid, size in
             re.findall(r"(\w+): from=<[^>]*>, size=(\d+), nrcpt", log)}
    received = re.findall(r"smtpd\[\d+\]: (\w+): client=", log)
    delivered = re.findall(r"(\w+): to=<[^>]*>, relay=[^,]+, .*status=sent", log)
    assert len(received) == 8 and len(delivered) == 6
    assert totals == {
        "received": 8,  # the notice is not received: bounce(8) makes it, not smtpd
        "delivered": 6,  # 5 + the notice to bob@ok.test
        "forwarded": 0,
        "deferred": 2,
        "deferrals": 2,
        "bounced": 1,
        "rejected": 0,
        "reject warnings": 0,
        "held": 0,
        "discarded": 0,
        "bytes received": sum(sizes[q] for q in received),
        "bytes delivered": sum(sizes[q] for q in delivered),
        "senders": 2,
        "sending hosts/domains": 1,
        "recipients": 6,
        "recipient hosts/domains": 1,
    }, report
    deferrals = report.split("message deferral detail", 1)[1].split("message bounce detail")[0]
    assert re.search(r"smtp \(total: 2\)\s+2\s+127\.0\.0\.1\[127\.0\.0\.1\]:\d+: "
                     r"Connection refused", deferrals), deferrals
    bounces = report.split("message bounce detail", 1)[1].split("message reject detail")[0]
    assert re.search(rf"127\.0\.0\.1\[127\.0\.0\.1\]:{bad_port} \(total: 1\)\s+1\s+"
                     r".*Recipient address rejected", bounces), bounces
    assert "Warnings: none" in report and "Fatal Errors: none" in report
