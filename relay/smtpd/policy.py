"""The listener's policy as pure functions: what a client may do, and what its input means.

It owns the settings record of the listener (``SmtpdSettings``, built from main.cf by
relay.settings), the parsing and checking of envelope addresses and of the MAIL and RCPT
parameters (RFC 5321 §4.1.2 and §4.5.3.1, RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8,
RFC 3461 DSN with xtext, RFC 4954 AUTH=), the relay restrictions (Postfix's
smtpd_relay_restrictions with allow_untrusted_routing = no), the free-space rule before
MAIL (smtpd_check_size), the hop count, and unauthorised pipelining (RFC 2920).  Each
function takes plain values (a ``Client`` record, the text the client sent) and returns a
value or the reply to send (relay.smtpd.replies); none does I/O or keeps state, so each can
be tested without a socket and a crash here leaves nothing behind.

Addresses are checked as Postfix's smtpd does, a little stricter: any control character
(0x00-0x1F, 0x7F) or an unbalanced ``<``/``>`` inside an address is a syntax error (501
5.1.7 for the sender, 501 5.1.3 for a recipient).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.auth import PasswordFile
from relay.config import NetworkMatcher, domain_in_list, valid_hostname
from relay.smtpd import replies

# RFC 5321 §4.5.3.1.1 and §4.5.3.1.3.
MAX_LOCAL_PART = 64
MAX_PATH = 256
# RFC 5321 §4.5.3.1.4: 512 octets for a command line; the extensions offered widen MAIL and
# RCPT (RFC 1870 +26, RFC 6531 +10, RFC 6152 +14, RFC 3461 +100 on MAIL and +500 on RCPT,
# RFC 4954 +500 for AUTH=).
COMMAND_LIMIT = 512
MAIL_LIMIT = COMMAND_LIMIT + 26 + 10 + 14 + 100 + 500
RCPT_LIMIT = COMMAND_LIMIT + 500

DEFAULT_RELAY_RESTRICTIONS = (
    "permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination")
# What smtpd_relay_restrictions understands, and the entries of which at least one must
# be present, or the relay would be open (Postfix refuses to start without one, too).
RELAY_RESTRICTIONS = frozenset({
    "permit_mynetworks", "permit_sasl_authenticated", "permit_auth_destination",
    "reject_unauth_destination", "defer_unauth_destination", "reject", "defer", "permit",
    "reject_unauth_pipelining"})
_RELAY_GATES = ("reject_unauth_destination", "defer_unauth_destination", "reject", "defer")

# RFC 2920 §3.1 (and RFC 3207, RFC 4954): commands that must be the last in a group;
# anything already waiting behind one of them is unauthorised pipelining.
LAST_IN_GROUP = frozenset({"EHLO", "HELO", "DATA", "VRFY", "EXPN", "TURN", "NOOP",
                           "STARTTLS", "AUTH"})
# Commands allowed before STARTTLS when it is required (RFC 3207 §4).
BEFORE_STARTTLS = frozenset({"EHLO", "HELO", "NOOP", "QUIT", "STARTTLS", "RSET"})

_CTRL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5321 §4.1.2 Local-part: a dot-string of atext (RFC 6531: UTF-8 too), or a quoted
# string.  Postfix is lenient about the dots, and so are we.
_LOCAL = re.compile(r'[A-Za-z0-9!#$%&\'*+/=?^_`{|}~.\x80-\U0010ffff-]+|"(?:[^"\\]|\\.)*"')
_DOMAIN = re.compile(r"[^\s@\[\]<>()]+|\[[0-9A-Fa-f:.]+\]|\[IPv6:[0-9A-Fa-f:.]+\]")
_XTEXT_ESCAPE = re.compile(r"\+([0-9A-Fa-f]{2})")
_NOTIFY_ORDER = ("NEVER", "SUCCESS", "FAILURE", "DELAY")


@dataclass(frozen=True, slots=True)
class SmtpdSettings:
    """The listener's view of main.cf (relay.settings builds it)."""

    myhostname: str
    banner: str = ""
    mynetworks: NetworkMatcher = field(
        default_factory=lambda: NetworkMatcher(((False, ipaddress.ip_network("127.0.0.0/8")),
                                                (False, ipaddress.ip_network("::1/128")))))
    relay_domains: Sequence[str] = ()
    fast_flush_domains: Sequence[str] = ()  # the sites ETRN may flush
    message_size_limit: int = 10240000
    queue_minfree: int = 0
    recipient_limit: int = 1000
    timeout: float = 300.0
    connection_count_limit: int = 50
    mail_name: str = "relay"
    soft_bounce: bool = False  # every 5xx reply goes out as 4xx (Postfix's smtpd_chat.c)
    # smtpd_forbid_bare_newline: normalize | reject | no; who is excluded (None: mynetworks);
    # the reply code of reject (521 also disconnects).
    bare_newline: str = "normalize"
    bare_newline_exclusions: NetworkMatcher | None = None
    bare_newline_reject_code: int = 550
    # TLS and SMTP AUTH
    tls_context: ssl.SSLContext | None = None  # offered with STARTTLS unless level none
    tls_security_level: str = "none"  # none | may | encrypt
    tls_auth_only: bool = True
    tls_loglevel: int = 0  # smtpd_tls_loglevel: 1 logs each TLS session as Postfix does
    requiretls_enable: bool = True  # RFC 8689: REQUIRETLS offered over TLS
    sasl_auth_enable: bool = False
    passwords: PasswordFile | None = None
    auth_failure_delay: float = 1.0
    auth_failure_limit: int = 10  # failed logins per client per anvil time unit
    # relay control
    relay_restrictions: tuple[str, ...] = DEFAULT_RELAY_RESTRICTIONS
    allow_untrusted_routing: bool = False
    # abuse limits (0 = off)
    connection_rate_limit: int = 0
    message_rate_limit: int = 0
    recipient_rate_limit: int = 0
    anvil_rate_time_unit: float = 60.0
    event_limit_exceptions: NetworkMatcher | None = None  # None: mynetworks
    hard_error_limit: int = 20
    soft_error_limit: int = 10  # then every reply waits error_sleep_time (0: never)
    error_sleep_time: float = 1.0
    hopcount_limit: int = 50
    session_time_limit: float = 3600.0
    greet_wait: float = 0.0  # postscreen_greet_wait: silence before the banner
    forbid_unauth_pipelining: bool = True
    proxy_protocol: str = ""  # "" | haproxy
    proxy_timeout: float = 5.0

    @property
    def greeting(self) -> str:
        return self.banner or f"{self.myhostname} ESMTP {self.mail_name}"


@dataclass(frozen=True, slots=True)
class Client:
    """Who is talking to us, as far as policy cares; fixed once the connection (and any
    PROXY header) is in."""

    address: str
    name: str  # "localhost" on loopback, else "unknown": names are not looked up
    trusted: bool  # in mynetworks
    exempt: bool  # in smtpd_client_event_limit_exceptions
    bare_newline: str  # the smtpd_forbid_bare_newline mode that applies to this client

    @property
    def namaddr(self) -> str:
        return f"{self.name}[{self.address}]"


def client_for(settings: SmtpdSettings, address: str) -> Client:
    """The Client record for a peer address (an IPv4-mapped IPv6 address is the IPv4
    address it maps, as Postfix logs and matches it)."""
    address = normal_address(address)
    loopback = False
    try:
        loopback = ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        pass

    def matches(networks: NetworkMatcher) -> bool:
        try:
            return networks.matches(address)
        except ValueError:
            return False

    trusted = matches(settings.mynetworks)
    exempt = matches(settings.event_limit_exceptions or settings.mynetworks)
    excluded = matches(settings.bare_newline_exclusions or settings.mynetworks)
    # An excluded client gets Postfix's "no": lines may end in a bare LF, and so may the
    # end of the data; the stored message has CR LF line ends all the same.
    mode = "no" if excluded else settings.bare_newline
    return Client(address, "localhost" if loopback else "unknown", trusted, exempt, mode)


def normal_address(address: str) -> str:
    """``::ffff:10.9.9.5`` is ``10.9.9.5``: a dual-stack socket's view of an IPv4 client."""
    if address.startswith(("::ffff:", "::FFFF:")):
        try:
            mapped = ipaddress.IPv6Address(address).ipv4_mapped
        except ValueError:
            return address
        if mapped is not None:
            return str(mapped)
    return address


def check_relay_restrictions(restrictions: Sequence[str]) -> None:
    """ValueError unless every entry is known and one of them can refuse relaying."""
    for word in restrictions:
        if word.lower() not in RELAY_RESTRICTIONS:
            raise ValueError(f'unknown smtpd_relay_restrictions entry: "{word}"')
    if not any(word.lower() in _RELAY_GATES for word in restrictions):
        raise ValueError("in parameter smtpd_relay_restrictions, specify at least one "
                         "working instance of: " + ", ".join(_RELAY_GATES))


# ---- commands ---------------------------------------------------------------------------


def command_limit(verb: str) -> int:
    """The longest command line accepted for ``verb``, without its CR LF."""
    return MAIL_LIMIT if verb == "MAIL" else RCPT_LIMIT if verb == "RCPT" else COMMAND_LIMIT


def unauthorised_pipelining(verb: str, arg: str, pending: bool) -> bool:
    """RFC 2920: ``verb`` must end its group, yet more input is already waiting.  AUTH
    PLAIN with its initial response is a single round trip (RFC 4954 §4)."""
    if not pending or verb not in LAST_IN_GROUP:
        return False
    words = arg.split()
    return not (verb == "AUTH" and len(words) == 2 and words[0].upper() == "PLAIN")


# ---- envelope addresses ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Path:
    """A reverse-path or forward-path as sent: the address without its ``<>`` ("" for the
    null sender), the parameter words after it, and whether a source route was dropped."""

    address: str
    parameters: tuple[str, ...]
    source_route: bool


def parse_path(arg: str, keyword: str) -> Path | None:
    """``FROM:<address> params`` (``keyword`` "FROM:") or ``TO:<...>``; None when it is not
    that shape at all (a syntax error of the command, not of the address)."""
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword):].lstrip(" ")
    if not rest:
        return None
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            return Path(rest, (), False)  # unbalanced: address_error() says so
        inner, tail = rest[1:end], rest[end + 1:]
        if tail and not tail.startswith(" "):
            return Path(rest[: end + 1] + tail.split(" ")[0], (), False)  # "<a>b": malformed
    else:
        inner, _, tail = rest.partition(" ")
    route = inner.startswith("@")
    if route:
        # RFC 5321 §4.1.2 source route "@a,@b:user@d": the mailbox is what follows ":".
        inner = inner.partition(":")[2] if ":" in inner else inner
    return Path(inner, tuple(tail.split()), route)


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` that closes the ``<`` at 0, outside quoted strings; -1 if none."""
    quoted = escaped = False
    for i, ch in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def etrn_site(arg: str) -> str | None:
    """The site of ``ETRN site`` (RFC 1985; a leading ``@`` or ``#`` dropped): a host name
    or an address literal; None if it is neither."""
    site = arg[1:] if arg[:1] in ("@", "#") else arg
    if site.startswith("[") and site.endswith("]"):
        literal = site[1:-1]
        literal = literal[5:] if literal[:5].lower() == "ipv6:" else literal
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return None
        return site
    return site if valid_hostname(site.rstrip(".")) else None


def split_address(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def address_error(address: str, sender: bool) -> str | None:
    """The 501 reply for a malformed envelope address, or None."""
    bad = replies.BAD_SENDER if sender else replies.BAD_RECIPIENT
    if _CTRL.search(address) or "<" in address or ">" in address:
        return bad
    if len(address.encode("utf-8", "surrogateescape")) > MAX_PATH:
        return f"{bad}: address too long"
    local, domain = split_address(address)
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART:
        return f"{bad}: local part too long"
    if domain and (not _DOMAIN.fullmatch(domain) or ".." in domain):
        return bad
    if not local and domain:
        return bad
    if local and not _LOCAL.fullmatch(local):
        return bad
    return None


def routing_trick(address: str) -> bool:
    """True for addresses that carry their own route: percent hack, bang path, or a quoted
    local part with @ or %.  Postfix's allow_untrusted_routing = no refuses to relay these
    for untrusted clients."""
    local, _ = split_address(address)
    return address.startswith("@") or any(c in local for c in "%!@")


# ---- MAIL and RCPT parameters -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MailParameters:
    """What the MAIL command's parameters asked for."""

    size: int | None = None
    body: str = ""  # 7BIT | 8BITMIME | "" (not given)
    smtputf8: bool = False
    dsn_ret: str = ""  # FULL | HDRS | ""
    dsn_envid: str = ""  # decoded
    auth: str = ""  # AUTH= as sent (xtext, safe to log), "" for none or <>
    requiretls: bool = False  # RFC 8689 REQUIRETLS


@dataclass(frozen=True, slots=True)
class RcptParameters:
    dsn_notify: str = ""  # "NEVER" or a comma list of SUCCESS, FAILURE, DELAY; "" not given
    dsn_orcpt: str = ""  # "addr-type;address", decoded


def xtext_decode(text: str) -> str | None:
    """RFC 3461 §4: ``+XX`` is the octet XX; other characters are printable ASCII other
    than ``+`` and ``=``.  None when ``text`` is not xtext."""
    if any(not 33 <= ord(c) <= 126 or c == "=" for c in text):
        return None
    if "+" in _XTEXT_ESCAPE.sub("", text):
        return None
    try:
        return _XTEXT_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text).encode(
            "latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return None


def _utf8_xtext_decode(text: str) -> str | None:
    r"""RFC 6533 §3 utf-8-addr-xtext: xtext that may also hold UTF-8 and ``\x{HEX}``."""
    decoded = re.sub(r"\\x\{([0-9A-Fa-f]{1,6})\}", lambda m: chr(int(m.group(1), 16)), text)
    if _CTRL.search(decoded) or "+" in _XTEXT_ESCAPE.sub("", decoded):
        return None
    try:
        return _XTEXT_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), decoded)
    except ValueError:
        return None


def parse_mail_parameters(words: Sequence[str], *,
                          requiretls: bool = False) -> MailParameters | str:
    """The MAIL parameters as Postfix's mail_cmd reads them, or the reply refusing them;
    ``requiretls``: the REQUIRETLS keyword is allowed (offered: TLS is on, RFC 8689)."""
    size: int | None = None
    body = ret = envid = auth = ""
    smtputf8 = seen_envid = seen_auth = required = False
    for word in words:
        name, eq, value = word.partition("=")
        upper = name.upper()
        if upper == "SIZE" and eq:
            if not value.isascii() or not value.isdigit():
                return replies.BAD_SIZE
            size = int(value)
        elif upper == "BODY" and eq and value.upper() in ("7BIT", "8BITMIME"):
            body = value.upper()
        elif upper == "SMTPUTF8" and not eq:
            smtputf8 = True
        elif upper == "REQUIRETLS" and not eq and requiretls:
            required = True
        elif upper == "RET" and eq:
            if ret or value.upper() not in ("FULL", "HDRS"):
                return replies.BAD_RET
            ret = value.upper()
        elif upper == "ENVID" and eq:
            decoded = xtext_decode(value)
            if seen_envid or not value or decoded is None or not decoded.isprintable():
                return replies.BAD_ENVID
            envid, seen_envid = decoded, True
        elif upper == "AUTH" and eq:
            # RFC 4954 §5: the submitter's identity; we keep it only for the log, as
            # Postfix does (it is xtext, so printable as sent).
            if seen_auth:
                return replies.MULTIPLE_AUTH
            if value != "<>" and xtext_decode(value) is None:
                return replies.BAD_AUTH_PARAMETER
            seen_auth, auth = True, "" if value == "<>" else value
        else:
            return replies.UNSUPPORTED_OPTION.format(option=_printable(word))
    return MailParameters(size, body, smtputf8, ret, envid, auth, required)


def parse_rcpt_parameters(words: Sequence[str]) -> RcptParameters | str:
    """The RCPT parameters (RFC 3461 NOTIFY and ORCPT), or the reply refusing them."""
    notify = orcpt = ""
    for word in words:
        name, eq, value = word.partition("=")
        upper = name.upper()
        if upper == "NOTIFY" and eq:
            parsed = _notify(value)
            if notify or parsed is None:
                return replies.BAD_NOTIFY
            notify = parsed
        elif upper == "ORCPT" and eq:
            kind, semi, coded = value.partition(";")
            decoded = (_utf8_xtext_decode(coded) if kind.lower() == "utf-8"
                       else xtext_decode(coded)) if semi and kind else None
            if orcpt or not decoded or _CTRL.search(decoded):
                return replies.BAD_ORCPT
            orcpt = f"{kind};{decoded}"
        else:
            return replies.UNSUPPORTED_OPTION.format(option=_printable(word))
    return RcptParameters(notify, orcpt)


def _notify(value: str) -> str | None:
    words = {w.strip().upper() for w in value.split(",")}
    if not words or not words <= set(_NOTIFY_ORDER) or ("NEVER" in words and len(words) > 1):
        return None
    return ",".join(w for w in _NOTIFY_ORDER if w in words)


def _printable(text: str, limit: int = 100) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


# ---- relay control and resources --------------------------------------------------------


def relay_check(settings: SmtpdSettings, client: Client, sasl_user: str, recipient: str,
                source_route: bool) -> str | None:
    """smtpd_relay_restrictions for one recipient: None to permit, else the reply."""
    def authorized() -> bool:
        # The recipient is one we relay to for anybody: its domain is in relay_domains
        # and, with allow_untrusted_routing = no, the address routes nowhere else.
        if not settings.allow_untrusted_routing and (source_route or routing_trick(recipient)):
            return False
        return domain_in_list(split_address(recipient)[1], settings.relay_domains)

    for word in settings.relay_restrictions:
        action = word.lower()
        if action == "permit_mynetworks":
            if client.trusted:
                return None
        elif action == "permit_sasl_authenticated":
            if sasl_user:
                return None
        elif action == "permit_auth_destination":
            if authorized():
                return None
        elif action == "reject_unauth_destination":
            if not authorized():
                return replies.RELAY_DENIED.format(recipient=recipient)
        elif action == "defer_unauth_destination":
            if not authorized():
                return replies.RELAY_DEFERRED.format(recipient=recipient)
        elif action == "reject":
            return replies.ACCESS_DENIED.format(recipient=recipient)
        elif action == "defer":
            return replies.ACCESS_DEFERRED.format(recipient=recipient)
        elif action == "permit":
            return None
        elif action == "reject_unauth_pipelining":
            continue  # smtpd_forbid_unauth_pipelining does this for every command
        else:
            return replies.CONFIG_ERROR
    return None


def enough_space(settings: SmtpdSettings, free_bytes: int, announced: int | None) -> bool:
    """Postfix's smtpd_check_size: keep room for 1.5 messages of the announced size (or
    the size limit) above queue_minfree, so mail already queued can still have its state
    recorded while new mail is refused with 452 4.3.1.  ``free_bytes`` < 0: unknown."""
    size = settings.message_size_limit if announced is None else announced
    return free_bytes < 0 or free_bytes / 1.5 >= size + settings.queue_minfree


def too_big(settings: SmtpdSettings, size: int | None) -> bool:
    return bool(settings.message_size_limit and size is not None
                and size > settings.message_size_limit)
