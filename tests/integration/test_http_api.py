"""The read API over real sockets against ``relay serve``: Mailpit's API v1 subset (same
paths and JSON field names), relay's queue routes, and their guards (http_admin, Origin,
Host).  The relay comes from the project's own pytest plugin (smtp_relay_factory)."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

from relay import maildir
from relay.testing import SmtpRelay

pytestmark = pytest.mark.timeout(90)
Factory = Callable[..., SmtpRelay]

HOLD = {"relayhost": "[127.0.0.1]:9", "minimal_backoff_time": "1h",
        "maximal_backoff_time": "1h", "queue_run_delay": "1h"}


def call(relay: SmtpRelay, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", relay.http_port, timeout=20)
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) \
        else body
    try:
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def get_json(relay: SmtpRelay, path: str) -> Any:
    status, ctype, body = call(relay, "GET", path)
    assert (status, ctype) == (200, "application/json; charset=utf-8"), body
    return json.loads(body)


def deliver(relay: SmtpRelay, subject: str, to: str = "bob@example.net",
            body: str = "hello") -> str:
    message = (f"From: App <app@example.org>\r\nTo: {to}\r\nSubject: {subject}\r\n"
               f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n\r\n{body}\r\n")
    return maildir.deliver(str(relay.maildir), message.encode(), sender="app@example.org",
                           recipient=to)


@pytest.fixture
def relay(smtp_relay_factory: Factory) -> SmtpRelay:
    return smtp_relay_factory(http=True)


def test_mailpit_messages_search_message_raw_headers(relay: SmtpRelay) -> None:
    first = deliver(relay, "Welcome aboard", body="Your account is ready.")
    second = deliver(relay, "Reset your password", "cat@example.net", "Click the link.")
    listing = get_json(relay, "/api/v1/messages")
    assert {k: listing[k] for k in ("total", "unread", "count", "messages_count", "start")} \
        == {"total": 2, "unread": 2, "count": 2, "messages_count": 2, "start": 0}
    newest, oldest = listing["messages"]  # newest first, as Mailpit lists them
    assert (newest["ID"], oldest["ID"]) == (second, first)
    assert set(newest) >= {"ID", "MessageID", "From", "To", "Subject", "Created", "Size",
                           "Snippet", "Read", "Attachments", "Tags", "Cc", "Bcc", "ReplyTo"}
    assert newest["From"] == {"Name": "App", "Address": "app@example.org"}
    assert newest["To"] == [{"Name": "", "Address": "cat@example.net"}]
    assert newest["MessageID"] == "Reset.your.password@example.org"
    assert newest["Snippet"] == "Click the link."
    assert get_json(relay, "/api/v1/messages?limit=1&start=1")["messages"][0]["ID"] == first

    found = get_json(relay, "/api/v1/search?query=" + urllib.parse.quote('to:cat "the link"'))
    assert (found["total"], found["messages_count"]) == (2, 1)
    assert [m["ID"] for m in found["messages"]] == [second]
    status, _, body = call(relay, "GET", "/api/v1/search?query=")
    assert (status, body) == (400, b"Error: no search query")

    full = get_json(relay, f"/api/v1/message/{first}")
    assert full["Subject"] == "Welcome aboard"
    assert full["Text"] == "Your account is ready.\n"
    assert full["HTML"] == "" and full["Attachments"] == []
    assert full["ReturnPath"] == "app@example.org"
    assert get_json(relay, "/api/v1/message/latest")["ID"] == second
    status, ctype, raw = call(relay, "GET", f"/api/v1/message/{first}/raw")
    assert (status, ctype) == (200, "text/plain; charset=utf-8")
    assert raw.startswith(b"Return-Path: <app@example.org>\nX-Original-To: bob@example.net\n")
    headers = get_json(relay, f"/api/v1/message/{first}/headers")
    assert headers["Subject"] == ["Welcome aboard"]
    assert headers["Delivered-To"] == ["bob@example.net"]
    status, ctype, body = call(relay, "GET", "/api/v1/message/nonesuch")
    assert (status, body) == (404, b"404 page not found")
    info = get_json(relay, "/api/v1/info")
    assert info["Messages"] == 2 and info["Version"].startswith("relay ")


def test_mailpit_deletes(relay: SmtpRelay) -> None:
    ids = [deliver(relay, f"n{i}") for i in range(4)]
    assert call(relay, "DELETE", "/api/v1/messages", {"IDs": [ids[0]]})[2] == b"ok"
    assert get_json(relay, "/api/v1/messages")["total"] == 3
    assert call(relay, "DELETE", "/api/v1/search?query=subject:n1")[0] == 200
    assert [m["Subject"] for m in get_json(relay, "/api/v1/messages")["messages"]] == \
        ["n3", "n2"]
    assert call(relay, "DELETE", "/api/v1/messages")[0] == 200  # no body: all of them
    assert get_json(relay, "/api/v1/messages")["total"] == 0
    assert relay.messages == []


def test_queue_listing_and_admin_actions(smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory({**HOLD, "http_admin": "yes"}, capture=False, http=True)
    with relay.smtp() as s:
        for n in range(3):
            s.sendmail("app@example.org", [f"u{n}@example.net"], b"Subject: q\r\n\r\nx\r\n")
    records = relay.wait_queue(lambda q: len(q) == 3 and all(
        r["queue_name"] == "deferred" and r["recipients"][0].get("delay_reason") for r in q))
    listed = get_json(relay, "/api/v1/queue")
    assert sorted(r["queue_id"] for r in listed) == sorted(r["queue_id"] for r in records)
    assert set(listed[0]) == {"queue_name", "queue_id", "arrival_time", "message_size",
                              "forced_expire", "sender", "recipients"}
    a, b, c = (r["queue_id"] for r in listed)
    assert call(relay, "POST", f"/api/v1/queue/{a}/hold")[2] == b"ok"
    assert call(relay, "DELETE", f"/api/v1/queue/{b}")[2] == b"ok"
    assert call(relay, "DELETE", f"/api/v1/queue/{b}")[0] == 404  # gone already
    queues = {r["queue_id"]: r["queue_name"] for r in get_json(relay, "/api/v1/queue")}
    assert queues == {a: "hold", c: "deferred"}
    assert call(relay, "POST", f"/api/v1/queue/{a}/release")[0] == 200
    assert call(relay, "POST", "/api/v1/queue/flush")[2] == b"ok"
    log = relay.wait_log(f"{a}: released from hold")
    assert f"{a}: placed on hold" in log and f"{b}: removed" in log
    # A form of the page goes back to the page.
    status, _, _ = call(relay, "POST", f"/api/v1/queue/{c}/hold?next=/")
    assert status == 303


def test_queue_changes_need_http_admin(smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory(HOLD, capture=False, http=True)
    with relay.smtp() as s:
        s.sendmail("app@example.org", ["u@example.net"], b"Subject: q\r\n\r\nx\r\n")
    (record,) = relay.wait_queue(lambda q: len(q) == 1)
    assert get_json(relay, "/api/v1/queue")[0]["queue_id"] == record["queue_id"]  # reads: yes
    for method, path in (("POST", "/api/v1/queue/flush"),
                         ("POST", f"/api/v1/queue/{record['queue_id']}/hold"),
                         ("DELETE", f"/api/v1/queue/{record['queue_id']}")):
        status, _, body = call(relay, method, path)
        assert (status, body) == (403, b"forbidden: changing the queue needs http_admin = yes\n")
    assert len(relay.queue()) == 1


def test_cross_origin_and_foreign_host_are_refused(smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory({"http_admin": "yes"}, http=True)
    deliver(relay, "keep me")
    origin = f"http://127.0.0.1:{relay.http_port}"
    status, _, body = call(relay, "DELETE", "/api/v1/messages",
                           headers={"Origin": "http://evil.example"})
    assert status == 403 and b"cross-origin request from http://evil.example" in body
    status, _, _ = call(relay, "POST", "/api/v1/queue/flush",
                        headers={"Origin": "http://evil.example"})
    assert status == 403
    status, _, _ = call(relay, "GET", "/api/v1/messages",
                        headers={"Host": f"rebound.evil.example:{relay.http_port}"})
    assert status == 403
    assert len(relay.messages) == 1
    # The same origin may.
    assert call(relay, "DELETE", "/api/v1/messages", headers={"Origin": origin})[0] == 200
    assert relay.messages == []
