"""What scanners conclude: nmap's smtp-open-relay script, and the first segment of the
EHLO reply that such scripts read.

relay here relays nothing for the scanner (its mynetworks is 127.0.0.2 and it has no
relay_domains; the scanner comes from 127.0.0.1), so every relaying attempt must be
refused and nmap must never call it an open relay.  The same checks run against a private
Postfix set up alike, which passes them: the test is sound, a failure is relay's.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.support.daemon import RelayDaemon
from tests.support.mta import PostfixPeer, instance_root
from tests.support.tools import require

pytestmark = pytest.mark.timeout(300)

NMAP_RUNS = {"relay": 40, "postfix": 10}  # relay writing a reply in pieces was reported
# in about 1 run of 4: 40 runs would have caught it


@dataclass
class Server:
    name: str
    host: str
    port: int
    log: Callable[[], str]


@pytest.fixture(scope="module", params=["relay", "postfix"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    base = instance_root(f"relay-scan-{request.param}-")
    try:
        if request.param == "relay":
            d = RelayDaemon(base / "relay", {"mynetworks": "127.0.0.2/32",
                                            "relay_domains": ""})
            try:
                d.start()
                yield Server("relay", d.host, d.port, d.log)
            finally:
                d.stop()
        else:
            PostfixPeer.require()
            p = PostfixPeer(base / "postfix")
            # No tarpit: a scan makes errors on purpose, and Postfix would sleep on each.
            p.main.update(mynetworks="127.0.0.2/32", relay_domains="",
                          smtpd_error_sleep_time="0", smtpd_soft_error_limit="100")
            with p:
                yield Server("postfix", p.host, p.ports["plain"], p.log)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def first_segment_after_ehlo(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            greeting += s.recv(4096)
        s.sendall(b"EHLO scanner.test\r\n")
        segment = s.recv(65536)
        s.sendall(b"QUIT\r\n")
        return segment


def test_first_segment_after_ehlo_is_the_whole_reply(server: Server) -> None:
    for _ in range(20):
        segment = first_segment_after_ehlo(server.host, server.port)
        lines = segment.split(b"\r\n")
        assert lines[-1] == b"", f"a partial line: {segment!r}"
        assert lines[-2][3:4] == b" ", f"the reply goes on after {segment!r}"
        assert all(line[3:4] == b"-" for line in lines[:-2]), segment


def test_nmap_never_reports_an_open_relay(server: Server) -> None:
    nmap = require("nmap")
    verdicts = []
    for _ in range(NMAP_RUNS[server.name]):
        # "+" runs the script whatever nmap thinks the port's service is.
        done = subprocess.run([nmap, "-n", "-Pn", "-p", str(server.port),
                               "--script", "+smtp-open-relay", server.host],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        verdict = next((line for line in done.stdout.splitlines()
                        if "smtp-open-relay:" in line), "")
        assert verdict, f"the script did not run:\n{done.stdout}"
        verdicts.append(verdict)
        if "is an open relay" in verdict:
            break
    # Nothing was relayed: every attempt was refused, nothing was queued.
    time.sleep(0.5)
    assert "client=" not in server.log(), "a message was accepted from the scanner"
    opened = [v for v in verdicts if "is an open relay" in v]
    assert not opened, f"{len(opened)} of {len(verdicts)} runs: {opened[0]}"
