"""Health routes of the HTTP listener, with Mailpit's paths: ``GET /livez`` and ``GET /readyz``.

``/livez`` answers 200 while the daemon's event loop runs.  ``/readyz`` answers 200 while
the daemon takes mail (the queue directory is there), 503 otherwise, for a load balancer's
or an orchestrator's health check.  Neither reads anything else, writes anything or keeps
state.
"""

from __future__ import annotations

import os

from aiohttp import web

from relay.http.server import CONTEXT, HttpContext


async def livez(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def readyz(request: web.Request) -> web.Response:
    spool = request.app[CONTEXT].spool
    if not os.path.isdir(os.path.join(spool.root, "incoming")):
        raise web.HTTPServiceUnavailable(text="Service Unavailable\n")
    return web.Response(status=200)


def routes(app: web.Application, ctx: HttpContext) -> None:
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
