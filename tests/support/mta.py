"""Private instances of real MTAs (Postfix 3.7, Exim 4, OpenSMTPD 6.8) as test peers.

Owns: for each MTA, one instance in a directory of its own (configuration, queue, logs and
the store of what it delivered), with listeners on free loopback ports, started as a real
process and stopped at teardown, even when the test failed.  Each instance plays both roles:

- **server**: four listeners, ``plain`` (no STARTTLS), ``tls`` (STARTTLS offered),
  ``auth`` (STARTTLS, then AUTH PLAIN and LOGIN, required before mail is taken) and
  ``login`` (the same with AUTH LOGIN only).  Mail for ``local_domains`` is stored, one file
  per recipient, by a shell script every MTA runs as its delivery agent (`Store`); the
  script adds nothing, so a stored file is the message as the MTA would hand it on.
  Recipients given to `set_recipient_access` get 550 or 450 at RCPT.
- **client**: mail for a domain in ``routes`` goes to that `Route` (host, port, STARTTLS
  required or not, a SASL account and mechanism), never by MX lookup.

Never: touches the machine's own MTA configuration, queue or service, binds anything but
loopback, or uses port 25.  OpenSMTPD has its spool, its control socket and its helper
programs at paths compiled into it: it runs in a mount namespace of its own where the
instance's directories are bound over /var/spool, /run and /usr/libexec, so neither the
machine nor another instance sees them.

A crash of the test process (SIGKILL) leaves the instance running; its PID is in its
directory.  The MTAs are those ``scripts/install-peers`` installs: Postfix from Debian's
package, Exim and OpenSMTPD unpacked under /opt/relay-peers (installing their packages
would remove Postfix).  A missing one skips the test, or fails it in CI (`tools.missing`).

RFCs: 5321 (SMTP), 3207 (STARTTLS), 4954 (AUTH), 3461 (DSN), 6531 (SMTPUTF8); the stores
write LF line ends, as every MTA does on local delivery (`Store` gives CRLF back).
"""

from __future__ import annotations

import base64
import contextlib
import os
import pwd
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

from tests.support.tools import missing

PEERS_DIR = Path(os.environ.get("RELAY_PEERS_DIR", "/opt/relay-peers"))
POSTFIX = "/usr/sbin/postfix"
# Longer than the connection caches of the clients in the tests (relay's
# smtp_connection_cache_time_limit is 2s).
POSTFIX_POLICY_SETTLE = 2.5
EXIM = PEERS_DIR / "exim4/usr/sbin/exim4"
OPENSMTPD = PEERS_DIR / "opensmtpd/usr/sbin/smtpd"
LISTENERS = ("plain", "tls", "auth", "login")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- TLS and SASL --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """A server certificate (with its chain), its key, and the CA that signed it (PEM)."""

    cert: Path
    key: Path
    ca: Path


def make_tls(directory: Path, *names: str) -> TLSFiles:
    """A CA and a certificate for ``names`` (localhost and 127.0.0.1 too), from trustme.

    RSA keys: OpenSMTPD 6.8 with OpenSSL 3 loads no other kind for its server side."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert(*names, "localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    files = TLSFiles(directory / "cert.pem", directory / "key.pem", directory / "ca.pem")
    files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    files.key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(files.ca))
    os.chmod(files.cert, 0o644)
    os.chmod(files.ca, 0o644)
    os.chmod(files.key, 0o600)  # an MTA that reads it as another user gets it chown'ed
    return files


@dataclass(frozen=True, slots=True)
class Account:
    user: str
    password: str

    def plain(self) -> str:
        """The AUTH PLAIN initial response."""
        return base64.b64encode(f"\0{self.user}\0{self.password}".encode()).decode()


@dataclass(frozen=True, slots=True)
class Route:
    """Where an MTA sends mail for a domain it does not keep."""

    host: str
    port: int
    starttls: bool = False  # required; False: never used, even when offered
    account: Account | None = None  # authenticate with it (STARTTLS first)
    mechanism: str = "PLAIN"  # the only mechanism used: PLAIN or LOGIN

    @property
    def key(self) -> str:
        """A name for this kind of route: plain, tls, auth-plain, auth-login."""
        if self.account is not None:
            return f"auth-{self.mechanism.lower()}"
        return "tls" if self.starttls else "plain"


# -- what the peers delivered --------------------------------------------------------------

STORE_SCRIPT = """\
#!/bin/sh
# store [RECIPIENT]: the message on standard input becomes one new file under
# {store}/new/RECIPIENT/, written in {store}/tmp first and renamed into place.
# Exim gives the recipient in the environment ($RECIPIENT): its own variables are
# "tainted" on a command line.
umask 022
rcpt=${{1:-$RECIPIENT}}
tmp=$(mktemp "{store}/tmp/m.XXXXXXXXXX") || exit 75
cat > "$tmp" || exit 75
mkdir -p "{store}/new/$rcpt" || exit 75
mv "$tmp" "{store}/new/$rcpt/" || exit 75
"""


class Store:
    """The messages an MTA delivered locally: ``new/RECIPIENT/FILE``, one file per copy."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Header fields the MTA's own delivery agent puts on top, taken off by messages().
        self.delivery_headers: tuple[bytes, ...] = ()
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        (root / "new").mkdir(exist_ok=True)
        for path in (root, root / "tmp", root / "new"):
            os.chmod(path, 0o1777)  # written by whichever user the MTA delivers as
        self.script = root / "store.sh"
        self.script.write_text(STORE_SCRIPT.format(store=root))
        os.chmod(self.script, 0o755)

    def recipients(self) -> list[str]:
        return sorted(os.fsdecode(p.name) for p in (self.root / "new").iterdir())

    def messages(self, recipient: str) -> list[bytes]:
        """Every copy delivered to ``recipient``, oldest first, with CRLF line ends."""
        directory = self.root / "new" / recipient
        if not directory.is_dir():
            return []
        files = sorted(directory.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [self._strip(to_crlf(p.read_bytes())) for p in files]

    def _strip(self, message: bytes) -> bytes:
        while self.delivery_headers:
            name = message.split(b":", 1)[0].lower()
            if name not in self.delivery_headers:
                break
            message = message.split(b"\r\n", 1)[1]
        return message

    def count(self) -> int:
        return sum(len(os.listdir(self.root / "new" / r)) for r in self.recipients())

    def wait(self, recipients: Iterable[str], timeout: float = 30.0,
             mta: PrivateMTA | None = None) -> dict[str, list[bytes]]:
        """Wait until every one of ``recipients`` has at least one copy; their copies."""
        wanted = list(recipients)
        deadline = time.monotonic() + timeout
        while True:
            got = {r: self.messages(r) for r in wanted}
            if all(got.values()):
                return got
            if time.monotonic() > deadline:
                lacking = [r for r in wanted if not got[r]]
                tail = f"\n--- {mta.name} log ---\n{mta.log()[-3000:]}" if mta else ""
                raise AssertionError(f"not delivered within {timeout}s to {len(lacking)} of "
                                     f"{len(wanted)}: {lacking[:5]}{tail}")
            time.sleep(0.1)

    def clear(self) -> None:
        for recipient in self.recipients():
            shutil.rmtree(self.root / "new" / recipient)


def to_crlf(data: bytes) -> bytes:
    """A stored file (LF line ends) back in SMTP form (CRLF)."""
    return re.sub(rb"\r?\n", b"\r\n", data)


# -- comparing what arrived with what was sent ---------------------------------------------

# One Received: header field with its continuation lines.
RECEIVED_FIELD = re.compile(rb"Received:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", re.IGNORECASE)
SMTP_LINE_LIMIT = 998  # Postfix's smtp_line_length_limit


def fold_long_lines(content: bytes, limit: int = SMTP_LINE_LIMIT) -> bytes:
    """``content`` as Postfix's smtp(8) sends it: a line over ``limit`` octets is broken
    after ``limit`` octets by inserting CRLF SPACE, and so on every ``limit - 1`` octets
    (smtp_proto.c, smtp_text_out); a line of exactly ``limit`` octets is left alone."""
    out = []
    for line in content.split(b"\r\n"):
        pieces = [line[:limit]]
        rest = line[limit:]
        while rest:
            pieces.append(b" " + rest[:limit - 1])
            rest = rest[limit - 1:]
        out.append(b"\r\n".join(pieces))
    return b"\r\n".join(out)


def message_difference(sent: bytes, got: bytes) -> str | None:
    """None when ``got`` is ``sent`` but for Received: header fields added on top and
    lines over 998 octets folded as Postfix folds them; else where they differ."""
    candidates = (sent, fold_long_lines(sent))
    tail = got
    while True:
        if tail in candidates:
            return None
        added = RECEIVED_FIELD.match(tail)
        if added is None:
            break
        tail = tail[added.end():]
    # Report against the unfolded form unless the folded one is the closer.
    best = max(candidates, key=lambda c: _common_prefix(c, tail))
    at = _common_prefix(best, tail)
    around = slice(max(0, at - 40), at + 40)
    return (f"after the added Received: fields, {len(tail)} octets where {len(best)} were "
            f"expected; first difference at octet {at}: expected {best[around]!r}, "
            f"got {tail[around]!r}")


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    step = 4096
    while i < n and a[i:i + step] == b[i:i + step]:
        i += step
    i = min(i, n)
    while i > 0 and a[:i] != b[:i]:
        i -= 1
    while i < n and a[i] == b[i]:
        i += 1
    return i


# -- the instances -------------------------------------------------------------------------


@dataclass
class Policy:
    """What the server side refuses (550) and defers (450) at RCPT."""

    refuse: frozenset[str] = frozenset()
    defer: frozenset[str] = frozenset()


class PrivateMTA:
    """One private instance; see the module docstring for its roles."""

    name: ClassVar[str] = "mta"
    # SASL mechanisms it can be told to use as a client (Route.mechanism).
    client_mechanisms: ClassVar[tuple[str, ...]] = ("PLAIN", "LOGIN")
    # Whether its server side offers SMTPUTF8 (RFC 6531).
    smtputf8: ClassVar[bool] = True

    def __init__(self, base: Path, *, local_domains: Iterable[str] = (),
                 routes: Mapping[str, Route] | None = None, tls: TLSFiles | None = None,
                 account: Account = Account("peeruser", "peerpass1"),
                 bind_address: str | None = None, hostname: str | None = None) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)  # the MTAs' unprivileged processes find their files here
        self.hostname = hostname or f"{self.name}.test"
        self.local_domains = tuple(local_domains)
        self.routes = dict(routes or {})
        self.tls = tls or make_tls(base / "tls", self.hostname)
        self.account = account
        self.bind_address = bind_address
        self.ports = {listener: free_port() for listener in self.listeners()}
        self.store = Store(base / "store")
        self.policy = Policy()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @classmethod
    def listeners(cls) -> tuple[str, ...]:
        return LISTENERS

    @classmethod
    def require(cls) -> None:
        """Skip (fail in CI) unless this MTA is installed and can run here."""
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    # lifecycle
    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_listening(self, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        pending = dict(self.ports)
        while pending and time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            for listener, port in list(pending.items()):
                with contextlib.suppress(OSError), \
                        socket.create_connection((self.host, port), timeout=2) as s:
                    s.settimeout(5)
                    if s.recv(100).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        del pending[listener]
            time.sleep(0.05)
        if pending:
            raise TimeoutError(f"{self.name} does not listen on {pending}:\n{self.log()[-3000:]}")

    # configuration changes while running
    def set_recipient_access(self, refuse: Iterable[str] = (), defer: Iterable[str] = ()) -> None:
        """From now on refuse (550) and defer (450) these recipients at RCPT."""
        self.policy = Policy(frozenset(refuse), frozenset(defer))
        self._apply_policy()

    def _apply_policy(self) -> None:
        raise NotImplementedError

    # queue
    def flush(self) -> None:
        """Try deferred mail now."""
        raise NotImplementedError

    def queue_empty(self) -> bool:
        raise NotImplementedError

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not self.queue_empty():
            if time.monotonic() > end:
                raise AssertionError(f"{self.name}'s queue is not empty after {timeout}s:\n"
                                     f"{self.log()[-3000:]}")
            time.sleep(0.1)

    # submission without SMTP
    def sendmail(self, sender: str, recipients: list[str], content: bytes,
                 options: tuple[str, ...] = ("-i",)) -> subprocess.CompletedProcess[bytes]:
        """The MTA's own sendmail(1) with ``options``, content on standard input."""
        raise NotImplementedError

    # what happened
    def log(self) -> str:
        raise NotImplementedError

    def auth_log_pattern(self, mechanism: str) -> str:
        """A regex for the log line of a client that authenticated with ``mechanism``."""
        raise NotImplementedError

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        end = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log(), re.MULTILINE)
            if found:
                return found
            if time.monotonic() > end:
                raise AssertionError(f"/{pattern}/ not in {self.name}'s log:\n"
                                     f"{self.log()[-3000:]}")
            time.sleep(0.1)

    # SMTP, for the test to send with
    def smtp(self, listener: str = "plain", timeout: float = 30.0) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.ports[listener], local_hostname="client.test",
                            timeout=timeout)


def _fill(template: str, **values: object) -> str:
    """``template`` with each ``@name@`` replaced (Exim's own syntax is all braces and $)."""
    def value(match: re.Match[str]) -> str:
        return str(values[match.group(1)])
    return re.sub(r"@([a-z_]+)@", value, template)


def _run(argv: list[str], what: str, timeout: float = 60, **kwargs: object
         ) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False,
                          **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: {' '.join(map(str, argv))} exited {proc.returncode}: "
                           f"{(proc.stdout + proc.stderr).decode(errors='replace').strip()}")
    return proc  # type: ignore[no-any-return]


# -- Postfix -------------------------------------------------------------------------------


class PostfixPeer(PrivateMTA):
    """``postfix -c DIR start``: its own main.cf and master.cf, queue and data directories.

    SASL on the server side is Cyrus with a sasldb of its own (``smtpd.conf`` in
    ``cyrus_sasl_config_path``); on the client side ``smtp_sasl_password_maps`` (texthash)
    with one smtp(8) service per kind of route in master.cf.  Delivery to the store is
    pipe(8) without flags (nothing prepended), one recipient per delivery.
    """

    name = "postfix"

    @classmethod
    def require(cls) -> None:
        if not os.access(POSTFIX, os.X_OK) or shutil.which("postconf") is None:
            missing("postfix is not installed (Debian package postfix)")
        if shutil.which("saslpasswd2") is None:
            missing("saslpasswd2 is not installed (Debian package sasl2-bin)")
        if not list(Path("/usr/lib").glob("*/sasl2/libplain.so*")):
            missing("Cyrus SASL's PLAIN plugin is not installed (libsasl2-modules)")
        if os.geteuid() != 0:
            missing("a private Postfix instance needs root")
        try:
            pwd.getpwnam("postfix")
        except KeyError:
            missing("there is no postfix user")

    def version(self) -> str:
        return "Postfix " + _run(["postconf", "-d", "-h", "mail_version"],
                                 "postconf").stdout.decode().strip()

    def __init__(self, base: Path, **kwargs: object) -> None:
        super().__init__(base, **kwargs)  # type: ignore[arg-type]
        self.config = base / "etc"
        self.queue = base / "spool"
        self.maillog = base / "maillog"
        self.main: dict[str, str] = {}

    def start(self) -> Self:
        self._write_config()
        _run([POSTFIX, "-c", str(self.config), "start"], "postfix start")
        self.started = True
        self.wait_listening()
        return self

    def stop(self) -> None:
        if self.started:
            self.started = False
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run([POSTFIX, "-c", str(self.config), "stop"], "postfix stop")

    def postconf(self, **params: str) -> None:
        """Change main.cf parameters; a running instance reloads."""
        self.main.update(params)
        self._write_main()
        if self.started:
            _run([POSTFIX, "-c", str(self.config), "reload"], "postfix reload")

    def _write_config(self) -> None:
        self.config.mkdir(parents=True, exist_ok=True)
        self.queue.mkdir(exist_ok=True)
        data = self.base / "data"
        data.mkdir(exist_ok=True)
        postfix = pwd.getpwnam("postfix")
        os.chown(data, postfix.pw_uid, postfix.pw_gid)
        daemon_dir, meta_dir, shlib_dir = _run(
            ["postconf", "-d", "-h", "daemon_directory", "meta_directory", "shlib_directory"],
            "postconf").stdout.decode().split()
        # SASL: Cyrus reads <smtpd_sasl_path>.conf from $config_directory/sasl (Debian's
        # Postfix looks there, whatever cyrus_sasl_config_path says); smtpd runs as the
        # postfix user, so the sasldb is its.
        sasl = self.config / "sasl"
        sasl.mkdir(exist_ok=True)
        sasldb = sasl / "sasldb2"
        realm = self.hostname
        _run(["saslpasswd2", "-f", str(sasldb), "-c", "-p", "-u", realm, self.account.user],
             "saslpasswd2", input=self.account.password.encode())
        os.chown(sasldb, postfix.pw_uid, postfix.pw_gid)
        for service, mechanisms in (("smtpd", "PLAIN LOGIN"), ("smtpd-login", "LOGIN")):
            (sasl / f"{service}.conf").write_text(
                f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                f"sasldb_path: {sasldb}\nmech_list: {mechanisms}\n")
        passwords = "".join(dict.fromkeys(
            f"[{r.host}]:{r.port} {r.account.user}:{r.account.password}\n"
            for r in self.routes.values() if r.account is not None))
        (self.config / "sasl_passwd").write_text(passwords)
        os.chmod(self.config / "sasl_passwd", 0o600)
        transport = "".join(f"{domain} store:\n" for domain in self.local_domains)
        transport += "".join(f"{domain} smtp-{r.key}:[{r.host}]:{r.port}\n"
                             for domain, r in self.routes.items())
        (self.config / "transport").write_text(transport)
        self._write_access()
        base = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(data),
            "daemon_directory": daemon_dir,
            "meta_directory": meta_dir,
            "shlib_directory": shlib_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": " ".join(self.local_domains),
            "relay_recipient_maps": "",
            "transport_maps": f"texthash:{self.config}/transport",
            "store_destination_recipient_limit": "1",
            "smtpd_recipient_restrictions": (
                f"check_recipient_access texthash:{self.config}/recipient_access, "
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"),
            "local_header_rewrite_clients": "",
            "append_dot_mydomain": "no",
            "smtp_dns_support_level": "disabled",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.base),
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtputf8_enable": "yes",
            "smtpd_tls_cert_file": str(self.tls.cert),
            "smtpd_tls_key_file": str(self.tls.key),
            "smtpd_tls_security_level": "none",
            "smtpd_tls_auth_only": "yes",
            "smtpd_sasl_auth_enable": "no",
            "smtpd_sasl_type": "cyrus",
            "cyrus_sasl_config_path": str(sasl),
            "smtpd_sasl_path": "smtpd",
            "smtpd_sasl_local_domain": realm,
            "smtp_tls_security_level": "none",
            "smtp_sasl_password_maps": f"texthash:{self.config}/sasl_passwd",
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
            "queue_run_delay": "2s",
            # No tarpit: tests refuse recipients on purpose, and smtpd would sleep a
            # second per error after the tenth (smtpd_error_sleep_time).
            "smtpd_error_sleep_time": "0",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "multi_instance_enable": "no",
        }
        if self.bind_address:
            base["smtp_bind_address"] = self.bind_address
        self.main = {**base, **self.main}
        self._write_main()
        ports = self.ports
        server_tls = "-o smtpd_tls_security_level=may"
        auth = (f"{server_tls} -o smtpd_sasl_auth_enable=yes "
                "-o smtpd_client_restrictions=permit_sasl_authenticated,reject")
        clients = {
            "plain": "-o smtp_tls_security_level=none",
            "tls": "-o smtp_tls_security_level=encrypt",
            "auth-plain": ("-o smtp_tls_security_level=encrypt -o smtp_sasl_auth_enable=yes "
                           "-o smtp_sasl_mechanism_filter=plain"),
            "auth-login": ("-o smtp_tls_security_level=encrypt -o smtp_sasl_auth_enable=yes "
                           "-o smtp_sasl_mechanism_filter=login"),
        }
        store_user = "nobody"
        master = f"""\
127.0.0.1:{ports['plain']} inet n - n - - smtpd
127.0.0.1:{ports['tls']} inet n - n - - smtpd {server_tls}
127.0.0.1:{ports['auth']} inet n - n - - smtpd {auth}
127.0.0.1:{ports['login']} inet n - n - - smtpd {auth} -o smtpd_sasl_path=smtpd-login
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
store     unix  -       n       n       -       -       pipe flags=X user={store_user}
  argv=/bin/sh {self.store.script} ${{recipient}}
""" + "".join(f"smtp-{key} unix - - n - - smtp {options}\n" for key, options in clients.items())
        (self.config / "master.cf").write_text(master)

    def _write_main(self) -> None:
        (self.config / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main.items()))

    def _write_access(self) -> None:
        lines = [f"{r} 550 5.1.1 <{r}>: Recipient address rejected: refused by test\n"
                 for r in sorted(self.policy.refuse)]
        lines += [f"{r} 450 4.2.0 <{r}>: Recipient address rejected: deferred by test\n"
                  for r in sorted(self.policy.defer)]
        (self.config / "recipient_access").write_text("".join(lines))

    def _apply_policy(self) -> None:
        self._write_access()
        if self.started:
            # texthash is read when a process starts: reload, and let an smtpd process
            # that still serves a client's cached connection (an SMTP client keeps one
            # idle for a couple of seconds) finish it with the old table.
            _run([POSTFIX, "-c", str(self.config), "reload"], "postfix reload")
            time.sleep(POSTFIX_POLICY_SETTLE)

    def flush(self) -> None:
        _run(["postqueue", "-c", str(self.config), "-f"], "postqueue -f")

    def queue_empty(self) -> bool:
        return not any(files for q in ("incoming", "active", "deferred", "maildrop", "hold")
                       for _, _, files in os.walk(self.queue / q))

    def sendmail(self, sender: str, recipients: list[str], content: bytes,
                 options: tuple[str, ...] = ("-i",)) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["/usr/sbin/sendmail", "-C", str(self.config), *options,
                               "-f", sender, "--", *recipients], input=content,
                              capture_output=True, timeout=60, check=False)

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def auth_log_pattern(self, mechanism: str) -> str:
        return rf"client=\S+, sasl_method={mechanism}, sasl_username={self.account.user}@"


# -- Exim ----------------------------------------------------------------------------------

EXIM_CONFIG = """\
exim_path = @exim@
primary_hostname = @hostname@
qualify_domain = @hostname@
spool_directory = @base@/spool
log_file_path = @base@/log/%slog
pid_file_path = @base@/exim.pid
exim_user = Debian-exim
exim_group = Debian-exim
never_users = root
keep_environment =
daemon_smtp_ports = @port_list@
local_interfaces = <; 127.0.0.1
host_lookup =
rfc1413_hosts =
log_selector = +smtp_connection +received_recipients +tls_cipher +smtp_protocol_error \\
  +smtp_syntax_error +incoming_port +outgoing_port +deliver_time +return_path_on_delivery \\
  -queue_run
domainlist local_domains = @local_domains@
hostlist relay_from_hosts = 127.0.0.0/8
acl_smtp_mail = acl_mail
acl_smtp_rcpt = acl_rcpt
tls_certificate = @cert@
tls_privatekey = @key@
tls_advertise_hosts = ${if inlist{$received_port}{@tls_ports@}{*}{}}
auth_advertise_hosts = ${if and{{def:tls_in_cipher}{inlist{$received_port}{@auth_ports@}}}{*}{}}
dsn_advertise_hosts = *
smtputf8_advertise_hosts = *
message_size_limit = 50M
queue_only = false
queue_run_max = 5
remote_max_parallel = 5
smtp_accept_max = 100
smtp_accept_queue_per_connection = 0
ignore_bounce_errors_after = 1h
timeout_frozen_after = 1h
delay_warning =

begin acl

acl_mail:
  deny    condition = ${if inlist{$received_port}{@auth_ports@}}
          !authenticated = *
          message = 530 5.7.0 Authentication required
  accept

acl_rcpt:
  deny    recipients = lsearch;@base@/refuse
          message = 550 5.1.1 <$local_part@$domain>: Recipient address rejected: refused by test
  defer   recipients = lsearch;@base@/defer
          message = 450 4.2.0 <$local_part@$domain>: Recipient address rejected: deferred by test
  accept  domains = +local_domains
  accept  hosts = +relay_from_hosts
  accept  authenticated = *
  deny    message = 554 5.7.1 <$local_part@$domain>: Relay access denied

begin routers

@routers@
store:
  driver = accept
  domains = +local_domains
  transport = store

begin transports

store:
  driver = pipe
  command = /bin/sh @store_script@
  user = Debian-exim
  message_prefix =
  message_suffix =
  return_path_add = false
  envelope_to_add = false
  delivery_date_add = false
  temp_errors = *

@transports@
begin retry

*  *  F,1h,2s

begin authenticators

plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if and{{eq{$auth2}{@user@}}{eq{$auth3}{@password@}}}}
  server_set_id = $auth2
  server_advertise_condition = ${if eq{$received_port}{@plain_port@}}
  client_send = ^@client_user@^@client_password@
  client_condition = ${if match{$transport_name}{^route_auth_plain}}

login:
  driver = plaintext
  public_name = LOGIN
  server_prompts = <| Username: | Password:
  server_condition = ${if and{{eq{$auth1}{@user@}}{eq{$auth2}{@password@}}}}
  server_set_id = $auth1
  client_send = <| | @client_user@ | @client_password@
  client_condition = ${if match{$transport_name}{^route_auth_login}}
"""


class EximPeer(PrivateMTA):
    """``exim4 -C FILE -bdf -q2s``: Exim 4 in the foreground with a configuration of its own.

    Server-side AUTH is two ``plaintext`` authenticators checking one account; a routed
    domain has a ``manualroute`` router and an ``smtp`` transport of its own.  The store is
    a ``pipe`` transport with no prefix, suffix or added header.
    """

    name = "exim"

    @classmethod
    def require(cls) -> None:
        if not os.access(EXIM, os.X_OK):
            missing(f"exim4 is not unpacked at {EXIM} (run scripts/install-peers as root)")
        if os.geteuid() != 0:
            missing("a private Exim instance needs root")
        try:
            pwd.getpwnam("Debian-exim")
        except KeyError:
            missing("there is no Debian-exim user (run scripts/install-peers as root)")

    def version(self) -> str:
        out = _run([str(EXIM), "-bV", "-C", "/dev/null"], "exim -bV").stdout.decode()
        return " ".join(out.split()[:3]).replace("version ", "")

    def __init__(self, base: Path, **kwargs: object) -> None:
        super().__init__(base, **kwargs)  # type: ignore[arg-type]
        self.config = base / "exim.conf"

    def _config_text(self) -> str:
        routers = []
        transports = []
        for n, (domain, route) in enumerate(sorted(self.routes.items())):
            name = f"route_{route.key.replace('-', '_')}_{n}"
            routers.append(f"{name}:\n  driver = manualroute\n  domains = {domain}\n"
                           f"  route_list = * {route.host}\n  self = send\n"
                           f"  transport = {name}\n")
            options = [f"port = {route.port}", "allow_localhost",
                       "hosts_try_chunking =", "tls_verify_certificates ="]
            if route.starttls:
                options.append("hosts_require_tls = *")
            else:
                options.append("hosts_avoid_tls = *")
            if route.account is not None:
                options += ["hosts_require_tls = *", "hosts_require_auth = *"]
            if self.bind_address:
                options.append(f"interface = {self.bind_address}")
            transports.append(f"{name}:\n  driver = smtp\n"
                              + "".join(f"  {o}\n" for o in dict.fromkeys(options)))
        accounts = [r.account for r in self.routes.values() if r.account is not None]
        client = accounts[0] if accounts else Account("nobody", "nothing")
        ports = self.ports
        return _fill(EXIM_CONFIG,
            exim=EXIM, hostname=self.hostname, base=self.base,
            port_list=" : ".join(str(p) for p in ports.values()),
            local_domains=" : ".join(self.local_domains) or "!*",
            cert=self.tls.cert, key=self.tls.key,
            tls_ports=":".join(str(ports[n]) for n in ("tls", "auth", "login")),
            auth_ports=":".join(str(ports[n]) for n in ("auth", "login")),
            plain_port=ports["auth"],
            store_script=self.store.script,
            routers="\n".join(routers), transports="\n".join(transports),
            user=self.account.user, password=self.account.password,
            client_user=client.user, client_password=client.password)

    def start(self) -> Self:
        exim = pwd.getpwnam("Debian-exim")
        # Exim reads the key when a session starts TLS, as its own user: with -C FILE it
        # gives up root ("exim user lost privilege for using -C option").
        os.chown(self.tls.key, exim.pw_uid, exim.pw_gid)
        for sub in ("spool", "log"):
            (self.base / sub).mkdir(exist_ok=True)
            os.chown(self.base / sub, exim.pw_uid, exim.pw_gid)
        self._write_access()
        self.config.write_text(self._config_text())
        _run([str(EXIM), "-C", str(self.config), "-bV"], "exim -bV", env={})
        with open(self.base / "stderr", "wb") as stderr:
            self.proc = subprocess.Popen(
                [str(EXIM), "-C", str(self.config), "-bdf", "-q2s"], env={},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        self.started = True
        self.wait_listening()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.started = False

    def _write_access(self) -> None:
        for name, addresses in (("refuse", self.policy.refuse), ("defer", self.policy.defer)):
            (self.base / name).write_text("".join(f"{a}\n" for a in sorted(addresses)))

    def _apply_policy(self) -> None:
        self._write_access()  # lsearch reads the file at each lookup

    def exim(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(EXIM), "-C", str(self.config), *args], input=input,
                              capture_output=True, timeout=60, check=False, env={})

    def flush(self) -> None:
        self.exim("-qff")

    def queue_empty(self) -> bool:
        out = self.exim("-bpc").stdout.strip()
        return out == b"0"

    def sendmail(self, sender: str, recipients: list[str], content: bytes,
                 options: tuple[str, ...] = ("-i",)) -> subprocess.CompletedProcess[bytes]:
        return self.exim(*options, "-f", sender, "--", *recipients, input=content)

    def log(self) -> str:
        texts = []
        for name in ("mainlog", "rejectlog", "paniclog"):
            with contextlib.suppress(FileNotFoundError):
                texts.append((self.base / "log" / name).read_text(errors="replace"))
        with contextlib.suppress(FileNotFoundError):
            texts.append((self.base / "stderr").read_text(errors="replace"))
        # Every process with -C FILE says so; nothing to learn from it.
        return "".join(line for text in texts for line in text.splitlines(keepends=True)
                       if "lost privilege for using -C option" not in line)

    def auth_log_pattern(self, mechanism: str) -> str:
        return rf"<= .* A={mechanism.lower()}:{self.account.user} "


# -- OpenSMTPD -----------------------------------------------------------------------------

OPENSMTPD_NAMESPACE = """\
set -e
mount --bind "$1/var-spool" /var/spool
mount --bind "$1/run" /run
mount --bind "$2" /usr/libexec
mount --bind "$1/var-lib" /var/lib
exec "$3" -d -f "$1/smtpd.conf"
"""


class OpenSMTPDPeer(PrivateMTA):
    """``smtpd -d -f FILE`` in a mount namespace of its own (see the module docstring).

    Only the ``plain`` listener: OpenSMTPD 6.8's server-side STARTTLS fails with OpenSSL 3
    on this system ("SSL routines::EVP lib" with an RSA key, the same with ECDSA), and its
    AUTH needs TLS.  Its client side (STARTTLS, AUTH) works.  RCPT refusals and deferrals
    are builtin filters with a ``reject`` decision; mda delivery prepends Return-Path: and
    Delivered-To:, which `Store` takes off again.
    """

    name = "opensmtpd"
    client_mechanisms = ("PLAIN",)  # it picks PLAIN itself when offered
    smtputf8 = False  # 6.8 does not offer SMTPUTF8

    @classmethod
    def listeners(cls) -> tuple[str, ...]:
        return ("plain",)

    @classmethod
    def require(cls) -> None:
        if not os.access(OPENSMTPD, os.X_OK):
            missing(f"OpenSMTPD is not unpacked at {OPENSMTPD} "
                    "(run scripts/install-peers as root)")
        if os.geteuid() != 0:
            missing("a private OpenSMTPD instance needs root (a mount namespace)")
        for user in ("opensmtpd", "opensmtpq"):
            try:
                pwd.getpwnam(user)
            except KeyError:
                missing(f"there is no {user} user (run scripts/install-peers as root)")
        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            missing("unshare/nsenter (util-linux) are not installed")
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                               capture_output=True, check=False, timeout=30)
        if probe.returncode != 0:
            missing("cannot make a mount namespace here: "
                    + probe.stderr.decode(errors="replace").strip())

    def version(self) -> str:
        text = (PEERS_DIR / "opensmtpd" / "packages").read_text()
        return "OpenSMTPD " + text.split()[1].split("-")[0]

    def __init__(self, base: Path, **kwargs: object) -> None:
        super().__init__(base, **kwargs)  # type: ignore[arg-type]
        self.store.delivery_headers = (b"return-path", b"delivered-to")
        self.config = base / "smtpd.conf"
        self.errors = base / "smtpd.log"

    def _config_text(self) -> str:
        base = self.base
        lines = [
            f'pki {self.hostname} cert "{self.tls.cert}"',
            f'pki {self.hostname} key "{self.tls.key}"',
            f"table refuse file:{base}/refuse",
            f"table defer file:{base}/defer",
            f"table vusers file:{base}/vusers",
            f"table secrets file:{base}/secrets",
            ('filter "refuse" phase rcpt-to match rcpt-to <refuse> reject '
             '"550 5.1.1 Recipient address rejected: refused by test"'),
            ('filter "defer" phase rcpt-to match rcpt-to <defer> reject '
             '"450 4.2.0 Recipient address rejected: deferred by test"'),
            'filter "access" chain { "refuse", "defer" }',
            (f"listen on 127.0.0.1 port {self.ports['plain']} hostname {self.hostname} "
             'filter "access"'),
            "queue ttl 1h",
            # Connections on one route (our routes all go to 127.0.0.1) are otherwise
            # seconds apart.
            "mta limit conn-delay-route 0 conn-delay-relay 0 reconn-delay-route 0",
            "bounce warn-interval 1h",
            f'action "store" mda "/bin/sh {self.store.script} %{{rcpt}}" virtual <vusers>',
        ]
        secrets = []
        for n, (domain, route) in enumerate(sorted(self.routes.items())):
            action = f"route{n}"
            if route.account is not None:
                secrets.append(f"r{n} {route.account.user}:{route.account.password}")
                url = f"smtp+tls://r{n}@{route.host}:{route.port}"
                extra = " auth <secrets> tls no-verify"
            elif route.starttls:
                url, extra = f"smtp+tls://{route.host}:{route.port}", " tls no-verify"
            else:
                url, extra = f"smtp+notls://{route.host}:{route.port}", ""
            if self.bind_address:
                extra += f" src {self.bind_address}"
            lines.append(f'action "{action}" relay host {url}{extra} helo {self.hostname}')
            lines.append(f'match from any for domain "{domain}" action "{action}"')
        for domain in self.local_domains:
            lines.append(f'match from any for domain "{domain}" action "store"')
        (base / "secrets").write_text("".join(f"{s}\n" for s in secrets))
        os.chmod(base / "secrets", 0o640)
        return "\n".join(lines) + "\n"

    def start(self) -> Self:
        base = self.base
        for sub in ("var-spool", "run", "var-lib/opensmtpd/empty"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.tls.key, 0o600)  # smtpd refuses a key others may read
        (base / "vusers").write_text("@ nobody\n")
        self._write_access()
        self.config.write_text(self._config_text())
        with open(self.errors, "wb") as stderr:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                 OPENSMTPD_NAMESPACE, "opensmtpd", str(base),
                 str(PEERS_DIR / "opensmtpd/usr/libexec"), str(OPENSMTPD)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        self.started = True
        self.wait_listening()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.started = False

    def smtpctl(self, *args: str, input: bytes | None = None,
                program: str = "smtpctl") -> subprocess.CompletedProcess[bytes]:
        """smtpctl (or sendmail) inside the instance's namespace, where its socket is."""
        assert self.proc is not None
        return subprocess.run(
            ["nsenter", "--target", str(self.proc.pid), "--mount", "--",
             str(PEERS_DIR / "opensmtpd/usr/sbin" / program), *args],
            input=input, capture_output=True, timeout=60, check=False)

    def _write_access(self) -> None:
        for name, addresses in (("refuse", self.policy.refuse), ("defer", self.policy.defer)):
            # An empty file table is an error for OpenSMTPD: keep one unused entry.
            entries = sorted(addresses) or ["nobody.ever@invalid"]
            (self.base / name).write_text("".join(f"{a}\n" for a in entries))

    def _apply_policy(self) -> None:
        self._write_access()
        if self.started:
            for table in ("refuse", "defer"):
                out = self.smtpctl("update", "table", table)
                if out.returncode != 0:
                    raise RuntimeError(f"smtpctl update table {table}: {out.stderr!r}")

    def flush(self) -> None:
        self.smtpctl("schedule", "all")

    def queue_empty(self) -> bool:
        out = self.smtpctl("show", "queue")
        return out.returncode == 0 and not out.stdout.strip()

    def sendmail(self, sender: str, recipients: list[str], content: bytes,
                 options: tuple[str, ...] = ("-i",)) -> subprocess.CompletedProcess[bytes]:
        return self.smtpctl(*options, "-f", sender, "--", *recipients, input=content,
                            program="sendmail")

    def log(self) -> str:
        try:
            return self.errors.read_text(errors="replace")
        except FileNotFoundError:
            return ""


PEERS: dict[str, type[PrivateMTA]] = {
    cls.name: cls for cls in (PostfixPeer, EximPeer, OpenSMTPDPeer)
}


def instance_root(prefix: str = "relay-peers-") -> Path:
    """A new directory for instances, which the MTAs' unprivileged users can traverse
    (pytest's own temporary directories are private to their owner)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    return root
