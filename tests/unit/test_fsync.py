"""The fsync helper (spool.fsync): a real helper process, real files, real signals.

What the daemon relies on: a caller is answered only after its names were fsync'ed
(or with the errno and name that failed), callers that arrive together share one
request, a helper that dies is replaced and its work done again, and the helper
never outlives its parent nor dies of the signals meant for the daemon.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spool import fsync as fsync_mod
from spool import fsyncd
from spool.fsync import Syncer

pytestmark = pytest.mark.timeout(60)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def files(tmp_path: Path, n: int) -> list[str]:
    out = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * 100)
        out.append(str(p))
    return out


def test_files_and_directories_are_synced_by_a_child_process(tmp_path: Path) -> None:
    async def main() -> int | None:
        s = Syncer()
        s.start()
        try:
            pid = s.helper_pid
            assert pid is not None and pid != os.getpid()
            assert parent_of(pid) == os.getpid()  # our child
            await s.sync([*files(tmp_path, 3), str(tmp_path)])
            return pid
        finally:
            s.close()

    pid = run(main())
    assert pid is not None and wait_gone(pid), "close() ends the helper"


def test_a_failed_fsync_names_its_errno_and_file_and_fails_only_its_caller(
        tmp_path: Path) -> None:
    """/dev/null opens but cannot be fsync'ed (EINVAL): proof that the helper calls
    fsync(2) on what it is sent, and that the answer says which name failed."""
    async def main() -> None:
        s = Syncer()
        s.start()
        try:
            good = files(tmp_path, 2)
            results = await asyncio.gather(
                s.sync(good), s.sync(["/dev/null"]), s.sync([str(tmp_path / "missing")]),
                s.sync(good[:1]), return_exceptions=True)
            assert results[0] is None and results[3] is None
            assert isinstance(results[1], OSError) and results[1].errno == errno.EINVAL
            assert results[1].filename == "/dev/null"
            assert isinstance(results[2], OSError) and results[2].errno == errno.ENOENT
            assert results[2].filename == str(tmp_path / "missing")
            await s.sync(good)  # the helper goes on after failures
        finally:
            s.close()

    run(main())


def test_callers_that_arrive_together_share_requests(tmp_path: Path) -> None:
    async def main() -> int:
        s = Syncer()
        s.start()
        try:
            names = files(tmp_path, 200)
            await asyncio.gather(*(s.sync([n, str(tmp_path)]) for n in names))
            return s.requests
        finally:
            s.close()

    requests = run(main())
    # The first caller's request goes alone; the 199 that queued behind it share.
    assert 1 <= requests <= 10, requests


def test_a_killed_helper_is_replaced_and_no_caller_is_lost(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        s = Syncer()
        s.start()
        try:
            first = s.helper_pid
            assert first is not None
            names = files(tmp_path, 50)
            calls = [asyncio.ensure_future(s.sync([n])) for n in names]
            await asyncio.sleep(0)  # the first request is out
            os.kill(first, signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*calls), 20)
            await s.sync(names)
            second = s.helper_pid
            assert second is not None
            return first, second
        finally:
            s.close()

    first, second = run(main())
    assert first != second and wait_gone(first)


def test_the_helper_ignores_sigterm_and_sigint(tmp_path: Path) -> None:
    """A process-group signal to the daemon must not take its fsyncs away mid-commit:
    the parent decides when the helper ends (by closing the socket)."""
    async def main() -> None:
        s = Syncer()
        s.start()
        try:
            pid = s.helper_pid
            assert pid is not None
            await s.sync(files(tmp_path, 1))
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
            await asyncio.sleep(0.2)
            assert alive(pid)
            await s.sync(files(tmp_path, 2))
            assert s.helper_pid == pid
        finally:
            s.close()

    run(main())


def test_the_helper_dies_with_its_parent(tmp_path: Path) -> None:
    """SIGKILL of the process that started the helper: the helper sees its socket
    close and exits, leaving no orphan behind."""
    script = (
        "import asyncio, sys\n"
        "from spool.fsync import Syncer\n"
        "async def main():\n"
        "    s = Syncer(); s.start()\n"
        "    await s.sync([sys.argv[1]])\n"
        "    print(s.helper_pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    target = files(tmp_path, 1)[0]
    parent = subprocess.Popen([sys.executable, "-c", script, target],
                              stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    try:
        assert parent.stdout is not None
        helper = int(parent.stdout.readline())
        assert alive(helper)
        parent.kill()
        parent.wait()
        assert wait_gone(helper), "the helper outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_without_a_helper_fsync_runs_in_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper that cannot be started (no fork, say) costs speed, not durability."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    async def main() -> None:
        monkeypatch.setattr(fsync_mod.subprocess, "Popen", refuse)
        s = Syncer()
        s.start()
        assert s.helper_pid is None
        await s.sync(files(tmp_path, 3))
        with pytest.raises(OSError) as exc:
            await s.sync(["/dev/null"])
        assert exc.value.errno == errno.EINVAL
        s.close()

    run(main())


# ---- one syncfs for a big request ---------------------------------------------------------


class CountingSyncfs:
    """The real syncfs(2), counted."""

    def __init__(self, result: int | None = None) -> None:
        self.real = fsyncd._load_syncfs()
        assert self.real is not None, "this libc has no syncfs"
        self.calls = 0
        self.result = result

    def __call__(self, fd: int) -> int:
        self.calls += 1
        rc = self.real(fd)  # type: ignore[operator]
        return rc if self.result is None else self.result


@pytest.fixture
def little_dirty_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's dirty data, whatever else runs on it, counts as little (the bound
    itself has a test of its own below)."""
    monkeypatch.setattr(fsyncd, "DIRTY_MAX_KIB", 1 << 40)


@pytest.mark.usefixtures("little_dirty_data")
def test_many_names_on_one_file_system_take_one_syncfs(tmp_path: Path) -> None:
    syncfs = CountingSyncfs()
    names = [os.fsencode(n) for n in [*files(tmp_path, fsyncd.SYNCFS_MIN), str(tmp_path)]]
    assert fsyncd.sync_all(names, syncfs) == []
    assert syncfs.calls == 1


def test_few_names_are_fsynced_one_by_one(tmp_path: Path) -> None:
    syncfs = CountingSyncfs()
    names = [os.fsencode(n) for n in files(tmp_path, fsyncd.SYNCFS_MIN - 1)]
    assert fsyncd.sync_all(names, syncfs) == []
    assert syncfs.calls == 0


def test_names_on_two_file_systems_are_fsynced_one_by_one(tmp_path: Path) -> None:
    """/dev/null is on devtmpfs: no syncfs, and its fsync's EINVAL is reported."""
    syncfs = CountingSyncfs()
    names = [os.fsencode(n) for n in files(tmp_path, fsyncd.SYNCFS_MIN)] + [b"/dev/null"]
    assert fsyncd.sync_all(names, syncfs) == [b"%d:/dev/null" % errno.EINVAL]
    assert syncfs.calls == 0


@pytest.mark.usefixtures("little_dirty_data")
def test_a_failed_syncfs_falls_back_to_fsyncs_that_name_the_file(tmp_path: Path) -> None:
    syncfs = CountingSyncfs(result=-1)
    names = [os.fsencode(n) for n in files(tmp_path, fsyncd.SYNCFS_MIN)]
    names.append(os.fsencode(str(tmp_path / "gone")))
    assert fsyncd.sync_all(names, syncfs) == \
        [b"%d:%s" % (errno.ENOENT, os.fsencode(str(tmp_path / "gone")))]
    assert syncfs.calls == 0  # a missing name is seen before: no syncfs at all
    del names[-1]
    assert fsyncd.sync_all(names, syncfs) == []
    assert syncfs.calls == 1


def test_no_syncfs_while_the_machine_has_much_dirty_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """syncfs would also wait for everybody else's dirty pages on that file system."""
    assert fsyncd._dirty_kib() is not None
    monkeypatch.setattr(fsyncd, "DIRTY_MAX_KIB", -1)
    syncfs = CountingSyncfs()
    names = [os.fsencode(n) for n in files(tmp_path, fsyncd.SYNCFS_MIN * 2)]
    assert fsyncd.sync_all(names, syncfs) == []
    assert syncfs.calls == 0
