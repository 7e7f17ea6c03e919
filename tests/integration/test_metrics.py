"""GET /metrics on a running daemon: both processes in one scrape, counting what really
happened over SMTP; a restart of the daemon visible in it; the domain label bounded; and
Debian's prometheus-postfix-exporter, reading the same maillog (syslog_name = postfix),
counting the same deliveries, deferrals and bounces.

The daemon runs as a subprocess with ``http_listen`` on a free loopback port; the next hop
is a scripted peer that accepts, defers (450) or refuses (550) by recipient; clients
outside mynetworks connect from 127.0.0.5.
"""

from __future__ import annotations

import smtplib
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import RelayDaemon, free_port
from tests.support.peers import PeerScript, Reply
from tests.support.tools import require

pytestmark = pytest.mark.timeout(90)

MakeDaemon = Callable[..., RelayDaemon]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Recipients by fate at the scripted next hop.
SENT = ["s1@x.example", "s2@x.example", "s3@y.example"]
DEFERRED = ["later@x.example"]
BOUNCED = ["nobody@x.example", "gone@y.example"]


def script() -> PeerScript:
    return PeerScript(rcpt_by_address={
        **{a: Reply(450, "4.2.0 mailbox busy") for a in DEFERRED},
        **{a: Reply(550, "5.1.1 no such user") for a in BOUNCED},
    })


def params(peer: Any, **more: str) -> dict[str, str]:
    return {
        "http_listen": f"127.0.0.1:{free_port()}",
        # Every outcome by SMTP (bounce notices too, to the sender's domain).
        "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{peer.port} }}",
        "mynetworks": "127.0.0.1/32",
        "minimal_backoff_time": "1h", "maximal_backoff_time": "1h", "queue_run_delay": "1h",
        **more,
    }


def scrape(d: RelayDaemon) -> Samples:
    url = f"http://{d.params['http_listen']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name
               and all(dict(ls).get(k) == want for k, want in labels.items()))


def send(d: RelayDaemon, recipient: str, sender: str = "sender@z.example",
         source: str = "127.0.0.1") -> None:
    with smtplib.SMTP(d.host, d.port, timeout=10, source_address=(source, 0)) as smtp:
        smtp.sendmail(sender, [recipient], b"Subject: metrics\r\n\r\nhello\r\n")


def run_traffic(d: RelayDaemon) -> None:
    """Each recipient in a message of its own; one relay attempt refused; wait until every
    outcome (and each bounce notice's own delivery) is logged."""
    for rcpt in SENT + DEFERRED + BOUNCED:
        send(d, rcpt)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(d, "x@elsewhere.example", source="127.0.0.5")
    d.wait_log("status=deferred", count=len(DEFERRED))
    d.wait_log("status=bounced", count=len(BOUNCED))
    # The notices go to sender@z.example through the same peer.
    d.wait_log("status=sent", count=len(SENT) + len(BOUNCED))


def test_one_scrape_shows_both_processes(relay_daemon: MakeDaemon, threaded_peer: Any) -> None:
    peer = threaded_peer(script())
    d = relay_daemon(params(peer))
    run_traffic(d)
    s = scrape(d)
    assert value(s, "relay_up", process="qmgr") == 1
    # The listener's part.
    messages = len(SENT + DEFERRED + BOUNCED)
    assert value(s, "relay_messages_accepted_total") == messages
    assert value(s, "relay_spool_commit_seconds_count") == messages
    assert 0 < value(s, "relay_spool_commit_seconds_sum") < messages
    # one connection each, the refused one, and the fixture's probe at start
    assert value(s, "relay_smtpd_connections_total") == messages + 2
    assert value(s, "relay_smtpd_rejects_total", reason="relay_denied") == 1
    assert total(s, "relay_smtpd_rejects_total") == 1
    assert value(s, "relay_queue_messages", queue="deferred") == len(DEFERRED)
    assert value(s, "relay_queue_messages", queue="incoming") == 0
    assert 0 < value(s, "relay_queue_oldest_age_seconds", queue="deferred") < 60
    assert value(s, "relay_queue_oldest_age_seconds", queue="hold") == 0
    assert value(s, "relay_queue_deferred_domain_messages", domain="x.example") == 1
    assert value(s, "relay_queue_deferred_domain_messages", domain="other") == 0
    assert value(s, "relay_spool_free_bytes") > 0
    assert value(s, "process_start_time_seconds") > 0
    # The queue manager's part.
    assert value(s, "relay_deliveries_total", status="sent", domain="x.example") == 2
    assert value(s, "relay_deliveries_total", status="sent", domain="y.example") == 1
    assert value(s, "relay_deliveries_total", status="sent", domain="z.example") == len(BOUNCED)
    assert value(s, "relay_deliveries_total", status="deferred", domain="x.example") == 1
    assert value(s, "relay_deliveries_total", status="bounced", domain="x.example") == 1
    assert value(s, "relay_deliveries_total", status="bounced", domain="y.example") == 1
    finals = len(SENT) + len(BOUNCED) * 2  # the notices are delivered too
    assert value(s, "relay_delivery_delay_seconds_count") == finals
    assert value(s, "relay_delivery_delay_seconds_bucket", le="+Inf") == finals
    assert value(s, "relay_qmgr_process_start_time_seconds") > 0
    # Idle destinations have no series: only those with mail in flight, or dead.
    assert not any(n.startswith("relay_destination_") for n, _ in s)


def test_destinations_in_flight_and_dead(relay_daemon: MakeDaemon, threaded_peer: Any) -> None:
    slow = threaded_peer(PeerScript(mail_reply_delay=3.0))
    d = relay_daemon({
        "http_listen": f"127.0.0.1:{free_port()}",
        "transport_maps": (f"inline:{{ slow.example = smtp:[127.0.0.1]:{slow.port}, "
                           "dead.example = smtp:[127.0.0.1]:1 }"),
        # One failed connection makes a destination dead (Postfix's failed cohort).
        "initial_destination_concurrency": "1",
        "minimal_backoff_time": "1h", "maximal_backoff_time": "1h", "queue_run_delay": "1h",
    })
    send(d, "u@dead.example")
    d.wait_log("status=deferred")
    send(d, "u@slow.example")
    end = time.monotonic() + 10
    while not slow.connection_count:  # the delivery has started: MAIL waits 3 s for its reply
        assert time.monotonic() < end
        time.sleep(0.05)
    s = scrape(d)
    assert value(s, "relay_destination_dead", destination="[127.0.0.1]:1") == 1
    assert value(s, "relay_destination_concurrency", destination="[127.0.0.1]:1") == 0
    slow_hop = f"[127.0.0.1]:{slow.port}"
    assert value(s, "relay_destination_concurrency", destination=slow_hop) == 1
    assert value(s, "relay_destination_dead", destination=slow_hop) == 0
    assert value(s, "relay_destination_concurrency_limit", destination=slow_hop) == 1
    assert value(s, "relay_queue_messages", queue="active") == 1


def test_a_restart_is_visible(relay_daemon: MakeDaemon, threaded_peer: Any) -> None:
    peer = threaded_peer(script())
    d = relay_daemon(params(peer))
    send(d, SENT[0])
    d.wait_log("status=sent")
    before = scrape(d)
    assert value(before, "relay_messages_accepted_total") == 1
    time.sleep(1.1)  # start times are in whole... seconds at the least
    d.stop()
    d.start()
    after = scrape(d)
    for name in ("process_start_time_seconds", "relay_qmgr_process_start_time_seconds"):
        assert value(after, name) > value(before, name), name
    assert value(after, "relay_messages_accepted_total") == 0
    assert total(after, "relay_deliveries_total") == 0


def test_domain_label_is_bounded(relay_daemon: MakeDaemon, threaded_peer: Any) -> None:
    peer = threaded_peer()
    d = relay_daemon(params(peer, relay_metrics_domain_limit="2"))
    for n, domain in enumerate(("a.example", "b.example", "c.example", "d.example")):
        for _ in range(4 - n):  # a busiest, d quietest
            send(d, f"u@{domain}")
    d.wait_log("status=sent", count=10)
    s = scrape(d)
    domains = {dict(ls)["domain"] for (n, ls) in s if n == "relay_deliveries_total"}
    assert domains == {"a.example", "b.example", "other"}
    assert total(s, "relay_deliveries_total") == 10
    assert value(s, "relay_deliveries_total", status="sent", domain="other") == 3


def test_postfix_exporter_counts_the_same(relay_daemon: MakeDaemon, threaded_peer: Any,
                                          tmp_path: Path) -> None:
    """Debian's postfix_exporter (0.3.0) reads relay's maillog as it reads Postfix's: each
    smtp ``to=`` line is one observation of postfix_smtp_delivery_delay_seconds per stage,
    each ``status=deferred`` one postfix_smtp_status_deferred; it keeps no count of
    bounced recipients, but counts bounce(8)'s lines, one per non-delivery notice, which is
    one per bounced recipient here (each is in a message of its own)."""
    exporter = require("prometheus-postfix-exporter")
    peer = threaded_peer(script())
    d = relay_daemon(params(peer, syslog_name="postfix"), start=False)
    d.maillog.write_text("")  # the exporter tails it from its end, as it is when it starts
    port = free_port()
    with open(tmp_path / "exporter.out", "wb") as out:
        proc = subprocess.Popen([exporter, f"--postfix.logfile_path={d.maillog}",
                                 f"--web.listen-address=127.0.0.1:{port}",
                                 f"--postfix.showq_path={tmp_path / 'no-showq'}"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        theirs = _exporter_metrics(port, proc)
        d.start()
        run_traffic(d)
        ours = scrape(d)
        end = time.monotonic() + 10
        while True:  # it tails the file: give it the time to read the last lines
            theirs = _exporter_metrics(port, proc)
            lines = total(theirs, "postfix_smtp_delivery_delay_seconds_count") / 4
            if lines >= total(ours, "relay_deliveries_total") or time.monotonic() > end:
                break
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)
    sent = total(ours, "relay_deliveries_total", status="sent")
    deferred = total(ours, "relay_deliveries_total", status="deferred")
    bounced = total(ours, "relay_deliveries_total", status="bounced")
    assert (sent, deferred, bounced) == (len(SENT) + len(BOUNCED), len(DEFERRED), len(BOUNCED))
    # Deliveries: every smtp to= line, whatever its status.
    assert lines == sent + deferred + bounced
    # Deferrals.
    # (prometheus_client's parser names every counter sample ..._total)
    assert value(theirs, "postfix_smtp_status_deferred_total") == deferred
    # Bounces: one notice per bounced recipient.
    assert value(theirs, "postfix_unsupported_log_entries_total", service="bounce") == bounced
    # And what the listener counts.
    assert value(theirs, "postfix_smtpd_connects_total") == value(
        ours, "relay_smtpd_connections_total")
    assert total(theirs, "postfix_smtpd_messages_processed_total") == value(
        ours, "relay_messages_accepted_total")
    assert value(theirs, "postfix_smtpd_messages_rejected_total", code="554") == value(
        ours, "relay_smtpd_rejects_total", reason="relay_denied")
    assert value(theirs, "postfix_cleanup_messages_processed_total") == value(
        ours, "relay_messages_accepted_total")


def _exporter_metrics(port: int, proc: subprocess.Popen[bytes]) -> Samples:
    end = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(text) for s in f.samples}
        except OSError:
            assert proc.poll() is None, "postfix_exporter exited"
            assert time.monotonic() < end, "postfix_exporter did not answer"
            time.sleep(0.1)
