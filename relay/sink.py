"""``relay sink``'s engine: an SMTP server that accepts mail into a Maildir, or meets it with
the faults a script (relay.faults) chooses, like Postfix's smtp-sink but scriptable.

It owns the server side of one SMTP dialogue per connection (RFC 5321: EHLO/HELO, MAIL,
RCPT, DATA, RSET, NOOP, VRFY, QUIT; PIPELINING, SIZE, 8BITMIME, SMTPUTF8 and
ENHANCEDSTATUSCODES offered), the faults at each stage, and the storing of each accepted
message, one file per recipient, through relay.maildir (Return-Path, X-Original-To and
Delivered-To added as Postfix's local delivery adds them).  Written on asyncio streams
rather than aiosmtpd because its faults live between the bytes: a drop in the middle of
the content, nothing after the final dot.

It talks to whoever connects (it binds where told, by default 127.0.0.1); it never relays,
never looks anything up, and keeps only counters and a bounded transcript in memory.  A
crash loses the sessions in progress; what it had accepted is in the Maildir already,
made durable before its 250.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from relay import maildir
from relay.faults import Action, Context, Decision, Faults, Reply, Script, Stage

log = logging.getLogger("relay.sink")

SIZE_LIMIT = 52_428_800
LINE_LIMIT = 1 << 20  # a command or content line longer than this ends the session
COMMAND_TIMEOUT = 300.0  # RFC 5321 4.5.3.2.7: the server's timeout is at least 5 minutes
SILENCE_LIMIT = 3600.0  # how long "silence" holds a connection the client does not close
TRANSCRIPT_LINES = 2000
_ADDRESS = re.compile(r"\s*<([^<>]*)>(.*)\Z|\s*([^\s<>]+)(.*)\Z")


@dataclass(frozen=True, slots=True)
class Accepted:
    """A message the sink said 250 to (or kept under silence)."""

    queue_id: str
    connection: int
    message: int
    sender: str
    recipients: tuple[str, ...]
    size: int
    maildir_ids: tuple[str, ...]


@dataclass
class _Session:
    ctx: Context
    helo: str = ""
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)


class _Closed(Exception):
    """The session is over (dropped, silenced, 421, or the client went away)."""


def _address(argument: str) -> tuple[str, str] | None:
    """The address in ``<addr> PARAMS`` (brackets optional), and the rest."""
    m = _ADDRESS.match(argument)
    if m is None:
        return None
    if m.group(1) is not None:
        return m.group(1), m.group(2).strip()
    return m.group(3), m.group(4).strip()


class Sink:
    """The server; ``start()`` binds ``host:port`` (port 0: any free one)."""

    def __init__(self, script: Script | None = None, maildir_path: str | None = None, *,
                 host: str = "127.0.0.1", port: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.faults = Faults(script or Script(), clock)
        self.maildir = maildir_path
        self.host = host
        self.port = port
        self.accepted: list[Accepted] = []
        self.transcript: deque[str] = deque(maxlen=TRANSCRIPT_LINES)
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()  # accepted/transcript are read from other threads

    @property
    def script(self) -> Script:
        return self.faults.script

    @script.setter
    def script(self, script: Script) -> None:
        self.faults.script = script

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, self.host, self.port,
                                                  limit=LINE_LIMIT, reuse_address=True)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("listening on %s", self.address)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    def _note(self, text: str) -> None:
        with self._lock:
            self.transcript.append(text)
        log.info("%s", text)

    # ---- one session ------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        peer = writer.get_extra_info("peername") or ("?", 0)
        number = self.faults.new_connection()
        session = _Session(Context(client=str(peer[0]), connection=number))
        self._note(f"connection {number} from {peer[0]}")
        try:
            await self._converse(session, reader, writer)
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except (asyncio.LimitOverrunError, ValueError):
            # readline() says ValueError when a line outgrows LINE_LIMIT.
            with contextlib.suppress(ConnectionError):
                writer.write(b"500 5.5.0 Error: line too long\r\n")
        except asyncio.CancelledError:
            pass
        finally:
            self._sessions.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._note(f"connection {number} closed")

    def _values(self, session: _Session, rcpt: str = "") -> dict[str, str]:
        ctx = session.ctx
        return {"client": ctx.client, "sender": session.sender or "", "rcpt": rcpt,
                "domain": rcpt.rpartition("@")[2], "hostname": self.script.hostname,
                "message": str(ctx.message), "queue_id": self._queue_id(ctx)}

    @staticmethod
    def _queue_id(ctx: Context) -> str:
        return f"SINK{ctx.connection:04d}M{ctx.message:05d}"

    async def _say(self, writer: asyncio.StreamWriter, reply: Reply,
                   values: dict[str, str]) -> None:
        writer.write(reply.render(values))
        await writer.drain()

    async def _act(self, stage: Stage, session: _Session, writer: asyncio.StreamWriter,
                   reader: asyncio.StreamReader, default: Reply, rcpt: str = "") -> bool:
        """Answer at ``stage``: the script's decision or ``default``.  True if the answer
        was a success (2xx/3xx); _Closed when the session ends here."""
        ctx = replace(session.ctx, rcpt=rcpt) if stage is Stage.RCPT else session.ctx
        decision = self.faults.decide(stage, ctx)
        return await self._answer(decision, session, writer, reader, stage, default, rcpt)

    async def _converse(self, session: _Session, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        hostname = self.script.hostname
        if not await self._act(Stage.CONNECT, session, writer, reader,
                               Reply(220, (f"{hostname} ESMTP relay sink",))):
            return
        while True:
            line = await asyncio.wait_for(reader.readline(), COMMAND_TIMEOUT)
            if not line:
                raise _Closed
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            verb, _, argument = text.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO"):
                lines = (hostname,) if verb == "HELO" else (
                    hostname, "PIPELINING", f"SIZE {SIZE_LIMIT}", "8BITMIME", "SMTPUTF8",
                    "ENHANCEDSTATUSCODES")
                if await self._act(Stage.HELO, session, writer, reader, Reply(250, lines)):
                    session.helo = argument.strip()
                    self._reset(session)
            elif verb == "MAIL":
                await self._mail(session, argument, writer, reader)
            elif verb == "RCPT":
                await self._rcpt(session, argument, writer, reader)
            elif verb == "DATA":
                await self._data(session, reader, writer)
            elif verb == "RSET":
                self._reset(session)
                await self._say(writer, Reply(250, ("2.0.0 Ok",)), {})
            elif verb == "NOOP":
                await self._say(writer, Reply(250, ("2.0.0 Ok",)), {})
            elif verb == "VRFY":
                await self._say(writer, Reply(252, ("2.0.0 Send mail, I'll try my best",)), {})
            elif verb == "QUIT":
                await self._say(writer, Reply(221, ("2.0.0 Bye",)), {})
                raise _Closed
            else:
                await self._say(writer, Reply(502, ("5.5.2 Error: command not recognized",)),
                                {})

    def _reset(self, session: _Session) -> None:
        session.sender = None
        session.recipients = []
        session.ctx = replace(session.ctx, sender=None, recipients=())

    async def _mail(self, session: _Session, argument: str, writer: asyncio.StreamWriter,
                    reader: asyncio.StreamReader) -> None:
        if session.sender is not None:
            await self._say(writer, Reply(503, ("5.5.1 Error: nested MAIL command",)), {})
            return
        parsed = _address(argument[5:] if argument.upper().startswith("FROM:") else "")
        if parsed is None:
            await self._say(writer, Reply(501, ("5.5.4 Syntax: MAIL FROM:<address>",)), {})
            return
        sender = parsed[0]
        number = self.faults.new_message()
        session.ctx = replace(session.ctx, message=number, sender=sender, recipients=())
        session.sender = sender
        if not await self._act(Stage.MAIL, session, writer, reader,
                               Reply(250, ("2.1.0 Ok",))):
            self._reset(session)

    async def _rcpt(self, session: _Session, argument: str, writer: asyncio.StreamWriter,
                    reader: asyncio.StreamReader) -> None:
        if session.sender is None:
            await self._say(writer, Reply(503, ("5.5.1 Error: need MAIL command",)), {})
            return
        parsed = _address(argument[3:] if argument.upper().startswith("TO:") else "")
        if parsed is None or not parsed[0]:
            await self._say(writer, Reply(501, ("5.5.4 Syntax: RCPT TO:<address>",)), {})
            return
        rcpt = parsed[0]
        if await self._act(Stage.RCPT, session, writer, reader, Reply(250, ("2.1.5 Ok",)),
                           rcpt=rcpt):
            session.recipients.append(rcpt)
            session.ctx = replace(session.ctx, recipients=tuple(session.recipients))

    async def _data(self, session: _Session, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        if session.sender is None:
            await self._say(writer, Reply(503, ("5.5.1 Error: need RCPT command",)), {})
            return
        if not session.recipients:
            await self._say(writer, Reply(554, ("5.5.1 Error: no valid recipients",)), {})
            return
        ctx = session.ctx
        decision = self.faults.decide(Stage.DATA, ctx)
        if decision is not None and decision.action is Action.DROP:
            # A drop in mid-DATA: take the start of the content, then hang up.
            await self._say(writer, Reply(354, ("End data with <CR><LF>.<CR><LF>",)), {})
            if decision.delay:
                await asyncio.sleep(decision.delay)
            with contextlib.suppress(asyncio.IncompleteReadError):
                await asyncio.wait_for(reader.readexactly(decision.after_bytes),
                                       COMMAND_TIMEOUT)
            self._note(f"connection {ctx.connection}: drop in mid-DATA after "
                       f"{decision.after_bytes} bytes")
            raise _Closed
        if not await self._answer(decision, session, writer, reader, Stage.DATA,
                                  Reply(354, ("End data with <CR><LF>.<CR><LF>",))):
            self._reset(session)
            return
        content = await _read_content(reader)
        end = self.faults.decide(Stage.DATA_END, session.ctx)
        if end is not None and end.action is Action.SILENCE:
            if end.keep:
                await self._store(session, content)
            self._note(f"connection {ctx.connection}: silence after the final dot")
            await _until_closed(reader)
            raise _Closed
        if len(content) > SIZE_LIMIT:
            await self._say(writer, Reply(552, ("5.3.4 Error: message file too big",)), {})
            self._reset(session)
            return
        ok_reply = Reply(250, (f"2.0.0 Ok: queued as {self._queue_id(ctx)}",))
        will_accept = end is None or end.action is Action.ACCEPT or (
            end.reply is not None and end.reply.code < 400)
        if will_accept:
            # Durable before the 250, as any MTA's promise.
            await self._store(session, content)
        await self._answer(end, session, writer, reader, Stage.DATA_END, ok_reply)
        self._reset(session)

    async def _answer(self, decision: Decision | None, session: _Session,
                      writer: asyncio.StreamWriter, reader: asyncio.StreamReader,
                      stage: Stage, default: Reply, rcpt: str = "") -> bool:
        """Carry out a decision (None: answer ``default``); see _act()."""
        number = session.ctx.connection
        delay = self.script.delay + (decision.delay if decision else 0.0)
        if delay:
            await asyncio.sleep(delay)
        if decision is not None and decision.action is Action.DROP:
            self._note(f"connection {number}: drop at {stage}")
            raise _Closed
        if decision is not None and decision.action is Action.SILENCE:
            self._note(f"connection {number}: silence at {stage}")
            await _until_closed(reader)
            raise _Closed
        values = self._values(session, rcpt)
        reply = default
        if decision is not None and decision.reply is not None \
                and decision.action is not Action.ACCEPT:
            reply = decision.reply
            self._note(f"connection {number}: {stage}: "
                       f"{reply.render(values).decode().splitlines()[0]}")
        await self._say(writer, reply, values)
        if reply.closes or (stage is Stage.CONNECT and reply.code >= 400):
            raise _Closed
        return reply.code < 400

    async def _store(self, session: _Session, content: bytes) -> None:
        ctx = session.ctx
        sender = session.sender or ""
        ids: list[str] = []
        if self.maildir is not None:
            path = self.maildir
            for rcpt in session.recipients:
                ids.append(await asyncio.to_thread(maildir.deliver, path, content,
                                                   sender=sender, recipient=rcpt))
        record = Accepted(self._queue_id(ctx), ctx.connection, ctx.message, sender,
                          tuple(session.recipients), len(content), tuple(ids))
        with self._lock:
            self.accepted.append(record)
        self.faults.accepted()
        self._note(f"connection {ctx.connection}: message {ctx.message} from=<{sender}> "
                   f"to=<{'>,<'.join(session.recipients)}> size={len(content)} "
                   f"accepted as {record.queue_id}")


async def _read_content(reader: asyncio.StreamReader) -> bytes:
    """The message up to the final dot, dot-unstuffed, lines ending in CR LF."""
    lines: list[bytes] = []
    while True:
        line = await asyncio.wait_for(reader.readline(), COMMAND_TIMEOUT)
        if not line:
            raise _Closed
        if line in (b".\r\n", b".\n"):
            return b"".join(lines)
        if line.startswith(b"."):
            line = line[1:]
        lines.append(line)


async def _until_closed(reader: asyncio.StreamReader) -> None:
    """Read and drop whatever comes until the client closes (or SILENCE_LIMIT)."""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(SILENCE_LIMIT):
            while await reader.read(65536):
                pass


def write_ready_file(path: str, address: str) -> None:
    """``relay sink --ready-file``: the address it listens on, written whole (a temporary
    name, then rename) for whoever waits for it."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "smtpd": [address]}, f)
        f.write("\n")
    os.replace(tmp, path)


class ThreadedSink:
    """A Sink on its own event loop in a daemon thread: for a test that drives another
    process (the pytest plugin's next hop).  ``script`` may be replaced while it runs."""

    def __init__(self, script: Script | None = None, maildir_path: str | None = None, *,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.sink = Sink(script, maildir_path, host=host, port=port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> ThreadedSink:
        self._thread = threading.Thread(target=self._run, name="relay-sink", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.sink.start())
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self.sink.stop())
        loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def host(self) -> str:
        return self.sink.host

    @property
    def port(self) -> int:
        return self.sink.port

    def set_script(self, script: Script) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(setattr, self.sink, "script", script)

    @property
    def accepted(self) -> list[Accepted]:
        with self.sink._lock:
            return list(self.sink.accepted)

    @property
    def transcript(self) -> list[str]:
        with self.sink._lock:
            return list(self.sink.transcript)

