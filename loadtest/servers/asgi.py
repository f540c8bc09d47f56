"""Variant (d): the ETA pipeline in a plain single-process ASGI app under uvicorn.

    uvicorn loadtest.servers.asgi:app --port 8300 --workers 1 --no-access-log

Starlette Request/Response, as Courier's Ingress uses; the pipeline runs inline in the event
loop (one process, no hops).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from loadtest.pipeline import handle_eta, load_pipeline
from loadtest.servers import lifespan

PIPELINE = load_pipeline()
READY = Response(b'{"ready":true}', media_type="application/json")


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    request = Request(scope, receive)
    if request.url.path == "/v1/eta" and request.method == "POST":
        status, body = handle_eta(PIPELINE, await request.body())
        response = Response(body, status_code=status, media_type="application/json")
    elif request.url.path == "/v2/health/ready":
        response = READY
    else:
        response = Response(b'{"error":"not found"}', status_code=404, media_type="application/json")
    await response(scope, receive, send)
