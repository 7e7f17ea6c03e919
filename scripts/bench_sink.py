"""The sink at the far end of the benchmarks, which says when each message came, and the
messages the benchmarks' own clients send (``make_message``: tagged, of a given size).

Two kinds, both on a free loopback port, both child processes of the benchmark:

- ``python``: an asyncio SMTP server (this file run as a script) that accepts
  everything and prints, per message, the time of its end of DATA (time.monotonic(),
  CLOCK_MONOTONIC, one clock for every process on the machine, so the benchmark can
  subtract its own 250 times from it), the message's X-Bench-Tag header if it has one,
  and the queue ID of the MTA that relayed it, read from the topmost Received header
  ("... with ESMTP id QUEUEID ...": Postfix and relay both write it).  The client sees
  the same queue ID in its 250 "queued as QUEUEID", so the time from 250 to arrival
  is known per message for either MTA and for any client, smtp-source included.
- ``smtp-sink``: Postfix's smtp-sink(1) with ``-c``; it only counts messages (as root
  it drops privileges to nobody).

``Sink`` runs one of them and reads its reports in a daemon thread; callers read
``count``, ``last_arrival``, ``arrivals`` (by tag) and ``arrival(queue_id, recipients)``.  It never
writes anything to disk and holds no message.

    python scripts/bench_sink.py      # serves until SIGTERM; prints PORT, then a line a message
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

from postfix_instance import free_port, wait_banner

SENDER = "from@example.org"
RECIPIENT = "to@example.net"
TAG = b"X-Bench-Tag: "
SMTP_SINK = "/usr/sbin/smtp-sink"
_RECEIVED_ID = re.compile(rb"\bid ([0-9A-Za-z]+)")


def make_message(size: int, n: int) -> bytes:
    """A CRLF message of about ``size`` bytes, tagged ``n``, no line starting with '.'."""
    head = (f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: bench {n}\r\n"
            f"Message-ID: <bench.{n}.{os.getpid()}@example.org>\r\n").encode()
    head += TAG + b"%d\r\n\r\n" % n
    room = max(0, size - len(head))
    line = b"x" * 76 + b"\r\n"
    body = line * (room // len(line))
    rest = room - len(body)
    if rest >= 3:
        body += b"y" * (rest - 2) + b"\r\n"
    return head + body



def queue_id_of(message: bytes) -> str:
    """The queue ID in the topmost Received header (with its folded lines), or "?"."""
    if message[:9].lower() != b"received:":
        return "?"
    end = 0
    while True:
        end = message.find(b"\r\n", end)
        if end < 0 or message[end + 2:end + 3] not in (b" ", b"\t"):
            break
        end += 2
    m = _RECEIVED_ID.search(message, 0, end if end >= 0 else len(message))
    return m.group(1).decode("ascii") if m else "?"


async def serve_sink() -> None:
    """Accept everything; print "PORT" first, then "TAG QUEUEID RECIPIENTS MONOTONIC" per
    message (RECIPIENTS: how many RCPT commands it came with)."""
    out = sys.stdout
    pending: list[str] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink.test ESMTP bench sink\r\n")
        recipients = 0
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250 SIZE 104857600\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    at = time.monotonic()
                    start = data.find(TAG)
                    tag = data[start + len(TAG):data.find(b"\r\n", start)] if start >= 0 else b"?"
                    pending.append(f"{tag.decode('ascii', 'replace')} {queue_id_of(data)} "
                                   f"{recipients} {at:.6f}\n")
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:  # HELO, MAIL, RCPT, RSET, NOOP
                    if verb in (b"MAIL", b"RSET"):
                        recipients = 0
                    recipients += verb == b"RCPT"
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0, limit=64 << 20, backlog=512)
    out.write(f"{server.sockets[0].getsockname()[1]}\n")
    out.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
        if pending:
            out.write("".join(pending))
            pending.clear()
            out.flush()
    server.close()


class Sink:
    """A sink child process; ``count``, ``arrivals`` and ``arrival()`` fill in as it reports."""

    def __init__(self, kind: str = "python") -> None:
        self.kind = kind
        self.arrivals: dict[int, float] = {}  # X-Bench-Tag -> first arrival
        # The relaying MTA's queue ID -> (recipients so far, time of the latest delivery):
        # an MTA may deliver one message's recipients in several transactions.
        self._by_queue_id: dict[str, tuple[int, float]] = {}
        self.count = 0
        self.last_arrival = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._reader: threading.Thread | None = None

    def start(self) -> Sink:
        if self.kind == "python":
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)],
                                         stdout=subprocess.PIPE)
            assert self.proc.stdout is not None
            if not select.select([self.proc.stdout], [], [], 15)[0]:
                self.stop()
                raise RuntimeError("the python sink did not start")
            self.port = int(self.proc.stdout.readline())
            self._reader = threading.Thread(target=self._read_python, daemon=True)
        else:
            self.port = free_port()
            argv = [SMTP_SINK, "-c"]
            if os.geteuid() == 0:  # smtp-sink refuses to run as root without -u
                argv += ["-u", "nobody"]
            argv += [f"127.0.0.1:{self.port}", "1000"]
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)
            self._reader = threading.Thread(target=self._read_smtp_sink, daemon=True)
        self._reader.start()
        proc = self.proc
        wait_banner(self.port, alive=lambda: proc.poll() is None, prog="sink")
        return self

    def _read_python(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            tag, queue_id, recipients, at = line.decode().split()
            when = float(at)
            with contextlib.suppress(ValueError):
                self.arrivals.setdefault(int(tag), when)
            if queue_id != "?":
                before = self._by_queue_id.get(queue_id, (0, 0.0))[0]
                self._by_queue_id[queue_id] = (before + int(recipients), when)
            self.last_arrival = max(self.last_arrival, when)
            self.count += 1

    def arrival(self, queue_id: str, recipients: int = 1) -> float | None:
        """When the message the MTA queued as ``queue_id`` had reached the sink for
        ``recipients`` recipients, or None (python sink only)."""
        got, when = self._by_queue_id.get(queue_id, (0, 0.0))
        return when if got >= recipients else None

    def _read_smtp_sink(self) -> None:
        # "sess=0 quit=0 mesg=3\r" after each completed DATA.
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        while chunk := os.read(self.proc.stdout.fileno(), 4096):
            buf += chunk
            *done, buf = re.split(rb"[\r\n]", buf)
            for item in done:
                m = re.search(rb"mesg=(\d+)", item)
                if m and int(m.group(1)) > self.count:
                    self.count = int(m.group(1))
                    self.last_arrival = time.monotonic()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)  # the last lines of the python sink's report


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(serve_sink())
    except ImportError:
        asyncio.run(serve_sink())
