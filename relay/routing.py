"""Routing: the next hop for a recipient, and the addresses that next hop resolves to.

Owns Postfix's next-hop syntax (transport(5) results and relayhost), the lookup tables that
transport_maps may name (``texthash:`` and ``inline:``), the transport(5) search order, and the
resolution of a next hop to addresses: MX, A and AAAA lookups with dnspython following RFC 5321
section 5.1 (MX preference order, implicit MX), RFC 7505 (null MX), and Postfix's smtp_addr.c for
mail loop detection, backup-MX truncation and the wording of every failure reason.  It also
answers the TXT and TLSA questions of MTA-STS (RFC 8461), TLS reporting (RFC 8460) and DANE
(RFC 7672), and says which answers were DNSSEC-validated: with ``smtp_dns_support_level =
dnssec`` queries ask for validation (AD and DO, RFC 6840 5.7), and an AD bit counts only when
the operator declared the resolvers trusted (``dns_trust_ad``, or glibc's ``options trust-ad``
in /etc/resolv.conf), as Postfix relies on its trusted local resolver.

It never touches the spool, never opens an SMTP connection, and never decides what happens to a
message: a failed resolution is a value (``Failure``: dsn, reason, permanent) that the caller turns
into a defer or a bounce.  Tables are read once, when they are opened; a change to a texthash file
needs a new Router (Postfix: ``postfix reload``).  Nothing here writes anything, so a crash at any
point leaves nothing behind.

Errors::

    ValueError
     +-- RouteError      bad next-hop syntax, bad or unreadable lookup table, address without domain
"""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import logging
import os
import random
import re
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TLSA
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.resolver

if TYPE_CHECKING:
    from relay.config import Config

__all__ = [
    "Failure",
    "NextHop",
    "Records",
    "Resolution",
    "Resolver",
    "RouteError",
    "Router",
    "Table",
    "Target",
    "Transport",
    "open_table",
    "parse_nameserver",
    "parse_next_hop",
]

# Postfix logs table problems from trivial-rewrite(8) and DNS problems from smtp(8); relay.log
# names the program after the last component of the logger name.
table_log = logging.getLogger("relay.trivial-rewrite")
dns_log = logging.getLogger("relay.smtp")

SMTP_PORT = 25


class RouteError(ValueError):
    """A next hop, table or recipient that routing cannot work with; the message says which."""


class Transport(enum.StrEnum):
    """The delivery transports relay implements (Postfix master.cf service names)."""

    SMTP = "smtp"
    DISCARD = "discard"  # discard(8): report the recipient as delivered, deliver nothing
    ERROR = "error"  # error(8): bounce with the next-hop text as the reason
    MAILDIR = "maildir"  # local(8)'s Maildir delivery, into the directory in the next hop


# ---------------------------------------------------------------------------------------------
# Next hops


@dataclass(frozen=True, slots=True)
class NextHop:
    """Where mail for a recipient goes.

    For ``smtp``: ``host`` and ``port``, with ``mx_lookup`` False for the ``[host]`` forms.
    For ``discard`` and ``error``: ``text``, the next-hop field that Postfix's discard(8) and
    error(8) report as the reason, optionally led by a DSN code (``5.1.1 no such user``).
    For ``maildir``: ``text``, the Maildir's absolute path.
    """

    transport: Transport
    host: str
    port: int
    mx_lookup: bool
    text: str = ""

    @property
    def label(self) -> str:
        """The next hop as Postfix writes it: ``host``, ``host:port``, ``[host]``, ``[host]:port``.

        This is the form smtp_sasl_password_maps is keyed on.  Port 25 is left out, so
        ``[host]:25`` and ``[host]`` are one next hop.  discard and error hops have no host:
        their label is the transport name.
        """
        if self.transport is not Transport.SMTP:
            return str(self.transport)
        host = f"[{self.host}]" if not self.mx_lookup else self.host
        return host if self.port == SMTP_PORT else f"{host}:{self.port}"

    @property
    def destination(self) -> str:
        """The key for per-destination concurrency and dead-destination tracking.

        The recipient domain for the default MX route (its host *is* the domain), else the next
        hop as written, so every recipient sent through one relayhost shares one destination.
        """
        if self.transport is not Transport.SMTP:
            return f"{self.transport}:{self.text}"
        return self.label

    @property
    def dsn(self) -> str:
        """The status an error or discard hop reports: the text's DSN code, or 5.0.0/2.0.0."""
        return self._split_text()[0]

    @property
    def reason(self) -> str:
        """The text an error or discard hop reports, without its leading DSN code."""
        return self._split_text()[1]

    def _split_text(self) -> tuple[str, str]:
        # Postfix dsn_split(): an optional RFC 3463 code, then the text.
        default = "2.0.0" if self.transport is Transport.DISCARD else "5.0.0"
        match = _DSN_PREFIX.match(self.text)
        if match is None:
            return default, self.text
        code = match.group(1)
        if self.transport is Transport.DISCARD and not code.startswith("2"):
            code = default  # discard(8) always reports success
        return code, self.text[match.end() :]


_DSN_PREFIX = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")
_HOSTNAME = re.compile(
    r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*\.?",
    re.IGNORECASE,
)


def parse_next_hop(value: str, default_domain: str) -> NextHop:
    """Parse a transport(5) result or a relayhost value.

    Accepted: ``smtp:[host]:port``, ``smtp:[host]`` (no MX lookup), ``smtp:host``,
    ``smtp:host:port`` (MX lookup), the same without ``smtp:`` (relayhost syntax, including
    ``[1.2.3.4]:2525`` and ``[::1]:2525``), ``:nexthop`` (null transport = smtp),
    ``discard:``/``discard:text`` and ``error:``/``error:text``.  An empty nexthop after a
    transport (``smtp:``) is ``default_domain`` with MX lookup, as in transport(5).  A port may
    be a number or a service name from /etc/services.
    """
    text = value.strip()
    if not text:
        raise RouteError("empty next hop")
    transport, nexthop = _split_transport(text)
    if transport is Transport.DISCARD:
        return NextHop(Transport.DISCARD, "", 0, False, nexthop.strip() or default_domain)
    if transport is Transport.MAILDIR:
        return NextHop(Transport.MAILDIR, "", 0, False, _maildir_path(nexthop, text))
    if transport is Transport.ERROR:
        reason = nexthop.strip()
        if not reason:
            where = f" for {default_domain}" if default_domain else ""
            reason = f"5.0.0 mail{where} is not deliverable (error transport)"
        return NextHop(Transport.ERROR, "", 0, False, reason)
    nexthop = nexthop.strip()
    if not nexthop:
        if not default_domain:
            raise RouteError(f"empty next hop in {value.strip()!r}")
        return NextHop(Transport.SMTP, default_domain.lower().rstrip("."), SMTP_PORT, True)
    if any(c in nexthop for c in ", \t"):
        raise RouteError(f"next hop {nexthop!r}: lists of next hops are not supported")
    if nexthop.startswith("["):
        close = nexthop.find("]")
        if close < 0:
            raise RouteError(f"next hop {nexthop!r}: missing ']'")
        host = nexthop[1:close]
        if host.lower().startswith("ipv6:"):  # RFC 5321 address-literal spelling
            host = host[5:]
        rest = nexthop[close + 1 :]
        if rest and not rest.startswith(":"):
            raise RouteError(f"next hop {nexthop!r}: garbage after ']'")
        port = _parse_port(rest[1:], nexthop) if rest else SMTP_PORT
        return NextHop(Transport.SMTP, _check_host(host, nexthop, bracketed=True), port, False)
    if nexthop.count(":") > 1:
        raise RouteError(f"next hop {nexthop!r}: an IPv6 address must be written as [address]")
    host, colon, port_text = nexthop.partition(":")
    port = _parse_port(port_text, nexthop) if colon else SMTP_PORT
    return NextHop(Transport.SMTP, _check_host(host, nexthop, bracketed=False), port, True)


def _maildir_path(path: str, nexthop: str) -> str:
    path = path.strip()
    if not path:
        raise RouteError(f"next hop {nexthop!r}: maildir: needs a directory")
    if not os.path.isabs(path):
        raise RouteError(f"next hop {nexthop!r}: the Maildir must be an absolute path")
    return os.path.normpath(path)


def _split_transport(text: str) -> tuple[Transport, str]:
    """Split ``transport:nexthop``; relayhost syntax (``host``, ``host:port``, ``[..]``) is smtp."""
    if text.startswith("["):
        return Transport.SMTP, text
    head, colon, tail = text.partition(":")
    if not colon:
        return Transport.SMTP, text
    if not head:
        return Transport.SMTP, tail  # ":nexthop": a null transport keeps the default, smtp
    try:
        return Transport(head.lower()), tail
    except ValueError:
        pass
    if _looks_like_port(tail):
        return Transport.SMTP, text  # relayhost "host:port"
    raise RouteError(f"unsupported transport {head!r} in next hop {text!r}")


def _looks_like_port(text: str) -> bool:
    try:
        _parse_port(text, text)
    except RouteError:
        return False
    return True


def _parse_port(text: str, nexthop: str) -> int:
    if text.isdigit():
        port = int(text)
        if 0 < port < 65536:
            return port
        raise RouteError(f"next hop {nexthop!r}: bad port number {text!r}")
    if text and re.fullmatch(r"[a-z][a-z0-9-]*", text, re.IGNORECASE):
        try:
            return socket.getservbyname(text.lower(), "tcp")
        except OSError:
            pass
    raise RouteError(f"next hop {nexthop!r}: bad port {text!r}")


def _check_host(host: str, nexthop: str, *, bracketed: bool) -> str:
    if _ip_literal(host) is not None:
        if not bracketed and ":" in host:
            raise RouteError(f"next hop {nexthop!r}: an IPv6 address must be written as [address]")
        return host.lower()
    if not host or len(host) > 255 or not _HOSTNAME.fullmatch(host):
        raise RouteError(f"next hop {nexthop!r}: bad host name {host!r}")
    return host.lower().rstrip(".")


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Lookup tables


class Table:
    """A read-only lookup table with Postfix's case folding: keys match case-insensitively."""

    __slots__ = ("_entries", "spec")

    def __init__(self, spec: str, entries: Mapping[str, str]) -> None:
        self.spec = spec
        self._entries = dict(entries)

    def get(self, key: str) -> str | None:
        return self._entries.get(key.lower())

    def items(self) -> Iterator[tuple[str, str]]:
        return iter(self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Table({self.spec!r}, {len(self._entries)} entries)"


def open_table(spec: str) -> Table:
    """Open ``texthash:/path`` or ``inline:{ key = value, ... }``; RouteError names the table."""
    spec = spec.strip()
    kind, colon, name = spec.partition(":")
    if not colon or not kind or not name:
        raise RouteError(f"{spec}: lookup table must be written as type:name")
    if kind == "texthash":
        return Table(spec, _read_texthash(spec, name))
    if kind == "inline":
        return Table(spec, _parse_inline(spec, name))
    raise RouteError(f"{spec}: unsupported dictionary type: {kind} (use texthash: or inline:)")


def _read_texthash(spec: str, path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as stream:
            lines = stream.read().splitlines()
    except OSError as exc:
        raise RouteError(f"{spec}: open {path}: {exc.strerror or exc}") from exc
    entries: dict[str, str] = {}
    for lineno, line in _logical_lines(path, lines):
        # Postfix dict_thash.c: split at the first white space, trim both sides.
        split = re.split(r"\s+", line, maxsplit=1)
        key, value = split[0], (split[1].strip() if len(split) > 1 else "")
        if not key or not value:
            table_log.warning(
                "%s, line %d: expected format: key whitespace value -- ignoring this line",
                path,
                lineno,
            )
            continue
        if key.endswith(":"):
            table_log.warning(
                '%s, line %d: record is in "key: value" format; is this an alias file?',
                path,
                lineno,
            )
        key = key.lower()
        if key in entries:
            table_log.warning('%s, line %d: duplicate entry: "%s"', path, lineno, key)
            continue
        entries[key] = value
    return entries


def _logical_lines(path: str, lines: Sequence[str]) -> Iterator[tuple[int, str]]:
    """Postfix readllines(): a line starting with white space continues the previous one;
    blank lines and lines whose first non-blank character is ``#`` are skipped."""
    current: list[str] = []
    start = 0
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip()
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if current:
                current.append(stripped)
            else:
                table_log.warning(
                    "%s, line %d: logical line must not start with white space", path, lineno
                )
            continue
        if current:
            yield start, " ".join(current)
        current, start = [line], lineno
    if current:
        yield start, " ".join(current)


def _parse_inline(spec: str, body: str) -> dict[str, str]:
    """Postfix dict_inline.c: ``{ key=value, { key = value with spaces } }``.

    Pairs are separated by commas or white space; a pair inside ``{}`` may contain both and
    may have white space around ``=``.  As an extension, white space around ``=`` is also
    accepted outside ``{}`` (``inline:{ key = value, key2 = value2 }``).
    """
    body = body.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise RouteError(f"{spec}: syntax error: expected {{ key=value ... }}")
    tokens = _inline_tokens(spec, body[1:-1])
    entries: dict[str, str] = {}
    for text in _merge_spaced_pairs(tokens):
        key, equals, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or not key or not value:
            raise RouteError(f"{spec}: expected format: key=value, found {text!r}")
        key = key.lower()
        if key in entries:
            table_log.warning('%s: duplicate entry: "%s"', spec, key)
            continue
        entries[key] = value
    return entries


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    braced: bool
    comma_before: bool


def _inline_tokens(spec: str, body: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, comma = 0, True
    while i < len(body):
        c = body[i]
        if c == ",":
            comma, i = True, i + 1
        elif c.isspace():
            i += 1
        elif c == "{":
            depth, j = 0, i
            while j < len(body):
                depth += {"{": 1, "}": -1}.get(body[j], 0)
                if depth == 0:
                    break
                j += 1
            if depth:
                raise RouteError(f"{spec}: syntax error: missing '}}'")
            tokens.append(_Token(body[i + 1 : j].strip(), True, comma))
            comma, i = False, j + 1
        elif c == "}":
            raise RouteError(f"{spec}: syntax error: unexpected '}}'")
        else:
            j = i
            while j < len(body) and body[j] not in ",{}" and not body[j].isspace():
                j += 1
            tokens.append(_Token(body[i:j], False, comma))
            comma, i = False, j
    return tokens


def _merge_spaced_pairs(tokens: Sequence[_Token]) -> Iterator[str]:
    """Join ``key``, ``=``, ``value`` tokens that only white space separated."""
    pending: str | None = None
    for token in tokens:
        joinable = (
            pending is not None
            and not token.braced
            and not token.comma_before
            and (pending.endswith("=") or token.text.startswith("="))
        )
        if joinable and pending is not None:
            pending += token.text
            continue
        if pending is not None:
            yield pending
        pending = token.text if not token.braced else None
        if token.braced:
            yield token.text
    if pending is not None:
        yield pending


# ---------------------------------------------------------------------------------------------
# Router: recipient -> next hop


class Router:
    """transport(5) lookups over transport_maps, then default_transport and relayhost, then the
    recipient domain's MX.

    Search order for ``user+ext@example.com``: ``user+ext@example.com``, ``user@example.com``
    (only with a recipient_delimiter), ``example.com``, ``.com``... each parent as
    ``.parent``, then ``*``; for each key the tables are tried in order.  A transport_maps
    entry wins over relayhost.  Per transport(5): ``:`` (null transport and nexthop) keeps the
    default route; ``smtp:`` resets the nexthop to the recipient domain; ``:[host]`` changes
    only the nexthop.  Every table entry is checked when the Router is built, so a bad entry
    is a startup error instead of a stuck message.

    The default route is Postfix's: ``default_transport`` (``smtp``), whose next hop is, in
    order, the one written in default_transport (``smtp:[10.0.0.5]``), relayhost, the
    recipient's domain; ``default_transport = maildir:/dir``, ``discard:`` or ``error:text``
    route everything that no table names there.  ``capture`` (capture_maildir, ``relay serve
    --capture``) routes every recipient into that Maildir, whatever the rest says.
    """

    def __init__(
        self,
        transport_maps: Sequence[str] = (),
        relayhost: str = "",
        *,
        recipient_delimiter: str = "",
        default_transport: str = "smtp",
        capture: str = "",
    ) -> None:
        self.tables = tuple(open_table(spec) for spec in transport_maps if spec.strip())
        self.recipient_delimiter = recipient_delimiter
        self.relayhost: NextHop | None = None
        self.capture: NextHop | None = None
        if relayhost.strip():
            try:
                self.relayhost = parse_next_hop(relayhost, "")
            except RouteError as exc:
                raise RouteError(f"relayhost: {exc}") from exc
        self.default_transport = default_transport.strip() or "smtp"
        if ":" not in self.default_transport:
            self.default_transport += ":"  # a transport name alone, as in transport(5)
        try:
            self._default("example.invalid")
        except RouteError as exc:
            raise RouteError(f"default_transport: {exc}") from exc
        if capture.strip():
            try:
                self.capture = NextHop(Transport.MAILDIR, "", 0, False,
                                       _maildir_path(capture, capture))
            except RouteError as exc:
                raise RouteError(f"capture_maildir: {exc}") from exc
        for table in self.tables:
            for key, value in table.items():
                try:
                    self._apply(value, "example.invalid")
                except RouteError as exc:
                    raise RouteError(f"{table.spec}: entry {key!r}: {exc}") from exc

    def next_hop(self, recipient: str) -> NextHop:
        address = recipient.strip().removeprefix("<").removesuffix(">")
        local, at, domain = address.rpartition("@")
        domain = domain.lower().rstrip(".")
        if self.capture is not None:
            return self.capture
        if not at or not domain:
            raise RouteError(f"recipient {recipient!r} has no domain")
        for key in self._search_keys(local.lower(), domain):
            for table in self.tables:
                value = table.get(key)
                if value is not None:
                    return self._apply(value, domain)
        return self._default(domain)

    def maildirs(self) -> list[str]:
        """Every Maildir a next hop names (capture first): where captured mail is read."""
        if self.capture is not None:
            return [self.capture.text]
        found: list[str] = []
        values = [self.default_transport, *(v for t in self.tables for _, v in t.items())]
        if self.relayhost is not None and self.relayhost.transport is Transport.MAILDIR:
            found.append(self.relayhost.text)
        for value in values:
            if value.strip().lower().startswith("maildir:"):
                path = parse_next_hop(value, "example.invalid").text
                if path not in found:
                    found.append(path)
        return found

    def _search_keys(self, local: str, domain: str) -> Iterator[str]:
        yield f"{local}@{domain}"
        # Postfix: every character of recipient_delimiter is a delimiter; the first one wins.
        cut = min((i for i, c in enumerate(local) if c in self.recipient_delimiter), default=-1)
        if cut > 0:
            yield f"{local[:cut]}@{domain}"
        yield domain
        if not domain.startswith("["):  # an address literal has no parent domains
            labels = domain.split(".")
            for i in range(1, len(labels)):
                yield "." + ".".join(labels[i:])
        yield "*"

    def _apply(self, value: str, domain: str) -> NextHop:
        value = value.strip()
        if value in ("", ":"):
            return self._default(domain)
        if ":" not in value and not value.startswith("["):
            value += ":"  # transport(5): a result without ':' is a transport name alone
        return parse_next_hop(value, domain)

    def _default(self, domain: str) -> NextHop:
        transport, nexthop = _split_transport(self.default_transport)
        if transport is not Transport.SMTP or nexthop.strip():
            # Postfix: a next hop in default_transport wins over relayhost.
            return parse_next_hop(self.default_transport, domain)
        if self.relayhost is not None:
            return self.relayhost
        if domain.startswith("[") and domain.endswith("]"):
            try:
                return parse_next_hop(domain, "")
            except RouteError:
                pass  # a malformed literal fails at DNS time, with a reason the sender can read
        return NextHop(Transport.SMTP, domain, SMTP_PORT, True)


def router_for(cfg: Config) -> Router:
    """The Router main.cf describes: transport_maps, relayhost, default_transport and
    capture_maildir (here rather than in relay.settings so that commands such as relay
    capture can find the Maildirs without importing the daemon's parts)."""
    return Router(cfg.list("transport_maps"), cfg.str("relayhost"),
                  default_transport=cfg.str("default_transport"),
                  capture=cfg.str("capture_maildir"))


# ---------------------------------------------------------------------------------------------
# Resolution: next hop -> addresses


@dataclass(frozen=True, slots=True)
class Target:
    """One address to try, in order: the MX host name, its address, the port, the preference.

    ``secure``: the address lookup was DNSSEC-validated (always False without
    ``smtp_dns_support_level = dnssec``).
    """

    hostname: str
    address: str
    port: int
    preference: int
    secure: bool = False


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a next hop has no address to try; ``permanent`` means bounce, else defer."""

    dsn: str
    reason: str
    permanent: bool


@dataclass(frozen=True, slots=True)
class Resolution:
    """The addresses to try in order, or why there are none.

    Where this relay is a backup MX for the destination, the targets are only the
    better-preference MX hosts, and no target at all is a temporary failure (4.4.4).
    """

    targets: tuple[Target, ...]
    failure: Failure | None
    mx_secure: bool = False  # the MX RRset was DNSSEC-validated (RFC 7672 2.2.1)


@dataclass(frozen=True, slots=True)
class Records:
    """What a TXT or TLSA lookup found.

    ``items``: TXT records with their strings joined (RFC 8461 3.1), or TLSA records as
    (usage, selector, matching type, data); empty for NXDOMAIN and NODATA.  ``error`` says
    why the lookup failed (SERVFAIL, timeout): the caller must not take that for "none".
    ``secure``: the answer (or the denial) was DNSSEC-validated by a trusted resolver.
    """

    items: tuple[object, ...] = ()
    error: str = ""
    secure: bool = False


class _Status(enum.Enum):
    OK = "ok"
    NOT_FOUND = "Host not found"  # NXDOMAIN
    NO_DATA = "Host found but no data record of requested type"  # NOERROR, empty answer
    TRY_AGAIN = "Host not found, try again"  # SERVFAIL, REFUSED, timeout
    MALFORMED = "Malformed domain name"


@dataclass(frozen=True, slots=True)
class _Answer:
    status: _Status
    records: tuple[dns.rdata.Rdata, ...] = ()
    secure: bool = False


@dataclass(frozen=True, slots=True)
class _Host:
    """An MX host (or the implicit MX) and what its A/AAAA lookups found."""

    name: str
    preference: int
    addresses: tuple[str, ...] = ()
    failure: Failure | None = None
    is_self: bool = False
    secure: bool = False


def parse_nameserver(entry: str) -> tuple[str, int]:
    """``ip``, ``ip:port``, ``[ipv6]``, ``[ipv6]:port`` or bare IPv6 -> (address, port)."""
    text = entry.strip()
    address = text
    if text.startswith("["):
        close = text.find("]")
        rest = text[close + 1 :] if close > 0 else "x"
        if rest and not rest.startswith(":"):
            raise RouteError(f"dns_nameservers: bad entry {entry!r}")
        address = text[1:close]
        port_text = rest[1:] if rest else "53"
    elif text.count(":") == 1:
        address, _, port_text = text.partition(":")
    else:
        port_text = "53"
    if _ip_literal(address) is None:
        raise RouteError(f"dns_nameservers: {entry!r} is not an IP address")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RouteError(f"dns_nameservers: bad port in {entry!r}")
    return address, int(port_text)


def _dns_failure(name: str, rdtype: str, status: _Status) -> Failure:
    # Postfix dns_lookup.c + smtp_addr.c: NXDOMAIN and NODATA bounce, anything else defers.
    permanent = status in (_Status.NOT_FOUND, _Status.NO_DATA, _Status.MALFORMED)
    return Failure(
        "5.4.4" if permanent else "4.4.3",
        f"Host or domain name not found. Name service error for name={name} type={rdtype}: "
        f"{status.value}",
        permanent,
    )


def _exchange_name(name: dns.name.Name) -> str:
    """An MX exchange as a lower-case host name; the root (RFC 7505 null MX) is ""."""
    if name == dns.name.root:
        return ""
    return name.to_text(omit_final_dot=True).lower()


def _loop_failure(name: str) -> Failure:
    return Failure("5.4.6", f"mail for {name} loops back to myself", True)


class Resolver:
    """Resolve a NextHop to the addresses to try, RFC 5321 section 5.1 and RFC 7505.

    ``nameservers`` are ``dns_nameservers`` entries (``ip``, ``ip:port``, ``[ipv6]:port``);
    empty means the system resolver (/etc/resolv.conf).  ``self_addresses`` are the
    (address, port) pairs this relay listens on; a wildcard address (``0.0.0.0``, ``::``)
    stands for every address of this host.  ``mx_address_limit`` is smtp_mx_address_limit
    (0: no limit).  ``rng`` orders MX hosts of equal preference (tests pass a seeded one).
    ``dnssec`` asks for DNSSEC validation (smtp_dns_support_level = dnssec); ``trust_ad``
    says the resolvers' AD bit may be believed (else every answer counts as insecure).
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        timeout: float = 5.0,
        myhostname: str = "",
        self_addresses: Sequence[tuple[str, int]] = (),
        mx_address_limit: int = 5,
        *,
        rng: random.Random | None = None,
        dnssec: bool = False,
        trust_ad: bool = False,
    ) -> None:
        self.myhostname = myhostname.lower().rstrip(".")
        self.self_addresses = tuple((address.strip("[]"), port) for address, port in self_addresses)
        self.mx_address_limit = mx_address_limit
        self.rng = rng if rng is not None else random.Random()
        if nameservers:
            servers = [parse_nameserver(entry) for entry in nameservers]
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = [
                dns.nameserver.Do53Nameserver(address, port) for address, port in servers
            ]
        else:
            try:
                self._dns = dns.asyncresolver.Resolver()
            except dns.exception.DNSException as exc:
                raise RouteError(f"system resolver: {exc}") from exc
        # One overall budget per query: dnspython retries within lifetime, which is what makes
        # a silent name server cost `timeout` seconds and not `timeout` per retry.
        self._dns.timeout = timeout
        self._dns.lifetime = timeout
        self._dns.cache = None
        self.dnssec = dnssec
        self.trust_ad = dnssec and trust_ad
        if dnssec:
            self._dns.flags = dns.flags.RD | dns.flags.AD
            self._dns.use_edns(0, dns.flags.DO, 1232)

    async def resolve(self, hop: NextHop, domain: str) -> Resolution:
        """The targets for ``hop`` (the next hop for recipients in ``domain``), or a Failure."""
        if hop.transport is not Transport.SMTP:
            raise RouteError(f"{hop.transport} next hop has no address to resolve")
        if hop.mx_lookup and _ip_literal(hop.host) is None:
            resolution = await self._resolve_mx(hop)
        else:
            resolution = await self._resolve_host(hop)
        if resolution.failure is not None:
            dns_log.info(
                "%s: next hop %s: %s (%s)",
                domain,
                hop.label,
                resolution.failure.reason,
                resolution.failure.dsn,
            )
        return resolution

    async def _resolve_host(self, hop: NextHop) -> Resolution:
        """``[host]:port``, or a literal address: A/AAAA only, no MX (Postfix smtp_host_addr)."""
        found = await self._addresses(hop.host, 0)
        if found.failure is not None:
            return Resolution((), found.failure)
        if any(self._is_self(address, hop.port) for address in found.addresses):
            return Resolution((), _loop_failure(hop.host))
        targets = [Target(hop.host, address, hop.port, 0, found.secure)
                   for address in found.addresses]
        return Resolution(self._limit(targets), None)

    async def _resolve_mx(self, hop: NextHop) -> Resolution:
        name = hop.host
        answer = await self._query(name, "MX")
        if answer.status in (_Status.NOT_FOUND, _Status.TRY_AGAIN, _Status.MALFORMED):
            return Resolution((), _dns_failure(name, "MX", answer.status))
        implicit = answer.status is _Status.NO_DATA
        if implicit:
            mx_list = [(0, name)]  # RFC 5321 5.1: no MX, the domain is its own implicit MX
        else:
            records = [
                (int(rr.preference), _exchange_name(rr.exchange))
                for rr in answer.records
                if isinstance(rr, dns.rdtypes.ANY.MX.MX)
            ]
            if all(exchange == "" for _, exchange in records):
                # RFC 7505: "0 ." alone (and, defensively, several of them) -> no mail.
                return Resolution(
                    (), Failure("5.1.10", f"Domain {name} does not accept mail (nullMX)", True)
                )
            mx_list = self._order([r for r in records if r[1] != ""])
        hosts = await asyncio.gather(
            *(self._mx_host(exchange, preference, hop.port) for preference, exchange in mx_list)
        )
        resolution = self._select(name, list(hosts), hop.port, implicit)
        if answer.secure and not implicit:
            resolution = Resolution(resolution.targets, resolution.failure, mx_secure=True)
        return resolution

    def _order(self, records: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
        """Sort by preference; hosts of equal preference in random order (RFC 5321 5.1)."""
        by_preference: dict[int, list[str]] = {}
        for preference, exchange in records:
            if exchange not in by_preference.setdefault(preference, []):
                by_preference[preference].append(exchange)
        ordered: list[tuple[int, str]] = []
        for preference in sorted(by_preference):
            group = by_preference[preference]
            self.rng.shuffle(group)
            ordered.extend((preference, exchange) for exchange in group)
        return ordered

    async def _mx_host(self, name: str, preference: int, port: int) -> _Host:
        if self.myhostname and name == self.myhostname:
            return _Host(name, preference, is_self=True)  # no need to look ourselves up
        found = await self._addresses(name, preference)
        is_self = any(self._is_self(address, port) for address in found.addresses)
        return _Host(name, preference, found.addresses, found.failure, is_self, found.secure)

    def _select(self, name: str, hosts: list[_Host], port: int, implicit: bool) -> Resolution:
        """Postfix smtp_domain_addr(): loop check, backup-MX truncation, address limit."""
        best = min(host.preference for host in hosts)
        mine = [host.preference for host in hosts if host.is_self]
        backup_mx = False
        if mine:
            if min(mine) <= best:
                return Resolution((), _loop_failure(name))
            # A backup MX only hands mail to better MX hosts: relaying to an equal or worse one
            # could bounce mail between backups forever.
            hosts = [host for host in hosts if host.preference < min(mine)]
            backup_mx = True
        targets: list[Target] = []
        seen: set[str] = set()
        for host in hosts:
            if host.failure is not None:
                dns_log.info("%s: MX host %s skipped: %s", name, host.name, host.failure.reason)
                continue
            for address in host.addresses:
                if address not in seen:
                    seen.add(address)
                    targets.append(Target(host.name, address, port, host.preference,
                                          host.secure))
        if targets:
            return Resolution(self._limit(targets), None)
        if backup_mx:
            return Resolution(
                (), Failure("4.4.4", f"unable to find primary relay for {name}", False)
            )
        failures = [host.failure for host in hosts if host.failure is not None]
        if not implicit:
            dns_log.warning("no MX host for %s has a valid address record", name)
        temporary = [failure for failure in failures if not failure.permanent]
        return Resolution((), (temporary or failures)[0])

    def _limit(self, targets: Sequence[Target]) -> tuple[Target, ...]:
        if self.mx_address_limit > 0:
            return tuple(targets[: self.mx_address_limit])
        return tuple(targets)

    async def _addresses(self, host: str, preference: int) -> _Host:
        """A then AAAA for ``host``; a literal address is its own answer, without DNS."""
        literal = _ip_literal(host)
        if literal is not None:
            return _Host(host, preference, (str(literal),))
        a, aaaa = await asyncio.gather(self._query(host, "A"), self._query(host, "AAAA"))
        addresses = tuple(
            rr.address
            for rr in a.records + aaaa.records
            if isinstance(rr, (dns.rdtypes.IN.A.A, dns.rdtypes.IN.AAAA.AAAA))
        )
        if addresses:
            # Secure only when both families were validated (one may be a signed denial).
            return _Host(host, preference, addresses, secure=a.secure and aaaa.secure)
        if a.status in (_Status.NOT_FOUND, _Status.MALFORMED):
            return _Host(host, preference, failure=_dns_failure(host, "A", a.status))
        for rdtype, answer in (("A", a), ("AAAA", aaaa)):
            if answer.status is _Status.TRY_AGAIN:
                return _Host(host, preference, failure=_dns_failure(host, rdtype, answer.status))
        return _Host(host, preference, failure=_dns_failure(host, "A", _Status.NO_DATA))

    async def _query(self, name: str, rdtype: str) -> _Answer:
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return _Answer(_Status.MALFORMED)
        try:
            answer = await self._dns.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            return _Answer(_Status.NOT_FOUND, secure=self._validated(responses.get(qname)))
        except dns.resolver.NoAnswer as exc:
            return _Answer(_Status.NO_DATA, secure=self._validated(exc.kwargs.get("response")))
        except dns.exception.DNSException as exc:
            dns_log.debug("%s/%s: %s", name, rdtype, exc)
            return _Answer(_Status.TRY_AGAIN)
        return _Answer(_Status.OK, tuple(answer), self._validated(answer.response))

    def _validated(self, response: object) -> bool:
        flags = getattr(response, "flags", 0)
        return self.trust_ad and bool(flags & dns.flags.AD)

    async def addresses(self, host: str) -> tuple[tuple[str, ...], Failure | None]:
        """The A and AAAA addresses of ``host`` (a literal address is its own), or why not."""
        found = await self._addresses(host, 0)
        return found.addresses, found.failure

    async def txt(self, name: str) -> Records:
        """The TXT records at ``name``, each record's strings joined (RFC 8461 3.1)."""
        answer = await self._query(name, "TXT")
        if answer.status in (_Status.TRY_AGAIN, _Status.MALFORMED):
            return Records(error=_dns_failure(name, "TXT", answer.status).reason)
        items = tuple(
            b"".join(rr.strings).decode("utf-8", "replace")
            for rr in answer.records
            if isinstance(rr, dns.rdtypes.ANY.TXT.TXT)
        )
        return Records(items, secure=answer.secure)

    async def tlsa(self, name: str) -> Records:
        """The TLSA records at ``name`` (``_25._tcp.mx.example.com``), RFC 6698."""
        answer = await self._query(name, "TLSA")
        if answer.status in (_Status.TRY_AGAIN, _Status.MALFORMED):
            return Records(error=_dns_failure(name, "TLSA", answer.status).reason)
        items = tuple(
            (int(rr.usage), int(rr.selector), int(rr.mtype), bytes(rr.cert))
            for rr in answer.records
            if isinstance(rr, dns.rdtypes.ANY.TLSA.TLSA)
        )
        return Records(items, secure=answer.secure)

    def _is_self(self, address: str, port: int) -> bool:
        ip = _ip_literal(address)
        if ip is None:
            return False
        for own_address, own_port in self.self_addresses:
            if own_port != port:
                continue
            own = _ip_literal(own_address)
            if own is None:
                continue
            if own.is_unspecified:
                # A wildcard listener is reachable on every local address of its family
                # (and "::" on IPv4 too, as a dual-stack socket is).
                if (own.version == ip.version or own.version == 6) and _is_local_address(ip):
                    return True
            elif own == ip:
                return True
        return False


def _is_local_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` belongs to this host: the kernel lets us bind only to local addresses."""
    if ip.is_loopback:
        return True
    if ip.is_unspecified or ip.is_multicast:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL):
                dns_log.warning("cannot tell whether %s is a local address: %s", ip, exc)
            return False
    return True
