"""Outbound TLS with ``relay serve`` as a subprocess: relay -> relay, relay -> Postfix,
relay -> scripted servers, and the log in Postfix 3.7.11's words.

- The three next hops of /work/shared/postfix-reference/maillog-tls-verify.txt (a policy
  table entry ``[127.0.0.1]:PORT verify match=upstream.bar.test`` for each; a certificate
  for that name, one for another name, a self-signed one) give relay's maillog the same
  lines, word for word up to what Python's ssl module cannot tell (key exchange and
  signature details at the end of the "TLS connection established" line).
- relay A delivers to relay B at verify level, a REQUIRETLS message among others: B
  offers REQUIRETLS only over TLS and keeps the flag in its queue file.
- A REQUIRETLS message to a next hop that does not offer REQUIRETLS, or whose
  certificate does not verify, bounces with 5.7.30.
- relay delivers to a private Postfix at the secure level.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from spool.envelope import loads
from tests.integration.test_accept import HOLD_DELIVERY
from tests.support.certs import Certs, make_certs
from tests.support.daemon import RelayDaemon
from tests.support.peers import PeerScript, Reply, ThreadedPeer

pytestmark = pytest.mark.timeout(90)

REFERENCE = Path("/work/shared/postfix-reference/maillog-tls-verify.txt")
MESSAGE = "Subject: tls\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def certs() -> Certs:
    return make_certs("upstream.bar.test", "127.0.0.1", "localhost")


@pytest.fixture
def ca_file(certs: Certs, tmp_path: Path) -> Path:
    return certs.write_ca(tmp_path / "ca.pem")


def _normalise(line: str) -> str:
    """A maillog line without its prefix, ports, queue IDs and timings."""
    text = re.sub(r"^.*?\]: ", "", line.strip())
    text = re.sub(r"\]:\d+", "]:PORT", text)
    text = re.sub(r"^[0-9A-Za-z]{8,20}: ", "QID: ", text)
    text = re.sub(r"delay=[\d.]+, delays=[\d./]+", "delay=D, delays=D", text)
    return re.sub(r"\(256/256 bits\).*", "(256/256 bits)", text)


def _postfix_lines() -> list[str]:
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} is not on this machine")
    return [_normalise(line) for line in REFERENCE.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_the_log_says_what_postfix_says(tmp_path: Path, certs: Certs, ca_file: Path) -> None:
    kept = PeerScript(hostname="upstream.bar.test", starttls=True,
                      final=Reply(250, "2.0.0 Ok: kept"))
    with ThreadedPeer(kept, tls_context=certs["good"].server_context()) as good, \
            ThreadedPeer(kept, tls_context=certs["wrong_name"].server_context()) as wrong, \
            ThreadedPeer(kept, tls_context=certs["self_signed"].server_context()) as own:
        hops = {"good.test": good.port, "wrong.test": wrong.port, "self.test": own.port}
        transport = ", ".join(f"{d} = smtp:[127.0.0.1]:{p}" for d, p in hops.items())
        policy = ", ".join(f"{{ [127.0.0.1]:{p} = verify match=upstream.bar.test }}"
                           for p in hops.values())
        relay = RelayDaemon(tmp_path / "relay", {
            "myhostname": "relay-bar.test",
            "transport_maps": f"inline:{{ {transport} }}",
            "smtp_tls_policy_maps": f"inline:{{ {policy} }}",
            "smtp_tls_CAfile": str(ca_file),
            "smtp_tls_loglevel": "1",
        }).start()
        try:
            with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
                for domain in ("good.test", "wrong.test", "self.test"):
                    client.sendmail("a@relay-bar.test", [f"u@{domain}"], MESSAGE)
            relay.wait_log("status=sent", timeout=30)
            relay.wait_log("status=deferred", count=2, timeout=30)
            log = relay.log()
        finally:
            relay.stop()
    ours = [_normalise(line) for line in log.splitlines()]
    for line in _postfix_lines():
        if line.startswith("QID: to=<u@good.test>"):
            # Postfix's reply text: our peer says the same ("250 2.0.0 Ok: kept").
            pass
        assert line in ours, f"Postfix logs\n  {line}\nrelay's log:\n" + "\n".join(ours)
    assert len(good.messages) == 1 and not wrong.messages and not own.messages


@pytest.fixture
def relay_b(tmp_path: Path, certs: Certs) -> Iterator[RelayDaemon]:
    """Relay B: STARTTLS with the good certificate; takes mail and holds it."""
    cert, key = certs["good"].write(tmp_path)
    b = RelayDaemon(tmp_path / "b", {
        **HOLD_DELIVERY, "myhostname": "relay-b.test", "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key),
        "smtpd_tls_loglevel": "1",
    }).start()
    try:
        yield b
    finally:
        b.stop()


def relay_a(base: Path, certs: Certs, ca_file: Path, nexthop: str, **params: str) -> RelayDaemon:
    """Relay A: STARTTLS for its own clients (REQUIRETLS needs it), everything to
    ``nexthop`` at verify level."""
    base.mkdir(parents=True, exist_ok=True)
    cert, key = certs["good"].write(base)
    return RelayDaemon(base, {
        "myhostname": "relay-a.test", "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key),
        "transport_maps": f"inline:{{ * = smtp:{nexthop} }}",
        "smtp_tls_security_level": "verify", "smtp_tls_CAfile": str(ca_file),
        "smtp_tls_loglevel": "1", "minimal_backoff_time": "1h", "queue_run_delay": "1h",
        **params,
    }).start()


def submit(d: RelayDaemon, *, requiretls: bool, rcpt: str = "u@far.test") -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP(d.host, d.port, timeout=10) as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        assert client.has_extn("requiretls")
        options = ["REQUIRETLS"] if requiretls else []
        client.sendmail("a@client.test", [rcpt], MESSAGE, mail_options=options)


def test_relay_to_relay_at_verify_with_requiretls(tmp_path: Path, certs: Certs, ca_file: Path,
                                                  relay_b: RelayDaemon) -> None:
    # B offers REQUIRETLS only over TLS, and refuses it in plaintext, as Postfix 3.11 does.
    with smtplib.SMTP(relay_b.host, relay_b.port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("requiretls")
        code, text = client.docmd("MAIL FROM:<a@client.test> REQUIRETLS")
        assert (code, text) == (555, b"5.5.4 Unsupported option: REQUIRETLS")
    a = relay_a(tmp_path / "a", certs, ca_file, f"[127.0.0.1]:{relay_b.port}")
    try:
        submit(a, requiretls=True, rcpt="u1@far.test")
        submit(a, requiretls=False, rcpt="u2@far.test")
        log_a = a.wait_log("status=sent", count=2, timeout=30)
    finally:
        a.stop()
    assert f"Verified TLS connection established to 127.0.0.1[127.0.0.1]:{relay_b.port}: " \
           "TLSv1.3 with cipher" in log_a
    assert re.search(r"Anonymous TLS connection established from \S+\[127\.0\.0\.1\]: "
                     r"TLSv1\.3 with cipher \S+ \(\d+/\d+ bits\)", relay_b.log())
    kept = {}
    for queue in ("incoming", "active", "deferred"):
        for name in relay_b.queue_files(queue):
            env = loads((relay_b.queue_directory / queue / name).read_bytes())
            kept[env.recipients[0].address] = env.requiretls
    assert kept == {"u1@far.test": True, "u2@far.test": False}


@pytest.mark.parametrize("served,offers,reason", [
    ("good", False, ("Sender requested REQUIRETLS, but no server was found that supports "
                     "REQUIRETLS. The last attempted server was 127.0.0.1[127.0.0.1]")),
    ("wrong_name", True, ("Sender requested REQUIRETLS, but no matching server certificate "
                          "was found. The last attempted server was 127.0.0.1[127.0.0.1]")),
])
def test_requiretls_bounces_when_it_cannot_be_honoured(
        tmp_path: Path, certs: Certs, ca_file: Path, served: str, offers: bool,
        reason: str) -> None:
    script = PeerScript(hostname="upstream.bar.test", starttls=True)
    if offers:
        script = PeerScript(hostname="upstream.bar.test", starttls=True, ehlo=Reply(
            250, "upstream.bar.test\nPIPELINING\nSTARTTLS\nENHANCEDSTATUSCODES\nREQUIRETLS"))
    with ThreadedPeer(script, tls_context=certs[served].server_context()) as peer:
        a = relay_a(tmp_path / "a", certs, ca_file, f"[127.0.0.1]:{peer.port}",
                    smtp_tls_security_level="may")
        try:
            submit(a, requiretls=True)
            log = a.wait_log("status=bounced", timeout=30)
        finally:
            a.stop()
        # Only the sender's notice went there (the peer takes it: no REQUIRETLS on it).
        assert [m.recipients for m in peer.messages] in ([], [("a@client.test",)])
    line = next(li for li in log.splitlines() if "to=<u@far.test>" in li and "bounced" in li)
    assert f"dsn=5.7.30, status=bounced ({reason})" in line


def test_relay_to_postfix_at_the_secure_level(tmp_path: Path) -> None:
    from tests.support.mta import PostfixPeer, instance_root

    PostfixPeer.require()
    base = instance_root("relay-tls-postfix-")
    with PostfixPeer(base / "postfix", local_domains=["postfix.test"]) as postfix:
        port = postfix.ports["tls"]
        a = RelayDaemon(tmp_path / "a", {
            "transport_maps": f"inline:{{ postfix.test = smtp:[127.0.0.1]:{port} }}",
            "smtp_tls_policy_maps":
                f"inline:{{ {{ [127.0.0.1]:{port} = secure match=postfix.test }} }}",
            "smtp_tls_CAfile": str(postfix.tls.ca), "smtp_tls_loglevel": "1",
        }).start()
        try:
            with smtplib.SMTP(a.host, a.port, timeout=10) as client:
                client.sendmail("a@relay.test", ["u@postfix.test"], MESSAGE)
            log = a.wait_log("status=sent", timeout=30)
        finally:
            a.stop()
        assert f"Verified TLS connection established to 127.0.0.1[127.0.0.1]:{port}: " in log
        postfix.store.wait(["u@postfix.test"])
        assert b"body" in postfix.store.messages("u@postfix.test")[0]
