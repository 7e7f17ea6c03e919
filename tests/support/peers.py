"""Scripted SMTP peers for tests: real servers on loopback that record what they receive.

Owns: a small SMTP server written on a raw asyncio Protocol (not aiosmtpd, so that faults
are easy to script and nothing is "helpfully" normalised), the script that decides every
reply (greeting, EHLO keywords, STARTTLS, AUTH, MAIL, each RCPT, DATA, the final reply)
and the faults (drop or hang at any stage, drop or stall in the middle of the message
body, a failed TLS handshake), and the records: sessions with every command line and the
raw bytes the client sent, and messages with the exact content after dot-unstuffing.

Never: talks to anything but loopback; keeps state between peers.

`Peer` runs inside the test's event loop (`async with Peer(...) as peer`); `ThreadedPeer`
runs one in a thread of its own, for tests that drive the daemon as a subprocess. Records
are guarded by a lock, so either may be read from any thread. A crash of a conversation is
logged and only ends that connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, cast

import pytest

__all__ = (
    "CommandRecord",
    "Fault",
    "Peer",
    "PeerScript",
    "PeerTLS",
    "ReceivedMessage",
    "Reply",
    "SessionRecord",
    "ThreadedPeer",
    "make_peer_tls",
    "threaded_peer",
)

log = logging.getLogger(__name__)

# A TLS alert record: fatal handshake_failure (RFC 8446 section 6), sent instead of a
# ServerHello to make the client's handshake fail the way a real mismatch does.
_TLS_HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"


class Fault(enum.Enum):
    HANG = "hang"  # send nothing; keep the connection open until the client goes away
    DROP = "drop"  # close the connection instead of replying


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply; a text with newlines becomes a multi-line reply.

    `{hostname}` and `{queue_id}` in the text are filled in when the reply is sent.
    """

    code: int
    text: str = ""

    def render(self, **values: str) -> bytes:
        text = self.text
        for name, value in values.items():
            text = text.replace("{" + name + "}", value)
        lines = text.split("\n")
        rendered = []
        for number, line in enumerate(lines):
            separator = " " if number == len(lines) - 1 else "-"
            rendered.append(f"{self.code}{separator}{line}".rstrip(" ") + "\r\n")
        return "".join(rendered).encode("utf-8")


Stage = Reply | Fault


@dataclass(frozen=True, slots=True)
class PeerScript:
    """What the peer says at each stage. The defaults make a plain, happy Postfix-like MX."""

    hostname: str = "peer.test"
    greeting: Stage = Reply(220, "{hostname} ESMTP test peer")
    ehlo: Stage | None = None  # None: 250 with the keywords chosen below
    helo: Stage = Reply(250, "{hostname}")
    pipelining: bool = True
    size: int | None = 10240000  # SIZE keyword and its limit; None: not offered
    eightbitmime: bool = True
    smtputf8: bool = False
    dsn: bool = False  # offer DSN (RFC 3461)
    enhancedstatuscodes: bool = True
    starttls: bool = False  # offer STARTTLS (the Peer needs a tls_context)
    starttls_reply: Stage = Reply(220, "2.0.0 Ready to start TLS")
    tls_handshake_fault: bool = False  # answer the ClientHello with a fatal alert
    auth_mechanisms: tuple[str, ...] = ()  # e.g. ("PLAIN", "LOGIN"); () = no AUTH
    auth_requires_tls: bool = False
    credentials: tuple[str, str] | None = None  # the only (user, password) accepted
    mail: Stage = Reply(250, "2.1.0 Ok")
    mail_reply_delay: float = 0.0  # hold the MAIL reply, so pipelined commands pile up
    rcpt: Stage = Reply(250, "2.1.5 Ok")
    rcpt_by_address: Mapping[str, Stage] = field(default_factory=dict)
    rcpt_by_position: Mapping[int, Stage] = field(default_factory=dict)  # 0-based, per MAIL
    data: Stage = Reply(354, "End data with <CR><LF>.<CR><LF>")
    drop_in_body_after: int | None = None  # reset the connection after this many body bytes
    # With drop_in_body_after: instead of a reset, send this reply and half-close, as a
    # server does that refuses a message while it is still coming (552 too big, say).
    early_reply_in_body: Reply | None = None
    hang_in_body_after: int | None = None  # stop reading after this many body bytes
    final: Stage = Reply(250, "2.0.0 Ok: queued as {queue_id}")
    close_after_final: bool = False  # hang up right after the final reply
    rset: Stage = Reply(250, "2.0.0 Ok")
    quit: Reply = Reply(221, "2.0.0 Bye")

    def ehlo_reply(self, tls_active: bool) -> Reply:
        keywords = [self.hostname]
        if self.pipelining:
            keywords.append("PIPELINING")
        if self.size is not None:
            keywords.append(f"SIZE {self.size}" if self.size else "SIZE")
        if self.starttls and not tls_active:
            keywords.append("STARTTLS")
        if self.auth_mechanisms and (tls_active or not self.auth_requires_tls):
            keywords.append("AUTH " + " ".join(self.auth_mechanisms))
        if self.enhancedstatuscodes:
            keywords.append("ENHANCEDSTATUSCODES")
        if self.eightbitmime:
            keywords.append("8BITMIME")
        if self.smtputf8:
            keywords.append("SMTPUTF8")
        if self.dsn:
            keywords.append("DSN")
        return Reply(250, "\n".join(keywords))


@dataclass(frozen=True, slots=True)
class CommandRecord:
    line: str  # as received, without CRLF (AUTH responses included)
    # Complete lines already waiting behind this one when the peer answered it: above zero
    # only when the client sent the next command before it had this reply (pipelining).
    queued_behind: int


@dataclass(frozen=True, slots=True)
class SessionRecord:
    number: int  # 1 for the first connection
    client: tuple[str, int]
    commands: tuple[CommandRecord, ...]
    raw: bytes  # every byte the client sent, decrypted after STARTTLS
    helo: str | None
    tls: bool
    auth_user: str | None
    quit: bool  # the client said QUIT
    closed: bool

    def verbs(self) -> list[str]:
        return [command.line.split(" ", 1)[0].upper() for command in self.commands]


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    session: int
    sender: str  # "" for the null sender
    mail_params: tuple[str, ...]
    recipients: tuple[str, ...]  # the accepted ones, in order
    data: bytes  # exactly what the client meant: dot-unstuffed, without the final ".\r\n"
    raw_data: bytes  # as it came over the wire, final ".\r\n" included
    tls: bool
    auth_user: str | None
    final_code: int | None  # the reply given after the dot; None if the peer hung or dropped
    queue_id: str

    @property
    def accepted(self) -> bool:
        return self.final_code is not None and self.final_code // 100 == 2


@dataclass(slots=True)
class _SessionState:
    number: int
    client: tuple[str, int]
    commands: list[CommandRecord] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    helo: str | None = None
    tls: bool = False
    auth_user: str | None = None
    quit: bool = False
    closed: bool = False

    def snapshot(self) -> SessionRecord:
        return SessionRecord(
            self.number,
            self.client,
            tuple(self.commands),
            bytes(self.raw),
            self.helo,
            self.tls,
            self.auth_user,
            self.quit,
            self.closed,
        )


class _Records:
    """Everything a peer saw, behind one lock shared by the loop and test threads."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.sessions: list[_SessionState] = []
        self.messages: list[ReceivedMessage] = []
        self.transactions = 0


def _address(argument: str) -> tuple[str, tuple[str, ...]]:
    """'FROM:<a@b> SIZE=1' -> ('a@b', ('SIZE=1',)) (the 'FROM:'/'TO:' part already gone)."""
    argument = argument.strip()
    if argument.startswith("<"):
        end = argument.find(">")
        if end < 0:
            return argument[1:], ()
        return argument[1:end], tuple(argument[end + 1 :].split())
    address, *params = argument.split()
    return address, tuple(params)


class _Conversation(asyncio.Protocol):
    """One SMTP session on the server side."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.changed = asyncio.Event()
        self.closed = False
        self.eof = False
        self.task: asyncio.Task[None] | None = None
        self.state: _SessionState | None = None
        self.script = PeerScript()
        self.tls = False
        self.auth_user: str | None = None
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self.sender: str | None = None
        self.mail_params: tuple[str, ...] = ()
        self.recipients: list[str] = []
        self.rcpt_count = 0

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        self.state, self.script = self.peer._opened(self, (peername[0], peername[1]))
        self.task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        with self.peer._records.changed:
            assert self.state is not None
            self.state.raw += data
        self.changed.set()

    def eof_received(self) -> bool | None:
        self.eof = True
        self.changed.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.changed.set()
        self.peer._closed(self)

    # -- reading and writing --

    async def _line(self) -> bytes | None:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line
            if self.closed or self.eof:
                return None
            self.changed.clear()
            await self.changed.wait()

    async def _until_closed(self) -> None:
        while not self.closed:
            self.buffer.clear()
            self.changed.clear()
            await self.changed.wait()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _answer(self, stage: Stage, line: str | None, queue_id: str = "") -> bool:
        """Record the command, then reply or misbehave; False ends the conversation."""
        if line is not None:
            with self.peer._records.changed:
                assert self.state is not None
                self.state.commands.append(CommandRecord(line, self.buffer.count(b"\n")))
        if stage is Fault.HANG:
            await self._until_closed()
            return False
        if stage is Fault.DROP:
            self._close()
            return False
        assert isinstance(stage, Reply)
        self._write(stage.render(hostname=self.script.hostname, queue_id=queue_id))
        return True

    # -- the conversation --

    async def _run(self) -> None:
        try:
            await self._converse()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("test peer conversation failed")
            if self.transport is not None:
                self.transport.abort()
        finally:
            self._close()

    async def _converse(self) -> None:
        if not await self._answer(self.script.greeting, None):
            return
        handlers = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "STARTTLS": self._starttls,
            "AUTH": self._auth,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
            "QUIT": self._quit,
        }
        while True:
            raw = await self._line()
            if raw is None:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            verb, _, argument = line.partition(" ")
            handler = handlers.get(verb.upper())
            if handler is None:
                going = await self._answer(Reply(502, "5.5.2 Error: command not recognized"), line)
            else:
                going = await handler(line, argument)
            if not going:
                return

    async def _ehlo(self, line: str, argument: str) -> bool:
        self._set_helo(argument)
        stage = (
            self.script.ehlo if self.script.ehlo is not None else self.script.ehlo_reply(self.tls)
        )
        return await self._answer(stage, line)

    async def _helo(self, line: str, argument: str) -> bool:
        self._set_helo(argument)
        return await self._answer(self.script.helo, line)

    def _set_helo(self, name: str) -> None:
        self._reset_transaction()
        with self.peer._records.changed:
            assert self.state is not None
            self.state.helo = name.strip()

    async def _starttls(self, line: str, argument: str) -> bool:
        context = self.peer.tls_context
        if not self.script.starttls or context is None:
            return await self._answer(Reply(502, "5.5.1 Error: command not implemented"), line)
        if self.tls:
            return await self._answer(Reply(554, "5.5.1 Error: TLS already active"), line)
        stage = self.script.starttls_reply
        if not await self._answer(stage, line):
            return False
        assert isinstance(stage, Reply)
        if stage.code != 220:
            return True
        if self.script.tls_handshake_fault:
            self._write(_TLS_HANDSHAKE_FAILURE_ALERT)
            self._close()
            return False
        # Whatever came before the handshake is plaintext injection (RFC 3207 4.2).
        self.buffer.clear()
        assert self.transport is not None
        try:
            transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, context, server_side=True, ssl_handshake_timeout=10.0
            )
        except (OSError, ConnectionError) as exc:
            log.info("test peer: TLS handshake failed: %s", exc)
            return False
        self.transport = cast(asyncio.Transport, transport)
        self.tls = True
        self.auth_user = None
        self._reset_transaction()
        with self.peer._records.changed:
            assert self.state is not None
            self.state.tls = True
            self.state.helo = None
        return True

    async def _auth(self, line: str, argument: str) -> bool:
        script = self.script
        if not script.auth_mechanisms or (script.auth_requires_tls and not self.tls):
            return await self._answer(Reply(503, "5.5.1 Error: authentication not enabled"), line)
        if self.auth_user is not None:
            return await self._answer(Reply(503, "5.5.1 Error: already authenticated"), line)
        mechanism, _, initial = argument.strip().partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in {m.upper() for m in script.auth_mechanisms}:
            return await self._answer(
                Reply(504, "5.5.4 Unsupported authentication mechanism"), line
            )
        user: str | None
        password: str | None
        try:
            if mechanism == "PLAIN":
                if not initial:
                    if not await self._answer(Reply(334, ""), line):
                        return False
                    answer = await self._response_line()
                    if answer is None:
                        return False
                    line = initial = answer
                parts = base64.b64decode(initial, validate=True).split(b"\0")
                if len(parts) != 3:
                    raise ValueError("bad PLAIN response")
                user, password = parts[1].decode(), parts[2].decode()
            elif mechanism == "LOGIN":
                if initial:
                    user = base64.b64decode(initial, validate=True).decode()
                else:
                    if not await self._answer(Reply(334, "VXNlcm5hbWU6"), line):
                        return False
                    answer = await self._response_line()
                    if answer is None:
                        return False
                    line = answer
                    user = base64.b64decode(answer, validate=True).decode()
                if not await self._answer(Reply(334, "UGFzc3dvcmQ6"), line):
                    return False
                answer = await self._response_line()
                if answer is None:
                    return False
                line = answer
                password = base64.b64decode(answer, validate=True).decode()
            else:
                return await self._answer(Reply(504, "5.5.4 Unsupported mechanism"), line)
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return await self._answer(Reply(501, "5.5.2 Error: malformed AUTH response"), line)
        if script.credentials is not None and (user, password) == script.credentials:
            self.auth_user = user
            with self.peer._records.changed:
                assert self.state is not None
                self.state.auth_user = user
            return await self._answer(Reply(235, "2.7.0 Authentication successful"), line)
        return await self._answer(
            Reply(535, "5.7.8 Error: authentication failed: authentication failure"), line
        )

    async def _response_line(self) -> str | None:
        raw = await self._line()
        return None if raw is None else raw.rstrip(b"\r\n").decode("ascii", "replace")

    async def _mail(self, line: str, argument: str) -> bool:
        with self.peer._records.changed:
            self.peer._records.transactions += 1
        if self.sender is not None:
            return await self._answer(Reply(503, "5.5.1 Error: nested MAIL command"), line)
        if not argument.upper().startswith("FROM:"):
            return await self._answer(Reply(501, "5.5.4 Syntax: MAIL FROM:<address>"), line)
        sender, params = _address(argument[5:])
        if self.script.mail_reply_delay:
            await asyncio.sleep(self.script.mail_reply_delay)
        stage = self.script.mail
        if not await self._answer(stage, line):
            return False
        if isinstance(stage, Reply) and stage.code // 100 == 2:
            self.sender, self.mail_params = sender, params
        return True

    async def _rcpt(self, line: str, argument: str) -> bool:
        if self.sender is None:
            return await self._answer(Reply(503, "5.5.1 Error: need MAIL command"), line)
        if not argument.upper().startswith("TO:"):
            return await self._answer(Reply(501, "5.5.4 Syntax: RCPT TO:<address>"), line)
        recipient, _ = _address(argument[3:])
        position = self.rcpt_count
        self.rcpt_count += 1
        script = self.script
        stage = script.rcpt_by_address.get(
            recipient, script.rcpt_by_position.get(position, script.rcpt)
        )
        if not await self._answer(stage, line):
            return False
        if isinstance(stage, Reply) and stage.code // 100 == 2:
            self.recipients.append(recipient)
        return True

    async def _data(self, line: str, argument: str) -> bool:
        if self.sender is None:
            return await self._answer(Reply(503, "5.5.1 Error: need MAIL command"), line)
        if not self.recipients:
            return await self._answer(Reply(554, "5.5.1 Error: no valid recipients"), line)
        stage = self.script.data
        if not await self._answer(stage, line):
            return False
        assert isinstance(stage, Reply)
        if stage.code != 354:
            self._reset_transaction()
            return True
        body = await self._body()
        if body is None:
            return False
        raw, content = body
        queue_id = self.peer._next_queue_id()
        final = self.script.final
        message = ReceivedMessage(
            session=self.state.number if self.state else 0,
            sender=self.sender,
            mail_params=self.mail_params,
            recipients=tuple(self.recipients),
            data=content,
            raw_data=raw,
            tls=self.tls,
            auth_user=self.auth_user,
            final_code=final.code if isinstance(final, Reply) else None,
            queue_id=queue_id,
        )
        with self.peer._records.changed:
            self.peer._records.messages.append(message)
            self.peer._records.changed.notify_all()
        self._reset_transaction()
        if not await self._answer(final, ".", queue_id):
            return False
        if self.script.close_after_final:
            self._close()
            return False
        return True

    async def _body(self) -> tuple[bytes, bytes] | None:
        """Read the content up to the lone dot; None when a fault or the client ended it."""
        script = self.script
        raw = bytearray()
        content = bytearray()
        while True:
            line = await self._line()
            if line is None:
                return None
            raw += line
            if line == b".\r\n":
                return bytes(raw), bytes(content)
            content += line[1:] if line.startswith(b".") else line
            if script.drop_in_body_after is not None and len(raw) >= script.drop_in_body_after:
                assert self.transport is not None
                if script.early_reply_in_body is None:
                    self.transport.abort()
                    return None
                self._write(script.early_reply_in_body.render(hostname=script.hostname))
                self.transport.write_eof()
                await self._until_closed()
                return None
            if script.hang_in_body_after is not None and len(raw) >= script.hang_in_body_after:
                assert self.transport is not None
                self.transport.pause_reading()
                await self._until_closed()
                return None

    async def _rset(self, line: str, argument: str) -> bool:
        self._reset_transaction()
        return await self._answer(self.script.rset, line)

    async def _noop(self, line: str, argument: str) -> bool:
        return await self._answer(Reply(250, "2.0.0 Ok"), line)

    async def _quit(self, line: str, argument: str) -> bool:
        with self.peer._records.changed:
            assert self.state is not None
            self.state.quit = True
        await self._answer(self.script.quit, line)
        self._close()
        return False


ScriptSource = PeerScript | Callable[[int], PeerScript]


class Peer:
    """A scripted SMTP server on a loopback address, in the running event loop.

    `script` is one PeerScript for every connection, or a function of the connection
    number (1, 2, ...) returning one, to script "fail first, then work".
    """

    def __init__(
        self,
        script: ScriptSource | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_context: ssl.SSLContext | None = None,
        receive_buffer: int | None = None,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"test peers listen on loopback only, not {host}")
        self._script: ScriptSource = script if script is not None else PeerScript()
        self._host = host
        self._port = port
        self.tls_context = tls_context
        self._receive_buffer = receive_buffer
        self._records = _Records()
        self._server: asyncio.Server | None = None
        self._live: set[_Conversation] = set()
        self._queue_ids = 0

    # -- lifecycle --

    async def start(self) -> Peer:
        family = (
            socket.AF_INET6 if ipaddress.ip_address(self._host).version == 6 else socket.AF_INET
        )
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._receive_buffer is not None:
                # Set before listen() so accepted sockets inherit it; it also turns off
                # receive-buffer autotuning, so a stalled peer stalls the client quickly.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
            sock.bind((self._host, self._port))
            sock.listen(64)
            sock.setblocking(False)
            self._port = sock.getsockname()[1]
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _Conversation(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = []
        for conversation in list(self._live):
            if conversation.transport is not None:
                conversation.transport.abort()
            if conversation.task is not None:
                conversation.task.cancel()
                tasks.append(conversation.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- where --

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    # -- what it saw (safe from any thread) --

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Messages the peer accepted (2xx after the dot)."""
        with self._records.changed:
            return [message for message in self._records.messages if message.accepted]

    @property
    def all_messages(self) -> list[ReceivedMessage]:
        """Every complete message content received, whatever the peer replied."""
        with self._records.changed:
            return list(self._records.messages)

    @property
    def sessions(self) -> list[SessionRecord]:
        with self._records.changed:
            return [state.snapshot() for state in self._records.sessions]

    @property
    def connection_count(self) -> int:
        with self._records.changed:
            return len(self._records.sessions)

    @property
    def transaction_count(self) -> int:
        """MAIL commands received, accepted or not."""
        with self._records.changed:
            return self._records.transactions

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Wait in the event loop until `count` messages were accepted."""
        await self.wait_until(lambda: len(self.messages) >= count, timeout)
        return self.messages

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the peer did not see what the test waited for")
            await asyncio.sleep(0.01)

    def wait_for_blocking(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait from another thread until `count` messages were accepted."""
        deadline = time.monotonic() + timeout
        with self._records.changed:
            while sum(1 for m in self._records.messages if m.accepted) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = sum(1 for m in self._records.messages if m.accepted)
                    raise TimeoutError(f"expected {count} messages at the peer, got {got}")
                self._records.changed.wait(remaining)
            return [message for message in self._records.messages if message.accepted]

    # -- for the conversations --

    def _opened(
        self, conversation: _Conversation, client: tuple[str, int]
    ) -> tuple[_SessionState, PeerScript]:
        self._live.add(conversation)
        with self._records.changed:
            state = _SessionState(len(self._records.sessions) + 1, client)
            self._records.sessions.append(state)
            self._records.changed.notify_all()
        script = (
            self._script if isinstance(self._script, PeerScript) else self._script(state.number)
        )
        return state, script

    def _closed(self, conversation: _Conversation) -> None:
        self._live.discard(conversation)
        with self._records.changed:
            if conversation.state is not None:
                conversation.state.closed = True
            self._records.changed.notify_all()

    def _next_queue_id(self) -> str:
        self._queue_ids += 1
        return f"{self._port:05X}{self._queue_ids:06X}"


class ThreadedPeer:
    """A Peer running in its own thread and event loop; a context manager.

    For tests that run the daemon as a subprocess and need a sink to deliver to.
    """

    def __init__(
        self,
        script: ScriptSource | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_context: ssl.SSLContext | None = None,
        receive_buffer: int | None = None,
    ) -> None:
        self.peer = Peer(
            script, host=host, port=port, tls_context=tls_context, receive_buffer=receive_buffer
        )
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._serve, name="test-smtp-peer", daemon=True)
        self._thread.start()
        if not self._ready.wait(10.0):
            raise TimeoutError("the test peer did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10.0)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._stop = asyncio.Event()
            try:
                loop.run_until_complete(self.peer.start())
            except Exception as exc:  # noqa: BLE001 - re-raised in the test thread
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.run_until_complete(self._stop.wait())
            loop.run_until_complete(self.peer.stop())
        finally:
            loop.close()

    @property
    def host(self) -> str:
        return self.peer.host

    @property
    def port(self) -> int:
        return self.peer.port

    @property
    def messages(self) -> list[ReceivedMessage]:
        return self.peer.messages

    @property
    def all_messages(self) -> list[ReceivedMessage]:
        return self.peer.all_messages

    @property
    def sessions(self) -> list[SessionRecord]:
        return self.peer.sessions

    @property
    def connection_count(self) -> int:
        return self.peer.connection_count

    @property
    def transaction_count(self) -> int:
        return self.peer.transaction_count

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        return self.peer.wait_for_blocking(count, timeout)


@dataclass(frozen=True, slots=True)
class PeerTLS:
    """A server certificate from a throwaway CA (trustme)."""

    server_context: ssl.SSLContext
    ca_pem: bytes

    def write_ca(self, path: str) -> str:
        with open(path, "wb") as handle:
            handle.write(self.ca_pem)
        return path


def make_peer_tls(*names: str) -> PeerTLS:
    import trustme  # test-only dependency; imported here so plain peers do not need it

    ca = trustme.CA()
    certificate = ca.issue_cert(*(names or ("peer.test", "localhost", "127.0.0.1")))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    return PeerTLS(context, ca.cert_pem.bytes())


@pytest.fixture
def threaded_peer() -> Iterator[Callable[..., ThreadedPeer]]:
    """Factory: `threaded_peer(PeerScript(...), host=...)` starts one; all stop at teardown."""
    started: list[ThreadedPeer] = []

    def start(script: ScriptSource | None = None, **options: object) -> ThreadedPeer:
        peer = ThreadedPeer(script, **options)  # type: ignore[arg-type]
        peer.__enter__()
        started.append(peer)
        return peer

    yield start
    for peer in reversed(started):
        peer.__exit__(None, None, None)
