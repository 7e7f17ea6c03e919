"""Running relay as an operator does: the start-up line, every start-up failure as one fatal
line, the maillog reopened on SIGHUP (and by logrotate), standard error and syslog as log
targets, systemd's readiness protocol, and ``relay --version``, ``status``, ``reload``,
``stop`` and ``check``.

The daemon runs as a real subprocess (tests.support.daemon); the commands run as the
operator runs them, from the virtualenv's ``relay`` script.  Delivery is held off so that
nothing but what a test does happens.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import RelayDaemon, free_port, wait_until
from tests.support.peers import PeerScript, Reply
from tests.support.tools import require

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
RELAY_BIN = str(Path(sys.executable).parent / "relay")
HOLD_DELIVERY = {
    "transport_maps": "inline:{ * = smtp:[127.0.0.1]:1 }",
    "minimal_backoff_time": "1h",
    "maximal_backoff_time": "1h",
    "queue_run_delay": "1h",
}

MakeDaemon = Callable[..., RelayDaemon]


def relay(*args: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
    environ.update(env or {})
    return subprocess.run([RELAY_BIN, *args], capture_output=True, text=True, env=environ,
                          timeout=timeout, check=False)


def send(port: int, body: str, host: str = "127.0.0.1") -> str:
    """One message over SMTP; the queue ID from the 250 reply."""
    with socket.create_connection((host, port), timeout=10) as sock:
        f = sock.makefile("rwb")

        def reply() -> str:
            lines = []
            while True:
                line = f.readline().decode()
                lines.append(line)
                if line[3:4] != "-":
                    return "".join(lines)

        def cmd(text: str) -> str:
            f.write(text.encode() + b"\r\n")
            f.flush()
            return reply()

        reply()
        cmd("EHLO client.example")
        assert cmd("MAIL FROM:<a@example.org>").startswith("250")
        assert cmd("RCPT TO:<b@example.net>").startswith("250")
        assert cmd("DATA").startswith("354")
        f.write(f"Subject: t\r\n\r\n{body}\r\n.\r\n".encode())
        f.flush()
        answer = reply()
        assert answer.startswith("250 2.0.0 Ok: queued as "), answer
        cmd("QUIT")
        return answer.split()[-1]


def start_fails(d: RelayDaemon, env: dict[str, str] | None = None,
                prefix: list[str] | None = None) -> str:
    """Start the daemon, expect it to stop before listening; its standard error."""
    err_path = d.base / "stderr.fail"
    environ = dict(d.env, **(env or {}))
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "relay.cli.main",
                                 "serve", "-c", str(d.config_dir)],
                                env=environ, stdout=subprocess.DEVNULL, stderr=err)
        rc = proc.wait(30)
    text = err_path.read_text()
    assert rc != 0, text
    assert "Traceback" not in text, text
    fatal = [line for line in text.splitlines() if line.startswith("relay: fatal: ")]
    assert len(fatal) == 1, text
    with pytest.raises(OSError):
        socket.create_connection((d.host, d.port), timeout=0.5).close()
    return fatal[0]


# ---- the start-up line and start-up failures -----------------------------------------------


def test_start_up_line_names_spool_log_and_listeners(relay_daemon: MakeDaemon) -> None:
    second = free_port()
    d = relay_daemon(HOLD_DELIVERY, start=False)
    d.write_config(smtpd_listen=f"127.0.0.1:{d.port}, [::1]:{second}")
    d.start()
    line = d.wait_log("daemon started -- version ")
    expected = (f"daemon started -- version 0.1.0, configuration {d.config_dir}/main.cf, "
                f"queue_directory {d.queue_directory}, maillog_file {d.maillog}, "
                f"listening on 127.0.0.1:{d.port} [::1]:{second}")
    assert expected in line
    assert f"relay: {expected}" in d.stderr()  # the foreground operator sees it too


def test_queue_directory_that_is_a_file(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY, start=False)
    d.queue_directory.write_text("not a directory\n")
    assert start_fails(d) == f"relay: fatal: queue_directory {d.queue_directory} is not a directory"


def test_queue_subdirectory_that_is_a_file(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY, start=False)
    d.queue_directory.mkdir()
    (d.queue_directory / "deferred").write_text("")
    assert start_fails(d) == (f"relay: fatal: queue_directory {d.queue_directory}/deferred "
                              f"is not a directory")


def _drop_dac() -> list[str]:
    """Run as root without the capabilities that ignore file modes, where possible."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0:
        return []
    if setpriv is None:
        pytest.skip("running as root without setpriv: file modes do not apply")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_queue_directory_without_permission(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY, start=False)
    d.queue_directory.mkdir(mode=0o500)
    try:
        line = start_fails(d, prefix=_drop_dac())
    finally:
        d.queue_directory.chmod(0o700)
    assert line.startswith(f"relay: fatal: queue_directory {d.queue_directory}: permission "
                           f"denied (mode 0500"), line


def test_full_disk_is_fatal_at_start(relay_daemon: MakeDaemon, tmp_path: Path) -> None:
    """A real full file system: a 256 KiB tmpfs in a private mount namespace, filled up."""
    unshare = require("unshare")
    probe = subprocess.run([unshare, "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private namespace: {probe.stderr!r}")
    mnt = tmp_path / "full"
    mnt.mkdir()
    d = relay_daemon({**HOLD_DELIVERY, "queue_directory": str(mnt / "spool")}, start=False)
    script = (f"mount -t tmpfs -o size=256k tmpfs {mnt} && "
              f"(dd if=/dev/zero of={mnt}/ballast bs=4k 2>/dev/null; true) && exec \"$@\"")
    line = start_fails(d, prefix=[unshare, "-m", "sh", "-c", script, "sh"])
    assert line == (f"relay: fatal: queue_directory {mnt}/spool: {mnt}/spool/master.pid: "
                    f"No space left on device"), line


def test_unwritable_maillog_file(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY, start=False)
    blocker = d.base / "a-file"
    blocker.write_text("")
    d.write_config(maillog_file=str(blocker / "maillog"))
    assert start_fails(d) == (f"relay: fatal: maillog_file: open {blocker}/maillog: "
                              f"Not a directory")


def test_port_in_use_is_one_fatal_line(relay_daemon: MakeDaemon) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        d = relay_daemon({**HOLD_DELIVERY, "smtpd_listen": f"127.0.0.1:{port}"}, start=False)
        line = start_fails(d)
    assert line == f"relay: fatal: bind 127.0.0.1 port {port}: Address already in use"
    assert line.removeprefix("relay: ") in d.log()  # and in the maillog, Postfix's way


def test_syslog_socket_absent_is_fatal(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY, start=False)
    d.write_config(maillog_file="syslog")
    missing = d.base / "no-syslog"
    line = start_fails(d, env={"RELAY_SYSLOG_SOCKET": str(missing)})
    assert line == (f"relay: fatal: maillog_file: cannot connect to the syslog socket "
                    f"{missing}: No such file or directory")


# ---- where the log goes ----------------------------------------------------------------------


def test_maillog_reopened_on_sighup_and_relay_reload(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY)
    first = send(d.port, "one")
    d.wait_log(f"{first}: message-id")
    rotated = d.base / "maillog.1"
    d.maillog.rename(rotated)
    assert relay("reload", "-c", str(d.config_dir)).returncode == 0
    d.wait_log("reload -- configuration")
    second = send(d.port, "two")
    log = d.wait_log(f"{second}: message-id")
    # Both processes write to the new file: the listener (smtpd, cleanup) and the queue
    # manager (qmgr) lines of the second message, none of the first.
    assert "relay/qmgr[" in d.wait_log(f"{second}: from=<a@example.org>")
    assert first not in log
    old = rotated.read_text()
    assert f"{first}: message-id" in old and second not in old

    rotated.unlink()
    d.maillog.rename(rotated)
    d.hup()  # a plain SIGHUP does the same
    third = send(d.port, "three")
    d.wait_log(f"{third}: from=<a@example.org>")
    assert third not in rotated.read_text()


def test_logrotate_recipe_rotates_without_copytruncate(relay_daemon: MakeDaemon,
                                                      tmp_path: Path) -> None:
    logrotate = require("logrotate", "/usr/sbin/logrotate")
    d = relay_daemon(HOLD_DELIVERY)
    recipe = (REPO / "conf" / "relay.logrotate").read_text()
    assert not re.search(r"^\s*copytruncate", recipe, re.MULTILINE)
    assert "/var/log/relay/maillog" in recipe and "relay reload" in recipe
    recipe = recipe.replace("/var/log/relay/maillog", str(d.maillog))
    # This machine has no relay user to rotate as: the test rotates as itself.
    recipe = re.sub(r"^\s*su relay relay\n", "", recipe, flags=re.MULTILINE)
    recipe = re.sub(r"\S*relay reload -c \S+", f"{RELAY_BIN} reload -c {d.config_dir}", recipe)
    (tmp_path / "logrotate.conf").write_text(recipe)
    before = send(d.port, "before")
    d.wait_log(f"{before}: from=<")
    run = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"),
                          str(tmp_path / "logrotate.conf")], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    rotated = sorted(p.name for p in d.maillog.parent.iterdir() if p.name.startswith("maillog."))
    assert rotated, list(d.maillog.parent.iterdir())
    d.wait_log("reload -- configuration")
    after = send(d.port, "after")
    d.wait_log(f"{after}: from=<")
    assert before not in d.log()
    old = "".join((d.maillog.parent / name).read_text(errors="replace") for name in rotated
                  if not name.endswith(".gz"))
    assert after not in old


def test_empty_maillog_file_logs_to_stderr(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon({**HOLD_DELIVERY, "maillog_file": ""})
    queue_id = send(d.port, "to stderr")
    wait_until(lambda: "relay/qmgr[" in d.stderr() and queue_id in d.stderr(), 10, "stderr")
    assert re.search(rf"relay/cleanup\[\d+\]: {queue_id}: message-id=", d.stderr())


def test_maillog_file_syslog(relay_daemon: MakeDaemon, tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(10)
    try:
        d = relay_daemon({**HOLD_DELIVERY, "maillog_file": "syslog", "syslog_name": "postfix",
                          "syslog_facility": "local3"},
                         env={"RELAY_SYSLOG_SOCKET": str(path)})
        queue_id = send(d.port, "to syslog")
        seen: list[str] = []
        end = time.monotonic() + 10
        while not any(f"{queue_id}: from=<" in s for s in seen) and time.monotonic() < end:
            seen.append(server.recv(65536).decode())
        # postsuper logs there too, not to a file named "syslog".
        assert d.run_cmd("postsuper", "-h", queue_id).returncode == 0
        while not any("postsuper[" in s for s in seen) and time.monotonic() < end:
            seen.append(server.recv(65536).decode())
    finally:
        server.close()
    assert any(re.match(rf"<158>.{{15}} postfix/postsuper\[\d+\]: {queue_id}: placed on hold",
                        s) for s in seen), seen
    assert not (d.config_dir / "syslog").exists() and not Path("syslog").exists()
    started = next(s for s in seen if "daemon started" in s)
    # RFC 3164 as syslog(3) writes it: <PRI>TIMESTAMP TAG[PID]: text; local3.info = 158.
    assert re.match(r"<158>\w{3} [ \d]\d \d\d:\d\d:\d\d postfix/master\[\d+\]: daemon "
                    r"started -- version", started), started
    assert any(re.match(rf"<158>.{{15}} postfix/qmgr\[\d+\]: {queue_id}: from=<a@example.org>",
                        s) for s in seen), seen
    assert not any(s.endswith("\0") for s in seen)
    assert not d.maillog.exists()


# ---- systemd's readiness protocol ------------------------------------------------------------


def test_sd_notify_ready_reloading_stopping(relay_daemon: MakeDaemon, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(15)
    try:
        d = relay_daemon(HOLD_DELIVERY, start=False, env={"NOTIFY_SOCKET": str(path)})
        d.start(wait=False)
        assert d.proc is not None
        ready = server.recv(4096).decode().split("\n")
        assert "READY=1" in ready and f"MAINPID={d.proc.pid}" in ready
        # READY=1 comes once it listens: a connection now gets the banner.
        with socket.create_connection((d.host, d.port), timeout=5) as s:
            assert s.recv(100).startswith(b"220 ")
        d.hup()
        reloading = server.recv(4096).decode().split("\n")
        assert "RELOADING=1" in reloading
        assert any(f.startswith("MONOTONIC_USEC=") for f in reloading)
        assert "READY=1" in server.recv(4096).decode().split("\n")
        d.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in server.recv(4096).decode().split("\n")
        assert d.proc.wait(15) == 0
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):  # nothing from the queue manager process
            server.recv(4096)
    finally:
        server.close()


# ---- relay --version, status, reload, stop, check --------------------------------------------


def test_version() -> None:
    done = relay("--version")
    assert done.returncode == 0
    assert done.stdout == "relay 0.1.0\n"


def test_status_reload_stop(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY, start=False)
    down = relay("status", "-c", str(d.config_dir))
    assert down.returncode == 1
    assert down.stderr == "relay: the mail system is not running\n"
    for command in ("reload", "stop"):
        done = relay(command, "-c", str(d.config_dir))
        assert done.returncode == 1
        assert done.stderr == "relay: fatal: the mail system is not running\n"

    d.start()
    assert d.proc is not None
    up = relay("status", env={"MAIL_CONFIG": str(d.config_dir)})
    assert up.returncode == 0
    assert up.stderr == f"relay: the mail system is running: PID: {d.proc.pid}\n"

    reload = relay("reload", "-c", str(d.config_dir))
    assert reload.returncode == 0 and reload.stderr == "relay: refreshing the mail system\n"
    d.wait_log("reload -- configuration")
    assert d.proc.poll() is None

    queue_id = send(d.port, "kept")
    stop = relay("stop", "-c", str(d.config_dir))
    assert stop.returncode == 0
    assert stop.stderr.startswith("relay: stopping the mail system\n")
    assert "with force" not in stop.stderr
    # stop returns only once the daemon is gone, having stopped gracefully.
    assert d.proc.poll() == 0
    assert "terminating on signal" in d.log()
    assert relay("status", "-c", str(d.config_dir)).returncode == 1
    assert queue_id in os.listdir(d.queue_directory / "data")


def test_reload_refuses_a_bad_main_cf(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY)
    d.write_config(smtpd_timeout="soon")
    done = relay("reload", "-c", str(d.config_dir))
    assert done.returncode == 1
    assert done.stderr == (f"relay: fatal: {d.config_dir}/main.cf, line 9: bad time value for "
                           f"parameter smtpd_timeout: soon\n")
    time.sleep(0.3)
    assert "reload --" not in d.log() and "reload failed" not in d.log()


def test_check_passes_a_good_setup_and_names_each_problem(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY, start=False)
    ok = relay("check", "-c", str(d.config_dir))
    assert (ok.returncode, ok.stderr) == (0, "")
    assert not d.queue_directory.exists()  # check creates nothing

    d.start()
    running = relay("check", "-c", str(d.config_dir))  # its own port in use is no problem
    assert (running.returncode, running.stderr) == (0, "")
    d.stop()

    (d.queue_directory / "hold").rmdir()
    (d.queue_directory / "hold").write_text("")
    (d.queue_directory / "corrupt").chmod(0o777)
    blocker = d.base / "a-file"
    blocker.write_text("")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", d.port))
        squatter.listen(1)
        d.write_config(maillog_file=str(blocker / "maillog"), no_such_parameter="1",
                       message_size_limit=str(1 << 60))
        bad = relay("check", "-c", str(d.config_dir))
    assert bad.returncode == 1
    lines = bad.stderr.splitlines()
    assert lines[0] == (f"relay: warning: {d.config_dir}/main.cf, line 9: unused parameter: "
                        f"no_such_parameter=1")
    assert f"relay: error: queue_directory {d.queue_directory}/hold is not a directory" in lines
    assert (f"relay: warning: {d.queue_directory}/corrupt is group or world writable "
            f"(mode 0777)") in lines
    assert any(line.startswith(f"relay: error: queue_directory {d.queue_directory}: ")
               and "bytes free, less than" in line for line in lines), lines
    assert (f"relay: error: maillog_file {blocker}/maillog cannot be created: {blocker} is not "
            f"a directory") in lines
    assert (f"relay: error: smtpd_listen: bind 127.0.0.1 port {d.port}: Address already in use"
            in lines)
    assert len(lines) == 6, lines

    d.write_config(smtpd_relay_restrictions="permit_mynetworks")
    bad = relay("check", "-c", str(d.config_dir))
    assert any("smtpd_relay_restrictions" in line for line in bad.stderr.splitlines())


# ---- SIGHUP and the queue manager's timers -----------------------------------------------------


def _defer_first(peer_port: int) -> dict[str, str]:
    return {"transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{peer_port} }}"}


def _first_try_fails(n: int) -> PeerScript:
    return PeerScript(rcpt=Reply(451, "4.3.0 try again later") if n == 1 else Reply(250, "2.1.5 Ok"))


def test_sighup_rearms_the_queue_run_timer(relay_daemon: MakeDaemon, threaded_peer: Any) -> None:
    peer = threaded_peer(_first_try_fails)
    # The message is due again a second after its first try, but deferred/ is scanned
    # only every hour ...
    d = relay_daemon({**_defer_first(peer.port), "minimal_backoff_time": "1s",
                      "maximal_backoff_time": "1s", "queue_run_delay": "1h"})
    queue_id = send(d.port, "timer")
    d.wait_log(f"{queue_id}: to=<b@example.net>, relay=127.0.0.1[127.0.0.1]:{peer.port}")
    d.wait_log("status=deferred")
    time.sleep(2.5)
    assert "status=sent" not in d.log()
    # ... until a reload with a short queue_run_delay re-arms the timer.
    d.write_config(queue_run_delay="1s")
    d.hup()
    d.wait_log(f"{queue_id}: to=<b@example.net>, relay=127.0.0.1[127.0.0.1]:{peer.port}, "
               "delay=", count=2, timeout=10)
    d.wait_log("status=sent", timeout=5)
    assert len(peer.messages) == 1


def test_sighup_applies_new_backoff_times_to_deferred_mail(relay_daemon: MakeDaemon,
                                                          threaded_peer: Any) -> None:
    peer = threaded_peer(_first_try_fails)
    # Scans every second, but the message waits an hour after its first try ...
    d = relay_daemon({**_defer_first(peer.port), "minimal_backoff_time": "1h",
                      "maximal_backoff_time": "1h", "queue_run_delay": "1s"})
    queue_id = send(d.port, "backoff")
    d.wait_log("status=deferred")
    mtime = (d.queue_directory / "deferred" / queue_id).stat().st_mtime
    assert mtime > time.time() + 3000
    time.sleep(2.5)
    assert "status=sent" not in d.log()
    # ... until a reload makes the backoff a second: the next scan dates it again.
    d.write_config(minimal_backoff_time="1s", maximal_backoff_time="2s")
    d.hup()
    log = d.wait_log("status=sent", timeout=10)
    assert "new backoff times applied to 1 deferred messages" in log
    assert len(peer.messages) == 1
