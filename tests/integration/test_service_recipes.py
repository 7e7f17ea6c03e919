"""The recipes in conf/ work as shipped: the systemd unit passes ``systemd-analyze verify``,
and the example configurations (backup MX, smart host) pass ``relay check`` and run under
``relay serve -c DIR``, doing what their comments promise.

The example directories are used as they are; only what this machine decides (a free
loopback port, a spool and a log under the test's directory) is given on the command line
with ``-o name=value``, the way Postfix's master.cf gives its daemons settings.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemon import free_port
from tests.support.tools import require

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INSTALLED = "/opt/relay/bin/relay"  # where conf/relay.service expects relay


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    analyze = require("systemd-analyze")
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)


def _installed_copy(tmp_path: Path, text: str) -> Path:
    """The unit as shipped, its relay at this checkout's virtualenv instead of /opt/relay
    (verify insists that every command exists)."""
    unit = tmp_path / "relay.service"
    unit.write_text(text.replace(INSTALLED, str(BIN / "relay")))
    return unit


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    text = (REPO / "conf" / "relay.service").read_text()
    settings = [line.strip() for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for expected in ("Type=notify", "User=relay", "ProtectSystem=strict",
                     "ReadWritePaths=/var/spool/relay", "NoNewPrivileges=yes",
                     "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                     f"ExecStart={INSTALLED} serve -c /etc/relay",
                     f"ExecReload={INSTALLED} reload -c /etc/relay"):
        assert expected in settings, expected
    done = _verify(_installed_copy(tmp_path, text))
    assert done.returncode == 0 and done.stderr == "", done.stderr

    analyze = require("systemd-analyze")
    security = subprocess.run([analyze, "security", "--offline=yes", "--threshold=30",
                               str(tmp_path / "relay.service")], capture_output=True, text=True,
                              timeout=60, check=False)
    assert security.returncode == 0, security.stdout[-2000:]
    assert "OK" in security.stdout.splitlines()[-1], security.stdout[-300:]

    # The check can fail: verify complains of a misspelt type (on stderr: systemd
    # ignores the line and exits 0) and of a command that is not there.
    broken = _installed_copy(tmp_path, text.replace("Type=notify", "Type=notifyy"))
    assert "Failed to parse service type, ignoring: notifyy" in _verify(broken).stderr
    missing = tmp_path / "missing.service"
    missing.write_text(text)  # /opt/relay/bin/relay does not exist here
    assert _verify(missing).returncode != 0


class _Session:
    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(source, 0))
        self.f = self.sock.makefile("rwb")
        self.banner = self.reply()

    def reply(self) -> str:
        lines = []
        while True:
            line = self.f.readline().decode()
            lines.append(line)
            if line[3:4] != "-":
                return "".join(lines)

    def cmd(self, text: str) -> str:
        self.f.write(text.encode() + b"\r\n")
        self.f.flush()
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def _serve(example: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, list[str]]:
    port = free_port()
    overrides = ["-o", f"smtpd_listen=127.0.0.1:{port}",
                 "-o", f"queue_directory={tmp_path / 'spool'}",
                 "-o", f"maillog_file={tmp_path / 'maillog'}",
                 # Nothing leaves this test: deliveries wait an hour.
                 "-o", "transport_maps=inline:{ * = smtp:[127.0.0.1]:1 }",
                 "-o", "minimal_backoff_time=1h", "-o", "maximal_backoff_time=1h"]
    config = str(REPO / "conf" / example)
    env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
    check = subprocess.run([str(BIN / "relay"), "check", "-c", config, *overrides],
                           capture_output=True, text=True, env=env, timeout=60, check=False)
    assert (check.returncode, check.stderr) == (0, ""), check.stderr
    proc = subprocess.Popen([str(BIN / "relay"), "serve", "-c", config, *overrides], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < end, "relay did not listen"
            time.sleep(0.05)
    return proc, port, overrides


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_backup_mx_example(tmp_path: Path) -> None:
    proc, port, _ = _serve("backup-mx", tmp_path)
    try:
        # From the Internet (outside mynetworks): its domains yes, others no.
        s = _Session(port, "127.0.0.5")
        assert s.banner.startswith("220 mx2.example.com ESMTP")
        assert s.cmd("EHLO sender.example").startswith("250")
        assert s.cmd("MAIL FROM:<a@sender.example>").startswith("250")
        assert s.cmd("RCPT TO:<b@example.com>").startswith("250")
        assert s.cmd("RCPT TO:<c@example.net>").startswith("250")
        assert s.cmd("RCPT TO:<d@elsewhere.example>").startswith("554 5.7.1")
        assert s.cmd("DATA").startswith("354")
        s.f.write(b"Subject: kept for the primary\r\n\r\nhello\r\n.\r\n")
        s.f.flush()
        assert s.reply().startswith("250 2.0.0 Ok: queued as ")
        s.close()
    finally:
        _stop(proc)


def test_smarthost_example(tmp_path: Path) -> None:
    proc, port, _ = _serve("smarthost", tmp_path)
    try:
        inside = _Session(port, "127.0.0.1")
        assert inside.cmd("EHLO app.lan").startswith("250")
        assert inside.cmd("MAIL FROM:<app@lan.example>").startswith("250")
        assert inside.cmd("RCPT TO:<anyone@anywhere.example>").startswith("250")
        inside.close()
        outside = _Session(port, "127.0.0.5")
        assert outside.cmd("EHLO stranger.example").startswith("250")
        assert outside.cmd("MAIL FROM:<x@stranger.example>").startswith("250")
        assert outside.cmd("RCPT TO:<anyone@anywhere.example>").startswith("554 5.7.1")
        outside.close()
    finally:
        _stop(proc)
    # Its relayhost is the provider, over TLS with AUTH, credentials beside main.cf.
    env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
    shown = subprocess.run([str(BIN / "postconf"), "-c", str(REPO / "conf" / "smarthost"), "-x",
                            "relayhost", "smtp_tls_security_level", "smtp_sasl_auth_enable",
                            "smtp_sasl_password_maps"], capture_output=True, text=True, env=env,
                           timeout=60, check=False)
    assert shown.stdout.splitlines() == [
        "relayhost = [smtp.example.net]:587",
        "smtp_tls_security_level = encrypt",
        "smtp_sasl_auth_enable = yes",
        f"smtp_sasl_password_maps = texthash:{REPO / 'conf' / 'smarthost'}/sasl_passwd",
    ]
