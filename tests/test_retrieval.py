"""Two-tower retrieval: ONNX parity, artifact contract, index search, cold start, taste behaviour, metrics.

Runs on the small simulated city (tests/conftest.py); quality targets are not asserted here.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from models.artifact import ModelManifest, load_manifest
from models.eta.features import epoch_seconds
from models.ranker.features import CUISINES, TASTE_FEATURES, USER_FEATURES
from models.retrieval.export import user_embeddings
from models.retrieval.features import (
    EMBEDDING_DIM,
    N_USER_DENSE,
    build_restaurant_inputs,
    build_user_inputs,
    hard_filter,
)
from models.retrieval.index import EMBEDDINGS_FILE, IDS_FILE, RestaurantIndex
from models.retrieval.train import user_columns


@pytest.fixture(scope="module")
def trained(retrieval_trained):
    """The small city's retrieval model (tests/conftest.py)."""
    return retrieval_trained


@pytest.fixture(scope="module")
def manifest(trained):
    return load_manifest(trained.target)


@pytest.fixture(scope="module")
def session(trained):
    from models.ranker.export import onnx_session

    return onnx_session(trained.target / "model.onnx")


@pytest.fixture(scope="module")
def index(trained) -> RestaurantIndex:
    return RestaurantIndex.load(trained.target)


def test_user_tower_onnx_matches_pytorch(trained, manifest, session) -> None:
    """The exported user tower gives PyTorch's embeddings (max abs diff <= 1e-5) on training orders."""
    inputs = build_user_inputs(user_columns(trained.frames["train"]), manifest.feature_defaults)
    with torch.no_grad():
        expected = trained.model.user(torch.from_numpy(inputs["user_dense"])).numpy()
    got = user_embeddings(session, inputs)
    assert got.shape == (len(expected), EMBEDDING_DIM) and float(np.abs(got - expected).max()) <= 1e-5
    single = session.run(["user_embedding"], {"user_dense": inputs["user_dense"][:1]})[0]
    assert single.shape == (1, EMBEDDING_DIM)


def test_artifact_is_the_serving_contract(trained, manifest, index) -> None:
    """model.onnx + manifest + embeddings float32 [R, D] + ids int64 [R], aligned with the restaurant tower."""
    assert manifest.name == "retrieval" and manifest.feature_service == "retrieval_v1"
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("user_dense", "FP32", [-1, N_USER_DENSE])]
    assert [(t.name, t.shape) for t in manifest.outputs] == [("user_embedding", [-1, EMBEDDING_DIM])]
    assert manifest.extra["embedding_dim"] == EMBEDDING_DIM and "inner product" in manifest.extra["index_kind"]
    assert set(manifest.feature_defaults) == set(USER_FEATURES)
    assert ModelManifest.from_dict(json.loads(manifest.to_json())) == manifest
    embeddings, ids = np.load(trained.target / EMBEDDINGS_FILE), np.load(trained.target / IDS_FILE)
    restaurants = trained.frames["restaurants"]
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(restaurants), EMBEDDING_DIM)
    assert ids.dtype == np.int64 and len(np.unique(ids)) == len(ids)
    np.testing.assert_array_equal(ids, restaurants["restaurant_id"].to_numpy())
    tower = build_restaurant_inputs({c: restaurants[c].to_numpy() for c in restaurants.columns})
    with torch.no_grad():
        expected = trained.model.restaurant(*(torch.from_numpy(tower[k])
                                              for k in ("restaurant_dense", "restaurant_bucket"))).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-6)


def test_search_returns_the_best_hard_filtered_candidates(trained, manifest, session, index) -> None:
    """Only open restaurants within the radius come back, best first, and they are the exact top k."""
    order = trained.frames["test"].iloc[0]
    t = float(epoch_seconds(pd.Series([order["event_timestamp"]]))[0])
    user = user_embeddings(session, build_user_inputs(user_columns(trained.frames["test"].iloc[:1]),
                                                      manifest.feature_defaults))[0]
    ids, scores = index.search(user, order["user_lat"], order["user_lon"], t, k=5)
    allowed = index.ids[index.candidates(order["user_lat"], order["user_lon"], t)]
    assert 0 < len(ids) <= 5 and set(ids) <= set(allowed) and np.all(np.diff(scores) <= 0)
    everything = index.embeddings @ user
    best = np.sort(everything[np.isin(index.ids, allowed)])[::-1][:len(ids)]
    np.testing.assert_allclose(scores, best, rtol=1e-6)
    all_ids, _ = index.search(user, order["user_lat"], order["user_lon"], t, k=10_000)
    assert sorted(all_ids) == sorted(allowed)


def test_hard_filter_is_open_now_and_within_the_radius(index) -> None:
    """At 01:00 UTC next to a late-night kitchen only late-night kitchens pass, none beyond the radius."""
    from models.geo import haversine_km

    late = np.flatnonzero(index.closes_hour < index.opens_hour)
    assert len(late) > 0
    lat, lon, night = index.lat[late[0]], index.lon[late[0]], 1 * 3600.0
    mask = hard_filter(index.lat, index.lon, index.opens_hour, index.closes_hour, lat, lon, night, 5.0)
    assert mask[late[0]] and (index.closes_hour[mask] < index.opens_hour[mask]).all()
    assert (haversine_km(lat, lon, index.lat[mask], index.lon[mask]) <= 5.0).all()
    far = hard_filter(index.lat, index.lon, index.opens_hour, index.closes_hour, lat + 1.0, lon, night, 5.0)
    assert not far.any()  # 111 km away: nothing


def test_an_unknown_user_gets_a_usable_embedding(manifest, session, trained) -> None:
    """No features at all (a new user): the defaults give a finite embedding and a full candidate list."""
    row = trained.frames["test"].iloc[0]
    inputs = build_user_inputs({"user_lat": [row["user_lat"]], "user_lon": [row["user_lon"]],
                                "request_time": [1.79e9]}, manifest.feature_defaults)
    assert inputs["user_dense"][0, :len(TASTE_FEATURES)].std() == 0  # every cuisine share at the prior
    embedding = session.run(["user_embedding"], inputs)[0]
    assert np.isfinite(embedding).all() and np.abs(embedding).sum() > 0


def test_a_strong_taste_pulls_that_cuisine_up(manifest, session, index, trained) -> None:
    """A user whose orders are 90 % sushi scores sushi restaurants above the rest more than a new user does."""
    frame = trained.frames["test"].head(50)
    columns = user_columns(frame)
    sushi = index.embeddings[np.isin(index.ids, trained.frames["restaurants"].query("cuisine == 'sushi'")[
        "restaurant_id"])]
    assert len(sushi) > 0

    def sushi_margin(cols) -> np.ndarray:
        users = user_embeddings(session, build_user_inputs(cols, manifest.feature_defaults))
        return (users @ sushi.T).mean(axis=1) - (users @ index.embeddings.T).mean(axis=1)

    population = sushi_margin({k: v for k, v in columns.items() if k not in USER_FEATURES})
    for name in TASTE_FEATURES:
        columns[name] = np.full(len(frame), 0.9 if name == "taste_sushi_30d" else 0.1 / (len(CUISINES) - 1))
    columns["orders_30d"] = np.full(len(frame), 25)
    assert np.all(sushi_margin(columns) > population)


def test_training_set_is_a_point_in_time_join(trained) -> None:
    """User features of each order are the daily snapshot at or before it."""
    frame = trained.frames["train"].sort_values("event_timestamp")
    frame = frame.assign(event_timestamp=frame["event_timestamp"].astype("datetime64[ns, UTC]"))
    history = pd.read_parquet(trained.frames["data_dir"] / "offline" / "user_history.parquet")
    history = history.assign(event_timestamp=history["event_timestamp"].astype("datetime64[ns, UTC]"))
    expected = pd.merge_asof(frame[["row_id", "user_id", "event_timestamp"]], history.sort_values("event_timestamp"),
                             on="event_timestamp", by="user_id", direction="backward", tolerance=pd.Timedelta(days=2))
    for column in ("orders_30d", "taste_pizza_30d"):
        np.testing.assert_allclose(frame[column].to_numpy(float), expected[column].to_numpy(float), rtol=1e-6)


def test_metrics_json_has_recall_against_baseline_and_oracle(trained) -> None:
    """reports/retrieval/metrics.json: recall@10/50/100 for model, popularity and oracle; the plot."""
    reports = trained.frames["reports"]
    metrics = json.loads((reports / "metrics.json").read_text())
    for k in (10, 50, 100):
        for prefix in ("", "baseline_", "oracle_"):
            assert 0 <= metrics[f"{prefix}recall_at_{k}"] <= 1
    assert metrics["recall_at_100"] >= metrics["recall_at_10"]
    assert isinstance(metrics["targets_met"], bool) and metrics["n_test"] > 0
    assert (reports / "recall_at_k.png").stat().st_size > 1000
