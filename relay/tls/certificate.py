"""A server certificate as the TLS code needs to read it: names, subject, validity, keys.

Owns the reading of DER certificates with the ``cryptography`` library: the identities a
certificate claims (DNS and IP subjectAltNames, the subject CN) for name checks, Postfix's
printable subject and issuer for log lines, the validity period, the SubjectPublicKeyInfo
(DANE selector 1, RFC 6698 2.1.3), and whether one certificate signed another (DANE-TA
chains, RFC 7671 5.2).

Pure: parses bytes, never touches a socket or a file.  A certificate that cannot be parsed
raises ValueError (cryptography's own), which callers treat as "not verified".
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from relay.tls.policy import CertNames

__all__ = ["Certificate"]


@dataclass(frozen=True, slots=True)
class Certificate:
    """One DER certificate, parsed."""

    der: bytes
    parsed: x509.Certificate

    @classmethod
    def from_der(cls, der: bytes) -> Certificate:
        return cls(der, x509.load_der_x509_certificate(der))

    @property
    def names(self) -> CertNames:
        try:
            extension = self.parsed.extensions.get_extension_for_class(
                x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            dns: list[str] = []
            ips: list[str] = []
        else:
            dns = extension.value.get_values_for_type(x509.DNSName)
            ips = [str(ip) for ip in extension.value.get_values_for_type(x509.IPAddress)]
        return CertNames(tuple(dns), tuple(ips), self.subject_cn)

    @property
    def subject_cn(self) -> str:
        return _common_name(self.parsed.subject)

    @property
    def issuer_cn(self) -> str:
        return _common_name(self.parsed.issuer)

    @property
    def issuer(self) -> str:
        """The issuer in OpenSSL's one-line form (``/O=.../CN=...``), as Postfix logs it."""
        return "".join(f"/{attr.rfc4514_attribute_name}={attr.value!s}"
                       for attr in self.parsed.issuer)

    @property
    def spki(self) -> bytes:
        return self.parsed.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    def valid_at(self, now: datetime.datetime) -> str:
        """"" when valid at ``now``, else OpenSSL's words for why not."""
        if now < self.parsed.not_valid_before_utc:
            return "certificate not yet valid"
        if now > self.parsed.not_valid_after_utc:
            return "certificate has expired"
        return ""

    def issued_by(self, issuer: Certificate) -> bool:
        """Whether ``issuer``'s key signed this certificate and names match."""
        try:
            self.parsed.verify_directly_issued_by(issuer.parsed)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[-1].value) if values else ""
