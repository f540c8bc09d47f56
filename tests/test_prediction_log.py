"""The prediction log: every answered request reaches the Redis stream, and the request never waits for it."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest
import redis

from loadtest.chaos import RedisServer
from models.eta.features import FEATURE_NAMES
from serving.errors import InvalidInput
from serving.metrics import ServingMetrics
from serving.prediction_log import PredictionLog, PredictionLogArgs, redis_client, request_id
from tests.conftest import free_port


@pytest.fixture()
def own_redis(tmp_path):
    """A redis-server of this test's own, so stopping it harms nobody."""
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


class Counting:
    """Stands in for a Ray counter: records what was counted (the log's metrics outside Ray Serve)."""

    def __init__(self):
        self.counts: dict[tuple, float] = {}

    def inc(self, value: float = 1, tags: dict | None = None) -> None:
        key = tuple(sorted((tags or {}).items()))
        self.counts[key] = self.counts.get(key, 0) + value


def _metrics() -> ServingMetrics:
    metrics = ServingMetrics(export=False)
    metrics.predictions_logged, metrics.predictions_dropped = Counting(), Counting()
    return metrics


def test_everything_appended_reaches_the_stream_and_a_dead_sink_only_counts_drops(own_redis):
    """While Redis is up every record arrives, in order; with it down, appends cost nothing and each
    record that could not be sent is counted as dropped (reason sink_unavailable); a full buffer too."""
    stream = "courier:predictions"
    metrics = _metrics()

    async def scenario() -> PredictionLog:
        log = PredictionLog(PredictionLogArgs(redis=own_redis.address, stream=stream, batch_size=64), metrics)
        for i in range(500):
            log.append("eta", {"request_id": f"r{i}", "n": i})
        await asyncio.sleep(0.3)  # the background task sends without being asked
        await log.flush()
        assert log.sent == 500 and log.dropped == 0
        own_redis.stop()
        started = time.perf_counter()
        for i in range(100):
            log.append("feed", {"request_id": f"down{i}"})
        assert time.perf_counter() - started < 0.5  # appending never touches the network
        await asyncio.sleep(0.3)
        await log.flush()
        return log

    log = asyncio.run(scenario())
    assert log.dropped == 100 and log.sent == 500
    assert metrics.predictions_logged.counts == {(("endpoint", "eta"),): 500}
    assert metrics.predictions_dropped.counts == {(("endpoint", "feed"), ("reason", "sink_unavailable")): 100}
    own_redis.start()  # its data was not kept: count what reached it before the outage through a dump-free restart
    full = PredictionLog(PredictionLogArgs(redis=own_redis.address, buffer_limit=3, batch_size=10), _metrics())

    async def overflow() -> None:
        for i in range(5):
            full.append("eta", {"i": i})
        await full.flush()

    asyncio.run(overflow())
    assert full.dropped == 2 and full.sent == 3


def test_records_arrive_in_order_as_json(own_redis):
    async def scenario() -> None:
        log = PredictionLog(PredictionLogArgs(redis=own_redis.address, stream="s"), _metrics())
        for i in range(10):
            log.append("eta", {"request_id": f"r{i}", "eta_minutes": 20.5 + i})
        await log.flush()

    asyncio.run(scenario())
    client = redis.Redis(host="127.0.0.1", port=own_redis.port)
    entries = client.xrange("s")
    assert [orjson.loads(fields[b"r"])["request_id"] for _, fields in entries] == [f"r{i}" for i in range(10)]


def test_request_ids_are_the_callers_when_sane():
    assert request_id("order-42.a_b") == "order-42.a_b"
    generated = request_id(None)  # outside a Ray Serve request: a fresh uuid4
    assert len(generated) == 32 and generated != request_id(None)
    for bad in ("", "x" * 129, "has space", "semi;colon"):
        with pytest.raises(InvalidInput, match="X-Request-Id"):
            request_id(bad)


def test_the_redis_address_takes_feasts_connection_string_form(monkeypatch):
    """One form for every process (feature_repo/connection.py): the chart's COURIER_REDIS, password included."""
    from feature_repo.connection import redis_options

    client = redis_client("redis.svc:6380,password=s3cret")
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == ("redis.svc", 6380, "s3cret")
    assert redis_options("r:1,ssl=true,db=2") == {"host": "r", "port": 1, "password": None, "db": 2, "ssl": True}
    monkeypatch.setenv("COURIER_REDIS", "elsewhere:6390")
    assert redis_options(None)["host"] == "elsewhere"
    with pytest.raises(ValueError, match="COURIER_REDIS"):
        redis_options("no-port")


@pytest.mark.integration
def test_every_answer_under_load_is_logged_once_with_what_the_model_saw(served, served_log_stream, known, city_dir):
    """Under concurrent load on the real Ray Serve app, each answered /v1/eta and /v1/feed is in the
    stream exactly once, keyed by the request_id the response carries; ETA records hold the model's
    inputs by feature name, feed records what was shown at which position."""
    users = [1, 2, 3, 4, 5]
    bodies = [("eta", {**known, "delivery_lat": known["delivery_lat"] + i * 1e-4}) for i in range(240)]
    bodies += [("feed", {"user_id": users[i % 5], "user_lat": known["delivery_lat"], "user_lon": known["delivery_lon"],
                         "request_time": known["order_time"]}) for i in range(30)]

    async def send() -> list[httpx.Response]:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as http:
            async def one(endpoint, body):
                async with limit:
                    return await http.post(f"/v1/{endpoint}", json=body)
            return await asyncio.gather(*(one(e, b) for e, b in bodies))

    responses = asyncio.run(send())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
    sent = {r.json()["request_id"]: endpoint for r, (endpoint, _) in zip(responses, bodies)}
    assert all(r.headers["x-request-id"] == r.json()["request_id"] for r in responses)
    client = redis.Redis(host="127.0.0.1", port=6379)
    deadline = time.monotonic() + 30
    logged: dict[str, dict] = {}
    while time.monotonic() < deadline:
        logged = {}
        for _, fields in client.xrange(served_log_stream):
            record = orjson.loads(fields[b"r"])
            if record["request_id"] in sent:
                assert record["request_id"] not in logged, "logged twice"
                logged[record["request_id"]] = record
        if len(logged) == len(sent):
            break
        time.sleep(0.5)
    assert set(logged) == set(sent), f"{len(sent) - len(logged)} of {len(sent)} answers were not logged"
    eta = next(r for r in logged.values() if r["endpoint"] == "eta")
    assert set(eta["inputs"]) == set(FEATURE_NAMES) and eta["inputs"]["distance_km"] > 0
    assert eta["eta_minutes"] > 0 and eta["model"] == "eta" and eta["model_version"] and eta["variant"] == "champion"
    feed = next(r for r in logged.values() if r["endpoint"] == "feed")
    assert [c["position"] for c in feed["cards"]] == list(range(1, len(feed["cards"]) + 1))
    assert feed["model_versions"]["ranker"] == feed["model_version"] and 0 <= feed["cards"][0]["p_order"] <= 1
    assert feed["variant"] == "champion" and feed["variants"] == {"ranker": "champion", "eta": "champion"}
    echoed = httpx.post(f"{served.url}/v1/eta", json=known, headers={"X-Request-Id": "checkout-7"}, timeout=30)
    assert echoed.json()["request_id"] == "checkout-7"
    refused = httpx.post(f"{served.url}/v1/eta", json=known, headers={"X-Request-Id": "no spaces"}, timeout=30)
    assert refused.status_code == 422 and refused.json()["field"] == "X-Request-Id"
