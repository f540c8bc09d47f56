"""The capacity plan (loadtest/capacity_plan.py): arithmetic on measured inputs, and the Redis measurement
against the real Redis with the small city."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import redis

from loadtest.capacity_plan import Demand, Inputs, feed_settings, main, plan, redis_bytes_per_entity

INPUTS = Inputs(cpu_ms={"eta": {"replica Ingress": 4.0, "haproxy": 0.5}, "feed": {"replica Ingress": 8.0,
                                                                                  "replica Ranker": 3.0}},
                background_cores_per_node=0.2, bytes_per_entity={"user": 400, "restaurant": 500, "area": 200},
                redis_reads_per_eta=2, redis_reads_per_feed=2, target_utilization=0.5, cores_per_replica=1.0, min_replicas=2,
                redis_overhead=1.5, redis_replicas=2, redis_shard_gib=1, redis_shard_reads_per_s=100_000,
                source="test")


def test_cores_follow_the_rate_and_the_cost_per_request():
    demand = Demand(users=1000, restaurants=100, areas=10, peak_rps=1000, feed_share=0.2)
    result = plan(demand, INPUTS)
    # 800 ETA checks x 4.5 ms + 200 feeds x 11 ms = 5.8 cores busy; at 50 % utilization: 12 cores
    assert result["server_cpu_cores_busy"] == pytest.approx(5.8)
    assert result["server_cores"] == 12
    assert result["replicas"] == {"Ingress": 10, "Ranker": 2}  # (3.2 + 1.6) / 0.5 = 9.6 and 0.6 / 0.5, rounded up
    doubled = plan(dataclasses.replace(demand, peak_rps=2000), INPUTS)
    assert doubled["server_cpu_cores_busy"] == pytest.approx(2 * result["server_cpu_cores_busy"])


def test_redis_memory_is_entities_times_bytes_and_shards_cover_memory_and_reads():
    demand = Demand(users=10_000_000, restaurants=200_000, areas=4_000, peak_rps=100, feed_share=0.0)
    result = plan(demand, INPUTS)
    data = 10_000_000 * 400 + 200_000 * 500 + 4_000 * 200
    assert result["redis_data_gib"] == pytest.approx(data / 2**30, abs=0.01)
    assert result["redis_memory_gib_per_copy"] == pytest.approx(1.5 * data / 2**30, abs=0.01)
    assert result["redis_shards"] == 6 and result["bound_by"] == "memory"  # 5.8 GiB over 1 GiB shards
    assert result["redis_nodes"] == 12
    busy = plan(dataclasses.replace(demand, peak_rps=1_000_000), INPUTS)  # 2M reads/s: reads decide
    assert busy["bound_by"] == "reads" and busy["redis_shards"] == 20


def test_feature_cache_refreshes_are_bounded_by_the_restaurants_and_the_feeds():
    cache_s, candidates = feed_settings()
    few = plan(Demand(users=1000, restaurants=50, areas=1, peak_rps=1000, feed_share=1.0), INPUTS)
    ranker = few["replicas"]["Ranker"]  # EtaModel has no cost in INPUTS: counted as one replica
    assert few["redis_cache_refresh_reads_per_s"] == round((ranker + 1) * 50 / cache_s)  # every restaurant, each cache_s
    many = plan(Demand(users=1000, restaurants=10**9, areas=1, peak_rps=10, feed_share=1.0), INPUTS)
    assert many["redis_cache_refresh_reads_per_s"] == round(2 * 10 * candidates)  # each feed's candidates, once


@pytest.mark.parametrize("field, value", [("users", 0), ("peak_rps", -1), ("feed_share", 1.5)])
def test_bad_demand_is_refused_naming_the_option(field, value):
    good = {"users": 1, "restaurants": 1, "areas": 1, "peak_rps": 1, "feed_share": 0.2}
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        Demand(**{**good, field: value})


def test_the_cli_prints_the_assumptions_with_the_plan(capsys):
    assert main(["--users", "10000000", "--restaurants", "200000", "--peak-rps", "20000"]) == 0
    out = capsys.readouterr().out
    for expected in ("Assumptions (measured:", "server CPU per request", "Redis per entity", "serving cores",
                     "Redis nodes", "not included"):
        assert expected in out


def test_redis_bytes_are_measured_per_entity_in_a_project_of_its_own(city_dir, feature_store):
    """Every user, restaurant and area of the small city has a hash; the throwaway project leaves no key behind
    and does not touch the city's own registry."""
    registry = city_dir / "feast" / "registry.db"
    before = registry.read_bytes() if registry.exists() else None
    measured = redis_bytes_per_entity(city_dir)
    offline = city_dir / "offline"
    assert measured["keys"]["restaurant"] == pd.read_parquet(offline / "restaurants.parquet")["restaurant_id"].nunique()
    assert measured["keys"]["user"] > 0 and measured["keys"]["area"] > 0
    assert set(measured["bytes_per_entity"]) == {"user", "restaurant", "area"}, measured
    assert all(100 < b < 5000 for b in measured["bytes_per_entity"].values()), measured
    leftovers = redis.Redis(host="127.0.0.1", port=6379).scan_iter(match=b"*" + measured["project"].encode(), count=1000)
    assert next(leftovers, None) is None, "the throwaway project was torn down"
    assert (registry.read_bytes() if registry.exists() else None) == before
