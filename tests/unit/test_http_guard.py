"""relay.http.server.host_allowed: which Host headers name this server (no DNS rebinding)."""

from __future__ import annotations

import pytest

from relay.http.server import host_allowed


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:8025", True), ("127.0.0.1", True), ("[::1]:8025", True), ("[::1]", True),
    ("192.0.2.7:80", True), ("localhost:8025", True), ("LOCALHOST", True),
    ("app.localhost:8025", True), ("relay.example.com", True), ("relay.example.com.:8025", True),
    ("evil.example", False), ("localhost.evil.example", False), ("", False),
    ("127.0.0.1.nip.io", False), ("[::1", False),
])
def test_host_allowed(host: str, allowed: bool) -> None:
    assert host_allowed(host, "relay.example.com") is allowed
