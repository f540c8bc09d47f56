"""Feed sessions: the stated process, position bias, rare positives, past-only snapshots, no effect on orders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models import simulator
from models.geo import haversine_km
from models.sessions import CONVERSION_PRIOR_IMPRESSIONS, FEED_SLOTS, TASTE_PRIOR_ORDERS, examine
from models.simulator import CUISINES, DELIVERY_RADIUS_KM, is_open, simulate

FEED_TABLES = ("sessions", "impressions", "restaurant_feed_stats", "user_history")


@pytest.fixture(scope="module")
def offline(city_dir):
    """The small city's feed tables, plus restaurants and orders."""
    names = FEED_TABLES + ("restaurants", "orders")
    return {name: pd.read_parquet(city_dir / "offline" / f"{name}.parquet") for name in names}


def test_impressions_have_the_contracted_columns(offline):
    """Ids, position, second-precision UTC time, request place, label, the oracle and true_* columns."""
    imp = offline["impressions"]
    expected = ["session_id", "user_id", "restaurant_id", "position", "event_timestamp", "user_lat", "user_lon",
                "ordered", "true_p_order"]
    assert expected == list(imp.columns[:len(expected)])
    assert all(c.startswith("true_") for c in imp.columns[len(expected):])
    assert str(imp["event_timestamp"].dt.tz) == "UTC"
    assert (imp["event_timestamp"].dt.microsecond == 0).all()
    assert set(imp["ordered"].unique()) <= {0, 1}


def test_positives_are_rare_and_follow_the_oracle(offline):
    """A positive rate of a few percent, and the labels agree with the true probabilities behind them."""
    imp = offline["impressions"]
    rate = imp["ordered"].mean()
    assert 0.01 < rate < 0.06
    assert abs(rate - imp["true_p_order"].mean()) < 4 * np.sqrt(rate / len(imp))
    np.testing.assert_allclose(imp["true_p_order"], examine(imp["position"]) * imp["true_p_order_at_top"])


def test_feed_shows_open_restaurants_within_the_radius_at_distinct_slots(offline):
    """Every card is a hard-filter candidate, and a session fills slots 1..n without gaps or repeats."""
    imp, restaurants = offline["impressions"], offline["restaurants"].set_index("restaurant_id")
    r = restaurants.loc[imp["restaurant_id"]]
    km = haversine_km(imp["user_lat"], imp["user_lon"], r["lat"].to_numpy(), r["lon"].to_numpy())
    assert (km <= DELIVERY_RADIUS_KM).all()
    assert is_open(r["opens_hour"].to_numpy(), r["closes_hour"].to_numpy(), imp["event_timestamp"].dt.hour.to_numpy()).all()
    per_session = imp.groupby("session_id").agg(n=("position", "size"), top=("position", "max"),
                                                 distinct=("restaurant_id", "nunique"))
    assert (per_session["n"] == per_session["top"]).all() and (per_session["distinct"] == per_session["n"]).all()
    assert per_session["n"].max() == FEED_SLOTS


def test_position_bias_exists(offline):
    """Cards at the top are ordered more often than cards at the bottom."""
    imp = offline["impressions"]
    top, bottom = imp[imp["position"] <= 3]["ordered"].mean(), imp[imp["position"] >= 15]["ordered"].mean()
    assert top > 2 * bottom


def test_restaurant_stats_use_only_past_impressions(offline):
    """feed_impressions_7d / feed_orders_7d of a snapshot count impressions strictly before it."""
    imp, stats = offline["impressions"], offline["restaurant_feed_stats"]
    day = stats["event_timestamp"].sort_values().unique()[-2]
    for rid in stats["restaurant_id"].unique()[:5]:
        row = stats[(stats["restaurant_id"] == rid) & (stats["event_timestamp"] == day)].iloc[0]
        window = imp[(imp["restaurant_id"] == rid) & (imp["event_timestamp"] < day)
                     & (imp["event_timestamp"] >= day - pd.Timedelta(days=7))]
        assert row["feed_impressions_7d"] == len(window) and row["feed_orders_7d"] == window["ordered"].sum()
    snapshot = stats[stats["event_timestamp"] == day]
    city_rate = snapshot["feed_orders_7d"].sum() / snapshot["feed_impressions_7d"].sum()
    expected = (snapshot["feed_orders_7d"] + CONVERSION_PRIOR_IMPRESSIONS * city_rate) / (
        snapshot["feed_impressions_7d"] + CONVERSION_PRIOR_IMPRESSIONS)
    np.testing.assert_allclose(snapshot["conversion_7d"], expected)


def test_user_history_uses_only_past_orders(offline):
    """orders_30d and the cuisine shares of a snapshot come from orders (stream + feed) before it."""
    imp, orders, history = offline["impressions"], offline["orders"], offline["user_history"]
    restaurants = offline["restaurants"].set_index("restaurant_id")
    day = history["event_timestamp"].sort_values().unique()[-1]
    both = pd.concat([orders[["user_id", "restaurant_id", "event_timestamp"]],
                      imp.loc[imp["ordered"] == 1, ["user_id", "restaurant_id", "event_timestamp"]]])
    past = both[(both["event_timestamp"] < day) & (both["event_timestamp"] >= day - pd.Timedelta(days=30))]
    busiest = past["user_id"].value_counts().index[:5]
    for uid in busiest:
        row = history[(history["user_id"] == uid) & (history["event_timestamp"] == day)].iloc[0]
        mine = past[past["user_id"] == uid]
        assert row["orders_30d"] == len(mine)
        cuisine = restaurants.loc[mine["restaurant_id"], "cuisine"]
        share = ((cuisine == "pizza").sum() + TASTE_PRIOR_ORDERS / len(CUISINES)) / (len(mine) + TASTE_PRIOR_ORDERS)
        assert row["taste_pizza_30d"] == pytest.approx(share)
    shares = history[[f"taste_{c}_30d" for c in CUISINES]].sum(axis=1)
    np.testing.assert_allclose(shares, 1.0)


def test_the_feed_does_not_change_the_order_stream(tmp_path, monkeypatch, city_dir):
    """Orders are byte-for-byte the same without the feed: it draws from its own random generator."""
    from tests.conftest import SMALL_CITY

    no_feed = {"impressions": pd.DataFrame({"ordered": pd.Series([], dtype="int64")})}
    monkeypatch.setattr(simulator, "simulate_feed", lambda *args, **kwargs: no_feed)
    simulate(SMALL_CITY, tmp_path)
    for table in ("orders", "restaurant_prep_stats", "restaurant_load"):
        assert (tmp_path / f"{table}.parquet").read_bytes() == (city_dir / "offline" / f"{table}.parquet").read_bytes()
    assert len(pd.read_parquet(tmp_path / "impressions.parquet")) == 0


def test_the_feed_is_deterministic(tmp_path, city_dir):
    """Same seed and end: the same sessions, impressions and snapshots."""
    from tests.conftest import SMALL_CITY

    simulate(SMALL_CITY, tmp_path)
    for table in FEED_TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{table}.parquet"),
                                      pd.read_parquet(city_dir / "offline" / f"{table}.parquet"))
