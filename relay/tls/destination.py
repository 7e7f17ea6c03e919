"""Which TLS each server of a next hop must give, decided before the client connects.

Owns the order in which relay's policy sources apply, for one next hop and one message:

1. ``TLS-Required: No`` in the message (RFC 8689 5, ``tls_required_enable``): at most
   ``may``, and no policy is looked up (Postfix's smtp_tls_policy.c does the same).
2. smtp_tls_policy_maps: an entry for the next-hop destination (or a parent domain) sets
   the level and its settings; it overrides MTA-STS, as an earlier table does in Postfix.
3. Else smtp_tls_security_level, with MTA-STS (RFC 8461) for MX-routed mail when the
   domain has a policy: ``enforce`` allows only MX hosts matching the policy and asks for
   ``verify`` with the MX host name; ``testing`` verifies only to log and report.
4. At the ``dane`` and ``dane-only`` levels, with ``smtp_dns_support_level = dnssec``: a
   DNSSEC-validated MX host with usable TLSA records gets DANE (RFC 7672), which takes
   precedence over MTA-STS; without DNSSEC, no TLSA records, or only unusable ones, ``dane``
   falls back (to MTA-STS or ``may``, or ``encrypt`` for unusable records) as Postfix's
   dane_init() does, and ``dane-only`` defers.
5. REQUIRETLS (RFC 8689 4.2.1) raises whatever came out to ``verify`` (DANE stays DANE),
   counts an MTA-STS policy in testing mode as enforced, and for MX-routed mail needs the
   MX host name to be trustworthy (a DNSSEC-validated MX RRset, or an MTA-STS policy).

A server that may not be used gets a ``Skip`` (dsn, reason, permanent) instead of a
HostPolicy.  Nothing here connects to a mail server or writes anything; the DNS queries are
relay.routing's, the MTA-STS fetch and cache relay.tls.mta_sts's.  ``Plan.notes`` say why,
for ``relay tls policy``.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Protocol

from relay.routing import NextHop, Records, Resolution
from relay.tls import dane
from relay.tls.mta_sts import Lookup, StsResolver
from relay.tls.policy import (
    Defaults,
    Entry,
    HostPolicy,
    Level,
    PolicyMaps,
    ReportScope,
    host_policy,
)

__all__ = ["ClientTLS", "Plan", "Planner", "Skip", "TargetInfo"]

log = logging.getLogger("relay.smtp")


class TargetInfo(Protocol):
    """One server of a next hop, as relay.routing resolved it."""

    @property
    def hostname(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def secure(self) -> bool: ...


class TlsaLookup(Protocol):
    async def tlsa(self, name: str) -> Records: ...


@dataclass(frozen=True, slots=True)
class Skip:
    """This server may not be used for this message: the reason, and whether the failure
    is final (a REQUIRETLS message that cannot be sent securely bounces with 5.7.30)."""

    dsn: str
    reason: str
    permanent: bool = False
    result_type: str = ""  # RFC 8460, when the skip is a policy failure worth reporting
    report: ReportScope | None = None


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """The main.cf settings the planner works from."""

    level: Level = Level.NONE  # smtp_tls_security_level
    defaults: Defaults = field(default_factory=Defaults)
    maps: PolicyMaps = field(default_factory=lambda: PolicyMaps(()))
    dnssec: bool = False  # smtp_dns_support_level = dnssec
    mta_sts: bool = True  # smtp_mta_sts_enable
    tls_required_header: bool = True  # tls_required_enable


class Planner:
    """Makes a Plan per next hop and message; shared by every delivery of the process."""

    def __init__(self, settings: ClientTLS, dns: TlsaLookup | None = None,
                 sts: StsResolver | None = None) -> None:
        self.settings = settings
        self.dns = dns
        self.sts = sts

    async def plan(self, hop: NextHop, resolution: Resolution, *, requiretls: bool = False,
                   tls_not_required: bool = False) -> Plan:
        settings = self.settings
        plan = Plan(self, hop, resolution, requiretls=requiretls)
        if tls_not_required and settings.tls_required_header and not requiretls:
            plan.header_cap = True
            plan.note("TLS-Required: No: at most may, no policy lookups (RFC 8689)")
            return plan
        # Postfix's key: the next hop as written, brackets and a non-default port included.
        destination = hop.label
        plan.entry = settings.maps.lookup(destination)
        if plan.entry is not None:
            plan.note(f"smtp_tls_policy_maps: {plan.entry.table}: {plan.entry.key} -> "
                      f"{plan.entry.level.word}")
            return plan
        if settings.maps:
            plan.note(f"smtp_tls_policy_maps: no entry for {destination}")
        if plan.mx_routed and self.sts is not None and settings.mta_sts:
            plan.sts = await self.sts.policy(hop.host)
            plan.note_sts()
        return plan


class Plan:
    """The policy of one next hop for one message; ``for_target`` decides per server."""

    def __init__(self, planner: Planner, hop: NextHop, resolution: Resolution, *,
                 requiretls: bool) -> None:
        self.planner = planner
        self.hop = hop
        self.resolution = resolution
        self.requiretls = requiretls
        self.header_cap = False
        self.entry: Entry | None = None
        self.sts: Lookup | None = None
        self.notes: list[str] = []

    @property
    def mx_routed(self) -> bool:
        """The servers came from the MX records of the next-hop domain (not an address)."""
        if not self.hop.mx_lookup:
            return False
        try:
            ipaddress.ip_address(self.hop.host)
        except ValueError:
            return True
        return False

    @property
    def nexthop_domain(self) -> str:
        return self.hop.host

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def note_sts(self) -> None:
        found = self.sts
        if found is None:
            return
        if found.policy is None:
            self.note(f"MTA-STS: no policy for {self.hop.host}"
                      + (f" ({found.reason})" if found.reason else ""))
            return
        policy = found.policy
        self.note(f"MTA-STS: policy id {found.policy_id} ({found.source}), mode {policy.mode}, "
                  f"max_age {policy.max_age}, mx {' '.join(policy.mx) or '-'}"
                  + (f"; refresh failed: {found.reason}" if found.failure else ""))

    @property
    def sts_scope(self) -> ReportScope | None:
        found = self.sts
        if found is None or found.policy is None or found.policy.mode == "none":
            return None
        return ReportScope("sts", self.hop.host, found.policy.lines, found.policy.mx)

    async def for_target(self, target: TargetInfo) -> HostPolicy | Skip:
        """The policy for one server, or why it must be skipped."""
        settings = self.planner.settings
        defaults = settings.defaults
        hostname, nexthop = target.hostname, self.nexthop_domain
        if self.header_cap:
            return host_policy(min(settings.level, Level.MAY), defaults, hostname=hostname,
                               nexthop=nexthop, source="TLS-Required: No")
        entry = self.entry
        level = entry.level if entry is not None else settings.level
        source = (f"smtp_tls_policy_maps {entry.key}" if entry is not None
                  else "smtp_tls_security_level")
        sts = self.sts.policy if self.sts is not None else None
        if sts is not None and sts.mode == "none":
            sts = None
        chosen: HostPolicy | Skip | None = None
        if level in (Level.DANE, Level.DANE_ONLY):
            chosen, level = await self._dane(target, level, entry)
            if isinstance(chosen, Skip):
                return chosen
        if chosen is None and sts is not None:
            testing = sts.mode == "testing" and not self.requiretls
            if not sts.allows(hostname):
                log.warning("MX name '%s' does not match STS MX pattern for '%s'", hostname,
                            nexthop)
                if not testing:
                    return Skip("4.7.5" if not self.requiretls else "5.7.30",
                                f"MX host {hostname} does not match the MTA-STS policy of "
                                f"{nexthop}" + _requiretls_suffix(self.requiretls),
                                self.requiretls, "validation-failure", self.sts_scope)
            if testing:
                chosen = host_policy(level, defaults, hostname=hostname, nexthop=nexthop,
                                     entry=entry, source=source, references=(hostname,),
                                     sts_testing=True, report=self.sts_scope)
            else:
                chosen = host_policy(max(level, Level.VERIFY), defaults, hostname=hostname,
                                     nexthop=nexthop, source="MTA-STS enforce",
                                     references=(hostname,), report=self.sts_scope)
        if not isinstance(chosen, HostPolicy):
            chosen = host_policy(level, defaults, hostname=hostname, nexthop=nexthop,
                                 entry=entry, source=source)
        if self.requiretls:
            return self._requiretls(chosen, target, entry, sts is not None)
        return chosen

    async def _dane(self, target: TargetInfo, level: Level,
                    entry: Entry | None) -> tuple[HostPolicy | Skip | None, Level]:
        """DANE for one server; (None, fallback level) when DANE does not apply."""
        settings = self.planner.settings
        only = level == Level.DANE_ONLY

        def not_dane(reason: str, fallback: Level = Level.MAY, *, config: bool = False,
                     dsn: str = "4.7.5") -> tuple[HostPolicy | Skip | None, Level]:
            if config:
                log.warning("%s: %s configured %s", self.hop.host, level.word, reason)
            self.note(f"DANE: {target.hostname}: {reason}")
            if only:
                text = "client TLS configuration problem" if config else reason
                return Skip(dsn, text), level
            return None, fallback

        if not settings.dnssec or self.planner.dns is None:
            return not_dane("with dnssec lookups disabled", config=True)
        if self.mx_routed and not self.resolution.mx_secure:
            return not_dane("non DNSSEC destination")
        if not target.secure:
            return not_dane("no TLSA records found (address records not DNSSEC-validated)")
        name = f"_{target.port}._tcp.{target.hostname}"
        records = await self.planner.dns.tlsa(name)
        if records.error:
            return Skip("4.7.5", f"TLSA lookup error for {target.hostname}:{target.port}"), level
        found = [r for r in records.items if isinstance(r, tuple)] if records.secure else []
        if not found:
            return not_dane("no TLSA records found")
        usable = dane.usable(found)
        if not usable:
            return not_dane("TLSA records unusable", Level.ENCRYPT)
        references = tuple(dict.fromkeys(
            (target.hostname.lower(), self.nexthop_domain.lower())))
        scope = ReportScope("tlsa", self.nexthop_domain, tuple(
            f"{u} {s} {m} {d.hex()}" for u, s, m, d in usable), (target.hostname,))
        self.note(f"DANE: {target.hostname}: {len(usable)} usable TLSA record(s) at {name}")
        policy = host_policy(level, settings.defaults, hostname=target.hostname,
                             nexthop=self.nexthop_domain, entry=entry, source="DANE",
                             tlsa=usable, references=references, report=scope)
        return policy, level

    def _requiretls(self, chosen: HostPolicy, target: TargetInfo, entry: Entry | None,
                    has_sts: bool) -> HostPolicy | Skip:
        """RFC 8689 4.2.1: verified TLS to a trustworthy name, and the keyword."""
        if self.mx_routed and not (self.resolution.mx_secure or has_sts):
            return Skip("5.7.30", "Sender requested REQUIRETLS, but the MX lookup of "
                        f"{self.nexthop_domain} was not DNSSEC-validated and it has no "
                        "MTA-STS policy", True)
        if chosen.level.must_match and not chosen.sts_testing:
            return host_policy(chosen.level, self.planner.settings.defaults,
                               hostname=target.hostname, nexthop=self.nexthop_domain,
                               entry=entry, source=chosen.source, tlsa=chosen.tlsa,
                               references=chosen.references, requiretls=True,
                               report=chosen.report)
        return host_policy(Level.VERIFY, self.planner.settings.defaults,
                           hostname=target.hostname, nexthop=self.nexthop_domain,
                           source=chosen.source + ", raised to verify by REQUIRETLS",
                           references=(target.hostname,), requiretls=True,
                           report=chosen.report)


def _requiretls_suffix(requiretls: bool) -> str:
    return " (Sender requested REQUIRETLS)" if requiretls else ""
