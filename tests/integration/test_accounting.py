"""accounting_log: one CSV row per recipient outcome, one per maillog ``to=`` line (and one per
expired recipient), each row on one line whatever the reply says, reopened on SIGHUP.

The daemon runs as a subprocess; a scripted next hop accepts one recipient, defers one and
refuses one, with reply texts full of commas and quotes; an ``error:`` route bounces one
more; ``postsuper -e`` expires what is left.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from relay.accounting import HEADER
from tests.support.daemon import RelayDaemon
from tests.support.peers import PeerScript, Reply

pytestmark = pytest.mark.timeout(90)

MakeDaemon = Callable[..., RelayDaemon]
NASTY_DEFER = '450 4.2.0 <later@dest.example>: "mailbox busy", try again, later'
NASTY_BOUNCE = '550 5.1.1 <nobody@dest.example>: "no such user", sorry, "really"'


def rows(path: Any) -> list[dict[str, str]]:
    text = path.read_text()
    lines = text.splitlines()
    parsed = list(csv.reader(io.StringIO(text)))
    assert len(parsed) == len(lines), "a row spans more than one line"
    assert tuple(parsed[0]) == HEADER
    return [dict(zip(HEADER, row, strict=True)) for row in parsed[1:]]


def send(d: RelayDaemon, *recipients: str) -> str:
    import smtplib

    with smtplib.SMTP(d.host, d.port, timeout=10) as smtp:
        smtp.sendmail("sender@client.example", list(recipients),
                      b"Subject: accounting\r\n\r\nhello\r\n")
    queue_id = re.findall(r": ([0-9A-F]+): client=", d.log())[-1]
    return queue_id


def test_one_row_per_outcome_and_reopened_on_sighup(relay_daemon: MakeDaemon,
                                                   threaded_peer: Any) -> None:
    peer = threaded_peer(PeerScript(rcpt_by_address={
        "later@dest.example": Reply(450, NASTY_DEFER[4:]),
        "nobody@dest.example": Reply(550, NASTY_BOUNCE[4:]),
    }))
    d = relay_daemon({
        "transport_maps": (f"inline:{{ {{bounce.example = error:5.1.2 no, \"such\" domain}}, "
                           f"* = smtp:[127.0.0.1]:{peer.port} }}"),
        "minimal_backoff_time": "1h", "maximal_backoff_time": "1h", "queue_run_delay": "1h",
    }, start=False)
    acct = d.base / "acct.csv"
    d.write_config(accounting_log=str(acct))
    d.start()
    queue_id = send(d, "ok@dest.example", "later@dest.example", "nobody@dest.example",
                    "x@bounce.example")
    d.wait_log(f"{queue_id}: to=<later@dest.example>")
    d.wait_log(f"{queue_id}: to=<x@bounce.example>")
    time.sleep(0.3)
    got = [r for r in rows(acct) if r["queue_id"] == queue_id]
    by_rcpt = {r["recipient"]: r for r in got}
    assert set(by_rcpt) == {"ok@dest.example", "later@dest.example", "nobody@dest.example",
                            "x@bounce.example"}
    ok, later, nobody, bounced = (by_rcpt[a] for a in ("ok@dest.example", "later@dest.example",
                                                       "nobody@dest.example",
                                                       "x@bounce.example"))
    assert ok["type"] == "d" and ok["dsn"] == "2.0.0"
    assert ok["remote_host"] == f"127.0.0.1[127.0.0.1]:{peer.port}"
    assert ok["reply"].startswith("250 2.0.0 Ok: queued as ")
    assert later["type"] == "t" and later["dsn"] == "4.2.0"
    assert NASTY_DEFER in later["reply"]
    assert nobody["type"] == "b" and nobody["dsn"] == "5.1.1" and NASTY_BOUNCE in nobody["reply"]
    assert bounced["type"] == "b" and bounced["remote_host"] == ""
    assert bounced["reply"] == 'no, "such" domain'
    for row in got:
        assert row["queue_id"] == queue_id and row["sender"] == "sender@client.example"
        assert row["domain"] == row["recipient"].rpartition("@")[2]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", row["time"])
    # The bounce notice to the sender is a message of its own, with its own row.
    d.wait_log("to=<sender@client.example>")
    time.sleep(0.3)
    assert [r["type"] for r in rows(acct) if r["recipient"] == "sender@client.example"]

    # logrotate's way: move the file away, then SIGHUP (relay reload).
    rotated = d.base / "acct.csv.1"
    acct.rename(rotated)
    d.hup()
    d.wait_log("reload -- configuration")
    assert d.run_cmd("postsuper", "-e", queue_id).returncode == 0
    assert d.run_cmd("postqueue", "-i", queue_id).returncode == 0
    d.wait_log(f"{queue_id}: from=<sender@client.example>, status=expired, returned to sender",
               timeout=15)
    time.sleep(0.3)
    fresh = rows(acct)
    assert [(r["type"], r["recipient"]) for r in fresh if r["queue_id"] == queue_id] == [
        ("t", "later@dest.example"), ("f", "later@dest.example")]
    assert not any(r["queue_id"] == queue_id and r["type"] == "f" for r in rows(rotated))

    # Every to= line of the maillog has its row, in the same order.
    logged = re.findall(r": ([0-9A-F]+): to=<([^>]*)>, .*? dsn=([\d.]+), status=(\w+)", d.log())
    accounted = [(r["queue_id"], r["recipient"], r["dsn"], r["type"])
                 for r in rows(rotated) + rows(acct) if r["type"] != "f"]
    kinds = {"sent": "d", "deferred": "t", "bounced": "b"}
    assert accounted == [(q, a, dsn, kinds[s]) for q, a, dsn, s in logged]


def test_unwritable_accounting_log_is_fatal(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(start=False)
    blocker = d.base / "a-file"
    blocker.write_text("")
    d.write_config(accounting_log=str(blocker / "acct.csv"))
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(20) != 0
    err = d.stderr()
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("relay: fatal:")] == [
        f"relay: fatal: accounting_log: open {blocker}/acct.csv: {blocker} is not a directory"]
