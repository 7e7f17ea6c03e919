"""The envelope of a queued message: frozen records and their versioned text format.

An envelope holds everything about a message except its content: the sender, each
recipient with its own delivery state and last reason, arrival time, client, size,
attempt count and next attempt time.  It is small and rewritten whole (tmp file,
fsync, rename) on every state change; the message content is written once and never
touched again.

Text format, version 1 (chosen so that parsing cannot go wrong):

    relay-envelope 1
    {one JSON object on one line}
    end

A file that lacks the first or the last line is incomplete and therefore corrupt.
Envelopes written by earlier versions still load (see ``loads``).  This module never does
I/O, so a crash here leaves nothing behind; the files are spool.store's.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, fields, replace
from typing import Any

from spool.errors import CorruptEntry

MAGIC = "relay-envelope 1"
END = "end"


class RcptState(enum.Enum):
    """A recipient is pending until it is sent or bounced; both are final."""

    PENDING = "pending"
    SENT = "sent"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    state: RcptState = RcptState.PENDING
    reason: str = ""  # the last delay or bounce reason, as Postfix logs it
    dsn: str = ""  # the last enhanced status code, e.g. 4.4.1
    remote_mta: str = ""  # host name of the last server that answered for it
    notified: bool = False  # BOUNCED, or SENT with dsn_action: the sender's notice is queued
    # RFC 3461, as the client gave them (xtext decoded): NOTIFY as an upper-case comma
    # list ("" = not given: FAILURE,DELAY), ORCPT as "addr-type;address".
    dsn_notify: str = ""
    dsn_orcpt: str = ""
    # For SENT: the RFC 3464 Action ("delivered" or "relayed") of the success notice the
    # sender asked for (NOTIFY=SUCCESS) and is owed until ``notified``; "" = none owed
    # (not asked, or the next hop offered DSN and took the request along).
    dsn_action: str = ""

    @property
    def done(self) -> bool:
        return self.state is not RcptState.PENDING


@dataclass(frozen=True, slots=True)
class Envelope:
    queue_id: str
    sender: str  # "" is the null sender
    recipients: tuple[Recipient, ...]
    arrival_time: float
    size: int = 0  # bytes of header + body, as Postfix's message_size
    client_name: str = "localhost"
    client_address: str = "127.0.0.1"
    helo_name: str = ""
    protocol: str = "ESMTP"
    auth_user: str = ""
    message_id: str = ""
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float = 0.0
    held_seconds: float = 0.0  # time spent on hold; does not count towards expiry
    warned: bool = False  # delay warning already sent
    forced_expire: bool = False
    sender_fullname: str = ""  # sendmail -F (Postfix's sender_fullname record)
    # RFC 3461 ENVID (xtext decoded) and RET (FULL, HDRS or "" = not given); RFC 6531:
    # the client asked for SMTPUTF8.
    dsn_envid: str = ""
    dsn_ret: str = ""
    smtputf8: bool = False
    # RFC 8689: the client sent MAIL FROM:<...> REQUIRETLS; the message goes on only over
    # verified TLS to a next hop that offers REQUIRETLS, else it bounces (5.7.30).
    requiretls: bool = False

    @property
    def pending(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.state is RcptState.PENDING)

    @property
    def finished(self) -> bool:
        return all(r.done for r in self.recipients)

    def age(self, now: float) -> float:
        """Time in the queue that counts towards expiry (hold time excluded)."""
        return max(0.0, now - self.arrival_time - self.held_seconds)

    def with_recipients(self, recipients: tuple[Recipient, ...]) -> Envelope:
        return replace(self, recipients=recipients)


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))
_RECIPIENT_FIELDS = tuple(f.name for f in fields(Recipient))


def _recipient_dict(r: Recipient) -> dict[str, Any]:
    data = {name: getattr(r, name) for name in _RECIPIENT_FIELDS}
    data["state"] = r.state.value
    return data


def dumps(env: Envelope) -> bytes:
    """Serialise an envelope to its version 1 text form (asdict's layout, without
    its deep copies: this runs on every accept and every state change)."""
    data: dict[str, Any] = {name: getattr(env, name) for name in _ENVELOPE_FIELDS}
    data["recipients"] = [_recipient_dict(r) for r in env.recipients]
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=True)
    return f"{MAGIC}\n{body}\n{END}\n".encode("ascii")


# Keys that envelopes written by earlier versions may have, read as follows: ``extra``
# (a dict) held sendmail -F's ``sender_fullname``, now a field of its own, and nothing
# else anyone read; a recipient's ``orig_address`` was never set to anything but "".
_OLD_RECIPIENT_KEYS = frozenset({"orig_address"})


def _current(data: dict[str, Any], old: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in old} if old & data.keys() else data


def loads(raw: bytes) -> Envelope:
    """Parse the version 1 text form; anything else raises CorruptEntry."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise CorruptEntry("envelope is not ASCII") from exc
    lines = text.split("\n")
    if len(lines) != 4 or lines[0] != MAGIC or lines[2] != END or lines[3] != "":
        raise CorruptEntry("envelope has no valid header or end marker")
    try:
        data = json.loads(lines[1])
        rcpts = tuple(
            Recipient(**{**_current(r, _OLD_RECIPIENT_KEYS), "state": RcptState(r["state"])})
            for r in data.pop("recipients")
        )
        extra = data.pop("extra", None)
        if extra and "sender_fullname" not in data:
            data["sender_fullname"] = extra.get("sender_fullname", "")
        env = Envelope(recipients=rcpts, **data)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise CorruptEntry(f"envelope does not parse: {exc}") from exc
    if not isinstance(env.queue_id, str) or not isinstance(env.sender, str):
        raise CorruptEntry("envelope fields have the wrong type")
    return env


# ---- the plain field form, for commands that list many envelopes ----------------------

ENVELOPE_FIELDS = frozenset(_ENVELOPE_FIELDS)
RECIPIENT_FIELDS = frozenset(_RECIPIENT_FIELDS)
_STATES = tuple(s.value for s in RcptState)
_DECODER = json.JSONDecoder()  # what json.loads() uses, minus its white-space skipping
_HEAD = MAGIC + "\n"
_TAIL = "\n" + END + "\n"

Fields = dict[str, Any]


def as_fields(env: Envelope) -> Fields:
    """The plain dict that dumps() writes: every field, each recipient a dict whose
    ``state`` is the RcptState value string."""
    data: Fields = {name: getattr(env, name) for name in _ENVELOPE_FIELDS}
    data["recipients"] = [_recipient_dict(r) for r in env.recipients]
    return data


def loads_fields(raw: bytes) -> Fields:
    """``as_fields(loads(raw))`` without building the records: for mailq and its kin.

    Raises CorruptEntry exactly when loads() does.  An envelope as dumps() writes it
    (every field of both records present, no other, known recipient states) is checked
    and returned as json.loads() parsed it, at a fraction of loads()' cost: the records
    would hold the very same values.  Anything else (an older file lacking a field, a
    damaged one) goes through loads() itself, so the two can never disagree.
    """
    if raw.isascii():
        text = raw.decode("ascii")
        if text.startswith(_HEAD) and text.endswith(_TAIL) and len(text) > len(_HEAD + _TAIL):
            body = text[len(_HEAD):-len(_TAIL)]
            data = None
            if "\n" not in body:
                try:
                    data, end = _DECODER.raw_decode(body)
                except (ValueError, RecursionError):
                    pass
                else:
                    if end != len(body):  # trailing text, maybe white space: loads() decides
                        data = None
                if (type(data) is dict and data.keys() == ENVELOPE_FIELDS
                        and type(data["queue_id"]) is str and type(data["sender"]) is str
                        and _plain_recipients(data["recipients"])):
                    return data
    return as_fields(loads(raw))


def _plain_recipients(rcpts: object) -> bool:
    if type(rcpts) is not list:
        return False
    for r in rcpts:
        # ``in`` a tuple compares with ==, so an unhashable state is just "not known".
        if type(r) is not dict or r.keys() != RECIPIENT_FIELDS or r["state"] not in _STATES:
            return False
    return True
