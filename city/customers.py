"""The city's customers: orders and feed sessions over HTTP, and what happened afterwards.

An order calls `POST /v1/eta` when it is placed; its delivery outcome is reported when the food
"arrives" (delivered_minutes * 60 / S wall seconds later). A feed session calls `POST /v1/feed`,
orders each shown card with the TRUE p_order (`World.feed_decisions`) and reports a feed
outcome when the session ends. Outcomes are joined to predictions by the response's
`request_id`; each request also carries an `X-Request-Id` of our own (uuid4), which serving
adopts, so the id is known even from a server that does not return it yet.

Outcome records (the contract's "Outcomes"), one field `r` = orjson bytes per stream entry:
    {"request_id", "ts", "kind": "delivery", "delivered_minutes", "true_eta_minutes", "scenario"}
    {"request_id", "ts", "kind": "feed", "ordered": [restaurant_id, ...], "scenario"}

Requests run concurrently (bounded); failures are counted per endpoint and reason, never raised.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pandas as pd
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from city.world import SESSION_MINUTES, World

REQUEST_ID_HEADER = "X-Request-Id"
logger = logging.getLogger("city")


def delivery_record(request_id: str, ts: float, delivered_minutes: float, true_eta_minutes: float,
                    scenario: str) -> dict[str, Any]:
    """A delivery outcome of the contract."""
    return {"request_id": request_id, "ts": float(ts), "kind": "delivery",
            "delivered_minutes": float(delivered_minutes), "true_eta_minutes": float(true_eta_minutes),
            "scenario": scenario}


def feed_record(request_id: str, ts: float, ordered: list[int], scenario: str) -> dict[str, Any]:
    """A feed outcome of the contract (sent when the session ends)."""
    return {"request_id": request_id, "ts": float(ts), "kind": "feed", "ordered": [int(r) for r in ordered],
            "scenario": scenario}


class OutcomeLog:
    """Outcome records waiting for the Redis stream, written in pipelined batches of XADD.

    A Redis that does not answer keeps the records buffered (up to `max_buffer`, then the
    oldest are dropped and counted) until a later flush succeeds.
    """

    def __init__(self, client: aioredis.Redis, stream: str = "courier:outcomes", maxlen: int = 50_000,
                 max_buffer: int = 100_000, batch: int = 1000):
        self.client, self.stream, self.maxlen = client, stream, maxlen
        self.max_buffer, self.batch = max_buffer, batch
        self.buffer: list[bytes] = []
        self.written = self.dropped = self.errors = 0
        self.last_error = ""
        self.retry_s, self._retry_at = 5.0, 0.0  # after a failure, flushes wait (a dead Redis must not stall ticks)

    def add(self, record: dict[str, Any]) -> None:
        """Queue one record for the next flush."""
        if len(self.buffer) >= self.max_buffer:
            del self.buffer[0]
            self.dropped += 1
        self.buffer.append(orjson.dumps(record))

    async def flush(self, force: bool = False) -> int:
        """Write every queued record; returns how many were written (stops at the first Redis error).

        For `retry_s` after an error only a forced flush (the last one, at stop) tries again.
        """
        done = 0
        if not force and time.monotonic() < self._retry_at:
            return done
        while self.buffer:
            chunk = self.buffer[:self.batch]
            pipe = self.client.pipeline(transaction=False)
            for data in chunk:
                pipe.xadd(self.stream, {"r": data}, maxlen=self.maxlen, approximate=True)
            try:
                await pipe.execute()
            except (RedisError, OSError) as exc:
                self.errors += 1
                if str(exc) != self.last_error:
                    logger.warning("cannot write outcomes to Redis stream %s (%s); kept %d records, will retry. "
                                   "Is Redis running at the --redis address?", self.stream, exc, len(self.buffer))
                self.last_error = str(exc)
                self._retry_at = time.monotonic() + self.retry_s
                return done
            del self.buffer[:len(chunk)]
            self.written += len(chunk)
            done += len(chunk)
        return done


@dataclass
class CustomerStats:
    """What the customers did so far."""

    orders: int = 0  # placed in the world (each calls /v1/eta)
    eta_ok: int = 0
    sessions: int = 0  # feed sessions opened (each calls /v1/feed)
    feed_ok: int = 0
    feed_orders: int = 0  # cards ordered from feeds
    shed: int = 0  # requests not sent: too many already waiting (the client is the bottleneck)
    errors: Counter = field(default_factory=Counter)  # "<endpoint>:<status or reason>" -> count


class Customers:
    """Sends the world's orders and sessions to serving and schedules their outcomes."""

    def __init__(self, world: World, client: httpx.AsyncClient, outcomes: OutcomeLog, concurrency: int = 64,
                 max_waiting: int | None = None):
        self.world, self.client, self.outcomes = world, client, outcomes
        self.stats = CustomerStats()
        self._slots = asyncio.Semaphore(concurrency)
        self._max_tasks = max_waiting or 8 * concurrency
        self._tasks: set[asyncio.Task] = set()
        self._due: list[tuple[float, int, dict[str, Any]]] = []  # (wall time, seq, record): a heap
        self._seq = itertools.count()

    @property
    def in_flight(self) -> int:
        """Requests sent or waiting for a connection."""
        return len(self._tasks)

    @property
    def pending(self) -> int:
        """Outcomes scheduled but not due yet (food on its way, sessions still open)."""
        return len(self._due)

    def place(self, orders: pd.DataFrame) -> None:
        """Each order asks serving for its ETA now; its delivery is reported later."""
        self.stats.orders += len(orders)
        for order in orders.to_dict("records"):
            self._spawn("eta", self._order(order))

    def open(self, sessions: pd.DataFrame) -> None:
        """Each session asks serving for a feed and orders from it."""
        self.stats.sessions += len(sessions)
        for session in sessions.to_dict("records"):
            self._spawn("feed", self._session(session))

    def release(self, now: float) -> int:
        """Move the outcomes due by `now` to the outcome log; returns how many."""
        count = 0
        while self._due and self._due[0][0] <= now:
            self.outcomes.add(heapq.heappop(self._due)[2])
            count += 1
        return count

    async def drain(self, timeout_s: float) -> None:
        """Wait for requests in flight (at most `timeout_s`), then cancel the rest."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def _spawn(self, endpoint: str, job: Coroutine) -> None:
        if len(self._tasks) >= self._max_tasks:
            job.close()
            self.stats.shed += 1
            return
        task = asyncio.ensure_future(self._guarded(endpoint, job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, endpoint: str, job: Coroutine) -> None:
        """Run one customer; an unexpected failure is counted, never raised into the city."""
        try:
            await job
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in one customer must not stop the others
            self._error(endpoint, "client", repr(exc))

    def _schedule(self, due: float, record: dict[str, Any]) -> None:
        heapq.heappush(self._due, (due, next(self._seq), record))

    async def _order(self, order: dict[str, Any]) -> None:
        body = {"restaurant_id": int(order["restaurant_id"]), "delivery_lat": round(order["delivery_lat"], 6),
                "delivery_lon": round(order["delivery_lon"], 6), "user_id": int(order["user_id"])}  # the canary key
        answer = await self._post("eta", "/v1/eta", body)
        if answer is None:
            return
        self.stats.eta_ok += 1
        due = order["ts"] + float(self.world.wall_seconds(order["delivered_minutes"]))
        self._schedule(due, delivery_record(answer[0], due, order["delivered_minutes"], order["true_eta_minutes"],
                                            order["scenario"]))

    async def _session(self, session: dict[str, Any]) -> None:
        body = {"user_id": int(session["user_id"]), "user_lat": round(session["user_lat"], 6),
                "user_lon": round(session["user_lon"], 6)}
        answer = await self._post("feed", "/v1/feed", body)
        if answer is None:
            return
        request_id, payload = answer
        try:
            shown = [int(card["restaurant_id"]) for card in payload["cards"]]
        except (KeyError, TypeError, ValueError):
            self._error("feed", "bad-body", f"no cards with restaurant_id in {str(payload)[:200]}")
            return
        self.stats.feed_ok += 1
        _, ordered = self.world.feed_decisions(body["user_id"], body["user_lat"], body["user_lon"], session["ts"],
                                               shown)
        chosen = [rid for rid, yes in zip(shown, ordered) if yes]
        self.stats.feed_orders += len(chosen)
        end = session["ts"] + float(self.world.wall_seconds(SESSION_MINUTES))
        self._schedule(end, feed_record(request_id, end, chosen, self.world.scenario))

    async def _post(self, endpoint: str, path: str, body: dict[str, Any]) -> tuple[str, dict] | None:
        """(request_id, response body) of a 200, or None after counting why not."""
        sent = uuid.uuid4().hex
        async with self._slots:
            try:
                response = await self.client.post(path, content=orjson.dumps(body), headers={
                    "content-type": "application/json", REQUEST_ID_HEADER: sent})
            except httpx.TimeoutException as exc:
                self._error(endpoint, "timeout", repr(exc))
                return None
            except httpx.HTTPError as exc:  # refused, reset, protocol errors: serving is down or restarting
                self._error(endpoint, "connection", repr(exc))
                return None
        if response.status_code != 200:
            self._error(endpoint, str(response.status_code), response.text[:200])
            return None
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            self._error(endpoint, "bad-json", response.text[:200])
            return None
        request_id = payload.get("request_id") if isinstance(payload, dict) else None
        return (request_id if isinstance(request_id, str) and request_id else sent), payload

    def _error(self, endpoint: str, reason: str, detail: str) -> None:
        key = f"{endpoint}:{reason}"
        if not self.stats.errors[key]:  # the first of each kind says what happened; the rest are counted
            logger.warning("%s failed (%s): %s", endpoint, reason, detail)
        self.stats.errors[key] += 1
