"""A private Postfix instance for the benchmarks in scripts/ (bench, bench_relay, bench_accept).

Its own configuration directory, queue_directory and data_directory under a directory the
caller owns (a temporary one), smtpd on a free loopback port, started with ``postfix -c
DIR start`` and always stopped with ``postfix -c DIR stop``.  It never reads or writes
/etc/postfix or the system's Postfix service.  It needs root and an installed Postfix.

It also holds what the scripts need to compare the two MTAs fairly: ``abba`` (the order
of repeated runs), ``unjournaled_ext4`` (whether the temporary directories sit on ext4
without a journal, where file creation is slow for minutes after mass deletions), and
``free_port`` and ``wait_banner`` for the servers they start.

The scripts import it as ``from postfix_instance import ...``: a script's own directory
is the first entry of sys.path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
UNJOURNALED_NOTE = ("note: ext4 without a journal: file creation is slow for minutes after "
                    "mass deletions; temporary directories are removed only at the end")


def abba(first: str, second: str | None, repeat: int) -> list[str]:
    """``repeat`` runs of each in ABBA order (A B B A A B ...), or ``repeat`` runs of ``first``.

    Neither MTA always goes first, so what one run leaves behind (page cache, the
    filesystem's recently freed inodes, CPU frequency) does not always favour the same one.
    """
    if second is None:
        return [first] * repeat
    return [k for i in range(repeat) for k in ((first, second) if i % 2 == 0 else (second, first))]


def _mount_of(path: str) -> tuple[str, str] | None:
    """(device, fstype) of the filesystem holding ``path``, from /proc/mounts."""
    path = os.path.realpath(path)
    best: tuple[int, str, str] | None = None
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes space, tab, newline and backslash as \ooo.
        device, mount, fstype = (re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), f)
                                 for f in fields[:3])
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= best[0]):  # the last one is on top
            best = (len(mount), device, fstype)
    return None if best is None else (best[1], best[2])


def unjournaled_ext4(path: str) -> bool | None:
    """Whether ``path`` is on ext4 without a journal; None if we cannot tell.

    Asks ``dumpe2fs -h DEVICE`` for "has_journal" among the filesystem features; where
    the device cannot be read (a container, say), the kernel's own view:
    /sys/fs/ext4/DEV/journal_task says "<none>" when the filesystem has no journal.
    """
    mount = _mount_of(path)
    if mount is None:
        return None
    device, fstype = mount
    if fstype != "ext4":
        return False
    if device.startswith("/") and shutil.which("dumpe2fs"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["dumpe2fs", "-h", device], capture_output=True, text=True,
                                 timeout=10, check=False).stdout
            for line in out.splitlines():
                if line.startswith("Filesystem features:"):
                    return "has_journal" not in line.split()
    with contextlib.suppress(OSError):
        dev = os.stat(path).st_dev
        uevent = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent").read_text()
        name = dict(line.partition("=")[::2] for line in uevent.splitlines()).get("DEVNAME")
        if name:
            task = Path(f"/sys/fs/ext4/{name}/journal_task").read_text().strip()
            if task == "<none>":
                return True
            if task.isdigit():
                return False
    return None


def update_params(main: dict[str, str], changes: Mapping[str, str | None]) -> None:
    """Apply ``changes`` to the main.cf parameters ``main``: a value of None removes one."""
    for k, v in changes.items():
        if v is None:
            main.pop(k, None)
        else:
            main[k] = v


def describe_filesystem(path: str) -> str:
    """The filesystem holding ``path``: "ext4 on /dev/vda, no journal", say."""
    mount = _mount_of(path)
    if mount is None:
        return "unknown"
    device, fstype = mount
    journal = {True: ", no journal", False: ", with a journal", None: ""}
    return f"{fstype} on {device}" + (journal[unjournaled_ext4(path)] if fstype == "ext4" else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_banner(port: int, timeout: float = 20.0,
                alive: Callable[[], bool] = lambda: True, prog: str = "bench") -> None:
    """Return once 127.0.0.1:``port`` sends a greeting line; SystemExit after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive():
            raise SystemExit(f"{prog}: the server for port {port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{prog}: nothing listens on 127.0.0.1:{port}")


async def wait_listening(port: int, timeout: float = 20.0,
                         alive: Callable[[], bool] = lambda: True,
                         prog: str = "bench") -> None:
    """wait_banner for a caller on an event loop."""
    await asyncio.to_thread(wait_banner, port, timeout, alive, prog)


class PostfixUnderTest:
    """A private Postfix instance: own config, queue and data directories, loopback only.

    Every message goes to ``relayhost`` (e.g. ``[127.0.0.1]:PORT``).  ``extra`` adds or
    overrides main.cf parameters.  ``prog`` prefixes the messages it prints.  Raises
    RuntimeError if Postfix will not start, KeyError if there is no postfix user.
    """

    name = "postfix"

    def __init__(self, base: Path, relayhost: str, sessions: int,
                 extra: Mapping[str, str] | None = None, prog: str = "bench") -> None:
        self.base = base
        self.prog = prog
        self.port = free_port()
        self.config = base / "etc"
        os.chmod(base, 0o755)  # postfix's daemons run as the postfix user
        self.config.mkdir(parents=True)
        queue = base / "spool"
        data = base / "data"
        queue.mkdir()
        data.mkdir()
        postfix_user = pwd.getpwnam("postfix")
        os.chown(data, postfix_user.pw_uid, postfix_user.pw_gid)
        defaults = subprocess.run(
            ["postconf", "-d", "-h", "daemon_directory", "meta_directory", "shlib_directory"],
            capture_output=True, text=True, check=True).stdout.split()
        daemon_dir, meta_dir, shlib_dir = defaults
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(queue),
            "data_directory": str(data),
            "daemon_directory": daemon_dir,
            "meta_directory": meta_dir,
            "shlib_directory": shlib_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix-bench.test",
            "mydomain": "bench.test",
            "myorigin": "bench.test",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": relayhost,
            "smtp_dns_support_level": "disabled",
            "disable_dns_lookups": "yes",
            "maillog_file": str(base / "maillog"),
            "maillog_file_prefixes": str(base),
            "smtpd_client_connection_count_limit": str(max(50, sessions * 2)),
            "smtpd_client_connection_rate_limit": "0",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "smtputf8_enable": "no",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "multi_instance_enable": "no",
        }
        main.update(extra or {})
        self.main = main
        self._write_main()
        # Only what relaying needs; the service names are those Postfix's programs expect.
        master = f"""\
127.0.0.1:{self.port} inet n - y - - smtpd
pickup    unix  n       -       y       60      1       pickup
cleanup   unix  n       -       y       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       y       1000?   1       tlsmgr
rewrite   unix  -       -       y       -       -       trivial-rewrite
bounce    unix  -       -       y       -       0       bounce
defer     unix  -       -       y       -       0       bounce
trace     unix  -       -       y       -       0       bounce
verify    unix  -       -       y       -       1       verify
flush     unix  n       -       y       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       y       -       -       smtp
relay     unix  -       -       y       -       -       smtp
showq     unix  n       -       y       -       -       showq
error     unix  -       -       y       -       -       error
retry     unix  -       -       y       -       -       error
discard   unix  -       -       y       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       y       -       1       anvil
scache    unix  -       -       y       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
        (self.config / "master.cf").write_text(master)
        self.started = False
        self._start()

    def _write_main(self) -> None:
        (self.config / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.main.items()))

    def restart(self, changes: Mapping[str, str | None]) -> None:
        """Stop if running, change main.cf (a value of None removes it), start again."""
        self.stop()
        update_params(self.main, changes)
        self._write_main()
        self._start()

    def _start(self) -> None:
        try:
            self._run("start")
        except BaseException:
            # A start cut short (Ctrl-C, a timeout) may have left a master running.
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([POSTFIX, "-c", str(self.config), "stop"],
                               capture_output=True, timeout=60, check=False)
            raise
        self.started = True

    def _run(self, verb: str) -> None:
        proc = subprocess.run([POSTFIX, "-c", str(self.config), verb],
                              capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            # Without a terminal postfix(1) says why only in the maillog (if it got that far).
            said = (proc.stdout + proc.stderr).strip()
            with contextlib.suppress(OSError):
                said += " " + (self.base / "maillog").read_text(errors="replace")[-1000:]
            raise RuntimeError(f"postfix -c {self.config} {verb} failed "
                               f"({proc.returncode}): {said.strip()}")

    async def ready(self) -> None:
        await wait_listening(self.port, prog=self.prog)

    def queue_counts(self) -> dict[str, int]:
        """Queue files in maildrop, incoming, active and deferred (hashed subdirectories too)."""
        queue = self.base / "spool"
        return {q: sum(len(files) for _, _, files in os.walk(queue / q))
                for q in ("maildrop", "incoming", "active", "deferred")}

    def left_in_queue(self) -> int:
        return sum(self.queue_counts().values())

    def root_pid(self) -> int:
        """The master's pid: every Postfix process of this instance is below it."""
        return int((self.base / "spool" / "pid" / "master.pid").read_text().split()[0])

    def postqueue_argv(self, *args: str) -> list[str]:
        return ["postqueue", "-c", str(self.config), *args]

    def stop(self) -> None:
        if self.started:
            self.started = False
            try:
                self._run("stop")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"{self.prog}: warning: {exc}", file=sys.stderr)
