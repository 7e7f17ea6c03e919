"""The interoperability suite's world: relay between real MTAs, in both directions.

One `World` per peer MTA (Postfix, Exim, OpenSMTPD) and test module, shared by the module's
tests (each test uses addresses of its own, so they stay independent):

- **the peer** ``P``: a private instance (tests/support/mta.py).  It keeps mail for the
  ``*.down.test`` domains and for ``sender.test`` in its store, and relays mail for the
  ``*.up.test`` domains to relay, from 127.0.0.2, one kind of route per domain:
  ``plain.up.test`` (no TLS), ``tls.up.test`` (STARTTLS), ``auth-plain.up.test`` and
  ``auth-login.up.test`` (STARTTLS, then AUTH with that mechanism).
- **relay** ``R``: ``relay serve`` with a certificate and an AUTH user; its mynetworks is
  127.0.0.1 only, so the peer (127.0.0.2) may relay to ``plain.up.test`` and
  ``tls.up.test`` (relay_domains) and to the others only after AUTH.  It sends
  ``*.up.test`` to the sink, each ``VARIANT.down.test`` to the peer's listener of that
  kind (STARTTLS when offered, AUTH where it has credentials), and ``sender.test`` to the
  peer's plain listener, so every notice to a sender lands in the peer's store.
- **the sink** ``S``: a scripted SMTP server (tests/support/peers.py) offering DSN,
  8BITMIME and SMTPUTF8; the far end when the peer is upstream of relay.  It records
  every command, so DSN parameters relay passes on can be read back.

Directions: ``DOWN`` (relay delivering to the peer: the test -> R -> P, read from P's
store) and ``UP`` (the peer upstream of relay: the test -> P -> R -> S).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.daemon import RelayDaemon, free_port
from tests.support.mta import (
    PEERS,
    Account,
    PrivateMTA,
    Route,
    instance_root,
    make_tls,
)
from tests.support.peers import PeerScript, ReceivedMessage, Reply, ThreadedPeer

UP = "up"  # the peer upstream of relay
DOWN = "down"  # relay delivering to the peer
DIRECTIONS = (UP, DOWN)
VARIANTS = ("plain", "tls", "auth-plain", "auth-login")
LISTENER_OF = {"plain": "plain", "tls": "tls", "auth-plain": "auth", "auth-login": "login"}
RELAY_ACCOUNT = Account("relayuser", "relaypass1")
QUEUES = ("incoming", "active", "deferred", "hold")

SINK_EHLO = Reply(250, "sink.test\nPIPELINING\nSIZE 52428800\nENHANCEDSTATUSCODES\n"
                       "8BITMIME\nDSN\nSMTPUTF8")


def reported_by(notice: bytes) -> str:
    """The host name in a notice's Reporting-MTA: field."""
    found = re.search(rb"(?im)^Reporting-MTA:\s*dns;\s*(\S+)", notice)
    return found.group(1).decode() if found else ""


def default_variant(direction: str) -> str:
    """The connection scenarios use where they are not about the connection: STARTTLS
    when the peer sends to relay, plaintext when relay sends to the peer (every peer can;
    OpenSMTPD's server-side STARTTLS cannot here)."""
    return "tls" if direction == UP else "plain"


class SinkPolicy(Mapping[str, Reply]):
    """The sink's RCPT replies by address, read live at every RCPT: a test can change
    them while relay holds a cached connection."""

    def __init__(self) -> None:
        self.refuse: set[str] = set()
        self.defer: set[str] = set()
        self.lock = threading.Lock()

    def set(self, refuse: set[str] | frozenset[str] = frozenset(),
            defer: set[str] | frozenset[str] = frozenset()) -> None:
        with self.lock:
            self.refuse, self.defer = set(refuse), set(defer)

    def _reply(self, address: str) -> Reply | None:
        with self.lock:
            if address in self.refuse:
                return Reply(550, f"5.1.1 <{address}>: Recipient address rejected: "
                                  "refused by test")
            if address in self.defer:
                return Reply(450, f"4.2.0 <{address}>: Recipient address rejected: "
                                  "deferred by test")
        return None

    def __getitem__(self, address: str) -> Reply:
        reply = self._reply(address)
        if reply is None:
            raise KeyError(address)
        return reply

    def __iter__(self) -> Iterator[str]:
        with self.lock:
            return iter(sorted(self.refuse | self.defer))

    def __len__(self) -> int:
        with self.lock:
            return len(self.refuse | self.defer)


@dataclass
class Submission:
    """What the first hop answered."""

    mail: tuple[int, bytes]
    rcpts: dict[str, tuple[int, bytes]]
    data: tuple[int, bytes] | None


@dataclass
class World:
    peer: PrivateMTA
    relay: RelayDaemon
    sink: ThreadedPeer
    sink_policy: SinkPolicy
    base: Path
    counter: list[int] = field(default_factory=lambda: [0])

    # -- addresses --------------------------------------------------------------------

    def variants(self, direction: str) -> tuple[str, ...]:
        """The kinds of connection this peer can play in ``direction``."""
        if direction == DOWN:
            return tuple(v for v in VARIANTS if LISTENER_OF[v] in self.peer.ports)
        return tuple(v for v in VARIANTS if not v.startswith("auth-")
                     or v.split("-")[1].upper() in self.peer.client_mechanisms)

    def tag(self, name: str) -> str:
        self.counter[0] += 1
        return f"{name}{self.counter[0]}"

    def rcpts(self, direction: str, tag: str, n: int = 1,
              variant: str | None = None) -> list[str]:
        """``n`` recipients of the far end, reached with ``variant`` (by default STARTTLS
        from the peer to relay, plaintext from relay to the peer: the transport tests
        cover the others)."""
        variant = variant or default_variant(direction)
        return [f"{tag}-{i}@{variant}.{direction}.test" for i in range(n)]

    @staticmethod
    def sender(tag: str) -> str:
        return f"{tag}@sender.test"

    # -- sending ----------------------------------------------------------------------

    def entry(self, direction: str) -> tuple[str, int]:
        """Where a message for ``direction`` is submitted: relay, or the peer."""
        if direction == DOWN:
            return self.relay.host, self.relay.port
        return self.peer.host, self.peer.ports["plain"]

    def submit(self, direction: str, sender: str, rcpts: list[str], content: bytes, *,
               mail_options: tuple[str, ...] = (),
               rcpt_options: Mapping[str, tuple[str, ...]] | None = None,
               expect_ok: bool = True) -> Submission:
        """One SMTP transaction with the first hop (smtplib: dot-stuffing, CRLF)."""
        host, port = self.entry(direction)
        with smtplib.SMTP(host, port, local_hostname="client.test", timeout=60) as smtp:
            smtp.ehlo()
            if any(o.upper() == "SMTPUTF8" for o in mail_options):
                smtp.command_encoding = "utf-8"
            mail = smtp.mail(sender, list(mail_options))
            replies = {r: smtp.rcpt(r, list((rcpt_options or {}).get(r, ())))
                       for r in rcpts}
            data = None
            if mail[0] == 250 and any(code // 100 == 2 for code, _ in replies.values()):
                data = smtp.data(content)
        result = Submission(mail, replies, data)
        if expect_ok:
            assert mail[0] == 250, f"MAIL answered {mail}"
            bad = {r: reply for r, reply in replies.items() if reply[0] // 100 != 2}
            assert not bad, f"RCPT refused: {bad}"
            assert data is not None and data[0] == 250, f"DATA answered {data}"
        return result

    # -- reading back -----------------------------------------------------------------

    def delivered(self, direction: str, rcpt: str) -> list[bytes]:
        """Every copy the far end has for ``rcpt``."""
        if direction == DOWN:
            return self.peer.store.messages(rcpt)
        return [m.data for m in self.sink.messages if rcpt in m.recipients]

    def sink_messages(self, rcpt: str) -> list[ReceivedMessage]:
        return [m for m in self.sink.messages if rcpt in m.recipients]

    def wait_delivered(self, direction: str, rcpts: list[str], timeout: float = 60.0,
                       sender: str | None = None) -> dict[str, list[bytes]]:
        """Every recipient's copies, once each has one; fails at once if a notice
        reaches ``sender`` first (the message bounced somewhere on the way)."""
        deadline = time.monotonic() + timeout
        while True:
            got = {r: self.delivered(direction, r) for r in rcpts}
            if all(got.values()):
                return got
            if sender is not None and (notices := self.notices(sender)):
                raise AssertionError(
                    f"{self.peer.name} {direction}: a notice reached {sender} instead:\n"
                    f"{notices[0][:3000].decode(errors='replace')}")
            if time.monotonic() > deadline:
                lacking = [r for r in rcpts if not got[r]]
                raise AssertionError(
                    f"{self.peer.name} {direction}: not delivered within {timeout}s to "
                    f"{len(lacking)} of {len(rcpts)}: {lacking[:5]}\n{self.diagnostics()}")
            time.sleep(0.1)

    def relay_queue_empty(self) -> bool:
        return not any(self.relay.queue_files(q) for q in QUEUES)

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until neither relay nor the peer holds mail: whatever was going to arrive
        twice has arrived by then."""
        deadline = time.monotonic() + timeout
        while not (self.relay_queue_empty() and self.peer.queue_empty()):
            if time.monotonic() > deadline:
                raise AssertionError(f"queues not empty after {timeout}s\n{self.diagnostics()}")
            time.sleep(0.1)

    def notices(self, sender: str, reporter: str | None = None) -> list[bytes]:
        """Notices (bounces, DSNs) that reached ``sender`` (kept in the peer's store),
        those of the MTA named ``reporter`` (its Reporting-MTA) only if given."""
        return [n for n in self.peer.store.messages(sender)
                if reporter is None or reported_by(n) == reporter]

    def wait_notices(self, sender: str, count: int = 1, reporter: str | None = None,
                     timeout: float = 60.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            notices = self.notices(sender, reporter)
            if len(notices) >= count:
                return notices
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(notices)} notices for {sender} after {timeout}s, "
                                     f"expected {count}\n{self.diagnostics()}")
            time.sleep(0.1)

    def diagnostics(self) -> str:
        return (f"--- relay maillog ---\n{self.relay.log()[-2500:]}\n"
                f"--- relay stderr ---\n{self.relay.stderr()[-1000:]}\n"
                f"--- {self.peer.name} log ---\n{self.peer.log()[-2500:]}")


def relay_params(base: Path, peer: PrivateMTA, sink: ThreadedPeer) -> dict[str, str]:
    tls = make_tls(base / "relay-tls", "relay.test")
    hops = {f".{UP}.test": f"smtp:[127.0.0.1]:{sink.port}",
            "sender.test": f"smtp:[127.0.0.1]:{peer.ports['plain']}"}
    for variant in VARIANTS:
        listener = LISTENER_OF[variant]
        if listener in peer.ports:
            hops[f"{variant}.{DOWN}.test"] = f"smtp:[127.0.0.1]:{peer.ports[listener]}"
    credentials = base / "relay-sasl-passwd"
    credentials.write_text("".join(
        f"[127.0.0.1]:{peer.ports[listener]} {peer.account.user}:{peer.account.password}\n"
        for listener in ("auth", "login") if listener in peer.ports))
    return {
        "mynetworks": "127.0.0.1/32",
        "relay_domains": f"plain.{UP}.test tls.{UP}.test",
        "transport_maps": "inline:{ " + ", ".join(f"{k} = {v}" for k, v in hops.items()) + " }",
        "smtpd_tls_cert_file": str(tls.cert),
        "smtpd_tls_key_file": str(tls.key),
        "smtpd_tls_security_level": "may",
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_password_file": "sasl_passwd",
        "smtp_tls_security_level": "may",
        "smtp_sasl_auth_enable": "yes",
        "smtp_sasl_password_maps": f"texthash:{credentials}",
        "minimal_backoff_time": "2s",
        "maximal_backoff_time": "4s",
        "queue_run_delay": "1s",
    }


def relay_passwd(d: RelayDaemon, account: Account) -> None:
    relay = Path(sys.executable).parent / "relay"
    subprocess.run([str(relay), "passwd", "-c", str(d.config_dir), account.user],
                   input=account.password.encode() + b"\n", check=True, capture_output=True,
                   timeout=60)


def start_relay(base: Path, params: dict[str, str], port: int | None = None) -> RelayDaemon:
    """``relay serve`` with ``params`` (on ``port`` if given), with RELAY_ACCOUNT as its
    AUTH user where it has a smtpd_sasl_password_file."""
    d = RelayDaemon(base, params)
    if port is not None:
        d.port = port
        d.write_config(smtpd_listen=f"{d.host}:{port}")
    if params.get("smtpd_sasl_password_file"):
        relay_passwd(d, RELAY_ACCOUNT)
    try:
        d.start()
    except BaseException:
        d.stop()  # a daemon that started but never listened must not outlive the test
        raise
    return d


def peer_routes(relay_host: str, relay_port: int) -> dict[str, Route]:
    return {
        f"plain.{UP}.test": Route(relay_host, relay_port),
        f"tls.{UP}.test": Route(relay_host, relay_port, starttls=True),
        f"auth-plain.{UP}.test": Route(relay_host, relay_port, starttls=True,
                                       account=RELAY_ACCOUNT, mechanism="PLAIN"),
        f"auth-login.{UP}.test": Route(relay_host, relay_port, starttls=True,
                                       account=RELAY_ACCOUNT, mechanism="LOGIN"),
    }


@contextlib.contextmanager
def make_world(name: str) -> Iterator[World]:
    cls = PEERS[name]
    cls.require()
    base = instance_root(f"relay-interop-{name}-")
    policy = SinkPolicy()

    def script(number: int) -> PeerScript:
        return PeerScript(hostname="sink.test", ehlo=SINK_EHLO, rcpt_by_address=policy)

    relay_port = free_port()
    try:
        with ThreadedPeer(script) as sink:
            peer = cls(base / name, local_domains=[
                *(f"{v}.{DOWN}.test" for v in VARIANTS), "sender.test"],
                routes=peer_routes("127.0.0.1", relay_port), bind_address="127.0.0.2")
            with peer:
                relay = start_relay(base / "relay", relay_params(base, peer, sink), relay_port)
                try:
                    yield World(peer, relay, sink, policy, base)
                finally:
                    relay.stop()
    finally:
        if os.environ.get("RELAY_INTEROP_KEEP"):
            print(f"interop: kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
        # The 10 MB messages leave tens of MB of dirty pages behind; tests that run next
        # and measure the machine's dirty data (the fsync helper's syncfs bound) must not
        # see them.
        os.sync()


@pytest.fixture(scope="module", params=sorted(PEERS))
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    """relay between a private instance of each real MTA and a sink (see the docstring)."""
    with make_world(request.param) as w:
        yield w


def unverified_tls() -> ssl.SSLContext:
    return ssl._create_unverified_context()  # the peers' certificates are throwaway
