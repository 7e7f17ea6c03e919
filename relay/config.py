"""main.cf: Postfix's syntax, ``$name`` expansion, units, defaults, and the frozen Config.

This module owns the table of every parameter relay knows (``PARAMETERS``: name, default,
kind, default time unit, allowed values), the reading of ``CONFIG_DIR/main.cf``, and the
conversion of each value to its typed form.  ``load()`` expands and converts every
parameter, defaults included, so that a bad value stops a program at start-up with a
message naming file, line and parameter, never later in the middle of a delivery.

It never writes a file, never touches the spool, never opens a socket.  The one call
outside the process is ``socket.getfqdn()``, made only when ``myhostname`` is not set,
because Postfix too asks the system for its name.  Reading has no side effects, so a crash
leaves nothing behind.

Syntax (postconf(5)):

    # a comment: only when '#' is the first non-space character of a line
    name = value            white space around '=' and at both ends is dropped
    name = first part       a line that starts with white space continues the
        second part         logical line; it is joined with one space
    other = $name ${name} $(name)      expanded lazily against every other
                                       parameter; an undefined name is empty
    other = ${name?text} ${name:text}  text if name is non-empty / empty
    price = $$5                        '$$' is a literal '$'

Lists are separated by commas and/or white space.  Times are ``N`` or ``N`` followed by
one of ``s m h d w``; a bare number takes the parameter's default unit (seconds, except
``maximal_queue_lifetime`` and ``bounce_queue_lifetime`` in days and ``delay_warning_time``
in hours).  Sizes and counts are plain decimal integers.  Booleans are ``yes`` or ``no``
in any case, and nothing else, as in Postfix.  A name relay does not know is kept and
warned about (``unused parameter``, with the closest known name) unless another parameter
refers to it as ``$name`` (Postfix's user-defined parameters); ``load(strict=True)``, what
``relay serve`` uses, makes it fatal instead, so that a typo (``relay_host``) can never
leave a setting silently unapplied.
"""

from __future__ import annotations

import builtins
import difflib
import enum
import functools
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

# Postfix keeps times in an int and counts in an int; message_size_limit is a long.
INT_MAX = 2**31 - 1
LONG_MAX = 2**63 - 1

_WS = " \t\r\v\f"
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIME_RE = re.compile(r"([0-9]+)([smhdw]?)\Z")
_DIGITS_RE = re.compile(r"[0-9]+\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
_HOSTNAME_RE = re.compile(
    r"(?=.*[A-Za-z])[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?\Z"
)
_HOSTPORT_RE = re.compile(
    r"(?:\[(?P<bracketed>[^\[\]]+)\]|(?P<host>[^\[\]:/]+))"
    r"(?::(?P<port>[0-9]{1,5}))?(?P<tls>/tls)?\Z"
)


class ConfigError(Exception):
    """A main.cf problem; ``str(error)`` is the whole message, naming file, line, parameter."""


class Kind(enum.Enum):
    """How a parameter's expanded text becomes its typed value."""

    TIME = "time"  # float seconds
    SIZE = "size"  # int bytes
    INT = "int"  # int
    BOOL = "bool"  # bool
    STR = "str"  # str, as expanded
    HOSTNAME = "hostname"  # str, a valid host name (Postfix's valid_hostname())
    LIST = "list"  # tuple[str, ...]
    NETWORKS = "networks"  # NetworkMatcher
    HOSTPORTS = "hostports"  # tuple[ListenAddress, ...]
    ENUM = "enum"  # str, one of Parameter.choices, canonical spelling


@dataclass(frozen=True, slots=True)
class HostPortRule:
    """What a HOSTPORTS entry may look like."""

    default_port: int | None  # None: the port is required
    hostnames: bool  # host names allowed, not only address literals
    tls_suffix: bool  # "/tls" (implicit TLS, port-465 style) allowed


LISTENER = HostPortRule(default_port=None, hostnames=True, tls_suffix=True)
NAMESERVER = HostPortRule(default_port=53, hostnames=False, tls_suffix=False)
HTTP_LISTENER = HostPortRule(default_port=None, hostnames=True, tls_suffix=False)


class DefaultContext:
    """What a computed default may look at: the environment and other parameters."""

    __slots__ = ("_expander",)

    def __init__(self, expander: _Expander) -> None:
        self._expander = expander

    @property
    def environ(self) -> Mapping[str, str]:
        return self._expander.environ

    def value(self, name: str) -> str:
        """The expanded value of another parameter."""
        return self._expander.expanded(name, referrer=None)

    @property
    def config_directory(self) -> str:
        """The directory main.cf is read from; "" for the built-in defaults."""
        path = self._expander.path
        return os.path.dirname(os.path.abspath(path)) if path else ""

    def explicit(self, name: str) -> str | None:
        """The expanded value of a parameter if main.cf sets it, else None."""
        if name not in self._expander.settings:
            return None
        return self._expander.expanded(name, referrer=None)


ComputedDefault = Callable[[DefaultContext], str]


@dataclass(frozen=True, slots=True)
class Parameter:
    """One row of the parameter table."""

    name: str
    default: str | ComputedDefault
    kind: Kind
    unit: str = "s"  # TIME: the unit of a bare number
    choices: tuple[str, ...] = ()  # ENUM: allowed values, lower case; "" allows empty
    aliases: tuple[tuple[str, str], ...] = ()  # ENUM: (spelling, canonical value)
    hostport: HostPortRule | None = None  # HOSTPORTS


@dataclass(frozen=True, slots=True)
class Setting:
    """One assignment read from main.cf; the last one for a name wins, as in Postfix."""

    name: str
    value: str
    line: int


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """``host:port`` (or ``[ipv6]:port``), with ``/tls`` for implicit TLS; host has no []."""

    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True, slots=True)
class NetworkMatcher:
    """A Postfix network list: first match wins, a ``!`` rule (negate=True) excludes."""

    rules: tuple[tuple[bool, IPNetwork], ...]

    def matches(self, ip: builtins.str | IPAddress) -> builtins.bool:
        """True if the client address ``ip`` is in the list (ValueError if not an address)."""
        if isinstance(ip, builtins.str):
            # A scope ("fe80::1%eth0") says nothing about which network the address is in.
            addr: IPAddress = ipaddress.ip_address(ip.split("%", 1)[0])
        else:
            addr = ip
        # A v4 client on a dual-stack socket shows up as ::ffff:a.b.c.d; match it as v4 too.
        mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
        for negate, net in self.rules:
            if addr in net or (mapped is not None and mapped in net):
                return not negate
        return False

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """The networks listed without ``!``, in order."""
        return tuple(net for negate, net in self.rules if not negate)


def domain_in_list(domain: builtins.str, entries: Sequence[builtins.str]) -> builtins.bool:
    """Whether ``domain`` is in a domain list like relay_domains.

    ``example.com`` matches itself and its subdomains (Postfix's
    parent_domain_matches_subdomains); ``.example.com`` only its subdomains; a ``!``
    entry excludes; the first match wins; case does not matter.
    """
    domain = domain.rstrip(".").lower()
    if not domain:
        return False
    for entry in entries:
        negate = entry.startswith("!")
        pattern = (entry[1:] if negate else entry).rstrip(".").lower()
        if pattern.startswith("."):
            hit = domain.endswith(pattern) and len(domain) > len(pattern)
        else:
            hit = domain == pattern or domain.endswith("." + pattern)
        if hit:
            return not negate
    return False


# --- computed defaults ---------------------------------------------------------------


def default_queue_directory(environ: Mapping[str, str] = os.environ) -> str:
    """``$XDG_STATE_HOME/relay/spool``, else ``~/.local/state/relay/spool``."""
    state = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the XDG spec says to ignore a relative path
        home = environ.get("HOME") or os.path.expanduser("~")
        state = os.path.join(home, ".local", "state")
    return os.path.join(state, "relay", "spool")


def config_dir_from(arg: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The configuration directory: the ``-c`` argument, else $MAIL_CONFIG, else None."""
    if arg:
        return arg
    return environ.get("MAIL_CONFIG") or None


@functools.cache
def _system_names() -> tuple[str, str]:
    # getfqdn() may wait for a resolver; ask once per process.
    return socket.getfqdn(), socket.gethostname()


def _default_myhostname(ctx: DefaultContext) -> str:
    fqdn, hostname = _system_names()
    for name in (fqdn.rstrip("."), hostname.rstrip(".")):
        if "." in name and valid_hostname(name):
            return name
    # Postfix's check_myhostname(): a bare host name gets $mydomain (or localdomain).
    if not valid_hostname(hostname):
        hostname = "localhost"
    return f"{hostname}.{ctx.explicit('mydomain') or 'localdomain'}"


def valid_hostname(name: str) -> bool:
    return len(name) <= 255 and _HOSTNAME_RE.match(name) is not None and not name.endswith(".")


def _default_mydomain(ctx: DefaultContext) -> str:
    # Postfix's check_mydomainname(): $myhostname minus its first label.
    _, dot, rest = ctx.value("myhostname").partition(".")
    return rest if dot and rest else "localdomain"


def _default_queue_directory(ctx: DefaultContext) -> str:
    return default_queue_directory(ctx.environ)


def _default_config_directory(ctx: DefaultContext) -> str:
    # Postfix's is where main.cf was read: -c DIR, else $MAIL_CONFIG; none without one.
    return ctx.config_directory


# --- the parameter table --------------------------------------------------------------

_T, _SZ, _I, _B, _S = Kind.TIME, Kind.SIZE, Kind.INT, Kind.BOOL, Kind.STR
_HN = Kind.HOSTNAME
_L, _N, _H, _E = Kind.LIST, Kind.NETWORKS, Kind.HOSTPORTS, Kind.ENUM
_TLS_LEVELS = ("", "none", "may", "encrypt")
_SMTP_TLS_LEVELS = ("", "none", "may", "encrypt", "dane", "dane-only", "verify", "secure")
_GRADES = ("high", "medium")
_AEAD = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL"
_BARE_NL = ("normalize", "reject", "no")
_YES_NORM = (("yes", "normalize"),)
_FACILITIES = ("auth", "authpriv", "cron", "daemon", "ftp", "kern", "lpr", "mail", "news",
               "syslog", "user", "uucp", *(f"local{n}" for n in range(8)))
_RELAY_RESTRICTIONS = "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"

# One row per parameter; keep each on one line.
# fmt: off
_TABLE = (
    # identity and local policy
    Parameter("queue_directory", _default_queue_directory, _S),
    Parameter("config_directory", _default_config_directory, _S),
    Parameter("myhostname", _default_myhostname, _HN),
    Parameter("mydomain", _default_mydomain, _HN),
    Parameter("myorigin", "$myhostname", _S),
    Parameter("mynetworks", "127.0.0.0/8 [::1]/128", _N),
    Parameter("relay_domains", "", _L),
    Parameter("fast_flush_domains", "$relay_domains", _L),
    Parameter("syslog_name", "relay", _S),
    Parameter("mail_name", "relay", _S),
    Parameter("maillog_file", "", _S),
    Parameter("syslog_facility", "mail", _E, choices=_FACILITIES),
    Parameter("enable_long_queue_ids", "no", _B),
    Parameter("capture_maildir", "", _S),  # extension: relay serve --capture DIR
    # smtpd: the listener
    Parameter("smtpd_listen", "127.0.0.1:2525, [::1]:2525", _H, hostport=LISTENER),  # extension
    Parameter("smtpd_banner", "$myhostname ESMTP $mail_name", _S),
    Parameter("message_size_limit", "10240000", _SZ),
    Parameter("queue_minfree", "0", _SZ),
    Parameter("smtpd_recipient_limit", "1000", _I),
    Parameter("smtpd_timeout", "300s", _T),
    Parameter("smtpd_client_connection_count_limit", "50", _I),
    Parameter("smtpd_forbid_bare_newline", "normalize", _E, choices=_BARE_NL, aliases=_YES_NORM),
    Parameter("smtpd_forbid_bare_newline_exclusions", "$mynetworks", _N),
    Parameter("smtpd_forbid_bare_newline_reject_code", "550", _I),
    Parameter("smtpd_relay_restrictions", _RELAY_RESTRICTIONS, _L),
    Parameter("smtpd_client_connection_rate_limit", "0", _I),
    Parameter("smtpd_client_message_rate_limit", "0", _I),
    Parameter("smtpd_client_recipient_rate_limit", "0", _I),
    Parameter("anvil_rate_time_unit", "60s", _T),
    Parameter("smtpd_client_event_limit_exceptions", "$mynetworks", _N),
    Parameter("smtpd_hard_error_limit", "20", _I),
    Parameter("smtpd_soft_error_limit", "10", _I),
    Parameter("smtpd_error_sleep_time", "1s", _T),
    Parameter("hopcount_limit", "50", _I),
    Parameter("smtpd_upstream_proxy_protocol", "", _E, choices=("", "haproxy")),
    Parameter("smtpd_upstream_proxy_timeout", "5s", _T),
    Parameter("smtpd_forbid_unauth_pipelining", "yes", _B),
    Parameter("allow_untrusted_routing", "no", _B),
    Parameter("smtpd_session_time_limit", "3600s", _T),  # extension
    Parameter("postscreen_greet_wait", "0s", _T),  # extension: pregreet wait before the banner
    Parameter("smtpd_auth_failure_delay", "1s", _T),  # extension
    Parameter("smtpd_tls_cert_file", "", _S),
    Parameter("smtpd_tls_key_file", "", _S),
    Parameter("smtpd_tls_security_level", "", _E, choices=_TLS_LEVELS),
    Parameter("smtpd_tls_auth_only", "yes", _B),
    Parameter("smtpd_sasl_auth_enable", "no", _B),
    Parameter("smtpd_sasl_password_file", "", _S),
    Parameter("smtpd_tls_loglevel", "0", _I),
    Parameter("smtpd_tls_ciphers", "high", _E, choices=_GRADES),
    Parameter("smtpd_tls_mandatory_ciphers", "high", _E, choices=_GRADES),
    Parameter("smtpd_tls_exclude_ciphers", "", _L),
    Parameter("smtpd_tls_mandatory_exclude_ciphers", "", _L),
    Parameter("smtpd_tls_protocols", ">=TLSv1.2", _S),
    Parameter("smtpd_tls_mandatory_protocols", ">=TLSv1.2", _S),
    Parameter("requiretls_enable", "yes", _B),
    Parameter("tls_required_enable", "yes", _B),
    Parameter("tls_high_cipherlist", _AEAD, _S),
    Parameter("tls_medium_cipherlist", "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH", _S),
    # qmgr: scheduling and backoff
    Parameter("queue_run_delay", "300s", _T),
    Parameter("qmgr_message_active_limit", "20000", _I),
    Parameter("minimal_backoff_time", "300s", _T),
    Parameter("maximal_backoff_time", "4000s", _T),
    Parameter("maximal_queue_lifetime", "5d", _T, unit="d"),
    Parameter("bounce_queue_lifetime", "5d", _T, unit="d"),
    Parameter("delay_warning_time", "0h", _T, unit="h"),
    Parameter("default_destination_recipient_limit", "50", _I),
    Parameter("default_destination_concurrency_limit", "20", _I),
    Parameter("initial_destination_concurrency", "5", _I),
    Parameter("default_process_limit", "100", _I),
    Parameter("default_destination_concurrency_failed_cohort_limit", "1", _I),
    # smtp: routing and delivery
    Parameter("transport_maps", "", _L),
    Parameter("relayhost", "", _L),
    Parameter("default_transport", "smtp", _S),
    Parameter("soft_bounce", "no", _B),
    Parameter("defer_transports", "", _L),
    Parameter("dns_nameservers", "", _H, hostport=NAMESERVER),  # extension
    Parameter("smtp_connect_timeout", "30s", _T),
    Parameter("smtp_helo_timeout", "300s", _T),
    Parameter("smtp_mail_timeout", "300s", _T),
    Parameter("smtp_rcpt_timeout", "300s", _T),
    Parameter("smtp_data_init_timeout", "120s", _T),
    Parameter("smtp_data_xfer_timeout", "180s", _T),
    Parameter("smtp_data_done_timeout", "600s", _T),
    Parameter("smtp_quit_timeout", "300s", _T),
    Parameter("smtp_starttls_timeout", "300s", _T),
    Parameter("smtp_connection_cache_time_limit", "2s", _T),
    Parameter("smtp_connection_reuse_time_limit", "300s", _T),
    Parameter("smtp_mx_address_limit", "5", _I),
    Parameter("smtp_mx_session_limit", "2", _I),
    Parameter("smtp_tls_security_level", "", _E, choices=_SMTP_TLS_LEVELS),
    Parameter("smtp_tls_CAfile", "", _S),
    Parameter("smtp_tls_CApath", "", _S),
    Parameter("smtp_tls_policy_maps", "", _L),
    Parameter("smtp_tls_verify_cert_match", "hostname", _L),
    Parameter("smtp_tls_secure_cert_match", "nexthop, dot-nexthop", _L),
    Parameter("smtp_tls_loglevel", "0", _I),
    Parameter("smtp_tls_ciphers", "medium", _E, choices=_GRADES),
    Parameter("smtp_tls_mandatory_ciphers", "medium", _E, choices=_GRADES),
    Parameter("smtp_tls_exclude_ciphers", "", _L),
    Parameter("smtp_tls_mandatory_exclude_ciphers", "", _L),
    Parameter("smtp_tls_protocols", "!SSLv2, !SSLv3", _S),
    Parameter("smtp_tls_mandatory_protocols", "!SSLv2, !SSLv3", _S),
    Parameter("smtp_dns_support_level", "", _E, choices=("", "enabled", "dnssec")),
    Parameter("dns_trust_ad", "no", _B),  # extension: believe the resolvers' AD bit
    Parameter("smtp_mta_sts_enable", "yes", _B),  # extension: MTA-STS for MX-routed mail
    Parameter("smtp_tlsrpt_enable", "no", _B),
    Parameter("smtp_sasl_auth_enable", "no", _B),
    Parameter("smtp_sasl_password_maps", "", _L),
    Parameter("smtp_send_dummy_mail_auth", "no", _B),
    Parameter("smtp_line_length_limit", "998", _I),
    # http: the read API and the web page (relay.http)
    Parameter("http_listen", "", _H, hostport=HTTP_LISTENER),  # extension
    Parameter("http_admin", "no", _B),  # extension: queue changes over HTTP
    Parameter("relay_metrics_domain_limit", "50", _I),  # extension: /metrics domain labels
    # extension: processes accepting mail (0: one per CPU less one, 1 to 4); read at start
    Parameter("relay_smtpd_processes", "0", _I),
    Parameter("accounting_log", "", _S),  # extension: CSV row per recipient outcome
)
# fmt: on

PARAMETERS: Mapping[str, Parameter] = MappingProxyType({p.name: p for p in _TABLE})


# --- reading main.cf ------------------------------------------------------------------


def parse_main_cf(data: bytes, path: str) -> dict[str, Setting]:
    """The assignments in a main.cf file, by name (the last one wins, as in Postfix)."""
    try:
        text = data.decode("utf-8-sig")  # an editor may have added a BOM
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {lineno}: not UTF-8") from None
    settings: dict[str, Setting] = {}
    parts: list[str] = []
    first = 0

    def finish() -> None:
        logical = " ".join(parts)
        name, eq, value = logical.partition("=")
        name = name.strip(_WS)
        if not eq or not name or any(c in _WS for c in name):
            raise ConfigError(
                f"{path}, line {first}: missing '=' after parameter name: \"{logical}\""
            )
        settings[name] = Setting(name, value.strip(_WS), first)

    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.strip(_WS)
        # Comments and blank lines are skipped without ending a logical line (readlline()).
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in _WS:
            if not parts:
                raise ConfigError(
                    f"{path}, line {lineno}: logical line must not start with white space"
                )
            parts.append(stripped)
            continue
        if parts:
            finish()
        parts, first = [stripped], lineno
    if parts:
        finish()
    return settings


# --- $name expansion ------------------------------------------------------------------


class _BadMacro(Exception):
    """Bad ``$`` syntax in the text of the parameter being expanded."""


def _closing(text: str, start: int) -> int:
    """Index of the bracket that closes the one at ``start``, or -1."""
    opening = text[start]
    closing = "}" if opening == "{" else ")"
    depth = 0
    for i in range(start, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i
    return -1


def _expand(text: str, lookup: Callable[[str], str]) -> str:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        j = text.find("$", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        i = j + 1
        if i == n:
            out.append("$")
        elif text[i] == "$":
            out.append("$")
            i += 1
        elif text[i] in "{(":
            end = _closing(text, i)
            if end < 0:
                closing = "}" if text[i] == "{" else ")"
                raise _BadMacro(f"missing '{closing}' in \"{text[j:]}\"")
            out.append(_expand_braced(text[i + 1 : end], lookup))
            i = end + 1
        elif (m := _NAME_RE.match(text, i)) is not None:
            out.append(lookup(m.group()))
            i = m.end()
        else:
            out.append("$")  # "$" before a non-name character stays as written
    return "".join(out)


def _unbrace(text: str) -> str:
    if text.startswith("{") and _closing(text, 0) == len(text) - 1:
        return text[1:-1]
    return text


def _expand_braced(inner: str, lookup: Callable[[str], str]) -> str:
    m = _NAME_RE.match(inner)
    if m is None:
        raise _BadMacro(f'bad parameter name in "${{{inner}}}"')
    value = lookup(m.group())
    rest = inner[m.end() :]
    if not rest:
        return value
    op, arg = rest[0], rest[1:]
    if op == "?":
        # Postfix 3.0: ${name?{when set}:{when empty}}
        if arg.startswith("{") and 0 < (k := _closing(arg, 0)) < len(arg) - 1:
            other = arg[k + 1 :]
            if other.startswith(":{") and _closing(other, 1) == len(other) - 1:
                return _expand(arg[1:k] if value else other[2:-1], lookup)
        return _expand(_unbrace(arg), lookup) if value else ""
    if op == ":":
        return "" if value else _expand(_unbrace(arg), lookup)
    raise _BadMacro(f'bad parameter name in "${{{inner}}}"')


class _Expander:
    """Expands parameters on demand, once each, and notices loops and references."""

    def __init__(
        self, path: str | None, settings: Mapping[str, Setting], environ: Mapping[str, str]
    ) -> None:
        self.path = path
        self.settings = settings
        self.environ = environ
        self.cache: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.referenced: set[str] = set()
        self._stack: list[str] = []

    def where(self, name: str) -> str:
        setting = self.settings.get(name)
        if setting is not None and setting.line == OVERRIDE_LINE:
            return f"-o {name}"
        if setting is not None:
            return f"{self.path}, line {setting.line}"
        return f"{self.path}, default value" if self.path else "default value"

    def text(self, name: str) -> str | None:
        """The value as written (or the default), not expanded; None if unknown and unset."""
        if name in self.texts:
            return self.texts[name]
        setting = self.settings.get(name)
        param = PARAMETERS.get(name)
        if setting is not None:
            text = setting.value
        elif param is None:
            return None
        elif isinstance(param.default, str):
            text = param.default
        else:
            text = param.default(DefaultContext(self))
        self.texts[name] = text
        return text

    def expanded(self, name: str, referrer: str | None) -> str:
        if referrer is not None:
            self.referenced.add(name)
        if name in self.cache:
            return self.cache[name]
        if name in self._stack:
            loop = [*self._stack[self._stack.index(name) :], name]
            raise ConfigError(
                f"{self.where(loop[0])}: recursive $name expansion for parameter {loop[0]}: "
                + " -> ".join(loop)
            )
        self._stack.append(name)
        try:
            text = self.text(name)
            try:
                value = "" if text is None else _expand(text, lambda n: self.expanded(n, name))
            except _BadMacro as e:
                raise ConfigError(f"{self.where(name)}: parameter {name}: {e}") from None
        finally:
            self._stack.pop()
        self.cache[name] = value
        return value


# --- typed values ---------------------------------------------------------------------


class _BadValue(Exception):
    def __init__(self, phrase: str, shown: str | None = None) -> None:
        super().__init__(phrase)
        self.phrase = phrase
        self.shown = shown


def split_list(text: str) -> tuple[str, ...]:
    """A Postfix list: separated by commas and/or white space, empty items dropped.

    Text inside ``{ }`` is never split (Postfix's mystrtokq), so a list item may be
    ``inline:{ a = b, c = d }``.
    """
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        if depth == 0 and (ch == "," or ch.isspace()):
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(ch)
    if current:
        items.append("".join(current))
    return tuple(items)


def _time(param: Parameter, text: str) -> float:
    m = _TIME_RE.match(text)
    if m is None:
        raise _BadValue("bad time value")
    seconds = builtins.int(m.group(1)) * _UNIT_SECONDS[m.group(2) or param.unit]
    if seconds > INT_MAX:
        raise _BadValue("bad time value")
    return float(seconds)


def _integer(text: str, limit: int, phrase: str) -> int:
    if _DIGITS_RE.match(text) is None or builtins.int(text) > limit:
        raise _BadValue(phrase)
    return builtins.int(text)


def _network(entry: str) -> tuple[bool, IPNetwork]:
    negate = entry.startswith("!")
    body = entry[1:] if negate else entry
    m = re.fullmatch(r"(?:\[([^\[\]]+)\]|([^\[\]/]+))(/[0-9]{1,3})?", body)
    if m is None:
        raise _BadValue("bad network address or CIDR", entry)
    address = (m.group(1) or m.group(2)) + (m.group(3) or "")
    try:
        return negate, ipaddress.ip_network(address, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(address, strict=False)
    except ValueError:
        raise _BadValue("bad network address or CIDR", entry) from None
    raise _BadValue(
        "bad network address or CIDR",
        f"{entry} (non-null host address bits, perhaps you should use {loose} instead)",
    )


def _is_address(text: str, version: int | None = None) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or address.version == version


def _host_port(rule: HostPortRule, entry: str) -> ListenAddress:
    m = _HOSTPORT_RE.match(entry)
    if m is None:
        # A bare IPv6 address ("::1") is fine where the port may be left out; with a port
        # it needs [] since "::1:53" is ambiguous.
        if rule.default_port is not None and _is_address(entry, 6):
            return ListenAddress(entry, rule.default_port)
        raise _BadValue("bad host:port", entry)
    host = m.group("host")
    if m.group("bracketed") is not None:
        host = m.group("bracketed")
        ok = _is_address(host)
    else:
        ok = _is_address(host, 4) or (rule.hostnames and _HOSTNAME_RE.match(host) is not None)
    tls = m.group("tls") is not None
    port = rule.default_port if m.group("port") is None else builtins.int(m.group("port"))
    if not ok or (tls and not rule.tls_suffix) or port is None or port > 65535:
        raise _BadValue("bad host:port", entry)
    return ListenAddress(host, port, tls)


def _convert(param: Parameter, text: str) -> object:
    kind = param.kind
    if kind is Kind.STR:
        return text
    if kind is Kind.HOSTNAME:
        if not valid_hostname(text):
            raise _BadValue("bad hostname value")
        return text
    if kind is Kind.TIME:
        return _time(param, text)
    if kind is Kind.INT:
        return _integer(text, INT_MAX, "bad numerical configuration")
    if kind is Kind.SIZE:
        return _integer(text, LONG_MAX, "bad size value")
    if kind is Kind.BOOL:
        word = text.lower()
        if word not in ("yes", "no"):
            raise _BadValue("bad boolean value")
        return word == "yes"
    if kind is Kind.LIST:
        return split_list(text)
    if kind is Kind.NETWORKS:
        return NetworkMatcher(tuple(_network(e) for e in split_list(text)))
    if kind is Kind.HOSTPORTS:
        assert param.hostport is not None, param.name
        rule = param.hostport
        return tuple(_host_port(rule, e) for e in split_list(text))
    if kind is Kind.ENUM:
        word = text.lower()
        word = dict(param.aliases).get(word, word)
        if word not in param.choices:
            raise _BadValue("bad value")
        return word
    raise AssertionError(kind)


# --- the Config -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    """Every parameter's text and typed value, fixed at load time.

    ``settings`` holds what main.cf says; ``texts`` the unexpanded value of every
    parameter (as postconf prints it); ``expanded`` the same after ``$name`` expansion
    (as ``postconf -x`` prints it); ``values`` the typed values.
    """

    path: str | None
    settings: Mapping[str, Setting]
    texts: Mapping[str, str]
    expanded: Mapping[str, str]
    values: Mapping[str, object]
    warnings: tuple[str, ...]
    environ: Mapping[str, str]  # what computed defaults read (for default_raw)

    @property
    def explicit(self) -> frozenset[str]:
        """The names set in main.cf."""
        return frozenset(self.settings)

    def names(self) -> tuple[str, ...]:
        """Every known parameter and every name set in main.cf, sorted."""
        return tuple(sorted(self.values))

    def get(self, name: str) -> object:
        """The typed value (see Kind); KeyError for a name neither known nor set."""
        return self.values[name]

    def raw(self, name: str) -> str:
        """The value after ``$name`` expansion, as ``postconf -x`` prints it."""
        return self.expanded[name]

    def unexpanded(self, name: str) -> str:
        """The value as written in main.cf (or the default), as ``postconf`` prints it."""
        return self.texts[name]

    def default_raw(self, name: str) -> str:
        """The default as ``postconf -d`` prints it, ignoring main.cf; KeyError if unknown."""
        param = PARAMETERS[name]
        if isinstance(param.default, str):
            return param.default
        return _Expander(None, {}, self.environ).text(name) or ""

    def kind(self, name: str) -> Kind:
        """The kind of a parameter; STR for a name only main.cf knows."""
        param = PARAMETERS.get(name)
        if param is None:
            if name not in self.values:
                raise KeyError(name)
            return Kind.STR
        return param.kind

    def _typed(self, name: str, kinds: tuple[Kind, ...]) -> object:
        if self.kind(name) not in kinds:
            raise TypeError(f"parameter {name} is {self.kind(name).value}, not {kinds[0].value}")
        return self.values[name]

    def networks(self, name: str = "mynetworks") -> tuple[IPNetwork, ...]:
        """The networks listed without ``!``; use network_matcher() to honour exclusions."""
        return self.network_matcher(name).networks

    def network_matcher(self, name: str = "mynetworks") -> NetworkMatcher:
        value = self._typed(name, (Kind.NETWORKS,))
        assert isinstance(value, NetworkMatcher)
        return value

    def listen_addresses(self, name: str = "smtpd_listen") -> tuple[ListenAddress, ...]:
        value = self._typed(name, (Kind.HOSTPORTS,))
        assert isinstance(value, tuple)
        return value

    host_ports = listen_addresses  # the same, for dns_nameservers

    # Typed accessors for mypy.  They come last: inside the class body their names hide
    # the builtins, hence builtins.* in the signatures.

    def time(self, name: builtins.str) -> builtins.float:
        """A time in seconds."""
        value = self._typed(name, (Kind.TIME,))
        assert isinstance(value, builtins.float)
        return value

    def int(self, name: builtins.str) -> builtins.int:
        """A count or a size in bytes."""
        value = self._typed(name, (Kind.INT, Kind.SIZE))
        assert isinstance(value, builtins.int)
        return value

    def bool(self, name: builtins.str) -> builtins.bool:
        value = self._typed(name, (Kind.BOOL,))
        assert isinstance(value, builtins.bool)
        return value

    def str(self, name: builtins.str) -> builtins.str:
        """The expanded text of any parameter (for ENUM, the canonical value)."""
        value = self.values[name]
        return value if isinstance(value, builtins.str) else self.expanded[name]

    def list(self, name: builtins.str) -> builtins.tuple[builtins.str, ...]:
        """The items of any parameter's expanded text, split as a Postfix list."""
        value = self.values[name]
        if self.kind(name) is Kind.LIST:
            assert isinstance(value, builtins.tuple)
            return value
        return split_list(self.expanded[name])


OVERRIDE_LINE = 0  # the line of a setting given on the command line, not in main.cf


def closest_name(name: str) -> str | None:
    """The known parameter name closest to ``name`` (a typo's likely intent), if any is close."""
    lowered = name.lower()
    if lowered in PARAMETERS:
        return lowered
    close = difflib.get_close_matches(lowered, PARAMETERS, n=1, cutoff=0.75)
    return close[0] if close else None


def _hint(name: str) -> str:
    close = closest_name(name)
    return f" (did you mean {close}?)" if close else ""


def _warn_stderr(message: str) -> None:
    print(f"relay: warning: {message}", file=sys.stderr)


def _build(
    path: str | None,
    settings: Mapping[str, Setting],
    environ: Mapping[str, str],
    warn: Callable[[str], None] | None,
    strict: bool = False,
) -> Config:
    expander = _Expander(path, settings, environ)
    # main.cf first, in file order, so an error names the first bad line; then defaults.
    order = [s.name for s in sorted(settings.values(), key=lambda s: s.line)]
    order += [name for name in PARAMETERS if name not in settings]
    values: dict[str, object] = {}
    for name in order:
        text = expander.expanded(name, referrer=None)
        param = PARAMETERS.get(name)
        if param is None:
            values[name] = text
            continue
        try:
            values[name] = _convert(param, text)
        except _BadValue as e:
            shown = e.shown
            if shown is None:
                shown = text
                written = expander.text(name)
                if written != text:
                    shown += f' (expanded from "{written}")'
            raise ConfigError(
                f"{expander.where(name)}: {e.phrase} for parameter {name}: {shown}"
            ) from None
    # Postfix's postconf does not call a name unused when another value refers to it.
    unknown = [s for s in sorted(settings.values(), key=lambda s: s.line)
               if s.name not in PARAMETERS and s.name not in expander.referenced]
    if strict and unknown:
        first = unknown[0]
        raise ConfigError(f"{expander.where(first.name)}: unknown parameter {first.name}"
                          f"{_hint(first.name)}")
    warnings = tuple(
        f"{expander.where(s.name)}: unused parameter: {s.name}={s.value}{_hint(s.name)}"
        for s in unknown
    )
    for message in warnings:
        (warn or _warn_stderr)(message)
    texts = {name: expander.text(name) or "" for name in values}
    kept_environ = {k: environ[k] for k in ("HOME", "XDG_STATE_HOME") if k in environ}
    return Config(
        path=path,
        settings=MappingProxyType(dict(settings)),
        texts=MappingProxyType(texts),
        expanded=MappingProxyType(dict(expander.cache)),
        values=MappingProxyType(values),
        warnings=warnings,
        environ=MappingProxyType(kept_environ),
    )


def parse_overrides(overrides: Sequence[str]) -> dict[str, Setting]:
    """``-o name=value`` arguments (Postfix's daemons and postconf take them): each
    replaces what main.cf says for that name, and names itself in messages."""
    settings: dict[str, Setting] = {}
    for item in overrides:
        name, eq, value = item.partition("=")
        name = name.strip(_WS)
        if not eq or not name or any(c in _WS for c in name):
            raise ConfigError(f"-o {item}: missing '=' after parameter name")
        settings[name] = Setting(name, value.strip(_WS), OVERRIDE_LINE)
    return settings


def load(
    config_dir: str | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    warn: Callable[[str], None] | None = None,
    strict: bool = False,
    overrides: Sequence[str] = (),
) -> Config:
    """Read ``config_dir/main.cf`` (config_dir None: $MAIL_CONFIG; neither: defaults only),
    then apply ``overrides`` (``name=value`` each, as ``-o`` gives them).

    Every parameter is expanded and converted now; a problem raises ConfigError.  Each
    unused parameter is passed to ``warn`` (default: ``relay: warning: ...`` on stderr),
    or with ``strict`` the first one raises ConfigError naming the closest known name.
    ``overrides`` are settings given on the command line (Postfix's ``-o name=value``):
    they win over main.cf.
    """
    extra = parse_overrides(overrides)
    if config_dir is None:
        config_dir = config_dir_from(None, environ)
    if config_dir is None:
        return _build(None, extra, environ, warn, strict)
    path = os.path.join(config_dir, "main.cf")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"open {path}: {e.strerror}") from None
    return _build(path, {**parse_main_cf(data, path), **extra}, environ, warn, strict)


def defaults(*, environ: Mapping[str, str] = os.environ) -> Config:
    """Only the built-in defaults, whatever $MAIL_CONFIG says (``postconf -d``)."""
    return _build(None, {}, environ, None)
