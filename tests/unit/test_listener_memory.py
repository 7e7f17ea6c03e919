"""A closed connection is freed when it closes, not when the cycle collector next runs.

Each connection of the listener is an aiosmtpd protocol object (relay.smtpd.engine.Engine)
with its session, stream writer and, after STARTTLS, asyncio's TLS layer: an OpenSSL
connection and a 256 KiB read buffer.  Left in reference cycles, hundreds of closed
connections waited at a time for the collector, and the listener grew by about 100 MB under
a STARTTLS load.  Here the collector is off while real clients connect, talk and leave over
loopback (plain, STARTTLS, a dropped connection, a timed-out one); afterwards no Engine, no
session and no TLS object is left.
"""

from __future__ import annotations

import gc
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from relay.smtpd.engine import Engine
from relay.smtpd.session import Session
from tests.support.live_listener import LiveListener


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def left(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


def test_closed_connections_leave_nothing_for_the_collector(
        tmp_path: Path, collector_off: None) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("relay.test", "127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    live = LiveListener(tmp_path, tls_context=server_ctx, tls_security_level="may", timeout=0.5)
    try:
        for n in range(4):
            with smtplib.SMTP("127.0.0.1", live.port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                if n % 2:
                    smtp.starttls(context=client_ctx)
                    smtp.ehlo("client.test")
                smtp.sendmail("a@client.test", ["b@relay.test"], b"Subject: x\r\n\r\nbody\r\n")
        with smtplib.SMTP("127.0.0.1", live.port, timeout=10) as smtp:  # STARTTLS, then gone
            smtp.ehlo("client.test")
            smtp.starttls(context=client_ctx)
            smtp.sock.close()
        with socket.create_connection(("127.0.0.1", live.port)) as sock:  # a failed handshake
            sock.recv(512)
            sock.sendall(b"EHLO client.test\r\n")
            sock.recv(512)
            sock.sendall(b"STARTTLS\r\n")
            sock.recv(512)
            sock.sendall(b"MAIL FROM:<not-a-client-hello@client.test>\r\n" * 4)
            sock.recv(512)
        with socket.create_connection(("127.0.0.1", live.port)) as sock:  # silent in the handshake
            sock.recv(512)
            sock.sendall(b"EHLO client.test\r\n")
            sock.recv(512)
            sock.sendall(b"STARTTLS\r\n")
            sock.recv(512)
            sock.settimeout(5)
            # smtpd_timeout ends it, with no plaintext 421 into the handshake.
            assert sock.recv(512) == b""
        with socket.create_connection(("127.0.0.1", live.port)) as sock:  # silent: timed out
            sock.recv(512)
            time.sleep(1.0)
        live.wait_idle()
        time.sleep(0.2)  # the last connection_lost and task ends run on the listener's loop
        assert len(live.acknowledged) == 4
        assert (left(Engine), left(Session), left(ssl.SSLObject)) == (0, 0, 0)
    finally:
        live.close()
