"""conf/relay-alerts.yml: valid for Prometheus (``promtool check rules``), each alert firing on
the series that should fire it and quiet on healthy ones (``promtool test rules`` with
tests/promtool/relay-alerts.test.yml), and naming only metrics relay exports."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from relay import metrics
from relay.outcome import Report, Status
from spool import Spool
from tests.support.tools import require

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "conf" / "relay-alerts.yml"
RULE_TESTS = REPO / "tests" / "promtool" / "relay-alerts.test.yml"


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    binary = require("promtool")
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          check=False)


def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def test_promtool_test_rules() -> None:
    done = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_would_catch_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("relay_up{process=\"qmgr\"} == 0",
                                                "relay_up{process=\"qmgr\" == 0"))
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_rules_name_only_exported_metrics(tmp_path: Path) -> None:
    class Scheduler:
        destinations: dict[str, object] = {}  # noqa: RUF012 - a stand-in

        class clock:
            @staticmethod
            def time() -> float:
                return time.time()

    qmgr = metrics.QmgrMetrics(Scheduler(), domain_limit=5)  # type: ignore[arg-type]
    now = time.time()
    qmgr(Report(Status.SENT, now, "ID", "", "a@b.test", "none", "2.0.0", "ok", now))
    exposition = metrics.ListenerMetrics(Spool(str(tmp_path / "spool"))).exposition(
        qmgr.exposition()).decode()
    exported = set(re.findall(r"^# TYPE (\w+) ", exposition, re.MULTILINE))
    exported |= {"relay_destination_dead"}  # only while a destination is tracked
    used = set(re.findall(r"\b(relay_\w+)", RULES.read_text())) - {"relay_metrics_domain_limit"}
    assert used and used <= exported, used - exported
