"""``relay capture``, run as the installed command: ls, show, rm, clear and wait on the
Maildirs that main.cf names (or --maildir), and its errors."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from relay import maildir

RELAY = [str(Path(sys.executable).parent / "relay"), "capture"]


def run(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*RELAY, *(["-c", str(config)] if config else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def deliver(box: Path, subject: str, rcpt: str = "bob@example.net") -> str:
    return maildir.deliver(str(box), f"Subject: {subject}\r\nTo: {rcpt}\r\n\r\nhi\r\n".encode(),
                           sender="app@example.org", recipient=rcpt)


def test_ls_show_rm_clear_through_main_cf(tmp_path: Path) -> None:
    box = tmp_path / "captured"
    (tmp_path / "main.cf").write_text(f"capture_maildir = {box}\n")
    assert run("ls", config=tmp_path).stdout == ""  # no Maildir yet: nothing captured
    first = deliver(box, "Welcome")
    second = deliver(box, "Reset your password", "cat@example.net")
    r = run("ls", config=tmp_path)
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [first, second]
    assert lines[1].endswith("<app@example.org> -> cat@example.net  Reset your password")
    assert run("ls", "--match", "subject:reset", config=tmp_path).stdout.split()[0] == second
    r = run("ls", "--json", config=tmp_path)
    assert '"Subject": "Welcome"' in r.stdout.splitlines()[0]
    r = run("show", "latest", config=tmp_path)
    assert r.stdout.startswith("Return-Path: <app@example.org>\n")
    assert "Subject: Reset your password\n" in r.stdout
    r = run("rm", first, "nonesuch", config=tmp_path)
    assert (r.returncode, r.stdout) == (1, f"{first}: removed\n")
    assert r.stderr == "relay capture: nonesuch: no such message\n"
    r = run("show", first, config=tmp_path)
    assert (r.returncode, r.stderr) == (1, f"relay capture: fatal: {first}: no such message\n")
    assert run("clear", config=tmp_path).stdout == "1 message removed\n"
    assert run("ls", config=tmp_path).stdout == ""


def test_maildirs_of_the_next_hops(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (tmp_path / "main.cf").write_text(
        f"default_transport = maildir:{a}\ntransport_maps = inline:{{ x.test = maildir:{b} }}\n")
    deliver(a, "one")
    deliver(b, "two")
    assert len(run("ls", config=tmp_path).stdout.splitlines()) == 2
    assert len(run("--maildir", str(b), "ls").stdout.splitlines()) == 1


def test_wait(tmp_path: Path) -> None:
    box = tmp_path / "m"
    deliver(box, "first")
    r = run("--maildir", str(box), "wait", "--count", "2", "--timeout", "0.5")
    assert r.returncode == 75
    assert r.stderr == "relay capture: timeout: 1 of 2 messages after 0.5s\n"
    r = run("--maildir", str(box), "wait", "--match", "subject:second", "--timeout", "0.3")
    assert r.stderr == ("relay capture: timeout: 0 of 1 message matching 'subject:second' "
                        "after 0.3s\n")
    later = threading.Timer(0.5, deliver, (box, "second"))
    later.start()
    started = time.monotonic()
    r = run("--maildir", str(box), "wait", "--match", "subject:second", "--timeout", "20")
    later.join()
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1
    assert time.monotonic() - started < 15


def test_errors(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text("relayhost = [smtp.example.com]:587\n")
    r = run("ls", config=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("relay capture: fatal: no Maildir: main.cf names none")
    r = run("--maildir", str(tmp_path), "ls", "--match", "larger:lots")
    assert (r.returncode, r.stderr) == (64, "relay capture: fatal: --match: bad size 'lots'\n")
    r = run("--maildir", str(tmp_path))
    assert r.returncode == 64
    r = run("--maildir", str(tmp_path), "explode")
    assert r.returncode == 64 and "invalid choice: 'explode'" in r.stderr
