"""ETA model: ONNX parity, artifact manifest, behaviour, point-in-time training data, metrics.

Everything runs on a small simulated city in a temporary folder, with a private Feast
registry and online store there: the project's data/, artifacts/ and reports/ are untouched.
Quality targets are not asserted here (the city is too small); `make train` checks them.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from models.artifact import ModelManifest, load_manifest
from models.eta.evaluate import METRIC_KEYS
from models.eta.export import RESTAURANTS_FILE, onnx_predict, onnx_session
from models.eta.features import (
    FEATURE_NAMES,
    FEATURE_SERVICE,
    LIVE_FEATURES,
    build_inputs,
    epoch_seconds,
)
from models.eta.train import TrainResult, model_columns
from models.geo import offset_point


@pytest.fixture(scope="session")
def trained(eta_trained) -> TrainResult:
    """The small city's model (tests/conftest.py): simulated, joined point-in-time through Feast, trained."""
    return eta_trained


@pytest.fixture(scope="session")
def defaults(trained: TrainResult) -> dict[str, float]:
    """The feature defaults of the registered artifact."""
    return load_manifest(trained.target).feature_defaults


@pytest.fixture(scope="session")
def session(trained: TrainResult):
    """ONNX Runtime session of the registered artifact."""
    return onnx_session(trained.target / "model.onnx")


def _torch_predict(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(inputs["dense"]), torch.from_numpy(inputs["areas"])).numpy()


def test_onnx_matches_pytorch_on_held_out_rows(trained: TrainResult, defaults, session) -> None:
    """ONNX Runtime and PyTorch agree within 1e-4 minutes on real held-out orders."""
    inputs = build_inputs(model_columns(trained.frames["test"]), defaults)
    diff = np.abs(onnx_predict(session, inputs) - _torch_predict(trained.model, inputs))
    assert len(diff) > 100 and float(diff.max()) <= 1e-4


@pytest.mark.parametrize("batch", [1, 257])
def test_onnx_batch_dimension_is_dynamic(
    trained: TrainResult, defaults, session, batch: int
) -> None:
    """Batches of 1 and 257 rows run and give one ETA per row, equal to PyTorch's."""
    test = trained.frames["test"]
    rows = test.iloc[np.arange(batch) % len(test)]
    inputs = build_inputs(model_columns(rows), defaults)
    out = session.run(["eta_minutes"], inputs)[0]
    assert out.shape == (batch,) and out.dtype == np.float32
    assert np.abs(out - _torch_predict(trained.model, inputs)).max() <= 1e-4


def test_manifest_describes_the_model_and_round_trips(trained: TrainResult) -> None:
    """The manifest names eta_v1, has version, training window, metrics, defaults; round-trips."""
    manifest = load_manifest(trained.target)
    assert manifest.name == "eta" and manifest.feature_service == FEATURE_SERVICE == "eta_v1"
    assert manifest.version == trained.version == trained.target.name
    assert set(manifest.training_window) == {"start", "end"}
    assert pd.Timestamp(manifest.training_window["start"]) < pd.Timestamp(
        manifest.training_window["end"]
    )
    assert set(METRIC_KEYS) <= set(manifest.metrics)
    assert set(manifest.feature_defaults) == set(LIVE_FEATURES)
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [
        ("dense", "FP32", [-1, len(FEATURE_NAMES)]),
        ("areas", "INT64", [-1, 2]),
    ]
    assert [(t.name, t.shape) for t in manifest.outputs] == [("eta_minutes", [-1])]
    assert ModelManifest.from_dict(json.loads(manifest.to_json())) == manifest
    restaurants = pd.read_parquet(trained.target / RESTAURANTS_FILE)
    assert (
        list(restaurants.columns) == ["restaurant_id", "lat", "lon"]
        and restaurants["restaurant_id"].is_unique
    )


def _columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in model_columns(frame).items()}


def test_farther_delivery_gets_longer_eta(trained: TrainResult, defaults, session) -> None:
    """All else equal, a drop-off 4 km away gets a longer ETA than one 0.5 km away."""
    test = trained.frames["test"].head(300)
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, len(test))
    eta = {}
    for km in (0.5, 4.0):
        columns = _columns(test)
        columns["delivery_lat"], columns["delivery_lon"] = offset_point(
            columns["lat"], columns["lon"], km * np.cos(angle), km * np.sin(angle)
        )
        eta[km] = onnx_predict(session, build_inputs(columns, defaults))
    assert np.all(eta[4.0] > eta[0.5])


def test_higher_congestion_is_not_shorter(trained: TrainResult, defaults, session) -> None:
    """All else equal, a congested area (ratio 2.5) never gets a shorter ETA than a calm one (0)."""
    test = trained.frames["test"].head(300)
    eta = {}
    for ratio in (0.0, 2.5):
        columns = _columns(test)
        columns["congestion_ratio"] = np.full(len(test), ratio)
        eta[ratio] = onnx_predict(session, build_inputs(columns, defaults))
    assert np.all(eta[2.5] >= eta[0.0])


def test_build_inputs_fills_missing_features_with_defaults(trained: TrainResult, defaults) -> None:
    """None, NaN and absent live features take the defaults, and the tensors are finite."""
    rows = trained.frames["test"].head(3)
    base = {k: v for k, v in _columns(rows).items() if k not in LIVE_FEATURES}
    filled = build_inputs(
        {**base, **{name: [defaults[name]] * 3 for name in LIVE_FEATURES}}, defaults
    )
    absent = build_inputs(base, defaults)
    holes = build_inputs(
        {**base, **{name: [None, np.nan, None] for name in LIVE_FEATURES}}, defaults
    )
    for inputs in (absent, holes):
        assert inputs["dense"].dtype == np.float32 and inputs["areas"].dtype == np.int64
        assert inputs["dense"].shape == (3, len(FEATURE_NAMES)) and inputs["areas"].shape == (3, 2)
        assert np.isfinite(inputs["dense"]).all()
        np.testing.assert_array_equal(inputs["areas"], filled["areas"])
    np.testing.assert_array_equal(absent["dense"], holes["dense"])
    flag = FEATURE_NAMES.index("prep_stats_missing")
    assert (
        absent["dense"][:, flag].tolist() == [1.0] * 3
        and filled["dense"][:, flag].tolist() == [0.0] * 3
    )
    others = [i for i in range(len(FEATURE_NAMES)) if i != flag]
    np.testing.assert_array_equal(absent["dense"][:, others], filled["dense"][:, others])


def test_order_time_conventions_agree(trained: TrainResult, defaults) -> None:
    """order_time as epoch seconds, datetime64 or pandas timestamps gives the same tensors."""
    rows = trained.frames["test"].head(5)
    columns = _columns(rows)
    as_seconds = build_inputs(columns, defaults)["dense"]
    for times in (rows["event_timestamp"], rows["event_timestamp"].dt.tz_localize(None).to_numpy()):
        np.testing.assert_array_equal(
            build_inputs({**columns, "order_time": times}, defaults)["dense"], as_seconds
        )
    assert epoch_seconds(pd.Series(pd.to_datetime(["1970-01-02T00:00:00Z"])))[0] == 86400.0


def test_bad_coordinates_are_refused(defaults) -> None:
    """Missing coordinates cannot be defaulted: build_inputs says which column is wrong."""
    columns = {
        "lat": [np.nan],
        "lon": [4.9],
        "delivery_lat": [52.37],
        "delivery_lon": [4.9],
        "order_time": [0.0],
    }
    with pytest.raises(ValueError, match="'lat'"):
        build_inputs(columns, defaults)


def test_training_set_is_a_point_in_time_join(trained: TrainResult) -> None:
    """Training features equal the offline row at or before each order time, not the latest."""
    frame = pd.concat(
        [trained.frames["train"], trained.frames["validation"], trained.frames["test"]]
    )
    frame = frame.assign(event_timestamp=frame["event_timestamp"].astype("datetime64[ns, UTC]"))
    stats = pd.read_parquet(
        trained.frames["data_dir"] / "offline" / "restaurant_prep_stats.parquet"
    )
    stats = stats.assign(event_timestamp=stats["event_timestamp"].astype("datetime64[ns, UTC]"))
    expected = (
        pd.merge_asof(
            frame[["order_id", "restaurant_id", "event_timestamp"]].sort_values("event_timestamp"),
            stats.sort_values("event_timestamp"),
            on="event_timestamp",
            by="restaurant_id",
            direction="backward",
            tolerance=pd.Timedelta(days=7),
        )
        .set_index("order_id")
        .loc[frame["order_id"]]
    )
    got = frame["prep_time_mean_7d"].to_numpy()
    np.testing.assert_allclose(
        got, expected["prep_time_mean_7d"].to_numpy(), rtol=1e-5, equal_nan=True
    )
    latest = (
        stats.sort_values("event_timestamp").groupby("restaurant_id")["prep_time_mean_7d"].last()
    )
    differs = ~np.isclose(got, latest.reindex(frame["restaurant_id"]).to_numpy(), rtol=1e-5)
    assert differs.mean() > 0.5  # most orders predate the latest daily statistics


def test_metrics_json_has_every_key(trained: TrainResult) -> None:
    """reports/metrics.json holds every metric, with numbers, and the plots exist."""
    reports = trained.frames["reports"]
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics)
    assert isinstance(metrics["targets_met"], bool) and metrics["n_test"] == len(
        trained.frames["test"]
    )
    assert all(
        np.isfinite(metrics[k]) and metrics[k] > 0 for k in METRIC_KEYS if k != "targets_met"
    )
    for plot in ("predicted_vs_actual.png", "error_by_distance.png"):
        assert (reports / plot).stat().st_size > 1000
