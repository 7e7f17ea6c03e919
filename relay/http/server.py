"""The daemon's HTTP listener (``http_listen``): one aiohttp application, routes from providers.

``relay serve`` binds the ``http_listen`` addresses with its SMTP ports (a port in use stops
it before it listens anywhere), and serves them on its event loop once the queue manager is
up.  Default ``http_listen`` is empty: no HTTP at all.  This module owns the application,
its sockets, and the rules every request passes before any route sees it; what the routes
say is the business of their providers (the read API and the page in relay.http.api and
relay.http.page).

Adding routes (for example ``GET /metrics``): write a provider in a module of its own,

    from aiohttp import web
    from relay.http.server import HttpContext

    def routes(app: web.Application, ctx: HttpContext) -> None:
        app.router.add_get("/metrics", my_handler)   # ctx is also app[CONTEXT]

and add it to the list in ``route_providers()`` below (one line).  A handler finds the
context as ``request.app[CONTEXT]``: the spool, the configuration in force (replaced at
SIGHUP), the listener's addresses, the start time.  Handlers run on the daemon's event
loop: anything that blocks (a spool listing, a Maildir read) goes to a thread.

Safety, whatever a provider does:

- every request must name this server in ``Host``: an IP address literal, ``localhost``
  (or a name under ``.localhost``), or ``$myhostname``.  Any other name is refused with 403:
  a page that a developer visits cannot rebind its own DNS name to 127.0.0.1 and read the
  captured mail (DNS rebinding);
- a request that is not GET/HEAD/OPTIONS is refused with 403 when its ``Origin`` is not
  this server (``Origin`` must equal ``http://`` + ``Host``; ``null`` passes only with
  ``Sec-Fetch-Site: same-origin``, which no page can forge), or, without ``Origin``, when
  a browser says ``Sec-Fetch-Site: cross-site``: no cross-site form or fetch can act here.
  Clients that are not browsers (curl, test helpers) send neither and pass;
- routes that change the queue call ``require_admin()``: 403 unless ``http_admin = yes``.

It never writes the spool itself and keeps no state across restarts; a crash loses only
requests in flight.  HTTP/1.1 parsing is aiohttp's (RFC 9110, 9112).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from relay.config import Config, ListenAddress
from spool import Spool

log = logging.getLogger("relay.http")

RouteProvider = Callable[[web.Application, "HttpContext"], None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_REQUEST_BYTES = 1024 * 1024  # request bodies here are small JSON or forms


@dataclass
class HttpContext:
    """What every route may use.  ``config`` is replaced when the daemon reloads main.cf."""

    spool: Spool
    config: Config
    started: float = field(default_factory=time.time)
    addresses: list[tuple[str, int]] = field(default_factory=list)  # as bound (port 0 resolved)
    accepting: bool = True  # False once relay drain stopped the SMTP listener

    @property
    def admin(self) -> bool:
        return self.config.bool("http_admin")


CONTEXT = web.AppKey("relay_http_context", HttpContext)


def route_providers() -> list[RouteProvider]:
    """Every route provider of the daemon's HTTP listener (add yours here)."""
    from relay.http import api, health, metrics, page

    return [
        health.routes,
        metrics.routes,
        api.routes,
        page.routes,
    ]


def require_admin(request: web.Request) -> None:
    """403 unless ``http_admin = yes``: for every route that changes the queue."""
    if not request.app[CONTEXT].admin:
        raise web.HTTPForbidden(text="forbidden: changing the queue needs http_admin = yes\n")


def host_allowed(host_header: str, myhostname: str) -> bool:
    """Whether ``Host`` names this server: an IP literal, localhost, or $myhostname."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host, bracket, _ = host[1:].partition("]")
        if not bracket:
            return False
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".")
    if not host:
        return False
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    return host == "localhost" or host.endswith(".localhost") or host == myhostname.lower()


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The checks every request passes before its route (see the module's docstring)."""
    ctx = request.app[CONTEXT]
    host = request.headers.get("Host", "")
    if not host_allowed(host, ctx.config.str("myhostname")):
        raise web.HTTPForbidden(text=f"forbidden: Host {host!r} does not name this server\n")
    if request.method not in SAFE_METHODS:
        origin = request.headers.get("Origin")
        fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
        if origin == "null" and fetch_site == "same-origin":
            pass  # a browser hiding the origin (a no-referrer policy) but vouching for it
        elif origin is not None:
            if origin.rstrip("/").lower() != f"http://{host}".lower():
                raise web.HTTPForbidden(text=f"forbidden: cross-origin request from {origin}\n")
        elif fetch_site == "cross-site":
            raise web.HTTPForbidden(text="forbidden: cross-site request\n")
    return await handler(request)


def make_app(ctx: HttpContext, providers: Sequence[RouteProvider] | None = None
             ) -> web.Application:
    """The application: the guard, then each provider's routes."""
    app = web.Application(middlewares=[guard], client_max_size=MAX_REQUEST_BYTES)
    app[CONTEXT] = ctx
    for provider in route_providers() if providers is None else providers:
        provider(app, ctx)
    return app


def bind(addresses: Sequence[ListenAddress]) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``http_listen`` (OSError as bind raises it).

    Bound before the daemon listens anywhere, so a port in use stops it at start.
    """
    socks: list[socket.socket] = []
    try:
        for addr in addresses:
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr.host, addr.port))
            sock.listen(128)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class HttpServer:
    """The application served on already bound sockets, started and stopped by the daemon."""

    def __init__(self, ctx: HttpContext, socks: Sequence[socket.socket],
                 providers: Sequence[RouteProvider] | None = None) -> None:
        self.ctx = ctx
        self.socks = list(socks)
        self.app = make_app(ctx, providers)
        self._runner: web.AppRunner | None = None
        ctx.addresses = [_name(s) for s in self.socks]

    async def start(self) -> None:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        for sock in self.socks:
            await web.SockSite(runner, sock, shutdown_timeout=1.0).start()
        self._runner = runner
        for host, port in self.ctx.addresses:
            log.info("http listening on %s", format_address(host, port))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for sock in self.socks:
            sock.close()


def _name(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def format_address(host: str, port: int) -> str:
    """``host:port``, with ``[]`` around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
