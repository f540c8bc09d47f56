"""A tiny stand-in server for testing the load tools themselves (not Courier).

    COURIER_STUB_DELAY_MS=150 uvicorn loadtest.servers.stub:app --port 8390      # a slow server
    COURIER_STUB_ERROR_RATE=0.05 uvicorn loadtest.servers.stub:app --port 8390   # a failing one
    COURIER_STUB_SERVICE_MS=10 uvicorn loadtest.servers.stub:app --port 8390     # one at a time: 100/s at most

Answers every POST with an ETA-shaped JSON body after COURIER_STUB_DELAY_MS (non-blocking, so
requests overlap as on a real server), fails a COURIER_STUB_ERROR_RATE share of them with
COURIER_STUB_ERROR_STATUS (default 500), and says `degraded: true` when COURIER_STUB_DEGRADED=1.
The SLO gate must pass against the fast stub and fail against the slow and the failing ones.
"""

from __future__ import annotations

import asyncio
import os
import random

from loadtest.servers import lifespan

DELAY_S = float(os.environ.get("COURIER_STUB_DELAY_MS", "0")) / 1000.0
ERROR_RATE = float(os.environ.get("COURIER_STUB_ERROR_RATE", "0"))
ERROR_STATUS = int(os.environ.get("COURIER_STUB_ERROR_STATUS", "500"))
DEGRADED = os.environ.get("COURIER_STUB_DEGRADED") == "1"
SERVICE_S = float(os.environ.get("COURIER_STUB_SERVICE_MS", "0")) / 1000.0  # a single server: a known capacity
_one_at_a_time = asyncio.Lock()
OK_BODY = b'{"eta_minutes":21.5,"model_version":"stub","degraded":' + (b"true" if DEGRADED else b"false") + b"}"
_random = random.Random(0)


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    if DELAY_S:
        await asyncio.sleep(DELAY_S)
    if SERVICE_S:
        async with _one_at_a_time:
            await asyncio.sleep(SERVICE_S)
    status, body = 200, OK_BODY
    if scope["method"] == "POST" and ERROR_RATE and _random.random() < ERROR_RATE:
        status, body = ERROR_STATUS, b'{"error":"stub failure"}'
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
