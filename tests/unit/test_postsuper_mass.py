"""postsuper.in_parallel: order, bounded look-ahead, errors reported after what was done."""
from __future__ import annotations

import threading
import time

import pytest

from relay.cli import postsuper


def test_order_is_kept() -> None:
    def slow(i: int) -> int:
        time.sleep(0.001 * (i % 3))
        return i * i
    assert list(postsuper.in_parallel(slow, range(1000))) == [(i, i * i) for i in range(1000)]


def test_empty() -> None:
    assert list(postsuper.in_parallel(lambda i: i, [])) == []


def test_look_ahead_is_bounded() -> None:
    taken = 0

    def items():
        nonlocal taken
        for i in range(100_000):
            taken += 1
            yield i
    it = postsuper.in_parallel(lambda i: i, items())
    next(it)
    limit = (postsuper.MASS_WINDOW + 1) * postsuper.MASS_CHUNK
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
    list(postsuper.in_parallel(who, range(400)))
    assert len(names) > 1


def test_first_error_after_what_was_done() -> None:
    done = []

    def fn(i: int) -> int:
        if i == 500:
            raise ValueError("boom")
        return i
    with pytest.raises(ValueError, match="boom"):
        for item, _ in postsuper.in_parallel(fn, range(10_000)):
            done.append(item)
    assert done[:500] == list(range(500))
    assert 500 not in done
    assert len(done) < 500 + postsuper.MASS_WINDOW * postsuper.MASS_CHUNK
    assert done == sorted(done)
