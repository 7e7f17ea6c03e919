"""A real browser for tests: Debian's chromium, headless, driven over the DevTools protocol.

``Chromium`` starts ``chromium --headless`` with a private profile under the test's
temporary directory, lets it pick its DevTools port (``--remote-debugging-port=0``, read
from the profile's ``DevToolsActivePort``: no race for a port), and ``Page`` drives its
first tab over the DevTools WebSocket with aiohttp's client: navigate, evaluate a script
expression, wait for a load.  No npm packages.  The browser only ever talks to loopback
(the pages the tests serve); background networking, sync and updates are off.

A test that needs it calls ``Chromium.start()``, which goes through
tests.support.tools.require(): skipped where chromium is absent, failed in CI.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

from tests.support.tools import require

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--disable-extensions", "--mute-audio",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


class Chromium:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.profile = base / "chromium-profile"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> Chromium:
        program = require("chromium", "/usr/bin/chromium")
        self.profile.mkdir(parents=True, exist_ok=True)
        log = open(self.base / "chromium.log", "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [program, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        port_file = self.profile / "DevToolsActivePort"
        end = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError("chromium did not start: "
                                   + (self.base / "chromium.log").read_text()[-2000:])
            time.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])
        return self

    def page_url(self) -> str:
        """The DevTools WebSocket of the first tab."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list",
                                    timeout=10) as response:
            targets = json.load(response)
        for target in targets:
            if target["type"] == "page":
                return str(target["webSocketDebuggerUrl"])
        raise RuntimeError(f"no page target: {targets}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Its own session: the renderer and GPU children go with it.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class Page:
    """One tab over the DevTools protocol (use ``async with Page(url)``)."""

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.ws_url, max_msg_size=64 << 20)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._replies:
                self._replies.pop(data["id"]).set_result(data)
            elif "method" in data:
                await self._events.put(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        number = next(self._ids)
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[number] = reply
        await self._ws.send_str(json.dumps({"id": number, "method": method, "params": params}))
        data = await asyncio.wait_for(reply, 30)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return dict(data.get("result", {}))

    async def wait_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                event = await self._events.get()
                if event["method"] == method:
                    return event

    def drain_events(self) -> None:
        while not self._events.empty():
            self._events.get_nowait()

    async def navigate(self, url: str) -> None:
        self.drain_events()
        await self.send("Page.navigate", url=url)
        await self.wait_event("Page.loadEventFired")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """The value of ``expression`` as soon as it is truthy (pages may be loading)."""
        end = time.monotonic() + timeout
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"{expression} stayed false for {timeout:g}s")
            await asyncio.sleep(0.1)

    async def click_and_load(self, selector: str) -> None:
        """Click the element (a link or a form's button) and wait for the next page."""
        found = f"document.querySelector({json.dumps(selector)})"
        await self.wait_for(f"!!{found}")
        self.drain_events()
        await self.evaluate(f"{found}.click()")
        await self.wait_event("Page.loadEventFired")

    async def wait_text(self, text: str, timeout: float = 15.0) -> str:
        """The page's text as soon as it contains ``text`` (the page may reload meanwhile)."""
        end = time.monotonic() + timeout
        body = ""
        while time.monotonic() < end:
            try:
                body = await self.evaluate("document.body ? document.body.innerText : ''")
            except RuntimeError:
                body = ""  # between two pages
            if text in (body or ""):
                return str(body)
            await asyncio.sleep(0.1)
        raise AssertionError(f"{text!r} not on the page after {timeout:g}s:\n{body}")
