"""Scripted, deterministic SMTP faults: what ``relay sink`` (and the pytest plugin's next hop)
answers at each stage, for which recipient, sender, message or connection.

A script is a list of rules and two settings, read from TOML or JSON (or given as plain
dicts by a test).  For each stage of a session the first rule that matches decides; when
none does, the sink behaves as a plain, accepting MX.  Nothing is random: the same mail in
the same order meets the same faults.

    hostname = "sink.test"       # in the greeting and EHLO
    delay = 0.0                  # seconds before every reply: a slow link

    [[rule]]                     # all the given matchers must hold
    stage = "rcpt"               # connect, helo, mail, rcpt, data, data-end
    rcpt = "*@bounce.test"       # fnmatch pattern, case-insensitive (also: sender)
    message = [2, 3]             # the Nth MAIL transaction the sink has seen (from 1)
    connection = 1               # the Nth connection (from 1)
    times = 1                    # fire at most this often (default: always)
    delay = 2.5                  # wait before acting
    action = "reply"             # reply, drop, silence, greylist, rate-limit, accept
    reply = "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"
    preset = "gmail-rate-limit"  # instead of reply: a big provider's exact text
    after_bytes = 512            # drop at stage data: after this many bytes of content
    limit = 10                   # rate-limit: messages a minute before it answers 421
    keep = false                 # silence at data-end: keep the message anyway

Actions: ``reply`` sends the reply (a 421 or a reply at ``connect`` ends the session);
``drop`` closes the connection (at ``data``: after 354 and ``after_bytes`` of content, a
drop in mid-DATA); ``silence`` answers nothing and holds the connection until the client
gives up (at ``data-end``: silence after the final dot); ``greylist`` (stage ``rcpt``)
answers 451 the first time a (client, sender, recipient) triple is seen and lets later
attempts through; ``rate-limit`` (stage ``mail`` unless given) answers 421 once ``limit``
messages were accepted in the last 60 seconds; ``accept`` only waits ``delay``.

Texts may use ``{client}``, ``{sender}``, ``{rcpt}``, ``{domain}``, ``{hostname}``,
``{message}`` and ``{queue_id}``.  A multi-line reply is written with newlines.

This module is pure: parsing and deciding, no I/O but the script file's reading in
``load()``.  ``Faults`` keeps the counters a decision needs (connections, messages, how
often each rule fired, greylisted triples, recent acceptances) for one sink's lifetime.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import os
import time
import tomllib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class ScriptError(ValueError):
    """A script that cannot be used; the message names the rule and the field."""


class Stage(enum.StrEnum):
    CONNECT = "connect"
    HELO = "helo"  # HELO or EHLO
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the DATA command (its reply, or a drop in mid-DATA)
    DATA_END = "data-end"  # after the final dot


class Action(enum.StrEnum):
    REPLY = "reply"
    DROP = "drop"
    SILENCE = "silence"
    GREYLIST = "greylist"
    RATE_LIMIT = "rate-limit"
    ACCEPT = "accept"


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: the code and its text lines (placeholders not yet filled)."""

    code: int
    lines: tuple[str, ...]

    def render(self, values: Mapping[str, str]) -> bytes:
        out = []
        for i, line in enumerate(self.lines):
            for name, value in values.items():
                line = line.replace("{" + name + "}", value)
            sep = " " if i == len(self.lines) - 1 else "-"
            out.append(f"{self.code}{sep}{line}".rstrip() + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    @property
    def closes(self) -> bool:
        """421 ends the session (RFC 5321 section 3.8)."""
        return self.code == 421


def parse_reply(text: str) -> Reply:
    """``"550 5.1.1 text"``; more lines after newlines, each with or without the code."""
    lines = [line.rstrip("\r") for line in text.strip("\n").split("\n")]
    head = lines[0]
    if len(head) < 3 or not head[:3].isdigit() or head[0] not in "2345" \
            or (len(head) > 3 and head[3] not in " -"):
        raise ScriptError(f"bad reply {text!r}: it must start with a code such as 550")
    code = head[:3]
    body = []
    for line in lines:
        if line.startswith(code) and (len(line) == 3 or line[3] in " -"):
            line = line[4:]
        body.append(line)
    return Reply(int(code), tuple(body))


# The big providers' throttling and deferral replies, as their MX hosts send them (texts
# from their documentation and from logs that quote them: Google's "Gmail SMTP errors and
# codes", Microsoft's NDR 4.7.500-699 article and Outlook.com's RP-001, Yahoo's
# "SMTP error codes").  Each comes with the stage where that provider sends it.
PRESETS: Mapping[str, tuple[Stage, str]] = {
    "gmail-rate-limit": (Stage.DATA_END, (
        "421-4.7.28 [{client}] Our system has detected an unusual rate of\n"
        "421-4.7.28 unsolicited mail originating from your IP address. To protect our\n"
        "421-4.7.28 users from spam, mail sent from your IP address has been temporarily\n"
        "421-4.7.28 rate limited. Please visit\n"
        "421-4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError to\n"
        "421 4.7.28 review our Bulk Email Senders Guidelines. {queue_id} - gsmtp")),
    "gmail-receiving-rate": (Stage.RCPT, (
        "450-4.2.1 The user you are trying to contact is receiving mail at a rate that\n"
        "450-4.2.1 prevents additional messages from being delivered. Please resend your\n"
        "450-4.2.1 message at a later time. If the user is able to receive mail at that\n"
        "450-4.2.1 time, your message will be delivered. For more information, please\n"
        "450-4.2.1 visit\n"
        "450 4.2.1  https://support.google.com/mail/?p=ReceivingRate {queue_id} - gsmtp")),
    "gmail-over-quota": (Stage.RCPT, (
        "452-4.2.2 The email account that you tried to reach is over quota. Please direct\n"
        "452-4.2.2 the recipient to\n"
        "452 4.2.2  https://support.google.com/mail/?p=OverQuotaTemp {queue_id} - gsmtp")),
    "outlook-rate-limit": (Stage.MAIL, (
        "421 RP-001 (SNT0-MC2-F19) Unfortunately, some messages from {client} weren't "
        "sent. Please try again. We have limits for how many messages can be sent per "
        "hour and per day. You can also refer to "
        "http://mail.live.com/mail/troubleshooting.aspx#errors.")),
    "microsoft365-server-busy": (Stage.DATA_END, (
        "451 4.7.500 Server busy. Please try again later from [{client}]. (S77719) "
        "[FR2DEU01FT008.eop-deu01.prod.protection.outlook.com]")),
    "yahoo-deferred": (Stage.MAIL, (
        "421 4.7.0 [TSS04] Messages from {client} temporarily deferred due to unexpected "
        "volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes")),
    "greylist": (Stage.RCPT, (
        "451 4.7.1 <{rcpt}>: Recipient address rejected: Greylisted, see "
        "http://postgrey.schweikert.ch/help/{domain}.html")),
    "rate-limit": (Stage.MAIL, "421 4.7.0 {hostname} Error: too many messages, slow down"),
}

_DEFAULT_STAGE = {Action.GREYLIST: Stage.RCPT, Action.RATE_LIMIT: Stage.MAIL}
_DEFAULT_PRESET = {Action.GREYLIST: "greylist", Action.RATE_LIMIT: "rate-limit"}
_RULE_KEYS = {"stage", "rcpt", "sender", "message", "connection", "times", "delay", "action",
              "reply", "preset", "after_bytes", "limit", "keep"}
DROP_AFTER_BYTES = 512
RATE_WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class Rule:
    stage: Stage
    action: Action
    reply: Reply | None = None
    rcpt: str | None = None
    sender: str | None = None
    messages: frozenset[int] = frozenset()
    connections: frozenset[int] = frozenset()
    times: int | None = None
    delay: float = 0.0
    after_bytes: int = DROP_AFTER_BYTES
    limit: int = 0
    keep: bool = False


@dataclass(frozen=True, slots=True)
class Script:
    rules: tuple[Rule, ...] = ()
    hostname: str = "sink.test"
    delay: float = 0.0  # before every reply


def _numbers(value: object, where: str) -> frozenset[int]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in items):
        raise ScriptError(f"{where}: a number from 1, or a list of them")
    return frozenset(items)


def _number(value: object, where: str, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ScriptError(f"{where}: a number, 0 or more")
    if kind is int and not isinstance(value, int):
        raise ScriptError(f"{where}: a whole number")
    return kind(value)


def _rule(data: Mapping[str, Any], n: int) -> Rule:
    where = f"rule {n}"
    if not isinstance(data, Mapping):
        raise ScriptError(f"{where}: a table of fields")
    unknown = set(data) - _RULE_KEYS
    if unknown:
        raise ScriptError(f"{where}: unknown field {min(unknown)!r}")
    action_text = data.get("action") or ("reply" if ("reply" in data or "preset" in data)
                                         else "accept")
    try:
        action = Action(str(action_text))
    except ValueError:
        raise ScriptError(f"{where}: action {action_text!r} is not one of "
                          + ", ".join(a.value for a in Action)) from None
    reply = None
    preset_stage = None
    if "preset" in data or (action in _DEFAULT_PRESET and "reply" not in data):
        name = str(data.get("preset") or _DEFAULT_PRESET[action])
        if name not in PRESETS:
            raise ScriptError(f"{where}: unknown preset {name!r} (known: "
                              + ", ".join(sorted(PRESETS)) + ")")
        preset_stage, text = PRESETS[name]
        reply = parse_reply(text)
    if "reply" in data:
        if not isinstance(data["reply"], str):
            raise ScriptError(f"{where}: reply must be a string such as \"550 5.1.1 text\"")
        try:
            reply = parse_reply(data["reply"])
        except ScriptError as exc:
            raise ScriptError(f"{where}: {exc}") from None
    if action is Action.REPLY and reply is None:
        raise ScriptError(f"{where}: action reply needs a reply or a preset")
    stage_text = data.get("stage") or _DEFAULT_STAGE.get(action) or preset_stage
    if stage_text is None:
        raise ScriptError(f"{where}: a stage is needed: " + ", ".join(s.value for s in Stage))
    try:
        stage = Stage(str(stage_text))
    except ValueError:
        raise ScriptError(f"{where}: stage {stage_text!r} is not one of "
                          + ", ".join(s.value for s in Stage)) from None
    if action is Action.GREYLIST and stage is not Stage.RCPT:
        raise ScriptError(f"{where}: greylist works at stage rcpt")
    if action is Action.RATE_LIMIT and not data.get("limit"):
        raise ScriptError(f"{where}: rate-limit needs a limit (messages a minute)")
    for key in ("rcpt", "sender"):
        if key in data and not isinstance(data[key], str):
            raise ScriptError(f"{where}: {key} must be an address pattern")
    return Rule(
        stage=stage, action=action, reply=reply,
        rcpt=data.get("rcpt"), sender=data.get("sender"),
        messages=_numbers(data["message"], f"{where}: message") if "message" in data
        else frozenset(),
        connections=_numbers(data["connection"], f"{where}: connection")
        if "connection" in data else frozenset(),
        times=_number(data["times"], f"{where}: times", int) if "times" in data else None,
        delay=_number(data.get("delay", 0), f"{where}: delay"),
        after_bytes=_number(data.get("after_bytes", DROP_AFTER_BYTES), f"{where}: after_bytes",
                            int),
        limit=_number(data.get("limit", 0), f"{where}: limit", int),
        keep=bool(data.get("keep", False)),
    )


def script(data: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> Script:
    """A Script from parsed TOML/JSON: a table with ``rule`` (a list) and the settings, or
    just the list of rules."""
    if data is None:
        return Script()
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        data = {"rule": list(data)}
    if not isinstance(data, Mapping):
        raise ScriptError("a script is a table (TOML) or an object (JSON) with rules")
    unknown = set(data) - {"rule", "rules", "hostname", "delay"}
    if unknown:
        raise ScriptError(f"unknown setting {min(unknown)!r}")
    rules = data.get("rule", data.get("rules", []))
    if not isinstance(rules, list):
        raise ScriptError("rule: a list of rules ([[rule]] in TOML)")
    return Script(
        rules=tuple(_rule(r, n) for n, r in enumerate(rules, 1)),
        hostname=str(data.get("hostname", "sink.test")),
        delay=_number(data.get("delay", 0), "delay"),
    )


def load(path: str) -> Script:
    """Read a script file: TOML, or JSON when the name ends in ``.json``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ScriptError(f"{path}: {exc.strerror}") from None
    try:
        if path.endswith(".json"):
            parsed = json.loads(raw)
        else:
            parsed = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ScriptError(f"{path}: {exc}") from None
    try:
        return script(parsed)
    except ScriptError as exc:
        raise ScriptError(f"{os.path.basename(path)}: {exc}") from None


# ---- deciding -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Context:
    """Where a session is when the sink asks what to do."""

    client: str
    connection: int
    message: int = 0  # 0 before the first MAIL of the session
    sender: str | None = None
    rcpt: str | None = None  # at stage rcpt
    recipients: tuple[str, ...] = ()  # accepted so far (data, data-end)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reply: Reply | None
    delay: float
    after_bytes: int = DROP_AFTER_BYTES
    keep: bool = False


def _pattern(pattern: str | None, address: str | None) -> bool:
    if pattern is None:
        return True
    if address is None:
        return False
    return fnmatch.fnmatchcase(address.lower(), pattern.lower())


@dataclass
class Faults:
    """One sink's script and the counters its decisions need."""

    script: Script = field(default_factory=Script)
    clock: Callable[[], float] = time.monotonic
    connections: int = 0
    messages: int = 0
    fired: dict[int, int] = field(default_factory=dict)
    greylisted: set[tuple[str, str, str]] = field(default_factory=set)
    accepted_at: deque[float] = field(default_factory=deque)

    def new_connection(self) -> int:
        self.connections += 1
        return self.connections

    def new_message(self) -> int:
        self.messages += 1
        return self.messages

    def accepted(self) -> None:
        """A message was accepted (for rate limits)."""
        self.accepted_at.append(self.clock())

    def _matches(self, rule: Rule, ctx: Context) -> bool:
        if rule.connections and ctx.connection not in rule.connections:
            return False
        if rule.messages and ctx.message not in rule.messages:
            return False
        if not _pattern(rule.sender, ctx.sender):
            return False
        if rule.rcpt is not None:
            if ctx.rcpt is not None:
                return _pattern(rule.rcpt, ctx.rcpt)
            return any(_pattern(rule.rcpt, r) for r in ctx.recipients)
        return True

    def decide(self, stage: Stage, ctx: Context) -> Decision | None:
        """What to do at ``stage``: the first matching rule's decision, None for normal."""
        for index, rule in enumerate(self.script.rules):
            if rule.stage is not stage or not self._matches(rule, ctx):
                continue
            if rule.times is not None and self.fired.get(index, 0) >= rule.times:
                continue
            if rule.action is Action.GREYLIST:
                triple = (ctx.client, (ctx.sender or "").lower(), (ctx.rcpt or "").lower())
                if triple in self.greylisted:
                    continue  # seen before: let it through to the next rule
                self.greylisted.add(triple)
            elif rule.action is Action.RATE_LIMIT:
                now = self.clock()
                while self.accepted_at and self.accepted_at[0] <= now - RATE_WINDOW:
                    self.accepted_at.popleft()
                if len(self.accepted_at) < rule.limit:
                    continue
            self.fired[index] = self.fired.get(index, 0) + 1
            return Decision(rule.action, rule.reply, rule.delay, rule.after_bytes, rule.keep)
        return None
