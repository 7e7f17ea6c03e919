"""CPU time and memory of a whole process tree, read from /proc (Linux only).

An MTA is a tree of processes: relay's ``relay serve`` with its queue manager and
their fsync helpers (and whatever children a later version adds); Postfix's master
with smtpd, cleanup, qmgr, smtp, trivial-rewrite, tlsmgr, anvil, ...  The tree is
found from the root's pid through /proc/PID/task/TID/children (every thread's
list: a child belongs to the thread that forked it).

CPU: the sum over the live processes of the tree of utime + stime + cutime + cstime
(fields 14-17 of /proc/PID/stat).  cutime/cstime hold the CPU of children that
exited and were reaped by their parent, so a process that ran and exited between two
readings (Postfix's smtpd after max_use sessions, a respawned helper) is still
counted, in its parent.  ``cpu_seconds()`` at the start and at the end of a load;
the difference is what the whole system spent on it.  This misses only a process
whose parent exits without reaping it, which neither MTA does while running.

Memory: ``PeakSampler`` sums, every ``interval`` seconds in a thread, the RSS
(/proc/PID/statm) and the PSS (/proc/PID/smaps_rollup: shared pages divided among
the processes that share them) over the tree, and keeps the peaks.  RSS summed over
processes counts shared libraries once per process, which weighs on Postfix's many
small processes; PSS does not.  A sample can miss a peak shorter than the interval.

It only reads /proc; reading another user's smaps_rollup needs root (PSS is then 0).
"""

from __future__ import annotations

import glob
import os
import threading
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _read(path: str) -> str:
    """The file's text, or "" if the process is gone (or was never there)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class ProcessTree:
    """The processes under (and including) ``root``, as they are at each call."""

    def __init__(self, root: int) -> None:
        self.root = root

    def pids(self) -> list[int]:
        found: list[int] = []
        todo = [self.root]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for children in glob.glob(f"/proc/{pid}/task/*/children"):
                todo.extend(int(c) for c in _read(children).split())
        return found

    def cpu_seconds(self) -> float:
        ticks = 0
        for pid in self.pids():
            # The command name (field 2) may hold spaces: split after its ")".
            fields = _read(f"/proc/{pid}/stat").rpartition(")")[2].split()
            ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
        return ticks / TICK

    def memory(self) -> tuple[int, int]:
        """(sum of RSS, sum of PSS) over the tree, in bytes."""
        rss = pss = 0
        for pid in self.pids():
            statm = _read(f"/proc/{pid}/statm").split()
            rss += int(statm[1]) * PAGE if statm else 0
            for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        return rss, pss


@dataclass
class Peaks:
    rss: int = 0
    pss: int = 0
    samples: int = 0


class PeakSampler:
    """Samples a tree's memory in a daemon thread from start() to stop()."""

    def __init__(self, tree: ProcessTree, interval: float = 0.25) -> None:
        self.tree = tree
        self.interval = interval
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        rss, pss = self.tree.memory()
        self.peaks.rss = max(self.peaks.rss, rss)
        self.peaks.pss = max(self.peaks.pss, pss)
        self.peaks.samples += 1

    def start(self) -> PeakSampler:
        self._thread.start()
        return self

    def stop(self) -> Peaks:
        self._stop.set()
        self._thread.join()
        self.sample()  # and one last look
        return self.peaks
