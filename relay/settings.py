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

from relay.config import Config
from relay.delivery import DeliverySettings
from relay.outcome import Policy
from relay.routing import open_table, router_for
from relay.routing_settings import resolver_for, self_addresses
from relay.scheduler import QmgrSettings
from relay.smtpd.settings import smtpd_settings, smtpd_tls_context
from relay.tls.settings import (
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
