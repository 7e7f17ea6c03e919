"""relay.outcome: backoff, the decision after an attempt, and maillog delay numbers.

Pure code, no sockets.  The expected numbers are Postfix's (FORMATS.md 2.1 for the
backoff schedule, 1.8 for format_tv), not whatever the code happens to compute.
"""

from __future__ import annotations

import pytest

from relay.outcome import Decision, Fate, Policy, backoff, decide, format_delay, lifetime
from spool.envelope import Envelope, RcptState, Recipient

T0 = 1_700_000_000.0
DEFAULTS = Policy()


def envelope(
    *states: RcptState,
    sender: str = "alice@example.org",
    arrival: float = T0,
    held: float = 0.0,
    warned: bool = False,
    forced_expire: bool = False,
) -> Envelope:
    states = states or (RcptState.PENDING,)
    return Envelope(
        queue_id="4F2A31C0D2",
        sender=sender,
        recipients=tuple(Recipient(f"r{i}@example.com", state) for i, state in enumerate(states)),
        arrival_time=arrival,
        held_seconds=held,
        warned=warned,
        forced_expire=forced_expire,
    )


# ---- backoff ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (0.0, 300.0),  # clamped up to minimal_backoff_time
        (120.0, 300.0),
        (300.0, 300.0),
        (1200.0, 1200.0),  # the time in the queue so far
        (3999.0, 3999.0),
        (4000.0, 4000.0),
        (86400.0, 4000.0),  # clamped down to maximal_backoff_time
    ],
)
def test_backoff_is_time_in_queue_clamped(age: float, expected: float) -> None:
    assert backoff(envelope(), T0 + age, DEFAULTS) == expected


def test_backoff_uses_the_configured_bounds() -> None:
    policy = Policy(minimal_backoff_time=600.0, maximal_backoff_time=900.0)
    assert backoff(envelope(), T0 + 10, policy) == 600.0
    assert backoff(envelope(), T0 + 700, policy) == 700.0
    assert backoff(envelope(), T0 + 5000, policy) == 900.0


def test_backoff_leaves_out_time_on_hold() -> None:
    # 4500 s since arrival, 4000 of them on hold: 500 s in the queue proper.
    assert backoff(envelope(held=4000.0), T0 + 4500, DEFAULTS) == 500.0


def test_default_schedule_doubles_then_caps_at_maximal_backoff() -> None:
    """Postfix's schedule with defaults: 0, 300, 600, 1200, 2400, 4800, then every 4000 s."""
    env = envelope()
    now = T0
    attempts = [now - T0]
    for _ in range(8):
        decision = decide(env, now, DEFAULTS)
        assert decision.fate is Fate.DEFER
        now = decision.next_attempt
        attempts.append(now - T0)
    assert attempts == [0, 300, 600, 1200, 2400, 4800, 8800, 12800, 16800]


# ---- decide: done, defer, expire -------------------------------------------------------------


def test_done_when_every_recipient_is_sent_or_bounced() -> None:
    env = envelope(RcptState.SENT, RcptState.BOUNCED)
    assert decide(env, T0 + 1, DEFAULTS) == Decision(Fate.DONE)
    # Even far past the lifetime a finished message is simply removed, not expired.
    assert decide(env, T0 + 10 * 86400, DEFAULTS).fate is Fate.DONE


def test_defer_while_a_recipient_is_pending() -> None:
    env = envelope(RcptState.SENT, RcptState.PENDING)
    decision = decide(env, T0 + 1000, DEFAULTS)
    assert decision == Decision(Fate.DEFER, next_attempt=T0 + 2000, warn=False)


def test_expire_exactly_at_the_lifetime_not_before() -> None:
    policy = Policy(maximal_queue_lifetime=3600.0)
    env = envelope()
    assert decide(env, T0 + 3599, policy).fate is Fate.DEFER
    assert decide(env, T0 + 3600, policy).fate is Fate.EXPIRE
    assert decide(env, T0 + 7200, policy).fate is Fate.EXPIRE


def test_lifetime_zero_means_try_once() -> None:
    policy = Policy(maximal_queue_lifetime=0.0)
    assert decide(envelope(), T0, policy).fate is Fate.EXPIRE


def test_force_expired_message_expires_at_once() -> None:
    env = envelope(forced_expire=True)
    assert decide(env, T0 + 1, DEFAULTS).fate is Fate.EXPIRE
    # ...but a finished one is just done: nothing is left to return.
    done = envelope(RcptState.SENT, forced_expire=True)
    assert decide(done, T0 + 1, DEFAULTS).fate is Fate.DONE


def test_null_sender_uses_bounce_queue_lifetime() -> None:
    policy = Policy(maximal_queue_lifetime=5 * 86400.0, bounce_queue_lifetime=3600.0)
    bounce = envelope(sender="")
    mail = envelope(sender="alice@example.org")
    assert lifetime(bounce, policy) == 3600.0
    assert lifetime(mail, policy) == 5 * 86400.0
    assert decide(bounce, T0 + 3600, policy).fate is Fate.EXPIRE
    assert decide(mail, T0 + 3600, policy).fate is Fate.DEFER


def test_bounce_queue_lifetime_does_not_apply_to_a_real_sender() -> None:
    policy = Policy(maximal_queue_lifetime=3600.0, bounce_queue_lifetime=5 * 86400.0)
    assert decide(envelope(sender="alice@example.org"), T0 + 3600, policy).fate is Fate.EXPIRE
    assert decide(envelope(sender=""), T0 + 3600, policy).fate is Fate.DEFER


def test_time_on_hold_does_not_count_towards_expiry() -> None:
    policy = Policy(maximal_queue_lifetime=3600.0)
    # Arrived two hours ago, of which 1h30 on hold: 30 minutes old for expiry.
    held = envelope(held=5400.0)
    assert held.age(T0 + 7200) == 1800.0
    decision = decide(held, T0 + 7200, policy)
    assert decision.fate is Fate.DEFER
    assert decision.next_attempt == T0 + 7200 + 1800
    assert decide(envelope(), T0 + 7200, policy).fate is Fate.EXPIRE


# ---- decide: the delay warning -----------------------------------------------------------------


def test_no_warning_when_delay_warning_time_is_off() -> None:
    assert not decide(envelope(), T0 + 4 * 86400, DEFAULTS).warn


def test_warn_once_after_delay_warning_time() -> None:
    policy = Policy(delay_warning_time=4 * 3600.0)
    assert not decide(envelope(), T0 + 4 * 3600 - 1, policy).warn
    assert decide(envelope(), T0 + 4 * 3600, policy).warn
    assert decide(envelope(), T0 + 10 * 3600, policy).warn
    # The warning has gone out: never a second one.
    assert not decide(envelope(warned=True), T0 + 10 * 3600, policy).warn


def test_never_warn_the_null_sender() -> None:
    policy = Policy(delay_warning_time=3600.0)
    assert not decide(envelope(sender=""), T0 + 7200, policy).warn


def test_no_warning_for_a_finished_or_expiring_message() -> None:
    policy = Policy(delay_warning_time=3600.0, maximal_queue_lifetime=7200.0)
    assert not decide(envelope(RcptState.SENT), T0 + 5000, policy).warn
    expiring = decide(envelope(), T0 + 7200, policy)
    assert expiring.fate is Fate.EXPIRE and not expiring.warn


def test_delay_warning_age_leaves_out_time_on_hold() -> None:
    policy = Policy(delay_warning_time=3600.0)
    assert not decide(envelope(held=3000.0), T0 + 4000, policy).warn
    assert decide(envelope(held=3000.0), T0 + 6600, policy).warn


# ---- format_delay: Postfix's format_tv, 2 significant digits, 10 ms resolution -------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        # The examples of FORMATS.md 1.8, as Postfix prints them.
        (0.004, "0"),
        (0.005, "0.01"),
        (0.054, "0.05"),
        (0.28, "0.28"),
        (1.04, "1"),
        (1.25, "1.3"),
        (12.3, "12"),
        (99.6, "100"),
        (3600.2, "3600"),
        # And the plain ones.
        (0.0, "0"),
        (1.0, "1"),
        (10.0, "10"),
        (300.0, "300"),
    ],
)
def test_format_delay(seconds: float, text: str) -> None:
    assert format_delay(seconds) == text
