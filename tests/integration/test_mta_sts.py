"""MTA-STS (RFC 8461) end to end on loopback: TXT record, HTTPS policy fetch, cache, use.

The test DNS server publishes ``_mta-sts.sts.test`` and ``mta-sts.sts.test``; a local
aiohttp HTTPS server with a trustme certificate serves the policy; the MX host is a
scripted SMTP server.  relay.tls.mta_sts fetches through relay's own resolver (never the
system's), trusts the same CA file as the SMTP client, and keeps the policy in the spool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from relay.delivery import Attempt, DeliverySettings, RcptStatus, SMTPDelivery
from relay.routing import NextHop, Resolver, Transport
from relay.tls.destination import ClientTLS, Planner
from relay.tls.mta_sts import Fetcher, StsResolver
from relay.tls.policy import Level
from spool import Spool
from tests.support.certs import Certs, make_certs
from tests.support.dnsserver import Fault, LoopbackDNS
from tests.support.peers import Peer, PeerScript

pytestmark = pytest.mark.timeout(60)

DOMAIN = "sts.test"
MX = "mx.sts.test"
POLICY_HOST = f"mta-sts.{DOMAIN}"
MESSAGE = b"Subject: sts\r\n\r\nbody\r\n"


def policy_text(mode: str = "enforce", mx: tuple[str, ...] = (MX,), max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx),
             f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


@dataclass
class PolicyServer:
    """What the HTTPS server answers, and how often it was asked."""

    body: bytes = policy_text().encode()
    status: int = 200
    content_type: str = "text/plain"
    redirect: str = ""
    delay: float = 0.0
    hits: list[str] = field(default_factory=list)
    port: int = 0


@asynccontextmanager
async def policy_server(certs: Certs, state: PolicyServer,
                        cert: str = "good") -> AsyncIterator[PolicyServer]:
    async def handler(request: web.Request) -> web.StreamResponse:
        state.hits.append(request.path)
        if state.delay:
            await asyncio.sleep(state.delay)
        if state.redirect:
            raise web.HTTPFound(state.redirect)
        return web.Response(body=state.body, status=state.status,
                            content_type=state.content_type)

    app = web.Application()
    app.router.add_get("/.well-known/mta-sts.txt", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    context = certs[cert].server_context()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    state.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
def certs() -> Certs:
    # One CA for the policy host and the MX host; the "wrong" name fits neither.
    return make_certs(MX, POLICY_HOST)


@pytest.fixture(scope="module")
def ca_file(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return certs.write_ca(tmp_path_factory.mktemp("ca") / "ca.pem")


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        zone = server.zone
        zone.add_mx(DOMAIN, 10, MX).add_a(MX, "127.0.0.1")
        zone.add_txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=20260101T000000;")
        zone.add_a(POLICY_HOST, "127.0.0.1")
        yield server


def sts_resolver(dns: LoopbackDNS, ca_file: Path, port: int, spool: Spool | None,
                 *, timeout: float = 5.0, clock: float | None = None) -> StsResolver:
    resolver = Resolver([dns.nameserver])
    context = ssl.create_default_context(cafile=str(ca_file))
    fetcher = Fetcher(resolver, context, port=port, timeout=timeout)
    if clock is None:
        return StsResolver(resolver, fetcher, spool)
    return StsResolver(resolver, fetcher, spool, clock=lambda: clock)


async def deliver(dns: LoopbackDNS, sts: StsResolver, peer: Peer, ca_file: Path,
                  level: Level = Level.MAY) -> Attempt:
    resolver = Resolver([dns.nameserver])
    planner = Planner(ClientTLS(level=level), resolver, sts)
    hop = NextHop(Transport.SMTP, DOMAIN, peer.port, True)
    resolution = await resolver.resolve(hop, DOMAIN)
    plan = await planner.plan(hop, resolution)
    settings = DeliverySettings(helo_name="client.test", tls_ca_file=str(ca_file),
                                tls_loglevel=1, starttls_timeout=5,
                                connection_cache_time_limit=0)
    delivery = SMTPDelivery()
    try:
        return await delivery.deliver(resolution.targets, hop.label, "a@client.test",
                                      [f"u@{DOMAIN}"], MESSAGE, settings, tls=plan)
    finally:
        await delivery.close()


def mx_peer(certs: Certs, case: str = "good") -> Peer:
    return Peer(PeerScript(hostname=MX, starttls=True), tls_context=certs[case].server_context())


# --- enforce -------------------------------------------------------------------------------


@pytest.mark.parametrize("case,sent", [("good", True), ("wrong_name", False),
                                       ("expired", False), ("self_signed", False)])
def test_enforce_asks_verify_level_tls_to_the_mx_host(
        certs: Certs, ca_file: Path, dns: LoopbackDNS, tmp_path: Path, case: str, sent: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """smtp_tls_security_level = may, but the domain's policy says enforce: the MX host's
    certificate must be valid for its name, else the mail waits (4.7.5)."""
    caplog.set_level(logging.INFO, logger="relay.smtp")

    async def run() -> tuple[Attempt, Peer, PolicyServer]:
        async with policy_server(certs, PolicyServer()) as server, mx_peer(certs, case) as peer:
            sts = sts_resolver(dns, ca_file, server.port, Spool(str(tmp_path / "spool")))
            return await deliver(dns, sts, peer, ca_file), peer, server

    attempt, peer, server = asyncio.run(run())
    result = attempt.results[0]
    assert server.hits == ["/.well-known/mta-sts.txt"]
    if sent:
        assert result.status is RcptStatus.SENT
        assert "Verified TLS connection established to mx.sts.test[127.0.0.1]" in caplog.text
    else:
        assert (result.status, result.dsn, result.reason) == (
            RcptStatus.DEFER, "4.7.5", "Server certificate not verified")
        assert peer.messages == []
    assert f"MTA-STS policy for {DOMAIN}: id 20260101T000000, mode enforce" in caplog.text


def test_enforce_skips_mx_hosts_the_policy_does_not_name(
        certs: Certs, ca_file: Path, dns: LoopbackDNS, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtp")
    state = PolicyServer(body=policy_text(mx=("*.elsewhere.test",)).encode())

    async def run() -> tuple[Attempt, Peer]:
        async with policy_server(certs, state) as server, mx_peer(certs) as peer:
            sts = sts_resolver(dns, ca_file, server.port, None)
            return await deliver(dns, sts, peer, ca_file), peer

    attempt, peer = asyncio.run(run())
    result = attempt.results[0]
    assert (result.status, result.dsn, result.reason) == (
        RcptStatus.DEFER, "4.7.5",
        f"MX host {MX} does not match the MTA-STS policy of {DOMAIN}")
    assert peer.connection_count == 0
    assert f"MX name '{MX}' does not match STS MX pattern for '{DOMAIN}'" in caplog.text
    assert attempt.tls_events and attempt.tls_events[0].result_type == "validation-failure"


def test_testing_mode_only_logs(certs: Certs, ca_file: Path, dns: LoopbackDNS, tmp_path: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtp")
    state = PolicyServer(body=policy_text(mode="testing").encode())

    async def run() -> tuple[Attempt, Peer]:
        async with policy_server(certs, state) as server, mx_peer(certs, "wrong_name") as peer:
            sts = sts_resolver(dns, ca_file, server.port, None)
            return await deliver(dns, sts, peer, ca_file), peer

    attempt, peer = asyncio.run(run())
    assert attempt.results[0].status is RcptStatus.SENT
    assert len(peer.messages) == 1
    assert ("server certificate verification failed for mx.sts.test[127.0.0.1]:"
            f"{peer.port}: num=62:hostname mismatch (MTA-STS policy in testing mode: "
            "not enforced)") in caplog.text
    assert [e.result_type for e in attempt.tls_events] == ["certificate-host-mismatch"]
    assert attempt.tls_events[0].scope.policy_type == "sts"


# --- discovery, fetch limits and the cache ---------------------------------------------------


def test_no_txt_record_costs_one_query_and_no_fetch(certs: Certs, ca_file: Path,
                                                    tmp_path: Path) -> None:
    with LoopbackDNS() as dns:
        dns.zone.add_mx(DOMAIN, 10, MX).add_a(MX, "127.0.0.1")

        async def run() -> tuple[Attempt, PolicyServer]:
            async with policy_server(certs, PolicyServer()) as server, mx_peer(certs) as peer:
                sts = sts_resolver(dns, ca_file, server.port, Spool(str(tmp_path / "s")))
                first = await deliver(dns, sts, peer, ca_file)
                await deliver(dns, sts, peer, ca_file)  # the TXT answer is remembered
                return first, server

        attempt, server = asyncio.run(run())
        assert attempt.results[0].status is RcptStatus.SENT
        assert server.hits == []
        assert [q.qtype for q in dns.queries if q.name == f"_mta-sts.{DOMAIN}"] == ["TXT"]
        assert not (tmp_path / "s" / "state").exists()


@pytest.mark.parametrize("fault", [
    {"status": 404}, {"redirect": "https://mta-sts.sts.test/other"},
    {"content_type": "text/html"}, {"body": b"version: STSv1\nmode: enforce\n"},
    {"body": b"x" * (64 * 1024 + 1)}, {"delay": 3.0}, {"cert": "wrong_name"},
], ids=["404", "redirect", "html", "invalid", "too-big", "slow", "bad-cert"])
def test_a_failed_fetch_means_no_policy(certs: Certs, ca_file: Path, dns: LoopbackDNS,
                                        tmp_path: Path, fault: dict[str, object],
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Without a cached policy a fetch failure leaves the domain without MTA-STS (RFC
    8461 5.1): the mail goes by smtp_tls_security_level (here may, to the wrong-name MX)."""
    caplog.set_level(logging.INFO, logger="relay.smtp")
    cert = str(fault.pop("cert", "good"))
    state = PolicyServer(**fault)  # type: ignore[arg-type]

    async def run() -> tuple[Attempt, StsResolver]:
        async with policy_server(certs, state, cert) as server, \
                mx_peer(certs, "wrong_name") as peer:
            sts = sts_resolver(dns, ca_file, server.port, None, timeout=1.0)
            return await deliver(dns, sts, peer, ca_file), sts

    attempt, _ = asyncio.run(run())
    assert attempt.results[0].status is RcptStatus.SENT
    assert f"MTA-STS policy for {DOMAIN}: https://{POLICY_HOST}:" in caplog.text
    assert state.hits in ([], ["/.well-known/mta-sts.txt"])


def test_policy_is_cached_in_the_spool_and_refreshed_when_the_id_changes(
        certs: Certs, ca_file: Path, dns: LoopbackDNS, tmp_path: Path) -> None:
    spool_dir = str(tmp_path / "spool")

    async def run() -> PolicyServer:
        async with policy_server(certs, PolicyServer()) as server, mx_peer(certs) as peer:
            # A first process fetches and caches; a second one (a restart) uses the cache.
            for _ in range(2):
                sts = sts_resolver(dns, ca_file, server.port, Spool(spool_dir))
                assert (await deliver(dns, sts, peer, ca_file)).results[0].status is \
                    RcptStatus.SENT
            assert server.hits == ["/.well-known/mta-sts.txt"]
            # The domain publishes a new id: the next process fetches again.
            dns.zone.clear()
            dns.zone.add_mx(DOMAIN, 10, MX).add_a(MX, "127.0.0.1").add_a(POLICY_HOST,
                                                                          "127.0.0.1")
            dns.zone.add_txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=2;")
            server.body = policy_text(mx=("*.sts.test",)).encode()
            sts = sts_resolver(dns, ca_file, server.port, Spool(spool_dir))
            await deliver(dns, sts, peer, ca_file)
            return server

    server = asyncio.run(run())
    assert len(server.hits) == 2
    record = json.loads((tmp_path / "spool" / "state" / "mta-sts" / DOMAIN).read_bytes())
    assert record["id"] == "2" and "mx: *.sts.test" in record["policy"]


def test_cached_policy_outlives_a_failing_fetch_and_a_missing_txt_until_max_age(
        certs: Certs, ca_file: Path, dns: LoopbackDNS, tmp_path: Path) -> None:
    """RFC 8461 5.1: a cached policy applies until it expires, even when the TXT record
    or the HTTPS server is gone; after max_age it is forgotten."""
    spool_dir = str(tmp_path / "spool")

    async def run() -> list[RcptStatus]:
        statuses = []
        async with policy_server(certs, PolicyServer(body=policy_text(max_age=600).encode())
                                 ) as server, mx_peer(certs, "wrong_name") as peer:
            sts = sts_resolver(dns, ca_file, server.port, Spool(spool_dir), clock=1000.0)
            statuses.append((await deliver(dns, sts, peer, ca_file)).results[0].status)
            server.status = 500
            dns.zone.fault(f"_mta-sts.{DOMAIN}", Fault.SERVFAIL)
            sts = sts_resolver(dns, ca_file, server.port, Spool(spool_dir), clock=1500.0)
            statuses.append((await deliver(dns, sts, peer, ca_file)).results[0].status)
            sts = sts_resolver(dns, ca_file, server.port, Spool(spool_dir), clock=1601.0)
            statuses.append((await deliver(dns, sts, peer, ca_file)).results[0].status)
        return statuses

    # enforce + wrong-name MX: deferred while the policy holds; delivered (may) after.
    assert asyncio.run(run()) == [RcptStatus.DEFER, RcptStatus.DEFER, RcptStatus.SENT]


def test_policy_host_is_resolved_with_relays_dns_only(certs: Certs, ca_file: Path,
                                                      dns: LoopbackDNS) -> None:
    """mta-sts.DOMAIN is looked up on dns_nameservers; no answer there, no fetch."""
    dns.zone.clear()
    dns.zone.add_mx(DOMAIN, 10, MX).add_a(MX, "127.0.0.1")
    dns.zone.add_txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=1;")

    async def run() -> tuple[str, PolicyServer]:
        async with policy_server(certs, PolicyServer()) as server:
            sts = sts_resolver(dns, ca_file, server.port, None)
            found = await sts.policy(DOMAIN)
            return found.reason, server

    reason, server = asyncio.run(run())
    assert server.hits == []
    assert "Host or domain name not found" in reason and POLICY_HOST in reason


def test_relay_tls_policy_says_what_would_be_enforced_and_why(
        certs: Certs, ca_file: Path, dns: LoopbackDNS, tmp_path: Path) -> None:
    """``relay tls policy DOMAIN``: the policy found, and each MX host's level."""
    import io

    from relay.cli import tls as tls_command

    dns.zone.add_mx(DOMAIN, 20, "mx2.elsewhere.test").add_a("mx2.elsewhere.test", "127.0.0.2")
    config = tmp_path / "etc"
    config.mkdir()
    (config / "main.cf").write_text(
        f"queue_directory = {tmp_path / 'spool'}\ndns_nameservers = {dns.nameserver}\n"
        f"smtp_tls_CAfile = {ca_file}\nsmtp_tls_security_level = may\n")
    Spool(str(tmp_path / "spool"))
    out, err = io.StringIO(), io.StringIO()

    async def run() -> int:
        async with policy_server(certs, PolicyServer()) as server:
            return await asyncio.to_thread(
                tls_command.main, ["-c", str(config), "policy", DOMAIN], stdout=out,
                stderr=err, https_port=server.port)

    assert asyncio.run(run()) == 0, err.getvalue()
    text = out.getvalue()
    assert "next hop: sts.test (MX lookup; MX RRset DNSSEC-validated: no)" in text
    assert "MTA-STS: policy id 20260101T000000 (fetched), mode enforce, max_age 86400, " \
           "mx mx.sts.test" in text
    assert "mx.sts.test[127.0.0.1]:25: verify (MTA-STS enforce), certificate must match " \
           "mx.sts.test, protocols TLSv1.2 to TLSv1.3" in text
    assert "mx2.elsewhere.test[127.0.0.2]:25: skipped: MX host mx2.elsewhere.test does not " \
           "match the MTA-STS policy of sts.test (4.7.5)" in text
    assert (tmp_path / "spool" / "state" / "mta-sts" / DOMAIN).exists()
