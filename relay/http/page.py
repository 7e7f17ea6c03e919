"""The web page: the queue as ``mailq`` shows it, grouped by destination, and the captured
mail with a message view.  Server-rendered HTML that refreshes itself; no script, no build.

    GET  /                      the queue and the captured mail (refreshes every 5 s)
    GET  /message/{ID}          one captured message: its header, text, HTML, attachments
    GET  /message/{ID}/html     its HTML part alone, for the sandboxed frame of that view
    POST /message/{ID}/delete   remove it, back to /

The queue's buttons (flush, hold, release, delete) appear only with ``http_admin = yes``
and post to the API (relay.http.api) with ``next=/``; the guard of relay.http.server
refuses any such request that does not come from this page's origin.  Every page is sent
with a Content-Security-Policy that allows no script at all; a message's HTML is shown in
a frame with ``sandbox`` and a policy of its own that loads nothing from the network (no
tracking pixels, no scripts).  All text is escaped.  Reads run in threads; nothing here
writes but the delete of a captured message.
"""

from __future__ import annotations

import html
import time
from collections import defaultdict
from typing import Any

from aiohttp import web

from relay import capture
from relay.cli import showq
from relay.http.api import captured, in_thread, newest_first
from relay.http.server import CONTEXT, HttpContext

REFRESH_SECONDS = 5
PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "frame-src 'self'; form-action 'self'; frame-ancestors 'self'; base-uri 'none'")
FRAME_CSP = ("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
             "font-src data:")
SHOWN_MESSAGES = 200
MARKERS = {"active": "*", "hold": "!"}  # mailq's marks after a queue ID

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .5em;
border-bottom:1px solid #ddd;vertical-align:top}th{background:#f4f4f4}
.reason{color:#a33}.muted{color:#777}.num{text-align:right}code{font-size:.95em}
form{display:inline}button{font-size:.85em}pre{white-space:pre-wrap;background:#f8f8f8;
padding:.8em}iframe{width:100%;height:30em;border:1px solid #ddd}
"""


def e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _page(title: str, body: str, refresh: bool = False) -> web.Response:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    text = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}'
            f"<title>{e(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>")
    response = web.Response(text=text, content_type="text/html", charset="utf-8")
    response.headers["Content-Security-Policy"] = PAGE_CSP
    # Not no-referrer: with it a browser sends "Origin: null" even for this page's own
    # forms, and the guard would refuse them.
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _button(action: str, label: str) -> str:
    return (f'<form method="post" action="{e(action)}?next=/">'
            f'<button type="submit">{e(label)}</button></form>')


def _when(seconds: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(seconds))


# ---- the queue --------------------------------------------------------------------------


def queue_view(ctx: HttpContext) -> dict[str, Any]:
    """The queue grouped by destination (the domain of each pending recipient), with the
    counts per queue and mailq's trailer."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    counts = dict.fromkeys(showq.LISTED_QUEUES, 0)
    total_size = 0
    requests = 0
    for queue, rec in showq.records(ctx.spool):
        counts[queue] += 1
        requests += 1
        total_size += rec["size"]
        marker = MARKERS.get(queue, "") + ("#" if rec["forced_expire"] else "")
        for address, reason in showq.pending(rec):
            domain = address.rpartition("@")[2].lower() or "(no domain)"
            groups[domain].append({
                "queue": queue, "queue_id": rec["queue_id"], "marker": marker,
                "size": rec["size"], "arrival": rec["arrival_time"],
                "sender": rec["sender"] or showq.EMPTY_SENDER, "recipient": address,
                "reason": reason,
            })
    return {"groups": dict(sorted(groups.items())), "counts": counts,
            "requests": requests, "kbytes": total_size // 1024}


def _queue_html(view: dict[str, Any], admin: bool) -> str:
    counts = ", ".join(f"{name} {n}" for name, n in view["counts"].items())
    if not view["requests"]:
        summary = "Mail queue is empty"
    else:
        plural = "" if view["requests"] == 1 else "s"
        summary = f"-- {view['kbytes']} Kbytes in {view['requests']} Request{plural}."
    out = [(f'<h2>Queue</h2><p id="queue-summary">{e(summary)} <span class="muted">'
           f"({e(counts)})</span></p>")]
    if admin:
        out.append(f"<p>{_button('/api/v1/queue/flush', 'Flush the queue')}</p>")
    for destination, rows in view["groups"].items():
        out.append(f'<h3 class="destination">{e(destination)} '
                   f'<span class="muted">({len(rows)})</span></h3>')
        out.append("<table><tr><th>Queue ID</th><th class=num>Size</th><th>Arrival</th>"
                   "<th>Sender</th><th>Recipient</th><th>Reason</th>"
                   + ("<th></th>" if admin else "") + "</tr>")
        for row in rows:
            qid = row["queue_id"]
            actions = ""
            if admin:
                base = f"/api/v1/queue/{qid}"
                actions = "<td>" + (_button(f"{base}/release", "Release") if row["queue"] == "hold"
                                    else _button(f"{base}/hold", "Hold")) \
                    + " " + _button(f"{base}/delete", "Delete") + "</td>"
            out.append(
                f'<tr class="queued" id="q-{e(qid)}"><td><code>{e(qid + row["marker"])}</code>'
                f'</td><td class=num>{row["size"]}</td><td>{e(_when(row["arrival"]))}</td>'
                f'<td>{e(row["sender"])}</td><td>{e(row["recipient"])}</td>'
                f'<td class="reason">{e(row["reason"] or showq.REASON_UNAVAILABLE)}</td>'
                f"{actions}</tr>")
        out.append("</table>")
    return "".join(out)


# ---- the captured mail ------------------------------------------------------------------


def _captured_html(views: list[capture.View], paths: list[str]) -> str:
    where = ", ".join(paths) or "none: no capture_maildir and no maildir: next hop"
    out = [(f'<h2>Captured mail <span class="muted">({len(views)})</span></h2>'
           f'<p class="muted">Maildir: {e(where)}</p>')]
    if not views:
        out.append('<p id="no-mail">No captured mail.</p>')
        return "".join(out)
    out.append("<table><tr><th>Received</th><th>From</th><th>To</th><th>Subject</th>"
               "<th class=num>Size</th></tr>")
    for v in views[:SHOWN_MESSAGES]:
        sender = capture.address(v.sender[0]) if v.sender else v.return_path
        to = ", ".join(a["Address"] for a in v.to + v.cc + v.bcc)
        subject = v.subject or "(no subject)"
        out.append(f'<tr class="captured"><td>{e(_when(v.delivered))}</td><td>{e(sender)}</td>'
                   f'<td>{e(to)}</td><td><a href="/message/{e(v.id)}">{e(subject)}</a></td>'
                   f"<td class=num>{v.size}</td></tr>")
    out.append("</table>")
    return "".join(out)


async def index(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    box = captured(ctx)

    def gather() -> tuple[dict[str, Any], list[capture.View]]:
        return queue_view(ctx), newest_first(box)[0]

    view, views = await in_thread(gather)
    hostname = ctx.config.str("myhostname")
    body = (f"<h1>relay on {e(hostname)}</h1>"
            f'<p class="muted">Refreshes every {REFRESH_SECONDS} s. '
            f'<a href="/api/v1/queue">queue as JSON</a> · '
            f'<a href="/api/v1/messages">messages as JSON</a></p>'
            + _queue_html(view, ctx.admin) + _captured_html(views, box.paths))
    return _page(f"relay on {hostname}", body, refresh=True)


# ---- one message ------------------------------------------------------------------------


def _addresses(values: list[dict[str, str]]) -> str:
    return ", ".join(capture.address(v) for v in values)


async def message(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    box = captured(ctx)
    message_id = request.match_info["id"]

    def load() -> capture.View | None:
        entry = box.find(message_id)
        return capture.load(entry) if entry is not None else None

    v = await in_thread(load)
    if v is None:
        raise web.HTTPNotFound(text="404 page not found", content_type="text/plain")
    rows = [("From", _addresses(v.sender)), ("To", _addresses(v.to)),
            ("Cc", _addresses(v.cc)), ("Bcc", _addresses(v.bcc)),
            ("Return-Path", v.return_path), ("Subject", v.subject),
            ("Date", _when(v.date) if v.date else ""), ("Received", _when(v.delivered)),
            ("Message-ID", v.message_id), ("Size", f"{v.size} bytes")]
    head = "".join(f"<tr><th>{e(k)}</th><td>{e(val)}</td></tr>" for k, val in rows if val)
    parts = []
    if v.html:
        parts.append(f'<h2>HTML</h2><iframe sandbox title="HTML part" '
                     f'src="/message/{e(v.id)}/html"></iframe>')
    if v.text:
        parts.append(f'<h2>Text</h2><pre id="text">{e(v.text)}</pre>')
    if v.parts:
        items = "".join(f"<li>{e(p.filename or p.content_id or p.part_id)} "
                        f'<span class="muted">{e(p.content_type)}, {p.size} bytes</span></li>'
                        for p in v.parts)
        parts.append(f"<h2>Attachments</h2><ul>{items}</ul>")
    body = (f'<p><a href="/">&larr; back</a> · <a href="/api/v1/message/{e(v.id)}/raw">raw</a>'
            f' · <form method="post" action="/message/{e(v.id)}/delete">'
            f'<button type="submit">Delete</button></form></p>'
            f'<h1 id="subject">{e(v.subject or "(no subject)")}</h1><table>{head}</table>'
            + "".join(parts))
    return _page(v.subject or "(no subject)", body)


async def message_html(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    box = captured(ctx)
    message_id = request.match_info["id"]

    def load() -> capture.View | None:
        entry = box.find(message_id)
        return capture.load(entry) if entry is not None else None

    v = await in_thread(load)
    if v is None or not v.html:
        raise web.HTTPNotFound(text="404 page not found", content_type="text/plain")
    response = web.Response(text=v.html, content_type="text/html", charset="utf-8")
    response.headers["Content-Security-Policy"] = FRAME_CSP
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


async def delete_message(request: web.Request) -> web.Response:
    box = captured(request.app[CONTEXT])
    if not await in_thread(box.remove, request.match_info["id"]):
        raise web.HTTPNotFound(text="404 page not found", content_type="text/plain")
    raise web.HTTPSeeOther(location="/")


def routes(app: web.Application, ctx: HttpContext) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/message/{id}", message)
    app.router.add_get("/message/{id}/html", message_html)
    app.router.add_post("/message/{id}/delete", delete_message)
