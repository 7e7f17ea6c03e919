"""Issue 10: relay -> relay as a smart host with AUTH, both daemons as subprocesses.

Relay A relays everything to relay B over STARTTLS with SMTP AUTH (smtp_sasl_auth_enable,
smtp_sasl_password_maps); B takes the mail as an authenticated client and passes it to a
scripted next hop.  With Postfix's default smtp_send_dummy_mail_auth = no, A's MAIL FROM
carries no AUTH=<> (which a server may refuse: the cause of every message bouncing); with
yes it does, and B takes it as Postfix's smtpd does.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_security_auth import relay_passwd
from tests.support.daemon import RelayDaemon
from tests.support.peers import ThreadedPeer

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def smarthost(tmp_path: Path) -> Iterator[tuple[RelayDaemon, ThreadedPeer]]:
    """Relay B: TLS, AUTH for alice, nothing relayed for 127.0.0.1 without a login."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("smarthost.test", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    with ThreadedPeer() as peer:
        b = RelayDaemon(tmp_path / "b", {
            "myhostname": "smarthost.test", "mynetworks": "127.0.0.2/32",
            "relay_domains": "", "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key),
            "smtpd_sasl_auth_enable": "yes", "smtpd_sasl_password_file": "sasl_passwd",
            "relayhost": f"[127.0.0.1]:{peer.port}",
        })
        done = relay_passwd(b.config_dir, "alice", password="s3cret-horse")
        assert done.returncode == 0, done.stderr
        b.start()
        try:
            yield b, peer
        finally:
            b.stop()


def client_relay(base: Path, b: RelayDaemon, dummy: bool) -> RelayDaemon:
    """Relay A: everything to B, STARTTLS required, alice's login."""
    passwords = base / "sasl_passwd"
    base.mkdir(parents=True, exist_ok=True)
    passwords.write_text(f"[127.0.0.1]:{b.port} alice:s3cret-horse\n")
    passwords.chmod(0o600)
    return RelayDaemon(base, {
        "myhostname": "client-relay.test",
        "relayhost": f"[127.0.0.1]:{b.port}",
        "smtp_tls_security_level": "encrypt",
        "smtp_sasl_auth_enable": "yes",
        "smtp_sasl_password_maps": f"texthash:{passwords}",
        "smtp_send_dummy_mail_auth": "yes" if dummy else "no",
    }).start()


@pytest.mark.parametrize("dummy", [False, True])
def test_relay_to_relay_with_auth_delivers(
        tmp_path: Path, smarthost: tuple[RelayDaemon, ThreadedPeer], dummy: bool) -> None:
    """By default no AUTH=<> at all; with smtp_send_dummy_mail_auth = yes, B's listener
    takes MAIL FROM:<...> AUTH=<> as Postfix's smtpd does."""
    b, peer = smarthost
    a = client_relay(tmp_path / "a", b, dummy)
    try:
        with smtplib.SMTP(a.host, a.port, timeout=10) as s:
            for n in range(3):
                s.sendmail("alice@client.test", [f"bob{n}@far.test"],
                           f"Subject: via smarthost {n}\r\n\r\nbody {n}\r\n")
        peer.wait_for(3, timeout=30)
        log_a = a.wait_log("status=sent", count=3, timeout=30)
    finally:
        a.stop()
    assert "status=bounced" not in log_a
    assert sorted(m.recipients[0] for m in peer.messages) == \
        ["bob0@far.test", "bob1@far.test", "bob2@far.test"]
    # B took them from an authenticated client.  (Before issue 10 A sent AUTH=<> and B's
    # listener refused it: all three bounced.)
    log_b = b.log()
    assert log_b.count("sasl_username=alice") >= 3, log_b[-3000:]
