"""Outbound SMTP: one mail transaction to one next hop, and the connection cache.

Owns: the client side of an SMTP conversation (RFC 5321) with the servers of one next hop,
tried in the order routing gave them: TCP connect, greeting, EHLO/HELO, STARTTLS (RFC 3207),
AUTH PLAIN/LOGIN (RFC 4954), MAIL with SIZE/BODY/SMTPUTF8 (RFC 1870, 6152, 6531), RCPT,
DATA, with command pipelining where offered (RFC 2920). The sender's delivery status
requests go on to a server that offers DSN (RFC 3461: ENVID and RET on MAIL, ORCPT and
NOTIFY on RCPT, as Postfix writes them); the content goes out dot-stuffed and with lines
longer than smtp_line_length_limit broken (relay.smtp_data). The result is a value: an
`Attempt` with one `RcptResult` per recipient (sent, defer or bounce, a DSN code per
RFC 3463, the reason text Postfix would log, and whether the server took the DSN request
along). Also owns the cache of idle connections (Postfix's
`smtp_connection_cache_time_limit` / `smtp_connection_reuse_time_limit`).

TLS: each server gets the HostPolicy its TlsPlan (relay.tls.destination) decides before
connecting; a server the plan skips is not connected to.  What the level demands is
enforced here, as Postfix's smtp_proto.c does: STARTTLS refused or not offered at a level
that requires TLS (4.7.4), a failed handshake (plaintext retry only at ``may`` and only
without credentials), a certificate that fails the check relay.tls.session makes after the
handshake (4.7.5 "Server certificate not verified", before AUTH or MAIL), REQUIRETLS
(RFC 8689) not offered or not verifiable (5.7.30, final once no server is left).  A cached
connection serves only deliveries under the same policy.  Sessions under an MTA-STS or
DANE policy come back in the Attempt as TlsEvents, for TLS reports.

Never: reads or writes the spool, decides retry times or dead destinations (it only says
whether the failure was a connection failure), logs maillog delivery lines (the scheduler
does, from the Attempt), raises a delivery problem to its caller (refusals, timeouts, lost
connections and even unexpected bugs inside one session become DEFER/BOUNCE results).

Crash or cancellation: nothing on disk here. The one dangerous moment is between sending
the final "." and reading its reply (RFC 1047): the server may have taken the message while
the caller still records the recipients as pending, so the next attempt delivers a
duplicate. Postfix accepts the same risk and says so in its reason text; so do we.

The wire (reply framing and parsing, flow control, the TLS upgrade) is aiosmtplib's,
reached only through relay.delivery_engine.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from relay import delivery_engine as engine
from relay import dsn as dsn_mod
from relay.delivery_engine import Connection, Disconnected, MalformedReply, ReplyTimeout
from relay.smtp_data import Payload
from relay.tls import session as tls_session
from relay.tls.policy import (
    LEVEL_WORDS,
    Defaults,
    HostPolicy,
    Level,
    TlsEvent,
    host_policy,
    parse_level,
)

__all__ = (
    "Attempt",
    "DeliverySettings",
    "MailOptions",
    "RcptOptions",
    "RcptResult",
    "RcptStatus",
    "SMTPDelivery",
    "TargetLike",
)

log = logging.getLogger("relay.smtp")

TLS_LEVELS = frozenset(LEVEL_WORDS)

# Body bytes handed to the transport between two flow-control waits.
BODY_CHUNK = 64 * 1024

# What we were doing when a conversation broke; Postfix's texts (smtp_proto.c), so that the
# reasons read "lost connection with HOST[IP] while <stage>" exactly as Postfix logs them.
GREETING = "receiving the initial server greeting"
EHLO = "performing the EHLO handshake"
HELO = "performing the HELO handshake"
STARTTLS = "receiving the STARTTLS response"
AUTH = "performing the AUTH handshake"
RSET_PROBE = "sending RSET probe"
MAIL = "sending MAIL FROM"
RCPT = "sending RCPT TO"
DATA = "sending DATA command"
BODY = "sending message body"
# Postfix's text for a failure after the final "." (smtp_proto.c, SMTP_STATE_DOT). The
# server may have queued the message before the connection broke or the timer ran out;
# we cannot know, so the recipients are deferred and a retry may deliver it twice
# (RFC 1047). The text says so on purpose, for whoever reads the log.
DOT = "sending end of data -- message may be sent more than once"
FINAL_RSET = "sending final RSET"

_ENHANCED_CODE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_COMMAND_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class TargetLike(Protocol):
    """One server of a next hop, as routing describes it (relay.routing.Target)."""

    @property
    def hostname(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...


class RcptStatus(enum.Enum):
    SENT = "sent"
    DEFER = "defer"
    BOUNCE = "bounce"


@dataclass(frozen=True, slots=True)
class RcptResult:
    """The fate of one recipient in one attempt; `reason` is Postfix's parenthesised text.

    `dsn_passed_on` (SENT only): the server offered DSN, so the sender's NOTIFY and ORCPT
    went along with the recipient and any success notice is now the next hop's to send;
    without it, a sender who asked NOTIFY=SUCCESS is owed a "relayed" notice by us
    (Postfix's smtp_rcpt_done()).
    """

    address: str
    status: RcptStatus
    dsn: str
    reason: str
    dsn_passed_on: bool = False


@dataclass(frozen=True, slots=True)
class MailOptions:
    """What the message asks of MAIL FROM beyond the sender (RFC 3461, RFC 6531).

    `envid` and `ret` as the envelope keeps them (ENVID decoded; RET "FULL", "HDRS" or
    ""); `smtputf8`: the client asked for SMTPUTF8, which goes on to a server that offers
    it (Postfix does so even when every address is ASCII).
    """

    envid: str = ""
    ret: str = ""
    smtputf8: bool = False


@dataclass(frozen=True, slots=True)
class RcptOptions:
    """One recipient's RFC 3461 parameters: NOTIFY as the envelope keeps it ("" = none
    given, and then none is sent) and the ORCPT to send, ``addr-type;address`` decoded
    ("" = none)."""

    notify: str = ""
    orcpt: str = ""


NO_MAIL_OPTIONS = MailOptions()
NO_RCPT_OPTIONS = RcptOptions()


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one deliver() call did: results in the order of the recipients given."""

    results: tuple[RcptResult, ...]
    # "host[ip]:port" of the last server we held a TCP connection with, else "none"
    # (Postfix logs relay=none only when no session was ever established).
    relay: str
    # True when no server got past connect/greeting/EHLO/TLS: feeds the dead-destination
    # logic. A 4xx/5xx to MAIL/RCPT/DATA, or a failed AUTH, is not a connection failure.
    connection_failed: bool
    conn_setup_seconds: float
    xfer_seconds: float
    reused: bool
    # The content had a line longer than smtp_line_length_limit, sent broken (Postfix
    # logs "breaking line > N bytes with <CR><LF>SPACE" once per message).
    lines_broken: bool = False
    # TLS sessions (and failures) under an MTA-STS or DANE policy, for TLS reports.
    tls_events: tuple[TlsEvent, ...] = ()


class TlsPlan(Protocol):
    """Which TLS each server must give (relay.tls.destination.Plan)."""

    async def for_target(self, target: Any) -> HostPolicy | Any: ...


SaslCredentials = Callable[[str, TargetLike], tuple[str, str] | None]


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """Plain values taken from main.cf by the caller (smtp_* parameters)."""

    helo_name: str
    connect_timeout: float = 30.0
    helo_timeout: float = 300.0
    mail_timeout: float = 300.0
    rcpt_timeout: float = 300.0
    data_init_timeout: float = 120.0
    data_xfer_timeout: float = 180.0
    data_done_timeout: float = 600.0
    quit_timeout: float = 300.0
    starttls_timeout: float = 300.0
    rset_timeout: float = 20.0  # the RSET probe of a cached connection, and RSET to abort
    # smtp_tls_security_level, used for a delivery given no TlsPlan; smtp_tls_CAfile and
    # smtp_tls_CApath (neither: OpenSSL's default trust store); smtp_tls_loglevel.
    tls_level: str = "none"
    tls_ca_file: str = ""
    tls_ca_path: str = ""
    tls_loglevel: int = 0
    tls_defaults: Defaults = field(default_factory=Defaults)
    sasl_enable: bool = False
    sasl_credentials: SaslCredentials | None = None
    # smtp_send_dummy_mail_auth: MAIL FROM:<...> AUTH=<> to a server that offers AUTH. Off
    # by default, as in Postfix: some servers refuse every message that carries it.
    send_dummy_mail_auth: bool = False
    # smtp_line_length_limit: longer lines are broken with CRLF SPACE; 0 = never.
    line_length_limit: int = 998
    connection_reuse_time_limit: float = 300.0
    connection_cache_time_limit: float = 2.0
    # smtp_mx_session_limit: servers that greeted but could not take the mail (STARTTLS
    # or AUTH failed) tried per attempt before giving up; 0 = no limit.
    mx_session_limit: int = 2

    def __post_init__(self) -> None:
        if self.tls_level not in TLS_LEVELS:
            raise ValueError(f"unsupported TLS security level: {self.tls_level!r}")
        if not self.helo_name or _COMMAND_UNSAFE.search(self.helo_name) or " " in self.helo_name:
            raise ValueError(f"bad HELO name: {self.helo_name!r}")


# --- the wire ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reply:
    code: int
    text: str  # every line with its code, joined by spaces, as Postfix logs a reply
    dsn: str  # the enhanced status code of the reply, or X.0.0 from the reply code
    message: str  # aiosmtplib's text (codes stripped, lines joined by newlines)


def _reply(response: engine.Reply) -> _Reply:
    lines = response.message.split("\n")
    code = response.code
    text = " ".join([f"{code}-{line}" for line in lines[:-1]] + [f"{code} {lines[-1]}".rstrip()])
    match = _ENHANCED_CODE.match(lines[0])
    if match is not None and match.group(1) == str(code)[0]:
        dsn = match.group(0)
    else:
        dsn = f"{code // 100 if code // 100 in (2, 4, 5) else 4}.0.0"
    return _Reply(code, text, dsn, response.message)


def _with_class(dsn: str, klass: str) -> str:
    # A deferred recipient carries a 4.x.x DSN even when the reply was a 5xx we chose to
    # retry (a 5xx greeting, a failed AUTH), as Postfix rewrites it (smtp_trouble.c).
    return klass + dsn[1:]


def _namaddr(target: TargetLike) -> str:
    return f"{target.hostname}[{target.address}]"


class _Broken(Exception):
    """The conversation with one server cannot go on (lost, timed out, garbled)."""

    def __init__(self, dsn: str, reason: str) -> None:
        super().__init__(reason)
        self.dsn = dsn
        self.reason = reason


class _SetupFailed(Exception):
    """A server could not be used for a transaction; the next one may be tried."""

    def __init__(self, dsn: str, reason: str, *, relay: str, connection: bool,
                 permanent: bool = False) -> None:
        super().__init__(reason)
        self.dsn = dsn
        self.reason = reason
        self.relay = relay
        self.connection = connection
        self.permanent = permanent
        # The server greeted and took EHLO before this (STARTTLS or AUTH failed): one
        # of the sessions smtp_mx_session_limit counts.
        self.after_handshake = False


class _RetryPlaintext(Exception):
    """TLS level "may" and the handshake failed: Postfix retries the same server in clear."""


def _tls_refusal(dsn: str, reason: str, session: _Session, policy: HostPolicy,
                 requiretls_reason: str) -> _SetupFailed:
    """A TLS failure; for a REQUIRETLS message it is final (5.7.30, RFC 8689 4.2.1) once
    no other server is left, in Postfix's words."""
    if policy.requiretls:
        return _SetupFailed("5.7.30", requiretls_reason, relay=session.relay, connection=False,
                            permanent=True)
    return _SetupFailed(dsn, reason, relay=session.relay, connection=True)


@dataclass(eq=False, slots=True)
class _Session:
    key: tuple[str, str, int]
    protocol: Connection
    namaddr: str
    relay: str
    created: float
    extensions: dict[str, str] = field(default_factory=dict)
    auth_methods: list[str] = field(default_factory=list)
    tls: bool = False
    policy_key: tuple[object, ...] = ()  # the HostPolicy it was made under
    quit_timeout: float = 300.0
    idle_timer: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        return self.protocol.is_connected and not self.protocol.has_unread_replies

    def offers(self, keyword: str) -> bool:
        return keyword in self.extensions

    def send(self, *commands: bytes, where: str) -> None:
        try:
            self.protocol.send(b"".join(command + b"\r\n" for command in commands))
        except Disconnected as exc:
            raise self.lost(where) from exc

    async def receive(self, timeout: float, where: str) -> _Reply:
        try:
            return _reply(await self.protocol.read_reply(timeout))
        except ReplyTimeout as exc:
            raise _Broken(
                "4.4.2", f"conversation with {self.namaddr} timed out while {where}"
            ) from exc
        except Disconnected as exc:
            raise self.lost(where) from exc
        except MalformedReply as exc:
            raise _Broken(
                "4.4.2", f"host {self.namaddr} sent a malformed reply while {where}: {exc.message}"
            ) from exc

    async def exchange(self, command: bytes, timeout: float, where: str) -> _Reply:
        self.send(command, where=where)
        return await self.receive(timeout, where)

    def lost(self, where: str) -> _Broken:
        return _Broken("4.4.2", f"lost connection with {self.namaddr} while {where}")

    def abort(self) -> None:
        self.protocol.abort()

    def quit_nowait(self) -> None:
        # Postfix skips the QUIT reply by default (smtp_skip_quit_response); close() still
        # flushes the QUIT before the FIN.
        if self.protocol.is_connected:
            try:
                self.protocol.send(b"QUIT\r\n")
            except Disconnected:
                pass
            self.protocol.close()

    async def quit(self) -> None:
        if self.protocol.is_connected:
            try:
                await self.exchange(b"QUIT", self.quit_timeout, "sending QUIT")
            except _Broken:
                pass
        self.protocol.close()


def _rcpt_dsn(options: RcptOptions) -> bytes:
    """ORCPT and NOTIFY for RCPT TO, in Postfix's order and encoding."""
    out = b""
    orcpt = dsn_mod.orcpt_value(options.orcpt)
    if orcpt is not None:
        out += b" ORCPT=" + orcpt.encode("ascii")
    notify = dsn_mod.canonical_notify(options.notify)
    if notify:
        out += b" NOTIFY=" + notify.encode("ascii")
    return out


def _failed_results(
    recipients: Sequence[str], fates: list[RcptResult | None], dsn: str, reason: str
) -> None:
    """Give every recipient without a fate yet a DEFER with this reason."""
    for index, fate in enumerate(fates):
        if fate is None:
            fates[index] = RcptResult(
                recipients[index], RcptStatus.DEFER, _with_class(dsn, "4"), reason
            )


def _nexthop_host(label: str) -> str:
    """The host of a next hop as Postfix writes it: ``[host]:port`` -> ``host``."""
    if label.startswith("["):
        return label[1:label.find("]")] if "]" in label else label[1:]
    return label.rsplit(":", 1)[0] if label.count(":") == 1 else label


# --- the client ----------------------------------------------------------------------------


class SMTPDelivery:
    """Delivers to next hops over SMTP, keeping idle connections for reuse.

    One instance per event loop. A cached connection is lent to one deliver() at a time.
    After close(), deliveries still work but their connections are closed, not cached.
    """

    def __init__(self) -> None:
        self._idle: dict[tuple[str, str, int], list[_Session]] = {}
        self._quitting: set[asyncio.Task[None]] = set()
        self._closed = False
        self._contexts = tls_session.Contexts()
        self._trust = tls_session.TrustStores()

    async def deliver(
        self,
        targets: Sequence[TargetLike],
        nexthop_label: str,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        settings: DeliverySettings,
        *,
        options: MailOptions = NO_MAIL_OPTIONS,
        rcpt_options: Sequence[RcptOptions] = (),
        tls: TlsPlan | None = None,
    ) -> Attempt:
        """Deliver ``message`` to ``recipients`` through the first of ``targets`` that
        takes a transaction; ``rcpt_options`` go with the recipients in their order
        (missing ones count as none).  ``tls`` says which TLS each server must give;
        without it every server gets smtp_tls_security_level from ``settings``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        recipients = tuple(recipients)
        if not recipients:
            return Attempt((), "none", False, 0.0, 0.0, False)
        per_rcpt = tuple(rcpt_options[:len(recipients)])
        per_rcpt += (NO_RCPT_OPTIONS,) * (len(recipients) - len(per_rcpt))
        last: _SetupFailed | None = None
        every_failure_is_connection = True
        sessions = 0
        events: list[TlsEvent] = []
        for target in targets:
            try:
                policy = await self._policy_for(target, nexthop_label, settings, tls, events)
                session, reused = await self._session_for(
                    target, nexthop_label, settings, policy, events)
            except _SetupFailed as failure:
                log.info("%s (next hop %s)", failure.reason, nexthop_label)
                last = failure
                every_failure_is_connection &= failure.connection
                if failure.after_handshake:
                    # smtp_mx_session_limit: sessions that failed after the initial
                    # handshake count; those that never got that far do not (Postfix).
                    sessions += 1
                    if settings.mx_session_limit and sessions >= settings.mx_session_limit:
                        break
                continue
            except Exception:
                # Task boundary: a bug must not take the scheduler down with it.
                log.exception("unexpected error while connecting to %s", _namaddr(target))
                last = _SetupFailed(
                    "4.3.0", "mail transport unavailable", relay="none", connection=False
                )
                every_failure_is_connection = False
                continue
            setup_done = loop.time()
            fates: list[RcptResult | None] = [None] * len(recipients)
            clean = False
            payload = Payload(message, settings.line_length_limit)
            try:
                clean = await self._transaction(
                    session, sender, recipients, payload, settings, fates, options, per_rcpt,
                    policy.requiretls,
                )
            except _Broken as broken:
                _failed_results(recipients, fates, broken.dsn, broken.reason)
            except Exception:
                log.exception("unexpected error in SMTP session with %s", session.relay)
                _failed_results(recipients, fates, "4.3.0", "mail transport unavailable")
            finally:
                # Also on cancellation: a half-used connection must never go back to the cache.
                self._release(session, clean, settings)
            done = loop.time()
            # Every recipient has its fate by now; this only keeps a bug from losing one.
            _failed_results(recipients, fates, "4.3.0", "mail transport unavailable")
            results = tuple(fate for fate in fates if fate is not None)
            return Attempt(
                results, session.relay, False, setup_done - started, done - setup_done, reused,
                payload.broken, tuple(events),
            )

        if last is None:
            last = _SetupFailed(
                "4.4.1",
                f"no server address for next hop {nexthop_label}",
                relay="none",
                connection=False,
            )
            every_failure_is_connection = False
        status = RcptStatus.BOUNCE if last.permanent else RcptStatus.DEFER
        dsn = _with_class(last.dsn, "5" if last.permanent else "4")
        results = tuple(
            RcptResult(address, status, dsn, last.reason) for address in recipients
        )
        return Attempt(
            results, last.relay, every_failure_is_connection, loop.time() - started, 0.0, False,
            tls_events=tuple(events),
        )

    async def _policy_for(self, target: TargetLike, label: str, settings: DeliverySettings,
                          tls: TlsPlan | None, events: list[TlsEvent]) -> HostPolicy:
        if tls is None:
            host = target.hostname
            return host_policy(parse_level(settings.tls_level), settings.tls_defaults,
                               hostname=host, nexthop=_nexthop_host(label))
        decided = await tls.for_target(target)
        if isinstance(decided, HostPolicy):
            return decided
        # A Skip: this server may not carry the message (relay.tls.destination).
        if decided.report is not None and decided.result_type:
            events.append(TlsEvent(decided.report, decided.result_type,
                                   receiving_ip=target.address,
                                   receiving_mx_hostname=target.hostname))
        raise _SetupFailed(decided.dsn, decided.reason, relay="none", connection=False,
                           permanent=decided.permanent)

    async def close(self) -> None:
        """QUIT and close every cached connection; later connections are not cached."""
        self._closed = True
        idle = [session for sessions in self._idle.values() for session in sessions]
        self._idle.clear()
        for session in idle:
            if session.idle_timer is not None:
                session.idle_timer.cancel()
            self._quit_later(session)
        if self._quitting:
            await asyncio.gather(*self._quitting, return_exceptions=True)

    # -- connection cache --

    async def _session_for(
        self, target: TargetLike, label: str, settings: DeliverySettings, policy: HostPolicy,
        events: list[TlsEvent],
    ) -> tuple[_Session, bool]:
        key = (label, target.address, target.port)
        while (session := self._checkout(key, settings, policy)) is not None:
            try:
                reply = await session.exchange(b"RSET", settings.rset_timeout, RSET_PROBE)
            except _Broken as broken:
                log.debug("cached connection to %s is gone: %s", session.relay, broken.reason)
                session.abort()
                continue
            except BaseException:
                session.abort()  # cancelled mid-probe: the connection is out of the cache
                raise
            if reply.code // 100 == 2:
                return session, True
            session.quit_nowait()
        try:
            return await self._open(target, label, settings, policy, events, starttls=True), False
        except _RetryPlaintext:
            log.info("%s: TLS handshake failed, trying again without STARTTLS", _namaddr(target))
            return await self._open(target, label, settings, policy, events,
                                    starttls=False), False

    def _checkout(self, key: tuple[str, str, int], settings: DeliverySettings,
                  policy: HostPolicy) -> _Session | None:
        sessions = self._idle.get(key, [])
        now = asyncio.get_running_loop().time()
        for session in list(sessions):
            if not session.usable or now - session.created >= settings.connection_reuse_time_limit:
                self._forget(session)
                session.quit_nowait()
        chosen = None
        for session in reversed(sessions):  # the most recently used first
            # Only a connection made under the same TLS policy: one a weaker policy made
            # (or a verification another policy did not ask for) is not good enough.
            if session.policy_key == policy.cache_key:
                chosen = session
                break
        if chosen is not None:
            self._forget(chosen)
        return chosen

    def _forget(self, session: _Session) -> None:
        """Take an idle session out of the cache and stop its idle timer."""
        if session.idle_timer is not None:
            session.idle_timer.cancel()
            session.idle_timer = None
        sessions = self._idle.get(session.key, [])
        if session in sessions:
            sessions.remove(session)
        if not sessions:
            self._idle.pop(session.key, None)

    def _release(self, session: _Session, clean: bool, settings: DeliverySettings) -> None:
        age = asyncio.get_running_loop().time() - session.created
        if (
            not clean
            or self._closed
            or not session.usable
            or settings.connection_cache_time_limit <= 0
            or age >= settings.connection_reuse_time_limit
        ):
            if clean:
                session.quit_nowait()
            else:
                session.abort()
            return
        session.quit_timeout = settings.quit_timeout
        self._idle.setdefault(session.key, []).append(session)
        self._arm_idle_timer(session, settings)

    def _arm_idle_timer(self, session: _Session, settings: DeliverySettings) -> None:
        loop = asyncio.get_running_loop()
        session.idle_timer = loop.call_later(
            settings.connection_cache_time_limit, self._expire, session
        )

    def _expire(self, session: _Session) -> None:
        session.idle_timer = None
        self._forget(session)
        self._quit_later(session)

    def _quit_later(self, session: _Session) -> None:
        task = asyncio.get_running_loop().create_task(session.quit())
        self._quitting.add(task)
        task.add_done_callback(self._quitting.discard)

    # -- session setup --

    async def _open(
        self, target: TargetLike, label: str, settings: DeliverySettings, policy: HostPolicy,
        events: list[TlsEvent], *, starttls: bool
    ) -> _Session:
        namaddr = _namaddr(target)
        relay = f"{namaddr}:{target.port}"
        try:
            protocol = await asyncio.wait_for(
                engine.connect(target.address, target.port), settings.connect_timeout
            )
        except TimeoutError:
            raise _SetupFailed(
                "4.4.1", f"connect to {relay}: Connection timed out", relay="none", connection=True
            ) from None
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise _SetupFailed(
                "4.4.1", f"connect to {relay}: {why}", relay="none", connection=True
            ) from None
        session = _Session(
            (label, target.address, target.port), protocol, namaddr, relay,
            asyncio.get_running_loop().time(), policy_key=policy.cache_key,
        )
        try:
            await self._handshake(session, target, label, settings, policy, events,
                                  starttls=starttls)
        except _Broken as broken:
            session.abort()
            raise _SetupFailed(broken.dsn, broken.reason, relay=relay, connection=True) from None
        except BaseException:
            session.abort()
            raise
        return session

    async def _handshake(
        self,
        session: _Session,
        target: TargetLike,
        label: str,
        settings: DeliverySettings,
        policy: HostPolicy,
        events: list[TlsEvent],
        *,
        starttls: bool,
    ) -> None:
        greeting = await session.receive(settings.helo_timeout, GREETING)
        if greeting.code // 100 != 2:
            self._refused(session, greeting)
        await self._ehlo(session, settings)
        try:
            await self._after_ehlo(session, target, label, settings, policy, events,
                                   starttls=starttls)
        except _SetupFailed as failure:
            failure.after_handshake = True
            raise

    async def _after_ehlo(
        self,
        session: _Session,
        target: TargetLike,
        label: str,
        settings: DeliverySettings,
        policy: HostPolicy,
        events: list[TlsEvent],
        *,
        starttls: bool,
    ) -> None:
        """STARTTLS and AUTH, once the server greeted and took EHLO."""

        credentials = None
        if settings.sasl_enable and settings.sasl_credentials is not None:
            credentials = settings.sasl_credentials(label, target)

        level = policy.level
        required = level.required or policy.requiretls
        if starttls and level != Level.NONE and session.offers("starttls"):
            reply = await session.exchange(b"STARTTLS", settings.starttls_timeout, STARTTLS)
            if reply.code // 100 == 2:
                await self._start_tls(session, target, settings, policy, events,
                                      credentials is not None)
                await self._ehlo(session, settings)
            elif required:
                session.quit_nowait()
                raise _tls_refusal(
                    _with_class(reply.dsn, "4"),
                    f"TLS is required, but host {session.namaddr} refused to start TLS: "
                    f"{reply.text}", session, policy,
                    f"Sender requested REQUIRETLS, but host {session.namaddr} refused to "
                    f"start TLS: {reply.text}")
            # else: level "may", the server changed its mind; carry on in plaintext.
        if not session.tls and policy.report is not None and level != Level.NONE:
            events.append(self._event(session, policy, "starttls-not-supported"))
        if required and not session.tls:
            session.quit_nowait()
            raise _tls_refusal(
                "4.7.4", f"TLS is required, but was not offered by host {session.namaddr}",
                session, policy,
                f"Sender requested REQUIRETLS, but TLS service was not offered by host "
                f"{session.namaddr}")
        if policy.requiretls and not session.offers("requiretls"):
            session.quit_nowait()
            raise _tls_refusal(
                "5.7.30", "", session, policy,
                "Sender requested REQUIRETLS, but no server was found that supports "
                f"REQUIRETLS. The last attempted server was {session.namaddr}")

        if credentials is not None and session.offers("auth"):
            await self._authenticate(session, credentials, settings)

    @staticmethod
    def _event(session: _Session, policy: HostPolicy, result_type: str) -> TlsEvent:
        assert policy.report is not None
        local = session.protocol.local_address
        address = session.key[1]
        return TlsEvent(policy.report, result_type, local, address,
                        session.namaddr.partition("[")[0])

    def _refused(self, session: _Session, reply: _Reply) -> NoReturn:
        session.quit_nowait()
        # A 5xx greeting is retried later like a 4xx (Postfix's smtp_skip_5xx_greeting).
        raise _SetupFailed(
            _with_class(reply.dsn, "4"),
            f"host {session.namaddr} refused to talk to me: {reply.text}",
            relay=session.relay,
            connection=True,
        )

    async def _ehlo(self, session: _Session, settings: DeliverySettings) -> None:
        name = settings.helo_name.encode("ascii")
        reply = await session.exchange(b"EHLO " + name, settings.helo_timeout, EHLO)
        if reply.code // 100 == 2:
            session.extensions, session.auth_methods = engine.parse_ehlo(reply.message)
            return
        if reply.code == 421:
            self._refused(session, reply)
        reply = await session.exchange(b"HELO " + name, settings.helo_timeout, HELO)
        if reply.code // 100 != 2:
            self._refused(session, reply)
        session.extensions, session.auth_methods = {}, []

    async def _start_tls(
        self,
        session: _Session,
        target: TargetLike,
        settings: DeliverySettings,
        policy: HostPolicy,
        events: list[TlsEvent],
        has_credentials: bool,
    ) -> None:
        try:
            ipaddress.ip_address(target.hostname)
            server_hostname = None
        except ValueError:
            server_hostname = target.hostname or None
        try:
            await session.protocol.upgrade_to_tls(
                self._contexts.get(policy), server_hostname, settings.starttls_timeout
            )
        except OSError as exc:
            log.info("%s: TLS handshake failed: %s", session.relay, exc)
            session.abort()
            if policy.report is not None:
                events.append(self._event(session, policy, "validation-failure"))
            # Postfix does not fall back to plaintext when it would authenticate: the server
            # may offer AUTH only under TLS and the mail would fail with "relay access denied".
            if policy.level == Level.MAY and not has_credentials and not policy.requiretls:
                raise _RetryPlaintext() from None
            raise _tls_refusal(
                "4.7.5", "Cannot start TLS: handshake failure", session, policy,
                "Sender requested REQUIRETLS, but no trusted server certificate was found. "
                f"The last attempted server was {session.namaddr}") from None
        session.tls = True
        self._check_peer(session, settings, policy, events)

    def _check_peer(self, session: _Session, settings: DeliverySettings, policy: HostPolicy,
                    events: list[TlsEvent]) -> None:
        """Verify what the server presented and log it as Postfix does; a must-match
        level that is not satisfied ends the session with "Server certificate not
        verified" before anything else (AUTH above all) is sent."""
        obj = session.protocol.ssl_object
        if obj is None:
            raise _Broken("4.4.2", f"lost connection with {session.namaddr} while "
                                   "performing the TLS handshake")
        store = self._trust.get(settings.tls_ca_file, settings.tls_ca_path)
        verdict = tls_session.evaluate(obj, policy, store)
        where = session.relay
        enforced = policy.level.must_match
        if verdict.failure and (enforced or policy.sts_testing):
            line = tls_session.failure_line(verdict, where)
            if enforced:
                log.info("%s", line)
            else:
                log.info("%s (MTA-STS policy in testing mode: not enforced)", line)
            log.info("%s", tls_session.peer_line(verdict, where))
        elif settings.tls_loglevel >= 2:
            log.info("%s", tls_session.peer_line(verdict, where))
        if settings.tls_loglevel >= 1:
            log.info("%s", tls_session.summary(verdict, where))
        if policy.report is not None:
            events.append(self._event(session, policy, verdict.result_type
                                      if verdict.failure else ""))
        if enforced and not verdict.satisfied:
            session.quit_nowait()
            trusted = verdict.result_type == "certificate-host-mismatch"
            raise _tls_refusal(
                "4.7.5", "Server certificate not verified", session, policy,
                f"Sender requested REQUIRETLS, but no {'matching' if trusted else 'trusted'} "
                f"server certificate was found. The last attempted server was "
                f"{session.namaddr}")

    async def _authenticate(
        self, session: _Session, credentials: tuple[str, str], settings: DeliverySettings
    ) -> None:
        user, password = credentials
        timeout = settings.helo_timeout
        if "plain" in session.auth_methods:
            reply = await session.exchange(
                b"AUTH PLAIN " + engine.auth_plain(user, password), timeout, AUTH
            )
        elif "login" in session.auth_methods:
            encoded_user, encoded_password = engine.auth_login(user, password)
            reply = await session.exchange(b"AUTH LOGIN", timeout, AUTH)
            if reply.code == 334:
                reply = await session.exchange(encoded_user, timeout, AUTH)
            if reply.code == 334:
                reply = await session.exchange(encoded_password, timeout, AUTH)
        else:
            session.quit_nowait()
            raise _SetupFailed(
                "4.7.0",
                f"SASL authentication failed; cannot authenticate to server {session.namaddr}: "
                "no mechanism available",
                relay=session.relay,
                connection=False,
            )
        if reply.code != 235:
            session.quit_nowait()
            raise _SetupFailed(
                _with_class(reply.dsn, "4"),
                f"SASL authentication failed; server {session.namaddr} said: {reply.text}",
                relay=session.relay,
                connection=False,
            )

    # -- the mail transaction --

    async def _transaction(
        self,
        session: _Session,
        sender: str,
        recipients: tuple[str, ...],
        payload: Payload,
        settings: DeliverySettings,
        fates: list[RcptResult | None],
        options: MailOptions,
        rcpt_options: tuple[RcptOptions, ...],
        requiretls: bool = False,
    ) -> bool:
        """Run MAIL/RCPT/DATA, filling `fates`; True when the connection may be reused."""
        namaddr = session.namaddr
        message = payload.message

        def said(reply: _Reply, request: str) -> str:
            return f"host {namaddr} said: {reply.text} (in reply to {request})"

        def fail(index: int, dsn: str, reason: str, bounce: bool) -> None:
            status = RcptStatus.BOUNCE if bounce else RcptStatus.DEFER
            fates[index] = RcptResult(
                recipients[index], status, _with_class(dsn, "5" if bounce else "4"), reason
            )

        def fail_all(dsn: str, reason: str, bounce: bool) -> None:
            for index, fate in enumerate(fates):
                if fate is None:
                    fail(index, dsn, reason, bounce)

        def refused(reply: _Reply, request: str, indexes: Sequence[int] | None = None) -> None:
            for index in range(len(recipients)) if indexes is None else indexes:
                if fates[index] is None:
                    fail(index, reply.dsn, said(reply, request), reply.code // 100 == 5)

        limit = session.extensions.get("size", "")
        if limit.isdigit() and 0 < int(limit) < len(message):
            fail_all(
                "5.3.4",
                f"message size {len(message)} exceeds size limit {int(limit)} of server {namaddr}",
                True,
            )
            return True
        needs_utf8 = not (sender + "".join(recipients)).isascii()
        if needs_utf8 and not session.offers("smtputf8"):
            fail_all("5.6.7", f"SMTPUTF8 is required, but was not offered by host {namaddr}", True)
            return True
        if _COMMAND_UNSAFE.search(sender):
            fail_all("5.1.7", "bad sender address syntax", True)
            return True
        for index, recipient in enumerate(recipients):
            if _COMMAND_UNSAFE.search(recipient):
                fail(index, "5.1.3", "bad recipient address syntax", True)
        candidates = [index for index, fate in enumerate(fates) if fate is None]
        if not candidates:
            return True

        encoding = "utf-8" if needs_utf8 else "ascii"
        mail = b"MAIL FROM:<" + sender.encode(encoding) + b">"
        if session.offers("size"):
            mail += b" SIZE=%d" % len(message)
        if session.offers("8bitmime") and not message.isascii():
            mail += b" BODY=8BITMIME"
        # RFC 3461 section 5.2: the sender's requests go on only to a server that offers
        # DSN; xtext-encoded as Postfix's smtp_proto.c writes them, in its order.
        dsn_offered = session.offers("dsn")
        if dsn_offered:
            if options.envid:
                mail += b" ENVID=" + dsn_mod.xtext_encode(options.envid, "+=").encode("ascii")
            if dsn_mod.ret_flags(options.ret):
                mail += b" RET=" + options.ret.strip().upper().encode("ascii")
        if needs_utf8 or (options.smtputf8 and session.offers("smtputf8")):
            mail += b" SMTPUTF8"
        if requiretls:
            # RFC 8689 4.2: the next hop takes the request on (session setup made sure
            # it offers REQUIRETLS over verified TLS).
            mail += b" REQUIRETLS"
        if settings.sasl_enable and settings.send_dummy_mail_auth and session.offers("auth"):
            # Only where asked (smtp_send_dummy_mail_auth): we authenticate ourselves, not
            # the sender (RFC 4954 section 5), and some servers refuse a MAIL with AUTH=<>.
            mail += b" AUTH=<>"
        rcpts = [
            b"RCPT TO:<" + recipients[index].encode(encoding) + b">"
            + (_rcpt_dsn(rcpt_options[index]) if dsn_offered else b"")
            for index in candidates
        ]

        # RFC 2920: with PIPELINING, MAIL, every RCPT and DATA go out in one write (DATA
        # ends the group); the replies are then read in order, each deciding its own part.
        pipelined = session.offers("pipelining")
        if pipelined:
            session.send(mail, *rcpts, b"DATA", where=MAIL)
        else:
            session.send(mail, where=MAIL)
        mail_reply = await session.receive(settings.mail_timeout, MAIL)
        mail_ok = mail_reply.code // 100 == 2
        if not mail_ok:
            refused(mail_reply, "MAIL FROM command")
        accepted: list[int] = []
        if pipelined or mail_ok:
            for index, command in zip(candidates, rcpts):
                if not pipelined:
                    session.send(command, where=RCPT)
                reply = await session.receive(settings.rcpt_timeout, RCPT)
                if not mail_ok:
                    continue  # replies to RCPTs after a refused MAIL mean nothing
                if reply.code // 100 == 2:
                    accepted.append(index)
                else:
                    refused(reply, "RCPT TO command", [index])
        data_reply: _Reply | None = None
        if pipelined:
            data_reply = await session.receive(settings.data_init_timeout, DATA)

        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                # The server took DATA although nobody is left: an empty message ends it.
                session.send(b".", where=DOT)
                await session.receive(settings.data_done_timeout, DOT)
            return await self._final_rset(session, settings)

        if data_reply is None:
            data_reply = await session.exchange(b"DATA", settings.data_init_timeout, DATA)
        if data_reply.code != 354:
            refused(data_reply, "DATA command", accepted)
            return await self._final_rset(session, settings)

        final = await self._send_body(session, payload, settings)
        if final is None:
            final = await session.receive(settings.data_done_timeout, DOT)
        if final.code // 100 == 2:
            for index in accepted:
                fates[index] = RcptResult(
                    recipients[index], RcptStatus.SENT, _with_class(final.dsn, "2"), final.text,
                    dsn_passed_on=dsn_offered,
                )
        else:
            refused(final, "end of DATA command", accepted)
        return True

    async def _send_body(
        self, session: _Session, payload: Payload, settings: DeliverySettings
    ) -> _Reply | None:
        """Send the content and the final dot; a reply here is one the server sent early."""
        protocol = session.protocol
        if len(payload.message) <= BODY_CHUNK:
            # A small message and its final dot go out in one write.
            try:
                protocol.send(payload.whole() + b".\r\n")
            except ConnectionError:
                early = protocol.take_unread_reply()
                if early is not None:
                    return _reply(early)
                raise session.lost(BODY) from None
            return None
        try:
            # Piece by piece, so that no second copy of a big message is ever made whole.
            for piece in payload.chunks(BODY_CHUNK):
                protocol.send(piece)
                # smtp_data_xfer_timeout is a no-progress limit per write, as in Postfix.
                await asyncio.wait_for(protocol.drain(), settings.data_xfer_timeout)
        except TimeoutError:
            raise _Broken(
                "4.4.2", f"conversation with {session.namaddr} timed out while {BODY}"
            ) from None
        except ConnectionError:
            # Postfix reads a reply the server may have sent before hanging up (a 5xx for
            # a message too big, say); only without one is this a lost connection.
            early = protocol.take_unread_reply()
            if early is not None:
                return _reply(early)
            raise session.lost(BODY) from None
        session.send(b".", where=BODY)
        return None

    async def _final_rset(self, session: _Session, settings: DeliverySettings) -> bool:
        # The recipients' fates are settled: trouble here only costs the connection.
        try:
            reply = await session.exchange(b"RSET", settings.rset_timeout, FINAL_RSET)
        except _Broken:
            return False
        return reply.code // 100 == 2
