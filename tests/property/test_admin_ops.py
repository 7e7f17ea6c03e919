"""Any interleaving of admin actions and delivery steps keeps every message in one place.

A hypothesis state machine drives one in-process Spool (no daemon) with the very
functions postsuper and ``relay queue`` use (hold, release, requeue, delete, expire,
retry) interleaved with the three steps the scheduler takes for a delivery, each under
the message's lock as relay.scheduler does: activate (incoming/deferred -> active),
record (mark a recipient sent, wherever the message is by then) and finish (remove
when done, else defer; leave it alone when an operator moved it).  A model predicts
where each message must be.  After every step:

* each message is in exactly the queue the model says, or nowhere once gone;
* a message deleted (or finished) never comes back, and its content is gone too;
* a recipient marked sent stays sent, and no other recipient is ever marked sent;
* time on hold is never negative.
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
from spool import EntryGone, Envelope, RcptState, Recipient, Spool

QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")
RCPTS = ("a@example.net", "b@example.net", "c@example.com")


# ---- the scheduler's delivery steps, as relay.scheduler takes them ---------------------


def activate(spool: Spool, queue_id: str) -> bool:
    """Scheduler._move_to_active: only from incoming/ or deferred/."""
    try:
        with spool.locked(queue_id, ("incoming", "deferred")) as entry:
            entry.read()
            entry.move("active")
            return True
    except EntryGone:
        return False


def record_sent(spool: Spool, queue_id: str, address: str) -> bool:
    """Scheduler._record: mark a recipient delivered in whatever queue it is now."""
    try:
        with spool.locked(queue_id) as entry:
            env = entry.read()
            entry.write(env.with_recipients(tuple(
                replace(r, state=RcptState.SENT, reason="250 ok")
                if r.address == address and not r.done else r for r in env.recipients)))
            return True
    except EntryGone:
        return False


def finish(spool: Spool, queue_id: str) -> str | None:
    """Scheduler._finalize: remove when done, defer when not, leave an operator's move."""
    try:
        with spool.locked(queue_id) as entry:
            if entry.queue != "active":
                return entry.queue
            env = entry.read()
            if env.finished:
                entry.remove()
                return None
            later = time.time() + 3600
            entry.write_and_move(replace(env, attempts=env.attempts + 1, next_attempt=later),
                                 "deferred", mtime=later)
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

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _pick(self, data: st.DataObject, ids: Iterable[str]) -> str:
        # In creation order: queue IDs are random, so sorting them would make a replay
        # pick other messages than the run it replays.
        wanted = set(ids)
        return data.draw(st.sampled_from([q for q in self.where if q in wanted]))

    @precondition(lambda self: len(self.where) < 4)
    @rule(n=st.integers(min_value=1, max_value=3))
    def enqueue(self, n: int) -> None:
        rcpts = RCPTS[:n]
        env = self.spool.enqueue(
            Envelope("", "alice@example.org", tuple(Recipient(r) for r in rcpts), time.time()),
            b"Subject: x\r\n\r\nhello\r\n")
        self.where[env.queue_id] = "incoming"
        self.sent[env.queue_id] = set()
        self.rcpts[env.queue_id] = rcpts

    # -- operators: postsuper's and relay queue's functions --

    @precondition(lambda self: self.where)
    @rule(data=st.data(), op=st.sampled_from(OPERATIONS))
    def operate(self, data: st.DataObject, op: str) -> None:
        queue_id = self._pick(data, self.where)
        queue = self.where[queue_id]
        spool = self.spool
        if op == "hold":
            expected = queue in ("incoming", "active", "deferred")
            assert postsuper.hold(spool, queue_id) is expected
            after = "hold" if expected else queue
        elif op == "release":
            expected = queue == "hold"
            assert postsuper.release(spool, queue_id) is expected
            after = "deferred" if expected else queue
        elif op == "requeue":
            assert postsuper.requeue(spool, queue_id) is (queue is not None)
            after = "incoming" if queue else None
        elif op == "delete":
            assert postsuper.delete(spool, queue_id) is (queue is not None)
            after = None
        elif op in ("expire", "expire_release"):
            release_held = op == "expire_release"
            released = release_held and queue == "hold"
            assert postsuper.expire(spool, queue_id, release_held=release_held) == (
                queue is not None, released)
            after = "deferred" if released else queue
            if after is not None:
                assert spool.read(after, queue_id).forced_expire
        elif op == "retry":
            assert queue_cli.retry(spool, queue_id) is (queue == "deferred")
            after = queue
        else:
            # The dispatcher the command line uses, searching the default queues.
            action = postsuper.Action[op.split(":")[1]]
            counters = postsuper.apply(spool, action, queue_id)
            assert bool(counters) is (queue in postsuper.ACTIONS[action].queues)
            after = queue
            if counters:
                after = {postsuper.Action.DELETE: None, postsuper.Action.HOLD: "hold",
                         postsuper.Action.REQUEUE: "incoming",
                         postsuper.Action.RELEASE: "deferred",
                         postsuper.Action.EXPIRE_RELEASE: "deferred" if queue == "hold"
                         else queue}.get(action, queue)
        self.where[queue_id] = after

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
        assert activate(self.spool, queue_id) is expected
        if expected:
            self.where[queue_id] = "active"
            self.in_flight.add(queue_id)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), index=st.integers(min_value=0, max_value=2))
    def deliver_record(self, data: st.DataObject, index: int) -> None:
        queue_id = self._pick(data, self.in_flight)
        address = self.rcpts[queue_id][index % len(self.rcpts[queue_id])]
        expected = self.where[queue_id] is not None
        assert record_sent(self.spool, queue_id, address) is expected
        if expected:
            self.sent[queue_id].add(address)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def deliver_finish(self, data: st.DataObject) -> None:
        queue_id = self._pick(data, self.in_flight)
        self.in_flight.discard(queue_id)
        queue = self.where[queue_id]
        result = finish(self.spool, queue_id)
        if queue == "active":
            done = self.sent[queue_id] == set(self.rcpts[queue_id])
            assert result == (None if done else "deferred")
            self.where[queue_id] = result
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
            assert env.held_seconds >= 0


AdminOps.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestAdminOps = AdminOps.TestCase
