"""The listener's settings record (``SmtpdSettings``) from a loaded main.cf: its TLS server
context, its password file, its limits.

relay.settings gives it to ``relay serve`` with every other part's settings; a listener
worker (relay.smtpd.worker) builds it from here alone, so that a process that only
accepts mail never loads the queue manager's modules (DNS, the SMTP client, MTA-STS).  A
configuration that must not run raises ValueError naming the parameter.  Nothing here
writes anything; the only reads are the certificate and the password file.
"""

from __future__ import annotations

import ssl
from typing import Any

from relay.auth import PasswordFile, PasswordFileError, password_file_path
from relay.config import Config
from relay.smtpd.policy import SmtpdSettings, check_relay_restrictions
from relay.tls.policy import PolicyError, cipher_list, protocol_range


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
    ciphers = cipher_list(cfg.str(prefix + "ciphers"),
                          {"high": cfg.str("tls_high_cipherlist"),
                           "medium": cfg.str("tls_medium_cipherlist")}, exclusions)
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
