"""The SMTP listener (Postfix's smtpd and cleanup): accept mail into the spool.

It owns the SMTP dialogue and the relay policy, and replies ``250 ... queued as ID``
only after the spool has committed the message durably.  It never delivers and
never reads the queue; after a commit it hands the queue ID to ``on_queued``,
which relay.daemon wires to the trigger socket of the queue manager process.

What a crash leaves: a session that had not seen 250 left nothing visible in a
queue (see spool.store); a session that had seen 250 left a complete message.

aiosmtpd does the protocol (``decode_data=False``: content is always bytes).  This
module adds Postfix's replies and limits on top of it: per-read timeouts,
bare-newline handling (RFC 5321 §2.3.8, the SMTP smuggling class), the relay check
(RFC 5321 §3.6, Postfix's allow_untrusted_routing = no), size and recipient limits,
and never a 5xx for our own failures.

The doors it locks: STARTTLS and implicit TLS (RFC 3207; bytes sent after STARTTLS in
the same packet are dropped, never executed), SMTP AUTH PLAIN and LOGIN against
relay.auth's scrypt file (RFC 4954, RFC 4616), smtpd_relay_restrictions, per-client
limits counted by relay.anvil, pregreet and unauthorised pipelining (RFC 2920), session
and error limits, line and NUL checks, the hop count, and the PROXY protocol for a relay
behind HAProxy.  Any refusal that ends a session (421, 554 5.5.x) first drops whatever
the client already sent, so nothing queued behind it is ever executed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import email.utils
import functools
import inspect
import ipaddress
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiosmtpd.smtp
from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import MISSING, SMTP, Session, TLSSetupException
from aiosmtpd.smtp import Envelope as SMTPEnvelope

from relay.anvil import Anvil, Event
from relay.auth import LoginThrottle, PasswordFile, PasswordFileError, valid_username
from relay.clock import Clock, SystemClock
from relay.config import NetworkMatcher, domain_in_list
from spool import Spool, SpoolFull
from spool.envelope import Envelope, Recipient
from spool.fsync import Syncer
from spool.store import Steps, run_steps, run_steps_async

log = logging.getLogger("relay.smtpd")
cleanup_log = logging.getLogger("relay.cleanup")

# RFC 5321 §4.5.3.1
MAX_LOCAL_PART = 64
INLINE_WRITE_MAX = 1 << 20  # bigger messages are written to the spool in a thread
MAX_PATH = 256
_CTRL = re.compile(r"[\x00-\x1f\x7f]")
# <local@domain> or <>, then nothing or SP and parameters: most paths in practice.
_SIMPLE_PATH = re.compile(r"<([A-Za-z0-9._+=-]+@[A-Za-z0-9.-]+|)>(?:$| +(.*)$)")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
# RFC 5321 §4.5.3.1.6: 1000 octets with the CR LF.  Counted on unstuffed content up to
# each LF, so a run of 1000 octets without one (the CR of a CR LF included) is too long.
_LONG_LINE = re.compile(rb"[^\n]{1000}")
_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)

REPLY_SIZE = "552 5.3.4 Message size exceeds fixed limit"
REPLY_STORAGE = "452 4.3.1 Insufficient system storage"
REPLY_TEMP = "451 4.3.0 Error: queue file write error"
REPLY_BARE_LF = "521 5.5.2 Error: bare <LF> received"
REPLY_LONG_LINE = "500 5.5.2 Error: text line too long"
REPLY_NUL_CONTENT = "554 5.6.0 Error: NUL character in message content"
REPLY_NUL_COMMAND = "500 5.5.2 Error: NUL character in command"
REPLY_HOPS = "554 5.4.6 Too many hops"
REPLY_UNKNOWN = "502 5.5.2 Error: command not recognized"
REPLY_PREGREET = "554 5.5.1 Error: SMTP protocol synchronization"
REPLY_PIPELINING = "554 5.5.0 Error: SMTP protocol synchronization"
REPLY_AUTH_OK = "235 2.7.0 Authentication successful"
REPLY_AUTH_FAILED = "535 5.7.8 Error: authentication failed: authentication failure"
REPLY_AUTH_OFF = "503 5.5.1 Error: authentication not enabled"
REPLY_AUTH_TEMP = "454 4.7.0 Temporary authentication failure"
REPLY_CONFIG = "451 4.3.5 Server configuration error"

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
LAST_IN_GROUP = frozenset({"EHLO", "HELO", "DATA", "VRFY", "EXPN", "TURN", "QUIT", "NOOP",
                           "STARTTLS", "AUTH"})

# aiosmtpd's own replies, said the way Postfix says them.
_TRANSLATE = {
    b"552 Error: Too much mail data": REPLY_SIZE.encode(),
    b"552 Error: message size exceeds fixed maximum message size": REPLY_SIZE.encode(),
    b"553 5.1.3 Error: malformed address": b"501 5.1.3 Bad address syntax",
    b"500 Command line too long": b"500 5.5.2 Error: command line too long",
    b"500 Line too long (see RFC5321 4.5.3.1.6)": b"500 5.5.2 Error: text line too long",
    b"503 Error: need MAIL command": b"503 5.5.1 Error: need MAIL command",
    b"503 Error: need RCPT command": b"503 5.5.1 Error: need RCPT command",
    b"503 Error: nested MAIL command": b"503 5.5.1 Error: nested MAIL command",
    b"500 Error: bad syntax": b"500 5.5.2 Error: bad syntax",
    b"530 Must issue a STARTTLS command first":
        b"530 5.7.0 Must issue a STARTTLS command first",
    b"220 Ready to start TLS": b"220 2.0.0 Ready to start TLS",
    b"454 TLS not available": b"502 5.5.1 Error: command not implemented",
    b"501 Syntax: STARTTLS": b"501 5.5.4 Syntax: STARTTLS",
    b"503 Error: send EHLO first": b"503 5.5.1 Error: send HELO/EHLO first",
    b"503 Error: send HELO first": b"503 5.5.1 Error: send HELO/EHLO first",
    b"500 Error: command 'AUTH' not recognized": REPLY_AUTH_OFF.encode(),
    b"501 Not enough value": b"501 5.5.4 Syntax: AUTH mechanism",
    b"501 Too many values": b"501 5.5.4 Syntax: AUTH mechanism",
    b"501 5.7.0 Auth aborted": b"501 5.7.0 Authentication aborted",
    b"501 5.5.2 Can't decode base64": b"501 5.5.2 Error: malformed authentication response",
    b"501 Syntax: EHLO hostname": b"501 5.5.4 Syntax: EHLO hostname",
    b"501 Syntax: HELO hostname": b"501 5.5.4 Syntax: HELO hostname",
    b"502 EXPN not implemented": b"502 5.5.1 Error: command not implemented",
    b"250 OK": b"250 2.0.0 Ok",
    b"221 Bye": b"221 2.0.0 Bye",
}


@dataclass(frozen=True, slots=True)
class SmtpdSettings:
    """The listener's view of main.cf."""

    myhostname: str
    banner: str = ""
    mynetworks: NetworkMatcher = field(
        default_factory=lambda: NetworkMatcher(((False, ipaddress.ip_network("127.0.0.0/8")),
                                                (False, ipaddress.ip_network("::1/128")))))
    relay_domains: Sequence[str] = ()
    message_size_limit: int = 10240000
    queue_minfree: int = 0
    recipient_limit: int = 1000
    timeout: float = 300.0
    connection_count_limit: int = 50
    bare_newline: str = "normalize"  # normalize | reject | no
    mail_name: str = "relay"
    extra: dict[str, Any] = field(default_factory=dict)
    # TLS and SMTP AUTH
    tls_context: ssl.SSLContext | None = None  # offered with STARTTLS unless level none
    tls_security_level: str = "none"  # none | may | encrypt
    tls_auth_only: bool = True
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
    hopcount_limit: int = 50
    session_time_limit: float = 3600.0
    greet_wait: float = 0.0  # postscreen_greet_wait: silence before the banner
    forbid_unauth_pipelining: bool = True
    proxy_protocol: str = ""  # "" | haproxy
    proxy_timeout: float = 5.0


def check_relay_restrictions(restrictions: Sequence[str]) -> None:
    """ValueError unless every entry is known and one of them can refuse relaying."""
    for word in restrictions:
        if word.lower() not in RELAY_RESTRICTIONS:
            raise ValueError(f'unknown smtpd_relay_restrictions entry: "{word}"')
    if not any(word.lower() in _RELAY_GATES for word in restrictions):
        raise ValueError("in parameter smtpd_relay_restrictions, specify at least one "
                         "working instance of: " + ", ".join(_RELAY_GATES))


def split_address(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def address_error(address: str, role: str) -> str | None:
    """A Postfix-style 501 reply for a bad envelope address, or None."""
    what = "sender" if role == "MAIL" else "recipient"
    if _CTRL.search(address) or "<" in address or ">" in address:
        return f"501 5.1.3 Bad {what} address syntax"
    if len(address) > MAX_PATH:
        return f"501 5.1.3 Bad {what} address syntax: address too long"
    local, domain = split_address(address)
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART:
        return f"501 5.1.3 Bad {what} address syntax: local part too long"
    if domain and (
        not re.fullmatch(r"[^\s@\[\]]+|\[[0-9A-Fa-f:.]+\]|\[IPv6:[0-9A-Fa-f:.]+\]", domain)
        or ".." in domain
    ):
        return f"501 5.1.3 Bad {what} address syntax"
    if not local and domain:
        return f"501 5.1.3 Bad {what} address syntax"
    return None


def routing_trick(address: str) -> bool:
    """True for addresses that carry their own route: percent hack, bang path,
    source route or a quoted local part with @ or %.  Postfix's
    allow_untrusted_routing = no refuses to relay these for untrusted clients."""
    local, _ = split_address(address)
    return address.startswith("@") or any(c in local for c in "%!@")


def _printable(data: bytes, limit: int = 100) -> str:
    """Client input for a log line: controls escaped, cut short."""
    text = data[:limit].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class Listener:
    """The aiosmtpd handler: policy checks and the hand-off to the spool."""

    def __init__(
        self,
        spool: Spool,
        settings: SmtpdSettings,
        on_queued: Callable[[Envelope], None] = lambda env: None,
        clock: Clock | None = None,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.spool = spool
        self.settings = settings
        self._trusted: dict[str, bool] = {}
        self.on_queued = on_queued
        self.sessions: set[RelaySMTP] = set()
        self.per_client: dict[str, int] = {}
        self.committing = 0
        self.syncer: Syncer | None = None  # the daemon's fsync helper, when it has one
        self._statvfs_at = -1.0
        self._free = -1
        self.shutting_down = False
        self.anvil = Anvil(settings.anvil_rate_time_unit)
        self.logins = LoginThrottle(self.anvil, settings.auth_failure_limit,
                                    settings.auth_failure_delay)
        # scrypt costs 16 MiB and tens of milliseconds a try: a flood of AUTH
        # attempts must not take every worker thread (or the memory) from the spool.
        self.password_checks = asyncio.Semaphore(4)

    def reconfigure(self, settings: SmtpdSettings) -> None:
        self.settings = settings
        self._trusted = {}
        self.anvil.reconfigure(settings.anvil_rate_time_unit)
        self.logins.limit = settings.auth_failure_limit
        self.logins.delay = settings.auth_failure_delay

    def factory(self, implicit_tls: bool = False) -> RelaySMTP:
        """A session; ``implicit_tls`` for a ``host:port/tls`` listener, whose server
        socket does the TLS handshake before the session starts."""
        s = self.settings
        host, _, ident = (s.banner or f"{s.myhostname} ESMTP {s.mail_name}").partition(" ")
        starttls = s.tls_context if s.tls_security_level != "none" and not implicit_tls \
            else None
        return RelaySMTP(
            self,
            data_size_limit=s.message_size_limit or None,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=host or s.myhostname,
            ident=ident or f"ESMTP {s.mail_name}",
            timeout=s.timeout,
            tls_context=starttls,
            require_starttls=starttls is not None and s.tls_security_level == "encrypt",
            # AUTH is offered and refused here (handle_EHLO, handle_AUTH), with
            # Postfix's replies, rather than by aiosmtpd.
            auth_require_tls=False,
            implicit_tls=implicit_tls,
        )

    def exempt(self, address: str) -> bool:
        """The client is in smtpd_client_event_limit_exceptions (default: mynetworks)."""
        s = self.settings
        try:
            return (s.event_limit_exceptions or s.mynetworks).matches(address)
        except ValueError:
            return False

    def over_rate(self, server: RelaySMTP, event: Event, limit: int) -> int:
        """Count an event for the client; the rate if it is now over ``limit``, else 0."""
        if not limit or self.exempt(server.client_address):
            return 0
        rate = self.anvil.record(event, server.client_address)
        return rate if rate > limit else 0

    # ---- aiosmtpd hooks --------------------------------------------------------

    async def handle_EHLO(
        self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        s = self.settings
        offer_auth = (s.sasl_auth_enable and s.passwords is not None
                      and (server.tls_active or not s.tls_auth_only))
        words = [r[4:] for r in responses[1:] if r[4:] != "HELP"
                 and (offer_auth or not r[4:].startswith("AUTH"))]
        words += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        # aiosmtpd widens the MAIL line limit at every EHLO, in a dict shared by all
        # sessions; RFC 1870 and RFC 6531 allow 512 + 26 + 10 octets, once.
        server.command_size_limits["MAIL"] = SMTP.command_size_limit + 26 + 10
        words.sort(key=_ehlo_order)
        return [responses[0]] + [f"250-{w}" for w in words[:-1]] + [f"250 {words[-1]}"]

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope, address: str,
        mail_options: list[str],
    ) -> str:
        error = address_error(address, "MAIL") if address != "<>" else None
        if error:
            return error
        rate = self.over_rate(server, Event.MESSAGE, self.settings.message_rate_limit)
        if rate:
            log.warning("Message delivery request rate limit exceeded: %d from %s for "
                        "service smtp", rate, server.client_string())
            server.close_after_reply = True
            return (f"421 4.7.0 {self.settings.myhostname} Error: too many messages "
                    f"from {server.client_address}")
        if not self.enough_space(mail_options):
            log.warning("%s: not enough free space in the queue file system",
                        server.client_string())
            return REPLY_STORAGE
        # Keep "<>" as given: aiosmtpd takes an empty mail_from for "no MAIL yet" and
        # would answer the next RCPT with 503.  _sender() reads it back as "".
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        s = self.settings
        client = server.client_string()
        error = address_error(address, "RCPT")
        if error is None and not split_address(address)[1]:
            if address.lower() == "postmaster":
                address = f"postmaster@{s.myhostname}"
            else:
                error = "501 5.1.3 Bad recipient address syntax"
        if error:
            return error
        rate = self.over_rate(server, Event.RECIPIENT, s.recipient_rate_limit)
        if rate:
            log.warning("Recipient address rate limit exceeded: %d from %s for service smtp",
                        rate, client)
            server.close_after_reply = True
            return (f"421 4.7.0 {s.myhostname} Error: too many recipients "
                    f"from {server.client_address}")
        if len(envelope.rcpt_tos) >= s.recipient_limit:
            return "452 4.5.3 Error: too many recipients"
        reply = self.relay_check(server, address)
        if reply is not None:
            log.info(
                "NOQUEUE: reject: RCPT from %s: %s; from=<%s> to=<%s> proto=%s helo=<%s>",
                client, reply, _sender(envelope), address,
                "ESMTP" if session.extended_smtp else "SMTP", session.host_name or "",
            )
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    def enough_space(self, mail_options: Sequence[str]) -> bool:
        """Postfix's smtpd_check_size: keep room for 1.5 messages of the announced size
        (or the size limit) above queue_minfree, so mail already queued can still
        have its state recorded while new mail is refused with 452 4.3.1."""
        s = self.settings
        size = s.message_size_limit
        for option in mail_options:
            if option.upper().startswith("SIZE=") and option[5:].isdigit():
                size = int(option[5:])
        now = time.monotonic()
        if now - self._statvfs_at > 0.2:  # a statvfs() per MAIL costs; 0.2 s is fresh enough
            try:
                st = os.statvfs(self.spool.root)
                self._free = st.f_bavail * st.f_frsize
            except OSError:
                self._free = -1
            self._statvfs_at = now
        return self._free < 0 or self._free / 1.5 >= size + s.queue_minfree

    def may_relay(self, server: RelaySMTP, address: str) -> bool:
        return self.relay_check(server, address) is None

    def relay_check(self, server: RelaySMTP, address: str) -> str | None:
        """smtpd_relay_restrictions for one recipient: None to permit, else the reply."""
        for word in self.settings.relay_restrictions:
            action = word.lower()
            if action == "permit_mynetworks":
                if self.trusted(server.client_address):
                    return None
            elif action == "permit_sasl_authenticated":
                if server.authenticated_user:
                    return None
            elif action == "permit_auth_destination":
                if self.permitted_destination(server, address):
                    return None
            elif action == "reject_unauth_destination":
                if not self.permitted_destination(server, address):
                    return f"554 5.7.1 <{address}>: Relay access denied"
            elif action == "defer_unauth_destination":
                if not self.permitted_destination(server, address):
                    return f"454 4.7.1 <{address}>: Relay access denied"
            elif action == "reject":
                return f"554 5.7.1 <{address}>: Recipient address rejected: Access denied"
            elif action == "defer":
                return f"450 4.7.1 <{address}>: Recipient address rejected: Access denied"
            elif action == "permit":
                return None
            elif action == "reject_unauth_pipelining":
                continue  # smtpd_forbid_unauth_pipelining does this for every command
            else:
                log.warning('unknown smtpd restriction: "%s"', word)
                return REPLY_CONFIG
        return None

    def permitted_destination(self, server: RelaySMTP, address: str) -> bool:
        """The recipient is one we relay to for anybody: its domain is in relay_domains
        and, with allow_untrusted_routing = no, the address routes nowhere else (no
        percent hack, bang path, quoted @ or source route)."""
        s = self.settings
        if not s.allow_untrusted_routing and (server.source_route or routing_trick(address)):
            return False
        return domain_in_list(split_address(address)[1], s.relay_domains)

    def trusted(self, address: str) -> bool:
        """The client is in mynetworks (remembered per address until the next reload:
        every RCPT asks)."""
        cache = self._trusted
        known = cache.get(address)
        if known is None:
            try:
                known = self.settings.mynetworks.matches(address)
            except ValueError:
                known = False
            if len(cache) >= 4096:
                cache.clear()
            cache[address] = known
        return known

    async def handle_AUTH(
        self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope, args: list[str]
    ) -> str | None:
        """AUTH PLAIN and LOGIN (RFC 4954, RFC 4616) against smtpd_sasl_password_file.

        aiosmtpd has already checked EHLO, the syntax and that the mechanism is one of
        PLAIN and LOGIN.  None means the reply was sent already (an aborted exchange)."""
        s = self.settings
        client = server.client_address
        if not (s.sasl_auth_enable and s.passwords is not None) or \
                (s.tls_auth_only and not server.tls_active):
            return REPLY_AUTH_OFF
        if server.authenticated_user:
            return "503 5.5.1 Error: already authenticated"
        if envelope.mail_from:
            return "503 5.5.1 Error: MAIL transaction in progress"
        if not self.exempt(client) and self.logins.blocked(client):
            log.warning("too many failed logins from %s for service smtp",
                        server.client_string())
            server.close_after_reply = True
            return f"421 4.7.0 {s.myhostname} Error: too many failed logins from {client}"
        mechanism = args[0].upper()
        initial = args[1] if len(args) > 1 else None
        if mechanism == "PLAIN":
            blob = await _sasl_response(server, initial, b"")
            if blob is None:
                return None
            parts = blob.split(b"\x00")
            authzid, login, password = parts if len(parts) == 3 else (b"?", b"", b"")
            if authzid not in (b"", login):
                login = b""  # acting for another user is not supported: a failure
        else:
            login_or_none = await _sasl_response(server, initial, b"Username:")
            if login_or_none is None:
                return None
            login = login_or_none
            password_or_none = await _sasl_response(server, None, b"Password:")
            if password_or_none is None:
                return None
            password = password_or_none
        user = login.decode("utf-8", "replace")
        ok = False
        if valid_username(user) and "\ufffd" not in user:
            try:
                async with self.password_checks:
                    ok = await asyncio.to_thread(s.passwords.verify, user, password)
            except PasswordFileError as exc:
                log.warning("%s: SASL %s authentication failed: %s", server.client_string(),
                            mechanism, exc)
                return REPLY_AUTH_TEMP
        if ok:
            server.authenticated_user = user
            server.sasl_method = mechanism
            return REPLY_AUTH_OK
        log.warning("%s: SASL %s authentication failed: authentication failure, "
                    "sasl_username=%s", server.client_string(), mechanism, _printable(login))
        await self.logins.failed(client)
        return REPLY_AUTH_FAILED

    async def handle_DATA(
        self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope
    ) -> str:
        content = envelope.original_content or b""
        if b"\x00" in content:
            return self.reject_data(server, session, envelope, REPLY_NUL_CONTENT)
        if _LONG_LINE.search(content):
            return self.reject_data(server, session, envelope, REPLY_LONG_LINE)
        if _BARE_LF.search(content):
            if self.settings.bare_newline == "reject":
                server.close_after_reply = True
                log.info("reject: bare <LF> received from %s", server.client_string())
                return REPLY_BARE_LF
            if self.settings.bare_newline == "normalize":
                content = _BARE_LF.sub(b"\r\n", content)
        if _BARE_CR.search(content):
            # A next hop that takes a bare CR for a line end would read "x<CR>.<CR><LF>"
            # as the end of DATA: store such a CR as the CR LF it stands for, so the
            # dot is stuffed on the way out and one message stays one message.  (In
            # every smtpd_forbid_bare_newline mode: that parameter is about LF.)
            content = _BARE_CR.sub(b"\r\n", content)
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        hops = self.settings.hopcount_limit
        if hops and len(_RECEIVED.findall(_header_section(content))) > hops:
            return self.reject_data(server, session, envelope, REPLY_HOPS)
        limit = self.settings.message_size_limit
        if limit and len(content) > limit:
            return REPLY_SIZE
        if self.shutting_down:
            return "421 4.3.2 Service shutting down"
        # The commit runs to its end even if the client hangs up meanwhile (the session
        # task is then cancelled): a commit cut off half-way in its thread would race
        # with the abort and could leave an envelope without its data.
        self.committing += 1
        task = asyncio.ensure_future(self._commit(server, session, envelope, content))
        task.add_done_callback(self._committed)
        try:
            env = await asyncio.shield(task)
        except SpoolFull as exc:
            log.warning("%s: %s", server.client_string(), exc)
            self._statvfs_at = -1.0  # look at the free space again at the next MAIL
            return REPLY_STORAGE
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: queue file write error", server.client_string())
            return REPLY_TEMP
        return f"250 2.0.0 Ok: queued as {env.queue_id}"

    def _committed(self, task: asyncio.Future[Envelope]) -> None:
        # Runs before the session resumes (registered before shield's own callback), so
        # the scheduler learns of the message before the client sees 250.
        self.committing -= 1
        if not task.cancelled() and task.exception() is None:
            self.on_queued(task.result())

    def reject_data(self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope,
                    reply: str) -> str:
        log.info("NOQUEUE: reject: DATA from %s: %s; from=<%s> proto=%s helo=<%s>",
                 server.client_string(), reply, _sender(envelope),
                 server.protocol_name(), session.host_name or "")
        return reply

    async def _commit(
        self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope, content: bytes
    ) -> Envelope:
        """Reserve the ID, build the envelope and the Received: header that name it,
        write and commit.  The files are written here (to the page cache: no waiting)
        and made durable by the fsync helper, which many sessions share (group
        commit).  Without a helper, or for a big message, the whole store runs in a
        thread."""
        spool, syncer = self.spool, self.syncer
        if syncer is None or len(content) > INLINE_WRITE_MAX:
            return await asyncio.to_thread(
                lambda: run_steps(self._store_steps(server, session, envelope, content),
                                  spool.fsync_paths))
        return await run_steps_async(self._store_steps(server, session, envelope, content),
                                     syncer.sync)

    def _store_steps(self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope,
                     content: bytes) -> Steps[Envelope]:
        """The store as steps (spool.store.run_steps): reserve, envelope, commit."""
        res = self.spool.reserve()
        try:
            env = self._envelope(server, session, envelope, res.queue_id, content)
            received = self.received_header(server, session, res.queue_id)
        except BaseException:
            self.spool.abort(res)
            raise
        env = yield from self.spool.commit_steps(res, env, (received, content))
        cleanup_log.info("%s: message-id=%s", env.queue_id, env.message_id or "<>")  # Postfix: <> when missing
        return env

    def _envelope(self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope,
                  queue_id: str, content: bytes) -> Envelope:
        """The new message's envelope (its size is set when it is written); logs the
        smtpd ``client=`` line that names the queue ID."""
        env = Envelope(
            queue_id=queue_id,
            sender=_sender(envelope),
            recipients=tuple(Recipient(a) for a in dict.fromkeys(envelope.rcpt_tos)),
            arrival_time=self.clock.time(),
            size=len(content),
            client_name=server.client_name,
            client_address=server.client_address,
            helo_name=session.host_name or "",
            protocol=server.protocol_name(),
            auth_user=server.authenticated_user,
            message_id=_message_id(content),
        )
        if server.authenticated_user:
            log.info("%s: client=%s, sasl_method=%s, sasl_username=%s", queue_id,
                     server.client_string(), server.sasl_method, server.authenticated_user)
        else:
            log.info("%s: client=%s", queue_id, server.client_string())
        return env

    def received_header(self, server: RelaySMTP, session: Session, queue_id: str) -> bytes:
        s = self.settings
        helo = session.host_name or server.client_name
        lines = [f"Received: from {helo} ({server.client_name} [{server.client_address}])"]
        if server.authenticated_user:
            lines.append(f"(Authenticated sender: {server.authenticated_user})")
        lines.append(f"by {s.myhostname} ({s.mail_name}) with {server.protocol_name()} "
                     f"id {queue_id};")
        lines.append(f"{email.utils.format_datetime(email.utils.localtime())}")
        text = "".join(_CTRL.sub("", ln).join(("\t" if i else "", "\r\n"))
                       for i, ln in enumerate(lines))
        return text.encode("utf-8", "surrogateescape")


async def _sasl_response(server: RelaySMTP, initial: str | None, prompt: bytes) -> bytes | None:
    """The client's next SASL response, decoded: the initial response if it gave one,
    else the answer to a 334 challenge.  None if it aborted (``*``) or sent bad base64;
    the 501 reply has been sent then."""
    if initial is None:
        blob = await server.challenge_auth(prompt)
        return None if blob is MISSING else bytes(blob)
    if initial == "=":  # RFC 4954 §4: an empty initial response
        return b""
    try:
        return base64.b64decode(initial.encode("ascii", "replace"), validate=True)
    except (binascii.Error, ValueError):
        await server.push("501 5.5.2 Error: malformed authentication response")
        return None


def _header_section(content: bytes) -> bytes:
    """The message header (RFC 5322 §2.1): everything before the first empty line."""
    if content.startswith(b"\r\n"):
        return b""
    return content.split(b"\r\n\r\n", 1)[0]


def _sender(envelope: SMTPEnvelope) -> str:
    """The envelope sender, "" for the null sender <>."""
    return "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)


def _ehlo_order(line: str) -> int:
    order = ["PIPELINING", "SIZE", "STARTTLS", "AUTH", "ENHANCEDSTATUSCODES", "8BITMIME",
             "DSN", "SMTPUTF8"]
    word = line[4:].split(" ")[0]
    return order.index(word) if word in order else len(order)


def _message_id(content: bytes) -> str:
    head = content.split(b"\r\n\r\n", 1)[0]
    m = _MESSAGE_ID.search(head)
    if not m:
        return ""
    return _CTRL.sub("", m.group(1).decode("utf-8", "replace"))[:256]


class _Commands(dict[str, Any]):
    """aiosmtpd's command table.  A command it does not know gets Postfix's 502 from
    ``unknown`` (and counts as an error) instead of aiosmtpd's 500 and its private
    budget of five."""

    def __init__(self, methods: dict[str, Any], gate: Callable[[str, Any], Any],
                 unknown: Callable[[str], Any]) -> None:
        super().__init__(methods)
        self._gate = gate
        self._unknown = unknown
        self._gates: dict[str, Any] = {}  # made at a command's first use: most never come

    def get(self, name: str, default: Any = None) -> Any:
        gate = self._gates.get(name)
        if gate is None:
            method = super().get(name)
            if method is None:
                return self._unknown(name)
            gate = self._gates[name] = self._gate(name, method)
        return gate


class _AuthMembers:
    """Stands in for the ``inspect`` module inside aiosmtpd.smtp.

    aiosmtpd's SMTP.__init__ finds the ``auth_*`` methods of the session and of the
    handler with inspect.getmembers(), which evaluates every attribute of both, and
    does it for every connection: a third of the listener's time when each message
    comes on a connection of its own (smtp-source, most MTAs).  Its only use is
    ``[... for name, member in getmembers(obj) if name.startswith("auth_")]``, so
    this getmembers() returns just those members, from the names the class has
    (listed once) and the instance's own; signature() is cached the same way.
    Everything else is inspect's."""

    def __init__(self) -> None:
        self._names: dict[type, tuple[str, ...]] = {}
        self._signatures: dict[Any, inspect.Signature] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    def signature(self, obj: Any, **kwargs: Any) -> inspect.Signature:
        """The EHLO hook's signature, asked again at every connection: a bound
        method's is its function's, whatever the instance."""
        func = getattr(obj, "__func__", None)
        if kwargs or func is None:
            return inspect.signature(obj, **kwargs)
        sig = self._signatures.get(func)
        if sig is None:
            sig = self._signatures[func] = inspect.signature(obj)
        return sig

    def getmembers(self, obj: object, predicate: Any = None) -> list[tuple[str, Any]]:
        if predicate is not None:
            return inspect.getmembers(obj, predicate)
        cls = type(obj)
        names = self._names.get(cls)
        if names is None:
            names = self._names[cls] = tuple(n for n in dir(cls) if n.startswith("auth_"))
        own = [n for n in getattr(obj, "__dict__", {}) if n.startswith("auth_")]
        return [(n, getattr(obj, n)) for n in dict.fromkeys((*names, *own))]


aiosmtpd.smtp.inspect = _AuthMembers()  # type: ignore[assignment,attr-defined]


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with Postfix's replies, per-read timeouts and session accounting."""

    def __init__(self, listener: Listener, *, implicit_tls: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(listener, **kwargs)
        # aiosmtpd keeps this dict on the class, shared (and widened) by every session.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.listener = listener
        self.client_address = ""
        self.client_name = "unknown"
        self.authenticated_user = ""
        self.sasl_method = ""
        self.source_route = False  # the last address parsed had one (<@a,@b:user@d>)
        self.implicit_tls = implicit_tls
        self.close_after_reply = False
        self.counts: dict[str, list[int]] = {}
        self._last_code = 0
        self._errors = 0
        self._counted = False
        self._closing = False
        self._deadline = 0.0
        self._unsent: list[bytes] = []
        self._phase = "connect"  # proxy (PROXY header) -> connect (pregreet wait) -> smtp
        self._command = "CONNECT"
        self._session_timer: asyncio.TimerHandle | None = None
        self._smtp_methods = _Commands(self._smtp_methods, self._gate, self._unknown)

    def _gate(self, name: str, method: Any) -> Any:
        """Every command passes here: NUL bytes, unauthorised pipelining, a second
        STARTTLS, and the per-command counts of the disconnect line."""
        @functools.wraps(method)
        async def gate(arg: str | None) -> None:
            self._command = name
            self._last_code = 0
            if self._closing:
                return
            if arg and "\x00" in arg:
                await self.push(REPLY_NUL_COMMAND)
            elif await self._pipelined(name, arg):
                pass
            elif name == "STARTTLS" and self.tls_active:
                await self.push("554 5.5.1 Error: TLS already active")
            else:
                await method(arg)
            self._count(name.lower())
        return gate

    def _unknown(self, name: str) -> Any:
        async def unknown(arg: str | None) -> None:
            self._command = "UNKNOWN"
            self._last_code = 0
            if self._closing:
                return
            nul = "\x00" in name or (arg is not None and "\x00" in arg)
            await self.push(REPLY_NUL_COMMAND if nul else REPLY_UNKNOWN)
            self._count("unknown")
        return unknown

    def _count(self, name: str) -> None:
        ok, total = self.counts.setdefault(name, [0, 0])
        self.counts[name] = [ok + (0 < self._last_code < 400), total + 1]

    async def _pipelined(self, name: str, arg: str | None) -> bool:
        """RFC 2920: ``name`` must be the last command of its group, so nothing may be
        waiting behind it.  If something is (smtpd_forbid_unauth_pipelining), refuse
        and end the session; the waiting input is never executed."""
        if not self.listener.settings.forbid_unauth_pipelining or name not in LAST_IN_GROUP \
                or name == "QUIT":
            return False
        words = (arg or "").split()
        if name == "AUTH" and len(words) == 2 and words[0].upper() == "PLAIN":
            return False  # RFC 4954 §4: one round trip, may be followed by more
        pending = bytes(self._reader._buffer)  # type: ignore[attr-defined]
        if not pending:
            return False
        log.info("improper command pipelining after %s from %s: %s", name,
                 self.client_string(), _printable(pending))
        await self.push(REPLY_PIPELINING)
        self._drop()
        return True

    @property
    def tls_active(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    # ---- connection accounting and logging ----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            # STARTTLS wraps the same session; RFC 3207 §4.2: forget what the client
            # told us before, its login included.
            self.authenticated_user = self.sasl_method = ""
            return
        peer = transport.get_extra_info("peername") or ("", 0)
        self.client_address = str(peer[0])
        self.client_name = "localhost" if _is_loopback(self.client_address) else "unknown"
        if self.implicit_tls and self.session is not None:
            self.session.ssl = {"cipher": transport.get_extra_info("cipher"),
                                "peercert": transport.get_extra_info("peercert")}
        self.listener.sessions.add(self)

    async def _handle_client(self) -> None:
        # Before aiosmtpd's loop: the PROXY header (the real client address is needed
        # for everything after), the limits, and the pregreet test.
        s = self.listener.settings
        if s.proxy_protocol and not await self._proxy_handshake():
            self._drop()
            return
        self._reset_timeout()
        if not self._admit():
            return
        if s.session_time_limit > 0:
            self._session_timer = self.loop.call_later(s.session_time_limit,
                                                       self._session_expired)
        if s.greet_wait > 0:
            await asyncio.sleep(s.greet_wait)
        pending = bytes(self._reader._buffer)  # type: ignore[attr-defined]
        if pending and (s.greet_wait > 0 or s.forbid_unauth_pipelining):
            # Nothing may come before the banner (RFC 5321 §4.3.1): a client that
            # talks first is a spambot that does not wait for replies.
            log.info("PREGREET %d after %s from %s: %s", len(pending), s.greet_wait,
                     self.client_string(), _printable(pending))
            await self.push(REPLY_PREGREET)
            self._drop()
            return
        self._phase = "smtp"
        await super()._handle_client()

    async def _proxy_handshake(self) -> bool:
        """Read the PROXY v1 or v2 header; the client address becomes the one in it."""
        # smtpd_upstream_proxy_timeout bounds the whole header, however it trickles in.
        self._phase = "proxy"
        self._reset_timeout(self.listener.settings.proxy_timeout)
        try:
            data = await get_proxy(self._reader)
            error = data.error or ("" if data.valid else "invalid header")
        except (asyncio.IncompleteReadError, ConnectionError):
            error = "lost connection"
        except Exception as exc:  # noqa: BLE001 - a malformed header, whatever aiosmtpd raised
            error = f"malformed header: {exc!r}"
        self._phase = "connect"
        if error:
            log.warning("haproxy read: %s from [%s]", error, self.client_address)
            return False
        if isinstance(data.src_addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            # v2 LOCAL (the proxy's own health check) and v1 UNKNOWN carry no client
            # address: the proxy itself is the client then.
            self.client_address = str(data.src_addr)
            self.client_name = "localhost" if _is_loopback(self.client_address) else "unknown"
        return True

    def _admit(self) -> bool:
        """Count the connection; refuse it with 421 over the count or rate limit."""
        lst = self.listener
        s = lst.settings
        client = self.client_address
        log.info("connect from %s", self.client_string())
        n = lst.per_client.get(client, 0) + 1
        lst.per_client[client] = n
        self._counted = True
        rate = lst.over_rate(self, Event.CONNECT, s.connection_rate_limit)
        if s.connection_count_limit and n > s.connection_count_limit and not lst.exempt(client):
            log.warning("Connection concurrency limit exceeded: %d from %s for service smtp",
                        n, self.client_string())
        elif rate:
            log.warning("Connection rate limit exceeded: %d from %s for service smtp",
                        rate, self.client_string())
        else:
            return True
        self._write_now(f"421 4.7.0 {s.myhostname} Error: too many connections from {client}")
        self._drop()
        return False

    def _write_now(self, reply: str) -> None:
        """A reply from outside the command loop (admission, timers, shutdown): written
        at once, after any replies held back for a pipelined group."""
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            self._send(reply.encode() + b"\r\n")

    def _send(self, line: bytes) -> None:
        """Write the replies held back for a pipelined group, then this one."""
        if self._unsent:
            line = b"".join(self._unsent) + line
            self._unsent.clear()
        self._writer.write(line)

    def _drop(self) -> None:
        """End the session now.  Input not yet read is forgotten first, so nothing the
        client sent behind the reply that ends the session is ever executed."""
        if self._unsent and self.transport is not None:
            self._send(b"")
        self._closing = True
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd re-arms a timer at every line read; here a line only moves the
        deadline, and the one timer, when it fires early, waits for the rest."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        # smtpd_timeout (or the PROXY timeout): say so, as Postfix does, and close.
        if not self._closing and self.transport is not None:
            if self._phase == "smtp":
                log.info("timeout after %s from %s", self._command, self.client_string())
                self._write_now(f"421 4.4.2 {self.listener.settings.myhostname} "
                                "Error: timeout exceeded")
            elif self._phase == "proxy":
                log.warning("haproxy read: timeout error from [%s]", self.client_address)
        self._drop()

    def eof_received(self) -> bool | None:
        # aiosmtpd ends the session at EOF (a half-close counts as a lost connection)
        # but keeps the transport half-open; if the session task had not started yet,
        # nothing would ever close it and the peer would hold a slot until
        # smtpd_timeout.  Let the transport close itself.
        if not self._closing and self._phase == "smtp":
            log.info("lost connection after %s from %s", self._command, self.client_string())
        super().eof_received()
        return False

    def _session_expired(self) -> None:
        # smtpd_session_time_limit: a slowloris peer that keeps every read within
        # smtpd_timeout still cannot hold a slot for ever.
        if self._closing or self.transport is None:
            return
        log.info("session time limit exceeded after %s from %s", self._command,
                 self.client_string())
        self._write_now(f"421 4.4.2 {self.listener.settings.myhostname} "
                        "Error: timeout exceeded")
        self._drop()

    def connection_lost(self, error: Exception | None) -> None:
        lst = self.listener
        lst.sessions.discard(self)
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self._counted:
            self._counted = False
            n = lst.per_client.get(self.client_address, 1) - 1
            if n <= 0:
                lst.per_client.pop(self.client_address, None)
            else:
                lst.per_client[self.client_address] = n
            stats = " ".join(
                f"{k}={ok}" if ok == total else f"{k}={ok}/{total}"
                for k, (ok, total) in self.counts.items()
            )
            total_cmds = sum(t for _, t in self.counts.values())
            ok_cmds = sum(o for o, _ in self.counts.values())
            cmds = f"commands={ok_cmds}" if ok_cmds == total_cmds else \
                f"commands={ok_cmds}/{total_cmds}"
            log.info("disconnect from %s %s", self.client_string(),
                     f"{stats} {cmds}".strip())
        super().connection_lost(error)

    def client_string(self) -> str:
        return f"{self.client_name}[{self.client_address}]"

    def protocol_name(self) -> str:
        proto = "ESMTP" if self.session and self.session.extended_smtp else "SMTP"
        if self.session and self.session.ssl is not None:
            proto += "S"
        if self.authenticated_user:
            proto += "A"
        return proto

    def count_error(self) -> None:
        """Count an error that was not answered with a 4xx/5xx (push counts those)."""
        self._errors += 1

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The header parser reads "<a<b@c>" as address "a" followed by a parameter
        # "<b@c>", and aiosmtpd then answers 501 without an enhanced status code.
        # An address must be followed by SP or nothing: otherwise it is malformed
        # (501 5.1.3 through _TRANSLATE).
        # The parser drops a source route (<@a,@b:user@d> -> user@d); remember that
        # there was one, for the relay check.
        self.source_route = arg.lstrip().startswith("<@")
        m = _SIMPLE_PATH.match(arg)
        if m:  # the common case, without aiosmtpd's slow RFC 5322 parser
            # "<>" stays "<>", as the slow parser returns it: "" means "no address".
            return m.group(1) or "<>", m.group(2) or ""
        address, rest = super()._getaddr(arg)
        if address is not None and rest and not arg[: len(arg) - len(rest)][-1:].isspace():
            return None, None
        # The parser also forgives a missing ">" ("<a@b" is a@b): not in a path.
        if address is not None and arg.lstrip().startswith("<") and \
                not arg[: len(arg) - len(rest or "")].rstrip().endswith(">"):
            return None, None
        return address, rest

    # ---- I/O --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # smtpd_timeout applies to each read, DATA lines included: a slow but
        # steady client is never cut off, a silent one is.
        if self._closing:
            return  # the session is over: nothing more is read, let alone executed
        if self._phase != "proxy":
            self._reset_timeout()
        super().data_received(data)

    async def push(self, status: Any) -> None:
        if self._closing:
            return
        raw = status.encode("utf-8", "surrogateescape") if isinstance(status, str) else status
        raw = _TRANSLATE.get(raw, raw)
        try:
            code = int(raw[:3])
        except ValueError:
            code = 0
        self._last_code = code
        line = raw + b"\r\n"
        if (b"\n" in self._reader._buffer  # type: ignore[attr-defined]
                and code not in (220, 221, 421) and not self.close_after_reply):
            # More pipelined commands are already here: answer them all in one write
            # once they are done (Postfix's smtpd flushes before it waits for input).
            self._unsent.append(line)
        else:
            self._send(line)
            await self._writer.drain()
        if code == 421 or self.close_after_reply:
            self.close_after_reply = False
            self._drop()
        elif code >= 400:
            # smtpd_hard_error_limit: every refused command counts, as in Postfix.
            self._errors += 1
            s = self.listener.settings
            if s.hard_error_limit and self._errors >= s.hard_error_limit:
                log.info("too many errors after %s from %s", self._command,
                         self.client_string())
                self._send(f"421 4.7.0 {s.myhostname} Error: too many errors\r\n".encode())
                self._drop()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # aiosmtpd closes the connection after this; there is no one to answer.
            log.info("SSL_accept error from %s: %r", self.client_string(),
                     error.__cause__ or error)
            return ""
        # aiosmtpd would answer 500 and make the sender give up: never a 5xx for
        # our own failure.  Reset the transaction so the session can go on.
        log.error("%s: internal error: %r", self.client_string(), error, exc_info=error)
        self._set_rset_state()  # type: ignore[no-untyped-call]
        if isinstance(error, SpoolFull):
            return REPLY_STORAGE
        return "451 4.3.0 Error: internal error"

    async def shutdown(self) -> None:
        """Tell the client we are going away (421) and close."""
        with contextlib.suppress(OSError, RuntimeError):
            self._write_now("421 4.3.2 Service shutting down")
        if self.transport is not None:
            self.transport.close()


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False
