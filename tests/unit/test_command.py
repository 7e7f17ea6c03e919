"""relay.cli.command: getopt(3)'s rules as Postfix uses them, and how a command ends."""

from __future__ import annotations

import io

import pytest

from relay.cli.command import EX_OK, EX_USAGE, Fatal, UsageError, getopt, parse_options, run


@pytest.mark.parametrize(("argv", "opts", "operands"), [
    ([], [], []),
    (["-p"], [("p", "")], []),
    (["-fv"], [("f", ""), ("v", "")], []),  # grouped flags
    (["-iABC"], [("i", "ABC")], []),  # the argument in the same word
    (["-vi", "ABC"], [("v", ""), ("i", "ABC")], []),  # ... or the next word
    (["-i", "-f"], [("i", "-f")], []),  # whatever it looks like
    (["-p", "extra", "-f"], [("p", "")], ["extra", "-f"]),  # options end at an operand
    (["-p", "--", "-f"], [("p", "")], ["-f"]),
    (["-", "-p"], [], ["-", "-p"]),  # "-" is an operand
    (["-c", "/etc/x", "-p"], [("c", "/etc/x"), ("p", "")], []),
])
def test_getopt(argv: list[str], opts: list[tuple[str, str]], operands: list[str]) -> None:
    assert getopt(argv, "c:fi:jps:v") == (opts, operands)


@pytest.mark.parametrize(("argv", "words"), [
    (["-x"], "invalid option -- 'x'"),
    (["-px"], "invalid option -- 'x'"),
    (["--long"], "invalid option -- '-'"),  # glibc's getopt() without long options
    (["-:"], "invalid option -- ':'"),
    (["-i"], "option requires an argument -- 'i'"),
    (["-pi"], "option requires an argument -- 'i'"),
])
def test_getopt_errors_in_getopts_words(argv: list[str], words: str) -> None:
    with pytest.raises(UsageError) as caught:
        getopt(argv, "c:fi:jps:v")
    assert str(caught.value) == words


def test_parse_options_reports_as_postfix() -> None:
    with pytest.raises(Fatal) as caught:
        parse_options(["-x"], "p", "usage: x -p", 69)
    assert (str(caught.value), caught.value.status, caught.value.before) == (
        "usage: x -p", 69, ("invalid option -- 'x'",))


def test_run_prints_a_fatal_error_after_the_output() -> None:
    out, err = io.StringIO(), io.StringIO()

    def body() -> int:
        out.write("partial\n")
        raise Fatal("usage: x", EX_USAGE, before=["invalid option -- 'x'"])

    assert run("x", body, stdout=out, stderr=err) == EX_USAGE
    assert out.getvalue() == "partial\n"
    assert err.getvalue() == "x: invalid option -- 'x'\nx: fatal: usage: x\n"


def test_run_ends_quietly_on_a_closed_pipe() -> None:
    def body() -> int:
        raise BrokenPipeError

    err = io.StringIO()
    assert run("x", body, stdout=io.StringIO(), stderr=err) == EX_OK
    assert err.getvalue() == ""
