"""Open-loop load: requests leave at scheduled times, whatever the server is doing.

Closed-loop generators (Locust's users, `wrk`) wait for an answer before sending the next
request, so a slow server gets fewer requests and its slowness hides ("coordinated
omission"). Here the send times are fixed before the run (constant or Poisson arrivals at a
rate that may change in stages), every request is its own task, and latency is measured from
the *scheduled* send time, so time spent waiting behind a slow server, or behind a busy load
generator, counts. How late the generator itself was is recorded too (`started - scheduled`).

Everything is kept raw: one row per request. Percentiles are computed from these rows
(numpy), never from histogram buckets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import numpy as np

from loadtest.records import CONNECTION_ERROR, DEGRADED_MARK, TIMEOUT, Records
from loadtest.traffic import Request
from serving.auth import client_headers

__all__ = ["CONNECTION_ERROR", "TIMEOUT", "Records", "RetryPolicy", "Stage", "arrival_times", "drive", "run"]


@dataclass(frozen=True)
class RetryPolicy:
    """What a well-behaved client does: retry connection errors and 503s, after a backoff."""

    retries: int = 0
    backoff_s: float = 0.25
    on_status: tuple[int, ...] = (503,)
    on_connection_error: bool = True

    def should_retry(self, status: int, attempt: int) -> bool:
        if attempt > self.retries:
            return False
        return (status == CONNECTION_ERROR and self.on_connection_error) or status in self.on_status

    def delay(self, attempt: int) -> float:
        """Exponential backoff: backoff_s, 2*backoff_s, ... before retry 1, 2, ..."""
        return self.backoff_s * (2 ** (attempt - 1))


NO_RETRY = RetryPolicy(retries=0)


# -- arrival schedules --------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    duration_s: float
    rate: float  # requests per second


def arrival_times(stages: Sequence[Stage], process: str = "poisson", seed: int = 0) -> np.ndarray:
    """Send times (s from start) for piecewise-constant rates; Poisson or evenly spaced."""
    rng = np.random.default_rng(seed)
    times: list[np.ndarray] = []
    offset = 0.0
    for stage in stages:
        if stage.rate > 0 and stage.duration_s > 0:
            expected = stage.rate * stage.duration_s
            if process == "constant":
                local = np.arange(round(expected)) / stage.rate
            elif process == "poisson":
                gaps = rng.exponential(1.0 / stage.rate, size=int(expected + 10 * np.sqrt(expected) + 10))
                local = np.cumsum(gaps) - gaps[0]  # first request at the stage start
                local = local[local < stage.duration_s]
            else:
                raise ValueError(f"arrival process must be poisson or constant, got {process!r}")
            times.append(offset + local)
        offset += stage.duration_s
    return np.concatenate(times) if times else np.zeros(0)


def offered_rate_at(stages: Sequence[Stage], t: np.ndarray) -> np.ndarray:
    """The scheduled rate at times t (for plots)."""
    edges = np.cumsum([0.0] + [s.duration_s for s in stages])
    rates = np.array([s.rate for s in stages] + [0.0])
    return rates[np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(stages))]


# -- the driver -----------------------------------------------------------------------------------

class Clock:
    """The run's t=0, shared with whatever else records times during the run (faults, replica counts)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.wall0 = time.time()

    def reset(self, delay_s: float = 0.0) -> None:
        self.t0 = time.monotonic() + delay_s
        self.wall0 = time.time() + delay_s

    def now(self) -> float:
        return time.monotonic() - self.t0


Background = Callable[[Clock], Awaitable[None]]


async def _send(session: aiohttp.ClientSession, base: str, request: Request, timeout: aiohttp.ClientTimeout
                ) -> tuple[int, bool]:
    try:
        async with session.request(request.method, base + request.path, data=request.body,
                                   headers={"content-type": "application/json"} if request.body else None,
                                   timeout=timeout) as response:
            payload = await response.read()
            return response.status, DEGRADED_MARK in payload
    except TimeoutError:
        return TIMEOUT, False
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError):
        return CONNECTION_ERROR, False


async def drive(base_url: str, times: np.ndarray, requests: Sequence[Request], *, retry: RetryPolicy = NO_RETRY,
                timeout_s: float = 10.0, max_connections: int = 512, clock: Clock | None = None,
                background: Sequence[Background] = (), start_delay_s: float = 0.2) -> Records:
    """Send requests[i % len(requests)] at times[i] (s from start); return the raw records."""
    if len(requests) == 0 and len(times):
        raise ValueError("no requests to send")
    base = base_url.rstrip("/")
    endpoints = sorted({r.endpoint for r in requests})
    index = {name: i for i, name in enumerate(endpoints)}
    rows: list[tuple] = []
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    clock = clock or Clock()
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections, ttl_dns_cache=None,
                                     force_close=False, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     headers=client_headers()) as session:  # COURIER_API_KEY, if set
        async def one(i: int, scheduled: float) -> None:
            request = requests[i % len(requests)]
            started = clock.now()
            status, degraded = await _send(session, base, request, timeout)
            first, attempt = status, 1
            while retry.should_retry(status, attempt):
                await asyncio.sleep(retry.delay(attempt))
                attempt += 1
                status, degraded = await _send(session, base, request, timeout)
            rows.append((index[request.endpoint], scheduled, started, clock.now(), status, first, attempt, degraded))

        clock.reset(start_delay_s)
        helpers = [asyncio.ensure_future(job(clock)) for job in background]
        tasks: set[asyncio.Task] = set()
        for i, scheduled in enumerate(times):
            delay = scheduled - clock.now()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(one(i, float(scheduled)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks))
        for helper in helpers:
            if not helper.done():
                helper.cancel()
        for helper in helpers:
            with contextlib.suppress(asyncio.CancelledError):
                await helper
    records = Records.from_rows(endpoints, rows, wall_start=clock.wall0)
    order = np.argsort(records.scheduled, kind="stable")
    return records.select(order)


def run(base_url: str, times: np.ndarray, requests: Sequence[Request], **kwargs) -> Records:
    """Synchronous wrapper of `drive` (uses uvloop when installed)."""
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        return runner.run(drive(base_url, times, requests, **kwargs))
