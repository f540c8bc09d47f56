"""The feature store: point-in-time training sets, offline/online consistency, SQLite and Redis."""

import time
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


def _ranker_rows(city_dir, n: int = 100) -> list[dict]:
    """A feed's entity rows: one known user at home, n restaurants, plus an unknown restaurant and user."""
    users = pd.read_parquet(city_dir / "offline" / "users.parquet")
    restaurants = pd.read_parquet(city_dir / "offline" / "restaurants.parquet")["restaurant_id"].tolist()
    user = users.iloc[0]
    place = {"user_lat": float(user["home_lat"]), "user_lon": float(user["home_lon"])}
    rows = [{"user_id": int(user["user_id"]), "restaurant_id": int(restaurants[i % len(restaurants)]), **place}
            for i in range(n)]
    return rows + [{**rows[0], "restaurant_id": 987654}, {**rows[-1], "user_id": 10**9}]


def test_reading_each_entity_once_gives_feasts_answer(feature_store, city_dir, city_summary):
    """read_rows (one Feast call per entity + the on-demand view run locally) == Feast's service call."""
    rows = _ranker_rows(city_dir)
    reader = OnlineFeatures(feature_store, "ranker_v1", deadline_s=10)
    assert set(reader.reads) == {("user_id",), ("restaurant_id",)}  # two calls, not one per view or per row
    ours = reader.read_rows(rows, now=pd.Timestamp(city_summary["end"]).timestamp()).columns
    feast = feature_store.get_online_features(features=reader.service, entity_rows=rows).to_dict()
    assert set(ours) == set(reader.view_of) and len(ours) > 20
    for name, values in ours.items():
        _assert_same(pd.DataFrame({name: feast[name]}), pd.DataFrame({name: values}), [name])
    assert all(d is not None and 0 <= d < 20 for d in ours["distance_km"][:100])
    assert ours["cuisine"][-2] is None and ours["orders_30d"][-1] is None  # unknown restaurant, unknown user
    assert ours["distance_km"][-2] is None and ours["cuisine_affinity"][-1] is None


def test_a_cached_row_is_reused_only_while_young_and_ttls_still_apply(tmp_path, city_dir, city_summary):
    """cache_s: a new value in the store shows after at most cache_s; expiry is judged at read time
    and before the on-demand view runs."""
    end = pd.Timestamp(city_summary["end"])
    store = open_store("sqlite", data_dir=tmp_path)
    apply(store, data_dir=city_dir)
    materialize(store, end.to_pydatetime())
    row = _ranker_rows(city_dir, n=1)[0]
    long_lived = OnlineFeatures(store, "ranker_v1", deadline_s=10, cache_s=600)
    short_lived = OnlineFeatures(store, "ranker_v1", deadline_s=10, cache_s=0.3)
    before = long_lived.read(row, now=end.timestamp()).values["conversion_7d"]
    assert short_lived.read(row, now=end.timestamp()).values["conversion_7d"] == before
    store.write_to_online_store("restaurant_feed_stats", pd.DataFrame({  # what the nightly job would write
        "restaurant_id": [row["restaurant_id"]], "event_timestamp": [end], "feed_impressions_1d": [7],
        "feed_orders_1d": [1], "feed_impressions_7d": [70], "feed_orders_7d": [9], "conversion_7d": [0.125]}))
    assert before != 0.125
    assert long_lived.read(row, now=end.timestamp()).values["conversion_7d"] == before  # reused
    assert OnlineFeatures(store, "ranker_v1", deadline_s=10).read(row, now=end.timestamp()).values[
        "conversion_7d"] == 0.125  # the store has it
    time.sleep(0.4)
    assert short_lived.read(row, now=end.timestamp()).values["conversion_7d"] == 0.125  # read again once old
    three_days_on = long_lived.read(row, now=(end + pd.Timedelta(days=3)).timestamp())
    assert "restaurant_feed_stats" in three_days_on.expired and three_days_on.values["conversion_7d"] is None
    # the on-demand view sees the expired history as missing, as the training join would have
    assert long_lived.read(row, now=end.timestamp()).values["cuisine_affinity"] is not None
    assert three_days_on.values["taste_pizza_30d"] is None and three_days_on.values["cuisine_affinity"] is None


def test_apply_and_materialize_take_turns_on_the_registry(tmp_path):
    """The bootstrap Job and the materialize CronJob write one registry file on the shared volume: the
    second waits for the first's lock instead of racing it; before any apply, `--if-applied` does nothing."""
    import subprocess
    import sys

    from feature_repo.store import registry_lock, registry_path

    store = open_store("sqlite", data_dir=tmp_path)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COURIER_DATA_DIR": str(tmp_path), "FEAST_USAGE": "False"}
    idle = subprocess.run([sys.executable, "-m", "feature_repo.store", "materialize", "--if-applied"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert idle.returncode == 0 and "nothing to materialize" in idle.stdout
    assert not registry_path(store).exists()
    with registry_lock(store):
        waiting = subprocess.Popen([sys.executable, "-m", "feature_repo.store", "apply"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=env)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=8)  # held off while the lock is ours
        assert not registry_path(store).exists()
    out, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and "waiting for" in out and "applied feature repository" in out
    assert registry_path(store).exists()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_key_the_store_cannot_hold_is_the_requests_fault_not_an_outage(tmp_path, feature_store, city_dir,
                                                                        city_summary, backend):
    """Keys past int64 or of the wrong type raise UnreadableEntity (a 422), and the next valid read, at once,
    is answered from the store: the breaker opens only for a store fault (a Redis nobody listens on)."""
    from serving.features import StoreUnavailable, UnreadableEntity
    from tests.conftest import free_port

    store, project = feature_store, None
    if backend == "redis":
        project = f"courier_test_{uuid.uuid4().hex[:8]}"
        store = open_store("redis", data_dir=tmp_path, redis=REDIS, project=project)
        apply(store, data_dir=city_dir)
        materialize(store, datetime.fromisoformat(city_summary["end"]))
    try:
        reader = OnlineFeatures(store, "eta_v1", deadline_s=10, cooldown_s=60)
        entities = _entities(city_dir, pd.Timestamp(city_summary["end"]), n=1)
        valid = {"restaurant_id": int(entities["restaurant_id"].iloc[0]), "area_id": entities["area_id"].iloc[0]}
        for bad in (2**63, -(2**64), 10**30, "abc", None):
            with pytest.raises(UnreadableEntity, match="restaurant_id") as raised:
                reader.read({**valid, "restaurant_id": bad})
            assert raised.value.status == 422
            assert reader.read(valid).values["lat"] is not None  # no cool-down: the store is read again
        if backend == "redis":  # a real fault still opens the breaker: the same registry, a Redis nobody runs
            down = OnlineFeatures(open_store("redis", data_dir=tmp_path, redis=f"127.0.0.1:{free_port()}",
                                             project=project), "eta_v1", deadline_s=1, cooldown_s=60)
            with pytest.raises(StoreUnavailable):
                down.read(valid)
            with pytest.raises(StoreUnavailable, match="not retried yet"):
                down.read(valid)
    finally:
        if project:
            store.teardown()
