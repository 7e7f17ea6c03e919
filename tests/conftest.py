"""Shared fixtures: the daemon as a subprocess, scripted SMTP peers, a loopback DNS server."""

from tests.support.daemon import relay_daemon  # noqa: F401
from tests.support.peers import threaded_peer  # noqa: F401

pytest_plugins: list[str] = []
