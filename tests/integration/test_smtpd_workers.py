"""Several processes accepting mail on one port (relay_smtpd_processes): each commits to the
one spool and triggers the one queue manager; a client's limits add up over all of them;
a TLS session from one resumes in another; reload, drain, metrics and a stop reach them
all; and a worker that dies stops the daemon without losing what was accepted.

Which process takes a connection is the kernel's choice, so each test makes enough
connections to meet more than one process, and checks that it did (the maillog names the
process of each session), where that matters to what it proves.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_accept import HOLD_DELIVERY, Client, queue_id_of
from tests.support.daemon import RelayDaemon
from tests.support.peers import ThreadedPeer

pytestmark = pytest.mark.timeout(120)

MakeDaemon = Callable[..., RelayDaemon]
PROCESSES = "3"


def session_pids(d: RelayDaemon) -> set[int]:
    """The PIDs that logged a session's connect line."""
    return {int(m) for m in re.findall(r"relay/smtpd\[(\d+)\]: connect from", d.log())}


def send_each_on_its_own(d: RelayDaemon, count: int) -> list[str]:
    ids = []
    for n in range(count):
        with Client(d.port) as c:
            c.cmd("EHLO client.example")
            ids.append(queue_id_of(c.mail("a@example.org", ["b@example.net"],
                                          f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())))
            c.cmd("QUIT")
    return ids


def test_every_process_accepts_commits_and_triggers_the_queue_manager(
        relay_daemon: MakeDaemon) -> None:
    with ThreadedPeer() as sink:
        d = relay_daemon({"relay_smtpd_processes": PROCESSES,
                          "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}"})
        assert len(d.listener_pids()) == int(PROCESSES)
        ids = send_each_on_its_own(d, 40)
        assert len(set(ids)) == 40
        assert len(session_pids(d)) >= 2, "every connection met the same process"
        assert session_pids(d) <= set(d.listener_pids())
        end = time.monotonic() + 20
        while len(sink.messages) < 40 and time.monotonic() < end:
            time.sleep(0.05)
        assert len(sink.messages) == 40
        # Delivered at the trigger, not at a scan of incoming/ (queue_run_delay is 300 s).
        for queue_id in ids:
            assert f"{queue_id}: removed" in d.log()


def test_a_clients_connections_add_up_over_the_processes(relay_daemon: MakeDaemon) -> None:
    """smtpd_client_connection_count_limit counts a client's connections in every process
    (the master counts them all, as Postfix's anvil does): 2 means 2, not 2 per process."""
    d = relay_daemon({**HOLD_DELIVERY, "relay_smtpd_processes": PROCESSES,
                      "mynetworks": "127.0.0.2/32",  # so that 127.0.0.1 has limits
                      "smtpd_client_connection_count_limit": "2"})
    # The start's readiness probe was a connection from this client too: counted off
    # once the listener has seen it close.
    d.wait_log("disconnect from")
    held: list[socket.socket] = []
    banners = []
    try:
        for _ in range(9):
            sock = socket.create_connection((d.host, d.port), timeout=10)
            held.append(sock)
            banners.append(sock.recv(200).decode())
        assert sum(b.startswith("220") for b in banners) == 2, banners
        assert sum(b.startswith("421 4.7.0") for b in banners) == 7, banners
        assert len(session_pids(d)) >= 2, "every connection met the same process"
    finally:
        for sock in held:
            sock.close()
    # Closed connections are counted off too: two more may come.
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.create_connection((d.host, d.port), timeout=10) as a, \
                socket.create_connection((d.host, d.port), timeout=10) as b:
            if a.recv(200).startswith(b"220") and b.recv(200).startswith(b"220"):
                return
        time.sleep(0.1)
    pytest.fail("the closed connections were never counted off")


def test_a_tls_session_from_one_process_resumes_in_another(
        relay_daemon: MakeDaemon, tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("relay.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    d = relay_daemon({**HOLD_DELIVERY, "relay_smtpd_processes": PROCESSES,
                      "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
                      "smtpd_tls_key_file": str(key)})
    session: ssl.SSLSession | None = None
    resumed = []
    for _ in range(12):
        with socket.create_connection((d.host, d.port), timeout=10) as raw:
            f = raw.makefile("rb")
            assert f.readline().startswith(b"220")
            raw.sendall(b"EHLO client.example\r\n")
            while f.readline()[3:4] == b"-":
                pass
            raw.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"220")
            with client.wrap_socket(raw, server_hostname="relay.test", session=session) as tls:
                tls.sendall(b"NOOP\r\n")
                assert tls.recv(200).startswith(b"250")  # the ticket came before it
                resumed.append(tls.session_reused)
                session = tls.session
                tls.sendall(b"QUIT\r\n")
                tls.recv(200)
    assert len(session_pids(d)) >= 2, "every connection met the same process"
    assert resumed[0] is False and all(resumed[1:]), resumed


def test_reload_reaches_every_process_before_it_is_logged(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon({**HOLD_DELIVERY, "relay_smtpd_processes": PROCESSES})
    d.write_config(smtpd_banner="$myhostname ESMTP reloaded")
    d.hup()
    d.wait_log("reload -- configuration")
    for _ in range(15):
        with socket.create_connection((d.host, d.port), timeout=10) as sock:
            assert sock.recv(200) == b"220 relay.test ESMTP reloaded\r\n"
    assert len(session_pids(d)) >= 2, "every connection met the same process"


def test_drain_stops_every_process_accepting(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon({**HOLD_DELIVERY, "relay_smtpd_processes": PROCESSES})
    subprocess.run([str(Path(sys.executable).parent / "relay"), "drain", "-c",
                    str(d.config_dir)], capture_output=True, timeout=60, check=False)
    d.wait_log("draining: no longer accepting mail")
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            with socket.create_connection((d.host, d.port), timeout=2) as sock:
                sock.settimeout(2)
                banner = sock.recv(200)
        except OSError:
            banner = b""
        if not banner:
            break
        time.sleep(0.1)
    for _ in range(10):  # no process takes a connection any more
        try:
            with socket.create_connection((d.host, d.port), timeout=2) as sock:
                sock.settimeout(1)
                assert sock.recv(200) == b""
        except OSError:
            pass


def test_metrics_count_every_process(relay_daemon: MakeDaemon) -> None:
    import http.client

    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.daemon import free_port

    http_port = free_port()
    d = relay_daemon({**HOLD_DELIVERY, "relay_smtpd_processes": PROCESSES,
                      "http_listen": f"127.0.0.1:{http_port}"})
    before = len(re.findall(r"\]: connect from", d.log()))
    send_each_on_its_own(d, 20)
    assert len(session_pids(d)) >= 2, "every connection met the same process"
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=20)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text)
               for s in f.samples if not s.labels}
    assert samples["relay_messages_accepted_total"] == 20
    assert samples["relay_smtpd_connections_total"] == before + 20
    assert samples["relay_spool_commit_seconds_count"] == 20


def test_a_worker_that_dies_stops_the_daemon_and_loses_nothing(
        relay_daemon: MakeDaemon) -> None:
    d = relay_daemon({**HOLD_DELIVERY, "relay_smtpd_processes": PROCESSES})
    ids = send_each_on_its_own(d, 10)
    worker = next(pid for pid in d.listener_pids() if d.proc and pid != d.proc.pid)
    os.kill(worker, signal.SIGKILL)
    assert d.proc is not None
    assert d.proc.wait(20) == 128 + signal.SIGKILL
    assert re.search(rf"listener worker \d exited with status -{signal.SIGKILL}", d.log())
    queued = set(d.queue_files("incoming") + d.queue_files("active")
                 + d.queue_files("deferred"))
    assert set(ids) <= queued
