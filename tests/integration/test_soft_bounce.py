"""soft_bounce and defer_transports as in Postfix: mail that would bounce stays queued
(``status=SOFTBOUNCE``, status class 4, no notice; the listener's 5xx go out as 4xx;
expired mail is kept), and a deferred transport holds its mail until a flush."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from relay.testing import SmtpRelay

pytestmark = pytest.mark.timeout(90)
Factory = Callable[..., SmtpRelay]
SLOW_RETRY = {"minimal_backoff_time": "1h", "maximal_backoff_time": "1h",
              "queue_run_delay": "1h"}
BODY = b"Subject: hi\r\n\r\nhello\r\n"


def deferred_with_reason(relay: SmtpRelay, count: int = 1) -> list[dict[str, object]]:
    return relay.wait_queue(lambda q: len(q) == count and all(
        r["queue_name"] == "deferred" and "delay_reason" in r["recipients"][0] for r in q))


def test_a_5xx_from_the_next_hop_is_kept_not_bounced(smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory({**SLOW_RETRY, "soft_bounce": "yes"}, faults=[
        {"stage": "rcpt", "rcpt": "bob@*", "reply": "550 5.1.1 <{rcpt}>: User unknown"}])
    with relay.smtp() as s:
        s.sendmail("app@example.org", ["bob@example.net"], BODY)
    (record,) = deferred_with_reason(relay)
    assert record["recipients"] == [{  # type: ignore[comparison-overlap]
        "address": "bob@example.net",
        "delay_reason": "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <bob@example.net>: "
                        "User unknown (in reply to RCPT TO command)"}]
    log = relay.log()
    assert re.search(r"to=<bob@example.net>, relay=127.0.0.1\[127.0.0.1\]:\d+, .*dsn=4.1.1, "
                     r"status=SOFTBOUNCE \(host 127.0.0.1", log)
    assert "sender non-delivery notification" not in log
    assert relay.messages == []


def test_error_transport_and_expiry_are_kept_too(smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory({**SLOW_RETRY, "soft_bounce": "yes",
                                "transport_maps": "inline:{ { example.net = error:5.7.1 "
                                                  "no mail for you } }"}, capture=False)
    with relay.smtp() as s:
        s.sendmail("app@example.org", ["bob@example.net"], BODY)
    (record,) = deferred_with_reason(relay)
    assert "dsn=4.7.1, status=SOFTBOUNCE (no mail for you)" in relay.log()
    queue_id = str(record["queue_id"])
    line = f"{queue_id}: to=<bob@example.net>"
    attempts = relay.log().count(line)
    relay.command("postsuper", "-e", queue_id, check=True)  # expire it
    relay.flush()
    deadline = time.monotonic() + 10
    while relay.log().count(line) == attempts:  # the attempt after the expiry
        assert time.monotonic() < deadline, relay.log()
        time.sleep(0.05)
    (kept,) = relay.wait_queue(lambda q: len(q) == 1 and q[0]["queue_name"] == "deferred")
    assert kept["forced_expire"] is True
    assert "returned to sender" not in relay.log()
    assert "non-delivery notification" not in relay.log()


def test_the_listener_answers_4xx_instead_of_5xx(smtp_relay_factory: Factory) -> None:
    # 127.0.0.1 outside mynetworks: relaying is refused, with 454 instead of 554; every
    # other 5xx changes class the same way (Postfix's smtpd_chat_reply(), digit by digit).
    relay = smtp_relay_factory({"soft_bounce": "yes", "mynetworks": "10.0.0.0/8"})
    with relay.smtp() as s:
        s.ehlo("client.test")
        s.mail("app@example.org")
        assert s.rcpt("bob@example.net") == (
            454, b"4.7.1 <bob@example.net>: Relay access denied")
        assert s.docmd("FROB") == (400, b"4.5.2 Error: command not recognized")
    plain = smtp_relay_factory({"mynetworks": "10.0.0.0/8"})
    with plain.smtp() as s:
        s.ehlo("client.test")
        s.mail("app@example.org")
        assert s.rcpt("bob@example.net") == (
            554, b"5.7.1 <bob@example.net>: Relay access denied")


def test_defer_transports_hold_mail_until_a_flush(smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory({**SLOW_RETRY, "defer_transports": "smtp"}, faults=[])
    with relay.smtp() as s:
        s.sendmail("app@example.org", ["bob@example.net"], BODY)
        s.sendmail("app@example.org", ["cat@example.net"], BODY)
    records = deferred_with_reason(relay, 2)
    assert {r["recipients"][0]["delay_reason"] for r in records} == {  # type: ignore[index]
        "deferred transport"}
    assert re.search(r"to=<bob@example.net>, relay=none, .*dsn=4.3.2, status=deferred "
                     r"\(deferred transport\)", relay.log())
    assert relay.sink.accepted == []
    # postqueue -i: that one goes now, the other waits.
    first = str(records[0]["queue_id"])
    relay.command("postqueue", "-i", first, check=True)
    relay.wait_for(1)
    assert [r["queue_id"] for r in relay.queue()] == [records[1]["queue_id"]]
    relay.flush()  # postqueue -f: the rest
    relay.wait_for(2)
    assert relay.wait_queue() == []


def test_defer_transports_names_any_transport(smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory({**SLOW_RETRY, "defer_transports": "maildir"})
    with relay.smtp() as s:
        s.sendmail("app@example.org", ["bob@example.net"], BODY)
    deferred_with_reason(relay)
    assert relay.messages == []
    assert "dsn=4.3.2, status=deferred (deferred transport)" in relay.log()
    relay.flush()
    relay.wait_for(1)
