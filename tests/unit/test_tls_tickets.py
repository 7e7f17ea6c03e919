"""relay.smtpd.tickets: a TLS session issued by one listener process resumes on another.

Two server contexts stand for two processes; each gets the same keys, as every process of
a daemon does.  The client offers the session the first gave it to the second: resumed.
Without shared keys it is not, which is why the listener processes share them."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest

from relay.smtpd import tickets
from tests.support.certs import CertCase, make_certs


def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
              session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession | None]:
    """One TLS connection on loopback; whether it resumed, and the session it gave."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        conn, _ = listener.accept()
        with server.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)
            tls.sendall(b"x")  # after the ticket (TLS 1.3 sends it after the handshake)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname="relay.test", session=session) as tls:
            tls.sendall(b"y")
            tls.recv(1)
            return tls.session_reused, tls.session
    finally:
        thread.join(10)
        listener.close()


@pytest.fixture(scope="module")
def pki() -> tuple[CertCase, ssl.SSLContext]:
    """The server's certificate, and a client context that trusts it."""
    certs = make_certs("relay.test")
    return certs["good"], ssl.create_default_context(cadata=certs.ca_pem.decode())


def test_a_session_from_one_process_resumes_on_another(
        pki: tuple[CertCase, ssl.SSLContext]) -> None:
    case, client = pki
    keys = tickets.new_keys()
    first, second = case.server_context(), case.server_context()
    assert tickets.share(first, keys) and tickets.share(second, keys)
    resumed, session = handshake(first, client, None)
    assert not resumed and session is not None
    resumed, _ = handshake(second, client, session)
    assert resumed


def test_without_shared_keys_it_does_not(pki: tuple[CertCase, ssl.SSLContext]) -> None:
    case, client = pki
    _, session = handshake(case.server_context(), client, None)
    resumed, _ = handshake(case.server_context(), client, session)
    assert not resumed


def test_keys_of_the_wrong_length_are_refused(pki: tuple[CertCase, ssl.SSLContext]) -> None:
    with pytest.raises(ValueError, match="80 bytes"):
        tickets.share(pki[0].server_context(), b"short")
