"""Scripted faults at the next hop through the plugin, seen from the relay: a drop in
mid-DATA and silence after the final dot are retried (the latter delivering twice, as
RFC 1047 says it must), a slow link is waited for, and a script can change mid-test."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from relay.testing import SmtpRelay

pytestmark = pytest.mark.timeout(90)
Factory = Callable[..., SmtpRelay]
BODY = b"Subject: hi\r\n\r\n" + b"x" * 900 + b"\r\n"  # 2100 bytes: past after_bytes


def test_drop_in_mid_data_is_retried(smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory(faults=[
        {"stage": "data", "message": 1, "action": "drop", "after_bytes": 100}])
    with relay.smtp() as s:
        s.sendmail("app@example.org", ["bob@example.net"], BODY)
    (message,) = relay.wait_for(1)
    assert message.get_content().strip() == "x" * 900
    assert "lost connection with 127.0.0.1[127.0.0.1]" in relay.log() \
        or "status=deferred" in relay.log()
    relay.wait_queue()


def test_silence_after_the_final_dot_delivers_twice(smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory({"smtp_data_done_timeout": "2s"}, faults=[
        {"stage": "data-end", "message": 1, "action": "silence", "keep": True}])
    with relay.smtp() as s:
        s.sendmail("app@example.org", ["bob@example.net"], BODY)
    first, second = relay.wait_for(2, timeout=20)
    assert first["Subject"] == second["Subject"] == "hi"
    assert "timeout after END-OF-MESSAGE" in relay.log() or "status=deferred" in relay.log()


def test_slow_link_and_a_script_changed_mid_test(smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory(faults={"delay": 0.3, "rule": []})
    started = time.monotonic()
    with relay.smtp() as s:
        s.sendmail("app@example.org", ["bob@example.net"], BODY)
    relay.wait_for(1)
    # Greeting, EHLO, MAIL, RCPT and DATA each waited 0.3 s (pipelined, the sink still
    # answers one at a time); the message is in the Maildir before the 250 after the dot.
    assert time.monotonic() - started >= 0.3 * 5
    relay.set_faults([{"stage": "rcpt", "rcpt": "cat@*", "reply": "550 5.1.1 gone"}])
    with relay.smtp() as s:
        s.sendmail("app@example.org", ["cat@example.net"], BODY)
    (notice,) = relay.wait_for(1, match="subject:Undelivered")
    assert "550 5.1.1 gone" in notice.as_string()
