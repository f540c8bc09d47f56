"""The live city (city/): the simulator's processes run live, pushes, true feed decisions, outcomes.

Real parts: the small simulated city of conftest, a Feast SQLite store of the test's own, the
Redis on COURIER_REDIS (keys unique per test, deleted after) and a starlette app under uvicorn.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Self

import numpy as np
import orjson
import pandas as pd
import pytest
import redis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from city.__main__ import SCENARIO_CHOICES
from city.customers import OutcomeLog, delivery_record, feed_record
from city.live import City, redis_client
from city.push import Pusher
from city.world import RAIN_TRAVEL_FACTOR, SCENARIOS, World, delivery_truth, stamp
from feature_repo.store import apply, open_store
from models.geo import haversine_km
from models.sessions import examine, relevance
from models.simulator import (
    CUISINES,
    DELIVERY_RADIUS_KM,
    PREP_NOISE,
    TRAVEL_NOISE,
    _latest_snapshot_values,
    is_open,
)
from serving.features import OnlineFeatures
from serving.paths import PROJECT_ROOT
from tests.conftest import SMALL_CITY, free_port

REDIS = os.environ.get("COURIER_REDIS", "127.0.0.1:6379")
LUNCH = stamp(pd.Timestamp("2026-11-18T12:30:00Z").timestamp())  # a Wednesday, lunchtime: kitchens open


@pytest.fixture()
def rdb():
    """A client of the shared Redis, and a unique key prefix; every key under it is deleted afterwards."""
    host, _, port = REDIS.split(",")[0].rpartition(":")
    client = redis.Redis(host=host, port=int(port))
    prefix = f"test-city-{uuid.uuid4().hex[:10]}"
    yield client, prefix
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def _stream(client: redis.Redis, key: str) -> list[dict]:
    return [orjson.loads(fields[b"r"]) for _, fields in client.xrange(key)]


def _hour_shares(stamps: pd.Series) -> np.ndarray:
    return np.bincount(pd.DatetimeIndex(stamps).hour, minlength=24) / len(stamps)


def test_order_stream_follows_the_simulators_process(city_dir):
    """A world-day of arrivals at speed S: S x orders_per_day x scale (x1.25 on weekends), the simulator's
    hours and restaurants; the live stream hands out each arrival once, across midnight too."""
    speed = 8
    world = World.load(city_dir, speed=speed, seed=1)
    per_day = SMALL_CITY.orders_per_day * speed
    wednesday, saturday = pd.Timestamp("2026-11-18", tz="UTC"), pd.Timestamp("2026-11-21", tz="UTC")
    for day, factor in ((wednesday, 1.0), (saturday, 1.25)):
        n = len(world.orders.draw(day.timestamp(), (day + pd.Timedelta(days=1)).timestamp()))
        assert abs(n - factor * per_day) < 5 * np.sqrt(factor * per_day), (day, n)

    times = world.orders.draw(wednesday.timestamp(), (wednesday + pd.Timedelta(days=1)).timestamp())
    placed = world.place_orders(times)
    offline = pd.read_parquet(city_dir / "offline" / "orders.parquet")
    assert 0.5 < len(placed) / len(times) <= 1.0  # at night nothing is open: those orders are lost, as simulated
    total_variation = 0.5 * np.abs(_hour_shares(placed["event_timestamp"]) - _hour_shares(offline["event_timestamp"]))
    assert total_variation.sum() < 0.08
    ids = world.restaurants["restaurant_id"]
    live = placed["restaurant_id"].value_counts().reindex(ids, fill_value=0)
    simulated = offline["restaurant_id"].value_counts().reindex(ids, fill_value=0)
    assert np.corrcoef(live, simulated)[0, 1] > 0.85

    stream = world.sessions  # the live taking: chunks over midnight, each arrival once and in order
    start = (wednesday + pd.Timedelta(hours=23)).timestamp()
    stream.start(start)
    edges = start + np.linspace(0, 2 * 3600, 13)[1:]
    chunks = [stream.take(edge) for edge in edges]
    taken = np.concatenate(chunks)
    assert np.all(np.diff(taken) >= 0) and taken.min() >= start and taken.max() <= edges[-1]
    assert all(chunk.max() <= edge for chunk, edge in zip(chunks, edges) if len(chunk))
    assert (taken < start + 3600).any() and (taken >= start + 3600).any()  # both days contribute


def test_delivery_truth_is_the_simulators_formula_and_rain_slows_travel(city_dir):
    """delivery_truth reproduces the simulator's true_* minutes; rain is +30 % travel; the world uses the
    latest snapshot's load and congestion and adds the simulator's noise."""
    offline = city_dir / "offline"
    orders = pd.read_parquet(offline / "orders.parquet").head(3000)
    restaurants = pd.read_parquet(offline / "restaurants.parquet").set_index("restaurant_id")
    load = _latest_snapshot_values(orders, pd.read_parquet(offline / "restaurant_load.parquet"), "restaurant_id",
                                   "open_orders_15m")
    congestion = _latest_snapshot_values(orders, pd.read_parquet(offline / "area_congestion.parquet"), "area_id",
                                         "congestion_ratio")
    rest = restaurants.loc[orders["restaurant_id"]]
    distance = haversine_km(rest["lat"], rest["lon"], orders["delivery_lat"], orders["delivery_lon"])
    when = pd.DatetimeIndex(orders["event_timestamp"])
    truth = delivery_truth(rest["true_prep_base_minutes"].to_numpy(), distance, when, load, congestion)
    for part in ("prep", "travel", "wait", "eta"):
        np.testing.assert_allclose(truth[part], orders[f"true_{part}_minutes"], rtol=1e-9, err_msg=part)
    rain = delivery_truth(rest["true_prep_base_minutes"].to_numpy(), distance, when, load, congestion,
                          RAIN_TRAVEL_FACTOR)
    np.testing.assert_allclose(rain["travel"], 1.3 * truth["travel"], rtol=1e-12)
    np.testing.assert_allclose(rain["eta"] - truth["eta"], 0.3 * truth["travel"], rtol=1e-9)

    world = World.load(city_dir, speed=10, seed=2)
    now = LUNCH.timestamp()
    world.place_orders(np.linspace(now - 0.9 * world.window_s, now, 400))  # 400 orders in the last 15 world-min
    snap = world.snapshot(now)
    assert snap.load["open_orders_15m"].sum() > 0 and snap.congestion["congestion_ratio"].max() > 0
    world.set_scenario("rain")
    placed = world.place_orders(np.full(4000, now + 1.0))
    kitchen = snap.load.set_index("restaurant_id")["open_orders_15m"]
    area = snap.congestion.set_index("area_id")["congestion_ratio"]
    base = restaurants.loc[placed["restaurant_id"], "true_prep_base_minutes"].to_numpy()
    load = kitchen.loc[placed["restaurant_id"]].to_numpy()
    np.testing.assert_allclose(placed["true_prep_minutes"], base + 2.0 * load)
    expected_wait = 2.0 + 7.0 * np.minimum(area.reindex(placed["area_id"]).fillna(0).to_numpy(), 3.0)
    np.testing.assert_allclose(placed["true_wait_minutes"], expected_wait)
    dry = delivery_truth(base, haversine_km(restaurants.loc[placed["restaurant_id"], "lat"],
                                            restaurants.loc[placed["restaurant_id"], "lon"],
                                            placed["delivery_lat"], placed["delivery_lon"]),
                         pd.DatetimeIndex(placed["event_timestamp"]), 0, 0)
    np.testing.assert_allclose(placed["true_travel_minutes"], 1.3 * dry["travel"])
    assert set(placed["scenario"]) == {"rain"}
    noise = placed["delivered_minutes"] - placed["true_eta_minutes"]
    assert abs(noise.std() / np.hypot(PREP_NOISE, TRAVEL_NOISE) - 1) < 0.06 and abs(noise.mean()) < 0.2


def test_snapshots_are_the_simulators_and_pushes_make_the_live_views_fresh(tmp_path, city_dir):
    """A snapshot at S=1 equals the simulator's snapshot functions; at S=10 its window is 90 s; pushed
    through the push sources it is what serving reads, 1 s old; new restaurants become known."""
    from models.simulator import area_congestion_snapshots, restaurant_load_snapshots

    now = LUNCH.timestamp()
    slow = World.load(city_dir, speed=1, seed=3)
    orders = slow.place_orders(np.sort(now - np.random.default_rng(0).uniform(0, 1200, 300)))
    snap = slow.snapshot(now)
    at = pd.DatetimeIndex([LUNCH])
    simulated = restaurant_load_snapshots(orders, slow.restaurants["restaurant_id"].to_numpy(), at)
    load = snap.load.set_index("restaurant_id")["open_orders_15m"]
    assert load[load > 0].to_dict() == simulated.set_index("restaurant_id")["open_orders_15m"].to_dict()
    areas = area_congestion_snapshots(orders, slow.couriers, at).set_index("area_id")
    mine = snap.congestion.set_index("area_id").loc[areas.index]
    for column in ("area_orders_15m", "couriers_on_shift", "congestion_ratio"):
        np.testing.assert_allclose(mine[column], areas[column], err_msg=column)

    world = World.load(city_dir, speed=10, seed=3)
    world.place_orders(np.linspace(now - 120, now, 300))
    snap = world.snapshot(now)
    counted = world._recent[world._recent["ts"] > now - 90]  # 15 world-minutes = 90 wall seconds at S=10
    assert snap.load["open_orders_15m"].sum() == len(counted) == snap.congestion["area_orders_15m"].sum()

    store = open_store("sqlite", data_dir=tmp_path)
    apply(store, data_dir=city_dir)
    pusher = Pusher(store)
    world.set_scenario("new-restaurants")
    new = world.new_restaurants
    assert len(new) == int(np.ceil(0.1 * len(world.base_restaurants)))
    assert pusher.write_profiles(new, now) == len(new)
    snap = world.snapshot(now)
    assert pusher.push(snap) == len(snap.load) + len(snap.congestion)
    reader = OnlineFeatures(store, "eta_v1", deadline_s=10)
    areas = snap.congestion["area_id"].tolist()
    entities = [{"restaurant_id": int(r), "area_id": areas[i % len(areas)]}
                for i, r in enumerate(snap.load["restaurant_id"])]
    rows = reader.read_rows(entities, now=now + 1)
    np.testing.assert_array_equal(rows.columns["open_orders_15m"], snap.load["open_orders_15m"])
    ratio = snap.congestion.set_index("area_id")["congestion_ratio"]
    np.testing.assert_allclose(rows.columns["congestion_ratio"], ratio.loc[[e["area_id"] for e in entities]],
                               rtol=1e-6)
    for view in ("restaurant_load_15m", "area_congestion_15m"):
        np.testing.assert_allclose(rows.age_seconds[view], 1.0, atol=1e-3)
        assert not any(rows.expired[view])
    known = rows.columns["lat"][-len(new):]  # the new kitchens, written as restaurant_profile rows
    np.testing.assert_allclose(known, new["lat"], rtol=1e-6)


def test_pushes_land_in_a_redis_online_store(tmp_path, city_dir):
    """The same pushes through Feast's Redis online store (a project of the test's own, torn down after)."""
    from city.push import open_online_store

    store = open_store("redis", data_dir=tmp_path, redis=REDIS, project=f"city_{uuid.uuid4().hex[:8]}")
    apply(store, data_dir=city_dir)
    try:
        store = open_online_store("redis", tmp_path, redis=REDIS, project=store.project)
        world = World.load(city_dir, speed=10, seed=6)
        now = LUNCH.timestamp()
        world.place_orders(np.linspace(now - 80, now, 200))
        snap = world.snapshot(now)
        Pusher(store).push(snap)
        busy = snap.load[snap.load["open_orders_15m"] > 0].head(5)
        area = snap.congestion.sort_values("area_orders_15m").iloc[-1]
        rows = OnlineFeatures(store, "eta_v1", deadline_s=10).read_rows(
            [{"restaurant_id": int(r), "area_id": area["area_id"]} for r in busy["restaurant_id"]], now=now + 2)
        assert rows.columns["open_orders_15m"] == busy["open_orders_15m"].tolist() and len(busy)
        np.testing.assert_allclose(rows.columns["area_orders_15m"], area["area_orders_15m"])
        np.testing.assert_allclose(rows.age_seconds["restaurant_load_15m"], 2.0, atol=1e-3)
    finally:
        store.teardown()


def test_feed_decisions_use_the_true_order_probability(city_dir):
    """p_order = examine(position) * sigmoid(relevance) (models.sessions) for each shown card, 0 for cards
    the user cannot order from; over many impressions the order rate per position matches it."""
    world = World.load(city_dir, speed=1, seed=4)
    now = LUNCH.timestamp()
    sessions = world.open_sessions(np.full(300, now))
    rest = world.restaurants.set_index("restaurant_id")
    hour = 12.5
    open_now = is_open(rest["opens_hour"], rest["closes_hour"], 12)
    repeats, rates, probabilities = 20, [], []
    for s in sessions.itertuples():
        km = haversine_km(s.user_lat, s.user_lon, rest["lat"], rest["lon"])
        candidate = open_now & (km <= DELIVERY_RADIUS_KM)
        shown, km = rest.index[candidate][:10].tolist(), km[candidate][:10]
        cards = rest.loc[shown]
        taste = world.users.loc[s.user_id - 1, [f"true_taste_{c}" for c in cards["cuisine"]]].to_numpy()
        cuisine = pd.Categorical(cards["cuisine"], categories=CUISINES).codes
        logit = relevance(cards["true_popularity"].to_numpy(), taste, km, cards["price_level"].to_numpy(), hour,
                          cuisine)
        expected = examine(np.arange(1, len(shown) + 1)) / (1 + np.exp(-logit))
        draws = [world.feed_decisions(s.user_id, s.user_lat, s.user_lon, now, shown) for _ in range(repeats)]
        np.testing.assert_allclose(draws[0][0], expected, rtol=1e-12)
        rates.append(np.pad(np.mean([ordered for _, ordered in draws], axis=0), (0, 10 - len(shown))))
        probabilities.append(np.pad(expected, (0, 10 - len(shown))))
    rate, p = np.mean(rates, axis=0), np.mean(probabilities, axis=0)
    n = len(sessions) * repeats
    assert np.all(np.abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-3), (rate, p)
    assert p[0] > p[4] > 0  # position bias, and the comparison is not all zeros

    closed = rest.index[~open_now][:3].tolist()
    s = sessions.iloc[0]
    p_closed, ordered = world.feed_decisions(int(s.user_id), s.user_lat, s.user_lon, now, closed + [10**9])
    assert not p_closed.any() and not ordered.any()
    shown = rest.index[open_now][:5].tolist()
    before = world.feed_decisions(int(s.user_id), s.user_lat, s.user_lon, now, shown)[0]
    world.set_scenario("taste-shift")
    after = world.feed_decisions(int(s.user_id), s.user_lat, s.user_lon, now, shown)[0]
    assert not np.allclose(before, after)  # the same user likes other cuisines now


def test_outcome_records_match_the_contract(rdb):
    """XADD one field `r` = orjson record per outcome, exactly the contract's fields; a Redis that does
    not answer keeps the records for the next flush."""
    client, prefix = rdb
    stream = f"{prefix}:outcomes"

    async def write() -> OutcomeLog:
        log = OutcomeLog(redis_client(REDIS), stream, batch=2)
        log.add(delivery_record("r-eta-1", 1796000000.5, 31.25, 29.5, "rain"))
        log.add(feed_record("r-feed-1", 1796000001.0, [12, 7], "normal"))
        log.add(feed_record("r-feed-2", 1796000002.0, [], "taste-shift"))
        await log.flush()
        await log.client.aclose()
        return log

    log = asyncio.run(write())
    assert log.written == 3 and not log.buffer
    entries = client.xrange(stream)
    assert [set(fields) for _, fields in entries] == [{b"r"}] * 3
    delivery, feed, empty = _stream(client, stream)
    assert delivery == {"request_id": "r-eta-1", "ts": 1796000000.5, "kind": "delivery", "delivered_minutes": 31.25,
                        "true_eta_minutes": 29.5, "scenario": "rain"}
    assert feed == {"request_id": "r-feed-1", "ts": 1796000001.0, "kind": "feed", "ordered": [12, 7],
                    "scenario": "normal"}
    assert empty["ordered"] == [] and empty["scenario"] == "taste-shift"
    assert all(isinstance(r["ts"], float) for r in (delivery, feed, empty))

    async def unreachable() -> OutcomeLog:
        log = OutcomeLog(redis_client(f"127.0.0.1:{free_port()}"), stream)
        log.add(feed_record("r-feed-3", 1.0, [], "normal"))
        await log.flush()
        await log.flush()  # within the back-off: not tried again
        return log

    down = asyncio.run(unreachable())
    assert down.written == 0 and down.errors == 1 and len(down.buffer) == 1


class _Serving:
    """A tiny stand-in for serving on a free port: /v1/eta answers without request_id (an older server:
    the client's X-Request-Id is the id), /v1/feed returns an id of its own and the nearest restaurants."""

    def __init__(self, restaurants: pd.DataFrame):
        self.restaurants = restaurants
        self.eta_ids: list[str] = []
        self.feed_ids: list[str] = []
        self.bodies: list[dict] = []
        app = Starlette(routes=[Route("/v1/eta", self.eta, methods=["POST"]),
                                Route("/v1/feed", self.feed, methods=["POST"])])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def eta(self, request: Request) -> JSONResponse:
        self.bodies.append(orjson.loads(await request.body()))
        self.eta_ids.append(request.headers["x-request-id"])
        return JSONResponse({"eta_minutes": 25.0, "model_version": "stub"})

    async def feed(self, request: Request) -> JSONResponse:
        body = orjson.loads(await request.body())
        km = haversine_km(body["user_lat"], body["user_lon"], self.restaurants["lat"], self.restaurants["lon"])
        nearest = self.restaurants["restaurant_id"].to_numpy()[np.argsort(km)[:20]]
        request_id = uuid.uuid4().hex
        self.feed_ids.append(request_id)
        return JSONResponse({"request_id": request_id, "cards": [
            {"restaurant_id": int(r), "p_order": 0.05, "eta_minutes": 25.0, "sponsored": False} for r in nearest]})

    def __enter__(self) -> Self:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _wait(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the city did not get there in time"
        time.sleep(0.05)


def test_city_calls_serving_reports_outcomes_and_follows_its_controls(rdb, city_dir, tmp_path):
    """A city at S=1800 against a local server: /v1/eta and /v1/feed calls, delivery and feed outcomes
    carrying those calls' request ids, pushes, and control by another process (Redis keys: new
    restaurants, pushes off) and by the Python API (rain)."""
    client, prefix = rdb
    stream = f"{prefix}:outcomes"
    apply(open_store("sqlite", data_dir=tmp_path), data_dir=city_dir)
    reader = open_store("sqlite", data_dir=tmp_path)  # a store object of the test's own: the city's writes in a thread
    world = World.load(city_dir, speed=1800, seed=5)
    new_ids = world.new_restaurants["restaurant_id"].tolist()
    offset = LUNCH.timestamp() - time.time()  # the world's clock at lunchtime, whatever the hour here
    with _Serving(world.restaurants) as serving:
        city = City(world, f"http://127.0.0.1:{serving.port}", redis=REDIS,
                    store=open_store("sqlite", data_dir=tmp_path), outcomes_stream=stream, prefix=prefix,
                    tick_s=0.05, clock=lambda: time.time() + offset, out=None)
        thread = city.start()
        try:
            _wait(lambda: client.get(f"{prefix}:city:scenario") == b"normal" and city.pushes > 0)
            _wait(lambda: {r["kind"] for r in _stream(client, stream)} == {"delivery", "feed"})
            client.set(f"{prefix}:city:scenario", "new-restaurants")
            client.set(f"{prefix}:city:pushes", "off")
            _wait(lambda: city.scenario == "new-restaurants" and not city.pushes_on)
            pushes = city.pushes

            def profiles_known() -> bool:
                rows = reader.get_online_features(features=["restaurant_profile:lat"],
                                                  entity_rows=[{"restaurant_id": r} for r in new_ids]).to_dict()
                return None not in rows["lat"]

            _wait(profiles_known)  # onboarding is written even while the streaming pushes are paused
            city.set_scenario("rain")
            _wait(lambda: any(r["scenario"] == "rain" and r["kind"] == "delivery" for r in _stream(client, stream)))
            assert client.get(f"{prefix}:city:scenario") == b"rain" and city.pushes == pushes
        finally:
            city.stop()
            thread.join(timeout=30)
    assert not thread.is_alive()
    records = _stream(client, stream)
    deliveries = [r for r in records if r["kind"] == "delivery"]
    feeds = [r for r in records if r["kind"] == "feed"]
    assert {r["request_id"] for r in deliveries} <= set(serving.eta_ids)
    assert {r["request_id"] for r in feeds} <= set(serving.feed_ids)
    assert all(set(r) == {"request_id", "ts", "kind", "delivered_minutes", "true_eta_minutes", "scenario"}
               for r in deliveries)
    ids = set(world.base_restaurants["restaurant_id"]) | set(new_ids)
    assert all(set(r["ordered"]) <= ids for r in feeds)
    assert {b["restaurant_id"] for b in serving.bodies} <= ids
    stats = city.stats()
    assert stats["errors"] == {} and stats["outcomes"] == len(records)
    assert stats["eta_ok"] == len(serving.eta_ids) and stats["feed_ok"] == len(serving.feed_ids)


def test_cli_runs_against_a_dead_server_and_stops_on_sigterm(rdb, city_dir):
    """`python -m city` with nothing listening counts errors instead of crashing, and SIGTERM ends it cleanly."""
    client, prefix = rdb
    assert SCENARIO_CHOICES == SCENARIOS
    process = subprocess.Popen(
        [sys.executable, "-m", "city", "--url", f"http://127.0.0.1:{free_port()}", "--speed", "600",
         "--data-dir", str(city_dir), "--online-store", "none", "--redis", REDIS, "--prefix", prefix,
         "--outcomes-stream", f"{prefix}:outcomes", "--scenario", "taste-shift"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = process.stdout.readline()
        assert "live city" in first, first
        _wait(lambda: client.get(f"{prefix}:city:scenario") == b"taste-shift")
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "stopped: scenario=taste-shift" in output


@pytest.mark.integration
def test_the_city_against_the_real_service_reports_outcomes_for_logged_predictions(served, served_log_stream,
                                                                                  city_dir):
    """The live city on the real Ray Serve app (fast clock): every outcome it reports names a request the
    prediction log holds, deliveries for /v1/eta answers and feed outcomes for /v1/feed answers."""
    client = redis.Redis(host="127.0.0.1", port=6379)
    outcomes, prefix = f"courier-test:{uuid.uuid4().hex[:8]}:outcomes", f"courier-test-{uuid.uuid4().hex[:6]}"
    try:
        offset = LUNCH.timestamp() - time.time()  # the world at lunchtime: at night no kitchen takes orders
        city = City(World.load(city_dir, speed=1800, seed=3), served.url, redis="127.0.0.1:6379",
                    outcomes_stream=outcomes, prefix=prefix, out=None, clock=lambda: time.time() + offset)
        city.run(duration_s=12)
        reported = [orjson.loads(f[b"r"]) for _, f in client.xrange(outcomes)]
        logged: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the log is written in batches, after the answers: wait for the last
            logged = {orjson.loads(f[b"r"])["request_id"]: orjson.loads(f[b"r"])["endpoint"]
                      for _, f in client.xrange(served_log_stream)}
            if all(r["request_id"] in logged for r in reported):
                break
            time.sleep(0.5)
        kinds = {r["kind"] for r in reported}
        assert {"delivery", "feed"} <= kinds, city.stats()
        for record in reported:
            assert logged.get(record["request_id"]) == {"delivery": "eta", "feed": "feed"}[record["kind"]], record
    finally:
        client.delete(outcomes, f"{prefix}:city:scenario", f"{prefix}:city:pushes")
