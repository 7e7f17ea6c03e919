"""SMTP TLS reports (RFC 8460): daily aggregates of TLS sessions, and the report mail.

Owns the counting of TLS sessions that an MTA-STS or DANE policy governed (successes, and
failures by result type, sending and receiving address and MX host; RFC 8460 4.3), kept
per policy and UTC day in the spool (``state/tlsrpt/YYYY-MM-DD``, merged from memory every
minute and at stop), the ``_smtp._tls.DOMAIN`` TXT record (3: ``v=TLSRPTv1; rua=...``;
only ``mailto:`` addresses are used), the report's JSON (4.4), and the mail that carries
it (5.3: ``multipart/report; report-type="tlsrpt"`` with the gzip'ed JSON as an
``application/tlsrpt+gzip`` attachment named ``submitter!domain!begin!end!id.json.gz``).
A report goes out through relay's own queue (spool.enqueue, then the scheduler's wakeup)
with the null sender and ``TLS-Required: No``: a domain whose TLS is broken is the one that
most needs its report.  A day is reported once it has been over for an hour, by the queue
manager when smtp_tlsrpt_enable = yes, or by ``relay tls report``; ``--dry-run`` shows what
would go out.

Never: delays or changes a delivery (counting is best-effort; a crash loses at most the
last minute's counts), sends a report for a domain without a TLSRPT record.  A day's
record is removed once its reports are queued, under a lock, so no day is sent twice.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import email.utils
import fcntl
import gzip
import json
import logging
import os
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from relay.tls.policy import TlsEvent
from spool import Envelope, Recipient, Spool

__all__ = ["Report", "ReportSettings", "TlsReports", "parse_tlsrpt"]

log = logging.getLogger("relay.smtp")

KIND = "tlsrpt"
FLUSH_INTERVAL = 60.0
SEND_AFTER = 3600.0  # a day is reported once it has been over this long
KEEP_DAYS = 7  # a day that could not be reported (DNS trouble) is dropped after this


class TxtLookup(Protocol):
    async def txt(self, name: str) -> Any: ...


def parse_tlsrpt(records: Iterable[str]) -> tuple[str, ...]:
    """The ``mailto:`` addresses of a ``_smtp._tls`` TXT record set (RFC 8460 3); none
    when there is not exactly one ``v=TLSRPTv1`` record."""
    ours = [r for r in records if r.replace(" ", "").startswith("v=TLSRPTv1;")]
    if len(ours) != 1:
        return ()
    addresses: list[str] = []
    for field in ours[0].split(";")[1:]:
        name, _, value = field.strip().partition("=")
        if name.strip() != "rua":
            continue
        for uri in value.split(","):
            uri = uri.strip()
            if uri.lower().startswith("mailto:"):
                address = urllib.parse.unquote(uri[7:].partition("?")[0])
                if "@" in address and address not in addresses:
                    addresses.append(address)
    return tuple(addresses)


@dataclass(frozen=True, slots=True)
class ReportSettings:
    """Who reports: RFC 8460's organization-name and contact-info, the submitter (this
    host's name), and the From: address of the report mail."""

    organization: str
    contact: str
    submitter: str
    from_address: str


@dataclass(frozen=True, slots=True)
class Report:
    """One report for one policy domain and day, and where it goes."""

    domain: str
    day: str
    rua: tuple[str, ...]
    document: dict[str, Any]

    def json(self) -> bytes:
        return json.dumps(self.document, indent=2).encode()


def _day(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d")


def _day_bounds(day: str) -> tuple[int, int]:
    start = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    begin = int(start.timestamp())
    return begin, begin + 86400


class TlsReports:
    """The counts of one queue manager, and the reports they make."""

    def __init__(self, spool: Spool, settings: ReportSettings, dns: TxtLookup,
                 *, clock: Callable[[], float] | None = None) -> None:
        import time

        self.spool = spool
        self.settings = settings
        self.dns = dns
        self.clock = clock or time.time
        self._pending: dict[str, dict[str, Any]] = {}  # day -> data not yet flushed

    # -- counting --

    def record(self, events: Iterable[TlsEvent]) -> None:
        day = _day(self.clock())
        data = self._pending.setdefault(day, {})
        for event in events:
            scope = event.scope
            policy = {"policy-type": scope.policy_type,
                      "policy-string": list(scope.policy_strings),
                      "policy-domain": scope.policy_domain,
                      "mx-host": list(scope.mx_host)}
            key = json.dumps(policy, sort_keys=True)
            entry = data.setdefault(key, {"policy": policy, "success": 0, "failures": {}})
            if not event.result_type:
                entry["success"] += 1
                continue
            detail = {"result-type": event.result_type, "sending-mta-ip": event.sending_ip,
                      "receiving-mx-hostname": event.receiving_mx_hostname,
                      "receiving-ip": event.receiving_ip}
            fkey = json.dumps(detail, sort_keys=True)
            entry["failures"][fkey] = entry["failures"].get(fkey, 0) + 1

    def flush(self) -> None:
        """Merge the counts in memory into the day records in the spool."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        with self._locked():
            for day, data in pending.items():
                stored = self._read(day)
                for key, entry in data.items():
                    kept = stored.setdefault(key, {"policy": entry["policy"], "success": 0,
                                                   "failures": {}})
                    kept["success"] += entry["success"]
                    for fkey, count in entry["failures"].items():
                        kept["failures"][fkey] = kept["failures"].get(fkey, 0) + count
                self.spool.write_record(KIND, day, json.dumps(stored).encode())

    def _read(self, day: str) -> dict[str, Any]:
        raw = self.spool.read_record(KIND, day)
        if raw is None:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            log.warning("ignoring a damaged TLS report record for %s", day)
            return {}
        return data if isinstance(data, dict) else {}

    @contextlib.contextmanager
    def _locked(self) -> Any:
        path = os.path.join(self.spool.root, "state")
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(path, "tlsrpt.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- reporting --

    def days(self) -> list[str]:
        return [n for n in self.spool.record_names(KIND) if len(n) == 10]

    def due(self, now: float) -> list[str]:
        return [d for d in self.days() if _day_bounds(d)[1] + SEND_AFTER <= now]

    async def reports(self, day: str) -> tuple[list[Report], list[str]]:
        """The reports of one day, and the domains whose TLSRPT lookup failed."""
        data = await asyncio.to_thread(self._read, day)
        by_domain: dict[str, list[dict[str, Any]]] = {}
        for entry in data.values():
            by_domain.setdefault(entry["policy"]["policy-domain"], []).append(entry)
        begin, end = _day_bounds(day)
        reports, failed = [], []
        for domain in sorted(by_domain):
            answer = await self.dns.txt(f"_smtp._tls.{domain}")
            if getattr(answer, "error", ""):
                failed.append(domain)
                continue
            rua = parse_tlsrpt(str(item) for item in answer.items)
            if not rua:
                continue
            policies = []
            for entry in by_domain[domain]:
                failures = [{**json.loads(k), "failed-session-count": n}
                            for k, n in sorted(entry["failures"].items())]
                policies.append({
                    "policy": {k: v for k, v in entry["policy"].items() if v},
                    "summary": {"total-successful-session-count": entry["success"],
                                "total-failure-session-count": sum(
                                    f["failed-session-count"] for f in failures)},
                    "failure-details": [{k: v for k, v in f.items() if v != ""}
                                        for f in failures],
                })
            document = {
                "organization-name": self.settings.organization,
                "date-range": {
                    "start-datetime": _iso(begin), "end-datetime": _iso(end - 1)},
                "contact-info": self.settings.contact,
                "report-id": f"{day}.{uuid.uuid4().hex}@{self.settings.submitter}",
                "policies": policies,
            }
            reports.append(Report(domain, day, rua, document))
        return reports, failed

    def message(self, report: Report, now: float) -> bytes:
        """The report mail (RFC 8460 5.3), CRLF line ends."""
        s = self.settings
        begin, end = _day_bounds(report.day)
        report_id = report.document["report-id"]
        name = f"{s.submitter}!{report.domain}!{begin}!{end - 1}!{report_id.split('.')[1][:8]}"
        attachment = base64.encodebytes(gzip.compress(report.json(), mtime=0)).decode()
        boundary = f"tlsrpt-{uuid.uuid4().hex}"
        lines = [
            f"From: TLS reporting <{s.from_address}>",
            f"To: {', '.join(report.rua)}",
            f"Date: {email.utils.formatdate(now)}",
            (f"Subject: Report Domain: {report.domain} Submitter: {s.submitter} "
            f"Report-ID: <{report_id}>"),
            f"Message-ID: <{report_id}>",
            f"TLS-Report-Domain: {report.domain}",
            f"TLS-Report-Submitter: {s.submitter}",
            "TLS-Required: No",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type="tlsrpt"; boundary="{boundary}"',
            "",
            "This is a multipart message in MIME format.",
            "",
            f"--{boundary}",
            'Content-Type: text/plain; charset="us-ascii"',
            "Content-Transfer-Encoding: 7bit",
            "",
            (f"This is an aggregate TLS report from {s.submitter} for {report.domain}, "
            f"{report.day} (UTC)."),
            "",
            f"--{boundary}",
            "Content-Type: application/tlsrpt+gzip",
            "Content-Transfer-Encoding: base64",
            f'Content-Disposition: attachment; filename="{name}.json.gz"',
            "",
            *attachment.splitlines(),
            "",
            f"--{boundary}--",
            "",
        ]
        return "\r\n".join(lines).encode("ascii")

    async def send_due(self, wakeup: Callable[[Envelope], None] | None = None) -> int:
        """Queue the reports of every day that is due; returns how many were queued."""
        now = self.clock()
        sent = 0
        await asyncio.to_thread(self.flush)
        for day in self.due(now):
            reports, failed = await self.reports(day)
            for report in reports:
                body = self.message(report, now)
                env = Envelope(queue_id="", sender="",
                               recipients=tuple(Recipient(a) for a in report.rua),
                               arrival_time=now, size=len(body), client_name="localhost",
                               client_address="127.0.0.1", protocol="local")
                queued = await asyncio.to_thread(self.spool.enqueue, env, body)
                log.info("%s: TLS report for %s, %s, to %s", queued.queue_id, report.domain,
                         day, ", ".join(report.rua))
                if wakeup is not None:
                    wakeup(queued)
                sent += 1
            if not failed or _day_bounds(day)[1] + KEEP_DAYS * 86400 <= now:
                await asyncio.to_thread(self.spool.remove_record, KIND, day)
        return sent

    async def run(self, enabled: Callable[[], bool],
                  wakeup: Callable[[Envelope], None]) -> None:
        """The queue manager's task: flush every minute, send what is due when enabled."""
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                try:
                    if enabled():
                        await self.send_due(wakeup)
                    else:
                        await asyncio.to_thread(self.flush)
                except (OSError, ValueError) as exc:
                    log.warning("TLS reports: %s", exc)
        finally:
            with contextlib.suppress(OSError, ValueError):
                self.flush()


def _iso(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
