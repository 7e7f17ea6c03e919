"""The PROXY protocol (smtpd_upstream_proxy_protocol = haproxy): behind HAProxy the real
client address comes from the PROXY header, v1 or v2, and mynetworks, the relay check,
the per-client limits, the Received header and the maillog all use it; a connection
without a valid header is closed without a word.

The test plays HAProxy: it connects from 127.0.0.1 (outside mynetworks here) and writes
the header bytes itself.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
import time
from collections.abc import Iterator

import pytest

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

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(src: str, dst: str = "127.0.0.1", sport: int = 40000, dport: int = 25) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def proxy_v2(src: str, dst: str | None = None, sport: int = 40000, dport: int = 25,
             local: bool = False) -> bytes:
    if local:  # HAProxy's own health check: no addresses
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    s = ipaddress.ip_address(src)
    d = ipaddress.ip_address(dst or ("::1" if s.version == 6 else "127.0.0.1"))
    family = 0x11 if s.version == 4 else 0x21  # INET or INET6, STREAM
    body = s.packed + d.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


class ProxiedClient(Client):
    """A Client that sends a PROXY header before reading the banner."""

    def __init__(self, port: int, header: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.sock.sendall(header)
        self.buf = b""
        self.banner = self.reply()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayDaemon]:
    d = RelayDaemon(tmp_path_factory.mktemp("relay"), {
        **HOLD_DELIVERY, "mynetworks": "127.0.0.2/32, 10.1.0.0/16",
        "relay_domains": "example.com", "smtpd_upstream_proxy_protocol": "haproxy",
        "smtpd_upstream_proxy_timeout": "1s", "smtpd_client_connection_count_limit": "1",
    }).start(wait=False)
    end = time.monotonic() + 15
    while True:
        try:
            with ProxiedClient(d.port, proxy_v2("", local=True)) as c:
                assert c.banner.startswith("220")
                break
        except (OSError, ConnectionError):
            assert time.monotonic() < end, d.stderr()
            time.sleep(0.1)
    yield d
    d.stop()


def closed_silently(s: socket.socket, wait: float = 5.0) -> bytes:
    s.settimeout(wait)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def serves_next_client(d: RelayDaemon) -> None:
    with ProxiedClient(d.port, proxy_v1("10.1.2.3")) as c:
        assert c.banner.startswith("220 relay.test"), c.banner
        assert c.cmd("NOOP").startswith("250")


@pytest.mark.parametrize("header,address", [
    (proxy_v1("192.0.2.7"), "192.0.2.7"),
    (proxy_v1("2001:db8::7", "::1"), "2001:db8::7"),
    (proxy_v2("198.51.100.9"), "198.51.100.9"),
    (proxy_v2("2001:db8::9"), "2001:db8::9"),
], ids=["v1-tcp4", "v1-tcp6", "v2-inet", "v2-inet6"])
def test_the_client_address_comes_from_the_header(relay: RelayDaemon, header: bytes,
                                                  address: str) -> None:
    d = relay
    before = assert_consistent(d)
    with ProxiedClient(d.port, header) as c:
        assert c.banner.startswith("220 relay.test")
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@sender.example>")
        # 127.0.0.1 (the proxy) is not in mynetworks, and neither is the real client.
        assert c.cmd("RCPT TO:<a@other.org>") == "554 5.7.1 <a@other.org>: Relay access denied"
        assert c.cmd("RCPT TO:<a@example.com>").startswith("250")
        queue_id = queue_id_of(c.data(b"Subject: proxied\r\n\r\nbody\r\n"))
    env = find_envelope(d, queue_id)
    assert (env.client_name, env.client_address) == ("unknown", address)
    received, _ = split_received(content_of(d, queue_id))
    assert f"(unknown [{address}])".encode() in received, received
    log = d.wait_log(f"NOQUEUE: reject: RCPT from unknown[{address}]")
    assert re.search(rf"relay/smtpd\[\d+\]: connect from unknown\[{re.escape(address)}\]$",
                     log, re.MULTILINE), log
    assert f"{queue_id}: client=unknown[{address}]" in log
    assert assert_consistent(d) - before == {queue_id}


@pytest.mark.parametrize("header", [proxy_v1("10.1.0.5"), proxy_v2("10.1.0.6")],
                         ids=["v1", "v2"])
def test_mynetworks_applies_to_the_real_client(relay: RelayDaemon, header: bytes) -> None:
    with ProxiedClient(relay.port, header) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@sender.example>")
        assert c.cmd("RCPT TO:<a@other.org>").startswith("250 2.1.5")


def test_local_health_check_uses_the_proxy_address(relay: RelayDaemon) -> None:
    with ProxiedClient(relay.port, proxy_v2("", local=True)) as c:
        assert c.banner.startswith("220")
        assert c.cmd("QUIT").startswith("221")
    relay.wait_log("connect from localhost[127.0.0.1]")


def test_limits_count_the_real_client(relay: RelayDaemon) -> None:
    d = relay
    first = ProxiedClient(d.port, proxy_v1("203.0.113.1"))
    try:
        assert first.banner.startswith("220")
        # smtpd_client_connection_count_limit = 1, per real client, not per proxy.
        with ProxiedClient(d.port, proxy_v1("203.0.113.1")) as second:
            assert second.banner == \
                "421 4.7.0 relay.test Error: too many connections from 203.0.113.1"
            assert second.closed()
        with ProxiedClient(d.port, proxy_v2("203.0.113.2")) as other:
            assert other.banner.startswith("220")
    finally:
        first.sock.close()
    d.wait_log("Connection concurrency limit exceeded: 2 from unknown[203.0.113.1]")


@pytest.mark.parametrize("payload,error", [
    (b"EHLO client.example\r\n", "PROXY unrecognized signature"),
    (b"PROXY TCP4 999.0.2.1 127.0.0.1 1 25\r\nEHLO x\r\n", "PROXYv1 address malformed"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 1 25 extra\r\n", "PROXYv1 unrecognized extraneous data"),
    (b"PROXY UDP4 192.0.2.1 127.0.0.1 1 25\r\n", "PROXYv1 unrecognized protocol"),
    (V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12, "PROXYv2 illegal version"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 1 " + b"9" * 200 + b"\r\n", "PROXYv1 header too long"),
], ids=["none", "bad-address", "extra", "udp", "v2-version", "too-long"])
def test_a_bad_header_is_closed_silently(relay: RelayDaemon, payload: bytes, error: str) -> None:
    d = relay
    before = assert_consistent(d)
    with socket.create_connection(("127.0.0.1", d.port)) as s:
        s.sendall(payload)
        assert closed_silently(s) == b""
    d.wait_log(f"warning: haproxy read: {error} from [127.0.0.1]")
    assert assert_consistent(d) == before
    serves_next_client(d)


@pytest.mark.parametrize("payload", [b"", b"PROXY TCP4 192.0.2.1", proxy_v2("192.0.2.1")[:20],
                                     None],
                         ids=["silent", "v1-partial", "v2-partial", "trickle"])
def test_no_header_within_the_timeout(relay: RelayDaemon, payload: bytes | None) -> None:
    d = relay
    with socket.create_connection(("127.0.0.1", d.port)) as s:
        start = time.monotonic()
        if payload is None:  # a byte every 0.2 s: each read is quick, the header never done
            for byte in b"PROXY TCP4 192.0.2.1 127.0.0.1 1 25":
                try:
                    s.send(bytes([byte]))
                except OSError:
                    break
                if time.monotonic() - start > 4:
                    break
                time.sleep(0.2)
        else:
            s.sendall(payload)
        assert closed_silently(s) == b""
        assert 0.8 <= time.monotonic() - start <= 3
    d.wait_log("warning: haproxy read: timeout error from [127.0.0.1]")
    serves_next_client(d)
