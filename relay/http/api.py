"""The read API: Mailpit's API v1 (a subset, same paths and JSON field names) on the captured
mail, and relay's own queue routes.

Mailpit's (so that Mailpit clients and test helpers work against relay):

    GET    /api/v1/info                      version and counts
    GET    /api/v1/messages?start=&limit=    newest first: total, unread, count,
                                             messages_count, messages_unread, start, tags,
                                             messages[] (MessageSummary)
    DELETE /api/v1/messages                  all, or {"IDs": [...]}
    GET    /api/v1/search?query=&start=&limit=   the same shape, Mailpit's search syntax
    DELETE /api/v1/search?query=             delete what matches
    GET    /api/v1/message/{ID}              Message (Text, HTML, Attachments, ...); ID may
                                             be "latest"
    GET    /api/v1/message/{ID}/headers      every header, {"Name": ["value", ...]}
    GET    /api/v1/message/{ID}/raw          the message as stored

relay's own (the queue, as ``postqueue -j`` and postsuper see it):

    GET    /api/v1/queue                     the postqueue -j records, a JSON array
    POST   /api/v1/queue/flush               postqueue -f                 (http_admin)
    POST   /api/v1/queue/{ID}/hold           postsuper -h ID              (http_admin)
    POST   /api/v1/queue/{ID}/release        postsuper -H ID              (http_admin)
    DELETE /api/v1/queue/{ID}                postsuper -d ID              (http_admin)
    POST   /api/v1/queue/{ID}/delete         the same, for an HTML form   (http_admin)

"Captured mail" is the Maildirs that next hops name (capture_maildir, else the
``maildir:`` next hops of default_transport, relayhost and transport_maps), read as
relay.capture reads them.  Deleting captured mail needs no http_admin (as in Mailpit,
test helpers clear the mailbox between tests); the queue's changes do, and go through the
same functions as postsuper, under each message's lock, logged as postsuper logs them.
Errors are Mailpit's: 404 ``404 page not found``, 400 with the reason, as text/plain.
Every file access runs in a thread, off the daemon's event loop.  It never builds a spool
path or moves a queue file itself (spool.transitions does, as for postsuper), and keeps no
state: a crash loses only the requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from relay import capture
from relay.http.server import CONTEXT, HttpContext, require_admin
from relay.maildir import Captured

postsuper_log = logging.getLogger("relay.postsuper")
DEFAULT_LIMIT = 50  # Mailpit's
TEXT = "text/plain"


_maildirs: tuple[object, list[str]] = (None, [])  # (the Config they were read from, them)


def captured(ctx: HttpContext) -> Captured:
    """The captured mailbox of the configuration in force (its Maildirs are worked out
    once per configuration, not per request)."""
    global _maildirs
    cfg, paths = _maildirs
    if cfg is not ctx.config:
        from relay.routing import router_for

        paths = router_for(ctx.config).maildirs()
        _maildirs = (ctx.config, paths)
    return Captured(paths)


def _not_found() -> web.HTTPNotFound:
    return web.HTTPNotFound(text="404 page not found", content_type=TEXT)


def _bad(text: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=text, content_type=TEXT)


def _ok() -> web.Response:
    return web.Response(text="ok", content_type=TEXT)


def _json(data: Any) -> web.Response:
    return web.Response(text=json.dumps(data, ensure_ascii=False) + "\n",
                        content_type="application/json")


def _int_arg(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name, "")
    return int(text) if text.isdigit() else default


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


# ---- the captured mail (Mailpit's routes) ---------------------------------------------


def newest_first(box: Captured, query: str = "") -> tuple[list[capture.View], list[capture.View]]:
    """(every view, the matching views), newest first."""
    views = capture.load_all(reversed(box.entries()))
    matching = [v for v in views if capture.matches(query, v)] if query else views
    return views, matching


def _listing(request: web.Request, query: str) -> dict[str, Any]:
    ctx = request.app[CONTEXT]
    every, matching = newest_first(captured(ctx), query)
    start = _int_arg(request, "start", 0)
    limit = _int_arg(request, "limit", DEFAULT_LIMIT)
    page = matching[start:start + limit] if limit else matching[start:]
    unread = sum(not v.seen for v in every)
    return {
        "total": len(every), "unread": unread, "count": len(page),
        "messages_count": len(matching),
        "messages_unread": sum(not v.seen for v in matching),
        "start": start, "tags": [], "messages": [v.summary() for v in page],
    }


async def messages(request: web.Request) -> web.Response:
    return _json(await in_thread(_listing, request, ""))


async def search(request: web.Request) -> web.Response:
    query = request.query.get("query", "").strip()
    if not query:
        raise _bad("Error: no search query")
    try:
        capture.check_query(query)
    except capture.BadQuery as exc:
        raise _bad(str(exc)) from None
    return _json(await in_thread(_listing, request, query))


async def delete_messages(request: web.Request) -> web.Response:
    ids: list[str] = []
    if request.can_read_body:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None  # Mailpit: a body it cannot read deletes everything
        if isinstance(body, dict) and isinstance(body.get("IDs"), list):
            ids = [str(i) for i in body["IDs"]]
    box = captured(request.app[CONTEXT])
    if ids:
        await in_thread(lambda: [box.remove(i) for i in ids])
    else:
        await in_thread(box.clear)
    return _ok()


async def delete_search(request: web.Request) -> web.Response:
    query = request.query.get("query", "").strip()
    if not query:
        raise _bad("Error: no search query")
    box = captured(request.app[CONTEXT])

    def remove() -> None:
        for v in newest_first(box, query)[1]:
            box.remove(v.id)

    await in_thread(remove)
    return _ok()


def _load(box: Captured, message_id: str) -> capture.View | None:
    entry = box.find(message_id)
    return capture.load(entry) if entry is not None else None


async def message(request: web.Request) -> web.Response:
    view = await in_thread(_load, captured(request.app[CONTEXT]), request.match_info["id"])
    if view is None:
        raise _not_found()
    return _json(view.full())


async def raw(request: web.Request) -> web.Response:
    data = await in_thread(captured(request.app[CONTEXT]).read, request.match_info["id"])
    if data is None:
        raise _not_found()
    response = web.Response(body=data, content_type=TEXT, charset="utf-8")
    if request.query.get("dl") == "1":
        response.headers["Content-Disposition"] = \
            f'attachment; filename="{request.match_info["id"]}.eml"'
    return response


async def headers(request: web.Request) -> web.Response:
    data = await in_thread(captured(request.app[CONTEXT]).read, request.match_info["id"])
    if data is None:
        raise _not_found()
    parsed = capture.parse(data)
    result: dict[str, list[str]] = {}
    for name, value in parsed.items():
        result.setdefault("-".join(p.capitalize() for p in name.split("-")), []).append(
            str(value))
    return _json(result)


async def info(request: web.Request) -> web.Response:
    from relay import __version__

    ctx = request.app[CONTEXT]
    every = await in_thread(lambda: capture.load_all(captured(ctx).entries()))
    return _json({"Version": f"relay {__version__}", "Messages": len(every),
                  "Unread": sum(not v.seen for v in every), "Tags": {},
                  "RuntimeStats": {"Uptime": int(time.time() - ctx.started)}})


# ---- the queue (relay's routes) -------------------------------------------------------


def queue_records(ctx: HttpContext) -> list[dict[str, Any]]:
    """The postqueue -j records, in showq order."""
    from relay.cli import showq

    return [json.loads(showq.format_json_record(queue, rec))
            for queue, rec in showq.records(ctx.spool)]


async def queue(request: web.Request) -> web.Response:
    return _json(await in_thread(queue_records, request.app[CONTEXT]))


def flush_queue(ctx: HttpContext) -> str:
    """``postqueue -f``; the daemon's answer."""
    from relay import control

    try:
        return control.request(ctx.spool.root, "flush", timeout=10.0)
    except control.MailSystemDown as exc:
        return f"error mail system is down: {exc}"


def change(ctx: HttpContext, verb: str, queue_id: str) -> bool:
    """postsuper's -h, -H or -d on one message (False: not there, a lost race)."""
    from relay.cli import postsuper

    action = {"hold": postsuper.Action.HOLD, "release": postsuper.Action.RELEASE,
              "delete": postsuper.Action.DELETE}[verb]
    if not postsuper.apply(ctx.spool, action, queue_id):
        return False
    postsuper_log.info("%s: %s", queue_id, postsuper.ACTIONS[action].done)
    if action is postsuper.Action.RELEASE:
        postsuper.notify_daemon(ctx.spool.root)
    return True


def _after_form(request: web.Request) -> web.Response | None:
    """A form of the web page asks to go back to the page (``next``, a local path)."""
    target = request.query.get("next", "")
    if target.startswith("/") and not target.startswith("//"):
        raise web.HTTPSeeOther(location=target)
    return None


async def flush(request: web.Request) -> web.Response:
    require_admin(request)
    answer = await in_thread(flush_queue, request.app[CONTEXT])
    if answer != "ok":
        raise web.HTTPServiceUnavailable(text=answer.removeprefix("error "), content_type=TEXT)
    return _after_form(request) or _ok()


def queue_action(verb: str) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        require_admin(request)
        from spool.store import valid_queue_id

        queue_id = request.match_info["id"]
        if not valid_queue_id(queue_id):
            raise _not_found()
        done = await in_thread(change, request.app[CONTEXT], verb, queue_id)
        if not done:
            raise _not_found()
        return _after_form(request) or _ok()

    return handler


def routes(app: web.Application, ctx: HttpContext) -> None:
    r = app.router
    r.add_get("/api/v1/info", info)
    r.add_get("/api/v1/messages", messages)
    r.add_delete("/api/v1/messages", delete_messages)
    r.add_get("/api/v1/search", search)
    r.add_delete("/api/v1/search", delete_search)
    r.add_get("/api/v1/message/{id}", message)
    r.add_get("/api/v1/message/{id}/headers", headers)
    r.add_get("/api/v1/message/{id}/raw", raw)
    r.add_get("/api/v1/queue", queue)
    r.add_post("/api/v1/queue/flush", flush)
    r.add_post("/api/v1/queue/{id}/hold", queue_action("hold"))
    r.add_post("/api/v1/queue/{id}/release", queue_action("release"))
    r.add_post("/api/v1/queue/{id}/delete", queue_action("delete"))
    r.add_delete("/api/v1/queue/{id}", queue_action("delete"))
