"""The SMTP client's TLS settings, built from a loaded main.cf.

Owns the translation of smtp_tls_* (levels, policy maps, protocols, cipher grades and
lists, certificate match lists), smtp_dns_support_level, smtp_mta_sts_enable and
tls_required_enable into relay.tls's records; the trust anchors of the MTA-STS policy
fetch (smtp_tls_CAfile/smtp_tls_CApath, else the system's); who signs TLS reports; and the
Planner the queue manager and ``relay tls policy`` use.  A bad value raises ValueError
naming the parameter or table entry.  Reads main.cf's tables and CA files, writes nothing.
"""

from __future__ import annotations

import re
import ssl
from typing import Any

from relay.config import Config
from relay.routing import Resolver, open_table
from relay.tls.destination import ClientTLS, Planner
from relay.tls.policy import Defaults, Level, PolicyError, PolicyMaps
from relay.tls.report import ReportSettings

__all__ = ["cipherlists", "client_tls", "https_context", "report_settings", "tls_defaults",
           "tls_planner"]


def cipherlists(cfg: Config) -> dict[str, str]:
    return {"high": cfg.str("tls_high_cipherlist"), "medium": cfg.str("tls_medium_cipherlist")}


def tls_defaults(cfg: Config) -> Defaults:
    """The SMTP client's smtp_tls_* settings a policy entry may override."""
    try:
        return Defaults(
            ciphers=cfg.str("smtp_tls_ciphers"),
            mandatory_ciphers=cfg.str("smtp_tls_mandatory_ciphers"),
            exclude_ciphers=" ".join(cfg.list("smtp_tls_exclude_ciphers")),
            mandatory_exclude_ciphers=" ".join(cfg.list("smtp_tls_mandatory_exclude_ciphers")),
            protocols=cfg.str("smtp_tls_protocols"),
            mandatory_protocols=cfg.str("smtp_tls_mandatory_protocols"),
            verify_cert_match=_match_list(cfg, "smtp_tls_verify_cert_match"),
            secure_cert_match=_match_list(cfg, "smtp_tls_secure_cert_match"),
            cipherlists=tuple(cipherlists(cfg).items()),
        )
    except PolicyError as exc:
        raise ValueError(f"smtp_tls_*: {exc}") from None


def _match_list(cfg: Config, name: str) -> tuple[str, ...]:
    # Postfix splits these on commas, white space and colons.
    return tuple(w for w in re.split(r"[\s,:]+", cfg.str(name)) if w)


def client_tls(cfg: Config) -> ClientTLS:
    """What the SMTP client's TLS planner works from; ValueError names a bad table entry."""
    try:
        maps = PolicyMaps([open_table(spec) for spec in cfg.list("smtp_tls_policy_maps")])
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    level = Level.NONE
    if cfg.str("smtp_tls_security_level"):
        level = next(lv for lv in Level if lv.word == cfg.str("smtp_tls_security_level"))
    return ClientTLS(
        level=level,
        defaults=tls_defaults(cfg),
        maps=maps,
        dnssec=cfg.str("smtp_dns_support_level") == "dnssec",
        mta_sts=cfg.bool("smtp_mta_sts_enable"),
        tls_required_header=cfg.bool("tls_required_enable"),
    )


def https_context(cfg: Config) -> ssl.SSLContext:
    """The MTA-STS policy fetch's context: the SMTP client's trust anchors, else the
    system's (SSL_CERT_FILE and SSL_CERT_DIR honoured), names checked."""
    ca_file, ca_path = cfg.str("smtp_tls_CAfile"), cfg.str("smtp_tls_CApath")
    try:
        return ssl.create_default_context(cafile=ca_file or None, capath=ca_path or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"smtp_tls_CAfile/smtp_tls_CApath: {exc}") from None


def report_settings(cfg: Config) -> ReportSettings:
    """Who signs TLS reports (RFC 8460): $mydomain, postmaster@$mydomain, $myhostname."""
    domain = cfg.str("mydomain")
    return ReportSettings(organization=domain, contact=f"postmaster@{domain}",
                          submitter=cfg.str("myhostname"), from_address=f"postmaster@{domain}")


def tls_planner(cfg: Config, resolver: Resolver, cache: Any,
                *, https_port: int = 443) -> Planner:
    """The TLS planner of the queue manager (and of ``relay tls policy``): policy maps,
    MTA-STS with its cache in the spool (``cache``: a spool.Spool, or None), DANE."""
    from relay.tls.mta_sts import Fetcher, StsResolver

    settings = client_tls(cfg)
    sts = None
    if settings.mta_sts:
        sts = StsResolver(resolver, Fetcher(resolver, https_context(cfg), port=https_port),
                          cache)
    return Planner(settings, resolver, sts)


