"""relay.routing.Resolver against a real DNS server on loopback (tests.support.dnsserver)."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
from collections.abc import Sequence

import pytest

from relay.routing import (
    Failure,
    NextHop,
    Resolution,
    Resolver,
    Router,
    Target,
    Transport,
    parse_next_hop,
)
from tests.support import dnsserver
from tests.support.dnsserver import Fault, LoopbackDNS, Query

SMTP = Transport.SMTP

dns_server = dnsserver.dns_server  # the fixture, in case tests/conftest.py does not provide it


def resolver(
    dns: LoopbackDNS,
    *,
    timeout: float = 2.0,
    myhostname: str = "relay.test",
    self_addresses: Sequence[tuple[str, int]] = (),
    mx_address_limit: int = 5,
    seed: int = 0,
) -> Resolver:
    return Resolver(
        [dns.nameserver],
        timeout=timeout,
        myhostname=myhostname,
        self_addresses=self_addresses,
        mx_address_limit=mx_address_limit,
        rng=random.Random(seed),
    )


def resolve(res: Resolver, hop: NextHop | str, domain: str = "example.com") -> Resolution:
    if isinstance(hop, str):
        hop = parse_next_hop(hop, domain)
    return asyncio.run(res.resolve(hop, domain))


def mx_route(domain: str = "example.com", port: int = 25) -> NextHop:
    return NextHop(SMTP, domain, port, True)


def hosts(resolution: Resolution) -> list[str]:
    return [target.hostname for target in resolution.targets]


# --- MX order ----------------------------------------------------------------------------------


def test_mx_sorted_by_preference(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 30, "mx30.example.com")
    zone.add_mx("example.com", 10, "mx10.example.com")
    zone.add_mx("example.com", 20, "mx20.example.com")
    zone.add_a("mx10.example.com", "127.0.0.10")
    zone.add_a("mx20.example.com", "127.0.0.20").add_aaaa("mx20.example.com", "::1")
    zone.add_a("mx30.example.com", "127.0.0.30")

    result = resolve(resolver(dns_server), mx_route(port=2525))

    assert result.failure is None
    assert result.targets == (
        Target("mx10.example.com", "127.0.0.10", 2525, 10),
        Target("mx20.example.com", "127.0.0.20", 2525, 20),  # IPv4 before IPv6
        Target("mx20.example.com", "::1", 2525, 20),
        Target("mx30.example.com", "127.0.0.30", 2525, 30),
    )
    assert dns_server.queries[0] == Query("example.com", "MX", "udp")


def test_equal_preferences_are_shuffled(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    for name in ("a", "b", "c"):
        zone.add_mx("example.com", 10, f"{name}.example.com")
        zone.add_a(f"{name}.example.com", f"127.0.1.{ord(name)}")
    zone.add_mx("example.com", 5, "first.example.com").add_a("first.example.com", "127.0.0.5")
    zone.add_mx("example.com", 50, "last.example.com").add_a("last.example.com", "127.0.0.50")

    orders = set()
    for seed in range(12):
        result = resolve(resolver(dns_server, seed=seed, mx_address_limit=0), mx_route())
        names = list(dict.fromkeys(hosts(result)))
        assert names[0] == "first.example.com" and names[-1] == "last.example.com"
        assert sorted(names[1:4]) == ["a.example.com", "b.example.com", "c.example.com"]
        orders.add(tuple(names[1:4]))
    assert len(orders) > 1  # seeded Randoms give different orders of the equal-preference hosts

    again = {
        tuple(hosts(resolve(resolver(dns_server, seed=3, mx_address_limit=0), mx_route())))
        for _ in range(3)
    }
    assert len(again) == 1  # and one seed always gives the same order


def test_mx_address_limit(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "mx1.example.com").add_mx("example.com", 20, "mx2.example.com")
    zone.add_a("mx1.example.com", "127.0.0.1", "127.0.0.2").add_aaaa("mx1.example.com", "::1")
    zone.add_a("mx2.example.com", "127.0.0.3")

    limited = resolve(resolver(dns_server, mx_address_limit=2), mx_route())
    assert [t.address for t in limited.targets] == ["127.0.0.1", "127.0.0.2"]
    unlimited = resolve(resolver(dns_server, mx_address_limit=0), mx_route())
    assert [t.address for t in unlimited.targets] == ["127.0.0.1", "127.0.0.2", "::1", "127.0.0.3"]


def test_address_shared_by_two_mx_hosts_is_tried_once(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "mx1.example.com").add_mx("example.com", 20, "mx2.example.com")
    zone.add_a("mx1.example.com", "127.0.0.1").add_a("mx2.example.com", "127.0.0.1", "127.0.0.2")
    result = resolve(resolver(dns_server), mx_route())
    assert [(t.hostname, t.address) for t in result.targets] == [
        ("mx1.example.com", "127.0.0.1"),
        ("mx2.example.com", "127.0.0.2"),
    ]


def test_mx_host_behind_cname(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "alias.example.com")
    zone.add_cname("alias.example.com", "real.example.net").add_a("real.example.net", "127.0.0.9")
    result = resolve(resolver(dns_server), mx_route())
    assert result.targets == (Target("alias.example.com", "127.0.0.9", 25, 10),)


def test_large_answer_is_retried_over_tcp(dns_server: LoopbackDNS) -> None:
    addresses = [f"127.0.{i // 250}.{i % 250 + 1}" for i in range(120)]
    dns_server.zone.add_a("big.example.com", *addresses)
    result = resolve(resolver(dns_server, mx_address_limit=0), "[big.example.com]:2525")
    assert [t.address for t in result.targets] == addresses
    assert Query("big.example.com", "A", "tcp") in dns_server.queries


# --- MX hosts that do not resolve --------------------------------------------------------------


def test_unresolvable_mx_host_is_skipped(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "gone.example.com")  # NXDOMAIN
    zone.add_mx("example.com", 15, "empty.example.com").add_name("empty.example.com")  # NODATA
    zone.add_mx("example.com", 17, "broken.example.com").fault("broken.example.com", Fault.SERVFAIL)
    zone.add_mx("example.com", 20, "mx2.example.com").add_a("mx2.example.com", "127.0.0.2")

    result = resolve(resolver(dns_server), mx_route())

    assert result.failure is None
    assert result.targets == (Target("mx2.example.com", "127.0.0.2", 25, 20),)


def test_all_mx_hosts_nxdomain_bounces(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "mx1.example.com").add_mx("example.com", 20, "mx2.example.com")

    result = resolve(resolver(dns_server), mx_route())

    assert result.targets == ()
    assert result.failure == Failure(
        "5.4.4",
        "Host or domain name not found. Name service error for name=mx1.example.com type=A: "
        "Host not found",
        True,
    )


def test_mx_hosts_with_a_temporary_failure_defer(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "mx1.example.com").add_mx("example.com", 20, "mx2.example.com")
    zone.fault("mx2.example.com", Fault.SERVFAIL)

    result = resolve(resolver(dns_server), mx_route())

    assert result.targets == ()
    assert result.failure == Failure(
        "4.4.3",
        "Host or domain name not found. Name service error for name=mx2.example.com type=A: "
        "Host not found, try again",
        False,
    )


# --- no MX, null MX, DNS errors ----------------------------------------------------------------


def test_no_mx_falls_back_to_address_records(dns_server: LoopbackDNS) -> None:
    dns_server.zone.add_a("example.com", "127.0.0.7").add_aaaa("example.com", "::1")

    result = resolve(resolver(dns_server), mx_route())

    assert result.failure is None
    assert result.targets == (
        Target("example.com", "127.0.0.7", 25, 0),
        Target("example.com", "::1", 25, 0),
    )
    assert [(q.name, q.qtype) for q in dns_server.queries] == [
        ("example.com", "MX"),
        ("example.com", "A"),
        ("example.com", "AAAA"),
    ]


def test_no_mx_and_no_address_bounces(dns_server: LoopbackDNS) -> None:
    dns_server.zone.add_name("example.com")
    result = resolve(resolver(dns_server), mx_route())
    assert result.failure == Failure(
        "5.4.4",
        "Host or domain name not found. Name service error for name=example.com type=A: "
        "Host found but no data record of requested type",
        True,
    )


def test_null_mx_bounces_5_1_10(dns_server: LoopbackDNS) -> None:
    dns_server.zone.add_null_mx("example.com").add_a("example.com", "127.0.0.1")

    result = resolve(resolver(dns_server), mx_route())

    assert result.targets == ()
    assert result.failure == Failure(
        "5.1.10", "Domain example.com does not accept mail (nullMX)", True
    )
    assert [q.qtype for q in dns_server.queries] == ["MX"]  # no fallback to the A record


def test_nxdomain_bounces_5_4_4(dns_server: LoopbackDNS) -> None:
    result = resolve(resolver(dns_server), mx_route("nowhere.example"), "nowhere.example")
    assert result.failure == Failure(
        "5.4.4",
        "Host or domain name not found. Name service error for name=nowhere.example type=MX: "
        "Host not found",
        True,
    )


@pytest.mark.parametrize("fault", [Fault.SERVFAIL, Fault.REFUSED])
def test_servfail_defers_4_4_3(dns_server: LoopbackDNS, fault: Fault) -> None:
    dns_server.zone.fault("example.com", fault).add_a("example.com", "127.0.0.1")
    result = resolve(resolver(dns_server), mx_route())
    assert result.failure == Failure(
        "4.4.3",
        "Host or domain name not found. Name service error for name=example.com type=MX: "
        "Host not found, try again",
        False,
    )


def test_timeout_defers_4_4_3(dns_server: LoopbackDNS) -> None:
    dns_server.zone.fault("example.com", Fault.TIMEOUT)

    started = time.monotonic()
    result = resolve(resolver(dns_server, timeout=0.5), mx_route())
    elapsed = time.monotonic() - started

    assert result.failure == Failure(
        "4.4.3",
        "Host or domain name not found. Name service error for name=example.com type=MX: "
        "Host not found, try again",
        False,
    )
    assert 0.4 < elapsed < 3.0
    assert dns_server.queries and all(q.name == "example.com" for q in dns_server.queries)


# --- [host] routes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hop", "address"), [("[127.0.0.1]:2526", "127.0.0.1"), ("[::1]:2526", "::1")]
)
def test_literal_next_hop_needs_no_dns(dns_server: LoopbackDNS, hop: str, address: str) -> None:
    result = resolve(resolver(dns_server), hop)
    assert result == Resolution((Target(address, address, 2526, 0),), None)
    assert dns_server.queries == []


def test_literal_next_hop_through_router_needs_no_dns(dns_server: LoopbackDNS) -> None:
    router = Router([], "[127.0.0.1]:2526")
    hop = router.next_hop("user@example.com")
    result = asyncio.run(resolver(dns_server).resolve(hop, "example.com"))
    assert [(t.address, t.port) for t in result.targets] == [("127.0.0.1", 2526)]
    assert dns_server.queries == []


def test_bracketed_host_skips_mx(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("gw.example", 10, "elsewhere.example").add_a("elsewhere.example", "127.0.0.9")
    zone.add_a("gw.example", "127.0.0.3")

    result = resolve(resolver(dns_server), "[gw.example]:2525")

    assert result.targets == (Target("gw.example", "127.0.0.3", 2525, 0),)
    assert {q.qtype for q in dns_server.queries} == {"A", "AAAA"}


def test_bracketed_host_nxdomain_bounces(dns_server: LoopbackDNS) -> None:
    result = resolve(resolver(dns_server), "[gw.example]")
    assert result.failure == Failure(
        "5.4.4",
        "Host or domain name not found. Name service error for name=gw.example type=A: "
        "Host not found",
        True,
    )


def test_bracketed_host_servfail_defers(dns_server: LoopbackDNS) -> None:
    dns_server.zone.fault("gw.example", Fault.SERVFAIL)
    result = resolve(resolver(dns_server), "[gw.example]")
    assert result.failure is not None
    assert (result.failure.dsn, result.failure.permanent) == ("4.4.3", False)
    assert result.failure.reason.endswith("type=A: Host not found, try again")


def test_mx_route_to_another_host_with_port(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("relay.test", 10, "mx.relay.test").add_a("mx.relay.test", "127.0.0.4")
    hop = Router(["inline:{ example.com=smtp:relay.test:2525 }"]).next_hop("u@example.com")
    result = asyncio.run(resolver(dns_server, myhostname="").resolve(hop, "example.com"))
    assert result.targets == (Target("mx.relay.test", "127.0.0.4", 2525, 10),)
    assert hop.destination == "relay.test:2525"


# --- mail loops and backup MX ------------------------------------------------------------------


def test_best_mx_is_myhostname_loops(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "Relay.Test").add_mx("example.com", 20, "mx2.example.com")
    zone.add_a("mx2.example.com", "127.0.0.2")

    result = resolve(resolver(dns_server, myhostname="relay.test"), mx_route())

    assert result.failure == Failure("5.4.6", "mail for example.com loops back to myself", True)
    assert "relay.test" not in {q.name for q in dns_server.queries}  # known by name, no lookup


def test_best_mx_address_is_ours_loops(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "mx1.example.com").add_a("mx1.example.com", "127.0.0.1")
    ours = resolver(dns_server, self_addresses=[("127.0.0.1", 2525)])

    result = resolve(ours, mx_route(port=2525))

    assert result.failure == Failure("5.4.6", "mail for example.com loops back to myself", True)


def test_same_address_on_another_port_is_not_a_loop(dns_server: LoopbackDNS) -> None:
    dns_server.zone.add_mx("example.com", 10, "mx1.example.com")
    dns_server.zone.add_a("mx1.example.com", "127.0.0.1")
    ours = resolver(dns_server, self_addresses=[("127.0.0.1", 2525)])
    result = resolve(ours, mx_route(port=2526))
    assert result.failure is None
    assert result.targets == (Target("mx1.example.com", "127.0.0.1", 2526, 10),)


def test_implicit_mx_on_our_address_loops(dns_server: LoopbackDNS) -> None:
    dns_server.zone.add_a("example.com", "127.0.0.1")
    ours = resolver(dns_server, self_addresses=[("127.0.0.1", 25)])
    result = resolve(ours, mx_route())
    assert result.failure is not None and result.failure.dsn == "5.4.6"


def test_wildcard_listener_matches_local_addresses(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "mx1.example.com").add_a("mx1.example.com", "127.0.0.2")
    ours = resolver(dns_server, self_addresses=[("0.0.0.0", 25)])
    result = resolve(ours, mx_route())
    assert result.failure == Failure("5.4.6", "mail for example.com loops back to myself", True)


def _is_bindable(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def test_wildcard_listener_does_not_match_remote_addresses(dns_server: LoopbackDNS) -> None:
    remote = "203.0.113.9"  # TEST-NET-3; only resolved, never contacted
    if _is_bindable(remote):
        pytest.skip(f"{remote} is configured on this host")
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "mx1.example.com").add_a("mx1.example.com", remote)
    ours = resolver(dns_server, self_addresses=[("0.0.0.0", 25), ("::", 25)])
    result = resolve(ours, mx_route())
    assert result.failure is None
    assert [t.address for t in result.targets] == [remote]


def test_backup_mx_keeps_only_better_preferences(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "primary.example.com").add_a("primary.example.com", "127.0.0.10")
    zone.add_mx("example.com", 20, "relay.test")  # us, by name
    zone.add_mx("example.com", 20, "peer.example.com").add_a("peer.example.com", "127.0.0.20")
    zone.add_mx("example.com", 30, "worse.example.com").add_a("worse.example.com", "127.0.0.30")

    for seed in range(4):  # whatever order the equal-preference hosts come in
        result = resolve(resolver(dns_server, seed=seed), mx_route())
        assert result == Resolution((Target("primary.example.com", "127.0.0.10", 25, 10),), None)


def test_backup_mx_by_address(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "primary.example.com").add_a("primary.example.com", "127.0.0.10")
    zone.add_mx("example.com", 20, "backup.example.com").add_a("backup.example.com", "127.0.0.1")
    ours = resolver(dns_server, myhostname="", self_addresses=[("127.0.0.1", 25)])
    result = resolve(ours, mx_route())
    assert hosts(result) == ["primary.example.com"]


def test_backup_mx_without_a_reachable_primary_defers(dns_server: LoopbackDNS) -> None:
    zone = dns_server.zone
    zone.add_mx("example.com", 10, "primary.example.com")  # NXDOMAIN
    zone.add_mx("example.com", 20, "relay.test")

    result = resolve(resolver(dns_server), mx_route())

    assert result.targets == ()
    assert result.failure == Failure("4.4.4", "unable to find primary relay for example.com", False)


def test_literal_next_hop_on_our_own_address_loops(dns_server: LoopbackDNS) -> None:
    ours = resolver(dns_server, self_addresses=[("127.0.0.1", 2526)])
    result = resolve(ours, "[127.0.0.1]:2526")
    assert result.failure == Failure("5.4.6", "mail for 127.0.0.1 loops back to myself", True)
    assert resolve(ours, "[127.0.0.1]:2527").failure is None
    assert dns_server.queries == []


def test_bracketed_host_resolving_to_us_loops(dns_server: LoopbackDNS) -> None:
    dns_server.zone.add_a("gw.example", "127.0.0.1")
    ours = resolver(dns_server, self_addresses=[("::", 2526)])
    result = resolve(ours, "[gw.example]:2526")
    assert result.failure is not None and result.failure.dsn == "5.4.6"


# --- the server itself -------------------------------------------------------------------------


def test_nameserver_over_ipv6_loopback() -> None:
    try:
        server = LoopbackDNS(address="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        server.zone.add_mx("example.com", 10, "mx.example.com").add_a("mx.example.com", "127.0.0.8")
        assert server.nameserver == f"[::1]:{server.port}"
        result = resolve(resolver(server), mx_route())
        assert [t.address for t in result.targets] == ["127.0.0.8"]
    finally:
        server.stop()


def test_stop_frees_the_port() -> None:
    server = LoopbackDNS().start()
    port = server.port
    server.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", port))
    assert ipaddress.ip_address(server.address).is_loopback
