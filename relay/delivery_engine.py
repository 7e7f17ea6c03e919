"""The seam between relay's SMTP client and aiosmtplib: the only module that imports aiosmtplib.

aiosmtplib is the client's wire engine.  ``Connection`` subclasses its ``SMTPProtocol`` and
keeps what aiosmtplib does well: reply framing and parsing (multi-line replies, the code of
each line, the limits on line and reply length), write flow control, and the asyncio
protocol object itself.  The conversation (which command when, what a reply means, every
reason text) is relay.delivery's; it sees only what this module defines: ``Connection``,
``Reply``, the errors below, ``parse_ehlo`` and the two AUTH encoders.

What this module relies on, and why (tests/unit/test_delivery_engine_contract.py checks
each one against the installed aiosmtplib, naming the member when an upgrade changes it):

- ``SMTPProtocol.__init__(loop=...)``, ``connection_made`` and ``connection_lost`` (which
  sets ``transport`` to None), ``is_connected`` and ``write`` (which raises
  ``SMTPServerDisconnected`` on a closed transport): the connection's life.
- ``_buffer`` (a bytearray of what the server sent and no reply has consumed yet) and
  ``_read_response_from_buffer()`` (parses one complete reply off its front, or returns
  None; raises ``SMTPResponseException`` for a malformed or too long line): the stock
  ``data_received`` parses only while a read is pending and drops replies that arrive
  before it, which loses replies to pipelined commands (RFC 2920); here every complete
  reply is queued as it arrives.  ``MAX_RESPONSE_LENGTH`` bounds what waits in the buffer.
  The buffer is also emptied before a TLS handshake (RFC 3207 section 4.2: plaintext that
  arrived behind the 220 may be an attacker's, and must never be read as TLS data).
- ``_drain_helper()`` (FlowControlMixin): waits while the transport's buffer is full, so a
  big message goes out at the pace the server reads it.
- ``_loop``: the event loop the protocol was made for.
- ``_over_ssl``: set after the STARTTLS upgrade, as ``SMTPProtocol.start_tls`` does (whose
  command lock and reply handling relay does not use).
- ``SMTPResponse`` (``code``, ``message``: lines joined by newlines, codes stripped),
  ``SMTPServerDisconnected``, ``SMTPResponseException`` (``message``), and the public
  ``aiosmtplib.esmtp.parse_esmtp_extensions`` and ``aiosmtplib.auth`` encoders.

Never: decides anything about the mail, logs, or keeps state beyond one connection.  A
crash here ends that one connection; nothing is on disk.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from dataclasses import dataclass
from typing import cast

from aiosmtplib.auth import auth_login_encode, auth_plain_encode
from aiosmtplib.errors import SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.esmtp import parse_esmtp_extensions
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, SMTPProtocol

__all__ = (
    "Connection",
    "Disconnected",
    "EngineError",
    "MalformedReply",
    "Reply",
    "ReplyTimeout",
    "auth_login",
    "auth_plain",
    "connect",
    "parse_ehlo",
)


class EngineError(Exception):
    """What went wrong on the wire; relay.delivery turns each into a reason text.

    ::

        EngineError
         +-- Disconnected     (also ConnectionError) the server closed or reset
         +-- ReplyTimeout     (also TimeoutError) no complete reply in time
         +-- MalformedReply   a line that is not a reply, or a reply too long
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Disconnected(EngineError, ConnectionError):
    pass


class ReplyTimeout(EngineError, TimeoutError):
    pass


class MalformedReply(EngineError):
    pass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: the code, and the text of its lines (codes stripped) joined by
    newlines."""

    code: int
    message: str


class Connection(SMTPProtocol):
    """aiosmtplib's protocol, keeping every reply in arrival order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._replies: collections.deque[Reply] = collections.deque()
        self._failure: EngineError | None = None
        self._wakeup: asyncio.Future[None] | None = None

    # -- asyncio's callbacks --

    def data_received(self, data: bytes) -> None:
        if self._failure is not None:
            return
        self._buffer.extend(data)
        try:
            while (response := self._read_response_from_buffer()) is not None:
                self._replies.append(Reply(response.code, response.message))
        except SMTPResponseException as exc:
            self._failure = MalformedReply(exc.message)
        else:
            if len(self._buffer) > MAX_RESPONSE_LENGTH:
                self._failure = MalformedReply("Response too long")
        self._wake()

    def eof_received(self) -> bool:
        if self._failure is None:
            self._failure = Disconnected("Unexpected EOF received")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._failure is None:
            self._failure = Disconnected("Connection lost")
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # -- what relay.delivery uses --

    @property
    def has_unread_replies(self) -> bool:
        return bool(self._replies)

    def take_unread_reply(self) -> Reply | None:
        return self._replies.popleft() if self._replies else None

    def send(self, data: bytes) -> None:
        """Write ``data``; Disconnected when the connection is gone."""
        try:
            self.write(data)
        except SMTPServerDisconnected as exc:
            raise Disconnected(str(exc)) from None

    async def read_reply(self, timeout: float | None = None) -> Reply:
        """The next reply in arrival order (ReplyTimeout, Disconnected, MalformedReply)."""
        loop = self._loop
        deadline = None if timeout is None else loop.time() + timeout
        while not self._replies:
            if self._failure is not None:
                raise self._failure
            waiter: asyncio.Future[None] = loop.create_future()
            self._wakeup = waiter
            try:
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise ReplyTimeout("Timed out waiting for server response") from None
            finally:
                self._wakeup = None
        return self._replies.popleft()

    async def drain(self) -> None:
        """Wait while the server is slow to read (ConnectionError when it is gone)."""
        await self._drain_helper()

    async def upgrade_to_tls(
        self, context: ssl.SSLContext, server_hostname: str | None, timeout: float
    ) -> None:
        """The TLS handshake after the server's 220 to STARTTLS; OSError when it fails."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise Disconnected("Connection lost")
        # RFC 3207 4.2: bytes that arrived after the 220 and before the handshake are
        # plaintext a man in the middle may have injected; never read them as TLS data.
        del self._buffer[:]
        self._replies.clear()
        tls_transport = await self._loop.start_tls(
            cast(asyncio.WriteTransport, transport),
            self,
            context,
            server_side=False,
            server_hostname=server_hostname,
            ssl_handshake_timeout=timeout,
        )
        if tls_transport is None:
            raise Disconnected("Connection lost")
        self.transport = tls_transport
        self._over_ssl = True

    @property
    def local_address(self) -> str:
        """This end's IP address (RFC 8460's sending-mta-ip)."""
        transport = self.transport
        name = transport.get_extra_info("sockname") if transport is not None else None
        return str(name[0]) if name else ""

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session's SSLObject (certificate, cipher, version), once upgraded."""
        transport = self.transport
        if transport is None:
            return None
        found = transport.get_extra_info("ssl_object")
        return found if isinstance(found, ssl.SSLObject) else None

    def abort(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            cast(asyncio.Transport, transport).abort()

    def close(self) -> None:
        """Close after what was written has gone out."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()


async def connect(address: str, port: int) -> Connection:
    """A TCP connection to ``address``:``port`` (OSError when it cannot be made)."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: Connection(loop), address, port)
    return protocol


def parse_ehlo(message: str) -> tuple[dict[str, str], list[str]]:
    """An EHLO reply's text -> ({keyword (lower case): parameters}, [AUTH mechanisms])."""
    return parse_esmtp_extensions(message)


def auth_plain(user: str, password: str) -> bytes:
    """The RFC 4616 PLAIN initial response, base64-encoded."""
    return auth_plain_encode(user, password)


def auth_login(user: str, password: str) -> tuple[bytes, bytes]:
    """The LOGIN mechanism's two responses (user name, password), base64-encoded."""
    return auth_login_encode(user, password)
