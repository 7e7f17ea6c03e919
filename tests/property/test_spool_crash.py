"""An abrupt stop at any step of any spool operation never loses or half-shows a message.

What this models: process death (SIGKILL, os._exit, OOM kill).  The spool's fault
hook raises a private ``Crash(BaseException)`` at the N-th hook call; nothing in the
spool catches BaseException, so no error-path cleanup runs, exactly as if the process
had died there.  The file system keeps whatever the kernel was told so far.  Two
differences from a real kill, both harmless here: ``finally`` blocks still close
file descriptors (the kernel does that on death too), and a ``with open()`` block
flushes Python's buffer (only for content not yet committed, which is then discarded
anyway).  The last test kills a real child process with ``os._exit`` to cover that.

What this does NOT model: power loss.  An exception cannot drop un-fsynced page
cache, so durability against power loss rests on the order fsync(file) -> rename ->
fsync(directory) before acknowledging; tests/unit/test_spool.py checks that order
step by step (test_step_order_fsync_before_rename_and_dir_fsync_before_return).

After the crash a fresh ``Spool`` is opened on the same directory ("restart"),
``cleanup(now=far future)`` runs, and the invariants hold:

1. every acknowledged message that no completed remove() took is in exactly one
   queue, its envelope parses and equals the model, its content is what was given;
2. a commit() cut short is absent (crash before the rename into incoming/) or
   complete (after it), never partial;
3. no queue holds an unparsable file, no ID is in two queues;
4. after cleanup tmp/ is empty and data/ holds exactly the IDs that have an envelope;
5. a remove() cut short leaves the message whole or gone from every queue;
6. a write/move cut short leaves the old or the new envelope in the old or the new
   queue; the step the crash hit says which (an envelope changes at
   ``update.renamed``, its queue at ``move.renamed``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from spool import EntryGone, Envelope, RcptState, Recipient, Spool
from spool.store import QUEUES

REPO = Path(__file__).resolve().parents[2]
LIVE_QUEUES = ("incoming", "active", "deferred", "hold")
# Later than any mtime the program sets plus TMP_MAX_AGE: cleanup removes every leftover.
FAR_FUTURE = 4_000_000_000.0


Op = tuple[Any, ...]


class Crash(BaseException):
    """The process died here."""


class CrashAt:
    """A fault hook that dies at its n-th call and records the steps of the current op."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0
        self.seen: list[str] = []  # reset by run() at each operation
        self.log: list[str] = []  # every call, never reset
        self.crashed_at: str | None = None

    def __call__(self, step: str) -> None:
        self.seen.append(step)
        self.log.append(step)
        if self.calls == self.n:
            self.crashed_at = step
            raise Crash(step)
        self.calls += 1


@dataclass(frozen=True, slots=True)
class Message:
    queue: str
    env: Envelope
    content: bytes
    mtime: float | None  # the mtime the last completed operation set, if any


# --- the program -----------------------------------------------------------------------

addresses = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12
).map(lambda local: f"{local}@example.net")
reasons = st.text(max_size=40)  # quotes, backslashes, newlines
mtimes = st.integers(1_600_000_000, 2_000_000_000).map(float)
queues = st.sampled_from(LIVE_QUEUES)
pick = st.integers(0, 20)  # an index into the IDs seen so far (removed ones included)

enqueue = st.tuples(
    st.just("enqueue"),
    st.one_of(st.just(""), addresses),
    st.lists(addresses, min_size=1, max_size=3),
    st.binary(max_size=200),
)
move = st.tuples(st.just("move"), pick, queues, st.one_of(st.none(), mtimes))
write = st.tuples(st.just("write"), pick, st.integers(0, 2), st.sampled_from(RcptState), reasons)
write_and_move = st.tuples(st.just("write_and_move"), pick, queues, mtimes, reasons)
remove = st.tuples(st.just("remove"), pick)
# Repeats weight the choice: a remove ends a message's story, so it comes less often.
ops = st.one_of(enqueue, move, move, write, write, write_and_move, write_and_move, remove)
# A few messages first, so that most operations find something to work on.
programs = st.builds(
    lambda first, rest: first + rest,
    st.lists(enqueue, min_size=1, max_size=3),
    st.lists(ops, min_size=2, max_size=12),
)


def new_recipients(env: Envelope, which: int, state: RcptState, reason: str) -> Envelope:
    rcpts = list(env.recipients)
    i = which % len(rcpts)
    rcpts[i] = replace(rcpts[i], state=state, reason=reason, dsn="4.4.1")
    return env.with_recipients(tuple(rcpts))


# --- running it --------------------------------------------------------------------------


@dataclass
class Pending:
    """The operation the crash interrupted."""

    kind: str
    queue_id: str
    before: Message | None  # None for an enqueue
    after: Message | None  # None for a remove


def run(
    root: str, program: list[Op], hook: CrashAt
) -> tuple[dict[str, Message], set[str], Pending | None]:
    spool = Spool(root, fault=hook)
    live: dict[str, Message] = {}
    removed: set[str] = set()
    known: list[str] = []
    pending: Pending | None = None
    try:
        for op in program:
            hook.seen = []
            kind = op[0]
            if kind == "enqueue":
                _, sender, rcpts, content = op
                given_env = Envelope(
                    queue_id="",
                    sender=sender,
                    recipients=tuple(Recipient(r) for r in rcpts),
                    arrival_time=1_700_000_000.5,
                )
                res = spool.reserve()
                expect = replace(given_env, queue_id=res.queue_id, size=len(content))
                known.append(res.queue_id)
                message = Message("incoming", expect, content, None)
                pending = Pending("enqueue", res.queue_id, None, message)
                env = spool.commit(res, given_env, [content])
                assert env == expect
                live[res.queue_id] = message
                pending = None
                continue
            if not known:
                continue
            qid = known[op[1] % len(known)]
            if qid in removed:
                with pytest.raises(EntryGone), spool.locked(qid):
                    pass
                continue
            old = live[qid]
            with spool.locked(qid) as entry:
                assert entry.queue == old.queue
                assert entry.read() == old.env
                if kind == "move":
                    _, _, dst, mtime = op
                    keep = old.mtime if mtime is None else mtime
                    new = replace(old, queue=dst, mtime=keep)
                    pending = Pending(kind, qid, old, new)
                    entry.move(dst, mtime)
                elif kind == "write":
                    _, _, which, state, reason = op
                    env = new_recipients(old.env, which, state, reason)
                    new = replace(old, env=env, mtime=None)
                    pending = Pending(kind, qid, old, new)
                    entry.write(env)
                elif kind == "write_and_move":
                    _, _, dst, mtime, reason = op
                    env = new_recipients(
                        replace(old.env, attempts=old.env.attempts + 1, next_attempt=mtime),
                        0,
                        RcptState.PENDING,
                        reason,
                    )
                    new = Message(dst, env, old.content, mtime)
                    pending = Pending(kind, qid, old, new)
                    entry.write_and_move(env, dst, mtime)
                elif kind == "remove":
                    pending = Pending(kind, qid, old, None)
                    entry.remove()
                else:
                    raise AssertionError(kind)
                assert entry.queue == (pending.after.queue if pending.after else old.queue)
            if pending.after is None:
                del live[qid]
                removed.add(qid)
            else:
                live[qid] = pending.after
            pending = None
    except Crash:
        assert pending is not None, "the crash hit outside any modelled operation"
        return live, removed, pending
    assert hook.crashed_at is None
    return live, removed, None


def expected_after_crash(p: Pending, seen: list[str]) -> Message | None:
    """Where the interrupted operation left its message, from the steps it reached."""
    if p.kind == "enqueue":
        return p.after if "enqueue.renamed" in seen else None
    assert p.before is not None
    if p.kind == "remove":
        return None if "remove.envelope_gone" in seen else p.before
    assert p.after is not None
    env = p.after.env if "update.renamed" in seen else p.before.env
    queue = p.after.queue if "move.renamed" in seen else p.before.queue
    return Message(queue, env, p.before.content, None)


# --- checking the restarted spool -----------------------------------------------------------


def queue_contents(spool: Spool) -> dict[str, str]:
    """ID -> queue for every file in every queue; invariant 3 on the way."""
    where: dict[str, str] = {}
    for queue in QUEUES:
        for name in os.listdir(os.path.join(spool.root, queue)):
            assert name not in where, f"{name} in {where[name]}/ and {queue}/"
            where[name] = queue
            spool.read(queue, name)  # parses, and names itself: else CorruptEntry
    return where


def check(
    root: str, live: dict[str, Message], removed: set[str], pending: Pending | None, seen: list[str]
) -> None:
    spool = Spool(root)  # the restart
    expected = dict(live)
    if pending is not None:
        assert expected.pop(pending.queue_id, None) == pending.before
        survivor = expected_after_crash(pending, seen)
        if survivor is not None:
            expected[pending.queue_id] = survivor

    where = queue_contents(spool)
    assert where == {qid: m.queue for qid, m in expected.items()}  # 1, 2, 5, 6
    if pending is None:
        # A clean run leaves nothing for cleanup() to do.
        assert os.listdir(os.path.join(root, "tmp")) == []
        assert sorted(os.listdir(os.path.join(root, "data"))) == sorted(expected)

    spool.cleanup(now=FAR_FUTURE)

    assert queue_contents(spool) == where  # cleanup never touches a queue
    assert os.listdir(os.path.join(root, "tmp")) == []  # 4
    assert sorted(os.listdir(os.path.join(root, "data"))) == sorted(expected)  # 4
    for qid, m in expected.items():
        env = spool.read(m.queue, qid)
        assert env == m.env
        assert spool.read_content(qid, env.size) == m.content
        if m.mtime is not None:
            assert spool.mtime(m.queue, qid) == m.mtime
    for qid in removed:
        assert spool.locate(qid, QUEUES) is None
    # Nothing is stuck: the dead "process" held no lock the restart cannot take.
    for qid in expected:
        with spool.locked(qid) as entry:
            entry.move("active")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(program=programs, data=st.data())
def test_crash_at_any_step_keeps_the_invariants(program: list[Op], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="relay-crash-") as tmp:
        dry = CrashAt(10**9)
        run(os.path.join(tmp, "dry"), program, dry)
        # A step name, uniformly among those the program reaches (enqueue steps
        # outnumber the rest), then one of its occurrences; or no crash at all.
        rnd = data.draw(st.randoms(use_true_random=False), label="rnd")
        name = rnd.choice([*sorted(set(dry.log)), "none"])
        hits = [i for i, step in enumerate(dry.log) if step == name] or [len(dry.log)]
        crash_at = rnd.choice(hits)
        root = os.path.join(tmp, "spool")
        hook = CrashAt(crash_at)
        live, removed, pending = run(root, program, hook)
        seen = hook.seen
        event(f"crash in {pending.kind} at {hook.crashed_at}" if pending else "no crash")
        if pending is not None:
            assert hook.crashed_at == seen[-1]
        check(root, live, removed, pending, seen)


STEP_PROGRAM: list[Op] = [
    ("enqueue", "s@example.org", ["r@example.net"], b"body\r\n"),
    ("write_and_move", 0, "deferred", 1_800_000_000.0, "later"),
    ("remove", 0),
]
# Every hook call STEP_PROGRAM makes, in order.  Pinned so that a renamed or
# reordered step cannot silently turn the model above into a weaker one.
STEPS = [
    "enqueue.data_written",
    "enqueue.envelope_written",
    "enqueue.before_rename",
    "enqueue.renamed",
    "enqueue.committed",
    "update.tmp_written",
    "update.before_rename",
    "update.renamed",
    "move.before_rename",
    "move.renamed",
    "remove.envelope_gone",
]


def test_step_names_and_order() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        hook = CrashAt(10**9)
        _, _, pending = run(os.path.join(tmp, "spool"), STEP_PROGRAM, hook)
    assert pending is None
    assert hook.log == STEPS


@pytest.mark.parametrize("n", range(len(STEPS)), ids=STEPS)
def test_crash_at_each_step(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "spool")
        hook = CrashAt(n)
        live, removed, pending = run(root, STEP_PROGRAM, hook)
        assert hook.crashed_at == STEPS[n]
        assert pending is not None
        check(root, live, removed, pending, hook.seen)


# --- a real process death ------------------------------------------------------------------------

CHILD = """
import sys
from dataclasses import replace
from spool import Envelope, Recipient, Spool
from spool.store import fault_hook_from
root, spec, content = sys.argv[1], sys.argv[2], sys.argv[3].encode()
spool = Spool(root, fault=fault_hook_from(spec))
env = spool.enqueue(Envelope("", "s@example.org", (Recipient("r@example.net"),), 1.0), content)
print(env.queue_id, flush=True)
with spool.locked(env.queue_id) as entry:
    entry.move("active")
    entry.write_and_move(replace(entry.read(), attempts=1), "deferred", 1_800_000_000.0)
    print("deferred", flush=True)
    entry.remove()
print("done", flush=True)
"""


@pytest.mark.parametrize(
    ("spec", "survivor"),
    [
        ("enqueue.data_written:exit", None),
        ("enqueue.before_rename:exit", None),
        ("enqueue.renamed:exit", ("incoming", 0)),
        ("move.before_rename:exit", ("incoming", 0)),  # the first move: incoming -> active
        ("move.renamed:exit", ("active", 0)),
        ("update.before_rename:exit", ("active", 0)),
        ("update.renamed:exit", ("active", 1)),  # new envelope, old queue
        ("remove.envelope_gone:exit", None),
    ],
)
def test_os_exit_in_a_child_process(
    tmp_path: Path, spec: str, survivor: tuple[str, int] | None
) -> None:
    """os._exit as the fault: a real process death, unflushed Python buffers and all."""
    root = str(tmp_path / "spool")
    content = "x" * 5000
    child = subprocess.run(
        [sys.executable, "-c", CHILD, root, spec, content],
        capture_output=True,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
    )
    assert child.returncode == 99, child.stderr.decode()
    spool = Spool(root)
    where = queue_contents(spool)
    spool.cleanup(now=FAR_FUTURE)
    assert os.listdir(os.path.join(root, "tmp")) == []
    if survivor is None:
        assert where == {}
        assert os.listdir(os.path.join(root, "data")) == []
        return
    [(qid, queue)] = where.items()
    env = spool.read(queue, qid)
    assert (queue, env.attempts) == survivor
    assert spool.read_content(qid, env.size) == content.encode()
    assert os.listdir(os.path.join(root, "data")) == [qid]
