"""Any interleaving of admin actions and delivery steps keeps every message in one place.

A hypothesis state machine drives one in-process Spool (no daemon) through the real
state changes, spool.transitions' rows: the operators' through the functions postsuper
and ``relay queue`` use (hold, release, requeue, remove, expire, retry, and postsuper's
``apply``), interleaved with the three steps the scheduler takes for a delivery, each
under the message's lock as relay.scheduler takes them: activate (incoming/deferred ->
active), record (a recipient's fate, wherever the message is by then) and finish
(remove when done, else defer; leave it alone when an operator moved it).  A model
predicts where each message must be, and what its file's mtime says.  After every step:

* each message is in exactly the queue the model says, or nowhere once gone;
* a message deleted (or finished) never comes back, and its content is gone too;
* a recipient marked sent stays sent, and no other recipient is ever marked sent;
* in hold/ the mtime is when the message was put on hold, in deferred/ when it is due
  (released or retried: then; deferred: its next attempt), whatever happened meanwhile;
* the time on hold is counted exactly once, when the message leaves hold/.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import replace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from relay.cli import postsuper
from relay.cli import queue as queue_cli
from spool import EntryGone, Envelope, RcptState, Recipient, Spool, transitions
from spool.transitions import Transition

QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")
RCPTS = ("a@example.net", "b@example.net", "c@example.com")
RETRY_LATER = 3600.0  # the next attempt the delivery steps decide


# ---- the scheduler's delivery steps, through the transitions relay.scheduler uses -------


def activate(spool: Spool, queue_id: str, now: float) -> bool:
    """Scheduler._move_to_active: only from incoming/ or deferred/."""
    return bool(transitions.change(spool, queue_id, Transition.ACTIVATE,
                                   ("incoming", "deferred"), now=now))


def record_sent(spool: Spool, queue_id: str, address: str, now: float) -> bool:
    """Scheduler._record: mark a recipient delivered in whatever queue it is now."""
    try:
        with spool.locked(queue_id) as entry:
            env = entry.read()
            return transitions.apply(entry, Transition.RECORD, now=now, env=env.with_recipients(
                tuple(replace(r, state=RcptState.SENT, reason="250 ok")
                      if r.address == address and not r.done else r for r in env.recipients)))
    except EntryGone:
        return False


def finish(spool: Spool, queue_id: str, now: float) -> str | None:
    """Scheduler._complete_steps: remove when done, defer when not, leave an operator's
    move alone."""
    try:
        with spool.locked(queue_id) as entry:
            if entry.queue != "active":
                return entry.queue
            env = entry.read()
            if env.finished:
                transitions.apply(entry, Transition.REMOVE, now=now)
                return None
            transitions.apply(entry, Transition.DEFER, now=now, env=replace(
                env, attempts=env.attempts + 1, last_attempt=now,
                next_attempt=now + RETRY_LATER))
            return "deferred"
    except EntryGone:
        return None


# ---- the model ------------------------------------------------------------------------------


OPERATIONS = ("hold", "release", "requeue", "delete", "expire", "expire_release", "retry",
              *(f"apply:{a.name}" for a in postsuper.Action))


class AdminOps(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="relay-admin-ops-")
        self.spool = Spool(os.path.join(self.root, "spool"))
        self.where: dict[str, str | None] = {}  # None: gone for good
        self.sent: dict[str, set[str]] = {}
        self.rcpts: dict[str, tuple[str, ...]] = {}
        self.in_flight: set[str] = set()  # activated, not yet finished
        # What the file's mtime must say in deferred/ (due) and hold/ (held since), and
        # the time on hold counted so far.
        self.mtime: dict[str, float] = {}
        self.held: dict[str, float] = {}
        self.clock = time.time()

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def tick(self) -> float:
        """Each step happens a few seconds after the last one."""
        self.clock += 7.0
        return self.clock

    def _pick(self, data: st.DataObject, ids: Iterable[str]) -> str:
        # In creation order: queue IDs are random, so sorting them would make a replay
        # pick other messages than the run it replays.
        wanted = set(ids)
        return data.draw(st.sampled_from([q for q in self.where if q in wanted]))

    def _moved(self, queue_id: str, before: str | None, after: str | None, now: float,
               due: float | None = None) -> None:
        """The model's side of a change: where the message is, and its mtime's meaning."""
        if before == "hold" and after != "hold" and after is not None:
            self.held[queue_id] += now - self.mtime[queue_id]
        if after == "hold" and before != "hold":
            self.mtime[queue_id] = now
        elif after == "deferred" and before != "deferred":
            self.mtime[queue_id] = now if due is None else due
        self.where[queue_id] = after

    @precondition(lambda self: len(self.where) < 4)
    @rule(n=st.integers(min_value=1, max_value=3))
    def enqueue(self, n: int) -> None:
        rcpts = RCPTS[:n]
        env = self.spool.enqueue(
            Envelope("", "alice@example.org", tuple(Recipient(r) for r in rcpts), self.clock),
            b"Subject: x\r\n\r\nhello\r\n")
        self.where[env.queue_id] = "incoming"
        self.sent[env.queue_id] = set()
        self.rcpts[env.queue_id] = rcpts
        self.held[env.queue_id] = 0.0

    # -- operators: the transitions postsuper and relay queue take --

    @precondition(lambda self: self.where)
    @rule(data=st.data(), op=st.sampled_from(OPERATIONS))
    def operate(self, data: st.DataObject, op: str) -> None:
        queue_id = self._pick(data, self.where)
        queue = self.where[queue_id]
        spool = self.spool
        now = self.tick()
        if op == "hold":
            expected = queue in ("incoming", "active", "deferred")
            assert bool(transitions.change(spool, queue_id, Transition.HOLD, now=now)) is expected
            after = "hold" if expected else queue
        elif op == "release":
            expected = queue == "hold"
            assert bool(transitions.change(spool, queue_id, Transition.RELEASE, now=now)) is \
                expected
            after = "deferred" if expected else queue
        elif op == "requeue":
            assert bool(transitions.change(spool, queue_id, Transition.REQUEUE, now=now)) is (
                queue is not None)
            after = "incoming" if queue else None
        elif op == "delete":
            assert bool(transitions.change(spool, queue_id, Transition.REMOVE, now=now)) is (
                queue is not None)
            after = None
        elif op in ("expire", "expire_release"):
            steps = (Transition.EXPIRE, Transition.RELEASE) if op == "expire_release" else (
                Transition.EXPIRE,)
            released = op == "expire_release" and queue == "hold"
            done = transitions.change(spool, queue_id, steps, now=now)
            assert done == (steps if released else (Transition.EXPIRE,) if queue else ())
            after = "deferred" if released else queue
            if after is not None:
                assert spool.read(after, queue_id).forced_expire
        elif op == "retry":
            assert queue_cli.retry(spool, queue_id, now=now) is (queue == "deferred")
            after = queue
            if queue == "deferred":
                self.mtime[queue_id] = now  # due now
        else:
            # The dispatcher the command line uses, searching the default queues.
            action = postsuper.Action[op.split(":")[1]]
            counters = postsuper.apply(spool, action, queue_id, now=now)
            assert bool(counters) is (queue in postsuper.ACTIONS[action].queues)
            after = queue
            if counters:
                after = {postsuper.Action.DELETE: None, postsuper.Action.HOLD: "hold",
                         postsuper.Action.REQUEUE: "incoming",
                         postsuper.Action.RELEASE: "deferred",
                         postsuper.Action.EXPIRE_RELEASE: "deferred" if queue == "hold"
                         else queue}.get(action, queue)
        self._moved(queue_id, queue, after, now)

    # -- the daemon --

    @precondition(lambda self: self.where)
    @rule(data=st.data())
    def deliver_activate(self, data: st.DataObject) -> None:
        # The scheduler never takes a message it is already working on.
        candidates = set(self.where) - self.in_flight
        if not candidates:
            return
        queue_id = self._pick(data, candidates)
        expected = self.where[queue_id] in ("incoming", "deferred")
        now = self.tick()
        assert activate(self.spool, queue_id, now) is expected
        if expected:
            self._moved(queue_id, self.where[queue_id], "active", now)
            self.in_flight.add(queue_id)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), index=st.integers(min_value=0, max_value=2))
    def deliver_record(self, data: st.DataObject, index: int) -> None:
        queue_id = self._pick(data, self.in_flight)
        address = self.rcpts[queue_id][index % len(self.rcpts[queue_id])]
        expected = self.where[queue_id] is not None
        assert record_sent(self.spool, queue_id, address, self.tick()) is expected
        if expected:
            self.sent[queue_id].add(address)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def deliver_finish(self, data: st.DataObject) -> None:
        queue_id = self._pick(data, self.in_flight)
        self.in_flight.discard(queue_id)
        queue = self.where[queue_id]
        now = self.tick()
        result = finish(self.spool, queue_id, now)
        if queue == "active":
            done = self.sent[queue_id] == set(self.rcpts[queue_id])
            assert result == (None if done else "deferred")
            self._moved(queue_id, queue, result, now, due=now + RETRY_LATER)
        else:
            assert result == queue  # the operator's state wins

    # -- what must always hold --

    @invariant()
    def each_message_in_exactly_its_queue(self) -> None:
        for queue_id, queue in self.where.items():
            found = [q for q in QUEUES if os.path.exists(os.path.join(self.spool.root, q,
                                                                      queue_id))]
            assert found == ([queue] if queue else []), (queue_id, queue, found)
            data = os.path.exists(self.spool.content_path(queue_id))
            assert data is (queue is not None), (queue_id, "content", data)

    @invariant()
    def recipients_sent_stay_sent(self) -> None:
        for queue_id, queue in self.where.items():
            if queue is None:
                continue
            env = self.spool.read(queue, queue_id)
            assert {r.address for r in env.recipients if r.state is RcptState.SENT} == \
                self.sent[queue_id]

    @invariant()
    def mtimes_say_when_due_and_since_when_held(self) -> None:
        for queue_id, queue in self.where.items():
            if queue in ("deferred", "hold"):
                mtime = self.spool.mtime(queue, queue_id)
                assert abs(mtime - self.mtime[queue_id]) < 1e-3, (queue_id, queue, mtime)

    @invariant()
    def time_on_hold_is_counted_once(self) -> None:
        for queue_id, queue in self.where.items():
            if queue is not None:
                held = self.spool.read(queue, queue_id).held_seconds
                assert abs(held - self.held[queue_id]) < 1e-3, (queue_id, held)


AdminOps.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestAdminOps = AdminOps.TestCase
