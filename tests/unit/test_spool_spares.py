"""Inode recycling in the spool (free/): which process takes which spare, and safely.

On ext4 without a journal every file creation skips, and reads, each inode freed in
the last minutes, so the daemon keeps the inodes of finished files for reuse (see
spool.store).  These tests check, on real files and inode numbers, that a spare is
reused only where it cannot share an inode with a live file, and that a reused inode
carries nothing of its past.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from spool import Spool, store
from spool.envelope import Envelope, Recipient


def make_env(rcpt: str = "rcpt@example.net") -> Envelope:
    return Envelope(queue_id="", sender="s@example.com", recipients=(Recipient(rcpt),),
                    arrival_time=1_700_000_000.0, size=0)


def free_names(root: Path) -> list[str]:
    return sorted(os.listdir(root / "free"))


def ino(path: Path) -> int:
    return os.stat(path).st_ino


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_a_finished_message_gives_its_inodes_to_the_next_one(root: Path) -> None:
    qmgr = Spool(str(root), retire_to_free=True)
    listener = Spool(str(root), reuse_free=True)
    old = listener.enqueue(make_env(), b"old content, longer than the new one\r\n")
    inodes = {ino(root / "data" / old.queue_id), ino(root / "incoming" / old.queue_id)}
    with qmgr.locked(old.queue_id) as entry:
        entry.remove()
    assert len(free_names(root)) == 2
    # Small content keeps its bytes (and blocks) until a new message is written over it.
    assert all(os.stat(root / "free" / n).st_size > 0 for n in free_names(root))
    time.sleep(0.25)  # the listener lists free/ at most every 0.2 s
    new = listener.enqueue(make_env("other@example.net"), b"new\r\n")
    assert {ino(root / "data" / new.queue_id), ino(root / "incoming" / new.queue_id)} == inodes
    assert free_names(root) == []
    assert listener.read_content(new.queue_id) == b"new\r\n"  # nothing of the old one
    assert listener.read("incoming", new.queue_id).recipients[0].address == "other@example.net"


def test_big_content_is_emptied_before_its_inode_is_given_up(root: Path) -> None:
    qmgr = Spool(str(root), retire_to_free=True)
    listener = Spool(str(root), reuse_free=True)
    big = b"x" * 998 + b"\r\n"
    old = listener.enqueue(make_env(), big * (store.SPARE_CONTENT_MAX_SIZE // 1000 + 1))
    data_inode = ino(root / "data" / old.queue_id)
    with qmgr.locked(old.queue_id) as entry:
        entry.remove()
    qmgr.settle()  # the content is emptied in a thread, off the caller's event loop
    sizes = {ino(root / "free" / n): os.stat(root / "free" / n).st_size
             for n in free_names(root)}
    assert sizes[data_inode] == 0 and all(n[:1].isdigit() for n in free_names(root))


def test_content_waiting_to_be_emptied_is_never_taken(root: Path) -> None:
    """The queue manager empties a finished message's content in a thread: until then
    it has a name of the queue manager's own, which no listener takes and a new queue
    manager drops (a crash leaves it so)."""
    listener = Spool(str(root), reuse_free=True)
    (root / "free" / "e1.1").write_bytes(b"a finished message's content\r\n")
    new = listener.enqueue(make_env(), b"new\r\n")
    assert ino(root / "data" / new.queue_id) != ino(root / "free" / "e1.1")
    assert free_names(root) == ["e1.1"]
    Spool(str(root), retire_to_free=True).forget_kept_spares()
    assert free_names(root) == []


def test_the_listener_never_takes_a_spare_that_shares_an_inode(root: Path) -> None:
    """A crash between link and unlink leaves such a name: taking it would make two
    live files one inode.  The listener's start drops it; a running one skips it."""
    listener = Spool(str(root), reuse_free=True)
    live = listener.enqueue(make_env(), b"live\r\n")
    os.link(root / "data" / live.queue_id, root / "free" / "1.1")
    other = listener.enqueue(make_env(), b"other\r\n")
    assert ino(root / "data" / other.queue_id) != ino(root / "data" / live.queue_id)
    assert free_names(root) == ["1.1"]
    listener.forget_linked_spares()
    assert free_names(root) == []
    assert listener.read_content(live.queue_id) == b"live\r\n"


def test_the_qmgr_keeps_a_replaced_envelope_for_its_next_rewrite(root: Path) -> None:
    qmgr = Spool(str(root), retire_to_free=True)
    listener = Spool(str(root), reuse_free=True)
    a = listener.enqueue(make_env("a@example.net"), b"a\r\n")
    b = listener.enqueue(make_env("b@example.net"), b"b\r\n")
    old_a = ino(root / "incoming" / a.queue_id)
    with qmgr.locked(a.queue_id) as entry:
        entry.write(entry.read())  # a deferral's rewrite
    (kept,) = free_names(root)
    assert kept.startswith("q") and ino(root / "free" / kept) == old_a
    # The listener does not take the queue manager's spares ...
    c = listener.enqueue(make_env(), b"c\r\n")
    assert old_a not in (ino(root / "data" / c.queue_id), ino(root / "incoming" / c.queue_id))
    assert free_names(root) == [kept]
    # ... the queue manager's next rewrite does, and writes it whole.
    with qmgr.locked(b.queue_id) as entry:
        entry.write(entry.read())
    assert ino(root / "incoming" / b.queue_id) == old_a
    assert qmgr.read("incoming", b.queue_id).recipients[0].address == "b@example.net"
    assert qmgr.read("incoming", a.queue_id).recipients[0].address == "a@example.net"
    assert len(free_names(root)) == 1 and free_names(root) != [kept]


def test_a_failed_replacement_leaves_no_name_on_the_live_envelope(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qmgr = Spool(str(root), retire_to_free=True)
    env = qmgr.enqueue(make_env(), b"x\r\n")
    real_rename = os.rename

    def failing(src: str, dst: str) -> None:
        if "/incoming/" in str(dst):
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with qmgr.locked(env.queue_id) as entry, pytest.raises(Exception, match="update"):
        entry.write(entry.read())
    monkeypatch.undo()
    assert free_names(root) == []  # no second name on the live envelope's inode
    assert os.stat(root / "incoming" / env.queue_id).st_nlink == 1
    assert qmgr.read("incoming", env.queue_id).recipients[0].address == "rcpt@example.net"


def test_a_new_queue_manager_drops_the_old_ones_spares(root: Path) -> None:
    qmgr = Spool(str(root), retire_to_free=True)
    env = qmgr.enqueue(make_env(), b"x\r\n")
    with qmgr.locked(env.queue_id) as entry:
        entry.write(entry.read())
    assert [n[0] for n in free_names(root)] == ["q"]
    Spool(str(root), retire_to_free=True).forget_kept_spares()
    assert free_names(root) == []


def test_listener_processes_take_disjoint_shares(root: Path) -> None:
    """Two processes accepting mail never take the same spare: a name linked twice
    would make two messages' files one inode."""
    first = Spool(str(root), reuse_free=True, reuse_share=(0, 2))
    second = Spool(str(root), reuse_free=True, reuse_share=(1, 2))
    for serial in range(6):
        (root / "free" / f"77.{serial}").write_bytes(b"")
    spares = {ino(root / "free" / f"77.{serial}"): serial for serial in range(6)}
    taken = {}
    for spool in (first, second, first, second, first, second):
        env = spool.enqueue(make_env(), b"x\r\n")
        taken.setdefault(spool is second, []).append(
            spares.get(ino(root / "data" / env.queue_id)))
    assert {s for s in taken[False] if s is not None} <= {0, 2, 4}
    assert {s for s in taken[True] if s is not None} <= {1, 3, 5}
    assert free_names(root) == []


def test_a_reservation_from_an_old_spare_is_fresh_for_the_start_cleanup(root: Path) -> None:
    """A spare may have been written days ago; the data/ID it becomes is a reservation
    of now, which the queue manager's start (cleanup of stale envelope-less content)
    must leave to the listener writing it."""
    (root / "free").mkdir(parents=True)
    (root / "free" / "4.1").write_bytes(b"")
    three_days_ago = time.time() - 3 * 86400
    os.utime(root / "free" / "4.1", (three_days_ago, three_days_ago))
    listener = Spool(str(root), reuse_free=True)
    reservation = listener.reserve()
    assert ino(Path(reservation.data_path)) is not None and free_names(root) == []
    assert Spool(str(root), retire_to_free=True).cleanup(now=time.time()) == []
    assert os.path.exists(reservation.data_path)


def test_spares_left_unused_with_content_are_unlinked(root: Path) -> None:
    """A finished message's content waits in its spare for a new message to be written
    over it; the sweep unlinks one left unused past the age, and leaves empty ones."""
    qmgr = Spool(str(root), retire_to_free=True)
    listener = Spool(str(root), reuse_free=True)
    old = listener.enqueue(make_env(), b"a finished message's content\r\n")
    with qmgr.locked(old.queue_id) as entry:
        entry.remove()
    (root / "free" / "9.1").write_bytes(b"")
    assert len(free_names(root)) == 3
    now = time.time()
    assert qmgr.sweep_spares(now, max_age=60.0) == 0  # too young
    assert len(free_names(root)) == 3
    assert qmgr.sweep_spares(now + 61, max_age=60.0) == 2  # the content and the envelope
    assert free_names(root) == ["9.1"]


@pytest.mark.parametrize("step", range(1, 6))
def test_a_sweep_never_touches_a_file_a_listener_linked_at_any_moment(
        root: Path, monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """link(2) looks its source up first and links the inode it found, even if the name
    was renamed or its links counted meanwhile: a listener may get a spare's inode at
    any point of a sweep, and write its new envelope into it.  Played at each of the
    sweep's system calls (the listener's lookup is an open file here): the envelope is
    whole afterwards.  (Emptying a spare in place once wiped an envelope so.)"""
    (root / "free").mkdir(parents=True)
    (root / "free" / "5.1").write_bytes(b"a finished message's content, longer\r\n")
    looked_up = os.open(root / "free" / "5.1", os.O_RDWR)  # the listener's lookup
    envelope = b"the new message's envelope\r\n"
    real_os = store.os
    calls = 0

    def listener_writes() -> None:
        os.pwrite(looked_up, envelope, 0)
        store._cut(looked_up, len(envelope))

    class Proxy:
        """The sweep's os module: the listener writes just before call number ``step``."""

        def __getattr__(self, attr: str) -> object:
            real = getattr(real_os, attr)
            if not callable(real) or attr.isupper():
                return real

            def call(*args: object, **kwargs: object) -> object:
                nonlocal calls
                calls += 1
                if calls == step:
                    listener_writes()
                return real(*args, **kwargs)
            return call

    monkeypatch.setattr(store, "os", Proxy())
    try:
        Spool(str(root), retire_to_free=True, create=False).sweep_spares(
            time.time() + 3600, max_age=0.0)
    finally:
        monkeypatch.setattr(store, "os", real_os)
    if calls < step:
        listener_writes()  # the sweep made fewer calls: the listener comes last
    try:
        assert os.pread(looked_up, 4096, 0) == envelope
    finally:
        os.close(looked_up)


def test_a_new_queue_manager_sweeps_what_the_last_one_left(root: Path) -> None:
    (root / "free").mkdir(parents=True)
    (root / "free" / "3.1").write_bytes(b"content a stopped daemon left\r\n")
    (root / "free" / "3.2").write_bytes(b"")
    qmgr = Spool(str(root), retire_to_free=True)
    qmgr.forget_kept_spares()
    deadline = time.monotonic() + 5
    while "3.1" in free_names(root) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert free_names(root) == ["3.2"]


def test_a_full_free_pool_is_counted_now_and_then_not_at_every_retirement(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With free/ full, finished files are unlinked; the queue manager still lists free/
    only every 256th retirement to see whether there is room again.  (It once listed it
    at each one while it was full: after a backlog's drain, 70% of its CPU.)"""
    monkeypatch.setattr(store, "FREE_POOL_MAX", 8)
    writer = Spool(str(root))  # takes no spares: free/ stays full
    qmgr = Spool(str(root), retire_to_free=True)
    for i in range(8):
        (root / "free" / f"1.{i}").write_bytes(b"")
    ids = [writer.enqueue(make_env(), b"x\r\n").queue_id for _ in range(300)]
    real_listdir = store.os.listdir
    listings: list[str] = []

    def listdir(path: str) -> list[str]:
        listings.append(path)
        return real_listdir(path)

    monkeypatch.setattr(store.os, "listdir", listdir)
    for queue_id in ids:
        with qmgr.locked(queue_id) as entry:
            entry.remove()
    monkeypatch.setattr(store.os, "listdir", real_listdir)
    qmgr.settle()  # the thread unlinks what free/ has no room for
    assert len(free_names(root)) == 8  # nothing more kept than the pool holds
    assert not os.listdir(root / "data") and not os.listdir(root / "incoming")
    free_listings = [p for p in listings if os.path.basename(p) == "free"]
    assert 1 <= len(free_listings) <= 600 // 256 + 1


def test_with_free_full_finished_files_leave_the_queue_at_once_and_are_unlinked_in_the_thread(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unlinking a file frees its blocks, which may wait for the disk: with free/ full
    the queue manager's event loop only renames a finished file to an e-name (out of
    the queue at once, never taken by a listener, dropped by the next start) and its
    thread unlinks it.  (It was unlinked on the event loop: a backlog drained about a
    third slower.)"""
    monkeypatch.setattr(store, "FREE_POOL_MAX", 4)
    writer = Spool(str(root))
    qmgr = Spool(str(root), retire_to_free=True)
    for i in range(4):
        (root / "free" / f"1.{i}").write_bytes(b"")
    ids = [writer.enqueue(make_env(), b"x\r\n" * 10).queue_id for _ in range(20)]
    real_unlink = store.os.unlink
    unlinked_on: list[str] = []

    def unlink(path: object, *args: object, **kwargs: object) -> None:
        unlinked_on.append(threading.current_thread().name)
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store.os, "unlink", unlink)
    for queue_id in ids:
        with qmgr.locked(queue_id) as entry:
            entry.remove()
        assert not (root / "data" / queue_id).exists()  # out of the queue at once
    qmgr.settle()
    monkeypatch.setattr(store.os, "unlink", real_unlink)
    assert len(unlinked_on) == 40 and threading.current_thread().name not in unlinked_on
    assert free_names(root) == [f"1.{i}" for i in range(4)]  # the e-names are gone
    assert not os.listdir(root / "data") and not os.listdir(root / "incoming")


def test_a_crash_before_the_thread_unlinks_leaves_nothing_a_new_start_keeps(root: Path) -> None:
    listener = Spool(str(root), reuse_free=True)
    (root / "free" / "e7.1").write_bytes(b"a finished envelope, renamed out of the queue\r\n")
    Spool(str(root), retire_to_free=True).forget_kept_spares()
    assert "e7.1" not in free_names(root)
    new = listener.enqueue(make_env(), b"new\r\n")
    assert listener.read_content(new.queue_id) == b"new\r\n"
