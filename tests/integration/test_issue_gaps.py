"""Promises of the issues that no other test checked, each over real loopback sockets.

- issue 3: Postfix's per-recipient delivery line in full (``relay=host[ip]:port,
  delay=T, delays=a/b/c/d, dsn=X.Y.Z, status=sent (reply)``) from the ``smtp`` program,
  and EHLO to the next hop with ``myhostname``;
- issue 3: ``smtp_mail_timeout``, ``smtp_rcpt_timeout`` and ``smtp_data_init_timeout``
  as main.cf parameters of the running daemon (a peer that goes silent at that stage);
- issue 4: every queue command honours ``MAIL_CONFIG`` when ``-c`` is not given;
- issue 2: ``smtpd_listen`` with an IPv6 address (``[::1]:port``) beside an IPv4 one, and
  the embedded default ``mynetworks`` relaying for a loopback client over IPv6;
- issue 2: the daemon's processes stay in one process group, so a supervisor's SIGTERM
  to the group stops them all gracefully (exit 0, within 10 seconds, nothing left over).
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemon import RELAY, RelayDaemon, free_port
from tests.support.peers import Fault, PeerScript, ThreadedPeer

pytestmark = pytest.mark.timeout(90)

MakeDaemon = Callable[..., RelayDaemon]
QUEUED = re.compile(rb"queued as (\S+)")
HOLD_DELIVERY = {
    "transport_maps": "inline:{ * = smtp:[127.0.0.1]:1 }",
    "minimal_backoff_time": "1h",
    "maximal_backoff_time": "1h",
    "queue_run_delay": "1h",
}
BODY = b"Subject: gap\r\nMessage-ID: <gap@client.test>\r\n\r\nbody\r\n"


def send(host: str, port: int, rcpts: list[str], sender: str = "alice@example.org") -> str:
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail(sender)[0] == 250
        for rcpt in rcpts:
            code, reply = smtp.rcpt(rcpt)
            assert code == 250, reply
        code, reply = smtp.data(BODY)
    assert code == 250, reply
    match = QUEUED.search(reply)
    assert match, reply
    return match.group(1).decode()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---- issue 3: the delivery log line and EHLO myhostname ------------------------------------

NUMBER = r"\d+(?:\.\d+)?"


def test_delivery_line_has_every_postfix_field_and_ehlo_uses_myhostname(
    relay_daemon: MakeDaemon,
) -> None:
    with ThreadedPeer() as sink:
        d = relay_daemon({
            "myhostname": "mx.relay.test",
            "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}",
        })
        qid = send(d.host, d.port, ["bob@example.net"])
        sink.wait_for(1)
        log = d.wait_log(f"{qid}: removed")
        assert sink.sessions[0].helo == "mx.relay.test"
    pattern = (
        rf"^\w{{3}} [ \d]\d \d\d:\d\d:\d\d \S+ relay/smtp\[\d+\]: {qid}: to=<bob@example\.net>, "
        rf"relay=\S+\[127\.0\.0\.1\]:{sink.port}, delay={NUMBER}, "
        rf"delays={NUMBER}/{NUMBER}/{NUMBER}/{NUMBER}, dsn=2\.0\.0, "
        rf"status=sent \(250 2\.0\.0 Ok: queued as \S+\)$"
    )
    assert re.search(pattern, log, re.MULTILINE), log[-3000:]
    assert re.search(rf"relay/qmgr\[\d+\]: {qid}: removed$", log, re.MULTILINE), log[-3000:]


# ---- issue 3: smtp_*_timeout parameters through main.cf ------------------------------------


@pytest.mark.parametrize("parameter,script,where", [
    ("smtp_mail_timeout", PeerScript(mail=Fault.HANG), "MAIL FROM"),
    ("smtp_rcpt_timeout", PeerScript(rcpt=Fault.HANG), "RCPT TO"),
    ("smtp_data_init_timeout", PeerScript(data=Fault.HANG), "DATA"),
])
def test_smtp_stage_timeouts_from_main_cf(
    relay_daemon: MakeDaemon, parameter: str, script: PeerScript, where: str,
) -> None:
    """The defaults are minutes; with the parameter at 2s the stall is cut in seconds."""
    with ThreadedPeer(script) as peer:
        d = relay_daemon({
            parameter: "2s",
            "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{peer.port} }}",
            "minimal_backoff_time": "1h",
            "maximal_backoff_time": "1h",
            "queue_run_delay": "1h",
        })
        start = time.monotonic()
        qid = send(d.host, d.port, ["bob@example.net"])
        log = d.wait_log(f"{qid}: to=<bob@example.net>", timeout=20)
        elapsed = time.monotonic() - start
        line = next(x for x in log.splitlines() if f"{qid}: to=<bob@example.net>" in x)
        assert "status=deferred" in line, line
        assert "timed out while" in line and where in line, line
        assert 1.5 <= elapsed < 15, elapsed
        wait_until(lambda: qid in d.queue_files("deferred"), 10, "the deferral")
        assert peer.messages == [] or not any(m.accepted for m in peer.messages)


# ---- issue 4: MAIL_CONFIG names the configuration for every queue command -------------------


def test_queue_commands_honour_mail_config(relay_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = relay_daemon(HOLD_DELIVERY)
    qid = send(d.host, d.port, ["bob@example.net"])
    d.wait_log(f"{qid}: to=<bob@example.net>")
    wait_until(lambda: qid in d.queue_files("deferred"), 10, "the deferral")

    # Nothing but MAIL_CONFIG leads to this spool: the per-user default spool is empty.
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, MAIL_CONFIG=str(d.config_dir), HOME=str(home),
               XDG_STATE_HOME=str(home / "state"))
    bindir = Path(sys.executable).parent

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bindir / argv[0]), *argv[1:]], capture_output=True,
                              text=True, env=env, timeout=60)

    for argv in (["mailq"], ["postqueue", "-p"], ["relay", "queue", "ls"]):
        result = run(*argv)
        assert result.returncode == 0 and qid in result.stdout, (argv, result)
    result = run("postqueue", "-j")
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["queue_id"] == qid
    result = run("postcat", "-q", qid)
    assert result.returncode == 0 and "*** ENVELOPE RECORDS" in result.stdout, result
    assert "recipient: bob@example.net" in result.stdout, result.stdout
    result = run("qshape", "deferred")
    assert result.returncode == 0, result
    assert re.search(r"^\s*TOTAL\s+1\b", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^\s*example\.net\s+1\b", result.stdout, re.MULTILINE), result.stdout
    result = run("postsuper", "-h", qid)
    assert (result.returncode, result.stderr) == (
        0, f"postsuper: {qid}: placed on hold\npostsuper: Placed on hold: 1 message\n"), result
    wait_until(lambda: qid in d.queue_files("hold"), 10, "the hold")
    result = run("postsuper", "-d", qid)
    assert (result.returncode, result.stderr) == (
        0, f"postsuper: {qid}: removed\npostsuper: Deleted: 1 message\n"), result
    assert all(qid not in d.queue_files(q) for q in ("incoming", "active", "deferred", "hold"))


# ---- issue 2: IPv6 listen address, default mynetworks over IPv6 ----------------------------


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_listen_address_and_default_mynetworks(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon({"queue_run_delay": "1h", "minimal_backoff_time": "1h",
                      "maximal_backoff_time": "1h",
                      "transport_maps": "inline:{ * = smtp:[127.0.0.1]:1 }"}, start=False)
    port6 = free_port("::1")
    d.write_config(smtpd_listen=f"127.0.0.1:{d.port}, [::1]:{port6}")
    d.start()
    # No mynetworks in main.cf: the embedded default relays for loopback clients only,
    # and ::1 is loopback, so a recipient in any domain is accepted over IPv6 too.
    qid6 = send("::1", port6, ["someone@other.org"])
    qid4 = send("127.0.0.1", d.port, ["someone@other.org"])
    assert qid6 != qid4
    log = d.wait_log(f"{qid6}: client=")
    assert re.search(rf"smtpd\[\d+\]: {qid6}: client=\S*\[::1\]", log), log[-2000:]
    assert re.search(r"smtpd\[\d+\]: connect from \S*\[::1\]$", log, re.MULTILINE), log[-2000:]


# ---- issue 2: one process group; a supervisor's SIGTERM to the group -----------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_one_process_group_and_sigterm_to_the_group(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY, start=False)
    d.stderr_path = d.base / "stderr.group"
    # As a supervisor starts it: the daemon leads a process group of its own.
    d.proc = subprocess.Popen([*RELAY, "-c", str(d.config_dir)], env=d.env,
                              stdout=subprocess.DEVNULL, stderr=open(d.stderr_path, "wb"),
                              start_new_session=True)
    d.wait_listening()
    qid = send(d.host, d.port, ["bob@example.net"])
    d.wait_log(f"{qid}: to=<bob@example.net>")  # the queue manager is up and working

    main = d.proc.pid
    group = os.getpgid(main)
    family = _descendants(main)
    assert family, "the daemon has no helper process (queue manager) to check"
    for pid in family:
        assert os.getpgid(pid) == group, (pid, os.getpgid(pid), group)

    os.killpg(group, signal.SIGTERM)
    try:
        code = d.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon did not stop within 10 s of SIGTERM to its group")
    wait_until(lambda: not any(_alive(p) for p in family), 5, "the helpers to exit")
    assert code == 0, (code, d.stderr()[-2000:])
    assert qid in d.queue_files("deferred") + d.queue_files("incoming") + d.queue_files("active")
