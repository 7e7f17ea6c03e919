"""postsuper against a running daemon: each action, its exact stderr, and what the daemon does next.

The daemon (a real ``relay serve`` subprocess) accepts mail over SMTP and defers it:
the next hop refuses connections and nothing is retried for an hour, so a message
stays in deferred/ until the test acts on it.  postsuper runs as the installed console
script.  Its stderr is compared byte for byte with Postfix 3.7's captured output
(postfix-reference/postsuper-*.txt), queue IDs substituted.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from spool import RcptState, Spool
from tests.support.daemon import RelayDaemon

pytestmark = pytest.mark.timeout(60)

HOLD_DELIVERY = {
    "transport_maps": "inline:{ * = smtp:[127.0.0.1]:1 }",
    "minimal_backoff_time": "1h",
    "maximal_backoff_time": "1h",
    "queue_run_delay": "1h",
}
QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")
QUEUED = re.compile(r"Ok: queued as (\S+)")

MakeDaemon = Callable[..., RelayDaemon]


def submit(d: RelayDaemon, count: int = 1, rcpts: tuple[str, ...] = ("bob@example.net",),
           sender: str = "alice@example.org") -> list[str]:
    ids = []
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test")
        for n in range(count):
            s.mail(sender)
            for rcpt in rcpts:
                s.rcpt(rcpt)
            code, text = s.data(f"Subject: test {n}\r\n\r\nhello {n}\r\n".encode())
            assert code == 250, text
            m = QUEUED.search(text.decode())
            assert m is not None
            ids.append(m.group(1))
    return ids


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.02)


def where(d: RelayDaemon, queue_id: str) -> list[str]:
    return [q for q in QUEUES if queue_id in d.queue_files(q)]


def deferred(d: RelayDaemon, count: int = 1, **kw: object) -> list[str]:
    """Submit mail and wait until every message is in deferred/."""
    ids = submit(d, count, **kw)  # type: ignore[arg-type]
    wait_until(lambda: all(where(d, i) == ["deferred"] for i in ids), what="deferral")
    return ids


def postsuper(d: RelayDaemon, *args: str, input: bytes | None = None) -> tuple[int, str]:
    r = d.run_cmd("postsuper", *args, input=input)
    assert r.stdout == b""
    return r.returncode, r.stderr.decode()


def activations(d: RelayDaemon, queue_id: str) -> int:
    return d.log().count(f"{queue_id}: from=<")


# Postfix 3.7.11's output, from postfix-reference/postsuper-{hold,release-requeue,
# delete-and-down}.txt, in the order the captures were taken.
POSTFIX_SESSION = (
    ("-h 4A9591602C1",
     "postsuper: 4A9591602C1: placed on hold\npostsuper: Placed on hold: 1 message\n"),
    ("-H 4A9591602C1",
     "postsuper: 4A9591602C1: released from hold\npostsuper: Released from hold: 1 message\n"),
    ("-r 2A61F1602A1",
     "postsuper: 2A61F1602A1: requeued\npostsuper: Requeued: 1 message\n"),
    ("-d 4A9591602C1",
     "postsuper: 4A9591602C1: removed\npostsuper: Deleted: 1 message\n"),
    ("-d ALL", "postsuper: Deleted: 2 messages\n"),
)


@pytest.fixture
def daemon(relay_daemon: MakeDaemon) -> RelayDaemon:
    return relay_daemon(HOLD_DELIVERY)


def test_matches_postfix_reference_output_byte_for_byte(daemon: RelayDaemon) -> None:
    a, b, c = deferred(daemon, 3)
    ids = {"4A9591602C1": a, "2A61F1602A1": b}
    for command, expected in POSTFIX_SESSION:
        args = [ids.get(arg, arg) for arg in command.split()]
        for ref, ours in ids.items():
            expected = expected.replace(ref, ours)
        assert postsuper(daemon, *args) == (0, expected), command
        if args[0] == "-h":
            assert where(daemon, a) == ["hold"]
    # "-d ALL" removed the other two, wherever the requeue had taken b meanwhile.
    assert all(not daemon.queue_files(q) for q in QUEUES)
    assert not any((daemon.queue_directory / "data" / i).exists() for i in (a, b, c))


def test_delete_removes_envelope_and_content(daemon: RelayDaemon) -> None:
    (qid,) = deferred(daemon)
    assert postsuper(daemon, "-d", qid) == (
        0, f"postsuper: {qid}: removed\npostsuper: Deleted: 1 message\n")
    assert where(daemon, qid) == []
    assert not (daemon.queue_directory / "data" / qid).exists()


def test_unknown_id_does_nothing_and_says_so(daemon: RelayDaemon) -> None:
    (qid,) = deferred(daemon)
    assert postsuper(daemon, "-d", "ABCDEF12345") == (0, "postsuper: Deleted: 0 messages\n")
    assert postsuper(daemon, "-H", qid) == (0, "postsuper: Released from hold: 0 messages\n")
    assert where(daemon, qid) == ["deferred"]


def test_invalid_id_is_warned_about(daemon: RelayDaemon) -> None:
    (qid,) = deferred(daemon)
    assert postsuper(daemon, "-d", "foo/bar") == (
        0, "postsuper: warning: invalid mail queue id: foo/bar\npostsuper: Deleted: 0 messages\n")
    assert postsuper(daemon, "-d", "../" + qid)[1].startswith(
        f"postsuper: warning: invalid mail queue id: ../{qid}\n")
    assert where(daemon, qid) == ["deferred"]


def test_ids_from_stdin(daemon: RelayDaemon) -> None:
    a, b, c = deferred(daemon, 3)
    # One per line, not trimmed: what "mailq | ... | tr -d '*!' | postsuper -d -" feeds it.
    code, err = postsuper(daemon, "-h", "-", input=f"{a}\n{b}\n".encode())
    assert code == 0
    assert err == (f"postsuper: {a}: placed on hold\npostsuper: {b}: placed on hold\n"
                   "postsuper: Placed on hold: 2 messages\n")
    assert where(daemon, a) == where(daemon, b) == ["hold"]
    assert where(daemon, c) == ["deferred"]


def test_all_prints_no_per_message_lines(daemon: RelayDaemon) -> None:
    deferred(daemon, 3)
    assert postsuper(daemon, "-h", "ALL") == (0, "postsuper: Placed on hold: 3 messages\n")
    assert len(daemon.queue_files("hold")) == 3
    # "all" in lower case is not ALL: it is a queue ID that does not exist.
    assert postsuper(daemon, "-d", "all") == (0, "postsuper: Deleted: 0 messages\n")
    assert len(daemon.queue_files("hold")) == 3


def test_queue_names_limit_the_action(daemon: RelayDaemon) -> None:
    a, b = deferred(daemon, 2)
    postsuper(daemon, "-h", a)
    assert postsuper(daemon, "-d", "ALL", "deferred") == (0, "postsuper: Deleted: 1 message\n")
    assert where(daemon, a) == ["hold"]
    assert where(daemon, b) == []
    assert postsuper(daemon, "-d", a, "deferred") == (0, "postsuper: Deleted: 0 messages\n")
    assert where(daemon, a) == ["hold"]
    assert postsuper(daemon, "-d", "ALL", "nosuchqueue") == (
        1, "postsuper: fatal: invalid directory name: nosuchqueue\n")


def test_options_run_in_order_and_summaries_in_postfix_order(daemon: RelayDaemon) -> None:
    a, b, c = deferred(daemon, 3)
    code, err = postsuper(daemon, "-h", a, "-d", b, "-r", c, "-H", a)
    assert code == 0
    assert err == (f"postsuper: {a}: placed on hold\n"
                   f"postsuper: {b}: removed\n"
                   f"postsuper: {c}: requeued\n"
                   f"postsuper: {a}: released from hold\n"
                   "postsuper: Requeued: 1 message\n"
                   "postsuper: Deleted: 1 message\n"
                   "postsuper: Placed on hold: 1 message\n"
                   "postsuper: Released from hold: 1 message\n")


def test_hold_then_release_records_held_time_and_is_due_at_once(daemon: RelayDaemon) -> None:
    (qid,) = deferred(daemon)
    before = activations(daemon, qid)
    postsuper(daemon, "-h", qid)
    time.sleep(1.2)
    assert activations(daemon, qid) == before  # held mail is never tried
    assert postsuper(daemon, "-H", qid)[0] == 0
    # The backoff is an hour, yet the released message is tried within seconds.
    wait_until(lambda: activations(daemon, qid) == before + 1, what="a new attempt")
    wait_until(lambda: where(daemon, qid) == ["deferred"], what="deferral")
    env = Spool(str(daemon.queue_directory), create=False).read("deferred", qid)
    assert 1.0 <= env.held_seconds < 30  # and so it does not count towards expiry


def test_requeue_is_tried_again_within_seconds(daemon: RelayDaemon) -> None:
    (qid,) = deferred(daemon)
    before = daemon.log().count(f"{qid}: to=<bob@example.net>")
    assert postsuper(daemon, "-r", qid) == (
        0, f"postsuper: {qid}: requeued\npostsuper: Requeued: 1 message\n")
    wait_until(lambda: daemon.log().count(f"{qid}: to=<bob@example.net>") == before + 1,
               timeout=5, what="a new delivery attempt")
    wait_until(lambda: where(daemon, qid) == ["deferred"], what="deferral")


def test_requeue_keeps_delivered_recipients_done(daemon: RelayDaemon) -> None:
    (qid,) = deferred(daemon, rcpts=("bob@example.net", "carol@example.net"))
    spool = Spool(str(daemon.queue_directory), create=False)
    # As if bob had been delivered in an earlier attempt.
    postsuper(daemon, "-h", qid)
    with spool.locked(qid, ("hold",)) as entry:
        env = entry.read()
        bob, carol = env.recipients
        entry.write(env.with_recipients((replace(bob, state=RcptState.SENT), carol)),
                    mtime=entry.mtime())
    postsuper(daemon, "-r", qid)
    wait_until(lambda: daemon.log().count(f"{qid}: to=<carol@example.net>") == 2,
               what="carol tried again")
    wait_until(lambda: where(daemon, qid) == ["deferred"], what="deferral")
    assert daemon.log().count(f"{qid}: to=<bob@example.net>") == 1
    env = spool.read("deferred", qid)
    assert [r.state for r in env.recipients] == [RcptState.SENT, RcptState.PENDING]


def test_force_expire_and_release_returns_the_message(daemon: RelayDaemon) -> None:
    (qid,) = deferred(daemon)
    postsuper(daemon, "-h", qid)
    assert postsuper(daemon, "-f", qid) == (0, (
        f"postsuper: {qid}: expired\npostsuper: {qid}: released from hold\n"
        "postsuper: Force-expired: 1 message\npostsuper: Released from hold: 1 message\n"))
    daemon.wait_log(f"{qid}: from=<alice@example.org>, status=expired, returned to sender")
    wait_until(lambda: where(daemon, qid) == [], what="removal")


def test_expire_marks_without_moving(daemon: RelayDaemon) -> None:
    (qid,) = deferred(daemon)
    spool = Spool(str(daemon.queue_directory), create=False)
    due = spool.mtime("deferred", qid)
    assert postsuper(daemon, "-e", qid) == (
        0, f"postsuper: {qid}: expired\npostsuper: Force-expired: 1 message\n")
    assert where(daemon, qid) == ["deferred"]
    assert spool.read("deferred", qid).forced_expire
    assert spool.mtime("deferred", qid) == due  # still waits for its next attempt


def test_works_without_the_daemon_and_logs_to_the_maillog(relay_daemon: MakeDaemon) -> None:
    d = relay_daemon(HOLD_DELIVERY)
    a, b = deferred(d, 2)
    d.stop()
    assert postsuper(d, "-H", a) == (0, "postsuper: Released from hold: 0 messages\n")
    assert postsuper(d, "-r", a)[0] == 0  # the scan request finds nobody: not an error
    assert where(d, a) == ["incoming"]
    assert re.search(rf"relay/postsuper\[\d+\]: {a}: requeued$", d.log(), re.MULTILINE)
    d.start()
    wait_until(lambda: where(d, a) == ["deferred"], what="the requeued message tried at start")
    assert where(d, b) == ["deferred"]


USAGE = ("postsuper: fatal: usage: postsuper [-c config_dir] [-d queue_id (delete)]"
         " [-e queue_id (expire)] [-f queue_id (expire and/or un-hold)] [-h queue_id (hold)]"
         " [-H queue_id (un-hold)] [-p (purge temporary files)] [-r queue_id (requeue)]"
         " [-s (structure fix)] [-S (redundant structure fix)][-v (verbose)] [queue...]\n")


def test_usage_errors(daemon: RelayDaemon) -> None:
    """As Postfix 3.7.11 (FORMATS.md 1.4): getopt's line without a level, then the usage
    line (no space before [-v), exit 1; options end at the first queue name."""
    assert postsuper(daemon, "-x") == (1, "postsuper: invalid option -- 'x'\n" + USAGE)
    assert postsuper(daemon, "-d") == (
        1, "postsuper: option requires an argument -- 'd'\n" + USAGE)
    assert postsuper(daemon, "-x", "-d") == (1, "postsuper: invalid option -- 'x'\n" + USAGE)
    assert postsuper(daemon, "deferred", "-d", "ALL") == (
        1, "postsuper: fatal: invalid directory name: -d\n")
