"""The feature store: point-in-time training sets, offline/online consistency, SQLite and Redis."""

import uuid
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from feature_repo.store import apply, materialize, open_store
from models.artifact import ArtifactError
from serving.features import OnlineFeatures

REDIS = "127.0.0.1:6379"


def _entities(city_dir, at: pd.Timestamp, n: int = 40) -> pd.DataFrame:
    """Real (restaurant, area) pairs from orders just before `at`, all asked about at time `at`."""
    orders = pd.read_parquet(city_dir / "offline" / "orders.parquet")
    recent = orders[orders["event_timestamp"] < at].drop_duplicates(["restaurant_id", "area_id"]).tail(n)
    return pd.DataFrame({"restaurant_id": recent["restaurant_id"].to_numpy(),
                         "area_id": recent["area_id"].to_numpy(), "event_timestamp": at})


def _online_rows(reader: OnlineFeatures, entities: pd.DataFrame, now: float) -> pd.DataFrame:
    rows = [reader.read({"restaurant_id": int(r), "area_id": a}, now=now).values
            for r, a in zip(entities["restaurant_id"], entities["area_id"])]
    return pd.DataFrame(rows)


def _assert_same(offline: pd.DataFrame, online: pd.DataFrame, columns) -> None:
    for column in columns:
        a = pd.to_numeric(offline[column], errors="coerce").to_numpy(dtype=float)
        b = pd.to_numeric(online[column], errors="coerce").to_numpy(dtype=float)
        np.testing.assert_allclose(a, b, rtol=1e-6, equal_nan=True, err_msg=column)


def test_online_store_serves_what_the_point_in_time_join_gives(tmp_path, city_dir, city_summary):
    """Materialize up to t, then online (TTLs applied as serving does) == historical join at t."""
    end = pd.Timestamp(city_summary["end"])
    t = end - pd.Timedelta(hours=27, minutes=2, seconds=30)  # dinner time the day before, off the 5-minute grid
    store = open_store("sqlite", data_dir=tmp_path)
    apply(store, data_dir=city_dir)
    materialize(store, t.to_pydatetime())
    service = store.get_feature_service("eta_v1")
    entities = _entities(city_dir, t)
    offline = store.get_historical_features(entity_df=entities, features=service).to_df()
    offline = entities.merge(offline, on=["restaurant_id", "area_id", "event_timestamp"], how="left")
    online = _online_rows(OnlineFeatures(store, "eta_v1", deadline_s=10), entities, now=t.timestamp())
    columns = [f.name for p in service.feature_view_projections for f in p.features]
    _assert_same(offline, online, columns)
    # The comparison means something only if live values were present and varied.
    assert offline["congestion_ratio"].notna().mean() > 0.5
    assert offline["prep_time_mean_7d"].nunique() > 5


def test_online_values_past_their_ttl_are_treated_as_missing(feature_store, city_dir, city_summary):
    """Read 20 minutes after the last materialized snapshot: 15-minute views expire, the profile does not."""
    end = pd.Timestamp(city_summary["end"])
    entity = _entities(city_dir, end, n=1).iloc[0]
    reader = OnlineFeatures(feature_store, "eta_v1", deadline_s=10)
    fresh = reader.read({"restaurant_id": int(entity.restaurant_id), "area_id": entity.area_id}, now=end.timestamp())
    late = reader.read({"restaurant_id": int(entity.restaurant_id), "area_id": entity.area_id},
                       now=(end + pd.Timedelta(minutes=20)).timestamp())
    assert "area_congestion_15m" not in fresh.expired and fresh.values["congestion_ratio"] is not None
    assert "area_congestion_15m" in late.expired and late.values["congestion_ratio"] is None
    assert late.values["lat"] == fresh.values["lat"]
    assert late.age_seconds["area_congestion_15m"] >= 20 * 60


def test_training_set_uses_values_as_of_each_order_not_the_latest(feature_store, city_dir):
    """get_historical_features picks the row at or before the order time, within the TTL."""
    orders = pd.read_parquet(city_dir / "offline" / "orders.parquet").iloc[-300:]
    frame = feature_store.get_historical_features(
        entity_df=orders[["order_id", "restaurant_id", "area_id", "event_timestamp"]],
        features=feature_store.get_feature_service("eta_v1")).to_df().sort_values("order_id")
    congestion = pd.read_parquet(city_dir / "offline" / "area_congestion.parquet").sort_values("event_timestamp")
    expected = pd.merge_asof(orders.sort_values("event_timestamp"), congestion, on="event_timestamp", by="area_id",
                             direction="backward", tolerance=pd.Timedelta(minutes=15)).sort_values("order_id")
    np.testing.assert_allclose(frame["congestion_ratio"].to_numpy(float),
                               expected["congestion_ratio"].to_numpy(float), rtol=1e-6)
    latest = congestion.groupby("area_id")["congestion_ratio"].last()
    assert not np.allclose(frame["congestion_ratio"].to_numpy(float),
                           latest.loc[frame["area_id"]].to_numpy(float)), "join returned the latest values"


def test_redis_online_store_serves_the_same_features(tmp_path, feature_store, city_dir, city_summary):
    """The same repository on the real Redis at 127.0.0.1:6379 returns what SQLite returns."""
    project = f"courier_test_{uuid.uuid4().hex[:8]}"  # own key space: never touches a user's `courier` keys
    redis_store = open_store("redis", data_dir=tmp_path, redis=REDIS, project=project)
    apply(redis_store, data_dir=city_dir)
    try:
        materialize(redis_store, datetime.fromisoformat(city_summary["end"]))
        end = pd.Timestamp(city_summary["end"])
        entities = _entities(city_dir, end)
        now = end.timestamp()
        from_redis = _online_rows(OnlineFeatures(redis_store, "eta_v1", deadline_s=10), entities, now)
        from_sqlite = _online_rows(OnlineFeatures(feature_store, "eta_v1", deadline_s=10), entities, now)
        _assert_same(from_sqlite, from_redis, from_sqlite.columns)
        assert from_redis["lat"].notna().all()
        assert redis_store.config.online_store.type == "redis"
    finally:
        redis_store.teardown()


def test_a_model_needing_an_unknown_feature_service_is_refused(feature_store):
    """Serving cannot feed a model trained on a service the store lacks, and says so."""
    with pytest.raises(ArtifactError, match="eta_v9.*does not serve"):
        OnlineFeatures(feature_store, "eta_v9")
