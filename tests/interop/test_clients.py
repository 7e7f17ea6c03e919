"""Clients people point at a relay: swaks, msmtp, Python's smtplib, and PHP's way of
sending mail (``sendmail -t -i`` through relay's sendmail).

Each submits to relay as its users do (STARTTLS and AUTH where the client speaks them),
and relay delivers to the peer (the ``down`` direction of the world, conftest.py): the
peer's store must hold exactly one copy per recipient, the bytes as sent but for the
added Received: fields (and Bcc: removed by ``sendmail -t``, as Postfix removes it).
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop.conftest import DOWN, RELAY_ACCOUNT, World, unverified_tls
from tests.interop.test_matrix import check_once_and_intact, hop_protocol, message
from tests.support.tools import require

pytestmark = pytest.mark.timeout(120)


def test_swaks(world: World) -> None:
    swaks = require("swaks")
    tag = world.tag("swaks")
    sender, rcpts = world.sender(tag), world.rcpts(DOWN, tag, 2)
    sent = message(tag, sender, rcpts)
    path = world.base / f"{tag}.eml"
    path.write_bytes(sent.removesuffix(b"\r\n"))  # swaks ends the data with CRLF . CRLF
    done = subprocess.run(
        [swaks, "--server", f"{world.relay.host}:{world.relay.port}", "--helo", "client.test",
         "--from", sender, "--to", ",".join(rcpts), "--tls", "--auth", "PLAIN",
         "--auth-user", RELAY_ACCOUNT.user, "--auth-password", RELAY_ACCOUNT.password,
         "--data", f"@{path}"], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")[-3000:]
    copies = check_once_and_intact(world, DOWN, rcpts, sent, sender=sender)
    assert world.relay.log().count(f"from=<{sender}>") == 1
    assert hop_protocol(copies[rcpts[0]]) == "ESMTP"  # relay -> peer, plain listener
    world.relay.wait_log("sasl_method=PLAIN, sasl_username=relayuser")


def test_msmtp(world: World) -> None:
    msmtp = require("msmtp")
    tag = world.tag("msmtp")
    sender, rcpts = world.sender(tag), world.rcpts(DOWN, tag, 2)
    sent = message(tag, sender, rcpts)
    config = world.base / f"{tag}.msmtprc"
    config.write_text(
        f"account default\nhost {world.relay.host}\nport {world.relay.port}\n"
        f"domain client.test\nfrom {sender}\ntls on\ntls_starttls on\ntls_certcheck off\n"
        f"auth login\nuser {RELAY_ACCOUNT.user}\npassword {RELAY_ACCOUNT.password}\n")
    os.chmod(config, 0o600)
    done = subprocess.run([msmtp, "-C", str(config), "-f", sender, "--", *rcpts], input=sent,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    check_once_and_intact(world, DOWN, rcpts, sent, sender=sender)
    world.relay.wait_log("sasl_method=LOGIN, sasl_username=relayuser")


def test_python_smtplib(world: World) -> None:
    tag = world.tag("smtplib")
    sender, rcpts = world.sender(tag), world.rcpts(DOWN, tag, 2)
    sent = message(tag, sender, rcpts)
    with smtplib.SMTP(world.relay.host, world.relay.port, local_hostname="client.test",
                      timeout=60) as smtp:
        smtp.starttls(context=unverified_tls())
        smtp.login(RELAY_ACCOUNT.user, RELAY_ACCOUNT.password)
        refused = smtp.sendmail(sender, rcpts, sent)
    assert refused == {}
    check_once_and_intact(world, DOWN, rcpts, sent, sender=sender)


def test_sendmail_t_i_as_php_calls_it(world: World) -> None:
    """PHP's mail() runs ``sendmail -t -i`` and writes the message to it, with LF line
    ends; recipients come from To:, Cc: and Bcc:, and Bcc: is removed."""
    tag = world.tag("php")
    sender = world.sender(tag)
    to, cc, bcc = world.rcpts(DOWN, tag, 3)
    head = (f"To: {to}\nCc: <{cc}>\nBcc: {bcc}\nFrom: {sender}\nSubject: {tag}\n"
            f"Date: Wed, 02 Dec 2026 10:00:00 +0000\nMessage-ID: <{tag}@client.test>\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n")
    body = "Hello from PHP.\n.\nA line with a dot above.\n"
    sendmail = Path(sys.executable).parent / "sendmail"
    done = subprocess.run([str(sendmail), "-C", str(world.relay.config_dir), "-t", "-i",
                           f"-f{sender}"], input=(head + "\n" + body).encode(),
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    expected = (head.replace(f"Bcc: {bcc}\n", "") + "\n" + body).replace("\n", "\r\n")
    check_once_and_intact(world, DOWN, [to, cc, bcc], expected.encode(), sender=sender)
