"""TLS reports (RFC 8460) and ``relay tls``: counted sessions, the JSON, the report mail,
``relay tls report --dry-run`` and ``relay tls policy DOMAIN`` against a daemon that
delivers by DANE through the test DNS server."""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay.routing import Resolver
from relay.tls.policy import ReportScope, TlsEvent
from relay.tls.report import ReportSettings, TlsReports, parse_tlsrpt
from spool import Spool
from tests.support.certs import make_certs
from tests.support.daemon import RelayDaemon
from tests.support.dnsserver import LoopbackDNS
from tests.support.peers import PeerScript, ThreadedPeer

pytestmark = pytest.mark.timeout(90)

SETTINGS = ReportSettings("relay.test", "postmaster@relay.test", "mx.relay.test",
                          "postmaster@relay.test")
STS = ReportScope("sts", "sts.test", ("version: STSv1", "mode: enforce", "mx: mx.sts.test",
                                      "max_age: 86400"), ("mx.sts.test",))
DAY = "2026-03-01"
NOON = datetime.datetime(2026, 3, 1, 12, tzinfo=datetime.UTC).timestamp()


@pytest.mark.parametrize("records,rua", [
    (["v=TLSRPTv1; rua=mailto:tls@reports.test"], ("tls@reports.test",)),
    (["v=TLSRPTv1;rua=mailto:a@x.test,https://x.test/r,mailto:b%40y@y.test?subject=x"],
     ("a@x.test", "b@y@y.test")),
    (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], ()),
    (["v=spf1 -all"], ()),
])
def test_tlsrpt_records(records: list[str], rua: tuple[str, ...]) -> None:
    assert parse_tlsrpt(records) == rua


def test_counts_become_a_report_and_a_mail(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    with LoopbackDNS() as dns:
        dns.zone.add_txt("_smtp._tls.sts.test", "v=TLSRPTv1; rua=mailto:tls@reports.test")
        now = [NOON]
        reports = TlsReports(spool, SETTINGS, Resolver([dns.nameserver]), clock=lambda: now[0])
        success = TlsEvent(STS, "", "127.0.0.1", "127.0.0.2", "mx.sts.test")
        expired = TlsEvent(STS, "certificate-expired", "127.0.0.1", "127.0.0.2", "mx.sts.test")
        reports.record([success, success, expired])
        reports.flush()
        reports.record([success])  # merged with what is already on disk
        reports.flush()

        async def run() -> tuple[list[object], int, int]:
            made, failed = await reports.reports(DAY)
            assert failed == []
            early = await reports.send_due()  # the day is not over yet
            now[0] = NOON + 13 * 3600  # an hour after its end
            late = await reports.send_due()
            return made, early, late

        made, early, late = asyncio.run(run())
    [report] = made
    document = report.document  # type: ignore[attr-defined]
    assert document["date-range"] == {"start-datetime": "2026-03-01T00:00:00Z",
                                      "end-datetime": "2026-03-01T23:59:59Z"}
    assert document["organization-name"] == "relay.test"
    [policy] = document["policies"]
    assert policy["policy"] == {"policy-type": "sts", "policy-string": list(STS.policy_strings),
                                "policy-domain": "sts.test", "mx-host": ["mx.sts.test"]}
    assert policy["summary"] == {"total-successful-session-count": 3,
                                 "total-failure-session-count": 1}
    assert policy["failure-details"] == [{
        "result-type": "certificate-expired", "sending-mta-ip": "127.0.0.1",
        "receiving-mx-hostname": "mx.sts.test", "receiving-ip": "127.0.0.2",
        "failed-session-count": 1}]
    assert (early, late) == (0, 1)
    assert spool.record_names("tlsrpt") == []  # sent once, never again
    [(_, env)] = list(spool.envelopes(("incoming",)))
    assert env.sender == "" and [r.address for r in env.recipients] == ["tls@reports.test"]
    message = email.message_from_bytes(spool.read_content(env.queue_id),
                                       policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Domain"] == "sts.test"
    assert message["TLS-Report-Submitter"] == "mx.relay.test"
    assert message["TLS-Required"] == "No"
    assert message["Subject"].startswith("Report Domain: sts.test Submitter: mx.relay.test "
                                         "Report-ID: <2026-03-01.")
    [attachment] = [p for p in message.iter_attachments()]
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    filename = attachment.get_filename()
    assert filename.startswith("mx.relay.test!sts.test!1772323200!1772409599!")
    assert filename.endswith(".json.gz")
    sent = json.loads(gzip.decompress(attachment.get_content()))
    assert sent["policies"] == document["policies"]


def test_no_tlsrpt_record_no_report(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    now = [NOON]
    with LoopbackDNS() as dns:
        reports = TlsReports(spool, SETTINGS, Resolver([dns.nameserver]), clock=lambda: now[0])
        reports.record([TlsEvent(STS)])
        now[0] = NOON + 86400
        assert asyncio.run(reports.send_due()) == 0
    assert list(spool.envelopes(("incoming",))) == []
    assert spool.record_names("tlsrpt") == []  # nobody wants it: dropped


def relay_command(d: RelayDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli.main", "tls", "-c",
                           str(d.config_dir), *args], capture_output=True, text=True,
                          timeout=60, env=d.env, check=False)


def test_dane_delivery_is_counted_and_shown(tmp_path: Path) -> None:
    """relay serve at the dane level delivers to an MX with a DANE-EE record; ``relay
    tls policy`` says so, and ``relay tls report --dry-run`` shows the session."""
    certs = make_certs("mx.dane.test")
    good = certs["good"]
    with LoopbackDNS() as dns, ThreadedPeer(PeerScript(hostname="mx.dane.test", starttls=True),
                                            tls_context=good.server_context()) as peer:
        zone = dns.zone
        zone.add_mx("dane.test", 10, "mx.dane.test").add_a("mx.dane.test", "127.0.0.1")
        zone.add_tlsa(f"_{peer.port}._tcp.mx.dane.test", *good.tlsa_3_1_1())
        zone.add_txt("_smtp._tls.dane.test", "v=TLSRPTv1; rua=mailto:tlsrpt@dane.test")
        zone.secure("dane.test", "mx.dane.test", f"_{peer.port}._tcp.mx.dane.test")
        d = RelayDaemon(tmp_path / "relay", {
            "transport_maps": f"inline:{{ dane.test = smtp:dane.test:{peer.port} }}",
            "dns_nameservers": dns.nameserver, "smtp_dns_support_level": "dnssec",
            "dns_trust_ad": "yes", "smtp_tls_security_level": "dane",
            "smtp_tls_loglevel": "1",
        }).start()
        try:
            policy = relay_command(d, "policy", "dane.test")
            import smtplib

            with smtplib.SMTP(d.host, d.port, timeout=10) as client:
                client.sendmail("a@relay.test", ["u@dane.test"], "Subject: dane\r\n\r\nx\r\n")
            log = d.wait_log("status=sent", timeout=30)
        finally:
            d.stop()  # the queue manager writes its counts on the way out
        report = relay_command(d, "report", "--dry-run")
    assert policy.returncode == 0, policy.stderr
    assert "next hop: dane.test:" in policy.stdout
    assert "MX RRset DNSSEC-validated: yes" in policy.stdout
    assert f"mx.dane.test[127.0.0.1]:{peer.port}: dane (DANE), certificate must match " \
           "mx.dane.test or dane.test, 1 TLSA record(s)" in policy.stdout
    assert f"Verified TLS connection established to mx.dane.test[127.0.0.1]:{peer.port}" in log
    assert report.returncode == 0, report.stderr
    assert ": to tlsrpt@dane.test" in report.stdout
    document = json.loads(report.stdout.split("\n", 1)[1])
    [entry] = document["policies"]
    assert entry["policy"]["policy-type"] == "tlsa"
    assert entry["summary"] == {"total-successful-session-count": 1,
                                "total-failure-session-count": 0}
