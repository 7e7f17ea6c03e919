"""relay.config: main.cf syntax, expansion, units, errors, and the typed accessors."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

import pytest

from relay import config
from relay.config import Config, ConfigError, Kind, ListenAddress

REPO = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, text: str, warnings: list[str] | None = None) -> Config:
    (tmp_path / "main.cf").write_text(text)
    sink = warnings if warnings is not None else []
    return config.load(str(tmp_path), environ={"HOME": str(tmp_path)}, warn=sink.append)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    return str(e.value)


# --- the table ------------------------------------------------------------------------

EXPECTED_DEFAULTS = {
    "myorigin": "$myhostname",
    "mynetworks": "127.0.0.0/8 [::1]/128",
    "relay_domains": "",
    "syslog_name": "relay",
    "mail_name": "relay",
    "smtpd_banner": "$myhostname ESMTP $mail_name",
    "message_size_limit": "10240000",
    "smtpd_recipient_limit": "1000",
    "smtpd_timeout": "300s",
    "smtpd_client_connection_count_limit": "50",
    "smtpd_forbid_bare_newline": "normalize",
    "smtpd_forbid_bare_newline_exclusions": "$mynetworks",
    "fast_flush_domains": "$relay_domains",
    "smtpd_forbid_bare_newline_reject_code": "550",
    "maillog_file": "",
    "syslog_facility": "mail",
    "smtpd_listen": "127.0.0.1:2525, [::1]:2525",
    "enable_long_queue_ids": "no",
    "queue_run_delay": "300s",
    "qmgr_message_active_limit": "20000",
    "transport_maps": "",
    "relayhost": "",
    "dns_nameservers": "",
    "smtp_tls_security_level": "",
    "smtp_sasl_auth_enable": "no",
    "smtp_sasl_password_maps": "",
    "smtp_send_dummy_mail_auth": "no",
    "smtp_line_length_limit": "998",
    "default_destination_recipient_limit": "50",
    "smtp_connect_timeout": "30s",
    "smtp_helo_timeout": "300s",
    "smtp_mail_timeout": "300s",
    "smtp_rcpt_timeout": "300s",
    "smtp_data_init_timeout": "120s",
    "smtp_data_xfer_timeout": "180s",
    "smtp_data_done_timeout": "600s",
    "smtp_quit_timeout": "300s",
    "smtp_starttls_timeout": "300s",
    "smtp_connection_cache_time_limit": "2s",
    "smtp_connection_reuse_time_limit": "300s",
    "smtp_mx_address_limit": "5",
    "smtp_mx_session_limit": "2",
    "default_destination_concurrency_limit": "20",
    "initial_destination_concurrency": "5",
    "default_process_limit": "100",
    "default_destination_concurrency_failed_cohort_limit": "1",
    "minimal_backoff_time": "300s",
    "maximal_backoff_time": "4000s",
    "maximal_queue_lifetime": "5d",
    "bounce_queue_lifetime": "5d",
    "delay_warning_time": "0h",
    "smtp_tls_CAfile": "",
    "smtpd_tls_cert_file": "",
    "smtpd_tls_key_file": "",
    "smtpd_tls_security_level": "",
    "smtpd_sasl_auth_enable": "no",
    "smtpd_sasl_password_file": "",
    "smtpd_tls_auth_only": "yes",
    "smtpd_relay_restrictions": (
        "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
    ),
    "smtpd_client_connection_rate_limit": "0",
    "smtpd_client_message_rate_limit": "0",
    "smtpd_client_recipient_rate_limit": "0",
    "anvil_rate_time_unit": "60s",
    "smtpd_client_event_limit_exceptions": "$mynetworks",
    "smtpd_hard_error_limit": "20",
    "smtpd_soft_error_limit": "10",
    "smtpd_error_sleep_time": "1s",
    "hopcount_limit": "50",
    "queue_minfree": "0",
    "smtpd_upstream_proxy_protocol": "",
    "smtpd_upstream_proxy_timeout": "5s",
    "smtpd_forbid_unauth_pipelining": "yes",
    "allow_untrusted_routing": "no",
    "smtpd_session_time_limit": "3600s",
    "postscreen_greet_wait": "0s",
    "smtpd_auth_failure_delay": "1s",
    "capture_maildir": "",
    "default_transport": "smtp",
    "soft_bounce": "no",
    "defer_transports": "",
    "http_listen": "",
    "http_admin": "no",
    "relay_metrics_domain_limit": "50",
    "relay_smtpd_processes": "0",
    "accounting_log": "",
    "smtpd_tls_loglevel": "0",
    "smtpd_tls_ciphers": "high",
    "smtpd_tls_mandatory_ciphers": "high",
    "smtpd_tls_exclude_ciphers": "",
    "smtpd_tls_mandatory_exclude_ciphers": "",
    "smtpd_tls_protocols": ">=TLSv1.2",
    "smtpd_tls_mandatory_protocols": ">=TLSv1.2",
    "requiretls_enable": "yes",
    "tls_required_enable": "yes",
    "tls_high_cipherlist": "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL",
    "tls_medium_cipherlist": "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH",
    "smtp_tls_CApath": "",
    "smtp_tls_policy_maps": "",
    "smtp_tls_verify_cert_match": "hostname",
    "smtp_tls_secure_cert_match": "nexthop, dot-nexthop",
    "smtp_tls_loglevel": "0",
    "smtp_tls_ciphers": "medium",
    "smtp_tls_mandatory_ciphers": "medium",
    "smtp_tls_exclude_ciphers": "",
    "smtp_tls_mandatory_exclude_ciphers": "",
    "smtp_tls_protocols": "!SSLv2, !SSLv3",
    "smtp_tls_mandatory_protocols": "!SSLv2, !SSLv3",
    "smtp_dns_support_level": "",
    "dns_trust_ad": "no",
    "smtp_mta_sts_enable": "yes",
    "smtp_tlsrpt_enable": "no",
}
COMPUTED = {"queue_directory", "myhostname", "mydomain", "config_directory"}


def test_table_has_every_parameter_with_its_default() -> None:
    assert set(config.PARAMETERS) == set(EXPECTED_DEFAULTS) | COMPUTED
    cfg = config.defaults(environ={"HOME": "/home/u"})
    for name, default in EXPECTED_DEFAULTS.items():
        assert cfg.default_raw(name) == default, name
        assert cfg.unexpanded(name) == default, name
    assert cfg.names() == tuple(sorted(config.PARAMETERS))


def test_default_typed_values() -> None:
    cfg = config.defaults(environ={"HOME": "/home/u"})
    assert cfg.time("smtpd_timeout") == 300.0
    assert cfg.time("maximal_queue_lifetime") == 5 * 86400
    assert cfg.time("delay_warning_time") == 0.0
    assert cfg.int("message_size_limit") == 10240000
    assert cfg.bool("smtpd_tls_auth_only") is True
    assert cfg.bool("enable_long_queue_ids") is False
    assert cfg.list("relay_domains") == ()
    assert cfg.list("smtpd_relay_restrictions") == (
        "permit_mynetworks",
        "permit_sasl_authenticated",
        "reject_unauth_destination",
    )
    assert cfg.listen_addresses() == (ListenAddress("127.0.0.1", 2525, False),
                                      ListenAddress("::1", 2525, False))
    assert cfg.str("smtpd_forbid_bare_newline") == "normalize"
    assert cfg.str("smtp_tls_security_level") == ""
    assert cfg.networks("mynetworks") == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert cfg.get("smtpd_client_event_limit_exceptions") == cfg.get("mynetworks")
    assert cfg.str("queue_directory") == "/home/u/.local/state/relay/spool"
    assert cfg.path is None and cfg.explicit == frozenset()


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load(tmp_path, "myhostname = a.example\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.path = "/elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.values["myhostname"] = "b"  # type: ignore[index]


# --- syntax ---------------------------------------------------------------------------


def test_continuation_lines_comments_and_blank_lines(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "# a comment\n"
        "\n"
        "mynetworks = 127.0.0.0/8,\n"
        "    10.0.0.0/8\n"
        "# a comment inside a logical line does not end it\n"
        "\n"
        "\t192.168.0.0/16\n"
        "   # an indented comment is a comment, not a continuation\n"
        "smtpd_banner = $myhostname ESMTP # not a comment\n"
        "myhostname=mx.example.com   \n",
    )
    assert cfg.unexpanded("mynetworks") == "127.0.0.0/8, 10.0.0.0/8 192.168.0.0/16"
    assert cfg.networks() == tuple(
        ipaddress.ip_network(n) for n in ("127.0.0.0/8", "10.0.0.0/8", "192.168.0.0/16")
    )
    assert cfg.raw("smtpd_banner") == "mx.example.com ESMTP # not a comment"
    assert cfg.settings["mynetworks"].line == 3
    assert cfg.settings["smtpd_banner"].line == 9
    assert cfg.explicit == {"mynetworks", "smtpd_banner", "myhostname"}
    assert cfg.path == str(tmp_path / "main.cf")


def test_crlf_line_endings(tmp_path: Path) -> None:
    cfg = load(tmp_path, "smtpd_timeout = 5m\r\nrelay_domains = a.example,\r\n  b.example\r\n")
    assert cfg.time("smtpd_timeout") == 300.0
    assert cfg.list("relay_domains") == ("a.example", "b.example")


def test_last_assignment_wins(tmp_path: Path) -> None:
    cfg = load(tmp_path, "smtpd_timeout = 10s\nsmtpd_timeout = 20s\n")
    assert cfg.time("smtpd_timeout") == 20.0
    assert cfg.settings["smtpd_timeout"].line == 2


def test_lists_with_commas_and_spaces(tmp_path: Path) -> None:
    cfg = load(tmp_path, "relay_domains = a.example,b.example , c.example\t d.example,,\n")
    assert cfg.list("relay_domains") == ("a.example", "b.example", "c.example", "d.example")
    assert cfg.list("smtpd_banner")[-2:] == ("ESMTP", "relay")  # any value splits


# --- expansion ------------------------------------------------------------------------


def test_expansion_forms(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "myhostname = mx.$mydomain\n"  # refers forward
        "mydomain = example.com\n"
        "smtpd_banner = ${myhostname} $(mail_name) $mail_name-x $undefined_name.\n"
        "my_nets = 10.0.0.0/8\n"
        "mynetworks = $my_nets, 127.0.0.0/8\n"
        "syslog_name = cost $$5 and $ alone $\n",
    )
    assert cfg.raw("myhostname") == "mx.example.com"
    assert cfg.unexpanded("myhostname") == "mx.$mydomain"
    assert cfg.raw("smtpd_banner") == "mx.example.com relay relay-x ."
    assert cfg.raw("myorigin") == "mx.example.com"  # a default that refers to main.cf
    assert cfg.network_matcher().matches("10.1.2.3")
    assert cfg.network_matcher("smtpd_client_event_limit_exceptions").matches("10.1.2.3")
    assert cfg.raw("syslog_name") == "cost $5 and $ alone $"
    assert cfg.get("my_nets") == "10.0.0.0/8"


def test_conditional_expansion(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "relayhost = gw.example\n"
        "a = ${relayhost?via $relayhost}|${relayhost:direct}\n"
        "b = ${maillog_file?{file}:{stderr}}|${maillog_file:{no file}}\n"
        "smtpd_banner = $a $b\n",
    )
    assert cfg.raw("a") == "via gw.example|"
    assert cfg.raw("b") == "stderr|no file"


def test_recursion_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "main.cf"
    assert error(tmp_path, "myhostname = a\nmyorigin = $x\nx = ${y}\ny = $(myorigin)\n") == (
        f"{path}, line 2: recursive $name expansion for parameter myorigin: "
        "myorigin -> x -> y -> myorigin"
    )
    # through a default value: smtpd_client_event_limit_exceptions = $mynetworks
    assert error(tmp_path, "mynetworks = $smtpd_client_event_limit_exceptions\n") == (
        f"{path}, line 1: recursive $name expansion for parameter mynetworks: "
        "mynetworks -> smtpd_client_event_limit_exceptions -> mynetworks"
    )
    assert error(tmp_path, "myhostname = $myhostname\n") == (
        f"{path}, line 1: recursive $name expansion for parameter myhostname: "
        "myhostname -> myhostname"
    )


def test_unclosed_brace_is_an_error(tmp_path: Path) -> None:
    assert error(tmp_path, "\nsmtpd_banner = ${myhostname ESMTP\n") == (
        f"{tmp_path}/main.cf, line 2: parameter smtpd_banner: "
        "missing '}' in \"${myhostname ESMTP\""
    )


# --- units ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "seconds"),
    [
        ("smtpd_timeout", "1s", 1),
        ("smtpd_timeout", "5m", 300),
        ("smtpd_timeout", "1h", 3600),
        ("smtpd_timeout", "5d", 5 * 86400),
        ("smtpd_timeout", "1w", 7 * 86400),
        ("smtpd_timeout", "45", 45),
        ("smtpd_timeout", "0", 0),
        ("maximal_queue_lifetime", "3", 3 * 86400),
        ("maximal_queue_lifetime", "12h", 12 * 3600),
        ("bounce_queue_lifetime", "2", 2 * 86400),
        ("delay_warning_time", "4", 4 * 3600),
        ("delay_warning_time", "30m", 1800),
        ("queue_run_delay", "60", 60),
    ],
)
def test_time_units(tmp_path: Path, name: str, value: str, seconds: int) -> None:
    cfg = load(tmp_path, f"{name} = {value}\n")
    assert cfg.time(name) == float(seconds)
    assert isinstance(cfg.get(name), float)


def test_sizes_and_counts(tmp_path: Path) -> None:
    cfg = load(tmp_path, "message_size_limit = 52428800\nsmtpd_recipient_limit = 0\n")
    assert cfg.int("message_size_limit") == 52428800
    assert cfg.int("smtpd_recipient_limit") == 0


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("YES", True), ("No", False)])
def test_booleans(tmp_path: Path, value: str, expected: bool) -> None:
    assert load(tmp_path, f"smtp_sasl_auth_enable = {value}\n").bool("smtp_sasl_auth_enable") is (
        expected
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("yes", "normalize"), ("normalize", "normalize"), ("Reject", "reject"), ("no", "no")],
)
def test_enum_aliases(tmp_path: Path, value: str, expected: str) -> None:
    cfg = load(tmp_path, f"smtpd_forbid_bare_newline = {value}\n")
    assert cfg.get("smtpd_forbid_bare_newline") == expected


def test_tls_levels(tmp_path: Path) -> None:
    cfg = load(tmp_path, "smtp_tls_security_level = may\nsmtpd_tls_security_level = encrypt\n")
    assert cfg.str("smtp_tls_security_level") == "may"
    assert cfg.str("smtpd_tls_security_level") == "encrypt"
    assert load(tmp_path, "smtpd_upstream_proxy_protocol = haproxy\n").str(
        "smtpd_upstream_proxy_protocol"
    ) == ("haproxy")


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("smtpd_timeout = soon", "bad time value for parameter smtpd_timeout: soon"),
        ("smtpd_timeout = 5x", "bad time value for parameter smtpd_timeout: 5x"),
        ("smtpd_timeout = 5M", "bad time value for parameter smtpd_timeout: 5M"),
        ("smtpd_timeout = -1", "bad time value for parameter smtpd_timeout: -1"),
        ("smtpd_timeout = 1.5h", "bad time value for parameter smtpd_timeout: 1.5h"),
        ("smtpd_timeout =", "bad time value for parameter smtpd_timeout: "),
        ("smtpd_timeout = 99999999w", "bad time value for parameter smtpd_timeout: 99999999w"),
        (
            "smtpd_recipient_limit = lots",
            "bad numerical configuration for parameter smtpd_recipient_limit: lots",
        ),
        (
            "smtpd_recipient_limit = -5",
            "bad numerical configuration for parameter smtpd_recipient_limit: -5",
        ),
        (
            "smtpd_recipient_limit = 3000000000",
            "bad numerical configuration for parameter smtpd_recipient_limit: 3000000000",
        ),
        ("message_size_limit = 10MB", "bad size value for parameter message_size_limit: 10MB"),
        (
            "smtpd_tls_auth_only = maybe",
            "bad boolean value for parameter smtpd_tls_auth_only: maybe",
        ),
        ("smtpd_tls_auth_only = true", "bad boolean value for parameter smtpd_tls_auth_only: true"),
        (
            "mynetworks = 127.0.0.0/8, 10.0.0.0/33",
            "bad network address or CIDR for parameter mynetworks: 10.0.0.0/33",
        ),
        (
            "mynetworks = 10.1.2.3/8",
            ("bad network address or CIDR for parameter mynetworks: 10.1.2.3/8 "
            "(non-null host address bits, perhaps you should use 10.0.0.0/8 instead)"),
        ),
        (
            "mynetworks = hash:/etc/postfix/network_table",
            "bad network address or CIDR for parameter mynetworks: hash:/etc/postfix/network_table",
        ),
        (
            "mynetworks = 10.0.0.0/255.0.0.0",
            "bad network address or CIDR for parameter mynetworks: 10.0.0.0/255.0.0.0",
        ),
        ("smtpd_listen = 127.0.0.1", "bad host:port for parameter smtpd_listen: 127.0.0.1"),
        (
            "smtpd_listen = 127.0.0.1:99999",
            "bad host:port for parameter smtpd_listen: 127.0.0.1:99999",
        ),
        ("smtpd_listen = ::1:25", "bad host:port for parameter smtpd_listen: ::1:25"),
        (
            "smtpd_listen = [::1]:25/ssl",
            "bad host:port for parameter smtpd_listen: [::1]:25/ssl",
        ),
        (
            "smtpd_listen = [mail.example]:25",
            "bad host:port for parameter smtpd_listen: [mail.example]:25",
        ),
        ("smtpd_listen = 1.2.3:25", "bad host:port for parameter smtpd_listen: 1.2.3:25"),
        (
            "dns_nameservers = ns.example:53",
            "bad host:port for parameter dns_nameservers: ns.example:53",
        ),
        (
            "dns_nameservers = 127.0.0.1:53/tls",
            "bad host:port for parameter dns_nameservers: 127.0.0.1:53/tls",
        ),
        (
            "smtpd_forbid_bare_newline = maybe",
            "bad value for parameter smtpd_forbid_bare_newline: maybe",
        ),
        (
            "smtp_tls_security_level = fingerprint",
            "bad value for parameter smtp_tls_security_level: fingerprint",
        ),
        ("myhostname = . 0", "bad hostname value for parameter myhostname: . 0"),
        ("myhostname = mx..example", "bad hostname value for parameter myhostname: mx..example"),
        ("mydomain = 127.0.0.1", "bad hostname value for parameter mydomain: 127.0.0.1"),
        ("mydomain = example.com.", "bad hostname value for parameter mydomain: example.com."),
        (
            "smtpd_upstream_proxy_protocol = proxy",
            "bad value for parameter smtpd_upstream_proxy_protocol: proxy",
        ),
    ],
)
def test_bad_values_name_file_line_and_parameter(tmp_path: Path, line: str, message: str) -> None:
    text = "# line 1\nmail_name = relay\n\n" + line + "\nsyslog_name = relay\n"
    assert error(tmp_path, text) == f"{tmp_path}/main.cf, line 4: {message}"


def test_bad_value_through_expansion_shows_both(tmp_path: Path) -> None:
    assert error(tmp_path, "t = soon\nsmtpd_timeout = $t\n") == (
        f"{tmp_path}/main.cf, line 2: bad time value for parameter smtpd_timeout: soon "
        '(expanded from "$t")'
    )


def test_first_bad_line_in_file_order_is_reported(tmp_path: Path) -> None:
    message = error(tmp_path, "smtpd_timeout = x\nmessage_size_limit = y\n")
    assert message.endswith("line 1: bad time value for parameter smtpd_timeout: x")


def test_syntax_errors(tmp_path: Path) -> None:
    assert error(tmp_path, "myhostname = a\nthis line has no equals sign\n") == (
        f"{tmp_path}/main.cf, line 2: missing '=' after parameter name: "
        '"this line has no equals sign"'
    )
    assert error(tmp_path, "smtpd timeout = 5\n") == (
        f"{tmp_path}/main.cf, line 1: missing '=' after parameter name: \"smtpd timeout = 5\""
    )
    assert error(tmp_path, "= 5\n") == (
        f"{tmp_path}/main.cf, line 1: missing '=' after parameter name: \"= 5\""
    )
    assert error(tmp_path, "# comment\n  myhostname = a\n") == (
        f"{tmp_path}/main.cf, line 2: logical line must not start with white space"
    )
    (tmp_path / "main.cf").write_bytes(b"myhostname = a\nmail_name = \xff\n")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}/main.cf, line 2: not UTF-8")):
        config.load(str(tmp_path), environ={})


def test_missing_main_cf(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(str(tmp_path / "nowhere"), environ={})
    assert str(e.value) == f"open {tmp_path}/nowhere/main.cf: No such file or directory"


# --- unknown parameters ---------------------------------------------------------------


def test_unknown_parameter_is_kept_and_warned(tmp_path: Path) -> None:
    warnings: list[str] = []
    cfg = load(tmp_path, "myhostname = a.example\n\nfoo = bar baz\n", warnings)
    assert warnings == [f"{tmp_path}/main.cf, line 3: unused parameter: foo=bar baz"]
    assert cfg.warnings == tuple(warnings)
    assert cfg.get("foo") == "bar baz"
    assert "foo" in cfg.names() and "foo" in cfg.explicit
    assert cfg.kind("foo") is Kind.STR
    with pytest.raises(KeyError):
        cfg.get("bar")
    with pytest.raises(KeyError):
        cfg.default_raw("foo")


def test_referenced_unknown_parameter_is_not_warned(tmp_path: Path) -> None:
    warnings: list[str] = []
    load(tmp_path, "my_nets = 10.0.0.0/8\nmynetworks = $my_nets\nother = 1\n", warnings)
    assert warnings == [f"{tmp_path}/main.cf, line 3: unused parameter: other=1"]


def test_default_warning_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "main.cf").write_text("foo = bar\n")
    config.load(str(tmp_path), environ={})
    assert capsys.readouterr().err == (
        f"relay: warning: {tmp_path}/main.cf, line 1: unused parameter: foo=bar\n"
    )


# --- config directory and computed defaults -------------------------------------------


def test_config_dir_from() -> None:
    assert config.config_dir_from("/a", {"MAIL_CONFIG": "/b"}) == "/a"
    assert config.config_dir_from(None, {"MAIL_CONFIG": "/b"}) == "/b"
    assert config.config_dir_from(None, {"MAIL_CONFIG": ""}) is None
    assert config.config_dir_from(None, {}) is None


def test_mail_config_environment(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text("mail_name = fromenv\n")
    cfg = config.load(None, environ={"MAIL_CONFIG": str(tmp_path)})
    assert cfg.str("mail_name") == "fromenv"
    assert config.load(None, environ={}).path is None
    assert config.load(None, environ={}).str("mail_name") == "relay"


def test_default_queue_directory() -> None:
    assert (
        config.default_queue_directory({"XDG_STATE_HOME": "/x/state", "HOME": "/h"})
        == "/x/state/relay/spool"
    )
    assert config.default_queue_directory({"HOME": "/h"}) == "/h/.local/state/relay/spool"
    # a relative XDG_STATE_HOME is invalid per the XDG spec and ignored
    assert (
        config.default_queue_directory({"XDG_STATE_HOME": "rel", "HOME": "/h"})
        == "/h/.local/state/relay/spool"
    )
    cfg = config.load(None, environ={"XDG_STATE_HOME": "/s"})
    assert cfg.str("queue_directory") == "/s/relay/spool"
    assert cfg.default_raw("queue_directory") == "/s/relay/spool"


def test_config_directory_is_where_main_cf_is(tmp_path: Path) -> None:
    cfg = load(tmp_path, "smtp_sasl_password_maps = texthash:$config_directory/sasl_passwd\n")
    assert cfg.str("config_directory") == str(tmp_path)
    assert cfg.list("smtp_sasl_password_maps") == (f"texthash:{tmp_path}/sasl_passwd",)
    assert config.defaults(environ={}).str("config_directory") == ""
    assert config.load(None, environ={"MAIL_CONFIG": str(tmp_path)}).str(
        "config_directory") == str(tmp_path)


def test_overrides_win_over_main_cf_and_name_themselves(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text("smtpd_timeout = 10s\nrelay_domains = a.example\n")
    warnings: list[str] = []
    cfg = config.load(str(tmp_path), environ={}, warn=warnings.append,
                      overrides=["smtpd_timeout = 20s", "relay_domains=", "no_such=1"])
    assert cfg.time("smtpd_timeout") == 20.0
    assert cfg.list("relay_domains") == ()
    assert warnings == ["-o no_such: unused parameter: no_such=1"]
    with pytest.raises(ConfigError) as e:
        config.load(str(tmp_path), environ={}, overrides=["smtpd_timeout=soon"])
    assert str(e.value) == "-o smtpd_timeout: bad time value for parameter smtpd_timeout: soon"
    with pytest.raises(ConfigError) as e:
        config.load(None, environ={}, overrides=["smtpd_timeout"])
    assert str(e.value) == "-o smtpd_timeout: missing '=' after parameter name"


def test_syslog_facility_is_one_of_syslogs(tmp_path: Path) -> None:
    assert load(tmp_path, "syslog_facility = LOCAL3\n").str("syslog_facility") == "local3"
    assert error(tmp_path, "syslog_facility = mial\n") == (
        f"{tmp_path}/main.cf, line 1: bad value for parameter syslog_facility: mial")


def test_mydomain_follows_myhostname(tmp_path: Path) -> None:
    cfg = load(tmp_path, "myhostname = mx.sub.example.com\n")
    assert cfg.str("mydomain") == "sub.example.com"
    assert load(tmp_path, "myhostname = bare\n").str("mydomain") == "localdomain"
    cfg = load(tmp_path, "myhostname = host.example\nmydomain = other.example\n")
    assert cfg.str("mydomain") == "other.example"


def test_bad_derived_default_is_reported(tmp_path: Path) -> None:
    # mydomain's default is $myhostname minus its first label, and "123" is no host name.
    assert error(tmp_path, "myhostname = mx.123\n") == (
        f"{tmp_path}/main.cf, default value: bad hostname value for parameter mydomain: 123"
    )


def test_computed_defaults_are_sane() -> None:
    cfg = config.defaults(environ={})
    assert "." in cfg.str("myhostname")
    assert cfg.str("myorigin") == cfg.str("myhostname")
    assert cfg.str("smtpd_banner") == f"{cfg.str('myhostname')} ESMTP relay"
    assert cfg.str("myhostname").endswith("." + cfg.str("mydomain")) or (
        cfg.str("mydomain") == "localdomain"
    )


# --- listen addresses, networks, domains ----------------------------------------------


def test_listen_addresses(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "smtpd_listen = 127.0.0.1:2525, [::1]:2525\n"
        "  127.0.0.1:4650/tls [::]:0/tls localhost:25 0.0.0.0:65535\n",
    )
    assert cfg.listen_addresses() == (
        ListenAddress("127.0.0.1", 2525, False),
        ListenAddress("::1", 2525, False),
        ListenAddress("127.0.0.1", 4650, True),
        ListenAddress("::", 0, True),
        ListenAddress("localhost", 25, False),
        ListenAddress("0.0.0.0", 65535, False),
    )
    assert load(tmp_path, "smtpd_listen =\n").listen_addresses() == ()


def test_dns_nameservers(tmp_path: Path) -> None:
    cfg = load(tmp_path, "dns_nameservers = 127.0.0.1 127.0.0.2:5353 [::1]:5300 ::1 [::2]\n")
    assert cfg.host_ports("dns_nameservers") == (
        ListenAddress("127.0.0.1", 53),
        ListenAddress("127.0.0.2", 5353),
        ListenAddress("::1", 5300),
        ListenAddress("::1", 53),
        ListenAddress("::2", 53),
    )


def test_network_matching(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "mynetworks = 127.0.0.0/8, !192.168.1.13, 192.168.1.0/24 [2001:db8::]/32\n"
        "  !2001:db9::1 2001:db9::/32, [::1]/128 10.0.0.1 [fe80::1]\n",
    )
    m = cfg.network_matcher("mynetworks")
    assert m.matches("127.0.0.1")
    assert m.matches("192.168.1.12")
    assert not m.matches("192.168.1.13")  # excluded before the /24 matches
    assert not m.matches("192.168.2.1")
    assert m.matches("2001:db8::25")
    assert m.matches("2001:DB9::2")
    assert not m.matches("2001:db9::1")
    assert m.matches("::1")
    assert not m.matches("::2")
    assert m.matches("10.0.0.1") and not m.matches("10.0.0.2")
    assert m.matches("fe80::1%eth0")
    assert m.matches("::ffff:192.168.1.7")  # a v4 client on a v6 socket
    assert not m.matches("::ffff:192.168.1.13")
    assert m.matches(ipaddress.ip_address("127.1.2.3"))
    with pytest.raises(ValueError):
        m.matches("not-an-address")
    assert ipaddress.ip_network("192.168.1.13/32") not in cfg.networks()
    assert ipaddress.ip_network("192.168.1.0/24") in cfg.networks()


def test_network_matching_first_match_wins(tmp_path: Path) -> None:
    cfg = load(tmp_path, "mynetworks = 10.0.0.0/8 !10.1.0.0/16\n")
    assert cfg.network_matcher().matches("10.1.2.3")  # the /8 came first
    assert not load(tmp_path, "mynetworks =\n").network_matcher().matches("127.0.0.1")


def test_domain_matching(tmp_path: Path) -> None:
    cfg = load(tmp_path, "relay_domains = Example.COM, .sub.example.net !bad.example.org\n"
               "  example.org\n")  # fmt: skip

    def matches(domain: str) -> bool:
        return config.domain_in_list(domain, cfg.list("relay_domains"))

    assert matches("example.com")
    assert matches("EXAMPLE.com.")
    assert matches("a.b.example.com")
    assert not matches("notexample.com")
    assert not matches("example.com.evil")
    assert not matches("sub.example.net")
    assert matches("x.sub.example.net")
    assert not matches("bad.example.org")
    assert not matches("x.bad.example.org")
    assert matches("good.example.org")
    assert not matches("")
    assert not config.domain_in_list("example.com", config.defaults(environ={}).list("relay_domains"))


def test_typed_accessors_check_the_kind(tmp_path: Path) -> None:
    cfg = load(tmp_path, "myhostname = a.example\n")
    with pytest.raises(TypeError):
        cfg.time("message_size_limit")
    with pytest.raises(TypeError):
        cfg.int("smtpd_timeout")
    with pytest.raises(TypeError):
        cfg.bool("myhostname")
    with pytest.raises(TypeError):
        cfg.listen_addresses("mynetworks")
    with pytest.raises(TypeError):
        cfg.network_matcher("smtpd_listen")
    assert cfg.str("smtpd_timeout") == "300s"
    assert cfg.str("mynetworks") == "127.0.0.0/8 [::1]/128"


# --- the example main.cf --------------------------------------------------------------


def test_example_main_cf_loads_with_defaults_and_no_warning() -> None:
    warnings: list[str] = []
    cfg = config.load(str(REPO / "conf"), environ={"HOME": "/h"}, warn=warnings.append)
    assert warnings == []
    base = config.defaults(environ={"HOME": "/h"})
    for name in config.PARAMETERS:
        if name != "config_directory":  # where main.cf is, by definition
            assert cfg.get(name) == base.get(name), name
    assert cfg.str("config_directory") == str(REPO / "conf")


def examples() -> list[str]:
    """Each commented-out assignment of conf/main.cf, with its continuation lines."""
    found: list[str] = []
    open_example = False
    for line in (REPO / "conf" / "main.cf").read_text().splitlines():
        if re.match(r"#[A-Za-z_]+ =", line):
            found.append(line[1:] + "\n")
            open_example = True
        elif open_example and re.match(r"#\s+\S", line):
            found[-1] += line[1:] + "\n"
        else:
            open_example = False
    return found


@pytest.mark.parametrize("example", examples())
def test_every_commented_example_is_valid(tmp_path: Path, example: str) -> None:
    warnings: list[str] = []
    cfg = load(tmp_path, example, warnings)
    assert warnings == []
    assert len(cfg.explicit) == 1
    assert set(cfg.explicit) <= set(config.PARAMETERS)
