"""A real DNS server on loopback for tests: a zone the test fills in, served over UDP and TCP.

Owns a small authoritative-only server built on dnslib's packet codec and the standard library's
socketserver, running in background threads so that both in-process asyncio code and a
subprocess daemon (pointed at it with ``dns_nameservers = 127.0.0.1:PORT``) can query it.
It answers A, AAAA, MX (including the RFC 7505 null MX ``0 .``), CNAME, TXT and TLSA from a
``DNSZone``, and plays faults per name: NXDOMAIN, SERVFAIL, REFUSED, or silence (a timeout).
Names the test marks ``secure`` are answered with the AD bit when the query asks for it (AD
or the EDNS DO bit), as a validating resolver does for DNSSEC-signed data (RFC 6840 5.7), so
DANE tests need no signed zone.  Every query
received is recorded, so a test can assert that no DNS query happened.

It never recurses, never talks to any other server, and binds only to loopback on a free port.
It keeps no files: stopping it (or a crash of the test process) leaves nothing behind.

    with LoopbackDNS() as dns:
        dns.zone.add_mx("example.com", 10, "mx1.example.com")
        dns.zone.add_a("mx1.example.com", "127.0.0.1")
        resolver = Resolver(nameservers=[dns.nameserver])
"""

from __future__ import annotations

import enum
import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Self

import pytest
from dnslib import (  # type: ignore[import-untyped]
    AAAA,
    CNAME,
    MX,
    QTYPE,
    RCODE,
    RR,
    TLSA,
    TXT,
    A,
    DNSError,
    DNSRecord,
)

__all__ = ["DNSZone", "Fault", "LoopbackDNS", "Query", "dns_server"]

TTL = 60
UDP_PAYLOAD_WITHOUT_EDNS = 512


class Fault(enum.Enum):
    """What the server does instead of answering from the zone."""

    NXDOMAIN = "NXDOMAIN"
    SERVFAIL = "SERVFAIL"
    REFUSED = "REFUSED"
    TIMEOUT = "TIMEOUT"  # no answer at all


@dataclass(frozen=True, slots=True)
class Query:
    """One query as received: the name (lower case, no final dot), its type, udp or tcp."""

    name: str
    qtype: str
    protocol: str


def _key(name: str) -> str:
    return name.strip().lower().rstrip(".")


@dataclass
class _Node:
    mx: list[tuple[int, str]] = field(default_factory=list)
    a: list[str] = field(default_factory=list)
    aaaa: list[str] = field(default_factory=list)
    cname: str | None = None
    txt: list[tuple[bytes, ...]] = field(default_factory=list)
    tlsa: list[tuple[int, int, int, bytes]] = field(default_factory=list)
    faults: dict[str | None, Fault] = field(default_factory=dict)  # qtype (None: any) -> fault


class DNSZone:
    """The records the server answers from; safe to change while the server runs.

    A name with no node at all gets NXDOMAIN; a name with some records but none of the asked
    type gets an empty NOERROR answer (NODATA), as a real authoritative server would give.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._secure: set[str] = set()

    def _node(self, name: str) -> _Node:
        return self._nodes.setdefault(_key(name), _Node())

    def add_mx(self, name: str, preference: int, exchange: str) -> DNSZone:
        with self._lock:
            self._node(name).mx.append((preference, exchange))
        return self

    def add_null_mx(self, name: str) -> DNSZone:
        """RFC 7505: the single record ``name. MX 0 .``."""
        return self.add_mx(name, 0, ".")

    def add_a(self, name: str, *addresses: str) -> DNSZone:
        with self._lock:
            self._node(name).a.extend(addresses)
        return self

    def add_aaaa(self, name: str, *addresses: str) -> DNSZone:
        with self._lock:
            self._node(name).aaaa.extend(addresses)
        return self

    def add_cname(self, name: str, target: str) -> DNSZone:
        with self._lock:
            self._node(name).cname = target
        return self

    def add_txt(self, name: str, *strings: str | bytes) -> DNSZone:
        """One TXT record made of ``strings`` (each at most 255 bytes, as on the wire)."""
        record = tuple(s.encode() if isinstance(s, str) else s for s in strings)
        with self._lock:
            self._node(name).txt.append(record)
        return self

    def add_tlsa(self, name: str, usage: int, selector: int, mtype: int,
                 data: bytes) -> DNSZone:
        """A TLSA record (RFC 6698), e.g. ``_25._tcp.mx.example.com 3 1 1 <sha256>``."""
        with self._lock:
            self._node(name).tlsa.append((usage, selector, mtype, data))
        return self

    def secure(self, *names: str) -> DNSZone:
        """Answer these names with AD set, as if their DNSSEC signatures validated."""
        with self._lock:
            self._secure.update(_key(name) for name in names)
        return self

    def add_name(self, name: str) -> DNSZone:
        """Make ``name`` exist without records, so that every query for it gets NODATA."""
        with self._lock:
            self._node(name)
        return self

    def fault(self, name: str, fault: Fault, qtype: str | None = None) -> DNSZone:
        """Answer queries for ``name`` (of ``qtype`` only, if given) with ``fault``."""
        with self._lock:
            self._node(name).faults[qtype.upper() if qtype else None] = fault
        return self

    def clear(self) -> None:
        with self._lock:
            self._nodes.clear()
            self._secure.clear()

    def answer(self, request: DNSRecord) -> DNSRecord | None:
        """The reply to ``request``, or None to stay silent."""
        reply = request.reply()  # copies the id and question, sets QR, AA, RA
        qname = _key(str(request.q.qname))
        qtype = QTYPE.get(request.q.qtype)
        wants_ad = bool(request.header.ad) or any(
            rr.rtype == QTYPE.OPT and rr.ttl & 0x8000 for rr in request.ar)
        with self._lock:
            reply.header.ad = int(wants_ad and qname in self._secure)
            for _ in range(8):  # follow CNAME chains inside the zone, with a bound
                node = self._nodes.get(qname)
                if node is None:
                    if not reply.rr:
                        reply.header.rcode = RCODE.NXDOMAIN
                    return reply
                fault = node.faults.get(qtype, node.faults.get(None))
                if fault is Fault.TIMEOUT:
                    return None
                if fault is not None:
                    reply.header.rcode = getattr(RCODE, fault.value)
                    return reply
                if node.cname is not None and qtype != "CNAME":
                    reply.add_answer(RR(qname, QTYPE.CNAME, rdata=CNAME(node.cname), ttl=TTL))
                    qname = _key(node.cname)
                    reply.header.ad &= int(qname in self._secure)
                    continue
                for rr in _records(qname, qtype, node):
                    reply.add_answer(rr)
                return reply
        return reply


def _records(name: str, qtype: str, node: _Node) -> Iterator[RR]:
    if qtype in ("MX", "ANY"):
        for preference, exchange in node.mx:
            yield RR(name, QTYPE.MX, rdata=MX(exchange, preference), ttl=TTL)
    if qtype in ("A", "ANY"):
        for address in node.a:
            yield RR(name, QTYPE.A, rdata=A(address), ttl=TTL)
    if qtype in ("AAAA", "ANY"):
        for address in node.aaaa:
            yield RR(name, QTYPE.AAAA, rdata=AAAA(address), ttl=TTL)
    if qtype == "CNAME" and node.cname is not None:
        yield RR(name, QTYPE.CNAME, rdata=CNAME(node.cname), ttl=TTL)
    if qtype in ("TXT", "ANY"):
        for strings in node.txt:
            yield RR(name, QTYPE.TXT, rdata=TXT(list(strings)), ttl=TTL)
    if qtype in ("TLSA", "ANY"):
        for usage, selector, mtype, data in node.tlsa:
            yield RR(name, QTYPE.TLSA, rdata=TLSA(usage, selector, mtype, data), ttl=TTL)


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.owner.handle(data, "udp")
        if reply is None:
            return
        request = DNSRecord.parse(data)
        limit = max(
            [UDP_PAYLOAD_WITHOUT_EDNS] + [rr.rclass for rr in request.ar if rr.rtype == QTYPE.OPT]
        )
        wire = bytes(reply.pack())
        if len(wire) > limit:
            # dnslib's truncate() drops the question too, which resolvers reject: keep it.
            truncated = DNSRecord(header=reply.header, q=reply.q)
            truncated.header.tc = 1
            wire = bytes(truncated.pack())  # TC set: the client retries over TCP
        sock.sendto(wire, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(5.0)
        try:
            while True:
                header = _recv_exact(conn, 2)
                if header is None:
                    return
                data = _recv_exact(conn, struct.unpack("!H", header)[0])
                if data is None:
                    return
                reply = self.server.owner.handle(data, "tcp")
                if reply is None:
                    return  # a silent server over TCP: close without answering
                wire = bytes(reply.pack())
                conn.sendall(struct.pack("!H", len(wire)) + wire)
        except OSError:
            return


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: LoopbackDNS) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        super().__init__(address, _UDPHandler)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], owner: LoopbackDNS) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        super().__init__(address, _TCPHandler)


class LoopbackDNS:
    """The server: UDP and TCP on one free loopback port, each served by a background thread."""

    def __init__(self, zone: DNSZone | None = None, address: str = "127.0.0.1") -> None:
        self.zone = zone if zone is not None else DNSZone()
        self.address = address
        self.port = 0
        self._queries: list[Query] = []
        self._lock = threading.Lock()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    @property
    def nameserver(self) -> str:
        """This server as a ``dns_nameservers`` entry: ``127.0.0.1:PORT`` or ``[::1]:PORT``."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def queries(self) -> list[Query]:
        with self._lock:
            return list(self._queries)

    def clear_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    def handle(self, data: bytes, protocol: str) -> DNSRecord | None:
        try:
            request = DNSRecord.parse(data)
        except DNSError:
            return None
        with self._lock:
            self._queries.append(
                Query(_key(str(request.q.qname)), QTYPE.get(request.q.qtype), protocol)
            )
        return self.zone.answer(request)

    def start(self) -> LoopbackDNS:
        if self._servers:
            raise RuntimeError("LoopbackDNS already started")
        for _ in range(20):
            udp = _UDPServer((self.address, 0), self)
            port = udp.server_address[1]
            try:
                tcp = _TCPServer((self.address, port), self)
            except OSError:  # the TCP side of that port is taken: try another port
                udp.server_close()
                continue
            break
        else:
            raise RuntimeError("no free port with both UDP and TCP on " + self.address)
        self.port = port
        self._servers = [udp, tcp]
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.01},  # bounds how long stop() waits
                name=f"LoopbackDNS-{port}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture
def dns_server() -> Iterator[LoopbackDNS]:
    """A running LoopbackDNS with an empty zone: every name is NXDOMAIN until the test adds it."""
    with LoopbackDNS() as server:
        yield server
