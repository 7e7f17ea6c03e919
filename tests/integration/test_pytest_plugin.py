"""The pytest plugin as another project meets it: installed with relay (entry point pytest11),
loaded with no import and no conftest.py, its fixtures on free ports without a race, and its
daemons gone after the tests.  The README's example suite is a file of the repository that
the README shows verbatim; here it runs, from a directory of its own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.testing import RelayError, SmtpRelay

pytestmark = pytest.mark.timeout(240)
Factory = Callable[..., SmtpRelay]
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pytest" / "test_mail.py"


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest in ``directory``, as another project runs it: no PYTHONPATH, and relay's
    checkout neither the working directory nor on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAIL_CONFIG")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *args], cwd=directory, env=env, capture_output=True, text=True,
                          timeout=200, check=False)


def test_readme_shows_the_example_suite_verbatim() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Using it in tests (pytest)"):]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert block is not None
    assert block.group(1) == EXAMPLE.read_text()


def test_the_example_suite_passes_with_the_installed_plugin(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "test_mail.py")
    r = run_pytest(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"\b8 passed\b", r.stdout), r.stdout
    r = run_pytest(tmp_path, "--co", "-v")  # -v cancels -q: the header shows
    assert "relay 0.1.0: fixtures smtp_relay, smtp_relay_factory, smtp_relay_session" in r.stdout


def test_daemons_are_gone_after_the_tests(tmp_path: Path) -> None:
    (tmp_path / "test_pids.py").write_text(
        "from pathlib import Path\n\n"
        "def test_one(smtp_relay, smtp_relay_session, smtp_relay_factory):\n"
        "    other = smtp_relay_factory(faults=[])\n"
        "    pids = [smtp_relay.pid, smtp_relay_session.pid, other.pid]\n"
        "    Path('pids').write_text(' '.join(map(str, pids)))\n")
    r = run_pytest(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(set(pids)) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_each_relay_has_its_own_port_and_spool(smtp_relay_factory: Factory) -> None:
    one, two = smtp_relay_factory(), smtp_relay_factory()
    assert one.port and two.port and one.port != two.port
    assert one.queue_directory != two.queue_directory
    for relay in (one, two):
        with relay.smtp() as s:
            assert s.noop()[0] == 250
    assert f"listening on 127.0.0.1:{one.port}" in one.log()


def test_a_relay_that_cannot_start_says_why(smtp_relay_factory: Factory) -> None:
    with pytest.raises(RelayError, match=r"unknown parameter relay_host \(did you mean "
                                         r"relayhost\?\)"):
        smtp_relay_factory({"relay_host": "[smtp.example.com]"})


def test_wait_for_says_what_it_saw(smtp_relay: SmtpRelay) -> None:
    with smtp_relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], b"Subject: one\r\n\r\nx\r\n")
    smtp_relay.wait_for(1)
    with pytest.raises(RelayError, match=r"0 of 1 message matching 'subject:two' delivered "
                                         r"after 0.3s; the maillog ends:\n(.|\n)*status=sent"):
        smtp_relay.wait_for(1, timeout=0.3, match="subject:two")
