"""Feed ranker: ONNX parity, artifact contract, cold start, position at serving, taste behaviour, Feast joins.

Everything runs on the small simulated city (tests/conftest.py) with a private Feast store;
quality targets are not asserted here (the city is too small); `make train` reports them.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from models.artifact import ModelManifest, load_manifest
from models.geo import haversine_km
from models.ranker.data import model_columns
from models.ranker.evaluate import METRIC_KEYS, auc
from models.ranker.export import RESTAURANTS_FILE, onnx_predict, onnx_session
from models.ranker.features import (
    CUISINES,
    FEATURE_NAMES,
    MAX_POSITION,
    N_RESTAURANT_BUCKETS,
    SERVICE_FEATURES,
    SERVING_POSITION,
    TASTE_FEATURES,
    UNKNOWN_RESTAURANT,
    USER_FEATURES,
    build_inputs,
    restaurant_bucket,
)


@pytest.fixture(scope="module")
def trained(ranker_trained):
    """The small city's ranker (tests/conftest.py)."""
    return ranker_trained


@pytest.fixture(scope="module")
def manifest(trained):
    return load_manifest(trained.target)


@pytest.fixture(scope="module")
def session(trained):
    return onnx_session(trained.target / "model.onnx")


@pytest.fixture(scope="module")
def test_rows(trained) -> pd.DataFrame:
    return trained.frames["test"]


def _torch(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(inputs[k]) for k in ("dense", "restaurant_bucket", "position"))).numpy()


def _columns(frame: pd.DataFrame) -> dict:
    return {k: np.array(v, copy=True) for k, v in model_columns(frame).items()}


def test_onnx_matches_pytorch(trained, manifest, session, test_rows) -> None:
    """ONNX Runtime and PyTorch give the same probabilities (max abs diff <= 1e-5), logged and serving position."""
    for position in (test_rows["position"].to_numpy(), None):
        inputs = build_inputs(model_columns(test_rows), manifest.feature_defaults, position)
        diff = np.abs(onnx_predict(session, inputs) - _torch(trained.model, inputs))
        assert len(diff) > 500 and float(diff.max()) <= 1e-5


@pytest.mark.parametrize("batch", [1, 100, 257])
def test_onnx_batch_dimension_is_dynamic(manifest, session, test_rows, batch: int) -> None:
    """Batches of 1, 100 and 257 candidates give one probability in (0, 1) per row."""
    rows = test_rows.iloc[np.arange(batch) % len(test_rows)]
    out = session.run(["p_order"], build_inputs(model_columns(rows), manifest.feature_defaults))[0]
    assert out.shape == (batch,) and out.dtype == np.float32 and ((out > 0) & (out < 1)).all()


def test_manifest_is_the_serving_contract(trained, manifest) -> None:
    """Name, feature service, tensors, serving position, index ranges, defaults; round-trips."""
    assert manifest.name == "ranker" and manifest.feature_service == "ranker_v1"
    assert manifest.version == trained.version == trained.target.name
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [
        ("dense", "FP32", [-1, len(FEATURE_NAMES)]), ("restaurant_bucket", "INT64", [-1]), ("position", "INT64", [-1])]
    assert [(t.name, t.shape) for t in manifest.outputs] == [("p_order", [-1])]
    assert manifest.extra["serving_position"] == SERVING_POSITION == 1
    assert manifest.extra["input_ranges"] == {"restaurant_bucket": [0, N_RESTAURANT_BUCKETS - 1],
                                              "position": [1, MAX_POSITION]}
    assert set(USER_FEATURES) <= set(manifest.feature_defaults)
    assert ModelManifest.from_dict(json.loads(manifest.to_json())) == manifest
    restaurants = pd.read_parquet(trained.target / RESTAURANTS_FILE)
    assert restaurants["restaurant_id"].is_unique and {"lat", "lon", "cuisine"} <= set(restaurants.columns)


def test_position_is_fixed_at_serving_and_only_lowers_scores(manifest, session, test_rows) -> None:
    """No position = slot 1 for every row; lower slots never score higher (position bias is learnt)."""
    columns = model_columns(test_rows)
    serving = build_inputs(columns, manifest.feature_defaults)
    assert (serving["position"] == SERVING_POSITION).all()
    at = {p: onnx_predict(session, build_inputs(columns, manifest.feature_defaults, p)) for p in (1, 5, 20)}
    np.testing.assert_array_equal(onnx_predict(session, serving), at[1])
    assert np.all(at[1] >= at[5]) and np.all(at[5] >= at[20]) and np.mean(at[1] > at[20]) > 0.99


def test_a_restaurant_never_seen_gets_the_cold_start_score(trained, manifest, session, test_rows) -> None:
    """An unseen id lands in an untrained bucket = the learnt "unknown restaurant": sensible, feature-based."""
    seen = set(restaurant_bucket(trained.frames["train"]["restaurant_id"].unique()).tolist())
    new_id = next(i for i in range(10**6, 10**6 + 5000) if int(restaurant_bucket([i])[0]) not in seen)
    columns = _columns(test_rows)
    known = onnx_predict(session, build_inputs(columns, manifest.feature_defaults))
    columns["restaurant_id"] = np.full(len(test_rows), new_id)
    cold = onnx_predict(session, build_inputs(columns, manifest.feature_defaults))
    columns["restaurant_id"] = np.array([None] * len(test_rows), dtype=object)
    unknown = build_inputs(columns, manifest.feature_defaults)
    assert (unknown["restaurant_bucket"] == UNKNOWN_RESTAURANT).all()
    np.testing.assert_allclose(cold, onnx_predict(session, unknown), rtol=1e-6)
    # sensible: same scale as the known restaurants, and still ranked by its features
    assert 0.5 < cold.mean() / known.mean() < 2.0
    assert np.corrcoef(np.log(cold), np.log(known))[0, 1] > 0.7
    logged = build_inputs({**columns, "restaurant_id": np.full(len(test_rows), new_id)}, manifest.feature_defaults,
                          test_rows["position"].to_numpy())
    assert auc(test_rows["ordered"].to_numpy(), onnx_predict(session, logged)) > 0.6


def test_brand_new_restaurants_and_users_get_sensible_scores(manifest, session, test_rows) -> None:
    """No id and no statistics (a restaurant opening today), or no history (a new user): scores stay in scale."""
    from models.ranker.features import PLATFORM_FEATURES, RESTAURANT_STATS

    columns = _columns(test_rows)
    known = onnx_predict(session, build_inputs(columns, manifest.feature_defaults))
    opening = {k: v for k, v in columns.items() if k not in RESTAURANT_STATS + PLATFORM_FEATURES}
    opening["restaurant_id"] = np.full(len(test_rows), -1)
    new_user = {k: v for k, v in columns.items() if k not in [*USER_FEATURES, "cuisine_affinity"]}
    for variant in (opening, new_user):
        p = onnx_predict(session, build_inputs(variant, manifest.feature_defaults))
        assert np.isfinite(p).all() and 1 / 3 < p.mean() / known.mean() < 3
        assert np.corrcoef(np.log(p), np.log(known))[0, 1] > 0.5  # distance, cuisine, time still rank


def test_a_strong_taste_raises_that_cuisine(manifest, session, test_rows) -> None:
    """A user whose orders are 90 % sushi scores sushi restaurants higher than the population's users do."""
    sushi = test_rows[test_rows["cuisine"] == "sushi"]
    assert len(sushi) > 30
    columns = _columns(sushi)
    population = onnx_predict(session, build_inputs(columns, manifest.feature_defaults))
    for name in TASTE_FEATURES:
        columns[name] = np.full(len(sushi), 0.9 if name == "taste_sushi_30d" else 0.1 / (len(CUISINES) - 1))
    columns["orders_30d"] = np.full(len(sushi), 25)
    columns["cuisine_affinity"] = np.full(len(sushi), None, dtype=object)  # recomputed from the shares
    fan = onnx_predict(session, build_inputs(columns, manifest.feature_defaults))
    assert fan.mean() > 1.5 * population.mean() and np.mean(fan > population) > 0.9


def test_build_inputs_defaults_unknown_users_and_refuses_missing_distance(manifest, test_rows) -> None:
    """An unknown user (no history) gets finite inputs with the flag set; no distance and no lat/lon is refused."""
    columns = {k: v for k, v in _columns(test_rows.head(4)).items() if k not in USER_FEATURES}
    inputs = build_inputs(columns, manifest.feature_defaults)
    assert inputs["dense"].dtype == np.float32 and np.isfinite(inputs["dense"]).all()
    assert (inputs["dense"][:, FEATURE_NAMES.index("user_history_missing")] == 1).all()
    with pytest.raises(ValueError, match="distance_km"):
        build_inputs({**columns, "distance_km": [None] * 4}, manifest.feature_defaults)


def test_training_set_is_a_point_in_time_join(trained) -> None:
    """conversion_7d and orders_30d are the snapshot at or before each impression, not the latest one."""
    frame = pd.concat([trained.frames["train"], trained.frames["validation"], trained.frames["test"]])
    frame = frame.assign(event_timestamp=frame["event_timestamp"].astype("datetime64[ns, UTC]")).sort_values(
        "event_timestamp")
    offline = trained.frames["data_dir"] / "offline"
    for table, key, column in (("restaurant_feed_stats", "restaurant_id", "conversion_7d"),
                               ("user_history", "user_id", "orders_30d")):
        snapshots = pd.read_parquet(offline / f"{table}.parquet")
        snapshots = snapshots.assign(event_timestamp=snapshots["event_timestamp"].astype("datetime64[ns, UTC]"))
        expected = pd.merge_asof(frame[["impression_id", key, "event_timestamp"]],
                                 snapshots.sort_values("event_timestamp")[[key, "event_timestamp", column]],
                                 on="event_timestamp", by=key, direction="backward", tolerance=pd.Timedelta(days=2))
        got = frame[column].to_numpy(dtype=float)
        np.testing.assert_allclose(got, expected[column].to_numpy(dtype=float), rtol=1e-6, err_msg=column)
        latest = snapshots.sort_values("event_timestamp").groupby(key)[column].last()
        assert (~np.isclose(got, latest.reindex(frame[key]).to_numpy(dtype=float))).mean() > 0.5


def test_on_demand_features_are_distance_and_affinity(trained) -> None:
    """feed_context's distance_km is the haversine to the restaurant; cuisine_affinity is the cuisine's share."""
    frame = trained.frames["test"]
    restaurants = pd.read_parquet(trained.frames["data_dir"] / "offline" / "restaurants.parquet").set_index(
        "restaurant_id").loc[frame["restaurant_id"]]
    km = haversine_km(frame["user_lat"], frame["user_lon"], restaurants["lat"].to_numpy(), restaurants["lon"].to_numpy())
    np.testing.assert_allclose(frame["distance_km"], km, atol=2e-3)  # the store keeps lat/lon as float32
    share = frame[TASTE_FEATURES].to_numpy()[np.arange(len(frame)), [CUISINES.index(c) for c in frame["cuisine"]]]
    np.testing.assert_allclose(frame["cuisine_affinity"], share)


def test_online_read_of_100_candidates_serves_every_feature(feature_store, trained) -> None:
    """One get_online_features call for 100 (user, restaurant) rows returns ranker_v1 incl. on-demand features."""
    row = trained.frames["test"].iloc[-1]
    restaurants = sorted(trained.frames["test"]["restaurant_id"].unique())
    ids = [restaurants[i % len(restaurants)] for i in range(100)]
    entity_rows = [{"user_id": int(row["user_id"]), "restaurant_id": int(r), "user_lat": float(row["user_lat"]),
                    "user_lon": float(row["user_lon"])} for r in ids]
    service = feature_store.get_feature_service("ranker_v1")
    online = feature_store.get_online_features(features=service, entity_rows=entity_rows).to_dict()
    assert set(SERVICE_FEATURES) <= set(online) and len(online["distance_km"]) == 100
    assert all(d is not None and 0 <= d < 20 for d in online["distance_km"])
    assert online["cuisine_affinity"][0] == pytest.approx(online[f"taste_{online['cuisine'][0]}_30d"][0])


def test_metrics_json_has_every_key_and_the_imbalance_comparison(trained) -> None:
    """metrics.json: every metric, >= 2 imbalance treatments with one kept, the reliability plot."""
    reports = trained.frames["reports"]
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics) and isinstance(metrics["targets_met"], bool)
    assert all(np.isfinite(metrics[k]) for k in METRIC_KEYS if k != "targets_met")
    comparison = metrics["imbalance_comparison"]
    assert len(comparison) >= 2 and sum(r["kept"] for r in comparison) == 1
    assert {"validation_logloss", "validation_calibration_error", "logit_offset"} <= set(comparison[0])
    assert metrics["kept_treatment"] == next(r["treatment"] for r in comparison if r["kept"])
    assert (reports / "reliability.png").stat().st_size > 1000
