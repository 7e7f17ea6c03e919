"""``relay queue``: filters, listings, bulk actions and pauses against a running daemon.

A real ``relay serve`` subprocess defers mail for an hour: example.net and
sub.example.net go to a closed port (``Connection refused``), example.com to a
scripted peer that answers 450 at RCPT (``mailbox busy``).  ``relay queue`` runs as
the installed ``relay`` script.  Pause tests relay to an accepting peer instead.
"""

from __future__ import annotations

import io
import json
import re
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from relay.cli import queue as queue_cli
from spool import Spool
from tests.support.daemon import RelayDaemon
from tests.support.peers import PeerScript, Reply, ThreadedPeer

pytestmark = pytest.mark.timeout(60)

MakeDaemon = Callable[..., RelayDaemon]
PeerFactory = Callable[..., ThreadedPeer]
QUEUED = re.compile(r"Ok: queued as (\S+)")
QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")
SLOW = {"minimal_backoff_time": "1h", "maximal_backoff_time": "1h", "queue_run_delay": "1h"}


def relay_queue(d: RelayDaemon, *args: str) -> tuple[int, str, str]:
    script = Path(sys.executable).parent / "relay"
    r = subprocess.run([str(script), "queue", "-c", str(d.config_dir), *args],
                       capture_output=True, env=d.env, timeout=60, check=False)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def submit(d: RelayDaemon, sender: str, *rcpts: str) -> str:
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail(sender)
        for rcpt in rcpts:
            s.rcpt(rcpt)
        code, text = s.data(b"Subject: test\r\n\r\nhello\r\n")
        assert code == 250, text
    m = QUEUED.search(text.decode())
    assert m is not None
    return m.group(1)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def where(d: RelayDaemon, queue_id: str) -> list[str]:
    return [q for q in QUEUES if queue_id in d.queue_files(q)]


def listed(d: RelayDaemon, *filters: str) -> set[str]:
    code, out, err = relay_queue(d, "ls", "--json", *filters)
    assert code == 0, err
    return {json.loads(line)["queue_id"] for line in out.splitlines()}


@dataclass
class Scene:
    d: RelayDaemon
    net: str  # alice -> bob@example.net, refused
    sub: str  # carol -> dave@sub.example.net, refused
    com: str  # alice -> erin@example.com (busy) + frank@example.net (refused)
    old: str  # <> -> gina@example.net, two days old


@pytest.fixture
def scene(relay_daemon: MakeDaemon, threaded_peer: PeerFactory) -> Scene:
    busy = threaded_peer(PeerScript(rcpt=Reply(450, "4.2.0 mailbox busy")))
    d = relay_daemon({**SLOW, "transport_maps":
                      f"inline:{{ example.com = smtp:[127.0.0.1]:{busy.port}, "
                      "* = smtp:[127.0.0.1]:1 }"})
    s = Scene(d, submit(d, "alice@example.org", "bob@example.net"),
              submit(d, "carol@example.org", "dave@sub.example.net"),
              submit(d, "alice@example.org", "erin@example.com", "frank@example.net"),
              submit(d, "postmaster@example.org", "gina@example.net"))
    ids = (s.net, s.sub, s.com, s.old)
    wait_until(lambda: all(where(d, i) == ["deferred"] for i in ids), what="deferral")
    wait_until(lambda: d.log().count("status=deferred") >= 5, what="all attempts logged")
    spool = Spool(str(d.queue_directory), create=False)
    with spool.locked(s.old, ("deferred",)) as entry:
        env = entry.read()
        # An old bounce: two days in the queue, the null sender.
        entry.write(replace(env, sender="", arrival_time=env.arrival_time - 2 * 86400),
                    mtime=entry.mtime())
    return s


def test_ls_is_the_mailq_format(scene: Scene) -> None:
    code, out, _ = relay_queue(scene.d, "ls")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"
    assert lines[-1].startswith("-- 0 Kbytes in 4 Requests.")
    assert "MAILER-DAEMON" in out
    assert re.search(r"^ +\(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:1: Connection refused\)$",
                     out, re.MULTILINE)
    code, out, _ = relay_queue(scene.d, "ls", "--sender", "nobody@example.org")
    assert (code, out) == (0, "Mail queue is empty\n")


def test_ls_json_is_postqueue_j(scene: Scene) -> None:
    _, out, _ = relay_queue(scene.d, "ls", "--json", "--rcpt", "erin@example.com")
    (obj,) = [json.loads(line) for line in out.splitlines()]
    assert list(obj) == ["queue_name", "queue_id", "arrival_time", "message_size",
                         "forced_expire", "sender", "recipients"]
    assert obj["queue_id"] == scene.com and obj["queue_name"] == "deferred"
    assert [r["address"] for r in obj["recipients"]] == ["erin@example.com", "frank@example.net"]
    assert "mailbox busy" in obj["recipients"][0]["delay_reason"]


def test_each_filter(scene: Scene) -> None:
    s = scene
    assert listed(s.d) == {s.net, s.sub, s.com, s.old}
    assert listed(s.d, "--queue", "deferred") == {s.net, s.sub, s.com, s.old}
    assert listed(s.d, "--queue", "hold") == set()
    assert listed(s.d, "--domain", "example.net") == {s.net, s.com, s.old}
    assert listed(s.d, "--domain", "EXAMPLE.COM.") == {s.com}
    assert listed(s.d, "--domain", ".example.net") == {s.sub}  # subdomains only
    assert listed(s.d, "--sender", "ALICE@example.org") == {s.net, s.com}
    assert listed(s.d, "--sender", "<>") == {s.old}
    assert listed(s.d, "--rcpt", "dave@sub.example.net") == {s.sub}
    assert listed(s.d, "--age-min", "1d") == {s.old}
    assert listed(s.d, "--age-max", "2h") == {s.net, s.sub, s.com}
    assert listed(s.d, "--reason", "MAILBOX BUSY") == {s.com}
    assert listed(s.d, "--reason", "connection refused") == {s.net, s.sub, s.com, s.old}


def test_filters_combine(scene: Scene) -> None:
    s = scene
    assert listed(s.d, "--sender", "alice@example.org", "--domain", "example.net") == {
        s.net, s.com}
    # Recipient filters must hold for one recipient: erin is busy but not at example.net.
    assert listed(s.d, "--domain", "example.net", "--reason", "busy") == set()
    assert listed(s.d, "--domain", "example.com", "--reason", "busy") == {s.com}
    assert listed(s.d, "--domain", "example.com", "--domain", "sub.example.net") == {
        s.com, s.sub}
    assert listed(s.d, "--age-min", "1h", "--sender", "alice@example.org") == set()


def test_bad_time_value_names_the_option(scene: Scene) -> None:
    code, out, err = relay_queue(scene.d, "ls", "--age-min", "2x")
    assert code == 64 and out == ""
    assert err.startswith("relay queue: fatal: argument --age-min: bad time value: '2x'")


def test_hold_release_delete_with_counts(scene: Scene) -> None:
    s = scene
    code, out, _ = relay_queue(s.d, "hold", "--sender", "alice@example.org")
    assert code == 0
    lines = out.splitlines()
    assert sorted(lines[:-1]) == sorted([f"{s.net}: placed on hold", f"{s.com}: placed on hold"])
    assert lines[-1] == "Placed on hold: 2 messages"
    assert where(s.d, s.net) == where(s.d, s.com) == ["hold"]
    assert listed(s.d, "--queue", "hold") == {s.net, s.com}

    code, out, _ = relay_queue(s.d, "release", "--rcpt", "bob@example.net")
    assert (code, out) == (0, f"{s.net}: released from hold\nReleased from hold: 1 message\n")
    wait_until(lambda: where(s.d, s.net) == ["deferred"], what="release and retry")

    code, out, _ = relay_queue(s.d, "delete", "--queue", "hold")
    assert (code, out) == (0, f"{s.com}: removed\nDeleted: 1 message\n")
    assert where(s.d, s.com) == []
    code, out, _ = relay_queue(s.d, "delete", "--rcpt", "nobody@example.net")
    assert (code, out) == (0, "Deleted: 0 messages\n")


def test_delete_without_a_filter_refuses(scene: Scene) -> None:
    code, out, err = relay_queue(scene.d, "delete")
    assert code == 64 and out == ""
    assert "relay queue: fatal: delete with no filter would remove every message" in err
    assert "--all" in err
    assert len(scene.d.queue_files("deferred")) == 4
    code, out, _ = relay_queue(scene.d, "delete", "--all")
    assert code == 0 and out.endswith("Deleted: 4 messages\n")
    assert all(not scene.d.queue_files(q) for q in QUEUES)


def test_retry_makes_deferred_mail_due_and_asks_the_daemon(scene: Scene) -> None:
    s = scene
    before = s.d.log().count(f"{s.sub}: from=<")
    code, out, err = relay_queue(s.d, "retry", "--domain", "sub.example.net")
    assert (code, out, err) == (0, f"{s.sub}: requeued\nRequeued: 1 message\n", "")
    wait_until(lambda: s.d.log().count(f"{s.sub}: from=<") == before + 1, timeout=5,
               what="a new attempt")
    relay_queue(s.d, "hold", "--rcpt", "bob@example.net")
    code, out, _ = relay_queue(s.d, "retry", "--rcpt", "bob@example.net")
    assert (code, out) == (0, "Requeued: 0 messages\n")  # held mail stays held
    assert where(s.d, s.net) == ["hold"]


def test_summary(scene: Scene) -> None:
    s = scene
    relay_queue(s.d, "hold", "--sender", "<>")
    code, out, _ = relay_queue(s.d, "summary")
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["deferred"][:2] == ["3", "4"]
    assert rows["hold"][:3] == ["1", "1", "2d"]
    assert rows["incoming"] == ["0", "0", "-"]
    assert rows["example.net"] == ["3", "3"]
    assert rows["example.com"] == ["1", "1"]
    assert rows["sub.example.net"] == ["1", "1"]
    lines = out.splitlines()
    assert lines[0].split() == ["QUEUE", "MESSAGES", "RECIPIENTS", "OLDEST"]
    dest_rows = lines[lines.index("") + 2:]
    assert dest_rows[0].split()[0] == "example.net"  # most recipients first
    code, out, _ = relay_queue(s.d, "summary", "--json")
    obj = json.loads(out)
    assert obj["queues"]["hold"]["oldest_age"] >= 2 * 86400
    assert obj["destinations"]["example.com"] == {"messages": 1, "recipients": 1}


def test_pause_defers_survives_restart_and_resume_delivers(
        relay_daemon: MakeDaemon, threaded_peer: PeerFactory) -> None:
    sink = threaded_peer()
    d = relay_daemon({**SLOW, "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}"})
    assert relay_queue(d, "pause", "Example.NET")[:2] == (0, "example.net: paused\n")
    first = submit(d, "alice@example.org", "bob@example.net")
    submit(d, "alice@example.org", "carol@example.com")
    sink.wait_for(1)
    d.wait_log(f"{first}: to=<bob@example.net>, relay=none")
    assert re.search(rf"{first}: to=<bob@example.net>, .*status=deferred \(destination paused\)",
                     d.log())
    wait_until(lambda: where(d, first) == ["deferred"], what="deferral")
    (obj,) = [json.loads(x) for x in relay_queue(d, "ls", "--json")[1].splitlines()]
    assert obj["recipients"] == [{"address": "bob@example.net",
                                  "delay_reason": "destination paused"}]

    d.stop()
    d.start()
    assert relay_queue(d, "paused")[1] == "example.net\n"
    second = submit(d, "alice@example.org", "dave@example.net")
    d.wait_log(f"{second}: to=<dave@example.net>, relay=none")
    assert "status=deferred (destination paused)" in d.log().split(f"{second}: to=")[1]
    assert len(sink.messages) == 1

    assert relay_queue(d, "resume", "example.net") == (0, "example.net: resumed\n", "")
    resumed = time.monotonic()
    sink.wait_for(3, timeout=5)
    assert time.monotonic() - resumed < 1.0  # "tried within a second of resume"
    assert sorted(r for m in sink.messages for r in m.recipients) == [
        "bob@example.net", "carol@example.com", "dave@example.net"]
    assert relay_queue(d, "paused")[1] == ""
    assert relay_queue(d, "resume", "example.net")[1] == "example.net: already not paused\n"


def test_pause_a_next_hop(relay_daemon: MakeDaemon,
                          threaded_peer: PeerFactory) -> None:
    sink = threaded_peer()
    d = relay_daemon({**SLOW, "transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{sink.port} }}"})
    assert relay_queue(d, "pause", "--nexthop", f"[127.0.0.1]:{sink.port}")[1] == (
        "nexthop:127.0.0.1: paused\n")
    qid = submit(d, "alice@example.org", "bob@example.org")
    d.wait_log(f"{qid}: to=<bob@example.org>, relay=none")
    assert "(destination paused)" in d.log()
    assert relay_queue(d, "resume", "--nexthop", "127.0.0.1")[1] == "nexthop:127.0.0.1: resumed\n"
    sink.wait_for(1, timeout=5)


def test_pause_with_the_daemon_down_takes_effect_at_start(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(SLOW, start=False)
    code, out, err = relay_queue(d, "pause", "example.net")
    assert (code, out) == (0, "example.net: paused\n")
    assert "mail system is down" in err
    d.start()
    qid = submit(d, "alice@example.org", "bob@example.net")
    d.wait_log(f"{qid}: to=<bob@example.net>, relay=none")
    assert "(destination paused)" in d.log()


def test_usage(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(SLOW, start=False)
    assert relay_queue(d)[0] == 64
    assert relay_queue(d, "pause")[0] == 64
    assert relay_queue(d, "pause", "example.net", "--nexthop", "x")[0] == 64
    assert relay_queue(d, "pause", "user@example.net")[0] == 64
    assert relay_queue(d, "ls", "--queue", "nosuch")[0] == 64


def test_retry_forgets_a_dead_destination(relay_daemon) -> None:  # type: ignore[no-untyped-def]
    """A refused connection marks the destination dead for minimal_backoff_time (an
    hour here); `relay queue retry` tries its mail now, as postqueue -f would."""
    from tests.support.daemon import free_port

    port = free_port()  # nothing listens here yet: the next hop is down
    d = relay_daemon({"transport_maps": f"inline:{{ * = smtp:[127.0.0.1]:{port} }}",
                      "minimal_backoff_time": "1h", "maximal_backoff_time": "2h",
                      "queue_run_delay": "1h"})
    # Failed connections count in cohorts (Postfix's failed_cohort_limit): a few
    # messages' worth of refusals and the destination is dead.
    rcpts: list[str] = []
    for i in range(8):
        rcpts.append(f"r{i}@example.net")
        queue_id = submit(d, "alice@example.org", rcpts[-1])
        d.wait_log(f"{queue_id}: to=<{rcpts[-1]}>, relay=none")
        if "delivery temporarily suspended" in d.log().split(f"{queue_id}: to=")[1]:
            break
    else:
        raise AssertionError("the destination never became dead:\n" + d.log())
    with ThreadedPeer(port=port) as sink:
        code, out, _ = relay_queue(d, "retry", "--domain", "example.net")
        assert code == 0, out
        sink.wait_for(len(rcpts), timeout=5)
        assert sorted(r for m in sink.messages for r in m.recipients) == sorted(rcpts)


@pytest.mark.parametrize("argv", [["retry"], ["hold", "--sender", "a@example.org"],
                                  ["release"], ["delete", "--all"]])
def test_actions_on_a_missing_spool(tmp_path: Path, argv: list[str]) -> None:
    """An action on a queue directory that does not exist: Postfix's words, exit 1, no
    traceback (the listings show an empty queue)."""
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/nowhere\n")
    out, err = io.StringIO(), io.StringIO()
    assert queue_cli.main(["-c", str(tmp_path), *argv], stdout=out, stderr=err) == 1
    assert (out.getvalue(), err.getvalue()) == (
        "", f"relay queue: fatal: chdir {tmp_path}/nowhere: No such file or directory\n")
