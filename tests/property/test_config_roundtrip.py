"""main.cf -> Config -> `postconf -n` -> main.cf -> Config gives the same typed values.

Hypothesis writes random assignments with valid values of every kind (times with and
without units, sizes, counts, booleans, enums, lists, networks with exclusions, listen
and name server addresses, free text), some of them through a `$name` indirection, laid
out with random spacing, continuation lines, comments and blank lines.  The first load
must give the values that were meant; postconf's output, read back, must give them again.
"""

from __future__ import annotations

import io
import ipaddress
import os
import tempfile
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import config
from relay.cli import postconf
from relay.config import PARAMETERS, Kind, ListenAddress, NetworkMatcher, Parameter

UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
NAMES = sorted(PARAMETERS)
SETTINGS = settings(
    max_examples=int(os.environ.get("RELAY_CONFIG_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Value:
    text: str  # as written after "name =", single spaces only
    expected: object  # the typed value it must give


def joined(draw: st.DrawFn, items: list[str]) -> str:
    separators = st.sampled_from([", ", ",", " ", " , "])
    out = ""
    for i, item in enumerate(items):
        out += (draw(separators) if i else "") + item
    return out


label = st.from_regex(r"[a-z]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
hostname = st.lists(label, min_size=1, max_size=3).map(".".join)
word = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._@#=:/[]!",
    min_size=1,
    max_size=8,
)


@st.composite
def time_value(draw: st.DrawFn, p: Parameter) -> Value:
    unit = draw(st.sampled_from(["", "s", "m", "h", "d", "w"]))
    n = draw(st.integers(0, 3000))
    return Value(f"{n}{unit}", float(n * UNIT_SECONDS[unit or p.unit]))


@st.composite
def enum_value(draw: st.DrawFn, p: Parameter) -> Value:
    spellings = [(c, c) for c in p.choices] + list(p.aliases)
    spelling, canonical = draw(st.sampled_from(spellings))
    cased = "".join(draw(st.sampled_from([c.lower(), c.upper()])) for c in spelling)
    return Value(cased, canonical)


@st.composite
def network_rule(draw: st.DrawFn) -> tuple[str, tuple[bool, config.IPNetwork]]:
    negate = draw(st.booleans())
    address = draw(st.ip_addresses())
    prefix = draw(st.integers(0, address.max_prefixlen))
    net = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    if net.prefixlen == net.max_prefixlen and draw(st.booleans()):
        text = str(net.network_address)
    else:
        text = str(net)
    if net.version == 6 and draw(st.booleans()):
        text = f"[{net.network_address}]" + (f"/{prefix}" if "/" in text else "")
    return ("!" if negate else "") + text, (negate, net)


@st.composite
def listen_address(draw: st.DrawFn, tls_suffix: bool = True) -> tuple[str, ListenAddress]:
    kind = draw(st.sampled_from(["v4", "v6", "name"]))
    if kind == "v4":
        host = str(draw(st.ip_addresses(v=4)))
        shown = host
    elif kind == "v6":
        host = str(draw(st.ip_addresses(v=6)))
        shown = f"[{host}]"
    else:
        host = shown = draw(hostname)
    port = draw(st.integers(0, 65535))
    tls = draw(st.booleans()) if tls_suffix else False
    return f"{shown}:{port}" + ("/tls" if tls else ""), ListenAddress(host, port, tls)


@st.composite
def nameserver(draw: st.DrawFn) -> tuple[str, ListenAddress]:
    address = draw(st.ip_addresses())
    port = draw(st.none() | st.integers(0, 65535))
    host = str(address)
    if address.version == 6:
        text = f"[{host}]" if port is not None or draw(st.booleans()) else host
    else:
        text = host
    text += "" if port is None else f":{port}"
    return text, ListenAddress(host, 53 if port is None else port)


@st.composite
def value_for(draw: st.DrawFn, p: Parameter) -> Value:
    kind = p.kind
    if kind is Kind.TIME:
        return draw(time_value(p))
    if kind is Kind.INT:
        n = draw(st.integers(0, config.INT_MAX))
        return Value(str(n), n)
    if kind is Kind.SIZE:
        n = draw(st.integers(0, 2**40))
        return Value(str(n), n)
    if kind is Kind.HOSTNAME:
        text = draw(hostname)
        return Value(text, text)
    if kind is Kind.BOOL:
        text = draw(st.sampled_from(["yes", "no", "YES", "No", "yEs"]))
        return Value(text, text.lower() == "yes")
    if kind is Kind.ENUM:
        return draw(enum_value(p))
    if kind is Kind.LIST:
        items = draw(st.lists(hostname, max_size=5))
        return Value(joined(draw, items), tuple(items))
    if kind is Kind.NETWORKS:
        rules = draw(st.lists(network_rule(), max_size=5))
        return Value(
            joined(draw, [t for t, _ in rules]), NetworkMatcher(tuple(r for _, r in rules))
        )
    if kind is Kind.HOSTPORTS:
        rule = p.hostport
        assert rule is not None
        entries = draw(st.lists(listen_address(rule.tls_suffix) if rule.default_port is None
                                else nameserver(), max_size=4))
        return Value(joined(draw, [t for t, _ in entries]), tuple(a for _, a in entries))
    # free text; "$$" is a literal "$"
    words = draw(st.lists(word | st.just("$$"), max_size=5))
    text = " ".join(words)
    return Value(text, text.replace("$$", "$"))


blank_or_comment = st.sampled_from(["", "   ", "#", "# a comment", "   # indented", "\t#x = y"])
space = st.sampled_from(["", " ", "  ", "\t"])
indent = st.sampled_from([" ", "\t", "    ", " \t "])


@st.composite
def layout(draw: st.DrawFn, name: str, text: str) -> list[str]:
    """The lines of one assignment, with random spacing, continuations and comments."""
    tokens = text.split(" ") if text else []
    if not tokens:
        return [f"{name}{draw(space)}={draw(space)}"]
    # A continuation line starting with "#" would be a comment (as in Postfix): no break there.
    breaks = [i for i in range(1, len(tokens)) if not tokens[i].startswith("#")]
    cut = sorted(draw(st.sets(st.sampled_from(breaks), max_size=3))) if breaks else []
    chunks = [" ".join(tokens[a:b]) for a, b in zip([0, *cut], [*cut, len(tokens)], strict=True)]
    # The first chunk goes on the "name =" line, or on a continuation line unless it
    # starts with "#".
    first = chunks.pop(0) if chunks[0].startswith("#") or draw(st.booleans()) else ""
    head = f"{name}{draw(space)}={draw(space) if first else ''}{first}{draw(space)}"
    lines = [head.rstrip() if not first and draw(st.booleans()) else head]
    for chunk in chunks:
        lines += draw(st.lists(blank_or_comment, max_size=1))
        lines.append(draw(indent) + chunk + draw(space))
    return lines


@st.composite
def main_cf(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    """A main.cf text and the typed value meant for each name it sets."""
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=12))
    lines: list[str] = []
    expected: dict[str, object] = {}
    for i, name in enumerate(names):
        value = draw(value_for(PARAMETERS[name]))
        expected[name] = value.expected
        lines += draw(st.lists(blank_or_comment, max_size=2))
        if value.text and draw(st.integers(0, 4)) == 0:
            helper = f"helper_{i}"  # an indirection: not an unused parameter
            ref = draw(st.sampled_from([f"${helper}", f"${{{helper}}}", f"$({helper})"]))
            lines += draw(layout(name, ref))
            lines += draw(layout(helper, value.text))
            expected[helper] = value.text.replace("$$", "$")
        else:
            lines += draw(layout(name, value.text))
    for i, words in enumerate(draw(st.lists(st.lists(word, min_size=1, max_size=3), max_size=2))):
        text = " ".join(words).replace("$", "")
        lines += draw(layout(f"x_unknown_{i}", text))
        expected[f"x_unknown_{i}"] = text
    return "".join(line + "\n" for line in lines), expected


def run_postconf(argv: list[str], home: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    assert postconf.main(argv, environ={"HOME": home}, stdout=out, stderr=err) == 0, err.getvalue()
    assert "fatal" not in err.getvalue()
    return out.getvalue()


def load_text(directory: str, text: str, home: str) -> config.Config:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "main.cf"), "w") as f:
        f.write(text)
    return config.load(directory, environ={"HOME": home}, warn=lambda _: None)


def assert_same(a: config.Config, b: config.Config) -> None:
    assert a.names() == b.names()
    for name in a.names():
        assert a.get(name) == b.get(name), name
        assert a.raw(name) == b.raw(name), name


@SETTINGS
@given(main_cf())
def test_postconf_n_roundtrip(case: tuple[str, dict[str, object]]) -> None:
    text, expected = case
    with tempfile.TemporaryDirectory() as tmp:
        first = load_text(os.path.join(tmp, "a"), text, tmp)
        assert first.explicit == set(expected)
        for name, value in expected.items():
            assert first.get(name) == value, (name, text)

        printed = run_postconf(["-c", os.path.join(tmp, "a"), "-n"], tmp)
        assert [line.split(" =")[0] for line in printed.splitlines()] == sorted(expected)
        second = load_text(os.path.join(tmp, "b"), printed, tmp)
        assert second.explicit == first.explicit
        for name in first.explicit:
            assert second.unexpanded(name) == first.unexpanded(name)
        assert_same(first, second)


@SETTINGS
@given(main_cf())
def test_postconf_all_roundtrip(case: tuple[str, dict[str, object]]) -> None:
    text, _ = case
    with tempfile.TemporaryDirectory() as tmp:
        first = load_text(tmp, text, tmp)
        printed = run_postconf(["-c", tmp], tmp)
        second = load_text(tmp, printed, tmp)
        assert second.explicit == set(first.names())
        assert_same(first, second)
