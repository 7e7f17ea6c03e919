"""Golden tests: the commands' output against Postfix 3.7's, byte for byte apart from IDs.

The reference texts below are copied verbatim from postfix-reference/*.txt (captured
from a stock Postfix 3.7.11 relaying to a closed port); the first line of each is the
``$ command`` line and is not part of the output.  Each test builds a spool by hand
that mirrors the reference situation -- the same senders, recipients, sizes, queues,
delay reasons and arrival time -- runs the command in-process with TZ=UTC, and
compares after replacing the reference's queue IDs by ours.

Postfix lists each queue in directory order, and so do we; the reference's order
within one queue is therefore replaced by the order of os.listdir() on our queue
directory, while the order of the queues themselves (active, incoming, deferred, hold)
is the reference's.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from relay.cli import postcat, postqueue, qshape, showq
from spool import Envelope, RcptState, Recipient, Spool
from spool import envelope as envfmt

REFERENCE_DIR = Path(os.environ.get("RELAY_POSTFIX_REFERENCE",
                                    "/work/shared/postfix-reference"))
REF_TIME = 1795457333  # arrival time of the reference messages: Mon Nov 23 18:08:53 2026 UTC
REASON = "connect to 127.0.0.1[127.0.0.1]:2699: Connection refused"

# fmt: off
MAILQ_TXT = (  # mailq.txt
    "$ mailq\n"
    "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
    "393181602B1     391 Mon Nov 23 18:08:53  root@vm\n"
    "                    (connect to 127.0.0.1[127.0.0.1]:2699: Connection refused)\n"
    "                                         dave@example.net\n"
    "\n"
    "2A61F1602A1     361 Mon Nov 23 18:08:53  alice@example.org\n"
    "                    (connect to 127.0.0.1[127.0.0.1]:2699: Connection refused)\n"
    "                                         carol@example.com\n"
    "                                         bob@example.net\n"
    "\n"
    "4A9591602C1!     398 Mon Nov 23 18:08:53  erin@example.org\n"
    "                    (connect to 127.0.0.1[127.0.0.1]:2699: Connection refused)\n"
    "                                         frank@example.net\n"
    "\n"
    "-- 1 Kbytes in 3 Requests.\n"
)

MAILQ_ACTIVE_TXT = (  # mailq-active.txt
    "$ mailq   (after postsuper -r: the requeued message was tried again at once and deferred aga"
    "in)\n"
    "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
    "2A61F1602A1     361 Mon Nov 23 18:08:53  alice@example.org\n"
    "                    (connect to 127.0.0.1[127.0.0.1]:2699: Connection refused)\n"
    "                                         carol@example.com\n"
    "                                         bob@example.net\n"
    "\n"
    "393181602B1     391 Mon Nov 23 18:08:53  root@vm\n"
    "                    (connect to 127.0.0.1[127.0.0.1]:2699: Connection refused)\n"
    "                                         dave@example.net\n"
    "\n"
    "4A9591602C1     398 Mon Nov 23 18:08:53  erin@example.org\n"
    "                    (connect to 127.0.0.1[127.0.0.1]:2699: Connection refused)\n"
    "                                         frank@example.net\n"
    "\n"
    "-- 1 Kbytes in 3 Requests.\n"
)

POSTQUEUE_J_TXT = (  # postqueue-j.txt
    "$ postqueue -j\n"
    "{\"queue_name\": \"deferred\", \"queue_id\": \"393181602B1\", \"arrival_time\": 1795457333, "
    "\"message_size\": 391, \"forced_expire\": false, \"sender\": \"root@vm\", \"recipients\": [{"
    "\"address\": \"dave@example.net\", \"delay_reason\": \"connect to 127.0.0.1[127.0.0.1]:2699:"
    " Connection refused\"}]}\n"
    "{\"queue_name\": \"deferred\", \"queue_id\": \"2A61F1602A1\", \"arrival_time\": 1795457333, "
    "\"message_size\": 361, \"forced_expire\": false, \"sender\": \"alice@example.org\", \"recipi"
    "ents\": [{\"address\": \"carol@example.com\", \"delay_reason\": \"connect to 127.0.0.1[127.0"
    ".0.1]:2699: Connection refused\"}, {\"address\": \"bob@example.net\", \"delay_reason\": \"co"
    "nnect to 127.0.0.1[127.0.0.1]:2699: Connection refused\"}]}\n"
    "{\"queue_name\": \"hold\", \"queue_id\": \"4A9591602C1\", \"arrival_time\": 1795457333, \"me"
    "ssage_size\": 398, \"forced_expire\": false, \"sender\": \"erin@example.org\", \"recipients"
    "\": [{\"address\": \"frank@example.net\", \"delay_reason\": \"connect to 127.0.0.1[127.0.0.1"
    "]:2699: Connection refused\"}]}\n"
)

QSHAPE_TXT = (  # qshape.txt
    "$ qshape deferred\n"
    "                                         T  5 10 20 40 80 160 320 640 1280 1280+\n"
    "                                  TOTAL  3  3  0  0  0  0   0   0   0    0     0\n"
    "                            example.net  2  2  0  0  0  0   0   0   0    0     0\n"
    "                            example.com  1  1  0  0  0  0   0   0   0    0     0\n"
    "$ qshape -s deferred\n"
    "                                         T  5 10 20 40 80 160 320 640 1280 1280+\n"
    "                                  TOTAL  2  2  0  0  0  0   0   0   0    0     0\n"
    "                                     vm  1  1  0  0  0  0   0   0   0    0     0\n"
    "                            example.org  1  1  0  0  0  0   0   0   0    0     0\n"
)

POSTCAT_Q_TXT = (  # postcat-q.txt
    "$ postcat -q 2A61F1602A1\n"
    "*** ENVELOPE RECORDS deferred/2/2A61F1602A1 ***\n"
    "message_size:             361             722               2               0             36"
    "1               0\n"
    "message_arrival_time: Mon Nov 23 18:08:53 2026\n"
    "create_time: Mon Nov 23 18:08:53 2026\n"
    "named_attribute: log_ident=2A61F1602A1\n"
    "named_attribute: rewrite_context=local\n"
    "sender: alice@example.org\n"
    "named_attribute: log_client_name=localhost\n"
    "named_attribute: log_client_address=127.0.0.1\n"
    "named_attribute: log_client_port=37714\n"
    "named_attribute: log_message_origin=localhost[127.0.0.1]\n"
    "named_attribute: log_helo_name=vm\n"
    "named_attribute: log_protocol_name=ESMTP\n"
    "named_attribute: client_name=localhost\n"
    "named_attribute: reverse_client_name=localhost\n"
    "named_attribute: client_address=127.0.0.1\n"
    "named_attribute: client_port=37714\n"
    "named_attribute: server_address=127.0.0.1\n"
    "named_attribute: server_port=2926\n"
    "named_attribute: helo_name=vm\n"
    "named_attribute: protocol_name=ESMTP\n"
    "named_attribute: client_address_type=2\n"
    "named_attribute: dsn_orig_rcpt=rfc822;bob@example.net\n"
    "original_recipient: bob@example.net\n"
    "recipient: bob@example.net\n"
    "named_attribute: dsn_orig_rcpt=rfc822;carol@example.com\n"
    "original_recipient: carol@example.com\n"
    "recipient: carol@example.com\n"
    "*** MESSAGE CONTENTS deferred/2/2A61F1602A1 ***\n"
    "Received: from vm (localhost [127.0.0.1])\n"
    "\tby vm (Postfix) with ESMTP id 2A61F1602A1;\n"
    "\tMon, 23 Nov 2026 18:08:53 +0000 (UTC)\n"
    "Date: Mon, 23 Nov 2026 18:08:53 +0000\n"
    "To: bob@example.net,carol@example.com\n"
    "From: alice@example.org\n"
    "Subject: hello\n"
    "Message-Id: <20261123180853.012657@vm>\n"
    "X-Mailer: swaks v20201014.0 jetmore.org/john/code/swaks/\n"
    "\n"
    "Hi there\n"
    "\n"
    "\n"
    "*** HEADER EXTRACTED deferred/2/2A61F1602A1 ***\n"
    "*** MESSAGE FILE END deferred/2/2A61F1602A1 ***\n"
)

DELETE_AND_DOWN_TXT = (  # postsuper-delete-and-down.txt
    "$ postsuper -d 4A9591602C1\n"
    "postsuper: 4A9591602C1: removed\n"
    "postsuper: Deleted: 1 message\n"
    "$ postsuper -d ALL\n"
    "postsuper: Deleted: 2 messages\n"
    "$ mailq\n"
    "Mail queue is empty\n"
    "\n"
    "$ postqueue -f   (with the mail system stopped)\n"
    "postqueue: fatal: Cannot flush mail queue - mail system is down\n"
    "exit status 69\n"
    "$ postqueue -p   (with the mail system stopped)\n"
    "postqueue: warning: Mail system is down -- accessing queue directly (Connect to the Postfix "
    "showq service: Connection refused)\n"
    "Mail queue is empty\n"
    "exit status 0\n"
)

# fmt: on

REFERENCES = {
    "mailq.txt": MAILQ_TXT,
    "mailq-active.txt": MAILQ_ACTIVE_TXT,
    "postqueue-j.txt": POSTQUEUE_J_TXT,
    "qshape.txt": QSHAPE_TXT,
    "postcat-q.txt": POSTCAT_Q_TXT,
    "postsuper-delete-and-down.txt": DELETE_AND_DOWN_TXT,
}

# The reference's messages: ID, sender, recipients (in the order mailq lists them), size.
REF_MESSAGES = {
    "393181602B1": ("root@vm", ("dave@example.net",), 391),
    "2A61F1602A1": ("alice@example.org", ("carol@example.com", "bob@example.net"), 361),
    "4A9591602C1": ("erin@example.org", ("frank@example.net",), 398),
}

# The message of postcat-q.txt, as it came in over SMTP (CRLF): 361 bytes with our ID.
POSTCAT_CONTENT = (
    "Received: from vm (localhost [127.0.0.1])\r\n"
    "\tby vm (Postfix) with ESMTP id {queue_id};\r\n"
    "\tMon, 23 Nov 2026 18:08:53 +0000 (UTC)\r\n"
    "Date: Mon, 23 Nov 2026 18:08:53 +0000\r\n"
    "To: bob@example.net,carol@example.com\r\n"
    "From: alice@example.org\r\n"
    "Subject: hello\r\n"
    "Message-Id: <20261123180853.012657@vm>\r\n"
    "X-Mailer: swaks v20201014.0 jetmore.org/john/code/swaks/\r\n"
    "\r\n"
    "Hi there\r\n"
    "\r\n"
    "\r\n"
)


# --- building spools --------------------------------------------------------------------


@pytest.fixture
def utc() -> Iterator[None]:
    """asctime() in UTC, so REF_TIME prints as the reference's Mon Nov 23 18:08:53."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


class Site:
    """A configuration directory and its spool, as an administrator's -c would name."""

    def __init__(self, base: Path, long_ids: bool = False) -> None:
        self.config_dir = base / "etc"
        self.config_dir.mkdir(parents=True)
        self.root = base / "spool"
        lines = [f"queue_directory = {self.root}"]
        if long_ids:
            lines.append("enable_long_queue_ids = yes")
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        self.spool = Spool(str(self.root), long_ids=long_ids)
        self.queue_of: dict[str, str] = {}

    @property
    def down(self) -> str:
        """What a listing prints on stderr here, with no daemon: nothing, or when run by
        root Postfix's warning, naming relay's control socket (FORMATS.md 1.3)."""
        if os.geteuid() != 0:
            return ""
        return ("postqueue: warning: Mail system is down -- accessing queue directly"
                f" (Connect to the relay control socket {self.root}/control:"
                " No such file or directory)\n")

    def add(self, sender: str, recipients: Sequence[str], *, queue: str = "deferred",
            size: int | None = None, content: str | None = None, reason: str = REASON,
            arrival: float = REF_TIME, helo: str = "vm", fullname: str = "",
            forced_expire: bool = False, states: Sequence[RcptState] = (),
            reasons: Sequence[str] = ()) -> str:
        """Queue one message the way the daemon leaves a deferred one; returns its ID."""
        rcpts = tuple(Recipient(a) for a in recipients)
        env = Envelope("", sender, rcpts, arrival, helo_name=helo,
                       forced_expire=forced_expire, sender_fullname=fullname)
        res = self.spool.reserve()
        if content is None:
            assert size is not None
            data = filler(size)
        else:
            data = content.format(queue_id=res.queue_id).encode()
        env = self.spool.commit(res, env, [data])
        with self.spool.locked(env.queue_id) as entry:
            current = entry.read()
            new = []
            for i, r in enumerate(current.recipients):
                state = states[i] if i < len(states) else RcptState.PENDING
                why = reasons[i] if i < len(reasons) else reason
                new.append(replace(r, reason=why, dsn="4.4.1" if why else "", state=state))
            entry.write_and_move(current.with_recipients(tuple(new)), queue)
        self.queue_of[env.queue_id] = queue
        return env.queue_id

    def dir_index(self) -> dict[str, int]:
        """Each queue file's position in its directory (readdir order)."""
        index: dict[str, int] = {}
        for queue in ("active", "incoming", "deferred", "hold"):
            for i, name in enumerate(os.listdir(self.root / queue)):
                index[name] = i
        return index


def filler(size: int) -> bytes:
    """A plain message of exactly ``size`` bytes."""
    head = b"Received: from vm (localhost [127.0.0.1])\r\nSubject: test\r\n\r\n"
    body = size - len(head) - 2
    assert body >= 0
    return head + b"x" * body + b"\r\n"


def build_reference_spool(site: Site, queues: dict[str, str]) -> dict[str, str]:
    """The three reference messages in the given queues; returns reference ID -> our ID."""
    ids = {}
    for ref_id, (sender, rcpts, size) in REF_MESSAGES.items():
        ids[ref_id] = site.add(sender, rcpts, queue=queues[ref_id], size=size)
    return ids


# --- comparing --------------------------------------------------------------------------


def output_of(text: str) -> str:
    """A reference file without its ``$ command`` line."""
    return text.split("\n", 1)[1]


def sections(text: str) -> list[str]:
    """The output of each ``$ command`` in a file that holds several."""
    parts = re.split(r"^\$ [^\n]*\n", text, flags=re.MULTILINE)
    return [p for p in parts[1:]]


def renamed(text: str, ids: dict[str, str]) -> str:
    for ref_id, ours in ids.items():
        text = text.replace(ref_id, ours)
    return text


def in_directory_order(items: list[tuple[str, str]], site: Site) -> list[str]:
    """Reorder (our ID, text) items within each run of one queue into readdir order."""
    index = site.dir_index()
    out: list[str] = []
    run: list[tuple[str, str]] = []
    for item in [*items, ("", "")]:
        if run and (not item[0] or site.queue_of[run[-1][0]] != site.queue_of[item[0]]):
            out += [text for _, text in sorted(run, key=lambda it: index[it[0]])]
            run = []
        if item[0]:
            run.append(item)
    return out


def expected_listing(reference: str, ids: dict[str, str], site: Site) -> str:
    """A mailq reference with our IDs, its message blocks in our directory order."""
    text = renamed(output_of(reference), ids)
    header, rest = text.split("\n", 1)
    *blocks, trailer = rest.split("\n\n")
    items = [(block.split()[0].rstrip("*!#"), block) for block in blocks]
    return header + "\n" + "\n\n".join(in_directory_order(items, site)) + "\n\n" + trailer


def run_text(main: object, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(argv, stdout=out, stderr=err)  # type: ignore[operator]
    return status, out.getvalue(), err.getvalue()


def run_bytes(argv: list[str], stdin: bytes = b"") -> tuple[int, bytes, str]:
    out, err = io.BytesIO(), io.StringIO()
    status = postcat.main(argv, stdin=io.BytesIO(stdin), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


# --- the embedded references are the captured files ---------------------------------------


@pytest.mark.skipif(not REFERENCE_DIR.is_dir(), reason="postfix-reference not available")
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_embedded_reference_is_the_captured_file(name: str) -> None:
    assert (REFERENCE_DIR / name).read_text() == REFERENCES[name]


# --- mailq / postqueue -p -----------------------------------------------------------------


def test_mailq_matches_reference(tmp_path: Path, utc: None) -> None:
    site = Site(tmp_path)
    ids = build_reference_spool(site, {"393181602B1": "deferred", "2A61F1602A1": "deferred",
                                       "4A9591602C1": "hold"})
    expected = expected_listing(MAILQ_TXT, ids, site)

    status, out, err = run_text(postqueue.mailq_main, ["-c", str(site.config_dir)])
    assert (status, err) == (0, site.down)
    assert out == expected
    # postqueue -p is the same listing.
    assert run_text(postqueue.main, ["-c", str(site.config_dir), "-p"]) == (0, expected,
                                                                            site.down)


def test_mailq_all_deferred_matches_reference(tmp_path: Path, utc: None) -> None:
    site = Site(tmp_path)
    ids = build_reference_spool(site, dict.fromkeys(REF_MESSAGES, "deferred"))

    status, out, _ = run_text(postqueue.mailq_main, ["-c", str(site.config_dir)])

    assert status == 0
    assert out == expected_listing(MAILQ_ACTIVE_TXT, ids, site)


@pytest.mark.skipif(not hasattr(os, "fork") or len(os.sched_getaffinity(0)) < 2,
                    reason="a listing in two processes needs fork() and two CPUs")
@pytest.mark.parametrize("held", [(), ("4A9591602C1",)])
def test_mailq_made_by_two_processes_is_the_same_listing(
        tmp_path: Path, utc: None, monkeypatch: pytest.MonkeyPatch,
        held: tuple[str, ...]) -> None:
    """A deep queue is listed by two processes (showq.write_sendmail_listing): the text is
    byte for byte the one-process listing, whichever half each message falls in."""
    site = Site(tmp_path)
    ids = build_reference_spool(site, {q: "hold" if q in held else "deferred"
                                       for q in REF_MESSAGES})
    monkeypatch.setattr(showq, "PARALLEL_MIN", 1)
    two = run_text(postqueue.mailq_main, ["-c", str(site.config_dir)])
    monkeypatch.setattr(showq, "PARALLEL_MIN", 10**9)
    one = run_text(postqueue.mailq_main, ["-c", str(site.config_dir)])
    assert two == one and two[0] == 0
    if not held:
        assert two[1] == expected_listing(MAILQ_ACTIVE_TXT, ids, site)


def test_mail_config_environment_names_the_configuration(
        tmp_path: Path, utc: None, monkeypatch: pytest.MonkeyPatch) -> None:
    site = Site(tmp_path)
    ids = build_reference_spool(site, {"393181602B1": "deferred", "2A61F1602A1": "deferred",
                                       "4A9591602C1": "hold"})
    monkeypatch.setenv("MAIL_CONFIG", str(site.config_dir))

    assert run_text(postqueue.mailq_main, []) == (0, expected_listing(MAILQ_TXT, ids, site),
                                                  site.down)


def test_active_marker_forced_expire_and_reason_changes(tmp_path: Path, utc: None) -> None:
    site = Site(tmp_path)
    said = "host mx said: 451 try later (in reply to RCPT TO command)"
    qid = site.add("", ["a@example.com", "b@example.com", "c@example.com", "d@example.com",
                        "e@example.com"],
                   queue="active", size=2048, forced_expire=True,
                   reasons=["", said, said, "", "x" * 90],
                   states=[RcptState.PENDING] * 5)

    status, out, _ = run_text(postqueue.mailq_main, ["-c", str(site.config_dir)])

    assert status == 0
    assert out == (
        "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
        f"{qid}*#    2048 Mon Nov 23 18:08:53  MAILER-DAEMON\n"
        + " " * 41 + "a@example.com\n"
        + " " * (76 - len(said)) + f"({said})\n"
        + " " * 41 + "b@example.com\n"
        + " " * 41 + "c@example.com\n"
        + " " * 58 + "(reason unavailable)\n"
        + " " * 41 + "d@example.com\n"
        + "(" + "x" * 90 + ")\n"
        + " " * 41 + "e@example.com\n"
        "\n"
        "-- 2 Kbytes in 1 Request.\n"
    )


def test_done_and_duplicate_recipients_are_not_listed(tmp_path: Path, utc: None) -> None:
    site = Site(tmp_path)
    qid = site.add("alice@example.org",
                   ["sent@example.com", "bob@example.net", "bounced@example.com",
                    "bob@example.net"],
                   queue="incoming", size=100, reason="",
                   states=[RcptState.SENT, RcptState.PENDING, RcptState.BOUNCED,
                           RcptState.PENDING])

    _, out, _ = run_text(postqueue.main, ["-c", str(site.config_dir), "-p"])
    _, jout, _ = run_text(postqueue.main, ["-c", str(site.config_dir), "-j"])

    assert out.splitlines()[1:3] == [
        f"{qid}     100 Mon Nov 23 18:08:53  alice@example.org",
        " " * 41 + "bob@example.net",
    ]
    assert out.splitlines()[3] == ""
    assert json.loads(jout)["recipients"] == [{"address": "bob@example.net"}]


def test_empty_queue(tmp_path: Path) -> None:
    site = Site(tmp_path)
    expected = sections(DELETE_AND_DOWN_TXT)[2].split("\n")[0] + "\n"  # "$ mailq" output

    assert run_text(postqueue.mailq_main, ["-c", str(site.config_dir)]) == (0, expected,
                                                                            site.down)
    assert expected == "Mail queue is empty\n"
    assert run_text(postqueue.main, ["-c", str(site.config_dir), "-j"]) == (0, "", site.down)


def test_one_request_is_singular(tmp_path: Path, utc: None) -> None:
    site = Site(tmp_path)
    site.add("root@vm", ["dave@example.net"], size=391)

    _, out, _ = run_text(postqueue.mailq_main, ["-c", str(site.config_dir)])

    assert out.endswith("\n\n-- 0 Kbytes in 1 Request.\n")


def test_long_queue_id_layout(tmp_path: Path, utc: None) -> None:
    site = Site(tmp_path, long_ids=True)
    held = site.add("alice@example.org", ["bob@example.com"], queue="hold", size=1234)
    assert re.fullmatch(r"[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10}z[0-9A-Za-y]+", held)

    _, out, _ = run_text(postqueue.mailq_main, ["-c", str(site.config_dir)])

    assert out == (
        "----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------\n"
        f"{held + '!':<17}     1234 Mon Nov 23 18:08:53 alice@example.org\n"
        + " " * 20 + f"({REASON})\n"
        + " " * 47 + "bob@example.com\n"
        "\n"
        "-- 1 Kbytes in 1 Request.\n"
    )
    # postconf(5): "the number of whitespace-separated fields is not changed": $7 is
    # the sender, as in the short layout.
    assert out.splitlines()[1].split()[6] == "alice@example.org"


def test_listing_streams_one_message_at_a_time() -> None:
    def items() -> Iterator[tuple[str, envfmt.Fields]]:
        env = Envelope("ABCDEF12345", "a@b", (Recipient("c@d"),), REF_TIME, size=9)
        yield "deferred", envfmt.as_fields(env)
        raise AssertionError("read ahead of the output")

    listing = showq.sendmail_records(items())
    assert next(listing).startswith("-Queue ID-")
    assert next(listing).startswith("ABCDEF12345")
    assert next(showq.json_records(items())).startswith('{"queue_name": "deferred"')


def test_corrupt_queue_is_not_listed(tmp_path: Path, utc: None) -> None:
    site = Site(tmp_path)
    qid = site.add("root@vm", ["dave@example.net"], size=391, queue="corrupt")
    (site.root / "deferred" / "junk.tmp").write_text("not a queue file")
    (site.root / "deferred" / "ABCDEF12345").write_text("relay-envelope 1\n{broken\nend\n")

    _, out, _ = run_text(postqueue.mailq_main, ["-c", str(site.config_dir)])

    assert out == "Mail queue is empty\n"
    assert qid


# --- postqueue -j -------------------------------------------------------------------------


def test_postqueue_json_matches_reference(tmp_path: Path) -> None:
    site = Site(tmp_path)
    ids = build_reference_spool(site, {"393181602B1": "deferred", "2A61F1602A1": "deferred",
                                       "4A9591602C1": "hold"})
    lines = renamed(output_of(POSTQUEUE_J_TXT), ids).splitlines(keepends=True)
    items = [(json.loads(line)["queue_id"], line) for line in lines]
    expected = "".join(in_directory_order(items, site))

    assert run_text(postqueue.main, ["-c", str(site.config_dir), "-j"]) == (0, expected,
                                                                            site.down)


def test_json_quoting(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.add('we"ird\\\x01@example.org', ["b\tx@example.com"], size=100,
             reason="said: \x1b[31m", forced_expire=True)

    _, out, _ = run_text(postqueue.main, ["-c", str(site.config_dir), "-j"])

    assert '"sender": "we\\"ird\\\\?@example.org"' in out
    assert '"forced_expire": true' in out
    assert json.loads(out)["recipients"] == [{"address": "b?x@example.com",
                                              "delay_reason": "said: ?[31m"}]


# --- postqueue errors (FORMATS.md 1.3) ----------------------------------------------------
# Every fatal error of Postfix 3.7.11's postqueue exits 69, usage errors included; its
# mailq (sendmail -bp) exits 75.  getopt(3) says what was wrong with an option first.

USAGE = ("postqueue: fatal: usage: postqueue -f | postqueue -i queueid | postqueue -j"
         " | postqueue -p | postqueue -s site\n")


@pytest.mark.parametrize("argv", [[], ["-p", "-j"], ["-f", "-p"], ["-f", "-f"],
                                  ["-p", "extra"], ["-p", "--", "extra"],
                                  ["-s", "a.example", "-s", "b.example"],
                                  ["-i", "ABCDEF12345", "-f"], ["-f", "-i", "ABCDEF12345"]])
def test_postqueue_usage(tmp_path: Path, argv: list[str]) -> None:
    site = Site(tmp_path)
    assert run_text(postqueue.main, ["-c", str(site.config_dir), *argv]) == (69, "", USAGE)


@pytest.mark.parametrize(("argv", "complaint"), [
    (["-x"], "postqueue: invalid option -- 'x'\n"),
    (["-pZ"], "postqueue: invalid option -- 'Z'\n"),
    (["--foo"], "postqueue: invalid option -- '-'\n"),
    (["-i"], "postqueue: option requires an argument -- 'i'\n"),
])
def test_postqueue_bad_option(tmp_path: Path, argv: list[str], complaint: str) -> None:
    """As measured: ``postqueue -Z`` prints getopt's line, then the usage line; exit 69."""
    site = Site(tmp_path)
    assert run_text(postqueue.main, ["-c", str(site.config_dir), *argv]) == (
        69, "", complaint + USAGE)


def test_postqueue_option_argument_is_the_next_word(tmp_path: Path) -> None:
    """getopt(3) takes the word after -i whatever it looks like: ``-i -f`` names "-f"."""
    site = Site(tmp_path)
    assert run_text(postqueue.main, ["-c", str(site.config_dir), "-i", "-f"]) == (
        69, "", 'postqueue: fatal: Cannot flush queue ID - invalid name: "-f"\n')


def test_flush_with_the_mail_system_down(tmp_path: Path) -> None:
    site = Site(tmp_path)
    fatal = "postqueue: fatal: Cannot flush mail queue - mail system is down\n"
    for argv in (["-f"], ["-i", "ABCDEF12345"], ["-s", "example.net"], ["-s", "[127.0.0.1]"]):
        assert run_text(postqueue.main, ["-c", str(site.config_dir), *argv]) == (69, "", fatal)


def test_listing_with_the_mail_system_down_matches_reference(tmp_path: Path) -> None:
    """postsuper-delete-and-down.txt: as root, with the mail system down, ``postqueue -p``
    warns, lists the spool itself and exits 0; only the text in parentheses is ours."""
    if os.geteuid() != 0:
        pytest.skip("Postfix warns only when run by root; as another user nothing is printed")
    site = Site(tmp_path)
    expected = sections(DELETE_AND_DOWN_TXT)[4]
    warning, listing, status = expected.rstrip("\n").split("\n")
    prefix = warning[:warning.index("(") + 1]
    assert prefix == "postqueue: warning: Mail system is down -- accessing queue directly ("
    for main, argv in ((postqueue.main, ["-p"]), (postqueue.mailq_main, [])):
        code, out, err = run_text(main, ["-c", str(site.config_dir), *argv])
        assert (f"exit status {code}", out) == (status, listing + "\n")
        assert err == site.down
        assert err.startswith(prefix) and err.endswith(")\n") and err.count("\n") == 1


def test_flush_bad_queue_id(tmp_path: Path) -> None:
    site = Site(tmp_path)
    long = "A" * 120
    assert run_text(postqueue.main, ["-c", str(site.config_dir), "-i", "foo/bar"]) == (
        69, "", 'postqueue: fatal: Cannot flush queue ID - invalid name: "foo/bar"\n')
    assert run_text(postqueue.main, ["-c", str(site.config_dir), "-i", long]) == (
        69, "", f'postqueue: fatal: Cannot flush queue ID - invalid name: "{"A" * 100}..."\n')


@pytest.mark.parametrize("site_arg", ["1.2.3.4", "[1.2.3.999]", "bad..example", "x-.example",
                                      "[example.com]", "exa mple.com", "example.com.", ""])
def test_flush_bad_site(tmp_path: Path, site_arg: str) -> None:
    site = Site(tmp_path)
    assert run_text(postqueue.main, ["-c", str(site.config_dir), "-s", site_arg]) == (
        69, "", f'postqueue: fatal: Cannot flush mail queue - invalid destination: "{site_arg}"\n')


def test_missing_queue_directory(tmp_path: Path) -> None:
    """As Postfix 3.7.11: postqueue's fatal errors exit 69, mailq's (sendmail's) 75."""
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/nowhere\n")
    for main, prog, argv, expected in ((postqueue.main, "postqueue", ["-p"], 69),
                                       (postqueue.mailq_main, "mailq", [], 75)):
        status, out, err = run_text(main, ["-c", str(tmp_path), *argv])
        assert (status, out) == (expected, "")
        assert err == f"{prog}: fatal: chdir {tmp_path}/nowhere: No such file or directory\n"


def test_bad_main_cf(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text("bad line here\n")
    status, _, err = run_text(postqueue.main, ["-c", str(tmp_path), "-p"])
    assert status == 69 and err.startswith("postqueue: fatal: ") and err.count("\n") == 1


def test_mailq_errors(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert run_text(postqueue.mailq_main, ["-c", str(site.config_dir), "bob@example.com"]) == (
        75, "", "mailq: fatal: display queue mode requires no recipient\n")
    assert run_text(postqueue.mailq_main, ["-c", str(site.config_dir), "-Z"]) == (
        75, "", "mailq: invalid option -- 'Z'\nmailq: fatal: usage: mailq [options]\n")


# --- postcat ------------------------------------------------------------------------------


def postcat_sections(text: str, label: str) -> dict[str, list[str]]:
    """Lines per section marker (ENVELOPE RECORDS, MESSAGE CONTENTS, ...)."""
    found: dict[str, list[str]] = {}
    current = ""
    for line in text.split("\n")[:-1]:
        m = re.fullmatch(r"\*\*\* ([A-Z ]+) (\S+) \*\*\*", line)
        if m:
            assert m.group(2) == label
            current = m.group(1)
            found[current] = []
        else:
            found[current].append(line)
    return found


def test_postcat_matches_reference(tmp_path: Path, utc: None) -> None:
    site = Site(tmp_path)
    qid = site.add("alice@example.org", ["bob@example.net", "carol@example.com"],
                   content=POSTCAT_CONTENT)
    label = f"deferred/{qid}"
    # Our queue has no hash subdirectories: deferred/2/2A61F1602A1 is deferred/ID here.
    reference = output_of(POSTCAT_Q_TXT).replace("deferred/2/2A61F1602A1", label)
    reference = reference.replace("2A61F1602A1", qid)

    status, out, err = run_bytes(["-c", str(site.config_dir), "-q", qid])

    assert (status, err) == (0, "")
    ours = postcat_sections(out.decode(), label)
    ref = postcat_sections(reference, label)
    assert list(ours) == list(ref) == ["ENVELOPE RECORDS", "MESSAGE CONTENTS",
                                       "HEADER EXTRACTED", "MESSAGE FILE END"]
    assert ours["MESSAGE CONTENTS"] == ref["MESSAGE CONTENTS"]
    assert ours["HEADER EXTRACTED"] == ref["HEADER EXTRACTED"] == []
    assert ours["MESSAGE FILE END"] == ref["MESSAGE FILE END"] == []
    # message_size: six %15ld fields; the data offset (field 2) is where the content
    # starts in Postfix's queue file, 0 in our separate data file.
    size_line, *records = ours["ENVELOPE RECORDS"]
    ref_size_line = ref["ENVELOPE RECORDS"][0]
    assert len(size_line) == len(ref_size_line)
    fields = re.fullmatch(r"message_size: " + r" ".join([r"( {14}\d| {0,14}\d+)"] * 6),
                          size_line)
    ref_fields = re.fullmatch(r"message_size: " + r" ".join([r"( *\d+)"] * 6), ref_size_line)
    assert fields and ref_fields
    assert [fields.group(i) for i in (1, 3, 4, 5, 6)] == \
        [ref_fields.group(i) for i in (1, 3, 4, 5, 6)]
    assert fields.group(2) == "              0"
    # Every other record we print is the reference's, in the reference's order; Postfix
    # prints more (log_* attributes, rewrite_context, ports) that we have no data for.
    ours_prefixes = ("message_arrival_time: ", "create_time: ", "sender: ",
                     "original_recipient: ", "recipient: ", "named_attribute: log_ident=",
                     "named_attribute: client_name=", "named_attribute: client_address=",
                     "named_attribute: helo_name=", "named_attribute: protocol_name=",
                     "named_attribute: dsn_orig_rcpt=")
    assert records == [line for line in ref["ENVELOPE RECORDS"]
                       if line.startswith(ours_prefixes)]


@pytest.fixture
def catsite(tmp_path: Path, utc: None) -> tuple[Site, str]:
    site = Site(tmp_path)
    qid = site.add("alice@example.org", ["bob@example.net", "carol@example.com"],
                   content=POSTCAT_CONTENT, states=[RcptState.SENT])
    return site, qid


def test_postcat_header_only(catsite: tuple[Site, str]) -> None:
    site, qid = catsite
    _, out, _ = run_bytes(["-c", str(site.config_dir), "-h", "-q", qid])
    header = POSTCAT_CONTENT.format(queue_id=qid).replace("\r\n", "\n").split("\n\n")[0]
    assert out.decode() == header + "\n"


def test_postcat_body_only_starts_with_the_separator(catsite: tuple[Site, str]) -> None:
    site, qid = catsite
    _, out, _ = run_bytes(["-c", str(site.config_dir), "-bq", qid])
    assert out == b"\nHi there\n\n\n"


def test_postcat_envelope_only(catsite: tuple[Site, str]) -> None:
    site, qid = catsite
    _, out, _ = run_bytes(["-c", str(site.config_dir), "-e", "-q", qid])
    lines = out.decode().splitlines()
    assert lines[0] == f"*** ENVELOPE RECORDS deferred/{qid} ***"
    # Every recipient with its original address and ORCPT, as in Postfix's queue files.
    assert lines[-9:] == [
        "named_attribute: dsn_orig_rcpt=rfc822;bob@example.net",
        "original_recipient: bob@example.net",
        "done_recipient: bob@example.net",
        "named_attribute: dsn_orig_rcpt=rfc822;carol@example.com",
        "original_recipient: carol@example.com",
        "recipient: carol@example.com",
        f"*** MESSAGE CONTENTS deferred/{qid} ***",
        f"*** HEADER EXTRACTED deferred/{qid} ***",
        f"*** MESSAGE FILE END deferred/{qid} ***",
    ]


def test_postcat_shows_the_sender_full_name_before_the_sender(tmp_path: Path,
                                                              utc: None) -> None:
    """sendmail -F's name is Postfix's sender_fullname record, just before the sender
    (FORMATS.md 1.5)."""
    site = Site(tmp_path)
    qid = site.add("me@porcupine.org", ["you@porcupine.org"], content=POSTCAT_CONTENT,
                   fullname="Wietse Venema")
    _, out, _ = run_bytes(["-c", str(site.config_dir), "-e", "-q", qid])
    lines = out.decode().splitlines()
    at = lines.index("sender: me@porcupine.org")
    assert lines[at - 1] == "sender_fullname: Wietse Venema"
    assert sum(line.startswith("sender_fullname") for line in lines) == 1


def test_postcat_by_path(catsite: tuple[Site, str]) -> None:
    site, qid = catsite
    path = str(site.root / "deferred" / qid)
    status, out, _ = run_bytes([path])
    assert status == 0
    assert out.decode().splitlines()[0] == f"*** ENVELOPE RECORDS {path} ***"
    assert b"\nSubject: hello\n" in out


def test_postcat_long_lines_and_bare_lf(tmp_path: Path) -> None:
    site = Site(tmp_path)
    long_value = "y" * 200_000
    content = ("X-Long: " + long_value + "\r\nLF-Only: yes\n\r\n"
               + "body " + "z" * 150_000 + "\r\nlast line without end")
    qid = site.add("a@example.org", ["b@example.com"], content=content)

    _, head, _ = run_bytes(["-c", str(site.config_dir), "-h", "-q", qid])
    _, body, _ = run_bytes(["-c", str(site.config_dir), "-b", "-q", qid])

    assert head.decode() == f"X-Long: {long_value}\nLF-Only: yes\n"
    assert body.decode() == "\nbody " + "z" * 150_000 + "\nlast line without end\n"


def test_postcat_errors(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert run_bytes(["-c", str(site.config_dir), "-q", "foo/bar"]) == (
        1, b"", "postcat: fatal: bad mail queue ID: foo/bar\n")
    assert run_bytes(["-c", str(site.config_dir), "-q", "ABCDEF12345"]) == (
        1, b"", "postcat: fatal: open queue file ABCDEF12345: No such file or directory\n")
    status, _, err = run_bytes(["-c", str(site.config_dir), "-x"])
    assert status == 1
    assert err.startswith("postcat: invalid option -- 'x'\npostcat: fatal: usage: postcat ")


def test_postcat_reads_a_queue_file_from_standard_input(catsite: tuple[Site, str]) -> None:
    """As Postfix's postcat without a file: the queue file from stdin, labelled ``stdin``;
    ours is the envelope, whose content is found in main.cf's spool."""
    site, qid = catsite
    by_id = run_bytes(["-c", str(site.config_dir), "-q", qid])[1].decode()
    envelope = (site.root / "deferred" / qid).read_bytes()

    status, out, err = run_bytes(["-c", str(site.config_dir)], stdin=envelope)

    assert (status, err) == (0, "")
    assert out.decode() == by_id.replace(f"deferred/{qid} ***", "stdin ***")
    assert out.decode().splitlines()[0] == "*** ENVELOPE RECORDS stdin ***"
    # -q without a queue ID reads standard input too, as Postfix's.
    assert run_bytes(["-c", str(site.config_dir), "-q"], stdin=envelope) == (0, out, "")


def test_postcat_standard_input_that_is_no_queue_file(tmp_path: Path) -> None:
    """Postfix 3.7.11: nothing for an empty input, a warning for garbage; both exit 0."""
    site = Site(tmp_path)
    assert run_bytes(["-c", str(site.config_dir)]) == (0, b"", "")
    assert run_bytes(["-c", str(site.config_dir)], stdin=b"garbage\n") == (
        0, b"", "postcat: warning: stdin: input is not a valid queue file\n")


# --- qshape -------------------------------------------------------------------------------


def test_qshape_matches_reference(tmp_path: Path) -> None:
    site = Site(tmp_path)
    now = time.time()
    # At the time of qshape.txt, 4A9591602C1 was on hold; the others were 1 minute old.
    for ref_id, (sender, rcpts, size) in REF_MESSAGES.items():
        queue = "hold" if ref_id == "4A9591602C1" else "deferred"
        site.add(sender, rcpts, queue=queue, size=size, arrival=now - 60)
    recipients, senders = sections(QSHAPE_TXT)
    config = ["-c", str(site.config_dir)]

    assert run_text(qshape.main, [*config, "deferred"]) == (0, recipients, "")
    assert run_text(qshape.main, [*config, "-s", "deferred"]) == (0, senders, "")


def test_qshape_buckets_and_options(tmp_path: Path) -> None:
    site = Site(tmp_path)
    now = 1_800_000_000.0
    ages = [0, 299, 300, 599, 600, 1200, 2400, 4800, 9600, 19200, 38400, 76800, 10**6]
    for i, age in enumerate(ages):
        site.add("", [f"user@Sub{i % 3}.Example.COM."], queue="incoming",
                 size=100, arrival=now - age)
    config = ["-c", str(site.config_dir)]

    def run(*argv: str) -> str:
        out = io.StringIO()
        assert qshape.main([*config, *argv], stdout=out, now=now) == 0
        return out.getvalue()

    # Buckets of 5 minutes doubling: [0,5) [5,10) [10,20) ... [1280,inf) minutes.
    assert run() == (
        "                                         T  5 10 20 40 80 160 320 640 1280 1280+\n"
        "                                  TOTAL 13  2  2  1  1  1   1   1   1    1     2\n"
        "                       sub0.example.com  5  1  1  0  0  1   0   0   1    0     1\n"
        "                       sub1.example.com  4  1  0  1  0  0   1   0   0    1     0\n"
        "                       sub2.example.com  4  0  1  0  1  0   0   1   0    0     1\n"
    )
    assert run("-s", "-b", "4", "-t", "10", "incoming", "active") == (
        "                                                                  T 10 20 40 40+\n"
        "                                                           TOTAL 13  4  1  1   7\n"
        "                                                   MAILER-DAEMON 13  4  1  1   7\n"
    )
    assert run("-l", "-b", "3", "-p", "-m", "3", "incoming") == (
        "                                                                     T  5 10 10+\n"
        "                                                              TOTAL 13  2  2   9\n"
        "                                                       .example.com 13  2  2   9\n"
        "                                                   sub0.example.com  5  1  1   3\n"
        "                                                   sub1.example.com  4  1  0   3\n"
        "                                                   sub2.example.com  4  0  1   3\n"
    )
    # Parent rows need -m subdomains (default 5).
    assert " .example.com " not in run("-p", "incoming")


def test_qshape_truncates_long_domains(tmp_path: Path) -> None:
    site = Site(tmp_path)
    name = "a" * 50 + ".example.com"
    site.add("x@" + name, ["y@" + name], queue="incoming", size=100, arrival=time.time())
    _, out, _ = run_text(qshape.main, ["-c", str(site.config_dir)])
    row = out.splitlines()[2]
    assert len(row) == 80
    assert row.startswith("+" + name[len(name) - 38:] + "  1  1")


def test_qshape_default_queues_are_incoming_and_active(tmp_path: Path) -> None:
    site = Site(tmp_path)
    for queue in ("incoming", "active", "deferred", "hold"):
        site.add("x@example.org", [f"y@{queue}.example"], queue=queue, size=100,
                 arrival=time.time())
    _, out, _ = run_text(qshape.main, ["-c", str(site.config_dir)])
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        "TOTAL", "active.example", "incoming.example"]
    status, _, err = run_text(qshape.main, ["-c", str(site.config_dir), "nosuch"])
    assert (status, err) == (64, "qshape: fatal: unknown queue name: nosuch\n")
