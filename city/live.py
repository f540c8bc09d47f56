"""`City`: the world, its customers and its streaming job, run together on a compressed clock.

Every tick (a quarter of a wall second): new orders and sessions arrive and go to serving,
a snapshot of the live features is taken every 5 world-minutes (and pushed unless pushes are
paused), due outcomes are written to the Redis stream, and the control keys are read:

    <prefix>:city:scenario   normal | rain | new-restaurants | taste-shift
    <prefix>:city:pushes     on | off

The city writes both keys when it starts and whenever its own API changes them; another
process changes the running city by setting a key (`redis-cli set courier:city:scenario rain`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from city.customers import Customers, OutcomeLog
from city.world import SCENARIOS, World
from feature_repo.connection import redis_address, redis_options
from serving.auth import client_headers

if TYPE_CHECKING:  # Feast takes seconds to import: only a city that pushes loads it
    from feast import FeatureStore

logger = logging.getLogger("city")
RETRY_S = 5.0  # how long a failed Redis is left alone (a blackholed one costs a connect timeout per try)


def default_redis() -> str:
    """The Redis address of the project (COURIER_REDIS, default 127.0.0.1:6379)."""
    return redis_address()


def redis_client(address: str) -> aioredis.Redis:
    """An asyncio Redis client with short timeouts (a dead Redis must not stall the city), for
    COURIER_REDIS's form `host:port[,password=...,ssl=true,db=0]` (feature_repo/connection.py)."""
    # no retries inside a call: the next tick retries, and redis-py's default backoff would stall the loop
    return aioredis.Redis(**redis_options(address), socket_timeout=2.0, socket_connect_timeout=2.0,
                          retry=Retry(NoBackoff(), 0))


class City:
    """The live city against a serving URL (module doc). `run()` blocks; `start()` runs it in a thread."""

    def __init__(self, world: World, url: str, *, redis: str | None = None, store: FeatureStore | None = None,
                 outcomes_stream: str = "courier:outcomes", prefix: str = "courier", concurrency: int = 64,
                 timeout_s: float = 5.0, tick_s: float = 0.25, progress_s: float = 10.0,
                 clock: Callable[[], float] = time.time, out: Callable[[str], None] | None = print):
        self.world, self.url = world, url.rstrip("/")
        self.redis_address = redis or default_redis()
        self.pusher = None
        if store is not None:
            from city.push import Pusher

            self.pusher = Pusher(store)
        self.outcomes_stream, self.concurrency, self.timeout_s = outcomes_stream, concurrency, timeout_s
        self.scenario_key, self.pushes_key = f"{prefix}:city:scenario", f"{prefix}:city:pushes"
        self.tick_s, self.progress_s, self.clock, self.out = tick_s, progress_s, clock, out
        self.pushes_on = True
        self.pushes = self.push_errors = self.control_errors = 0
        self.customers: Customers | None = None
        self._stop = threading.Event()
        self._asked_scenario: str | None = None
        self._asked_pushes: bool | None = None
        self._seen: list[str | None] = [None, None]  # the control keys' values as last written or read
        self._profiles_due = world.scenario == "new-restaurants"  # started in it: serving must learn them
        self._control_retry_at = 0.0  # after a Redis failure, leave the keys alone for a while

    # -- the drill's API (thread-safe: requests are applied by the next tick) ----------------------

    @property
    def scenario(self) -> str:
        """The world's current scenario."""
        return self.world.scenario

    def set_scenario(self, name: str) -> None:
        """Switch the scenario (one of SCENARIOS) at the next tick."""
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}: choose one of {', '.join(SCENARIOS)}")
        self._asked_scenario = name

    def pause_pushes(self) -> None:
        """Stop pushing live features (the pipeline is late); the world goes on."""
        self._asked_pushes = False

    def resume_pushes(self) -> None:
        """Push live features again."""
        self._asked_pushes = True

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop at the next tick (safe from signal handlers and other threads)."""
        self._stop.set()

    def run(self, duration_s: float | None = None) -> dict[str, Any]:
        """Run until `duration_s` wall seconds passed or `stop()`; returns the final stats."""
        self._stop.clear()
        return asyncio.run(self.run_async(duration_s))

    def start(self, duration_s: float | None = None) -> threading.Thread:
        """`run()` in a daemon thread; `stop()` then `join()` it."""
        self._stop.clear()  # here, not in the thread: a stop() right after start() must not be lost
        thread = threading.Thread(target=lambda: asyncio.run(self.run_async(duration_s)), name="city", daemon=True)
        thread.start()
        return thread

    def stats(self) -> dict[str, Any]:
        """Counters so far: orders, feeds, outcomes, pushes, errors."""
        c = self.customers.stats if self.customers else None
        errors = dict(c.errors) if c else {}
        if self.push_errors:
            errors["push"] = self.push_errors
        if self.control_errors:
            errors["redis-control"] = self.control_errors
        log = self.customers.outcomes if self.customers else None
        if log and log.errors:
            errors["redis-outcomes"] = log.errors
        if log and log.dropped:
            errors["outcomes-dropped"] = log.dropped  # the buffer overflowed while Redis was away
        return {"scenario": self.scenario, "pushes_on": self.pushes_on, "orders": c.orders if c else 0,
                "eta_ok": c.eta_ok if c else 0, "sessions": c.sessions if c else 0, "feed_ok": c.feed_ok if c else 0,
                "feed_orders": c.feed_orders if c else 0, "outcomes": log.written if log else 0,
                "pending": self.customers.pending if self.customers else 0, "shed": c.shed if c else 0,
                "pushes": self.pushes, "errors": errors}

    # -- the loop ---------------------------------------------------------------------------------

    async def run_async(self, duration_s: float | None = None) -> dict[str, Any]:
        """The city's loop (see `run`)."""
        redis = redis_client(self.redis_address)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="city-push")  # Feast writes, one at a time
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s, limits=limits,
                                     headers=client_headers()) as client:  # the chart's key, if any
            self.customers = Customers(self.world, client, OutcomeLog(redis, self.outcomes_stream), self.concurrency)
            try:
                await self._loop(redis, pool, duration_s)
            finally:
                await self.customers.drain(self.timeout_s)
                self.customers.release(self.clock())
                await self.customers.outcomes.flush(force=True)
                await redis.aclose()
                pool.shutdown(wait=True)
        final = self.stats()
        self._say(f"stopped: {self._line(final)}; {final['pending']} deliveries/sessions still open were dropped")
        return final

    async def _loop(self, redis: aioredis.Redis, pool: ThreadPoolExecutor, duration_s: float | None) -> None:
        now = started = self.clock()
        self.world.start(now)
        await self._publish(redis, self.scenario, "on" if self.pushes_on else "off")
        self._say(f"live city: {self.url}, speed {self.world.speed:g}, scenario {self.scenario}, "
                  f"outcomes -> {self.outcomes_stream} at {self.redis_address}, "
                  f"pushes {'to ' + self.pusher.store.config.online_store.type if self.pusher else 'off (no store)'}")
        next_snapshot = next_progress = now
        while not self._stop.is_set() and (duration_s is None or now - started < duration_s):
            await self._control(redis)
            customers = self.customers
            customers.place(self.world.place_orders(self.world.orders.take(now)))
            customers.open(self.world.open_sessions(self.world.sessions.take(now)))
            if now >= next_snapshot:
                await self._snapshot(now, pool)
                next_snapshot = max(next_snapshot + self.world.snapshot_s, now)
            customers.release(now)
            await customers.outcomes.flush()
            if now >= next_progress:
                self._say(self._line(self.stats()))
                next_progress = now + self.progress_s
            await asyncio.sleep(max(0.0, self.tick_s - (self.clock() - now)))
            now = self.clock()

    async def _snapshot(self, now: float, pool: ThreadPoolExecutor) -> None:
        """Take the world's snapshot (the truth's input); write new restaurants' profiles when due (onboarding is
        not the streaming job, so paused pushes do not hold it up) and push the snapshot when pushes are on."""
        snapshot = self.world.snapshot(now)
        if self.pusher is None:
            return
        loop = asyncio.get_running_loop()
        try:
            if self._profiles_due:
                await loop.run_in_executor(pool, self.pusher.write_profiles, self.world.new_restaurants, now)
                self._profiles_due = False
            if self.pushes_on:
                await loop.run_in_executor(pool, self.pusher.push, snapshot)
                self.pushes += 1
        except Exception as exc:  # noqa: BLE001 - any store failure (Redis down, SQLite locked): retry next time
            if not self.push_errors:
                logger.warning("writing to the online store failed (%s: %s); retrying every snapshot",
                               exc.__class__.__name__, exc)
            self.push_errors += 1

    async def _control(self, redis: aioredis.Redis) -> None:
        """Apply the API's requests, then changes of the control keys made by other processes."""
        scenario, self._asked_scenario = self._asked_scenario, None
        pushes, self._asked_pushes = self._asked_pushes, None
        if scenario is not None or pushes is not None:
            self._apply(scenario, pushes)
            await self._publish(redis, self.scenario, "on" if self.pushes_on else "off")
        if time.monotonic() < self._control_retry_at:
            return
        try:
            values = [v.decode() if v is not None else None for v in await redis.mget(self.scenario_key,
                                                                                         self.pushes_key)]
        except (RedisError, OSError) as exc:
            if not self.control_errors:
                logger.warning("cannot read the control keys from Redis (%s); the city goes on as it is", exc)
            self.control_errors += 1
            self._control_retry_at = time.monotonic() + RETRY_S
            return
        changed = [new if new is not None and new != old else None for new, old in zip(values, self._seen)]
        self._seen = [v if v is not None else old for v, old in zip(values, self._seen)]
        if changed[0] is not None and changed[0] not in SCENARIOS:
            logger.warning("ignoring %s=%r: choose one of %s", self.scenario_key, changed[0], ", ".join(SCENARIOS))
            changed[0] = None
        if changed[1] is not None and changed[1] not in ("on", "off"):
            logger.warning("ignoring %s=%r: use on or off", self.pushes_key, changed[1])
            changed[1] = None
        if changed != [None, None]:
            self._apply(changed[0], None if changed[1] is None else changed[1] == "on")

    def _apply(self, scenario: str | None, pushes: bool | None) -> None:
        if scenario is not None and scenario != self.scenario:
            self.world.set_scenario(scenario)
            self._profiles_due = scenario == "new-restaurants"
            self._say(f"scenario -> {scenario}")
        if pushes is not None and pushes != self.pushes_on:
            self.pushes_on = pushes
            self._say(f"pushes -> {'on' if pushes else 'off'}")

    async def _publish(self, redis: aioredis.Redis, scenario: str, pushes: str) -> None:
        """Write the city's state to the control keys (so only later changes by others are applied)."""
        self._seen = [scenario, pushes]
        try:
            await redis.mset({self.scenario_key: scenario, self.pushes_key: pushes})
        except (RedisError, OSError) as exc:
            if not self.control_errors:
                logger.warning("cannot write the control keys to Redis (%s)", exc)
            self.control_errors += 1

    @staticmethod
    def _line(s: dict[str, Any]) -> str:
        errors = sum(s["errors"].values())
        detail = " (" + ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())) + ")" if errors else ""
        return (f"scenario={s['scenario']} orders={s['orders']} eta_ok={s['eta_ok']} feeds={s['sessions']} "
                f"feed_ok={s['feed_ok']} outcomes={s['outcomes']} open={s['pending']} "
                f"pushes={s['pushes']}{'' if s['pushes_on'] else ' (paused)'} shed={s['shed']} errors={errors}{detail}")

    def _say(self, line: str) -> None:
        if self.out is not None:
            self.out(f"[city {time.strftime('%H:%M:%S', time.gmtime(self.clock()))}Z] {line}")
