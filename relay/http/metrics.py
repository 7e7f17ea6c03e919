"""``GET /metrics``: the Prometheus exposition of both daemon processes (relay.metrics says
how they meet and why).

The handler asks the queue manager for its part over the control socket (two seconds at
most) and each listener worker for its counts (relay.workers), then has the listener's
registry render them all in a thread (the spool listing behind
the queue gauges must not hold up the event loop).  It changes nothing, and 404s when this
process keeps no metrics.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from relay import control, metrics
from relay.http.server import CONTEXT, HttpContext

# The text format every Prometheus reads (relay's names are all of the classic alphabet,
# so the exposition is the same in the newer formats).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def scrape(request: web.Request) -> web.Response:
    listener = metrics.installed()
    if listener is None:
        raise web.HTTPNotFound(text="no metrics in this process\n")
    root = request.app[CONTEXT].spool.root
    qmgr = await control.fetch(root, "metrics", timeout=2.0)
    workers = await listener.workers() if listener.workers is not None else []
    body = await asyncio.to_thread(listener.exposition, qmgr, workers)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def routes(app: web.Application, ctx: HttpContext) -> None:
    app.router.add_get("/metrics", scrape)
