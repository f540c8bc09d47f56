"""The prediction log: every answered /v1/eta and /v1/feed, appended to a Redis stream off the hot path.

Why a Redis stream: Redis is already Courier's online store on Kubernetes (no new system to run),
a stream is an append-only log with ids, consumer groups and acknowledgements (the monitor reads
it at least once and can restart where it stopped), and `XADD ... MAXLEN ~ N` bounds its memory.
The chart's Redis keeps an append-only file, so the log survives a Redis restart there.

The request never waits for Redis: `append` encodes the record and puts it in a buffer; a task
on the replica's event loop sends buffered records in pipelined batches. While the sink is down,
requests are answered as usual and what cannot be sent is counted as dropped
(`courier_prediction_log_dropped_total{reason}`), never retried into an unbounded queue.
Record formats: docs/monitoring.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import deque
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from serving.errors import InvalidInput
from serving.metrics import ServingMetrics

logger = logging.getLogger("ray.serve")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class PredictionLogArgs(BaseModel):
    """`args.prediction_log` of the serve config; null turns the log off."""

    model_config = ConfigDict(extra="forbid")

    redis: str | None = Field(None, description="host:port[,password=...] of the Redis (null: COURIER_REDIS).")
    stream: str = Field("courier:predictions", min_length=1, description="Stream key.")
    maxlen: int = Field(50_000, gt=0, description="About this many records are kept (approximate trimming); "
                        "each takes ~1.5 KB of Redis memory.")
    batch_size: int = Field(256, gt=0, le=10_000, description="Most records sent in one pipelined round trip.")
    buffer_limit: int = Field(20_000, gt=0, description="Records waiting to be sent beyond this are dropped.")
    retry_after_s: float = Field(1.0, gt=0, description="After a failed send, leave the sink alone this long.")
    linger_s: float = Field(0.02, ge=0, le=5, description="A send waits this long for more records to batch: "
                            "each round trip costs the replica ~1 ms of CPU, each record ~20 µs.")


def redis_client(address: str | None) -> Any:
    """An asyncio Redis client for COURIER_REDIS's form (feature_repo/connection.py), with short timeouts."""
    import redis.asyncio as aioredis

    from feature_repo.connection import redis_options

    return aioredis.Redis(**redis_options(address), socket_timeout=2, socket_connect_timeout=2)


class PredictionLog:
    """Buffers prediction records and sends them to a Redis stream from a background task."""

    def __init__(self, settings: PredictionLogArgs, metrics: ServingMetrics, client: Any | None = None):
        """`client`: an asyncio Redis client (default: one for `settings.redis`)."""
        self.settings, self.metrics = settings, metrics
        self.client = client if client is not None else redis_client(settings.redis)
        self.buffer: deque[tuple[str, bytes]] = deque()
        self.sent = 0
        self.dropped = 0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()  # one batch in flight: flush() waits for the background task's
        self._quiet_until = 0.0

    def append(self, endpoint: str, record: dict[str, Any]) -> None:
        """Queue one record (called on the request path: encoding only, no I/O)."""
        if len(self.buffer) >= self.settings.buffer_limit:
            self._drop(endpoint, "buffer_full", 1)
            return
        self.buffer.append((endpoint, orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._send_forever())
        if len(self.buffer) == 1 or len(self.buffer) >= self.settings.batch_size:
            self._wake.set()  # the first record wakes the sender (idle, it costs nothing); a full batch too

    async def flush(self) -> None:
        """Send everything buffered now (tests, shutdown); returns once nothing is in flight."""
        async with self._sending:
            pass
        while self.buffer and time.monotonic() >= self._quiet_until:
            await self._send_batch()
        if self.buffer and time.monotonic() < self._quiet_until:  # the sink is down: these cannot be sent
            for endpoint, _ in list(self.buffer):
                self._drop(endpoint, "sink_unavailable", 1)
            self.buffer.clear()

    async def _send_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if len(self.buffer) < self.settings.batch_size:
                await asyncio.sleep(self.settings.linger_s)  # one round trip for the records of the next 20 ms
            while self.buffer:
                await self._send_batch()

    async def _send_batch(self) -> None:
        async with self._sending:
            await self._send_batch_now()

    async def _send_batch_now(self) -> None:
        batch = [self.buffer.popleft() for _ in range(min(len(self.buffer), self.settings.batch_size))]
        if not batch:
            return
        if time.monotonic() < self._quiet_until:
            self._count(batch, dropped="sink_unavailable")
            return
        pipe = self.client.pipeline(transaction=False)
        for _, record in batch:
            pipe.xadd(self.settings.stream, {"r": record}, maxlen=self.settings.maxlen, approximate=True)
        try:
            await pipe.execute()
        except Exception as exc:  # noqa: BLE001 (any failure of the sink: count, wait, go on serving)
            self._quiet_until = time.monotonic() + self.settings.retry_after_s
            logger.warning("prediction log: %s unavailable (%s); dropping %d record(s)", self.settings.stream,
                           exc.__class__.__name__, len(batch))
            self._count(batch, dropped="sink_unavailable")
            return
        self._count(batch)

    def _count(self, batch: list[tuple[str, bytes]], dropped: str | None = None) -> None:
        per_endpoint: dict[str, int] = {}
        for endpoint, _ in batch:
            per_endpoint[endpoint] = per_endpoint.get(endpoint, 0) + 1
        for endpoint, n in per_endpoint.items():
            if dropped:
                self._drop(endpoint, dropped, n)
            else:
                self.sent += n
                self.metrics.predictions_logged.inc(n, tags={"endpoint": endpoint})

    def _drop(self, endpoint: str, reason: str, n: int) -> None:
        self.dropped += n
        self.metrics.predictions_dropped.inc(n, tags={"endpoint": endpoint, "reason": reason})


def request_id(header: str | None) -> str:
    """The caller's X-Request-Id, else the id Ray Serve gave the request (it answers with it in its
    own X-Request-ID header), else a new uuid4; a malformed header is a 422 naming it."""
    if header is None:
        from ray.serve.context import (
            _get_serve_request_context,  # Ray's id: one id in its logs and ours
        )

        return _get_serve_request_context().request_id or uuid.uuid4().hex
    if not REQUEST_ID.match(header):
        raise InvalidInput(f"X-Request-Id: must be 1-128 letters, digits, '.', '_' or '-' (got {header[:40]!r})",
                           field="X-Request-Id", rule="1-128 characters of [A-Za-z0-9._-]")
    return header
