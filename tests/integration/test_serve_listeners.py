"""relay serve's listeners as a developer meets them: both loopbacks by default (clients that
try ::1 first for "localhost" find it), port 0 reported through --ready-file, [::1]
skipped with a warning where there is no IPv6, and an IPv6 address in smtpd_listen beside
an IPv4 one, where the default mynetworks relays for a loopback client over IPv6 too."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemon import RelayDaemon, free_port, smtp_send
from tests.support.tools import require

pytestmark = pytest.mark.timeout(60)
MakeDaemon = Callable[..., RelayDaemon]
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


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_listen_address_and_default_mynetworks(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon({"queue_run_delay": "1h", "minimal_backoff_time": "1h",
                      "maximal_backoff_time": "1h",
                      "transport_maps": "inline:{ * = smtp:[127.0.0.1]:1 }"}, start=False)
    port6 = free_port("::1")
    d.write_config(smtpd_listen=f"127.0.0.1:{d.port}, [::1]:{port6}")
    d.start()
    # No mynetworks in main.cf: the embedded default relays for loopback clients only,
    # and ::1 is loopback, so a recipient in any domain is accepted over IPv6 too.
    qid6 = smtp_send("::1", port6, ["someone@other.org"])
    qid4 = smtp_send("127.0.0.1", d.port, ["someone@other.org"])
    assert qid6 != qid4
    log = d.wait_log(f"{qid6}: client=")
    assert re.search(rf"smtpd\[\d+\]: {qid6}: client=\S*\[::1\]", log), log[-2000:]
    assert re.search(r"smtpd\[\d+\]: connect from \S*\[::1\]$", log, re.MULTILINE), log[-2000:]
