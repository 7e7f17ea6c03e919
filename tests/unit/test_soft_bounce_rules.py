"""soft_bounce's pure rules: a bounce becomes a deferral of class 4 (Postfix's
bounce_append()), expiry keeps the message; and a Maildir write's status (mbox_dsn())."""

from __future__ import annotations

import errno

from relay import outcome
from relay.delivery import RcptResult, RcptStatus
from relay.scheduler import Result, maildir_dsn, soften
from spool import Envelope, Recipient


def test_soften() -> None:
    bounce = Result(RcptResult("a@x", RcptStatus.BOUNCE, "5.1.1", "user unknown"), "mx", (0, 0, 0, 0))
    sent = Result(RcptResult("b@x", RcptStatus.SENT, "2.0.0", "ok"), "mx", (0, 0, 0, 0))
    soft, same = soften([bounce, sent])
    assert (soft.rcpt.status, soft.rcpt.dsn, soft.rcpt.reason, soft.softened) == (
        RcptStatus.DEFER, "4.1.1", "user unknown", True)
    assert same is sent


def test_expiry_under_soft_bounce_defers() -> None:
    env = Envelope("Q", "s@x", (Recipient("a@x"),), arrival_time=0.0, forced_expire=True)
    assert outcome.decide(env, 100.0, outcome.Policy()).fate is outcome.Fate.EXPIRE
    kept = outcome.decide(env, 100.0, outcome.Policy(soft_bounce=True))
    assert kept.fate is outcome.Fate.DEFER and kept.next_attempt > 100.0


def test_maildir_dsn_is_postfix_mbox_dsn() -> None:
    assert maildir_dsn(errno.ENOSPC) == "4.3.0"
    assert maildir_dsn(errno.EAGAIN) == "4.2.0"
    assert maildir_dsn(errno.EDQUOT) == "5.2.2"
    assert maildir_dsn(errno.EACCES) == "5.2.0"
