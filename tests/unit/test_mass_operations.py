"""spool.transitions.in_parallel, which postsuper's ALL and relay queue use: order,
bounded look-ahead, errors reported after what was done."""
from __future__ import annotations

import threading
import time

import pytest

from spool import transitions


def test_order_is_kept() -> None:
    def slow(i: int) -> int:
        time.sleep(0.001 * (i % 3))
        return i * i
    assert list(transitions.in_parallel(slow, range(1000))) == [(i, i * i) for i in range(1000)]


def test_empty() -> None:
    assert list(transitions.in_parallel(lambda i: i, [])) == []


def test_look_ahead_is_bounded() -> None:
    taken = 0

    def items():
        nonlocal taken
        for i in range(100_000):
            taken += 1
            yield i
    it = transitions.in_parallel(lambda i: i, items())
    next(it)
    limit = (transitions.MASS_WINDOW + 1) * transitions.MASS_CHUNK
    assert taken <= limit
    for n, _ in enumerate(it):
        if n == 1000:
            break
    assert taken <= 1001 + limit
    it.close()


def test_uses_threads() -> None:
    names = set()

    def who(i: int) -> int:
        names.add(threading.current_thread().name)
        time.sleep(0.002)
        return i
    list(transitions.in_parallel(who, range(400)))
    assert len(names) > 1


def test_first_error_after_what_was_done() -> None:
    done = []

    def fn(i: int) -> int:
        if i == 500:
            raise ValueError("boom")
        return i
    with pytest.raises(ValueError, match="boom"):
        for item, _ in transitions.in_parallel(fn, range(10_000)):
            done.append(item)
    assert done[:500] == list(range(500))
    assert 500 not in done
    assert len(done) < 500 + transitions.MASS_WINDOW * transitions.MASS_CHUNK
    assert done == sorted(done)
