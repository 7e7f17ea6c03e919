"""relay serve's listeners as a developer meets them: both loopbacks by default (clients that
try ::1 first for "localhost" find it), port 0 reported through --ready-file, and [::1]
skipped with a warning where there is no IPv6."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.tools import require

pytestmark = pytest.mark.timeout(60)
BOOTSTRAP = ("import sys; del sys.path[0]; from relay.cli.main import main; "
             "sys.exit(main(sys.argv[1:]))")


def start(tmp_path: Path, main_cf: str, prefix: tuple[str, ...] = ()
          ) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    (tmp_path / "main.cf").write_text(
        f"queue_directory = {tmp_path}/spool\nmaillog_file = {tmp_path}/maillog\n" + main_cf)
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([*prefix, sys.executable, "-c", BOOTSTRAP, "serve", "-c",
                             str(tmp_path), "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None:
            assert proc.stderr is not None
            pytest.fail(f"relay serve exited: {proc.stderr.read().decode()}")
        assert time.monotonic() < end
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def test_both_loopbacks_on_ports_the_daemon_chose(tmp_path: Path) -> None:
    proc, ready = start(tmp_path, "smtpd_listen = 127.0.0.1:0, [::1]:0\n"
                                  "http_listen = 127.0.0.1:0\n")
    try:
        v4, v6 = ready["smtpd"]  # type: ignore[misc]
        assert v4.startswith("127.0.0.1:") and v6.startswith("[::1]:")
        assert ready["pid"] == proc.pid
        (http,) = ready["http"]  # type: ignore[misc]
        for address in (v4, v6):
            host, port = address.rsplit(":", 1)
            with smtplib.SMTP(host.strip("[]"), int(port), timeout=10) as s:
                assert s.noop()[0] == 250
        log = (tmp_path / "maillog").read_text()
        assert f"listening on {v4}" in log and f"listening on {v6}" in log
        assert f"http listening on {http}" in log
    finally:
        stop(proc)


def test_without_ipv6_the_ipv6_listener_is_skipped(tmp_path: Path) -> None:
    unshare = require("unshare")
    # A new network namespace has a loopback without ::1: a machine without IPv6.
    probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=30,
                           check=False)
    if probe.returncode != 0:
        pytest.skip(f"no user and network namespaces here: {probe.stderr.decode().strip()}")
    proc, ready = start(tmp_path, "smtpd_listen = 127.0.0.1:0, [::1]:0\n",
                        prefix=(unshare, "-rn"))
    try:
        (only,) = ready["smtpd"]  # type: ignore[misc]
        assert only.startswith("127.0.0.1:")
        log = (tmp_path / "maillog").read_text()
        assert "warning: skipping [::1]:0: Cannot assign requested address " \
               "(no IPv6 on this machine?)" in log
    finally:
        stop(proc)
    assert os.path.exists(tmp_path / "spool" / "master.pid")
