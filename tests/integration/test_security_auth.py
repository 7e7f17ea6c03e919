"""SMTP AUTH on the listener (PLAIN, LOGIN) and ``relay passwd``.

The password file is written by the real ``relay passwd`` command; the daemon runs as a
subprocess with a trustme certificate, smtpd_tls_auth_only = yes and mynetworks that does
not contain 127.0.0.1, so only a login lets the test client relay.  Checked: the replies,
the Received header and maillog lines Postfix writes for an authenticated client, the
delay and the per-client count of failed logins, and that a failed or refused login
leaves nothing in the spool and the daemon serving.
"""

from __future__ import annotations

import base64
import io
import os
import re
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.auth import ScryptHash
from relay.cli import passwd
from tests.integration.test_accept import (
    HOLD_DELIVERY,
    Client,
    assert_consistent,
    content_of,
    find_envelope,
    queue_id_of,
    split_received,
)
from tests.support.daemon import RelayDaemon

pytestmark = pytest.mark.timeout(60)

DELAY = 1  # smtpd_auth_failure_delay (whole seconds, as every Postfix time)
OUTSIDE = {"mynetworks": "127.0.0.2/32", "relay_domains": "example.com"}
HASH = re.compile(r"^alice:scrypt\$16384\$8\$1\$[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}=$")


def verify(password: bytes, encoded: str) -> bool:
    """Whether the password file's value is ``password``'s hash."""
    return ScryptHash.parse(encoded).matches(password)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def relay_passwd(config_dir: Path, *args: str, password: str | None = None,
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli.main", "passwd", "-c", str(config_dir), *args],
        input=None if password is None else password + "\n", capture_output=True, text=True,
        timeout=30, check=False, env={k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"})


@pytest.fixture(scope="module")
def client_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path, Path]:
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("relay.test")
    base = tmp_path_factory.mktemp("tls")
    cert, key = base / "cert.pem", base / "key.pem"
    cert.write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context, cert, key


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory,
          client_tls: tuple[ssl.SSLContext, Path, Path]) -> Iterator[RelayDaemon]:
    _, cert, key = client_tls
    d = RelayDaemon(tmp_path_factory.mktemp("relay"), {
        **HOLD_DELIVERY, **OUTSIDE,
        "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
        "smtpd_tls_key_file": str(key), "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_password_file": "sasl_passwd", "smtpd_auth_failure_delay": f"{DELAY}s",
    })
    # relay passwd before the daemon starts: it refuses to run AUTH without the file.
    done = relay_passwd(d.config_dir, "alice", password="correct horse")
    assert done.returncode == 0, done.stderr
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def plain_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayDaemon]:
    """No TLS and no AUTH configured."""
    d = RelayDaemon(tmp_path_factory.mktemp("relay"), {**HOLD_DELIVERY, **OUTSIDE}).start()
    yield d
    d.stop()


def tls_client(d: RelayDaemon, context: ssl.SSLContext, source: str | None = None) -> Client:
    c = Client(d.port, source=source)
    c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    c.sock = context.wrap_socket(c.sock, server_hostname="relay.test")
    reply = c.cmd("EHLO client.example")
    assert "250-AUTH LOGIN PLAIN" in reply, reply
    return c


def refused_relay(c: Client) -> None:
    assert c.cmd("MAIL FROM:<x@sender.example>").startswith("250")
    assert c.cmd("RCPT TO:<a@other.org>") == "554 5.7.1 <a@other.org>: Relay access denied"
    assert c.cmd("RSET").startswith("250")


def serves_next_client(d: RelayDaemon) -> None:
    with Client(d.port) as c:
        assert c.banner.startswith("220 relay.test"), c.banner
        assert c.cmd("NOOP").startswith("250")


# ---- relay passwd -----------------------------------------------------------------------------


def test_relay_passwd_writes_scrypt_entries_mode_0600(tmp_path: Path) -> None:
    config = tmp_path / "etc"
    config.mkdir()
    (config / "main.cf").write_text(f"smtpd_sasl_password_file = {tmp_path}/pw\n")
    pw = tmp_path / "pw"
    done = relay_passwd(config, "alice", password="first password")
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(pw.stat().st_mode) == 0o600
    (line,) = pw.read_text().splitlines()
    assert HASH.match(line), line
    assert "first password" not in pw.read_text()
    assert verify(b"first password", line.partition(":")[2])
    assert relay_passwd(config, "bob", password="bobs").returncode == 0
    assert relay_passwd(config, "alice", password="second password").returncode == 0
    entries = dict(ln.split(":", 1) for ln in pw.read_text().splitlines())
    assert sorted(entries) == ["alice", "bob"]
    assert verify(b"second password", entries["alice"])
    assert not verify(b"first password", entries["alice"])
    # The same password twice gets two salts.
    assert relay_passwd(config, "carol", password="bobs").returncode == 0
    entries = dict(ln.split(":", 1) for ln in pw.read_text().splitlines())
    assert entries["carol"] != entries["bob"]
    assert relay_passwd(config, "-d", "bob").returncode == 0
    assert sorted(dict(ln.split(":", 1) for ln in pw.read_text().splitlines())) == \
        ["alice", "carol"]
    assert relay_passwd(config, "-d", "bob").returncode == 64
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("args,password,status,message", [
    (["alice"], "", 64, "empty password"),
    (["bad:user"], "x", 64, "bad user name"),
    (["bad user"], "x", 64, "bad user name"),
])
def test_relay_passwd_refusals(tmp_path: Path, args: list[str], password: str, status: int,
                               message: str) -> None:
    (tmp_path / "main.cf").write_text(f"smtpd_sasl_password_file = {tmp_path}/pw\n")
    done = relay_passwd(tmp_path, *args, password=password)
    assert done.returncode == status and message in done.stderr, done.stderr
    assert not (tmp_path / "pw").exists()


def test_relay_passwd_without_the_parameter(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text("")
    done = relay_passwd(tmp_path, "alice", password="x")
    assert done.returncode == 78 and "smtpd_sasl_password_file is not set" in done.stderr


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_relay_passwd_asks_twice_on_a_terminal(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text(f"smtpd_sasl_password_file = {tmp_path}/pw\n")
    answers = iter(["one", "two"])
    err = io.StringIO()
    status = passwd.main(["-c", str(tmp_path), "alice"], stdin=FakeTerminal(), stderr=err,
                         environ={}, prompt=lambda _: next(answers))
    assert status == 64 and "passwords do not match" in err.getvalue()
    assert not (tmp_path / "pw").exists()
    prompts: list[str] = []
    status = passwd.main(["-c", str(tmp_path), "alice"], stdin=FakeTerminal(), stderr=err,
                         environ={}, prompt=lambda p: prompts.append(p) or "same")
    assert status == 0 and len(prompts) == 2
    assert verify(b"same", (tmp_path / "pw").read_text().split(":", 1)[1].strip())


# ---- AUTH in the SMTP session -----------------------------------------------------------------


def test_auth_plain_lets_an_outsider_relay(
    relay: RelayDaemon, client_tls: tuple[ssl.SSLContext, Path, Path],
) -> None:
    d = relay
    before = assert_consistent(d)
    with tls_client(d, client_tls[0]) as c:
        refused_relay(c)
        assert c.cmd("AUTH PLAIN " + b64(b"\0alice\0correct horse")) == \
            "235 2.7.0 Authentication successful"
        assert c.cmd("AUTH PLAIN " + b64(b"\0alice\0correct horse")) == \
            "503 5.5.1 Error: already authenticated"
        queue_id = queue_id_of(c.mail("alice@example.org", ["a@other.org", "b@else.example"],
                                      b"Subject: auth\r\n\r\nrelayed\r\n"))
        assert c.cmd("QUIT").startswith("221")
    received, _ = split_received(content_of(d, queue_id))
    assert b"\t(Authenticated sender: alice)\r\n" in received, received
    assert b"with ESMTPSA id " + queue_id.encode() in received, received
    env = find_envelope(d, queue_id)
    assert env.auth_user == "alice"
    assert [r.address for r in env.recipients] == ["a@other.org", "b@else.example"]
    log = d.wait_log(f"{queue_id}: client=")
    assert re.search(rf"relay/smtpd\[\d+\]: {queue_id}: client=localhost\[127\.0\.0\.1\], "
                     r"sasl_method=PLAIN, sasl_username=alice$", log, re.MULTILINE), log
    assert assert_consistent(d) - before == {queue_id}


def test_auth_login_with_challenges(
    relay: RelayDaemon, client_tls: tuple[ssl.SSLContext, Path, Path],
) -> None:
    d = relay
    with tls_client(d, client_tls[0]) as c:
        assert c.cmd("AUTH LOGIN") == "334 " + b64(b"Username:")
        assert c.cmd(b64(b"alice")) == "334 " + b64(b"Password:")
        assert c.cmd(b64(b"correct horse")) == "235 2.7.0 Authentication successful"
        assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250")
        assert c.cmd("RCPT TO:<z@other.org>").startswith("250 2.1.5")
    with tls_client(d, client_tls[0]) as c:  # the user name as initial response
        assert c.cmd("AUTH LOGIN " + b64(b"alice")) == "334 " + b64(b"Password:")
        assert c.cmd(b64(b"correct horse")) == "235 2.7.0 Authentication successful"


def test_auth_plain_initial_response_may_be_pipelined(
    relay: RelayDaemon, client_tls: tuple[ssl.SSLContext, Path, Path],
) -> None:
    # RFC 4954 §4: AUTH PLAIN with an initial response completes in one round trip.
    initial = b64(b"alice\0alice\0correct horse")  # authzid = authcid is fine
    with tls_client(relay, client_tls[0]) as c:
        c.send(f"AUTH PLAIN {initial}\r\n"
               "MAIL FROM:<alice@example.org>\r\nRCPT TO:<y@other.org>\r\n".encode())
        assert c.reply() == "235 2.7.0 Authentication successful"
        assert c.reply().startswith("250 2.1.0")
        assert c.reply().startswith("250 2.1.5")


@pytest.mark.parametrize("exchange", [
    [("AUTH PLAIN " + b64(b"\0alice\0wrong"),
      "535 5.7.8 Error: authentication failed: authentication failure")],
    [("AUTH PLAIN " + b64(b"\0nobody\0correct horse"), "535 5.7.8")],
    [("AUTH PLAIN " + b64(b"mallory\0alice\0correct horse"), "535 5.7.8")],  # authzid
    [("AUTH PLAIN", "334 "), (b64(b"\0alice\0nope"), "535 5.7.8")],
    [("AUTH LOGIN", "334 VXNlcm5hbWU6"), (b64(b"alice"), "334 UGFzc3dvcmQ6"),
     (b64(b"nope"), "535 5.7.8")],
], ids=["plain-wrong-password", "plain-unknown-user", "plain-other-authzid",
        "plain-challenge", "login-wrong-password"])
def test_failed_login_is_slow_and_relays_nothing(
    relay: RelayDaemon, client_tls: tuple[ssl.SSLContext, Path, Path],
    exchange: list[tuple[str, str]],
) -> None:
    d = relay
    before = assert_consistent(d)
    with tls_client(d, client_tls[0], source="127.0.0.4") as c:
        for i, (line, expected) in enumerate(exchange):
            start = time.monotonic()
            reply = c.cmd(line)
            assert reply.startswith(expected), (line, reply)
        assert time.monotonic() - start >= DELAY  # the last step was the failure
        refused_relay(c)
    d.wait_log("warning: localhost[127.0.0.4]: SASL ")
    assert re.search(r"warning: localhost\[127\.0\.0\.4\]: SASL (PLAIN|LOGIN) authentication "
                     r"failed: authentication failure, sasl_username=", d.log())
    assert assert_consistent(d) == before
    serves_next_client(d)


@pytest.mark.parametrize("lines,expected", [
    (["AUTH PLAIN", "*"], "501 5.7.0 Authentication aborted"),
    (["AUTH PLAIN", "not base64!"], "501 5.5.2"),
    (["AUTH PLAIN not-base64!"], "501 5.5.2"),
    (["AUTH CRAM-MD5"], "504 5.5.4"),
    (["AUTH"], "501 5.5.4"),
])
def test_malformed_auth_exchanges(
    relay: RelayDaemon, client_tls: tuple[ssl.SSLContext, Path, Path], lines: list[str],
    expected: str,
) -> None:
    with tls_client(relay, client_tls[0]) as c:
        for line in lines[:-1]:
            assert c.cmd(line).startswith("334")
        assert c.cmd(lines[-1]).startswith(expected)
        refused_relay(c)
        # The session goes on: a good login still works.
        assert c.cmd("AUTH PLAIN " + b64(b"\0alice\0correct horse")).startswith("235")


def test_auth_refused_in_a_mail_transaction_and_without_tls(
    relay: RelayDaemon, plain_relay: RelayDaemon, client_tls: tuple[ssl.SSLContext, Path, Path],
) -> None:
    good = "AUTH PLAIN " + b64(b"\0alice\0correct horse")
    with tls_client(relay, client_tls[0]) as c:
        c.cmd("MAIL FROM:<a@example.org>")
        assert c.cmd(good) == "503 5.5.1 Error: MAIL transaction in progress"
    with Client(relay.port) as c:  # smtpd_tls_auth_only = yes
        assert "AUTH" not in c.cmd("EHLO client.example")
        assert c.cmd(good) == "503 5.5.1 Error: authentication not enabled"
        refused_relay(c)
    with Client(plain_relay.port) as c:  # smtpd_sasl_auth_enable = no
        reply = c.cmd("EHLO client.example")
        assert "AUTH" not in reply and "STARTTLS" not in reply, reply
        assert c.cmd(good) == "503 5.5.1 Error: authentication not enabled"
        assert c.cmd("STARTTLS") == "502 5.5.1 Error: command not implemented"
        refused_relay(c)


def test_password_change_applies_without_reload(
    relay: RelayDaemon, client_tls: tuple[ssl.SSLContext, Path, Path],
) -> None:
    d = relay
    assert relay_passwd(d.config_dir, "dave", password="old").returncode == 0
    with tls_client(d, client_tls[0]) as c:
        assert c.cmd("AUTH PLAIN " + b64(b"\0dave\0old")).startswith("235")
    time.sleep(0.01)  # a new mtime, even on coarse file systems
    assert relay_passwd(d.config_dir, "dave", password="new").returncode == 0
    with tls_client(d, client_tls[0]) as c:
        assert c.cmd("AUTH PLAIN " + b64(b"\0dave\0new")).startswith("235")
    assert relay_passwd(d.config_dir, "-d", "dave").returncode == 0


def test_too_many_failed_logins_close_the_door(
    relay: RelayDaemon, client_tls: tuple[ssl.SSLContext, Path, Path],
) -> None:
    d = relay
    bad = "AUTH PLAIN " + b64(b"\0alice\0guess")
    replies: list[str] = []

    def guess() -> None:  # ten guessers at once, as a botnet node would run them
        with tls_client(d, client_tls[0], source="127.0.0.3") as c:
            replies.append(c.cmd(bad))

    guessers = [threading.Thread(target=guess) for _ in range(10)]
    for t in guessers:
        t.start()
    for t in guessers:
        t.join(30)
    assert len(replies) == 10 and all(r.startswith("535 5.7.8") for r in replies), replies
    with tls_client(d, client_tls[0], source="127.0.0.3") as c:
        assert c.cmd(bad) == \
            "421 4.7.0 relay.test Error: too many failed logins from 127.0.0.3"
        assert c.closed()
    # Per client address, across connections, even with the right password.
    with tls_client(d, client_tls[0], source="127.0.0.3") as c:
        assert c.cmd("AUTH PLAIN " + b64(b"\0alice\0correct horse")).startswith("421 4.7.0")
    d.wait_log("too many failed logins from localhost[127.0.0.3]")
    with tls_client(d, client_tls[0]) as c:  # other clients are not affected
        assert c.cmd("AUTH PLAIN " + b64(b"\0alice\0correct horse")).startswith("235")


def test_sasl_without_password_file_is_fatal(tmp_path: Path) -> None:
    d = RelayDaemon(tmp_path, {"smtpd_sasl_auth_enable": "yes",
                               "smtpd_sasl_password_file": str(tmp_path / "missing")})
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(15) == 1
    assert "relay: fatal: smtpd_sasl_password_file: open " in d.stderr(), d.stderr()
