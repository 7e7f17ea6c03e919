"""Every TLS security level against every certificate case, over real TLS on loopback.

relay's SMTP client (relay.delivery with relay.tls.destination's plan) delivers one
message by MX to ``good.test``, whose MX host ``mx.good.test`` is a scripted SMTP server on
127.0.0.1 offering STARTTLS with one of the trustme certificates of tests.support.certs.
The test DNS server answers the MX, A and TLSA questions, with the AD bit for the names
marked secure.  The table says, for each level and case, whether the message is sent or
deferred with which status and text, and the log line that says why, in Postfix 3.7's
words (/work/shared/postfix-reference/maillog-tls-verify.txt).  The README's TLS section
shows the same table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.delivery import Attempt, DeliverySettings, RcptStatus, SMTPDelivery
from relay.routing import NextHop, Resolver, Transport
from relay.tls.destination import ClientTLS, Planner
from relay.tls.policy import Level
from tests.support.certs import CASES, CertCase, Certs, make_certs
from tests.support.dnsserver import LoopbackDNS
from tests.support.peers import Peer, PeerScript, ReceivedMessage, Reply, SessionRecord

pytestmark = pytest.mark.timeout(120)

MX = "mx.good.test"
MESSAGE = b"Subject: tls levels\r\n\r\nbody\r\n"


@dataclass(frozen=True)
class Expect:
    """What a level does with a certificate case: ``dsn`` 2.0.0 for sent, else the
    deferral's status and reason; ``log`` a line that must appear (PEER is the server as
    Postfix names it, host[address]:port); ``tls`` whether the message went over TLS."""

    dsn: str
    reason: str = ""
    log: str = ""
    tls: bool = True


SENT = "2.0.0"
NOT_VERIFIED = "Server certificate not verified"
MISMATCH = "server certificate verification failed for PEER: num=62:hostname mismatch"
EXPIRED = "server certificate verification failed for PEER: certificate has expired"
SELF_SIGNED = "certificate verification failed for PEER: self-signed certificate"
UNTRUSTED = "certificate verification failed for PEER: untrusted issuer /O=trustme"
NO_TLSA_MATCH = "server certificate verification failed for PEER: num=65:no matching DANE TLSA records"


def _verifying() -> dict[str, Expect]:
    return {
        "good": Expect(SENT, log="Verified TLS connection established to PEER: TLSv1.3"),
        "wrong_name": Expect("4.7.5", NOT_VERIFIED, MISMATCH),
        "expired": Expect("4.7.5", NOT_VERIFIED, EXPIRED),
        "self_signed": Expect("4.7.5", NOT_VERIFIED, SELF_SIGNED),
        "untrusted": Expect("4.7.5", NOT_VERIFIED, UNTRUSTED),
    }


def _opportunistic() -> dict[str, Expect]:
    trusted = Expect(SENT, log="Trusted TLS connection established to PEER: TLSv1.3")
    untrusted = Expect(SENT, log="Untrusted TLS connection established to PEER: TLSv1.3")
    return {case: trusted if case == "good" else untrusted for case in CASES}


# (column name, level, TLSA records to publish: "ee" = 3 1 1 of the served key,
# "ta" = 2 0 1 of the test CA, "" = none) -> expectations per certificate case.
TABLE: dict[tuple[str, Level, str], dict[str, Expect]] = {
    ("none", Level.NONE, ""): {case: Expect(SENT, tls=False) for case in CASES},
    ("may", Level.MAY, ""): _opportunistic(),
    ("encrypt", Level.ENCRYPT, ""): _opportunistic(),
    ("verify", Level.VERIFY, ""): _verifying(),
    ("secure", Level.SECURE, ""): _verifying(),
    ("dane, no TLSA records", Level.DANE, ""): _opportunistic(),
    ("dane, DANE-EE 3 1 1", Level.DANE, "ee"): {
        case: Expect(SENT, log="Verified TLS connection established to PEER")
        for case in CASES},
    ("dane, DANE-TA 2 0 1", Level.DANE, "ta"): {
        "good": Expect(SENT, log="Verified TLS connection established to PEER"),
        "wrong_name": Expect("4.7.5", NOT_VERIFIED, MISMATCH),
        "expired": Expect("4.7.5", NOT_VERIFIED, EXPIRED),
        "self_signed": Expect("4.7.5", NOT_VERIFIED, NO_TLSA_MATCH),
        "untrusted": Expect("4.7.5", NOT_VERIFIED, NO_TLSA_MATCH),
    },
    ("dane-only, no TLSA records", Level.DANE_ONLY, ""): {
        case: Expect("4.7.5", "no TLSA records found", tls=False) for case in CASES},
}
# The trust words at may/encrypt come from the chain alone: the wrong-name certificate
# is signed by the trusted CA, so Postfix (and relay) call it Trusted there.
for column in (("may", Level.MAY, ""), ("encrypt", Level.ENCRYPT, ""),
               ("dane, no TLSA records", Level.DANE, "")):
    TABLE[column]["wrong_name"] = TABLE[column]["good"]


@pytest.fixture(scope="module")
def certs() -> Certs:
    return make_certs(MX)


@pytest.fixture(scope="module")
def ca_file(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return certs.write_ca(tmp_path_factory.mktemp("ca") / "ca.pem")


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        server.zone.add_mx("good.test", 10, MX).add_a(MX, "127.0.0.1")
        server.zone.secure("good.test", MX)
        yield server


@dataclass(frozen=True)
class Outcome:
    attempt: Attempt
    peer_name: str  # the server as Postfix names it in log lines: host[address]:port
    messages: list[ReceivedMessage]
    sessions: list[SessionRecord]


async def deliver_once(dns: LoopbackDNS, case: CertCase, level: Level, ca_file: Path, *,
                       tlsa: tuple[int, int, int, bytes] | None = None,
                       script: PeerScript | None = None, loglevel: int = 1,
                       settings: DeliverySettings | None = None) -> Outcome:
    """One message by MX to good.test, whose MX host serves ``case``'s certificate."""
    script = script or PeerScript(hostname=MX, starttls=True)
    async with Peer(script, tls_context=case.server_context()) as peer:
        tlsa_name = f"_{peer.port}._tcp.{MX}"
        if tlsa is not None:
            dns.zone.add_tlsa(tlsa_name, *tlsa)
        dns.zone.secure(tlsa_name)
        resolver = Resolver([dns.nameserver], dnssec=True, trust_ad=True)
        planner = Planner(ClientTLS(level=level, dnssec=True), resolver)
        hop = NextHop(Transport.SMTP, "good.test", peer.port, True)
        resolution = await resolver.resolve(hop, "good.test")
        assert resolution.failure is None and resolution.mx_secure
        plan = await planner.plan(hop, resolution)
        settings = settings or DeliverySettings(
            helo_name="client.test", tls_ca_file=str(ca_file), tls_loglevel=loglevel,
            starttls_timeout=5, connection_cache_time_limit=0)
        delivery = SMTPDelivery()
        attempt = await delivery.deliver(resolution.targets, hop.label, "a@client.test",
                                         ["u@good.test"], MESSAGE, settings, tls=plan)
        await delivery.close()
        return Outcome(attempt, f"{MX}[127.0.0.1]:{peer.port}", peer.messages, peer.sessions)


CELLS = [(column, case) for column in TABLE for case in CASES]


@pytest.mark.parametrize("column,case", CELLS,
                         ids=[f"{column[0]}-{case}" for column, case in CELLS])
def test_level_by_certificate_case(column: tuple[str, Level, str], case: str, certs: Certs,
                                   ca_file: Path, dns: LoopbackDNS,
                                   caplog: pytest.LogCaptureFixture) -> None:
    expect = TABLE[column][case]
    _, level, tlsa = column
    served = certs[case]
    records = {"ee": served.tlsa_3_1_1(), "ta": certs.tlsa_2_0_1(), "": None}[tlsa]
    caplog.set_level(logging.INFO, logger="relay.smtp")
    outcome = asyncio.run(deliver_once(dns, served, level, ca_file, tlsa=records))
    result = outcome.attempt.results[0]
    logs = "\n".join(r.getMessage() for r in caplog.records)
    if expect.dsn == SENT:
        assert result.status is RcptStatus.SENT, (result, logs)
        assert len(outcome.messages) == 1 and outcome.messages[0].tls is expect.tls
    else:
        assert result.status is RcptStatus.DEFER, (result, logs)
        assert (result.dsn, result.reason) == (expect.dsn, expect.reason), logs
        assert outcome.messages == []
        # Nothing after the failed check: no MAIL, no AUTH, at most a polite QUIT.
        for session in outcome.sessions:
            assert not {"MAIL", "AUTH", "RCPT"} & set(session.verbs()), session.verbs()
    if expect.log:
        assert expect.log.replace("PEER", outcome.peer_name) in logs, logs


@pytest.mark.parametrize("case", ["wrong_name", "expired", "self_signed", "untrusted"])
def test_no_password_over_a_connection_below_the_level_asked(
        case: str, certs: Certs, ca_file: Path, dns: LoopbackDNS) -> None:
    """smtp_sasl_auth_enable = yes and a server that offers AUTH: when its certificate
    fails the verify level, the session ends before AUTH, so the password never leaves."""
    script = PeerScript(hostname=MX, starttls=True, auth_mechanisms=("PLAIN", "LOGIN"),
                        credentials=("user", "secret"))
    settings = DeliverySettings(
        helo_name="client.test", tls_ca_file=str(ca_file), starttls_timeout=5,
        connection_cache_time_limit=0, sasl_enable=True,
        sasl_credentials=lambda label, target: ("user", "secret"))
    outcome = asyncio.run(deliver_once(dns, certs[case], Level.VERIFY, ca_file, script=script,
                                       settings=settings))
    assert outcome.attempt.results[0].reason == NOT_VERIFIED
    assert outcome.sessions and all("AUTH" not in s.verbs() for s in outcome.sessions)
    assert all(b"secret" not in s.raw and b"AHVzZXIAc2VjcmV0" not in s.raw
               for s in outcome.sessions)


def test_a_cached_connection_serves_only_its_own_policy(certs: Certs, ca_file: Path,
                                                        dns: LoopbackDNS) -> None:
    """A connection a may-level delivery left in the cache is not reused by a verify-level
    one (it was never verified); the verify-level one opens its own and checks it."""

    async def run() -> tuple[list[str], int]:
        script = PeerScript(hostname=MX, starttls=True)
        async with Peer(script, tls_context=certs["wrong_name"].server_context()) as peer:
            resolver = Resolver([dns.nameserver])
            hop = NextHop(Transport.SMTP, "good.test", peer.port, True)
            resolution = await resolver.resolve(hop, "good.test")
            settings = DeliverySettings(helo_name="client.test", tls_ca_file=str(ca_file),
                                        connection_cache_time_limit=30)
            delivery = SMTPDelivery()
            statuses = []
            for level in (Level.MAY, Level.VERIFY):
                plan = await Planner(ClientTLS(level=level), resolver).plan(hop, resolution)
                attempt = await delivery.deliver(resolution.targets, hop.label, "a@c.test",
                                                 ["u@good.test"], MESSAGE, settings, tls=plan)
                statuses.append(attempt.results[0].status.value)
            await delivery.close()
            return statuses, peer.connection_count

    statuses, connections = asyncio.run(run())
    assert statuses == ["sent", "defer"]
    assert connections == 2


# --- how the planner combines its sources ------------------------------------------------


async def plan_and_deliver(dns: LoopbackDNS, case: CertCase, settings: ClientTLS, ca_file: Path,
                           *, message: bytes = MESSAGE, requiretls: bool = False,
                           secure_mx: bool = True, tlsa: tuple[int, int, int, bytes] | None = None,
                           script: PeerScript | None = None) -> Outcome:
    from relay.tls.policy import tls_not_required

    script = script or PeerScript(hostname=MX, starttls=True)
    if not secure_mx:
        dns.zone.clear()
        dns.zone.add_mx("good.test", 10, MX).add_a(MX, "127.0.0.1")
    async with Peer(script, tls_context=case.server_context()) as peer:
        if tlsa is not None:
            dns.zone.add_tlsa(f"_{peer.port}._tcp.{MX}", *tlsa)
            dns.zone.secure(f"_{peer.port}._tcp.{MX}")
        resolver = Resolver([dns.nameserver], dnssec=settings.dnssec, trust_ad=True)
        hop = NextHop(Transport.SMTP, "good.test", peer.port, True)
        resolution = await resolver.resolve(hop, "good.test")
        plan = await Planner(settings, resolver).plan(
            hop, resolution, requiretls=requiretls, tls_not_required=tls_not_required(message))
        delivery = SMTPDelivery()
        attempt = await delivery.deliver(
            resolution.targets, hop.label, "a@client.test", ["u@good.test"], message,
            DeliverySettings(helo_name="client.test", tls_ca_file=str(ca_file),
                             connection_cache_time_limit=0), tls=plan)
        await delivery.close()
        return Outcome(attempt, f"{MX}[127.0.0.1]:{peer.port}", peer.messages, peer.sessions)


def test_tls_required_no_caps_the_level_at_may(certs: Certs, ca_file: Path,
                                               dns: LoopbackDNS) -> None:
    message = b"TLS-Required: No\r\nSubject: x\r\n\r\nbody\r\n"
    outcome = asyncio.run(plan_and_deliver(dns, certs["wrong_name"], ClientTLS(
        level=Level.VERIFY), ca_file, message=message))
    assert outcome.attempt.results[0].status is RcptStatus.SENT
    assert outcome.messages[0].tls  # still encrypted when offered: may, not none


def test_requiretls_by_mx_needs_a_dnssec_mx_or_an_mta_sts_policy(
        certs: Certs, ca_file: Path, dns: LoopbackDNS) -> None:
    outcome = asyncio.run(plan_and_deliver(dns, certs["good"], ClientTLS(level=Level.MAY),
                                           ca_file, requiretls=True, secure_mx=False))
    result = outcome.attempt.results[0]
    assert (result.status, result.dsn) == (RcptStatus.BOUNCE, "5.7.30")
    assert result.reason == ("Sender requested REQUIRETLS, but the MX lookup of good.test was "
                             "not DNSSEC-validated and it has no MTA-STS policy")
    assert outcome.sessions == []


def test_requiretls_raises_may_to_verify(certs: Certs, ca_file: Path, dns: LoopbackDNS) -> None:
    """With a DNSSEC-validated MX, REQUIRETLS mail at level may goes over verified TLS
    to a server that offers REQUIRETLS, and the request goes on with it."""
    ehlo = Reply(250, f"{MX}\nPIPELINING\nSTARTTLS\nENHANCEDSTATUSCODES\nREQUIRETLS")
    outcome = asyncio.run(plan_and_deliver(
        dns, certs["good"], ClientTLS(level=Level.MAY, dnssec=True), ca_file, requiretls=True,
        script=PeerScript(hostname=MX, starttls=True, ehlo=ehlo)))
    assert outcome.attempt.results[0].status is RcptStatus.SENT
    assert "REQUIRETLS" in outcome.messages[0].mail_params


@pytest.mark.parametrize("settings,sent,reason", [
    # dane without DNSSEC lookups: Postfix warns and uses may; dane-only defers.
    (ClientTLS(level=Level.DANE, dnssec=False), True, ""),
    (ClientTLS(level=Level.DANE_ONLY, dnssec=False), False, "client TLS configuration problem"),
])
def test_dane_without_dnssec(certs: Certs, ca_file: Path, dns: LoopbackDNS,
                             settings: ClientTLS, sent: bool, reason: str) -> None:
    outcome = asyncio.run(plan_and_deliver(dns, certs["wrong_name"], settings, ca_file))
    result = outcome.attempt.results[0]
    assert (result.status is RcptStatus.SENT) is sent
    if not sent:
        assert (result.dsn, result.reason) == ("4.7.5", reason)


def test_dane_with_an_insecure_mx_falls_back(certs: Certs, ca_file: Path,
                                             dns: LoopbackDNS) -> None:
    """RFC 7672 2.2.1: an MX RRset that did not validate gives no DANE: may for dane,
    a deferral for dane-only."""
    may = asyncio.run(plan_and_deliver(dns, certs["wrong_name"], ClientTLS(
        level=Level.DANE, dnssec=True), ca_file, secure_mx=False))
    assert may.attempt.results[0].status is RcptStatus.SENT
    only = asyncio.run(plan_and_deliver(dns, certs["wrong_name"], ClientTLS(
        level=Level.DANE_ONLY, dnssec=True), ca_file, secure_mx=False))
    assert (only.attempt.results[0].dsn, only.attempt.results[0].reason) == (
        "4.7.5", "non DNSSEC destination")


def test_unusable_tlsa_records_mean_encrypt(certs: Certs, ca_file: Path,
                                            dns: LoopbackDNS) -> None:
    """PKIX-EE(1) records are unusable for SMTP (RFC 7672 3.1.3): TLS is still required,
    the certificate is not checked (Postfix's dane_init())."""
    import hashlib

    record = (1, 1, 1, hashlib.sha256(certs["wrong_name"].spki).digest())
    without_tls = PeerScript(hostname=MX, starttls=False)
    outcome = asyncio.run(plan_and_deliver(dns, certs["wrong_name"], ClientTLS(
        level=Level.DANE, dnssec=True), ca_file, tlsa=record, script=without_tls))
    assert (outcome.attempt.results[0].dsn, outcome.attempt.results[0].reason) == (
        "4.7.4", f"TLS is required, but was not offered by host {MX}[127.0.0.1]")


def test_a_policy_map_entry_is_keyed_by_the_next_hop_as_written(
        certs: Certs, ca_file: Path, dns: LoopbackDNS) -> None:
    """TLS_README: the key is the next-hop destination, brackets and a non-default port
    included; an entry there overrides smtp_tls_security_level."""
    from relay.routing import open_table
    from relay.tls.policy import PolicyMaps

    async def run() -> Outcome:
        script = PeerScript(hostname=MX, starttls=True)
        async with Peer(script, tls_context=certs["wrong_name"].server_context()) as peer:
            maps = PolicyMaps([open_table(
                f"inline:{{ {{ good.test:{peer.port} = verify }}, .test = none }}")])
            resolver = Resolver([dns.nameserver])
            hop = NextHop(Transport.SMTP, "good.test", peer.port, True)
            resolution = await resolver.resolve(hop, "good.test")
            plan = await Planner(ClientTLS(level=Level.MAY, maps=maps), resolver).plan(
                hop, resolution)
            delivery = SMTPDelivery()
            attempt = await delivery.deliver(
                resolution.targets, hop.label, "a@client.test", ["u@good.test"], MESSAGE,
                DeliverySettings(helo_name="client.test", tls_ca_file=str(ca_file),
                                 connection_cache_time_limit=0), tls=plan)
            await delivery.close()
            return Outcome(attempt, "", peer.messages, peer.sessions)

    outcome = asyncio.run(run())
    assert (outcome.attempt.results[0].dsn, outcome.attempt.results[0].reason) == (
        "4.7.5", NOT_VERIFIED)
