"""TLS session tickets that every process accepting mail can decrypt (RFC 5077, RFC 8446 §4.6.1).

A client that resumes a TLS session presents the ticket an earlier handshake gave it; the
server decrypts it with its ticket keys and skips the certificate and key exchange.
OpenSSL makes random keys for each SSL_CTX, so a ticket issued by one listener process
means nothing to another, and a client that resumes would meet a full handshake in every
process but the one it first met.  Postfix shares its keys through tlsmgr(8); here the
master makes one set of keys (``new_keys``) and every process sets it on each server
context it builds (``share``), at start and at every reload.  The keys live as long as
the daemon: a restart makes new ones (OpenSSL's own keys live as long as a context).

Python's ssl module has no call for this, so ``share`` calls OpenSSL's own
SSL_CTX_set_tlsext_ticket_keys (the ``SSL_CTX_ctrl`` macro it is) on the SSL_CTX behind
an ``ssl.SSLContext``, found where CPython keeps it: the first field after the object
header of its ``PySSLContext``.  ``share`` reads the keys back to check that it wrote
where it meant to; tests/unit/test_tls_tickets.py checks that a session issued by one
context resumes on another.  Where any of this is missing or does not match, ``share``
returns False and each process keeps its own keys: resumption then works only within a
process, never less safely.  No I/O; nothing outlives the process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
import sys
from typing import Any

log = logging.getLogger("relay.smtpd")

KEY_LENGTH = 80  # OpenSSL 1.1 and 3: key name 16, HMAC secret 32, AES key 32
_SET_TICKET_KEYS = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS
_GET_TICKET_KEYS = 58  # SSL_CTRL_GET_TLSEXT_TICKET_KEYS

_ctrl: Any = None


def new_keys() -> bytes:
    return os.urandom(KEY_LENGTH)


def _ssl_ctx_ctrl() -> Any:
    global _ctrl
    if _ctrl is None:
        import _ssl

        ctrl = ctypes.CDLL(_ssl.__file__).SSL_CTX_ctrl
        ctrl.restype = ctypes.c_long
        ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        _ctrl = ctrl
    return _ctrl


def _ssl_ctx(context: ssl.SSLContext) -> int:
    """The SSL_CTX pointer of ``context``: PySSLContext's first field after PyObject_HEAD
    (CPython 3.8 to 3.13), checked by asking OpenSSL for that SSL_CTX's options, which
    must be the context's."""
    if sys.implementation.name != "cpython" or not (3, 8) <= sys.version_info[:2] <= (3, 13):
        raise OSError(f"unknown layout of ssl.SSLContext in {sys.implementation.name} "
                      f"{sys.version_info[:2]}")
    head = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)
    pointer = ctypes.c_void_p.from_address(id(context) + head).value
    if not pointer:
        raise OSError("no SSL_CTX found")
    import _ssl

    options = ctypes.CDLL(_ssl.__file__).SSL_CTX_get_options
    options.restype = ctypes.c_uint64
    options.argtypes = [ctypes.c_void_p]
    if options(pointer) != int(context.options):
        raise OSError("the SSL_CTX found is not the context's")
    return pointer


def share(context: ssl.SSLContext | None, keys: bytes) -> bool:
    """Give ``context`` these ticket keys; False (and a warning) if that cannot be done."""
    if context is None:
        return True
    if len(keys) != KEY_LENGTH:
        raise ValueError(f"ticket keys must be {KEY_LENGTH} bytes")
    try:
        ctrl = _ssl_ctx_ctrl()
        ctx = _ssl_ctx(context)
        given = ctypes.create_string_buffer(keys, KEY_LENGTH)
        if ctrl(ctx, _SET_TICKET_KEYS, KEY_LENGTH, given) != 1:
            raise OSError("SSL_CTX_set_tlsext_ticket_keys failed")
        back = ctypes.create_string_buffer(KEY_LENGTH)
        if ctrl(ctx, _GET_TICKET_KEYS, KEY_LENGTH, back) != 1 or back.raw != keys:
            raise OSError("the keys read back differ")
    except (OSError, AttributeError, ValueError) as exc:
        log.warning("TLS session tickets stay per process (a resumed session may meet a "
                     "full handshake): %s", exc)
        return False
    return True
