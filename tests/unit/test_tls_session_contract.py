"""The contract between relay.tls.session and what it uses beyond public APIs.

relay.tls.session reads the certificates a server sent with the C-level
``SSLObject._sslobj.get_unverified_chain()`` before Python 3.13 (public from 3.13), and
OpenSSL's verification verdict from pyOpenSSL's ``X509StoreContextError`` (``errors`` as
[code, depth, text], ``certificate``).  A Python or pyOpenSSL upgrade that changes either
fails here, naming it.  The handshake runs in memory (two MemoryBIO pairs), no socket.
"""

from __future__ import annotations

import ssl

from cryptography import x509
from OpenSSL import crypto

from relay.tls import session
from tests.support.certs import make_certs


def _handshake(server: ssl.SSLContext) -> ssl.SSLObject:
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, srv):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client.version() and srv.version():
            break
    return client


def test_the_chain_the_server_sent_is_readable() -> None:
    certs = make_certs("mx.test")
    obj = _handshake(certs["good"].server_context())
    if not hasattr(obj, "get_unverified_chain"):
        assert hasattr(obj, "_sslobj"), "ssl.SSLObject._sslobj is gone"
        assert hasattr(obj._sslobj, "get_unverified_chain"), \
            "_ssl._SSLSocket.get_unverified_chain is gone"
    chain = session.peer_chain(obj)
    assert chain[0] == certs["good"].der
    assert len(chain) == 2  # the leaf and the CA the test server sends along
    assert x509.load_der_x509_certificate(chain[1]).subject == \
        x509.load_der_x509_certificate(certs.ca_der).subject


def test_openssl_verdicts_come_with_code_depth_text_and_certificate() -> None:
    certs = make_certs("mx.test")
    leaf = x509.load_pem_x509_certificate(certs["self_signed"].cert_pem)
    try:
        crypto.X509StoreContext(crypto.X509Store(),
                                crypto.X509.from_cryptography(leaf)).verify_certificate()
    except crypto.X509StoreContextError as exc:
        assert [type(v) for v in exc.errors] == [int, int, str], \
            "X509StoreContextError.errors is no longer [code, depth, text]"
        assert exc.errors[0] == 18 and exc.errors[2] == "self-signed certificate"
        assert exc.certificate.to_cryptography() == leaf, \
            "X509StoreContextError.certificate changed"
    else:
        raise AssertionError("a self-signed certificate verified")
