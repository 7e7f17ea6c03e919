"""Run ``relay serve`` as a real subprocess for integration tests.

The test writes main.cf (the fixture adds queue_directory, smtpd_listen on a free
loopback port and maillog_file), starts the daemon, and talks to it over real
sockets.  Stopping sends SIGTERM; ``kill()`` sends SIGKILL for crash tests.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

RELAY = [sys.executable, "-m", "relay.cli.main", "serve"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    found = []
    for path in Path("/proc").glob(f"{pid}/task/*/children"):
        try:
            found += [int(c) for c in path.read_text().split()]
        except OSError:
            continue
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


BODY = b"Subject: test\r\nMessage-ID: <test@client.test>\r\n\r\nbody\r\n"


def smtp_send(host: str, port: int, recipients: Sequence[str],
              sender: str = "alice@example.org", body: bytes = BODY) -> str:
    """One SMTP transaction through the daemon; the queue ID its 250 names."""
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail(sender)[0] == 250
        for rcpt in recipients:
            code, reply = smtp.rcpt(rcpt)
            assert code == 250, reply
        code, reply = smtp.data(body)
    assert code == 250, reply
    match = re.search(rb"queued as (\S+)", reply)
    assert match, reply
    return match.group(1).decode()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (every 20 ms) until it holds; AssertionError after ``timeout``."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class RelayDaemon:
    def __init__(self, base: Path, params: dict[str, str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.base = base
        self.config_dir = base / "etc"
        self.queue_directory = base / "spool"
        self.maillog = base / "maillog"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("MAIL_CONFIG", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.params: dict[str, str] = {
            "queue_directory": str(self.queue_directory),
            "smtpd_listen": f"{self.host}:{self.port}",
            "maillog_file": str(self.maillog),
            "myhostname": "relay.test",
        }
        self.params.update(params or {})
        self.write_config()

    def write_config(self, **more: str) -> None:
        self.params.update(more)
        self.config_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{k} = {v}\n" for k, v in self.params.items())
        (self.config_dir / "main.cf").write_text(text)

    def start(self, wait: bool = True) -> RelayDaemon:
        self.stderr_path = self.base / f"stderr.{time.monotonic_ns()}"
        with open(self.stderr_path, "wb") as stderr:  # the daemon keeps its own copy
            self.proc = subprocess.Popen(
                [*RELAY, "-c", str(self.config_dir)], env=self.env,
                stdout=subprocess.DEVNULL, stderr=stderr,
            )
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}: {self.stderr()}")
            # Listening, and every process that accepts mail serves (the daemon says it
            # has started then, on standard error whatever maillog_file is).
            if "daemon started" not in self.stderr():
                time.sleep(0.05)
                continue
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    s.recv(100)
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("relay did not start listening")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            log = self.log()
            if log.count(text) >= count:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} x{count} not in maillog:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def listener_pids(self) -> list[int]:
        """The processes that accept mail: the daemon itself and its listener workers
        (relay_smtpd_processes), whose sessions log with their own PIDs."""
        assert self.proc is not None
        return [self.proc.pid, *(pid for pid in children(self.proc.pid)
                                 if b"smtpd-worker" in _cmdline(pid))]

    def queue_files(self, queue: str) -> list[str]:
        path = self.queue_directory / queue
        return sorted(os.listdir(path)) if path.exists() else []

    def run_cmd(self, *argv: str, input: bytes | None = None,
                check: bool = False) -> subprocess.CompletedProcess[bytes]:
        """Run one of the project's commands (postqueue, postsuper, ...) against this spool."""
        bindir = Path(sys.executable).parent
        return subprocess.run([str(bindir / argv[0]), "-c", str(self.config_dir), *argv[1:]],
                              input=input, capture_output=True, env=self.env, check=check,
                              timeout=60)


@pytest.fixture
def relay_daemon(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A factory: ``relay_daemon(params)`` returns a started RelayDaemon, stopped at teardown."""
    started: list[RelayDaemon] = []

    def make(params: dict[str, str] | None = None, start: bool = True,
             env: dict[str, str] | None = None) -> RelayDaemon:
        d = RelayDaemon(tmp_path / f"relay{len(started)}", params, env)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        d.stop()
