"""TLS policy for the SMTP client: Postfix's levels, policy tables, name checks, settings.

Owns, as Postfix 3.7's TLS_README and postconf(5) describe them: the security levels
(``none``, ``may``, ``encrypt``, ``dane``, ``dane-only``, ``verify``, ``secure``; Postfix's
``fingerprint`` is not offered), the syntax of a smtp_tls_policy_maps entry (``level
[match=...] [protocols=...] [ciphers=...] [exclude=...]``) and its lookup (the next-hop
destination as written, then each parent domain as ``.parent``, as smtp_tls_policy.c does),
the reference names a certificate must match (``hostname``, ``nexthop``, ``dot-nexthop``
and literal names, as smtp_tls_verify_cert_match and smtp_tls_secure_cert_match say),
the matching itself (DNS subjectAltNames, else the subject CN; a wildcard stands for one
leftmost label; ``.example.com`` matches any name below example.com), the protocol range
from Postfix's protocol syntax (``!SSLv3``, ``>=TLSv1.2``), the cipher list of a grade
(``tls_high_cipherlist``, ``tls_medium_cipherlist``) with exclusions, the RFC 8689
``TLS-Required: No`` header, and ``HostPolicy``: everything one server must give.

Pure: no I/O, no sockets, no logging.  Lookup tables come in already opened.

Errors::

    ValueError
     +-- PolicyError    a bad policy entry, protocol list or cipher grade; the message
                        names the table, key and attribute as Postfix's warning does
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.config import split_list

if TYPE_CHECKING:  # a type only: the listener's processes need no DNS (relay.routing)
    from relay.routing import Table

__all__ = [
    "Defaults",
    "Entry",
    "HostPolicy",
    "Level",
    "PolicyError",
    "PolicyMaps",
    "ReportScope",
    "TlsEvent",
    "cipher_list",
    "match_certificate",
    "parse_entry",
    "parse_level",
    "policy_keys",
    "protocol_range",
    "reference_names",
    "tls_not_required",
]


class PolicyError(ValueError):
    """A policy entry, protocol list or cipher grade relay cannot use."""


class Level(enum.IntEnum):
    """Postfix's TLS security levels, in Postfix's order (src/tls/tls.h)."""

    NONE = 0
    MAY = 1
    ENCRYPT = 2
    DANE = 5
    DANE_ONLY = 6
    VERIFY = 7
    SECURE = 8

    @property
    def word(self) -> str:
        return self.name.lower().replace("_", "-")

    @property
    def required(self) -> bool:
        """TLS or no mail (Postfix's TLS_REQUIRED)."""
        return self > Level.MAY

    @property
    def must_match(self) -> bool:
        """The certificate must be verified and match (Postfix's TLS_MUST_MATCH)."""
        return self > Level.ENCRYPT


LEVEL_WORDS = tuple(level.word for level in Level)


def parse_level(word: str) -> Level:
    for level in Level:
        if level.word == word.strip().lower():
            return level
    raise PolicyError(f'invalid security level "{word}"')


# --- policy table entries ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One smtp_tls_policy_maps result; None fields fall back to main.cf."""

    level: Level
    match: tuple[str, ...] = ()
    protocols: str | None = None
    ciphers: str | None = None
    exclude: str | None = None
    key: str = ""  # the lookup key that found it
    table: str = ""  # the table that held it


def parse_entry(text: str) -> Entry:
    """``level [name=value ...]`` as Postfix's tls_policy_lookup_one() reads it; attributes
    may be written ``{ name = value }`` when the value holds spaces."""
    tokens = list(split_list(text))
    if not tokens:
        raise PolicyError("invalid empty policy")
    level = parse_level(tokens[0])
    attributes: dict[str, str] = {}
    match: list[str] = []
    if level < Level.MAY:
        return Entry(level)  # Postfix ignores (and warns about) attributes without TLS
    for token in tokens[1:]:
        if token.startswith("{") and token.endswith("}"):
            token = " ".join(token[1:-1].split())
        name, equals, value = token.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not equals or not name:
            raise PolicyError(f'malformed attribute/value pair "{token}"')
        if name == "match":
            if not value:
                raise PolicyError(f'attribute "{name}" has empty value')
            if level not in (Level.VERIFY, Level.SECURE):
                raise PolicyError(
                    f'attribute "{name}" invalid at security level "{level.word}"')
            match += [item for item in value.split(":") if item]
            continue
        if name not in ("protocols", "ciphers", "exclude"):
            raise PolicyError(f'invalid attribute name: "{name}"')
        if name in attributes:
            raise PolicyError(f'attribute "{name}" is specified multiple times')
        if name == "ciphers":
            if not value:
                raise PolicyError(f'attribute "{name}" has empty value')
            grade(value)
        if name == "protocols":
            protocol_range(value)
        attributes[name] = value
    return Entry(level, tuple(match), attributes.get("protocols"),
                 attributes.get("ciphers"), attributes.get("exclude"))


def policy_keys(destination: str) -> list[str]:
    """The keys tried for a next-hop destination: itself, then, for a domain name, each
    parent as ``.parent`` (``[host]:port`` and ``host:port`` only match as written)."""
    keys = [destination.lower()]
    if "[" in destination or ":" in destination:
        return keys
    labels = destination.lower().rstrip(".").split(".")
    keys += ["." + ".".join(labels[i:]) for i in range(1, len(labels))]
    return keys


class PolicyMaps:
    """smtp_tls_policy_maps: the tables in order; the first that has a key wins.

    Every entry is parsed when the maps are built, so a bad entry stops ``relay serve``
    (or a reload keeps the old settings) instead of deferring mail later.
    """

    def __init__(self, tables: Sequence[Table]) -> None:
        self.tables = tuple(tables)
        self._entries: list[dict[str, Entry]] = []
        for table in self.tables:
            parsed: dict[str, Entry] = {}
            for key, value in table.items():
                try:
                    entry = parse_entry(value)
                except PolicyError as exc:
                    raise PolicyError(
                        f"smtp_tls_policy_maps: {table.spec}: entry \"{key}\": {exc}") from None
                parsed[key] = Entry(entry.level, entry.match, entry.protocols, entry.ciphers,
                                    entry.exclude, key, table.spec)
            self._entries.append(parsed)

    def __bool__(self) -> bool:
        return bool(self.tables)

    def lookup(self, destination: str) -> Entry | None:
        for key in policy_keys(destination):
            for entries in self._entries:
                found = entries.get(key)
                if found is not None:
                    return found
        return None


# --- certificate names ---------------------------------------------------------------------


def reference_names(patterns: Iterable[str], hostname: str, nexthop: str) -> tuple[str, ...]:
    """The names a certificate may match: ``hostname`` is the server's name (the MX host,
    or the next hop's host), ``nexthop`` the next-hop domain, ``dot-nexthop`` any name
    below it; anything else is a name as written (``.example.com``: any name below it)."""
    names: list[str] = []
    for pattern in patterns:
        word = pattern.strip().lower().rstrip(".")
        if word == "hostname":
            value = hostname
        elif word == "nexthop":
            value = nexthop
        elif word == "dot-nexthop":
            value = "." + nexthop
        else:
            value = word
        value = value.lower().rstrip(".")
        if value and value != "." and value not in names:
            names.append(value)
    return tuple(names)


@dataclass(frozen=True, slots=True)
class CertNames:
    """The identities a certificate claims: DNS and IP subjectAltNames, the subject CN."""

    dns: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()
    common_name: str = ""


def _dns_match(reference: str, name: str) -> bool:
    name = name.lower().rstrip(".")
    if reference.startswith("."):
        if name.startswith("*."):
            base = name[2:]
            return base == reference[1:] or base.endswith(reference)
        return name.endswith(reference) and len(name) > len(reference)
    if name.startswith("*."):
        label, dot, rest = reference.partition(".")
        return bool(label) and bool(dot) and rest == name[2:]
    return name == reference


def match_certificate(names: CertNames, references: Sequence[str]) -> str | None:
    """The first reference name the certificate matches, or None.

    As OpenSSL's X509_check_host() for Postfix: DNS subjectAltNames when there are any,
    else the subject CN; no partial-label wildcards; an IP address matches IP
    subjectAltNames only.
    """
    dns_names = names.dns or ((names.common_name,) if names.common_name else ())
    for reference in references:
        try:
            ip = ipaddress.ip_address(reference)
        except ValueError:
            ip = None
        if ip is not None:
            if any(_same_ip(ip, other) for other in names.ip):
                return reference
            continue
        if any(_dns_match(reference, name) for name in dns_names if "*" not in name[1:]):
            return reference
    return None


def _same_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> bool:
    try:
        return ipaddress.ip_address(text.strip()) == ip
    except ValueError:
        return False


# --- protocols and ciphers -----------------------------------------------------------------

_PROTOCOLS = (
    ("TLSv1", ssl.TLSVersion.TLSv1),
    ("TLSv1.1", ssl.TLSVersion.TLSv1_1),
    ("TLSv1.2", ssl.TLSVersion.TLSv1_2),
    ("TLSv1.3", ssl.TLSVersion.TLSv1_3),
)
_OBSOLETE = ("SSLv2", "SSLv3")


@functools.lru_cache(maxsize=64)  # asked again for every delivery; a pure function of text
def protocol_range(text: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """Postfix's protocol list (``!SSLv2, !SSLv3``, ``>=TLSv1.2``, ``TLSv1.2 TLSv1.3``) as
    the lowest and highest version allowed.  SSLv2, SSLv3, TLSv1 and TLSv1.1 are never
    offered (RFC 8996), whatever the list says."""
    names = [name for name, _ in _PROTOCOLS]
    allowed = set(names)
    included: set[str] = set()
    low, high = 0, len(names) - 1
    for item in (i for i in re.split(r"[\s,:]+", text.strip()) if i):
        op, name = "", item
        for prefix in (">=", "<=", "!"):
            if item.startswith(prefix):
                op, name = prefix, item[len(prefix):]
                break
        canonical = next((n for n in names + list(_OBSOLETE) if n.lower() == name.lower()),
                         None)
        if canonical is None:
            raise PolicyError(f'invalid TLS protocol list "{text}": unknown protocol "{name}"')
        if canonical in _OBSOLETE:
            if op in (">=", "<="):
                raise PolicyError(f'invalid TLS protocol list "{text}": "{item}"')
            continue
        index = names.index(canonical)
        if op == "!":
            allowed.discard(canonical)
        elif op == ">=":
            low = max(low, index)
        elif op == "<=":
            high = min(high, index)
        else:
            included.add(canonical)
    if included:
        allowed &= included
    # TLSv1 and TLSv1.1 are parsed but never offered (deprecated: RFC 8996).
    chosen = [i for i, name in enumerate(names)
              if name in allowed and max(low, 2) <= i <= high]
    if not chosen:
        raise PolicyError(f'invalid TLS protocol list "{text}": no protocol left')
    return _PROTOCOLS[chosen[0]][1], _PROTOCOLS[chosen[-1]][1]


GRADES = ("high", "medium")


def grade(word: str) -> str:
    value = word.strip().lower()
    if value not in GRADES:
        raise PolicyError(f'invalid cipher grade "{word}" (use high or medium)')
    return value


def cipher_list(grade_word: str, lists: Mapping[str, str], exclusions: Iterable[str]) -> str:
    """The OpenSSL cipher string of a grade, minus each exclusion (Postfix's
    tls_set_ciphers(): the grade's list, then ``:!name`` for every excluded name)."""
    text = lists[grade(grade_word)]
    for item in exclusions:
        for name in re.split(r"[\s,:]+", item.strip()):
            if name:
                text += ":!" + name.lstrip("!")
    return text


# --- main.cf defaults and the resolved policy of one server --------------------------------


@dataclass(frozen=True, slots=True)
class Defaults:
    """The main.cf settings a policy entry may override (smtp_tls_*), and the lists."""

    ciphers: str = "medium"
    mandatory_ciphers: str = "medium"
    exclude_ciphers: str = ""
    mandatory_exclude_ciphers: str = ""
    protocols: str = "!SSLv2, !SSLv3"
    mandatory_protocols: str = "!SSLv2, !SSLv3"
    verify_cert_match: tuple[str, ...] = ("hostname",)
    secure_cert_match: tuple[str, ...] = ("nexthop", "dot-nexthop")
    cipherlists: tuple[tuple[str, str], ...] = (
        ("high", "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL"),
        ("medium", "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH"),
    )

    def __post_init__(self) -> None:
        for text in (self.protocols, self.mandatory_protocols):
            protocol_range(text)
        grade(self.ciphers)
        grade(self.mandatory_ciphers)


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """What one server must give, decided before connecting to it.

    ``level``: the effective level (DANE and DANE_ONLY only with usable ``tlsa``);
    ``references``: the names the certificate must match at a must-match level;
    ``minimum``/``maximum`` and ``ciphers``: the handshake's protocol range and OpenSSL
    cipher string; ``source``: where the level came from, for logs and ``relay tls
    policy``; ``sts_testing``: an MTA-STS policy in testing mode asks for verification
    that is only logged and reported; ``requiretls``: the sender asked for REQUIRETLS
    (RFC 8689): verified TLS and the REQUIRETLS keyword, or a 5.7.30 bounce; ``report``:
    the TLSRPT policy this server's sessions count towards, if any.
    """

    level: Level
    references: tuple[str, ...] = ()
    tlsa: tuple[tuple[int, int, int, bytes], ...] = ()
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    ciphers: str = ""
    source: str = "smtp_tls_security_level"
    sts_testing: bool = False
    requiretls: bool = False
    report: ReportScope | None = None

    @property
    def cache_key(self) -> tuple[object, ...]:
        """A cached connection made under this policy may carry mail of this policy only."""
        return (self.level, self.references, self.tlsa, self.minimum, self.maximum,
                self.ciphers, self.sts_testing, self.requiretls)


@dataclass(frozen=True, slots=True)
class ReportScope:
    """The policy a TLS session is reported under (RFC 8460 4.3, "policy")."""

    policy_type: str  # "sts" or "tlsa"
    policy_domain: str
    policy_strings: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class TlsEvent:
    """One TLS session (or its failure) under a reportable policy, for RFC 8460."""

    scope: ReportScope
    result_type: str = ""  # "" for a successful session
    sending_ip: str = ""
    receiving_ip: str = ""
    receiving_mx_hostname: str = ""


def host_policy(level: Level, defaults: Defaults, *, hostname: str, nexthop: str,
                entry: Entry | None = None, source: str = "smtp_tls_security_level",
                tlsa: tuple[tuple[int, int, int, bytes], ...] = (),
                references: tuple[str, ...] | None = None, sts_testing: bool = False,
                requiretls: bool = False, report: ReportScope | None = None) -> HostPolicy:
    """A level with its settings resolved: protocol range and ciphers (a policy entry's
    own, else main.cf's plain or mandatory ones), and the reference names."""
    mandatory = level > Level.MAY or sts_testing
    protocols = entry.protocols if entry and entry.protocols else (
        defaults.mandatory_protocols if mandatory else defaults.protocols)
    minimum, maximum = protocol_range(protocols)
    grade_word = entry.ciphers if entry and entry.ciphers else (
        defaults.mandatory_ciphers if mandatory else defaults.ciphers)
    if entry is not None and entry.exclude is not None:
        exclusions = [entry.exclude]
    else:
        exclusions = [defaults.exclude_ciphers]
        if mandatory:
            exclusions.append(defaults.mandatory_exclude_ciphers)
    if level >= Level.DANE:
        exclusions.append("aNULL")  # a certificate is required at these levels
    ciphers = cipher_list(grade_word, dict(defaults.cipherlists), exclusions)
    if references is None:
        references = ()
        if level in (Level.VERIFY, Level.SECURE) or sts_testing:
            patterns: Sequence[str] = entry.match if entry and entry.match else (
                defaults.secure_cert_match if level == Level.SECURE
                else defaults.verify_cert_match)
            references = reference_names(patterns, hostname, nexthop)
    return HostPolicy(level, references, tlsa, minimum, maximum, ciphers, source,
                      sts_testing, requiretls, report)


# --- RFC 8689 TLS-Required: No -------------------------------------------------------------

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_TLS_REQUIRED = re.compile(rb"(?im)^TLS-Required[ \t]*:[ \t]*(.*?)[ \t]*\r?$")


def tls_not_required(message: bytes) -> bool:
    """Whether the message header says ``TLS-Required: No`` (RFC 8689 section 5)."""
    end = _HEADER_END.search(message)
    header = message[: end.start()] if end else message
    found = _TLS_REQUIRED.search(header)
    return found is not None and found.group(1).lower() == b"no"
