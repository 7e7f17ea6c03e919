"""The Router and the DNS Resolver, built from a loaded main.cf.

Owns the translation of dns_nameservers, smtp_mx_address_limit,
the listener's own addresses (for mail-loop detection), smtp_dns_support_level and
dns_trust_ad (with glibc's ``options trust-ad`` in /etc/resolv.conf) into relay.routing's
Resolver; the Router is relay.routing.router_for(), re-exported here.  The queue manager,
``relay serve`` and ``relay tls`` build them here, so a command need not load the daemon's
parts.  Reads main.cf's tables and /etc/resolv.conf,
writes nothing.
"""

from __future__ import annotations

from relay.config import Config
from relay.routing import Resolver, router_for

__all__ = ["resolv_conf_trusts_ad", "resolver_for", "router_for", "self_addresses"]


def self_addresses(cfg: Config) -> list[tuple[str, int]]:
    return [(a.host, a.port) for a in cfg.listen_addresses()]


def resolver_for(cfg: Config) -> Resolver:
    nameservers = cfg.list("dns_nameservers")
    return Resolver(
        nameservers=nameservers,
        myhostname=cfg.str("myhostname"),
        self_addresses=self_addresses(cfg),
        mx_address_limit=cfg.int("smtp_mx_address_limit"),
        dnssec=cfg.str("smtp_dns_support_level") == "dnssec",
        trust_ad=cfg.bool("dns_trust_ad") or (not nameservers and resolv_conf_trusts_ad()),
    )


def resolv_conf_trusts_ad(path: str = "/etc/resolv.conf") -> bool:
    """glibc's ``options trust-ad``: the operator declares the system's name servers
    trusted to validate DNSSEC (and the path to them safe)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    return any(line.split()[:1] == ["options"] and "trust-ad" in line.split()[1:]
               for line in lines)
