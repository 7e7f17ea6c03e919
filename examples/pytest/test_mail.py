"""How an application's test suite uses relay's pytest plugin (installed with relay: no
import, no conftest.py).  The README shows this file as it is, and relay's own test suite
runs it, from a directory of its own, against the installed package."""

import json
import smtplib
import urllib.request
from email.message import EmailMessage


def send_welcome(host, port, to):
    """The application code under test: it sends one mail through an SMTP server."""
    message = EmailMessage()
    message["From"] = "Shop <shop@example.com>"
    message["To"] = to
    message["Subject"] = "Welcome"
    message.set_content("Your account is ready.")
    with smtplib.SMTP(host, port) as smtp:
        smtp.send_message(message)


def test_welcome_mail_is_delivered(smtp_relay):
    # A real relay serve on a free loopback port, in capture mode: nothing leaves.
    send_welcome(smtp_relay.host, smtp_relay.port, "ann@example.net")
    (message,) = smtp_relay.wait_for(1, match="to:ann@example.net")
    assert message["Subject"] == "Welcome"
    assert message["Delivered-To"] == "ann@example.net"
    assert message.get_content() == "Your account is ready.\n"
    assert smtp_relay.wait_queue() == []  # postqueue -j: nothing left waiting
    assert "status=sent (delivered to maildir)" in smtp_relay.log()


def test_a_temporary_failure_is_retried(smtp_relay_factory):
    # The next hop answers 451 to the first attempt only; relay retries within seconds.
    relay = smtp_relay_factory(faults=[
        {"stage": "rcpt", "message": 1, "reply": "451 4.3.0 try again later"},
    ])
    send_welcome(relay.host, relay.port, "ann@example.net")
    relay.wait_for(1)
    assert "said: 451 4.3.0 try again later" in relay.log()


def test_an_unknown_user_bounces_to_the_sender(smtp_relay_factory):
    relay = smtp_relay_factory(faults=[
        {"stage": "rcpt", "rcpt": "nobody@*",
         "reply": "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"},
    ])
    send_welcome(relay.host, relay.port, "nobody@example.net")
    (notice,) = relay.wait_for(1, match="subject:Undelivered")
    assert notice["To"] == "shop@example.com"
    assert "User unknown" in notice.as_string()


def test_provider_throttling_keeps_mail_queued(smtp_relay_factory):
    # Gmail's exact rate-limit reply to the first message; retries only when we say so.
    relay = smtp_relay_factory(
        {"minimal_backoff_time": "1h", "maximal_backoff_time": "1h"},
        faults=[{"preset": "gmail-rate-limit", "message": 1}],
    )
    send_welcome(relay.host, relay.port, "ann@example.net")
    (queued,) = relay.wait_queue(lambda q: q and "delay_reason" in q[0]["recipients"][0])
    assert "421-4.7.28" in queued["recipients"][0]["delay_reason"]
    relay.flush()  # postqueue -f
    relay.wait_for(1)
    assert relay.wait_queue() == []


def test_greylisting(smtp_relay_factory):
    relay = smtp_relay_factory(faults=[{"action": "greylist"}])
    send_welcome(relay.host, relay.port, "ann@example.net")
    relay.wait_for(1)
    assert "Greylisted" in relay.log()


def test_soft_bounce_keeps_what_would_bounce(smtp_relay_factory):
    relay = smtp_relay_factory(
        {"soft_bounce": "yes", "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"},
        faults=[{"stage": "rcpt", "reply": "550 5.1.1 User unknown"}],
    )
    send_welcome(relay.host, relay.port, "ann@example.net")
    (queued,) = relay.wait_queue(lambda q: q and "delay_reason" in q[0]["recipients"][0])
    assert queued["queue_name"] == "deferred"
    assert relay.messages == []  # no bounce went out


def test_mailpit_clients_work_too(smtp_relay_factory):
    relay = smtp_relay_factory(http=True)  # the read API on a free port
    send_welcome(relay.host, relay.port, "ann@example.net")
    relay.wait_for(1)
    with urllib.request.urlopen(relay.http_url + "/api/v1/messages") as response:
        listing = json.load(response)
    assert listing["messages"][0]["Subject"] == "Welcome"


def test_one_relay_for_the_whole_session(smtp_relay_session):
    smtp_relay_session.clear()  # shared: start from an empty mailbox
    send_welcome(smtp_relay_session.host, smtp_relay_session.port, "bob@example.net")
    assert smtp_relay_session.wait_for(1)[0]["To"] == "bob@example.net"
