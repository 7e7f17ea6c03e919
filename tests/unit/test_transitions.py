"""spool.transitions: each row of the table does what it says, and only that.

For every row, a message is put in the row's source queue with a known envelope and
mtime, taken through the row, and checked: the queue it is in afterwards, its envelope,
its file's mtime (deferred/: the next attempt; hold/: held since), and the fsyncs the
steps asked for, in order, with ``durable`` on and off.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from spool import Envelope, Recipient, Spool, transitions
from spool.store import ScanEntry, run_steps
from spool.transitions import ROWS, Edit, Mtime, Row, Sync, Transition

BEFORE = 1_700_000_000.0  # the file's mtime before the change
NOW = 1_700_003_600.0  # the change happens an hour later
NEXT = 1_700_007_200.0  # the next attempt the queue manager decides


def message_in(spool: Spool, queue: str) -> str:
    env = spool.enqueue(Envelope("", "a@example.org", (Recipient("b@example.net"),),
                                 BEFORE - 60, held_seconds=5.0), b"Subject: x\r\n\r\nx\r\n")
    with spool.locked(env.queue_id) as entry:
        entry.move(queue, mtime=BEFORE)
    return env.queue_id


def where(spool: Spool, queue_id: str) -> list[str]:
    return [q for q in ("incoming", "active", "deferred", "hold", "corrupt")
            if os.path.exists(os.path.join(spool.root, q, queue_id))]


def run_recording(spool: Spool, queue_id: str, r: Row, durable: bool
                  ) -> tuple[bool, list[list[str]]]:
    """Apply the row; what each fsync request named: "tmp" for a tmp file, else the
    queue directory's name."""
    asked: list[list[str]] = []

    def sync(paths: list[str]) -> None:
        asked.append(["tmp" if Path(p).parent.name == "tmp" else Path(p).name for p in paths])
        spool.fsync_paths(paths)

    given = None
    if r.edit is Edit.GIVEN:
        given = replace(spool.read(r.source, queue_id), attempts=3, next_attempt=NEXT)
    with spool.locked(queue_id) as entry:
        done = run_steps(transitions.steps(entry, r.transition, now=NOW, env=given,
                                           durable=durable), sync)
    return done, asked


ENTRY_ROWS = [r for r in ROWS.values() if r.transition is not Transition.QUARANTINE]


@pytest.mark.parametrize("durable", [True, False])
@pytest.mark.parametrize("r", ENTRY_ROWS, ids=lambda r: f"{r.transition.value}-{r.source}")
def test_row(tmp_path: Path, r: Row, durable: bool) -> None:
    spool = Spool(str(tmp_path / "spool"))
    queue_id = message_in(spool, r.source)
    before = spool.read(r.source, queue_id)

    done, asked = run_recording(spool, queue_id, r, durable)

    assert done
    if r.target is None:
        assert where(spool, queue_id) == []
        assert not os.path.exists(spool.content_path(queue_id))
    else:
        assert where(spool, queue_id) == [r.target]
        after = spool.read(r.target, queue_id)
        expected = before
        if r.edit is Edit.GIVEN:
            expected = replace(before, attempts=3, next_attempt=NEXT)
        elif r.edit is Edit.UNHOLD:  # an hour on hold, added; due now
            expected = replace(before, held_seconds=5.0 + NOW - BEFORE, next_attempt=NOW)
        elif r.edit is Edit.FORCE_EXPIRE:
            expected = replace(before, forced_expire=True)
        assert after == expected
        mtime = spool.mtime(r.target, queue_id)
        if r.mtime is Mtime.NOW:
            assert mtime == NOW
        elif r.mtime is Mtime.KEEP:
            assert mtime == BEFORE
        elif r.mtime is Mtime.NEXT_ATTEMPT:
            assert mtime == NEXT
    expected_syncs: list[list[str]] = []
    if Sync.ENVELOPE in r.sync:
        expected_syncs += [["tmp"], [r.source]]  # before and after the rename over it
    if durable and Sync.TARGET in r.sync and r.target != r.source:
        expected_syncs.append([r.target])
    if durable and Sync.SOURCE in r.sync:
        expected_syncs.append([r.source])
    assert asked == expected_syncs


def test_the_table_is_consistent() -> None:
    for r in ROWS.values():
        # An envelope is rewritten exactly when it is made durable before the next step.
        assert (Sync.ENVELOPE in r.sync) is (r.edit is not Edit.NONE), r
        assert (Sync.SOURCE in r.sync) is (r.target is None), r
        # The mtime rules: deferred/ the next attempt (now, or the queue manager's), hold/
        # since when; kept when the message stays where its mtime means something.
        if r.target == "hold" and r.source != "hold":
            assert r.mtime is Mtime.NOW, r
        if r.target == "deferred" and r.source != "deferred":
            assert r.mtime in (Mtime.NOW, Mtime.NEXT_ATTEMPT), r
        if r.target == r.source and r.source in ("deferred", "hold"):
            assert r.mtime in (Mtime.KEEP, Mtime.NOW), r
    assert transitions.sources(Transition.HOLD) == ("incoming", "active", "deferred")
    assert transitions.sources(Transition.RELEASE) == ("hold",)


@pytest.mark.parametrize(("transition", "queue"), [
    (Transition.HOLD, "hold"), (Transition.RELEASE, "deferred"), (Transition.RETRY, "hold"),
    (Transition.DEFER, "deferred"), (Transition.ACTIVATE, "hold"), (Transition.EXPIRE, "corrupt"),
])
def test_no_row_changes_nothing(tmp_path: Path, transition: Transition, queue: str) -> None:
    spool = Spool(str(tmp_path / "spool"))
    queue_id = message_in(spool, queue)
    with spool.locked(queue_id) as entry:
        env = entry.read() if queue != "corrupt" else None
        assert transitions.apply(entry, transition, now=NOW, env=env) is False
    assert where(spool, queue_id) == [queue]
    assert spool.mtime(queue, queue_id) == BEFORE


def test_unreadable_envelope(tmp_path: Path) -> None:
    """expire needs the envelope and does nothing; release moves it as it is."""
    spool = Spool(str(tmp_path / "spool"))
    queue_id = message_in(spool, "hold")
    Path(spool.root, "hold", queue_id).write_bytes(b"garbage")
    os.utime(Path(spool.root, "hold", queue_id), (BEFORE, BEFORE))
    assert transitions.change(spool, queue_id, (Transition.EXPIRE, Transition.RELEASE),
                              now=NOW) == ()
    assert where(spool, queue_id) == ["hold"]
    assert transitions.change(spool, queue_id, Transition.RELEASE, now=NOW) == (
        Transition.RELEASE,)
    assert where(spool, queue_id) == ["deferred"]
    assert Path(spool.root, "deferred", queue_id).read_bytes() == b"garbage"
    assert spool.mtime("deferred", queue_id) == NOW


def test_change_stops_at_the_first_row_that_does_not_apply(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    held, deferred = message_in(spool, "hold"), message_in(spool, "deferred")
    both = (Transition.EXPIRE, Transition.RELEASE)  # postsuper -f
    assert transitions.change(spool, held, both, ("hold",), now=NOW) == both
    assert transitions.change(spool, deferred, both, ("deferred",), now=NOW) == (
        Transition.EXPIRE,)
    assert where(spool, held) == where(spool, deferred) == ["deferred"]
    assert spool.mtime("deferred", held) == NOW  # released: due now
    assert spool.mtime("deferred", deferred) == BEFORE  # its next attempt, kept
    # A filter that no longer holds, and a message that is not there: nothing.
    assert transitions.change(spool, held, Transition.HOLD, accept=lambda env: False) == ()
    assert transitions.change(spool, "ABCDEF12345", Transition.HOLD) == ()


def test_quarantine(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    Path(spool.root, "incoming", "junk").write_bytes(b"x")
    assert transitions.quarantine(spool, "incoming", "junk") == "junk"
    assert os.path.exists(os.path.join(spool.root, "corrupt", "junk"))
    with pytest.raises(ValueError):
        transitions.quarantine(spool, "corrupt", "junk")


def test_deferred_syncs() -> None:
    """What a mass operation fsyncs at its end: the directories it renamed into or
    unlinked from."""
    every = ("hold", "incoming", "active", "deferred", "corrupt")
    assert transitions.deferred_syncs(Transition.REMOVE, ("deferred", "hold")) == (
        "deferred", "hold")
    assert transitions.deferred_syncs(Transition.HOLD, every) == ("hold",)
    assert transitions.deferred_syncs(Transition.RELEASE, every) == ("deferred",)
    assert transitions.deferred_syncs(Transition.REQUEUE, every) == ("incoming",)
    assert transitions.deferred_syncs((Transition.EXPIRE, Transition.RELEASE), every) == (
        "deferred",)
    assert transitions.deferred_syncs(Transition.EXPIRE, every) == ()
    assert transitions.deferred_syncs(Transition.RETRY, every) == ()


def test_is_due() -> None:
    entry = ScanEntry("ABCDEF12345", "deferred", NOW)
    assert transitions.is_due(entry, NOW)
    assert transitions.is_due(entry, NOW - 0.5)  # a second's grace
    assert not transitions.is_due(entry, NOW - 2)
