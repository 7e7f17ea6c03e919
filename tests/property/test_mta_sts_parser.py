"""Property tests of relay.tls.mta_sts's parsers (RFC 8461 3.1, 3.2, 4.1).

A policy written from generated parts parses back to those parts, with either line end
and with extension fields anywhere; any text at all either parses or raises StsError,
never anything else; an MX pattern matches exactly the names RFC 8461 4.1 says.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.tls.mta_sts import (
    MAX_AGE_LIMIT,
    StsError,
    mx_matches,
    parse_policy,
    parse_txt,
)

LABEL = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
HOST = st.lists(LABEL, min_size=2, max_size=4).map(".".join)
PATTERN = st.one_of(HOST, HOST.map(lambda h: "*." + h))
EXTENSION = st.tuples(
    st.text(string.ascii_lowercase, min_size=1, max_size=8).filter(
        lambda k: k not in ("version", "mode", "mx", "max_age")),
    st.text(string.ascii_letters + string.digits + "-._ ", min_size=1, max_size=20).map(
        str.strip).filter(bool))


@given(mode=st.sampled_from(["enforce", "testing", "none"]),
       mx=st.lists(PATTERN, min_size=1, max_size=4),
       max_age=st.integers(0, 10**10 - 1),
       extensions=st.lists(EXTENSION, max_size=3),
       newline=st.sampled_from(["\n", "\r\n"]),
       order=st.randoms(use_true_random=False))
def test_a_written_policy_parses_back(mode: str, mx: list[str], max_age: int,
                                      extensions: list[tuple[str, str]], newline: str,
                                      order: object) -> None:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx),
             f"max_age: {max_age}", *(f"{k}: {v}" for k, v in extensions)]
    order.shuffle(lines)  # type: ignore[attr-defined]
    policy = parse_policy(newline.join(lines) + newline)
    assert policy.mode == mode
    assert list(policy.mx) == [line[4:] for line in lines if line.startswith("mx: ")]
    assert policy.max_age == min(max_age, MAX_AGE_LIMIT)
    assert list(policy.lines) == lines


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_sts_error(text: str) -> None:
    try:
        policy = parse_policy(text)
    except StsError:
        return
    assert policy.mode in ("enforce", "testing", "none")
    assert policy.mode == "none" or policy.mx


@given(st.lists(st.text(max_size=60), max_size=4))
def test_any_txt_records_give_an_id_or_sts_error(records: list[str]) -> None:
    try:
        found = parse_txt(records)
    except StsError:
        return
    assert found.isalnum() and 1 <= len(found) <= 32


@given(LABEL, HOST)
def test_a_wildcard_matches_exactly_one_more_label(label: str, base: str) -> None:
    assert mx_matches("*." + base, f"{label}.{base}")
    assert mx_matches("*." + base, f"{label.upper()}.{base}.")
    assert not mx_matches("*." + base, base)
    assert not mx_matches("*." + base, f"{label}.{label}.{base}")
    assert mx_matches(base, base) and not mx_matches(base, f"{label}.{base}")


@pytest.mark.parametrize("records,expected", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1; id=abc", "v=spf1 -all"], "abc"),
    (["v=STSv1;id=1;ext=value;"], "1"),
])
def test_txt_examples(records: list[str], expected: str) -> None:
    assert parse_txt(records) == expected


@pytest.mark.parametrize("records", [
    [], ["v=spf1 -all"], ["v=STSv1; id=1;", "v=STSv1; id=2;"], ["v=STSv1;"],
    ["v=STSv1; id=has-dash;"], ["v=STSv1; id=" + "1" * 33], ["v=STSv1 id=1"],
    ["v=STSv1; id=1; bad field;"],
])
def test_txt_that_means_no_policy(records: list[str]) -> None:
    with pytest.raises(StsError):
        parse_txt(records)


@pytest.mark.parametrize("text", [
    "version: STSv1\nmode: enforce\nmax_age: 10\n",  # no mx
    "version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 10\n",
    "version: STSv1\nmode: enforced\nmx: a.b\nmax_age: 10\n",
    "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n",
    "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 12345678901\n",
    "version: STSv1\nmode: enforce\nmode: testing\nmx: a.b\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmx: *.*.b\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 1\ngarbage line\n",
])
def test_invalid_policies(text: str) -> None:
    with pytest.raises(StsError):
        parse_policy(text)


def test_rfc_8461_example() -> None:
    policy = parse_policy("version: STSv1\nmode: enforce\nmx: mail.example.com\n"
                          "mx: *.example.net\nmx: backupmx.example.com\nmax_age: 604800\n")
    assert policy.allows("mail.example.com") and policy.allows("mx1.example.net")
    assert not policy.allows("a.b.example.net") and not policy.allows("example.net")
