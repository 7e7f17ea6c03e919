"""relay.metrics without a daemon: the reject reasons of every refusal the listener can send,
the bounded domain label, and the merged exposition (the queue manager's part parsed and
served with the listener's, relay_up saying whether it answered)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from relay.metrics import DeliveryCounts, ListenerMetrics
from relay.outcome import Report, Status
from relay.smtpd import replies
from relay.smtpd.counts import reject_reason
from spool import Spool

# Every refusal template in relay.smtpd.replies, and the reason an operator would file it
# under; a new reply that lands in "other" fails here until it is given a reason.
EXPECTED = {
    "PREGREET": "pipelining", "PIPELINING": "pipelining",
    "TOO_MANY_CONNECTIONS": "rate_limit", "TOO_MANY_MESSAGES": "rate_limit",
    "TOO_MANY_RECIPIENTS_FROM": "rate_limit", "TOO_MANY_LOGINS": "auth",
    "TOO_MANY_ERRORS": "error_limit", "TIMEOUT": "timeout", "SHUTTING_DOWN": "shutdown",
    "UNKNOWN_COMMAND": "syntax", "BAD_SYNTAX": "syntax", "COMMAND_TOO_LONG": "syntax",
    "NUL_IN_COMMAND": "syntax", "BARE_LF": "bare_newline", "NEED_HELO": "sequence",
    "NEED_STARTTLS": "tls_required", "CONFIG_ERROR": "other", "INTERNAL_ERROR": "other",
    "HELO_SYNTAX": "syntax", "EHLO_SYNTAX": "syntax", "RSET_SYNTAX": "syntax",
    "VRFY_SYNTAX": "syntax",
    "STARTTLS_SYNTAX": "syntax", "TLS_ACTIVE": "sequence", "NOT_IMPLEMENTED": "syntax",
    "AUTH_FAILED": "auth", "AUTH_NOT_ENABLED": "auth", "AUTH_ALREADY": "auth",
    "AUTH_IN_TRANSACTION": "sequence", "AUTH_SYNTAX": "auth", "AUTH_MECHANISM": "auth",
    "AUTH_ABORTED": "auth", "AUTH_MALFORMED": "auth", "AUTH_TEMPORARY": "auth",
    "MAIL_SYNTAX": "syntax", "NESTED_MAIL": "sequence", "BAD_SENDER": "syntax",
    "BAD_SIZE": "size", "BAD_RET": "syntax", "BAD_ENVID": "syntax",
    "BAD_AUTH_PARAMETER": "auth", "MULTIPLE_AUTH": "auth", "UNSUPPORTED_OPTION": "syntax",
    "MESSAGE_TOO_BIG": "size", "NO_SPACE": "storage", "RCPT_SYNTAX": "syntax",
    "NEED_MAIL": "sequence", "BAD_RECIPIENT": "syntax", "BAD_NOTIFY": "syntax",
    "BAD_ORCPT": "syntax", "TOO_MANY_RECIPIENTS": "recipient_limit",
    "RELAY_DENIED": "relay_denied", "RELAY_DEFERRED": "relay_denied",
    "ACCESS_DENIED": "relay_denied", "ACCESS_DEFERRED": "relay_denied",
    "DATA_SYNTAX": "syntax", "NEED_RCPT": "sequence", "NO_VALID_RECIPIENTS": "sequence",
    "NUL_IN_CONTENT": "content", "TOO_MANY_HOPS": "content", "WRITE_ERROR": "storage",
    "BAD_UTF8": "syntax", "ETRN_SYNTAX": "syntax", "ETRN_BAD_SITE": "syntax",
    "ETRN_IN_TRANSACTION": "sequence", "ETRN_DENIED": "etrn", "ETRN_UNAVAILABLE": "etrn",
}


def refusals() -> dict[str, str]:
    found = {}
    for name in dir(replies):
        text = getattr(replies, name)
        if not name.isupper() or not isinstance(text, str):
            continue
        filled = text.format(code=550, myhostname="mx.test", client="192.0.2.1",
                             recipient="a@b.test", option="X=1", mechanism="X",
                             challenge="", banner="x", address="a@b.test", queue_id="X",
                             site="example.com")
        if int(filled[:3]) >= 400:
            found[name] = filled
    return found


def test_every_refusal_has_its_reason() -> None:
    got = {name: reject_reason(text) for name, text in refusals().items()}
    assert got == {name: EXPECTED[name] for name in got}
    assert set(got) == set(EXPECTED), "replies.py and this table differ"


def test_domain_label_is_bounded_to_the_busiest() -> None:
    counts = DeliveryCounts(limit=2)
    for domain, n in (("a.test", 3), ("b.test", 2), ("c.test", 1)):
        for _ in range(n):
            counts.add(Status.SENT, domain)
    assert set(counts.labelled) == {"a.test", "b.test"}
    assert counts.other[Status.SENT] == 1
    # c.test becomes much busier: it takes the quietest one's place at the next scrape.
    for _ in range(20):
        counts.add(Status.DEFERRED, "c.test")
    family = next(iter(counts.collect()))
    series = {(s.labels["status"], s.labels["domain"]): s.value for s in family.samples}
    assert set(counts.labelled) == {"a.test", "c.test"}
    assert series[("sent", "a.test")] == 3
    assert ("sent", "b.test") not in series  # gone with its place
    assert series[("deferred", "other")] == 20  # counted before c.test had a place
    assert series[("sent", "other")] == 1
    for _ in range(2):
        counts.add(Status.BOUNCED, "c.test")
    series = {(s.labels["status"], s.labels["domain"]): s.value
              for s in next(iter(counts.collect())).samples}
    assert series[("bounced", "c.test")] == 2  # its own series from its promotion on


def test_domain_candidates_stay_bounded() -> None:
    counts = DeliveryCounts(limit=3)
    for n in range(5000):
        counts.add(Status.SENT, f"d{n}.test")
    assert len(counts.scores) <= 64
    assert len(counts.labelled) == 3
    assert counts.other[Status.SENT] == 4997


def test_exposition_merges_the_qmgr_and_says_when_it_is_down(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    listener = ListenerMetrics(spool)
    listener.connected()
    listener.refused("554 5.7.1 <a@b.test>: Relay access denied")
    listener.queued(0.004)

    class Sched:
        destinations: ClassVar[dict[str, object]] = {}

        class clock:
            @staticmethod
            def time() -> float:
                return time.time()

    qmgr = metrics.QmgrMetrics(Sched(), domain_limit=50)  # type: ignore[arg-type]
    now = time.time()
    qmgr(Report(Status.SENT, now, "ID", "s@x.test", "r@y.test", "mx[192.0.2.1]:25", "2.0.0",
                "250 ok", now - 30))
    text = listener.exposition(qmgr.exposition()).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("relay_up", (("process", "qmgr"),))] == 1
    assert samples[("relay_smtpd_connections_total", ())] == 1
    assert samples[("relay_smtpd_rejects_total", (("reason", "relay_denied"),))] == 1
    assert samples[("relay_smtpd_rejects_total", (("reason", "size"),))] == 0
    assert samples[("relay_messages_accepted_total", ())] == 1
    assert samples[("relay_spool_commit_seconds_count", ())] == 1
    assert samples[("relay_deliveries_total", (("domain", "y.test"), ("status", "sent")))] == 1
    assert samples[("relay_delivery_delay_seconds_bucket", (("le", "60.0"),))] == 1
    assert samples[("relay_delivery_delay_seconds_bucket", (("le", "15.0"),))] == 0
    assert samples[("relay_queue_messages", (("queue", "deferred"),))] == 0
    assert ("process_start_time_seconds", ()) in samples
    assert ("relay_qmgr_process_start_time_seconds", ()) in samples
    assert text.count("# TYPE relay_deliveries_total counter") == 1

    down = listener.exposition(None).decode()
    assert 'relay_up{process="qmgr"} 0.0' in down
    assert "relay_deliveries_total" not in down and "relay_smtpd_connections_total 1.0" in down


@pytest.mark.parametrize("status", list(Status))
def test_only_final_outcomes_have_a_delay(status: Status) -> None:
    qmgr = metrics.QmgrMetrics(type("S", (), {"destinations": {}})(),  # type: ignore[arg-type]
                               domain_limit=5)
    now = time.time()
    qmgr(Report(status, now, "ID", "", "r@y.test", "none", "4.0.0", "x", now - 10))
    assert qmgr.delay._sum.get() == (10 if status.final else 0)
