"""The commands' errors, side by side with the real Postfix's on this machine.

Each case runs relay's command in-process and Postfix's program (from the Debian package)
with the same arguments, against a configuration of its own (a main.cf that names an
empty queue directory), and compares the exit status and standard error.  Only
arguments that fail before a queue is read are compared, so no Postfix needs to run.
FORMATS.md 1.3-1.5 has the same measurements; this test makes them again.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from relay.cli import postcat, postqueue, postsuper
from tests.support.tools import require

# Postfix's queue directories, so that its postsuper gets as far as ours.
POSTFIX_QUEUES = ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold",
                  "incoming", "maildrop", "saved", "trace")


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Path, Path]:
    """(relay's configuration directory, Postfix's), each with an empty queue."""
    relay_dir, postfix_dir = tmp_path / "relay", tmp_path / "postfix"
    for conf in (relay_dir, postfix_dir):
        (conf / "queue").mkdir(parents=True)
        (conf / "main.cf").write_text(f"queue_directory = {conf / 'queue'}\n")
    for name in ("incoming", "active", "deferred", "hold", "corrupt", "tmp", "data"):
        (relay_dir / "queue" / name).mkdir()
    for name in POSTFIX_QUEUES:
        (postfix_dir / "queue" / name).mkdir()
    return relay_dir, postfix_dir


def postfix_all(program: str, conf: Path, cases: list[tuple[list[str], bytes]]
                ) -> list[tuple[int, str]]:
    """(status, stderr) of Postfix's program for each (argv, stdin), run side by side:
    Postfix's msg_fatal() sleeps a second or more before it exits."""
    path = require(f"/usr/sbin/{program}")
    procs = []
    for argv, _ in cases:
        # argv[0] as a shell gives it: Postfix names itself by it.
        procs.append(subprocess.Popen([program, "-c", str(conf), *argv], executable=path,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    results = []
    for proc, (_, stdin) in zip(procs, cases, strict=True):
        out, err = proc.communicate(stdin, timeout=30)
        assert out == b""
        results.append((proc.returncode, err.decode()))
    return results


def ours(program: str, conf: Path, argv: list[str], stdin: bytes = b"") -> tuple[int, str]:
    err = io.StringIO()
    args = ["-c", str(conf), *argv]
    if program == "postqueue":
        out = io.StringIO()
        status = postqueue.main(args, stdout=out, stderr=err)
        assert out.getvalue() == ""
    elif program == "postsuper":
        status = postsuper.main(args, stdin=io.StringIO(stdin.decode()), stderr=err)
    else:
        raw = io.BytesIO()
        status = postcat.main(args, stdin=io.BytesIO(stdin), stdout=raw, stderr=err)
        assert raw.getvalue() == b""
    return status, err.getvalue()


def compare(program: str, sites: tuple[Path, Path], cases: list[tuple[list[str], bytes]]
            ) -> None:
    relay_dir, postfix_dir = sites
    expected = postfix_all(program, postfix_dir, cases)
    for (argv, stdin), theirs in zip(cases, expected, strict=True):
        assert (argv, ours(program, relay_dir, argv, stdin)) == (argv, theirs)


def test_postqueue(sites: tuple[Path, Path]) -> None:
    compare("postqueue", sites, [(argv, b"") for argv in (
        [], ["-Z"], ["--foo"], ["-i"], ["-s"], ["-pZ"], ["-p", "-j"], ["-f", "-f"],
        ["-p", "extra"], ["-p", "--", "extra"], ["-s", "a.example", "-s", "b.example"],
        ["-i", "ABCDEF1234", "-f"], ["-i", "foo/bar"], ["-i", "-f"], ["-i", "A" * 119 + "/"],
        ["-s", "1.2.3.4"], ["-s", "[1.2.3.999]"], ["-s", "bad..example"])])


def test_postsuper(sites: tuple[Path, Path]) -> None:
    compare("postsuper", sites, [(argv, b"") for argv in (
        ["-Z"], ["-d"], ["-H"], ["-x", "-d"], ["-d", "ALL", "nosuchqueue"],
        ["deferred", "-d", "ALL"], ["-d", "ABCDEF1234", "--", "-x"],
        ["-d", "foo/bar"], ["-d", "ABCDEF1234"], ["-d", "ABCDEF1234", "-h", "ALL", "deferred"])])


def test_postcat(sites: tuple[Path, Path]) -> None:
    compare("postcat", sites, [
        ([], b""), (["-q"], b""), (["-e"], b""), ([], b"garbage\n"), (["-q", "foo/bar"], b""),
        (["-q", "ABCDEF1234"], b"")])


def test_postcat_bad_option(sites: tuple[Path, Path]) -> None:
    """The usage line differs only by Postfix's -d (record types in decimal), which our
    envelope, having no record types, does not take."""
    relay_dir, postfix_dir = sites
    status, err = ours("postcat", relay_dir, ["-x"])
    [(pf_status, pf_err)] = postfix_all("postcat", postfix_dir, [(["-x"], b"")])
    assert status == pf_status == 1
    assert err.replace("[-c config_dir] ", "[-c config_dir] [-d (decimal record type)] ") == \
        pf_err
