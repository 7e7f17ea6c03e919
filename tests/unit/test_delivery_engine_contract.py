"""The contract between relay.delivery_engine and the installed aiosmtplib.

relay.delivery_engine lists, in its docstring, every member of aiosmtplib it relies on.
These tests check each one against the aiosmtplib that is installed, so an upgrade that
removes or changes one fails here, naming the member, instead of breaking the SMTP client
quietly (lost pipelined replies, a STARTTLS that reads injected plaintext).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import pathlib
import re
from importlib.metadata import version

import aiosmtplib.auth
import aiosmtplib.errors
import aiosmtplib.esmtp
import aiosmtplib.protocol
import aiosmtplib.response
import pytest

from relay import delivery_engine

SMTPProtocol = aiosmtplib.protocol.SMTPProtocol
RELAY = pathlib.Path(delivery_engine.__file__).parent

# (member, its parameters after self) for the methods the engine calls or overrides.
METHODS = [
    ("__init__", ["loop", "connection_lost_callback"]),
    ("connection_made", ["transport"]),
    ("connection_lost", ["exc"]),
    ("data_received", ["data"]),
    ("eof_received", []),
    ("write", ["data"]),
    ("_read_response_from_buffer", []),
    ("_drain_helper", []),
]


def test_the_pinned_minor_version_is_installed() -> None:
    """pyproject.toml pins aiosmtplib to the minor version these tests were written for."""
    assert version("aiosmtplib").startswith("5.1."), version("aiosmtplib")


@pytest.mark.parametrize("name,params", METHODS, ids=[m for m, _ in METHODS])
def test_methods_the_engine_relies_on(name: str, params: list[str]) -> None:
    member = getattr(SMTPProtocol, name, None)
    assert member is not None, f"aiosmtplib SMTPProtocol.{name} is gone"
    got = list(inspect.signature(member).parameters)[1:]
    assert got == params, f"aiosmtplib SMTPProtocol.{name}{tuple(got)} changed"


def test_drain_helper_is_a_coroutine() -> None:
    assert inspect.iscoroutinefunction(SMTPProtocol._drain_helper), \
        "SMTPProtocol._drain_helper is no longer a coroutine function"


def test_attributes_set_by_init() -> None:
    """_buffer (a bytearray), _over_ssl, _loop and transport, as the engine reads them."""

    async def made() -> SMTPProtocol:
        return SMTPProtocol(loop=asyncio.get_running_loop())

    protocol = asyncio.run(made())
    assert isinstance(getattr(protocol, "_buffer", None), bytearray), \
        "SMTPProtocol._buffer is no longer a bytearray"
    assert getattr(protocol, "_over_ssl", None) is False, "SMTPProtocol._over_ssl is gone"
    assert isinstance(getattr(protocol, "_loop", None), asyncio.AbstractEventLoop), \
        "SMTPProtocol._loop is gone"
    assert hasattr(protocol, "transport") and protocol.transport is None, \
        "SMTPProtocol.transport changed"
    assert protocol.is_connected is False, "SMTPProtocol.is_connected changed"


def test_read_response_from_buffer_takes_one_reply_off_the_front() -> None:
    """The engine queues every reply by calling it until it returns None."""

    async def parse() -> tuple[list[tuple[int, str]], bytes]:
        protocol = SMTPProtocol(loop=asyncio.get_running_loop())
        protocol._buffer.extend(b"250-first\r\n250 second\r\n354 go ahead\r\n221 par")
        replies = []
        while (reply := protocol._read_response_from_buffer()) is not None:
            replies.append((reply.code, reply.message))
        return replies, bytes(protocol._buffer)

    replies, rest = asyncio.run(parse())
    assert replies == [(250, "first\nsecond"), (354, "go ahead")], \
        "SMTPProtocol._read_response_from_buffer parses differently"
    assert rest == b"221 par", "SMTPProtocol._read_response_from_buffer leaves another rest"


def test_read_response_from_buffer_raises_for_a_garbled_line() -> None:
    async def parse() -> None:
        protocol = SMTPProtocol(loop=asyncio.get_running_loop())
        protocol._buffer.extend(b"hello there\r\n")
        protocol._read_response_from_buffer()

    with pytest.raises(aiosmtplib.errors.SMTPResponseException) as caught:
        asyncio.run(parse())
    assert isinstance(caught.value.message, str), "SMTPResponseException.message changed"


def test_write_on_a_closed_connection_raises_server_disconnected() -> None:
    async def write() -> None:
        SMTPProtocol(loop=asyncio.get_running_loop()).write(b"NOOP\r\n")

    with pytest.raises(aiosmtplib.errors.SMTPServerDisconnected):
        asyncio.run(write())


def test_connection_lost_clears_the_transport() -> None:
    """The engine tells a live connection by ``transport`` (is_connected)."""
    source = inspect.getsource(SMTPProtocol.connection_lost)
    assert "self.transport = None" in source, "SMTPProtocol.connection_lost keeps transport"


def test_max_response_length() -> None:
    limit = getattr(aiosmtplib.protocol, "MAX_RESPONSE_LENGTH", None)
    assert isinstance(limit, int) and limit >= 8192, "aiosmtplib MAX_RESPONSE_LENGTH changed"


def test_response_record() -> None:
    response = aiosmtplib.response.SMTPResponse(250, "ok")
    assert (response.code, response.message) == (250, "ok"), "SMTPResponse fields changed"


def test_public_helpers() -> None:
    extensions, methods = aiosmtplib.esmtp.parse_esmtp_extensions(
        "mx.test\nPIPELINING\nSIZE 1000\nAUTH PLAIN LOGIN\nSTARTTLS")
    assert extensions == {"pipelining": "", "size": "1000", "auth": "PLAIN LOGIN",
                          "starttls": ""}, "parse_esmtp_extensions changed"
    assert methods == ["plain", "login"], "parse_esmtp_extensions changed"
    assert base64.b64decode(aiosmtplib.auth.auth_plain_encode("u", "p")) == b"\0u\0p", \
        "auth_plain_encode changed"
    assert aiosmtplib.auth.auth_login_encode("u", "p") == (b"dQ==", b"cA=="), \
        "auth_login_encode changed"


def test_only_the_engine_imports_aiosmtplib() -> None:
    importers = []
    for path in sorted(RELAY.rglob("*.py")):
        text = path.read_text()
        if re.search(r"^\s*(from|import)\s+aiosmtplib\b", text, re.MULTILINE):
            importers.append(str(path.relative_to(RELAY.parent)))
    assert importers == ["relay/delivery_engine.py"], importers
