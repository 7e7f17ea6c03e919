"""The daemon's fsync helpers, from outside: ``relay serve`` as a subprocess, a real sink.

Each daemon process (the listener and the queue manager) makes its spool writes
durable through a helper process of its own (spool.fsync).  These tests SIGKILL the
helpers under load and check the promise at the sink: every message that got its
250 arrives exactly once, and the daemon goes on serving.  They also hold a queue
file's lock from outside while the queue manager wants it: the queue manager, which
now renames and reads queue files on its event loop, waits for that one message in
a thread and keeps delivering the others.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spool import Spool
from spool.envelope import Envelope, Recipient
from tests.support.daemon import RelayDaemon
from tests.support.peers import ThreadedPeer

pytestmark = pytest.mark.timeout(120)

MakeDaemon = Callable[..., RelayDaemon]


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(name))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def helpers(d: RelayDaemon) -> tuple[int | None, int | None]:
    """(the listener's fsync helper, the queue manager's fsync helper)."""
    assert d.proc is not None
    listener_helper = qmgr_helper = None
    for child in children(d.proc.pid):
        line = cmdline(child)
        if "fsyncd.py" in line:
            listener_helper = child
        elif " qmgr " in line:
            qmgr_helper = next((c for c in children(child) if "fsyncd.py" in cmdline(c)),
                               None)
    return listener_helper, qmgr_helper


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Sender:
    """A pipelining-free SMTP client that sends numbered messages and keeps the IDs."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""
        assert self.reply().startswith("220")
        assert self.cmd("EHLO client.test").startswith("250")

    def reply(self) -> str:
        lines: list[bytes] = []
        while not lines or lines[-1][3:4] == b"-":
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
        return "\n".join(x.decode() for x in lines)

    def cmd(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def send(self, tag: str) -> str:
        assert self.cmd("MAIL FROM:<a@client.test>").startswith("250")
        assert self.cmd("RCPT TO:<b@dest.test>").startswith("250")
        assert self.cmd("DATA").startswith("354")
        self.sock.sendall(f"Subject: {tag}\r\nMessage-ID: <{tag}@client.test>\r\n\r\n"
                          f"body {tag}\r\n.\r\n".encode())
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def test_killing_the_fsync_helpers_under_load_loses_and_duplicates_nothing(
        relay_daemon: MakeDaemon) -> None:
    with ThreadedPeer() as sink:
        d = relay_daemon({"transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}"})
        first = helpers(d)
        assert all(first), f"no fsync helper found: {first}"
        replies: dict[str, str] = {}
        stop = threading.Event()
        kills = []

        def killer() -> None:
            while not stop.is_set():
                for pid in helpers(d):
                    if pid is not None:
                        try:
                            os.kill(pid, signal.SIGKILL)
                            kills.append(pid)
                        except ProcessLookupError:
                            pass
                stop.wait(0.3)

        # Each client sends at least 60 messages and goes on (at most 1,000, for at most
        # 30 s) until the killer has killed four helpers: a fast machine would otherwise
        # be done before the killer's second round.
        deadline = time.monotonic() + 30

        def client(n: int) -> None:
            c = Sender(d.port)
            try:
                for i in range(1000):
                    if i >= 60 and (len(set(kills)) >= 4 or time.monotonic() > deadline):
                        break
                    tag = f"m{n}.{i}"
                    replies[tag] = c.send(tag)
            finally:
                c.close()

        kt = threading.Thread(target=killer)
        kt.start()
        clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(60)
        stop.set()
        kt.join()

        assert len(replies) >= 240
        refused = {t: r for t, r in replies.items() if not r.startswith("250 ")}
        assert not refused, refused  # a replaced helper redoes the work: no 4xx either
        assert len(set(kills)) >= 4, f"the killer found too few helpers: {kills}"
        sink.wait_for(len(replies), timeout=60)
        time.sleep(0.5)
        subjects = sorted(m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                          for m in sink.all_messages)
        assert subjects == sorted(replies), "each accepted message arrives exactly once"
        assert "fsync helper exited; starting another" in d.log() + d.stderr()
        # The daemon is still whole: new helpers, and mail still flows.
        assert all(helpers(d))
        c = Sender(d.port)
        assert c.send("after").startswith("250 ")
        c.close()
        sink.wait_for(len(replies) + 1, timeout=20)


def test_a_message_locked_by_another_process_does_not_stall_the_queue_manager(
        relay_daemon: MakeDaemon, tmp_path: Path) -> None:
    """Postfix's qmgr waits for no lock; ours takes a locked message's turn in a thread."""
    import fcntl

    with ThreadedPeer() as sink:
        d = relay_daemon({"transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}"},
                         start=False)
        spool = Spool(str(d.queue_directory))
        env = spool.enqueue(Envelope(queue_id="", sender="a@client.test",
                                     recipients=(Recipient("locked@dest.test"),),
                                     arrival_time=time.time(), size=0),
                            b"Subject: locked\r\n\r\nwaits for its lock\r\n")
        fd = os.open(d.queue_directory / "data" / env.queue_id, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # as postsuper would, for longer
            d.start()
            c = Sender(d.port)
            assert c.send("free").startswith("250 ")
            c.close()
            got = sink.wait_for(1, timeout=15)
            assert [m.recipients for m in got] == [("b@dest.test",)]
            assert d.queue_files("incoming") == [env.queue_id]
        finally:
            os.close(fd)
        sink.wait_for(2, timeout=15)
        wait_until(lambda: f"{env.queue_id}: removed" in d.log(), 15, "the locked one removed")
