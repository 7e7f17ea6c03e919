"""Fault tests with real peers on loopback and the daemon as a subprocess.

Each peer or DNS fault: the right outcome (deferred with the remote reply as the
reason, or bounced), the right log line, the right retry time on the daemon's
injected clock (RELAY_CLOCK_OFFSET_FILE: no sleeping through backoffs), and
delivery once the fault is gone.  Also: a full disk while receiving, and the
clock jumping backwards and forwards by hours.
"""

from __future__ import annotations

import contextlib
import os
import re
import smtplib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spool import Spool
from tests.support import dnsserver
from tests.support.daemon import RelayDaemon, free_port
from tests.support.peers import Fault, PeerScript, Reply, ThreadedPeer, make_peer_tls

MIN_BACKOFF = 300


class Clock:
    """Writes the daemon's clock offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.set(0)

    def set(self, seconds: float) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(seconds))
        os.replace(tmp, self.path)


def _daemon(relay_daemon: Callable[..., RelayDaemon], tmp_path: Path, params: dict[str, str],
            ) -> tuple[RelayDaemon, Clock]:
    clock = Clock(tmp_path / "clock-offset")
    base = {
        "queue_run_delay": "1s",
        "minimal_backoff_time": f"{MIN_BACKOFF}s",
        "maximal_backoff_time": "4000s",
        "smtp_connect_timeout": "2s",
        "smtp_helo_timeout": "2s",
        "smtp_data_done_timeout": "2s",
        "smtp_connection_cache_time_limit": "0s",
    }
    base.update(params)
    d = relay_daemon(base, start=False, env={"RELAY_CLOCK_OFFSET_FILE": str(clock.path)})
    d.start()
    return d, clock


def _send(d: RelayDaemon, sender: str = "alice@example.org",
          rcpt: str = "bob@example.net") -> str:
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.sendmail(sender, [rcpt], b"Subject: fault\r\nMessage-ID: <f@t>\r\n\r\nbody\r\n")
        return s.noop() and _last_queue_id(d)


def _last_queue_id(d: RelayDaemon) -> str:
    ids = re.findall(r"smtpd\[\d+\]: ([0-9A-F]+): client=", d.wait_log("client="))
    return ids[-1]


def _deferred_due(d: RelayDaemon, queue_id: str, timeout: float = 10.0) -> float:
    """The retry time of a deferred message relative to its last attempt: with a
    young message that is minimal_backoff_time (Postfix: time in queue, clamped)."""
    end = time.monotonic() + timeout
    spool = Spool(str(d.queue_directory), create=False)
    while time.monotonic() < end:
        if queue_id in d.queue_files("deferred"):
            env = spool.read("deferred", queue_id)
            return spool.mtime("deferred", queue_id) - env.last_attempt
        time.sleep(0.05)
    raise AssertionError(f"{queue_id} not deferred:\n{d.log()[-3000:]}")


@contextlib.contextmanager
def _sink(script: Callable[[int], PeerScript] | PeerScript | None = None,
          **kw: object) -> Iterator[ThreadedPeer]:
    with ThreadedPeer(script, **kw) as peer:  # type: ignore[arg-type]
        yield peer


def _first_faulty(faulty: PeerScript) -> Callable[[int], PeerScript]:
    return lambda n: faulty if n == 1 else PeerScript()  # sessions count from 1


PEER_FAULTS = {
    "421 at connect": (PeerScript(greeting=Reply(421, "4.3.2 Service not available")),
                       "4.3.2", "421 4.3.2 Service not available"),
    "450 at RCPT": (PeerScript(rcpt=Reply(450, "4.2.0 <bob@example.net>: Greylisted")),
                    "4.2.0", "said: 450 4.2.0 <bob@example.net>: Greylisted (in reply to RCPT TO command)"),
    "451 at RCPT": (PeerScript(rcpt=Reply(451, "4.3.0 Temporary lookup failure")),
                    "4.3.0", "said: 451 4.3.0 Temporary lookup failure (in reply to RCPT TO command)"),
    "452 at RCPT": (PeerScript(rcpt=Reply(452, "4.5.3 Too many recipients")),
                    "4.5.3", "said: 452 4.5.3 Too many recipients (in reply to RCPT TO command)"),
    "drop mid-DATA": (PeerScript(drop_in_body_after=5), "4.4.2",
                      "lost connection with"),
    "silent after the final dot": (PeerScript(final=Fault.HANG), "4.4.2",
                                   "message may be sent more than once"),
}


@pytest.mark.parametrize("case", list(PEER_FAULTS))
def test_peer_fault_defers_then_delivers(relay_daemon, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    faulty, dsn, reason = PEER_FAULTS[case]
    with _sink(_first_faulty(faulty)) as sink:
        d, clock = _daemon(relay_daemon, tmp_path, {
            "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}"})
        queue_id = _send(d)
        log = d.wait_log("status=deferred")
        line = next(ln for ln in log.splitlines() if "status=deferred" in ln)
        assert f"{queue_id}: to=<bob@example.net>, relay=" in line
        assert f"dsn={dsn}, status=deferred (" in line and reason in line, line
        due = _deferred_due(d, queue_id)
        assert MIN_BACKOFF - 1 <= due <= MIN_BACKOFF + 2, due
        time.sleep(2.5)  # two queue runs: nothing is due yet
        assert sink.connection_count == 1, "retried before the backoff passed"
        clock.set(MIN_BACKOFF + 1)
        d.wait_log("status=sent", timeout=10)
        delivered = [m for m in sink.all_messages if m.accepted]
        assert len(delivered) == 1
        if case == "silent after the final dot":
            # RFC 1047: the peer had the message when it went silent, so it now has
            # it twice.  This is the one way a duplicate happens.
            assert len(sink.all_messages) == 2 and sink.all_messages[0].final_code is None


def test_552_at_data_bounces_with_a_notice(relay_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with _sink(PeerScript(final=Reply(552, "5.3.4 Message size exceeds fixed limit"))) as peer, \
            _sink() as sender_mx:
        d, _ = _daemon(relay_daemon, tmp_path, {"transport_maps": (
            f"inline:{{ example.net = smtp:[127.0.0.1]:{peer.port}, "
            f"example.org = smtp:[127.0.0.1]:{sender_mx.port} }}")})
        queue_id = _send(d)
        d.wait_log("sender non-delivery notification")
        # The notice is committed (and logged) before the recipient's result is logged.
        log = d.wait_log("status=bounced")
        assert re.search(rf"{queue_id}: to=<bob@example.net>, .*dsn=5\.3\.4, status=bounced "
                         r"\(host .* said: 552 5\.3\.4 Message size exceeds fixed limit "
                         r"\(in reply to end of DATA command\)\)", log)
        notice = sender_mx.wait_for(1)[0]
        assert notice.sender == "" and notice.recipients == ("alice@example.org",)
        assert b"Status: 5.3.4" in notice.data
        assert b"Diagnostic-Code: smtp; 552 5.3.4 Message size exceeds fixed limit" in notice.data


def test_tls_handshake_failure_defers_then_delivers(relay_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tls = make_peer_tls("127.0.0.1")
    scripts = [PeerScript(starttls=True, tls_handshake_fault=True), PeerScript(starttls=True)]
    with _sink(lambda n: scripts[min(n - 1, 1)], tls_context=tls.server_context) as sink:
        d, clock = _daemon(relay_daemon, tmp_path, {
            "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}",
            "smtp_tls_security_level": "encrypt"})
        queue_id = _send(d)
        log = d.wait_log("status=deferred")
        assert re.search(rf"{queue_id}: .*dsn=4\.7\.5, status=deferred \(Cannot start TLS", log)
        clock.set(MIN_BACKOFF + 1)
        d.wait_log("status=sent", timeout=10)
        assert sink.messages[0].tls


def test_peer_down_then_up(relay_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    d, clock = _daemon(relay_daemon, tmp_path, {
        "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{port} }}"})
    queue_id = _send(d)
    log = d.wait_log("status=deferred")
    assert re.search(rf"{queue_id}: to=<bob@example.net>, relay=none, .*dsn=4\.4\.1, "
                     rf"status=deferred \(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:{port}: "
                     r"Connection refused\)", log)
    assert MIN_BACKOFF - 1 <= _deferred_due(d, queue_id) <= MIN_BACKOFF + 2
    with _sink(port=port) as sink:
        clock.set(MIN_BACKOFF + 1)
        sink.wait_for(1, timeout=10)


# ---- DNS faults ------------------------------------------------------------------------


@pytest.fixture
def dns() -> Iterator[dnsserver.LoopbackDNS]:
    with dnsserver.LoopbackDNS() as server:
        yield server


def _mx_daemon(relay_daemon, tmp_path: Path, dns: dnsserver.LoopbackDNS, port: int,  # type: ignore[no-untyped-def]
               bounce_port: int) -> tuple[RelayDaemon, Clock]:
    return _daemon(relay_daemon, tmp_path, {
        "dns_nameservers": dns.nameserver,
        "transport_maps": (f"inline:{{ example.test = smtp:example.test:{port}, "
                           f"example.org = smtp:[127.0.0.1]:{bounce_port} }}"),
    })


def test_dns_servfail_defers_then_delivers(relay_daemon, tmp_path: Path, dns) -> None:  # type: ignore[no-untyped-def]
    with _sink(host="127.0.0.2") as mx, _sink() as bounces:
        dns.zone.fault("example.test", dnsserver.Fault.SERVFAIL)
        d, clock = _mx_daemon(relay_daemon, tmp_path, dns, mx.port, bounces.port)
        queue_id = _send(d, rcpt="bob@example.test")
        log = d.wait_log("status=deferred")
        assert re.search(rf"{queue_id}: .*dsn=4\.4\.3, status=deferred \(Host or domain name "
                         r"not found\. Name service error for name=example\.test type=MX: "
                         r"Host not found, try again\)", log)
        dns.zone.clear()
        dns.zone.add_mx("example.test", 10, "mx1.example.test").add_a("mx1.example.test",
                                                                       "127.0.0.2")
        clock.set(MIN_BACKOFF + 1)
        mx.wait_for(1, timeout=10)
        assert bounces.messages == []


def test_dns_timeout_defers(relay_daemon, tmp_path: Path, dns) -> None:  # type: ignore[no-untyped-def]
    with _sink(host="127.0.0.2") as mx, _sink() as bounces:
        dns.zone.fault("example.test", dnsserver.Fault.TIMEOUT)
        d, _ = _mx_daemon(relay_daemon, tmp_path, dns, mx.port, bounces.port)
        queue_id = _send(d, rcpt="bob@example.test")
        log = d.wait_log("status=deferred", timeout=30)
        assert re.search(rf"{queue_id}: .*dsn=4\.4\.3, status=deferred", log)
        assert queue_id in d.queue_files("deferred")


@pytest.mark.parametrize("case", ["nxdomain", "mx host does not resolve"])
def test_dns_nxdomain_bounces(relay_daemon, tmp_path: Path, dns, case: str) -> None:  # type: ignore[no-untyped-def]
    with _sink(host="127.0.0.2") as mx, _sink() as bounces:
        if case == "nxdomain":
            dns.zone.fault("example.test", dnsserver.Fault.NXDOMAIN)
        else:
            dns.zone.add_mx("example.test", 10, "nowhere.example.test")
            dns.zone.fault("nowhere.example.test", dnsserver.Fault.NXDOMAIN)
        d, _ = _mx_daemon(relay_daemon, tmp_path, dns, mx.port, bounces.port)
        queue_id = _send(d, rcpt="bob@example.test")
        log = d.wait_log("status=bounced")
        assert re.search(rf"{queue_id}: .*dsn=5\.4\.4, status=bounced \(Host or domain name "
                         r"not found", log)
        notice = bounces.wait_for(1)[0]
        assert b"Status: 5.4.4" in notice.data
        assert mx.messages == []


# ---- disk full -------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()}); "
                    "the ENOSPC fault-hook tests in test_accept.py cover the write path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _fill(path: Path, leave: int) -> Path:
    filler = path / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    os.truncate(filler, max(0, os.path.getsize(filler) - (leave - free)))
    return filler


def test_disk_full_while_receiving(relay_daemon, tmp_path: Path, small_fs: Path) -> None:  # type: ignore[no-untyped-def]
    with _sink(_first_faulty(PeerScript(greeting=Reply(421, "4.3.2 busy")))) as sink:
        d, clock = _daemon(relay_daemon, tmp_path, {
            "queue_directory": str(small_fs / "spool"),
            "message_size_limit": "200000",
            "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}"})
        queued = _send(d)
        d.wait_log("status=deferred")
        data_before = sorted(os.listdir(small_fs / "spool" / "data"))
        filler = _fill(small_fs, leave=120_000)  # below 1.5 x message_size_limit
        time.sleep(0.3)  # the listener looks at the free space at most every 0.2 s
        with smtplib.SMTP(d.host, d.port, timeout=10) as s:
            s.ehlo("client.test")
            code, reply = s.mail("carol@example.org")
            assert (code, reply[:5]) == (452, b"4.3.1"), reply
            assert s.rset()[0] == 250
        assert sorted(os.listdir(small_fs / "spool" / "data")) == data_before
        assert os.listdir(small_fs / "spool" / "tmp") == []
        # Mail already queued keeps flowing on the little space that is left.
        clock.set(MIN_BACKOFF + 1)
        sink.wait_for(1, timeout=10)
        d.wait_log(f"{queued}: removed")
        # Space is back: new mail is accepted again.
        filler.unlink()
        _send(d, rcpt="dave@example.net")
        sink.wait_for(2, timeout=10)


# ---- clock jumps --------------------------------------------------------------------------


def test_clock_jumps(relay_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    d, clock = _daemon(relay_daemon, tmp_path, {
        "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{port} }}",
        "maximal_queue_lifetime": "1d",
        "default_destination_concurrency_failed_cohort_limit": "0"})
    ids = [_send(d, rcpt=f"r{i}@example.net") for i in range(10)]
    d.wait_log("status=deferred", count=10)
    # Backwards by three hours: nothing is dropped, expired or retried early.
    clock.set(-3 * 3600)
    time.sleep(3)
    log = d.log()
    assert log.count("status=deferred") == 10
    assert "expired" not in log and "removed" not in log
    assert sorted(d.queue_files("deferred")) == sorted(ids)
    # Forwards by ten hours: every message is tried once, then waits its backoff
    # (the maximum now), with no storm of retries.
    clock.set(10 * 3600)
    d.wait_log("status=deferred", count=20, timeout=15)
    time.sleep(3)
    log = d.log()
    assert log.count("status=deferred") == 20
    assert "expired" not in log
    spool = Spool(str(d.queue_directory), create=False)
    for queue_id in ids:
        env = spool.read("deferred", queue_id)
        due = spool.mtime("deferred", queue_id) - (time.time() + 10 * 3600)
        assert 3900 <= due <= 4001, (queue_id, due, env.attempts)
