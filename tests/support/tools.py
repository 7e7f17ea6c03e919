"""Real third-party tools the tests use as peers and yardsticks (Postfix, swaks, nmap, ...).

A test that needs one asks ``require()`` for it.  On a developer's machine without the tool
the test is skipped with the reason; in CI, where ``.ci/run`` installs every tool and sets
``RELAY_REQUIRE_TOOLS=1``, a missing tool fails the test instead, so a broken install can
never turn the suite green.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

REQUIRE_ENV = "RELAY_REQUIRE_TOOLS"


def required() -> bool:
    """True where a missing tool is a failure (CI), not a reason to skip."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def missing(reason: str) -> NoReturn:
    """Skip the test for ``reason``, or fail it where tools are required."""
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set: every tool must be installed)",
                    pytrace=False)
    pytest.skip(reason)


def require(name: str, *candidates: str) -> str:
    """The path of program ``name`` (found on PATH, else at one of ``candidates``), or
    skip/fail the test saying it is not installed."""
    found = shutil.which(name)
    if found:
        return found
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    missing(f"{name} is not installed")
