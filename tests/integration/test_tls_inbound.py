"""The listener's TLS as an outside scanner sees it: testssl.sh (Debian's 3.0.8) against
``relay serve``'s STARTTLS.

With the default cipher policy (smtpd_tls_ciphers = high: tls_high_cipherlist, forward-
secret AEAD suites only for TLS 1.2; TLS 1.3's suites; TLS 1.2 and 1.3 only) testssl finds
nothing at LOW or above except what concerns the test certificate itself (trustme's CA is
nobody's, has no revocation information, and lives for centuries).  The same listener at
Postfix's default grade (medium) offers CBC suites, which testssl reports: the check can
fail.  testssl runs with --nodns none, so it never looks anything up outside loopback.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.certs import make_certs
from tests.support.daemon import RelayDaemon
from tests.support.tools import require

pytestmark = pytest.mark.timeout(240)

SEVERE = ("LOW", "MEDIUM", "HIGH", "CRITICAL")


def about_the_test_certificate(finding_id: str) -> bool:
    return finding_id.startswith("cert_") or finding_id in ("DNS_CAArecord", "OCSP_stapling")


def findings(report: Path) -> list[tuple[str, str, str]]:
    data = json.loads(report.read_text())
    found = []
    for result in data["scanResult"]:
        for section in result.values():
            if isinstance(section, list):
                found += [(f["id"], f["severity"], f.get("finding", "")) for f in section
                          if isinstance(f, dict) and f.get("severity") in SEVERE]
    return found


def run_testssl(port: int, report: Path, *checks: str) -> list[tuple[str, str, str]]:
    program = require("testssl", "/usr/bin/testssl", "/usr/bin/testssl.sh")
    done = subprocess.run(
        [program, "--quiet", "--color", "0", "--warnings", "off", "--nodns", "none",
         "--connect-timeout", "10", "--openssl-timeout", "10", "--jsonfile-pretty",
         str(report), "-t", "smtp", *checks, f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=200, check=False, cwd=report.parent)
    assert report.exists(), done.stdout[-2000:] + done.stderr[-2000:]
    return findings(report)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Callable[..., RelayDaemon]]:
    certs = make_certs("relay.test", "127.0.0.1")
    cert, key = certs["good"].write(tmp_path)
    started: list[RelayDaemon] = []

    def start(**params: str) -> RelayDaemon:
        d = RelayDaemon(tmp_path / f"relay{len(started)}", {
            "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
            "smtpd_tls_key_file": str(key), **params}).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def test_testssl_finds_nothing_but_the_test_certificate(
        listener: Callable[..., RelayDaemon], tmp_path: Path) -> None:
    d = listener()
    # Protocols, cipher categories, forward secrecy, server defaults, vulnerabilities,
    # server preferences: testssl's default run minus the client simulations.
    found = run_testssl(d.port, tmp_path / "default.json", "-p", "-s", "-f", "-S", "-U", "-P")
    left = [f for f in found if not about_the_test_certificate(f[0])]
    assert left == [], left
    assert any(f[0] == "cert_chain_of_trust" for f in found)  # the scan did see a cert


def test_postfixs_default_grade_would_be_found_out(
        listener: Callable[..., RelayDaemon], tmp_path: Path) -> None:
    d = listener(smtpd_tls_ciphers="medium")
    found = run_testssl(d.port, tmp_path / "medium.json", "-s")
    assert ("cipherlist_AVERAGE", "LOW", "offered") in found, found
