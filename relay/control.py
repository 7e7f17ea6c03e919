"""The control socket: how commands ask the running daemon to do something now.

Postfix's postqueue -f writes a one-byte trigger to qmgr's fifo and never touches a
queue file; we do the same over a Unix socket in the queue directory.  A request is
one line (``flush``, ``scan``, ``flush-id ID ...``, ``flush-site SITE``,
``pauses``, ``ping`` to see whether the daemon answers, and for ``relay drain``: ``drain``,
``handoff HOST:PORT``, ``idle``), the
answer one line (``ok``, ``ok yes``/``ok no`` for ``idle``, or ``error TEXT``); only
``metrics`` answers ``ok`` and then the queue manager's metrics, many lines, until the
connection closes (``fetch()``).  Nothing here reads or writes the spool.  A crash leaves a stale socket file, replaced at the next start.

Unix socket paths are limited to 108 bytes, and spools live in deep directories,
so both sides address the socket through /proc/self/fd/N/ of an open directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

SOCKET_NAME = "control"

Handler = Callable[[str, list[str]], Awaitable[str]]


class MailSystemDown(Exception):
    """No daemon answers on this queue directory's control socket."""


def socket_path(directory: str) -> str:
    """The control socket of the queue directory ``directory`` (for messages; connect
    through request())."""
    return os.path.join(directory, SOCKET_NAME)


@contextlib.contextmanager
def _short_path(directory: str) -> Iterator[str]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)


async def serve(directory: str, handler: Handler) -> asyncio.AbstractServer:
    """Listen on DIR/control; ``handler(verb, args)`` returns the reply text."""
    # Imported here: the commands' client side (request) needs neither, and a command
    # starts sooner without them.
    import asyncio
    import logging

    log = logging.getLogger("relay.master")

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            words = line.decode("utf-8", "replace").split()
            if not words:
                reply = "error empty request"
            else:
                try:
                    reply = await handler(words[0], words[1:])
                except Exception as exc:  # a bad request must not stop the daemon
                    log.exception("control request %r failed", words)
                    reply = f"error {exc}"
            writer.write(reply.encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, SOCKET_NAME))
    with _short_path(directory) as path:
        server = await asyncio.start_unix_server(on_client, path=path)
    os.chmod(os.path.join(directory, SOCKET_NAME), 0o600)
    return server


def request(directory: str, verb: str, *args: str, timeout: float = 30.0) -> str:
    """Send one request to the daemon; MailSystemDown when nobody listens."""
    if not os.path.exists(socket_path(directory)):
        raise MailSystemDown("No such file or directory")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _short_path(directory) as path:
            sock.connect(path)
        sock.sendall(" ".join((verb, *args)).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        raise MailSystemDown(exc.strerror or str(exc)) from exc
    except OSError as exc:
        raise MailSystemDown(exc.strerror or str(exc)) from exc
    finally:
        sock.close()
    return data.decode("utf-8", "replace").strip()


async def fetch(directory: str, verb: str, *args: str, timeout: float = 2.0) -> str | None:
    """A request whose answer is many lines (``metrics``), from an event loop: the text
    after the ``ok`` line, or None if the daemon did not answer in time or refused."""
    import asyncio  # here, as in serve(): the commands that import this module never need it

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(
                f"/proc/self/fd/{fd}/{SOCKET_NAME}")
            try:
                writer.write(" ".join((verb, *args)).encode() + b"\n")
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    finally:
        os.close(fd)
    status, _, text = data.decode("utf-8", "replace").partition("\n")
    return text if status == "ok" else None
