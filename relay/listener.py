"""The SMTP listener (Postfix's smtpd and cleanup): accept mail into the spool.

It owns the SMTP dialogue and the relay policy, and replies ``250 ... queued as ID``
only after the spool has committed the message durably.  It never delivers and
never reads the queue; after a commit it hands the queue ID to the scheduler
in-process (``on_queued``).

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
import email.utils
import functools
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import MISSING, SMTP, Envelope as SMTPEnvelope, Session, TLSSetupException

from relay.anvil import Anvil, Event
from relay.auth import LoginThrottle, PasswordFile, PasswordFileError
from relay.clock import Clock, SystemClock
from relay.config import NetworkMatcher, domain_in_list
from spool import Spool, SpoolFull
from spool.envelope import Envelope, Recipient

log = logging.getLogger("relay.smtpd")
cleanup_log = logging.getLogger("relay.cleanup")

# RFC 5321 §4.5.3.1
MAX_LOCAL_PART = 64
MAX_PATH = 256
_CTRL = re.compile(r"[\x00-\x1f\x7f]")
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
                           "STARTTLS", "AUTH", "HELP"})

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
        self.on_queued = on_queued
        self.sessions: set[RelaySMTP] = set()
        self.per_client: dict[str, int] = {}
        self.committing = 0
        self.shutting_down = False

    def reconfigure(self, settings: SmtpdSettings) -> None:
        self.settings = settings

    def factory(self) -> RelaySMTP:
        s = self.settings
        host, _, ident = (s.banner or f"{s.myhostname} ESMTP {s.mail_name}").partition(" ")
        return RelaySMTP(
            self,
            data_size_limit=s.message_size_limit or None,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=host or s.myhostname,
            ident=ident or f"ESMTP {s.mail_name}",
            timeout=s.timeout,
        )

    # ---- aiosmtpd hooks --------------------------------------------------------

    async def handle_EHLO(
        self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        words = [r[4:] for r in responses[1:] if r[4:] != "HELP"]
        words += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        words.sort(key=_ehlo_order)
        return [responses[0]] + [f"250-{w}" for w in words[:-1]] + [f"250 {words[-1]}"]

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope, address: str,
        mail_options: list[str],
    ) -> str:
        error = address_error(address, "MAIL") if address != "<>" else None
        if error:
            server.count_error()
            return error
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
            server.count_error()
            return error
        if len(envelope.rcpt_tos) >= s.recipient_limit:
            return "452 4.5.3 Error: too many recipients"
        if not self.may_relay(server, address):
            reply = f"554 5.7.1 <{address}>: Relay access denied"
            log.info(
                "NOQUEUE: reject: RCPT from %s: %s; from=<%s> to=<%s> proto=%s helo=<%s>",
                client, reply, _sender(envelope), address,
                "ESMTP" if session.extended_smtp else "SMTP", session.host_name or "",
            )
            server.count_error()
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
        try:
            st = os.statvfs(self.spool.root)
        except OSError:
            return True
        return st.f_bavail * st.f_frsize / 1.5 >= size + s.queue_minfree

    def may_relay(self, server: RelaySMTP, address: str) -> bool:
        if self.trusted(server.client_address):
            return True
        if server.authenticated_user:
            return True
        if routing_trick(address):
            return False
        return domain_in_list(split_address(address)[1], self.settings.relay_domains)

    def trusted(self, address: str) -> bool:
        """The client is in mynetworks."""
        try:
            return self.settings.mynetworks.matches(address)
        except ValueError:
            return False

    async def handle_DATA(
        self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope
    ) -> str:
        content = envelope.original_content or b""
        if _BARE_LF.search(content):
            if self.settings.bare_newline == "reject":
                server.close_after_reply = True
                log.info("reject: bare <LF> received from %s", server.client_string())
                return REPLY_BARE_LF
            if self.settings.bare_newline == "normalize":
                content = _BARE_LF.sub(b"\r\n", content)
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        limit = self.settings.message_size_limit
        if limit and len(content) > limit:
            return REPLY_SIZE
        if self.shutting_down:
            return "421 4.3.2 Service shutting down"
        self.committing += 1
        try:
            env = await self._commit(server, session, envelope, content)
        except SpoolFull as exc:
            log.warning("%s: %s", server.client_string(), exc)
            return REPLY_STORAGE
        except Exception:
            log.exception("%s: queue file write error", server.client_string())
            return REPLY_TEMP
        finally:
            self.committing -= 1
        self.on_queued(env)
        return f"250 2.0.0 Ok: queued as {env.queue_id}"

    async def _commit(
        self, server: RelaySMTP, session: Session, envelope: SMTPEnvelope, content: bytes
    ) -> Envelope:
        s = self.settings
        res = await asyncio.to_thread(self.spool.reserve)
        try:
            received = self.received_header(server, session, res.queue_id)
            now = self.clock.time()
            env = Envelope(
                queue_id=res.queue_id,
                sender=_sender(envelope),
                recipients=tuple(Recipient(a) for a in dict.fromkeys(envelope.rcpt_tos)),
                arrival_time=now,
                size=len(received) + len(content),
                client_name=server.client_name,
                client_address=server.client_address,
                helo_name=session.host_name or "",
                protocol=server.protocol_name(),
                auth_user=server.authenticated_user,
                message_id=_message_id(content),
            )
            log.info("%s: client=%s", res.queue_id, server.client_string())
            env = await asyncio.to_thread(self.spool.commit, res, env, (received, content))
        except BaseException:
            await asyncio.to_thread(self.spool.abort, res)
            raise
        cleanup_log.info("%s: message-id=%s", env.queue_id, env.message_id)
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


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with Postfix's replies, per-read timeouts and session accounting."""

    def __init__(self, listener: Listener, **kwargs: Any) -> None:
        super().__init__(listener, **kwargs)
        self.listener = listener
        self.client_address = ""
        self.client_name = "unknown"
        self.authenticated_user = ""
        self.close_after_reply = False
        self.counts: dict[str, list[int]] = {}
        self._last_code = 0
        self._errors = 0
        self._counted = False
        for name, method in list(self._smtp_methods.items()):
            self._smtp_methods[name] = self._counting(name, method)

    def _counting(self, name: str, method: Any) -> Any:
        async def wrapper(arg: Any) -> None:
            self._last_code = 0
            await method(arg)
            ok, total = self.counts.setdefault(name.lower(), [0, 0])
            self.counts[name.lower()] = [ok + (0 < self._last_code < 400), total + 1]
        return wrapper

    # ---- connection accounting and logging ----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            return  # STARTTLS wraps the same session
        peer = transport.get_extra_info("peername") or ("", 0)
        self.client_address = str(peer[0])
        self.client_name = "localhost" if _is_loopback(self.client_address) else "unknown"
        log.info("connect from %s", self.client_string())
        lst = self.listener
        lst.sessions.add(self)
        n = lst.per_client.get(self.client_address, 0) + 1
        lst.per_client[self.client_address] = n
        self._counted = True
        limit = lst.settings.connection_count_limit
        if limit and n > limit and not lst.trusted(self.client_address):
            log.warning("Connection concurrency limit exceeded: %d from %s for service smtp",
                        n, self.client_string())
            transport.write(f"421 4.7.0 {lst.settings.myhostname} Error: too many "
                            f"connections from {self.client_address}\r\n".encode())
            transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        lst = self.listener
        if self._counted:
            self._counted = False
            lst.sessions.discard(self)
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
        self._errors += 1

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The header parser reads "<a<b@c>" as address "a" followed by a parameter
        # "<b@c>", and aiosmtpd then answers 501 without an enhanced status code.
        # An address must be followed by SP or nothing: otherwise it is malformed
        # (501 5.1.3 through _TRANSLATE).
        address, rest = super()._getaddr(arg)
        if address is not None and rest and not arg[: len(arg) - len(rest)][-1:].isspace():
            return None, None
        return address, rest

    # ---- I/O --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # smtpd_timeout applies to each read, DATA lines included: a slow but
        # steady client is never cut off, a silent one is.
        self._reset_timeout()
        super().data_received(data)

    async def push(self, status: Any) -> None:
        raw = status.encode("utf-8", "surrogateescape") if isinstance(status, str) else status
        raw = _TRANSLATE.get(raw, raw)
        try:
            self._last_code = int(raw[:3])
        except ValueError:
            self._last_code = 0
        await super().push(raw)
        if self.close_after_reply and self.transport is not None:
            self.close_after_reply = False
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer 500 and make the sender give up: never a 5xx for
        # our own failure.  Reset the transaction so the session can go on.
        log.error("%s: internal error: %r", self.client_string(), error, exc_info=error)
        self._set_rset_state()
        if isinstance(error, SpoolFull):
            return REPLY_STORAGE
        return "451 4.3.0 Error: internal error"

    async def shutdown(self) -> None:
        """Tell the client we are going away (421) and close."""
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write(b"421 4.3.2 Service shutting down\r\n")
            except Exception:
                pass
            self.transport.close()


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False
