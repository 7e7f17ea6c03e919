"""The contract between relay.smtpd.engine and the installed aiosmtpd.

relay.smtpd.engine lists, in its docstring, every member of aiosmtpd it relies on.  These
tests check each one against the aiosmtpd that is installed, so an upgrade that removes or
changes one fails here, naming the member, instead of breaking the listener quietly.
"""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version

import aiosmtpd.proxy_protocol
import aiosmtpd.smtp
import pytest

from relay.smtpd import engine

SMTP = aiosmtpd.smtp.SMTP

# (member, its parameters after self) for the methods the engine calls or overrides.
METHODS = [
    ("connection_made", ["transport"]),
    ("connection_lost", ["error"]),
    ("eof_received", []),
    ("data_received", ["data"]),
    ("_handle_client", []),
    ("_reset_timeout", ["duration"]),
    ("_timeout_cb", []),
    ("_cb_client_connected", ["reader", "writer"]),
    ("_set_rset_state", []),
    ("_create_session", []),
]


def test_the_pinned_minor_version_is_installed() -> None:
    """pyproject.toml pins aiosmtpd to the minor version these tests were written for."""
    assert version("aiosmtpd").startswith("1.4."), version("aiosmtpd")


@pytest.mark.parametrize("name,params", METHODS, ids=[m for m, _ in METHODS])
def test_methods_the_engine_relies_on(name: str, params: list[str]) -> None:
    member = getattr(SMTP, name, None)
    assert member is not None, f"aiosmtpd.smtp.SMTP.{name} is gone"
    got = list(inspect.signature(member).parameters)[1:]
    assert got == params, f"aiosmtpd.smtp.SMTP.{name}{tuple(got)} changed"


def test_attributes_smtp_init_sets_are_the_ones_the_engine_sets() -> None:
    """Engine.__init__ stands in for SMTP.__init__: every attribute aiosmtpd's connection
    handling reads must be one SMTP.__init__ sets, and the engine must set it too."""

    async def made() -> tuple[set[str], set[str]]:
        real = SMTP(object())
        ours = engine.Engine(lambda conn: None, 300.0)  # type: ignore[arg-type, return-value]
        return set(vars(real)), set(vars(ours))

    real, ours = asyncio.run(made())
    for name in engine.AIOSMTPD_ATTRIBUTES:
        assert name in real, f"aiosmtpd's SMTP.__init__ no longer sets {name}"
        assert name in ours, f"Engine.__init__ does not set {name}"


def test_connection_made_still_uses_what_the_engine_provides() -> None:
    """connection_made starts the session's task and its timer, and takes the plaintext
    branch while _original_transport is None (the engine's STARTTLS never sets it)."""
    source = inspect.getsource(SMTP.connection_made)
    for needle in ("seen_starttls = (self._original_transport is not None)",
                   "_handle_client()", "_reset_timeout()"):
        assert needle in source, f"SMTP.connection_made no longer uses {needle}"
    assert "_handler_coroutine.cancel()" in inspect.getsource(SMTP.connection_lost), \
        "SMTP.connection_lost no longer cancels the session task"


def test_the_streams_keep_the_transport_where_starttls_moves_it() -> None:
    """After loop.start_tls the engine sets the reader's and the writer's _transport and
    the protocol's _over_ssl, as aiosmtpd's own STARTTLS branch does: asyncio's streams
    must still keep them there."""

    async def check() -> tuple[object, object]:
        ours = engine.Engine(lambda conn: None, 300.0)  # type: ignore[arg-type, return-value]
        reader = ours._stream_reader  # type: ignore[attr-defined]
        return reader._transport, ours._over_ssl  # type: ignore[attr-defined]

    assert asyncio.run(check()) == (None, False)
    assert "self._transport = transport" in inspect.getsource(asyncio.StreamWriter.__init__)
    assert "self._transport.write(" in inspect.getsource(asyncio.StreamWriter.write)
    assert "_over_ssl" in inspect.getsource(asyncio.StreamReaderProtocol.eof_received)
    source = inspect.getsource(SMTP.connection_made)
    for needle in ("self._reader._transport = transport", "self._writer._transport = transport"):
        assert needle in source, f"aiosmtpd no longer moves the streams with {needle}"


def test_the_read_buffer_is_a_bytearray_a_block_read_may_search_and_give_back() -> None:
    """read_lines() searches the reader's _buffer for its last whole line and takes it
    with readexactly(); unread() puts bytes back in front of it."""

    async def check() -> tuple[bytes, bytes]:
        ours = engine.Engine(lambda conn: None, 300.0)  # type: ignore[arg-type, return-value]
        reader = ours._reader if hasattr(ours, "_reader") else ours._stream_reader
        assert isinstance(reader._buffer, bytearray), type(reader._buffer)
        reader.feed_data(b"one\r\ntwo\r\nthr")
        ours._reader = reader  # as _cb_client_connected sets it at connection_made
        ours._closing = False
        block = await ours.read_lines()
        ours.unread(b"two\r\n")
        return block or b"", bytes(reader._buffer)

    block, left = asyncio.run(check())
    assert block == b"one\r\ntwo\r\n"
    assert left == b"two\r\nthr"


def test_flow_control_state_is_where_drain_reads_it() -> None:
    """drain() waits for the client only while asyncio's flow control has paused writing:
    FlowControlMixin keeps that in _paused, which pause_writing()/resume_writing() set."""

    async def check() -> list[bool]:
        ours = engine.Engine(lambda conn: None, 300.0)  # type: ignore[arg-type, return-value]
        seen = [ours._paused]
        ours.pause_writing()
        seen.append(ours._paused)
        ours.resume_writing()
        seen.append(ours._paused)
        return seen

    assert asyncio.run(check()) == [False, True, False]


def test_the_connected_callback_is_kept_where_the_engine_clears_it() -> None:
    """asyncio's StreamReaderProtocol keeps its client_connected_cb (the engine's bound
    method: a cycle) in _client_connected_cb, which Engine._release clears."""

    async def check() -> object:
        ours = engine.Engine(lambda conn: None, 300.0)  # type: ignore[arg-type, return-value]
        return ours._client_connected_cb  # type: ignore[attr-defined]

    kept = asyncio.run(check())
    assert getattr(kept, "__func__", None) is SMTP._cb_client_connected, kept


def test_proxy_parser_is_there() -> None:
    signature = inspect.signature(aiosmtpd.proxy_protocol.get_proxy)
    assert next(iter(signature.parameters)) == "reader_func", signature


def test_only_the_engine_imports_aiosmtpd() -> None:
    """The queue manager process must not load aiosmtpd through the settings."""
    import subprocess
    import sys

    probe = ("import sys, relay.qmgrd, relay.settings, relay.cli.postqueue; "
             "print('aiosmtpd' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
