"""``relay serve`` from start to stop: signals, configuration, the spool lock, start-up cleanup.

Each test runs the daemon as a real subprocess (tests.support.daemon) and watches it
from outside: replies on its SMTP port, its exit status, its stderr and maillog, and
the spool directory; and the daemon's processes stay in one process group, so that a
supervisor's SIGTERM to the group stops them all gracefully.  Delivery is held off (the next hop refuses connections and the
backoff is an hour) so accepted mail stays in the spool for the test to find.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import pytest

from spool import Spool
from spool.envelope import Envelope
from spool.errors import CorruptEntry, EntryGone
from tests.support.daemon import RELAY, RelayDaemon, smtp_send, wait_until

pytestmark = pytest.mark.timeout(60)

HOLD_DELIVERY = {
    "transport_maps": "inline:{ * = smtp:[127.0.0.1]:1 }",
    "minimal_backoff_time": "1h",
    "maximal_backoff_time": "1h",
    "queue_run_delay": "1h",
}
ENVELOPE_QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")

MakeDaemon = Callable[..., RelayDaemon]


class Client:
    """Just enough SMTP over a raw socket to hold a session open across a signal."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.banner = self.reply()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def reply(self) -> str:
        lines: list[bytes] = []
        while not lines or (len(lines[-1]) > 3 and lines[-1][3:4] == b"-"):
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; unread: {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
        return "\n".join(x.decode() for x in lines)

    def cmd(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def send_mail(self, sender: str, recipient: str, body: str = "hello") -> str:
        assert self.cmd(f"MAIL FROM:<{sender}>").startswith("250")
        assert self.cmd(f"RCPT TO:<{recipient}>").startswith("250")
        assert self.cmd("DATA").startswith("354")
        self.sock.sendall(f"Subject: test\r\n\r\n{body}\r\n.\r\n".encode())
        reply = self.reply()
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        return reply.rsplit(" ", 1)[1]


def read_envelope(queue_directory: Path, queue_id: str) -> Envelope:
    spool = Spool(str(queue_directory), create=False)
    for queue in ENVELOPE_QUEUES:
        try:
            return spool.read(queue, queue_id)
        except (EntryGone, CorruptEntry):
            continue
    raise AssertionError(f"{queue_id} is not in the spool")


def listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# ---- signals ------------------------------------------------------------------------------


def test_sigterm_with_a_session_open(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY)
    assert d.proc is not None
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        queue_id = c.send_mail("alice@example.org", "bob@example.net")
        assert c.cmd("MAIL FROM:<second@example.org>").startswith("250")
        assert c.cmd("RCPT TO:<bob@example.net>").startswith("250")
        start = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert c.reply().startswith("421"), "no 421 before the daemon went away"
        rc = d.proc.wait(10)
        assert rc == 0, d.stderr() + d.log()
        assert time.monotonic() - start < 10
    assert not listens(d.port)
    env = read_envelope(d.queue_directory, queue_id)
    assert env.sender == "alice@example.org"
    assert Spool(str(d.queue_directory), create=False).read_content(queue_id, env.size)
    assert "terminating on signal" in d.log()


def test_sighup_reloads_main_cf(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon({**HOLD_DELIVERY, "mynetworks": "127.0.0.2/32",
                      "relay_domains": "example.com"})
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<x@sender.example>")
        assert c.cmd("RCPT TO:<a@example.com>").startswith("250")
        assert c.cmd("RCPT TO:<a@other.org>").startswith("554 5.7.1")

    d.write_config(relay_domains="example.com, other.org")
    d.hup()
    d.wait_log("reload -- configuration")
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<x@sender.example>")
        assert c.cmd("RCPT TO:<a@other.org>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<a@third.net>").startswith("554 5.7.1")
        c.cmd("QUIT")

    # A bad main.cf at reload is refused and the running configuration is kept.
    d.write_config(smtpd_timeout="soon", relay_domains="example.com")
    d.hup()
    log = d.wait_log("reload failed")
    assert "bad time value for parameter smtpd_timeout: soon" in log
    assert d.proc is not None and d.proc.poll() is None
    with Client(d.port) as c:
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<x@sender.example>")
        assert c.cmd("RCPT TO:<a@other.org>").startswith("250 2.1.5")


# ---- configuration -------------------------------------------------------------------------------


def test_bad_configuration_is_fatal_before_listening(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(start=False)
    main_cf = d.config_dir / "main.cf"
    main_cf.write_text(
        "# written by test_bad_configuration_is_fatal_before_listening\n"
        f"queue_directory = {d.queue_directory}\n"
        f"smtpd_listen = 127.0.0.1:{d.port}\n"
        f"maillog_file = {d.maillog}\n"
        "\n"
        "smtpd_timeout = soon\n"
    )
    d.start(wait=False)
    assert d.proc is not None
    connected: list[bool] = []

    def probe() -> None:  # until the process is gone, try to connect as often as we can
        assert d.proc is not None
        while d.proc.poll() is None:
            connected.append(listens(d.port))
            time.sleep(0.005)

    prober = threading.Thread(target=probe)
    prober.start()
    rc = d.proc.wait(15)
    prober.join()
    assert rc != 0
    assert (f"relay: fatal: {main_cf}, line 6: bad time value for parameter "
            f"smtpd_timeout: soon") in d.stderr()
    assert connected and not any(connected), "the daemon listened despite a fatal error"


def test_unknown_parameter_stops_it_unless_referenced(relay_daemon: MakeDaemon) -> None:
    # Issue 11: a typo must not leave a setting silently unapplied.
    d = relay_daemon({**HOLD_DELIVERY, "no_such_parameter": "42"}, start=False)
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(30) == 1
    assert "relay: fatal: " in d.stderr() and "unknown parameter no_such_parameter" in d.stderr()
    # A user-defined parameter that another one refers to as $name is Postfix's and fine.
    d = relay_daemon({**HOLD_DELIVERY, "my_limit": "42", "smtpd_recipient_limit": "$my_limit"})
    assert "warning" not in d.stderr()
    with Client(d.port) as c:
        assert c.cmd("EHLO client.example").startswith("250")
        c.send_mail("a@example.org", "b@example.net")


def test_mail_config_environment_names_the_directory(relay_daemon: MakeDaemon,
                                                     tmp_path: Path) -> None:
    d = relay_daemon(HOLD_DELIVERY, start=False)
    d.stderr_path = tmp_path / "stderr.mail_config"
    env = dict(d.env, MAIL_CONFIG=str(d.config_dir))
    with open(d.stderr_path, "wb") as err:
        d.proc = subprocess.Popen(RELAY, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                  cwd=tmp_path)
    d.wait_listening()  # the port is the one in DIR/main.cf
    assert (d.queue_directory / "incoming").is_dir()
    d.wait_log(f"configuration {d.config_dir / 'main.cf'}")
    assert d.stop() == 0


def _run_with_defaults(tmp_path: Path, env: dict[str, str], expected_spool: Path) -> None:
    """Start with neither -c nor MAIL_CONFIG and watch for the spool; port 2525 may be
    busy on this machine, so the test looks only at the spool and then stops."""
    err_path = tmp_path / "stderr.defaults"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(RELAY, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                cwd=tmp_path)
    try:
        wait_until(lambda: (expected_spool / "master.pid").exists() or proc.poll() is not None,
                   15, f"the spool at {expected_spool}")
        for name in ("tmp", "data", *ENVELOPE_QUEUES):
            assert (expected_spool / name).is_dir(), (name, err_path.read_text())
        assert "fatal: open" not in err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _bare_environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAIL_CONFIG", "XDG_STATE_HOME", "HOME")}
    env["HOME"] = str(home)
    return env


def test_defaults_put_the_spool_under_xdg_state_home(tmp_path: Path) -> None:
    home, state = tmp_path / "home", tmp_path / "state"
    home.mkdir()
    env = dict(_bare_environment(home), XDG_STATE_HOME=str(state))
    _run_with_defaults(tmp_path, env, state / "relay" / "spool")
    assert not (home / ".local").exists()


def test_defaults_put_the_spool_under_home_without_xdg(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _run_with_defaults(tmp_path, _bare_environment(home),
                       home / ".local" / "state" / "relay" / "spool")


# ---- the spool lock and start-up cleanup ---------------------------------------------------


def test_two_daemons_on_one_spool(relay_daemon: MakeDaemon) -> None:
    first = relay_daemon(HOLD_DELIVERY)
    second = relay_daemon({**HOLD_DELIVERY, "queue_directory": str(first.queue_directory)},
                          start=False)
    assert second.port != first.port
    second.start(wait=False)
    assert second.proc is not None
    rc = second.proc.wait(15)
    assert rc != 0
    said = second.stderr() + second.log()
    assert "already running" in said and str(first.queue_directory) in said, said
    assert not listens(second.port)
    with Client(first.port) as c:  # the first one is unharmed
        c.cmd("EHLO client.example")
        c.send_mail("a@example.org", "b@example.net")


def test_stale_tmp_and_orphan_data_removed_at_start(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY, start=False)
    Spool(str(d.queue_directory))  # creates the directories
    now = time.time()
    files = {
        "tmp/0A1B2C3D4E5.1234.5678": now - 2 * 86400,  # old: never acknowledged, goes
        "tmp/0F1E2D3C4B5.1234.5678": now - 3600,  # young: may belong to a live writer, stays
        "data/0A1B2C3D4E6": now - 2 * 86400,  # old data with no envelope, goes
        "data/0F1E2D3C4B6": now - 3600,  # young data with no envelope, stays
    }
    for name, mtime in files.items():
        path = d.queue_directory / name
        path.write_bytes(b"partial")
        os.utime(path, (mtime, mtime))
    d.start()
    d.wait_log("removed stale file data/0A1B2C3D4E6")
    log = d.wait_log("removed stale file tmp/0A1B2C3D4E5.1234.5678")
    assert not (d.queue_directory / "tmp/0A1B2C3D4E5.1234.5678").exists()
    assert not (d.queue_directory / "data/0A1B2C3D4E6").exists()
    assert (d.queue_directory / "tmp/0F1E2D3C4B5.1234.5678").exists()
    assert (d.queue_directory / "data/0F1E2D3C4B6").exists()
    assert "0F1E2D3C4B" not in log


def test_port_in_use_is_fatal(relay_daemon: MakeDaemon) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        d = relay_daemon({**HOLD_DELIVERY, "smtpd_listen": f"127.0.0.1:{port}"}, start=False)
        d.start(wait=False)
        assert d.proc is not None
        assert d.proc.wait(15) != 0
    assert f"bind 127.0.0.1 port {port}" in d.stderr() + d.log()


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
    with open(d.stderr_path, "wb") as stderr:  # the daemon keeps its own copy
        d.proc = subprocess.Popen([*RELAY, "-c", str(d.config_dir)], env=d.env,
                                  stdout=subprocess.DEVNULL, stderr=stderr,
                                  start_new_session=True)
    d.wait_listening()
    qid = smtp_send(d.host, d.port, ["bob@example.net"])
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
