"""The seam between relay's listener and aiosmtpd: the only module that imports aiosmtpd.

aiosmtpd is the listener's SMTP engine.  ``Engine`` subclasses its ``SMTP`` protocol class
and keeps what aiosmtpd does well: the asyncio protocol object with its stream reader and
writer, the connection's life (``connection_made``, ``connection_lost``) and the PROXY
protocol v1/v2 parser.  The dialogue itself (every command, every reply, every limit) is
relay's: the engine runs a relay.smtpd.session.Session in aiosmtpd's per-connection task
and serves it lines, replies, a TLS handshake and a per-read deadline (``Connection``,
defined by the session).  The STARTTLS handshake is the event loop's ``start_tls`` (uvloop's
compiled TLS layer where relay runs on uvloop), followed by what aiosmtpd does after its
own: the reader and writer move onto the TLS transport, and plaintext that arrived behind
STARTTLS is discarded, never read as TLS data (RFC 3207 §4.2).

What this module relies on, and why (tests/unit/test_engine_contract.py checks each one
against the installed aiosmtpd, naming the member when an upgrade changes it):

- ``SMTP.connection_made`` and ``SMTP.connection_lost``: the connection's life, called by
  asyncio; connection_made starts ``_handle_client`` as the session's task.  They read
  and set ``loop``, ``session``, ``envelope``, ``transport``,
  ``_handler_coroutine``, ``_timeout_handle``, ``_tls_protocol``, ``_original_transport``,
  ``_tls_handshake_okay`` and ``_handle_hooks``, and call ``_create_session``,
  ``_set_rset_state``, ``_reset_timeout`` and ``_cb_client_connected`` (which sets
  ``_reader``/``_writer``).  ``Engine.__init__`` sets exactly these instead of calling
  ``SMTP.__init__``, which inspects the handler and the class (``inspect.getmembers``,
  ``dir``) for every connection: a third of the listener's CPU per connection in the
  profile that found it (one connection per message), for nothing relay uses.
- ``_handle_client``: overridden; it is where aiosmtpd runs a session.
- ``_reset_timeout`` and ``_timeout_cb``: overridden; smtpd_timeout is a per-read deadline
  that a line only moves, with one timer per connection.
- ``_reader._buffer``: what the client has sent and nobody read yet (RFC 2920 pipelining,
  pregreet); cleared to forget unread input when a session is ended; searched for the
  last whole line of a run of DATA lines, and given back what was read past the end of
  the data (``unread``).  These are asyncio's StreamReader's, which aiosmtpd's reader is.
- ``_paused``: asyncio's FlowControlMixin (a base of aiosmtpd's SMTP) sets it while the
  transport's write buffer is full; a reply waits for the client only then.
- ``_client_connected_cb``: where asyncio's StreamReaderProtocol keeps the callback it is
  given (a bound method of the engine), cleared with the engine's other cycles once a
  connection is over.
- After ``loop.start_tls``, as aiosmtpd's connection_made does after its own handshake:
  the reader's and the writer's ``_transport`` and the protocol's ``_over_ssl`` (asyncio's
  StreamReader, StreamWriter and StreamReaderProtocol) are set to the TLS transport.
  aiosmtpd's smtp_STARTTLS is not used: it sends its own 220 text and wires asyncio's
  pure-Python SSLProtocol whatever the event loop.
- ``aiosmtpd.proxy_protocol.get_proxy``: public.

A crash of the engine ends its connection only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import SMTP

from relay.smtpd.session import Connection, Session

log = logging.getLogger("relay.smtpd")

# The stream reader's limit: the longest piece of a line handed over at once (longer
# lines come in pieces), and half of what is buffered before reading pauses.
READ_LIMIT = 64 * 1024

# What Engine.__init__ sets in place of SMTP.__init__: the attributes aiosmtpd's own
# connection_made/connection_lost read (the contract test compares this with SMTP's).
AIOSMTPD_ATTRIBUTES = ("loop", "session", "envelope", "transport", "_handler_coroutine",
                       "_timeout_handle", "_timeout_duration", "_tls_protocol",
                       "_original_transport", "_tls_handshake_okay", "_handle_hooks")


class Engine(SMTP):
    """aiosmtpd's protocol object running a relay session; also its ``Connection``."""

    def __init__(self, make_session: Callable[[Connection], Session], timeout: float) -> None:
        loop = asyncio.get_event_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=READ_LIMIT, loop=loop),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.loop = loop
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._timeout_handle = None
        self._timeout_duration = timeout
        self._tls_protocol = None
        self._original_transport = None
        self._tls_handshake_okay = True
        self._handle_hooks: dict[str, Any] = {}
        self._deadline = 0.0
        self._moving = True  # input moves the deadline (not so for the PROXY header)
        self._closing = False
        self._tls = False
        self._unsent: list[bytes] = []
        self._lost = False  # connection_lost has run
        self._handshaking = False  # a STARTTLS handshake is under way
        self._ran = False  # the session's task has ended
        self.dialogue = make_session(self)

    # ---- aiosmtpd's hooks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if transport.get_extra_info("ssl_object") is not None:
            self._tls = True  # implicit TLS, or the end of a STARTTLS handshake
        super().connection_made(transport)

    async def _handle_client(self) -> None:
        try:
            await self.dialogue.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: internal error", self.dialogue.namaddr())
            self.close()
        finally:
            self._ran = True
            self._release()

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return  # ended already: by the engine after a failed handshake, or by the TLS layer
        self._closing = True
        super().connection_lost(error)
        self.dialogue.ended()
        self._lost = True
        self._release()

    def _release(self) -> None:
        """Once the connection is lost and the session's task is over, drop the references
        that make cycles of this object (its session, stream writer, task and TLS layer),
        so that reference counting frees the connection at once.  Left to the cycle
        collector, hundreds of closed TLS connections waited at a time, each holding its
        OpenSSL state and asyncio's 256 KiB TLS read buffer: about 100 MB more listener
        memory under a STARTTLS load (tests/unit/test_listener_memory.py)."""
        if not (self._lost and self._ran):
            return
        del self.dialogue
        del self._writer
        # A cancelled task keeps its CancelledError, whose traceback holds the frames
        # that hold this object.
        self._handler_coroutine = None
        self._client_connected_cb = None  # a bound method of this object, given in __init__
        self._tls_protocol = None
        self._original_transport = None

    def eof_received(self) -> bool | None:
        # The client may half-close after its last command (Exim sends the final dot and
        # QUIT, then shuts down its side): the session still reads what came before the
        # end, answers it, and closes when it reads the end.  aiosmtpd's own eof_received
        # would cancel the session at once: the client would never see its 250 and would
        # send the message again.  A TLS transport cannot stay half-open.
        asyncio.StreamReaderProtocol.eof_received(self)
        return not (self._tls or self._handshaking)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # the session is over: nothing more is read, let alone executed
        if self._moving:
            # smtpd_timeout applies to each read, DATA lines included: a slow but steady
            # client is never cut off, a silent one is.
            self._deadline = self.loop.time() + self._timeout_duration
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd re-arms a timer at every line read; here a read only moves the
        deadline, and the one timer, when it fires early, waits for the rest."""
        if duration is not None:
            self._timeout_duration = duration
        deadline = self.loop.time() + self._timeout_duration
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
        if not self._closing:
            self.dialogue.timed_out()
        self.close()

    # ---- the Connection a session uses ------------------------------------------------

    @property
    def peer_address(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if peer else ""

    @property
    def tls_active(self) -> bool:
        return self._tls

    def reply(self, text: str, *, hold: bool) -> None:
        if self._closing or self.transport is None or self._handshaking:
            return  # nothing in plaintext into a TLS handshake (a timeout's 421)
        self._unsent.append(text.encode("utf-8", "surrogateescape") + b"\r\n")
        if not hold:
            self._flush()

    def _flush(self) -> None:
        if self._unsent and not self._closing and self.transport is not None:
            self._writer.write(b"".join(self._unsent))
        self._unsent.clear()

    async def drain(self) -> None:
        """Send what is held back, and wait while the client is slow to read it."""
        self._flush()
        # Only while the transport has paused our writing (asyncio's flow control, whose
        # state this protocol object keeps itself) is there anything to wait for.
        if not self._closing and self._paused:  # type: ignore[attr-defined]
            try:
                await self._writer.drain()
            except ConnectionError:
                pass

    def pending(self) -> bytes:
        return bytes(self._reader._buffer)  # type: ignore[attr-defined]

    async def read_line(self) -> bytes | None:
        # Replies wait while more pipelined commands are already here, and go out in one
        # write before we wait for input (Postfix's smtpd flushes before it reads).
        if b"\n" not in self._reader._buffer:  # type: ignore[attr-defined]
            await self.drain()
        if self._closing:
            return None
        if self._moving:
            self._reset_timeout()
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as exc:
            return await self._reader.read(exc.consumed)
        except (ConnectionError, OSError):
            return None

    async def read_lines(self) -> bytes | None:
        """The whole lines already received, at most about READ_LIMIT bytes of them (at
        least one line, or the first piece of an over-long one, waited for); None at
        the end of the input.  One call for a run of DATA lines instead of one each."""
        buffer = self._reader._buffer  # type: ignore[attr-defined]
        end = buffer.rfind(b"\n", 0, READ_LIMIT)
        if end < 0 or self._closing:
            return await self.read_line()
        if self._moving:
            self._reset_timeout()
        # The bytes are there: readexactly() returns them at once, and lets the
        # transport read again if it had been paused for a full buffer.
        return await self._reader.readexactly(end + 1)

    def unread(self, data: bytes) -> None:
        """Give back input read past the end of the data: it is read again first."""
        if data and not self._closing:
            self._reader._buffer[0:0] = data  # type: ignore[attr-defined]

    async def read_proxy(self) -> tuple[str, str]:
        try:
            data = await get_proxy(self._reader)
            error = data.error or ("" if data.valid else "invalid header")
        except (asyncio.IncompleteReadError, ConnectionError):
            return "", "lost connection"
        except Exception as exc:  # noqa: BLE001 - a malformed header, whatever it raised
            return "", f"malformed header: {exc!r}"
        if error:
            return "", error
        # v2 LOCAL (the proxy's own health check) and v1 UNKNOWN carry no client address:
        # the proxy itself is the client then.
        if isinstance(data.src_addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return str(data.src_addr), ""
        return self.peer_address, ""

    async def start_tls(self, context: ssl.SSLContext) -> str:
        """The STARTTLS handshake on this connection; the reader and writer then use the
        TLS transport, and what the client sent before it is forgotten (RFC 3207 §4.2).
        Returns "" or, when the handshake failed, why (the error's repr).

        ``loop.start_tls`` is the event loop's own TLS layer: uvloop's, compiled, where
        relay runs on uvloop (aiosmtpd's smtp_STARTTLS wires asyncio's pure-Python
        SSLProtocol whatever the loop: about 5% more listener CPU under a STARTTLS load)."""
        self._flush()
        assert self.transport is not None
        plain = cast(asyncio.WriteTransport, self.transport)  # uvloop's is only alike
        self._handshaking = True
        failure = ""
        try:
            # The session's deadline (smtpd_timeout) ends a slow handshake, with its own
            # log line; the TLS layer's timer is only a backstop behind it.
            tls = await self.loop.start_tls(plain, self, context, server_side=True,
                                            ssl_handshake_timeout=self._timeout_duration + 5)
        except Exception as exc:  # noqa: BLE001 - whatever the handshake raised ends it
            # The handshake's future keeps the error, whose traceback holds the frames
            # that hold the future and this object: a cycle only the collector frees.
            exc.__traceback__ = None
            failure = repr(exc.__cause__ or exc)
        else:
            if tls is None or self._closing or tls.is_closing():
                # Closed under the handshake (smtpd_timeout): the TLS layer then reports
                # a handshake that ended without an error.
                failure = "connection closed during the TLS handshake"
        finally:
            self._handshaking = False
        if failure:
            # A TLS layer tells its protocol nothing of a connection lost during the
            # handshake: end it here, once the session has said why (its next step).
            self.loop.call_soon(self.connection_lost, None)
            return failure
        assert tls is not None
        # What aiosmtpd's connection_made does after its own STARTTLS handshake.
        self._reader._transport = tls  # type: ignore[attr-defined]
        self._writer._transport = tls  # type: ignore[attr-defined]
        self.transport = tls
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        self._over_ssl = True
        self._tls = True
        return ""

    def tls_cipher(self) -> tuple[str, str, int] | None:
        obj = self.transport.get_extra_info("ssl_object") if self.transport else None
        if obj is None:
            return None
        found = obj.cipher()
        if not found:
            return None
        return str(obj.version() or found[1]), str(found[0]), int(found[2] or 0)

    def deadline(self, seconds: float, *, moving: bool = True) -> None:
        self._moving = moving
        self._reset_timeout(seconds)

    def close(self) -> None:
        """Forget unread input and close; held replies go out first."""
        if self._closing:
            return
        self._flush()
        self._closing = True
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        if self.transport is not None:
            self.transport.close()
