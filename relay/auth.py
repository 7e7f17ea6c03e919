"""SMTP AUTH credentials: the scrypt password file, and slowing down password guessers.

It owns the format of ``smtpd_sasl_password_file`` (one user a line, never a plain
password)::

    # comments and blank lines are ignored
    alice:scrypt$16384$8$1$<salt, base64>$<hash, base64>

reading it (again whenever it changes on disk, so ``relay passwd`` needs no reload),
checking a password against it, changing one entry of it atomically (``relay passwd``),
and the per-client count of failed logins with the delay after each one.  The hash is
RFC 7914 scrypt, memory-hard, with a random 16-byte salt per entry; comparison takes the
same time for a good and a bad password, and an unknown user costs the same scrypt as a
known one, so timing tells a guesser nothing.

It never talks SMTP (the listener does) and never logs a password.  A crash while the
file is being changed leaves either the old file or the new one, never a mix: the new
text is written to a temporary file in the same directory, fsync'ed, and renamed over the
old one, under an exclusive lock on ``FILE.lock`` so two ``relay passwd`` runs cannot lose
each other's change.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass

from relay.anvil import Anvil, Event

log = logging.getLogger("relay.smtpd")

SCHEME = "scrypt"
SCRYPT_N = 2**14  # 16 MiB with r = 8: the RFC 7914 interactive-login setting
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# What a password file may ask of the verifier: anything beyond this is a damaged file
# or an attempt to make every login cost gigabytes.
MAX_N = 2**20
MAX_R = 32
MAX_P = 16

_USER = re.compile(r"[^\x00-\x20\x7f:]{1,255}")


class PasswordFileError(Exception):
    """The password file cannot be read or written; the message names the file."""


def valid_username(user: str) -> bool:
    """A user name fits on a password-file line: no ':', no white space, no controls."""
    return _USER.fullmatch(user) is not None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str | bytes, *, salt: bytes | None = None, n: int = SCRYPT_N,
                  r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$N$r$p$salt$hash`` for ``password`` (str is UTF-8 encoded)."""
    secret = password.encode("utf-8") if isinstance(password, str) else password
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = _scrypt(secret, salt, n, r, p, HASH_BYTES)
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL needs 128*r*(N + p + 2) bytes; allow twice that.
    maxmem = 256 * r * (n + p + 2) + 2**20
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


@dataclass(frozen=True, slots=True)
class ScryptHash:
    """A parsed ``scrypt$N$r$p$salt$hash`` value."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, encoded: str) -> ScryptHash:
        """ValueError for anything but a well-formed value within the limits above."""
        parts = encoded.split("$")
        if len(parts) != 6 or parts[0] != SCHEME:
            raise ValueError("not a scrypt$N$r$p$salt$hash value")
        try:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt = base64.b64decode(parts[4], validate=True)
            digest = base64.b64decode(parts[5], validate=True)
        except (ValueError, binascii.Error):
            raise ValueError("bad number or base64 in scrypt value") from None
        if n < 2 or n > MAX_N or n & (n - 1) or not 1 <= r <= MAX_R or not 1 <= p <= MAX_P:
            raise ValueError("scrypt parameters out of range")
        if not salt or not 16 <= len(digest) <= 64:
            raise ValueError("bad salt or hash length")
        return cls(n, r, p, salt, digest)

    def matches(self, password: bytes) -> bool:
        return hmac.compare_digest(
            _scrypt(password, self.salt, self.n, self.r, self.p, len(self.digest)), self.digest)


# Spent on a login for an unknown user so that it takes as long as one for a known user.
_DUMMY = ScryptHash(SCRYPT_N, SCRYPT_R, SCRYPT_P, b"\x00" * SALT_BYTES, b"\x00" * HASH_BYTES)


def parse_password_file(text: str, path: str = "password file") -> dict[str, ScryptHash]:
    """The entries of a password file; a bad line is logged and skipped, never fatal."""
    entries: dict[str, ScryptHash] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        try:
            if not sep or not valid_username(user):
                raise ValueError("expected user:scrypt$N$r$p$salt$hash")
            entries[user] = ScryptHash.parse(encoded)
        except ValueError as exc:
            log.warning("%s, line %d: %s; entry ignored", path, number, exc)
    return entries


class PasswordFile:
    """``smtpd_sasl_password_file``, read again whenever it changes.  Thread-safe: the
    listener checks passwords in worker threads because scrypt is slow on purpose."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._entries: dict[str, ScryptHash] = {}

    def load(self) -> dict[str, ScryptHash]:
        """The current entries (PasswordFileError if the file cannot be read)."""
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    with open(self.path, encoding="utf-8", errors="replace") as f:
                        self._entries = parse_password_file(f.read(), self.path)
                    self._stamp = stamp
            except OSError as exc:
                raise PasswordFileError(f"open {self.path}: {exc.strerror}") from None
            return self._entries

    def verify(self, user: str, password: bytes) -> bool:
        """True if ``user`` exists and ``password`` is theirs.  Blocking (scrypt)."""
        entry = self.load().get(user)
        if entry is None:
            _DUMMY.matches(password)
            return False
        return entry.matches(password)


def update_password_file(path: str, user: str, encoded: str | None) -> bool:
    """Set ``user``'s hash to ``encoded`` (None: remove the user), atomically.

    Returns True if the file changed (for a removal: if the user was there).  Other
    lines, comments included, are kept as they are.  The file is created mode 0600.
    """
    if not valid_username(user):
        raise ValueError(f"bad user name: {user!r}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise PasswordFileError(f"open {path}.lock: {exc.strerror}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        except OSError as exc:
            raise PasswordFileError(f"open {path}: {exc.strerror}") from None
        kept = [ln for ln in lines if ln.strip().partition(":")[0] != user]
        changed = len(kept) != len(lines)
        if encoded is not None:
            ScryptHash.parse(encoded)  # never write a value the verifier would refuse
            kept.append(f"{user}:{encoded}")
            changed = True
        if changed:
            _write_atomically(path, directory, "".join(ln + "\n" for ln in kept))
        return changed
    finally:
        os.close(lock_fd)


def _write_atomically(path: str, directory: str, text: str) -> None:
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a leftover file
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PasswordFileError(f"write {path}: {exc.strerror}") from None


class LoginThrottle:
    """Failed logins per client address: each costs ``delay`` seconds, and a client with
    ``limit`` failures in its anvil time unit may not try again until the unit ends."""

    def __init__(self, anvil: Anvil, limit: int = 10, delay: float = 1.0) -> None:
        self.anvil = anvil
        self.limit = limit
        self.delay = delay

    def blocked(self, client: str) -> bool:
        return self.limit > 0 and self.anvil.rate(Event.AUTH_FAILURE, client) >= self.limit

    async def failed(self, client: str) -> int:
        """Count a failure and wait out the delay; the failures in this time unit."""
        count = self.anvil.record(Event.AUTH_FAILURE, client)
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        return count


def password_file_path(value: str, main_cf: str | None) -> str:
    """``smtpd_sasl_password_file`` as a path: a relative name is taken relative to the
    configuration directory, so the daemon and ``relay passwd`` agree whatever their cwd."""
    if not value or os.path.isabs(value) or not main_cf:
        return value
    return os.path.join(os.path.dirname(os.path.abspath(main_cf)), value)
