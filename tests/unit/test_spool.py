"""spool.store and spool.envelope: queue IDs, enqueue, the envelope format, locking,
scan, quarantine, cleanup, fault hooks, group commit and pauses.

Everything runs on a real file system under tmp_path; the only patched functions are
os.fsync/os.rename/os.unlink in the two tests that count or order those calls, where
the wrapper still calls the real function.  No sockets.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spool import (
    CorruptEntry,
    EntryGone,
    Envelope,
    RcptState,
    Recipient,
    Spool,
    SpoolError,
    SpoolFull,
    store,
)
from spool import envelope as envfmt
from spool.store import fault_hook_from, make_queue_id, valid_queue_id

REPO = Path(__file__).resolve().parents[2]

# Postfix's base-52 alphabet: digits and consonants, so a queue ID never spells a word.
BASE52 = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"
BASE51 = BASE52[:-1]
SHORT_ID = re.compile(r"^[0-9A-F]{11}$")
LONG_ID = re.compile(rf"^[{BASE52}]{{6}}[{BASE52}]{{4}}z[{BASE51}]{{4}}$")
LIVE_QUEUES = ("incoming", "active", "deferred", "hold")


def make_env(
    sender: str = "sender@example.com",
    rcpts: tuple[str, ...] = ("rcpt@example.net",),
    **kw: object,
) -> Envelope:
    return Envelope(
        queue_id="",
        sender=sender,
        recipients=tuple(Recipient(r) for r in rcpts),
        arrival_time=1_700_000_000.25,
        **kw,  # type: ignore[arg-type]
    )


def listing(root: Path, sub: str) -> list[str]:
    return sorted(os.listdir(root / sub))


def decode(text: str, alphabet: str) -> int:
    n = 0
    for ch in text:
        n = n * len(alphabet) + alphabet.index(ch)
    return n


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(str(tmp_path / "spool"))


@pytest.fixture
def root(spool: Spool) -> Path:
    return Path(spool.root)


# --- queue IDs ------------------------------------------------------------------------


def test_short_queue_id_shape_and_time_prefix() -> None:
    for _ in range(1000):
        assert SHORT_ID.match(make_queue_id(False))
    # The first five hex digits are the microseconds, as in Postfix.
    assert make_queue_id(False, now=1_700_000_000.5).startswith("7A120")
    assert make_queue_id(False, now=1_700_000_000.0).startswith("00000")
    assert make_queue_id(False, now=1_700_000_000.999999).startswith("F423")


def test_long_queue_id_shape_encodes_seconds_and_microseconds() -> None:
    now = 1_700_000_000.25
    for _ in range(1000):
        qid = make_queue_id(True, now=now)
        assert LONG_ID.match(qid), qid
        assert decode(qid[:6], BASE52) == 1_700_000_000
        assert decode(qid[6:10], BASE52) == 250_000
        assert valid_queue_id(qid)
    qid = make_queue_id(True)
    assert abs(decode(qid[:6], BASE52) - time.time()) < 5


def test_reserve_20000_unique_short_ids(spool: Spool, root: Path) -> None:
    ids = [spool.reserve().queue_id for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(SHORT_ID.match(q) for q in ids)
    # Each reservation is an empty data/ID and nothing else.
    assert sorted(ids) == listing(root, "data")
    for q in ("tmp", *store.QUEUES):
        assert listing(root, q) == []


def test_reserve_unique_long_ids(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"), long_ids=True)
    ids = [spool.reserve().queue_id for _ in range(5_000)]
    assert len(set(ids)) == len(ids)
    assert all(LONG_ID.match(q) for q in ids)


def test_reserve_never_reuses_an_existing_data_file(
    spool: Spool, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two candidates are taken (one by a committed message, one by a bare
    # reservation); make_queue_id is steered onto them so the O_EXCL path is hit
    # for certain instead of with probability 2**-24.
    taken = spool.enqueue(make_env(), b"first\r\n").queue_id
    bare = spool.reserve().queue_id
    (root / "data" / bare).write_bytes(b"half-written")
    real = store.make_queue_id
    candidates = [taken, bare]

    def steered(long_ids: bool, now: float | None = None) -> str:
        return candidates.pop(0) if candidates else real(long_ids, now)

    monkeypatch.setattr(store, "make_queue_id", steered)
    res = spool.reserve()
    assert res.queue_id not in (taken, bare)
    assert candidates == []
    assert (root / "data" / taken).read_bytes() == b"first\r\n"
    assert (root / "data" / bare).read_bytes() == b"half-written"
    assert (root / "data" / res.queue_id).read_bytes() == b""


def test_reserve_gives_up_when_every_candidate_is_taken(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    qid = spool.reserve().queue_id
    monkeypatch.setattr(store, "make_queue_id", lambda long_ids, now=None: qid)
    with pytest.raises(SpoolError, match="unused queue ID"):
        spool.reserve()


# --- enqueue --------------------------------------------------------------------------

AWKWARD_CONTENT = [
    b"",
    b"Subject: hi\r\n\r\nbody\r\n",
    b"\r\n\r\n\r\n.\r\n..\r\n",
    bytes(range(256)) * 3,
    "Grüße, 8-bit ünïcödé\r\n".encode() + b"\xff\xfe\x00\r\n",
    b"no final newline",
    b"x" * 300_000,
]


@pytest.mark.parametrize("content", AWKWARD_CONTENT, ids=lambda c: f"{len(c)}B")
def test_enqueue_content_is_byte_for_byte(spool: Spool, root: Path, content: bytes) -> None:
    env = spool.enqueue(make_env(), content)
    assert (root / "data" / env.queue_id).read_bytes() == content
    assert spool.read_content(env.queue_id, env.size) == content
    assert env.size == len(content)
    assert listing(root, "incoming") == [env.queue_id]
    assert listing(root, "tmp") == []


def test_commit_streams_chunks(spool: Spool, root: Path) -> None:
    chunks = [b"Subject: x\r\n", b"\r\n", b"\x80\x81" * 1000, b"", b"end\r\n"]
    res = spool.reserve()
    env = spool.commit(res, make_env(size=12345), iter(chunks))
    assert env.queue_id == res.queue_id
    assert env.size == sum(map(len, chunks))  # the real size wins over the caller's
    assert spool.read_content(env.queue_id, env.size) == b"".join(chunks)


def test_enqueue_envelope_round_trips(spool: Spool, root: Path) -> None:
    given_env = Envelope(
        queue_id="ignored",
        sender="",  # the null sender
        recipients=(
            Recipient("a@example.net"),
            Recipient("b@example.net", RcptState.SENT, "250 2.0.0 ok", "2.0.0", "mx.example.net"),
            Recipient(
                "c@example.net",
                RcptState.BOUNCED,
                'host mx said: 550 5.1.1 "no such user"\nsecond line',
                "5.1.1",
                "mx.example.net",
                notified=True,
            ),
        ),
        arrival_time=1_700_000_000.123456,
        client_name="client.example",
        client_address="::1",
        helo_name="helo.example",
        auth_user="üser",
        message_id="<id@example>",
        attempts=3,
        next_attempt=1_700_000_900.5,
        last_attempt=1_700_000_300.25,
        held_seconds=12.5,
        warned=True,
        sender_fullname='Ann "quoted"\nLee',
    )
    env = spool.enqueue(given_env, b"body\r\n")
    assert env == replace(given_env, queue_id=env.queue_id, size=6)
    assert SHORT_ID.match(env.queue_id)
    assert spool.locate(env.queue_id) == "incoming"
    assert spool.read("incoming", env.queue_id) == env
    assert (root / "incoming" / env.queue_id).is_file()
    assert (root / "data" / env.queue_id).is_file()
    assert listing(root, "tmp") == []
    for q in ("active", "deferred", "hold", "corrupt"):
        assert listing(root, q) == []


def test_read_errors(spool: Spool, root: Path) -> None:
    env = spool.enqueue(make_env(), b"x")
    with pytest.raises(EntryGone):
        spool.read("deferred", env.queue_id)
    with pytest.raises(EntryGone):
        spool.mtime("deferred", env.queue_id)
    # A well-formed envelope under the wrong name is corrupt, not another message.
    other = replace(env, queue_id="ABCDEF12345")
    (root / "incoming" / env.queue_id).write_bytes(envfmt.dumps(other))
    with pytest.raises(CorruptEntry, match="ABCDEF12345"):
        spool.read("incoming", env.queue_id)
    (root / "data" / env.queue_id).write_bytes(b"xy")
    with pytest.raises(CorruptEntry, match="2 bytes"):
        spool.read_content(env.queue_id, 1)
    with pytest.raises(CorruptEntry):
        spool.read_content_check(env.queue_id, 1)
    spool.read_content_check(env.queue_id, 2)
    (root / "data" / env.queue_id).unlink()
    with pytest.raises(CorruptEntry, match="missing"):
        spool.read_content(env.queue_id)
    with pytest.raises(CorruptEntry, match="missing"):
        spool.read_content_check(env.queue_id, 1)


# --- the envelope text format ----------------------------------------------------------

texts = st.text(max_size=30)  # any unicode: quotes, backslashes, newlines, NUL
times = st.floats(allow_nan=False)
recipients = st.builds(
    Recipient,
    address=texts,
    state=st.sampled_from(RcptState),
    reason=texts,
    dsn=texts,
    remote_mta=texts,
    notified=st.booleans(),
)
envelopes = st.builds(
    Envelope,
    queue_id=st.from_regex(r"[0-9A-F]{11}", fullmatch=True),
    sender=texts,
    recipients=st.lists(recipients, max_size=4).map(tuple),
    arrival_time=times,
    size=st.integers(0, 2**53),
    client_name=texts,
    client_address=texts,
    helo_name=texts,
    protocol=st.sampled_from(["SMTP", "ESMTP", "ESMTPS", "ESMTPA"]),
    auth_user=texts,
    message_id=texts,
    attempts=st.integers(0, 10_000),
    next_attempt=times,
    last_attempt=times,
    held_seconds=times,
    warned=st.booleans(),
    forced_expire=st.booleans(),
    sender_fullname=texts,
)


@settings(max_examples=300, deadline=None)
@given(envelopes)
def test_envelope_round_trip(env: Envelope) -> None:
    raw = envfmt.dumps(env)
    raw.decode("ascii")
    assert raw.startswith(b"relay-envelope 1\n") and raw.endswith(b"\nend\n")
    assert raw.count(b"\n") == 3  # newlines in reasons never break the line format
    assert envfmt.loads(raw) == env


@settings(max_examples=100, deadline=None)
@given(envelopes)
def test_every_truncation_is_corrupt(env: Envelope) -> None:
    raw = envfmt.dumps(env)
    for n in range(len(raw)):
        with pytest.raises(CorruptEntry):
            envfmt.loads(raw[:n])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_loads_garbage_raises_only_corrupt_entry(raw: bytes) -> None:
    with contextlib.suppress(CorruptEntry):
        envfmt.loads(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes, st.data())
def test_loads_mutated_envelope_raises_only_corrupt_entry(
    env: Envelope, data: st.DataObject
) -> None:
    raw = bytearray(envfmt.dumps(env))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    try:
        parsed = envfmt.loads(bytes(raw))
    except CorruptEntry:
        return
    assert isinstance(parsed, Envelope)


GOOD = envfmt.dumps(replace(make_env(), queue_id="0123456789A"))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\n",
        b"end\n",
        b"\x00\xff\xfe",
        GOOD[:-1],  # no final newline
        GOOD.replace(b"\nend\n", b"\n"),  # no end marker
        GOOD.replace(b"\nend\n", b"\nEND\n"),
        GOOD + b"extra\n",
        GOOD.replace(b"relay-envelope 1", b"relay-envelope 2"),
        GOOD.replace(b"rcpt@", "rcpt\u00e9@".encode()),  # not ASCII
        b"relay-envelope 1\n[]\nend\n",
        b"relay-envelope 1\nnull\nend\n",
        b'relay-envelope 1\n"text"\nend\n',
        b"relay-envelope 1\n{}\nend\n",
        b"relay-envelope 1\n{not json}\nend\n",
        GOOD.replace(b'"state":"pending"', b'"state":"maybe"'),
        GOOD.replace(b'"state":"pending"', b'"state":[1]'),
        GOOD.replace(b'"attempts":0', b'"attempts":0,"surprise":1'),
        GOOD.replace(b'"sender":"sender@example.com"', b'"sender":5'),
        GOOD.replace(b'"queue_id":"0123456789A"', b'"queue_id":null'),
        GOOD.replace(b'"recipients":[', b'"recipients":[1,'),
        GOOD.replace(b'"recipients":[{', b'"recipients":[{"bogus":1,'),
        # A pathological nesting must not escape as RecursionError.
        b"relay-envelope 1\n" + b"[" * 100_000 + b"\nend\n",
    ],
)
def test_loads_rejects(raw: bytes) -> None:
    assert envfmt.loads(GOOD).queue_id == "0123456789A"
    with pytest.raises(CorruptEntry):
        envfmt.loads(raw)


# An envelope as relay wrote it before sender_fullname had a field of its own (sendmail -F
# went into "extra") and while each recipient still had an "orig_address" (always "").
OLD_FORMAT = (
    b'relay-envelope 1\n'
    b'{"queue_id":"4F2A31C0D2B","sender":"ann@example.org","recipients":['
    b'{"address":"bob@example.net","state":"pending","reason":"","dsn":"","remote_mta":"",'
    b'"orig_address":"","notified":false,"dsn_notify":"","dsn_orcpt":"","dsn_action":""},'
    b'{"address":"carol@example.net","state":"sent","reason":"250 ok","dsn":"2.0.0",'
    b'"remote_mta":"mx.example.net","orig_address":"","notified":false,"dsn_notify":"",'
    b'"dsn_orcpt":"","dsn_action":""}],"arrival_time":1700000000.25,"size":332,'
    b'"client_name":"localhost","client_address":"127.0.0.1","helo_name":"","protocol":"local",'
    b'"auth_user":"","message_id":"","attempts":0,"next_attempt":0.0,"last_attempt":0.0,'
    b'"held_seconds":0.0,"warned":false,"forced_expire":false,'
    b'"extra":{"sender_fullname":"Ann Lee"},"dsn_envid":"","dsn_ret":"","smtputf8":false,'
    b'"requiretls":false}\n'
    b'end\n'
)


def test_an_envelope_of_the_old_format_still_loads() -> None:
    env = envfmt.loads(OLD_FORMAT)
    assert env == Envelope(
        "4F2A31C0D2B", "ann@example.org",
        (Recipient("bob@example.net"),
         Recipient("carol@example.net", RcptState.SENT, "250 ok", "2.0.0", "mx.example.net")),
        1_700_000_000.25, size=332, protocol="local", sender_fullname="Ann Lee")
    assert envfmt.loads_fields(OLD_FORMAT) == envfmt.as_fields(env)
    # Written again, it is in today's format: the old keys are gone.
    assert b"extra" not in envfmt.dumps(env) and b"orig_address" not in envfmt.dumps(env)
    without_name = OLD_FORMAT.replace(b'{"sender_fullname":"Ann Lee"}', b"{}")
    assert envfmt.loads(without_name) == replace(env, sender_fullname="")


# --- locked(): write, move, write_and_move, remove ----------------------------------------


def test_locked_write(spool: Spool, root: Path) -> None:
    env = spool.enqueue(make_env(rcpts=("a@x.example", "b@x.example")), b"m")
    new = env.with_recipients(
        (
            replace(env.recipients[0], state=RcptState.SENT, reason="250 ok", dsn="2.0.0"),
            replace(env.recipients[1], reason='said: "later"\n', dsn="4.4.1"),
        )
    )
    with spool.locked(env.queue_id) as entry:
        assert entry.queue == "incoming"
        assert entry.read() == env
        entry.write(new)
        assert entry.read() == new
        with pytest.raises(ValueError):
            entry.write(replace(new, queue_id="ABCDEF12345"))
        with pytest.raises(ValueError):
            entry.move("nowhere")
    assert spool.read("incoming", env.queue_id) == new
    assert listing(root, "tmp") == []


def test_locked_move_applies_mtime(spool: Spool, root: Path) -> None:
    env = spool.enqueue(make_env(), b"m")
    with spool.locked(env.queue_id) as entry:
        entry.move("active")
        assert entry.queue == "active"
        entry.move("deferred", mtime=2_000_000_000.0)
        assert entry.queue == "deferred"
        assert entry.mtime() == 2_000_000_000.0
        entry.move("deferred", mtime=2_000_000_100.0)  # same queue: only the time changes
    assert listing(root, "deferred") == [env.queue_id]
    assert spool.mtime("deferred", env.queue_id) == 2_000_000_100.0
    for q in ("incoming", "active", "hold", "corrupt"):
        assert listing(root, q) == []
    # A move without a time keeps the time (rename keeps mtime): hold and release.
    with spool.locked(env.queue_id) as entry:
        entry.move("hold")
    assert spool.mtime("hold", env.queue_id) == 2_000_000_100.0
    assert spool.read("hold", env.queue_id) == env


def test_locked_write_and_move_defers(spool: Spool, root: Path) -> None:
    env = spool.enqueue(make_env(), b"m")
    with spool.locked(env.queue_id) as entry:
        entry.move("active")
    deferred = replace(
        env,
        attempts=1,
        next_attempt=1_900_000_000.0,
        recipients=(replace(env.recipients[0], reason="connect refused", dsn="4.4.1"),),
    )
    with spool.locked(env.queue_id) as entry:
        entry.write_and_move(deferred, "deferred", mtime=1_900_000_000.0)
        assert entry.queue == "deferred"
    assert spool.locate(env.queue_id) == "deferred"
    assert spool.read("deferred", env.queue_id) == deferred
    assert os.stat(root / "deferred" / env.queue_id).st_mtime == 1_900_000_000.0
    assert [(e.queue_id, e.mtime) for e in spool.scan("deferred")] == [
        (env.queue_id, 1_900_000_000.0)
    ]
    assert listing(root, "active") == []
    assert listing(root, "tmp") == []


def test_locked_remove(spool: Spool, root: Path) -> None:
    env = spool.enqueue(make_env(), b"m")
    keep = spool.enqueue(make_env(), b"k")
    with spool.locked(env.queue_id) as entry:
        entry.move("hold")
        entry.remove()
    assert spool.locate(env.queue_id) is None
    assert not (root / "hold" / env.queue_id).exists()
    assert not (root / "data" / env.queue_id).exists()
    assert listing(root, "data") == [keep.queue_id]
    with pytest.raises(EntryGone), spool.locked(env.queue_id):
        pass


def test_locked_unknown_or_unqueued_ids(spool: Spool) -> None:
    with pytest.raises(EntryGone), spool.locked("0123456789A"):
        pass
    # A reservation (data/ID without envelope) is not a message yet.
    res = spool.reserve()
    with pytest.raises(EntryGone), spool.locked(res.queue_id):
        pass
    # Only the queues asked for are searched.
    env = spool.enqueue(make_env(), b"m")
    with pytest.raises(EntryGone), spool.locked(env.queue_id, queues=("deferred", "hold")):
        pass


@pytest.mark.parametrize("bad", ["../x", "../../x", "..", ".", "", "a/b", "/x", "x\x00y"])
def test_locked_invalid_ids_never_leave_the_spool(tmp_path: Path, bad: str) -> None:
    spool = Spool(str(tmp_path / "q" / "spool"))
    # Decoys where a naive join would land: QUEUE/../x and data/../x is spool/x,
    # ../../x is tmp_path/q/x.  If locked() resolved them it would find "messages".
    decoys = [tmp_path / "q" / "spool" / "x", tmp_path / "q" / "x"]
    for d in decoys:
        d.write_bytes(b"decoy")
    before = {p: p.stat() for p in tmp_path.rglob("*")}
    with pytest.raises(EntryGone), spool.locked(bad) as entry:
        entry.remove()
    after = {p: p.stat() for p in tmp_path.rglob("*")}
    assert before.keys() == after.keys()
    for d in decoys:
        assert d.read_bytes() == b"decoy"


def test_locked_excludes_threads_and_reports_removed_while_waiting(spool: Spool) -> None:
    env = spool.enqueue(make_env(), b"m")
    holding = threading.Event()
    outcome: list[object] = []

    def remover() -> None:
        with spool.locked(env.queue_id) as entry:
            holding.set()
            time.sleep(0.3)
            entry.remove()

    t = threading.Thread(target=remover)
    t.start()
    assert holding.wait(5)
    t0 = time.monotonic()
    try:
        with spool.locked(env.queue_id) as entry:
            outcome.append(entry.queue)
    except EntryGone:
        outcome.append("gone")
    waited = time.monotonic() - t0
    t.join(5)
    assert outcome == ["gone"]
    assert waited >= 0.15  # it really waited for the lock instead of racing ahead


def test_locked_detects_a_reused_id_while_waiting(spool: Spool, root: Path) -> None:
    # The holder removes the message and a new one appears under the same ID (a new
    # data inode): the waiter locked the old inode, so it must not touch the new one.
    env = spool.enqueue(make_env(), b"old")
    holding = threading.Event()

    def replacer() -> None:
        with spool.locked(env.queue_id) as entry:
            holding.set()
            time.sleep(0.3)
            entry.remove()
            (root / "data" / env.queue_id).write_bytes(b"new")
            (root / "incoming" / env.queue_id).write_bytes(envfmt.dumps(replace(env, size=3)))

    t = threading.Thread(target=replacer)
    t.start()
    assert holding.wait(5)
    with pytest.raises(EntryGone), spool.locked(env.queue_id):
        pass
    t.join(5)
    with spool.locked(env.queue_id) as entry:  # a fresh attempt sees the new message
        assert entry.read().size == 3


CHILD_HOLDS_LOCK = """
import sys, time
from spool import Spool
with Spool(sys.argv[1]).locked(sys.argv[2]) as entry:
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
    entry.move("hold")
print("released", flush=True)
"""


def test_locked_excludes_another_process(spool: Spool) -> None:
    env = spool.enqueue(make_env(), b"m")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_HOLDS_LOCK, spool.root, env.queue_id, "1.0"],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"locked\n"
        t0 = time.monotonic()
        with spool.locked(env.queue_id) as entry:
            waited = time.monotonic() - t0
            # The child moved it before letting go: we see its state, not a stale one.
            assert entry.queue == "hold"
            assert entry.read() == env
        assert waited >= 0.5
        assert child.stdout.readline() == b"released\n"
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# --- scan --------------------------------------------------------------------------------


def test_scan_streams_names_and_mtimes(spool: Spool, root: Path) -> None:
    ids = []
    for i in range(5):
        env = spool.enqueue(make_env(), b"m")
        with spool.locked(env.queue_id) as entry:
            entry.move("deferred", mtime=1_800_000_000.0 + i)
        ids.append(env.queue_id)
    (root / "deferred" / "stray.txt").write_bytes(b"junk")
    it = spool.scan("deferred")
    first = next(it)  # a generator: yields before listing everything
    got = {first.queue_id: first.mtime, **{e.queue_id: e.mtime for e in it}}
    assert set(got) == {*ids, "stray.txt"}
    for i, qid in enumerate(ids):
        assert got[qid] == 1_800_000_000.0 + i
    assert all(e.queue == "deferred" for e in spool.scan("deferred"))
    assert list(spool.scan("no-such-queue")) == []
    # envelopes() skips the junk name but reads the rest.
    assert sorted(env.queue_id for _, env in spool.envelopes(["deferred"])) == sorted(ids)


def test_scan_of_20000_deferred_entries_reads_no_envelope(spool: Spool, root: Path) -> None:
    # Every envelope is garbage: if scan() parsed (or needed) envelope content it
    # would fail or skip entries.  The next attempt time comes from stat() alone.
    deferred = root / "deferred"
    names = [f"{i:011X}" for i in range(20_000)]
    for name in names:
        fd = os.open(deferred / name, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"\x00garbage, not an envelope")
        os.close(fd)
    for i in range(0, 20_000, 997):
        os.utime(deferred / names[i], (1_800_000_000.0 + i, 1_800_000_000.0 + i))
    entries = {e.queue_id: e.mtime for e in spool.scan("deferred")}
    assert len(entries) == 20_000
    assert set(entries) == set(names)
    for i in range(0, 20_000, 997):
        assert entries[names[i]] == 1_800_000_000.0 + i
    assert list(spool.envelopes(["deferred"])) == []  # unreadable ones are skipped


# --- quarantine ------------------------------------------------------------------------


def test_quarantine_keeps_every_file_under_a_unique_name(spool: Spool, root: Path) -> None:
    (root / "incoming" / "junk").write_bytes(b"one")
    (root / "deferred" / "junk").write_bytes(b"two")
    (root / "hold" / "junk").write_bytes(b"three")
    assert spool.quarantine("incoming", "junk") == "junk"
    assert spool.quarantine("deferred", "junk") == "junk.1"
    assert spool.quarantine("hold", "junk") == "junk.2"
    assert {n: (root / "corrupt" / n).read_bytes() for n in listing(root, "corrupt")} == {
        "junk": b"one",
        "junk.1": b"two",
        "junk.2": b"three",
    }
    for q in ("incoming", "deferred", "hold"):
        assert listing(root, q) == []
    with pytest.raises(EntryGone):
        spool.quarantine("incoming", "junk")


def test_quarantine_corrupt_envelope_keeps_its_data(spool: Spool, root: Path) -> None:
    env = spool.enqueue(make_env(), b"content")
    (root / "incoming" / env.queue_id).write_bytes(b"relay-envelope 1\n{trunc")
    with pytest.raises(CorruptEntry):
        spool.read("incoming", env.queue_id)
    assert spool.quarantine("incoming", env.queue_id) == env.queue_id
    assert (root / "corrupt" / env.queue_id).read_bytes() == b"relay-envelope 1\n{trunc"
    assert spool.locate(env.queue_id) == "corrupt"
    # cleanup() counts corrupt/ as a queue: the content stays for the admin.
    assert spool.cleanup(now=time.time() + 10 * 86400) == []
    assert (root / "data" / env.queue_id).read_bytes() == b"content"


# --- cleanup ---------------------------------------------------------------------------


def test_cleanup_removes_only_old_unacknowledged_files(spool: Spool, root: Path) -> None:
    now = 1_800_000_000.0
    old, young = now - 86400 - 10, now - 3600

    def age(path: Path, t: float) -> None:
        os.utime(path, (t, t))

    kept_in = {}
    for q in LIVE_QUEUES:
        env = spool.enqueue(make_env(), q.encode())
        if q != "incoming":
            with spool.locked(env.queue_id) as entry:
                entry.move(q)
        age(root / "data" / env.queue_id, old)
        age(root / q / env.queue_id, old)
        kept_in[env.queue_id] = q
    orphan_old = spool.reserve().queue_id
    orphan_young = spool.reserve().queue_id
    age(root / "data" / orphan_old, old)
    age(root / "data" / orphan_young, young)
    for name, t in (("A1B2C3D4E5F.1.2", old), ("paused.99", old), ("F5E4D3C2B1A.1.2", young)):
        (root / "tmp" / name).write_bytes(b"partial")
        age(root / "tmp" / name, t)

    removed = spool.cleanup(now=now)

    assert sorted(removed) == sorted([f"data/{orphan_old}", "tmp/A1B2C3D4E5F.1.2", "tmp/paused.99"])
    assert listing(root, "tmp") == ["F5E4D3C2B1A.1.2"]
    assert set(listing(root, "data")) == {*kept_in, orphan_young}
    for qid, q in kept_in.items():
        assert spool.read_content(qid) == q.encode()
    assert spool.cleanup(now=now) == []
    # max_age is honoured: with 0 the young leftovers go too.
    assert sorted(spool.cleanup(now=now, max_age=0)) == sorted(
        [f"data/{orphan_young}", "tmp/F5E4D3C2B1A.1.2"]
    )


# --- fault hooks -----------------------------------------------------------------------


def assert_nothing_left(root: Path) -> None:
    for sub in ("tmp", "data", *store.QUEUES):
        assert listing(root, sub) == [], sub


def test_enospc_at_data_written_raises_spool_full_and_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"), fault=fault_hook_from("enqueue.data_written:enospc"))
    root = Path(spool.root)
    for _ in range(3):  # without a count the disk stays full
        with pytest.raises(SpoolFull):
            spool.enqueue(make_env(), b"x" * 10_000)
        assert_nothing_left(root)


@pytest.mark.parametrize(
    "step",
    ["enqueue.data_written", "enqueue.envelope_written", "enqueue.before_rename"],
)
def test_enospc_once_then_space_is_back(tmp_path: Path, step: str) -> None:
    spool = Spool(str(tmp_path / "spool"), fault=fault_hook_from(f"{step}:enospc:1"))
    root = Path(spool.root)
    with pytest.raises(SpoolFull):
        spool.enqueue(make_env(), b"first")
    assert_nothing_left(root)
    env = spool.enqueue(make_env(), b"second")
    assert listing(root, "incoming") == [env.queue_id]
    assert listing(root, "data") == [env.queue_id]
    assert spool.read_content(env.queue_id) == b"second"
    assert listing(root, "tmp") == []


def test_eio_is_a_spool_error_but_not_spool_full(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"), fault=fault_hook_from("enqueue.data_written:eio"))
    with pytest.raises(SpoolError) as exc:
        spool.enqueue(make_env(), b"x")
    assert not isinstance(exc.value, SpoolFull)
    assert_nothing_left(Path(spool.root))


def test_fault_in_update_keeps_the_old_envelope(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"), fault=fault_hook_from("update.before_rename:enospc:1"))
    root = Path(spool.root)
    env = spool.enqueue(make_env(), b"x")
    with spool.locked(env.queue_id) as entry:
        with pytest.raises(SpoolFull):
            entry.write(replace(env, attempts=1))
        assert entry.read() == env
        entry.write(replace(env, attempts=2))
    assert spool.read("incoming", env.queue_id).attempts == 2
    assert listing(root, "tmp") == []


def test_fault_hook_spec_parsing() -> None:
    assert fault_hook_from("") is None
    assert fault_hook_from(" , ") is None
    hook = fault_hook_from("a:enospc:2, b:eio")
    assert hook is not None
    hook("unrelated.step")
    for _ in range(2):
        with pytest.raises(OSError) as exc:
            hook("a")
        assert exc.value.errno == 28
    hook("a")  # used up
    with pytest.raises(OSError):
        hook("b")


# --- durability order -------------------------------------------------------------------


def test_step_order_fsync_before_rename_and_dir_fsync_before_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power-loss safety rests on this order; a Python crash test cannot show it."""
    events: list[tuple[str, str]] = []
    spool = Spool(str(tmp_path / "spool"), fault=lambda step: events.append(("step", step)))
    real_fsync, real_rename, real_unlink = os.fsync, os.rename, os.unlink

    def rel(path: str) -> str:
        return os.path.relpath(path, spool.root)

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", rel(os.readlink(f"/proc/self/fd/{fd}"))))

    def rename(src: str, dst: str) -> None:
        real_rename(src, dst)
        events.append(("rename", f"{rel(src)} -> {rel(dst)}"))

    def unlink(path: str) -> None:
        real_unlink(path)
        events.append(("unlink", rel(path)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "unlink", unlink)

    env = spool.enqueue(make_env(), b"content")
    events.append(("returned", "commit"))
    qid = env.queue_id
    kinds = [e[0] for e in events]
    at = {e: i for i, e in enumerate(events)}
    tmp_fsyncs = [i for i, e in enumerate(events) if e[0] == "fsync" and e[1].startswith("tmp/")]
    renames = [i for i, k in enumerate(kinds) if k == "rename"]
    assert len(renames) == 1 and len(tmp_fsyncs) == 1
    rename_i = renames[0]
    assert events[rename_i][1].endswith(f" -> incoming/{qid}")
    assert at[("fsync", f"data/{qid}")] < rename_i  # content durable first
    assert tmp_fsyncs[0] < rename_i  # envelope durable before it is visible
    assert at[("fsync", "data")] < rename_i  # data/ID's name durable too
    assert rename_i < at[("fsync", "incoming")] < at[("step", "enqueue.committed")]
    assert at[("step", "enqueue.committed")] < at[("returned", "commit")]

    events.clear()
    with spool.locked(qid) as entry:
        entry.move("active")
        events.clear()
        entry.write_and_move(replace(env, attempts=1), "deferred", mtime=1_900_000_000.0)
    names = [f"{k} {v}" for k, v in events if k != "step"]
    tmp_name = names[0].split()[1]
    assert names == [
        f"fsync {tmp_name}",
        f"rename {tmp_name} -> active/{qid}",
        "fsync active",
        f"rename active/{qid} -> deferred/{qid}",
        "fsync deferred",
    ]

    events.clear()
    with spool.locked(qid) as entry:
        entry.remove()
    names = [f"{k} {v}" for k, v in events if k != "step"]
    # The envelope goes first (and durably): a crash can leave content without an
    # envelope (cleaned up later), never an envelope without content.
    assert names == [f"unlink deferred/{qid}", "fsync deferred", f"unlink data/{qid}"]


# --- group commit ---------------------------------------------------------------------------


def test_dirsync_group_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    fsyncs: list[tuple[float, float]] = []
    record = threading.Lock()

    def slow_fsync(fd: int) -> None:
        start = time.monotonic()
        time.sleep(0.02)  # make the fsyncs overlap with new arrivals
        real_fsync(fd)
        with record:
            fsyncs.append((start, time.monotonic()))

    monkeypatch.setattr(os, "fsync", slow_fsync)
    ds = store._DirSync(str(tmp_path))
    n = 40
    barrier = threading.Barrier(n)
    spans: list[tuple[float, float] | None] = [None] * n

    def caller(i: int) -> None:
        barrier.wait()
        t0 = time.monotonic()
        ds.sync()
        spans[i] = (t0, time.monotonic())

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert all(s is not None for s in spans)
    assert 1 <= len(fsyncs) < n
    # Nobody returned on the strength of an fsync that began before it asked.
    for span in spans:
        assert span is not None
        t0, t1 = span
        assert any(t0 <= start and end <= t1 for start, end in fsyncs)

    fsyncs.clear()
    for _ in range(3):  # alone, each caller gets its own fsync
        ds.sync()
    assert len(fsyncs) == 3


def test_dirsync_error_reaches_the_caller_and_the_next_one_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    fail = [True]

    def flaky(fd: int) -> None:
        if fail.pop(0) if fail else False:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky)
    ds = store._DirSync(str(tmp_path))
    with pytest.raises(OSError):
        ds.sync()
    ds.sync()


# --- pauses ------------------------------------------------------------------------------


def test_pauses_persist_across_instances(spool: Spool, root: Path) -> None:
    assert spool.pauses() == frozenset()
    assert spool.set_paused("example.com", True) is True
    assert spool.set_paused("example.com", True) is False
    assert spool.set_paused("nexthop:[10.0.0.1]:25", True) is True
    assert Spool(spool.root).pauses() == {"example.com", "nexthop:[10.0.0.1]:25"}
    assert Spool(spool.root).set_paused("example.com", False) is True
    assert spool.set_paused("example.com", False) is False
    assert spool.pauses() == {"nexthop:[10.0.0.1]:25"}
    assert Spool(spool.root).set_paused("nexthop:[10.0.0.1]:25", False) is True
    assert Spool(spool.root).pauses() == frozenset()
    assert listing(root, "tmp") == []
