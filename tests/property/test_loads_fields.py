"""loads_fields() agrees with fields(loads()) on every input: same result, same CorruptEntry."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spool import envelope as envfmt
from spool.errors import CorruptEntry
from tests.unit.test_spool import GOOD, envelopes, make_env


def same(raw: bytes) -> None:
    try:
        want = envfmt.as_fields(envfmt.loads(raw))
    except CorruptEntry:
        with pytest.raises(CorruptEntry):
            envfmt.loads_fields(raw)
        return
    got = envfmt.loads_fields(raw)
    assert got == want
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)  # types too


@settings(max_examples=500, deadline=None)
@given(envelopes)
def test_round_trip(env: envfmt.Envelope) -> None:
    raw = envfmt.dumps(env)
    assert envfmt.loads_fields(raw) == envfmt.as_fields(env)
    same(raw)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes, st.data())
def test_mutations(env: envfmt.Envelope, data: st.DataObject) -> None:
    raw = bytearray(envfmt.dumps(env))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    same(bytes(raw))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_garbage(raw: bytes) -> None:
    same(raw)


@pytest.mark.parametrize("raw", [
    b"", b"\n", b"end\n", b"relay-envelope 1\nend\n", b"relay-envelope 1\n\nend\n",
    GOOD, GOOD[:-1], GOOD + b"extra\n", GOOD.replace(b"\nend\n", b" \nend\n"),
    GOOD.replace(b"relay-envelope 1\n", b"relay-envelope 1\n "),
    GOOD.replace(b'"state":"pending"', b'"state":"maybe"'),
    GOOD.replace(b'"state":"pending"', b'"state":[1]'),
    GOOD.replace(b'"attempts":0', b'"attempts":0,"surprise":1'),
    GOOD.replace(b',"forced_expire":false', b''),  # an optional field missing
    GOOD.replace(b',"notified":false', b''),
    GOOD.replace(b'"sender":"sender@example.com"', b'"sender":5'),
    GOOD.replace(b'"queue_id":"0123456789A"', b'"queue_id":null'),
    GOOD.replace(b'"recipients":[', b'"recipients":[1,'),
    GOOD.replace(b'"recipients":[{', b'"recipients":[{"bogus":1,'),
    b'relay-envelope 1\n{"queue_id":"A","sender":"","recipients":"","arrival_time":0}\nend\n',
    b'relay-envelope 1\n{"queue_id":"A","sender":"","recipients":{},"arrival_time":0}\nend\n',
    b"relay-envelope 1\n{\x00\nend\n",
    b"relay-envelope 1\n" + b"[" * 100_000 + b"\nend\n",
    envfmt.dumps(replace(make_env(), queue_id="0123456789A", sender_fullname="Ann Lee")),
])
def test_cases(raw: bytes) -> None:
    same(raw)
