"""The clients of ``make bench`` (scripts/bench): each sends one bounded load to one MTA on
loopback and returns when each message's 250 came and the queue ID that 250 named.

- ``smtp_source``: Postfix's smtp-source(1), the standard load tool: one connection per
  message, or reused ones with ``-d``; ``-r N`` recipients a message.  With ``-v`` it
  logs every reply it reads ("<<< 250 2.0.0 Ok: queued as ID") on stderr as it reads
  it, one write a line; a reader here stamps each line with time.monotonic() as it comes.
- ``python_load``: C threads, each sending one message per connection with blocking
  sockets (EHLO, MAIL, RCPT..., DATA, QUIT, a command at a time like smtp-source),
  optionally with STARTTLS on every connection (a full handshake each time, or offering
  the session of the thread's previous connection, as a client with a session cache
  does), optionally paced to a rate.
- ``burst``: N threads released together by a barrier, each opening one connection and
  sending one message: the accept latency (from connect() to the 220 banner) and the
  connections refused (no 220 banner: refused, reset, timed out, or a 4xx/5xx banner).

The 250 -> arrival time needs the sink's arrival per queue ID (scripts/bench_sink.py).
Every connection has a timeout and every load a bound on its messages and its time;
only 127.0.0.1 is ever contacted.  Nothing is written to disk.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench_sink import RECIPIENT, SENDER, make_message

SMTP_SOURCE = "/usr/sbin/smtp-source"
CERT_NAME = "bench.test"  # the name in the benchmark's certificate
_QUEUED = re.compile(rb"queued as ([0-9A-Za-z]+)")
_SOURCE_REPLY = re.compile(rb"<<< ([2-5][0-9][0-9])")


@dataclass
class ClientRun:
    """What one load's client saw."""

    started: float = 0.0
    finished: float = 0.0
    queued: dict[str, float] = field(default_factory=dict)  # queue ID -> time of its 250
    failures: Counter[str] = field(default_factory=Counter)
    banner: list[float] = field(default_factory=list)  # connect() -> 220, seconds
    refused: int = 0  # connections without a 220 banner
    handshakes: int = 0
    resumed: int = 0  # TLS sessions resumed
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def last_queued(self) -> float:
        return max(self.queued.values(), default=self.started)

    def to_json(self) -> str:
        return json.dumps({"started": self.started, "finished": self.finished,
                           "queued": self.queued, "failures": self.failures,
                           "banner": self.banner, "refused": self.refused,
                           "handshakes": self.handshakes, "resumed": self.resumed})

    @classmethod
    def merged(cls, parts: list[dict[str, Any]]) -> ClientRun:
        """One run from the JSON of runs made at the same time by several processes."""
        run = cls(started=min(p["started"] for p in parts),
                  finished=max(p["finished"] for p in parts))
        for p in parts:
            run.queued.update(p["queued"])
            run.failures.update(p["failures"])
            run.banner += p["banner"]
            run.refused += p["refused"]
            run.handshakes += p["handshakes"]
            run.resumed += p["resumed"]
        return run


def recipients_of(count: int) -> list[str]:
    """One recipient, or ``count`` of them numbered as smtp-source -r numbers them."""
    return [RECIPIENT] if count == 1 else [f"{i}{RECIPIENT}" for i in range(1, count + 1)]


# ---- smtp-source --------------------------------------------------------------------------


def smtp_source(port: int, messages: int, sessions: int, size: int, recipients: int = 1,
                reuse: bool = False, verbose: bool = True, to: str = RECIPIENT,
                time_limit: float = 600.0) -> ClientRun:
    """Run smtp-source once; without ``verbose`` only failures are known, not the 250s."""
    argv = [SMTP_SOURCE, *(["-v"] if verbose else []), *(["-d"] if reuse else []),
            "-s", str(sessions), "-m", str(messages), "-l", str(size), "-r", str(recipients),
            "-f", SENDER, "-t", to, f"127.0.0.1:{port}"]
    run = ClientRun(started=time.monotonic())
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    watchdog = threading.Timer(time_limit, proc.kill)
    watchdog.start()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            at = time.monotonic()
            reply = _SOURCE_REPLY.search(line)
            if reply is None:
                if b"fatal:" in line or b"warning:" in line:
                    said = line.split(b": ", 1)[-1].strip()[:60]
                    run.failures[said.decode(errors="replace")] += 1
            elif reply.group(1) == b"250" and (queued := _QUEUED.search(line)):
                run.queued[queued.group(1).decode()] = at
            elif reply.group(1)[:1] in b"45":
                run.failures[f"reply {reply.group(1).decode()}"] += 1
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run.finished = time.monotonic()
    if proc.returncode:
        run.failures[f"smtp-source exit status {proc.returncode}"] += 1
    return run


# ---- a blocking python client -------------------------------------------------------------


class Refused(Exception):
    """The server answered a command with something else than the reply expected."""


@dataclass
class Attempt:
    connect_at: float
    banner_at: float | None = None
    queued_at: float | None = None
    queue_id: str = ""
    error: str = ""
    session: ssl.SSLSession | None = None
    resumed: bool | None = None  # None: no TLS


class Connection:
    """One SMTP client connection over a blocking socket: just what the loads need."""

    def __init__(self, port: int, timeout: float) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout)
        self.buf = b""

    def reply(self) -> bytes:
        """The last line of the next reply."""
        while True:
            while (end := self.buf.find(b"\n")) < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed")
                self.buf += chunk
            line, self.buf = self.buf[:end + 1], self.buf[end + 1:]
            if line[3:4] != b"-":
                return line

    def command(self, what: str, data: bytes, expect: bytes) -> bytes:
        self.sock.sendall(data)
        reply = self.reply()
        if not reply.startswith(expect):
            raise Refused(f"{what} {reply[:3].decode(errors='replace')}")
        return reply

    def starttls(self, context: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        self.command("STARTTLS", b"STARTTLS\r\n", b"220")
        self.sock = context.wrap_socket(self.sock, server_hostname=CERT_NAME, session=session)


def send_one(port: int, payload: bytes, recipients: list[str], timeout: float,
             tls: ssl.SSLContext | None = None,
             session: ssl.SSLSession | None = None) -> Attempt:
    """Connect, send one message, quit; never raises for what the server or the network do."""
    attempt = Attempt(connect_at=time.monotonic())
    try:
        conn = Connection(port, timeout)
    except OSError as exc:
        attempt.error = f"connect: {type(exc).__name__}"
        return attempt
    try:
        banner = conn.reply()
        if not banner.startswith(b"220"):
            raise Refused(f"banner {banner[:3].decode(errors='replace')}")
        attempt.banner_at = time.monotonic()
        conn.command("EHLO", b"EHLO bench.example\r\n", b"250")
        if tls is not None:
            conn.starttls(tls, session)
            conn.command("EHLO", b"EHLO bench.example\r\n", b"250")
        conn.command("MAIL", f"MAIL FROM:<{SENDER}>\r\n".encode(), b"250")
        for rcpt in recipients:
            conn.command("RCPT", f"RCPT TO:<{rcpt}>\r\n".encode(), b"250")
        conn.command("DATA", b"DATA\r\n", b"354")
        reply = conn.command("end of DATA", payload + b".\r\n", b"250")
        attempt.queued_at = time.monotonic()
        queued = _QUEUED.search(reply)
        attempt.queue_id = queued.group(1).decode() if queued else ""
        conn.command("QUIT", b"QUIT\r\n", b"221")
    except (OSError, ConnectionError, Refused) as exc:  # ssl.SSLError is an OSError
        where = "" if isinstance(exc, Refused) else (
            "before the banner: " if attempt.banner_at is None else "session: ")
        attempt.error = str(exc) if isinstance(exc, Refused) else where + type(exc).__name__
    finally:
        if isinstance(conn.sock, ssl.SSLSocket):
            attempt.resumed = conn.sock.session_reused
            attempt.session = conn.sock.session
        conn.sock.close()
    return attempt


def _record(run: ClientRun, attempt: Attempt) -> None:
    with run.lock:
        if attempt.banner_at is None:
            run.refused += 1
        else:
            run.banner.append(attempt.banner_at - attempt.connect_at)
        if attempt.queued_at is not None and attempt.queue_id:
            run.queued[attempt.queue_id] = attempt.queued_at
        if attempt.error:
            run.failures[attempt.error] += 1
        if attempt.resumed is not None:
            run.handshakes += 1
            run.resumed += attempt.resumed


def client_context(cafile: str) -> ssl.SSLContext:
    """A TLS client context that trusts only the benchmark's certificate."""
    return ssl.create_default_context(cafile=cafile)


def _wait_until(at: float | None) -> None:
    if at is not None:
        time.sleep(max(0.0, at - time.monotonic()))


def python_load(port: int, messages: int, sessions: int, size: int, recipients: int = 1,
                tls: ssl.SSLContext | None = None, resume: bool = False,
                rate: float | None = None, timeout: float = 60.0,
                time_limit: float = 600.0, at: float | None = None) -> ClientRun:
    """``messages`` messages, one connection each, from ``sessions`` threads, starting at
    time.monotonic() ``at`` (or now); with ``rate``, message n is sent no sooner than
    n / rate seconds after the start."""
    _wait_until(at)
    run = ClientRun(started=time.monotonic())
    numbers = itertools.count()  # next() on it is atomic under the GIL
    rcpts = recipients_of(recipients)
    deadline = run.started + time_limit

    def worker() -> None:
        session: ssl.SSLSession | None = None
        for n in numbers:
            if n >= messages or time.monotonic() > deadline:
                return
            if rate:
                time.sleep(max(0.0, run.started + n / rate - time.monotonic()))
            attempt = send_one(port, make_message(size, n), rcpts, timeout, tls,
                               session if resume else None)
            session = attempt.session or session
            _record(run, attempt)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline + timeout - time.monotonic()))
    run.finished = time.monotonic()
    return run


def burst(port: int, connections: int, size: int, timeout: float = 60.0,
          at: float | None = None) -> ClientRun:
    """``connections`` connections opened at once, at time.monotonic() ``at`` (or as soon
    as every thread is ready), one message each."""
    run = ClientRun()
    barrier = threading.Barrier(connections + 1, timeout=60)
    rcpts = recipients_of(1)

    def one(n: int) -> None:
        payload = make_message(size, n)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        _record(run, send_one(port, payload, rcpts, timeout))

    old = threading.stack_size(256 * 1024)  # thousands of threads that need little stack
    threads = [threading.Thread(target=one, args=(n,), daemon=True)
               for n in range(connections)]
    try:
        for t in threads:
            t.start()
    except BaseException:
        barrier.abort()
        raise
    finally:
        threading.stack_size(old)
    _wait_until(at)
    barrier.wait()
    run.started = time.monotonic()
    deadline = run.started + 2 * timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    run.finished = time.monotonic()
    return run


# ---- the python clients in several processes ----------------------------------------------


def in_processes(processes: int, load: str, port: int, messages: int, sessions: int,
                 size: int, time_limit: float, **params: Any) -> ClientRun:
    """``python_load`` (``load="load"``) or ``burst`` (``load="burst"``, ``sessions`` is
    then the number of connections) split over ``processes`` children, this file run as a
    script, each with its share of the messages and the threads, all starting at the same
    moment; ``tls_ca`` (a CA file) stands for ``tls``.  Threads of one process wait for one
    GIL before they can read the clock, so spreading them keeps each 250 and each banner
    stamped within a short time of its arrival."""
    processes = max(1, min(processes, sessions, messages))
    at = time.monotonic() + 1.0 + processes * 0.1  # when every child is up
    children = []
    try:
        for i in range(processes):
            share = {"messages": messages // processes + (i < messages % processes),
                     "sessions": sessions // processes + (i < sessions % processes)}
            call = {"load": load, "port": port, "size": size, "time_limit": time_limit,
                    "at": at, **params, **share}
            children.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), json.dumps(call)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))
        parts = []
        deadline = at + time_limit + 180
        for child in children:
            out, _ = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if child.returncode != 0 or not out:
                raise RuntimeError(f"a client process exited with status {child.returncode}")
            parts.append(json.loads(out))
        return ClientRun.merged(parts)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def _child() -> None:
    call = json.loads(sys.argv[1])
    load, cafile = call.pop("load"), call.pop("tls_ca", None)
    if load == "burst":
        call.pop("time_limit")
        call["connections"] = call.pop("messages")
        del call["sessions"]
        run = burst(**call)
    else:
        run = python_load(**call, tls=client_context(cafile) if cafile else None)
    sys.stdout.write(run.to_json())


if __name__ == "__main__":
    _child()
