"""The client side of one TLS session: its context, the checks after the handshake, the log.

Owns the ``ssl.SSLContext`` of a handshake (protocol range and cipher list of the server's
HostPolicy), the verification of what the server presented once the handshake is done,
and Postfix's words for it: ``Verified``, ``Trusted``, ``Untrusted`` or ``Anonymous TLS
connection established to HOST[IP]:PORT: TLSv1.3 with cipher NAME (BITS/BITS bits)`` at
smtp_tls_loglevel 1, and at levels that must match, whatever the log level, the reason a
certificate failed (``server certificate verification failed for ...: num=62:hostname
mismatch``, ``certificate verification failed for ...: untrusted issuer /CN=...``) with
its subject and issuer, as src/tls/tls_verify.c and tls_client.c write them.

As in Postfix, the handshake never fails for a certificate: the chain is verified after it,
by OpenSSL's own X509_verify_cert() (through pyOpenSSL's X509StoreContext) against
smtp_tls_CAfile and smtp_tls_CApath, else the trust store OpenSSL finds by default
(honouring SSL_CERT_FILE and SSL_CERT_DIR); the names are then checked as relay.tls.policy
says, and DANE records as relay.tls.dane says.  So every level logs the same facts, an
MTA-STS policy in testing mode learns what enforcing would have done without a second
connection, and the reason is OpenSSL's.

What this module relies on beyond public APIs: the certificates the server sent, which
Python offers as ``SSLObject.get_unverified_chain()`` from 3.13 and, before, as the
method of the same name of the C-level ``SSLObject._sslobj`` (returning ``_ssl.Certificate``
objects with ``public_bytes(ENCODING_DER)``).  tests/unit/test_tls_session_contract.py
checks it on the running Python.

Never: decides whether mail goes (relay.delivery does, from the Verdict), keeps state
beyond the cached contexts and trust stores, writes anything: a crash ends the session it
was checking and leaves nothing on disk.
"""

from __future__ import annotations

import _ssl
import datetime
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509
from OpenSSL import crypto

from relay.tls import dane
from relay.tls.certificate import Certificate
from relay.tls.policy import HostPolicy, Level, match_certificate

__all__ = ["Contexts", "TrustStores", "Verdict", "evaluate", "peer_chain", "summary"]

log = logging.getLogger("relay.smtp")

# OpenSSL's X509_V_ERR_* codes that Postfix words on its own (src/tls/tls_verify.c).
_SELF_SIGNED_LEAF = 18
_UNTRUSTED_ISSUER = (19, 20)
_NOT_YET_VALID = (9, 13)
_EXPIRED = (10, 14)
_CERT_UNTRUSTED = 27
_INVALID_PURPOSE = 26
_CHAIN_TOO_LONG = 22
_HOSTNAME_MISMATCH = 62


class Contexts:
    """One client SSLContext per protocol range and cipher list (contexts are costly)."""

    def __init__(self) -> None:
        self._made: dict[tuple[object, ...], ssl.SSLContext] = {}

    def get(self, policy: HostPolicy) -> ssl.SSLContext:
        key = (policy.minimum, policy.maximum, policy.ciphers)
        context = self._made.get(key)
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            # The certificate is checked after the handshake (see the module's docstring).
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.minimum_version = policy.minimum
            context.maximum_version = policy.maximum
            if policy.ciphers:
                context.set_ciphers(policy.ciphers)
            self._made[key] = context
        return context


class TrustStores:
    """The trust anchors of smtp_tls_CAfile/smtp_tls_CApath, else OpenSSL's defaults."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, str], crypto.X509Store] = {}

    def get(self, ca_file: str, ca_path: str) -> crypto.X509Store:
        key = (ca_file, ca_path)
        store = self._made.get(key)
        if store is None:
            store = crypto.X509Store()
            if not ca_file and not ca_path:
                paths = ssl.get_default_verify_paths()  # SSL_CERT_FILE, SSL_CERT_DIR honoured
                ca_file, ca_path = paths.cafile or "", paths.capath or ""
            try:
                store.load_locations(ca_file or None, ca_path or None)
            except (crypto.Error, OSError) as exc:
                log.warning("cannot load trust anchors from %s: %s",
                            " and ".join(p for p in (ca_file, ca_path) if p) or "defaults", exc)
            self._made[key] = store
        return store


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the handshake gave: Postfix's trust word, whether the policy is satisfied, and
    why not (Postfix's log text, RFC 8460 result type)."""

    trust: str  # Verified, Trusted, Untrusted, Anonymous
    satisfied: bool  # the level's demands are met (always True below must-match levels)
    failure: str = ""  # e.g. "num=62:hostname mismatch", without "... failed for HOST: "
    purpose: str = ""  # "server", "CA" or "" as Postfix prefixes the failure line
    result_type: str = ""  # RFC 8460 4.3
    subject_cn: str = ""
    issuer_cn: str = ""
    protocol: str = ""
    cipher: str = ""
    bits: int = 0


def peer_chain(obj: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, its own first, as DER."""
    public = getattr(obj, "get_unverified_chain", None)
    if public is not None:  # Python 3.13+
        return [bytes(der) for der in public() or []]
    certs: Sequence[Any] = obj._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]
    return [cert.public_bytes(_ssl.ENCODING_DER) for cert in certs]


def _chain_failure(store: crypto.X509Store, chain: list[Certificate]) -> tuple[str, str, str]:
    """("" or Postfix's failure text, purpose word, RFC 8460 type) of OpenSSL's verdict."""
    leaf = crypto.X509.from_cryptography(chain[0].parsed)
    rest = [crypto.X509.from_cryptography(c.parsed) for c in chain[1:]]
    try:
        crypto.X509StoreContext(store, leaf, rest).verify_certificate()
    except crypto.X509StoreContextError as exc:
        code, depth, text = int(exc.errors[0]), int(exc.errors[1]), str(exc.errors[2])
        purpose = "CA" if depth > 0 else "server"
        if code == _CERT_UNTRUSTED:
            return "not trusted by local or TLSA policy", "", "certificate-not-trusted"
        if code == _SELF_SIGNED_LEAF:
            return "self-signed certificate", "", "validation-failure"
        if code in _UNTRUSTED_ISSUER:
            issuer = _oneline(exc.certificate.to_cryptography().issuer)
            return f"untrusted issuer {issuer}", "", "validation-failure"
        if code in _NOT_YET_VALID:
            return "certificate not yet valid", purpose, "validation-failure"
        if code in _EXPIRED:
            return "certificate has expired", purpose, "certificate-expired"
        if code == _INVALID_PURPOSE:
            return (f"not designated for use as a {purpose} certificate", "",
                    "validation-failure")
        if code == _CHAIN_TOO_LONG:
            return (f"certificate chain longer than limit({depth - 1})", "",
                    "validation-failure")
        return f"num={code}:{text}", purpose, "validation-failure"
    return "", "", ""


def _oneline(name: x509.Name) -> str:
    return "".join(f"/{attr.rfc4514_attribute_name}={attr.value!s}" for attr in name)


def evaluate(obj: ssl.SSLObject, policy: HostPolicy, store: crypto.X509Store,
             now: datetime.datetime | None = None) -> Verdict:
    """Check what the server presented against ``policy``, as Postfix's verify_x509()
    and the DANE code do; nothing is logged here."""
    cipher = obj.cipher() or ("", "", 0)
    base = Verdict("Untrusted", False, protocol=obj.version() or "",
                   cipher=cipher[0], bits=int(cipher[2] or 0))
    must_match = policy.level.must_match or policy.sts_testing
    try:
        chain = [Certificate.from_der(der) for der in peer_chain(obj)]
    except ValueError:
        chain = []
    if not chain:
        der = obj.getpeercert(binary_form=True)
        try:
            chain = [Certificate.from_der(der)] if der else []
        except ValueError:
            chain = []
    if not chain:
        return replace(base, trust="Anonymous", satisfied=not must_match,
                       failure="no certificate presented", result_type="validation-failure")
    leaf = chain[0]
    base = replace(base, subject_cn=leaf.subject_cn, issuer_cn=leaf.issuer_cn)
    if policy.level in (Level.DANE, Level.DANE_ONLY) and policy.tlsa:
        found = dane.match_chain(policy.tlsa, [c.der for c in chain], policy.references, now)
        if found.ok:
            return replace(base, trust="Verified", satisfied=True)
        return replace(base, failure=found.reason, result_type=found.result_type,
                       purpose=found.purpose)
    failure, purpose, result_type = _chain_failure(store, chain)
    if not must_match:
        return replace(base, trust="Untrusted" if failure else "Trusted", satisfied=True)
    if failure:
        return replace(base, failure=failure, purpose=purpose, result_type=result_type)
    if match_certificate(leaf.names, policy.references) is None:
        return replace(base, failure=f"num={_HOSTNAME_MISMATCH}:hostname mismatch",
                       purpose="server", result_type="certificate-host-mismatch")
    return replace(base, trust="Verified", satisfied=True)


def summary(verdict: Verdict, namaddr: str) -> str:
    """Postfix's loglevel-1 line (tls_misc.c tls_log_summary()); the key-exchange and
    signature details Python's ssl module cannot report are left out, as Postfix leaves
    out what it does not know."""
    return (f"{verdict.trust} TLS connection established to {namaddr}: {verdict.protocol} "
            f"with cipher {verdict.cipher} ({verdict.bits}/{verdict.bits} bits)")


def failure_line(verdict: Verdict, namaddr: str) -> str:
    """Postfix's tls_log_verify_error() line for a verdict that failed."""
    prefix = f"{verdict.purpose} " if verdict.purpose else ""
    return f"{prefix}certificate verification failed for {namaddr}: {verdict.failure}"


def peer_line(verdict: Verdict, namaddr: str) -> str:
    """Postfix's loglevel-2 line naming the certificate (tls_client.c)."""
    return f"{namaddr}: subject_CN={verdict.subject_cn}, issuer={verdict.issuer_cn}"
