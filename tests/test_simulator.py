"""The simulator: deterministic, faithful to its stated process, truth kept out of features."""

import numpy as np
import pandas as pd
import pytest

from feature_repo.store import definitions
from models import simulator
from models.geo import CITY, haversine_km
from models.simulator import SimulationConfig, simulate, speed_kmh


def test_same_seed_and_end_give_the_same_city(tmp_path, city_dir):
    """Determinism: re-running with the same seed and end reproduces every table exactly."""
    from tests.conftest import SMALL_CITY

    simulate(SMALL_CITY, tmp_path)
    for table in ("orders", "restaurants", "area_congestion", "restaurant_load", "restaurant_prep_stats"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{table}.parquet"),
                                      pd.read_parquet(city_dir / "offline" / f"{table}.parquet"))


def test_a_different_seed_gives_a_different_city(tmp_path, city_dir):
    """The seed matters."""
    simulate(SimulationConfig(seed=12, days=2, scale=0.2, end="2026-11-20T12:00:00"), tmp_path)
    a = pd.read_parquet(tmp_path / "restaurants.parquet")
    b = pd.read_parquet(city_dir / "offline" / "restaurants.parquet")
    assert not np.allclose(a["lat"].to_numpy()[:10], b["lat"].to_numpy()[:10])


def test_orders_cover_the_window_and_stay_in_the_city(city_dir, city_summary):
    """Orders have timestamps inside [warm-up start, end) and drop-offs inside the served city."""
    orders = pd.read_parquet(city_dir / "offline" / "orders.parquet")
    assert len(orders) > 1000
    assert orders["event_timestamp"].min() >= pd.Timestamp(city_summary["warmup_start"])
    assert orders["event_timestamp"].max() < pd.Timestamp(city_summary["end"])
    distance = haversine_km(CITY.center_lat, CITY.center_lon, orders["delivery_lat"], orders["delivery_lon"])
    assert (distance <= CITY.radius_km).all()


def test_delivery_time_follows_the_stated_process(city_dir):
    """true_eta = prep + travel + wait, travel from distance and speed, and the label adds only noise."""
    orders = pd.read_parquet(city_dir / "offline" / "orders.parquet")
    restaurants = pd.read_parquet(city_dir / "offline" / "restaurants.parquet").set_index("restaurant_id")
    r = restaurants.loc[orders["restaurant_id"]]
    distance = haversine_km(r["lat"].to_numpy(), r["lon"].to_numpy(), orders["delivery_lat"], orders["delivery_lon"])
    t = orders["event_timestamp"]
    travel = 60 * (simulator.ROAD_FACTOR * distance + simulator.ROAD_EXTRA_KM) / speed_kmh(
        (t.dt.hour + t.dt.minute / 60).to_numpy(), t.dt.weekday.to_numpy())
    np.testing.assert_allclose(orders["true_travel_minutes"], travel, rtol=1e-9)
    np.testing.assert_allclose(orders["true_eta_minutes"],
                               orders["true_prep_minutes"] + orders["true_travel_minutes"] + orders["true_wait_minutes"])
    noise = orders["delivery_minutes"] - orders["true_eta_minutes"]
    expected_sd = np.hypot(simulator.PREP_NOISE, simulator.TRAVEL_NOISE)
    assert abs(noise.mean()) < 0.2
    assert noise.std() == pytest.approx(expected_sd, rel=0.05)


def test_rush_hour_is_slower_on_weekdays_only():
    """Speed dips at 08:30 and 18:00 on a Wednesday, not on a Sunday."""
    assert speed_kmh(np.array([18.0]), np.array([2]))[0] < 0.8 * speed_kmh(np.array([15.0]), np.array([2]))[0]
    assert speed_kmh(np.array([18.0]), np.array([6]))[0] > speed_kmh(np.array([18.0]), np.array([2]))[0]


def test_no_feature_view_reads_a_truth_column(city_dir):
    """Columns starting with true_ (the simulator's truth) are never features."""
    from feast import FeatureView

    views = [obj for obj in definitions(city_dir) if isinstance(obj, FeatureView)]
    assert views
    for view in views:
        assert not [f.name for f in view.schema if f.name.startswith("true_")], view.name


def test_kitchen_load_and_congestion_match_the_published_snapshots(city_dir):
    """The prep and wait components use the latest 5-minute snapshot at or before the order."""
    offline = city_dir / "offline"
    orders = pd.read_parquet(offline / "orders.parquet").sort_values("event_timestamp")
    congestion = pd.read_parquet(offline / "area_congestion.parquet").sort_values("event_timestamp")
    joined = pd.merge_asof(orders, congestion, on="event_timestamp", by="area_id", direction="backward")
    wait = simulator.WAIT_BASE + simulator.WAIT_PER_CONGESTION * np.minimum(joined["congestion_ratio"],
                                                                            simulator.CONGESTION_CAP)
    np.testing.assert_allclose(joined["true_wait_minutes"], wait)
