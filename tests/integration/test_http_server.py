"""The daemon's HTTP listener (http_listen): off by default, on where told, and its guard.

Over real sockets against ``relay serve`` as a subprocess (the project's pytest plugin): the
health routes answer, a Host that does not name the server is refused (DNS rebinding), a
cross-origin request that would act is refused, and with ``http_listen`` empty nothing
listens.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable

from relay.testing import SmtpRelay

Factory = Callable[..., SmtpRelay]


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_health_routes_and_the_guard(smtp_relay_factory: Factory) -> None:
    relay = smtp_relay_factory(http=True)
    port = relay.http_port
    assert port
    relay.wait_log(f"http listening on 127.0.0.1:{port}")
    assert request(port, "GET", "/livez")[0] == 200
    assert request(port, "GET", "/readyz")[0] == 200
    assert request(port, "GET", "/livez", {"Host": f"localhost:{port}"})[0] == 200
    assert request(port, "GET", "/livez", {"Host": "relay.test"})[0] == 200  # $myhostname
    status, body = request(port, "GET", "/livez", {"Host": f"attacker.example:{port}"})
    assert status == 403
    assert b"does not name this server" in body
    status, body = request(port, "POST", "/livez", {"Origin": "http://attacker.example"})
    assert status == 403
    assert b"cross-origin" in body
    status, _ = request(port, "POST", "/livez", {"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert request(port, "POST", "/livez", {"Origin": "null"})[0] == 403
    assert request(port, "POST", "/livez", {"Origin": "null",
                                           "Sec-Fetch-Site": "same-origin"})[0] == 405
    # Same origin passes the guard and meets the route table (no POST route: 405).
    status, _ = request(port, "POST", "/livez", {"Origin": f"http://127.0.0.1:{port}"})
    assert status == 405


def test_no_http_listener_by_default(smtp_relay: SmtpRelay) -> None:
    smtp_relay.wait_log("daemon started")
    assert "http listening" not in smtp_relay.log()
    assert smtp_relay.http_port is None
    assert smtp_relay.command("postconf", "-h", "http_listen").stdout == b"\n"
