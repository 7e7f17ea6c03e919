"""MTA-STS (RFC 8461): discovering, fetching, caching and reading a domain's policy.

Owns the ``_mta-sts.DOMAIN`` TXT record's syntax (3.1), the policy file's syntax (3.2), the
MX host patterns (4.1), the HTTPS fetch of ``https://mta-sts.DOMAIN/.well-known/
mta-sts.txt`` (3.3: a verified certificate for that name, the same trust anchors as the
SMTP client's, no redirects, ``text/plain``, at most 64 KiB within a time limit; the name
is resolved with relay's own DNS settings) and the cache (5.1): a policy is kept in the
spool (``state/mta-sts/DOMAIN``) until its ``max_age`` ends, refreshed when the TXT
record's ``id`` changes, and still applied when the TXT record or a refetch fails.  A
domain's TXT answer is remembered in memory for a few minutes, so mail to a domain
without MTA-STS costs one TXT query now and then, nothing more.

It never decides what happens to mail: ``StsResolver.policy()`` says which policy is in
force (or why none could be had: the RFC 8460 failure type), relay.tls.destination
applies it.  A crash loses at most the cache write in progress; the next delivery
fetches again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import aiohttp.abc

log = logging.getLogger("relay.smtp")

__all__ = [
    "Fetched",
    "Policy",
    "StsError",
    "StsResolver",
    "mx_matches",
    "parse_policy",
    "parse_txt",
]

MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 3.3: "a policy ... MUST NOT exceed 64 KB"
MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2: at most one year
FETCH_TIMEOUT = 60.0  # RFC 8461 3.3: senders may give up after a minute
TXT_MEMORY = 300.0  # how long a TXT answer (or its absence) is believed without asking
KIND = "mta-sts"  # the spool's state record kind


class StsError(ValueError):
    """A TXT record or policy that does not parse; the message says what is wrong."""


# --- the TXT record (RFC 8461 3.1) --------------------------------------------------------

_TXT_FIELD = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31})=([\x21-\x3a\x3c\x3e-\x7e]+)")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")


def parse_txt(records: Sequence[str]) -> str:
    """The policy ``id`` of a domain's ``_mta-sts`` TXT records.

    Records that do not begin with ``v=STSv1;`` are not ours; exactly one must remain
    and parse, else the domain has no MTA-STS policy (StsError says why).
    """
    ours = [r for r in records if r.startswith("v=STSv1;")]
    if len(ours) != 1:
        raise StsError(f"{len(ours)} TXT records begin with v=STSv1; (need exactly one)")
    found_id = None
    for part in ours[0].split(";")[1:]:
        part = part.strip(" \t")
        if not part:
            continue
        field = _TXT_FIELD.fullmatch(part)
        if field is None:
            raise StsError(f"malformed field {part!r} in TXT record")
        if field.group(1) == "id":
            if not _ID.fullmatch(field.group(2)):
                raise StsError(f"malformed id {field.group(2)!r} in TXT record")
            found_id = field.group(2)
    if found_id is None:
        raise StsError("TXT record has no id")
    return found_id


# --- the policy (RFC 8461 3.2, 4.1) -------------------------------------------------------

_POLICY_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31}):[ \t]*([\x21-\x7e]*(?:[ \t]+[\x21-\x7e]+)*)[ \t]*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})+\.?")
MODES = ("enforce", "testing", "none")


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy: ``mode``, the ``mx`` patterns, ``max_age`` in seconds, and the
    policy's lines as they were (RFC 8460's "policy-string")."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    lines: tuple[str, ...] = ()

    def allows(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)


def parse_policy(text: str) -> Policy:
    """A policy file's ``key: value`` lines (LF or CRLF); StsError if it is not one.

    ``version: STSv1``, ``mode`` and ``max_age`` are required, once each; ``mx`` at least
    once unless the mode is none; unknown keys are extensions and ignored.
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the terminator of the last line
    for line in lines:
        match = _POLICY_LINE.fullmatch(line)
        if match is None:
            raise StsError(f"malformed policy line {line!r}")
        key, value = match.group(1), match.group(2)
        if key == "mx":
            if not _MX_PATTERN.fullmatch(value):
                raise StsError(f"malformed mx pattern {value!r}")
            mx.append(value.lower().rstrip("."))
        elif key in ("version", "mode", "max_age"):
            if key in fields:
                raise StsError(f"{key} given more than once")
            fields[key] = value
    if fields.get("version") != "STSv1":
        raise StsError("version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise StsError(f"mode {mode!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not (age.isdigit() and len(age) <= 10):
        raise StsError(f"max_age {age!r} is not a number of seconds")
    if not mx and mode != "none":
        raise StsError("no mx pattern")
    return Policy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT),
                  tuple(line for line in lines if line))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: the name itself, or ``*.`` for exactly one leftmost label."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


# --- the fetch (RFC 8461 3.3) -------------------------------------------------------------


class AddressLookup(Protocol):
    async def addresses(self, host: str) -> tuple[tuple[str, ...], Any]: ...

    async def txt(self, name: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class Fetched:
    """What a fetch got: the policy text, or the RFC 8460 failure type and the reason."""

    text: str = ""
    failure: str = ""  # "sts-policy-fetch-error", "sts-webpki-invalid"
    reason: str = ""
    url: str = ""


class Fetcher:
    """HTTPS GETs of policies with aiohttp; ``port`` is 443 but for tests."""

    def __init__(self, dns: AddressLookup, context: ssl.SSLContext, *, port: int = 443,
                 timeout: float = FETCH_TIMEOUT) -> None:
        self.dns = dns
        self.context = context
        self.port = port
        self.timeout = timeout

    async def fetch(self, domain: str) -> Fetched:
        host = f"mta-sts.{domain}"
        url = f"https://{host}:{self.port}/.well-known/mta-sts.txt"
        resolver = _Resolver(self.dns)
        connector = aiohttp.TCPConnector(resolver=resolver, ssl=self.context,
                                         use_dns_cache=False, force_close=True)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout,
                                      trust_env=False) as session,
                session.get(url, allow_redirects=False) as response,
            ):
                if response.status != 200:
                    return Fetched(failure="sts-policy-fetch-error",
                                   reason=f"{url}: HTTP status {response.status}")
                if response.content_type != "text/plain":
                    return Fetched(failure="sts-policy-fetch-error",
                                   reason=f"{url}: content type {response.content_type}"
                                          " is not text/plain")
                body = await response.content.read(MAX_POLICY_SIZE + 1)
        except aiohttp.ClientConnectorCertificateError as exc:
            return Fetched(failure="sts-webpki-invalid",
                           reason=f"{url}: certificate verification failed: "
                                  f"{exc.certificate_error.verify_message}"
                           if isinstance(exc.certificate_error, ssl.SSLCertVerificationError)
                           else f"{url}: certificate verification failed")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            why = resolver.failure or str(exc) or type(exc).__name__
            return Fetched(failure="sts-policy-fetch-error", reason=f"{url}: {why}")
        if len(body) > MAX_POLICY_SIZE:
            return Fetched(failure="sts-policy-fetch-error",
                           reason=f"{url}: policy larger than {MAX_POLICY_SIZE} bytes")
        try:
            return Fetched(text=body.decode("utf-8"), url=url)
        except UnicodeDecodeError:
            return Fetched(failure="sts-policy-invalid", reason=f"{url}: not UTF-8")


class _Resolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver interface over relay's DNS (dns_nameservers), never the system's
    getaddrinfo(), so a policy host is found where every other name is."""

    def __init__(self, dns: AddressLookup) -> None:
        self.dns = dns
        self.failure = ""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[aiohttp.abc.ResolveResult]:
        addresses, failure = await self.dns.addresses(host)
        if not addresses:
            self.failure = getattr(failure, "reason", "") or f"cannot resolve {host}"
            raise OSError(self.failure)
        return [aiohttp.abc.ResolveResult(
            hostname=host, host=address, port=port,
            family=socket.AF_INET6 if ":" in address else socket.AF_INET,
            proto=0, flags=socket.AI_NUMERICHOST) for address in addresses]

    async def close(self) -> None:
        return None


# --- what is in force for a domain (RFC 8461 5.1) -----------------------------------------


@dataclass(frozen=True, slots=True)
class Lookup:
    """The policy in force for a domain (None: no MTA-STS), where it came from, and a
    problem met on the way (RFC 8460 failure type and reason) worth a log line or a
    report even when a cached policy still applies."""

    policy: Policy | None
    policy_id: str = ""
    source: str = ""  # "fetched", "cache", "" (none)
    failure: str = ""
    reason: str = ""


class Cache(Protocol):
    def read_record(self, kind: str, name: str) -> bytes | None: ...

    def write_record(self, kind: str, name: str, data: bytes) -> None: ...


class StsResolver:
    """The MTA-STS policy in force for a domain, following RFC 8461 section 5.1."""

    def __init__(self, dns: AddressLookup, fetcher: Fetcher, cache: Cache | None,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.dns = dns
        self.fetcher = fetcher
        self.cache = cache
        self.clock = clock
        self._txt: dict[str, tuple[float, str | None, str]] = {}  # domain -> (until, id, err)
        self._memory: dict[str, tuple[float, str, Policy]] = {}  # domain -> cached policy
        self._inflight: dict[str, asyncio.Future[Lookup]] = {}

    async def policy(self, domain: str) -> Lookup:
        domain = domain.lower().rstrip(".")
        running = self._inflight.get(domain)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Lookup] = asyncio.get_running_loop().create_future()
        self._inflight[domain] = future
        try:
            result = await self._policy(domain)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters, if any, re-raise it
            raise
        finally:
            del self._inflight[domain]

    async def _policy(self, domain: str) -> Lookup:
        now = self.clock()
        cached = self._cached(domain, now)
        txt_id, txt_error = await self._txt_id(domain, now)
        if txt_id is None:
            if cached is not None:
                # RFC 8461 5.1: without a valid TXT record a cached policy still applies.
                return Lookup(cached[2], cached[1], "cache")
            return Lookup(None, failure="", reason=txt_error)
        if cached is not None and cached[1] == txt_id:
            return Lookup(cached[2], txt_id, "cache")
        fetched = await self.fetcher.fetch(domain)
        failure, reason = fetched.failure, fetched.reason
        if not failure:
            try:
                policy = parse_policy(fetched.text)
            except StsError as exc:
                failure, reason = "sts-policy-invalid", f"{fetched.url}: {exc}"
            else:
                self._store(domain, txt_id, policy, now)
                log.info("MTA-STS policy for %s: id %s, mode %s, max_age %d", domain, txt_id,
                         policy.mode, policy.max_age)
                return Lookup(policy, txt_id, "fetched")
        log.warning("MTA-STS policy for %s: %s", domain, reason)
        if cached is not None:
            return Lookup(cached[2], cached[1], "cache", failure, reason)
        return Lookup(None, txt_id, "", failure, reason)

    async def _txt_id(self, domain: str, now: float) -> tuple[str | None, str]:
        known = self._txt.get(domain)
        if known is not None and known[0] > now:
            return known[1], known[2]
        answer = await self.dns.txt(f"_mta-sts.{domain}")
        txt_id: str | None = None
        error = getattr(answer, "error", "")
        if not error:
            try:
                txt_id = parse_txt(tuple(str(item) for item in answer.items))
            except StsError as exc:
                error = "" if not answer.items else f"_mta-sts.{domain}: {exc}"
        self._txt[domain] = (now + TXT_MEMORY, txt_id, error)
        return txt_id, error

    def _cached(self, domain: str, now: float) -> tuple[float, str, Policy] | None:
        found = self._memory.get(domain)
        if found is None and self.cache is not None:
            found = _decode(self.cache.read_record(KIND, domain))
            if found is not None:
                self._memory[domain] = found
        if found is None or found[0] <= now:
            return None
        return found

    def _store(self, domain: str, policy_id: str, policy: Policy, now: float) -> None:
        expires = now + policy.max_age
        self._memory[domain] = (expires, policy_id, policy)
        if self.cache is None:
            return
        record = {"id": policy_id, "fetched": now, "expires": expires,
                  "policy": list(policy.lines)}
        try:
            self.cache.write_record(KIND, domain, json.dumps(record).encode())
        except (OSError, ValueError) as exc:
            log.warning("cannot cache the MTA-STS policy of %s: %s", domain, exc)

    def cached(self, domain: str) -> tuple[float, str, Policy] | None:
        """The cached policy of a domain (expiry time, id, policy), for ``relay tls``."""
        return self._cached(domain.lower().rstrip("."), self.clock())


def _decode(data: bytes | None) -> tuple[float, str, Policy] | None:
    if data is None:
        return None
    try:
        record = json.loads(data)
        policy = parse_policy("\n".join(record["policy"]) + "\n")
        return float(record["expires"]), str(record["id"]), policy
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring a damaged MTA-STS cache record: %s", exc)
        return None
