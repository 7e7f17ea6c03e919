"""Past one machine: relays behind a real HAProxy (conf/haproxy.cfg), one of them killed and
restarted under load, and ``relay drain`` taking a node out of the fleet.

HAProxy (Debian's) runs as a private process on loopback ports with the shipped recipe,
only its addresses changed to this test's; the relays run as real subprocesses
(tests.support.daemon) with ``smtpd_upstream_proxy_protocol = haproxy``; the next hop is a
scripted SMTP peer that records what it receives.  Clients connect from 127.0.0.7, so the
relays' logs show whether they saw the client's address or HAProxy's (127.0.0.1).
"""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import RelayDaemon, free_port, wait_until
from tests.support.peers import PeerScript, Reply, ThreadedPeer
from tests.support.tools import require

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
CLIENT = "127.0.0.7"
MESSAGES = 300
CLIENT_THREADS = 6
KILL_AFTER = 100  # accepted messages before relay 1 is killed
BACK_AFTER = 200  # messages after this one wait until relay 1 is back in rotation

MakeDaemon = Callable[..., RelayDaemon]


def fleet_params(peer: ThreadedPeer) -> dict[str, str]:
    return {
        "smtpd_upstream_proxy_protocol": "haproxy",
        "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{peer.port} }}",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "queue_run_delay": "1s",
    }


def start_proxied(d: RelayDaemon) -> RelayDaemon:
    """Start a relay that waits for a PROXY header before its banner; return once it
    says it started."""
    before = d.log().count("daemon started")
    d.start(wait=False)
    d.wait_log("daemon started", count=before + 1, timeout=20)
    return d


class HAProxy:
    """conf/haproxy.cfg with this test's addresses, run in the foreground."""

    def __init__(self, base: Path, backends: list[RelayDaemon]) -> None:
        binary = require("haproxy", "/usr/sbin/haproxy")
        self.port = free_port()
        text = (REPO / "conf" / "haproxy.cfg").read_text()
        text = text.replace("    bind :25\n", f"    bind 127.0.0.1:{self.port}\n")
        # Health checks every 200 ms instead of 2 s: the test's downtime is short.
        text = text.replace("check inter 2s", "check inter 200ms")
        servers = "".join(f"    server relay{n} 127.0.0.1:{d.port}\n"
                          for n, d in enumerate(backends, 1))
        text = re.sub(r"(    server relay\d+ \S+\n)+", servers, text)
        assert f"127.0.0.1:{backends[0].port}" in text and "send-proxy-v2" in text
        self.config = base / "haproxy.cfg"
        self.config.write_text(text)
        self.log = base / "haproxy.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT)
        end = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < end, "haproxy did not listen"
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def haproxy_factory(tmp_path: Path) -> Iterator[Callable[[list[RelayDaemon]], HAProxy]]:
    started: list[HAProxy] = []

    def make(backends: list[RelayDaemon]) -> HAProxy:
        proxy = HAProxy(tmp_path, backends)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def submit(port: int, token: str) -> str | None:
    """One message with ``token`` in its subject, from CLIENT; its queue ID once a relay
    said 250, else None."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=15,
                          source_address=(CLIENT, 0)) as smtp:
            smtp.ehlo("client.example")
            smtp.mail("sender@client.example")
            smtp.rcpt("rcpt@dest.example")
            code, text = smtp.data(f"Subject: {token}\r\n\r\nbody of {token}\r\n".encode())
            if code != 250:
                return None
            return text.decode().rsplit(" ", 1)[-1]
    except (OSError, smtplib.SMTPException):
        return None


def test_haproxy_fleet_survives_a_sigkill(relay_daemon: MakeDaemon, threaded_peer: Any,
                                          haproxy_factory: Any) -> None:
    # A slow next hop, so that mail waits in the relays' queues when one is killed.
    sink = threaded_peer(PeerScript(mail_reply_delay=0.3))
    relays = [start_proxied(relay_daemon(fleet_params(sink), start=False)) for _ in range(2)]
    proxy = haproxy_factory(relays)

    accepted: dict[str, str] = {}  # token -> queue ID
    lock = threading.Lock()
    numbers = iter(range(MESSAGES))
    back = threading.Event()
    deadline = time.monotonic() + 90

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                n = next(numbers, None)
            if n is None:
                return
            if n >= BACK_AFTER:
                back.wait(60)
            token = f"msg-{n:04d}"
            for _ in range(20):  # as a real client, try again until some relay takes it
                queue_id = submit(proxy.port, token)
                if queue_id is not None:
                    with lock:
                        accepted[token] = queue_id
                    break
                time.sleep(0.1)

    threads = [threading.Thread(target=client) for _ in range(CLIENT_THREADS)]
    for t in threads:
        t.start()
    while len(accepted) < KILL_AFTER and time.monotonic() < deadline:
        time.sleep(0.01)
    relays[0].kill()  # SIGKILL, under load
    held = relays[0].queue_files("incoming") + relays[0].queue_files("active")
    time.sleep(1.0)
    checks = relays[0].log().count("disconnect from localhost[127.0.0.1] ehlo=1")
    start_proxied(relays[0])
    # Back in rotation: HAProxy's health check (EHLO behind a PROXY header) passed twice.
    relays[0].wait_log("disconnect from localhost[127.0.0.1] ehlo=1", count=checks + 2,
                       timeout=20)
    back.set()
    for t in threads:
        t.join(120)
    assert len(accepted) == MESSAGES, f"only {len(accepted)} of {MESSAGES} were accepted"

    # Every message a relay said 250 for reaches the next hop.
    def delivered() -> set[str]:
        found = set()
        for message in sink.messages:
            if not message.accepted:
                continue
            m = re.search(rb"Subject: (msg-\d{4})", message.data)
            if m:
                found.add(m.group(1).decode())
        return found

    end = time.monotonic() + 60
    while set(accepted) - delivered() and time.monotonic() < end:
        time.sleep(0.2)
    missing = sorted(set(accepted) - delivered())
    assert not missing, f"{len(missing)} accepted messages never arrived: {missing[:10]}"

    # Both relays took mail, the killed one before and after its restart, and each
    # logged the client's real address for every message it took.
    logs = [d.log() for d in relays]
    for queue_id in accepted.values():
        owners = [log for log in logs if f"{queue_id}: client=" in log]
        assert owners, f"{queue_id} is in no relay's log"
        assert f"{queue_id}: client=localhost[{CLIENT}]" in owners[0]
    assert all(f"client=localhost[{CLIENT}]" in log for log in logs)
    assert not any(re.search(r": client=localhost\[127\.0\.0\.1\]", log) for log in logs)
    starts = logs[0].count("daemon started")
    assert starts == 2
    after_restart = logs[0].rsplit("daemon started", 1)[1]
    assert f"client=localhost[{CLIENT}]" in after_restart, "no mail went to relay 1 after it"
    # The kill caught mail in relay 1's queue, which it delivered after its restart.
    assert held, "relay 1 held no mail when it was killed: the kill proved nothing"
    assert any(re.search(rf"{queue_id}: to=<rcpt@dest.example>, .*status=sent", after_restart)
               for queue_id in held)


# ---- relay drain -----------------------------------------------------------------------------


def drain(d: RelayDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "relay"), "drain", "-c",
                           str(d.config_dir), *args], capture_output=True, text=True,
                          env=d.env, timeout=120, check=False)


def test_drain_behind_haproxy_hands_deferred_mail_to_the_fleet(
        relay_daemon: MakeDaemon, threaded_peer: Any, haproxy_factory: Any) -> None:
    sink = threaded_peer()
    # Relay 1 cannot reach its next hop (nothing listens on port 1): its mail waits.
    stuck = {**fleet_params(sink), "transport_maps": "inline:{ * = smtp:[127.0.0.1]:1 }",
             "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"}
    one = start_proxied(relay_daemon(stuck, start=False))
    two = start_proxied(relay_daemon(fleet_params(sink), start=False))
    proxy = haproxy_factory([one, two])
    tokens = [f"msg-{n:04d}" for n in range(20)]
    for token in tokens:
        assert submit(proxy.port, token) is not None
    # Once incoming/ and active/ are empty, all of relay 1's mail is in deferred/ (for an
    # hour): three listings taken one after another could miss a message moving between.
    wait_until(lambda: not one.queue_files("active") and not one.queue_files("incoming"),
               30, "relay 1's first delivery attempts")
    held = one.queue_files("deferred")
    assert held, "HAProxy gave relay 1 no mail"
    one.wait_log("status=deferred", count=len(held))

    # Out of the fleet, its mail handed to the fleet through the balancer.
    done = drain(one, "--to", f"127.0.0.1:{proxy.port}")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "relay: draining: no longer accepting mail; delivering what the queue holds",
        f"relay: draining: handing {len(held)} queued messages to 127.0.0.1:{proxy.port}",
        "relay: drained: no mail left in the queue",
    ]
    assert one.queue_files("deferred") == [] and one.queue_files("active") == []
    log = one.log()
    assert "draining: no longer accepting mail" in log
    for queue_id in held:
        assert re.search(rf"{queue_id}: to=<rcpt@dest.example>, relay=127.0.0.1\[127.0.0.1\]:"
                         rf"{proxy.port}, .*status=sent", log), queue_id

    # Every message reached the next hop, relay 1's through relay 2.
    end = time.monotonic() + 20
    while len({m.data for m in sink.messages if m.accepted}) < len(tokens):
        assert time.monotonic() < end, f"{len(sink.messages)} of {len(tokens)} arrived"
        time.sleep(0.1)
    # Relay 1 no longer listens, HAProxy's health check took it out, and new mail
    # goes to relay 2 without a failure.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", one.port), timeout=1).close()
    taken = one.log().count(": client=")
    for n in range(10):
        assert submit(proxy.port, f"after-{n}") is not None
    assert one.log().count(": client=") == taken
    assert one.proc is not None and one.proc.poll() is None  # still running, out of rotation


def test_drain_keeps_each_message_until_the_peer_says_250(relay_daemon: MakeDaemon,
                                                          threaded_peer: Any) -> None:
    http = f"127.0.0.1:{free_port()}"
    d = relay_daemon({"transport_maps": "inline:{ * = smtp:[127.0.0.1]:1 }",
                      "minimal_backoff_time": "1h", "maximal_backoff_time": "1h",
                      "queue_run_delay": "1h", "http_listen": http})
    assert urllib.request.urlopen(f"http://{http}/readyz", timeout=5).status == 200
    ids = [submit(d.port, f"keep-{n}") for n in range(3)]
    assert all(ids)
    d.wait_log("status=deferred", count=3)

    # Without --to: out of rotation, one more try, and the deferred mail stays.
    done = drain(d)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == ("relay: draining: 3 messages deferred; relay drain "
                                            "--to HOST:PORT hands them to a peer")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", d.port), timeout=1).close()
    with pytest.raises(urllib.error.HTTPError) as refused:  # an orchestrator's check too
        urllib.request.urlopen(f"http://{http}/readyz", timeout=5)
    assert refused.value.code == 503

    # A peer that refuses for good: nothing is bounced, everything stays.
    refusing = threaded_peer(PeerScript(rcpt=Reply(554, "5.7.1 Relay access denied")))
    done = drain(d, "--to", f"127.0.0.1:{refusing.port}")
    assert done.returncode == 75, done.stderr
    assert "3 messages are still queued" in done.stderr
    assert sorted(d.queue_files("deferred")) == sorted(ids)
    log = d.log()
    assert "status=bounced" not in log and "non-delivery notification" not in log
    assert re.search(r"dsn=4\.7\.1, status=deferred \(handoff refused: host 127\.0\.0\.1"
                     r"\[127\.0\.0\.1\] said: 554 5\.7\.1 Relay access denied", log), log[-2000:]

    # One that takes them: each leaves once the peer said 250.
    taking = threaded_peer()
    done = drain(d, "--to", f"[127.0.0.1]:{taking.port}")
    assert done.returncode == 0, done.stderr
    assert d.queue_files("deferred") == []
    assert len([m for m in taking.messages if m.accepted]) == 3

    bad = drain(d, "--to", "no:such:peer")
    assert bad.returncode == 1
    assert bad.stderr == ("relay: fatal: --to no:such:peer: expected HOST:PORT, [HOST]:PORT or "
                          "HOST\n")
