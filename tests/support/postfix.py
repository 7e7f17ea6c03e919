"""Postfix's own programs as test peers and yardsticks: smtp-sink and a private Postfix.

Owns: ``SmtpSink``, Postfix's smtp-sink(1) on a free loopback port dumping every
transaction to a file of its own (``-d``: the client's MAIL and RCPT arguments as
``X-Mail-Args``/``X-Rcpt-Args`` lines, then the message as received, dot-unstuffed), with
or without DSN in its EHLO reply (``-N``), refusing RCPT with a chosen reply if asked
(``-f RCPT -B``); and ``private_postfix``, a Postfix instance of its own (its main.cf,
master.cf, queue and data directories, smtpd on a free loopback port) built by
scripts/postfix_instance.py, for tests that compare relay with what Postfix does.

Never: touches /etc/postfix or the system's mail service, or listens beyond loopback.
Both run from a directory under /tmp made for them, world-traversable, because smtp-sink
and Postfix's daemons give up root (smtp-sink writes its dumps as ``nobody``), and
pytest's own temporary directories are private to root.  Both are stopped, and the
directory removed, when the fixture ends; a killed test run may leave a
``/tmp/relay-postfix-*`` directory behind, nothing more.  A missing program skips the
test, or fails it in CI, through tests.support.tools.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.support import tools

ROOT = Path(__file__).resolve().parents[2]
SINK_USER = "nobody"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def shared_tmp() -> Iterator[Path]:
    """A fresh directory under /tmp that unprivileged daemons can traverse."""
    path = Path(tempfile.mkdtemp(prefix="relay-postfix-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class SinkDump:
    """One transaction as smtp-sink dumped it."""

    mail_args: str  # "<sender> PARAM=..." as the client gave MAIL FROM
    rcpt_args: tuple[str, ...]  # one per RCPT TO
    message: bytes  # the message as received (LF line ends), after the sink's Received:
    path: Path

    def params(self, line: str) -> list[str]:
        return line.split()[1:]


def parse_dump(raw: bytes, path: Path) -> SinkDump:
    lines = raw.split(b"\n")
    mail = ""
    rcpts: list[str] = []
    i = 0
    while i < len(lines) and lines[i].startswith(b"X-"):
        name, _, value = lines[i].decode().partition(": ")
        if name == "X-Mail-Args":
            mail = value
        elif name == "X-Rcpt-Args":
            rcpts.append(value)
        i += 1
    # The sink's own Received: header and its continuation lines.
    assert lines[i].startswith(b"Received: from "), raw[:300]
    i += 1
    while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
        i += 1
    message = b"\n".join(lines[i:])
    # The dump ends every message with one empty line of its own.
    message = message.removesuffix(b"\n")
    return SinkDump(mail, tuple(rcpts), message, path)


class SmtpSink:
    """smtp-sink on 127.0.0.1:port; ``dumps()`` are its transactions, oldest first."""

    def __init__(self, base: Path, *, dsn: bool = True, hostname: str = "sink.test",
                 refuse_rcpt: str | None = None) -> None:
        self.program = tools.require("smtp-sink", "/usr/sbin/smtp-sink")
        self.base = base
        self.dumpdir = base / "dumps"
        self.dumpdir.mkdir(parents=True)
        os.chmod(base, 0o755)
        os.chmod(self.dumpdir, 0o777)
        self.port = free_port()
        argv = [self.program, "-u", SINK_USER, "-h", hostname]
        if not dsn:
            argv.append("-N")
        if refuse_rcpt is not None:
            argv += ["-f", "RCPT", "-B", refuse_rcpt]
        argv += ["-d", f"{self.dumpdir}/%M.", f"127.0.0.1:{self.port}", "64"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=open(base / "sink.stderr", "wb"))  # noqa: SIM115
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("smtp-sink exited: "
                                   + (self.base / "sink.stderr").read_text(errors="replace"))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.recv(100)
                    s.sendall(b"QUIT\r\n")
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("smtp-sink did not start")

    def dumps(self) -> list[SinkDump]:
        files = sorted(self.dumpdir.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [parse_dump(p.read_bytes(), p) for p in files]

    def wait_for(self, count: int, timeout: float = 20.0,
                 marker: bytes = b"") -> list[SinkDump]:
        """Wait for ``count`` complete dumps (each holding ``marker``, when given)."""
        end = time.monotonic() + timeout
        while True:
            with contextlib.suppress(AssertionError, OSError, IndexError):
                dumps = [d for d in self.dumps() if marker in d.message]
                if len(dumps) >= count:
                    time.sleep(0.2)  # a dump is written as the data comes: let it end
                    return [d for d in self.dumps() if marker in d.message]
            if time.monotonic() > end:
                raise TimeoutError(f"smtp-sink saw {len(self.dumps())} transactions, "
                                   f"the test waited for {count}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _postfix_instance_module() -> ModuleType:
    """scripts/postfix_instance.py, which the benchmarks share."""
    name = "postfix_instance"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "postfix_instance.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class PrivatePostfix:
    """A private Postfix 3.x relaying everything to ``relayhost``; ``sendmail()`` submits
    to it, ``postcat()`` shows a queued message, ``stop()`` ends it."""

    def __init__(self, base: Path, relayhost: str, extra: dict[str, str] | None = None) -> None:
        tools.require("postfix", "/usr/sbin/postfix")
        self.sendmail_program = tools.require("sendmail", "/usr/sbin/sendmail")
        try:
            import pwd

            pwd.getpwnam("postfix")
        except KeyError:
            tools.missing("the postfix user does not exist")
        if os.geteuid() != 0:
            tools.missing("a private Postfix instance needs root")
        base.mkdir(parents=True, exist_ok=True)
        module = _postfix_instance_module()
        main = {"myhostname": "postfix.test", "mydomain": "test", "myorigin": "test",
                "smtputf8_enable": "yes", **(extra or {})}
        self.instance: Any = module.PostfixUnderTest(base, relayhost, 1, extra=main,
                                                     prog="test")
        self.config = Path(self.instance.config)
        self.port = int(self.instance.port)
        self.maillog = base / "maillog"

    def sendmail(self, *args: str, message: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([self.sendmail_program, "-C", str(self.config), *args],
                              input=message, capture_output=True, timeout=30, check=False)

    def postcat(self, queue_id: str) -> str:
        return subprocess.run(["postcat", "-c", str(self.config), "-q", queue_id],
                              capture_output=True, text=True, timeout=30, check=True).stdout

    def queue_ids(self) -> list[str]:
        out = subprocess.run(["postqueue", "-c", str(self.config), "-j"],
                             capture_output=True, text=True, timeout=30, check=False).stdout
        import json

        return [json.loads(line)["queue_id"] for line in out.splitlines() if line.strip()]

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        self.instance.stop()
