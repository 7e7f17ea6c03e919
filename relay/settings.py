"""Settings records for each part of the daemon, built from a loaded main.cf.

It owns the translation from main.cf parameters (relay.config's Config) to the records
each part runs on: the listener's ``SmtpdSettings`` (with its TLS context and password
file), the queue manager's ``QmgrSettings`` (with the SMTP client's ``DeliverySettings``
and the SASL client credentials), and, from relay.routing_settings and relay.tls.settings
(which the commands use without the daemon's parts), the DNS ``Resolver`` and the SMTP
client's TLS settings; the ``Router`` of transport_maps, relayhost, default_transport and
capture_maildir is relay.routing.router_for().  Both daemon processes, ``relay serve``
(relay.daemon) and the queue manager (relay.qmgrd), build what they need from here, so
neither imports the other.

A configuration that must not run raises ValueError naming the parameter, so ``relay
serve`` stops before it listens and a reload keeps the old settings.  Nothing here writes
anything; the only reads are main.cf's files (certificates, password files, tables).
"""

from __future__ import annotations

import ssl
from typing import Any

from relay.auth import PasswordFile, PasswordFileError, password_file_path
from relay.config import Config
from relay.delivery import DeliverySettings
from relay.outcome import Policy
from relay.routing import open_table, router_for
from relay.routing_settings import resolver_for, self_addresses
from relay.scheduler import QmgrSettings
from relay.smtpd.policy import SmtpdSettings, check_relay_restrictions
from relay.tls.policy import PolicyError, cipher_list, protocol_range
from relay.tls.settings import (
    cipherlists,
    client_tls,
    https_context,
    report_settings,
    tls_defaults,
    tls_planner,
)

__all__ = [
    "client_tls",
    "https_context",
    "qmgr_settings",
    "report_settings",
    "resolver_for",
    "router_for",
    "sasl_credentials",
    "self_addresses",
    "smtpd_settings",
    "smtpd_tls_context",
    "tls_defaults",
    "tls_planner",
]


def smtpd_settings(cfg: Config) -> SmtpdSettings:
    return SmtpdSettings(
        myhostname=cfg.str("myhostname"),
        banner=cfg.str("smtpd_banner"),
        mynetworks=cfg.network_matcher("mynetworks"),
        relay_domains=cfg.list("relay_domains"),
        fast_flush_domains=cfg.list("fast_flush_domains"),
        message_size_limit=cfg.int("message_size_limit"),
        queue_minfree=cfg.int("queue_minfree"),
        recipient_limit=cfg.int("smtpd_recipient_limit"),
        timeout=cfg.time("smtpd_timeout"),
        connection_count_limit=cfg.int("smtpd_client_connection_count_limit"),
        bare_newline=_bare_newline(cfg.str("smtpd_forbid_bare_newline")),
        bare_newline_exclusions=cfg.network_matcher("smtpd_forbid_bare_newline_exclusions"),
        bare_newline_reject_code=_reject_code(cfg, "smtpd_forbid_bare_newline_reject_code"),
        mail_name=cfg.str("mail_name"),
        soft_bounce=cfg.bool("soft_bounce"),
        **_smtpd_security(cfg),
    )


def _smtpd_security(cfg: Config) -> dict[str, Any]:
    """The listener's TLS, AUTH, relay-control and abuse-limit settings.  ValueError for
    a configuration that must not run: an unloadable certificate, TLS required without
    one, AUTH without a readable password file, relay restrictions that cannot refuse."""
    restrictions = cfg.list("smtpd_relay_restrictions")
    check_relay_restrictions(restrictions)
    level = cfg.str("smtpd_tls_security_level") or "none"
    tls = smtpd_tls_context(cfg)
    if tls is None and (level != "none" or any(a.tls for a in cfg.listen_addresses())):
        raise ValueError("TLS is required (smtpd_tls_security_level or a /tls listener) "
                         "but smtpd_tls_cert_file is not set")
    passwords = None
    if cfg.bool("smtpd_sasl_auth_enable"):
        path = password_file_path(cfg.str("smtpd_sasl_password_file"), cfg.path)
        if not path:
            raise ValueError("smtpd_sasl_auth_enable = yes needs smtpd_sasl_password_file")
        passwords = PasswordFile(path)
        try:
            passwords.load()
        except PasswordFileError as exc:
            raise ValueError(f"smtpd_sasl_password_file: {exc}") from None
    return {
        "tls_context": tls,
        "tls_security_level": level,
        "tls_auth_only": cfg.bool("smtpd_tls_auth_only"),
        "tls_loglevel": cfg.int("smtpd_tls_loglevel"),
        "requiretls_enable": cfg.bool("requiretls_enable"),
        "sasl_auth_enable": passwords is not None,
        "passwords": passwords,
        "auth_failure_delay": cfg.time("smtpd_auth_failure_delay"),
        "relay_restrictions": restrictions,
        "allow_untrusted_routing": cfg.bool("allow_untrusted_routing"),
        "connection_rate_limit": cfg.int("smtpd_client_connection_rate_limit"),
        "message_rate_limit": cfg.int("smtpd_client_message_rate_limit"),
        "recipient_rate_limit": cfg.int("smtpd_client_recipient_rate_limit"),
        "anvil_rate_time_unit": cfg.time("anvil_rate_time_unit"),
        "event_limit_exceptions": cfg.network_matcher("smtpd_client_event_limit_exceptions"),
        "hard_error_limit": cfg.int("smtpd_hard_error_limit"),
        "soft_error_limit": cfg.int("smtpd_soft_error_limit"),
        "error_sleep_time": cfg.time("smtpd_error_sleep_time"),
        "hopcount_limit": cfg.int("hopcount_limit"),
        "session_time_limit": cfg.time("smtpd_session_time_limit"),
        "greet_wait": cfg.time("postscreen_greet_wait"),
        "forbid_unauth_pipelining": cfg.bool("smtpd_forbid_unauth_pipelining"),
        "proxy_protocol": cfg.str("smtpd_upstream_proxy_protocol"),
        "proxy_timeout": cfg.time("smtpd_upstream_proxy_timeout"),
    }


def smtpd_tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The server TLS context from smtpd_tls_cert_file and smtpd_tls_key_file (the key
    may be in the certificate file, as Postfix allows); None if no certificate is set.

    Its protocols and ciphers are Postfix's: smtpd_tls_mandatory_protocols and
    smtpd_tls_mandatory_ciphers when TLS is required (smtpd_tls_security_level =
    encrypt), else smtpd_tls_protocols and smtpd_tls_ciphers; the grade's list
    (tls_high_cipherlist: forward-secret AEAD suites only, by default) minus
    smtpd_tls_exclude_ciphers (and smtpd_tls_mandatory_exclude_ciphers when required).
    TLS 1.3 suites are OpenSSL's own, all of them AEAD."""
    cert = cfg.str("smtpd_tls_cert_file")
    if not cert:
        return None
    key = cfg.str("smtpd_tls_key_file") or cert
    mandatory = cfg.str("smtpd_tls_security_level") == "encrypt"
    prefix = "smtpd_tls_mandatory_" if mandatory else "smtpd_tls_"
    exclusions = list(cfg.list("smtpd_tls_exclude_ciphers"))
    if mandatory:
        exclusions += cfg.list("smtpd_tls_mandatory_exclude_ciphers")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.minimum_version, context.maximum_version = protocol_range(
            cfg.str(prefix + "protocols"))
    except PolicyError as exc:
        raise ValueError(f"{prefix}protocols: {exc}") from None
    ciphers = cipher_list(cfg.str(prefix + "ciphers"), cipherlists(cfg), exclusions)
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        raise ValueError(f"{prefix}ciphers: no cipher left in {ciphers!r}") from None
    # The server's preference decides, as Postfix's tls_preempt_cipherlist can ask.
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load certificate {cert} and key {key}: {exc}") from None
    return context


def _bare_newline(value: str) -> str:
    return {"yes": "normalize", "normalize": "normalize", "reject": "reject"}.get(value, "no")


def _reject_code(cfg: Config, name: str) -> int:
    """A 5XX reply code parameter (Postfix: "specify a 5XX status code")."""
    code = cfg.int(name)
    if not 500 <= code <= 599:
        raise ValueError(f"{name} = {code}: specify a 5XX status code")
    return code


def sasl_credentials(cfg: Config) -> object:
    maps = cfg.list("smtp_sasl_password_maps")
    tables = [open_table(spec) for spec in maps]

    def lookup(label: str, target: object) -> tuple[str, str] | None:
        host = getattr(target, "hostname", "")
        port = getattr(target, "port", 25)
        address = getattr(target, "address", "")
        keys = [label, f"[{host}]:{port}", f"{host}:{port}", f"[{host}]", host,
                f"[{address}]:{port}", f"[{address}]"]
        for table in tables:
            for key in keys:
                value = table.get(key) if key else None
                if value:
                    user, _, password = value.partition(":")
                    return user, password
        return None

    return lookup


def qmgr_settings(cfg: Config) -> QmgrSettings:
    tls = cfg.str("smtp_tls_security_level") or "none"
    delivery = DeliverySettings(
        helo_name=cfg.str("myhostname"),
        connect_timeout=cfg.time("smtp_connect_timeout"),
        helo_timeout=cfg.time("smtp_helo_timeout"),
        mail_timeout=cfg.time("smtp_mail_timeout"),
        rcpt_timeout=cfg.time("smtp_rcpt_timeout"),
        data_init_timeout=cfg.time("smtp_data_init_timeout"),
        data_xfer_timeout=cfg.time("smtp_data_xfer_timeout"),
        data_done_timeout=cfg.time("smtp_data_done_timeout"),
        quit_timeout=cfg.time("smtp_quit_timeout"),
        starttls_timeout=cfg.time("smtp_starttls_timeout"),
        tls_level=tls,
        tls_ca_file=cfg.str("smtp_tls_CAfile"),
        tls_ca_path=cfg.str("smtp_tls_CApath"),
        tls_loglevel=cfg.int("smtp_tls_loglevel"),
        tls_defaults=tls_defaults(cfg),
        sasl_enable=cfg.bool("smtp_sasl_auth_enable"),
        sasl_credentials=sasl_credentials(cfg),  # type: ignore[arg-type]
        send_dummy_mail_auth=cfg.bool("smtp_send_dummy_mail_auth"),
        line_length_limit=cfg.int("smtp_line_length_limit"),
        connection_reuse_time_limit=cfg.time("smtp_connection_reuse_time_limit"),
        connection_cache_time_limit=cfg.time("smtp_connection_cache_time_limit"),
        mx_session_limit=cfg.int("smtp_mx_session_limit"),
    )
    return QmgrSettings(
        myhostname=cfg.str("myhostname"),
        mail_name=cfg.str("mail_name"),
        queue_run_delay=cfg.time("queue_run_delay"),
        active_limit=cfg.int("qmgr_message_active_limit"),
        recipient_limit=cfg.int("default_destination_recipient_limit"),
        concurrency_limit=cfg.int("default_destination_concurrency_limit"),
        initial_concurrency=cfg.int("initial_destination_concurrency"),
        process_limit=cfg.int("default_process_limit"),
        failed_cohort_limit=float(cfg.int("default_destination_concurrency_failed_cohort_limit")),
        soft_bounce=cfg.bool("soft_bounce"),
        defer_transports=frozenset(t.lower() for t in cfg.list("defer_transports")),
        policy=Policy(
            minimal_backoff_time=cfg.time("minimal_backoff_time"),
            maximal_backoff_time=cfg.time("maximal_backoff_time"),
            maximal_queue_lifetime=cfg.time("maximal_queue_lifetime"),
            bounce_queue_lifetime=cfg.time("bounce_queue_lifetime"),
            delay_warning_time=cfg.time("delay_warning_time"),
            soft_bounce=cfg.bool("soft_bounce"),
        ),
        delivery=delivery,
    )
