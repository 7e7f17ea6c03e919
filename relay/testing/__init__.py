"""relay as a real SMTP peer for test suites: ``SmtpRelay`` runs ``relay serve`` as a
subprocess with a private spool, and shows what it delivered, what it holds and what it
logged.  The pytest fixtures built on it are in relay.testing.plugin (installed as a
``pytest11`` plugin, so they need no import).

    relay = SmtpRelay(base_dir).start()          # capture mode: nothing leaves the machine
    smtplib.SMTP(relay.host, relay.port).sendmail(...)
    relay.wait_for(1, match="to:bob@example.com")  # [EmailMessage]
    relay.stop()

The daemon listens on ``127.0.0.1`` port 0 and reports the port it got (``relay serve
--ready-file``), so two suites never race for a port.  Without ``faults`` every message
goes into a Maildir (``relay serve --capture``); with ``faults`` the daemon relays to a
``relay sink`` on loopback (in a thread of the test process) whose script decides each
reply (relay.faults), and whatever the sink accepts lands in that Maildir: ``messages``
is always what reached "the outside world".  Retries are quick (``queue_run_delay``,
``minimal_backoff_time`` 1s, ``maximal_backoff_time`` 2s, unless ``params`` say
otherwise), so a test sees a deferred message delivered within seconds.

It never touches anything outside its base directory and loopback.  ``stop()`` sends
SIGTERM and waits; a test that ends without it leaves a daemon that exits with the test
process only if a fixture stops it (the fixtures do).
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Self

from relay import capture, faults
from relay.faults import Script
from relay.maildir import Captured

__all__ = ["TEST_PARAMS", "FaultSpec", "RelayError", "SmtpRelay"]

# What makes a relay quick to observe in a test, before the caller's own parameters.
TEST_PARAMS: Mapping[str, str] = {
    "myhostname": "relay.test",
    "queue_run_delay": "1s",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
    "smtp_connect_timeout": "5s",
    "smtp_data_done_timeout": "10s",
    "smtpd_client_connection_count_limit": "0",
}

FaultSpec = Script | Sequence[Mapping[str, Any]] | Mapping[str, Any] | str | os.PathLike[str]

_BOOTSTRAP = ("import sys; del sys.path[0]; from relay.cli.main import main; "
              "sys.exit(main(sys.argv[1:]))")
START_TIMEOUT = 30.0


class RelayError(RuntimeError):
    """The daemon did not start, or a wait ran out; the message has its log's tail."""


def _script(spec: FaultSpec) -> Script:
    if isinstance(spec, Script):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return faults.load(os.fspath(spec))
    return faults.script(spec)


class SmtpRelay:
    """One ``relay serve`` with its own spool under ``base``.

    Its main.cf is TEST_PARAMS, a private ``queue_directory`` and ``maillog_file``,
    ``smtpd_listen = 127.0.0.1:0``, then ``params``; or ``main_cf``, a whole file of the
    caller's written as it is (it should listen on port 0 and name its own spool).
    """

    def __init__(self, base: str | os.PathLike[str], params: Mapping[str, str] | None = None,
                 *, faults: FaultSpec | None = None, capture: bool = True,
                 http: bool = False, env: Mapping[str, str] | None = None,
                 main_cf: str | None = None) -> None:
        self.base = Path(base)
        self.config_dir = self.base / "etc"
        self.queue_directory = self.base / "spool"
        self.maildir = self.base / "maildir"
        self.maillog = self.base / "maillog"
        self.host = "127.0.0.1"
        self.port = 0
        self.http_port: int | None = None
        self.pid = 0
        self.sink: Any = None  # relay.sink.ThreadedSink, with faults
        self._faults = None if faults is None else _script(faults)
        self._capture = capture and self._faults is None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self.env = {k: v for k, v in (env or os.environ).items() if k != "MAIL_CONFIG"}
        self.params: dict[str, str] = {
            "queue_directory": str(self.queue_directory),
            "maillog_file": str(self.maillog),
            "smtpd_listen": "127.0.0.1:0",
            **TEST_PARAMS,
        }
        if http:
            self.params["http_listen"] = "127.0.0.1:0"
        self.params.update(params or {})
        self.main_cf = main_cf  # written as it is, instead of params

    # ---- life cycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Start the daemon (and the sink) and wait until it listens."""
        self.base.mkdir(parents=True, exist_ok=True)
        if self._faults is not None:
            from relay.sink import ThreadedSink

            self.sink = ThreadedSink(self._faults, str(self.maildir)).start()
            self.params.setdefault("relayhost", f"[127.0.0.1]:{self.sink.port}")
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "main.cf").write_text(
            self.main_cf if self.main_cf is not None
            else "".join(f"{name} = {value}\n" for name, value in self.params.items()))
        ready = self.base / f"ready.{time.monotonic_ns()}.json"
        argv = [sys.executable, "-c", _BOOTSTRAP, "serve", "-c", str(self.config_dir),
                "--ready-file", str(ready)]
        if self._capture:
            argv += ["--capture", str(self.maildir)]
        self._stderr = open(self.base / "stderr", "ab")  # noqa: SIM115 - closed by stop()
        self._proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=self._stderr)
        end = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            if self._proc.poll() is not None:
                self._close_stderr()
                raise RelayError(f"relay serve exited with status {self._proc.returncode}:\n"
                                 f"{self.stderr()}{self.log()[-2000:]}")
            if time.monotonic() > end:
                self.stop()
                raise RelayError(f"relay serve did not listen within {START_TIMEOUT:g}s:\n"
                                 f"{self.stderr()}{self.log()[-2000:]}")
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        ready.unlink()
        self.pid = int(info["pid"])
        self.port = int(info["smtpd"][0].rsplit(":", 1)[1])
        if info["http"]:
            self.http_port = int(info["http"][0].rsplit(":", 1)[1])
        return self

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, and the exit status (SIGKILL after ``timeout``)."""
        status = 0
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            status = self._proc.returncode
        if self.sink is not None:
            self.sink.stop()
        self._close_stderr()
        return status

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what a test looks at ---------------------------------------------------------

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the read API (start with ``http=True``)."""
        if self.http_port is None:
            raise RelayError("no HTTP listener: start it with http=True")
        return f"http://{self.host}:{self.http_port}"

    def smtp(self, timeout: float = 30.0) -> smtplib.SMTP:
        """A client connected to the relay (use it as a context manager)."""
        return smtplib.SMTP(self.host, self.port, timeout=timeout)

    def _box(self) -> Captured:
        """Its own Maildir (capture, or the sink's) and those its main.cf's next hops name."""
        paths = [str(self.maildir)]
        if not self._capture and self._faults is None and self.config_dir.exists():
            from relay import config
            from relay.routing import router_for

            cfg = config.load(str(self.config_dir), environ=self.env, warn=lambda m: None)
            paths += [p for p in router_for(cfg).maildirs() if p not in paths]
        return Captured(paths)

    def _views(self, match: str | None) -> list[tuple[capture.View, EmailMessage]]:
        found = []
        for entry in self._box().entries():
            try:
                raw = Path(entry.path).read_bytes()
            except FileNotFoundError:
                continue
            v = capture.view(entry, raw)
            if match and not capture.matches(match, v):
                continue
            found.append((v, capture.parse(raw)))
        return found

    @property
    def messages(self) -> list[EmailMessage]:
        """What was delivered, oldest first: one message per recipient, each with the
        ``Return-Path``, ``X-Original-To`` and ``Delivered-To`` of its delivery.  Read
        from the relay's own Maildir (capture, or the fault sink's) and, for a relay
        started with ``capture=False``, the Maildirs its ``maildir:`` next hops name."""
        return [message for _, message in self._views(None)]

    def wait_for(self, count: int = 1, timeout: float = 10.0,
                 match: str | None = None) -> list[EmailMessage]:
        """The delivered messages (those that ``match`` a Mailpit search query, if given)
        as soon as there are ``count`` of them; RelayError after ``timeout`` seconds."""
        if match:
            capture.check_query(match)
        end = time.monotonic() + timeout
        while True:
            found = [message for _, message in self._views(match)]
            if len(found) >= count:
                return found
            if time.monotonic() > end:
                what = f" matching {match!r}" if match else ""
                raise RelayError(
                    f"{len(found)} of {count} message{'s' if count != 1 else ''}{what} "
                    f"delivered after {timeout:g}s; the maillog ends:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def clear(self) -> int:
        """Remove every delivered message (a session-scoped relay between tests)."""
        return self._box().clear()

    def queue(self) -> list[dict[str, Any]]:
        """What waits in the queue: the ``postqueue -j`` records."""
        from relay.cli import showq
        from spool import Spool

        if not self.queue_directory.is_dir():
            return []
        spool = Spool(str(self.queue_directory), create=False)
        return [json.loads(showq.format_json_record(queue, rec))
                for queue, rec in showq.records(spool)]

    def wait_queue(self, predicate: Any = None, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The queue records as soon as ``predicate(records)`` holds (default: the queue is
        empty); RelayError after ``timeout`` seconds."""
        check = predicate or (lambda records: not records)
        end = time.monotonic() + timeout
        while True:
            records = self.queue()
            if check(records):
                return records
            if time.monotonic() > end:
                raise RelayError(f"the queue did not reach the state wanted in {timeout:g}s: "
                                 f"{records}\n{self.log()[-2000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        """The maillog so far (Postfix's format)."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        end = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if time.monotonic() > end:
                raise RelayError(f"{text!r} not in the maillog after {timeout:g}s:\n"
                                 f"{log[-3000:]}")
            time.sleep(0.05)

    def stderr(self) -> str:
        try:
            return (self.base / "stderr").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def flush(self) -> None:
        """``postqueue -f``: every deferred message is tried now."""
        self.command("postqueue", "-f", check=True)

    def command(self, name: str, *args: str, check: bool = False,
                input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run one of relay's installed commands (postqueue, postsuper, mailq, relay, ...)
        on this spool (``-c`` is added)."""
        program = os.path.join(sysconfig.get_path("scripts"), name)
        if name == "relay" and args:  # relay SUBCOMMAND -c DIR ...
            argv = [program, args[0], "-c", str(self.config_dir), *args[1:]]
        else:
            argv = [program, "-c", str(self.config_dir), *args]
        return subprocess.run(argv, env=self.env, input=input, capture_output=True,
                              check=check, timeout=60)

    def set_faults(self, spec: FaultSpec) -> None:
        """Replace the sink's script (the relay must have been started with faults)."""
        if self.sink is None:
            raise RelayError("no sink: start the relay with faults=...")
        self.sink.set_script(_script(spec))

