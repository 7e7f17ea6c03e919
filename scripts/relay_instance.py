"""A private relay daemon for the benchmarks in scripts/ (bench, bench_relay).

``relay serve -c BASE/etc`` as a child process, with the queue directory, the maillog and
main.cf under a directory the caller owns (a temporary one), smtpd on a free loopback
port, and every recipient routed by transport_maps to one next hop on loopback.  It
depends only on the daemon's command line and main.cf parameters, so that it keeps
working while the daemon's insides change.  SIGTERM stops it (the daemon stops its queue
manager and helpers itself); a daemon that does not exit within 15 s is killed.  It
never touches a spool it did not create.

The scripts import it as ``from relay_instance import ...``: a script's own directory
is the first entry of sys.path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from postfix_instance import free_port, update_params, wait_listening

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"


def relay_python() -> str:
    venv = BIN / "python"
    return str(venv) if venv.exists() else sys.executable


class RelayUnderTest:
    """``relay serve`` on 127.0.0.1:``port``, delivering everything to ``next_hop``
    (e.g. ``[127.0.0.1]:PORT``); ``extra`` adds or overrides main.cf parameters."""

    name = "relay"

    def __init__(self, base: Path, next_hop: str, sessions: int,
                 extra: Mapping[str, str] | None = None, prog: str = "bench") -> None:
        self.base = base
        self.prog = prog
        self.port = free_port()
        self.config = base / "etc"
        self.ready_file = base / "ready.json"
        self.config.mkdir(parents=True)
        self.main = {
            "queue_directory": str(base / "spool"),
            "smtpd_listen": f"127.0.0.1:{self.port}",
            "maillog_file": str(base / "maillog"),
            "myhostname": "relay-bench.test",
            "transport_maps": f"inline:{{ * = smtp:{next_hop} }}",
            "smtpd_client_connection_count_limit": str(max(50, sessions * 2)),
            **(extra or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        (self.config / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.main.items()))
        with open(self.base / "stderr", "ab") as stderr:
            with contextlib.suppress(FileNotFoundError):
                self.ready_file.unlink()
            self.proc = subprocess.Popen(
                [relay_python(), "-m", "relay.cli.main", "serve", "-c", str(self.config),
                 "--ready-file", str(self.ready_file)],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                env={k: v for k, v in os.environ.items()
                     if k not in ("MAIL_CONFIG", "RELAY_CLOCK_OFFSET_FILE", "RELAY_FAULT")})

    def restart(self, changes: Mapping[str, str | None]) -> None:
        """Stop if running, change main.cf (a value of None removes it), start again."""
        self.stop()
        update_params(self.main, changes)
        self.start()

    async def ready(self) -> None:
        """Until every process of the daemon accepts mail: it writes its ready file then."""
        proc = self.proc

        def alive() -> bool:
            return proc is not None and proc.poll() is None

        await wait_listening(self.port, alive=alive, prog=self.prog)
        for _ in range(600):
            if self.ready_file.exists() or not alive():
                return
            await asyncio.sleep(0.05)

    def root_pid(self) -> int:
        """``relay serve``'s pid: every process of the daemon is below it."""
        assert self.proc is not None
        return self.proc.pid

    def queue_counts(self) -> dict[str, int]:
        spool = self.base / "spool"
        return {q: len(os.listdir(spool / q)) if (spool / q).exists() else 0
                for q in ("incoming", "active", "deferred")}

    def left_in_queue(self) -> int:
        return sum(self.queue_counts().values())

    def postqueue_argv(self, *args: str) -> list[str]:
        return [str(BIN / "postqueue"), "-c", str(self.config), *args]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
