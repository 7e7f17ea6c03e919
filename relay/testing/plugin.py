"""The pytest plugin (entry point ``pytest11``): fixtures that run relay as a real SMTP peer.

    def test_signup_sends_a_welcome(smtp_relay):
        app.send_welcome("ann@example.com", smtp=(smtp_relay.host, smtp_relay.port))
        (message,) = smtp_relay.wait_for(1, match="to:ann@example.com")
        assert message["Subject"] == "Welcome"

Fixtures:

- ``smtp_relay``: a ``relay serve`` of its own for one test (relay.testing.SmtpRelay):
  capture mode, a private spool under ``tmp_path``, a free loopback port;
- ``smtp_relay_factory``: ``smtp_relay_factory(params={...}, faults=[...], http=True)``
  for tests that need their own main.cf, scripted faults at the next hop (relay.faults)
  or the HTTP read API; each relay it starts is stopped at the end of the test;
- ``smtp_relay_session``: one capturing relay for the whole session (call ``clear()``
  where a test needs an empty mailbox).

Installed with relay, so a project that has relay in its test environment needs no
import and no conftest.py.  The plugin module imports nothing heavy; a relay starts only
when a test asks for one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from relay.testing import FaultSpec, SmtpRelay

RelayFactory = Callable[..., SmtpRelay]


def _factory(base: Path) -> tuple[RelayFactory, list[SmtpRelay]]:
    started: list[SmtpRelay] = []

    def make(params: Mapping[str, str] | None = None, *, faults: FaultSpec | None = None,
             capture: bool = True, http: bool = False,
             env: Mapping[str, str] | None = None, main_cf: str | None = None) -> SmtpRelay:
        relay = SmtpRelay(base / f"relay{len(started)}", params, faults=faults,
                          capture=capture, http=http, env=env, main_cf=main_cf)
        started.append(relay)
        return relay.start()

    return make, started


@pytest.fixture
def smtp_relay_factory(tmp_path: Path) -> Iterator[RelayFactory]:
    """Start relays with their own parameters, faults or HTTP listener; all are stopped
    at the end of the test."""
    make, started = _factory(tmp_path / "smtp_relay")
    yield make
    for relay in started:
        relay.stop()


@pytest.fixture
def smtp_relay(smtp_relay_factory: RelayFactory) -> SmtpRelay:
    """A capturing relay for this test: ``host``, ``port``, ``messages``, ``wait_for()``,
    ``queue()``, ``log()``."""
    return smtp_relay_factory()


@pytest.fixture(scope="session")
def smtp_relay_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpRelay]:
    """One capturing relay for the whole test session."""
    relay = SmtpRelay(tmp_path_factory.mktemp("smtp_relay_session"))
    relay.start()
    yield relay
    relay.stop()


def pytest_report_header(config: Any) -> str:
    from relay import __version__

    return f"relay {__version__}: fixtures smtp_relay, smtp_relay_factory, smtp_relay_session"
