"""The web page in a real browser (Debian's chromium, headless, over the DevTools protocol):
the queue as mailq shows it, grouped by destination with reasons; the captured mail and a
message view whose HTML cannot run script; the page refreshing itself; the admin buttons
working from the page; and a cross-site form refused."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay import maildir
from relay.testing import SmtpRelay
from tests.support.browser import Chromium, Page

pytestmark = pytest.mark.timeout(120)
Factory = Callable[..., SmtpRelay]

HTML_MESSAGE = (b"From: Shop <shop@example.com>\r\nTo: ann@example.net\r\n"
                b"Subject: Your order\r\nMIME-Version: 1.0\r\n"
                b"Content-Type: multipart/alternative; boundary=b\r\n\r\n"
                b"--b\r\nContent-Type: text/plain\r\n\r\nOrder 42 is on its way.\r\n"
                b"--b\r\nContent-Type: text/html\r\n\r\n<p id=x>Order <b>42</b></p>"
                b"<script>parent.document.title='pwned';document.body.innerHTML='ran'</script>"
                b"\r\n--b--\r\n")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    with Chromium(tmp_path).start() as chromium:
        yield chromium


@pytest.fixture
def relay(smtp_relay_factory: Factory, tmp_path: Path) -> SmtpRelay:
    box = tmp_path / "captured"
    return smtp_relay_factory({
        "default_transport": f"maildir:{box}",
        "transport_maps": "inline:{ held.test = smtp:[127.0.0.1]:9 }",
        "minimal_backoff_time": "1h", "maximal_backoff_time": "1h", "queue_run_delay": "1h",
        "http_admin": "yes",
    }, capture=False, http=True)


def captured_box(relay: SmtpRelay, tmp_path: Path) -> str:
    return str(tmp_path / "captured")


def cross_site_server(html: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Another origin on loopback (another port) that serves one page."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def test_page_in_a_real_browser(browser: Chromium, relay: SmtpRelay, tmp_path: Path) -> None:
    box = captured_box(relay, tmp_path)
    maildir.deliver(box, HTML_MESSAGE, sender="shop@example.com", recipient="ann@example.net")
    with relay.smtp() as s:
        s.sendmail("shop@example.com", ["bob@held.test"], b"Subject: held\r\n\r\nx\r\n")
    (record,) = relay.wait_queue(lambda q: len(q) == 1 and "delay_reason" in q[0]["recipients"][0])
    queue_id = record["queue_id"]
    asyncio.run(_browse(browser, relay, box, queue_id))
    assert relay.queue() == []  # deleted from the page


async def _browse(browser: Chromium, relay: SmtpRelay, box: str, queue_id: str) -> None:
    base = relay.http_url
    async with Page(browser.page_url()) as page:
        await page.navigate(base + "/")
        text = await page.wait_text("Your order")
        # The queue, as mailq shows it: grouped by destination, with the reason.
        assert "-- 0 Kbytes in 1 Request." in text
        assert await page.evaluate("document.querySelector('h3.destination').innerText") \
            == "held.test (1)"
        row = await page.evaluate(f"document.getElementById('q-{queue_id}').innerText")
        assert queue_id in row and "bob@held.test" in row
        assert "connect to 127.0.0.1[127.0.0.1]:9: Connection refused" in row

        # The page refreshes itself: new mail shows up without our navigating.
        maildir.deliver(box, b"Subject: Second mail\r\n\r\nhi\r\n", sender="a@x.test",
                        recipient="c@y.test")
        await page.wait_text("Second mail", timeout=15)

        # The message view; its HTML is shown in a sandbox where no script runs.
        await page.navigate(base + "/")
        link = await page.wait_for("[...document.querySelectorAll('tr.captured a')]"
                                   ".filter(a => a.innerText == 'Your order').map(a => a.href)[0]")
        await page.navigate(link)
        assert await page.evaluate("document.getElementById('subject').innerText") == \
            "Your order"
        assert "Order 42 is on its way." in await page.evaluate(
            "document.getElementById('text').innerText")
        await asyncio.sleep(0.5)  # time for the frame, and for any script in it
        assert await page.evaluate("document.title") == "Your order"
        assert await page.evaluate("document.querySelector('iframe').getAttribute('sandbox')") \
            == ""
        assert await page.evaluate("location.pathname") == link.removeprefix(base)
        # Its Delete button removes the captured message and goes back to the page.
        await page.click_and_load("form[action$='/delete'] button")
        assert await page.evaluate("location.pathname") == "/"
        assert "Your order" not in await page.wait_text("Second mail")

        # The admin buttons work from the page (same origin): hold, then delete.
        await page.navigate(base + "/")
        await page.click_and_load(f"#q-{queue_id} form[action$='/hold?next=/'] button")
        row = await page.evaluate(f"document.getElementById('q-{queue_id}').innerText")
        assert f"{queue_id}!" in row
        await page.click_and_load(f"#q-{queue_id} form[action$='/delete?next=/'] button")
        await page.wait_text("Mail queue is empty")


def test_cross_site_form_is_refused(browser: Chromium, relay: SmtpRelay) -> None:
    with relay.smtp() as s:
        s.sendmail("shop@example.com", ["bob@held.test"], b"Subject: held\r\n\r\nx\r\n")
    (record,) = relay.wait_queue(lambda q: len(q) == 1)
    action = f"{relay.http_url}/api/v1/queue/{record['queue_id']}/delete"
    server, url = cross_site_server(
        f'<form method="post" action="{action}"><button>go</button></form>'
        "<script>document.forms[0].submit()</script>")
    try:
        asyncio.run(_cross_site(browser, url))
    finally:
        server.shutdown()
    assert [r["queue_id"] for r in relay.queue()] == [record["queue_id"]]


async def _cross_site(browser: Chromium, url: str) -> None:
    async with Page(browser.page_url()) as page:
        await page.navigate(url)
        text = await page.wait_text("forbidden")
        assert "cross-origin request from http://127.0.0.1:" in text
