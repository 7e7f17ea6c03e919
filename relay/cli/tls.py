"""``relay tls``: what TLS relay would enforce for a domain, and the TLS reports it owes.

    relay tls [-c config_dir] policy DOMAIN
    relay tls [-c config_dir] report [--dry-run]

``policy`` routes ``postmaster@DOMAIN`` as the queue manager would (transport_maps,
relayhost, MX), resolves the next hop, and prints for each server the TLS level it would
get and why: the smtp_tls_policy_maps entry, the MTA-STS policy (looked up and, when the
domain's TXT record names a new one, fetched and cached, exactly as a delivery would),
DANE (TLSA records from a trusted validating resolver), or smtp_tls_security_level.  It
sends no mail and opens no SMTP connection.

``report`` queues the TLS reports (RFC 8460) of every finished day not yet reported, and
wakes the queue manager; ``--dry-run`` prints them instead (the day in progress too), with
the addresses they would go to, and queues nothing.  The queue manager counts in memory
and writes its counts every minute, so the last minute may be missing from a dry run.

It never reaches the SMTP client or the scheduler (it builds its Planner through
relay.tls.settings); a crash leaves what relay.tls.report's queueing leaves: a day's
counts are removed only once its reports are queued, so a day is never sent twice.

Exit codes: 0 done, 64 usage, 75 temporary (the spool or the DNS could not be read),
78 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from relay import config as config_mod
from relay import control
from relay.cli.command import EX_CONFIG, EX_OK, EX_TEMPFAIL, EX_USAGE, Fatal, run
from relay.routing import Resolution, RouteError, Transport
from relay.routing_settings import resolver_for, router_for
from relay.tls.destination import Skip
from relay.tls.policy import HostPolicy
from relay.tls.report import TlsReports
from relay.tls.settings import report_settings, tls_planner
from spool import Spool

_VERSIONS = {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None, https_port: int = 443) -> int:
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    parser = argparse.ArgumentParser(prog="relay tls", description=__doc__.split("\n")[0])
    parser.add_argument("-c", dest="config_dir", metavar="CONFIG_DIR")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    policy = sub.add_parser("policy", help="what TLS relay would enforce for a domain")
    policy.add_argument("domain", metavar="DOMAIN")
    report = sub.add_parser("report", help="queue (or show) the TLS reports owed")
    report.add_argument("--dry-run", action="store_true", help="show them, queue nothing")
    try:
        # argparse's own usage and help: relay's command, not one of Postfix's.
        ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return EX_OK if exc.code == 0 else EX_USAGE
    if ns.action is None:
        parser.print_usage(err)
        return EX_USAGE

    def body() -> int:
        try:
            cfg = config_mod.load(config_mod.config_dir_from(ns.config_dir))
        except config_mod.ConfigError as exc:
            raise Fatal(str(exc), EX_CONFIG) from None
        try:
            if ns.action == "policy":
                return asyncio.run(_policy(cfg, ns.domain, out, https_port))
            return asyncio.run(_report(cfg, ns.dry_run, out))
        except (ValueError, RouteError) as exc:
            raise Fatal(str(exc), EX_CONFIG) from None
        except OSError as exc:
            raise Fatal(str(exc), EX_TEMPFAIL) from None

    return run("relay tls", body, stdout=out, stderr=err)


def _spool(cfg: config_mod.Config) -> Spool | None:
    spool = Spool(cfg.str("queue_directory"), create=False)
    return spool if spool.exists() else None


async def _policy(cfg: config_mod.Config, domain: str, out: TextIO, https_port: int) -> int:
    domain = domain.strip().lower().rstrip(".")
    if not domain or "@" in domain or any(c.isspace() for c in domain):
        raise Fatal(f"bad domain name: {domain!r}", EX_USAGE)
    hop = router_for(cfg).next_hop(f"postmaster@{domain}")
    out.write(f"domain: {domain}\n")
    if hop.transport is not Transport.SMTP:
        out.write(f"next hop: {hop.transport}: no SMTP, no TLS\n")
        return EX_OK
    resolver = resolver_for(cfg)
    resolution = await resolver.resolve(hop, domain)
    how = "MX lookup" if hop.mx_lookup else "no MX lookup"
    secure = "yes" if resolution.mx_secure else "no"
    out.write(f"next hop: {hop.label} ({how}; MX RRset DNSSEC-validated: {secure})\n")
    plan = await tls_planner(cfg, resolver, _spool(cfg), https_port=https_port).plan(
        hop, Resolution(resolution.targets, None, mx_secure=resolution.mx_secure))
    decided = [(t, await plan.for_target(t)) for t in resolution.targets]
    out.writelines(f"{note}\n" for note in plan.notes)
    if resolution.failure is not None:
        out.write(f"no server: {resolution.failure.reason} ({resolution.failure.dsn})\n")
    for target, policy in decided:
        where = f"{target.hostname}[{target.address}]:{target.port}"
        if isinstance(policy, Skip):
            out.write(f"{where}: skipped: {policy.reason} ({policy.dsn})\n")
            continue
        out.write(f"{where}: {_describe(policy)}\n")
    return EX_OK


def _describe(policy: HostPolicy) -> str:
    text = f"{policy.level.word} ({policy.source})"
    if policy.sts_testing:
        text += ", MTA-STS testing: verified and logged, not enforced"
    if policy.references:
        text += f", certificate must match {' or '.join(policy.references)}"
    if policy.tlsa:
        text += f", {len(policy.tlsa)} TLSA record(s)"
    if policy.level.word != "none":
        low = _VERSIONS.get(policy.minimum.name, policy.minimum.name)
        high = _VERSIONS.get(policy.maximum.name, policy.maximum.name)
        text += f", protocols {low}" + (f" to {high}" if high != low else "")
    return text


async def _report(cfg: config_mod.Config, dry_run: bool, out: TextIO) -> int:
    spool = _spool(cfg)
    if spool is None:
        out.write("no TLS reports: the queue directory does not exist\n")
        return EX_OK
    reports = TlsReports(spool, report_settings(cfg), resolver_for(cfg))
    if not dry_run:
        queued = await reports.send_due()
        out.write(f"{queued} TLS report(s) queued\n")
        if queued:
            try:
                await asyncio.to_thread(control.request, spool.root, "scan")
            except OSError:
                pass  # not running: the reports go out when it starts
        return EX_OK
    days = reports.days()
    if not days:
        out.write("no TLS reports: no TLS session under an MTA-STS or DANE policy yet\n")
        return EX_OK
    for day in days:
        made, failed = await reports.reports(day)
        out.writelines(f"{day} {domain}: TLSRPT lookup failed; tried again later\n"
                       for domain in failed)
        for report in made:
            out.write(f"{day} {report.domain}: to {', '.join(report.rua)}\n")
            out.write(json.dumps(report.document, indent=2) + "\n")
        if not made and not failed:
            out.write(f"{day}: no domain with a TLSRPT record\n")
    return EX_OK
