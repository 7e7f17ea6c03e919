"""relay -> relay as a smart host with STARTTLS and AUTH, the way a LAN relay forwards to
its provider's: the first relay's relayhost is the second, which takes mail from it only
after AUTH (its mynetworks does not hold the first one's address).

Issue 10: the first relay sends ``MAIL FROM:<...> AUTH=<>`` and the second answers
``555 MAIL FROM parameters not recognized``, so every message bounces.
"""

from __future__ import annotations

import shutil
import smtplib
import time
from collections.abc import Iterator

import pytest

from tests.interop.conftest import RELAY_ACCOUNT, start_relay
from tests.support.daemon import RelayDaemon, free_port
from tests.support.mta import instance_root, make_tls, message_difference
from tests.support.peers import PeerScript, ThreadedPeer

pytestmark = pytest.mark.timeout(120)



@pytest.fixture
def chain() -> Iterator[tuple[RelayDaemon, RelayDaemon, ThreadedPeer]]:
    base = instance_root("relay-smarthost-")
    try:
        with ThreadedPeer(PeerScript(hostname="sink.test")) as sink:
            tls = make_tls(base / "tls", "smarthost.test")
            upstream = start_relay(base / "smarthost", {
                "myhostname": "smarthost.test",
                "mynetworks": "127.0.0.2/32",  # not the LAN relay's 127.0.0.1: AUTH it is
                "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}",
                "smtpd_tls_cert_file": str(tls.cert), "smtpd_tls_key_file": str(tls.key),
                "smtpd_tls_security_level": "may", "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_password_file": "sasl_passwd",
            }, free_port())
            try:
                credentials = base / "sasl_passwd"
                credentials.write_text(f"[127.0.0.1]:{upstream.port} "
                                       f"{RELAY_ACCOUNT.user}:{RELAY_ACCOUNT.password}\n")
                lan = start_relay(base / "lan", {
                    "myhostname": "lan.test",
                    "relayhost": f"[127.0.0.1]:{upstream.port}",
                    "smtp_tls_security_level": "encrypt",
                    "smtp_sasl_auth_enable": "yes",
                    "smtp_sasl_password_maps": f"texthash:{credentials}",
                    "minimal_backoff_time": "2s", "maximal_backoff_time": "4s",
                    "queue_run_delay": "1s",
                }, free_port())
                try:
                    yield lan, upstream, sink
                finally:
                    lan.stop()
            finally:
                upstream.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_relay_to_relay_with_starttls_and_auth(
        chain: tuple[RelayDaemon, RelayDaemon, ThreadedPeer]) -> None:
    lan, upstream, sink = chain
    rcpts = [f"user{i}@far.test" for i in range(3)]
    sent = (b"From: <app@lan.test>\r\nTo: <user0@far.test>\r\nSubject: via two relays\r\n"
            b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <two@lan.test>\r\n\r\n"
            b"Hello.\r\n")
    with smtplib.SMTP(lan.host, lan.port, local_hostname="app.test", timeout=30) as smtp:
        assert smtp.sendmail("app@lan.test", rcpts, sent) == {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
            len(sink.messages) >= 1 or "status=bounced" in lan.log()):
        time.sleep(0.1)
    assert "status=bounced" not in lan.log(), lan.log()[-2000:]
    assert len(sink.messages) == 1, lan.log()[-2000:]
    got = sink.messages[0]
    assert set(got.recipients) == set(rcpts)
    assert message_difference(sent, got.data) is None, message_difference(sent, got.data)
    upstream.wait_log("sasl_method=PLAIN, sasl_username=relayuser")
    assert b"with ESMTPSA" in got.data.split(b"\r\n\r\n")[0]
