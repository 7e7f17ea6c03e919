"""DANE for SMTP (RFC 7672): TLSA records matched against a server's certificate chain.

Owns which TLSA records SMTP can use (DANE-TA(2) and DANE-EE(3) with selector Cert(0) or
SPKI(1) and matching type Full(0), SHA2-256(1) or SHA2-512(2); PKIX-TA(0) and PKIX-EE(1)
are unusable for SMTP, RFC 7672 3.1.3) and the match itself:

- DANE-EE(3): the server's own certificate or public key matches; neither its names nor
  its dates are checked (RFC 7672 3.1.1).
- DANE-TA(2): a certificate the server sent above its own matches; every certificate
  from the server's up to that one was signed by the next and is within its dates, and
  the server's certificate matches one of the reference names (the TLSA base domain,
  that is the MX host name, and the next-hop domain; RFC 7672 3.2).

The reasons for a failure are OpenSSL's words, so that the log reads as Postfix's does.
Pure: the DNS lookups are relay.routing's, the handshake relay.tls.session's.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from relay.tls.certificate import Certificate
from relay.tls.policy import match_certificate

__all__ = ["Match", "match_chain", "usable"]

DANE_TA, DANE_EE = 2, 3
Record = tuple[int, int, int, bytes]  # usage, selector, matching type, data


def usable(records: Sequence[Record]) -> tuple[Record, ...]:
    """The records an SMTP client can use (RFC 7672 3.1.3, RFC 6698 2.1)."""
    return tuple(r for r in records
                 if r[0] in (DANE_TA, DANE_EE) and r[1] in (0, 1) and r[2] in (0, 1, 2)
                 and (r[2] != 1 or len(r[3]) == 32) and (r[2] != 2 or len(r[3]) == 64))


@dataclass(frozen=True, slots=True)
class Match:
    """``ok``, or ``reason`` in OpenSSL's words (``num=65:no matching DANE TLSA records``)
    and the RFC 8460 result type for a TLS report."""

    ok: bool
    reason: str = ""
    result_type: str = ""
    purpose: str = ""  # "server" or "CA", as Postfix words a failure about one


def _selected(cert: Certificate, selector: int) -> bytes:
    return cert.der if selector == 0 else cert.spki


def _matches(cert: Certificate, record: Record) -> bool:
    _, selector, mtype, data = record
    value = _selected(cert, selector)
    if mtype == 1:
        value = hashlib.sha256(value).digest()
    elif mtype == 2:
        value = hashlib.sha512(value).digest()
    return value == data


def match_chain(records: Sequence[Record], chain: Sequence[bytes], references: Sequence[str],
                now: datetime.datetime | None = None) -> Match:
    """Whether the chain the server sent (DER, its own certificate first) satisfies one of
    the usable ``records``; ``references`` are the names a DANE-TA match must carry."""
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        certs = [Certificate.from_der(der) for der in chain]
    except ValueError:
        return Match(False, "num=65:no matching DANE TLSA records", "validation-failure",
                     purpose="server")
    if not certs:
        return Match(False, "num=65:no matching DANE TLSA records", "validation-failure",
                     purpose="server")
    leaf = certs[0]
    records = usable(records)
    for record in records:
        if record[0] == DANE_EE and _matches(leaf, record):
            return Match(True)
    failure = Match(False, "num=65:no matching DANE TLSA records", "validation-failure",
                    purpose="server")
    for record in (r for r in records if r[0] == DANE_TA):
        for depth in range(1, len(certs)):
            if not _matches(certs[depth], record):
                continue
            for below, above in itertools.pairwise(certs[:depth + 1]):
                if not below.issued_by(above):
                    failure = Match(False, "num=7:certificate signature failure",
                                    "validation-failure", purpose="server")
                    break
            else:
                for at, cert in enumerate(certs[:depth + 1]):
                    why = cert.valid_at(now)
                    if why:
                        return Match(False, why, "certificate-expired"
                                     if why == "certificate has expired"
                                     else "validation-failure",
                                     purpose="CA" if at else "server")
                if match_certificate(leaf.names, references) is None:
                    return Match(False, "num=62:hostname mismatch", "certificate-host-mismatch",
                                 purpose="server")
                return Match(True)
    return failure
