"""Admission control of one Ingress replica: refuse the excess at once instead of queueing it.

Past its capacity a server that accepts everything builds a queue, every answer waits behind it, and
work is done for clients that gave up long ago (issue #13: offered twice its capacity, Courier answered
1-130 requests a second with p50 over 10 s). Here a replica computes at most `max_in_flight` requests at
a time; a request that finds them all busy waits in a FIFO of at most `max_queued`, for at most
`max_wait_ms`; beyond either bound it is refused with a 503 and a `Retry-After`, in about the time it
takes to parse it. The queue is bounded in length *and* in time, so an admitted request's latency is
bounded by `max_wait_ms` plus its own service time whatever the offered load.

A request whose client disconnects is cancelled by Ray Serve (the replica's disconnect watch); a
cancelled waiter leaves the queue and is never computed, a cancelled running request frees its slot.

Probes and metadata (`/v2/health/*`, `GET /`, `/v2`, `/openapi.json`) are never queued: only the routes
that compute (`ADMITTED`) pass through here.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response


class AdmissionArgs(BaseModel):
    """The `admission` block of the app args (serving/serve_config.yaml): limits per Ingress replica."""

    model_config = ConfigDict(extra="forbid")

    max_in_flight: int = Field(32, ge=1, le=1024, description="Requests computed at once by one Ingress replica.")
    max_queued: int = Field(32, ge=0, le=10000, description="Requests waiting for a slot; more are refused at once.")
    max_wait_ms: float = Field(1000, gt=0, le=60000, description="Longest wait for a slot; a request that would wait "
                               "longer is refused (its answer would miss the latency SLO anyway).")
    retry_after_s: int = Field(1, ge=0, le=3600, description="The Retry-After (seconds) of a refusal.")
    max_loop_lag_ms: float | None = Field(None, gt=0, description="Refuse at once while the replica's event loop runs "
                                          "this late: a request then waited that long before it even got here "
                                          "(parsing, Ray's own queue); null (default): no such check, which on shared "
                                          "cores also fires on other work's delays.")


class Overloaded(Exception):
    """The replica refuses this request: its queue is full, or the request waited `max_wait_ms` for a slot."""

    status = 503

    def __init__(self, reason: str, retry_after_s: int):
        super().__init__(reason)
        self.reason, self.retry_after_s = reason, retry_after_s

    def response(self) -> Response:
        """503 with Retry-After and a body telling the client what to do."""
        body = {"error": f"overloaded ({self.reason}): retry after {self.retry_after_s} s, with backoff",
                "retry_after_s": self.retry_after_s}
        return Response(orjson.dumps(body), status_code=self.status, media_type="application/json",
                        headers={"retry-after": str(self.retry_after_s)})


# The routes that compute, and so are admitted; every other route is answered without a slot.
ADMITTED_PATHS = frozenset({"/v1/eta", "/v1/feed"})


def admitted(path: str) -> bool:
    """True for a route that computes: the product endpoints and `/v2/models/{name}/.../infer`."""
    return path in ADMITTED_PATHS or (path.startswith("/v2/models/") and path.endswith("/infer"))


class Admission:
    """A concurrency limit with a bounded FIFO whose waits are bounded in time.

    One per Ingress replica, used from its event loop only (no locks needed: nothing here awaits between
    reading and changing the counts, except the wait itself).
    """

    def __init__(self, args: AdmissionArgs | dict[str, Any] | None = None, metrics: Any = None):
        self.args = args if isinstance(args, AdmissionArgs) else AdmissionArgs.model_validate(args or {})
        self.metrics = metrics
        self.in_flight = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.refused: collections.Counter[str] = collections.Counter()  # by reason, for tests and logs
        self.lag = LoopLag() if self.args.max_loop_lag_ms is not None else None

    @property
    def queued(self) -> int:
        """Requests waiting for a slot right now (cancelled waiters are dropped when a slot frees)."""
        return sum(1 for waiter in self.waiters if not waiter.done())

    def _refuse(self, reason: str, endpoint: str) -> Overloaded:
        self.refused[reason] += 1
        if self.metrics is not None:
            self.metrics.rejected.inc(tags={"endpoint": endpoint, "status": "503"})
        return Overloaded(reason, self.args.retry_after_s)

    @asynccontextmanager
    async def slot(self, endpoint: str = "") -> AsyncIterator[None]:
        """Hold one of the replica's compute slots for the block; raises Overloaded when refused."""
        await self._acquire(endpoint)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, endpoint: str) -> None:
        if self.lag is not None and self.in_flight and self.lag.ms() > self.args.max_loop_lag_ms:
            # The loop is behind: what is parsed now arrived that long ago, and more waits unparsed.
            raise self._refuse(f"event loop {self.lag.ms():.0f} ms behind", endpoint)
        if self.in_flight < self.args.max_in_flight and not self.queued:
            self.in_flight += 1
            return
        if self.queued >= self.args.max_queued:
            raise self._refuse("queue full", endpoint)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.args.max_wait_ms / 1000):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():  # the slot came with the deadline: keep it
                return
            raise self._refuse(f"no slot within {self.args.max_wait_ms:g} ms", endpoint) from None
        except asyncio.CancelledError:  # the client went away (Ray cancels the request): never computed
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot as it was cancelled: pass it on
            else:
                waiter.cancel()
            raise

    def _release(self) -> None:
        """Hand the slot to the oldest live waiter (it keeps `in_flight` as it is), or free it."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1


class LoopLag:
    """How late the event loop runs: a timer due every `interval_s`, and by how much it fired late.

    Work waiting *before* admission (requests read but not yet parsed, Ray's own queue in front of the
    handler) is invisible to the counts above; all of it delays the loop, so the loop's lateness bounds it.
    """

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.late_s = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def ms(self) -> float:
        """The lateness now in ms: the last tick's, or the time since a tick that is overdue."""
        loop = asyncio.get_running_loop()
        if self._handle is None:
            self._schedule(loop)
            return 0.0
        return max(self.late_s, loop.time() - self._due) * 1000

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.interval_s
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.late_s = max(0.0, loop.time() - self._due)
        self._schedule(loop)


def retry_after(seconds: float | None) -> dict[str, str]:
    """The Retry-After header (whole seconds, rounded up, as RFC 9110 wants) for a 503 of another cause."""
    return {} if seconds is None else {"retry-after": str(max(0, math.ceil(seconds)))}
