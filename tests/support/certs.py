"""Test certificates for TLS tests, made fresh with trustme (never checked in).

Owns the certificate cases every TLS test speaks of: a test CA, a ``good`` server
certificate it signed for the names asked, a ``wrong_name`` one (signed, other names), an
``expired`` one (signed, right names, validity over), a ``self_signed`` one (right names,
no CA), and an ``untrusted`` one (right names, signed by a CA nobody trusts).  Each gives
a server SSLContext, its DER, its key's SubjectPublicKeyInfo (for TLSA records) and PEM
files for daemons; the CA gives its PEM file for smtp_tls_CAfile.

Never: writes outside the directory it is given; keeps anything between test sessions.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["CASES", "CertCase", "Certs", "make_certs"]

CASES = ("good", "wrong_name", "expired", "self_signed", "untrusted")


@dataclass(frozen=True)
class CertCase:
    name: str
    cert_pem: bytes  # the server's certificate chain, its own first
    key_pem: bytes

    @property
    def der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(
            serialization.Encoding.DER)

    @property
    def spki(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert_pem).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    def tlsa_3_1_1(self) -> tuple[int, int, int, bytes]:
        """DANE-EE(3) SPKI(1) SHA2-256(1) for this certificate's key."""
        return 3, 1, 1, hashlib.sha256(self.spki).digest()

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # ssl reads certificates only from files: written, loaded, removed at once.
        with tempfile.TemporaryDirectory(prefix="relay-certs-") as directory:
            cert, key = self.write(Path(directory))
            context.load_cert_chain(str(cert), str(key))
        return context

    def write(self, directory: Path) -> tuple[Path, Path]:
        """(certificate file, key file) under ``directory``, for smtpd_tls_cert_file."""
        cert, key = directory / f"{self.name}.pem", directory / f"{self.name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return cert, key


@dataclass(frozen=True)
class Certs:
    ca_pem: bytes
    ca_der: bytes
    cases: dict[str, CertCase]

    def __getitem__(self, name: str) -> CertCase:
        return self.cases[name]

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.ca_pem)
        return path

    def tlsa_2_0_1(self) -> tuple[int, int, int, bytes]:
        """DANE-TA(2) Cert(0) SHA2-256(1) for the test CA."""
        return 2, 0, 1, hashlib.sha256(self.ca_der).digest()


def _case(name: str, ca: trustme.CA, leaf: trustme.LeafCert) -> CertCase:
    # The chain ends with the CA itself, as RFC 7672 3.1.2 asks of a server that relies
    # on DANE-TA(2) records; PKIX verification does not mind.
    return CertCase(name, b"".join(p.bytes() for p in leaf.cert_chain_pems)
                    + ca.cert_pem.bytes(), leaf.private_key_pem.bytes())


def _self_signed(names: tuple[str, ...]) -> CertCase:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            import ipaddress

            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(key, hashes.SHA256()))
    return CertCase("self_signed", cert.public_bytes(serialization.Encoding.PEM),
                    key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))


def make_certs(*names: str, wrong: tuple[str, ...] = ("wrong.example",)) -> Certs:
    """The five cases for a server known as ``names`` (host names and/or addresses)."""
    ca, other = trustme.CA(), trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    cases = {
        "good": _case("good", ca, ca.issue_cert(*names)),
        "wrong_name": _case("wrong_name", ca, ca.issue_cert(*wrong)),
        "expired": _case("expired", ca, ca.issue_cert(
            *names, not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1))),
        "self_signed": _self_signed(names),
        "untrusted": _case("untrusted", other, other.issue_cert(*names)),
    }
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    return Certs(ca.cert_pem.bytes(), ca_cert.public_bytes(serialization.Encoding.DER), cases)
