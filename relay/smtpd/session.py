"""One SMTP session, from the greeting to the disconnect line (Postfix's smtpd dialogue).

It owns the order of things in a session and every reply: PROXY header, admission (the
per-client limits counted by relay.anvil), the pregreet test, the command loop with
Postfix's checks on each command (NUL bytes, unauthorised pipelining, STARTTLS required,
bare LF, command length, the hard error limit), and the commands themselves: EHLO/HELO,
STARTTLS, AUTH PLAIN and LOGIN against relay.auth's scrypt file, MAIL, RCPT, DATA, RSET,
NOOP, VRFY, QUIT.  What is allowed is decided by relay.smtpd.policy, what a DATA line means
by relay.smtpd.content, the words of every reply come from relay.smtpd.replies, and a
finished message goes to relay.smtpd.cleanup, which answers only once the spool has it.

It does no I/O of its own: it reads and writes through a ``Connection`` (relay.smtpd.engine
wraps aiosmtpd's protocol object in one), so nothing here knows aiosmtpd.  A reply that ends
a session (421, 554 5.5.x, 521) first drops whatever the client already sent, so nothing
queued behind it is ever executed.  A crash of a session ends that connection only; what
it leaves in the spool is cleanup's business.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from relay.anvil import Event
from relay.auth import PasswordFileError, valid_username
from relay.config import domain_in_list
from relay.smtpd import policy, replies
from relay.smtpd.content import Content
from relay.smtpd.policy import MailParameters, RcptParameters
from spool import SpoolFull

if TYPE_CHECKING:
    import ssl

    from relay.smtpd.listener import Listener

log = logging.getLogger("relay.smtpd")

_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)
_EHLO_ORDER = ("PIPELINING", "SIZE", "VRFY", "ETRN", "STARTTLS", "AUTH", "ENHANCEDSTATUSCODES",
               "8BITMIME", "DSN", "SMTPUTF8", "REQUIRETLS")


class Connection(Protocol):
    """What a session needs of its connection (relay.smtpd.engine provides it)."""

    @property
    def peer_address(self) -> str: ...

    @property
    def tls_active(self) -> bool: ...

    def reply(self, text: str, *, hold: bool) -> None:
        """Send a reply (lines joined by CR LF) in one write; ``hold`` keeps it back while
        pipelined input is already waiting, to go out with the next one (RFC 2920)."""

    async def drain(self) -> None: ...

    def pending(self) -> bytes:
        """Input already received and not yet read."""

    async def read_line(self) -> bytes | None:
        """A line with its LF (or CR LF), or the first part of an over-long one; None at
        the end of the input."""

    async def read_lines(self) -> bytes | None:
        """The whole lines already received (at least one, or the first part of an
        over-long one); None at the end of the input."""

    def unread(self, data: bytes) -> None:
        """Give back input read past where it belongs: it is read again first."""

    async def read_proxy(self) -> tuple[str, str]:
        """The client address from a PROXY header, and an error text ("" if none)."""

    async def start_tls(self, context: ssl.SSLContext) -> str:
        """The server side of a TLS handshake over this connection: "" once it is done,
        else why it failed (the connection is then closed)."""

    def tls_cipher(self) -> tuple[str, str, int] | None:
        """The TLS session's protocol, cipher and secret bits; None without TLS."""

    def deadline(self, seconds: float, *, moving: bool = True) -> None:
        """Each read must come within ``seconds`` (smtpd_timeout); with ``moving`` false,
        all input must (smtpd_upstream_proxy_timeout bounds the whole PROXY header)."""

    def close(self) -> None:
        """Forget unread input and close."""


@dataclass(slots=True)
class Transaction:
    """One mail transaction, between MAIL and the end of DATA (or RSET)."""

    sender: str  # "" for <>
    parameters: MailParameters
    recipients: dict[str, RcptParameters] = field(default_factory=dict)


class Session:
    """The dialogue with one client."""

    def __init__(self, listener: Listener, conn: Connection, *, implicit_tls: bool) -> None:
        self.listener = listener
        self.conn = conn
        self.implicit_tls = implicit_tls
        self.client = _NO_CLIENT_YET
        self.helo = ""
        self.esmtp = False
        self.sasl_user = ""
        self.sasl_method = ""
        self.mail: Transaction | None = None
        self.counts: dict[str, list[int]] = {}
        self.command = "CONNECT"
        self.closing = False
        self.phase = "connect"  # proxy -> connect -> smtp
        self._errors = 0
        self._last_code = 0
        self._counted = False
        self._session_timer: asyncio.TimerHandle | None = None

    # ---- the session ----------------------------------------------------------------

    @property
    def tls(self) -> bool:
        return self.implicit_tls or self.conn.tls_active

    def namaddr(self) -> str:
        return self.client.namaddr

    async def run(self) -> None:
        """The whole session; returns when it is over."""
        s = self.listener.settings
        address = self.conn.peer_address
        if s.proxy_protocol:
            self.phase = "proxy"
            self.conn.deadline(s.proxy_timeout, moving=False)
            address, error = await self.conn.read_proxy()
            if error:
                log.warning("haproxy read: %s from [%s]", error,
                            policy.normal_address(self.conn.peer_address))
                self.close()
                return
            self.phase = "connect"
        self.client = self.listener.client(address)
        self.conn.deadline(s.timeout)
        if not await self._admit():
            return
        if s.session_time_limit > 0:
            self._session_timer = asyncio.get_running_loop().call_later(
                s.session_time_limit, self._session_expired)
        if s.greet_wait > 0:
            await asyncio.sleep(s.greet_wait)
        pending = self.conn.pending()
        if pending and (s.greet_wait > 0 or s.forbid_unauth_pipelining):
            # Nothing may come before the banner (RFC 5321 §4.3.1): a client that talks
            # first is a spambot that does not wait for replies.
            log.info("PREGREET %d after %s from %s: %s", len(pending), s.greet_wait,
                     self.namaddr(), _printable(pending))
            self.send(replies.PREGREET)
            self.close()
            return
        self.phase = "smtp"
        if self.implicit_tls:
            self._log_tls()
        self.send(replies.GREETING.format(banner=s.greeting))
        while not self.closing:
            line = await self.conn.read_line()
            if line is None:
                if not self.closing:
                    log.info("lost connection after %s from %s", self.command, self.namaddr())
                    self.close()
                return
            if s.soft_error_limit and self._errors >= s.soft_error_limit \
                    and s.error_sleep_time > 0:
                # smtpd_soft_error_limit: a client that keeps erring gets every reply
                # smtpd_error_sleep_time late (Postfix's smtpd_chat_reply()).
                await asyncio.sleep(s.error_sleep_time)
            try:
                await self.command_line(line)
            except Exception:
                # Never a 5xx for our own failure: the client would give up on the mail.
                # The transaction is reset so that the session can go on.
                log.exception("%s: internal error", self.namaddr())
                self.mail = None
                self.send(replies.INTERNAL_ERROR)

    def _log_tls(self) -> None:
        """Postfix's smtpd_tls_loglevel 1 line; relay asks no client certificate, so the
        session is Anonymous in Postfix's words."""
        cipher = self.conn.tls_cipher()
        if self.listener.settings.tls_loglevel >= 1 and cipher is not None:
            protocol, name, bits = cipher
            log.info("Anonymous TLS connection established from %s: %s with cipher %s "
                     "(%d/%d bits)", self.namaddr(), protocol, name, bits, bits)

    async def _admit(self) -> bool:
        """Count the connection; refuse it with 421 over the count or rate limit."""
        lst = self.listener
        s = lst.settings
        client = self.client
        log.info("connect from %s", client.namaddr)
        lst.observer.connected()
        self._counted = True
        n, rate = await lst.admit(client)
        if s.connection_count_limit and n > s.connection_count_limit and not client.exempt:
            log.warning("Connection concurrency limit exceeded: %d from %s for service smtp",
                        n, client.namaddr)
        elif rate:
            log.warning("Connection rate limit exceeded: %d from %s for service smtp",
                        rate, client.namaddr)
        else:
            lst.sessions.add(self)
            return True
        self.send(replies.TOO_MANY_CONNECTIONS.format(myhostname=s.myhostname,
                                                      client=client.address))
        self.close()
        return False

    def send(self, text: str) -> None:
        """Send a reply, counting it towards smtpd_hard_error_limit; a 421 or 521 ends
        the session.  Replies to pipelined commands wait to go out together."""
        if self.closing:
            return
        if text[0] == "5" and self.listener.settings.soft_bounce:
            # soft_bounce: refuse nothing for good, as Postfix's smtpd_chat_reply() (a 521
            # becomes 421 and still ends the session).
            text = "\r\n".join("4" + line[1:4] + ("4" + line[5:] if line[4:5] == "5"
                                                    else line[4:])
                               for line in text.split("\r\n"))
        code = int(text[:3])
        self._last_code = code
        if code >= 400:
            self.listener.observer.refused(text)
        # 421 and 521 end the session (RFC 5321 §3.8, RFC 7504).
        self.conn.reply(text, hold=code not in (220, 221, 421, 521))
        if code in (421, 521):
            self.close()
        elif code >= 400:
            # smtpd_hard_error_limit: every refused command counts, as in Postfix.
            self._errors += 1
            s = self.listener.settings
            if s.hard_error_limit and self._errors >= s.hard_error_limit:
                log.info("too many errors after %s from %s", self.command, self.namaddr())
                self.send(replies.TOO_MANY_ERRORS.format(myhostname=s.myhostname))

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self._session_timer is not None:
            self._session_timer.cancel()
        self.conn.close()

    def timed_out(self) -> None:
        """smtpd_timeout (or the PROXY timeout) ran out: say so, as Postfix does."""
        if self.closing:
            return
        if self.phase == "smtp":
            log.info("timeout after %s from %s", self.command, self.namaddr())
            self.send(replies.TIMEOUT.format(myhostname=self.listener.settings.myhostname))
        elif self.phase == "proxy":
            log.warning("haproxy read: timeout error from [%s]",
                        policy.normal_address(self.conn.peer_address))
        self.close()

    def _session_expired(self) -> None:
        # smtpd_session_time_limit: a slowloris peer that keeps every read within
        # smtpd_timeout still cannot hold a slot for ever.
        if self.closing:
            return
        log.info("session time limit exceeded after %s from %s", self.command,
                 self.namaddr())
        self.send(replies.TIMEOUT.format(myhostname=self.listener.settings.myhostname))

    def shutdown(self) -> None:
        """The daemon stops: tell the client we are going away, and close."""
        self.send(replies.SHUTTING_DOWN)
        self.close()

    def ended(self) -> None:
        """The connection is gone: the disconnect line, and the client's slot back."""
        self.listener.sessions.discard(self)
        if self._session_timer is not None:
            self._session_timer.cancel()
        if not self._counted:
            return
        self._counted = False
        self.listener.left(self.client)
        stats = " ".join(f"{k}={ok}" if ok == total else f"{k}={ok}/{total}"
                         for k, (ok, total) in self.counts.items())
        total_cmds = sum(t for _, t in self.counts.values())
        ok_cmds = sum(o for o, _ in self.counts.values())
        cmds = f"commands={ok_cmds}" if ok_cmds == total_cmds else \
            f"commands={ok_cmds}/{total_cmds}"
        log.info("disconnect from %s %s", self.namaddr(), f"{stats} {cmds}".strip())

    # ---- the command loop -----------------------------------------------------------

    async def command_line(self, line: bytes) -> None:
        """One command line: Postfix's checks, then the command."""
        self._last_code = 0
        bare = line.endswith(b"\n") and not line.endswith(b"\r\n")
        text = line.rstrip(b"\r\n")
        verb_bytes, _, arg_bytes = text.partition(b" ")
        verb = verb_bytes.decode("ascii", "replace").upper()
        handler = _COMMANDS.get(verb)
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            handler = None  # Postfix protects everything behind it from malformed UTF-8
            utf8 = False
        else:
            utf8 = True
        name = verb.lower() if handler is not None else "unknown"
        self.command = verb if handler is not None else "UNKNOWN"
        if bare and self.client.bare_newline == "reject":
            self._reject_bare_lf()
        elif not utf8:
            self.send(replies.BAD_UTF8)
        elif b"\x00" in text and verb not in ("MAIL", "RCPT"):
            # In MAIL and RCPT the address check answers for a NUL (501), as in Postfix.
            self.send(replies.NUL_IN_COMMAND)
        elif not text.strip():
            self.send(replies.BAD_SYNTAX)
        elif handler is None:
            self.send(replies.UNKNOWN_COMMAND)
        elif len(text) > policy.command_limit(verb):
            self.send(replies.COMMAND_TOO_LONG)
        else:
            arg = arg_bytes.strip(b" ").decode("utf-8", "surrogateescape")
            if self._pipelined(verb, arg):
                pass
            elif verb == "STARTTLS" and self.tls:
                self.send(replies.TLS_ACTIVE)
            elif self._starttls_required() and verb not in policy.BEFORE_STARTTLS:
                self.send(replies.NEED_STARTTLS)
            else:
                await handler(self, arg)
        counts = self.counts.get(name)
        if counts is None:
            counts = self.counts[name] = [0, 0]
        counts[0] += 0 < self._last_code < 400
        counts[1] += 1

    def _reject_bare_lf(self) -> None:
        log.info("reject: bare <LF> received from %s", self.namaddr())
        self.send(replies.BARE_LF.format(code=self.listener.settings.bare_newline_reject_code))

    def _pipelined(self, verb: str, arg: str) -> bool:
        """RFC 2920: ``verb`` must be the last command of its group.  If something is
        waiting behind it (smtpd_forbid_unauth_pipelining), refuse and end the session;
        the waiting input is never executed."""
        if not self.listener.settings.forbid_unauth_pipelining:
            return False
        pending = self.conn.pending()
        if not policy.unauthorised_pipelining(verb, arg, bool(pending)):
            return False
        log.info("improper command pipelining after %s from %s: %s", verb, self.namaddr(),
                 _printable(pending))
        self.send(replies.PIPELINING)
        self.close()
        return True

    def _starttls_required(self) -> bool:
        s = self.listener.settings
        return (s.tls_security_level == "encrypt" and s.tls_context is not None
                and not self.tls)

    # ---- HELO, EHLO, STARTTLS ---------------------------------------------------------

    def _reset(self) -> None:
        self.mail = None

    async def helo_command(self, arg: str) -> None:
        if not arg:
            self.send(replies.HELO_SYNTAX)
            return
        self._reset()
        self.helo, self.esmtp = arg, False
        self.send(replies.HELO.format(myhostname=self.listener.settings.myhostname))

    async def ehlo(self, arg: str) -> None:
        if not arg:
            self.send(replies.EHLO_SYNTAX)
            return
        self._reset()
        self.helo, self.esmtp = arg, True
        s = self.listener.settings
        offer = (self._starttls_offered(), self._auth_offered(), s.requiretls_enable and self.tls)
        replies_made = self.listener.ehlo_replies
        text = replies_made.get(offer)
        if text is None:
            text = replies_made[offer] = ehlo_reply(s, *offer)
        self.send(text)

    def _starttls_offered(self) -> bool:
        s = self.listener.settings
        return s.tls_context is not None and s.tls_security_level != "none" and not self.tls

    def _auth_offered(self) -> bool:
        s = self.listener.settings
        return s.sasl_auth_enable and s.passwords is not None and (
            self.tls or not s.tls_auth_only)

    async def starttls(self, arg: str) -> None:
        if arg:
            self.send(replies.STARTTLS_SYNTAX)
            return
        context = self.listener.settings.tls_context
        if not self._starttls_offered() or context is None:
            self.send(replies.NOT_IMPLEMENTED)
            return
        self.send(replies.STARTTLS_READY)
        await self.conn.drain()
        failure = await self.conn.start_tls(context)
        if failure:
            # As Postfix: the error, the lost connection, and STARTTLS counted as failed
            # in the disconnect line (starttls=0/1); after a timeout, its own line only.
            if not self.closing:
                log.info("SSL_accept error from %s: %s", self.namaddr(), failure)
                log.info("lost connection after STARTTLS from %s", self.namaddr())
            self._last_code = 0
            self.close()
            return
        self._log_tls()
        # RFC 3207 §4.2: forget what the client told us before, its login included.
        self._reset()
        self.helo, self.esmtp, self.sasl_user, self.sasl_method = "", False, "", ""

    # ---- AUTH (RFC 4954, RFC 4616) ----------------------------------------------------

    async def auth(self, arg: str) -> None:
        s = self.listener.settings
        client = self.client
        if not self._auth_offered():
            self.send(replies.AUTH_NOT_ENABLED)
            return
        if not self.esmtp:
            self.send(replies.NEED_HELO)
            return
        if self.sasl_user:
            self.send(replies.AUTH_ALREADY)
            return
        if self.mail is not None:
            self.send(replies.AUTH_IN_TRANSACTION)
            return
        words = arg.split()
        if not 1 <= len(words) <= 2:
            self.send(replies.AUTH_SYNTAX)
            return
        mechanism = words[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            self.send(replies.AUTH_MECHANISM.format(mechanism=_printable(words[0])))
            return
        if await self.listener.login_blocked(client):
            log.warning("too many failed logins from %s for service smtp", client.namaddr)
            self.send(replies.TOO_MANY_LOGINS.format(myhostname=s.myhostname,
                                                     client=client.address))
            return
        initial = words[1] if len(words) > 1 else None
        if mechanism == "PLAIN":
            blob = await self._sasl_response(initial, b"")
            if blob is None:
                return
            parts = blob.split(b"\x00")
            authzid, login, password = parts if len(parts) == 3 else (b"?", b"", b"")
            if authzid not in (b"", login):
                login = b""  # acting for another user is not supported: a failure
        else:
            login_or_none = await self._sasl_response(initial, b"Username:")
            if login_or_none is None:
                return
            login = login_or_none
            password_or_none = await self._sasl_response(None, b"Password:")
            if password_or_none is None:
                return
            password = password_or_none
        user = login.decode("utf-8", "replace")
        ok = False
        if valid_username(user) and "\ufffd" not in user and s.passwords is not None:
            try:
                async with self.listener.password_checks:
                    ok = await asyncio.to_thread(s.passwords.verify, user, password)
            except PasswordFileError as exc:
                log.warning("%s: SASL %s authentication failed: %s", client.namaddr,
                            mechanism, exc)
                self.send(replies.AUTH_TEMPORARY)
                return
        if ok:
            self.sasl_user, self.sasl_method = user, mechanism
            self.send(replies.AUTH_OK)
            return
        log.warning("%s: SASL %s authentication failed: authentication failure, "
                    "sasl_username=%s", client.namaddr, mechanism, _printable(login))
        await self.listener.login_failed(client)
        self.send(replies.AUTH_FAILED)

    async def _sasl_response(self, initial: str | None, prompt: bytes) -> bytes | None:
        """The client's next SASL response, decoded: the initial response if it gave one,
        else the answer to a 334 challenge.  None if it aborted (``*``), sent bad base64
        or went away; the reply has been sent then."""
        if initial is None:
            self.send(replies.AUTH_CHALLENGE.format(
                challenge=base64.b64encode(prompt).decode()))
            await self.conn.drain()
            line = await self.conn.read_line()
            if line is None:
                self.close()
                return None
            initial = line.strip().decode("ascii", "replace")
            if initial == "*":
                self.send(replies.AUTH_ABORTED)
                return None
        elif initial == "=":  # RFC 4954 §4: an empty initial response
            return b""
        try:
            return base64.b64decode(initial.encode("ascii", "replace"), validate=True)
        except (binascii.Error, ValueError):
            self.send(replies.AUTH_MALFORMED)
            return None

    # ---- the mail transaction ---------------------------------------------------------

    async def mail_command(self, arg: str) -> None:
        s = self.listener.settings
        if not self.helo:
            self.send(replies.NEED_HELO)
            return
        if self.mail is not None:
            self.send(replies.NESTED_MAIL)
            return
        path = policy.parse_path(arg, "FROM:")
        if path is None:
            self.send(replies.MAIL_SYNTAX)
            return
        error = policy.address_error(path.address, sender=True) if path.address else None
        if error:
            log.warning("Illegal address syntax from %s in MAIL command: %s",
                        self.namaddr(), _printable(path.address))
            self.send(error)
            return
        params = policy.parse_mail_parameters(
            path.parameters, requiretls=s.requiretls_enable and self.tls)
        if isinstance(params, str):
            self.send(params)
            return
        rate = await self.listener.rate_over(self.client, Event.MESSAGE, s.message_rate_limit)
        if rate:
            log.warning("Message delivery request rate limit exceeded: %d from %s for "
                        "service smtp", rate, self.namaddr())
            self.send(replies.TOO_MANY_MESSAGES.format(myhostname=s.myhostname,
                                                       client=self.client.address))
            return
        if policy.too_big(s, params.size):
            self.send(replies.MESSAGE_TOO_BIG)
            return
        if not policy.enough_space(s, self.listener.free_space(), params.size):
            log.warning("%s: not enough free space in the queue file system", self.namaddr())
            self.send(replies.NO_SPACE)
            return
        self.mail = Transaction(path.address, params)
        self.send(replies.MAIL_OK)

    async def rcpt(self, arg: str) -> None:
        s = self.listener.settings
        mail = self.mail
        if mail is None:
            self.send(replies.NEED_MAIL)
            return
        path = policy.parse_path(arg, "TO:")
        if path is None:
            self.send(replies.RCPT_SYNTAX)
            return
        address = path.address
        error = policy.address_error(address, sender=False) if address else \
            replies.BAD_RECIPIENT
        if error is None and not policy.split_address(address)[1]:
            if address.lower() == "postmaster":
                address = f"postmaster@{s.myhostname}"
            else:
                error = replies.BAD_RECIPIENT
        if error:
            log.warning("Illegal address syntax from %s in RCPT command: %s",
                        self.namaddr(), _printable(path.address))
            self.send(error)
            return
        params = policy.parse_rcpt_parameters(path.parameters)
        if isinstance(params, str):
            self.send(params)
            return
        rate = await self.listener.rate_over(self.client, Event.RECIPIENT,
                                             s.recipient_rate_limit)
        if rate:
            log.warning("Recipient address rate limit exceeded: %d from %s for service smtp",
                        rate, self.namaddr())
            self.send(replies.TOO_MANY_RECIPIENTS_FROM.format(myhostname=s.myhostname,
                                                              client=self.client.address))
            return
        if len(mail.recipients) >= s.recipient_limit:
            self.send(replies.TOO_MANY_RECIPIENTS)
            return
        reply = policy.relay_check(s, self.client, self.sasl_user, address, path.source_route)
        if reply is not None:
            log.info("NOQUEUE: reject: RCPT from %s: %s; from=<%s> to=<%s> proto=%s helo=<%s>",
                     self.namaddr(), reply, mail.sender, address,
                     "ESMTP" if self.esmtp else "SMTP", self.helo)
            self.send(reply)
            return
        mail.recipients.setdefault(address, params)
        self.send(replies.RCPT_OK)

    async def data(self, arg: str) -> None:
        s = self.listener.settings
        mail = self.mail
        if mail is None or not mail.recipients:
            self.send(replies.NEED_RCPT if mail is None else replies.NO_VALID_RECIPIENTS)
            return
        if arg:
            self.send(replies.DATA_SYNTAX)
            return
        self.send(replies.DATA_GO_AHEAD)
        await self.conn.drain()
        content = Content(self.client.bare_newline, s.message_size_limit)
        while True:
            block = await self.conn.read_lines()
            if block is None:
                log.info("lost connection after DATA from %s", self.namaddr())
                self.close()
                return
            end = content.feed_block(block)
            if end >= 0:
                self.conn.unread(block[end:])  # pipelined after the data: commands
                break
        self.mail = None
        data = content.data()
        reply = self._judge(mail, content, data)
        if reply is None:
            reply = await self._enqueue(mail, data)
        self.send(reply)

    def _judge(self, mail: Transaction, content: Content, data: bytes) -> str | None:
        """The reply refusing a message that arrived whole, or None to queue it."""
        s = self.listener.settings
        if content.too_big:
            return replies.MESSAGE_TOO_BIG
        if content.rejected_bare_lf:
            log.info("reject: bare <LF> received from %s", self.namaddr())
            return replies.BARE_LF.format(code=s.bare_newline_reject_code)
        if content.nul:
            return self._reject_data(mail, replies.NUL_IN_CONTENT)
        if s.hopcount_limit and \
                len(_RECEIVED.findall(data, 0, _header_end(data))) > s.hopcount_limit:
            return self._reject_data(mail, replies.TOO_MANY_HOPS)
        if self.listener.shutting_down:
            return replies.SHUTTING_DOWN
        return None

    def _reject_data(self, mail: Transaction, reply: str) -> str:
        log.info("NOQUEUE: reject: DATA from %s: %s; from=<%s> proto=%s helo=<%s>",
                 self.namaddr(), reply, mail.sender, self.protocol_name(), self.helo)
        return reply

    async def _enqueue(self, mail: Transaction, data: bytes) -> str:
        try:
            queue_id = await self.listener.cleanup.enqueue(self, mail, data)
        except SpoolFull as exc:
            log.warning("%s: %s", self.namaddr(), exc)
            self.listener.space_changed()
            return replies.NO_SPACE
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: queue file write error", self.namaddr())
            return replies.WRITE_ERROR
        # Postfix forgives a client's errors once it delivered a message (smtpd.c).
        self._errors = 0
        return replies.QUEUED.format(queue_id=queue_id)

    def protocol_name(self) -> str:
        proto = "ESMTP" if self.esmtp else "SMTP"
        if self.tls:
            proto += "S"
        if self.sasl_user:
            proto += "A"
        return proto

    # ---- RSET, NOOP, VRFY, QUIT ---------------------------------------------------------

    async def rset(self, arg: str) -> None:
        if arg:
            self.send(replies.RSET_SYNTAX)
            return
        self._reset()
        self.send(replies.OK)

    async def noop(self, arg: str) -> None:
        self.send(replies.OK)

    async def vrfy(self, arg: str) -> None:
        words = arg.split()
        if words and words[-1].upper() == "SMTPUTF8":
            words.pop()
        if not words:
            self.send(replies.VRFY_SYNTAX)
            return
        address = " ".join(words)
        inner = address[1:-1] if address.startswith("<") and address.endswith(">") else address
        if not inner or policy.address_error(inner, sender=False):
            self.send(replies.BAD_RECIPIENT)
            return
        self.send(replies.VRFY.format(address=address))

    async def etrn(self, arg: str) -> None:
        """RFC 1985: a backup MX's client asks for the mail queued for its site now;
        the sites are those in fast_flush_domains (default $relay_domains), as Postfix's
        flush(8) serves them."""
        if not self.helo:
            self.send(replies.NEED_HELO)
            return
        if self.mail is not None:
            self.send(replies.ETRN_IN_TRANSACTION)
            return
        words = arg.split()
        if len(words) != 1:
            self.send(replies.ETRN_SYNTAX)
            return
        site = policy.etrn_site(words[0])
        if site is None:
            self.send(replies.ETRN_BAD_SITE)
            return
        if not domain_in_list(site.strip("[]"), self.listener.settings.fast_flush_domains):
            log.warning("reject: ETRN %s... from %s", _printable(site),
                        self.namaddr())
            self.send(replies.ETRN_DENIED.format(site=site))
            return
        if not self.listener.flush_site(site):
            self.send(replies.ETRN_UNAVAILABLE)
            return
        self.send(replies.ETRN_STARTED)

    async def quit(self, arg: str) -> None:
        self.send(replies.BYE)
        await self.conn.drain()
        self.close()


# The handler of each command: one table for every session.
_COMMANDS: dict[str, Callable[[Session, str], Awaitable[None]]] = {
    "EHLO": Session.ehlo, "HELO": Session.helo_command, "STARTTLS": Session.starttls,
    "AUTH": Session.auth, "MAIL": Session.mail_command, "RCPT": Session.rcpt,
    "DATA": Session.data, "RSET": Session.rset, "NOOP": Session.noop, "VRFY": Session.vrfy,
    "ETRN": Session.etrn, "QUIT": Session.quit,
}
# Who the client is until its address is known (the PROXY header may name it).
_NO_CLIENT_YET = policy.Client("", "unknown", False, False, "no")


def ehlo_reply(s: policy.SmtpdSettings, starttls: bool, auth: bool, requiretls: bool) -> str:
    """The EHLO reply with what is offered, in Postfix's order."""
    words = ["PIPELINING", "VRFY", "ETRN", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN",
             "SMTPUTF8"]
    if s.message_size_limit:
        words.append(f"SIZE {s.message_size_limit}")
    if starttls:
        words.append("STARTTLS")
    if auth:
        words.append("AUTH LOGIN PLAIN")
    if requiretls:
        words.append("REQUIRETLS")
    words.sort(key=lambda w: _EHLO_ORDER.index(w.split(" ")[0]))
    lines = [s.myhostname, *words]
    return "\r\n".join(f"250-{w}" for w in lines[:-1]) + f"\r\n250 {lines[-1]}"


def _header_end(content: bytes) -> int:
    """Where the message header (RFC 5322 §2.1) ends: at the first empty line."""
    if content.startswith(b"\r\n"):
        return 0
    end = content.find(b"\r\n\r\n")
    return len(content) if end < 0 else end


def _printable(data: bytes | str, limit: int = 100) -> str:
    """Client input for a log line: controls escaped, cut short."""
    text = data[:limit].decode("utf-8", "replace") if isinstance(data, bytes) else data[:limit]
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)

